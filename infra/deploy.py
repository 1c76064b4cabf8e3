"""``prefect deploy --all`` with checks first: each bad input gets one clear error before
anything is registered.

Checked, in order: the Prefect server answers and accepts ``PREFECT_API_AUTH_STRING``; every ``{{ $VAR }}`` in ``prefect.yaml`` is
set; the code's repository answers (``git ls-remote``) and holds the commit the pull step
clones (a warning, not an error, when this checkout has uncommitted changes: they are not
deployed); each deployment's parameters validate against its flow's typed parameters; each
``s3://`` bucket named in them exists and is writable with the environment's keys (missing
bucket, wrong credentials and an unreachable endpoint each say so); the MLflow server the
worker will use answers and accepts ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``;
the work pool exists.

Where the code comes from (``prefect.yaml``'s ``pull`` step, ``git_clone``): the repository
``CAFM_CODE_REPOSITORY`` at the commit ``CAFM_CODE_COMMIT``. :func:`deploy_env` defaults the
repository to this checkout (a path: right for a worker on this machine) and the commit to
this checkout's ``HEAD`` -- also when the caller names another repository, so that the
deployment runs what is checked out here once it has been pushed there (the preflight says
so when it has not); a caller who wants another commit sets ``CAFM_CODE_COMMIT`` to its full
sha.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import shutil
import tempfile
import urllib.error
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from infra.auth import read_secrets
from infra.config import BIN, REPO, StackConfig, StackError, environ_scope, s3_credentials
from infra.health import api_json, http_ok

_UNRESOLVED = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")
_FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
GIT_CLONE_STEPS = ("prefect.deployments.steps.git_clone", "prefect.deployments.steps.pull.git_clone")
CODE_VARIABLES = ("CAFM_CODE_REPOSITORY", "CAFM_CODE_COMMIT")
GIT_TIMEOUT_S = 120


def _git(*args: str, cwd: str | Path | None = None, timeout: float = GIT_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``git ARGS``, never prompting for credentials; a timeout or a missing ``cwd`` reads as a
    failed command (its ``stderr`` says which)."""
    if shutil.which("git") is None:
        raise StackError("`git` is not installed: the deployments' pull step clones the code with it")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": "", "LC_ALL": "C"}
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(["git", *args], 124, "", f"no answer within {timeout:.0f} s")
    except (FileNotFoundError, NotADirectoryError):
        return subprocess.CompletedProcess(["git", *args], 128, "", f"no folder {cwd}")


def _shown(repository: str) -> str:
    """``repository`` as messages show it: without any user or token before ``@host``."""
    parts = urlsplit(repository)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
    return repository


def _git_error(stderr: str) -> str:
    """git's own reason: its first ``fatal:``/``error:`` line, else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (reasons or lines or ["no output"])[0 if reasons else -1]


def head_commit(checkout: str | Path = REPO) -> str | None:
    """The full sha of ``checkout``'s ``HEAD``; None when it is not a git checkout."""
    result = _git("rev-parse", "--verify", "HEAD^{commit}", cwd=checkout, timeout=30)
    return result.stdout.strip() if result.returncode == 0 and _FULL_SHA.fullmatch(result.stdout.strip()) else None


def code_source(*, caller_wins: bool = True, checkout: str | Path = REPO) -> dict[str, str]:
    """``CAFM_CODE_REPOSITORY`` and ``CAFM_CODE_COMMIT`` for the pull step: the caller's (with
    ``caller_wins``), else ``checkout`` and its ``HEAD``. The commit is left out when neither
    gives one (not a git checkout): the preflight then says to set it."""
    env = {"CAFM_CODE_REPOSITORY": str(checkout)}
    commit = head_commit(checkout)
    if commit:
        env["CAFM_CODE_COMMIT"] = commit
    if caller_wins:
        env.update({key: os.environ[key] for key in CODE_VARIABLES if os.environ.get(key)})
    return env


def check_code_source(repository: str, commit: str | None = None, *, branch: str | None = None,
                      checkout: str | Path | None = None, echo=print) -> None:
    """What the ``git_clone`` pull step will need, checked from here: ``repository`` answers,
    and holds ``commit`` (a full sha) or ``branch``. With ``checkout``, warns (``echo``) when
    that checkout has uncommitted changes to tracked files, which the deployment does not run."""
    shown = _shown(repository)
    listing = _git("ls-remote", "--quiet", repository)
    if listing.returncode != 0:
        error = _git_error(listing.stderr).replace(repository, shown)
        raise StackError(f"code repository {shown} does not answer (`git ls-remote`: {error}); "
                         "set CAFM_CODE_REPOSITORY to a git URL or path the worker can clone")
    tips = {}  # ref name -> the commit it points at
    for line in listing.stdout.splitlines():
        sha, _, ref = line.partition("\t")
        tips[ref.strip()] = sha.strip()
    if commit is not None:
        if not _FULL_SHA.fullmatch(commit):
            raise StackError(f"CAFM_CODE_COMMIT={commit!r} is not a full commit sha (40 hex digits): the deployment "
                             "pins one exact commit; `git rev-parse <branch or tag>` gives it")
        if commit not in tips.values() and not _has_commit(repository, commit):
            raise StackError(f"commit {commit} is not in the code repository {shown}: push it there "
                             "(or set CAFM_CODE_COMMIT to a commit it holds)")
    elif branch is not None and f"refs/heads/{branch}" not in tips:
        raise StackError(f"branch {branch!r} is not in the code repository {shown}")
    if checkout is not None:
        status = _git("status", "--porcelain", "--untracked-files=no", cwd=checkout, timeout=60)
        changed = [line[3:] for line in status.stdout.splitlines() if line.strip()] if status.returncode == 0 else []
        if changed:
            names = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            target = f"commit {commit}" if commit else f"branch {branch!r}" if branch else "the default branch"
            echo(f"warning: {checkout} has uncommitted changes to {len(changed)} tracked file(s) ({names}); "
                 f"the deployments run {target} of {shown} without them")


def _has_commit(repository: str, commit: str) -> bool:
    """Whether a clone of ``repository`` can check out ``commit``: fetched alone (what servers
    speaking git's protocol v2 allow), else looked up in a clone without file contents."""
    with tempfile.TemporaryDirectory(prefix="cafm-code-check-") as scratch:
        if _git("init", "--quiet", "--bare", scratch).returncode != 0:
            return False
        if _git("fetch", "--quiet", "--no-tags", "--depth=1", repository, commit, cwd=scratch).returncode == 0:
            return True
        clone = Path(scratch) / "clone"
        if _git("clone", "--quiet", "--bare", "--filter=blob:none", repository, str(clone)).returncode != 0:
            return False
        return _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=clone).returncode == 0


def check_pull_steps(pull_steps: list[dict], *, checkout: str | Path | None = None, echo=print) -> None:
    """:func:`check_code_source` for every ``git_clone`` step of ``prefect.yaml``'s ``pull``."""
    for step in pull_steps:
        for name, inputs in (step or {}).items():
            if name in GIT_CLONE_STEPS:
                inputs = inputs or {}
                check_code_source(str(inputs.get("repository", "")), inputs.get("commit_sha"),
                                  branch=inputs.get("branch"), checkout=checkout, echo=echo)


def _s3_urls(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("s3://") else []
    if isinstance(value, dict):
        return [u for item in value.values() for u in _s3_urls(item)]
    if isinstance(value, (list, tuple)):
        return [u for item in value for u in _s3_urls(item)]
    return []


def preflight(prefect_file: str | Path, env: dict[str, str], echo=print) -> list[dict]:
    """The deployments of ``prefect_file`` with their variables filled in, after every check
    (warnings go to ``echo``)."""
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
    auth = env.get("PREFECT_API_AUTH_STRING")
    try:
        api_json(f"{api.rstrip('/')}/admin/version", auth=auth, timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StackError(f"Prefect server {api} refused {'the' if auth else 'a request without an'} API auth string "
                             "(PREFECT_API_AUTH_STRING; `python -m infra.stack env` prints the local stack's)") from None
        raise StackError(f"Prefect server {api}: {exc}") from None
    config = yaml.safe_load(path.read_text()) or {}
    with environ_scope(env):  # Prefect reads `{{ $VAR }}` from os.environ
        deployments = apply_values(config.get("deployments") or [], dict(os.environ), remove_notset=False)
        pull_steps = apply_values(config.get("pull") or [], dict(os.environ), remove_notset=False)
    if not deployments:
        raise StackError(f"{path} defines no deployments")
    missing = sorted(set(_UNRESOLVED.findall(yaml.safe_dump([deployments, pull_steps]))))
    if missing:
        hint = "`eval \"$(python -m infra.stack env)\"` sets them"
        if set(missing) & set(CODE_VARIABLES):
            hint += ("; CAFM_CODE_REPOSITORY and CAFM_CODE_COMMIT (the code's git repository and the full sha of the "
                     f"commit to run) come from infra.deploy.deploy_env: {path.parent} and its HEAD, if it is a git checkout")
        raise StackError(f"{path} uses environment variables that are not set: {missing} ({hint})")
    check_pull_steps(pull_steps, checkout=path.parent, echo=echo)
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
            api_json(f"{api.rstrip('/')}/work_pools/{pool}", auth=auth)
        except Exception as exc:  # noqa: BLE001
            raise StackError(f"work pool {pool!r} is not on {api} ({exc}); `python -m infra.stack up` creates it") from None
    return deployments


def deploy_env(config: StackConfig, *, caller_wins: bool = True) -> dict[str, str]:
    """The variables ``prefect deploy`` and the checks run with: the stack's addresses, its S3
    keys (the environment's for a real endpoint), Prefect's auth string and MLflow's login (the
    stack's files) and the code's source (:func:`code_source`: this checkout at its ``HEAD``);
    with ``caller_wins``, a server, login, pool, repository or commit the caller set wins."""
    secrets = read_secrets(config.home)
    env = {**s3_credentials(config), **config.client_env(), **secrets.prefect_client_env(),
           **secrets.mlflow_client_env(), **code_source(caller_wins=caller_wins)}
    if caller_wins:
        for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD", "CAFM_STORAGE_ROOT", "CAFM_WORK_POOL"):
            if os.environ.get(key):
                env[key] = os.environ[key]
    return env


def deploy(env: dict[str, str], prefect_file: str | Path, echo=print) -> list[dict]:
    """Preflight, then ``prefect --no-prompt deploy --all`` from the file's folder."""
    deployments = preflight(prefect_file, env, echo=echo)
    path = Path(prefect_file).resolve()
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
                            cwd=str(path.parent), env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise StackError(f"prefect deploy failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    names = ", ".join(d["name"] for d in deployments)
    code = f"; their runs clone commit {env['CAFM_CODE_COMMIT']} of {_shown(env['CAFM_CODE_REPOSITORY'])}" \
        if env.get("CAFM_CODE_COMMIT") and env.get("CAFM_CODE_REPOSITORY") else ""
    echo(f"deployed {len(deployments)} deployments ({names}) to {env['PREFECT_API_URL']}{code}")
    return deployments
