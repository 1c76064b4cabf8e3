"""Training steps and plain single-process loops for FM pretraining and CAFM post-training.

The step functions are the unit of work: the single-process loops below and the Ray Train
loops of the pipeline both call them, so the method lives in one place. Each step draws
its own batch; in a CAFM step exactly one network receives gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cafm_core.checks import CAFMInputError, check_choice, check_positive, check_tensor
from cafm_core.ema import EMA
from cafm_core.logits import (
    LOGIT_MODES,
    DiscriminatorLogits,
    directional_logits,
    frozen,
    input_gradient,
    logits_from_gradient,
)
from cafm_core.losses import discriminator_loss, flow_matching_loss, generator_loss
from cafm_core.path import TimeSampler, drop_labels, interpolate, target_velocity

Batch = tuple[torch.Tensor, torch.Tensor | None]
Callback = Callable[[int, dict[str, float]], None]


@dataclass
class FlowMatchingConfig:
    """Hyper-parameters of FM pretraining."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    label_drop: float = 0.1
    time_sampler: TimeSampler = field(default_factory=TimeSampler)
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        check_positive("steps", self.steps, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("lr", self.lr)
        if not 0.0 <= self.ema_decay < 1.0:
            raise CAFMInputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CAFMConfig:
    """Hyper-parameters of CAFM post-training (defaults: toy scale, see DESIGN.md).

    ``steps`` counts optimisation steps of either network: ``warmup_steps`` discriminator-
    only steps, then cycles of ``discriminator_steps`` D steps followed by one G step.

    ``ema_warmup`` (off by default): post-training starts from a trained generator, so its
    EMA starts at those weights with the full ``ema_decay``. The warm-up schedule
    ``min(decay, (1 + n) / (10 + n))`` is for training from scratch; here it would make
    ``ema_decay`` a no-op for the first ~10 / (1 - decay) generator updates (found in a
    sweep: decays 0.99 and 0.998 gave identical models after 200 updates).
    """

    steps: int = 2000
    batch_size: int = 128
    generator_lr: float = 1e-4
    discriminator_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.95)
    discriminator_steps: int = 8
    warmup_steps: int = 200
    centering_penalty: float = 1e-3
    transport_penalty: float = 0.0
    ema_decay: float = 0.99
    ema_warmup: bool = False
    logit_mode: str = "reverse"
    label_drop: float = 0.1
    grad_clip: float = 0.0
    time_sampler: TimeSampler = field(default_factory=TimeSampler)
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        check_positive("steps", self.steps, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("generator_lr", self.generator_lr)
        check_positive("discriminator_lr", self.discriminator_lr)
        check_positive("discriminator_steps (N)", self.discriminator_steps, integer=True)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise CAFMInputError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        check_choice("logit mode", self.logit_mode, LOGIT_MODES)
        if not 0.0 <= self.ema_decay < 1.0:
            raise CAFMInputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not isinstance(self.ema_warmup, bool):
            raise CAFMInputError(f"ema_warmup must be a bool, got {self.ema_warmup!r}")
        if self.centering_penalty < 0 or self.transport_penalty < 0:
            raise CAFMInputError("centering_penalty and transport_penalty must be >= 0")

    def is_generator_step(self, step: int) -> bool:
        """Whether optimisation step ``step`` (0-based) updates the generator."""
        if step < self.warmup_steps:
            return False
        return (step - self.warmup_steps) % (self.discriminator_steps + 1) == self.discriminator_steps

    @property
    def num_generator_steps(self) -> int:
        return sum(1 for s in range(self.steps) if self.is_generator_step(s))

    def to_dict(self) -> dict:
        return asdict(self)


DIVERGENCE_WATCHED = ("fm_loss", "d_loss", "g_loss", "logit_real", "logit_fake", "logit_fake_g")
"""Step metrics whose magnitude signals divergence (losses and mean logits, not gradient norms,
which are clipped or normalised away and may be large in healthy training)."""


@dataclass(frozen=True)
class DivergenceGuard:
    """When a training run counts as diverged, and how it recovers.

    A step diverged if any metric is NaN/inf, or a watched metric (``DIVERGENCE_WATCHED``)
    exceeds ``max_abs`` in magnitude (an FM loss or a CAFM logit of 1e4 is far outside
    healthy training on data scaled to about [-1, 1]). The training loop then rolls back to
    its last good checkpoint with every learning rate scaled by ``lr_factor``, at most
    ``max_rollbacks`` times in a run; after that it stops with a clear message.
    """

    max_abs: float = 1e4
    max_rollbacks: int = 2
    lr_factor: float = 0.5

    def __post_init__(self) -> None:
        check_positive("max_abs", self.max_abs)
        if isinstance(self.max_rollbacks, bool) or not isinstance(self.max_rollbacks, int) or self.max_rollbacks < 0:
            raise CAFMInputError(f"max_rollbacks must be an int >= 0, got {self.max_rollbacks!r}")
        if isinstance(self.lr_factor, bool) or not isinstance(self.lr_factor, (int, float)) or not 0 < self.lr_factor < 1:
            raise CAFMInputError(f"lr_factor must be a number in (0, 1), got {self.lr_factor!r}")

    def reason(self, metrics: dict[str, float]) -> str | None:
        """Why these step metrics mean divergence, or None if they look healthy."""
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            return "non-finite " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        big = {k: metrics[k] for k in DIVERGENCE_WATCHED if k in metrics and abs(metrics[k]) > self.max_abs}
        if big:
            return ", ".join(f"|{k}|={abs(v):.3g}" for k, v in sorted(big.items())) + f" > max_abs {self.max_abs:g}"
        return None

    def to_dict(self) -> dict:
        return asdict(self)


FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
"""Devices with PyTorch's fused AdamW kernel (one pass over all tensors instead of a loop)."""


def adam(parameters, lr: float, betas: tuple[float, float], weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW as used throughout (no weight decay by default): PyTorch's fused implementation
    where every parameter lives on a device that has it (the same update; an AdamW step of the
    tiny DiT on CPU 1.6 -> 0.37 ms, docs/benchmarks.md), else its default."""
    params = list(parameters)
    fused = all(p.device.type in FUSED_OPTIMIZER_DEVICES for p in params) or None
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def _null_class(model: nn.Module) -> int | None:
    return getattr(_unwrap(model), "null_class", None)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _path_sample(x0: torch.Tensor, time_sampler: TimeSampler, generator: torch.Generator | None):
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    t = time_sampler.sample(x0.shape[0], device=x0.device, generator=generator).to(x0.dtype)
    return interpolate(x0, noise, t), t, target_velocity(x0, noise)


def _labels_for_step(labels, model, drop_prob, generator):
    null = _null_class(model)
    if labels is None or null is None:
        return None
    return drop_labels(labels, null_class=null, drop_prob=drop_prob, generator=generator)


def _grad_norm(parameters) -> float:
    grads = [p.grad.detach().flatten() for p in parameters if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def _optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list, grad_clip: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, grad_clip))
    else:
        norm = _grad_norm(parameters)
    optimizer.step()
    return norm


def flow_matching_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: FlowMatchingConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One FM step: regress ``u_theta(x_t, t, y)`` on ``v = eps - x0``."""
    x0, labels = batch
    x_t, t, v = _path_sample(x0, config.time_sampler, generator)
    y = _labels_for_step(labels, model, config.label_drop, generator)
    loss = flow_matching_loss(model(x_t, t, y), v)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = _optimise(loss, optimizer, params, config.grad_clip)
    return {"fm_loss": float(loss.detach()), "grad_norm": norm}


def discriminator_step(
    generator_model: nn.Module,
    discriminator_logits: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: CAFMConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One D step: real tangent ``v``, fake tangent ``u`` (generator under no_grad).

    ``discriminator_logits`` is a ``DiscriminatorLogits`` (or DDP around one): both
    tangents share one call (one ``vmap``-ed jvp, or one gradient with ``create_graph``).
    """
    x0, labels = batch
    x_t, t, v = _path_sample(x0, config.time_sampler, generator)
    y = _labels_for_step(labels, generator_model, config.label_drop, generator)
    with torch.no_grad():
        u = generator_model(x_t, t, y)
    values, logits = discriminator_logits(x_t, t, y, torch.stack([v, u]), create_graph=True)
    real_logits, fake_logits = logits[0], logits[1]
    loss = discriminator_loss(real_logits, fake_logits, values, centering_penalty=config.centering_penalty)
    params = [p for p in discriminator_logits.parameters() if p.requires_grad]
    norm = _optimise(loss, optimizer, params, config.grad_clip)
    return {
        "d_loss": float(loss.detach()),
        "logit_real": float(real_logits.detach().mean()),
        "logit_fake": float(fake_logits.detach().mean()),
        "d_value": float(values.detach().mean()),
        "d_grad_norm": norm,
    }


def generator_step(
    generator_model: nn.Module,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: CAFMConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One G step: push ``D'(u)`` towards 1. The discriminator is frozen.

    Reverse mode: ``x_t`` does not depend on the generator, so ``g = grad_{(x,t)} D`` is a
    constant and the loss is a plain regression of ``<g_x, u> + g_t`` towards 1.
    """
    x0, labels = batch
    discriminator = _unwrap(discriminator)
    x_t, t, v = _path_sample(x0, config.time_sampler, generator)
    y = _labels_for_step(labels, generator_model, config.label_drop, generator)
    with frozen(discriminator):
        if config.logit_mode == "reverse":
            # g is a constant for the generator: taken before its forward, so the discriminator's
            # activations are freed before the generator's are made (a lower peak memory)
            _, grad_x, grad_t = input_gradient(discriminator, x_t, t, y, create_graph=False)
            u = generator_model(x_t, t, y)
            fake_logits = logits_from_gradient(grad_x, grad_t, u[None])[0]
        else:
            u = generator_model(x_t, t, y)
            fake_logits = directional_logits(discriminator, x_t, t, y, u[None], mode="forward")[1][0]
    loss = generator_loss(fake_logits, u, transport_penalty=config.transport_penalty)
    params = [p for p in generator_model.parameters() if p.requires_grad]
    norm = _optimise(loss, optimizer, params, config.grad_clip)
    with torch.no_grad():
        fm_error = flow_matching_loss(u, v)
    return {
        "g_loss": float(loss.detach()),
        "logit_fake_g": float(fake_logits.detach().mean()),
        "g_grad_norm": norm,
        "fm_loss": float(fm_error),
    }


def cafm_step(
    step: int,
    generator_model: nn.Module,
    discriminator_logits: nn.Module,
    g_optimizer: torch.optim.Optimizer,
    d_optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: CAFMConfig,
    *,
    ema: EMA | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Optimisation step ``step`` of CAFM: a G step (then the EMA update) or a D step, as the
    schedule says. ``discriminator_logits`` is a ``DiscriminatorLogits`` (or DDP around one);
    the G step uses the discriminator inside it, unwrapped and frozen."""
    if config.is_generator_step(step):
        discriminator = _unwrap(discriminator_logits).discriminator
        metrics = generator_step(generator_model, discriminator, g_optimizer, batch, config, generator=generator)
        if ema is not None:
            ema.update(_unwrap(generator_model))
        return metrics
    return discriminator_step(generator_model, discriminator_logits, d_optimizer, batch, config, generator=generator)


def infinite_batches(
    data: torch.Tensor, labels: torch.Tensor | None, batch_size: int, *, seed: int = 0
) -> Iterator[Batch]:
    """Endless shuffled batches (a new permutation each epoch), deterministic for a seed."""
    check_tensor("data", data, floating=True)
    if labels is not None and labels.shape != (data.shape[0],):
        raise CAFMInputError(f"labels must have shape ({data.shape[0]},), got {tuple(labels.shape)}")
    if batch_size > data.shape[0]:
        raise CAFMInputError(f"batch_size {batch_size} is larger than the dataset ({data.shape[0]} samples)")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield data[index], (labels[index] if labels is not None else None)


@dataclass
class TrainingResult:
    history: list[dict[str, float]]
    seconds: float


def _log(history, callback, step, metrics, log_every, last_step) -> None:
    if step % log_every == 0 or step == last_step:
        row = {"step": step, **metrics}
        history.append(row)
        if callback is not None:
            callback(step, row)


def step_precision(device: str | torch.device, dtype: torch.dtype | None):
    """Autocast for ONE training step (``dtype`` None: full precision).

    Enter it per step, never around a whole loop: autocast caches the low-precision copies
    of the weights until its outermost context exits, so a loop inside one context keeps
    running the first step's weights while the optimiser updates the float32 ones (the
    model then never learns)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_flow_matching(
    model: nn.Module,
    batches: Iterator[Batch],
    config: FlowMatchingConfig,
    *,
    ema: EMA | None = None,
    device: str | torch.device = "cpu",
    callback: Callback | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TrainingResult:
    """Plain FM loop: ``config.steps`` steps, EMA after every step, metrics every ``log_every``.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``): mixed precision, entered per step."""
    model.train()
    optimizer = adam(model.parameters(), config.lr, config.betas, config.weight_decay)
    rng = torch.Generator(device=device).manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(config.steps):
        x0, labels = next(batches)
        with step_precision(device, autocast_dtype):
            metrics = flow_matching_step(
                model, optimizer, (x0.to(device), None if labels is None else labels.to(device)), config, generator=rng
            )
        if not math.isfinite(metrics["fm_loss"]):
            raise FloatingPointError(f"FM loss became {metrics['fm_loss']} at step {step}")
        if ema is not None:
            ema.update(model)
        _log(history, callback, step, metrics, config.log_every, config.steps - 1)
    return TrainingResult(history, time.perf_counter() - start)


def train_cafm(
    generator_model: nn.Module,
    discriminator: nn.Module,
    batches: Iterator[Batch],
    config: CAFMConfig,
    *,
    ema: EMA | None = None,
    device: str | torch.device = "cpu",
    callback: Callback | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TrainingResult:
    """Plain CAFM loop: D-only warmup, then ``N`` D steps per G step; EMA on G steps only.
    ``autocast_dtype``: mixed precision, entered per step (see :func:`step_precision`)."""
    generator_model.train()
    discriminator.train()
    d_logits = DiscriminatorLogits(discriminator, mode=config.logit_mode)
    g_optimizer = adam(generator_model.parameters(), config.generator_lr, config.betas)
    d_optimizer = adam(discriminator.parameters(), config.discriminator_lr, config.betas)
    rng = torch.Generator(device=device).manual_seed(config.seed)
    history: list[dict[str, float]] = []
    latest: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(config.steps):
        x0, labels = next(batches)
        batch = (x0.to(device), None if labels is None else labels.to(device))
        with step_precision(device, autocast_dtype):
            metrics = cafm_step(step, generator_model, d_logits, g_optimizer, d_optimizer, batch, config, ema=ema, generator=rng)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"CAFM step {step}: non-finite {bad}: {metrics}")
        latest.update(metrics)
        _log(history, callback, step, dict(latest), config.log_every, config.steps - 1)
    return TrainingResult(history, time.perf_counter() - start)
