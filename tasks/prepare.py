"""Dataset preparation stage: raw data -> a prepared dataset (Parquet shards + manifest +
feature network + reference stats; the layout is :mod:`tasks.dataset_format`).

Plain functions (the Prefect task wrapper lives in ``tasks.pipeline_stages``). Every argument
is checked before any compute or write. An existing complete output with the same parameters
is reused; with different parameters it is an error unless ``overwrite=True`` (its marker is
then removed before anything is rewritten).

Memory does not grow with the dataset: an image folder is listed, then read, decoded and
written shard by shard (:mod:`tasks.image_shards`: in this process for small folders, as a
Ray Data pipeline for large ones; an interrupted run resumes at the shards not yet done);
the feature network trains on a bounded random sample (``feature_sample`` images) and the
reference statistics are accumulated over the shards one at a time. Image pixels are stored
as uint8. The built-in sets are small and are made in memory, then written the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import numpy as np

from cafm_core.checks import CAFMInputError
from cafm_core.data import (
    BUILTIN_DATASETS,
    MAX_FILE_BYTES,
    SYNTHETIC_DATASETS,
    Dataset,
    ImageFolderListing,
    PixelImages,
    bad_fraction_exceeded,
    check_bad_files,
    dense_label_map,
    images_to_uint8,
    list_image_folder,
    load_builtin,
)
from tasks import dataset_format
from tasks.image_shards import auto_engine, chunk_specs, done_path, peak_rss_mb, run_chunks
from tasks.storage import Store, StorageError, check_source_url, is_s3_url, join_url, s3_storage_options
from tasks.validation import check_int

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 2048
_MAX_LISTED_FILES = 20

DIGITS_SHAPE = (1, 8, 8)
FEATURE_SAMPLE = 50_000
"""Default of ``feature_sample``: the most images the feature network trains on."""
ENGINES = ("auto", "local", "ray")


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
    try:
        check_source_url(source)  # a local path, file:// or s3:// only
    except StorageError as error:
        raise CAFMInputError(str(error)) from None
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


def _load_source(kind: str, source: str, *, seed: int, num_samples: int) -> Dataset | ImageFolderListing:
    """A built-in set in memory, or an image folder's listing (nothing read yet)."""
    if kind == "builtin":
        return load_builtin(source, num_samples=num_samples, seed=seed)
    options = s3_storage_options() if is_s3_url(source) else None
    return list_image_folder(source, storage_options=options)


def _preprocessing_note(kind: str, source: str, sample_shape: tuple[int, ...], image: bool) -> dict:
    if kind == "folder":
        channels, resolution, _ = sample_shape
        return {
            "resolution": resolution,
            "channels": channels,
            "value_range": [-1.0, 1.0],
            "policy": (
                f"converted to {'grayscale' if channels == 1 else 'RGB'}, center-cropped to a square, "
                f"resized to {resolution}x{resolution} (Lanczos), stored as uint8 0..255, read as x / 127.5 - 1 "
                "in [-1, 1]"
            ),
        }
    if image:
        channels, resolution, _ = sample_shape
        return {
            "resolution": resolution,
            "channels": channels,
            "value_range": [-1.0, 1.0],
            "policy": f"built-in {source!r} as shipped ({channels}x{resolution}x{resolution}), not resized; "
                      "quantised to uint8 0..255, read as x / 127.5 - 1 in [-1, 1]",
        }
    return {"policy": f"built-in {source!r}: synthetic points, stored as generated (float32)"}


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _feature_net_skip_reason(image: bool, labelled: bool, num_classes: int) -> str | None:
    if not image:
        return "points data: evaluated with exact support tests, not a feature network"
    if not labelled or num_classes < 2:
        return f"the feature network is a classifier and needs >= 2 classes; the data has {num_classes}"
    return None


class _RefusedFolder(CAFMInputError):
    """The folder broke the bad-file policy: what this attempt wrote is removed once the
    stage's Ray work has stopped."""


def _discard_attempt(store: Store, out_url: str) -> None:
    """After a refused input: remove this stage's shards (and ``out_url`` when nothing else
    is left in it), so a refused folder leaves nothing behind."""
    store.remove(join_url(out_url, dataset_format.SHARDS_DIR), recursive=True)
    if not store.list(out_url):
        store.remove(out_url, recursive=True)


@contextlib.contextmanager
def _ray_session() -> Iterator[None]:
    """Ray for the prepare stage: ``RAY_ADDRESS`` (every node checked to run this code) or a
    local Ray; a Ray this function started is shut down afterwards, so that the training
    stage sizes its own."""
    import ray

    from tasks.ray_cluster import check_nodes_code, ensure_ray

    started = not ray.is_initialized()
    ensure_ray()
    try:
        if os.environ.get("RAY_ADDRESS"):
            check_nodes_code()
        yield
    finally:
        if started:
            ray.shutdown()


def _map(fn: Callable, items: list, engine: str, **shared) -> Iterator:
    """``fn(item, **shared)`` for every item: in this process, or as Ray tasks (one CPU each,
    a bounded number in flight; ``shared`` is put in the object store once). Results come
    in completion order."""
    if engine != "ray":
        for item in items:
            yield fn(item, **shared)
        return
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    refs = {name: ray.put(value) for name, value in shared.items()}
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = []
    for item in items:
        pending.append(remote.remote(item, **refs))
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(done)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(done)


# ---- shards -------------------------------------------------------------------------------


def _write_builtin_shards(store: Store, out_url: str, dataset: Dataset, shard_size: int) -> list[dict]:
    n = len(dataset)
    image = dataset.kind == "image"
    x = images_to_uint8(dataset.data).reshape(n, -1) if image else dataset.data.reshape(n, -1).numpy()
    labels = dataset.labels.numpy() if dataset.labels is not None else None
    sample_shape = tuple(int(s) for s in dataset.sample_shape)
    return [
        dataset_format.write_shard(store, out_url, number, x[start : start + shard_size],
                                   None if labels is None else labels[start : start + shard_size],
                                   np.arange(start, min(start + shard_size, n)), sample_shape)
        for number, start in enumerate(range(0, n, shard_size))
    ]


def _relabel(store: Store, out_url: str, records: list[dict], remap: dict[int, int],
             sample_shape: tuple[int, ...]) -> None:
    """Rewrite the shards whose labels change when classes without a readable image are
    dropped (labels stay dense in [0, num_classes)); their records go (a rerun redoes them)."""
    lookup = np.full(max(remap) + 1, -1, dtype=np.int64)
    for old, new in remap.items():
        lookup[old] = new
    for record in records:
        if not record["rows"]:
            continue
        x, labels, index = dataset_format.read_shard(store, out_url, record, sample_shape, raw=True)
        relabelled = lookup[labels]
        if np.array_equal(relabelled, labels):
            continue
        data = dataset_format.shard_to_bytes(x.reshape(len(index), -1), relabelled, index, sample_shape)
        store.remove(join_url(out_url, done_path(record["number"])), recursive=False)
        store.write_bytes(join_url(out_url, record["path"]), data)
        record.update(sha256=dataset_format.sha256_hex(data), bytes=len(data))


def _write_folder_shards(store: Store, out_url: str, listing: ImageFolderListing, *, source: str, resolution: int,
                         channels: int, shard_size: int, max_bad_fraction: float, max_file_bytes: int, engine: str,
                         stats: dict) -> dict:
    """The folder's shards (resuming at those not done yet), the bad-file policy applied (a
    file above ``max_file_bytes`` is a bad file, never read); returns ``shards`` (manifest
    entries), ``class_names``, ``class_counts`` and the bad-file report."""
    specs = chunk_specs(listing, source=source, shard_size=shard_size, resolution=resolution, channels=channels,
                        max_file_bytes=max_file_bytes)
    num_files = len(listing)
    seen = {"bad": [], "reasons": [], "files": 0}

    def watch(record: dict) -> bool:
        seen["bad"].extend(record["bad_files"])
        seen["reasons"].extend(record["bad_reasons"])
        seen["files"] += record["files"]
        return not bad_fraction_exceeded(len(seen["bad"]), num_files, max_bad_fraction)

    records = run_chunks(store, out_url, specs, engine=engine, on_record=watch)
    stats["workers"] = _worker_peaks(records.values(), stats.get("workers"))
    stats["reused_shards"] = sum(1 for record in records.values() if record["reused"])
    if len(records) < len(specs):  # stopped early: the policy is broken whatever the rest holds
        raise _RefusedFolder(
            f"image folder {source!r}: at least {len(seen['bad'])} of {num_files} image files are unreadable "
            f"(more than max_bad_fraction {max_bad_fraction:.1%} of them; stopped after reading {seen['files']}); "
            f"first bad files: {sorted(seen['bad'])[:5]} (one of them: {seen['reasons'][0]})"
        )
    ordered = [records[number] for number in range(len(specs))]
    bad_files = [path for record in ordered for path in record["bad_files"]]
    bad_reasons = [reason for record in ordered for reason in record["bad_reasons"]]
    label_counts = [0] * len(listing.classes)
    for record in ordered:
        for label, count in record["label_counts"].items():
            label_counts[int(label)] += count
    num_good = sum(label_counts)
    try:
        check_bad_files(source, num_good=num_good, bad_files=bad_files, bad_reasons=bad_reasons,
                        num_files=num_files, max_bad_fraction=max_bad_fraction)
    except CAFMInputError as error:
        raise _RefusedFolder(str(error)) from None
    by_name = dict(zip(listing.classes, label_counts))
    remap = dense_label_map(listing.classes, by_name)
    if len(remap) != len(listing.classes):
        _relabel(store, out_url, ordered, remap, (channels, resolution, resolution))
    kept = [name for name in listing.classes if by_name[name] > 0]
    shards = [{key: record[key] for key in ("path", "sha256", "rows", "bytes")} for record in ordered if record["rows"]]
    # files of an earlier attempt with another listing are not part of this dataset
    wanted = {record["path"] for record in ordered if record["rows"]} | {done_path(n) for n in range(len(specs))}
    for url in store.list(join_url(out_url, dataset_format.SHARDS_DIR)):
        if f"{dataset_format.SHARDS_DIR}/{posixpath.basename(url)}" not in wanted:
            store.remove(url, recursive=True)
    report = {
        "num_images": num_good,
        "num_bad": len(bad_files),
        "bad_fraction": len(bad_files) / num_files,
        "bad_files": bad_files[:_MAX_LISTED_FILES],
        "bad_reasons": bad_reasons[:_MAX_LISTED_FILES],
        "num_skipped": len(listing.skipped_files),
        "skipped_files": listing.skipped_files[:_MAX_LISTED_FILES],
        "class_counts": by_name,
    }
    return {"shards": shards, "class_names": kept, "class_counts": [by_name[name] for name in kept],
            "bad_files": report}


def _worker_peaks(records, previous: dict | None = None) -> dict[str, float]:
    """Peak memory (MiB) of every process that ran a task, by pid."""
    peaks = dict(previous or {})
    for record in records:
        pid = str(record["pid"])
        peaks[pid] = max(peaks.get(pid, 0.0), float(record["peak_rss_mb"]))
    return peaks


# ---- feature network and reference statistics ---------------------------------------------


def _pick_rows(item: dict, store: Store, out_url: str, sample_shape: tuple[int, ...]) -> dict:
    """One item of the sample's plan (``dataset_format.pick_rows``), pixels as stored, with the
    process's id and peak memory."""
    part = dataset_format.pick_rows(item, store, out_url, sample_shape, raw=True)
    return {**part, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


def _shard_moments(item: dict, store: Store, out_url: str, sample_shape: tuple[int, ...], state: dict,
                   config: dict) -> dict:
    """The feature moments (count, sum, sum of outer products) of one shard's rows."""
    import torch

    from cafm_core.checkpoint import load_state_dict_checked
    from cafm_core.features import DigitFeatureNet, extract_features
    from cafm_core.metrics import FeatureMoments

    model = DigitFeatureNet.from_config(config)
    load_state_dict_checked(model, state)
    x, _, _ = dataset_format.read_shard(store, out_url, item["entry"], sample_shape)
    moments = FeatureMoments(int(config["feature_dim"])).add(extract_features(model, torch.from_numpy(x)))
    return {"order": item["order"], "count": moments.count, "total": moments.total, "outer": moments.outer,
            "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


def _feature_sample(store: Store, out_url: str, shards: list[dict], sample_shape: tuple[int, ...], *,
                    num_classes: int, class_names: list[str], size: int, seed: int, engine: str,
                    stats: dict) -> PixelImages:
    """A uniform random sample of at most ``size`` rows (``seed``), read shard by shard
    (``dataset_format.read_sample``, the evaluation's reader too; here one task per shard) and
    kept as uint8 pixels (the feature network makes float32 batches of them as it trains)."""
    import torch

    workers = []

    def parts(items: list[dict]):
        for part in _map(_pick_rows, items, engine, store=store, out_url=out_url, sample_shape=sample_shape):
            workers.append({"pid": part["pid"], "peak_rss_mb": part["peak_rss_mb"]})
            yield part

    layout = {"shards": shards, "count": sum(entry["rows"] for entry in shards), "sample_shape": list(sample_shape)}
    pixels, labels, _ = dataset_format.read_sample(store, out_url, layout, size=size, seed=seed, raw=True, parts=parts)
    if pixels.dtype != np.uint8 or labels is None:
        raise CAFMInputError(f"shards of {out_url} do not hold labelled uint8 pixels ({pixels.dtype})")
    stats["workers"] = _worker_peaks(workers, stats.get("workers"))
    return PixelImages(torch.from_numpy(pixels), torch.from_numpy(labels), num_classes, list(class_names),
                       name="feature sample")


def _write_feature_net_and_stats(store: Store, out_url: str, written: dict, steps: int, seed: int, *,
                                 feature_sample: int = FEATURE_SAMPLE, engine: str = "local",
                                 stats: dict | None = None) -> tuple[dict, dict]:
    """Train the in-domain feature network on a bounded sample of the shards, write it and the
    feature statistics of every row (accumulated shard by shard); returns their manifest entries."""
    from cafm_core.features import train_feature_network
    from cafm_core.metrics import FeatureMoments

    stats = stats if stats is not None else {}
    sample_shape, shards = written["sample_shape"], written["shards"]
    started = time.perf_counter()
    sample = _feature_sample(store, out_url, shards, sample_shape, num_classes=written["num_classes"],
                             class_names=written["class_names"], size=feature_sample, seed=seed, engine=engine,
                             stats=stats)
    model, report = train_feature_network(sample, steps=steps, seed=seed)
    del sample
    stats["feature_net_seconds"] = time.perf_counter() - started
    accuracies = {
        "train_accuracy": _finite_or_none(report["train_accuracy"]),
        "val_accuracy": _finite_or_none(report["val_accuracy"]),
        "final_loss": _finite_or_none(report["final_loss"]),
        "steps": report["steps"],
        "num_train": report["num_train"],
        "num_val": report["num_val"],
    }
    feature_entry = dataset_format.write_feature_net(store, out_url, model.state_dict(), report["config"], accuracies)

    started = time.perf_counter()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    items = [{"order": order, "entry": entry} for order, entry in enumerate(shards)]
    parts = {part["order"]: part for part in _map(_shard_moments, items, engine, store=store, out_url=out_url,
                                                   sample_shape=sample_shape, state=state, config=report["config"])}
    stats["workers"] = _worker_peaks(parts.values(), stats.get("workers"))
    moments = FeatureMoments(int(report["config"]["feature_dim"]))
    for order in range(len(items)):  # in shard order: the same sums however the tasks finished
        part = FeatureMoments(moments.total.shape[0])
        part.count, part.total, part.outer = parts[order]["count"], parts[order]["total"], parts[order]["outer"]
        moments.merge(part)
    mu, sigma = moments.statistics()
    stats["reference_stats_seconds"] = time.perf_counter() - started
    stats_entry = dataset_format.write_reference_stats(store, out_url, mu, sigma, moments.count)
    return feature_entry, stats_entry


# ---- the stage ----------------------------------------------------------------------------


def prepare_dataset(
    source: str,
    store: Store,
    out_url: str,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    max_bad_fraction: float = 0.0,
    max_file_bytes: int = MAX_FILE_BYTES,
    shard_size: int = 1024,
    feature_steps: int = 400,
    feature_sample: int = FEATURE_SAMPLE,
    seed: int = 0,
    num_samples: int = 20000,
    overwrite: bool = False,
    engine: str = "auto",
    stats: dict | None = None,
) -> dict:
    """Prepare ``source`` into ``out_url`` on ``store``; returns the manifest.

    ``source``: a name in ``cafm_core.data.BUILTIN_DATASETS`` or a local path / ``s3://`` URL of
    an image folder ``<class_name>/<images>`` (then ``resolution`` and ``channels`` are
    required; no other URL scheme). An image file above ``max_file_bytes`` is never read: it
    counts as a bad file (``max_bad_fraction``), its size named in the report. ``num_samples`` and ``seed`` pick the synthetic sets' points; ``seed`` also
    seeds the feature network and draws its training sample of at most ``feature_sample``
    images. ``engine`` (image folders): "local" (this process), "ray" (a Ray Data pipeline on
    ``RAY_ADDRESS`` or a local Ray) or "auto" (``tasks.image_shards.auto_engine``: Ray from
    4,096 files on, on a cluster or a machine of 4+ cores); the output is the same. ``stats``, when given, is filled with timings, the
    engine, reused shards and the peak memory of every process that worked. ``_COMPLETE.json``
    is written last, and only on success.
    """
    # 1. Validate everything before compute or writes.
    _check_out_url(store, out_url)
    if isinstance(max_bad_fraction, bool) or not isinstance(max_bad_fraction, (int, float)) or not 0.0 <= max_bad_fraction < 1.0:
        raise CAFMInputError(f"max_bad_fraction must be a number in [0, 1), got {max_bad_fraction!r}")
    check_int("shard_size", shard_size, 1)
    check_int("max_file_bytes", max_file_bytes, 1)
    check_int("feature_steps", feature_steps, 1)
    check_int("feature_sample", feature_sample, 2)
    check_int("seed", seed, 0)
    check_int("num_samples", num_samples, 2)
    if not isinstance(overwrite, bool):
        raise CAFMInputError(f"overwrite must be a bool, got {overwrite!r}")
    if engine not in ENGINES:
        raise CAFMInputError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
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
        "feature_sample": feature_sample,
        "seed": seed,
        "num_samples": num_samples if source in SYNTHETIC_DATASETS else None,
        "format_version": dataset_format.MANIFEST_VERSION,
    }
    if kind == "folder":  # the built-in sets read no file: their parameters (and reuse) stay as they were
        params["max_file_bytes"] = max_file_bytes
    stats = stats if stats is not None else {}
    stats.update(started=time.perf_counter(), engine="local")

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

    # 3. Read the source: a built-in set in memory, or a folder's listing.
    loaded = _load_source(kind, source, seed=seed, num_samples=num_samples)
    if kind == "folder" and (engine == "ray" or (engine == "auto" and auto_engine(len(loaded)) == "ray")):
        stats["engine"] = "ray"
    logger.info("preparing %s: %d %s (%s)", source, len(loaded), "files" if kind == "folder" else "samples",
                stats["engine"])

    # 4. Write. The old marker goes first so a failure from here on leaves nothing marked complete;
    # then only this stage's own entries are cleared (never anything else under out_url). A folder's
    # shards stay: those already done (and intact) are not redone.
    store.clear_complete(out_url)
    for entry in dataset_format.OUTPUT_ENTRIES:
        if kind == "builtin" or entry != dataset_format.SHARDS_DIR:
            store.remove(join_url(out_url, entry), recursive=True)
    try:
        manifest = _write(kind, source, store, out_url, loaded, params, stats, resolution=resolution,
                          channels=channels, shard_size=shard_size, max_bad_fraction=max_bad_fraction,
                          max_file_bytes=max_file_bytes, feature_steps=feature_steps, feature_sample=feature_sample,
                          seed=seed)
    except _RefusedFolder as refused:  # after the Ray session: no task of this attempt writes any more
        _discard_attempt(store, out_url)
        raise CAFMInputError(str(refused)) from None
    stats["seconds"] = time.perf_counter() - stats.pop("started")
    stats["driver_peak_rss_mb"] = peak_rss_mb()
    logger.info("prepared %s -> %s (%d samples, %d shards) in %.0f s", source, out_url, manifest["count"],
                len(manifest["shards"]), stats["seconds"])
    return manifest


def _write(kind: str, source: str, store: Store, out_url: str, loaded, params: dict, stats: dict, *, resolution,
           channels, shard_size: int, max_bad_fraction: float, max_file_bytes: int, feature_steps: int,
           feature_sample: int, seed: int) -> dict:
    """Shards, feature network, statistics, then the manifest and the marker (last)."""
    with contextlib.ExitStack() as session:
        if stats["engine"] == "ray":
            started = time.perf_counter()
            session.enter_context(_ray_session())
            stats["ray_start_seconds"] = time.perf_counter() - started
        if kind == "builtin":
            dataset = loaded
            image = dataset.kind == "image"
            written = {
                "shards": _write_builtin_shards(store, out_url, dataset, shard_size),
                "class_names": list(dataset.class_names),
                "class_counts": (np.bincount(dataset.labels.numpy(), minlength=dataset.num_classes).tolist()
                                 if dataset.labels is not None else None),
                "bad_files": None,
            }
            written.update(sample_shape=tuple(int(s) for s in dataset.sample_shape), kind=dataset.kind,
                           labelled=dataset.labels is not None, num_classes=dataset.num_classes)
            name = source
            del dataset, loaded
        else:
            image = True
            written = _write_folder_shards(store, out_url, loaded, source=source, resolution=resolution,
                                           channels=channels, shard_size=shard_size, max_bad_fraction=max_bad_fraction,
                                           max_file_bytes=max_file_bytes, engine=stats["engine"], stats=stats)
            written.update(sample_shape=(channels, resolution, resolution), kind="image", labelled=True,
                           num_classes=len(written["class_names"]))
            name = posixpath.basename(source.rstrip("/")) or source
            del loaded
        count = sum(entry["rows"] for entry in written["shards"])
        stats["shards_seconds"] = time.perf_counter() - stats["started"]
        stats["count"] = count

        feature_entry, stats_entry = None, None
        skip_reason = _feature_net_skip_reason(image, written["labelled"], written["num_classes"])
        if skip_reason is None:
            feature_entry, stats_entry = _write_feature_net_and_stats(
                store, out_url, written, feature_steps, seed, feature_sample=feature_sample,
                engine=stats["engine"], stats=stats,
            )
    sample_shape = written["sample_shape"]
    manifest = {
        "format": dataset_format.MANIFEST_FORMAT,
        "version": dataset_format.MANIFEST_VERSION,
        "name": name,
        "source": source,
        "source_type": kind,
        "kind": written["kind"],
        "count": count,
        "sample_shape": list(sample_shape),
        "num_classes": written["num_classes"],
        "class_names": list(written["class_names"]),
        "class_counts": written["class_counts"],
        "preprocessing": _preprocessing_note(kind, source, sample_shape, image),
        "pixel_encoding": dataset_format.pixel_encoding(written["kind"]),
        "shards": written["shards"],
        "shard_columns": dataset_format.shard_columns(sample_shape, dataset_format.pixel_encoding(written["kind"])["dtype"]),
        "bad_files": written["bad_files"],
        "feature_net": feature_entry,
        "reference_stats": stats_entry,
        "feature_net_skipped": skip_reason,
        "params": params,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    dataset_format.write_manifest_and_mark_complete(store, out_url, manifest)
    return manifest
