"""Built-in datasets, their support tests, and the image-folder reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cafm_core.checks import CAFMInputError
from cafm_core.data import (
    BUILTIN_DATASETS,
    SYNTHETIC_DATASETS,
    Dataset,
    load_builtin,
    mode_centres,
    nearest_mode,
    on_manifold,
    read_image_folder,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_digits_are_real_8x8_images_in_unit_range_with_ten_classes():
    digits = load_builtin("digits")
    assert digits.data.shape == (1797, 1, 8, 8)
    assert digits.data.dtype == torch.float32
    assert digits.data.min() == -1.0 and digits.data.max() == 1.0
    assert digits.labels.dtype == torch.int64
    assert set(digits.labels.tolist()) == set(range(10))
    assert digits.num_classes == 10 and digits.kind == "image" and len(digits.class_names) == 10


@pytest.mark.parametrize("name", SYNTHETIC_DATASETS)
def test_synthetic_set_is_deterministic_for_a_seed_and_differs_across_seeds(name):
    first = load_builtin(name, num_samples=500, seed=3)
    second = load_builtin(name, num_samples=500, seed=3)
    other = load_builtin(name, num_samples=500, seed=4)
    assert torch.equal(first.data, second.data)
    assert not torch.equal(first.data, other.data)
    assert first.data.shape == (500, 1 if name == "four_modes_1d" else 2)
    assert first.kind == "points"


@pytest.mark.parametrize("name", SYNTHETIC_DATASETS)
def test_synthetic_samples_lie_on_their_own_manifold(name):
    dataset = load_builtin(name, num_samples=20000, seed=0)
    assert on_manifold(name, dataset.data).float().mean() >= 0.995


def test_checkerboard_is_unlabelled_and_mixtures_label_modes():
    assert load_builtin("checkerboard", num_samples=10).labels is None
    assert load_builtin("checkerboard", num_samples=10).num_classes == 0
    mixture = load_builtin("eight_gaussians", num_samples=2000)
    assert mixture.num_classes == 8
    assert torch.equal(nearest_mode("eight_gaussians", mixture.data), mixture.labels)
    moons = load_builtin("two_moons", num_samples=100)
    assert moons.num_classes == 2 and set(moons.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "name, point",
    [
        ("eight_gaussians", [0.0, 0.0]),
        ("eight_gaussians", [2.0 * np.cos(np.pi / 8), 2.0 * np.sin(np.pi / 8)]),  # between modes
        ("four_modes_1d", [0.0]),
        ("four_modes_1d", [5.0]),
        ("checkerboard", [-1.5, -0.5]),  # centre of a white cell
        ("checkerboard", [3.0, 3.0]),  # outside the board
        ("two_moons", [0.0, 0.0]),
        ("two_moons", [5.0, 5.0]),
    ],
)
def test_points_clearly_off_the_support_are_off_manifold(name, point):
    assert not on_manifold(name, torch.tensor([point])).item()


def test_mode_centres_are_on_manifold_and_their_own_nearest_mode():
    for name in ("four_modes_1d", "eight_gaussians"):
        centres = mode_centres(name)
        assert on_manifold(name, centres).all()
        assert torch.equal(nearest_mode(name, centres), torch.arange(centres.shape[0]))
    assert on_manifold("checkerboard", torch.tensor([[-1.5, -1.5], [0.5, 0.5]])).all()


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(CAFMInputError) as error:
        load_builtin("mnist")
    assert "mnist" in str(error.value)
    for name in BUILTIN_DATASETS:
        assert name in str(error.value)


def test_support_helpers_reject_wrong_point_dims_and_non_mixtures():
    with pytest.raises(CAFMInputError, match="shape"):
        on_manifold("eight_gaussians", torch.zeros(5, 3))
    with pytest.raises(CAFMInputError, match="checkerboard"):
        nearest_mode("checkerboard", torch.zeros(5, 2))
    with pytest.raises(CAFMInputError, match="NaN"):
        on_manifold("two_moons", torch.full((2, 2), float("nan")))


def test_dataset_rejects_out_of_range_labels():
    with pytest.raises(CAFMInputError, match=r"\[0, 3\)"):
        Dataset(
            data=torch.zeros(4, 2),
            labels=torch.tensor([0, 1, 2, 3]),
            num_classes=3,
            kind="points",
            class_names=["a", "b", "c"],
        )
    with pytest.raises(CAFMInputError, match="shape"):
        Dataset(data=torch.zeros(4, 2), labels=torch.zeros(3, dtype=torch.int64), num_classes=1,
                kind="points", class_names=["a"])


# ---------------------------------------------------------------------------------------------
# Image folder reader


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of small PNGs of mixed modes and sizes, plus three bad files."""
    rng = np.random.default_rng(0)
    cats, dogs = tmp_path / "cats", tmp_path / "dogs"
    cats.mkdir()
    dogs.mkdir()
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), "L").save(cats / "gray.png")
    Image.fromarray(rng.integers(0, 255, (10, 16, 4), dtype=np.uint8), "RGBA").save(cats / "rgba.png")
    palette = Image.fromarray(rng.integers(0, 255, (20, 9, 3), dtype=np.uint8), "RGB").convert("P")
    palette.save(cats / "palette.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").save(dogs / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8), "RGB").save(dogs / "big.jpg")
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8), "L").save(dogs / "small.bmp")
    full = _png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB"))
    (dogs / "truncated.png").write_bytes(full[: len(full) // 2])
    (dogs / "empty.png").write_bytes(b"")
    (cats / "notes.png").write_text("this is not an image")
    (cats / "README.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_image_folder_reader_counts_bad_files_and_reads_good_ones(image_folder):
    dataset, report = read_image_folder(str(image_folder), resolution=8, channels=3, max_bad_fraction=0.5)
    assert report.num_images == 6 and report.num_bad == 3
    assert sorted(path.rsplit("/", 1)[-1] for path in report.bad_files) == ["empty.png", "notes.png", "truncated.png"]
    assert report.classes == ["cats", "dogs"]
    assert report.class_counts == {"cats": 3, "dogs": 3}
    assert any(path.endswith("README.txt") for path in report.skipped_files)
    assert dataset.data.shape == (6, 3, 8, 8) and dataset.data.dtype == torch.float32
    assert dataset.data.min() >= -1.0 and dataset.data.max() <= 1.0
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.class_names == ["cats", "dogs"] and dataset.kind == "image"


def test_image_folder_reader_grayscale_and_file_url(image_folder):
    dataset, _ = read_image_folder(f"file://{image_folder}", resolution=4, channels=1, max_bad_fraction=0.5)
    assert dataset.data.shape == (6, 1, 4, 4)


def test_image_folder_reader_raises_when_bad_share_exceeds_threshold(image_folder):
    with pytest.raises(CAFMInputError) as error:
        read_image_folder(str(image_folder), resolution=8, max_bad_fraction=0.2)
    message = str(error.value)
    assert "3 of 9" in message and "truncated.png" in message
    with pytest.raises(CAFMInputError, match="3 of 9"):
        read_image_folder(str(image_folder), resolution=8)  # default: no bad files allowed


def test_image_folder_reader_errors_name_the_url(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(CAFMInputError, match="does not exist"):
        read_image_folder(str(missing), resolution=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CAFMInputError, match="empty") as error:
        read_image_folder(str(empty), resolution=8)
    assert str(empty) in str(error.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (8, 8)).save(flat / "a.png")
    with pytest.raises(CAFMInputError, match="no class subfolders"):
        read_image_folder(str(flat), resolution=8)
    only_bad = tmp_path / "only_bad"
    (only_bad / "a").mkdir(parents=True)
    (only_bad / "a" / "x.png").write_bytes(b"")
    with pytest.raises(CAFMInputError, match="no readable images"):
        read_image_folder(str(only_bad), resolution=8, max_bad_fraction=0.9)


def test_image_folder_reader_rejects_bad_arguments(image_folder):
    with pytest.raises(CAFMInputError, match="channels"):
        read_image_folder(str(image_folder), resolution=8, channels=2)
    with pytest.raises(CAFMInputError, match="resolution"):
        read_image_folder(str(image_folder), resolution=0)
    with pytest.raises(CAFMInputError, match="max_bad_fraction"):
        read_image_folder(str(image_folder), resolution=8, max_bad_fraction=1.5)
