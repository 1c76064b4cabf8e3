"""tasks.storage on a local folder: round trips, atomic writes, retries, checkpoints, stage markers."""

from __future__ import annotations

import errno
import json
import os
import pickle

import pytest
import torch

from cafm_core.checkpoint import CONFIG_FILE, MARKER_FILE, WEIGHTS_FILE
from cafm_core.checks import CAFMInputError
from tasks import storage
from tasks.storage import COMPLETE_FILE, IncompleteOutputError, StorageError, Store, check_reachable, join_url


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "root"), retries=3, backoff_s=0.0)


def _temp_files(root) -> list[str]:
    return [name for _, _, files in os.walk(root) for name in files if name.endswith(".tmp")]


def test_root_and_url_handling(tmp_path):
    store = Store(f"file://{tmp_path}/a/")
    assert store.kind == "local" and store.root == str(tmp_path / "a")
    assert store.url("x", "y.json") == str(tmp_path / "a" / "x" / "y.json")
    assert Store("s3://bucket/run/").url("data", "/m.json") == "s3://bucket/run/data/m.json"
    assert join_url("s3://b/p", "q/r") == "s3://b/p/q/r"
    for bad in ("", "   ", "ftp://host/x", "s3://"):
        with pytest.raises(StorageError):
            Store(bad)
    with pytest.raises(StorageError, match=r"'\.\.'"):
        store.url("..", "etc")
    with pytest.raises(StorageError, match="not a local path"):
        store.fs_path("s3://bucket/key")
    with pytest.raises(StorageError, match="not an s3:// URL"):
        Store("s3://bucket/run").fs_path("/tmp/x")


def test_bytes_json_round_trip_exists_list_remove(store):
    url = store.url("a", "b.bin")
    assert not store.exists(url)
    store.write_bytes(url, b"\x00\x01payload")
    assert store.read_bytes(url) == b"\x00\x01payload"
    store.write_bytes(url, b"second")  # overwrite
    assert store.read_bytes(url) == b"second"
    store.write_json(store.url("a", "c.json"), {"k": [1, 2.5, None], "s": "x"})
    assert store.read_json(store.url("a", "c.json")) == {"k": [1, 2.5, None], "s": "x"}
    assert store.exists(url)
    assert store.list(store.url("a")) == [store.url("a", "b.bin"), store.url("a", "c.json")]
    assert store.list(store.url("missing")) == []
    assert store.remove(store.url("a", "b.bin")) is True
    assert store.remove(store.url("a", "b.bin")) is False
    assert store.remove(store.url("a")) is True
    assert not store.exists(store.url("a"))


def test_read_missing_file_names_the_url(store):
    url = store.url("nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        store.read_bytes(url)


def test_write_json_rejects_non_json_and_writes_nothing(store):
    url = store.url("bad.json")
    with pytest.raises(StorageError, match="JSON"):
        store.write_json(url, {"x": float("nan")})
    assert not store.exists(url)


def test_failed_local_write_keeps_old_content_and_leaves_no_temp_file(store, monkeypatch):
    url = store.url("f.bin")
    store.write_bytes(url, b"old")

    def broken_replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="f.bin"):
        store.write_bytes(url, b"new content")
    monkeypatch.undo()
    assert store.read_bytes(url) == b"old"
    assert _temp_files(store.root) == []
    assert store.list(store.root) == [url]


def test_transient_write_errors_are_retried_then_succeed(store, monkeypatch):
    real = storage.write_local_atomic
    calls = []

    def flaky(path, write):
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return real(path, write)

    monkeypatch.setattr(storage, "write_local_atomic", flaky)
    store.write_bytes(store.url("r.bin"), b"data")
    assert len(calls) == 3
    assert store.read_bytes(store.url("r.bin")) == b"data"


def test_persistent_transient_errors_fail_clearly_after_all_attempts(store, monkeypatch):
    calls = []

    def always_timeout(path, write):
        calls.append(path)
        raise TimeoutError("timed out")

    monkeypatch.setattr(storage, "write_local_atomic", always_timeout)
    with pytest.raises(StorageError, match=r"r\.bin.*after 3 attempts.*TimeoutError"):
        store.write_bytes(store.url("r.bin"), b"data")
    assert len(calls) == 3


def test_permanent_errors_are_not_retried(store, monkeypatch):
    calls = []

    def denied(path, write):
        calls.append(path)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage, "write_local_atomic", denied)
    with pytest.raises(StorageError, match="Permission denied"):
        store.write_bytes(store.url("p.bin"), b"data")
    assert len(calls) == 1


def test_backoff_grows_exponentially(tmp_path, monkeypatch):
    store = Store(str(tmp_path), retries=4, backoff_s=0.5)
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    monkeypatch.setattr(storage, "write_local_atomic", lambda path, write: (_ for _ in ()).throw(TimeoutError("t")))
    with pytest.raises(StorageError):
        store.write_bytes(store.url("x"), b"1")
    assert sleeps == [0.5, 1.0, 2.0]


def _tensors():
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0])}


def test_checkpoint_round_trip_with_marker_written_last(store, monkeypatch):
    order = []
    real_write = Store.write_bytes

    def spy(self, url, data):
        order.append(os.path.basename(url))
        return real_write(self, url, data)

    monkeypatch.setattr(Store, "write_bytes", spy)
    url = store.url("ckpt")
    store.write_checkpoint(url, _tensors(), {"width": 3}, {"step": 7})
    assert order[-1] == MARKER_FILE and set(order) == {WEIGHTS_FILE, CONFIG_FILE, MARKER_FILE}
    tensors, config, metadata = store.read_checkpoint(url)
    assert config == {"width": 3} and metadata == {"step": 7}
    assert set(tensors) == {"w", "b"} and all(torch.equal(tensors[k], _tensors()[k]) for k in tensors)


def test_checkpoint_overwrite_removes_old_marker_before_writing(store, monkeypatch):
    url = store.url("ckpt")
    store.write_checkpoint(url, _tensors(), {"v": 1})
    marker_present_during_weights = []
    real_write = Store.write_bytes

    def spy(self, target, data):
        if os.path.basename(target) == WEIGHTS_FILE:
            marker_present_during_weights.append(os.path.exists(os.path.join(url, MARKER_FILE)))
        return real_write(self, target, data)

    monkeypatch.setattr(Store, "write_bytes", spy)
    store.write_checkpoint(url, {"w": torch.zeros(2)}, {"v": 2})
    assert marker_present_during_weights == [False]
    assert store.read_checkpoint(url)[1] == {"v": 2}


def test_checkpoint_without_marker_is_rejected_as_incomplete(store):
    url = store.url("ckpt")
    store.write_checkpoint(url, _tensors(), {"v": 1})
    os.unlink(os.path.join(url, MARKER_FILE))
    with pytest.raises(IncompleteOutputError, match="incomplete.*checkpoint.json"):
        store.read_checkpoint(url)
    with pytest.raises(IncompleteOutputError):
        store.read_checkpoint(store.url("never-written"))


def test_corrupted_checkpoint_file_fails_its_checksum(store):
    url = store.url("ckpt")
    store.write_checkpoint(url, _tensors(), {"v": 1})
    weights = os.path.join(url, WEIGHTS_FILE)
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    with pytest.raises(CAFMInputError, match=f"checksum mismatch for {WEIGHTS_FILE}"):
        store.read_checkpoint(url)


def test_invalid_checkpoint_is_rejected_before_anything_is_written(store):
    url = store.url("ckpt")
    with pytest.raises(CAFMInputError, match="NaN"):
        store.write_checkpoint(url, {"w": torch.tensor([float("nan")])}, {})
    assert not store.exists(url)


def test_mark_complete_and_completed(store):
    stage = store.url("stage")
    assert store.completed(stage) is None
    store.write_bytes(join_url(stage, "out.bin"), b"x")
    record = store.mark_complete(stage, {"out": "out.bin", "n": 1})
    assert store.exists(join_url(stage, COMPLETE_FILE))
    read = store.completed(stage)
    assert read == record and read["outputs"] == {"out": "out.bin", "n": 1} and read["completed_at"]
    assert store.clear_complete(stage) is True
    assert store.completed(stage) is None
    store.write_bytes(join_url(stage, COMPLETE_FILE), b'["not a record"]')
    with pytest.raises(StorageError, match="not a completion record"):
        store.completed(stage)


def test_upload_and_download_dir_with_marker_last(store, tmp_path, monkeypatch):
    local = tmp_path / "local_ckpt"
    (local / "sub").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"weights")
    (local / "sub" / "extra.txt").write_bytes(b"extra")
    (local / "checkpoint.json").write_bytes(b"{}")
    remote = store.url("remote_ckpt")
    store.write_bytes(join_url(remote, "checkpoint.json"), b"old marker")
    order = []
    real_put = Store._put_file

    def spy(self, local_path, url):
        order.append((os.path.relpath(local_path, local), os.path.exists(join_url(remote, "checkpoint.json"))))
        return real_put(self, local_path, url)

    monkeypatch.setattr(Store, "_put_file", spy)
    uploaded = store.upload_dir(local, remote, marker_last="checkpoint.json")
    monkeypatch.undo()
    assert [name for name, _ in order][-1] == "checkpoint.json"
    assert all(not marker_there for _, marker_there in order)  # old marker gone before the first upload
    assert uploaded[-1] == join_url(remote, "checkpoint.json")
    back = store.download_dir(remote, tmp_path / "back")
    assert (back / "model.safetensors").read_bytes() == b"weights"
    assert (back / "sub" / "extra.txt").read_bytes() == b"extra"
    assert (back / "checkpoint.json").read_bytes() == b"{}"
    with pytest.raises(StorageError, match="marker 'missing.json'"):
        store.upload_dir(local, remote, marker_last="missing.json")
    with pytest.raises(FileNotFoundError, match="holds no files"):
        store.download_dir(store.url("empty"), tmp_path / "x")


def test_store_pickles_as_its_root_only(store):
    store.write_bytes(store.url("p"), b"1")
    _ = store.filesystem
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root and clone._fs is None
    assert clone.read_bytes(clone.url("p")) == b"1"


def test_check_reachable_local(tmp_path):
    root = tmp_path / "new" / "root"
    check_reachable(str(root))
    assert root.is_dir() and list(root.iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"x")
    with pytest.raises(StorageError, match=f"storage root {blocker}.*not writable"):
        check_reachable(str(blocker))


def test_json_written_is_valid_on_disk(store):
    store.write_json(store.url("m.json"), {"b": 1, "a": 2})
    assert json.loads(open(store.url("m.json")).read()) == {"a": 2, "b": 1}


def test_download_dir_refuses_a_symlink_that_leads_out_of_the_target(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_bytes(store.join(store.root, "model", "sub", "weights.bin"), b"w")
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    target.mkdir()
    (target / "sub").symlink_to(outside)  # planted: sub/ points out of the target folder
    with pytest.raises(StorageError, match=r"'sub/weights.bin' leaves the target folder"):
        store.download_dir(store.join(store.root, "model"), target)
    assert list(outside.iterdir()) == []


def test_download_dir_checks_every_name_before_writing_any(tmp_path, monkeypatch):
    """A listing with a '..' name (what a crafted bucket returns) writes nothing at all."""
    store = Store(str(tmp_path / "store"))
    url = store.join(store.root, "model")
    store.write_bytes(store.join(url, "a.bin"), b"a")
    real = store._files_under(url)
    monkeypatch.setattr(store, "_files_under", lambda u: real + [("../../escaped.bin", real[0][1])])
    with pytest.raises(StorageError, match=r"'\.\./\.\./escaped\.bin' leaves the target folder"):
        store.download_dir(url, tmp_path / "deep" / "target")
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "deep" / "target").exists()
