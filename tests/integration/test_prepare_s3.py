"""Preparation and storage on s3:// against moto's S3 server on 127.0.0.1 (see conftest.py).

Credentials reach s3fs/botocore only through the environment the fixture sets. moto accepts
any credentials unless its request authentication is switched on; ``s3_auth_enforced`` does
that for the "credentials rejected" tests, with a real IAM key pair created in moto.
"""

from __future__ import annotations

import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cafm_core.checks import CAFMInputError
from cafm_core.data import images_to_uint8, load_builtin, uint8_to_images
from cafm_core.features import DigitFeatureNet
from tasks.dataset_format import load_feature_net, load_prepared, load_reference_stats, shard_urls
from tasks.prepare import prepare_dataset
from tasks.storage import COMPLETE_FILE, IncompleteOutputError, StorageError, Store, check_reachable, join_url

from .conftest import TEST_SECRET_KEY

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _keys(s3_client, bucket_url: str) -> list[str]:
    bucket = bucket_url[len("s3://") :]
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_s3fs_honours_aws_endpoint_url(s3_server, s3_bucket):
    store = Store(s3_bucket)
    store.write_bytes(store.url("probe.txt"), b"hello")
    assert store.filesystem.s3.meta.endpoint_url == s3_server["endpoint"]
    assert store.read_bytes(store.url("probe.txt")) == b"hello"


def test_digits_prepared_on_s3(s3_bucket, s3_client):
    store = Store(f"{s3_bucket}/run1", backoff_s=0.0)
    out = store.url("data", "digits")
    manifest = prepare_dataset("digits", store, out, feature_steps=20, shard_size=1000)
    assert manifest["count"] == 1797 and manifest["sample_shape"] == [1, 8, 8] and manifest["num_classes"] == 10

    prefix = "run1/data/digits/"
    assert _keys(s3_client, s3_bucket) == sorted(
        prefix + key
        for key in (
            "_COMPLETE.json",
            "feature_net/checkpoint.json",
            "feature_net/config.json",
            "feature_net/model.safetensors",
            "manifest.json",
            "reference_stats.safetensors",
            "shards/part-00000.parquet",
            "shards/part-00001.parquet",
        )
    )
    head = s3_client.head_object(Bucket=s3_bucket[len("s3://") :], Key=prefix + "shards/part-00001.parquet")
    assert head["ContentLength"] == manifest["shards"][1]["bytes"]

    dataset, _ = load_prepared(store, out)
    builtin = load_builtin("digits")
    reference = torch.from_numpy(uint8_to_images(images_to_uint8(builtin.data)))  # stored as uint8
    assert torch.equal(dataset.data, reference) and torch.equal(dataset.labels, builtin.labels)
    assert shard_urls(store, out) == [f"{out}/shards/part-00000.parquet", f"{out}/shards/part-00001.parquet"]
    model = load_feature_net(store, out)
    assert isinstance(model, DigitFeatureNet) and not model.training
    mu, sigma = load_reference_stats(store, out)
    assert mu.shape == (64,) and sigma.shape == (64, 64)

    # A store unpickled elsewhere (e.g. on a Ray worker) rebuilds its client from the environment.
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(load_prepared(clone, out)[0].data, reference)


def test_incomplete_output_on_s3_is_not_loaded(s3_bucket, s3_client):
    store = Store(s3_bucket)
    out = store.url("g8")
    prepare_dataset("eight_gaussians", store, out, num_samples=100)
    s3_client.delete_object(Bucket=s3_bucket[len("s3://") :], Key=f"g8/{COMPLETE_FILE}")
    with pytest.raises(IncompleteOutputError, match="_COMPLETE.json is missing"):
        load_prepared(store, out)


def test_store_operations_and_checkpoints_on_s3(s3_bucket, tmp_path):
    store = Store(f"{s3_bucket}/ops", backoff_s=0.0)
    store.write_json(store.url("a", "x.json"), {"v": 1})
    store.write_bytes(store.url("a", "y.bin"), b"bytes")
    assert store.read_json(store.url("a", "x.json")) == {"v": 1}
    assert store.list(store.url("a")) == [store.url("a", "x.json"), store.url("a", "y.bin")]
    assert store.exists(store.url("a", "y.bin")) and not store.exists(store.url("a", "z.bin"))
    with pytest.raises(FileNotFoundError, match="z.bin"):
        store.read_bytes(store.url("a", "z.bin"))

    ckpt = store.url("ckpt")
    tensors = {"w": torch.randn(3, 4)}
    store.write_checkpoint(ckpt, tensors, {"width": 4}, {"step": 1})
    loaded, config, metadata = store.read_checkpoint(ckpt)
    assert torch.equal(loaded["w"], tensors["w"]) and config == {"width": 4} and metadata == {"step": 1}

    local = store.download_dir(ckpt, tmp_path / "ckpt")
    assert sorted(os.listdir(local)) == ["checkpoint.json", "config.json", "model.safetensors"]
    copy = store.url("ckpt_copy")
    uploaded = store.upload_dir(local, copy, marker_last="checkpoint.json")
    assert uploaded[-1] == join_url(copy, "checkpoint.json")
    assert torch.equal(store.read_checkpoint(copy)[0]["w"], tensors["w"])

    store.remove(join_url(copy, "checkpoint.json"), recursive=False)
    with pytest.raises(IncompleteOutputError, match="incomplete"):
        store.read_checkpoint(copy)

    store.mark_complete(store.url("stage"), {"n": 1})
    assert store.completed(store.url("stage"))["outputs"] == {"n": 1}
    assert store.remove(store.url("a")) is True and store.list(store.url("a")) == []


def test_image_folder_source_on_s3(s3_bucket, s3_client, tmp_path):
    bucket = s3_bucket[len("s3://") :]
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(3):
            path = tmp_path / f"{name}{i}.png"
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(path)
            s3_client.upload_file(str(path), bucket, f"raw/{name}/{i}.png")
    s3_client.put_object(Bucket=bucket, Key="raw/b/bad.png", Body=b"garbage")
    store = Store(s3_bucket)
    manifest = prepare_dataset(
        f"{s3_bucket}/raw", store, store.url("prepared"), resolution=8, channels=1,
        max_bad_fraction=0.2, feature_steps=5,
    )
    assert manifest["count"] == 6 and manifest["class_names"] == ["a", "b"]
    assert manifest["bad_files"]["num_bad"] == 1 and manifest["bad_files"]["bad_files"][0].endswith("raw/b/bad.png")
    assert load_prepared(store, store.url("prepared"))[0].data.shape == (6, 1, 8, 8)

    with pytest.raises(CAFMInputError, match="no-such-folder.*does not exist"):
        prepare_dataset(f"{s3_bucket}/no-such-folder", store, store.url("p2"), resolution=8, channels=1)
    assert not [key for key in _keys(s3_client, s3_bucket) if key.startswith("p2/")]


def test_check_reachable_ok(s3_bucket, s3_client):
    check_reachable(f"{s3_bucket}/some/prefix")
    assert _keys(s3_client, s3_bucket) == []  # the probe object was removed


def test_check_reachable_missing_bucket(s3_server):
    with pytest.raises(StorageError) as info:
        check_reachable("s3://cafm-no-such-bucket/run")
    message = str(info.value)
    assert "bucket 'cafm-no-such-bucket' does not exist" in message
    assert s3_server["endpoint"] in message and "s3://cafm-no-such-bucket/run" in message
    assert TEST_SECRET_KEY not in message


def test_check_reachable_unreachable_endpoint_fails_fast(s3_server, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        check_reachable("s3://any-bucket/run")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "endpoint unreachable" in message and endpoint in message and "s3://any-bucket/run" in message
    assert TEST_SECRET_KEY not in message


def test_check_reachable_rejected_credentials(s3_auth_enforced, monkeypatch):
    bucket_url, key_id, secret = s3_auth_enforced
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    check_reachable(bucket_url)  # the real key pair works while authentication is enforced

    wrong_secret = "wrong-secret-value-1234"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(StorageError) as info:
        check_reachable(bucket_url)
    message = str(info.value)
    assert "credentials rejected" in message and "SignatureDoesNotMatch" in message and bucket_url in message
    assert wrong_secret not in message and secret not in message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    with pytest.raises(StorageError, match="credentials rejected.*InvalidAccessKeyId") as info:
        check_reachable(bucket_url)
    assert wrong_secret not in str(info.value)


def test_download_dir_refuses_a_key_that_climbs_out_of_the_target(s3_bucket, s3_client, tmp_path):
    """A bucket holding `ckpt/../../escaped.txt` (S3 keys may contain '..') cannot make a
    download write outside the target folder."""
    from tasks.storage import StorageError, Store

    bucket = s3_bucket.removeprefix("s3://")
    s3_client.put_object(Bucket=bucket, Key="ckpt/checkpoint.json", Body=b"{}")
    s3_client.put_object(Bucket=bucket, Key="ckpt/../../escaped.txt", Body=b"x")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="ckpt/").get("Contents", [])]
    assert "ckpt/../../escaped.txt" in keys  # the crafted key is really there
    target = tmp_path / "a" / "b" / "download"
    with pytest.raises(StorageError, match="leaves the target folder"):
        Store(s3_bucket).download_dir(f"{s3_bucket}/ckpt", target)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
