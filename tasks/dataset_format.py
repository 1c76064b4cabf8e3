"""The prepared dataset on storage: its layout, how it is written, and how it is read back.

The preparation stage (:mod:`tasks.prepare`) writes it; training, sampling, evaluation and
the registry evaluation read it. Layout under a dataset URL::

    shards/part-00000.parquet ...   columns x (fixed-size list, the flattened sample: uint8 pixels
                                     0..255 for images, float32 for points), label (int64, null
                                     when unlabelled), index (int64, strictly increasing)
    shards/part-00000.done.json ... image folders: what each shard holds (written after it; resume)
    feature_net/                     cafm_core checkpoint of the in-domain classifier (labelled images)
    reference_stats.safetensors      mu / sigma of the real data's features (labelled images)
    manifest.json                    what was written, with sha256 of every shard and file
    _COMPLETE.json                   written last; without it the output does not exist

Readers verify the manifest against ``_COMPLETE.json`` and every shard and file against the
manifest's sha256 before using them. Image pixels are stored as uint8 and read as float32
``u / 127.5 - 1`` in [-1, 1] (``cafm_core.data.uint8_to_images``); the Parquet type of ``x``
decides, so float32 shards of older runs (manifest version 1) read as before. The evaluation
reads at most ``FLOOR_MAX_SAMPLES`` (50,000) rows, a seeded uniform sample of a larger set,
one shard at a time (:func:`load_for_evaluation`); FD then uses the reference statistics of
all rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cafm_core.checks import CAFMInputError
from cafm_core.data import Dataset, uint8_to_images
from cafm_core.evaluation import FLOOR_MAX_SAMPLES
from cafm_core.features import DigitFeatureNet
from tasks.storage import IncompleteOutputError, Store, join_url

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
FEATURE_NET_DIR = "feature_net"
REFERENCE_STATS_FILE = "reference_stats.safetensors"
OUTPUT_ENTRIES = (MANIFEST_FILE, SHARDS_DIR, FEATURE_NET_DIR, REFERENCE_STATS_FILE)
MANIFEST_FORMAT = "cafm_prepared_dataset"
MANIFEST_VERSION = 2
"""2: image pixels stored as uint8 (``pixel_encoding`` in the manifest); index may leave gaps
(unreadable files of an image folder). 1: float32 pixels, index 0..count-1."""
READABLE_VERSIONS = (1, 2)
POINTS_SAMPLE_COUNT = 10_000  # evaluation samples per setting for low-dimensional sets when none is given
REFERENCE_SEED = 0
"""Seed of the real reference's row sample when a prepared set is larger than the evaluation's
bound: fixed, so that the sample is a function of the held set (part of its protocol)."""


def sha256_hex(data: bytes) -> str:
    """The checksum recorded for every file of a prepared dataset."""
    return hashlib.sha256(data).hexdigest()


# ---- shards -------------------------------------------------------------------------------


def shard_path(number: int) -> str:
    """The path of shard ``number``, relative to the dataset URL."""
    return f"{SHARDS_DIR}/part-{number:05d}.parquet"


def pixel_encoding(kind: str) -> dict:
    """How ``x`` is stored, as the manifest records it: uint8 pixels for images, float32 points."""
    if kind == "image":
        return {"dtype": "uint8", "decode": "x / 127.5 - 1", "value_range": [-1.0, 1.0]}
    return {"dtype": "float32", "decode": "as stored"}


def shard_columns(sample_shape: tuple[int, ...], dtype: str = "float32") -> dict[str, str]:
    """The shard columns as the manifest describes them (``dtype``: that of ``x``'s values)."""
    what = "uint8 pixels 0..255, read as x / 127.5 - 1" if dtype == "uint8" else "float32 values"
    return {
        "x": f"{dtype} fixed_size_list[{math.prod(sample_shape)}]: the sample flattened (C-order) from "
             f"{list(sample_shape)}; {what}",
        "label": "int64 class index (null when unlabelled)",
        "index": "int64 position in the dataset (image folders: in the file listing; unreadable files leave gaps)",
    }


def shard_to_bytes(x: np.ndarray, labels: np.ndarray | None, index: np.ndarray, sample_shape: tuple[int, ...]) -> bytes:
    """One Parquet shard: ``x`` ``[n, D]`` as a fixed-size list (uint8 when ``x`` is uint8 —
    image pixels — else float32), ``label`` int64 (nullable), ``index``."""
    rows, width = x.shape
    if x.dtype == np.uint8:
        values = pa.array(np.ascontiguousarray(x).reshape(-1), type=pa.uint8())
    else:
        values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), type=pa.float32())
    columns = {
        "x": pa.FixedSizeListArray.from_arrays(values, width),
        "label": pa.array(labels, type=pa.int64()) if labels is not None else pa.nulls(rows, type=pa.int64()),
        "index": pa.array(index, type=pa.int64()),
    }
    table = pa.table(columns).replace_schema_metadata(
        {"cafm.sample_shape": json.dumps(list(sample_shape)), "cafm.format": MANIFEST_FORMAT,
         "cafm.pixel_dtype": "uint8" if x.dtype == np.uint8 else "float32"}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def shard_from_bytes(data: bytes, url: str, sample_shape: tuple[int, ...], *,
                     raw: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(x, labels or None, index)`` of one shard; ``url`` names it in errors. ``x`` is
    float32 (uint8 pixels scaled to [-1, 1]); with ``raw`` it is as stored (uint8 or float32)."""
    table = pq.read_table(pa.BufferReader(data))
    missing = {"x", "label", "index"} - set(table.column_names)
    if missing:
        raise CAFMInputError(f"shard {url} lacks columns {sorted(missing)}")
    width = math.prod(sample_shape)
    x_column = table.column("x").combine_chunks()
    x_type = x_column.type
    if (not pa.types.is_fixed_size_list(x_type) or x_type.list_size != width
            or not (pa.types.is_floating(x_type.value_type) or x_type.value_type == pa.uint8())):
        raise CAFMInputError(f"shard {url}: column x has type {x_type}, expected fixed_size_list<float or uint8>[{width}]")
    x = x_column.flatten().to_numpy(zero_copy_only=False)
    if x.dtype == np.uint8:
        x = x if raw else uint8_to_images(x)
    else:
        x = x.astype(np.float32, copy=False)
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


# ---- writers ------------------------------------------------------------------------------


def write_shard(store: Store, data_url: str, number: int, x: np.ndarray, labels: np.ndarray | None,
                index: np.ndarray, sample_shape: tuple[int, ...]) -> dict:
    """Write shard ``number``; returns its manifest entry (path, sha256, rows, bytes)."""
    data = shard_to_bytes(x, labels, index, sample_shape)
    relative = shard_path(number)
    store.write_bytes(join_url(data_url, relative), data)
    return {"path": relative, "sha256": sha256_hex(data), "rows": len(index), "bytes": len(data)}


def write_feature_net(store: Store, data_url: str, state_dict, config: dict, accuracies: dict) -> dict:
    """Write the feature network's checkpoint; returns its manifest entry."""
    store.write_checkpoint(join_url(data_url, FEATURE_NET_DIR), state_dict, config, accuracies)
    return {"path": FEATURE_NET_DIR, "config": config, **accuracies}


def write_reference_stats(store: Store, data_url: str, mu: np.ndarray, sigma: np.ndarray, count: int) -> dict:
    """Write ``mu`` / ``sigma`` (float64) of the real data's features; returns the manifest entry."""
    from safetensors.numpy import save as st_save

    stats_bytes = st_save(
        {"mu": np.ascontiguousarray(mu, dtype=np.float64), "sigma": np.ascontiguousarray(sigma, dtype=np.float64)},
        metadata={"count": str(count), "feature_dim": str(mu.shape[0]), "feature_net": FEATURE_NET_DIR},
    )
    store.write_bytes(join_url(data_url, REFERENCE_STATS_FILE), stats_bytes)
    return {
        "path": REFERENCE_STATS_FILE,
        "sha256": sha256_hex(stats_bytes),
        "count": count,
        "feature_dim": int(mu.shape[0]),
    }


def write_manifest_and_mark_complete(store: Store, data_url: str, manifest: dict) -> None:
    """Write ``manifest.json``, then ``_COMPLETE.json`` (with the manifest's sha256): call it
    after every other file of the dataset is written."""
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    store.write_bytes(join_url(data_url, MANIFEST_FILE), manifest_bytes)
    store.mark_complete(
        data_url,
        {
            "manifest": MANIFEST_FILE,
            "manifest_sha256": sha256_hex(manifest_bytes),
            "count": manifest["count"],
            "num_shards": len(manifest["shards"]),
        },
    )


# ---- readers ------------------------------------------------------------------------------


def resolve_dataset_url(store: Store, url: str) -> str:
    """``url`` if it is a prepared dataset; else, for a pipeline run's data stage folder
    (``<run>/data``, whose variants are ``<fingerprint>/out``), its one complete prepared
    dataset. Several variants are ambiguous: the error lists them to choose from."""
    if store.completed(url) is not None:
        return url
    found = []
    for variant in store.list(url):
        candidate = join_url(variant, "out")
        if store.completed(candidate) is not None:
            found.append(candidate)
    if len(found) == 1:
        return found[0]
    if not found:
        raise IncompleteOutputError(f"no complete prepared dataset at {url} (nor under {url}/<fingerprint>/out); "
                                    "run the prepare stage for it")
    raise CAFMInputError(f"{url} holds {len(found)} prepared datasets (one per data variant of the run); name one: "
                         + ", ".join(found))


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
    if expected is not None and sha256_hex(data) != expected:
        raise CAFMInputError(f"checksum mismatch for {manifest_url}: sha256 differs from _COMPLETE.json (modified?)")
    manifest = json.loads(data.decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CAFMInputError(f"{manifest_url} is not a {MANIFEST_FORMAT} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CAFMInputError(f"{manifest_url} has version {manifest.get('version')!r}; expected one of "
                             f"{list(READABLE_VERSIONS)}")
    return manifest


def shard_urls(store: Store, data_url: str) -> list[str]:
    """Full URLs of the Parquet shards of a complete prepared dataset, in order (e.g. for Ray Data)."""
    manifest = read_manifest(store, data_url)
    return [join_url(data_url, shard["path"]) for shard in manifest["shards"]]


def read_shard(store: Store, data_url: str, entry: dict, sample_shape: tuple[int, ...], *,
               raw: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One shard of a manifest (``entry``: its ``path``, ``sha256``, ``rows``), verified;
    ``(x, labels or None, index)`` as :func:`shard_from_bytes` gives them."""
    url = join_url(data_url, entry["path"])
    data = store.read_bytes(url)
    if sha256_hex(data) != entry["sha256"]:
        raise CAFMInputError(f"checksum mismatch for shard {url}: sha256 differs from the manifest (corrupted)")
    x, labels, index = shard_from_bytes(data, url, sample_shape, raw=raw)
    if len(index) != entry["rows"]:
        raise CAFMInputError(f"shard {url} has {len(index)} rows; the manifest says {entry['rows']}")
    return x, labels, index


def iter_shards(store: Store, data_url: str, manifest: dict | None = None, *, raw: bool = False):
    """The shards of a complete prepared dataset one at a time, verified: ``(x, labels or
    None, index)`` per shard (memory: one shard)."""
    manifest = manifest if manifest is not None else read_manifest(store, data_url)
    sample_shape = tuple(manifest["sample_shape"])
    for entry in manifest["shards"]:
        yield read_shard(store, data_url, entry, sample_shape, raw=raw)


def load_prepared(store: Store, data_url: str) -> tuple[Dataset, dict]:
    """Rebuild the Dataset of a complete prepared output after verifying every shard's sha256
    (the whole dataset in memory, as float32: for small sets and tests; the evaluation reads a
    bounded sample with :func:`load_for_evaluation`)."""
    manifest = read_manifest(store, data_url)
    x, labels, _ = read_sample(store, data_url, manifest, size=manifest["count"])
    return _as_dataset(x, labels, manifest), manifest


def _as_dataset(x: np.ndarray, labels: np.ndarray | None, manifest: dict) -> Dataset:
    import torch

    return Dataset(
        data=torch.from_numpy(x),
        labels=None if labels is None else torch.from_numpy(labels),
        num_classes=manifest["num_classes"],
        kind=manifest["kind"],
        class_names=list(manifest["class_names"]),
        name=manifest["name"],
    )


# ---- row samples, one shard at a time -----------------------------------------------------


def sample_positions(count: int, size: int, seed: int) -> np.ndarray:
    """Sorted row positions of a uniform random sample of ``min(size, count)`` of ``count``
    rows, drawn with ``seed`` (every row when ``size >= count``)."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def sample_plan(shards: list[dict], positions: np.ndarray) -> list[dict]:
    """Which rows of which shard a sample at ``positions`` (sorted row positions in the
    dataset) takes: one item per shard that has any, ``{"order": the place of its first row
    in the sample, "entry": the shard's manifest entry, "rows": positions within the shard}``."""
    items, offset = [], 0
    for entry in shards:
        low, high = np.searchsorted(positions, [offset, offset + entry["rows"]])
        if high > low:
            items.append({"order": int(low), "entry": entry, "rows": (positions[low:high] - offset).tolist()})
        offset += entry["rows"]
    return items


def pick_rows(item: dict, store: Store, data_url: str, sample_shape: tuple[int, ...], *, raw: bool = False) -> dict:
    """One :func:`sample_plan` item read: the shard verified (its index strictly increasing),
    then ``{"order", "x", "labels" (or None), "index"}`` of its rows ``item["rows"]``."""
    x, labels, index = read_shard(store, data_url, item["entry"], sample_shape, raw=raw)
    url = join_url(data_url, item["entry"]["path"])
    if len(index) and (index[0] < 0 or np.any(np.diff(index) <= 0)):
        raise CAFMInputError(f"shard {url}: the index is not strictly increasing from >= 0")
    rows = np.asarray(item["rows"], dtype=np.int64)
    return {"order": item["order"], "x": x[rows], "labels": None if labels is None else labels[rows],
            "index": index[rows], "first": int(index[0]), "last": int(index[-1])}


def read_sample(store: Store, data_url: str, manifest: dict, *, size: int, seed: int = REFERENCE_SEED,
                raw: bool = False, parts: Callable[[list[dict]], Iterable[dict]] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(x, labels or None, index)`` of a uniform random sample of ``min(size, count)`` rows
    (:func:`sample_positions` with ``seed``; every row, in order, when ``size >= count``), in
    dataset order. Only the shards holding sampled rows are read, each verified, and only
    their sampled rows are kept: memory is the sample plus one shard. ``x`` is float32
    (images in [-1, 1]); with ``raw`` as stored (uint8 pixels).

    ``parts`` turns the plan's items into :func:`pick_rows` results in any order (the prepare
    stage passes Ray tasks); by default they are read in this process, one shard at a time.
    """
    shards, count = manifest["shards"], manifest["count"]
    if sum(entry["rows"] for entry in shards) != count:
        raise CAFMInputError(f"the shards of {data_url} hold {sum(e['rows'] for e in shards)} rows; "
                             f"the manifest says {count}")
    sample_shape = tuple(manifest["sample_shape"])
    positions = sample_positions(count, size, seed)
    if not len(positions):
        raise CAFMInputError(f"prepared dataset {data_url} has no rows")
    plan = sample_plan(shards, positions)
    if parts is None:
        parts = lambda items: (pick_rows(item, store, data_url, sample_shape, raw=raw) for item in items)  # noqa: E731
    x = labels = None
    index = np.empty(len(positions), dtype=np.int64)
    spans, labelled = [], set()
    for part in parts(plan):
        start, stop = part["order"], part["order"] + len(part["index"])
        if x is None:
            x = np.empty((len(positions), *sample_shape), dtype=part["x"].dtype)
        elif part["x"].dtype != x.dtype:
            raise CAFMInputError(f"shards of {data_url} mix pixel types ({x.dtype}, {part['x'].dtype})")
        x[start:stop] = part["x"]
        index[start:stop] = part["index"]
        labelled.add(part["labels"] is not None)
        if part["labels"] is not None:
            labels = np.empty(len(positions), dtype=np.int64) if labels is None else labels
            labels[start:stop] = part["labels"]
        spans.append((start, part["first"], part["last"]))
    if len(spans) != len(plan):
        raise CAFMInputError(f"read {len(spans)} of the {len(plan)} shards of {data_url} the sample needs")
    spans.sort()
    if any(before[2] >= after[1] for before, after in zip(spans, spans[1:])):
        raise CAFMInputError(f"shards of {data_url} do not hold {count} samples in order")
    if len(labelled) > 1:
        raise CAFMInputError(f"shards of {data_url} mix labelled and unlabelled rows")
    return x, labels, index


# ---- the real reference of an evaluation --------------------------------------------------


@dataclass(frozen=True)
class RealReference:
    """What an evaluation compares generated samples with: ``dataset``, the real rows (every
    row of a set within the bound, in order; else a seeded uniform sample of ``bound`` rows),
    the in-domain ``feature_net`` (None for points or unlabelled data) and, when the rows are a
    sample of image data, ``stats``: ``(mu, sigma)`` of the features of ALL rows (the prepared
    reference statistics), FD's real side. KID, precision/recall, the noise floor and the
    picture use the rows."""

    dataset: Dataset
    manifest: dict
    feature_net: DigitFeatureNet | None
    stats: tuple[np.ndarray, np.ndarray] | None
    seed: int = REFERENCE_SEED
    data_url: str | None = None  # the prepared dataset's folder (where its noise floors are kept)

    @property
    def count(self) -> int:
        """Rows in the prepared dataset."""
        return int(self.manifest["count"])

    @property
    def rows(self) -> int:
        """Rows in the reference."""
        return int(self.dataset.data.shape[0])

    @property
    def sampled(self) -> bool:
        return self.rows < self.count

    def note(self) -> str:
        """One sentence for a report (empty when the reference is every row)."""
        if not self.sampled:
            return ""
        fd = ("FD against the statistics of all rows; KID, precision/recall, the noise floor and the picture from "
              "the sample" if self.stats is not None else "every metric from the sample")
        return (f"Real reference: {self.rows:,} of {self.count:,} rows (a uniform random sample, seed {self.seed}); "
                f"{fd}.")


def load_for_evaluation(store: Store, data_url: str, *, max_rows: int | None = None,
                        seed: int = REFERENCE_SEED) -> RealReference:
    """The real reference of a prepared dataset (:class:`RealReference`): at most ``max_rows``
    rows (None: ``FLOOR_MAX_SAMPLES``, 50,000) read one shard at a time, with their labels and
    the feature network; for a larger image set also the reference statistics of all rows.
    Memory: the reference (50,000 x the sample size x 4 bytes at most) plus one shard."""
    bound = FLOOR_MAX_SAMPLES if max_rows is None else max_rows
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 2:
        raise CAFMInputError(f"max_rows must be an int >= 2, got {max_rows!r}")
    manifest = read_manifest(store, data_url)
    x, labels, _ = read_sample(store, data_url, manifest, size=bound, seed=seed)
    dataset = _as_dataset(x, labels, manifest)
    feature_net = load_feature_net(store, data_url) if dataset.kind == "image" and dataset.labels is not None else None
    stats = load_reference_stats(store, data_url) if feature_net is not None and len(x) < manifest["count"] else None
    return RealReference(dataset, manifest, feature_net, stats, seed, data_url)


def load_for_protocol(store: Store, protocol, data_url: str | None = None) -> RealReference:
    """:func:`load_for_evaluation` as ``protocol`` (``cafm_core.protocol.EvaluationProtocol``)
    says: its ``reference_rows`` bound (None: the default). A protocol that claims every row
    of a set the bound samples (made before the bound) is refused, not mislabelled."""
    reference = load_for_evaluation(store, data_url or protocol.data_url, max_rows=protocol.reference_rows)
    if (reference.rows if reference.sampled else None) != protocol.reference_rows:
        raise CAFMInputError(
            f"protocol {protocol.id} compares with "
            f"{'all' if protocol.reference_rows is None else f'{protocol.reference_rows:,}'} real rows of "
            f"{protocol.dataset_name}; the evaluation reads {reference.rows:,} of {reference.count:,}: build the "
            "protocol again (tasks.dataset_format.evaluation_protocol)")
    return reference


def _require_feature_net(manifest: dict, data_url: str) -> None:
    if manifest.get("feature_net") is None:
        reason = manifest.get("feature_net_skipped") or "none was trained"
        raise CAFMInputError(f"prepared dataset {data_url} has no feature network ({reason})")


def load_feature_net(store: Store, data_url: str):
    """The in-domain feature network (``DigitFeatureNet``, eval mode) of a prepared image dataset."""
    from cafm_core.checkpoint import load_state_dict_checked

    manifest = read_manifest(store, data_url)
    _require_feature_net(manifest, data_url)
    tensors, config, _ = store.read_checkpoint(join_url(data_url, manifest["feature_net"]["path"]))
    model = DigitFeatureNet.from_config(config)
    load_state_dict_checked(model, tensors)
    return model.eval()


def load_reference_stats(store: Store, data_url: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` (float64) of the real data's features in the feature network's space."""
    from safetensors.numpy import load as st_load

    manifest = read_manifest(store, data_url)
    _require_feature_net(manifest, data_url)
    entry = manifest["reference_stats"]
    url = join_url(data_url, entry["path"])
    data = store.read_bytes(url)
    if sha256_hex(data) != entry["sha256"]:
        raise CAFMInputError(f"checksum mismatch for {url}: sha256 differs from the manifest (corrupted)")
    tensors = st_load(data)
    return tensors["mu"], tensors["sigma"]


# ---- identity and evaluation protocol -----------------------------------------------------


def dataset_identity(manifest: dict) -> str:
    """The content identity of a prepared dataset: a hash of its shards' checksums, kind,
    shape and classes (not of where it lives or when it was written). Generators record the
    identity of the data they were trained on; evaluation protocols that of their held set."""
    payload = {"kind": manifest["kind"], "sample_shape": list(manifest["sample_shape"]),
               "num_classes": manifest["num_classes"], "shards": [shard["sha256"] for shard in manifest["shards"]]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def evaluation_protocol(store: Store, data_url: str, *, settings, seeds, num_samples: int | None = None,
                        shard_size: int = 1024):
    """The ``cafm_core.protocol.EvaluationProtocol`` of a prepared dataset as the held set:
    its identity, the hashes of its frozen feature network (the checkpoint's checksum marker)
    and reference statistics, and the sampling. ``num_samples`` defaults to min(dataset
    size, 50,000) for images (``cafm_core.protocol.default_image_samples``) and 10,000 for points.
    A set larger than ``FLOOR_MAX_SAMPLES`` is compared with a sample of that many rows
    (``reference_rows``; :func:`load_for_evaluation`)."""
    from cafm_core.checkpoint import MARKER_FILE
    from cafm_core.protocol import EvaluationProtocol, default_image_samples

    manifest = read_manifest(store, data_url)
    image = manifest["kind"] == "image"
    feature_net = reference_stats = None
    if manifest.get("feature_net") is not None:
        marker = store.read_bytes(join_url(data_url, manifest["feature_net"]["path"], MARKER_FILE))
        feature_net = sha256_hex(marker)
        reference_stats = manifest["reference_stats"]["sha256"]
    classes = manifest["num_classes"] if image else 0  # point models are unconditional
    counts = manifest.get("class_counts") if classes else None
    return EvaluationProtocol(
        dataset=dataset_identity(manifest), dataset_name=manifest["name"], kind=manifest["kind"],
        sample_shape=tuple(manifest["sample_shape"]),
        num_classes=classes, class_counts=tuple(counts) if counts else None, feature_net=feature_net,
        reference_stats=reference_stats, settings=tuple(settings),
        num_samples=num_samples or (default_image_samples(manifest["count"]) if image else POINTS_SAMPLE_COUNT),
        seeds=tuple(seeds), shard_size=shard_size, data_url=data_url,
        reference_rows=FLOOR_MAX_SAMPLES if manifest["count"] > FLOOR_MAX_SAMPLES else None,
    )

