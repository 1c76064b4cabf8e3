"""tasks.prepare (and reading its output with tasks.dataset_format) on a local store: digits, a points set,
an image folder with bad files, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cafm_core.checks import CAFMInputError
from cafm_core.data import images_to_uint8, load_builtin, read_image_folder, uint8_to_images
from cafm_core.features import DigitFeatureNet
from tasks import dataset_format
from tasks import prepare as prepare_module
from tasks.dataset_format import (
    load_feature_net,
    load_prepared,
    load_reference_stats,
    read_manifest,
    shard_urls,
)
from tasks.prepare import prepare_dataset
from tasks.storage import COMPLETE_FILE, IncompleteOutputError, Store, join_url

FEATURE_STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory):
    torch.set_num_threads(1)
    store = Store(str(tmp_path_factory.mktemp("store")), backoff_s=0.0)
    out = store.url("data", "digits")
    manifest = prepare_dataset("digits", store, out, feature_steps=FEATURE_STEPS, shard_size=1000)
    return store, out, manifest


def test_digits_manifest(digits_prepared):
    store, out, manifest = digits_prepared
    assert manifest["name"] == "digits" and manifest["kind"] == "image"
    assert manifest["count"] == 1797
    assert manifest["sample_shape"] == [1, 8, 8]
    assert manifest["num_classes"] == 10 and manifest["class_names"] == [str(d) for d in range(10)]
    assert sum(manifest["class_counts"]) == 1797
    assert [s["rows"] for s in manifest["shards"]] == [1000, 797]
    assert [s["path"] for s in manifest["shards"]] == ["shards/part-00000.parquet", "shards/part-00001.parquet"]
    assert manifest["bad_files"] is None
    assert manifest["preprocessing"]["resolution"] == 8 and manifest["preprocessing"]["channels"] == 1
    assert manifest["feature_net"]["path"] == "feature_net" and 0.0 <= manifest["feature_net"]["val_accuracy"] <= 1.0
    assert manifest["reference_stats"]["feature_dim"] == 64
    assert read_manifest(store, out) == manifest
    record = store.completed(out)
    assert record["outputs"]["count"] == 1797 and record["outputs"]["num_shards"] == 2


def test_digits_shard_checksums_match_files(digits_prepared):
    store, out, manifest = digits_prepared
    for shard, url in zip(manifest["shards"], shard_urls(store, out)):
        data = store.read_bytes(url)
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    stats = store.read_bytes(join_url(out, "reference_stats.safetensors"))
    assert hashlib.sha256(stats).hexdigest() == manifest["reference_stats"]["sha256"]
    assert stats[8:9] == b"{"  # safetensors header, not a pickle


def test_digits_shards_are_plain_parquet(digits_prepared):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, out, _ = digits_prepared
    table = pq.read_table(shard_urls(store, out)[1])
    assert table.column_names == ["x", "label", "index"]
    x_type = table.schema.field("x").type
    assert pa.types.is_fixed_size_list(x_type) and x_type.list_size == 64 and x_type.value_type == pa.uint8()
    assert table.column("index").to_pylist()[0] == 1000
    assert json.loads(table.schema.metadata[b"cafm.sample_shape"]) == [1, 8, 8]


def test_load_prepared_equals_builtin_quantised_to_uint8(digits_prepared):
    store, out, manifest = digits_prepared
    dataset, loaded_manifest = load_prepared(store, out)
    reference = load_builtin("digits")
    assert loaded_manifest == manifest
    assert manifest["pixel_encoding"]["dtype"] == "uint8"
    quantised = torch.from_numpy(uint8_to_images(images_to_uint8(reference.data)))
    assert dataset.data.dtype == torch.float32 and torch.equal(dataset.data, quantised)
    assert (dataset.data - reference.data).abs().max() <= 1 / 255 + 1e-6  # half a level in [-1, 1]
    assert torch.equal(dataset.labels, reference.labels)
    assert dataset.num_classes == 10 and dataset.kind == "image" and dataset.class_names == reference.class_names


def test_feature_net_and_reference_stats(digits_prepared):
    store, out, _ = digits_prepared
    model = load_feature_net(store, out)
    assert isinstance(model, DigitFeatureNet) and not model.training
    logits = model(load_builtin("digits").data[:5])
    assert logits.shape == (5, 10)
    mu, sigma = load_reference_stats(store, out)
    assert mu.dtype == np.float64 and mu.shape == (64,) and sigma.shape == (64, 64)
    np.testing.assert_allclose(sigma, sigma.T)


def test_complete_output_is_reused_and_different_params_refused(digits_prepared, monkeypatch):
    store, out, manifest = digits_prepared

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete output with the same parameters must be reused")

    monkeypatch.setattr(prepare_module, "_load_source", must_not_run)
    again = prepare_dataset("digits", store, out, feature_steps=FEATURE_STEPS, shard_size=1000)
    assert again == manifest
    with pytest.raises(CAFMInputError, match=r"different parameters.*shard_size.*overwrite=True"):
        prepare_dataset("digits", store, out, feature_steps=FEATURE_STEPS, shard_size=500)
    assert store.completed(out) is not None  # the refused call changed nothing


def test_corrupted_shard_is_detected(digits_prepared, tmp_path):
    store, out, _ = digits_prepared
    copy = Store(str(tmp_path / "copy"))
    copy.upload_dir(out, copy.url("d"), marker_last=COMPLETE_FILE)
    shard = copy.url("d", "shards", "part-00001.parquet")
    data = bytearray(copy.read_bytes(shard))
    data[100] ^= 0xFF
    copy.write_bytes(shard, bytes(data))
    with pytest.raises(CAFMInputError, match="checksum mismatch for shard .*part-00001"):
        load_prepared(copy, copy.url("d"))


def test_eight_gaussians_points_without_feature_net(tmp_path):
    store = Store(str(tmp_path))
    out = store.url("g8")
    manifest = prepare_dataset("eight_gaussians", store, out, num_samples=500, shard_size=200, seed=3)
    assert manifest["kind"] == "points" and manifest["count"] == 500 and manifest["sample_shape"] == [2]
    assert [s["rows"] for s in manifest["shards"]] == [200, 200, 100]
    assert manifest["feature_net"] is None and manifest["reference_stats"] is None
    assert "points" in manifest["feature_net_skipped"]
    assert not os.path.exists(os.path.join(out, "feature_net"))
    dataset, _ = load_prepared(store, out)
    reference = load_builtin("eight_gaussians", num_samples=500, seed=3)
    assert torch.equal(dataset.data, reference.data) and torch.equal(dataset.labels, reference.labels)
    with pytest.raises(CAFMInputError, match="has no feature network.*points"):
        load_feature_net(store, out)


def test_unlabelled_points_store_null_labels(tmp_path):
    store = Store(str(tmp_path))
    manifest = prepare_dataset("checkerboard", store, store.url("cb"), num_samples=50)
    assert manifest["num_classes"] == 0 and manifest["class_counts"] is None
    dataset, _ = load_prepared(store, store.url("cb"))
    assert dataset.labels is None
    assert torch.equal(dataset.data, load_builtin("checkerboard", num_samples=50).data)


def _make_image_folder(root, *, bad: int) -> str:
    rng = np.random.default_rng(0)
    for class_index, name in enumerate(["cat", "dog", "fox"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(4):
            size = (12 + 2 * i, 10)  # non-square: center-cropped, then resized
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., class_index] = 255
            Image.fromarray(pixels).save(folder / f"img{i}.png")
    for i in range(bad):
        (root / "dog" / f"broken{i}.png").write_bytes(b"this is not a png")
    (root / "cat" / "notes.txt").write_text("ignored")
    return str(root)


def test_image_folder_with_bad_files_within_the_limit(tmp_path):
    source = _make_image_folder(tmp_path / "raw", bad=2)
    store = Store(str(tmp_path / "store"))
    out = store.url("pets")
    manifest = prepare_dataset(
        source, store, out, resolution=8, channels=3, max_bad_fraction=0.2, feature_steps=FEATURE_STEPS
    )
    assert manifest["name"] == "raw" and manifest["source_type"] == "folder"
    assert manifest["count"] == 12 and manifest["sample_shape"] == [3, 8, 8]
    assert manifest["class_names"] == ["cat", "dog", "fox"] and manifest["class_counts"] == [4, 4, 4]
    bad = manifest["bad_files"]
    assert bad["num_bad"] == 2 and bad["num_images"] == 12 and bad["num_skipped"] == 1
    assert [os.path.basename(f) for f in bad["bad_files"]] == ["broken0.png", "broken1.png"]
    assert "center-cropped" in manifest["preprocessing"]["policy"]
    assert manifest["feature_net"]["config"]["num_classes"] == 3
    dataset, _ = load_prepared(store, out)
    direct, _ = read_image_folder(source, resolution=8, channels=3, max_bad_fraction=0.2)
    assert torch.equal(dataset.data, direct.data) and torch.equal(dataset.labels, direct.labels)
    assert load_feature_net(store, out)(dataset.data).shape == (12, 3)


def test_image_folder_over_the_bad_limit_writes_nothing(tmp_path):
    source = _make_image_folder(tmp_path / "raw", bad=2)
    store = Store(str(tmp_path / "store"))
    out = store.url("pets")
    with pytest.raises(CAFMInputError, match=r"2 of 14 image files are unreadable.*max_bad_fraction"):
        prepare_dataset(source, store, out, resolution=8, channels=3, max_bad_fraction=0.1)
    assert store.completed(out) is None
    assert not os.path.exists(out)


def test_failure_mid_write_leaves_no_complete_marker(tmp_path, monkeypatch):
    source = _make_image_folder(tmp_path / "raw", bad=0)
    store = Store(str(tmp_path / "store"))
    out = store.url("pets")

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while training the feature network")

    monkeypatch.setattr(prepare_module, "_write_feature_net_and_stats", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(source, store, out, resolution=8, channels=1)
    assert store.exists(join_url(out, "shards", "part-00000.parquet"))  # partly written ...
    assert store.completed(out) is None  # ... but never marked complete
    with pytest.raises(IncompleteOutputError, match="_COMPLETE.json is missing"):
        load_prepared(store, out)


def test_overwrite_drops_the_old_marker_first(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    out = store.url("g")
    prepare_dataset("two_moons", store, out, num_samples=40)
    real_shard_to_bytes = dataset_format.shard_to_bytes

    def crash_after_checking(*args, **kwargs):
        assert store.completed(out) is None
        raise RuntimeError("disk full")

    monkeypatch.setattr(dataset_format, "shard_to_bytes", crash_after_checking)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset("two_moons", store, out, num_samples=60, overwrite=True)
    assert store.completed(out) is None
    monkeypatch.setattr(dataset_format, "shard_to_bytes", real_shard_to_bytes)
    assert prepare_dataset("two_moons", store, out, num_samples=60, overwrite=True)["count"] == 60


def test_missing_folder_fails_before_anything_is_written(tmp_path):
    store = Store(str(tmp_path / "store"))
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(CAFMInputError, match="no_such_folder.*does not exist"):
        prepare_dataset(missing, store, store.url("x"), resolution=8, channels=1)
    assert not os.path.exists(store.root)


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("digitz", {}, r"unknown dataset 'digitz'.*'digits'"),
        ("", {}, "source must be"),
        ("digits", {"resolution": 16}, r"'digits' is fixed at 1x8x8.*resolution=16"),
        ("eight_gaussians", {"channels": 3}, "points; resolution/channels do not apply"),
        ("FOLDER", {"channels": 3}, r"needs resolution.*resolution=None"),
        ("FOLDER", {"resolution": 4, "channels": 3}, "resolution must be an int >= 8, got 4"),
        ("FOLDER", {"resolution": 8, "channels": 2}, "channels must be 1 .* got 2"),
        ("digits", {"shard_size": 0}, "shard_size must be an int >= 1, got 0"),
        ("digits", {"max_bad_fraction": 1.5}, r"max_bad_fraction must be a number in \[0, 1\), got 1.5"),
        ("digits", {"feature_steps": 2.5}, "feature_steps must be an int"),
    ],
)
def test_bad_inputs_fail_early_naming_the_value(tmp_path, source, kwargs, message):
    folder = tmp_path / "raw"
    (folder / "a").mkdir(parents=True)
    source = str(folder) if source == "FOLDER" else source
    store = Store(str(tmp_path / "store"))
    with pytest.raises(CAFMInputError, match=message):
        prepare_dataset(source, store, store.url("out"), **kwargs)
    assert not os.path.exists(store.root)


def test_output_inside_the_source_folder_is_refused(tmp_path):
    source = _make_image_folder(tmp_path / "raw", bad=0)
    store = Store(source)
    with pytest.raises(CAFMInputError, match="overlap"):
        prepare_dataset(source, store, store.url("prepared"), resolution=8, channels=3)
    assert not os.path.exists(os.path.join(source, "prepared"))


def test_out_url_on_other_storage_is_refused(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(CAFMInputError, match="does not fit the store"):
        prepare_dataset("digits", store, "s3://bucket/x")
