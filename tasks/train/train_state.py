"""A training state as one checkpoint on storage, and the checkpoints of a Ray Train run.

A training state is one ``cafm_core.checkpoint`` directory (safetensors + JSON + checksum
marker; no pickle anywhere): the generator, the discriminator (CAFM), the EMA shadow and
each optimiser's state (tensors flattened by :func:`optimizer_state_to_tensors`, the rest
as JSON metadata), plus the step, the seed, the metric history and the rollbacks.

Ray Train registers a reported checkpoint only when its controller next polls the workers,
and uploads a checkpoint's files concurrently, reporting success even when one upload
failed (docs/ray.md). So Ray's registered checkpoint can be older than the newest one on
storage, or incomplete: :class:`RunCheckpoints` never loads one unverified and finds the
newest checkpoint on storage that verifies (marker + checksums).
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Mapping
from typing import Any

import pyarrow.fs as pafs
import ray.train
from torch import Tensor

from cafm_core.checkpoint import checkpoint_from_bytes, flatten_state_dicts, load_checkpoint, save_checkpoint
from tasks.arrow_storage import run_directory

__all__ = [
    "TRAIN_STATE_FORMAT",
    "RunCheckpoints",
    "TrainState",
    "checkpoint_folder",
    "load_ray_checkpoint",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "save_train_state",
    "verified_state",
]

TRAIN_STATE_FORMAT = "cafm_train_state"

TrainState = tuple[dict[str, Tensor], dict, dict]
"""``(tensors, config, metadata)`` of a verified checkpoint, as ``cafm_core.checkpoint`` loads it."""

logger = logging.getLogger(__name__)


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


# ---- one training state -------------------------------------------------------------------


def save_train_state(
    directory: str, *, stage: str, states: dict[str, dict[str, Tensor]], metadata: dict, model_config: dict,
    train_config: dict, step: int, seed: int, world_size: int, history: list[dict], rollbacks: list[dict],
) -> None:
    """Write one training state (``states``/``metadata`` as the worker loop's stage gives
    them) as a verified checkpoint directory."""
    config = {"format": TRAIN_STATE_FORMAT, "stage": stage, "model": model_config, "train": train_config}
    metadata = {**metadata, "step": step, "seed": seed, "world_size": world_size, "history": history,
                "rollbacks": rollbacks}
    save_checkpoint(directory, flatten_state_dicts(states), config, metadata)


def checkpoint_folder(step: int) -> str:
    """The folder name of the checkpoint at ``step`` in a run directory (sorts by step)."""
    return f"checkpoint_{step:08d}"


# ---- the checkpoints of one Ray Train run -------------------------------------------------


class RunCheckpoints:
    """The checkpoints of the Ray Train run ``run_name`` under ``storage_path``: Ray's
    registered one and the folders on storage, read only after they verify."""

    def __init__(self, storage_path: str, run_name: str) -> None:
        self.storage_path, self.run_name = str(storage_path), str(run_name)
        self.fs, self.directory = run_directory(self.storage_path, self.run_name)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.directory).type != pafs.FileType.NotFound

    def registered(self) -> ray.train.Checkpoint | None:
        """Ray's latest registered checkpoint of the run (None: no run, or no Ray snapshot)."""
        from ray.train import Result

        if not self.exists():
            return None
        try:
            return Result.from_path(self.directory, storage_filesystem=self.fs).checkpoint
        except RuntimeError:
            return None  # a directory without a Ray Train snapshot

    def at_step(self, step: int) -> ray.train.Checkpoint:
        """The run's checkpoint folder of ``step`` as a Ray checkpoint."""
        return ray.train.Checkpoint(path=posixpath.join(self.directory, checkpoint_folder(step)), filesystem=self.fs)

    def newest_verified(self, max_step: int) -> TrainState | None:
        """The newest ``checkpoint_*`` folder on storage that verifies and is at most
        ``max_step``, or None. Folders that fail to verify (being written, cut off) are
        skipped: their marker is missing or a checksum differs."""
        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.directory, allow_not_found=True))
        except OSError:
            return None
        folders = sorted(
            (e.path for e in entries
             if e.type == pafs.FileType.Directory and posixpath.basename(e.path).startswith("checkpoint_")),
            reverse=True,  # checkpoint_{step:08d}: newest first
        )
        for folder in folders:
            try:
                files = {}
                for entry in self.fs.get_file_info(pafs.FileSelector(folder)):
                    if entry.type == pafs.FileType.File:
                        with self.fs.open_input_stream(entry.path) as stream:
                            files[posixpath.basename(entry.path)] = stream.read()
                state = checkpoint_from_bytes(files)
            except (OSError, ValueError):  # ValueError includes CAFMInputError: incomplete or corrupted
                continue
            if state[1].get("format") == TRAIN_STATE_FORMAT and int(state[2]["step"]) <= max_step:
                return state
        return None

    def url(self, checkpoint: ray.train.Checkpoint) -> str:
        """A checkpoint's location as a storage URL."""
        return f"s3://{checkpoint.path}" if self.storage_path.startswith("s3://") else checkpoint.path


def load_ray_checkpoint(checkpoint: ray.train.Checkpoint) -> TrainState:
    """A Ray checkpoint's training state, verified (``CAFMInputError`` if it does not verify)."""
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory)


def verified_state(checkpoint: ray.train.Checkpoint, stage: str) -> TrainState | None:
    """The state of Ray's registered checkpoint, or None when it does not verify: callers
    then take the newest checkpoint on storage that does."""
    try:
        return load_ray_checkpoint(checkpoint)
    except (OSError, ValueError) as exc:  # ValueError includes CAFMInputError: missing file, bad checksum
        logger.warning("[%s] Ray's registered checkpoint %s does not verify (%s): using the newest checkpoint "
                       "on storage that does", stage, checkpoint.path, exc)
        return None
