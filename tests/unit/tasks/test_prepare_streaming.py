"""The prepare stage with memory flat in the dataset size (in this process; the Ray Data engine
is in tests/integration/test_prepare_ray.py): shards written chunk by chunk with resume, the
bad-file policy stopping early, a bounded feature-network sample, streamed reference statistics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import cafm_core.features as features_module
from cafm_core.checks import CAFMInputError
from cafm_core.data import read_image_folder
from cafm_core.features import extract_features
from cafm_core.metrics import FeatureMoments, feature_statistics
from tasks import image_shards
from tasks import prepare as prepare_module
from tasks.dataset_format import load_feature_net, load_prepared, load_reference_stats, read_manifest, sample_positions
from tasks.image_shards import done_path
from tasks.prepare import prepare_dataset
from tasks.storage import Store, join_url

FEATURE_STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _folder(root, counts: dict[str, int], *, bad: dict[str, int] | None = None, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            size = (10 + i % 5, 9 + i % 3)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"i{i:03d}.png")
    for name, count in (bad or {}).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"b{i:03d}.png").write_bytes(b"not a png")
    return str(root)


def _count_decodes(monkeypatch) -> list[str]:
    calls = []
    real = image_shards.decode_image_uint8

    def counting(raw, **kwargs):
        calls.append(len(raw))
        return real(raw, **kwargs)

    monkeypatch.setattr(image_shards, "decode_image_uint8", counting)
    return calls


# ---- item 2: bounded feature sample, streamed statistics -----------------------------------


def test_reference_stats_are_streamed_shard_by_shard_and_equal_the_in_memory_ones(tmp_path, monkeypatch):
    batches = []
    real_add = FeatureMoments.add

    def spy(self, features):
        batches.append(len(features))
        return real_add(self, features)

    monkeypatch.setattr(FeatureMoments, "add", spy)
    store = Store(str(tmp_path))
    out = store.url("digits")
    manifest = prepare_dataset("digits", store, out, feature_steps=FEATURE_STEPS, shard_size=500)
    assert batches == [500, 500, 500, 297]  # one shard's features at a time
    dataset, _ = load_prepared(store, out)
    mu, sigma = load_reference_stats(store, out)
    mu_ref, sigma_ref = feature_statistics(extract_features(load_feature_net(store, out), dataset.data))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-6, atol=1e-6 * np.abs(sigma_ref).max())
    assert manifest["reference_stats"]["count"] == 1797


def test_the_feature_net_trains_on_a_bounded_seeded_sample(tmp_path, monkeypatch):
    seen = []
    real_train = features_module.train_feature_network

    def spy(dataset, **kwargs):
        seen.append(dataset)
        return real_train(dataset, **kwargs)

    monkeypatch.setattr(features_module, "train_feature_network", spy)
    store = Store(str(tmp_path))
    manifest = prepare_dataset("digits", store, store.url("a"), feature_steps=FEATURE_STEPS, feature_sample=300,
                               shard_size=500, seed=1)
    assert len(seen) == 1 and len(seen[0]) == 300
    assert manifest["feature_net"]["num_train"] + manifest["feature_net"]["num_val"] == 300
    assert manifest["reference_stats"]["count"] == 1797  # the statistics still cover every image
    full, _ = load_prepared(store, store.url("a"))
    positions = torch.from_numpy(sample_positions(1797, 300, 1))
    assert seen[0].pixels.dtype == torch.uint8  # held as uint8, a quarter of float32's memory
    sample = seen[0].images(slice(None))
    assert torch.equal(sample, full.data[positions]) and torch.equal(seen[0].labels, full.labels[positions])
    prepare_dataset("digits", store, store.url("b"), feature_steps=FEATURE_STEPS, feature_sample=300, shard_size=500,
                    seed=2)
    assert not torch.equal(seen[1].pixels, seen[0].pixels)  # another seed, another sample
    assert sorted(set(sample_positions(1797, 300, 1).tolist())) == sample_positions(1797, 300, 1).tolist()
    assert sample_positions(10, 300, 1).tolist() == list(range(10))  # a small set: every row


# ---- item 4: an image folder, chunk by chunk ------------------------------------------------


def test_folder_shards_match_the_in_memory_reader_with_gaps_for_bad_files(tmp_path):
    source = _folder(tmp_path / "raw", {"cat": 5, "dog": 6}, bad={"cat": 1})
    store = Store(str(tmp_path / "store"))
    out = store.url("pets")
    manifest = prepare_dataset(source, store, out, resolution=8, channels=3, max_bad_fraction=0.2,
                               shard_size=4, feature_steps=FEATURE_STEPS)
    assert manifest["count"] == 11 and [s["rows"] for s in manifest["shards"]] == [3, 4, 4]
    assert manifest["class_counts"] == [5, 6] and manifest["bad_files"]["num_bad"] == 1
    assert manifest["pixel_encoding"]["dtype"] == "uint8"
    dataset, _ = load_prepared(store, out)
    direct, _ = read_image_folder(source, resolution=8, channels=3, max_bad_fraction=0.2)
    assert torch.equal(dataset.data, direct.data) and torch.equal(dataset.labels, direct.labels)
    record = Store(str(tmp_path)).read_json(join_url(out, done_path(0)))
    assert record["rows"] == 3 and record["bad_files"][0].endswith("cat/b000.png")


def test_an_interrupted_prepare_resumes_at_the_shards_not_done(tmp_path, monkeypatch):
    source = _folder(tmp_path / "raw", {"a": 7, "b": 7, "c": 7})
    store = Store(str(tmp_path / "store"))
    out = store.url("d")
    kwargs = {"resolution": 8, "channels": 3, "shard_size": 4, "feature_steps": FEATURE_STEPS, "engine": "local"}
    reference = prepare_dataset(source, Store(str(tmp_path / "ref")), str(tmp_path / "ref" / "d"), **kwargs)

    def crash(*args, **kw):
        raise RuntimeError("killed after the shards")

    monkeypatch.setattr(prepare_module, "_write_feature_net_and_stats", crash)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset(source, store, out, **kwargs)
    monkeypatch.undo()
    assert store.completed(out) is None
    decodes = _count_decodes(monkeypatch)
    stats = {}
    manifest = prepare_dataset(source, store, out, stats=stats, **kwargs)
    assert decodes == [] and stats["reused_shards"] == 6  # nothing decoded twice
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]

    # a changed file (another size) and a corrupted shard: exactly their chunks are redone
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(os.path.join(source, "b", "i002.png"))
    with open(os.path.join(out, "shards", "part-00004.parquet"), "r+b") as fh:
        fh.seek(30)
        fh.write(b"\xff\xff")
    stats = {}
    again = prepare_dataset(source, store, out, overwrite=True, stats=stats, **kwargs)
    assert len(decodes) == 8 and stats["reused_shards"] == 4  # chunk 2 (a6, b0-b2) and chunk 4 (b5, b6, c0, c1)
    changed = [i for i, (x, y) in enumerate(zip(again["shards"], reference["shards"])) if x["sha256"] != y["sha256"]]
    assert changed == [2]  # the corrupted one is rewritten as it was
    assert read_manifest(store, out) == again


def test_too_many_bad_files_stop_the_reading_early_and_leave_nothing(tmp_path, monkeypatch):
    source = _folder(tmp_path / "raw", {"b": 10}, bad={"a": 6})
    store = Store(str(tmp_path / "store"))
    decodes = _count_decodes(monkeypatch)
    with pytest.raises(CAFMInputError, match=r"at least 2 of 16 image files are unreadable.*max_bad_fraction 10.0%"
                                             r".*stopped after reading 2"):
        prepare_dataset(source, store, store.url("x"), resolution=8, channels=3, max_bad_fraction=0.1, shard_size=2)
    assert len(decodes) == 2  # the first chunk only: the policy was already broken
    assert not os.path.exists(store.url("x"))


def test_a_class_without_readable_images_is_dropped_and_labels_stay_dense(tmp_path):
    source = _folder(tmp_path / "raw", {"b": 3, "c": 3}, bad={"a": 2})
    store = Store(str(tmp_path / "store"))
    manifest = prepare_dataset(source, store, store.url("x"), resolution=8, channels=3, max_bad_fraction=0.3,
                               shard_size=3, feature_steps=FEATURE_STEPS)
    assert manifest["class_names"] == ["b", "c"] and manifest["num_classes"] == 2 and manifest["class_counts"] == [3, 3]
    assert manifest["bad_files"]["class_counts"] == {"a": 0, "b": 3, "c": 3}
    dataset, _ = load_prepared(store, store.url("x"))
    direct, _ = read_image_folder(source, resolution=8, channels=3, max_bad_fraction=0.3)
    assert torch.equal(dataset.data, direct.data) and dataset.labels.tolist() == direct.labels.tolist() == [0] * 3 + [1] * 3


def test_engine_is_checked_before_anything_is_written(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(CAFMInputError, match=r"engine must be one of \['auto', 'local', 'ray'\], got 'spark'"):
        prepare_dataset("digits", store, store.url("x"), engine="spark")
    with pytest.raises(CAFMInputError, match="feature_sample must be an int >= 2, got 1"):
        prepare_dataset("digits", store, store.url("x"), feature_sample=1)
    assert not os.path.exists(store.root)


def test_auto_engine_uses_ray_for_large_folders_where_there_is_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(image_shards.os, "cpu_count", lambda: 16)
    assert image_shards.auto_engine(4095) == "local" and image_shards.auto_engine(4096) == "ray"
    monkeypatch.setattr(image_shards.os, "cpu_count", lambda: 2)  # Ray's own processes cost more than it gains
    assert image_shards.auto_engine(1_000_000) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert image_shards.auto_engine(1_000_000) == "ray" and image_shards.auto_engine(100) == "local"
