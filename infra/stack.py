"""The local team stack on 127.0.0.1: S3-compatible server, Ray head, MLflow tracking server,
Prefect server, a Prefect process work pool and its worker.

    python -m infra.stack up        # start what is not running (idempotent), wait for health
    python -m infra.stack status    # one line per service: healthy / down, URL, pid
    python -m infra.stack env       # `export ...` lines pointing a shell at the stack
    python -m infra.stack deploy    # preflight checks, then `prefect deploy --all`
    python -m infra.stack logs [SERVICE] [-n LINES]
    python -m infra.stack down      # stop everything the stack started (idempotent)

Every setting comes from the environment (see :class:`StackConfig`); the state (pids, ports,
logs, the SQLite databases) lives under ``CAFM_STACK_HOME`` (default ``<repo>/.stack``).
Each service runs in its own session (process group) and carries ``CAFM_STACK_ID`` in its
environment, so ``down`` stops it with all its children, and :func:`stack_processes` finds
anything left behind. The stack's own secrets (``infra/auth.py``: Prefect's API auth string,
MLflow's admin login, the local S3 keys; files of mode 0600 under ``CAFM_STACK_HOME``, made
once by ``up``) and the caller's (a real endpoint's S3 keys, a Postgres password) reach each
service through its environment only, and only the services that use them; they are never
written to the state file or logged (``env`` prints the stack's, for a shell to use).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import asdict
from pathlib import Path

from infra.auth import SECRET_VARIABLES, ensure_secrets, read_secrets
from infra.config import (BIN, HOST, REPO, SERVICES, StackConfig, StackError, free_port, redact_url,
                          s3_credentials)
from infra.deploy import deploy, deploy_env
from infra.health import api_json, check_bucket, healthy, port_open, worker_online
from tasks.code_version import PACKAGES


# ---- processes -----------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stack_processes(stack_id: str) -> list[int]:
    """Live (non-zombie) processes of this user started by the stack ``stack_id``."""
    marker = f"CAFM_STACK_ID={stack_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    return found


class Stack:
    """Bring the stack up and down; the state file is ``<home>/stack.json``."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig.from_env()
        self.home = self.config.home
        self.state_file = self.home / "stack.json"
        self.logs = self.home / "logs"
        self._children: dict[str, subprocess.Popen] = {}
        state = self._read_state()
        if state:  # an existing stack keeps its ports and id
            for key in ("prefect_port", "mlflow_port", "s3_port", "ray_port", "stack_id", "bucket", "work_pool",
                        "ray_nodes", "ray_node_cpus"):
                if key in state["config"]:
                    setattr(self.config, key, state["config"][key])

    # ---- state ---------------------------------------------------------------------------
    def _read_state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def _write_state(self, pids: dict[str, int]) -> None:
        public = {k: v for k, v in asdict(self.config).items() if k not in ("prefect_db_url",)}
        public["home"] = str(self.config.home)
        public["prefect_db_url"] = redact_url(self.config.prefect_db_url) if self.config.prefect_db_url else None
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": public, "pids": pids, "urls": self.config.client_env()}, indent=2))
        os.replace(tmp, self.state_file)

    def pids(self) -> dict[str, int]:
        return dict(self._read_state().get("pids", {}))

    # ---- commands -------------------------------------------------------------------------
    def services(self) -> tuple[str, ...]:
        """In start order: the servers, the Ray worker nodes, the Prefect worker."""
        servers = tuple(s for s in SERVICES if s != "worker" and (s != "s3" or self.config.local_s3))
        return (*servers, *self.config.node_names, "worker")

    def status(self) -> dict[str, dict]:
        pids = self.pids()
        urls = {"s3": self.config.s3_url, "ray": self.config.ray_address, "mlflow": self.config.mlflow_url,
                "prefect": self.config.prefect_ui, "worker": f"pool {self.config.work_pool}",
                **{n: f"node of {self.config.ray_address} ({self.config.ray_node_cpus} CPUs, resource {n})"
                   for n in self.config.node_names}}
        return {s: {"healthy": healthy(self.config, s), "pid": pids.get(s), "running": bool(pids.get(s)) and _alive(pids[s]),
                    "url": urls[s]} for s in self.services()}

    def up(self, timeout_s: float = 180.0, echo=print, only: tuple[str, ...] | None = None) -> dict[str, float]:
        """Start every service (or those in ``only``) that is not healthy and wait for its
        health check; returns the seconds each took. The servers start side by side; the Ray
        worker nodes once the head is up, the Prefect worker once Prefect is."""
        if only is not None and (unknown := set(only) - set(self.services())):
            raise StackError(f"no service {sorted(unknown)} in this stack; it has {', '.join(self.services())}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.logs.chmod(0o700)  # the services' logs are the operator's (they hold presigned S3 URLs, short-lived)
        ensure_secrets(self.home, local_s3=self.config.local_s3)  # made once; a later up reuses them
        pids = self.pids()
        if not self.config.local_s3:
            check_bucket(self.config)  # a real endpoint: the bucket must exist and be writable
        seconds: dict[str, float] = {}
        later = {*self.config.node_names, "worker"}  # the nodes join the head; the worker needs Prefect
        wanted = [s for s in self.services() if only is None or s in only]
        for batch in ([s for s in wanted if s not in later], [s for s in wanted if s in later]):
            started = {}
            for service in batch:
                if pids.get(service) and _alive(pids[service]):
                    if healthy(self.config, service):
                        echo(f"{service}: already up")
                        continue
                    self._stop(service, pids[service])  # running but unhealthy: restart it
                self._check_port_free(service)
                if service == "worker":
                    self._create_work_pool()
                started[service] = time.perf_counter()
                pids[service] = self._start(service)
                self._write_state(pids)
            for service, start in started.items():
                self._wait_healthy(service, pids[service], timeout_s)
                if service == "s3":
                    check_bucket(self.config, create=True)
                seconds[service] = time.perf_counter() - start
                echo(f"{service}: up in {seconds[service]:.1f}s")
        self._write_state(pids)
        return seconds

    def down(self, timeout_s: float = 10.0, echo=print) -> list[int]:
        """Stop every service (workers first); returns any stack process still alive (should be [])."""
        pids = self.pids()
        order = [s for s in reversed(self.services()) if s in pids] + [s for s in pids if s not in self.services()]
        for service in order:
            self._stop(service, pids.pop(service), timeout_s)
            echo(f"{service}: stopped")
        leftover = stack_processes(self.config.stack_id)
        for pid in leftover:  # anything that left its process group
            _signal(pid, signal.SIGKILL, group=False)
        for temp in [self.config.ray_temp, *Path("/tmp").glob(f"cafm-ray-{self.config.stack_id}-*")]:
            shutil.rmtree(temp, ignore_errors=True)
        if self.state_file.exists():
            self._write_state({})
        return stack_processes(self.config.stack_id)

    # ---- internals --------------------------------------------------------------------------
    def _check_port_free(self, service: str) -> None:
        port = {"s3": self.config.s3_port, "ray": self.config.ray_port, "mlflow": self.config.mlflow_port,
                "prefect": self.config.prefect_port}.get(service)
        if port and port_open(port, timeout=0.5):
            var = {"s3": "CAFM_S3_PORT", "ray": "CAFM_RAY_PORT", "mlflow": "CAFM_MLFLOW_PORT", "prefect": "CAFM_PREFECT_PORT"}[service]
            raise StackError(f"cannot start {service}: port {port} on {HOST} is already in use by another program; "
                             f"set {var} to a free port (or 'auto'), or stop that program")

    def _env(self, service: str | None = None) -> dict[str, str]:
        """The environment of ``service`` (None: a Prefect CLI the stack runs against its own
        server). The caller's variables minus any that carry a secret, then the addresses and,
        per service, only the secrets it uses: S3 keys for S3, Ray, MLflow and the worker;
        Prefect's auth string for its server and its clients (the worker, the CLI); MLflow's
        auth configuration for its server and its login for the worker (the flows)."""
        from tasks.offline import OFFLINE_DEFAULTS, RAY_TRAIN_DEFAULTS  # telemetry off, Ray Train polling (lazy: importing sets os.environ)

        secrets = read_secrets(self.home)
        env = {**OFFLINE_DEFAULTS, **RAY_TRAIN_DEFAULTS, **{k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            env.pop(key, None)  # S3 credentials only where used (below); the caller's never reach the local stack
        if service in ("s3", "ray", "mlflow", "worker", *self.config.node_names):
            env.update(s3_credentials(self.config))
        env.update(self.config.client_env())
        env.update({
            "CAFM_STACK_ID": self.config.stack_id,
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no GenAI job consumers
            "MLFLOW_S3_ENDPOINT_URL": self.config.s3_url,
            "NO_PROXY": ",".join(filter(None, [HOST, "localhost", os.environ.get("NO_PROXY")])),
            "no_proxy": ",".join(filter(None, [HOST, "localhost", os.environ.get("no_proxy")])),
        })
        if service == "prefect":
            env.update(secrets.prefect_server_env(self.config.prefect_ui))
        if service in ("worker", None):
            env.update(secrets.prefect_client_env())
        if service == "worker":
            env.update(secrets.mlflow_client_env())
            # Prefect's worker asks for due runs every 10 s by default, so a run started from the
            # UI or the CLI waited up to 10 s before starting; 2 s costs the local server nothing
            env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
        if service == "mlflow":
            env.update(secrets.mlflow_server_env())
        if service == "s3":
            env["PYTHONPATH"] = str(REPO)  # infra.s3_server
        if self.config.prefect_db_url and service == "prefect":
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.config.prefect_db_url
        return env

    def _command(self, service: str) -> list[str]:
        c = self.config
        if service == "s3":
            return [sys.executable, "-m", "infra.s3_server", "--host", HOST, "--port", str(c.s3_port)]
        if service == "ray":
            return [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(c.ray_port),
                    "--num-cpus", str(c.ray_cpus), "--include-dashboard", "false", "--dashboard-host", HOST,
                    "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                    "--disable-usage-stats", "--temp-dir", str(c.ray_temp)]
        if service == "mlflow":
            db = self.home / "mlflow" / "mlflow.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            return [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", HOST, "--port", str(c.mlflow_port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", f"s3://{c.bucket}/mlflow"]
        if service == "prefect":
            return [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(c.prefect_port)]
        if service in c.node_names:
            number = int(service.rsplit("-", 1)[1])
            return [str(BIN / "ray"), "start", "--address", c.ray_address, "--block", "--node-ip-address", HOST,
                    "--num-cpus", str(c.ray_node_cpus), "--resources", json.dumps({service: 1}),
                    "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
                    "--min-worker-port", str(20000 + 2000 * number), "--max-worker-port", str(21999 + 2000 * number),
                    "--temp-dir", str(c.node_temp(service))]
        if service == "worker":
            return [str(BIN / "prefect"), "worker", "start", "--pool", c.work_pool, "--type", "process",
                    "--name", f"cafm-worker-{c.stack_id}"]
        raise StackError(f"unknown service {service!r}")

    def _machine(self, name: str, code: bool) -> tuple[dict[str, str], Path]:
        """Environment and working folder of a process that stands for another machine (a Ray
        worker node, the Prefect worker): its own HOME and TMPDIR under ``<home>/nodes/<name>``,
        the Ray cluster's token in that HOME (``~/.ray/auth_token``, as on a real node) and, for a
        Ray node, its own copy of the code (on PYTHONPATH; it is the working folder)."""
        root = self.config.node_home(name)
        home, tmp, src = root / "home", root / "tmp", root / "code"
        for folder in (home / ".ray", tmp):
            folder.mkdir(parents=True, exist_ok=True)
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if token.exists():
            (home / ".ray" / "auth_token").touch(mode=0o600)
            (home / ".ray" / "auth_token").write_bytes(token.read_bytes())
        elif not os.environ.get("RAY_AUTH_TOKEN"):
            raise StackError(f"the Ray head's token {token} is missing (the head makes it on start); cannot start {name}")
        env = {**self._env(name), "HOME": str(home), "TMPDIR": str(tmp)}
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if not code:
            return env, root
        env["PYTHONPATH"] = str(self._code_copy(src))
        return env, src

    @staticmethod
    def _code_copy(src: Path) -> Path:
        """A copy of the checkout's packages at ``src``, as of now: a Ray node runs the code of
        its start, whatever is edited later (a mismatch with a driver is refused by name)."""
        shutil.rmtree(src, ignore_errors=True)
        for package in PACKAGES:
            shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        return src

    def _start(self, service: str) -> int:
        log = open(self.logs / f"{service}.log", "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {service}\n".encode())
        log.flush()
        env, cwd = self._env(service), self.home
        if service in self.config.node_names or service == "worker":
            env, cwd = self._machine(service, code=service != "worker")
        elif service == "ray":  # the head: the user's HOME (its token), its own copy of the code
            cwd = self._code_copy(self.config.node_home("ray-head") / "code")
            env["PYTHONPATH"] = str(cwd)
        child = subprocess.Popen(self._command(service), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=str(cwd), start_new_session=True)
        log.close()
        self._children[service] = child
        return child.pid

    def _wait_healthy(self, service: str, pid: int, timeout_s: float) -> None:
        deadline, started = time.monotonic() + timeout_s, time.time() - 1.0
        while time.monotonic() < deadline:
            if worker_online(self.config, since=started) if service == "worker" else healthy(self.config, service):
                return
            if not _alive(pid):
                raise StackError(f"{service} exited during start-up; see {self.logs / (service + '.log')}:\n"
                                 + tail(self.logs / f"{service}.log", 15))
            time.sleep(0.5)
        raise StackError(f"{service} not healthy after {timeout_s:.0f}s; see {self.logs / (service + '.log')}")

    def _create_work_pool(self) -> None:
        env = self._env()
        try:
            api_json(f"{self.config.prefect_api}/work_pools/{self.config.work_pool}", auth=env.get("PREFECT_API_AUTH_STRING"))
            return  # exists
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise StackError(f"Prefect server {self.config.prefect_api}: cannot read work pool: {exc}") from exc
        result = subprocess.run([str(BIN / "prefect"), "work-pool", "create", self.config.work_pool, "--type", "process"],
                                env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise StackError(f"cannot create work pool {self.config.work_pool}: {result.stdout}{result.stderr}")

    def _stop(self, service: str, pid: int, timeout_s: float = 10.0) -> None:
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pid):
            self._reap(service)
            time.sleep(0.2)
        if _group_alive(pid):
            _signal(pid, signal.SIGKILL)
        self._reap(service, wait=True)

    def _reap(self, service: str, wait: bool = False) -> None:
        child = self._children.get(service)
        if child is not None:
            try:
                child.wait(timeout=5 if wait else 0)
            except subprocess.TimeoutExpired:
                pass


def _signal(pid: int, sig: int, group: bool = True) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---- CLI -----------------------------------------------------------------------------------

def shell_env(config: StackConfig) -> str:
    """``export`` lines that point a shell at the stack: its addresses and the secrets a client
    needs (read from their files: Prefect's auth string, MLflow's login, the local S3 keys).
    Meant for ``eval``; it prints secrets, so never into a log."""
    secrets = read_secrets(config.home).need("prefect_auth", "mlflow_password")
    env = {**config.client_env(), **secrets.prefect_client_env(), **secrets.mlflow_client_env()}
    if config.local_s3:
        env.update(secrets.need("s3_secret").s3_env())
    lines = [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    if config.local_s3:
        lines.append("export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}")
        lines.append("unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN")  # a session token would spoil the signature
    return "".join(line + "\n" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack (idempotent)")
    up.add_argument("--ray-nodes", type=int, default=None, metavar="N",
                    help="Ray worker nodes beside the head, each its own raylet with its own code, HOME and TMPDIR "
                         "(default: CAFM_RAY_NODES, else 0, or what the running stack has)")
    up.add_argument("--ray-node-cpus", type=int, default=None, metavar="C", help="CPUs of each worker node (default 2)")
    sub.add_parser("down", help="stop the stack (idempotent)")
    sub.add_parser("status", help="health of every service")
    sub.add_parser("env", help="print `export` lines for a shell that uses the stack")
    logs = sub.add_parser("logs", help="the last lines of the services' logs")
    logs.add_argument("service", nargs="?", help=f"one of {', '.join(SERVICES)} or ray-node-N")
    logs.add_argument("-n", "--lines", type=int, default=40)
    deploy_cmd = sub.add_parser("deploy", help="preflight checks, then `prefect deploy --all` against the stack")
    deploy_cmd.add_argument("--file", default=str(REPO / "prefect.yaml"))
    args = parser.parse_args(argv)

    stack = Stack()
    try:
        if args.command == "up":
            for key in ("ray_nodes", "ray_node_cpus"):
                value = getattr(args, key)
                if value is not None:
                    if value < (0 if key == "ray_nodes" else 1):
                        raise StackError(f"--{key.replace('_', '-')} {value}: expected {'0 or more' if key == 'ray_nodes' else '1 or more'}")
                    setattr(stack.config, key, value)
            start = time.perf_counter()
            stack.up()
            print(f"stack up in {time.perf_counter() - start:.1f}s: Prefect UI {stack.config.prefect_ui}, "
                  f"MLflow {stack.config.mlflow_url}, S3 {stack.config.s3_url} (bucket {stack.config.bucket}), "
                  f"Ray {stack.config.ray_address}"
                  + (f" with {stack.config.ray_nodes} worker node(s)" if stack.config.ray_nodes else "")
                  + f"; logs in {stack.logs}")
        elif args.command == "down":
            left = stack.down()
            if left:
                print(f"error: processes still alive after down: {left}", file=sys.stderr)
                return 1
            print("stack down: no stack process left")
        elif args.command == "status":
            report = stack.status()
            for service, info in report.items():
                print(f"{service:10s} {'healthy' if info['healthy'] else 'DOWN':8s} {info['url']}  pid {info['pid']}")
            return 0 if all(i["healthy"] for i in report.values()) else 1
        elif args.command == "env":
            print(shell_env(stack.config), end="")
        elif args.command == "logs":
            if args.service and args.service not in {*SERVICES, *stack.config.node_names}:
                raise StackError(f"no service {args.service!r}; this stack has {', '.join(stack.services())}")
            for service in [args.service] if args.service else stack.services():
                print(f"==> {service} ({stack.logs / (service + '.log')})\n{tail(stack.logs / f'{service}.log', args.lines)}")
        elif args.command == "deploy":
            deploy(deploy_env(stack.config), args.file)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from infra.stack import main as _main  # the importable module's classes, not __main__'s copies

    sys.exit(_main())
