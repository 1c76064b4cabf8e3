"""A run's lease: one pipeline run at a time writes into ``<storage_root>/<run_name>``.

A flow takes the lease (``<run>/_LEASE.json``) before any compute and gives it back when it
ends, whether it succeeded or failed. The lease names its holder: host, pid, start time,
Prefect flow run id (when known) and a random lease id. A second run of the same name started
meanwhile gets :class:`RunLeaseHeld`, whose message names that holder.

A lease whose holder died is taken over, so a killed run never blocks the next one:

- on the holder's own host, the one "owner alive" rule of the project decides
  (``tasks.tracking.owner_state``, the rule that also ends orphaned MLflow runs and replays
  unlogged records): the holder's pid is gone -> taken over; alive -> held;
- from another host the pid cannot be checked: the holder renews its lease every
  ``renew_every_s`` (60 s) while it works, and a lease not renewed for ``ttl_s`` (10 min) is
  taken over.

Taking, renewing, taking over and giving back are conditional writes on storage
(``Store.write_if`` / ``Store.remove_if``): a local ``flock``, or S3's ``If-None-Match`` /
``If-Match`` requests, so of two runs racing for the same lease exactly one wins. On an
S3-compatible endpoint that ignores conditional requests both may win if they race within
one round trip (documented in docs/operations.md). A pid reused by an unrelated process on
the same host keeps a dead run's lease "alive" (the rule's known limit): remove the lease
file by hand then.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timezone

from tasks.storage import Store
from tasks.tracking import OWNER_HOST_TAG, OWNER_PID_TAG, owner_state

__all__ = ["LEASE_FILE", "LEASE_TTL_S", "RENEW_EVERY_S", "RunLease", "RunLeaseHeld", "describe_holder", "lease_verdict"]

logger = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
LEASE_TTL_S = 600.0
"""A lease from another host not renewed for this long is stale (its holder is presumed dead)."""
RENEW_EVERY_S = 60.0
"""How often a holder renews its lease while it works."""


class RunLeaseHeld(RuntimeError):
    """Another live run holds this run's lease; ``holder`` is its record."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _age_s(record: dict, now: datetime) -> float | None:
    try:
        renewed = datetime.fromisoformat(str(record["renewed_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=timezone.utc)
    return (now - renewed).total_seconds()


def lease_verdict(record: dict, *, ttl_s: float = LEASE_TTL_S, now: datetime | None = None) -> tuple[bool, str]:
    """``(held, why)`` for a lease record: held by a live run, or stale (may be taken over)."""
    state = owner_state(record)
    if state == "alive":
        return True, "its process is alive"
    if state == "gone":
        return False, f"its process {record.get(OWNER_PID_TAG)} on {record.get(OWNER_HOST_TAG)} is gone"
    age = _age_s(record, now or _now())
    if age is None:
        return False, "it names no usable owner or renewal time"
    if age > ttl_s:
        return False, f"it was last renewed {age:.0f} s ago (more than {ttl_s:.0f} s) on a host this one cannot check"
    return True, f"it was renewed {max(age, 0):.0f} s ago on another host"


def describe_holder(record: dict) -> str:
    flow_run = record.get("flow_run_id") or "not known (not a Prefect flow run)"
    return (f"host {record.get(OWNER_HOST_TAG, '?')}, pid {record.get(OWNER_PID_TAG, '?')}, started "
            f"{record.get('started_at', '?')}, Prefect flow run {flow_run}")


class RunLease:
    """The lease on one run folder. ``acquire()`` before any compute, ``release()`` in a
    ``finally`` (or use it as a context manager); ``release`` without a held lease does nothing."""

    def __init__(self, store: Store, run_url: str, *, run_name: str | None = None, flow_run_id: str | None = None,
                 ttl_s: float = LEASE_TTL_S, renew_every_s: float = RENEW_EVERY_S) -> None:
        self.store = store
        self.run_url = run_url
        self.url = Store.join(run_url, LEASE_FILE)
        self.run_name = run_name or run_url.rstrip("/").rsplit("/", 1)[-1]
        self.flow_run_id = str(flow_run_id) if flow_run_id else None
        self.ttl_s = float(ttl_s)
        self.renew_every_s = float(renew_every_s)
        self.lease_id = uuid.uuid4().hex
        self.started_at = _now().isoformat()
        self.held = False
        self.took_over: dict | None = None  # the stale record this lease replaced, if any
        self.lost: str | None = None  # why the lease stopped being ours while we worked, if it did
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- the record ------------------------------------------------------------------------

    def record(self) -> dict:
        return {"run_url": self.run_url, "run_name": self.run_name, OWNER_HOST_TAG: socket.gethostname(),
                OWNER_PID_TAG: str(os.getpid()), "started_at": self.started_at, "renewed_at": _now().isoformat(),
                "flow_run_id": self.flow_run_id, "lease_id": self.lease_id, "ttl_s": self.ttl_s}

    def _body(self) -> bytes:
        return json.dumps(self.record(), indent=2, sort_keys=True).encode()

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    # ---- taking and giving back ------------------------------------------------------------

    def acquire(self, attempts: int = 5) -> dict:
        """Take the lease (or take over a stale one); :class:`RunLeaseHeld` if a live run holds it."""
        for _ in range(attempts):
            current = self.store.read_versioned(self.url)
            if current is None:
                if self.store.write_if(self.url, self._body(), version=None):
                    return self._taken()
                continue  # created meanwhile: look at it
            data, version = current
            holder = self._parse(data)
            if holder.get("lease_id") == self.lease_id:  # our own write, retried after a lost reply
                return self._taken()
            held, why = lease_verdict(holder, ttl_s=self.ttl_s)
            if held:
                raise RunLeaseHeld(
                    f"run {self.run_name!r} is in use: {self.url} is held by {describe_holder(holder)} ({why}). "
                    "Wait for that run to end or choose another run_name; a lease is taken over once its "
                    f"process is gone (or, held from another host, once it is {self.ttl_s:.0f} s without renewal)",
                    holder,
                )
            if self.store.write_if(self.url, self._body(), version=version):
                self.took_over = holder
                logger.warning("run %r: took over the lease %s of %s: %s", self.run_name, self.url,
                               describe_holder(holder), why)
                return self._taken()
        raise RunLeaseHeld(f"run {self.run_name!r}: could not take the lease {self.url} in {attempts} attempts "
                           "(other runs of this name are starting at the same time); try again")

    def _taken(self) -> dict:
        self.held = True
        self._stop.clear()
        if self.renew_every_s > 0:
            self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_name}", daemon=True)
            self._renewer.start()
        logger.info("run %r: lease %s taken (lease id %s)", self.run_name, self.url, self.lease_id)
        return self.record()

    def renew(self) -> bool:
        """Rewrite the lease's renewal time if it is still ours; False (and ``lost`` set) if not."""
        with self._lock:
            if not self.held or self.lost:
                return False
            current = self.store.read_versioned(self.url)
            if current is None or self._parse(current[0]).get("lease_id") != self.lease_id:
                holder = self._parse(current[0]) if current else {}
                self.lost = f"taken over by {describe_holder(holder)}" if holder else "removed"
                logger.error("run %r: the lease %s is no longer this run's (%s); another run may now write into "
                             "the same folders", self.run_name, self.url, self.lost)
                return False
            # False when it changed meanwhile: the next renewal looks again
            return self.store.write_if(self.url, self._body(), version=current[1])

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                if not self.renew() and self.lost:
                    return
            except Exception as error:  # storage trouble: try again at the next tick
                logger.warning("run %r: could not renew the lease %s: %s", self.run_name, self.url, error)

    def release(self) -> bool:
        """Give the lease back (only if it is still ours); never raises. True if removed."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
        with self._lock:
            if not self.held:
                return False
            self.held = False
            try:
                current = self.store.read_versioned(self.url)
                if current is None or self._parse(current[0]).get("lease_id") != self.lease_id:
                    logger.warning("run %r: the lease %s was no longer this run's at its end", self.run_name, self.url)
                    return False
                return self.store.remove_if(self.url, current[1])
            except Exception as error:  # a lease left behind is taken over by the next run
                logger.warning("run %r: could not give back the lease %s (%s); the next run takes it over",
                               self.run_name, self.url, error)
                return False

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
