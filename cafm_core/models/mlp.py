"""MLP velocity network and discriminator for low-dimensional data (1-D, 2-D sets).

``MLPBackbone`` maps ``(x, t, y)`` to a hidden vector: ``x`` concatenated with sin-cos
time features (and a label embedding), then ``depth`` SiLU layers. The generator reads a
``data_dim`` velocity from it, the discriminator a scalar; names under ``backbone.``
are shared so a discriminator can start from a generator's weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cafm_core.checks import CAFMInputError, check_choice, check_positive
from cafm_core.models.embeddings import LabelEmbedder, sinusoidal_embedding
from cafm_core.path import velocity_from_x_prediction


@dataclass(frozen=True)
class MLPConfig:
    data_dim: int = 2
    hidden_size: int = 128
    depth: int = 3
    num_classes: int = 0
    prediction: str = "velocity"
    time_features: int = 32
    time_scale: float = 1.0
    x_prediction_min_t: float = 0.05
    kind: str = "mlp"

    def __post_init__(self) -> None:
        if self.kind != "mlp":
            raise CAFMInputError(f"MLPConfig.kind must be 'mlp', got {self.kind!r}")
        check_choice("prediction", self.prediction, ("velocity", "x"))
        for name in ("data_dim", "hidden_size", "depth", "time_features"):
            check_positive(name, getattr(self, name), integer=True)
        if self.num_classes < 0:
            raise CAFMInputError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.data_dim,)

    def to_dict(self) -> dict:
        return asdict(self)


class MLPBackbone(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.y_embedder = LabelEmbedder(config.num_classes, h) if config.num_classes > 0 else None
        self.input = nn.Linear(config.data_dim + config.time_features, h)
        self.layers = nn.ModuleList(nn.Linear(h, h) for _ in range(config.depth - 1))

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 2 or x.shape[1] != cfg.data_dim or not x.is_floating_point():
            raise CAFMInputError(f"x must be a float tensor of shape (B, {cfg.data_dim}), got {tuple(x.shape)} {x.dtype}")
        if t.shape != (x.shape[0],):
            raise CAFMInputError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if cfg.num_classes > 0 and (y is None or y.shape != (x.shape[0],) or y.is_floating_point()):
            raise CAFMInputError(f"y must be int labels of shape ({x.shape[0]},) for a class-conditional model")
        if cfg.num_classes == 0 and y is not None:
            raise CAFMInputError("this model is unconditional (num_classes=0): pass y=None")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.check_inputs(x, t, y)
        time = sinusoidal_embedding(t, self.config.time_features, scale=self.config.time_scale, max_period=100.0)
        h = self.input(torch.cat([x, time.to(x.dtype)], dim=-1))
        if self.y_embedder is not None:
            h = h + self.y_embedder(y)
        h = nn.functional.silu(h)
        for layer in self.layers:
            h = nn.functional.silu(layer(h))
        return h


class MLPVelocityNet(nn.Module):
    """Generator for low-dimensional data."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MLPBackbone(config)
        self.output = nn.Linear(config.hidden_size, config.data_dim)

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.output(self.backbone(x, t, y))
        if self.config.prediction == "x":
            return velocity_from_x_prediction(x, t, out, self.config.x_prediction_min_t)
        return out


class MLPDiscriminator(nn.Module):
    """Discriminator for low-dimensional data: the generator's backbone plus a scalar head."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MLPBackbone(config)
        self.head = nn.Linear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(x, t, y)).squeeze(-1)
