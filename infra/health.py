"""Is the stack (or a service it points at) answering? Loopback HTTP probes, the Prefect JSON
API, the worker's heartbeat, the bucket's reachability; one ``healthy`` check per service.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra.config import HOST, SERVICES, StackConfig, StackError, environ_scope, s3_credentials


def port_open(port: int, timeout: float = 1.0) -> bool:
    """Something accepts TCP connections on ``HOST:port``."""
    with socket.socket() as probe:
        probe.settimeout(timeout)
        return probe.connect_ex((HOST, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """``url`` answers 2xx (no proxy: loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def api_json(url: str, body: dict | None = None, timeout: float = 10.0, method: str | None = None):
    """GET (or POST ``body`` to, or ``method``) a JSON API on loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method or ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    for attempt in range(4):
        try:
            with opener.open(request, timeout=timeout) as response:
                return json.loads(response.read().decode() or "null")
        except urllib.error.HTTPError as exc:
            if exc.code == 503 and attempt < 3:  # Prefect on SQLite answers 503 while the database is locked
                time.sleep(1.0 + attempt)
                continue
            detail = exc.read().decode(errors="replace")[:2000]  # keep the server's explanation
            raise urllib.error.HTTPError(exc.url, exc.code, f"{exc.reason}: {detail}", exc.headers, None) from None


def worker_online(config: StackConfig, since: float | None = None) -> bool:
    """The stack's worker is ONLINE on its pool (with a heartbeat after ``since``, epoch s)."""
    from datetime import datetime

    try:
        workers = api_json(f"{config.prefect_api}/work_pools/{config.work_pool}/workers/filter", {})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    for worker in workers or []:
        if worker.get("name") != f"cafm-worker-{config.stack_id}" or worker.get("status") != "ONLINE":
            continue
        beat = worker.get("last_heartbeat_time")
        if since is None or (beat and datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() >= since):
            return True
    return False


def check_bucket(config: StackConfig, create: bool = False) -> None:
    """The stack's bucket is reachable and writable with the environment's keys (clear error if not).

    ``create``: make it first (local S3 only: a real bucket is the operator's to create)."""
    from tasks.storage import StorageError, check_reachable

    with environ_scope(s3_credentials(config)):
        try:
            if create:
                import boto3

                client = boto3.client("s3", endpoint_url=config.s3_url)
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if config.bucket not in names:
                    client.create_bucket(Bucket=config.bucket)
            check_reachable(f"s3://{config.bucket}/mlflow")
        except StorageError as exc:
            raise StackError(str(exc)) from None


def _bucket_usable(config: StackConfig) -> bool:
    try:
        check_bucket(config)
        return True
    except StackError:
        return False


def ray_node_joined(config: StackConfig, name: str) -> bool:
    """The worker node ``name`` is up: its ``ray start`` said it joined the head in the log of
    its latest start, and its raylet (found by the node's own temp dir) is alive."""
    log = config.home / "logs" / f"{name}.log"
    latest = log.read_text(errors="replace").rsplit("==== ", 1)[-1] if log.exists() else ""
    if "Ray runtime started" not in latest:
        return False
    marker = f"--temp_dir={config.node_temp(name)}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
                continue
            if command and command[0].endswith(b"/raylet") and marker in command and state != "Z":
                return True
    return False


def healthy(config: StackConfig, service: str) -> bool:
    """``service`` (one of :data:`SERVICES` or a worker node) answers its health check."""
    if service == "s3":
        return http_ok(f"{config.s3_url}/moto-api/") if config.local_s3 else _bucket_usable(config)
    if service == "ray":
        return port_open(config.ray_port, timeout=1.0)
    if service == "mlflow":
        return http_ok(f"{config.mlflow_url}/health")
    if service == "prefect":
        return http_ok(f"{config.prefect_api}/health")
    if service == "worker":
        return worker_online(config)
    if service in config.node_names:
        return ray_node_joined(config, service)
    raise StackError(f"unknown service {service!r}; expected one of {SERVICES}")
