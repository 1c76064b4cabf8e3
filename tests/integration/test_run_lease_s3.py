"""The run lease on S3 (moto on 127.0.0.1): taken, refused, taken over and given back with S3's
conditional requests (If-None-Match to create, If-Match to replace or delete), so of two
writers that read the same version exactly one wins."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone

import pytest

from tasks.run_lease import LEASE_FILE, RunLease, RunLeaseHeld
from tasks.storage import Store
from tasks.tracking import OWNER_HOST_TAG, OWNER_PID_TAG

pytestmark = pytest.mark.integration


def test_conditional_writes_on_s3(s3_bucket):
    store = Store(s3_bucket, backoff_s=0.0)
    url = store.url("run", "f.json")
    assert store.read_versioned(url) is None
    assert store.write_if(url, b"one", version=None)
    assert not store.write_if(url, b"two", version=None)
    data, version = store.read_versioned(url)
    assert data == b"one" and version
    # two writers read the same version: the first replace wins, the second is refused
    assert store.write_if(url, b"two", version=version)
    assert not store.write_if(url, b"three", version=version)
    assert store.read_versioned(url)[0] == b"two"
    assert not store.remove_if(url, version)  # changed since that version: kept
    assert store.remove_if(url, store.read_versioned(url)[1]) and store.read_versioned(url) is None
    assert not store.remove_if(url, version)  # gone


def test_the_run_lease_on_s3(s3_bucket, s3_client):
    store = Store(f"{s3_bucket}/runs", backoff_s=0.0)
    first = RunLease(store, store.url("digits"), renew_every_s=0, flow_run_id="flow-1")
    first.acquire()
    with pytest.raises(RunLeaseHeld, match=r"run 'digits' is in use: .*Prefect flow run flow-1"):
        RunLease(store, store.url("digits"), renew_every_s=0).acquire()
    assert first.renew() and first.release()
    assert store.read_versioned(store.url("digits", LEASE_FILE)) is None

    # a holder on another host that stopped renewing: taken over once the lease expired
    stale = {OWNER_HOST_TAG: socket.gethostname() + "-elsewhere", OWNER_PID_TAG: "7", "lease_id": "old",
             "started_at": "2026-01-01T00:00:00+00:00",
             "renewed_at": (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()}
    key = f"runs/digits/{LEASE_FILE}"
    s3_client.put_object(Bucket=s3_bucket[len("s3://"):], Key=key, Body=json.dumps(stale).encode())
    lease = RunLease(store, store.url("digits"), renew_every_s=0)
    lease.acquire()
    assert lease.took_over["lease_id"] == "old"
    assert json.loads(store.read_bytes(store.url("digits", LEASE_FILE)))["lease_id"] == lease.lease_id
    assert lease.release()
