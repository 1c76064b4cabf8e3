"""What the local team stack is and where it lives: :class:`StackConfig` from ``CAFM_*``
environment variables, the stack's addresses, and the S3 credentials its services get (the
stack's own generated keys for the local server, ``infra/auth.py``).
Starts nothing and touches no network.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
SERVICES = ("s3", "ray", "mlflow", "prefect", "worker")
# What a caller's AWS profile or session could slip into a signature for the local server.
_AWS_SESSION_VARIABLES = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


class StackError(RuntimeError):
    """The stack cannot be brought up or used; the message says what and where."""


def redact_url(url: str) -> str:
    """``url`` without a password (``postgresql://user:***@host/db``)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _env_count(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise StackError(f"{name}={value!r} is not a count (0 or more)")
    return count


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    if value == "auto":
        return free_port()
    try:
        return int(value)
    except ValueError:
        raise StackError(f"{name}={value!r} is not a port number (or 'auto')") from None


@contextmanager
def environ_scope(env: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """``os.environ`` updated with ``env`` (and without the variables in ``unset``) for the
    block, then restored exactly."""
    saved = {k: os.environ.get(k) for k in (*env, *unset)}
    for key in unset:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class StackConfig:
    """Where the stack lives and how it is reached; :meth:`from_env` reads ``CAFM_*`` variables.

    ``s3_endpoint`` None starts the local S3-compatible server (moto); set it (with
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in the environment) to use a real
    endpoint (MinIO, AWS) instead. ``prefect_db_url`` None keeps Prefect on SQLite in ``home``.
    """

    home: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    s3_port: int = 9000
    ray_port: int = 6380
    bucket: str = "cafm"
    s3_endpoint: str | None = None
    prefect_db_url: str | None = None
    work_pool: str = "cafm-process"
    ray_cpus: int = 3
    ray_nodes: int = 0  # Ray worker nodes beside the head (a local multi-node cluster)
    ray_node_cpus: int = 2
    stack_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None) -> StackConfig:
        return cls(
            home=Path(home or os.environ.get("CAFM_STACK_HOME") or REPO / ".stack").resolve(),
            prefect_port=_env_int("CAFM_PREFECT_PORT", 4200),
            mlflow_port=_env_int("CAFM_MLFLOW_PORT", 5000),
            s3_port=_env_int("CAFM_S3_PORT", 9000),
            ray_port=_env_int("CAFM_RAY_PORT", 6380),
            bucket=os.environ.get("CAFM_BUCKET", "cafm"),
            s3_endpoint=os.environ.get("CAFM_S3_ENDPOINT") or None,
            prefect_db_url=os.environ.get("CAFM_PREFECT_DB_URL") or None,
            work_pool=os.environ.get("CAFM_WORK_POOL", "cafm-process"),
            ray_cpus=_env_count("CAFM_RAY_CPUS", 3),
            ray_nodes=_env_count("CAFM_RAY_NODES", 0),
            ray_node_cpus=_env_count("CAFM_RAY_NODE_CPUS", 2),
        )

    # ---- derived addresses -----------------------------------------------------------
    @property
    def local_s3(self) -> bool:
        return self.s3_endpoint is None

    @property
    def s3_url(self) -> str:
        return self.s3_endpoint or f"http://{HOST}:{self.s3_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ray_port}"

    @property
    def storage_root(self) -> str:
        return f"s3://{self.bucket}/runs"

    @property
    def ray_temp(self) -> Path:
        # Ray's socket paths must stay under ~107 characters: a short folder of its own.
        return Path("/tmp") / f"cafm-ray-{self.stack_id}"

    @property
    def node_names(self) -> tuple[str, ...]:
        """The Ray worker nodes' service names: ``ray-node-1`` ... (each also a custom
        resource of that name on its node)."""
        return tuple(f"ray-node-{i}" for i in range(1, self.ray_nodes + 1))

    def node_home(self, name: str) -> Path:
        """A worker node's own folder: its copy of the code, HOME and TMPDIR."""
        return self.home / "nodes" / name

    def node_temp(self, name: str) -> Path:
        return Path("/tmp") / f"cafm-ray-{self.stack_id}-{name.rsplit('-', 1)[1]}"

    def client_env(self) -> dict[str, str]:
        """What a process needs to find the stack: addresses only. Its secrets (Prefect's auth
        string, MLflow's password, the local S3 keys) are in ``infra/auth.py``."""
        return {
            "PREFECT_API_URL": self.prefect_api,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_ADDRESS": self.ray_address,
            # Ray's gRPC ports listen on every interface; the cluster token (~/.ray/auth_token,
            # made by `ray start`) keeps other hosts out, and clients must be told to send it.
            "RAY_AUTH_MODE": "token",
            "AWS_ENDPOINT_URL": self.s3_url,
            "CAFM_STORAGE_ROOT": self.storage_root,
            "CAFM_WORK_POOL": self.work_pool,
        }


def s3_unset(config: StackConfig) -> tuple[str, ...]:
    """What must leave a process's environment beside :func:`s3_credentials`: for the local
    server, a caller's session token or profile (it would spoil the stack keys' signature)."""
    return _AWS_SESSION_VARIABLES if config.local_s3 else ()


def s3_credentials(config: StackConfig) -> dict[str, str]:
    """S3 variables for the services. The local server: the stack's own key pair
    (``<home>/s3-keys``, made by ``up``; the only pair that server accepts), whatever keys
    the caller's environment holds (those never reach the local stack). A real endpoint:
    the environment's keys (an error when missing)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") and v}
    if config.local_s3:
        from infra.auth import read_secrets  # lazy: infra.auth imports this module

        for key in _AWS_SESSION_VARIABLES:
            env.pop(key, None)
        env.update(read_secrets(config.home).need("s3_secret").s3_env())
    elif not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        raise StackError(f"CAFM_S3_ENDPOINT={config.s3_endpoint} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env["AWS_ENDPOINT_URL"] = config.s3_url
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env
