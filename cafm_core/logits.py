"""CAFM discriminator logits: directional derivatives of ``D`` along ``(w, 1)``.

For a velocity ``w`` at ``(x_t, t)`` the logit is ``D'(w) = grad_x D . w + dD/dt``, the
rate of change of ``D`` when moving along the flow with velocity ``w``. Two exact ways
to compute it, selectable by ``mode``:

* ``"forward"``: ``torch.func.jvp`` with tangent ``(w, 1)``; several tangents go through
  one ``vmap``-ed call. This is the paper's formulation.
* ``"reverse"``: one ``torch.autograd.grad`` of ``sum D`` w.r.t. ``(x_t, t)`` gives
  ``g = (grad_x D, dD/dt)`` per sample (samples are independent), which serves every
  tangent: ``D'(w) = <g_x, w> + g_t``. With ``create_graph=True`` the result can be
  differentiated w.r.t. the discriminator's parameters (D step). Cheaper on CPU.

``DiscriminatorLogits`` wraps a discriminator so "D + logits" is one module: wrap that in
DDP so parameter gradients synchronise across workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import jvp, vmap

from cafm_core.checks import CAFMInputError, check_choice
from cafm_core.models import twice_differentiable

LOGIT_MODES = ("reverse", "forward")


def _stack_tangents(x_t: torch.Tensor, tangents: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = tangents if isinstance(tangents, torch.Tensor) else torch.stack(list(tangents))
    if stacked.ndim != x_t.ndim + 1 or stacked.shape[1:] != x_t.shape:
        raise CAFMInputError(
            f"tangents must have shape (K, {', '.join(map(str, x_t.shape))}), got {tuple(stacked.shape)}"
        )
    return stacked.to(x_t.dtype)


def directional_logits(
    discriminator: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    tangents: torch.Tensor | Sequence[torch.Tensor],
    *,
    mode: str = "reverse",
    create_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(D(x_t, t, y) [B], logits [K, B])`` for ``K`` tangent velocities.

    ``create_graph`` (reverse mode only) keeps the graph through ``grad D`` so the logits
    can be differentiated w.r.t. the discriminator's parameters; with ``False`` the
    gradient ``g`` is a constant and logits are differentiable only w.r.t. the tangents
    (the generator step). Forward mode is always differentiable w.r.t. both.
    """
    check_choice("logit mode", mode, LOGIT_MODES)
    if t.shape != (x_t.shape[0],):
        raise CAFMInputError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
    stacked = _stack_tangents(x_t, tangents)
    x_t = x_t.detach()
    t = t.detach().to(x_t.dtype)

    if mode == "forward":
        def along(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(lambda x, s: discriminator(x, s, y), (x_t, t), (w, torch.ones_like(t)))

        if stacked.shape[0] == 1:
            values, logit = along(stacked[0])
            return values, logit[None]
        values, logits = vmap(along, out_dims=(None, 0))(stacked)
        return values, logits

    values, grad_x, grad_t = input_gradient(discriminator, x_t, t, y, create_graph=create_graph)
    return values, logits_from_gradient(grad_x, grad_t, stacked)


def input_gradient(
    discriminator: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, *, create_graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D(x_t, t, y) [B], grad_x D [B, ...], dD/dt [B])``: the reverse-mode gradient that
    serves every tangent (see ``logits_from_gradient``). With ``create_graph=False`` all three
    are constants (detached)."""
    x = x_t.detach().requires_grad_(True)
    s = t.detach().to(x.dtype).requires_grad_(True)
    # a graph through grad D is differentiated again: the models' ops must be twice differentiable
    with torch.enable_grad(), (twice_differentiable() if create_graph else nullcontext()):
        values = discriminator(x, s, y)
        grad_x, grad_t = torch.autograd.grad(values.sum(), (x, s), create_graph=create_graph)
    if not create_graph:
        values = values.detach()
    return values, grad_x, grad_t


def logits_from_gradient(grad_x: torch.Tensor, grad_t: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``D'(w) = <grad_x D, w> + dD/dt`` for tangents ``[K, B, ...]`` -> ``[K, B]``."""
    return (grad_x.unsqueeze(0) * tangents).flatten(2).sum(-1) + grad_t


class DiscriminatorLogits(nn.Module):
    """``discriminator`` + ``directional_logits`` as one module (wrap this in DDP)."""

    def __init__(self, discriminator: nn.Module, mode: str = "reverse") -> None:
        super().__init__()
        check_choice("logit mode", mode, LOGIT_MODES)
        self.discriminator = discriminator
        self.mode = mode

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        tangents: torch.Tensor | Sequence[torch.Tensor],
        create_graph: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return directional_logits(
            self.discriminator, x_t, t, y, tangents, mode=self.mode, create_graph=create_graph
        )


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily stop ``module``'s parameters from receiving gradients."""
    previous = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
