"""Is the stack (or a service it points at) answering? Loopback HTTP probes, the Prefect JSON
API (authenticated, with Prefect's CSRF token for writes), the worker's heartbeat, the
bucket's reachability; one ``healthy`` check per service. A server's check authenticates with
the stack's secret and also asks without it: a server that lets an anonymous request in (one
started without the stack's auth settings) is not healthy, so ``up`` restarts it.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from infra.config import HOST, SERVICES, StackConfig, StackError, environ_scope, s3_credentials, s3_unset
from infra.auth import read_secrets

MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # a REST call that needs authentication
PREFECT_PROBE = "/admin/version"  # under the API; /api/health answers anyone (Prefect lets probes in)


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


def basic_auth(credentials: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``credentials`` (``user:password``, or Prefect's auth
    string, sent the same way); none for None."""
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials else {}


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status a GET of ``url`` answers (None: no answer), without a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _guarded(probe: str, credentials: str | None) -> bool:
    """``probe`` (a URL that needs authentication) answers 200 with ``credentials`` and 401
    without them."""
    return (credentials is not None and http_status(probe, timeout=5.0) == 401
            and http_status(probe, basic_auth(credentials), timeout=5.0) == 200)


# Prefect's CSRF tokens, per (API root, auth string): (client id, token, expiry in epoch seconds)
_CSRF: dict[tuple[str, str | None], tuple[str, str, float]] = {}


def _api_root(url: str) -> str | None:
    parts = urlsplit(url)
    at = (parts.path + "/").find("/api/")
    return urlunsplit(parts._replace(path=parts.path[:at + 4], query="", fragment="")) if at >= 0 else None


def _csrf_headers(url: str, auth: str | None, opener, timeout: float, renew: bool = False) -> dict[str, str]:
    """The CSRF headers a Prefect server with CSRF protection wants on a write (the token is
    fetched once per client id and kept until it expires); none when the server has it off."""
    root = _api_root(url)
    if root is None:
        return {}
    cached = _CSRF.get((root, auth))
    if renew or cached is None or cached[2] < time.time() + 60:
        client = str(uuid.uuid4())
        request = urllib.request.Request(f"{root}/csrf-token?client={client}", headers=basic_auth(auth))
        try:
            with opener.open(request, timeout=timeout) as response:
                token = json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 422):  # "CSRF protection is disabled." (or an older server): nothing to send
                return {}
            raise
        expires = datetime.fromisoformat(str(token["expiration"]).replace("Z", "+00:00")).timestamp()
        cached = _CSRF[(root, auth)] = (client, token["token"], expires)
    return {"Prefect-Csrf-Client": cached[0], "Prefect-Csrf-Token": cached[1]}


def api_json(url: str, body: dict | None = None, timeout: float = 10.0, method: str | None = None, *,
             auth: str | None = None):
    """GET (or POST ``body`` to, or ``method``) a Prefect-style JSON API on loopback, with
    ``auth`` (Prefect's API auth string) and, for a write, the server's CSRF token."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = json.dumps(body).encode() if body is not None else None
    method = method or ("POST" if body is not None else "GET")
    renew = False
    for attempt in range(4):
        headers = {"Content-Type": "application/json", **basic_auth(auth)}
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            headers.update(_csrf_headers(url, auth, opener, timeout, renew=renew))
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with opener.open(request, timeout=timeout) as response:
                return json.loads(response.read().decode() or "null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]  # keep the server's explanation
            if exc.code == 503 and attempt < 3:  # Prefect on SQLite answers 503 while the database is locked
                time.sleep(1.0 + attempt)
                continue
            if exc.code == 403 and "CSRF" in detail and not renew:  # a token the server no longer has
                renew = True
                continue
            raise urllib.error.HTTPError(exc.url, exc.code, f"{exc.reason}: {detail}", exc.headers, None) from None


def worker_online(config: StackConfig, since: float | None = None) -> bool:
    """The stack's worker is ONLINE on its pool (with a heartbeat after ``since``, epoch s)."""
    try:
        workers = api_json(f"{config.prefect_api}/work_pools/{config.work_pool}/workers/filter", {},
                           auth=read_secrets(config.home).prefect_auth)
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

    env = s3_credentials(config)
    with environ_scope(env, unset=s3_unset(config)):
        try:
            if create:
                _create_bucket(config, env)
            check_reachable(f"s3://{config.bucket}/mlflow")
        except StorageError as exc:
            raise StackError(str(exc)) from None


def _create_bucket(config: StackConfig, env: dict[str, str]) -> None:
    """Make the stack's bucket unless it exists, signed with exactly the keys in ``env``.

    The client comes from a session of its own with the keys passed in: boto3's default
    session (``boto3.client``) keeps the first credentials it resolved in this process, so in a
    process that used boto3 before (a notebook, a test session) it would sign with those, not
    with the stack's keys the environment holds now."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    session = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                    aws_session_token=env.get("AWS_SESSION_TOKEN"),
                                    region_name=env.get("AWS_DEFAULT_REGION") or "us-east-1")
    client = session.client("s3", endpoint_url=config.s3_url)
    try:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if config.bucket not in names:
            client.create_bucket(Bucket=config.bucket)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") == "BucketAlreadyOwnedByYou":  # made meanwhile by a concurrent `up`
            return
        raise StackError(f"S3 endpoint {config.s3_url}: cannot create bucket {config.bucket} with key id "
                         f"{env['AWS_ACCESS_KEY_ID']}: {error.get('Code')} {error.get('Message', '')}".rstrip()) from None
    except BotoCoreError as exc:
        raise StackError(f"S3 endpoint {config.s3_url}: cannot create bucket {config.bucket}: {exc}") from None
    finally:
        client.close()


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


def _local_s3_guarded(config: StackConfig) -> bool:
    """The local S3 server refuses an unsigned request and accepts the stack's keys."""
    if http_status(f"{config.s3_url}/", timeout=5.0) != 403:
        return False
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.session import Session

    keys = read_secrets(config.home).s3_env()
    if not keys:
        return False
    client = Session().create_client(
        "s3", endpoint_url=config.s3_url, region_name="us-east-1", aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    try:
        client.list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False
    finally:
        client.close()


def healthy(config: StackConfig, service: str) -> bool:
    """``service`` (one of :data:`SERVICES` or a worker node) answers its health check; for the
    servers that includes taking the stack's credentials and refusing a request without them."""
    if service == "s3":
        return _local_s3_guarded(config) if config.local_s3 else _bucket_usable(config)
    if service == "ray":
        return port_open(config.ray_port, timeout=1.0)
    if service == "mlflow":
        secrets = read_secrets(config.home)
        login = f"{secrets.mlflow_username}:{secrets.mlflow_password}" if secrets.mlflow_password else None
        return http_ok(f"{config.mlflow_url}/health") and _guarded(config.mlflow_url + MLFLOW_PROBE, login)
    if service == "prefect":
        return http_ok(f"{config.prefect_api}/health") and _guarded(
            config.prefect_api + PREFECT_PROBE, read_secrets(config.home).prefect_auth)
    if service == "worker":
        return worker_online(config)
    if service in config.node_names:
        return ray_node_joined(config, service)
    raise StackError(f"unknown service {service!r}; expected one of {SERVICES}")
