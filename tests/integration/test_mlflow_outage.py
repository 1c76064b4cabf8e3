"""The MLflow tracking server stopped mid-run (a real ``mlflow server`` on loopback, killed
and restarted on the same port and SQLite store).

What must hold: logging calls return quickly while the server is down (training goes on),
what could not be logged is listed with its values, and a server that comes back receives
everything, in order, each value once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from tasks.tracking import Tracker, TrackingError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and local artifacts, in its own
    process group so that stopping it leaves no worker behind."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        self.process = subprocess.Popen(
            [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
             "--artifacts-destination", str(self.directory / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=open(self.directory / "server.log", "ab"), start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start; see {self.directory / 'server.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the whole group: uvicorn and its workers
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
    for key, value in saved.items():
        os.environ[key] = ",".join(filter(None, ["127.0.0.1", "localhost", value]))
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def mlflow_server(_module_server):
    """The module's server, running (each server start costs 10-20 s here, so tests share one)."""
    if _module_server.process is None:
        _module_server.start()
    return _module_server


def test_tracking_is_buffered_while_the_server_is_down_and_sent_once_it_returns(mlflow_server):
    tracker = Tracker(mlflow_server.uri, "outage", strict=True, retry_after_s=60)
    with tracker.run("pipeline-x", {"seed": 0}) as parent_id:
        with tracker.run("fm", {"lr": 0.001}, parent_run_id=parent_id) as run_id:
            tracker.log_history([{"step": 10, "fm_loss": 1.0}])
            assert tracker.pending == []
            mlflow_server.stop()
            # training goes on: each call returns at once (one failed attempt, then buffered)
            started = time.perf_counter()
            tracker.log_history([{"step": 20, "fm_loss": 0.8}, {"step": 30, "fm_loss": 0.7}])
            tracker.log_metrics({"seconds": 12.5, "steps": 30})
            tracker.log_dict({"rollbacks": []}, "rollbacks.json")
            tracker.log_image(Image.new("RGB", (4, 4), "red"), "curves.png")
            assert time.perf_counter() - started < 30
    # the run says what was not logged, values included
    kinds = [item["kind"] for item in tracker.unlogged()]
    assert kinds == ["metrics", "metrics", "text", "image", "end_run", "end_run"]
    assert tracker.unlogged()[0] == {"run": "fm", "kind": "metrics", "what": "2 metric values (fm_loss)"}
    record = tracker.unlogged_record()
    assert record["items"][0]["values"][0][:3] == ("fm_loss", 0.8, 20) and "Connection" in record["error"]

    mlflow_server.start()
    assert tracker.flush() and tracker.pending == [] and tracker.last_error is None
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(run_id, "fm_loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 1.0), (20, 0.8), (30, 0.7)]  # each once
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["steps"] == 30
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["curves.png", "rollbacks.json"]


def test_a_stage_started_while_the_server_is_down_is_created_later(mlflow_server):
    mlflow_server.stop()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {mlflow_server.uri} is unreachable"):
        Tracker(mlflow_server.uri, "late")  # the early check before any compute still fails fast
    tracker = Tracker(mlflow_server.uri, "late", strict=False, retry_after_s=0)
    with tracker.run("prepare", {"source": "digits"}) as run_id:
        assert run_id.startswith("unlogged-")
        tracker.log_metrics({"count": 1797})
    assert [item["kind"] for item in tracker.unlogged()] == ["create_run", "metrics", "end_run"]
    mlflow_server.start()
    assert tracker.flush()
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("late").experiment_id])
    assert run.info.run_name == "prepare" and run.data.params == {"source": "digits"}
    assert run.data.metrics == {"count": 1797.0} and run.info.status == "FINISHED"


_STOPPED_ATTEMPT = """
import os, sys
from flows.params import PipelineParams
from flows.run_layout import RunLayout

params = PipelineParams(storage_root=sys.argv[1], run_name="replayed", tracking_uri=sys.argv[2], experiment="replay")
tracking = RunLayout(params).tracking
tracker = tracking.tracker
tracker.retry_after_s = 0
if sys.argv[3] == "killed":  # the server is up: a stage run is created, then the process dies inside it
    with tracker.run("killed-stage", {"lr": 0.1}, tags=tracking.tags):
        tracker.log_metrics({"fm_loss": 2.0}, step=5)
        assert tracker.flush()
        os._exit(0)
with tracker.run("pipeline-replayed", {"seed": 0}, tags=tracking.tags):  # the server is down all along
    with tracker.run("fm", {"lr": 0.001}, tags=tracking.tags):
        tracker.log_history([{"step": 10, "fm_loss": 1.0}, {"step": 20, "fm_loss": 0.5}])
        tracker.log_dict({"rollbacks": []}, "rollbacks.json")
print("unlogged:", len(tracking.note_unlogged()))
"""


def test_what_a_stopped_run_could_not_log_is_sent_by_replay_tracking(mlflow_server, tmp_path):
    """A pipeline process that ended while MLflow was down leaves ``tracking_unlogged.json``;
    one killed mid-stage leaves its run RUNNING. ``cafm-pipeline replay-tracking`` (also run
    at the start of every rerun) sends the first and ends the second as KILLED."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "PREFECT_HOME": str(tmp_path / "prefect")}
    root = tmp_path / "runs"

    def attempt(kind: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _STOPPED_ATTEMPT, str(root), mlflow_server.uri, kind],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    killed = attempt("killed")
    assert killed.returncode == 0, killed.stderr[-3000:]
    mlflow_server.stop()
    stopped = attempt("outage")
    assert stopped.returncode == 0 and "unlogged: 6" in stopped.stdout, stopped.stderr[-3000:]
    record_file = root / "replayed" / "tracking_unlogged.json"
    assert record_file.exists()

    cli = [sys.executable, "-m", "flows.cli", "replay-tracking", "--set", f"storage_root={root}",
           "--set", "run_name=replayed", "--set", f"tracking_uri={mlflow_server.uri}", "--set", "experiment=replay"]
    down = subprocess.run(cli, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 2 and "unreachable" in down.stderr  # the server is still down: nothing changes
    assert json.loads(record_file.read_text())["items"]

    mlflow_server.start()
    replayed = subprocess.run(cli, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr[-3000:]
    assert "sent 6 item(s)" in replayed.stdout and "ended 1 run(s)" in replayed.stdout
    assert not record_file.exists()
    client = MlflowClient(mlflow_server.uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("replay").experiment_id])}
    assert set(runs) == {"killed-stage", "pipeline-replayed", "fm"}
    fm = runs["fm"]
    assert fm.info.status == "FINISHED" and fm.data.tags["mlflow.parentRunId"] == runs["pipeline-replayed"].info.run_id
    assert sorted((m.step, m.value) for m in client.get_metric_history(fm.info.run_id, "fm_loss")) == [(10, 1.0), (20, 0.5)]
    assert [a.path for a in client.list_artifacts(fm.info.run_id)] == ["rollbacks.json"]
    assert runs["pipeline-replayed"].info.status == "FINISHED"
    stage = runs["killed-stage"]
    assert stage.info.status == "KILLED" and "stopped without ending it" in stage.data.tags["cafm.ended_by"]
    assert client.get_metric_history(stage.info.run_id, "fm_loss")[0].value == 2.0  # what it logged is kept

    again = subprocess.run(cli, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to replay" in again.stdout, again.stderr[-3000:]
