"""The prepared Parquet shards as training batches: checked before Ray starts, read with
Ray Data, collated into tensors in the workers.

A shard row is ``x`` (the sample flattened: uint8 pixels 0..255 for images, floats for
points and for the float32 image shards of older runs) and, for labelled data, ``label``
(an int; null for unlabelled rows). uint8 pixels become float32 ``u / 127.5 - 1`` in
[-1, 1] when a batch is collated; the Parquet type decides. The format's writer is the
prepare stage (``tasks.dataset_format``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import Tensor

from cafm_core.data import uint8_to_images
from tasks.arrow_storage import filesystem_and_paths

__all__ = ["IN_MEMORY_MAX_BYTES", "ShardCollate", "holds_in_memory", "in_memory_batches", "inspect_shards", "read_rows",
           "read_shards", "worker_batches"]

SHUFFLE_BUFFER_MIN = 1024


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


def inspect_shards(urls: list[str], sample_shape: tuple[int, ...], num_classes: int) -> int:
    """Check every shard's schema against ``sample_shape``/labels from its Parquet metadata
    (no rows are read); return the total row count."""
    fs, paths = filesystem_and_paths(urls)
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
            raise ValueError(f"shard {url!r}: column 'x' must be a list of floats or uint8 pixels, got {x_type}")
        if not (pa.types.is_floating(x_type.value_type) or x_type.value_type == pa.uint8()):
            raise ValueError(f"shard {url!r}: column 'x' must hold floats or uint8 pixels, got {x_type.value_type}")
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


def read_shards(urls: list[str], columns: list[str]):
    """``ray.data.read_parquet`` over the shards, with Ray Data's V1 Parquet reader by default
    (the V2 reader starts 32 footer-reader actors per epoch; docs/ray.md). Setting
    ``RAY_DATA_USE_DATASOURCE_V2=1`` in the environment keeps V2."""
    from ray.data import DataContext

    fs, paths = filesystem_and_paths(urls)
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


class ShardCollate(ArrowBatchCollateFn):
    """Arrow batch -> ``(x [B, *sample_shape] float32, labels [B] int64 or None)``; uint8
    pixels are scaled to [-1, 1] here.

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
        if values.dtype == "uint8":  # image pixels: scaled to [-1, 1] (a new, writable array)
            x = torch.from_numpy(uint8_to_images(values).reshape(rows, *self.sample_shape))
        else:
            x = torch.tensor(values.reshape(rows, *self.sample_shape), dtype=torch.float32)  # copies: Arrow memory is read-only
        if self.num_classes == 0 or "label" not in batch.column_names:
            return x, None
        labels = pc.fill_null(batch.column("label"), self.num_classes).to_numpy()
        y = torch.tensor(labels, dtype=torch.int64)
        if rows and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        return x, y


IN_MEMORY_MAX_BYTES = 1 << 30
"""Prepared data of at most this many bytes as float32 tensors is read by every worker once,
straight from the shards, and held in memory (on its GPU when it has one); later epochs are
drawn there. Ray Data is then not involved at all: no streaming execution to start per stage,
and none restarted every epoch (digits, 14 batches an epoch, would restart it every 14 steps).
Larger data streams from storage through Ray Data every epoch."""


def holds_in_memory(rows: int, sample_shape: tuple[int, ...]) -> bool:
    """Whether ``rows`` prepared rows are read once and held in memory (:data:`IN_MEMORY_MAX_BYTES`)."""
    return rows * (4 * math.prod(sample_shape) + 8) <= IN_MEMORY_MAX_BYTES


def read_rows(urls: list[str], collate: ShardCollate, rank: int, world_size: int) -> tuple[Tensor, Tensor | None]:
    """This worker's equal share of the shards' rows, read with pyarrow (no Ray Data) and
    collated: every ``world_size``-th row from ``rank`` on, ``total // world_size`` rows."""
    fs, paths = filesystem_and_paths(urls)
    columns = ["x", "label"] if collate.num_classes > 0 else ["x"]
    table = pa.concat_tables([pq.read_table(path, filesystem=fs, columns=columns) for path in paths])
    share = table.num_rows // world_size
    return collate(table.take(pa.array(range(rank, share * world_size, world_size), type=pa.int64())))


def worker_batches(batch_size: int, collate: ShardCollate, device: torch.device, *,
                   rows: tuple[Tensor, Tensor | None] | None = None, seed: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
    """This Ray Train worker's batches, epoch after epoch, on ``device``: drawn from ``rows``
    held in memory (:func:`read_rows`), reshuffled each epoch with a generator seeded by
    ``seed``; or, without ``rows``, streamed from Ray Data's shard of the dataset each epoch."""
    if rows is not None:
        yield from in_memory_batches(rows, batch_size, device, seed=seed)
        return
    shard = ray.train.get_dataset_shard("train")
    while True:
        count = 0
        for x, y in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_MIN, 4 * batch_size),
            collate_fn=collate,
            prefetch_batches=2,
            pin_memory=device.type == "cuda",
        ):
            count += 1
            yield x.to(device, non_blocking=True), (None if y is None else y.to(device, non_blocking=True))
        if count == 0:
            raise RuntimeError(f"this worker's data shard holds fewer than batch_size={batch_size} rows")


def in_memory_batches(rows: tuple[Tensor, Tensor | None], batch_size: int, device: torch.device, *,
                      seed: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Endless full batches of ``rows`` (moved to ``device`` once): a fresh permutation each
    epoch, drawn from a CPU generator seeded with ``seed``."""
    x, y = rows
    if device.type == "cuda":
        x, y = x.pin_memory(), (None if y is None else y.pin_memory())
    if x.shape[0] < batch_size:
        raise RuntimeError(f"this worker's data shard holds fewer than batch_size={batch_size} rows ({x.shape[0]})")
    x = x.to(device, non_blocking=True)
    y = None if y is None else y.to(device, non_blocking=True)
    order = torch.Generator().manual_seed(seed)
    while True:
        permutation = torch.randperm(x.shape[0], generator=order).to(device, non_blocking=True)
        for start in range(0, x.shape[0] - batch_size + 1, batch_size):
            index = permutation[start:start + batch_size]
            yield x[index], (None if y is None else y[index])
