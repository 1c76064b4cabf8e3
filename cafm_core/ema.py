"""Exponential moving average (EMA) of a module's weights, kept in float32.

Sampling from EMA weights is standard for flow models; in CAFM post-training the generator's
EMA is updated on generator steps only. The shadow is keyed like ``module.state_dict()``
(parameters and persistent buffers). Pass the unwrapped module (``ddp.module``), not a
DDP wrapper, so names match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cafm_core.checks import CAFMInputError

__all__ = ["EMA"]


def _check_decay(decay: object) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay):
        raise CAFMInputError(f"decay must be a number in [0, 1), got {decay!r}")
    if not 0.0 <= decay < 1.0:
        raise CAFMInputError(f"decay must be in [0, 1), got {decay}")
    return float(decay)


def _check_module(module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise CAFMInputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return module


class EMA:
    """Shadow copy of a module's weights: ``shadow = decay * shadow + (1 - decay) * current``.

    Floating tensors are averaged in float32; integer/bool buffers (e.g. counters) are copied.
    With ``warmup`` the decay used at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so
    a short run is not dominated by the initial weights (0.999 over 2,000 steps would
    still hold 13% of them).
    The shadow lives on the module's device at construction time.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, *, warmup: bool = False):
        _check_module(module)
        self.decay = _check_decay(decay)
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: (t.detach().float() if t.is_floating_point() else t.detach()).clone()
                for name, t in module.state_dict().items()
            }

    def _current(self, module: nn.Module) -> dict[str, Tensor]:
        """The module's state dict, checked against the shadow's names and shapes."""
        current = _check_module(module).state_dict()
        missing = [k for k in self.shadow if k not in current]
        unexpected = [k for k in current if k not in self.shadow]
        shapes = [
            f"{k}: EMA {tuple(self.shadow[k].shape)} vs module {tuple(current[k].shape)}"
            for k in self.shadow
            if k in current and current[k].shape != self.shadow[k].shape
        ]
        if missing or unexpected or shapes:
            raise CAFMInputError(
                "module does not match the EMA's weights: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
                " (pass the unwrapped module, e.g. ddp.module)"
            )
        return current

    @property
    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the shadow towards ``module``'s current weights by ``1 - decay``."""
        current = self._current(module)
        decay = self.current_decay
        floating, values = [], []
        for name, shadow in self.shadow.items():
            value = current[name].to(shadow.device)
            if shadow.is_floating_point():
                floating.append(shadow)
                values.append(value.float())
            else:
                shadow.copy_(value)
        if floating:
            # two rounded products then a sum: exactly decay*old + (1-decay)*new in float32,
            # as multi-tensor kernels (a few launches instead of three per tensor on a GPU)
            torch._foreach_mul_(floating, decay)
            torch._foreach_add_(floating, torch._foreach_mul(values, 1.0 - decay))
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s weights with the shadow (cast to the module's dtypes)."""
        current = self._current(module)
        for name, shadow in self.shadow.items():
            current[name].copy_(shadow)

    def state_dict(self) -> dict:
        """``{"decay", "num_updates", "shadow"}``; for a safetensors checkpoint store ``shadow``
        as tensors (e.g. under an ``"ema/"`` prefix) and ``decay``/``num_updates`` as metadata."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.detach().clone() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match the current shadow."""
        if not isinstance(state, Mapping) or not {"decay", "num_updates", "shadow"} <= set(state):
            raise CAFMInputError("EMA state must be a dict with keys 'decay', 'num_updates', 'shadow'")
        decay = _check_decay(state["decay"])
        num_updates = state["num_updates"]
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise CAFMInputError(f"EMA num_updates must be a non-negative int, got {num_updates!r}")
        shadow = state["shadow"]
        if not isinstance(shadow, Mapping) or set(shadow) != set(self.shadow):
            got = sorted(shadow) if isinstance(shadow, Mapping) else type(shadow).__name__
            raise CAFMInputError(f"EMA shadow keys do not match: expected {sorted(self.shadow)[:5]}..., got {got!r:.200}")
        for k, v in shadow.items():
            if not isinstance(v, Tensor) or v.shape != self.shadow[k].shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise CAFMInputError(f"EMA shadow[{k!r}] must be a tensor of shape {tuple(self.shadow[k].shape)}, got {got}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.decay = decay
        self.num_updates = num_updates
