"""Typed pipeline parameters (pydantic): validated before any compute; the Prefect UI
renders them as a form. Two embedded profiles: ``default`` (the main job) and ``smoke``
(same stages, few steps)."""

from __future__ import annotations

import itertools
from dataclasses import MISSING, fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cafm_core.data import BUILTIN_DATASETS, MAX_FILE_BYTES
from cafm_core.evaluation import SamplerSetting
from cafm_core.path import TimeSampler
from cafm_core.training import CAFMConfig, FlowMatchingConfig
from tasks.storage import check_source_url


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Params):
    source: str = Field("digits", description=f"built-in set ({', '.join(BUILTIN_DATASETS)}) or an image folder with "
                                              "class subfolders: a local path, file:// or s3:// URL (no other scheme)")
    resolution: int | None = Field(None, ge=8, le=1024, description="image folders: side length after center-crop + resize")
    channels: Literal[1, 3] | None = Field(None, description="image folders: 1 (grayscale) or 3 (RGB)")
    max_bad_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of unreadable images tolerated (counted, reported)")
    max_file_bytes: int = Field(MAX_FILE_BYTES, ge=1, description="image folders: a file larger than this is not read "
                                                                  "(a bad file, counted against max_bad_fraction)")
    num_samples: int = Field(20000, ge=16, description="synthetic sets: number of points")
    feature_steps: int = Field(400, ge=1, description="training steps of the in-domain feature network")
    feature_sample: int = Field(50_000, ge=16, description="most images the in-domain feature network trains on (a "
                                                           "uniform random sample drawn with the run's seed; all of "
                                                           "them when the dataset is smaller); the reference "
                                                           "statistics always cover every image")

    @model_validator(mode="after")
    def _folder_needs_shape(self) -> DataParams:
        if self.source not in BUILTIN_DATASETS:
            if not self.source.strip():
                raise ValueError("data.source is empty: give a built-in name or an image folder path / s3:// URL")
            check_source_url(self.source)  # local, file:// or s3:// only
            if self.resolution is None or self.channels is None:
                raise ValueError(f"data.source {self.source!r} is an image folder: set data.resolution and data.channels")
        return self


class ModelParams(_Params):
    preset: Literal["tiny", "mini", "small", "base"] = "tiny"
    patch_size: int = Field(2, ge=1)
    prediction: Literal["velocity", "x"] = "velocity"
    time_scale: float = Field(1000.0, gt=0)
    mlp_hidden: int = Field(64, ge=4, description="low-dim sets: MLP width")
    mlp_depth: int = Field(3, ge=1, description="low-dim sets: MLP depth")


# ---- training defaults: one owner each -----------------------------------------------------
# A training setting's default is cafm_core.training's (FlowMatchingConfig, CAFMConfig) or
# cafm_core.path.TimeSampler's, read from there, except where the pipeline's main job
# (digits, tiny DiT, 2 CPU cores) deliberately differs. Each difference is stated here, once,
# with its reason; nothing else in the project restates a training default.
MAIN_JOB_DIFFERENCES: dict[str, dict[str, object]] = {
    "fm": {
        "steps": 2000,  # the FM generator of the main job (about 5 minutes in all on 2 cores; core: 3000)
    },
    "cafm": {
        "steps": 1000,  # post-training of the main job: 160 generator updates (core: 2000)
        "discriminator_steps": 4,  # N; the reference uses 8 on toys, 16 at ImageNet scale
        "generator_lr": 3e-5,  # below the discriminator's 1e-4 (core: 1e-4 for both)
        # t of the D and G steps logit-normal around t = 0.27, towards the data: what made the
        # discriminator separate real from generated on digits (docs/evidence.md; uniform wasted
        # most steps near pure noise). Our deviation: the official code never biases t to the data.
        "time_sampler": {"kind": "logit_normal", "mean": -1.0},
    },
}


def _core_default(config_class, stage: str | None, name: str):
    """The default of field ``name``: the main job's difference if there is one, else the core's."""
    if stage is not None and name in MAIN_JOB_DIFFERENCES[stage]:
        return MAIN_JOB_DIFFERENCES[stage][name]
    field = {f.name: f for f in fields(config_class)}[name]
    return field.default if field.default is not MISSING else field.default_factory()


class TimeParams(_Params):
    """``cafm_core.path.TimeSampler``: ``t ~ U(0, 1)`` or ``sigmoid(mean + std * n)``, shifted
    towards noise by ``shift`` > 1, rescaled into ``[min_t, max_t]``."""

    kind: Literal["uniform", "logit_normal"] = _core_default(TimeSampler, None, "kind")
    mean: float = _core_default(TimeSampler, None, "mean")
    std: float = Field(_core_default(TimeSampler, None, "std"), gt=0)
    shift: float = Field(_core_default(TimeSampler, None, "shift"), gt=0)
    min_t: float = Field(_core_default(TimeSampler, None, "min_t"), ge=0, lt=1)
    max_t: float = Field(_core_default(TimeSampler, None, "max_t"), gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> TimeParams:
        if not self.min_t < self.max_t:
            raise ValueError(f"time_sampler needs min_t < max_t, got min_t={self.min_t}, max_t={self.max_t}")
        return self


def _fm(name: str):
    return _core_default(FlowMatchingConfig, "fm", name)


def _cafm(name: str):
    return _core_default(CAFMConfig, "cafm", name)


class FMParams(_Params):
    steps: int = Field(_fm("steps"), ge=1)
    batch_size: int = Field(_fm("batch_size"), ge=1, description="global batch (split over workers)")
    lr: float = Field(_fm("lr"), gt=0)
    ema_decay: float = Field(_fm("ema_decay"), ge=0, lt=1)
    label_drop: float = Field(_fm("label_drop"), ge=0, le=1)
    grad_clip: float = Field(_fm("grad_clip"), ge=0)
    time_sampler: TimeParams = TimeParams.model_validate(_fm("time_sampler"), from_attributes=True)

    def core_config(self, seed: int) -> dict:
        """The ``cafm_core.training.FlowMatchingConfig`` fields (plain values) these parameters give."""
        return {**self.model_dump(exclude={"time_sampler"}), "time_sampler": self.time_sampler.model_dump(), "seed": seed}


class CAFMParams(_Params):
    enabled: bool = True
    init_checkpoint: str | None = Field(None, description="start from this FM checkpoint URL instead of this run's FM stage")
    from_scratch: bool = Field(False, description="train the generator with CAFM alone, from a fresh initialisation "
                                                  "(the discriminator built from it); no FM checkpoint is read. The "
                                                  "FM stage still runs, as the comparison")
    steps: int = Field(_cafm("steps"), ge=1, description="optimisation steps of either network, warmup included")
    warmup_steps: int = Field(_cafm("warmup_steps"), ge=0, description="discriminator-only steps first")
    discriminator_steps: int = Field(_cafm("discriminator_steps"), ge=1, description="N: discriminator steps per generator step")
    batch_size: int = Field(_cafm("batch_size"), ge=1)
    generator_lr: float = Field(_cafm("generator_lr"), gt=0)
    discriminator_lr: float = Field(_cafm("discriminator_lr"), gt=0)
    ema_decay: float = Field(_cafm("ema_decay"), ge=0, lt=1)
    ema_warmup: bool = Field(_cafm("ema_warmup"), description="EMA decay warm-up (min(decay, (1+n)/(10+n))); off: the "
                                                              "EMA starts at the FM weights with the full decay")
    centering_penalty: float = Field(_cafm("centering_penalty"), ge=0)
    transport_penalty: float = Field(_cafm("transport_penalty"), ge=0)
    logit_mode: Literal["reverse", "forward"] = _cafm("logit_mode")
    label_drop: float = Field(_cafm("label_drop"), ge=0, le=1)
    time_sampler: TimeParams = Field(TimeParams.model_validate(_cafm("time_sampler"), from_attributes=True),
                                     description="t of the D and G steps (see MAIN_JOB_DIFFERENCES for why "
                                                 "logit-normal around t = 0.27 on digits)")
    curve_samples: int = Field(256, ge=0, description="diagnostic curve: samples per point at each report, at the smallest sampling NFE (0: off)")

    @model_validator(mode="after")
    def _one_start(self) -> CAFMParams:
        if self.from_scratch and self.init_checkpoint is not None:
            raise ValueError("cafm.from_scratch and cafm.init_checkpoint exclude each other: start from scratch or "
                             "from a checkpoint")
        return self

    @field_validator("curve_samples")
    @classmethod
    def _curve_size(cls, value: int) -> int:
        if 0 < value < 16:
            raise ValueError(f"cafm.curve_samples must be 0 (off) or >= 16, got {value}")
        return value

    def core_config(self, seed: int) -> dict:
        """The ``cafm_core.training.CAFMConfig`` fields (plain values) these parameters give."""
        return {**self.model_dump(exclude={"time_sampler", "enabled", "init_checkpoint", "from_scratch", "curve_samples"}),
                "time_sampler": self.time_sampler.model_dump(), "seed": seed}


class SamplingParams(_Params):
    method: Literal["euler", "heun"] = "heun"
    nfes: list[int] = Field(default_factory=lambda: [8, 32], min_length=1)
    cfg_scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="1.0 = no guidance")
    num_samples: int | None = Field(None, ge=16, description="per setting; default: min(dataset size, 50,000) for "
                                                             "images (the usual count for FID-style metrics), "
                                                             "10,000 for points")
    shard_size: int = Field(1024, ge=16)

    @field_validator("nfes")
    @classmethod
    def _positive(cls, nfes: list[int]) -> list[int]:
        bad = [n for n in nfes if n < 1]
        if bad:
            raise ValueError(f"sampling.nfes must be >= 1, got {bad}")
        return nfes

    @field_validator("cfg_scales")
    @classmethod
    def _non_negative(cls, scales: list[float]) -> list[float]:
        if any(s < 0 for s in scales):
            raise ValueError(f"sampling.cfg_scales must be >= 0, got {scales}")
        return scales

    def sampler_settings(self) -> list[SamplerSetting]:
        """Every (guidance scale, NFE) pair, in the order the reports list them."""
        return [SamplerSetting(self.method, nfe, cfg) for cfg in self.cfg_scales for nfe in self.nfes]

    def evaluation(self, seeds: list[int]) -> dict:
        """The sampling of an evaluation protocol (``tasks.dataset_format.evaluation_protocol``)."""
        return {"settings": self.sampler_settings(), "seeds": list(seeds), "num_samples": self.num_samples,
                "shard_size": self.shard_size}

    @model_validator(mode="after")
    def _heun_even(self) -> SamplingParams:
        odd = [n for n in self.nfes if n % 2]
        if self.method == "heun" and odd:
            raise ValueError(f"heun needs even NFEs (2 evaluations per step), got {odd}")
        return self


class ComputeParams(_Params):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP when > 1)")
    cpus_per_worker: int | None = Field(None, ge=1, description="CPUs (torch threads) per worker; default: local cores / workers, 1 on a cluster")
    use_gpu: bool = False
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray's placement of the training workers: PACK fills one node first; SPREAD puts them "
                            "on different nodes where it can (STRICT_*: must)")
    mixed_precision: Literal["no", "bf16"] = "no"
    checkpoint_every: int = Field(500, ge=1)
    divergence_limit: float = Field(1e4, gt=0, description="a loss or mean logit above this (or any NaN/inf) counts as divergence")
    max_rollbacks: int = Field(2, ge=0, description="divergences survived by rolling back to the last checkpoint; then training stops")
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1, description="learning rates are multiplied by this at each rollback")

    def divergence(self) -> dict:
        """The ``cafm_core.training.DivergenceGuard`` fields these parameters give."""
        return {"max_abs": self.divergence_limit, "max_rollbacks": self.max_rollbacks, "lr_factor": self.rollback_lr_factor}

    def settings(self) -> dict:
        """The training driver's resource arguments (``tasks.train.driver``)."""
        return {"num_workers": self.num_workers, "cpus_per_worker": self.cpus_per_worker, "use_gpu": self.use_gpu,
                "placement_strategy": self.placement_strategy, "mixed_precision": self.mixed_precision, "checkpoint_every": self.checkpoint_every,
                "divergence": self.divergence()}


_EVALUATION_METRICS = ("fd", "kid", "precision", "recall", "class_accuracy", "sliced_wasserstein",
                       "on_manifold_fraction", "off_manifold_fraction", "modes_hit")


class PromotionParams(_Params):
    """The one promotion rule (``tasks.promotion``): champion vs candidate under one protocol."""

    primary_metric: Literal[_EVALUATION_METRICS] | None = Field(
        None, description="promotion needs a strictly better value of this; default: fd for images, "
                          "sliced_wasserstein for low-dimensional data")
    watched_metrics: list[Literal[_EVALUATION_METRICS]] | None = Field(
        None, min_length=1, description="metrics checked for regression of the candidate against the champion; "
                                        "default: fd and class_accuracy for images, sliced_wasserstein for points")
    max_regression: float = Field(0.10, ge=0, le=10,
                                  description="relative worsening of a watched metric that blocks the promotion "
                                              "(and fails the scheduled evaluation; 0.1 = 10%)")

    def rule(self):
        """The ``tasks.promotion.PromotionRule`` these parameters give."""
        from tasks.promotion import PromotionRule

        watched = tuple(self.watched_metrics) if self.watched_metrics else None
        return PromotionRule(self.primary_metric, watched, self.max_regression)


class PipelineParams(_Params):
    """Everything a pipeline run needs. Storage credentials are NOT parameters: they come
    from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""

    run_name: str = Field("digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    storage_root: str = Field("outputs/runs", description="local folder or s3://bucket/prefix")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else "
                                                       "outputs/mlflow.db")
    experiment: str = "cafm-pipeline"
    registered_model: str = Field("cafm-generator", min_length=1,
                                  description="MLflow registered model of the CAFM generators (one lineage: one dataset)")
    promotion: PromotionParams = PromotionParams()
    seed: int = 0
    eval_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="sampling seeds of the evaluation: mean ± std over them")
    inception_weights: str | None = Field(None, description="local TorchScript Inception-v3 file for standard FID (none can be downloaded)")
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    fm: FMParams = FMParams()
    cafm: CAFMParams = CAFMParams()
    sampling: SamplingParams = SamplingParams()
    compute: ComputeParams = ComputeParams()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineParams:
        if self.cafm.warmup_steps >= self.cafm.steps and self.cafm.enabled:
            raise ValueError(f"cafm.warmup_steps ({self.cafm.warmup_steps}) must be < cafm.steps ({self.cafm.steps}), or no generator step runs")
        for name, batch in (("fm", self.fm.batch_size), ("cafm", self.cafm.batch_size)):
            if batch % self.compute.num_workers:
                raise ValueError(f"{name}.batch_size {batch} must be divisible by compute.num_workers {self.compute.num_workers}")
        return self


def smoke_params(**overrides) -> PipelineParams:
    """Same stages as the default, few steps: what the tests run (about 3 minutes)."""
    base = PipelineParams(
        run_name="smoke",
        eval_seeds=[0],
        data=DataParams(feature_steps=60),
        fm=FMParams(steps=120),
        cafm=CAFMParams(steps=60, warmup_steps=20, discriminator_steps=4),
        sampling=SamplingParams(nfes=[4, 8], num_samples=256),
        compute=ComputeParams(num_workers=2, checkpoint_every=40),  # exercises DDP
    )
    return base.model_copy(update=overrides) if overrides else base


PROFILES = {"default": PipelineParams, "smoke": smoke_params}


class ModelEvaluationParams(_Params):
    """The scheduled evaluation of the registered ``champion`` and ``candidate`` generators on
    a held evaluation set. Credentials are not parameters (environment, as for the pipeline)."""

    registered_model: str = Field("cafm-generator", min_length=1, description="MLflow registered model name")
    data_url: str = Field("outputs/runs/digits/data", min_length=1,
                          description="the held evaluation set: a prepared dataset, or a pipeline run's data stage "
                                      "folder (<run>/data: its one prepared dataset), local or s3://; keep it fixed "
                                      "so the trend compares like with like")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else "
                                                       "outputs/mlflow.db (the same store as the pipeline's)")
    experiment: str = Field("cafm-model-evaluation", min_length=1)
    sampling: SamplingParams = SamplingParams(nfes=[8, 32])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="sampling seeds: mean over them")
    promotion: PromotionParams = PromotionParams()

    def evaluation(self) -> dict:
        """The evaluation protocol's sampling (``tasks.dataset_format.evaluation_protocol``)."""
        return self.sampling.evaluation(self.seeds)


_SWEEP_EXCLUDED = {"enabled", "init_checkpoint", "from_scratch", "curve_samples"}


def _sweepable_keys() -> set[str]:
    keys = {name for name in CAFMParams.model_fields if name not in _SWEEP_EXCLUDED | {"time_sampler"}}
    return keys | {f"time_sampler.{name}" for name in TimeParams.model_fields}


class SweepParams(_Params):
    """A CAFM sweep: every point of ``space`` (a grid) post-trains the same FM generator.

    ``pipeline`` gives the data, model, FM stage, storage, tracking, sampler settings and
    evaluation seeds (its ``cafm`` section is each trial's base); ``space`` maps a ``cafm``
    field (``time_sampler.kind`` for the time sampler) to the values to try."""

    pipeline: PipelineParams = PipelineParams()
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    space: dict[str, list[float | int | str]] = Field(
        default_factory=lambda: {"generator_lr": [1e-5, 3e-5], "discriminator_steps": [4, 8]},
        description="cafm field -> values; every combination is one trial",
    )
    curve_every: int = Field(100, ge=1, description="steps between diagnostic curve points")
    curve_samples: int = Field(512, ge=16, description="samples per curve point (same noise every time)")
    curve_nfe: int = Field(8, ge=1, description="sampler NFE of the curve points (method: pipeline.sampling.method)")
    cpus_per_trial: int = Field(1, ge=1, description="CPUs (torch threads) per trial; trials run side by side")

    @model_validator(mode="after")
    def _valid_space(self) -> SweepParams:
        unknown = sorted(set(self.space) - _sweepable_keys())
        if unknown:
            raise ValueError(f"sweep space keys {unknown} are not cafm fields; expected some of {sorted(_sweepable_keys())}")
        empty = sorted(k for k, v in self.space.items() if not v)
        if empty:
            raise ValueError(f"sweep space {empty} list no values")
        if self.pipeline.sampling.method == "heun" and self.curve_nfe % 2:
            raise ValueError(f"curve_nfe must be even for heun, got {self.curve_nfe}")
        for point in self.points():
            self.cafm_for(point)  # each point must make valid cafm parameters
        return self

    def points(self) -> list[dict]:
        """Every combination of the listed values, in a stable order (last key fastest)."""
        keys = list(self.space)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.space[k] for k in keys))]

    def cafm_for(self, point: dict) -> CAFMParams:
        data = self.pipeline.cafm.model_dump()
        for key, value in point.items():
            if key.startswith("time_sampler."):
                data["time_sampler"][key.split(".", 1)[1]] = value
            else:
                data[key] = value
        try:
            cafm = CAFMParams.model_validate(data)
        except ValueError as exc:
            raise ValueError(f"sweep point {point}: {exc}") from None
        if cafm.warmup_steps >= cafm.steps:
            raise ValueError(f"sweep point {point}: warmup_steps {cafm.warmup_steps} >= steps {cafm.steps}: no generator step")
        return cafm


def smoke_sweep_params(**overrides) -> SweepParams:
    """A sweep small enough for tests: 2 trials of the smoke pipeline's CAFM."""
    base = SweepParams(
        pipeline=smoke_params(run_name="smoke-sweep"),
        name="smoke",
        space={"generator_lr": [1e-5, 1e-4]},
        curve_every=20,
        curve_samples=128,
        curve_nfe=4,
    )
    return base.model_copy(update=overrides) if overrides else base


SWEEP_PROFILES = {"default": SweepParams, "smoke": smoke_sweep_params}
