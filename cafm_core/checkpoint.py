"""Checkpoints as safetensors weights + JSON config, with a checksum marker written last.

A checkpoint is a directory holding ``model.safetensors`` (tensors), ``config.json``
(``{"config": ..., "metadata": ...}``) and ``checkpoint.json`` (sha256 and size of the other
two). The marker is written last, each file via a temp name and ``os.replace``, so a crash
never leaves something that looks complete. Loading verifies the checksums and never
unpickles anything (safetensors only; no ``torch.load``). The byte-level functions let
remote storage (fsspec/S3) reuse the same format without touching the local disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor, nn

from cafm_core.checks import CAFMInputError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MARKER_FILE = "checkpoint.json"
FORMAT_NAME = "cafm_checkpoint"
FORMAT_VERSION = 1
_MAX_LISTED = 5

__all__ = [
    "CONFIG_FILE",
    "MARKER_FILE",
    "WEIGHTS_FILE",
    "checkpoint_from_bytes",
    "checkpoint_to_bytes",
    "flatten_state_dicts",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "load_state_dict_checked",
    "save_checkpoint",
    "save_model",
    "unflatten_state_dicts",
]


# ---- named state dicts ------------------------------------------------------------------


def flatten_state_dicts(state_dicts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Merge named state dicts into one flat dict with ``"name/"`` key prefixes.

    ``{"generator": {"w": a}, "ema": {"w": b}}`` -> ``{"generator/w": a, "ema/w": b}``.
    """
    if not isinstance(state_dicts, Mapping):
        raise CAFMInputError(f"state_dicts must be a dict of name -> state dict, got {type(state_dicts).__name__}")
    flat: dict[str, Tensor] = {}
    for name, sd in state_dicts.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise CAFMInputError(f"state dict name must be a non-empty string without '/', got {name!r}")
        if not isinstance(sd, Mapping):
            raise CAFMInputError(f"state_dicts[{name!r}] must be a dict of tensors, got {type(sd).__name__}")
        for key, value in sd.items():
            flat[f"{name}/{key}"] = value
    return flat


def unflatten_state_dicts(flat: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Inverse of :func:`flatten_state_dicts`: split keys on the first ``"/"``."""
    if not isinstance(flat, Mapping):
        raise CAFMInputError(f"flat must be a dict of tensors, got {type(flat).__name__}")
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or "/" not in key or key.startswith("/"):
            raise CAFMInputError(f"key {key!r} has no 'name/' prefix; expected keys made by flatten_state_dicts")
        name, rest = key.split("/", 1)
        out.setdefault(name, {})[rest] = value
    return out


# ---- byte-level format ------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_native(value: Any) -> Any:
    """``value`` with tuples as lists: what a JSON round trip is expected to return."""
    if isinstance(value, (list, tuple)):
        return [_json_native(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_native(v) for k, v in value.items()}
    return value


def _check_json_dict(name: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise CAFMInputError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CAFMInputError(f"{name} must be JSON-serialisable (str keys, finite numbers): {exc}") from exc
    if json.loads(text) != _json_native(value):
        raise CAFMInputError(
            f"{name} does not survive a JSON round trip (non-string dict keys?); use str keys and JSON types"
        )
    return value


def _prepare_tensors(tensors: object) -> dict[str, Tensor]:
    """Validate and copy tensors to contiguous CPU storage (no shared memory, all finite)."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise CAFMInputError(f"tensors must be a non-empty dict of name -> tensor, got {tensors!r:.80}")
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise CAFMInputError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise CAFMInputError(f"tensors[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CAFMInputError(
                f"tensor {name!r} has {bad} NaN/inf values; refusing to write a non-finite checkpoint"
            )
        # clone: safetensors refuses tensors that share storage (tied weights, views).
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def checkpoint_to_bytes(
    tensors: Mapping[str, Tensor], config: dict, metadata: dict | None = None
) -> dict[str, bytes]:
    """Serialise a checkpoint to ``{filename: bytes}``, including the ``checkpoint.json`` marker.

    Tensors are made contiguous and moved to CPU; non-finite values are refused.
    ``config``/``metadata`` must be JSON-native (tuples come back as lists).
    """
    metadata = {} if metadata is None else metadata
    _check_json_dict("config", config)
    _check_json_dict("metadata", metadata)
    prepared = _prepare_tensors(tensors)
    weights = _st_save(prepared)
    config_bytes = json.dumps(
        {"config": config, "metadata": metadata}, allow_nan=False, sort_keys=True, indent=2
    ).encode("utf-8")
    files = {WEIGHTS_FILE: weights, CONFIG_FILE: config_bytes}
    marker = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "files": {name: {"sha256": _sha256(data), "size": len(data)} for name, data in files.items()},
    }
    files[MARKER_FILE] = json.dumps(marker, sort_keys=True, indent=2).encode("utf-8")
    return files


def _parse_marker(data: bytes) -> dict[str, dict]:
    try:
        marker = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CAFMInputError(f"{MARKER_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME or not isinstance(marker.get("files"), dict):
        raise CAFMInputError(f"{MARKER_FILE} is not a {FORMAT_NAME} marker (missing 'format'/'files')")
    if marker.get("version") != FORMAT_VERSION:
        raise CAFMInputError(f"{MARKER_FILE} has format version {marker.get('version')!r}; expected {FORMAT_VERSION}")
    entries = marker["files"]
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in entries:
            raise CAFMInputError(f"{MARKER_FILE} does not list {required}; expected checksums for it")
    for name, entry in entries.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CAFMInputError(f"{MARKER_FILE} lists an invalid file name {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CAFMInputError(f"{MARKER_FILE} entry for {name} has no sha256")
    return entries


def checkpoint_from_bytes(files: Mapping[str, bytes]) -> tuple[dict[str, Tensor], dict, dict]:
    """Parse ``{filename: bytes}`` into ``(tensors, config, metadata)`` after verifying checksums.

    Weights are read with safetensors only: a pickle or any other file is rejected, never executed.
    """
    if not isinstance(files, Mapping):
        raise CAFMInputError(f"files must be a dict of filename -> bytes, got {type(files).__name__}")
    if MARKER_FILE not in files:
        raise CAFMInputError(f"incomplete checkpoint, marker missing: no {MARKER_FILE} among {sorted(files)}")
    entries = _parse_marker(files[MARKER_FILE])
    for name, entry in entries.items():
        if name not in files:
            raise CAFMInputError(f"checkpoint file {name} is listed in {MARKER_FILE} but missing")
        data = files[name]
        if "size" in entry and len(data) != entry["size"]:
            raise CAFMInputError(
                f"checksum mismatch for {name}: size {len(data)} bytes, expected {entry['size']} (truncated or corrupted)"
            )
        if _sha256(data) != entry["sha256"]:
            raise CAFMInputError(f"checksum mismatch for {name}: sha256 differs from {MARKER_FILE} (corrupted)")
    try:
        parsed = json.loads(files[CONFIG_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CAFMInputError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("config"), dict):
        raise CAFMInputError(f"{CONFIG_FILE} must hold an object with a 'config' dict")
    metadata = parsed.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CAFMInputError(f"{CONFIG_FILE} 'metadata' must be a dict, got {type(metadata).__name__}")
    weights = files[WEIGHTS_FILE]
    try:
        tensors = _st_load(bytes(weights))
    except Exception as exc:  # safetensors raises its own error types; report them uniformly
        raise CAFMInputError(
            f"{WEIGHTS_FILE} is not a valid safetensors file ({type(exc).__name__}: {exc}); "
            "pickled checkpoints (torch.save) are not accepted"
        ) from exc
    return tensors, parsed["config"], metadata


# ---- directory I/O ----------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike, tensors: Mapping[str, Tensor], config: dict, metadata: dict | None = None
) -> Path:
    """Write a checkpoint directory; returns its path.

    Everything is validated and serialised before the first byte is written. An existing
    marker is removed first and the new one written last, so an interrupted save (or
    overwrite) is always seen as incomplete. Store several state dicts with
    :func:`flatten_state_dicts`.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise CAFMInputError(f"directory must be a path, got {type(directory).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise CAFMInputError(f"checkpoint path {path} exists and is not a directory")
    files = checkpoint_to_bytes(tensors, config, metadata)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER_FILE
    if marker.exists():
        marker.unlink()
        _fsync_dir(path)
    for name, data in files.items():
        if name != MARKER_FILE:
            _write_atomic(path / name, data)
    _fsync_dir(path)
    _write_atomic(marker, files[MARKER_FILE])
    _fsync_dir(path)
    return path


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Tensor], dict, dict]:
    """Read and verify a checkpoint directory; returns ``(tensors, config, metadata)`` on CPU."""
    if not isinstance(directory, (str, os.PathLike)):
        raise CAFMInputError(f"directory must be a path, got {type(directory).__name__}")
    path = Path(directory)
    if not path.is_dir():
        raise CAFMInputError(f"checkpoint directory {path} does not exist or is not a directory")
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise CAFMInputError(f"incomplete checkpoint, marker missing: {marker} not found")
    marker_bytes = marker.read_bytes()
    files = {MARKER_FILE: marker_bytes}
    for name in _parse_marker(marker_bytes):
        file = path / name
        if not file.is_file():
            raise CAFMInputError(f"checkpoint file {file} is listed in {MARKER_FILE} but missing")
        files[name] = file.read_bytes()
    return checkpoint_from_bytes(files)


# ---- checked loading into a module ------------------------------------------------------


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _as_prefixes(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise CAFMInputError(f"{name} must be an iterable of key prefixes, got {value!r}") from None
    if not all(isinstance(p, str) and p for p in items):
        raise CAFMInputError(f"{name} must contain non-empty string prefixes, got {items!r}")
    return items


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module`` after checking names and shapes; raise before touching it.

    Any mismatch raises CAFMInputError listing missing keys, unexpected keys and shape
    mismatches (first few of each). ``strict=False`` only enables the two prefix lists:
    missing keys starting with a prefix in ``allow_missing`` keep the module's values, and
    unexpected keys starting with a prefix in ``ignore_unexpected`` are dropped (e.g. to
    initialise a discriminator from a generator: new head/token missing, generator's final
    layer unexpected). Other mismatches still fail. Values are cast to the module's dtypes.
    A DDP-wrapped module should be unwrapped by the caller (pass ``ddp.module``).
    """
    if not isinstance(module, nn.Module):
        raise CAFMInputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(state_dict, Mapping):
        raise CAFMInputError(f"state_dict must be a dict of name -> tensor, got {type(state_dict).__name__}")
    allow = _as_prefixes("allow_missing", allow_missing)
    ignore = _as_prefixes("ignore_unexpected", ignore_unexpected)
    if strict and (allow or ignore):
        raise CAFMInputError("allow_missing/ignore_unexpected require strict=False")
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CAFMInputError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")

    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not _matches(k, allow)]
    unexpected = [k for k in state_dict if k not in expected and not _matches(k, ignore)]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)} got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"state dict does not fit {type(module).__name__}"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        if unexpected and all(k.startswith("module.") for k in state_dict):
            parts.append("hint: keys start with 'module.' (a DDP-wrapped state dict); strip that prefix")
        raise CAFMInputError("; ".join(parts))

    converted = {k: state_dict[k].to(dtype=expected[k].dtype) for k in expected if k in state_dict}
    result = module.load_state_dict(converted, strict=False)
    left = [k for k in result.missing_keys if not _matches(k, allow)]
    if left or result.unexpected_keys:  # should not happen after the checks above
        raise CAFMInputError(f"loading left keys unset: {left[:_MAX_LISTED]}, unexpected: {result.unexpected_keys[:_MAX_LISTED]}")


def model_to_tensors(
    model: nn.Module,
    *,
    ema_shadow: Mapping[str, Tensor] | None = None,
    metadata: dict | None = None,
) -> tuple[dict[str, Tensor], dict, dict]:
    """``(tensors, config, metadata)`` of a generator or discriminator (``model.config`` must
    exist) and optionally its EMA: what :func:`save_model` writes, for other storage."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise CAFMInputError(f"{type(model).__name__} has no .config with to_dict(); cannot save it rebuildably")
    state = {"model": model.state_dict()}
    if ema_shadow is not None:
        state["ema"] = dict(ema_shadow)
    meta = {"class": type(model).__name__, **(metadata or {})}
    return flatten_state_dicts(state), config.to_dict(), meta


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    ema_shadow: Mapping[str, Tensor] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save a generator or discriminator (``model.config`` must exist) and optionally its EMA."""
    return save_checkpoint(directory, *model_to_tensors(model, ema_shadow=ema_shadow, metadata=metadata))


def model_from_checkpoint(
    tensors: Mapping[str, Tensor], config: dict, metadata: dict, *, use_ema: bool = True
) -> nn.Module:
    """Rebuild the saved generator/discriminator; its EMA weights if present and ``use_ema``."""
    from cafm_core.models import build_discriminator, build_generator, config_from_dict

    model_config = config_from_dict(dict(config))
    builder = build_discriminator if metadata.get("class", "").endswith("Discriminator") else build_generator
    model = builder(model_config)
    states = unflatten_state_dicts(tensors)
    if "model" not in states:
        raise CAFMInputError(f"checkpoint holds {sorted(states)}; expected a 'model' state")
    chosen = states["ema"] if use_ema and "ema" in states else states["model"]
    load_state_dict_checked(model, chosen)
    return model


def load_model(directory: str | os.PathLike, *, use_ema: bool = True) -> nn.Module:
    """Load a model saved by :func:`save_model` from a local directory."""
    tensors, config, metadata = load_checkpoint(directory)
    return model_from_checkpoint(tensors, config, metadata, use_ema=use_ema)
