"""Datasets: the built-in sets (digits and synthetic low-dim toys) and an image-folder reader.

Conventions: images are float32 ``[N, C, H, W]`` in ``[-1, 1]``; low-dim points are float32
``[N, D]``; labels are int64 ``[N]`` in ``[0, num_classes)``.

The synthetic sets come with exact support tests (``on_manifold``) and mode assignment
(``nearest_mode``) so generated samples can be scored without a learned feature network.
"""

from __future__ import annotations

import io
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cafm_core.checks import CAFMInputError, check_choice, check_positive, check_tensor

DATASET_KINDS = ("image", "points")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Images with more pixels than this (64 Mpx, e.g. 8192x8192) are counted as bad files, never
decoded: a decompression bomb must not exhaust memory. PIL's own limit (89 Mpx warns,
179 Mpx refuses) is looser."""
MAX_FILE_BYTES = 50 * 1024 * 1024
"""Default size cap of an image file (50 MiB): a larger file is counted as a bad file and
never read into memory nor decoded (``check_file_size``)."""
MIN_IMAGES = 2
"""Fewest readable images an image folder may hold."""

PIXEL_SCALE = 127.5
"""Stored pixels are uint8 ``u`` in 0..255; the model sees ``u / PIXEL_SCALE - 1`` in [-1, 1]."""


def images_to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Quantise images in [-1, 1] to uint8 0..255 (nearest level; values outside are clipped).
    :func:`uint8_to_images` inverts it to within half a level (``1 / 255`` in [-1, 1])."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return np.clip(np.rint((array.astype(np.float64) + 1.0) * PIXEL_SCALE), 0, 255).astype(np.uint8)


def uint8_to_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (``u / 127.5 - 1``, computed in float32: the
    same values the image-folder reader has always produced)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise CAFMInputError(f"pixels must be uint8, got {pixels.dtype}")
    return pixels.astype(np.float32) / np.float32(PIXEL_SCALE) - np.float32(1.0)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled or unlabelled set of images or low-dim points, validated on creation."""

    data: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    kind: str
    class_names: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        check_choice("dataset kind", self.kind, DATASET_KINDS)
        want_ndim = 4 if self.kind == "image" else 2
        check_tensor(f"{self.kind} dataset data", self.data, ndim=want_ndim, floating=True)
        if self.data.dtype != torch.float32:
            raise CAFMInputError(f"dataset data must be float32, got {self.data.dtype}")
        if self.data.shape[0] == 0:
            raise CAFMInputError("dataset data is empty (0 samples)")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise CAFMInputError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.labels is None:
            if self.num_classes != 0:
                raise CAFMInputError(
                    f"an unlabelled dataset must have num_classes 0, got {self.num_classes}"
                )
        else:
            check_tensor("dataset labels", self.labels, shape=(self.data.shape[0],), floating=False)
            if self.labels.dtype != torch.int64:
                raise CAFMInputError(f"dataset labels must be int64, got {self.labels.dtype}")
            if self.num_classes < 1:
                raise CAFMInputError("a labelled dataset needs num_classes >= 1, got 0")
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= self.num_classes:
                raise CAFMInputError(
                    f"dataset labels must lie in [0, {self.num_classes}), got range [{low}, {high}]"
                )
        if len(self.class_names) != self.num_classes:
            raise CAFMInputError(
                f"class_names has {len(self.class_names)} entries, expected num_classes={self.num_classes}"
            )

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` for images, ``(D,)`` for points."""
        return tuple(self.data.shape[1:])


@dataclass(frozen=True, eq=False)
class PixelImages:
    """Labelled images held as uint8 pixels ``[N, C, H, W]`` (a quarter of float32's memory),
    turned into float32 in [-1, 1] a batch at a time (:meth:`images`): what the prepare stage
    trains the feature network on."""

    pixels: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = ""
    kind: str = "image"

    def __post_init__(self) -> None:
        check_tensor("pixels", self.pixels, ndim=4, floating=False)
        if self.pixels.dtype != torch.uint8:
            raise CAFMInputError(f"pixels must be uint8, got {self.pixels.dtype}")
        check_tensor("labels", self.labels, shape=(self.pixels.shape[0],), floating=False)
        if len(self.class_names) != self.num_classes:
            raise CAFMInputError(f"class_names has {len(self.class_names)} entries, expected {self.num_classes}")

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape[1:])

    def images(self, index: torch.Tensor | slice) -> torch.Tensor:
        """float32 images in [-1, 1] of rows ``index`` (the same values as :func:`uint8_to_images`)."""
        return self.pixels[index].to(torch.float32) / PIXEL_SCALE - 1.0


# ---------------------------------------------------------------------------------------------
# Synthetic sets: constants that define them (and their support tests).

FOUR_MODES_1D_CENTRES = (-3.0, -1.0, 1.0, 3.0)
"""Centres of the 1-D 4-mode mixture (equal weights)."""
FOUR_MODES_1D_STD = 0.1
"""Standard deviation of each 1-D mode."""

EIGHT_GAUSSIANS_RADIUS = 2.0
"""Radius of the circle on which the 8 mode centres sit (angles k * 45 degrees)."""
EIGHT_GAUSSIANS_STD = 0.1
"""Isotropic standard deviation of each 2-D mode."""

CHECKERBOARD_EXTENT = 2.0
"""The checkerboard covers [-2, 2]^2 with 4 x 4 unit cells; black cells have (col + row) even."""
CHECKERBOARD_CELLS = 4
CHECKERBOARD_MARGIN = 0.05
"""Distance outside a black cell still counted as on the support."""

TWO_MOONS_NOISE_STD = 0.1
"""Isotropic Gaussian noise added to the two moons, in the final (scaled) coordinates."""
TWO_MOONS_SCALE = 2.0
TWO_MOONS_SHIFT = (-0.5, -0.25)
"""Moons are make_moons curves shifted by TWO_MOONS_SHIFT then scaled by TWO_MOONS_SCALE."""

ON_MANIFOLD_NUM_STD = 4.0
"""A point is on a Gaussian mode / a moon if within this many noise stds of it.

Four (not three) stds so that in 2-D at least 99.9% of true samples pass: the radius of an
isotropic 2-D Gaussian exceeds k std with probability exp(-k^2 / 2), 1.1% for k=3 but
0.03% for k=4. Modes are far enough apart (>= 1.5 units, tolerance 0.4) not to overlap.
"""

BUILTIN_DATASETS = ("digits", "four_modes_1d", "eight_gaussians", "checkerboard", "two_moons")
MIXTURE_DATASETS = ("four_modes_1d", "eight_gaussians")
SYNTHETIC_DATASETS = ("four_modes_1d", "eight_gaussians", "checkerboard", "two_moons")


def mode_centres(name: str) -> torch.Tensor:
    """Mode centres ``[M, D]`` of a Gaussian-mixture built-in set."""
    check_choice("mixture dataset", name, MIXTURE_DATASETS)
    if name == "four_modes_1d":
        return torch.tensor(FOUR_MODES_1D_CENTRES, dtype=torch.float32).unsqueeze(1)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return centres.float()


def _mode_std(name: str) -> float:
    return FOUR_MODES_1D_STD if name == "four_modes_1d" else EIGHT_GAUSSIANS_STD


def _sample_mixture(name: str, num_samples: int, generator: torch.Generator) -> Dataset:
    centres = mode_centres(name)
    num_modes, dim = centres.shape
    labels = torch.randint(0, num_modes, (num_samples,), generator=generator)
    noise = torch.randn(num_samples, dim, generator=generator) * _mode_std(name)
    return Dataset(
        data=(centres[labels] + noise).float(),
        labels=labels,
        num_classes=num_modes,
        kind="points",
        class_names=[f"mode_{index}" for index in range(num_modes)],
        name=name,
    )


def _sample_checkerboard(num_samples: int, generator: torch.Generator) -> Dataset:
    cell_size = 2 * CHECKERBOARD_EXTENT / CHECKERBOARD_CELLS
    black = [
        (col, row)
        for row in range(CHECKERBOARD_CELLS)
        for col in range(CHECKERBOARD_CELLS)
        if (col + row) % 2 == 0
    ]
    black_cells = torch.tensor(black, dtype=torch.float32)
    which = torch.randint(0, len(black), (num_samples,), generator=generator)
    offsets = torch.rand(num_samples, 2, generator=generator)
    points = -CHECKERBOARD_EXTENT + (black_cells[which] + offsets) * cell_size
    return Dataset(data=points.float(), labels=None, num_classes=0, kind="points", name="checkerboard")


def _moon_curves(num_points_per_moon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-free upper and lower moon curves, in final coordinates, each ``[P, 2]``."""
    theta = torch.linspace(0.0, math.pi, num_points_per_moon, dtype=torch.float64)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    shift = torch.tensor(TWO_MOONS_SHIFT, dtype=torch.float64)
    return ((upper + shift) * TWO_MOONS_SCALE).float(), ((lower + shift) * TWO_MOONS_SCALE).float()


def _sample_two_moons(num_samples: int, generator: torch.Generator) -> Dataset:
    labels = torch.randint(0, 2, (num_samples,), generator=generator)
    theta = torch.rand(num_samples, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    curve = torch.where(labels.unsqueeze(1) == 0, upper, lower)
    shift = torch.tensor(TWO_MOONS_SHIFT, dtype=torch.float64)
    points = (curve + shift) * TWO_MOONS_SCALE
    points = points + torch.randn(num_samples, 2, generator=generator, dtype=torch.float64) * TWO_MOONS_NOISE_STD
    return Dataset(
        data=points.float(),
        labels=labels,
        num_classes=2,
        kind="points",
        class_names=["upper_moon", "lower_moon"],
        name="two_moons",
    )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32)  # [N, 8, 8], values 0..16
    images = (pixels / 16.0 * 2.0 - 1.0).unsqueeze(1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return Dataset(
        data=images,
        labels=labels,
        num_classes=10,
        kind="image",
        class_names=[str(digit) for digit in range(10)],
        name="digits",
    )


def load_builtin(name: str, *, num_samples: int = 20000, seed: int = 0) -> Dataset:
    """Load a built-in dataset; synthetic sets draw ``num_samples`` points deterministically from ``seed``.

    ``digits`` is scikit-learn's 1,797 real 8x8 digit images (``num_samples`` is ignored).
    """
    check_choice("built-in dataset", name, BUILTIN_DATASETS)
    if name == "digits":
        return _load_digits()
    check_positive("num_samples", num_samples, integer=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CAFMInputError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    if name in MIXTURE_DATASETS:
        return _sample_mixture(name, num_samples, generator)
    if name == "checkerboard":
        return _sample_checkerboard(num_samples, generator)
    return _sample_two_moons(num_samples, generator)


def _check_points(name: str, points: torch.Tensor) -> torch.Tensor:
    dim = 1 if name == "four_modes_1d" else 2
    check_tensor(f"points for {name}", points, shape=(None, dim), floating=True)
    return points.detach().float().cpu()


def nearest_mode(name: str, points: torch.Tensor) -> torch.Tensor:
    """Index of the closest mode centre for each point of a mixture set (int64 ``[N]``)."""
    check_choice("mixture dataset", name, MIXTURE_DATASETS)
    points = _check_points(name, points)
    return torch.cdist(points, mode_centres(name)).argmin(dim=1)


def on_manifold(name: str, points: torch.Tensor) -> torch.Tensor:
    """Whether each point lies on the support of synthetic set ``name`` (bool ``[N]``).

    Mixtures: within ON_MANIFOLD_NUM_STD stds of a mode centre. Checkerboard: inside a black
    cell, up to CHECKERBOARD_MARGIN. Two moons: within ON_MANIFOLD_NUM_STD noise stds of a moon curve.
    """
    check_choice("synthetic dataset", name, SYNTHETIC_DATASETS)
    points = _check_points(name, points)
    if name in MIXTURE_DATASETS:
        distance = torch.cdist(points, mode_centres(name)).min(dim=1).values
        return distance <= ON_MANIFOLD_NUM_STD * _mode_std(name)
    if name == "checkerboard":
        return _on_checkerboard(points)
    upper, lower = _moon_curves(2000)
    curve = torch.cat([upper, lower])
    distance = torch.cdist(points, curve).min(dim=1).values
    return distance <= ON_MANIFOLD_NUM_STD * TWO_MOONS_NOISE_STD


def _on_checkerboard(points: torch.Tensor) -> torch.Tensor:
    """True inside a black cell (or within CHECKERBOARD_MARGIN of one)."""
    cell_size = 2 * CHECKERBOARD_EXTENT / CHECKERBOARD_CELLS
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for row in range(CHECKERBOARD_CELLS):
        for col in range(CHECKERBOARD_CELLS):
            if (col + row) % 2:
                continue
            x_low = -CHECKERBOARD_EXTENT + col * cell_size - CHECKERBOARD_MARGIN
            y_low = -CHECKERBOARD_EXTENT + row * cell_size - CHECKERBOARD_MARGIN
            x_high = x_low + cell_size + 2 * CHECKERBOARD_MARGIN
            y_high = y_low + cell_size + 2 * CHECKERBOARD_MARGIN
            inside |= (
                (points[:, 0] >= x_low)
                & (points[:, 0] <= x_high)
                & (points[:, 1] >= y_low)
                & (points[:, 1] <= y_high)
            )
    return inside


# ---------------------------------------------------------------------------------------------
# Image folders (local or any fsspec URL, e.g. s3://bucket/prefix).

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


@dataclass
class ImageFolderReport:
    """What the image-folder reader found: good and bad files, per class."""

    url: str
    num_images: int
    num_bad: int
    bad_files: list[str]
    bad_reasons: list[str]
    classes: list[str]
    class_counts: dict[str, int]
    skipped_files: list[str] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        total = self.num_images + self.num_bad
        return self.num_bad / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "num_images": self.num_images,
            "num_bad": self.num_bad,
            "bad_fraction": self.bad_fraction,
            "bad_files": list(self.bad_files),
            "bad_reasons": list(self.bad_reasons),
            "classes": list(self.classes),
            "class_counts": dict(self.class_counts),
            "skipped_files": list(self.skipped_files),
        }


def check_file_size(size: int, max_file_bytes: int) -> None:
    """Refuse an image file above the size cap before it is read or decoded: raises OSError
    (a bad file, like an unreadable one) naming its size and the cap."""
    if size > max_file_bytes:
        raise OSError(f"file is {size:,} bytes, above the size cap of {max_file_bytes:,} bytes (data.max_file_bytes); "
                      "not read")


def decode_image_uint8(raw: bytes, *, resolution: int, channels: int) -> np.ndarray:
    """Decode, convert mode, center-crop to square, resize; returns uint8 ``[C, R, R]`` (0..255).

    The pixel count is checked from the header before decoding, so a huge image (or a
    small file claiming huge dimensions) is refused without allocating its pixels.
    """
    from PIL import Image

    if not raw:
        raise OSError("file is empty (0 bytes)")
    with Image.open(io.BytesIO(raw)) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise OSError(
                f"image is {width}x{height} = {width * height:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,}"
            )
        image.load()  # forces a full decode so truncated files fail here
        converted = image.convert("L" if channels == 1 else "RGB")
    width, height = converted.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = converted.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(square, dtype=np.uint8)
    if channels == 1:
        return np.ascontiguousarray(array[None])
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _decode_image(raw: bytes, *, resolution: int, channels: int) -> np.ndarray:
    """:func:`decode_image_uint8` as float32 ``[C, R, R]`` in [-1, 1]."""
    return uint8_to_images(decode_image_uint8(raw, resolution=resolution, channels=channels))


def _entry_name(entry: dict) -> str:
    return entry["name"].rstrip("/")


@dataclass
class ImageFolderListing:
    """The image files of a folder ``url/<class_name>/<files>``, in reading order: classes
    sorted by name, files sorted within each class. ``classes`` are the subfolders holding at
    least one image file; ``labels[i]`` is the index of ``files[i]``'s class in it, ``sizes[i]``
    its size in bytes as listed. ``skipped_files`` are the other files (not images, hidden)."""

    url: str
    classes: list[str]
    files: list[str]
    labels: list[int]
    sizes: list[int]
    skipped_files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def open_image_folder(url: str, storage_options: dict | None = None):
    """``(fsspec filesystem, root path)`` of an image folder URL, with clear errors."""
    import fsspec

    if not isinstance(url, str) or not url:
        raise CAFMInputError(f"image folder url must be a non-empty string, got {url!r}")
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as error:
        raise CAFMInputError(f"cannot open image folder {url!r}: {error}") from error
    try:
        root_exists = fs.isdir(root)
    except (OSError, PermissionError) as error:
        raise CAFMInputError(f"cannot access image folder {url!r}: {error}") from error
    if not root_exists:
        raise CAFMInputError(f"image folder {url!r} does not exist or is not a folder")
    return fs, root


def list_image_folder(url: str, *, storage_options: dict | None = None) -> ImageFolderListing:
    """List ``url/<class_name>/<image files>`` (any fsspec URL) without reading any image."""
    fs, root = open_image_folder(url, storage_options)
    entries = fs.ls(root, detail=True)
    if not entries:
        raise CAFMInputError(f"image folder {url!r} is empty; expected class subfolders with images")
    class_dirs = sorted(
        (_entry_name(entry) for entry in entries if entry["type"] == "directory"),
        key=posixpath.basename,
    )
    class_dirs = [path for path in class_dirs if not posixpath.basename(path).startswith(".")]
    if not class_dirs:
        raise CAFMInputError(
            f"image folder {url!r} has no class subfolders; expected url/<class_name>/<image files>"
        )
    listing = ImageFolderListing(url=url, classes=[], files=[], labels=[], sizes=[])
    for class_dir in class_dirs:
        class_name = posixpath.basename(class_dir)
        files = sorted((_entry_name(entry), int(entry.get("size") or 0))
                       for entry in fs.ls(class_dir, detail=True) if entry["type"] == "file")
        images = []
        for path, size in files:
            base = posixpath.basename(path)
            if base.startswith(".") or not base.lower().endswith(IMAGE_EXTENSIONS):
                listing.skipped_files.append(path)
            else:
                images.append((path, size))
        if images:
            label = len(listing.classes)
            listing.classes.append(class_name)
            listing.files.extend(path for path, _ in images)
            listing.sizes.extend(size for _, size in images)
            listing.labels.extend([label] * len(images))
    if not listing.files:
        raise CAFMInputError(
            f"image folder {url!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders"
        )
    return listing


def bad_fraction_exceeded(num_bad: int, num_files: int, max_bad_fraction: float) -> bool:
    """Whether ``num_bad`` unreadable files of ``num_files`` break the ``max_bad_fraction``
    policy. A count of bad files seen so far can only grow, so once this is True for a
    partial count it is True for the final one."""
    return num_files > 0 and num_bad / num_files > max_bad_fraction


def check_bad_files(url: str, *, num_good: int, bad_files: list[str], bad_reasons: list[str], num_files: int,
                    max_bad_fraction: float) -> None:
    """The image-folder policy, once every file was read: some readable images, at least
    :data:`MIN_IMAGES`, and no more than ``max_bad_fraction`` of the files unreadable."""
    if not num_good:
        raise CAFMInputError(
            f"image folder {url!r} has no readable images: all {len(bad_files)} files failed "
            f"(first: {bad_files[:3]}, {bad_reasons[:1]})"
        )
    if num_good < MIN_IMAGES:
        raise CAFMInputError(
            f"image folder {url!r} has {num_good} readable image(s); at least {MIN_IMAGES} are needed "
            "(a generator and its evaluation statistics need more than one sample)"
        )
    if bad_fraction_exceeded(len(bad_files), num_files, max_bad_fraction):
        raise CAFMInputError(
            f"image folder {url!r}: {len(bad_files)} of {num_files} image files are unreadable "
            f"({len(bad_files) / num_files:.1%} > max_bad_fraction {max_bad_fraction:.1%}); "
            f"first bad files: {bad_files[:5]} (the first one: {bad_reasons[0] if bad_reasons else 'no reason'})"
        )


def read_image_folder(
    url: str,
    *,
    resolution: int,
    channels: int = 3,
    max_bad_fraction: float = 0.0,
    storage_options: dict | None = None,
    num_threads: int = 8,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> tuple[Dataset, ImageFolderReport]:
    """Read ``url/<class_name>/<image files>`` into an image Dataset plus a report of bad files.

    Any fsspec URL works (a local path, ``file://``, ``s3://``). Images are converted to
    grayscale (``channels=1``) or RGB (``channels=3``), center-cropped to a square, resized
    to ``resolution`` and scaled to [-1, 1]. Unreadable files, and files above
    ``max_file_bytes`` (never read), are listed in the report; if
    their share exceeds ``max_bad_fraction`` a CAFMInputError is raised. The whole folder is
    held in memory: for large folders the pipeline's prepare stage streams instead.
    """
    if not isinstance(url, str) or not url:
        raise CAFMInputError(f"image folder url must be a non-empty string, got {url!r}")
    check_positive("resolution", resolution, integer=True)
    if channels not in (1, 3):
        raise CAFMInputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if isinstance(max_bad_fraction, bool) or not 0.0 <= float(max_bad_fraction) < 1.0:
        raise CAFMInputError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction!r}")
    check_positive("num_threads", num_threads, integer=True)
    check_positive("max_file_bytes", max_file_bytes, integer=True)

    listing = list_image_folder(url, storage_options=storage_options)
    fs, _ = open_image_folder(url, storage_options)

    def load_one(path: str, size: int) -> np.ndarray | str:
        try:
            check_file_size(size, max_file_bytes)  # the listed size: a huge file is never fetched
            raw = fs.cat_file(path)
            check_file_size(len(raw), max_file_bytes)  # grown since it was listed
            return _decode_image(raw, resolution=resolution, channels=channels)
        except Exception as error:  # any decode or read failure marks the file bad
            return f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(max_workers=min(num_threads, len(listing))) as pool:
        results = list(pool.map(load_one, listing.files, listing.sizes))

    classes = listing.classes
    images, labels, bad_files, bad_reasons = [], [], [], []
    class_counts = {name: 0 for name in classes}
    for path, label, result in zip(listing.files, listing.labels, results):
        if isinstance(result, str):
            bad_files.append(path)
            bad_reasons.append(result)
        else:
            images.append(result)
            labels.append(label)
            class_counts[classes[label]] += 1

    report = ImageFolderReport(
        url=url,
        num_images=len(images),
        num_bad=len(bad_files),
        bad_files=bad_files,
        bad_reasons=bad_reasons,
        classes=classes,
        class_counts=class_counts,
        skipped_files=listing.skipped_files,
    )
    check_bad_files(url, num_good=len(images), bad_files=bad_files, bad_reasons=bad_reasons,
                    num_files=len(listing), max_bad_fraction=max_bad_fraction)

    # Drop classes whose files were all bad so labels stay dense in [0, num_classes).
    kept = [name for name in classes if class_counts[name] > 0]
    if len(kept) != len(classes):
        remap = dense_label_map(classes, class_counts)
        labels = [remap[label] for label in labels]
        report.classes = kept
    dataset = Dataset(
        data=torch.from_numpy(np.stack(images)).float(),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(kept),
        kind="image",
        class_names=kept,
        name=url,
    )
    return dataset, report


def dense_label_map(classes: list[str], class_counts: dict[str, int]) -> dict[int, int]:
    """Listing label -> label among the classes that kept at least one readable image."""
    kept = [name for name in classes if class_counts[name] > 0]
    position = {name: index for index, name in enumerate(kept)}
    return {index: position[name] for index, name in enumerate(classes) if name in position}
