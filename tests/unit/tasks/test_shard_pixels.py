"""uint8 pixels in the prepared shards: the round trip, the size, every reader (the dataset
readers, the Ray Train collate, the shard check), and float32 shards of older runs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cafm_core.data import images_to_uint8, uint8_to_images
from tasks import dataset_format
from tasks.dataset_format import load_prepared, shard_from_bytes, shard_to_bytes
from tasks.storage import Store
from tasks.train.shards import ShardCollate, inspect_shards

SHAPE = (3, 8, 8)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_uint8_round_trip_through_a_shard():
    images = _images(64)
    pixels = images_to_uint8(images)
    assert pixels.dtype == np.uint8 and pixels.min() >= 0 and pixels.max() <= 255
    data = shard_to_bytes(pixels.reshape(64, -1), np.arange(64) % 3, np.arange(64), SHAPE)
    raw, labels, index = shard_from_bytes(data, "mem", SHAPE, raw=True)
    assert raw.dtype == np.uint8 and np.array_equal(raw, pixels)  # the exact stored values come back
    x, _, _ = shard_from_bytes(data, "mem", SHAPE)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(x, raw.astype(np.float32) / 127.5 - 1)
    assert np.abs(x - images.numpy()).max() <= 1 / 255 + 1e-6  # half a level of 2 / 255
    assert np.array_equal(images_to_uint8(x), pixels)  # quantised values survive a second round trip
    assert np.array_equal(labels, np.arange(64) % 3) and np.array_equal(index, np.arange(64))


def test_uint8_shards_hold_a_quarter_of_the_float32_bytes_in_memory(tmp_path):
    pixels = images_to_uint8(_images(256)).reshape(256, -1)
    uint8_file, float_file = tmp_path / "u8.parquet", tmp_path / "f32.parquet"
    uint8_file.write_bytes(shard_to_bytes(pixels, None, np.arange(256), SHAPE))
    float_file.write_bytes(shard_to_bytes(uint8_to_images(pixels), None, np.arange(256), SHAPE))
    u8, f32 = pq.read_table(uint8_file).column("x"), pq.read_table(float_file).column("x")
    assert u8.type.value_type == pa.uint8() and f32.type.value_type == pa.float32()
    # what a reader, the collate and Ray Data's object store hold: a quarter of the bytes
    assert 3.9 <= pc_values_nbytes(f32) / pc_values_nbytes(u8) <= 4.2
    # on disk Parquet's dictionary encoding already stored the 256 float levels in about a byte each
    assert uint8_file.stat().st_size <= float_file.stat().st_size * 1.02


def pc_values_nbytes(column) -> int:
    return sum(chunk.values.nbytes for chunk in column.chunks)


def test_collate_scales_uint8_and_passes_float32_through():
    images = _images(10)
    pixels = images_to_uint8(images).reshape(10, -1)
    collate = ShardCollate(SHAPE, num_classes=3)
    labels = pa.array([0, 1, 2, None, 0, 1, 2, 0, 1, 2], type=pa.int64())
    uint8_batch = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 192),
                            "label": labels})
    x, y = collate(uint8_batch)
    assert x.dtype == torch.float32 and x.shape == (10, *SHAPE)
    assert torch.equal(x, torch.from_numpy(uint8_to_images(pixels).reshape(10, *SHAPE)))
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]  # null -> the null class
    floats = uint8_to_images(pixels).reshape(-1)
    float_batch = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(floats), 192), "label": labels})
    assert torch.equal(collate(float_batch)[0], x)  # an older float32 shard reads the same


def test_inspect_shards_accepts_uint8_and_float32_and_refuses_other_integers(tmp_path):
    pixels = images_to_uint8(_images(4)).reshape(4, -1)
    (tmp_path / "u8.parquet").write_bytes(shard_to_bytes(pixels, np.zeros(4, dtype=np.int64), np.arange(4), SHAPE))
    (tmp_path / "f32.parquet").write_bytes(
        shard_to_bytes(uint8_to_images(pixels), np.zeros(4, dtype=np.int64), np.arange(4), SHAPE))
    assert inspect_shards([str(tmp_path / "u8.parquet"), str(tmp_path / "f32.parquet")], SHAPE, 3) == 8
    wide = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1).astype(np.int32)), 192)
    pq.write_table(pa.table({"x": wide, "label": pa.array([0] * 4)}), tmp_path / "i32.parquet")
    with pytest.raises(ValueError, match="floats or uint8 pixels, got int32"):
        inspect_shards([str(tmp_path / "i32.parquet")], SHAPE, 3)


def test_a_float32_dataset_of_an_older_run_still_loads(tmp_path):
    """Manifest version 1: float32 pixels, no pixel_encoding entry."""
    store = Store(str(tmp_path))
    out = store.url("old")
    images = torch.from_numpy(uint8_to_images(images_to_uint8(_images(20))))
    labels = np.arange(20) % 2
    shards = [dataset_format.write_shard(store, out, n, images[s : s + 10].reshape(10, -1).numpy(),
                                         labels[s : s + 10], np.arange(s, s + 10), SHAPE)
              for n, s in enumerate((0, 10))]
    manifest = {"format": dataset_format.MANIFEST_FORMAT, "version": 1, "name": "old", "kind": "image", "count": 20,
                "sample_shape": list(SHAPE), "num_classes": 2, "class_names": ["a", "b"], "class_counts": [10, 10],
                "shards": shards}
    dataset_format.write_manifest_and_mark_complete(store, out, manifest)
    assert pq.read_table(store.url("old", "shards", "part-00000.parquet")).column("x").type.value_type == pa.float32()
    dataset, _ = load_prepared(store, out)
    assert torch.equal(dataset.data, images) and dataset.labels.tolist() == labels.tolist()
