"""Dataset preparation stage: raw data -> Parquet shards + manifest + feature network + reference stats.

Plain functions (the Prefect task wrapper lives in ``flows``). Layout written under ``out_url``::

    shards/part-00000.parquet ...   columns x (float32 fixed-size list, the flattened sample),
                                     label (int64, null when unlabelled), index (int64)
    feature_net/                     cafm_core checkpoint of the in-domain classifier (labelled images)
    reference_stats.safetensors      mu / sigma of the real data's features (labelled images)
    manifest.json                    what was written, with sha256 of every shard and file
    _COMPLETE.json                   written last; without it the output does not exist

Every argument is checked before any compute or write. An existing complete output with
the same parameters is reused; with different parameters it is an error unless
``overwrite=True`` (its marker is then removed before anything is rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cafm_core.checks import CAFMInputError
from cafm_core.data import BUILTIN_DATASETS, SYNTHETIC_DATASETS, Dataset, load_builtin, read_image_folder
from cafm_core.features import DigitFeatureNet
from tasks.storage import (
    IncompleteOutputError,
    Store,
    StorageError,
    is_s3_url,
    join_url,
    s3_storage_options,
)

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
FEATURE_NET_DIR = "feature_net"
REFERENCE_STATS_FILE = "reference_stats.safetensors"
OUTPUT_ENTRIES = (MANIFEST_FILE, SHARDS_DIR, FEATURE_NET_DIR, REFERENCE_STATS_FILE)
MANIFEST_FORMAT = "cafm_prepared_dataset"
MANIFEST_VERSION = 1
MAX_RESOLUTION = 2048
_MAX_LISTED_FILES = 20

DIGITS_SHAPE = (1, 8, 8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- validation ---------------------------------------------------------------------------


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CAFMInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _is_folder_like(source: str) -> bool:
    return "://" in source or "/" in source or os.sep in source or source.startswith(".") or os.path.exists(source)


def _resolve_source(source: object, resolution: object, channels: object) -> str:
    """Check ``source`` and the resize settings; returns "builtin" or "folder"."""
    if not isinstance(source, str) or not source.strip():
        raise CAFMInputError(
            f"source must be a built-in dataset name {list(BUILTIN_DATASETS)} or an image-folder path/URL, got {source!r}"
        )
    if resolution is not None:
        _check_int("resolution", resolution, minimum=8)
        if resolution > MAX_RESOLUTION:
            raise CAFMInputError(f"resolution must be <= {MAX_RESOLUTION}, got {resolution}")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise CAFMInputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if source in BUILTIN_DATASETS:
        if source == "digits":
            if resolution not in (None, DIGITS_SHAPE[1]) or channels not in (None, DIGITS_SHAPE[0]):
                raise CAFMInputError(
                    f"built-in 'digits' is fixed at {DIGITS_SHAPE[0]}x{DIGITS_SHAPE[1]}x{DIGITS_SHAPE[2]} "
                    f"(channels x height x width) and is not resized; got resolution={resolution!r}, "
                    f"channels={channels!r} (leave them unset)"
                )
        elif resolution is not None or channels is not None:
            raise CAFMInputError(
                f"built-in {source!r} is a set of low-dimensional points; resolution/channels do not apply "
                f"(got resolution={resolution!r}, channels={channels!r})"
            )
        return "builtin"
    if not _is_folder_like(source):
        raise CAFMInputError(
            f"unknown dataset {source!r}: not a built-in dataset (expected one of {sorted(BUILTIN_DATASETS)}) "
            "and not an existing folder; give a path or s3:// URL of an image folder with class subfolders"
        )
    if resolution is None or channels is None:
        raise CAFMInputError(
            f"image folder {source!r} needs resolution (int >= 8) and channels (1 or 3); got "
            f"resolution={resolution!r}, channels={channels!r}"
        )
    _check_folder_exists(source)
    return "folder"


def _check_folder_exists(source: str) -> None:
    import fsspec

    options = s3_storage_options() if is_s3_url(source) else {}
    try:
        fs, path = fsspec.core.url_to_fs(source, **options)
        exists = fs.isdir(path)
    except (ImportError, ValueError, OSError) as error:
        raise CAFMInputError(f"cannot access image folder {source!r}: {type(error).__name__}: {error}") from error
    if not exists:
        raise CAFMInputError(f"image folder {source!r} does not exist or is not a folder")


def _comparable_path(url: str) -> str:
    if is_s3_url(url):
        return "s3://" + url[len("s3://") :].strip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(url)


def _check_not_nested(source: str, out_url: str) -> None:
    """Refuse an output inside the source folder (or the reverse): preparing must never touch the raw data."""
    src, out = _comparable_path(source), _comparable_path(out_url)
    if src == out or out.startswith(src.rstrip("/") + "/") or src.startswith(out.rstrip("/") + "/"):
        raise CAFMInputError(
            f"out_url {out_url!r} and the source folder {source!r} overlap; write the prepared data elsewhere"
        )


def _check_out_url(store: object, out_url: object) -> None:
    if not isinstance(store, Store):
        raise CAFMInputError(f"store must be a tasks.storage.Store, got {type(store).__name__}")
    if not isinstance(out_url, str) or not out_url.strip():
        raise CAFMInputError(f"out_url must be a non-empty URL, got {out_url!r}")
    try:
        store.fs_path(out_url)
    except StorageError as error:
        raise CAFMInputError(f"out_url {out_url!r} does not fit the store: {error}") from error


# ---- shards -------------------------------------------------------------------------------


def _shard_bytes(x: np.ndarray, labels: np.ndarray | None, index: np.ndarray, sample_shape: tuple[int, ...]) -> bytes:
    """One Parquet shard: ``x`` float32 ``[n, D]`` as a fixed-size list, ``label`` int64 (nullable), ``index``."""
    rows, width = x.shape
    values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), type=pa.float32())
    columns = {
        "x": pa.FixedSizeListArray.from_arrays(values, width),
        "label": pa.array(labels, type=pa.int64()) if labels is not None else pa.nulls(rows, type=pa.int64()),
        "index": pa.array(index, type=pa.int64()),
    }
    table = pa.table(columns).replace_schema_metadata(
        {"cafm.sample_shape": json.dumps(list(sample_shape)), "cafm.format": MANIFEST_FORMAT}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _read_shard(data: bytes, url: str, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    table = pq.read_table(pa.BufferReader(data))
    missing = {"x", "label", "index"} - set(table.column_names)
    if missing:
        raise CAFMInputError(f"shard {url} lacks columns {sorted(missing)}")
    width = math.prod(sample_shape)
    x_column = table.column("x").combine_chunks()
    if not pa.types.is_fixed_size_list(x_column.type) or x_column.type.list_size != width:
        raise CAFMInputError(f"shard {url}: column x has type {x_column.type}, expected fixed_size_list<float>[{width}]")
    x = x_column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    x = x.reshape(table.num_rows, *sample_shape)
    label_column = table.column("label")
    if label_column.null_count == table.num_rows:
        labels = None
    elif label_column.null_count:
        raise CAFMInputError(f"shard {url}: {label_column.null_count} of {table.num_rows} labels are null")
    else:
        labels = label_column.to_numpy().astype(np.int64, copy=False)
    index = table.column("index").to_numpy().astype(np.int64, copy=False)
    return x, labels, index


# ---- the stage ----------------------------------------------------------------------------


def _load_source(kind: str, source: str, *, resolution, channels, max_bad_fraction, seed, num_samples):
    if kind == "builtin":
        dataset = load_builtin(source, num_samples=num_samples, seed=seed)
        return dataset, None
    options = s3_storage_options() if is_s3_url(source) else None
    return read_image_folder(
        source, resolution=resolution, channels=channels, max_bad_fraction=max_bad_fraction, storage_options=options
    )


def _bad_file_report(report) -> dict | None:
    if report is None:
        return None
    full = report.to_dict()
    return {
        "num_images": full["num_images"],
        "num_bad": full["num_bad"],
        "bad_fraction": full["bad_fraction"],
        "bad_files": full["bad_files"][:_MAX_LISTED_FILES],
        "bad_reasons": full["bad_reasons"][:_MAX_LISTED_FILES],
        "num_skipped": len(full["skipped_files"]),
        "skipped_files": full["skipped_files"][:_MAX_LISTED_FILES],
        "class_counts": full["class_counts"],
    }


def _preprocessing_note(kind: str, source: str, dataset: Dataset) -> dict:
    if kind == "folder":
        channels, resolution, _ = dataset.sample_shape
        return {
            "resolution": resolution,
            "channels": channels,
            "value_range": [-1.0, 1.0],
            "policy": (
                f"converted to {'grayscale' if channels == 1 else 'RGB'}, center-cropped to a square, "
                f"resized to {resolution}x{resolution} (Lanczos), scaled to [-1, 1]"
            ),
        }
    if dataset.kind == "image":
        channels, resolution, _ = dataset.sample_shape
        return {
            "resolution": resolution,
            "channels": channels,
            "value_range": [-1.0, 1.0],
            "policy": f"built-in {source!r} as shipped ({channels}x{resolution}x{resolution}), not resized; scaled to [-1, 1]",
        }
    return {"policy": f"built-in {source!r}: synthetic points, stored as generated"}


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _feature_net_skip_reason(dataset: Dataset) -> str | None:
    if dataset.kind != "image":
        return "points data: evaluated with exact support tests, not a feature network"
    if dataset.labels is None or dataset.num_classes < 2:
        return f"the feature network is a classifier and needs >= 2 classes; the data has {dataset.num_classes}"
    return None


def prepare_dataset(
    source: str,
    store: Store,
    out_url: str,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    max_bad_fraction: float = 0.0,
    shard_size: int = 1024,
    feature_steps: int = 400,
    seed: int = 0,
    num_samples: int = 20000,
    overwrite: bool = False,
) -> dict:
    """Prepare ``source`` into ``out_url`` on ``store``; returns the manifest.

    ``source``: a name in ``cafm_core.data.BUILTIN_DATASETS`` or a local path / ``s3://`` URL of
    an image folder ``<class_name>/<images>`` (then ``resolution`` and ``channels`` are
    required). ``num_samples`` and ``seed`` pick the synthetic sets' points; ``seed`` also
    seeds the feature network. ``_COMPLETE.json`` is written last, and only on success.
    """
    # 1. Validate everything before compute or writes.
    _check_out_url(store, out_url)
    if isinstance(max_bad_fraction, bool) or not isinstance(max_bad_fraction, (int, float)) or not 0.0 <= max_bad_fraction < 1.0:
        raise CAFMInputError(f"max_bad_fraction must be a number in [0, 1), got {max_bad_fraction!r}")
    _check_int("shard_size", shard_size, minimum=1)
    _check_int("feature_steps", feature_steps, minimum=1)
    _check_int("seed", seed, minimum=0)
    _check_int("num_samples", num_samples, minimum=2)
    if not isinstance(overwrite, bool):
        raise CAFMInputError(f"overwrite must be a bool, got {overwrite!r}")
    kind = _resolve_source(source, resolution, channels)
    if kind == "folder":
        _check_not_nested(source, out_url)
    params = {
        "source": source,
        "resolution": resolution,
        "channels": channels,
        "max_bad_fraction": float(max_bad_fraction),
        "shard_size": shard_size,
        "feature_steps": feature_steps,
        "seed": seed,
        "num_samples": num_samples if source in SYNTHETIC_DATASETS else None,
    }

    # 2. An existing complete output: reuse it, or refuse to clobber it.
    previous = store.completed(out_url)
    if previous is not None:
        try:
            old_manifest = store.read_json(join_url(out_url, MANIFEST_FILE))
        except (FileNotFoundError, StorageError):
            old_manifest = None
        old_params = old_manifest.get("params") if isinstance(old_manifest, dict) else None
        if old_params == params and not overwrite:
            logger.info("reusing the complete prepared dataset at %s", out_url)
            return old_manifest
        if not overwrite:
            changed = sorted(k for k in params if not isinstance(old_params, dict) or old_params.get(k) != params[k])
            raise CAFMInputError(
                f"{out_url} already holds a complete prepared dataset made with different parameters "
                f"(differs in {changed}); pass overwrite=True or choose another out_url"
            )

    # 3. Compute: read the data (bad-file policy enforced here, before anything is written).
    dataset, report = _load_source(
        kind, source, resolution=resolution, channels=channels,
        max_bad_fraction=max_bad_fraction, seed=seed, num_samples=num_samples,
    )
    logger.info("loaded %s: %d samples of shape %s", source, len(dataset), dataset.sample_shape)

    # 4. Write. The old marker goes first so a failure from here on leaves nothing marked complete;
    # then only this stage's own entries are cleared (never anything else under out_url).
    store.clear_complete(out_url)
    for entry in OUTPUT_ENTRIES:
        store.remove(join_url(out_url, entry), recursive=True)

    sample_shape = tuple(int(s) for s in dataset.sample_shape)
    x = dataset.data.reshape(len(dataset), -1).numpy()
    labels = dataset.labels.numpy() if dataset.labels is not None else None
    shards = []
    for number, start in enumerate(range(0, len(dataset), shard_size)):
        stop = min(start + shard_size, len(dataset))
        data = _shard_bytes(
            x[start:stop], None if labels is None else labels[start:stop], np.arange(start, stop), sample_shape
        )
        relative = f"{SHARDS_DIR}/part-{number:05d}.parquet"
        store.write_bytes(join_url(out_url, relative), data)
        shards.append({"path": relative, "sha256": _sha256(data), "rows": stop - start, "bytes": len(data)})

    feature_entry, stats_entry = None, None
    skip_reason = _feature_net_skip_reason(dataset)
    if skip_reason is None:
        feature_entry, stats_entry = _write_feature_net_and_stats(store, out_url, dataset, feature_steps, seed)
    name = source if kind == "builtin" else posixpath.basename(source.rstrip("/")) or source
    class_counts = (
        np.bincount(labels, minlength=dataset.num_classes).tolist() if labels is not None else None
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "name": name,
        "source": source,
        "source_type": kind,
        "kind": dataset.kind,
        "count": len(dataset),
        "sample_shape": list(sample_shape),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "class_counts": class_counts,
        "preprocessing": _preprocessing_note(kind, source, dataset),
        "shards": shards,
        "shard_columns": {
            "x": f"float32 fixed_size_list[{math.prod(sample_shape)}]: the sample flattened (C-order) from {list(sample_shape)}",
            "label": "int64 class index (null when unlabelled)",
            "index": "int64 position in the dataset",
        },
        "bad_files": _bad_file_report(report),
        "feature_net": feature_entry,
        "reference_stats": stats_entry,
        "feature_net_skipped": skip_reason,
        "params": params,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    store.write_bytes(join_url(out_url, MANIFEST_FILE), manifest_bytes)
    store.mark_complete(
        out_url,
        {
            "manifest": MANIFEST_FILE,
            "manifest_sha256": _sha256(manifest_bytes),
            "count": len(dataset),
            "num_shards": len(shards),
        },
    )
    logger.info("prepared %s -> %s (%d samples, %d shards)", source, out_url, len(dataset), len(shards))
    return manifest


def _write_feature_net_and_stats(store: Store, out_url: str, dataset: Dataset, steps: int, seed: int) -> tuple[dict, dict]:
    from safetensors.numpy import save as st_save

    from cafm_core.features import extract_features, train_feature_network
    from cafm_core.metrics import feature_statistics

    model, report = train_feature_network(dataset, steps=steps, seed=seed)
    accuracies = {
        "train_accuracy": _finite_or_none(report["train_accuracy"]),
        "val_accuracy": _finite_or_none(report["val_accuracy"]),
        "final_loss": _finite_or_none(report["final_loss"]),
        "steps": report["steps"],
        "num_train": report["num_train"],
        "num_val": report["num_val"],
    }
    store.write_checkpoint(join_url(out_url, FEATURE_NET_DIR), model.state_dict(), report["config"], accuracies)

    features = extract_features(model, dataset.data)
    mu, sigma = feature_statistics(features)
    stats_bytes = st_save(
        {"mu": np.ascontiguousarray(mu, dtype=np.float64), "sigma": np.ascontiguousarray(sigma, dtype=np.float64)},
        metadata={"count": str(len(dataset)), "feature_dim": str(mu.shape[0]), "feature_net": FEATURE_NET_DIR},
    )
    store.write_bytes(join_url(out_url, REFERENCE_STATS_FILE), stats_bytes)
    feature_entry = {"path": FEATURE_NET_DIR, "config": report["config"], **accuracies}
    stats_entry = {
        "path": REFERENCE_STATS_FILE,
        "sha256": _sha256(stats_bytes),
        "count": len(dataset),
        "feature_dim": int(mu.shape[0]),
    }
    return feature_entry, stats_entry


# ---- readers ------------------------------------------------------------------------------


def read_manifest(store: Store, data_url: str) -> dict:
    """The manifest of a complete prepared dataset (checked against ``_COMPLETE.json``)."""
    record = store.completed(data_url)
    if record is None:
        raise IncompleteOutputError(
            f"no complete prepared dataset at {data_url}: _COMPLETE.json is missing (preparation "
            "did not finish or never ran); run the prepare stage for it"
        )
    manifest_url = join_url(data_url, MANIFEST_FILE)
    data = store.read_bytes(manifest_url)
    expected = record["outputs"].get("manifest_sha256")
    if expected is not None and _sha256(data) != expected:
        raise CAFMInputError(f"checksum mismatch for {manifest_url}: sha256 differs from _COMPLETE.json (modified?)")
    manifest = json.loads(data.decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CAFMInputError(f"{manifest_url} is not a {MANIFEST_FORMAT} manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CAFMInputError(f"{manifest_url} has version {manifest.get('version')!r}; expected {MANIFEST_VERSION}")
    return manifest


def shard_urls(store: Store, data_url: str) -> list[str]:
    """Full URLs of the Parquet shards of a complete prepared dataset, in order (e.g. for Ray Data)."""
    manifest = read_manifest(store, data_url)
    return [join_url(data_url, shard["path"]) for shard in manifest["shards"]]


def load_prepared(store: Store, data_url: str) -> tuple[Dataset, dict]:
    """Rebuild the Dataset of a complete prepared output after verifying every shard's sha256."""
    manifest = read_manifest(store, data_url)
    sample_shape = tuple(manifest["sample_shape"])
    xs, label_parts, indices = [], [], []
    for shard in manifest["shards"]:
        url = join_url(data_url, shard["path"])
        data = store.read_bytes(url)
        if _sha256(data) != shard["sha256"]:
            raise CAFMInputError(f"checksum mismatch for shard {url}: sha256 differs from the manifest (corrupted)")
        x, labels, index = _read_shard(data, url, sample_shape)
        if len(index) != shard["rows"]:
            raise CAFMInputError(f"shard {url} has {len(index)} rows; the manifest says {shard['rows']}")
        xs.append(x)
        label_parts.append(labels)
        indices.append(index)
    index = np.concatenate(indices)
    if len(index) != manifest["count"] or not np.array_equal(index, np.arange(len(index))):
        raise CAFMInputError(f"shards of {data_url} do not hold samples 0..{manifest['count'] - 1} in order")
    unlabelled = [labels is None for labels in label_parts]
    if any(unlabelled) and not all(unlabelled):
        raise CAFMInputError(f"shards of {data_url} mix labelled and unlabelled rows")
    import torch

    labels = None if all(unlabelled) else torch.from_numpy(np.concatenate(label_parts))
    dataset = Dataset(
        data=torch.from_numpy(np.concatenate(xs)),
        labels=labels,
        num_classes=manifest["num_classes"],
        kind=manifest["kind"],
        class_names=list(manifest["class_names"]),
        name=manifest["name"],
    )
    return dataset, manifest


def _require_feature_net(manifest: dict, data_url: str) -> None:
    if manifest.get("feature_net") is None:
        reason = manifest.get("feature_net_skipped") or "none was trained"
        raise CAFMInputError(f"prepared dataset {data_url} has no feature network ({reason})")


def load_feature_net(store: Store, data_url: str):
    """The in-domain feature network (``DigitFeatureNet``, eval mode) of a prepared image dataset."""
    from cafm_core.checkpoint import load_state_dict_checked
    from cafm_core.features import DigitFeatureNet

    manifest = read_manifest(store, data_url)
    _require_feature_net(manifest, data_url)
    tensors, config, _ = store.read_checkpoint(join_url(data_url, manifest["feature_net"]["path"]))
    model = DigitFeatureNet.from_config(config)
    load_state_dict_checked(model, tensors)
    return model.eval()


def load_for_evaluation(store: Store, data_url: str) -> tuple[Dataset, dict, DigitFeatureNet | None]:
    """The prepared dataset, its manifest and the in-domain feature network (None for
    low-dimensional or unlabelled data, which are evaluated without one)."""
    dataset, manifest = load_prepared(store, data_url)
    feature_net = load_feature_net(store, data_url) if dataset.kind == "image" and dataset.labels is not None else None
    return dataset, manifest, feature_net


def load_reference_stats(store: Store, data_url: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` (float64) of the real data's features in the feature network's space."""
    from safetensors.numpy import load as st_load

    manifest = read_manifest(store, data_url)
    _require_feature_net(manifest, data_url)
    entry = manifest["reference_stats"]
    url = join_url(data_url, entry["path"])
    data = store.read_bytes(url)
    if _sha256(data) != entry["sha256"]:
        raise CAFMInputError(f"checksum mismatch for {url}: sha256 differs from the manifest (corrupted)")
    tensors = st_load(data)
    return tensors["mu"], tensors["sigma"]
