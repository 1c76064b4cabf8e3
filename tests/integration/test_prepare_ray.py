"""The prepare stage as a Ray Data pipeline on an image folder on S3 (moto on 127.0.0.1): the
same shards as in one process, resume at the shards not done, and the uint8 shards read back
through Ray Data and the training collate."""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from tasks.dataset_format import load_prepared, shard_urls
from tasks.image_shards import done_path
from tasks.prepare import prepare_dataset
from tasks.ray_cluster import ensure_ray
from tasks.storage import Store, join_url
from tasks.train.shards import ShardCollate, read_shards

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _upload_folder(s3_client, bucket: str) -> None:
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cow"):
        for i in range(20):
            side = int(rng.integers(12, 40))
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(buffer, format="PNG")
            s3_client.put_object(Bucket=bucket, Key=f"raw/{name}/{i:02d}.png", Body=buffer.getvalue())
    s3_client.put_object(Bucket=bucket, Key="raw/bee/zz-broken.png", Body=b"garbage")
    buffer = io.BytesIO()  # a decodable image, but above the size cap (max_file_bytes below): never read
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    s3_client.put_object(Bucket=bucket, Key="raw/cow/zz-huge.png", Body=buffer.getvalue() + b"\0" * 40_000)


def test_ray_data_prepare_on_s3_equals_the_local_one_and_resumes(s3_bucket, s3_client, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _upload_folder(s3_client, s3_bucket[len("s3://") :])
    source = f"{s3_bucket}/raw"
    store = Store(s3_bucket, backoff_s=0.0)
    kwargs = {"resolution": 16, "channels": 3, "shard_size": 16, "max_bad_fraction": 0.05, "feature_steps": 20,
              "max_file_bytes": 30_000}
    local = prepare_dataset(source, store, store.url("local"), engine="local", **kwargs)

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=2)  # the workers get the S3 endpoint and keys from the environment
    try:
        stats = {}
        out = store.url("ray")
        manifest = prepare_dataset(source, store, out, engine="ray", stats=stats, **kwargs)
        assert stats["engine"] == "ray" and stats["reused_shards"] == 0
        assert len(set(stats["workers"])) >= 1 and all(peak > 0 for peak in stats["workers"].values())
        assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local["shards"]]
        assert manifest["count"] == 60 and [s["rows"] for s in manifest["shards"]] == [16, 16, 15, 13]
        bad = manifest["bad_files"]
        assert bad["num_bad"] == 2 and bad["bad_files"][0].endswith("bee/zz-broken.png")
        assert bad["bad_files"][1].endswith("cow/zz-huge.png") and "above the size cap of 30,000 bytes" in bad["bad_reasons"][1]
        assert manifest["reference_stats"]["sha256"] and manifest["class_counts"] == [20, 20, 20]

        # an interrupted run: shard 2 and its record gone; only that chunk is read again
        store.remove(join_url(out, manifest["shards"][2]["path"]), recursive=False)
        store.remove(join_url(out, done_path(2)), recursive=False)
        stats = {}
        again = prepare_dataset(source, store, out, engine="ray", overwrite=True, stats=stats, **kwargs)
        assert stats["reused_shards"] == 3 and again["shards"] == manifest["shards"]

        # the uint8 shards through Ray Data and the training collate: the prepared images in [-1, 1]
        dataset, _ = load_prepared(store, out)
        batches = list(read_shards(shard_urls(store, out), ["x", "label"]).iter_torch_batches(
            batch_size=32, collate_fn=ShardCollate((3, 16, 16), 3)))
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert x.dtype == torch.float32 and x.shape == (60, 3, 16, 16) and -1 <= x.min() and x.max() <= 1
        order = torch.argsort(x.reshape(60, -1).sum(1) * 7 + y)
        reference = torch.argsort(dataset.data.reshape(60, -1).sum(1) * 7 + dataset.labels)
        assert torch.equal(x[order], dataset.data[reference]) and torch.equal(y[order], dataset.labels[reference])
    finally:
        ray.shutdown()
