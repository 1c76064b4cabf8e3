"""The whole pipeline process killed (SIGKILL) in the middle of FM pretraining, then rerun.

What must hold: the rerun takes over the run lease the killed process left (its owner is gone),
skips the completed data stage, the FM stage resumes from its last Ray checkpoint (not from
step 0), and MLflow's FM run holds every reported step exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _command(root: Path, tracking_uri: str) -> list[str]:
    settings = {
        "storage_root": str(root), "run_name": "killed", "tracking_uri": tracking_uri,
        "data.source": "eight_gaussians", "data.num_samples": 4000,
        "fm.steps": 120, "fm.batch_size": 64, "cafm.enabled": "false",
        "compute.num_workers": 1, "compute.checkpoint_every": 20,
        "sampling.num_samples": 256, "sampling.nfes": "[4]", "eval_seeds": "[0]",
    }
    args = [sys.executable, "-m", "flows.cli", "run", "--profile", "smoke"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process that carries this test's environment tag (Ray's included)."""
    for process in psutil.process_iter():
        try:
            if process.environ().get("CAFM_TEST_TAG") == tag:
                process.kill()
        except psutil.Error:
            continue


def test_a_pipeline_killed_mid_stage_resumes_on_rerun(tmp_path):
    root, tracking_uri = tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"
    tag = uuid.uuid4().hex
    env = {**os.environ, "CAFM_TEST_TAG": tag, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("RAY_ADDRESS", None)
    ray_dir = root / "killed" / "ray"  # the FM run's directory: killed-fm-<fingerprint>
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(_command(root, tracking_uri), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(ray_dir.glob("killed-fm-*/checkpoint_00000040")):
            assert first.poll() is None, f"the pipeline ended before it could be killed: {(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no FM checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _kill_tagged(tag)  # Ray's own processes, whatever session they are in
        log.close()
    lease = json.loads((root / "killed" / "_LEASE.json").read_text())  # the killed run's lease is left behind
    assert lease["cafm.pid"] == str(first.pid)
    (data_marker,) = (root / "killed" / "data").glob("*/_COMPLETE.json")  # data/<fingerprint>/
    data_done = json.loads(data_marker.read_text())
    assert not list((root / "killed" / "fm").glob("*/_COMPLETE.json"))

    try:
        second = subprocess.run(_command(root, tracking_uri), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
    finally:
        _kill_tagged(tag)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    # its owner is gone: the rerun took the lease over (and gave it back at its end)
    assert f"took over the lease {root / 'killed' / '_LEASE.json'} that a stopped run left" in output
    assert f"pid {first.pid}," in output and not (root / "killed" / "_LEASE.json").exists()
    assert re.search(r"Task run 'prepare-dataset-\w+' - Finished in state Cached", output), output[-4000:]
    assert json.loads(data_marker.read_text()) == data_done  # not rewritten
    (fm_marker,) = (root / "killed" / "fm").glob("*/_COMPLETE.json")
    fm = json.loads(fm_marker.read_text())["outputs"]["outputs"]
    # killed once the step-40 checkpoint was being written: step 20's (at least) was committed
    assert fm["steps"] == 120 and fm["resumed_from_step"] >= 20 and fm["resumed_from_step"] % 20 == 0
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("cafm-pipeline")
    (fm_run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "fm"
                 and r.info.status == "FINISHED"]
    steps = [m.step for m in client.get_metric_history(fm_run.info.run_id, "fm_loss")]
    assert sorted(steps) == list(range(20, 121, 20))  # the killed attempt's rows too, none twice
    # the killed attempt's MLflow runs were left RUNNING; the rerun ended them as KILLED, saying why
    runs = client.search_runs([experiment.experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert sorted(r.info.run_name for r in killed) == ["fm", "pipeline-killed"]
    assert all("stopped without ending it" in r.data.tags["cafm.ended_by"] for r in killed)
