"""The linear probability path, time samplers and label dropout.

Path (CAFM paper / SiT notation): ``x_t = (1 - t) * x0 + t * eps`` with data ``x0`` and
noise ``eps ~ N(0, I)``; ``t = 0`` is data, ``t = 1`` is noise. The velocity target is
``v = eps - x0``; sampling integrates from ``t = 1`` to ``t = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cafm_core.checks import CAFMInputError, check_choice, check_tensor


def _broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the path at time ``t`` (one time per sample)."""
    if x0.shape != noise.shape:
        raise CAFMInputError(f"x0 and noise must have equal shapes, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    check_tensor("t", t, shape=(x0.shape[0],), floating=True, finite=False)
    tb = _broadcast_time(t, x0)
    return (1 - tb) * x0 + tb * noise


def target_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Conditional velocity ``d x_t / dt = eps - x0`` of the linear path."""
    return noise - x0


def velocity_from_x_prediction(
    x_t: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor, min_t: float = 0.05
) -> torch.Tensor:
    """JiT-style x-prediction to velocity: ``u = (x_t - x0_hat) / max(t, min_t)``.

    On the path ``x_t - x0 = t * (eps - x0)``, so dividing by ``t`` gives the velocity;
    ``min_t`` bounds the division near data.
    """
    return (x_t - x0_hat) / _broadcast_time(t.clamp_min(min_t), x_t)


@dataclass(frozen=True)
class TimeSampler:
    """Training-time distribution of ``t``.

    ``uniform``: ``t ~ U(0, 1)``. ``logit_normal``: ``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``;
    ``shift`` > 1 moves mass towards noise (``t' = shift * t / (1 + (shift - 1) * t)``), as
    used for larger images / pixel-space models. ``t`` is clamped to ``[eps_t, 1 - eps_t]``
    only by ``min_t`` / ``max_t``.
    """

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0
    min_t: float = 0.0
    max_t: float = 1.0

    def __post_init__(self) -> None:
        check_choice("time sampler", self.kind, ("uniform", "logit_normal"))
        if not self.std > 0:
            raise CAFMInputError(f"time sampler std must be > 0, got {self.std}")
        if not self.shift > 0:
            raise CAFMInputError(f"time sampler shift must be > 0, got {self.shift}")
        if not 0.0 <= self.min_t < self.max_t <= 1.0:
            raise CAFMInputError(f"need 0 <= min_t < max_t <= 1, got min_t={self.min_t}, max_t={self.max_t}")

    def sample(self, batch_size: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "uniform":
            t = torch.rand(batch_size, device=device, generator=generator)
        else:
            n = torch.randn(batch_size, device=device, generator=generator)
            t = torch.sigmoid(self.mean + self.std * n)
        if self.shift != 1.0:
            t = self.shift * t / (1 + (self.shift - 1) * t)
        return self.min_t + (self.max_t - self.min_t) * t


def drop_labels(
    labels: torch.Tensor | None,
    *,
    null_class: int,
    drop_prob: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Replace each label by ``null_class`` with probability ``drop_prob`` (for CFG)."""
    if labels is None:
        return None
    if not 0.0 <= drop_prob <= 1.0:
        raise CAFMInputError(f"label drop probability must be in [0, 1], got {drop_prob}")
    if drop_prob == 0.0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < drop_prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)
