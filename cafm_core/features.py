"""Feature networks for evaluating generated images.

Standard Inception FID needs pretrained weights that cannot be downloaded here, so the
pipeline trains a small in-domain classifier (``DigitFeatureNet``) on the real data and
computes Fréchet distance / KID / precision-recall on its penultimate features. If a
user has a local TorchScript Inception-v3 FID file, ``load_inception_features`` uses it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from cafm_core.checks import CAFMInputError, check_positive, check_tensor
from cafm_core.data import Dataset, PixelImages


@dataclass(frozen=True)
class FeatureNetConfig:
    """Constructor arguments of ``DigitFeatureNet`` (saved with it so it can be rebuilt)."""

    in_channels: int
    resolution: int
    num_classes: int
    feature_dim: int = 64
    width: int = 32

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise CAFMInputError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise CAFMInputError(f"resolution must be an int >= 8, got {self.resolution!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise CAFMInputError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        check_positive("feature_dim", self.feature_dim, integer=True)
        check_positive("width", self.width, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> FeatureNetConfig:
        known = {field.name for field in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise CAFMInputError(f"unknown FeatureNetConfig keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**values)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.GELU(),
    )


class DigitFeatureNet(nn.Module):
    """Small CNN classifier; its penultimate activations are the evaluation features.

    Stride-2 stages halve the image until it is at most 4 pixels wide (at least one stage),
    so any resolution >= 8 works. GroupNorm keeps each sample's features independent of
    the batch it is evaluated in.
    """

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        self.config = config.to_dict()
        self.in_channels = config.in_channels
        self.resolution = config.resolution
        num_downsamples = max(1, math.ceil(math.log2(config.resolution / 4)))
        channels = config.width
        layers = [_conv_block(config.in_channels, channels, 1), _conv_block(channels, channels, 1)]
        for _ in range(num_downsamples):
            out_channels = min(channels * 2, 256)
            layers += [_conv_block(channels, out_channels, 2), _conv_block(out_channels, out_channels, 1)]
            channels = out_channels
        self.trunk = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.feature_head = nn.Sequential(nn.Linear(channels * 4, config.feature_dim), nn.GELU())
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    @classmethod
    def from_config(cls, config: dict | FeatureNetConfig) -> DigitFeatureNet:
        if isinstance(config, dict):
            config = FeatureNetConfig.from_dict(config)
        return cls(config)

    def _check_images(self, images: torch.Tensor) -> None:
        check_tensor(
            "images",
            images,
            shape=(None, self.in_channels, self.resolution, self.resolution),
            floating=True,
            finite=False,
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]`` of images ``[N, C, H, W]`` in [-1, 1]."""
        self._check_images(images)
        hidden = self.pool(self.trunk(images))
        return self.feature_head(hidden.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.classifier(self.features(images))


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y (edge-replicated padding)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    shifted = torch.empty_like(images)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            if chosen.any():
                shifted[chosen] = padded[chosen, :, dy : dy + size, dx : dx + size]
    return shifted


def _stratified_split(labels: torch.Tensor, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/val indices with about ``val_fraction`` of every class held out."""
    train, val = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        num_val = int(round(len(members) * val_fraction))
        num_val = min(num_val, len(members) - 1)
        val.append(members[:num_val])
        train.append(members[num_val:])
    return torch.cat(train), torch.cat(val)


@torch.no_grad()
def _accuracy(model: nn.Module, take: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor,
              labels: torch.Tensor, batch_size: int = 512) -> float:
    """Share of rows ``index`` (images from ``take(rows)``) classified as ``labels[index]``."""
    if len(index) == 0:
        return float("nan")
    correct = 0
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        logits = model(take(rows))
        correct += int((logits.argmax(dim=1) == labels[rows]).sum())
    return correct / len(index)


def train_feature_network(
    dataset: Dataset | PixelImages,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    val_fraction: float = 0.2,
    feature_dim: int = 64,
    width: int = 32,
    seed: int = 0,
    log_every: int = 100,
    callback: Callable[[int, dict], None] | None = None,
) -> tuple[DigitFeatureNet, dict]:
    """Train ``DigitFeatureNet`` on a labelled image dataset; returns the model (eval mode) and a report.

    Light augmentation (random 1-pixel shifts). The report holds train/val accuracy on a
    stratified split; ``callback(step, {"loss": ...})`` is called every ``log_every`` steps.
    ``dataset`` may hold uint8 pixels (``PixelImages``): batches become float32 as they are
    drawn, and nothing is copied whole (memory: the pixels, then one batch).
    """
    if not isinstance(dataset, (Dataset, PixelImages)):
        raise CAFMInputError(f"dataset must be a cafm_core.data.Dataset or PixelImages, got {type(dataset).__name__}")
    if dataset.kind != "image":
        raise CAFMInputError(f"the feature network needs an image dataset, got kind {dataset.kind!r}")
    if dataset.labels is None or dataset.num_classes < 2:
        raise CAFMInputError(
            f"the feature network is a classifier and needs class labels (>= 2 classes); dataset "
            f"{dataset.name!r} has {'no labels' if dataset.labels is None else f'{dataset.num_classes} class'}. "
            "Use class subfolders for the image folder."
        )
    check_positive("steps", steps, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    check_positive("log_every", log_every, integer=True)
    if not 0.0 < val_fraction < 1.0:
        raise CAFMInputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    channels, height, width_pixels = dataset.sample_shape
    if height != width_pixels:
        raise CAFMInputError(f"images must be square, got {height}x{width_pixels}")
    config = FeatureNetConfig(
        in_channels=channels,
        resolution=height,
        num_classes=dataset.num_classes,
        feature_dim=feature_dim,
        width=width,
    )
    model = DigitFeatureNet(config)
    train_index, val_index = _stratified_split(dataset.labels, val_fraction, generator)
    take = dataset.images if isinstance(dataset, PixelImages) else (lambda rows: dataset.data[rows])

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    history = []
    model.train()
    loss_value = float("nan")
    for step in range(1, steps + 1):
        batch = train_index[torch.randint(0, len(train_index), (min(batch_size, len(train_index)),), generator=generator)]
        images = _random_shift(take(batch), generator)
        loss = F.cross_entropy(model(images), dataset.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": loss_value})
            if callback is not None:
                callback(step, {"loss": loss_value})

    model.eval()
    report = {
        "train_accuracy": _accuracy(model, take, train_index, dataset.labels),
        "val_accuracy": _accuracy(model, take, val_index, dataset.labels),
        "final_loss": loss_value,
        "steps": steps,
        "num_train": len(train_index),
        "num_val": len(val_index),
        "seconds": time.perf_counter() - started,
        "history": history,
        "config": config.to_dict(),
    }
    return model, report


@torch.no_grad()
def extract_features(model: DigitFeatureNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Features ``[N, feature_dim]`` (float32, CPU) of ``images``, in eval mode and without gradients."""
    check_tensor("images", images, ndim=4, floating=True)
    check_positive("batch_size", batch_size, integer=True)
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        outputs = [
            model.features(images[start : start + batch_size].to(parameter.device, parameter.dtype)).float().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, model.config["feature_dim"])


def class_accuracy(model: DigitFeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Share of ``images`` the classifier assigns to their given ``labels`` (for conditional samples)."""
    check_tensor("images", images, ndim=4, floating=True)
    return class_accuracy_from_features(model, extract_features(model, images, batch_size), labels)


@torch.no_grad()
def class_accuracy_from_features(model: DigitFeatureNet, features: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`class_accuracy` from features already extracted (``extract_features``), so an
    evaluation that needs both runs the network once."""
    check_tensor("features", features, ndim=2, floating=True)
    check_tensor("labels", labels, shape=(features.shape[0],), floating=False)
    if features.shape[0] == 0:
        raise CAFMInputError("class_accuracy needs at least one image, got 0")
    num_classes = model.config["num_classes"]
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise CAFMInputError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        logits = model.classifier(features.to(parameter.device, parameter.dtype))
        correct = int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
    finally:
        model.train(was_training)
    return correct / features.shape[0]


# ---------------------------------------------------------------------------------------------
# Standard Inception-v3 FID features (local TorchScript weights only)

INCEPTION_RESOLUTION = 299


class InceptionFeatureExtractor:
    """Maps images ``[N, C, H, W]`` in [-1, 1] (C = 1 or 3) to Inception pool features ``[N, 2048]``."""

    def __init__(self, module: torch.jit.ScriptModule, *, batch_size: int = 64, device: str | torch.device = "cpu"):
        self.module = module.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.accepts_return_features = _accepts_argument(module, "return_features")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_tensor("images", images, ndim=4, floating=True)
        if images.shape[1] not in (1, 3):
            raise CAFMInputError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device, torch.float32)
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            # The FID networks expect 8-bit pixel values [0, 255] as they would be saved to disk.
            batch = ((batch + 1.0) * 127.5).clamp(0.0, 255.0).round()
            if batch.shape[-2:] != (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION):
                batch = F.interpolate(
                    batch, size=(INCEPTION_RESOLUTION, INCEPTION_RESOLUTION), mode="bilinear", align_corners=False
                )
            if self.accepts_return_features:
                features = self.module(batch, return_features=True)
            else:
                features = self.module(batch)
            outputs.append(features.reshape(features.shape[0], -1).float().cpu())
        return torch.cat(outputs)


def _accepts_argument(module: torch.jit.ScriptModule, name: str) -> bool:
    try:
        return any(argument.name == name for argument in module.forward.schema.arguments)
    except AttributeError:
        return False


def load_inception_features(
    weights_path: str | os.PathLike | None, *, batch_size: int = 64, device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """Load a local TorchScript Inception-v3 FID network (e.g. StyleGAN3's ``inception-2015-12-05.pt``).

    Nothing can be downloaded here, so the path must point to an existing file; without one
    the pipeline falls back to Fréchet distance on the in-domain feature network.
    """
    if weights_path is None or str(weights_path).strip() == "" or not os.path.isfile(weights_path):
        raise CAFMInputError(
            f"standard Inception FID needs local weights, and none can be downloaded here: "
            f"weights_path {weights_path!r} is not an existing file. Pass the path to a TorchScript "
            "Inception-v3 FID file (e.g. inception-2015-12-05.pt); otherwise the in-domain "
            "Fréchet distance (feature network trained on the real data) is used."
        )
    try:
        module = torch.jit.load(str(weights_path), map_location="cpu")
    except Exception as error:
        raise CAFMInputError(
            f"could not load {str(weights_path)!r} as a TorchScript Inception network: {error}"
        ) from error
    check_positive("batch_size", batch_size, integer=True)
    return InceptionFeatureExtractor(module, batch_size=batch_size, device=device)
