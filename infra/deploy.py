"""``prefect deploy --all`` with checks first: each bad input gets one clear error before
anything is registered.

Checked, in order: the Prefect server answers; every ``{{ $VAR }}`` in ``prefect.yaml`` is
set; each deployment's parameters validate against its flow's typed parameters; each
``s3://`` bucket named in them exists and is writable with the environment's keys (missing
bucket, wrong credentials and an unreachable endpoint each say so); the MLflow server the
worker will use answers; the work pool exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from infra.config import BIN, StackConfig, StackError, environ_scope, s3_credentials
from infra.health import api_json, http_ok

_UNRESOLVED = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


def _s3_urls(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("s3://") else []
    if isinstance(value, dict):
        return [u for item in value.values() for u in _s3_urls(item)]
    if isinstance(value, (list, tuple)):
        return [u for item in value for u in _s3_urls(item)]
    return []


def preflight(prefect_file: str | Path, env: dict[str, str]) -> list[dict]:
    """The deployments of ``prefect_file`` with their variables filled in, after every check."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.templating import apply_values

    from tasks.storage import StorageError, check_reachable
    from tasks.tracking import TrackingError, check_tracking_uri

    path = Path(prefect_file).resolve()
    api = env.get("PREFECT_API_URL")
    if not api:
        raise StackError("PREFECT_API_URL is not set: bring the stack up (`python -m infra.stack up`) or point it at your Prefect server")
    if not http_ok(f"{api.rstrip('/')}/health", timeout=5):
        raise StackError(f"Prefect server {api} is unreachable (no answer from {api.rstrip('/')}/health); "
                         "is the stack up? (`python -m infra.stack status`)")
    config = yaml.safe_load(path.read_text()) or {}
    with environ_scope(env):  # Prefect reads `{{ $VAR }}` from os.environ
        deployments = apply_values(config.get("deployments") or [], dict(os.environ), remove_notset=False)
    if not deployments:
        raise StackError(f"{path} defines no deployments")
    missing = sorted(set(_UNRESOLVED.findall(yaml.safe_dump(deployments))))
    if missing:
        raise StackError(f"{path} uses environment variables that are not set: {missing} (`eval \"$(python -m infra.stack env)\"` sets them)")
    sys.path.insert(0, str(path.parent))
    try:
        with environ_scope(env):
            for deployment in deployments:
                name = f"{deployment.get('name')} ({deployment.get('entrypoint')})"
                flow = load_flow_from_entrypoint(str(path.parent / deployment["entrypoint"]))
                try:
                    flow.validate_parameters(deployment.get("parameters") or {})
                except Exception as exc:  # noqa: BLE001 - Prefect wraps pydantic's error
                    raise StackError(f"deployment {name}: invalid parameters: {exc}") from None
                for bucket in sorted({"s3://" + u[5:].split("/", 1)[0] for u in _s3_urls(deployment.get("parameters"))}):
                    try:
                        check_reachable(bucket)
                    except StorageError as exc:
                        raise StackError(f"deployment {name}: {exc}") from None
            tracking = env.get("MLFLOW_TRACKING_URI")
            if tracking:
                try:
                    check_tracking_uri(tracking)
                except TrackingError as exc:
                    raise StackError(str(exc)) from None
    finally:
        sys.path.remove(str(path.parent))
    for pool in sorted({d.get("work_pool", {}).get("name") for d in deployments} - {None}):
        try:
            api_json(f"{api.rstrip('/')}/work_pools/{pool}")
        except Exception as exc:  # noqa: BLE001
            raise StackError(f"work pool {pool!r} is not on {api} ({exc}); `python -m infra.stack up` creates it") from None
    return deployments


def deploy_env(config: StackConfig, *, caller_wins: bool = True) -> dict[str, str]:
    """The variables ``prefect deploy`` and the checks run with: the stack's addresses and the
    environment's S3 keys; with ``caller_wins``, a server or pool the caller set wins."""
    env = {**s3_credentials(config), **config.client_env()}
    if caller_wins:
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CAFM_STORAGE_ROOT", "CAFM_WORK_POOL"):
            if os.environ.get(key):
                env[key] = os.environ[key]
    return env


def deploy(env: dict[str, str], prefect_file: str | Path, echo=print) -> list[dict]:
    """Preflight, then ``prefect --no-prompt deploy --all`` from the file's folder."""
    deployments = preflight(prefect_file, env)
    path = Path(prefect_file).resolve()
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
                            cwd=str(path.parent), env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise StackError(f"prefect deploy failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    names = ", ".join(d["name"] for d in deployments)
    echo(f"deployed {len(deployments)} deployments ({names}) to {env['PREFECT_API_URL']}")
    return deployments
