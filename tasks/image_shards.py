"""An image folder -> uint8 Parquet shards, streaming: chunk by chunk, in this process or as a
Ray Data pipeline across the cluster, never the whole dataset in one process.

The folder is listed once (``cafm_core.data.list_image_folder``: classes sorted, files sorted
within each class). Chunk ``k`` is files ``k * shard_size ..`` of that listing; one task reads
its files (a batch at a time: concurrent requests on S3; a file listed above the size cap
``max_file_bytes`` is never fetched, it counts as unreadable with its size as the reason),
decodes / converts / crops / resizes them (``cafm_core.data.decode_image_uint8``), writes
shard ``k`` (its readable images; ``index`` = the file's position in the listing, so
unreadable files leave gaps) and then its record ``shards/part-0000k.done.json``: the chunk's
key (the preprocessing settings, the size cap and each file's path, class and size), the
shard's sha256 and rows, its unreadable files with their reasons
and its per-class counts. A rerun finds a chunk whose record has the same key and whose shard
still has the recorded sha256 done, and does not redo it (resume after an interruption).

The driver keeps the listing (paths, not pixels) and one small record per chunk. It counts
unreadable files as records arrive and stops as soon as the policy
(``max_bad_fraction`` of all listed files) is certainly broken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cafm_core.data import MAX_FILE_BYTES, ImageFolderListing, check_file_size, decode_image_uint8
from tasks import dataset_format
from tasks.storage import Store, is_s3_url, join_url, s3_storage_options

logger = logging.getLogger(__name__)

__all__ = ["FETCH_BATCH", "RAY_MIN_FILES", "RAY_MIN_LOCAL_CPUS", "ChunkSpec", "auto_engine", "chunk_specs", "done_path",
           "peak_rss_mb",
           "prepare_chunk", "run_chunks"]

RAY_MIN_FILES = 4096
"""engine="auto": folders with fewer image files are prepared in this process (starting Ray
costs more than it saves); larger ones as a Ray Data pipeline when there is a cluster to
spread over (:func:`auto_engine`)."""
RAY_MIN_LOCAL_CPUS = 4
"""engine="auto" without ``RAY_ADDRESS``: a local Ray only from this many cores on. On 2 cores
Ray's own processes (driver executor, raylet, GCS) cost more than the second core gains:
measured 2,087 images/s with one Ray CPU, 1,874 with two, about 3,500 in this process
(docs/benchmarks.md, "Prepare stage")."""


def auto_engine(num_files: int) -> str:
    """The engine ``engine="auto"`` picks for a folder of ``num_files`` image files."""
    if num_files < RAY_MIN_FILES:
        return "local"
    if os.environ.get("RAY_ADDRESS") or (os.cpu_count() or 1) >= RAY_MIN_LOCAL_CPUS:
        return "ray"
    return "local"
FETCH_BATCH = 64
"""Files a chunk task fetches at once (``fs.cat``: concurrent requests on S3), then decodes one
after another in its own thread: the parallelism is the tasks' (one CPU each)."""


def done_path(number: int) -> str:
    """The record of shard ``number``, relative to the dataset URL (written after the shard)."""
    return dataset_format.shard_path(number).replace(".parquet", ".done.json")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class ChunkSpec:
    """What one chunk task needs: plain data, so it travels to Ray workers as JSON."""

    number: int
    start: int
    source: str
    paths: list[str]
    labels: list[int]
    sizes: list[int]
    resolution: int
    channels: int
    max_file_bytes: int = MAX_FILE_BYTES

    @property
    def key(self) -> str:
        """What the chunk's shard depends on; a recorded shard with another key is redone."""
        payload = {"format": dataset_format.MANIFEST_VERSION, "resolution": self.resolution, "channels": self.channels,
                   "max_file_bytes": self.max_file_bytes,
                   "start": self.start, "files": [list(f) for f in zip(self.paths, self.labels, self.sizes)]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def from_json(cls, text: str) -> ChunkSpec:
        return cls(**json.loads(text))


def chunk_specs(listing: ImageFolderListing, *, source: str, shard_size: int, resolution: int,
                channels: int, max_file_bytes: int = MAX_FILE_BYTES) -> list[ChunkSpec]:
    """The listing cut into chunks of ``shard_size`` files (the last one shorter)."""
    return [
        ChunkSpec(number, start, source, listing.files[start : start + shard_size],
                  listing.labels[start : start + shard_size], listing.sizes[start : start + shard_size],
                  resolution, channels, max_file_bytes)
        for number, start in enumerate(range(0, len(listing), shard_size))
    ]


def _recorded(store: Store, out_url: str, spec: ChunkSpec) -> dict | None:
    """The chunk's record when its shard is done and intact (same key, same sha256), else None."""
    record_url = join_url(out_url, done_path(spec.number))
    try:
        if not store.exists(record_url):
            return None
        record = store.read_json(record_url)
    except (OSError, ValueError):  # an unreadable record: redo the chunk
        return None
    if not isinstance(record, dict) or record.get("key") != spec.key:
        return None
    if record["rows"] == 0:
        return record
    try:
        data = store.read_bytes(join_url(out_url, record["path"]))
    except (OSError, ValueError):
        return None
    return record if dataset_format.sha256_hex(data) == record["sha256"] else None


def prepare_chunk(store: Store, out_url: str, spec: ChunkSpec, *, fetch_batch: int = FETCH_BATCH) -> dict:
    """Shard ``spec.number`` of the folder, or its record when that shard is already done.

    Returns the record (``path``, ``sha256``, ``rows``, ``bytes``, ``bad_files``,
    ``bad_reasons``, ``label_counts``) plus ``reused``, this process's ``pid`` and
    ``peak_rss_mb``. A chunk without a readable image writes no shard (``rows`` 0)."""
    import fsspec

    started = time.perf_counter()
    record = _recorded(store, out_url, spec)
    reused = record is not None
    if record is None:
        options = s3_storage_options() if is_s3_url(spec.source) else {}
        fs, _ = fsspec.core.url_to_fs(spec.source, **options)
        results: list[np.ndarray | str] = []
        for start in range(0, len(spec.paths), fetch_batch):
            paths = spec.paths[start : start + fetch_batch]
            sizes = spec.sizes[start : start + fetch_batch]
            # a file listed above the size cap is never fetched; the others in one go
            wanted = [path for path, size in zip(paths, sizes) if size <= spec.max_file_bytes]
            fetched = fs.cat(wanted, on_error="return") if wanted else {}  # S3: fetched concurrently
            for path, size in zip(paths, sizes):
                raw = fetched.get(path, FileNotFoundError(f"{path} was not returned"))
                try:
                    check_file_size(size, spec.max_file_bytes)
                    if isinstance(raw, BaseException):
                        raise raw
                    check_file_size(len(raw), spec.max_file_bytes)  # grown since it was listed
                    results.append(decode_image_uint8(raw, resolution=spec.resolution, channels=spec.channels))
                except Exception as error:  # any read or decode failure marks the file bad (as the reader does)
                    results.append(f"{type(error).__name__}: {error}")
                del raw
            del fetched
        good = [i for i, result in enumerate(results) if not isinstance(result, str)]
        record = {
            "key": spec.key,
            "number": spec.number,
            "path": dataset_format.shard_path(spec.number),
            "rows": len(good),
            "bad_files": [spec.paths[i] for i, result in enumerate(results) if isinstance(result, str)],
            "bad_reasons": [result for result in results if isinstance(result, str)],
            "label_counts": {},
            "sha256": None,
            "bytes": 0,
        }
        if good:
            x = np.stack([results[i] for i in good])
            sample_shape = tuple(int(s) for s in x.shape[1:])
            labels = np.asarray([spec.labels[i] for i in good], dtype=np.int64)
            index = np.asarray([spec.start + i for i in good], dtype=np.int64)
            data = dataset_format.shard_to_bytes(x.reshape(len(good), -1), labels, index, sample_shape)
            store.write_bytes(join_url(out_url, record["path"]), data)
            values, counts = np.unique(labels, return_counts=True)
            record.update(sha256=dataset_format.sha256_hex(data), bytes=len(data),
                          label_counts={str(int(v)): int(c) for v, c in zip(values, counts)})
        store.write_json(join_url(out_url, done_path(spec.number)), record)  # last: the shard is done
    return {**record, "reused": reused, "files": len(spec.paths), "seconds": time.perf_counter() - started,
            "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


def _chunk_batch(batch: dict, store: Store, out_url: str) -> dict:
    """Ray Data ``map_batches`` function: chunk specs (JSON) -> records (JSON)."""
    out = [json.dumps(prepare_chunk(store, out_url, ChunkSpec.from_json(str(text)))) for text in batch["spec"]]
    return {"record": np.asarray(out, dtype=object)}


def _run_local(store: Store, out_url: str, specs: list[ChunkSpec]) -> Iterator[dict]:
    for spec in specs:
        yield prepare_chunk(store, out_url, spec)


def _run_ray(store: Store, out_url: str, specs: list[ChunkSpec]) -> Iterator[dict]:
    """The chunks as a Ray Data pipeline: one block per chunk, a ``map_batches`` task each
    (one CPU), records streamed back as they finish (in any order)."""
    import ray

    items = [{"spec": spec.to_json()} for spec in specs]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _chunk_batch, batch_size=1, batch_format="numpy", num_cpus=1,
        fn_kwargs={"store": store, "out_url": out_url},
    )
    for row in dataset.iter_rows():
        yield json.loads(row["record"])


def run_chunks(store: Store, out_url: str, specs: list[ChunkSpec], *, engine: str,
               on_record: Callable[[dict], bool] | None = None) -> dict[int, dict]:
    """Every chunk's record, by number. ``engine``: "local" (this process, chunk after chunk)
    or "ray" (a Ray Data pipeline; Ray must be initialised). ``on_record(record)`` sees each
    record as it arrives; returning False stops the run (the remaining chunks are not read)."""
    runner = _run_ray if engine == "ray" else _run_local
    records: dict[int, dict] = {}
    files = done_files = 0
    total = sum(len(spec.paths) for spec in specs)
    started = last_log = time.perf_counter()
    stream = runner(store, out_url, specs)
    try:
        for record in stream:
            records[record["number"]] = record
            files += record["files"]
            done_files += record["files"] if record["reused"] else 0
            now = time.perf_counter()
            if now - last_log > 10 or len(records) == len(specs):
                last_log = now
                logger.info("prepare: %d/%d shards, %d/%d files (%d reused), %.0f files/s", len(records), len(specs),
                            files, total, done_files, (files - done_files) / max(now - started, 1e-9))
            if on_record is not None and on_record(record) is False:
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return records
