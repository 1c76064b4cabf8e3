"""Bad inputs not covered elsewhere: huge images, oversized files, other URL schemes, a one-image
folder, checkpoints of another size.

The full table (case -> test) is in docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cafm_core import data as data_module
from cafm_core.checkpoint import load_checkpoint, load_model, load_state_dict_checked, save_checkpoint, save_model
from cafm_core.checks import CAFMInputError
from cafm_core.data import MAX_IMAGE_PIXELS, read_image_folder
from cafm_core.models import build_generator, dit_config
from tasks.prepare import prepare_dataset
from tasks.storage import Store


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` grayscale pixels, with no pixel data:
    what a decompression bomb looks like to a reader that trusts the header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _small_folder(root, count_per_class: int = 2) -> str:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(count_per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("side", [9000, 20000])
def test_huge_image_is_a_counted_bad_file_never_decoded(tmp_path, side):
    # 9000^2 = 81 Mpx passes PIL's own limit silently; 20000^2 = 400 Mpx trips PIL's too.
    assert side * side > MAX_IMAGE_PIXELS
    source = _small_folder(tmp_path / "raw")
    (tmp_path / "raw" / "a" / "huge.png").write_bytes(_png_header_only(side, side))
    dataset, report = read_image_folder(source, resolution=8, channels=3, max_bad_fraction=0.5)
    assert report.num_bad == 1 and report.bad_files[0].endswith("huge.png")
    assert "pixels" in report.bad_reasons[0] or "decompression bomb" in report.bad_reasons[0].lower()
    assert len(dataset) == 4
    with pytest.raises(CAFMInputError, match=r"1 of 5 image files are unreadable"):
        read_image_folder(source, resolution=8, channels=3)  # default: no bad file tolerated


def test_pixel_limit_applies_before_decoding(tmp_path, monkeypatch):
    # A real, decodable image just above a (lowered) limit is refused with the size named.
    monkeypatch.setattr(data_module, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    source = _small_folder(tmp_path / "raw")
    Image.new("RGB", (32, 32)).save(tmp_path / "raw" / "b" / "big.png")
    _, report = read_image_folder(source, resolution=8, channels=3, max_bad_fraction=0.5)
    assert report.num_bad == 1 and "32x32 = 1,024 pixels, above the limit of 1,023" in report.bad_reasons[0]


@pytest.mark.parametrize("bad", [0, 1])
def test_a_folder_with_one_readable_image_is_refused_and_nothing_written(tmp_path, bad):
    (tmp_path / "raw" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "raw" / "a" / "only.png")
    if bad:
        (tmp_path / "raw" / "a" / "broken.png").write_bytes(b"not a png")
    store = Store(str(tmp_path / "store"))
    with pytest.raises(CAFMInputError, match=r"has 1 readable image\(s\); at least 2 are needed"):
        prepare_dataset(str(tmp_path / "raw"), store, store.url("one"), resolution=8, channels=1,
                        max_bad_fraction=0.9)
    assert not os.path.exists(store.url("one"))


def test_two_images_are_enough(tmp_path):
    source = _small_folder(tmp_path / "raw", count_per_class=1)
    dataset, report = read_image_folder(source, resolution=8, channels=1)
    assert len(dataset) == 2 and report.num_bad == 0


# ---- checkpoints of another model size ---------------------------------------------------


def _generator(preset: str):
    torch.manual_seed(0)
    return build_generator(dit_config(preset, image_size=8, in_channels=1, patch_size=2, num_classes=10))


def test_checkpoint_of_another_size_is_refused_and_the_module_untouched(tmp_path):
    save_model(tmp_path / "mini", _generator("mini"))
    tensors, _, _ = load_checkpoint(tmp_path / "mini")
    tiny = _generator("tiny")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(CAFMInputError, match=r"state dict does not fit DiT;.*shape mismatches.*expected \(64"):
        load_state_dict_checked(tiny, {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    # the checkpoint itself is fine: it rebuilds as what it is
    assert load_model(tmp_path / "mini").config.hidden_size == 128


def test_checkpoint_whose_config_and_weights_disagree_is_refused(tmp_path):
    # weights of a mini model under a tiny model's config (e.g. a hand-edited or mixed-up folder)
    tensors, _, metadata = load_checkpoint(save_model(tmp_path / "mini", _generator("mini")))
    tiny_config = _generator("tiny").config.to_dict()
    save_checkpoint(tmp_path / "mixed", tensors, tiny_config, metadata)
    with pytest.raises(CAFMInputError, match="shape mismatches"):
        load_model(tmp_path / "mixed")


@pytest.mark.parametrize("cut", ["zero-byte", "half"])
def test_truncated_checkpoint_is_refused_by_its_checksum(tmp_path, cut):
    directory = save_model(tmp_path / "g", _generator("tiny"))
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"" if cut == "zero-byte" else data[: len(data) // 2])
    with pytest.raises(CAFMInputError, match="checksum mismatch for model.safetensors: size"):
        load_model(directory)


# ---- image files above the size cap ---------------------------------------------------------


def _oversized_png(path, size: int) -> None:
    """A valid, decodable PNG padded with trailing bytes to ``size`` bytes: only its size is wrong."""
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    with open(path, "ab") as fh:
        fh.write(b"\0" * (size - os.path.getsize(path)))


def _fetched_paths(monkeypatch) -> list[str]:
    from fsspec.implementations.local import LocalFileSystem

    fetched, real = [], LocalFileSystem.cat_file

    def spy(self, path, *args, **kwargs):
        fetched.append(str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", spy)
    return fetched


CAP_REASON = r"file is 5,000 bytes, above the size cap of 2,000 bytes \(data.max_file_bytes\); not read"


def test_an_image_above_the_size_cap_is_a_counted_bad_file_never_read(tmp_path, monkeypatch):
    source = _small_folder(tmp_path / "raw")
    _oversized_png(tmp_path / "raw" / "b" / "big.png", 5000)
    store = Store(str(tmp_path / "store"))
    fetched = _fetched_paths(monkeypatch)
    manifest = prepare_dataset(source, store, store.url("x"), resolution=8, channels=3, max_bad_fraction=0.3,
                               max_file_bytes=2000, feature_steps=5, engine="local")
    report = manifest["bad_files"]
    assert manifest["count"] == 4 and report["num_bad"] == 1 and report["bad_files"][0].endswith("b/big.png")
    assert re.fullmatch(r"OSError: " + CAP_REASON, report["bad_reasons"][0])
    assert not [path for path in fetched if path.endswith("big.png")]  # skipped before it was read
    assert manifest["params"]["max_file_bytes"] == 2000
    # the default policy (no bad file tolerated): refused, the reason named
    with pytest.raises(CAFMInputError, match=r"1 of 5 image files are unreadable.*big.png.*above the size cap"):
        prepare_dataset(source, store, store.url("y"), resolution=8, channels=3, max_file_bytes=2000)
    # under the default cap (50 MiB) the same file is an ordinary image
    assert prepare_dataset(source, store, store.url("z"), resolution=8, channels=3, feature_steps=5)["count"] == 5


def test_the_in_memory_reader_applies_the_same_cap(tmp_path):
    source = _small_folder(tmp_path / "raw")
    _oversized_png(tmp_path / "raw" / "a" / "big.png", 5000)
    dataset, report = read_image_folder(source, resolution=8, channels=3, max_bad_fraction=0.3, max_file_bytes=2000)
    assert len(dataset) == 4 and report.bad_files[0].endswith("a/big.png")
    assert CAP_REASON.replace("\\", "") in report.bad_reasons[0]


def test_a_file_grown_past_the_cap_since_listing_is_refused_after_the_read(tmp_path):
    from tasks.image_shards import ChunkSpec, prepare_chunk

    source = _small_folder(tmp_path / "raw")
    big = tmp_path / "raw" / "a" / "big.png"
    _oversized_png(big, 5000)
    spec = ChunkSpec(0, 0, source, [str(big)], [0], [100], resolution=8, channels=3, max_file_bytes=2000)
    store = Store(str(tmp_path / "store"))
    record = prepare_chunk(store, store.url("x"), spec)
    assert record["rows"] == 0 and CAP_REASON.replace("\\", "") in record["bad_reasons"][0]


def test_the_cap_travels_with_a_chunk_to_ray_workers_and_keys_its_shard():
    from tasks.image_shards import ChunkSpec

    spec = ChunkSpec(3, 48, "s3://b/raw", ["s3://b/raw/a/0.png"], [0], [10], resolution=8, channels=3,
                     max_file_bytes=1234)
    assert ChunkSpec.from_json(spec.to_json()) == spec  # what the Ray Data engine's tasks receive
    other = ChunkSpec(3, 48, "s3://b/raw", ["s3://b/raw/a/0.png"], [0], [10], resolution=8, channels=3)
    assert other.max_file_bytes == 50 * 1024 * 1024 and other.key != spec.key  # another cap: the shard is redone


@pytest.mark.parametrize("source", ["http://example.com/raw", "memory://raw", "gcs://bucket/raw",
                                    "simplecache::file:///tmp/raw"])
def test_prepare_refuses_a_source_scheme_other_than_local_file_and_s3(tmp_path, source):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(CAFMInputError, match=r"is not supported; give a built-in name, a local path, file://"):
        prepare_dataset(source, store, store.url("x"), resolution=8, channels=3)
    assert not os.path.exists(store.url("x"))
