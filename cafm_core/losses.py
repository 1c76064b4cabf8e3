"""Training objectives: flow matching and the CAFM discriminator / generator losses.

Logits are directional derivatives of the discriminator (see ``cafm_core.logits``):
``D'(w) = grad_x D . w + dD/dt``. Real tangents are the path velocity ``v = eps - x0``,
fake tangents the generator's velocity ``u``. Least-squares targets: +1 real, -1 fake.
"""

from __future__ import annotations

import torch


def flow_matching_loss(predicted_velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((u_theta(x_t, t, y) - v)^2)`` over all elements."""
    return (predicted_velocity - target).square().mean()


def discriminator_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    discriminator_values: torch.Tensor,
    *,
    centering_penalty: float = 1e-3,
) -> torch.Tensor:
    """``mean((D'(v) - 1)^2) + mean((D'(u) + 1)^2) + cp * mean(D(x_t)^2)``.

    ``fake_logits`` must come from a detached generator velocity. The centering penalty
    keeps ``D`` itself near zero: only its derivatives carry the signal.
    """
    return (
        (real_logits - 1).square().mean()
        + (fake_logits + 1).square().mean()
        + centering_penalty * discriminator_values.square().mean()
    )


def generator_loss(
    fake_logits: torch.Tensor, generated_velocity: torch.Tensor, *, transport_penalty: float = 0.0
) -> torch.Tensor:
    """``mean((D'(u) - 1)^2) + ot * mean(u^2)``: move ``u`` where D calls it real."""
    loss = (fake_logits - 1).square().mean()
    if transport_penalty:
        loss = loss + transport_penalty * generated_velocity.square().mean()
    return loss
