"""Dataset preparation stage: raw data -> a prepared dataset (Parquet shards + manifest +
feature network + reference stats; the layout is :mod:`tasks.dataset_format`).

Plain functions (the Prefect task wrapper lives in ``flows``). Every argument is checked
before any compute or write. An existing complete output with the same parameters is reused;
with different parameters it is an error unless ``overwrite=True`` (its marker is then
removed before anything is rewritten).
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from datetime import datetime, timezone

import numpy as np

from cafm_core.checks import CAFMInputError
from cafm_core.data import BUILTIN_DATASETS, SYNTHETIC_DATASETS, Dataset, load_builtin, read_image_folder
from tasks import dataset_format
from tasks.storage import Store, StorageError, is_s3_url, join_url, s3_storage_options
from tasks.validation import check_int

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 2048
_MAX_LISTED_FILES = 20

DIGITS_SHAPE = (1, 8, 8)


# ---- validation ---------------------------------------------------------------------------


def _is_folder_like(source: str) -> bool:
    return "://" in source or "/" in source or os.sep in source or source.startswith(".") or os.path.exists(source)


def _resolve_source(source: object, resolution: object, channels: object) -> str:
    """Check ``source`` and the resize settings; returns "builtin" or "folder"."""
    if not isinstance(source, str) or not source.strip():
        raise CAFMInputError(
            f"source must be a built-in dataset name {list(BUILTIN_DATASETS)} or an image-folder path/URL, got {source!r}"
        )
    if resolution is not None:
        check_int("resolution", resolution, 8)
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
    check_int("shard_size", shard_size, 1)
    check_int("feature_steps", feature_steps, 1)
    check_int("seed", seed, 0)
    check_int("num_samples", num_samples, 2)
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
            old_manifest = store.read_json(join_url(out_url, dataset_format.MANIFEST_FILE))
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
    for entry in dataset_format.OUTPUT_ENTRIES:
        store.remove(join_url(out_url, entry), recursive=True)

    sample_shape = tuple(int(s) for s in dataset.sample_shape)
    x = dataset.data.reshape(len(dataset), -1).numpy()
    labels = dataset.labels.numpy() if dataset.labels is not None else None
    shards = []
    for number, start in enumerate(range(0, len(dataset), shard_size)):
        stop = min(start + shard_size, len(dataset))
        shards.append(dataset_format.write_shard(
            store, out_url, number, x[start:stop], None if labels is None else labels[start:stop],
            np.arange(start, stop), sample_shape,
        ))

    feature_entry, stats_entry = None, None
    skip_reason = _feature_net_skip_reason(dataset)
    if skip_reason is None:
        feature_entry, stats_entry = _write_feature_net_and_stats(store, out_url, dataset, feature_steps, seed)
    name = source if kind == "builtin" else posixpath.basename(source.rstrip("/")) or source
    class_counts = (
        np.bincount(labels, minlength=dataset.num_classes).tolist() if labels is not None else None
    )
    manifest = {
        "format": dataset_format.MANIFEST_FORMAT,
        "version": dataset_format.MANIFEST_VERSION,
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
        "shard_columns": dataset_format.shard_columns(sample_shape),
        "bad_files": _bad_file_report(report),
        "feature_net": feature_entry,
        "reference_stats": stats_entry,
        "feature_net_skipped": skip_reason,
        "params": params,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    dataset_format.write_manifest_and_mark_complete(store, out_url, manifest)
    logger.info("prepared %s -> %s (%d samples, %d shards)", source, out_url, len(dataset), len(shards))
    return manifest


def _write_feature_net_and_stats(store: Store, out_url: str, dataset: Dataset, steps: int, seed: int) -> tuple[dict, dict]:
    """Train the in-domain feature network, write it and the real data's feature statistics;
    returns their manifest entries."""
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
    feature_entry = dataset_format.write_feature_net(store, out_url, model.state_dict(), report["config"], accuracies)

    features = extract_features(model, dataset.data)
    mu, sigma = feature_statistics(features)
    stats_entry = dataset_format.write_reference_stats(store, out_url, mu, sigma, len(dataset))
    return feature_entry, stats_entry
