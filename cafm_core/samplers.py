"""ODE samplers for flow models: Euler and Heun on a uniform time grid, with optional CFG.

Convention: ``x_t = (1 - t) * x0 + t * eps``; sampling integrates ``dx/dt = u(x, t)``
from ``t = 1`` (noise) down to ``t = 0`` (data). NFE counts velocity evaluations.
Samplers take a velocity callable ``(x, t[B]) -> u`` rather than a model, so the same
code serves plain models, guided models and analytic test flows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cafm_core.checks import CAFMInputError, check_choice, check_positive, check_tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""A velocity field ``u(x, t)`` with ``x`` of shape [B, ...] and ``t`` of shape [B]."""

METHODS = ("euler", "heun")

__all__ = [
    "METHODS",
    "VelocityFn",
    "euler_sample",
    "generate",
    "guided_velocity",
    "heun_sample",
    "sample",
    "time_grid",
]


def time_grid(num_steps: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform grid of ``num_steps + 1`` times from 1 (noise) to 0 (data), endpoints exact."""
    check_positive("num_steps", num_steps, integer=True)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=dtype)
    grid[0], grid[-1] = 1.0, 0.0  # guard the endpoints against rounding
    return grid


def _check_noise(noise: object) -> Tensor:
    return check_tensor("noise", noise, floating=True, finite=True)


def _check_nfe(nfe: object) -> int:
    check_positive("nfe", nfe, integer=True)  # type: ignore[arg-type]
    return nfe  # type: ignore[return-value]


def _evaluate(velocity_fn: VelocityFn, x: Tensor, t: float | Tensor) -> Tensor:
    """Call the velocity field at a scalar time broadcast to the batch; check its output shape."""
    tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    u = velocity_fn(x, tt)
    if not isinstance(u, Tensor) or u.shape != x.shape:
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise CAFMInputError(f"velocity_fn must return a tensor of shape {tuple(x.shape)} (same as x), got {got}")
    return u.to(x.dtype)


def euler_sample(velocity_fn: VelocityFn, noise: Tensor, nfe: int) -> Tensor:
    """Explicit Euler from t=1 to t=0: ``nfe`` steps, one velocity evaluation each."""
    x = _check_noise(noise)
    _check_nfe(nfe)
    grid = time_grid(nfe, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * _evaluate(velocity_fn, x, t_cur)
    return x


def heun_sample(velocity_fn: VelocityFn, noise: Tensor, nfe: int) -> Tensor:
    """Heun's second-order method (explicit trapezoid) from t=1 to t=0.

    Uses ``nfe // 2`` uniform steps with two evaluations each (at both ends of the step,
    the last one at t=0), so exactly ``nfe`` evaluations; ``nfe`` must be even and >= 2.
    """
    x = _check_noise(noise)
    _check_nfe(nfe)
    if nfe < 2 or nfe % 2 != 0:
        raise CAFMInputError(
            f"heun needs an even nfe >= 2 (2 evaluations per step), got nfe={nfe}; use an even nfe or method='euler'"
        )
    grid = time_grid(nfe // 2, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t_cur
        d_cur = _evaluate(velocity_fn, x, t_cur)
        x_pred = x + h * d_cur
        d_next = _evaluate(velocity_fn, x_pred, t_next)
        x = x + (0.5 * h) * (d_cur + d_next)
    return x


def sample(velocity_fn: VelocityFn, noise: Tensor, *, nfe: int, method: str = "heun") -> Tensor:
    """Integrate from ``noise`` at t=1 to t=0 with ``method`` ("heun" or "euler") using ``nfe`` evaluations."""
    if not isinstance(method, str):
        raise CAFMInputError(f"method must be a string, one of {list(METHODS)}, got {method!r}")
    check_choice("method", method, METHODS)
    _check_nfe(nfe)
    _check_noise(noise)
    if method == "euler":
        return euler_sample(velocity_fn, noise, nfe)
    return heun_sample(velocity_fn, noise, nfe)


def _check_labels(labels: object, name: str = "labels") -> Tensor:
    check_tensor(name, labels, ndim=1, floating=False)
    assert isinstance(labels, Tensor)
    if labels.numel() and int(labels.min()) < 0:
        raise CAFMInputError(f"{name} must be non-negative class indices, got minimum {int(labels.min())}")
    return labels


def _check_cfg(cfg_scale: object, null_class: object, labels: Tensor | None) -> float:
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise CAFMInputError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if labels is not None and float(cfg_scale) != 1.0:
        if null_class is None:
            raise CAFMInputError(
                f"cfg_scale={cfg_scale} needs null_class (the model's null label index, usually num_classes); got None"
            )
        if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
            raise CAFMInputError(f"null_class must be a non-negative int, got {null_class!r}")
    return float(cfg_scale)


def guided_velocity(
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    labels: Tensor | None,
    *,
    cfg_scale: float,
    null_class: int | None,
) -> VelocityFn:
    """Velocity field of ``model`` with classifier-free guidance.

    ``cfg_scale == 1`` (or ``labels is None``): the plain call ``model(x, t, labels)``.
    ``cfg_scale == 0``: the unconditional model, one call with null labels.
    Otherwise ``u = u_null + s * (u_cond - u_null)``, computed with ONE model call on the
    doubled batch ``[x; x]`` with labels ``[labels; null]`` (one pass instead of two; models
    whose output for a sample depends on the rest of the batch, e.g. batch norm in train
    mode, would see both halves). ``labels`` must match the batch of every ``x`` passed in.
    """
    if labels is not None:
        _check_labels(labels)
    scale = _check_cfg(cfg_scale, null_class, labels)

    def _check_batch(x: Tensor) -> None:
        if labels is not None and labels.shape[0] != x.shape[0]:
            raise CAFMInputError(f"labels has {labels.shape[0]} entries but x has batch size {x.shape[0]}")

    if labels is None or scale == 1.0:

        def conditional(x: Tensor, t: Tensor) -> Tensor:
            _check_batch(x)
            return model(x, t, labels)

        return conditional

    null = torch.full_like(labels, int(null_class))  # type: ignore[arg-type]

    if scale == 0.0:

        def unconditional(x: Tensor, t: Tensor) -> Tensor:
            _check_batch(x)
            return model(x, t, null.to(x.device))

        return unconditional

    def guided(x: Tensor, t: Tensor) -> Tensor:
        _check_batch(x)
        y = torch.cat([labels, null]).to(x.device)
        out = model(torch.cat([x, x]), torch.cat([t, t]), y)
        if not isinstance(out, Tensor) or out.shape[0] != 2 * x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise CAFMInputError(f"model must return a batch of {2 * x.shape[0]} velocities for the CFG pass, got {got}")
        u_cond, u_null = out.chunk(2)
        return u_null + scale * (u_cond - u_null)

    return guided


NOISE_CHUNK = 1024
"""Noise is drawn in fixed chunks of this many samples, so it never depends on batch_size."""


def generate(
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    *,
    num_samples: int,
    sample_shape: tuple[int, ...],
    labels: Tensor | None,
    nfe: int,
    method: str = "heun",
    cfg_scale: float = 1.0,
    null_class: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``num_samples`` samples of shape ``sample_shape`` from ``model``; returns a CPU float32 tensor.

    Deterministic under ``seed``: noise comes from one CPU ``torch.Generator`` seeded once,
    drawn in fixed chunks of ``NOISE_CHUNK`` samples and then moved to ``device``, so sample
    ``i`` gets the same noise whatever ``batch_size`` or device. Runs under ``torch.no_grad()``
    with the model in eval mode; its previous train/eval mode is restored afterwards. The
    model must already be on ``device``; ``labels`` (one per sample) are moved there.
    """
    check_positive("num_samples", num_samples, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    _check_nfe(nfe)
    if not isinstance(method, str):
        raise CAFMInputError(f"method must be a string, one of {list(METHODS)}, got {method!r}")
    check_choice("method", method, METHODS)
    if method == "heun" and nfe % 2 != 0:
        raise CAFMInputError(f"heun needs an even nfe >= 2 (2 evaluations per step), got nfe={nfe}")
    if not isinstance(sample_shape, (tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sample_shape
    ):
        raise CAFMInputError(f"sample_shape must be a tuple of positive ints, got {sample_shape!r}")
    sample_shape = tuple(sample_shape)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CAFMInputError(f"seed must be an int, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CAFMInputError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CAFMInputError(f"device must be a torch device or string like 'cpu'/'cuda:0', got {device!r}") from exc
    if labels is not None:
        _check_labels(labels)
        if labels.shape[0] != num_samples:
            raise CAFMInputError(f"labels has {labels.shape[0]} entries; expected one per sample, num_samples={num_samples}")
    _check_cfg(cfg_scale, null_class, labels)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    out = torch.empty((num_samples, *sample_shape), dtype=torch.float32)

    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            for chunk_start in range(0, num_samples, NOISE_CHUNK):
                chunk_n = min(NOISE_CHUNK, num_samples - chunk_start)
                chunk_noise = torch.randn((chunk_n, *sample_shape), generator=gen, dtype=dtype)
                for off in range(0, chunk_n, batch_size):
                    lo, hi = chunk_start + off, chunk_start + min(off + batch_size, chunk_n)
                    noise = chunk_noise[off : off + (hi - lo)].to(device)
                    y = labels[lo:hi].to(device) if labels is not None else None
                    fn = guided_velocity(model, y, cfg_scale=cfg_scale, null_class=null_class)
                    x0 = sample(fn, noise, nfe=nfe, method=method)
                    out[lo:hi] = x0.to(device="cpu", dtype=torch.float32)
    finally:
        if was_training is not None:
            model.train(was_training)  # type: ignore[union-attr]
    return out
