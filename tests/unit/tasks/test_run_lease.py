"""One run at a time per run folder: the lease on ``<storage_root>/<run_name>`` (local storage;
S3's conditional requests are in tests/integration/test_run_lease_s3.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks.run_lease import LEASE_FILE, RunLease, RunLeaseHeld, lease_verdict
from tasks.storage import Store
from tasks.tracking import OWNER_HOST_TAG, OWNER_PID_TAG

REPO = Path(__file__).resolve().parents[3]


def _lease(tmp_path, **kwargs) -> RunLease:
    store = Store(str(tmp_path / "runs"))
    return RunLease(store, store.url("digits"), run_name="digits", renew_every_s=0, **kwargs)


def _write_record(tmp_path, **record) -> Path:
    path = tmp_path / "runs" / "digits" / LEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_name": "digits", "started_at": "2026-01-01T00:00:00+00:00",
                                "lease_id": "someone-else", **record}))
    return path


@pytest.fixture
def live_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def test_conditional_writes_on_a_local_store(tmp_path):
    store = Store(str(tmp_path))
    url = store.url("run", "f.json")
    assert store.read_versioned(url) is None
    assert store.write_if(url, b"one", version=None)
    assert not store.write_if(url, b"two", version=None)  # exists: a create does not overwrite
    data, version = store.read_versioned(url)
    assert data == b"one"
    assert not store.write_if(url, b"two", version="stale-version")
    assert store.write_if(url, b"two", version=version)
    assert not store.remove_if(url, version)  # changed since: not removed
    assert store.remove_if(url, store.read_versioned(url)[1]) and store.read_versioned(url) is None
    assert store.list(store.url("run")) == []  # the lock file beside it is hidden


def test_a_second_run_of_the_same_name_is_refused_naming_the_holder(tmp_path):
    first = _lease(tmp_path, flow_run_id="0b5e-flow-run")
    first.acquire()
    try:
        second = _lease(tmp_path)
        with pytest.raises(RunLeaseHeld) as refused:
            second.acquire()
        message = str(refused.value)
        assert "run 'digits' is in use" in message
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {first.started_at}" in message
        assert "Prefect flow run 0b5e-flow-run" in message and "its process is alive" in message
        assert not second.held and not second.release()  # a refused lease gives nothing back
        assert json.loads((tmp_path / "runs" / "digits" / LEASE_FILE).read_text())["lease_id"] == first.lease_id
    finally:
        assert first.release()
    assert not (tmp_path / "runs" / "digits" / LEASE_FILE).exists()
    with _lease(tmp_path) as third:  # free again
        assert third.held


def test_the_lease_of_a_killed_run_is_taken_over(tmp_path):
    """A process that took the lease and was SIGKILLed leaves it behind; its pid is gone, so
    the next run takes it over (the project's owner-alive rule)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from tasks.run_lease import RunLease; from tasks.storage import Store;"
            "s = Store(sys.argv[2]); RunLease(s, s.url('digits'), renew_every_s=0).acquire();"
            "print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path / "runs")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLeaseHeld, match=rf"pid {child.pid}, .*its process is alive"):
            _lease(tmp_path).acquire()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait()
    lease = _lease(tmp_path)
    lease.acquire()
    assert lease.took_over[OWNER_PID_TAG] == str(child.pid)
    assert json.loads((tmp_path / "runs" / "digits" / LEASE_FILE).read_text())["lease_id"] == lease.lease_id
    assert lease.release()


def test_another_hosts_lease_is_held_while_renewed_and_taken_over_once_expired(tmp_path):
    now = datetime.now(timezone.utc)
    elsewhere = {OWNER_HOST_TAG: socket.gethostname() + "-elsewhere", OWNER_PID_TAG: "1234"}
    _write_record(tmp_path, **elsewhere, renewed_at=(now - timedelta(seconds=30)).isoformat())
    with pytest.raises(RunLeaseHeld, match=r"-elsewhere, pid 1234.*renewed 3\d s ago on another host"):
        _lease(tmp_path, ttl_s=600).acquire()
    _write_record(tmp_path, **elsewhere, renewed_at=(now - timedelta(seconds=700)).isoformat())
    lease = _lease(tmp_path, ttl_s=600)
    lease.acquire()
    assert lease.took_over["renewed_at"] and lease.release()
    assert lease_verdict({}, ttl_s=600) == (False, "it names no usable owner or renewal time")


def test_a_holder_renews_its_lease_and_gives_back_only_its_own(tmp_path):
    store = Store(str(tmp_path / "runs"))
    lease = RunLease(store, store.url("digits"), renew_every_s=0.05)
    lease.acquire()
    path = tmp_path / "runs" / "digits" / LEASE_FILE
    first = json.loads(path.read_text())["renewed_at"]
    deadline = time.monotonic() + 10
    while json.loads(path.read_text())["renewed_at"] == first:
        assert time.monotonic() < deadline, "the lease was not renewed"
        time.sleep(0.02)
    assert lease.release() and not path.exists()
    # taken over meanwhile (say, it was judged expired from another host): the renewal notices,
    # and the release leaves the new holder's lease alone
    lease = _lease(tmp_path)
    lease.acquire()
    _write_record(tmp_path, **{OWNER_HOST_TAG: "other", OWNER_PID_TAG: "1"}, renewed_at=first)
    assert not lease.renew() and "taken over by host other" in lease.lost
    assert not lease.release()
    assert json.loads(path.read_text())["lease_id"] == "someone-else"


def test_of_runs_racing_for_one_lease_exactly_one_wins(tmp_path):
    leases = [_lease(tmp_path) for _ in range(8)]
    outcomes, barrier = [], threading.Barrier(len(leases))

    def race(lease):
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("held")
        except RunLeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held"] + ["refused"] * 7
    (winner,) = [lease for lease in leases if lease.held]
    assert json.loads((tmp_path / "runs" / "digits" / LEASE_FILE).read_text())["lease_id"] == winner.lease_id
    winner.release()
