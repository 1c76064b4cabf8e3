"""Guided evaluation rows reach MLflow under names that carry the guidance scale, beside the
unguided ones (``<model>.nfe<N>.cfg<s>.<metric>``), so neither overwrites the other."""

from __future__ import annotations

from mlflow import MlflowClient

from tasks.tracking import Tracker


def test_guided_and_unguided_rows_are_separate_mlflow_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "guidance-names")
    unguided = {"model": "CAFM", "method": "heun", "nfe": 8, "cfg_scale": 1.0, "seeds": 3, "fd": 0.78, "recall": 0.95}
    guided = {**unguided, "cfg_scale": 1.5, "fd": 0.52, "recall": 0.83}
    with tracker.run("evaluate") as run_id:
        for row in (unguided, guided):
            tracker.log_summary_row(row, prefix="cafm.")
    assert tracker.flush()
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["cafm.nfe8.cfg1.fd"] == 0.78 and metrics["cafm.nfe8.cfg1.5.fd"] == 0.52
    assert metrics["cafm.nfe8.cfg1.recall"] == 0.95 and metrics["cafm.nfe8.cfg1.5.recall"] == 0.83
    assert not any(name.endswith((".seeds", ".cfg_scale", ".nfe")) for name in metrics)
