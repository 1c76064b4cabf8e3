"""The training driver: ``run_flow_matching`` and ``run_cafm``.

Every input is checked before Ray starts (shards' schema, row counts and label range from
Parquet metadata, configs, the init checkpoint, an earlier run of the same name). Then a
Ray Train ``TorchTrainer`` runs ``tasks.train.worker_loop.train_worker`` on
``num_workers`` workers (DDP), and the driver writes the final generator (the EMA weights,
plus the EMA shadow; CAFM also the raw discriminator) with ``cafm_core.checkpoint.save_model``.

Resume (Ray Train V2 restores a run from its directory; docs/ray.md): ``resume=True`` reuses
the run directory ``<storage_path>/<run_name>``, ``resume=False`` with an existing one is
refused. A run already at the requested step count returns its outputs without starting
Ray (an orchestrator retry is cheap), also when its final checkpoint is on storage but Ray
never registered it; a run beyond it is refused.

On a cluster (``RAY_ADDRESS``) the workers need this package installed (each worker checks
that its code is the driver's, ``tasks.code_version``) and ``storage_path`` must be storage
every node reaches (``s3://`` or a shared filesystem); the init checkpoint travels to the
workers as verified bytes through Ray's object store. ``placement_strategy`` is Ray's for
the workers' placement group (``SPREAD`` puts them on different nodes where it can). A
cluster that cannot hold the workers is refused before training (``ClusterTooSmall``, after
a bounded wait for it to grow), and a worker group that cannot be placed again after a node
is lost fails the run after ``PLACEMENT_RETRIES`` timed-out starts instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
import ray.train

from cafm_core.checkpoint import (
    checkpoint_from_bytes,
    load_checkpoint,
    load_state_dict_checked,
    save_model,
    unflatten_state_dicts,
)
from cafm_core.models import build_discriminator, build_generator, config_from_dict
from tasks.arrow_storage import ray_storage
from tasks.code_version import code_identity
from tasks.ray_cluster import ClusterTooSmall, start_cluster, worker_cpus, worker_resources
from tasks.train.configs import MIXED_PRECISION_MODES, divergence_guard, json_config, train_config
from tasks.train.shards import holds_in_memory, inspect_shards, read_shards
from tasks.train.train_state import TRAIN_STATE_FORMAT, RunCheckpoints, load_ray_checkpoint, verified_state
from tasks.train.worker_loop import train_worker
from tasks.validation import check_int

__all__ = ["STORAGE_BACKOFF_S", "STORAGE_RETRIES", "TrainingDiverged", "fit_with_storage_retries", "run_cafm",
           "run_flow_matching"]

logger = logging.getLogger(__name__)

STORAGE_RETRIES = 3
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's, for the workers' placement group
PLACEMENT_RETRIES = 2  # worker-group starts that may time out waiting for resources before the run fails
STORAGE_BACKOFF_S = 2.0
_STORAGE_ERROR_MARKS = ("AWS Error", "NETWORK_CONNECTION", "Could not connect", "Connection reset", "curlCode")


class TrainingDiverged(RuntimeError):
    """Training diverged again after every allowed rollback; the message says where and why."""


def run_flow_matching(
    *,
    shard_urls: list[str],
    sample_shape: tuple[int, ...],
    num_classes: int,
    model_config: dict | None,
    fm_config: dict,
    output_dir: str,
    num_workers: int = 2,
    cpus_per_worker: int | None = None,
    use_gpu: bool = False,
    placement_strategy: str = "PACK",
    mixed_precision: str = "no",
    checkpoint_every: int,
    storage_path: str,
    run_name: str,
    resume: bool = True,
    init_checkpoint: str | None = None,
    divergence: dict | None = None,
    lineage: dict | None = None,
) -> dict:
    """FM pretraining on Ray Train; returns model_dir, history, final_metrics, steps, seconds, ray_checkpoint.

    ``init_checkpoint`` (optional, a local ``save_model`` dir) starts from its raw ``model``
    weights; ``model_config`` may then be None (taken from the checkpoint) or must equal it.
    ``cpus_per_worker`` (default: see ``tasks.ray_cluster.worker_cpus``) is each worker's CPU
    resource and torch thread count. Also returned: ``resumed_from_step`` (0 for a fresh
    run; ``history`` holds only rows after it), ``worker_checksums`` (one sha256 of weights
    + EMA per worker; equal = in sync) and ``rollbacks`` (divergences survived).
    ``divergence`` holds ``cafm_core.training.DivergenceGuard`` fields: a step with a NaN/inf
    metric or a loss/logit above ``max_abs`` rolls every worker back to the last checkpoint
    with learning rates times ``lr_factor``; after ``max_rollbacks`` it raises
    :class:`TrainingDiverged` (no checkpoint of the diverged state is ever written).
    ``lineage`` (e.g. the training data's identity, ``{"dataset": ...}``) is recorded in the
    generator's metadata, so that an evaluation can refuse a model of other data.
    """
    return _run(
        stage="fm", shard_urls=shard_urls, sample_shape=sample_shape, num_classes=num_classes,
        model_config=model_config, config_values=fm_config, init_checkpoint=init_checkpoint,
        output_dir=output_dir, num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
        placement_strategy=placement_strategy, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
        storage_path=storage_path,
        run_name=run_name, resume=resume, divergence=divergence, lineage=lineage,
    )


def run_cafm(
    *,
    shard_urls: list[str],
    sample_shape: tuple[int, ...],
    num_classes: int,
    init_checkpoint: str | None,
    cafm_config: dict,
    output_dir: str,
    num_workers: int = 2,
    cpus_per_worker: int | None = None,
    use_gpu: bool = False,
    placement_strategy: str = "PACK",
    mixed_precision: str = "no",
    checkpoint_every: int,
    storage_path: str,
    run_name: str,
    resume: bool = True,
    curve: dict | None = None,
    divergence: dict | None = None,
    lineage: dict | None = None,
    model_config: dict | None = None,
) -> dict:
    """CAFM post-training on Ray Train from an FM generator checkpoint (its EMA weights), or
    CAFM training from scratch: ``init_checkpoint=None`` with ``model_config`` (a freshly
    initialised generator; nothing is read from a checkpoint).

    The discriminator is ``discriminator_from_generator`` of that generator. Returns the
    same keys as :func:`run_flow_matching` plus ``discriminator_dir``. ``curve`` (optional:
    ``store_root``, ``data_url`` of a prepared dataset, ``method``, ``nfe``,
    ``num_samples``, ``seed``) adds a diagnostic curve to every report: the metric of the
    generator and of its EMA on a fixed small sample (``fd_model``/``fd_ema``, or
    ``sliced_wasserstein_*`` for points), computed on rank 0; the history's first row is
    the starting point.
    """
    if (init_checkpoint is None) == (model_config is None):
        raise ValueError("run_cafm needs either init_checkpoint (a local directory holding the FM generator) or, "
                         "to train from scratch, model_config; not both")
    return _run(
        stage="cafm", shard_urls=shard_urls, sample_shape=sample_shape, num_classes=num_classes,
        model_config=model_config, config_values=cafm_config, init_checkpoint=init_checkpoint,
        output_dir=output_dir, num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
        placement_strategy=placement_strategy, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
        storage_path=storage_path,
        run_name=run_name, resume=resume, curve=curve, divergence=divergence, lineage=lineage,
    )


def _run(
    *,
    stage: str,
    shard_urls,
    sample_shape,
    num_classes: int,
    model_config: dict | None,
    config_values: dict,
    init_checkpoint: str | None,
    output_dir: str,
    num_workers: int,
    cpus_per_worker: int | None,
    use_gpu: bool,
    placement_strategy: str,
    mixed_precision: str,
    checkpoint_every: int,
    storage_path: str,
    run_name: str,
    resume: bool,
    curve: dict | None = None,
    divergence: dict | None = None,
    lineage: dict | None = None,
) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # -- every check before Ray starts --
    urls, shape = _check_common(
        shard_urls=shard_urls, sample_shape=sample_shape, num_classes=num_classes, num_workers=num_workers,
        mixed_precision=mixed_precision, checkpoint_every=checkpoint_every, storage_path=storage_path,
        run_name=run_name, output_dir=output_dir,
    )
    storage_path, run_name, output_dir = str(storage_path), str(run_name), str(output_dir)
    cpus = worker_cpus(num_workers, cpus_per_worker)
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {placement_strategy!r}")
    config = train_config(stage, config_values)
    guard = divergence_guard(divergence)
    check_int(f"{stage}_config.log_every", config.log_every, 1)
    init_files = None
    if init_checkpoint is not None:
        init_files = _init_checkpoint_files(str(init_checkpoint))
        _, init_config, init_meta = checkpoint_from_bytes(init_files)
        if init_meta.get("class", "").endswith("Discriminator"):
            raise ValueError(f"init_checkpoint {init_checkpoint!r} holds a discriminator; expected a generator")
        if model_config is not None and dict(config_from_dict(dict(model_config)).to_dict()) != dict(init_config):
            raise ValueError(
                f"model_config {model_config} differs from the config in init_checkpoint {init_checkpoint!r}: {init_config}"
            )
        model_config = dict(init_config)
    if model_config is None:
        raise ValueError("model_config is required when no init_checkpoint is given")
    _check_model_fits(model_config, shape, num_classes, "model_config" if init_checkpoint is None else "init_checkpoint")
    total_rows = inspect_shards(urls, shape, num_classes)
    per_worker = total_rows // num_workers
    if config.batch_size > per_worker:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the {per_worker} rows each of the {num_workers} "
            f"workers gets ({total_rows} rows in {len(urls)} shards)"
        )
    checkpoints = RunCheckpoints(storage_path, run_name)
    previous, previous_step, start_step = _previous_run(
        checkpoints, resume=resume, stage=stage, model_config=model_config, steps=config.steps
    )
    if start_step == config.steps and previous_step < start_step:
        # the final checkpoint is on storage and verifies, but Ray never registered it (the
        # process died in between): it is the result; Ray's registered one is older
        previous, previous_step = checkpoints.at_step(start_step), start_step
    if previous is not None and previous_step == config.steps:
        # already done (e.g. an orchestrator retry): rebuild the outputs, train nothing
        logger.info("run %r is already at step %d; returning its last checkpoint", run_name, start_step)
        return _outputs(stage=stage, checkpoint=previous, checkpoints=checkpoints, output_dir=output_dir,
                        start_step=start_step, seconds=0.0, returned=None, lineage=lineage)

    # -- Ray --
    start_cluster(num_workers, cpus, bool(use_gpu))
    in_memory = holds_in_memory(total_rows, shape)
    datasets = {} if in_memory else {"train": read_shards(urls, ["x", "label"] if num_classes > 0 else ["x"])}
    storage_fs, storage_base = ray_storage(storage_path)
    loop = {
        "stage": stage,
        "train_config": json_config(config),
        "model_config": dict(model_config),
        "sample_shape": shape,
        "num_classes": num_classes,
        "checkpoint_every": checkpoint_every,
        "mixed_precision": mixed_precision,
        "use_gpu": bool(use_gpu),
        "threads": cpus,
        # small data: every worker reads its share of the shards once and draws its batches
        # in memory (tasks.train.shards.IN_MEMORY_MAX_BYTES); else Ray Data streams it
        "in_memory_urls": urls if in_memory else None,
        "curve": curve,
        "divergence": guard.to_dict(),
        "storage_path": storage_path,
        "run_name": run_name,
        # each worker checks that it runs the driver's code (nodes install their own copy)
        "code_digest": code_identity()["digest"],
        # the init checkpoint travels as verified bytes through the object store, so
        # workers on other nodes need no access to the driver's disk
        "init_ref": ray.put(init_files) if init_files is not None else None,
    }

    def make_trainer() -> TorchTrainer:  # a fresh trainer per attempt (see fit_with_storage_retries)
        return TorchTrainer(
            train_worker,
            train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=bool(use_gpu), resources_per_worker={"CPU": cpus},
                                         placement_strategy=placement_strategy),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage_base if storage_fs is not None else os.path.abspath(storage_base),
                storage_filesystem=storage_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                # a worker group that cannot be placed (a node lost, resources gone) is tried
                # again a bounded number of times (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
                # 60 s by default), then the run fails; Ray's default retries forever
                failure_config=FailureConfig(max_failures=2, controller_failure_limit=PLACEMENT_RETRIES),
            ),
            datasets=datasets,
        )

    started, started_at = time.perf_counter(), time.time()
    try:
        result = fit_with_storage_retries(make_trainer, run_name)
    except ray.train.ControllerError as exc:
        if type(exc.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        raise ClusterTooSmall(
            f"Ray Train run {run_name!r}: the cluster could not place {num_workers} workers ({worker_resources(cpus, use_gpu)}"
            f" each, placement {placement_strategy}) in {PLACEMENT_RETRIES + 1} "
            f"attempts (a node lost, or its resources taken); resume the run once the cluster has room"
        ) from exc
    seconds = time.perf_counter() - started
    timing = (result.return_value or {}).get("timing")
    if timing:  # Ray Train's start (fit to the worker's first line) and its end (the last step to fit's return)
        timing["start_s"] = timing["entered_at"] - started_at
        timing["end_s"] = seconds - timing["start_s"] - timing["setup_s"] - timing["loop_s"]
    diverged = (result.return_value or {}).get("diverged")
    if diverged:
        where = checkpoints.url(result.checkpoint) if result.checkpoint is not None else "none (no step passed)"
        raise TrainingDiverged(f"Ray Train run {run_name!r}: {diverged}. Last good checkpoint: {where}")
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name!r} finished without a checkpoint")
    return _outputs(stage=stage, checkpoint=result.checkpoint, checkpoints=checkpoints, output_dir=output_dir,
                    start_step=start_step, seconds=seconds, returned=result.return_value, lineage=lineage)


def fit_with_storage_retries(make_trainer, run_name: str):
    """``trainer.fit()``, started again (a fresh trainer on the same run directory, so it
    resumes from the newest checkpoint that verifies) when Ray Train's controller failed on
    storage: Ray writes its own run state (``checkpoint_manager_snapshot.json``) without
    retrying, so one unreachable moment of S3 fails the whole run. Up to
    ``STORAGE_RETRIES`` times with exponential backoff; any other error is raised at once."""
    for attempt in range(STORAGE_RETRIES + 1):
        try:
            return make_trainer().fit()  # V2: resumes from the run directory's latest checkpoint if there is one
        except ray.train.ControllerError as exc:
            if attempt == STORAGE_RETRIES or not any(mark in str(exc) for mark in _STORAGE_ERROR_MARKS):
                raise
            wait = STORAGE_BACKOFF_S * 2**attempt
            logger.warning("Ray Train run %r failed on storage (%s); starting it again in %.0f s from its newest "
                           "verified checkpoint (retry %d of %d)", run_name, str(exc).strip()[:300], wait,
                           attempt + 1, STORAGE_RETRIES)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# ---- checks before Ray starts -------------------------------------------------------------


def _check_common(
    *, shard_urls, sample_shape, num_classes, num_workers, mixed_precision, checkpoint_every, storage_path, run_name, output_dir
) -> tuple[list[str], tuple[int, ...]]:
    if isinstance(shard_urls, str) or not isinstance(shard_urls, (list, tuple)):
        raise ValueError(f"shard_urls must be a list of Parquet shard URLs, got {type(shard_urls).__name__}")
    urls = [str(u) for u in shard_urls]
    if not urls:
        raise ValueError("shard_urls is empty: no Parquet shards to train on")
    try:
        shape = tuple(int(s) for s in sample_shape)
    except (TypeError, ValueError):
        raise ValueError(f"sample_shape must be a tuple of positive ints, got {sample_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive ints, got {sample_shape!r}")
    check_int("num_classes", num_classes, 0)
    check_int("num_workers", num_workers, 1)
    check_int("checkpoint_every", checkpoint_every, 1)
    if mixed_precision not in MIXED_PRECISION_MODES:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}; expected one of {MIXED_PRECISION_MODES}")
    for name, value in (("storage_path", storage_path), ("run_name", run_name), ("output_dir", output_dir)):
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ValueError(f"{name} must be a non-empty path string, got {value!r}")
    if "/" in str(run_name) or str(run_name) in (".", ".."):
        raise ValueError(f"run_name must be a plain directory name, got {run_name!r}")
    return urls, shape


def _check_model_fits(model_config: dict, shape: tuple[int, ...], num_classes: int, what: str) -> None:
    try:
        config = config_from_dict(dict(model_config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: invalid model config: {exc}") from exc
    if tuple(config.sample_shape) != shape:
        raise ValueError(f"{what}: model sample shape {tuple(config.sample_shape)} does not match sample_shape {shape}")
    if config.num_classes != num_classes:
        raise ValueError(f"{what}: model num_classes {config.num_classes} does not match num_classes {num_classes}")


def _init_checkpoint_files(directory: str) -> dict[str, bytes]:
    """All files of a local cafm_core checkpoint dir, verified (to ship to workers as bytes)."""
    path = Path(directory)
    try:
        load_checkpoint(path)  # verifies marker and checksums; clear error if incomplete
    except ValueError as exc:
        raise ValueError(f"init_checkpoint {directory!r} is not a loadable checkpoint: {exc}") from exc
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}


def _previous_run(
    checkpoints: RunCheckpoints, *, resume: bool, stage: str, model_config: dict, steps: int
) -> tuple[Any, int, int]:
    """An earlier run with this name: ``(Ray's latest checkpoint or None, its step, the step
    training resumes from)``. The last is the newest verified checkpoint on storage when Ray
    did not register it (the process was killed first); the workers restore the same one."""
    run_name, storage_path = checkpoints.run_name, checkpoints.storage_path
    exists = checkpoints.exists()
    if exists and not resume:
        raise ValueError(
            f"run directory {run_name!r} already exists under {storage_path!r}; pass resume=True to continue it "
            "or choose another run_name"
        )
    previous = checkpoints.registered() if exists else None
    saved_states = []
    state = verified_state(previous, stage) if previous is not None else None
    if state is None:
        previous = None  # none, or it does not verify: the newest verified one on storage decides
    else:
        saved_states.append(state[1:])
    newest = checkpoints.newest_verified(steps) if exists else None
    if newest is not None:
        saved_states.append(newest[1:])
    for saved, _ in saved_states:
        if saved.get("format") != TRAIN_STATE_FORMAT or saved.get("stage") != stage:
            raise ValueError(
                f"run {run_name!r} under {storage_path!r} holds a {saved.get('stage')!r} checkpoint; "
                f"cannot resume it as {stage!r}: choose another run_name"
            )
        if dict(saved["model"]) != dict(config_from_dict(dict(model_config)).to_dict()):
            raise ValueError(f"run {run_name!r} was trained with model config {saved['model']}; got {model_config}")
    previous_step = int(saved_states[0][1]["step"]) if previous is not None else 0
    if previous_step > steps:
        raise ValueError(
            f"run {run_name!r} is already at step {previous_step}, beyond the requested steps={steps}; "
            "ask for more steps or choose another run_name"
        )
    start_step = max([previous_step] + [int(meta["step"]) for _, meta in saved_states])
    return previous, previous_step, start_step


# ---- outputs ------------------------------------------------------------------------------


def _outputs(
    *, stage: str, checkpoint, checkpoints: RunCheckpoints, output_dir: str, start_step: int, seconds: float,
    returned: dict | None, lineage: dict | None,
) -> dict:
    """Write the final generator (and discriminator) from a Ray checkpoint; build the result dict."""
    tensors, saved, saved_meta = load_ray_checkpoint(checkpoint)
    steps_done = int(saved_meta["step"])
    states = unflatten_state_dicts(tensors)
    model_config = config_from_dict(dict(saved["model"]))
    generator = build_generator(model_config)
    load_state_dict_checked(generator, states["ema"])  # the EMA weights are the model
    out = Path(output_dir)
    meta = {**(lineage or {}), "stage": stage, "steps": steps_done, "run_name": checkpoints.run_name,
            "train_config": saved["train"]}
    model_dir = save_model(out / "generator", generator, ema_shadow=states["ema"], metadata=meta)
    returned = returned or {}
    full_history = list(returned.get("history") or saved_meta["history"])
    final_metrics = dict(full_history[-1]) if full_history else {}
    final_metrics.pop("step", None)
    output = {
        "model_dir": str(model_dir),
        # rows this run made (a fresh run's step-0 row is its starting point, e.g. a curve point)
        "history": [row for row in full_history if row["step"] > start_step or row["step"] == start_step == 0],
        # rows up to resumed_from_step, made by an earlier (maybe interrupted) run of this name
        "earlier_history": [row for row in full_history if row["step"] <= start_step and start_step > 0],
        "final_metrics": final_metrics,
        "steps": steps_done,
        "seconds": seconds,
        "ray_checkpoint": checkpoints.url(checkpoint),
        "resumed_from_step": start_step,
        # where the last worker group started: after a worker failure, the checkpoint it restored
        "restored_from_step": int(returned.get("start_step", start_step)),
        "worker_checksums": list(returned.get("checksums") or []),
        # where the last worker group ran: rank, Ray node id, host and code digest of each worker
        "workers": list(returned.get("workers") or []),
        # divergences survived: {at_step, to_step, reason, learning_rates} each
        "rollbacks": list(returned.get("rollbacks") or saved_meta.get("rollbacks") or []),
        # rank 0's set-up and step-loop seconds (absent when nothing trained)
        "timing": returned.get("timing"),
    }
    if stage == "cafm":
        discriminator = build_discriminator(model_config)
        load_state_dict_checked(discriminator, states["discriminator"])
        output["discriminator_dir"] = str(save_model(out / "discriminator", discriminator, metadata=meta))
    return output
