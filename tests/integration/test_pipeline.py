"""The smoke pipeline end to end on real services: S3 (moto server on 127.0.0.1), an MLflow
store, a 2-worker local Ray cluster, and Prefect's ephemeral API."""

import os

import boto3
import mlflow
import pytest
import ray
from mlflow import MlflowClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _keys(bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_smoke_pipeline_on_s3_with_mlflow_and_two_ray_workers(s3_bucket, tmp_path, prefect_harness, local_ray):
    from flows.params import smoke_params
    from flows.pipeline import pipeline

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = smoke_params(storage_root=f"{s3_bucket}/runs", tracking_uri=tracking_uri, run_name="it")
    result = pipeline(params)

    bucket = s3_bucket.removeprefix("s3://")
    keys = _keys(bucket)
    for expected in ("runs/it/data/_COMPLETE.json", "runs/it/fm/model/checkpoint.json", "runs/it/cafm/model/checkpoint.json",
                     "runs/it/samples/_COMPLETE.json", "runs/it/eval/out/report.md", "runs/it/eval/out/samples.png",
                     "runs/it/eval/_COMPLETE.json"):
        assert expected in keys, expected
    assert any(k.startswith("runs/it/data/out/shards/") and k.endswith(".parquet") for k in keys)
    assert "| FM |" in result["table"] and "| CAFM |" in result["table"]

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(params.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_id == result["mlflow_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} >= {"prepare", "fm", "cafm", "evaluate"}
    fm_run = [r for r in children if r.info.run_name == "fm"][0]
    assert len(client.get_metric_history(fm_run.info.run_id, "fm_loss")) >= 2
    eval_run = [r for r in children if r.info.run_name == "evaluate"][0]
    assert any(k.startswith("cafm.nfe8") for k in eval_run.data.metrics)
    version = client.get_model_version_by_alias(params.registered_model, "candidate")
    assert str(version.version) == result["registered"]["version"]

    # credentials never reach MLflow parameters or tags
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for run in runs:
        assert all(secret not in str(v) for v in {**run.data.params, **run.data.tags}.values())

    # a rerun with the same parameters skips every stage and returns the same report
    again = pipeline(params)
    assert again["table"] == result["table"]
    assert _keys(bucket) == keys
