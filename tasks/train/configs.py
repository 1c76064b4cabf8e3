"""Training configs from plain fields (what travels through Ray and into checkpoints).

The fields and their defaults are ``cafm_core.training``'s dataclasses; here they are
built from dicts (JSON, Ray's ``train_loop_config``), unknown fields refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from cafm_core.path import TimeSampler
from cafm_core.training import CAFMConfig, DivergenceGuard, FlowMatchingConfig

__all__ = ["MIXED_PRECISION_MODES", "STAGES", "divergence_guard", "json_config", "train_config"]

STAGES = ("fm", "cafm")
MIXED_PRECISION_MODES = ("no", "bf16")  # fp16 is refused: the cafm_core steps use no gradient scaler


def _unknown_fields(cls, data: Mapping, name: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {name} fields {unknown}; expected a subset of {sorted(known)}")


def _dataclass_from_dict(cls, data: Mapping | None, name: str):
    """``cls(**data)`` with a clear error for unknown fields; ``time_sampler`` may be a dict."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} must be a dict of {cls.__name__} fields, got {type(data).__name__}")
    _unknown_fields(cls, data, name)
    values = dict(data)
    sampler = values.get("time_sampler")
    if isinstance(sampler, Mapping):
        _unknown_fields(TimeSampler, sampler, f"{name}.time_sampler")
        values["time_sampler"] = TimeSampler(**sampler)
    elif sampler is not None and not isinstance(sampler, TimeSampler):
        raise ValueError(f"{name}.time_sampler must be a dict or TimeSampler, got {type(sampler).__name__}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def train_config(stage: str, data: Mapping) -> FlowMatchingConfig | CAFMConfig:
    """A ``FlowMatchingConfig`` (``"fm"``) or ``CAFMConfig`` (``"cafm"``) from plain fields
    (``time_sampler`` a dict, ``betas`` a list), unknown fields refused by name."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
    if stage == "fm":
        return _dataclass_from_dict(FlowMatchingConfig, data, "fm_config")
    return _dataclass_from_dict(CAFMConfig, data, "cafm_config")


def json_config(config: FlowMatchingConfig | CAFMConfig) -> dict:
    """The config as plain JSON fields (the inverse of :func:`train_config`)."""
    data = config.to_dict()  # asdict: the nested TimeSampler becomes a dict
    data["betas"] = list(data["betas"])
    return data


def divergence_guard(values: Mapping | None) -> DivergenceGuard:
    """A ``DivergenceGuard`` from plain fields (None: the defaults), unknown fields refused by name."""
    if values is None:
        return DivergenceGuard()
    if not isinstance(values, Mapping):
        raise ValueError(f"divergence must be a dict of DivergenceGuard fields, got {type(values).__name__}")
    _unknown_fields(DivergenceGuard, values, "divergence")
    return DivergenceGuard(**values)
