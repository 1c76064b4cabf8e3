"""The S3 server stopped in the middle of a checkpoint or folder upload (a real moto server on
loopback, stopped and restarted on the same port; its objects live in this process, so they
survive the restart as a real service's would).

What must hold: transient failures are retried with backoff, a server that stays down gives
a clear StorageError naming the URL, and a half-written output never reads back as complete.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
import torch

from cafm_core.checks import CAFMInputError
from tasks.storage import IncompleteOutputError, Store, StorageError

pytestmark = pytest.mark.integration


class StoppableS3:
    """A moto S3 server of its own on a fixed loopback port that can be stopped and restarted."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server_class = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self.server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()
            self.running = True


@pytest.fixture
def outage_s3(s3_server, monkeypatch):
    """``(server, bucket_url)``: a fresh bucket on a server this test may stop."""
    import boto3

    server = StoppableS3()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    bucket = f"cafm-outage-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.close()
    try:
        yield server, f"s3://{bucket}"
    finally:
        server.stop()


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), value), "b": torch.arange(8.0) + value}


def _stop_after_first(monkeypatch, store: Store, method: str, server: StoppableS3, suffix: str) -> list[str]:
    """Stop ``server`` right after ``store.<method>`` has written a URL ending in ``suffix``."""
    original = getattr(store, method)
    written: list[str] = []

    def write_then_maybe_stop(*args):
        original(*args)
        url = args[-1] if method == "_put_file" else args[0]
        written.append(url)
        if url.endswith(suffix):
            server.stop()

    monkeypatch.setattr(store, method, write_then_maybe_stop)
    return written


def test_checkpoint_overwrite_interrupted_by_an_s3_outage_never_reads_back_as_complete(outage_s3, monkeypatch, caplog):
    server, bucket = outage_s3
    store = Store(bucket, retries=3, backoff_s=0.2)
    url = store.url("ckpt")
    store.write_checkpoint(url, _tensors(1.0), {"version": 1})

    written = _stop_after_first(monkeypatch, store, "write_bytes", server, "model.safetensors")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="tasks.storage"), \
            pytest.raises(StorageError, match=r"cannot write .*ckpt/config.json \(endpoint http://127.0.0.1:\d+\): "
                                              r"still failing after 3 attempts"):
        store.write_checkpoint(url, _tensors(2.0), {"version": 2})
    retries = [r.getMessage() for r in caplog.records if "transient error on write" in r.getMessage()]
    assert len(retries) == 2 and "retrying in 0.20s" in retries[0] and "retrying in 0.40s" in retries[1]
    assert time.perf_counter() - started >= 0.6  # the backoff really waited
    assert written[-1].endswith("model.safetensors")  # the new weights landed, the rest did not

    server.start()
    # the old marker was removed before the new weights were written: incomplete, not "v1 config + v2 weights"
    with pytest.raises(IncompleteOutputError, match="checkpoint.json is missing"):
        store.read_checkpoint(url)
    monkeypatch.undo()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    store.write_checkpoint(url, _tensors(2.0), {"version": 2})  # a rerun completes it
    tensors, config, _ = store.read_checkpoint(url)
    assert config == {"version": 2} and torch.equal(tensors["w"], _tensors(2.0)["w"])


def test_a_short_outage_is_ridden_out_by_the_retries(outage_s3):
    # s3fs/botocore retry each request with backoff (about 5 s), Store retries whole operations
    # around that: a server back within a second is never noticed by the caller
    server, bucket = outage_s3
    store = Store(bucket, retries=4, backoff_s=0.5)
    url = store.url("ckpt")
    server.stop()
    restart = threading.Timer(1.0, server.start)
    started = time.perf_counter()
    restart.start()
    try:
        store.write_checkpoint(url, _tensors(3.0), {"version": 3})
    finally:
        restart.join()
    assert time.perf_counter() - started >= 1.0  # it did wait for the server
    tensors, config, _ = store.read_checkpoint(url)
    assert config == {"version": 3} and torch.equal(tensors["b"], _tensors(3.0)["b"])


def test_folder_upload_interrupted_by_an_outage_leaves_no_marker(outage_s3, monkeypatch, tmp_path):
    # what the pipeline does with a trained model and what prepare does with shards: files, then the marker
    server, bucket = outage_s3
    store = Store(bucket, retries=2, backoff_s=0.1)
    local = tmp_path / "model"
    from cafm_core.checkpoint import save_checkpoint

    save_checkpoint(local, _tensors(4.0), {"version": 4})
    url = store.url("model")
    _stop_after_first(monkeypatch, store, "_put_file", server, "config.json")
    with pytest.raises(StorageError, match="still failing after 2 attempts"):
        store.upload_dir(str(local), url, marker_last="checkpoint.json")
    server.start()
    assert store.exists(store.url("model", "config.json"))
    assert not store.exists(store.url("model", "checkpoint.json"))
    with pytest.raises(IncompleteOutputError):
        store.read_checkpoint(url)


def test_a_truncated_object_on_s3_fails_its_checksum(outage_s3):
    import boto3

    _, bucket = outage_s3
    store = Store(bucket)
    url = store.url("ckpt")
    store.write_checkpoint(url, _tensors(5.0), {"version": 5})
    data = store.read_bytes(store.url("ckpt", "model.safetensors"))
    client = boto3.client("s3")
    client.put_object(Bucket=bucket[len("s3://"):], Key="ckpt/model.safetensors", Body=data[: len(data) // 2])
    client.close()
    with pytest.raises(CAFMInputError, match="checksum mismatch for model.safetensors: size"):
        store.read_checkpoint(url)
