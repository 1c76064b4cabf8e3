"""Every flow that writes under ``<storage_root>/<run_name>`` holds the run's lease: a second run
of the same name is refused before any stage runs, and the lease is given back however the
flow ends (the flows' bodies are called directly, without a Prefect engine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows import pipeline as pipeline_module
from flows import sweep as sweep_module
from flows.params import SweepParams, smoke_params
from tasks.run_lease import LEASE_FILE, RunLease, RunLeaseHeld
from tasks.storage import Store


@pytest.fixture
def params(tmp_path):
    return smoke_params(storage_root=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                        run_name="shared")


@pytest.fixture
def no_stage_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran although the run's lease is held by another run")

    for module in (pipeline_module, sweep_module):
        for name in ("prepare_stage", "pretrain_stage"):
            monkeypatch.setattr(module, name, refuse)
    for name in ("posttrain_stage", "sample_stage", "evaluate_stage"):
        monkeypatch.setattr(pipeline_module, name, refuse)


FLOWS = {
    "pipeline": lambda p: pipeline_module.pipeline.fn(p),
    "prepare": lambda p: pipeline_module.prepare_flow.fn(p),
    "pretrain": lambda p: pipeline_module.pretrain_flow.fn(p),
    "posttrain": lambda p: pipeline_module.posttrain_flow.fn(p),
    "sample": lambda p: pipeline_module.sample_flow.fn(p),
    "evaluate": lambda p: pipeline_module.evaluate_flow.fn(p),
    "sweep": lambda p: sweep_module.sweep_flow.fn(SweepParams(pipeline=p)),
}


def test_every_flow_is_refused_while_another_run_of_the_name_works(params, no_stage_runs, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        store = Store(params.storage_root)
        holder = RunLease(store, store.url("shared"), renew_every_s=0, flow_run_id="first-flow-run")
        holder.acquire()
        lease_file = tmp_path / "runs" / "shared" / LEASE_FILE
        record = json.loads(lease_file.read_text())
        lease_file.write_text(json.dumps({**record, "cafm.pid": str(child.pid)}))  # held by another live process
        for name, run in FLOWS.items():
            with pytest.raises(RunLeaseHeld, match=rf"run 'shared' is in use: .* pid {child.pid}, .*"
                                                   r"Prefect flow run first-flow-run"):
                run(params)
            assert json.loads(lease_file.read_text())["cafm.pid"] == str(child.pid), name  # left to its holder
        assert not (tmp_path / "runs" / "shared" / "variants").exists()  # nothing written under the run
    finally:
        child.kill()
        child.wait()


def test_the_lease_is_given_back_when_a_flow_fails_and_when_it_ends(params, monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("the prepare stage broke")

    monkeypatch.setattr(pipeline_module, "prepare_stage", fail)
    with pytest.raises(RuntimeError, match="the prepare stage broke"):
        pipeline_module.pipeline.fn(params)
    assert not (tmp_path / "runs" / "shared" / LEASE_FILE).exists()
    with pipeline_module.holding_run(params):
        assert (tmp_path / "runs" / "shared" / LEASE_FILE).exists()
    assert not (tmp_path / "runs" / "shared" / LEASE_FILE).exists()


def test_removing_a_variant_is_refused_while_a_run_of_the_name_works(tmp_path, capsys):
    from flows.cli import main

    store = Store(str(tmp_path / "runs"))
    store.write_json(store.url("shared", "variants", "v1.json"), {"variant": "v1", "created_at": "2026-01-01T00:00:00",
                                                                   "params": {}, "stages": {}})
    holder = RunLease(store, store.url("shared"), renew_every_s=0)
    holder.acquire()
    args = ["remove", "--run", "shared", "--variant", "v1", "--storage-root", str(tmp_path / "runs")]
    assert main(args) == 2
    assert "error: run 'shared' is in use" in capsys.readouterr().err
    assert (tmp_path / "runs" / "shared" / "variants" / "v1.json").exists()
    holder.release()
    assert main(args) == 0 and not (tmp_path / "runs" / "shared" / "variants" / "v1.json").exists()
    assert not (tmp_path / "runs" / "shared" / LEASE_FILE).exists()
