"""What differs between FM pretraining and CAFM post-training inside the shared worker loop:
which networks and optimisers, how they are prepared for DDP, and which ``cafm_core``
step runs. The losses and steps are ``cafm_core.training``'s own (``flow_matching_step``,
``cafm_step``, which picks a discriminator or generator step by the schedule); nothing of
the method is re-implemented here."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cafm_core.checkpoint import checkpoint_from_bytes, load_state_dict_checked, model_from_checkpoint
from cafm_core.ema import EMA
from cafm_core.logits import DiscriminatorLogits
from cafm_core.models import build_discriminator, build_generator, config_from_dict, discriminator_from_generator
from cafm_core.training import CAFMConfig, FlowMatchingConfig, adam, cafm_step, flow_matching_step
from tasks.train.train_state import TrainState, optimizer_state_from_tensors, optimizer_state_to_tensors

__all__ = ["CAFMStage", "FMStage", "Stage", "StageState", "build_stage", "copy_state", "prepare_modules"]

StageState = tuple[dict[str, dict[str, Tensor]], dict]
"""``(tensors per module / optimiser, JSON metadata)``: what a stage saves and loads."""


def prepare_modules(accelerator, module: nn.Module, optimizer: torch.optim.Optimizer):
    """Accelerate's ``prepare``; a single process keeps its bare module: on CPU Accelerate wraps
    even one process in DDP, which would all-reduce every gradient with itself each step."""
    module, optimizer = accelerator.prepare(module, optimizer)
    if accelerator.num_processes == 1 and isinstance(module, DistributedDataParallel):
        module = module.module
    return module, optimizer


def _cpu_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


class Stage:
    """The networks, optimisers and EMA of one training stage, prepared by Accelerate."""

    name: str

    def __init__(self, config: FlowMatchingConfig | CAFMConfig, accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # set by build(): the unwrapped generator, its prepared (DDP) wrapper, the EMA
    generator: nn.Module
    generator_ddp: nn.Module
    ema: EMA

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def load_state(self, states: dict[str, dict[str, Tensor]], metadata: dict) -> None:
        for name, module in self.modules().items():
            load_state_dict_checked(module, states[name])
        self.ema.load_state_dict({**metadata["ema"], "shadow": states["ema"]})
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(optimizer_state_from_tensors(states.get(f"{name}_opt", {}), metadata["optimizers"][name]))

    def state(self) -> StageState:
        states = {name: _cpu_tensors(module.state_dict()) for name, module in self.modules().items()}
        states["ema"] = _cpu_tensors(self.ema.shadow)
        meta_opt = {}
        for name, optimizer in self.optimizers.items():
            tensors, meta = optimizer_state_to_tensors(optimizer.state_dict())
            states[f"{name}_opt"] = _cpu_tensors(tensors)
            meta_opt[name] = meta
        metadata = {"optimizers": meta_opt, "ema": {"decay": self.ema.decay, "num_updates": self.ema.num_updates}}
        return states, metadata

    def scale_learning_rates(self, factor: float) -> list[float]:
        """Multiply every optimiser's learning rate by ``factor``; returns the new rates."""
        rates = []
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor
                rates.append(group["lr"])
        return rates

    def forget_metrics(self) -> None:
        """Drop metrics carried over between steps (after a rollback they describe a discarded state)."""

    def checksum(self) -> str:
        """sha256 over every module's and the EMA's tensors: equal on all ranks iff in sync."""
        digest = hashlib.sha256()
        for name, state in [*((n, m.state_dict()) for n, m in self.modules().items()), ("ema", self.ema.shadow)]:
            for key in sorted(state):
                digest.update(f"{name}/{key}".encode())
                digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


class FMStage(Stage):
    name = "fm"

    def build(self, generator: nn.Module) -> None:
        cfg = self.config
        optimizer = adam(generator.parameters(), cfg.lr, cfg.betas, cfg.weight_decay)
        self.generator_ddp, optimizer = prepare_modules(self.accelerator, generator, optimizer)
        self.generator = self.accelerator.unwrap_model(self.generator_ddp)
        self.optimizers = {"generator": optimizer}
        # after prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts equal
        self.ema = EMA(self.generator, cfg.ema_decay, warmup=True)

    def step(self, index: int, batch, rng: torch.Generator) -> dict[str, float]:
        metrics = flow_matching_step(self.generator_ddp, self.optimizers["generator"], batch, self.config, generator=rng)
        self.ema.update(self.generator)
        return metrics


class CAFMStage(Stage):
    name = "cafm"

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def build(self, generator: nn.Module, discriminator: nn.Module) -> None:
        cfg = self.config
        g_opt = adam(generator.parameters(), cfg.generator_lr, cfg.betas)
        d_logits = DiscriminatorLogits(discriminator, mode=cfg.logit_mode)
        d_opt = adam(d_logits.parameters(), cfg.discriminator_lr, cfg.betas)
        self.generator_ddp, g_opt = prepare_modules(self.accelerator, generator, g_opt)
        # D steps go through DDP(DiscriminatorLogits) so discriminator gradients sync;
        # G steps use the unwrapped (frozen) discriminator, as generator_step expects.
        self.d_logits_ddp, d_opt = prepare_modules(self.accelerator, d_logits, d_opt)
        self.generator = self.accelerator.unwrap_model(self.generator_ddp)
        self.discriminator = self.accelerator.unwrap_model(self.d_logits_ddp).discriminator
        self.optimizers = {"generator": g_opt, "discriminator": d_opt}
        self.ema = EMA(self.generator, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.latest: dict[str, float] = {}

    def step(self, index: int, batch, rng: torch.Generator) -> dict[str, float]:
        metrics = cafm_step(
            index, self.generator_ddp, self.d_logits_ddp, self.optimizers["generator"],
            self.optimizers["discriminator"], batch, self.config, ema=self.ema, generator=rng,
        )
        if self.config.is_generator_step(index):
            metrics["g_steps"] = float(self.ema.num_updates)
        self.latest.update(metrics)
        return dict(self.latest)

    def forget_metrics(self) -> None:
        self.latest = {}


def copy_state(state: StageState) -> StageState:
    """A private copy of a stage's state: loading it must not alias tensors that training then
    updates in place (optimisers keep loaded tensors as their state)."""
    states, metadata = state
    return {name: {k: v.clone() for k, v in sd.items()} for name, sd in states.items()}, copy.deepcopy(metadata)


def _starting_generator(init: dict[str, bytes] | None, model_config: dict, use_ema: bool) -> nn.Module:
    """The starting generator: from the init checkpoint's files, or freshly built."""
    if init is None:
        return build_generator(config_from_dict(dict(model_config)))
    tensors, config, metadata = checkpoint_from_bytes(init)
    return model_from_checkpoint(tensors, config, metadata, use_ema=use_ema)


def build_stage(stage_name: str, config, accelerator, restored: TrainState | None, *, init: dict[str, bytes] | None,
                model_config: dict) -> Stage:
    """The stage's networks for a fresh start (from the init checkpoint's files or new), or
    shaped for a restore (the weights are loaded by :meth:`Stage.load_state` after prepare)."""
    if restored is not None:
        generator = build_generator(config_from_dict(dict(restored[1]["model"])))
    else:
        # CAFM starts from the FM generator's EMA weights; FM from an init checkpoint's raw weights
        generator = _starting_generator(init, model_config, use_ema=(stage_name == "cafm"))
    if stage_name == "fm":
        stage = FMStage(config, accelerator)
        stage.build(generator)
        return stage
    if restored is not None:
        discriminator = build_discriminator(generator.config)
    else:
        discriminator = discriminator_from_generator(generator)  # backbone copied, new token + head
    stage = CAFMStage(config, accelerator)
    stage.build(generator, discriminator)
    return stage
