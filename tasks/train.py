"""FM pretraining and CAFM post-training on Ray Train (distributed data parallel).

Public entry points (plain Python; the Prefect flow wraps them):

* :func:`run_flow_matching` - FM pretraining of a generator.
* :func:`run_cafm` - CAFM post-training of a generator (+ discriminator) from an FM checkpoint.
* :func:`ensure_ray` - connect to ``RAY_ADDRESS`` or start a loopback-only local Ray.
* :func:`optimizer_state_to_tensors` / :func:`optimizer_state_from_tensors` - optimiser
  state as safetensors-ready tensors + JSON metadata (no pickle).

Both stages share one per-worker skeleton (:func:`_train_worker`): data shard iteration,
Accelerate setup, restore, the step loop, EMA, metric reports and checkpoints. What differs
(which networks, which ``cafm_core.training`` step function) lives in a small stage class.
The losses and steps are ``cafm_core``'s own (``flow_matching_step``, ``cafm_step``, which
picks ``discriminator_step`` or ``generator_step`` by the schedule); nothing of the method is re-implemented here. Every input is checked
before Ray starts (shards' schema, row counts and label range from Parquet metadata,
configs, the init checkpoint, an existing run directory).

Ray 2.60 notes (checked against the installed version)
------------------------------------------------------
* **Ray Train V2 is the default** (``RAY_TRAIN_V2_ENABLED`` unset means enabled). This module
  is written for V2 and does not work with ``RAY_TRAIN_V2_ENABLED=0``.
* In V2 ``TorchTrainer.restore`` / ``TorchTrainer.can_restore`` raise ``DeprecationWarning``
  and so does the ``resume_from_checkpoint`` argument. Restoration is automatic instead:
  a trainer whose ``RunConfig(name, storage_path)`` points at an existing run directory
  loads that run's checkpoint-manager snapshot, and ``ray.train.get_checkpoint()`` returns
  its latest checkpoint in the workers. The same mechanism serves worker-failure retries
  (``FailureConfig(max_failures=2)``). Ray registers a reported checkpoint only when its
  controller next polls the workers, so a worker killed soon after a report can leave
  ``get_checkpoint()`` at an older checkpoint, or None (seen in the worker-kill test: a
  restart from step 0 with two checkpoints on storage); the workers therefore also scan
  the run directory and take the newest checkpoint that verifies, when it is newer
  (``_newest_complete_checkpoint``). Hence ``resume=True`` simply reuses the run
  directory; ``resume=False`` with an existing run directory is refused (ValueError)
  rather than silently continuing or overwriting it. A run already at the requested step
  count returns its outputs without starting Ray (an orchestrator retry is cheap); a run
  beyond it is refused.
* ``ray.train.report`` is a barrier: every worker calls it the same number of times; only
  rank 0 attaches a checkpoint. Only rank-0 metrics are kept by Ray, so metrics are first
  averaged over workers (``all_reduce``). V2 prints no progress table, so rank 0 logs one
  line per report (Ray forwards it to the driver console) with a text progress bar,
  elapsed time and an estimate of the time left. The full history comes back through
  ``Result.return_value`` (the rank-0 return value; V2 only).
* ``ray.train.get_context()`` gives ranks/world size; ``ray.train.Checkpoint`` is the same
  class as in V1.
* Ray Data 2.60's default Parquet reader (its "datasource V2") starts 32 ``FooterReader``
  actor processes for every execution, i.e. every epoch; :func:`_read_shards` therefore
  uses the V1 reader (``DataContext.use_datasource_v2 = False`` around the call) unless
  ``RAY_DATA_USE_DATASOURCE_V2`` is set.
* Each training worker takes ``cpus_per_worker`` CPUs (default: the machine's cores split
  over the workers on a local cluster, 1 on an existing one) and sets torch's thread count
  to it (Ray sets ``OMP_NUM_THREADS=1``). Ray Data's read tasks need a CPU beyond the
  workers': a local cluster is started with ``max(cpu_count, workers * cpus + 1)`` logical
  CPUs, else training stalls.
* On this 2-core machine one 2-thread worker is 1.7x faster than two 1-thread DDP workers
  (CAFM tiny DiT, batch 128: 0.27 vs 0.46 s/step): with models this small, gloo's gradient
  all-reduce and Ray's own processes cost more than the second process gains.
* With the dashboard off (local clusters here), V2's placement-group cleaner logs "Failed to
  query Ray Train Controller actor state. State API may be temporarily unavailable" every
  second during a run (the state API lives in the dashboard); :func:`ensure_ray` installs
  ``tasks._ray_setup.quiet_worker_logs`` as the workers' setup hook to silence that logger.

Accelerate + Ray
----------------
Ray's ``TorchTrainer`` initialises ``torch.distributed`` (gloo on CPU, nccl on GPU) and sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. ``accelerate.Accelerator(cpu=not use_gpu)`` (1.15) sees
those variables, finds the process group already initialised, adopts it (no second
``init_process_group``) and ``prepare`` wraps models in ``DistributedDataParallel``; the
worker checks ``accelerator.num_processes == world size`` and that the prepared generator is
DDP, so no ``ray.train.torch.prepare_model`` fallback is needed. ``mixed_precision`` is
``"no"`` or ``"bf16"`` (autocast inside the prepared modules' forward); fp16 is refused
because the ``cafm_core`` steps call ``loss.backward()`` without a gradient scaler.

Checkpoints (no pickle anywhere on disk)
----------------------------------------
A Ray checkpoint directory is one ``cafm_core.checkpoint`` directory (safetensors + JSON +
checksum marker) holding the generator, the discriminator (CAFM), the EMA shadow and both
optimisers' state (tensors flattened by :func:`optimizer_state_to_tensors`, the rest as JSON
metadata), plus the step counter, the seed and the metric history. On restore, each
worker's noise generator is reseeded from (seed, rank, step): a resumed run is reproducible
but not bit-identical to an uninterrupted one (nor is the data order). The final generator
is written by the driver with ``cafm_core.checkpoint.save_model`` (EMA weights as the model,
plus the EMA shadow) to ``<output_dir>/generator``; CAFM also writes the raw discriminator
to ``<output_dir>/discriminator``.

Divergence
----------
Every step's metrics go through ``cafm_core.training.DivergenceGuard``: a NaN/inf metric, or
a loss or mean logit above ``max_abs``, on any worker (one all-reduced flag per step, so all
ranks take the same branch) rolls every worker back to the last good state (the start, then
each checkpoint, kept in memory on every rank) with all learning rates times ``lr_factor``;
the lowered rates live in the optimiser state, so they survive a restart. Rollbacks are
listed in the checkpoint metadata and the result (``rollbacks``); history rows after the
rollback point are dropped, so no step appears twice. After ``max_rollbacks`` the workers
return and the driver raises :class:`TrainingDiverged` naming the step, the reason and the
last good checkpoint. A diverged state is never checkpointed (the check runs before each
report, and ``cafm_core.checkpoint`` refuses non-finite tensors besides).

Clusters
--------
Workers import this module (``tasks.train``) and ``cafm_core``: on a remote cluster
(``RAY_ADDRESS``) the package must be installed in the workers' environment, and
``storage_path`` must be storage every node reaches (``s3://`` or a shared filesystem).
The init checkpoint travels to the workers through Ray's object store, and ``AWS_*``
variables through ``runtime_env``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import Tensor, nn

from cafm_core.checkpoint import (
    checkpoint_from_bytes,
    flatten_state_dicts,
    load_checkpoint,
    load_state_dict_checked,
    model_from_checkpoint,
    save_checkpoint,
    save_model,
    unflatten_state_dicts,
)
from cafm_core.ema import EMA
from cafm_core.logits import DiscriminatorLogits
from cafm_core.models import build_discriminator, build_generator, config_from_dict, discriminator_from_generator
from cafm_core.path import TimeSampler
from cafm_core.training import (
    CAFMConfig,
    DivergenceGuard,
    FlowMatchingConfig,
    adam,
    cafm_step,
    flow_matching_step,
)

__all__ = [
    "MIXED_PRECISION_MODES",
    "TRAIN_STATE_FORMAT",
    "TrainingDiverged",
    "ensure_ray",
    "start_cluster",
    "train_config",
    "worker_cpus",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "run_cafm",
    "run_flow_matching",
]

MIXED_PRECISION_MODES = ("no", "bf16")
TRAIN_STATE_FORMAT = "cafm_train_state"
_STAGES = ("fm", "cafm")
_SHUFFLE_BUFFER_MIN = 1024

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training diverged again after every allowed rollback; the message says where and why."""


# ---- Ray bootstrap ------------------------------------------------------------------------


def _forwarded_env() -> dict[str, str]:
    """Environment the workers need (S3 access): every ``AWS_*`` variable that is set."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and v}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray; no-op if initialised.

    ``AWS_*`` variables (S3 endpoint/credentials) go to the workers through
    ``runtime_env`` only when set; their values are never logged. A local cluster
    advertises 127.0.0.1, has no dashboard and no usage-stats reporting. Ray 2.60's gRPC
    servers listen on all interfaces (there is no option to bind them to loopback only);
    what keeps other hosts out is token authentication, which Ray 2.60 turns on for every
    new local cluster unless ``RAY_AUTH_MODE=disabled`` (token in ``~/.ray/auth_token``).
    """
    if ray.is_initialized():
        return
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be a positive int or None, got {num_cpus!r}")
    address = os.environ.get("RAY_ADDRESS") or None
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": "tasks._ray_setup.quiet_worker_logs"}
    env = _forwarded_env()
    if env:
        runtime_env["env_vars"] = env
    kwargs: dict[str, Any] = {"log_to_driver": True, "runtime_env": runtime_env}
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.init(address=address, **kwargs)


def worker_cpus(num_workers: int, cpus_per_worker: int | None) -> int:
    """CPUs (and torch threads) per training worker: as given, else this machine's cores
    split evenly over the workers when Ray is local, else 1."""
    _check_int("num_workers", num_workers, 1)
    if cpus_per_worker is not None:
        return _check_int("cpus_per_worker", cpus_per_worker, 1)
    if os.environ.get("RAY_ADDRESS"):
        return 1
    return max(1, (os.cpu_count() or 1) // num_workers)


def start_cluster(num_workers: int, cpus_per_worker: int, use_gpu: bool = False) -> None:
    """Start (or connect to) Ray for ``num_workers`` training workers of ``cpus_per_worker`` CPUs.

    A local cluster gets one logical CPU beyond the workers' for Ray Data's read tasks
    (training stalls without it); on an existing cluster a shortfall is logged.
    """
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        ensure_ray(num_cpus=max(os.cpu_count() or 1, num_workers * cpus_per_worker + 1))
    else:
        ensure_ray()
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    needed = num_workers * cpus_per_worker
    if cpus < needed + 1:
        logger.warning(
            "the Ray cluster has %s CPUs: %d workers x %d CPUs take %d, leaving %s for Ray Data's read tasks "
            "(training stalls without one unless the cluster autoscales)",
            cpus, num_workers, cpus_per_worker, needed, max(cpus - needed, 0),
        )
    if use_gpu and gpus < num_workers:
        logger.warning("the Ray cluster has %s GPUs for %d GPU workers (waits unless it autoscales)", gpus, num_workers)


# ---- storage: shard URLs and filesystems --------------------------------------------------


def _s3_filesystem() -> pafs.FileSystem:
    """pyarrow S3 filesystem honouring ``AWS_ENDPOINT_URL``; credentials come from the environment."""
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # custom endpoints (MinIO, moto) ignore it; avoids a region lookup
    return pafs.S3FileSystem(**kwargs)


def _split_url(url: str) -> tuple[str, str]:
    """``(scheme, path)`` where scheme is ``"s3"`` or ``"local"``; path is what pyarrow expects."""
    if url.startswith("s3://"):
        return "s3", url[len("s3://") :]
    if url.startswith("file://"):
        return "local", url[len("file://") :]
    if "://" in url:
        raise ValueError(f"unsupported URL scheme in {url!r}; expected a local path or s3://bucket/key")
    return "local", os.path.abspath(url)


def _filesystem_and_paths(urls: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    schemes = {_split_url(u)[0] for u in urls}
    if len(schemes) > 1:
        raise ValueError(f"shard_urls mix local paths and s3:// URLs ({urls[:3]}...); use one kind")
    scheme = schemes.pop()
    fs = _s3_filesystem() if scheme == "s3" else pafs.LocalFileSystem()
    return fs, [_split_url(u)[1] for u in urls]


def _storage_filesystem(storage_path: str) -> tuple[pafs.FileSystem | None, str]:
    """Filesystem for Ray's ``storage_path`` (None: let Ray resolve a local path) and the path."""
    scheme, path = _split_url(storage_path)
    if scheme == "s3":
        return _s3_filesystem(), path.rstrip("/")
    return None, path


# ---- optimiser state without pickle -------------------------------------------------------


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors[path] = value.detach()
        return {"__tensor__": path}
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise ValueError(f"optimizer state key {key!r} at {path or '<root>'} is not an int or str")
            items.append([key, _encode(item, f"{path}.{key}" if path else str(key), tensors)])
        return {"__dict__": items}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"optimizer state value at {path or '<root>'} has unsupported type {type(value).__name__}")


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            key = value["__tensor__"]
            if key not in tensors:
                raise ValueError(f"optimizer state refers to tensor {key!r}, which is not in the checkpoint")
            return tensors[key]
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__float__" in value:
            return float(value["__float__"])
        raise ValueError(f"unknown encoded optimizer state entry with keys {sorted(value)}")
    return value


def optimizer_state_to_tensors(state_dict: Mapping) -> tuple[dict[str, Tensor], dict]:
    """Split an optimiser ``state_dict()`` into safetensors-ready tensors and JSON metadata.

    Tensors are named by their path (``"state.0.exp_avg"``); the metadata mirrors the
    structure with ``{"__tensor__": name}`` placeholders, keeping int keys and tuples
    (``{"__dict__": [[key, value], ...]}``, ``{"__tuple__": [...]}``) so that
    :func:`optimizer_state_from_tensors` returns an equal state dict. No pickle.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    tensors: dict[str, Tensor] = {}
    meta = _encode(state_dict, "", tensors)
    return tensors, meta


def optimizer_state_from_tensors(tensors: Mapping[str, Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    if not isinstance(meta, dict) or "__dict__" not in meta:
        raise ValueError("optimizer metadata must be the dict written by optimizer_state_to_tensors")
    return _decode(meta, tensors)


# ---- configs ------------------------------------------------------------------------------


def _dataclass_from_dict(cls, data: Mapping | None, name: str):
    """``cls(**data)`` with a clear error for unknown fields; ``time_sampler`` may be a dict."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} must be a dict of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {name} fields {unknown}; expected a subset of {sorted(known)}")
    values = dict(data)
    sampler = values.get("time_sampler")
    if isinstance(sampler, Mapping):
        sampler_known = {f.name for f in fields(TimeSampler)}
        bad = sorted(set(sampler) - sampler_known)
        if bad:
            raise ValueError(f"unknown {name}.time_sampler fields {bad}; expected a subset of {sorted(sampler_known)}")
        values["time_sampler"] = TimeSampler(**sampler)
    elif sampler is not None and not isinstance(sampler, TimeSampler):
        raise ValueError(f"{name}.time_sampler must be a dict or TimeSampler, got {type(sampler).__name__}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def train_config(stage: str, data: Mapping) -> FlowMatchingConfig | CAFMConfig:
    """A ``FlowMatchingConfig`` (``"fm"``) or ``CAFMConfig`` (``"cafm"``) from plain fields
    (``time_sampler`` a dict, ``betas`` a list), unknown fields refused by name."""
    if stage == "fm":
        return _dataclass_from_dict(FlowMatchingConfig, data, "fm_config")
    return _dataclass_from_dict(CAFMConfig, data, "cafm_config")


def _json_config(config: FlowMatchingConfig | CAFMConfig) -> dict:
    data = config.to_dict()  # asdict: the nested TimeSampler becomes a dict
    data["betas"] = list(data["betas"])
    return data


# ---- data ---------------------------------------------------------------------------------


def _label_range(metadata: pq.FileMetaData, column: int) -> tuple[int | None, int | None]:
    """Min/max label from the row-group statistics (None when a row group has none)."""
    low = high = None
    for index in range(metadata.num_row_groups):
        stats = metadata.row_group(index).column(column).statistics
        if stats is None or not stats.has_min_max:
            if stats is not None and stats.null_count == metadata.row_group(index).num_rows:
                continue  # all null: unlabelled rows
            return None, None
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    return low, high


def _inspect_shards(urls: list[str], sample_shape: tuple[int, ...], num_classes: int) -> int:
    """Check every shard's schema against ``sample_shape``/labels; return the total row count."""
    fs, paths = _filesystem_and_paths(urls)
    features = math.prod(sample_shape)
    total = 0
    for url, path in zip(urls, paths):
        try:
            with fs.open_input_file(path) as fh:
                parquet = pq.ParquetFile(fh)
                schema, metadata = parquet.schema_arrow, parquet.metadata
                rows = metadata.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"cannot read Parquet shard {url!r}: {exc}") from exc
        if "x" not in schema.names:
            raise ValueError(f"shard {url!r} has no column 'x' (columns: {schema.names})")
        x_type = schema.field("x").type
        if not (pa.types.is_list(x_type) or pa.types.is_large_list(x_type) or pa.types.is_fixed_size_list(x_type)):
            raise ValueError(f"shard {url!r}: column 'x' must be a list of floats, got {x_type}")
        if not pa.types.is_floating(x_type.value_type):
            raise ValueError(f"shard {url!r}: column 'x' must hold floats, got {x_type.value_type}")
        if pa.types.is_fixed_size_list(x_type) and x_type.list_size != features:
            raise ValueError(
                f"shard {url!r}: rows of 'x' have {x_type.list_size} values but sample_shape "
                f"{tuple(sample_shape)} needs {features}"
            )
        if "label" in schema.names:
            if not pa.types.is_integer(schema.field("label").type):
                raise ValueError(f"shard {url!r}: column 'label' must be integer, got {schema.field('label').type}")
            if num_classes > 0:
                low, high = _label_range(metadata, schema.get_field_index("label"))
                if low is not None and (low < 0 or high >= num_classes):
                    raise ValueError(f"shard {url!r}: labels span [{low}, {high}], outside [0, {num_classes})")
        elif num_classes > 0:
            raise ValueError(f"shard {url!r} has no column 'label' but num_classes is {num_classes}")
        total += rows
    return total


def _read_shards(urls: list[str], columns: list[str]):
    """``ray.data.read_parquet`` over the shards, with Ray Data's V1 Parquet reader by default.

    Ray Data 2.60's default (V2) Parquet datasource starts a pool of ``FooterReader``
    actors (32 processes, ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``) for every execution, i.e.
    every epoch of every worker split; on small machines that costs more than the training
    steps. The V1 reader reads footers in its read tasks. Setting
    ``RAY_DATA_USE_DATASOURCE_V2=1`` in the environment keeps V2.
    """
    from ray.data import DataContext

    fs, paths = _filesystem_and_paths(urls)
    context = DataContext.get_current()
    previous = context.use_datasource_v2
    if os.environ.get("RAY_DATA_USE_DATASOURCE_V2") is None:
        context.use_datasource_v2 = False
    try:
        dataset = ray.data.read_parquet(
            paths, filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs, columns=columns
        )
    finally:
        context.use_datasource_v2 = previous
    return dataset


class _ShardCollate(ArrowBatchCollateFn):
    """Arrow batch -> ``(x [B, *sample_shape] float32, labels [B] int64 or None)``.

    Null labels (unlabelled rows) become the null class ``num_classes`` (trained like the
    dropped labels used for CFG); with ``num_classes == 0`` labels are ignored.
    """

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes

    def __call__(self, batch: pa.Table):
        column = batch.column("x").combine_chunks()
        rows = len(column)
        features = math.prod(self.sample_shape)
        lengths = pc.list_value_length(column)
        if pc.min(lengths).as_py() != features or pc.max(lengths).as_py() != features or column.null_count:
            raise ValueError(f"rows of 'x' must have exactly {features} values for sample_shape {self.sample_shape}")
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        x = torch.tensor(values.reshape(rows, *self.sample_shape), dtype=torch.float32)  # copies: Arrow memory is read-only
        if self.num_classes == 0 or "label" not in batch.column_names:
            return x, None
        labels = pc.fill_null(batch.column("label"), self.num_classes).to_numpy()
        y = torch.tensor(labels, dtype=torch.int64)
        if rows and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        return x, y


def _batches(batch_size: int, collate: _ShardCollate, device: torch.device) -> Iterator[tuple[Tensor, Tensor | None]]:
    """This worker's shard, epoch after epoch, as full batches on ``device``."""
    shard = ray.train.get_dataset_shard("train")
    while True:
        count = 0
        for x, y in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(_SHUFFLE_BUFFER_MIN, 4 * batch_size),
            collate_fn=collate,
        ):
            count += 1
            yield x.to(device, non_blocking=True), (None if y is None else y.to(device, non_blocking=True))
        if count == 0:
            raise RuntimeError(f"this worker's data shard holds fewer than batch_size={batch_size} rows")


# ---- per-worker stages --------------------------------------------------------------------


def _state_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


class _Stage:
    """What differs between FM and CAFM inside the shared worker skeleton."""

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

    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict]:
        states = {name: _state_tensors(module.state_dict()) for name, module in self.modules().items()}
        states["ema"] = _state_tensors(self.ema.shadow)
        meta_opt = {}
        for name, optimizer in self.optimizers.items():
            tensors, meta = optimizer_state_to_tensors(optimizer.state_dict())
            states[f"{name}_opt"] = _state_tensors(tensors)
            meta_opt[name] = meta
        metadata = {"optimizers": meta_opt, "ema": {"decay": self.ema.decay, "num_updates": self.ema.num_updates}}
        return states, metadata

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


class _FMStage(_Stage):
    name = "fm"

    def build(self, generator: nn.Module) -> None:
        cfg = self.config
        optimizer = adam(generator.parameters(), cfg.lr, cfg.betas, cfg.weight_decay)
        self.generator_ddp, optimizer = self.accelerator.prepare(generator, optimizer)
        self.generator = self.accelerator.unwrap_model(self.generator_ddp)
        self.optimizers = {"generator": optimizer}
        # after prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts equal
        self.ema = EMA(self.generator, cfg.ema_decay, warmup=True)

    def step(self, index: int, batch, rng: torch.Generator) -> dict[str, float]:
        metrics = flow_matching_step(self.generator_ddp, self.optimizers["generator"], batch, self.config, generator=rng)
        self.ema.update(self.generator)
        return metrics


class _CAFMStage(_Stage):
    name = "cafm"

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def build(self, generator: nn.Module, discriminator: nn.Module) -> None:
        cfg = self.config
        g_opt = adam(generator.parameters(), cfg.generator_lr, cfg.betas)
        d_logits = DiscriminatorLogits(discriminator, mode=cfg.logit_mode)
        d_opt = adam(d_logits.parameters(), cfg.discriminator_lr, cfg.betas)
        self.generator_ddp, g_opt = self.accelerator.prepare(generator, g_opt)
        # D steps go through DDP(DiscriminatorLogits) so discriminator gradients sync;
        # G steps use the unwrapped (frozen) discriminator, as generator_step expects.
        self.d_logits_ddp, d_opt = self.accelerator.prepare(d_logits, d_opt)
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


def _modules_from_init(init: dict | None, model_config: dict, use_ema: bool) -> nn.Module:
    """The starting generator: from the init checkpoint's files, or freshly built."""
    if init is None:
        return build_generator(config_from_dict(dict(model_config)))
    tensors, config, metadata = checkpoint_from_bytes(init)
    return model_from_checkpoint(tensors, config, metadata, use_ema=use_ema)


def _all_reduce_mean(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return {k: float(v) for k, v in zip(keys, values.tolist())}


def _seed_for(seed: int, rank: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _write_train_state(
    directory: str, stage: _Stage, step: int, loop: dict, history: list[dict], rollbacks: list[dict]
) -> None:
    states, metadata = stage.state()
    config = {
        "format": TRAIN_STATE_FORMAT,
        "stage": stage.name,
        "model": stage.generator.config.to_dict(),
        "train": loop["train_config"],
    }
    metadata.update({"step": step, "seed": stage.config.seed, "world_size": loop["world_size"], "history": history,
                     "rollbacks": rollbacks})
    save_checkpoint(directory, flatten_state_dicts(states), config, metadata)


def _copy_state(states: dict[str, dict[str, Tensor]], metadata: dict) -> tuple[dict, dict]:
    """A private copy of ``_Stage.state()``: loading it must not alias tensors that training
    then updates in place (optimisers keep loaded tensors as their state)."""
    return {name: {k: v.clone() for k, v in sd.items()} for name, sd in states.items()}, copy.deepcopy(metadata)


def _scale_learning_rates(stage: _Stage, factor: float) -> list[float]:
    """Multiply every optimiser's learning rate by ``factor``; returns the new rates."""
    rates = []
    for optimizer in stage.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            rates.append(group["lr"])
    return rates


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (all ranks must take the same branch)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _format_row(stage: str, row: dict, steps: int, start: int, elapsed: float) -> str:
    """``[fm] [#####.....] 1000/2000 50% 2m10s<2m10s fm_loss=...``: a text progress bar
    per report (it reads the same in a terminal, a log file and the Prefect UI)."""
    done = row["step"]
    share = done / steps
    filled = int(20 * share)
    remaining = elapsed / max(done - start, 1) * (steps - done)
    parts = [f"[{stage}] [{'#' * filled}{'.' * (20 - filled)}] {done}/{steps} {100 * share:.0f}% "
             f"{_duration(elapsed)}<{_duration(remaining)}"]
    parts += [f"{k}={v:.4g}" for k, v in row.items() if k != "step"]
    return " ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _training_curve(spec: dict, device: torch.device):
    """Rank 0's diagnostic curve (``cafm_core.evaluation.TrainingCurve``) on the prepared data."""
    from cafm_core.evaluation import SamplerSetting, TrainingCurve
    from tasks.prepare import load_for_evaluation
    from tasks.storage import Store

    dataset, _, feature_net = load_for_evaluation(Store(spec["store_root"]), spec["data_url"])
    return TrainingCurve(dataset, SamplerSetting(spec["method"], spec["nfe"], 1.0), feature_net=feature_net,
                         num_samples=spec["num_samples"], seed=spec["seed"], device=device)


def _build_stage(stage_name: str, config, accelerator, restored, loop: dict) -> _Stage:
    """Networks for a fresh start (from the init checkpoint or new) or shaped for a restore."""
    if restored is not None:
        _, saved_config, _ = restored  # weights are loaded by _Stage.load_state after prepare
        generator = build_generator(config_from_dict(dict(saved_config["model"])))
    else:
        init = ray.get(loop["init_ref"]) if loop["init_ref"] is not None else None
        # CAFM starts from the FM generator's EMA weights; FM from an init checkpoint's raw weights
        generator = _modules_from_init(init, loop["model_config"], use_ema=(stage_name == "cafm"))
    if stage_name == "fm":
        stage = _FMStage(config, accelerator)
        stage.build(generator)
        return stage
    if restored is not None:
        discriminator = build_discriminator(generator.config)
    else:
        discriminator = discriminator_from_generator(generator)  # backbone copied, new token + head
    stage = _CAFMStage(config, accelerator)
    stage.build(generator, discriminator)
    return stage


def _train_worker(loop: dict) -> dict:
    """The per-worker loop shared by FM and CAFM (runs inside Ray Train workers)."""
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    accelerator = Accelerator(cpu=not loop["use_gpu"], mixed_precision=loop["mixed_precision"])
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"Accelerate sees {accelerator.num_processes} processes but Ray Train runs {world_size} workers"
        )
    loop = {**loop, "world_size": world_size}
    if not loop["use_gpu"]:
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker was given instead
        torch.set_num_threads(loop["threads"])
    stage_name = loop["stage"]
    config = train_config(stage_name, loop["train_config"])
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    checkpoint = ray.train.get_checkpoint()  # set after a worker failure or for an existing run dir
    restored = _verified_state(checkpoint, stage_name) if checkpoint is not None else None
    # Ray registers a reported checkpoint only when its controller next polls the workers; a
    # worker killed in between loses the registration, not the files. Take the newest
    # checkpoint on storage that verifies (marker + checksums) when it is newer.
    newest = _newest_complete_checkpoint(loop["storage_path"], loop["run_name"], config.steps)
    if newest is not None and (restored is None or int(newest[2]["step"]) > int(restored[2]["step"])):
        restored = newest
    stage = _build_stage(stage_name, config, accelerator, restored, loop)
    if world_size > 1 and not isinstance(stage.generator_ddp, DistributedDataParallel):
        raise RuntimeError(f"Accelerate did not wrap the generator in DDP (got {type(stage.generator_ddp).__name__})")

    start, history, rollbacks = 0, [], []
    if restored is not None:
        tensors, saved_config, metadata = restored
        stage.load_state(unflatten_state_dicts(tensors), metadata)
        start, history = int(metadata["step"]), list(metadata["history"])
        history = [row for row in history if row["step"] <= start]
        rollbacks = list(metadata.get("rollbacks", []))
    if rank == 0:
        where = f"restored from step {start}" if restored is not None else "starting from step 0"
        logger.info(
            "[%s] %s; accelerate: %s, %d processes, device %s, mixed precision %s",
            stage_name, where, accelerator.distributed_type, accelerator.num_processes,
            accelerator.device, accelerator.mixed_precision,
        )

    curve = _training_curve(loop["curve"], accelerator.device) if rank == 0 and loop.get("curve") else None
    if curve is not None and restored is None:
        history.append({"step": start, **curve(stage.generator, stage.ema)})  # where post-training starts
    steps, every, log_every = config.steps, loop["checkpoint_every"], config.log_every
    guard = DivergenceGuard(**loop["divergence"])
    # the last good state (the start, then each checkpoint), kept in memory on every rank:
    # a divergence rolls back to it without reading storage
    good_step, good_state, rollbacks_since_good = start, _copy_state(*stage.state()), 0
    rng = torch.Generator(device=accelerator.device).manual_seed(_seed_for(config.seed, rank, start))
    batches = _batches(config.batch_size, _ShardCollate(loop["sample_shape"], loop["num_classes"]), accelerator.device)
    metrics: dict[str, float] = {}
    last_time, last_step = time.perf_counter(), start
    began = time.perf_counter()
    index = start
    while index < steps:
        metrics = stage.step(index, next(batches), rng)
        reason = guard.reason(metrics)
        if _any_rank(reason is not None, accelerator.device):
            reason = reason or "another worker's step diverged"
            if len(rollbacks) >= guard.max_rollbacks:
                message = (
                    f"{stage_name} training diverged at step {index + 1} ({reason}) after {len(rollbacks)} "
                    f"rollback(s) (max_rollbacks={guard.max_rollbacks}); stopped. The last good checkpoint is "
                    f"step {good_step}; no checkpoint after it was written. Lower the learning rate, or allow "
                    "more rollbacks"
                )
                if rank == 0:
                    logger.error("[%s] %s", stage_name, message)
                return {"history": history, "start_step": start, "checksums": [], "rollbacks": rollbacks,
                        "diverged": message}
            rollbacks_since_good += 1
            stage.load_state(*_copy_state(*good_state))
            stage.forget_metrics()  # a diverged G step's loss must not trip the next D step's check
            rates = _scale_learning_rates(stage, guard.lr_factor ** rollbacks_since_good)
            rollbacks.append({"at_step": index + 1, "to_step": good_step, "reason": reason, "learning_rates": rates})
            history = [row for row in history if row["step"] <= good_step]
            index = good_step
            # fresh noise for the retried steps (the data iterator simply goes on)
            rng.manual_seed(_seed_for(config.seed, rank, 1_000_003 * len(rollbacks) + index))
            last_time, last_step = time.perf_counter(), index
            if rank == 0:
                logger.warning(
                    "[%s] diverged at step %d (%s): rolled back to step %d, learning rates now %s (rollback %d of %d)",
                    stage_name, rollbacks[-1]["at_step"], reason, good_step, rates, len(rollbacks), guard.max_rollbacks,
                )
            continue
        done = index + 1
        index = done
        is_checkpoint = done % every == 0 or done == steps
        if not (is_checkpoint or done % log_every == 0):
            continue
        now = time.perf_counter()
        row = _all_reduce_mean(metrics, accelerator.device)
        row["samples_per_s"] = (done - last_step) * config.batch_size * world_size / max(now - last_time, 1e-9)
        row = {"step": done, **row}
        if curve is not None:
            row.update(curve(stage.generator, stage.ema))
        last_time, last_step = time.perf_counter(), done  # the next samples/s leaves the curve's time out
        history.append(row)
        if rank == 0:
            logger.info(_format_row(stage_name, row, steps, start, now - began))
        # every rank reports (report is a barrier); rank 0 alone attaches the checkpoint
        if is_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory(prefix="cafm_ckpt_") as tmp:
                _write_train_state(tmp, stage, done, loop, history, rollbacks)
                ray.train.report(
                    row, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{done:08d}"
                )
        else:
            ray.train.report(row, checkpoint=None)
        if is_checkpoint:
            good_step, good_state, rollbacks_since_good = done, _copy_state(*stage.state()), 0

    checksums: list[str] = [stage.checksum()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, checksums[0])
        checksums = [str(c) for c in gathered]
    return {"history": history, "start_step": start, "checksums": checksums, "rollbacks": rollbacks}


# ---- driver -------------------------------------------------------------------------------


def _divergence_guard(values: Mapping | None) -> DivergenceGuard:
    """A ``DivergenceGuard`` from plain fields (None: the defaults), unknown fields refused by name."""
    if values is None:
        return DivergenceGuard()
    if not isinstance(values, Mapping):
        raise ValueError(f"divergence must be a dict of DivergenceGuard fields, got {type(values).__name__}")
    known = {f.name for f in fields(DivergenceGuard)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown divergence fields {unknown}; expected a subset of {sorted(known)}")
    return DivergenceGuard(**values)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


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
    _check_int("num_classes", num_classes, 0)
    _check_int("num_workers", num_workers, 1)
    _check_int("checkpoint_every", checkpoint_every, 1)
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


def _read_checkpoint_files(directory: str) -> dict[str, bytes]:
    """All files of a local cafm_core checkpoint dir, verified (to ship to workers as bytes)."""
    path = Path(directory)
    try:
        load_checkpoint(path)  # verifies marker and checksums; clear error if incomplete
    except ValueError as exc:
        raise ValueError(f"init_checkpoint {directory!r} is not a loadable checkpoint: {exc}") from exc
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}


def _latest_run_checkpoint(storage_path: str, run_name: str) -> tuple[bool, Any]:
    """``(run_dir_exists, latest ray Checkpoint or None)`` for an earlier run with this name."""
    from ray.train import Result

    fs, run_dir = _run_dir(storage_path, run_name)
    fs = fs or pafs.LocalFileSystem()
    if fs.get_file_info(run_dir).type == pafs.FileType.NotFound:
        return False, None
    try:
        result = Result.from_path(run_dir, storage_filesystem=fs)
    except RuntimeError:
        return True, None  # a directory without a Ray Train snapshot
    return True, result.checkpoint


def _newest_complete_checkpoint(storage_path: str, run_name: str, max_step: int) -> tuple[dict, dict, dict] | None:
    """``(tensors, config, metadata)`` of the newest ``checkpoint_*`` folder of this run on
    storage that verifies and is at most ``max_step``, or None. Folders that fail to verify
    (being written, cut off) are skipped: their marker is missing or a checksum differs."""
    fs, run_dir = _run_dir(storage_path, run_name)
    fs = fs or pafs.LocalFileSystem()
    try:
        entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return None
    folders = sorted(
        (e.path for e in entries if e.type == pafs.FileType.Directory and posixpath.basename(e.path).startswith("checkpoint_")),
        reverse=True,  # checkpoint_{step:08d}: newest first
    )
    for folder in folders:
        try:
            files = {}
            for entry in fs.get_file_info(pafs.FileSelector(folder)):
                if entry.type == pafs.FileType.File:
                    with fs.open_input_stream(entry.path) as stream:
                        files[posixpath.basename(entry.path)] = stream.read()
            state = checkpoint_from_bytes(files)
        except (OSError, ValueError):  # ValueError includes CAFMInputError: incomplete or corrupted
            continue
        if state[1].get("format") == TRAIN_STATE_FORMAT and int(state[2]["step"]) <= max_step:
            return state
    return None


def _run_dir(storage_path: str, run_name: str) -> tuple[pafs.FileSystem | None, str]:
    """A Ray Train run's directory on storage: ``(filesystem or None for local, path)``."""
    fs, base = _storage_filesystem(storage_path)
    return fs, posixpath.join(base if fs is not None else os.path.abspath(base), run_name)


def _storage_checkpoint(storage_path: str, run_name: str, step: int) -> ray.train.Checkpoint:
    """The ``checkpoint_<step>`` folder of a run on storage, as a Ray checkpoint."""
    fs, run_dir = _run_dir(storage_path, run_name)
    return ray.train.Checkpoint(path=posixpath.join(run_dir, f"checkpoint_{step:08d}"), filesystem=fs)


def _checkpoint_state(checkpoint) -> tuple[dict[str, Tensor], dict, dict]:
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory)


def _verified_state(checkpoint, stage: str) -> tuple[dict[str, Tensor], dict, dict] | None:
    """The state of Ray's registered checkpoint, or None when it does not verify. Ray uploads
    a checkpoint's files concurrently and reports success even when one upload failed (seen
    with S3 unreachable mid-upload), so its registered checkpoint can be incomplete: never
    load it unverified; callers take the newest checkpoint on storage that verifies instead."""
    try:
        return _checkpoint_state(checkpoint)
    except (OSError, ValueError) as exc:  # ValueError includes CAFMInputError: missing file, bad checksum
        logger.warning("[%s] Ray's registered checkpoint %s does not verify (%s): using the newest checkpoint "
                       "on storage that does", stage, checkpoint.path, exc)
        return None


def _checkpoint_url(checkpoint, storage_path: str) -> str:
    return f"s3://{checkpoint.path}" if str(storage_path).startswith("s3://") else checkpoint.path


def _outputs(
    *, stage: str, checkpoint, storage_path: str, run_name: str, output_dir: str, start_step: int,
    seconds: float, returned: dict | None,
) -> dict:
    """Write the final generator (and discriminator) from a Ray checkpoint; build the result dict."""
    tensors, saved, saved_meta = _checkpoint_state(checkpoint)
    steps_done = int(saved_meta["step"])
    states = unflatten_state_dicts(tensors)
    model_config = config_from_dict(dict(saved["model"]))
    generator = build_generator(model_config)
    load_state_dict_checked(generator, states["ema"])  # the EMA weights are the model
    out = Path(output_dir)
    meta = {"stage": stage, "steps": steps_done, "run_name": run_name, "train_config": saved["train"]}
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
        "ray_checkpoint": _checkpoint_url(checkpoint, storage_path),
        "resumed_from_step": start_step,
        # where the last worker group started: after a worker failure, the checkpoint it restored
        "restored_from_step": int(returned.get("start_step", start_step)),
        "worker_checksums": list(returned.get("checksums") or []),
        # divergences survived: {at_step, to_step, reason, learning_rates} each
        "rollbacks": list(returned.get("rollbacks") or saved_meta.get("rollbacks") or []),
    }
    if stage == "cafm":
        discriminator = build_discriminator(model_config)
        load_state_dict_checked(discriminator, states["discriminator"])
        output["discriminator_dir"] = str(save_model(out / "discriminator", discriminator, metadata=meta))
    return output


def _previous_run(
    storage_path: str, run_name: str, *, resume: bool, stage: str, model_config: dict, steps: int
) -> tuple[Any, int, int]:
    """An earlier run with this name: ``(Ray's latest checkpoint or None, its step, the step
    training resumes from)``. The last is the newest verified checkpoint on storage when Ray
    did not register it (the process was killed first); the workers restore the same one."""
    exists, previous = _latest_run_checkpoint(storage_path, run_name)
    if exists and not resume:
        raise ValueError(
            f"run directory {run_name!r} already exists under {storage_path!r}; pass resume=True to continue it "
            "or choose another run_name"
        )
    saved_states = []
    state = _verified_state(previous, stage) if previous is not None else None
    if state is None:
        previous = None  # none, or it does not verify: the newest verified one on storage decides
    else:
        saved_states.append(state[1:])
    newest = _newest_complete_checkpoint(storage_path, run_name, steps) if exists else None
    if newest is not None:
        saved_states.append(newest[1:])
    for saved, saved_meta in saved_states:
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
    mixed_precision: str,
    checkpoint_every: int,
    storage_path: str,
    run_name: str,
    resume: bool,
    curve: dict | None = None,
    divergence: dict | None = None,
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
    config = train_config(stage, config_values)
    guard = _divergence_guard(divergence)
    _check_int(f"{'fm' if stage == 'fm' else 'cafm'}_config.log_every", config.log_every, 1)
    init_files = None
    if init_checkpoint is not None:
        init_files = _read_checkpoint_files(str(init_checkpoint))
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
    total_rows = _inspect_shards(urls, shape, num_classes)
    per_worker = total_rows // num_workers
    if config.batch_size > per_worker:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the {per_worker} rows each of the {num_workers} "
            f"workers gets ({total_rows} rows in {len(urls)} shards)"
        )
    previous, previous_step, start_step = _previous_run(
        storage_path, run_name, resume=resume, stage=stage, model_config=model_config, steps=config.steps
    )
    if start_step == config.steps and previous_step < start_step:
        # the final checkpoint is on storage and verifies, but Ray never registered it (the
        # process died in between): it is the result; Ray's registered one is older
        previous, previous_step = _storage_checkpoint(storage_path, run_name, start_step), start_step
    if previous is not None and previous_step == config.steps:
        # already done (e.g. an orchestrator retry): rebuild the outputs, train nothing
        logger.info("run %r is already at step %d; returning its last checkpoint", run_name, start_step)
        return _outputs(
            stage=stage, checkpoint=previous, storage_path=storage_path, run_name=run_name,
            output_dir=output_dir, start_step=start_step, seconds=0.0, returned=None,
        )

    # -- Ray --
    start_cluster(num_workers, cpus, bool(use_gpu))
    dataset = _read_shards(urls, ["x", "label"] if num_classes > 0 else ["x"])
    storage_fs, storage_base = _storage_filesystem(storage_path)
    loop = {
        "stage": stage,
        "train_config": _json_config(config),
        "model_config": dict(model_config),
        "sample_shape": shape,
        "num_classes": num_classes,
        "checkpoint_every": checkpoint_every,
        "mixed_precision": mixed_precision,
        "use_gpu": bool(use_gpu),
        "threads": cpus,
        "curve": curve,
        "divergence": guard.to_dict(),
        "storage_path": storage_path,
        "run_name": run_name,
        # the init checkpoint travels as verified bytes through the object store, so
        # workers on other nodes need no access to the driver's disk
        "init_ref": ray.put(init_files) if init_files is not None else None,
    }
    make_trainer = lambda: TorchTrainer(  # noqa: E731 - a fresh trainer per attempt (see _fit)
        _train_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=bool(use_gpu), resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_base if storage_fs is not None else os.path.abspath(storage_base),
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
        ),
        datasets={"train": dataset},
    )
    started = time.perf_counter()
    result = _fit(make_trainer, run_name)
    seconds = time.perf_counter() - started
    diverged = (result.return_value or {}).get("diverged")
    if diverged:
        where = _checkpoint_url(result.checkpoint, storage_path) if result.checkpoint is not None else "none (no step passed)"
        raise TrainingDiverged(f"Ray Train run {run_name!r}: {diverged}. Last good checkpoint: {where}")
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name!r} finished without a checkpoint")
    return _outputs(
        stage=stage, checkpoint=result.checkpoint, storage_path=storage_path, run_name=run_name,
        output_dir=output_dir, start_step=start_step, seconds=seconds, returned=result.return_value,
    )


STORAGE_RETRIES = 3
STORAGE_BACKOFF_S = 2.0
_STORAGE_ERROR_MARKS = ("AWS Error", "NETWORK_CONNECTION", "Could not connect", "Connection reset", "curlCode")


def _fit(make_trainer, run_name: str):
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
    mixed_precision: str = "no",
    checkpoint_every: int,
    storage_path: str,
    run_name: str,
    resume: bool = True,
    init_checkpoint: str | None = None,
    divergence: dict | None = None,
) -> dict:
    """FM pretraining on Ray Train; returns model_dir, history, final_metrics, steps, seconds, ray_checkpoint.

    ``init_checkpoint`` (optional, a local ``save_model`` dir) starts from its raw ``model``
    weights; ``model_config`` may then be None (taken from the checkpoint) or must equal it.
    ``cpus_per_worker`` (default: see :func:`worker_cpus`) is each worker's CPU resource and
    torch thread count. Also returned: ``resumed_from_step`` (0 for a fresh run; ``history`` holds only rows after
    it), ``worker_checksums`` (one sha256 of weights + EMA per worker; equal = in sync) and
    ``rollbacks`` (divergences survived). ``divergence`` holds ``cafm_core.training.DivergenceGuard``
    fields: a step with a NaN/inf metric or a loss/logit above ``max_abs`` rolls every worker
    back to the last checkpoint with learning rates times ``lr_factor``; after
    ``max_rollbacks`` it raises :class:`TrainingDiverged` (no checkpoint of the diverged state
    is ever written).
    """
    return _run(
        stage="fm", shard_urls=shard_urls, sample_shape=sample_shape, num_classes=num_classes,
        model_config=model_config, config_values=fm_config, init_checkpoint=init_checkpoint,
        output_dir=output_dir, num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every, storage_path=storage_path, run_name=run_name, resume=resume,
        divergence=divergence,
    )


def run_cafm(
    *,
    shard_urls: list[str],
    sample_shape: tuple[int, ...],
    num_classes: int,
    init_checkpoint: str,
    cafm_config: dict,
    output_dir: str,
    num_workers: int = 2,
    cpus_per_worker: int | None = None,
    use_gpu: bool = False,
    mixed_precision: str = "no",
    checkpoint_every: int,
    storage_path: str,
    run_name: str,
    resume: bool = True,
    curve: dict | None = None,
    divergence: dict | None = None,
) -> dict:
    """CAFM post-training on Ray Train from an FM generator checkpoint (its EMA weights).

    The discriminator is ``discriminator_from_generator`` of that generator. Returns the
    same keys as :func:`run_flow_matching` plus ``discriminator_dir``. ``curve`` (optional:
    ``store_root``, ``data_url`` of a prepared dataset, ``method``, ``nfe``,
    ``num_samples``, ``seed``) adds a diagnostic curve to every report: the metric of the
    generator and of its EMA on a fixed small sample (``fd_model``/``fd_ema``, or
    ``sliced_wasserstein_*`` for points), computed on rank 0; the history's first row is
    the starting point.
    """
    if init_checkpoint is None:
        raise ValueError("run_cafm needs init_checkpoint: a local directory holding the FM generator")
    return _run(
        stage="cafm", shard_urls=shard_urls, sample_shape=sample_shape, num_classes=num_classes,
        model_config=None, config_values=cafm_config, init_checkpoint=init_checkpoint,
        output_dir=output_dir, num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every, storage_path=storage_path, run_name=run_name, resume=resume,
        curve=curve, divergence=divergence,
    )
