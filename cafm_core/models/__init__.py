"""Model families (DiT for images, MLP for low-dimensional data) and their factories."""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from cafm_core.checks import CAFMInputError
from cafm_core.models.dit import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    DiTDiscriminator,
    dit_config,
    twice_differentiable,
)
from cafm_core.models.mlp import MLPConfig, MLPDiscriminator, MLPVelocityNet

ModelConfig = DiTConfig | MLPConfig

_FAMILIES = {
    "dit": (DiTConfig, DiT, DiTDiscriminator),
    "mlp": (MLPConfig, MLPVelocityNet, MLPDiscriminator),
}
# per family: fields added after configs were first saved, with the value an older config
# (one without the field) implied, so old checkpoints rebuild the model they were trained as
_LEGACY_FIELDS = {"dit": {"mlp_activation": "gelu_tanh"}}


def config_from_dict(data: dict) -> ModelConfig:
    """Rebuild a model config from its ``to_dict()`` form, rejecting unknown fields. A field
    the config predates takes the value it implied then (e.g. a DiT saved before
    ``mlp_activation`` existed used the tanh GELU), not today's default."""
    kind = data.get("kind")
    if kind not in _FAMILIES:
        raise CAFMInputError(f"unknown model kind {kind!r}; expected one of {sorted(_FAMILIES)}")
    config_cls = _FAMILIES[kind][0]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CAFMInputError(f"unknown {kind} config fields {unknown}; expected a subset of {sorted(known)}")
    return config_cls(**{**_LEGACY_FIELDS.get(kind, {}), **data})


def build_generator(config: ModelConfig) -> nn.Module:
    """The velocity network ``u_theta`` for a config."""
    return _FAMILIES[config.kind][1](config)


def build_discriminator(config: ModelConfig) -> nn.Module:
    """A freshly initialised discriminator with the generator's backbone architecture."""
    return _FAMILIES[config.kind][2](config)


def discriminator_from_generator(generator: nn.Module) -> nn.Module:
    """A discriminator whose backbone is a copy of ``generator``'s (only its head/token are new).

    Initialising D from the pretrained generator is what makes short post-training work:
    D starts with features that already understand the data.
    """
    discriminator = build_discriminator(generator.config)
    backbone_state = {k: v for k, v in generator.state_dict().items() if k.startswith("backbone.")}
    missing, unexpected = discriminator.load_state_dict(backbone_state, strict=False)
    if unexpected or any(k.startswith("backbone.") for k in missing):
        raise CAFMInputError(f"generator backbone does not match discriminator: missing {missing}, unexpected {unexpected}")
    return discriminator.to(next(generator.parameters()).device)


__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "DiTDiscriminator",
    "MLPConfig",
    "MLPDiscriminator",
    "MLPVelocityNet",
    "ModelConfig",
    "build_discriminator",
    "build_generator",
    "config_from_dict",
    "discriminator_from_generator",
    "dit_config",
    "twice_differentiable",
]
