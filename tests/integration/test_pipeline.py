"""The smoke pipeline end to end on real services: S3 (moto server on 127.0.0.1), an MLflow
store, a 2-worker local Ray cluster, and Prefect's ephemeral API."""

import json
import os

import boto3
import mlflow
import pytest
import ray
from mlflow import MlflowClient

from tasks.ray_cluster import LOCAL_NODE_IP

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP, log_to_driver=False)
    yield
    ray.shutdown()


def _keys(bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module")
def module_bucket(s3_server):
    """A bucket shared by this module's tests (the sweep reuses the pipeline's stages)."""
    import uuid

    client = boto3.client("s3")
    name = f"cafm-it-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    client.close()


@pytest.fixture(scope="module")
def smoke_run(module_bucket, tmp_path_factory, prefect_harness, local_ray):
    """The smoke pipeline, run once for this module (the sweep test reuses its FM stage)."""
    from flows.params import smoke_params
    from flows.pipeline import pipeline

    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    params = smoke_params(storage_root=f"{module_bucket}/runs", tracking_uri=tracking_uri, run_name="it")
    return params, pipeline(params), tracking_uri


def _task_graph(flow_run_id: str) -> dict[str, set[str]]:
    """Each task run of a flow run (by task name) -> the task names its inputs came from, as
    the Prefect API (and so the UI's run graph) records them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.id: run.name.rsplit("-", 1)[0] for run in runs}  # "fm-pretrain-2a1" -> "fm-pretrain"
    return {names[run.id]: {names[i.id] for inputs in run.task_inputs.values() for i in inputs if hasattr(i, "id")
                            and i.id in names} for run in runs}


def test_smoke_pipeline_on_s3_with_mlflow_and_two_ray_workers(module_bucket, smoke_run):
    from flows.pipeline import pipeline

    params, result, tracking_uri = smoke_run

    bucket = module_bucket.removeprefix("s3://")
    keys = _keys(bucket)
    stage = {name: f"runs/it/{name}/{fp}" for name, fp in result["stages"].items()}  # addressed by what made them
    for expected in (f"{stage['data']}/_COMPLETE.json", f"{stage['fm']}/model/checkpoint.json",
                     f"{stage['cafm']}/model/checkpoint.json", f"{stage['samples']}/_COMPLETE.json",
                     f"{stage['eval']}/out/report.md", f"{stage['eval']}/out/samples.png", f"{stage['eval']}/_COMPLETE.json",
                     f"runs/it/variants/{result['variant']}.json"):
        assert expected in keys, expected
    assert any(k.startswith(f"{stage['data']}/out/shards/") and k.endswith(".parquet") for k in keys)
    assert "| FM |" in result["table"] and "| CAFM |" in result["table"]

    # the run graph shows the DAG: each stage's task takes its inputs from the upstream tasks
    graph = _task_graph(result["prefect_flow_run_id"])
    assert graph == {"prepare-dataset": set(), "fm-pretrain": {"prepare-dataset"},
                     "cafm-posttrain": {"prepare-dataset", "fm-pretrain"},
                     "sample": {"prepare-dataset", "fm-pretrain", "cafm-posttrain"},
                     "evaluate": {"prepare-dataset", "sample", "cafm-posttrain"}}, graph

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

    # one protocol: the evaluation run, the registered version and its evaluation run carry its
    # id; the first candidate of a new registered model becomes its champion
    protocol_id = result["protocol_id"]
    assert eval_run.data.tags["cafm.protocol_id"] == protocol_id
    assert version.tags["cafm.protocol_id"] == protocol_id and len(version.tags["cafm.dataset"]) == 64
    assert client.get_model_version_by_alias(params.registered_model, "champion").version == version.version
    assert result["registered"]["champion"] is True
    evaluations = client.search_runs([client.get_experiment_by_name("cafm-model-evaluation").experiment_id])
    assert [r.data.tags["cafm.protocol_id"] for r in evaluations] == [protocol_id]

    # credentials never reach MLflow parameters or tags
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for run in runs:
        assert all(secret not in str(v) for v in {**run.data.params, **run.data.tags}.values())

    # a rerun with the same parameters skips every stage and returns the same report
    again = pipeline(params)
    assert again["table"] == result["table"]
    assert _keys(bucket) == keys


def test_sweep_reuses_the_fm_stage_and_tracks_every_trial(module_bucket, smoke_run):
    from flows.params import SweepParams
    from flows.sweep import sweep_flow

    params, result, tracking_uri = smoke_run
    bucket = module_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    fm_marker = f"runs/it/fm/{result['stages']['fm']}/_COMPLETE.json"
    fm_done = client.head_object(Bucket=bucket, Key=fm_marker)["LastModified"]
    # generator lr 10 diverges within a few generator steps: reported as such, not a failure
    sweep = SweepParams(pipeline=params, name="it-sweep", space={"generator_lr": [1e-5, 10.0]},
                        curve_every=20, curve_samples=64, curve_nfe=4)
    outputs = sweep_flow(sweep)

    ranked = [name for name, _ in outputs["ranking"]]
    assert sorted(ranked) == sorted(["FM", "t00-generator_lr=1e-05"])
    assert outputs["best"] == "t00-generator_lr=1e-05"
    assert outputs["failed"] == [] and outputs["diverged"] == ["t01-generator_lr=10"]
    assert outputs["protocol_id"] == smoke_run[1]["protocol_id"]  # the sweep's numbers compare with the pipeline's
    # ... one to one: the FM generator's rows are the same through both evaluation paths
    sweep_prefix = outputs["url"].removeprefix(f"s3://{bucket}/")
    assert sweep_prefix.startswith("runs/it/sweep/it-sweep/")
    swept = json.loads(client.get_object(Bucket=bucket, Key=f"{sweep_prefix}/sweep.json")["Body"].read())
    scored = json.loads(client.get_object(Bucket=bucket, Key=f"runs/it/eval/{result['stages']['eval']}/out/metrics.json")
                        ["Body"].read())
    fm_sweep = {(r["nfe"], r["seed"]): r["fd"] for r in swept["fm_rows"]}
    fm_pipeline = {(r["nfe"], r["seed"]): r["fd"] for r in scored["rows"] if r["model"] == "FM"}
    assert len(fm_sweep) == 2 and fm_sweep == pytest.approx(fm_pipeline, rel=1e-5)
    keys = _keys(bucket)
    for expected in ("report.md", "curves.png", "sweep.json", "_COMPLETE.json",
                     "trials/t00-generator_lr=1e-05/model/checkpoint.json", "trials/t01-generator_lr=10/diverged.json"):
        assert f"{sweep_prefix}/{expected}" in keys, expected
    assert "trials/t01-generator_lr=10/model/checkpoint.json" not in keys  # a diverged generator is not kept
    report = client.get_object(Bucket=bucket, Key=f"{sweep_prefix}/report.md")["Body"].read().decode()
    assert "`t01-generator_lr=10`: {'generator_lr': 10.0} (**diverged** at step" in report
    # the FM stage was found complete, not retrained
    assert client.head_object(Bucket=bucket, Key=fm_marker)["LastModified"] == fm_done

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(params.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_name == "sweep-it-sweep"][0]
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"t00-generator_lr=1e-05", "t01-generator_lr=10"} <= set(trials)
    assert "cafm.diverged" in trials["t01-generator_lr=10"].data.tags
    trial = trials["t00-generator_lr=1e-05"]
    assert trial.data.params["point.generator_lr"] == "1e-05"
    # the diagnostic curve: FD of the raw generator and of its EMA at step 0, 20, 40, 60
    fd_ema = client.get_metric_history(trial.info.run_id, "fd_ema")
    assert [m.step for m in sorted(fd_ema, key=lambda m: m.step)] == [0, 20, 40, 60]
    assert len(client.get_metric_history(trial.info.run_id, "logit_real")) == 3
    assert "nfe8.cfg1.fd" in trial.data.metrics

    # a rerun finds the sweep complete and returns the same table without training
    assert sweep_flow(sweep)["table"] == outputs["table"]


def _task_states(flow_run_id: str) -> dict[str, str]:
    """Each task run of a flow run (by task name) -> its final state's name (Completed, Cached, ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_changing_one_setting_reuses_every_stage_it_does_not_change(module_bucket, smoke_run, capsys):
    """The researcher's loop: change a CAFM setting, then a sampler setting, and rerun under
    the same run name. Upstream stages are reused (their markers untouched, shown as Cached
    in Prefect), the changed stages get new folders beside the old ones, both evaluations stay
    readable, and ``cafm-pipeline list`` shows the variants with what differs."""
    from flows.cli import main as cli
    from flows.pipeline import pipeline

    params, first, _ = smoke_run
    bucket = module_bucket.removeprefix("s3://")
    s3 = boto3.client("s3")

    def marker(stage: str, result: dict) -> str:
        return f"runs/it/{stage}/{result['stages'][stage]}/_COMPLETE.json"

    def modified(key: str):
        return s3.head_object(Bucket=bucket, Key=key)["LastModified"]

    before = {stage: modified(marker(stage, first)) for stage in ("data", "fm", "cafm")}
    shorter = params.model_copy(update={"cafm": params.cafm.model_copy(update={"steps": 40})})
    second = pipeline(shorter)
    assert second["variant"] != first["variant"] and second["changes"] == {"cafm.steps": 40}
    assert second["stages"]["data"] == first["stages"]["data"] and second["stages"]["fm"] == first["stages"]["fm"]
    assert second["stages"]["cafm"] != first["stages"]["cafm"]
    assert {stage: modified(marker(stage, first)) for stage in ("data", "fm", "cafm")} == before  # nothing redone
    states = _task_states(second["prefect_flow_run_id"])
    assert states["prepare-dataset"] == states["fm-pretrain"] == "Cached", states
    assert states["cafm-posttrain"] == "Completed", states
    for result in (first, second):  # both evaluations readable, side by side
        report = s3.get_object(Bucket=bucket, Key=f"runs/it/eval/{result['stages']['eval']}/out/report.md")
        assert "| CAFM |" in report["Body"].read().decode()

    cafm_done = modified(marker("cafm", second))
    ray_dirs = {k.split("/")[3] for k in _keys(bucket) if k.startswith("runs/it/ray/")}
    fewer_nfes = shorter.model_copy(update={"sampling": shorter.sampling.model_copy(update={"nfes": [8]})})
    third = pipeline(fewer_nfes)
    assert third["stages"]["cafm"] == second["stages"]["cafm"] and modified(marker("cafm", second)) == cafm_done
    assert {k.split("/")[3] for k in _keys(bucket) if k.startswith("runs/it/ray/")} == ray_dirs  # no training
    assert third["stages"]["samples"] != second["stages"]["samples"]
    states = _task_states(third["prefect_flow_run_id"])
    assert states["fm-pretrain"] == states["cafm-posttrain"] == "Cached" and states["sample"] == "Completed", states

    assert pipeline(fewer_nfes)["variant"] == third["variant"]  # an unchanged rerun is the same variant
    assert cli(["list", "--run", "it", "--storage-root", params.storage_root]) == 0
    listing = capsys.readouterr().out
    assert "3 variant(s)" in listing and "cafm.steps=40" in listing and "sampling.nfes=[8]" in listing
    assert listing.index(third["variant"]) < listing.index(second["variant"]) < listing.index(first["variant"])

    # removing the CAFM variant keeps everything the others use
    assert cli(["remove", "--run", "it", "--variant", second["variant"], "--storage-root", params.storage_root]) == 0
    keys = _keys(bucket)
    assert marker("fm", first) in keys and marker("cafm", second) in keys  # the third variant uses that CAFM
    assert f"runs/it/eval/{second['stages']['eval']}/_COMPLETE.json" not in keys
    assert f"runs/it/variants/{second['variant']}.json" not in keys
