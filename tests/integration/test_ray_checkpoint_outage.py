"""S3 unreachable while Ray Train uploads a checkpoint (the storage path is ``s3://``).

The S3-compatible server (moto, on loopback) sits behind a small TCP relay that the test can
cut: while it is cut, every connection, open or new, is dropped at once, as when a storage
endpoint goes away. The relay is cut for a few seconds (and until a connection was refused)
right after the step-40 checkpoint lands, so the uploads that follow (Ray's checkpoint copy,
our storage writes) fail. What must hold: training ends at its last step, every reported step
appears once, and every checkpoint folder on S3 either verifies or is not marked complete.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cafm_core.data import load_builtin
from cafm_core.models import MLPConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")


class CuttableRelay:
    """A TCP relay on 127.0.0.1 to ``target_port``; :meth:`cut` drops every connection and
    refuses new ones (accepted then closed at once, counted) until :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.is_cut = False
        self.dropped = 0  # connections refused while cut
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_cut:
                self.dropped += 1
                _reset(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                _reset(sock)

    def cut(self) -> None:
        self.is_cut = True
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _reset(sock)

    def restore(self) -> None:
        self.is_cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()
    except OSError:
        pass


@pytest.fixture
def relay_to_s3(s3_server, monkeypatch):
    relay = CuttableRelay(s3_server["port"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)  # everything below talks through the relay
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield relay
    relay.close()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def ray_through_relay(relay_to_s3):
    """A local Ray cluster started after the endpoint points at the relay (its workers inherit it)."""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "RAY_TRAIN_METRICS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}.items():
        os.environ.setdefault(key, value)
    from tasks.ray_cluster import start_cluster

    if ray.is_initialized():
        ray.shutdown()
    start_cluster(num_workers=1, cpus_per_worker=1)  # one CPU for the worker, one for Ray Data's reads
    yield relay_to_s3
    ray.shutdown()


def test_an_s3_outage_during_a_ray_checkpoint_upload_loses_nothing(tmp_path, s3_bucket, s3_client, ray_through_relay):
    from tests.integration.test_ray_train import assert_history_ok, write_shards

    from tasks.storage import Store
    from tasks.train.driver import run_flow_matching

    relay = ray_through_relay
    bucket = s3_bucket.removeprefix("s3://")
    shards = write_shards(load_builtin("eight_gaussians", num_samples=12000, seed=0), tmp_path / "shards", 1,
                          fixed_size=True)
    prefix = "ray/fm-outage/checkpoint_00000040/"
    outage = {"cut_at": None, "restored_at": None, "files_at_40": None, "read_40": None}
    stop = threading.Event()

    def listed(folder_prefix: str) -> set[str]:  # straight from moto (this boto3 client bypasses the relay)
        return {item["Key"].rsplit("/", 1)[1]
                for item in s3_client.list_objects_v2(Bucket=bucket, Prefix=folder_prefix).get("Contents", [])}

    def cut_when_step_40_lands() -> None:
        while not stop.is_set():
            if "checkpoint.json" in listed(prefix):  # the marker is up; its siblings may not be
                relay.cut()
                outage["cut_at"] = time.monotonic()
                # at least 3 s, and until something has tried to reach S3 (on a busy machine the
                # next upload can be more than 3 s away); bounded so that a hang still ends
                while (time.monotonic() - outage["cut_at"] < 3.0
                       or (relay.dropped == 0 and time.monotonic() - outage["cut_at"] < 60.0)):
                    time.sleep(0.05)
                relay.restore()
                outage["restored_at"] = time.monotonic()
                break
            time.sleep(0.01)
        # what the step-40 folder holds now, and whether it reads back (before Ray prunes it)
        outage["files_at_40"] = sorted(listed(prefix))
        try:
            Store(s3_bucket).read_checkpoint(f"{s3_bucket}/{prefix.rstrip('/')}")
            outage["read_40"] = "verified"
        except (ValueError, OSError) as exc:  # CAFMInputError / IncompleteOutputError / StorageError
            outage["read_40"] = f"refused: {exc}"

    watcher = threading.Thread(target=cut_when_step_40_lands)
    watcher.start()
    try:
        result = run_flow_matching(
            shard_urls=shards, sample_shape=(2,), num_classes=8,
            model_config=MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=8).to_dict(),
            fm_config={"steps": 200, "batch_size": 32, "lr": 3e-3, "log_every": 20},
            output_dir=str(tmp_path / "fm"), num_workers=1, cpus_per_worker=1, checkpoint_every=20,
            storage_path=f"{s3_bucket}/ray", run_name="fm-outage",
        )
    finally:
        stop.set()
        watcher.join()
    assert outage["cut_at"] is not None, "training ended before the step-40 checkpoint was seen"
    assert relay.dropped > 0, "nothing tried to reach S3 during the outage: the test proved nothing"

    assert result["steps"] == 200
    assert [row["step"] for row in result["history"]] == list(range(20, 201, 20))  # each once, none missing
    assert_history_ok(result["history"], ("fm_loss",))
    # the step-40 folder reads back as complete only if every file made it
    complete = {"checkpoint.json", "config.json", "model.safetensors"} <= set(outage["files_at_40"])
    assert (outage["read_40"] == "verified") == complete, outage
    # the checkpoints Ray keeps (the newest two) verify, the final one included
    for folder in ("checkpoint_00000180", "checkpoint_00000200"):
        Store(s3_bucket).read_checkpoint(f"{s3_bucket}/ray/fm-outage/{folder}")
    # the workers reached S3 with the keys they inherited; none went through Ray's job config
    from tests.integration.conftest import TEST_SECRET_KEY

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in session.rglob("*") if p.is_file() and not p.is_socket()]
    assert logs and not [p for p in logs if TEST_SECRET_KEY.encode() in p.read_bytes()]
    print(f"outage {outage['restored_at'] - outage['cut_at']:.1f}s, {relay.dropped} connection(s) refused; "
          f"step-40 folder: {outage['files_at_40']} -> {outage['read_40'][:160]}")


def _keys(client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def test_fit_is_started_again_only_for_storage_failures(monkeypatch):
    """The retry rule alone (no cluster): storage errors of Ray's controller are retried with
    backoff, up to the limit; any other error is raised at once."""
    import ray.train

    from tasks.train import driver

    monkeypatch.setattr(driver, "STORAGE_BACKOFF_S", 0.0)
    storage = ray.train.ControllerError(OSError("When uploading part: AWS Error NETWORK_CONNECTION"))
    other = ray.train.ControllerError(RuntimeError("placement group timed out"))

    def trainers(*outcomes):
        calls = []

        class Trainer:
            def fit(self):
                outcome = outcomes[len(calls)]
                calls.append(outcome)
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome

        return (lambda: Trainer()), calls

    make, calls = trainers(storage, storage, "result")
    assert driver.fit_with_storage_retries(make, "run") == "result" and len(calls) == 3
    make, calls = trainers(other, "result")
    with pytest.raises(ray.train.ControllerError, match="placement group"):
        driver.fit_with_storage_retries(make, "run")
    assert len(calls) == 1
    make, calls = trainers(*[storage] * (driver.STORAGE_RETRIES + 1))
    with pytest.raises(ray.train.ControllerError, match="NETWORK_CONNECTION"):
        driver.fit_with_storage_retries(make, "run")
    assert len(calls) == driver.STORAGE_RETRIES + 1
