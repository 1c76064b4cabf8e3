"""The team stack end to end, as a user drives it: stack up with a Ray head and two worker
nodes, `prefect deploy --all` with the code pulled from a bare git repository, the pipeline
deployment triggered through the Prefect API (as the UI does) and run by the process worker
(its own folder, HOME and TMPDIR, no checkout: each run clones the commit) on the multi-node
cluster with two DDP workers on different nodes, results checked in MLflow and the bucket; the scheduled evaluation
deployment (trend artifact, idempotent rerun, regression fails, better candidate promoted);
a run started from the Prefect UI in headless Chromium (through the UI's login form); every
server refuses a request without the stack's credentials, the secrets' files are 0600 and
no secret is in a log or the state file; stack down leaves no process.

Real services on 127.0.0.1 with free ports (infra/stack.py); tests run in file order and
share the module's stack. About 6-9 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest

from infra.auth import MLFLOW_AUTH_FILE, PREFECT_AUTH_FILE, S3_KEYS_FILE, StackSecrets, read_secrets
from infra.config import StackConfig, free_port
from infra.health import api_json, basic_auth, http_status
from infra.stack import Stack, stack_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CALLER_SECRET = f"e2e-caller-secret-{uuid.uuid4().hex}"  # the caller's own AWS key: the local stack never takes it
RUN_NAME = "digits"  # the evaluation deployment's default held set is <root>/digits/data (its one dataset)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(os.environ.get("CAFM_SCREENSHOT_DIR", REPO / "outputs" / "screenshots"))
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _pipeline_params(root: str) -> dict:
    """The smoke profile, trimmed further: every stage runs, in about 2-3 minutes here."""
    from flows.params import CAFMParams, ComputeParams, DataParams, FMParams, SamplingParams, smoke_params

    return smoke_params(
        storage_root=root, run_name=RUN_NAME, data=DataParams(feature_steps=40),
        fm=FMParams(steps=60, batch_size=64), cafm=CAFMParams(steps=30, warmup_steps=10, batch_size=64, curve_samples=0),
        sampling=SamplingParams(nfes=[4, 8], num_samples=128),
        compute=ComputeParams(num_workers=2, cpus_per_worker=1, placement_strategy="SPREAD", checkpoint_every=30),
    ).model_dump(mode="json")


def _eval_params(root: str) -> dict:
    return {"data_url": f"{root}/{RUN_NAME}/data", "seeds": [0], "sampling": {"nfes": [4, 8], "num_samples": 256}}


CALLER_VARIABLES = {"AWS_ACCESS_KEY_ID": "e2e-caller-key", "AWS_SECRET_ACCESS_KEY": CALLER_SECRET,
                    "MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None}


def _published_env(stack: Stack) -> dict[str, str | None]:
    """What ``eval "$(python -m infra.stack env)"`` does to a user's shell, as bash does it: each
    variable it names, with its value afterwards (None: unset). The stack publishes its
    addresses and its clients' secrets (S3 keys, Prefect's auth string, MLflow's login) there."""
    import subprocess
    import sys

    script = 'set -e; out=$("$0" -m infra.stack env); printf "%s\\0" "$out"; eval "$out"; env -0'
    result = subprocess.run(["bash", "-c", script, sys.executable], cwd=REPO, capture_output=True, timeout=120,
                            env={**os.environ, "CAFM_STACK_HOME": str(stack.home)})
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    printed, *after = result.stdout.decode().split("\0")
    after = dict(item.split("=", 1) for item in after if "=" in item)
    names = re.findall(r"^export (\w+)=", printed, re.M) + [n for line in re.findall(r"^unset (.+)$", printed, re.M)
                                                           for n in line.split()]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_PASSWORD"} <= set(names)
    return {name: after.get(name) for name in names}


def _set_environ(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # the caller has AWS keys of its own (never for the local stack) and no MLflow login
    saved, ours = {k: os.environ.get(k) for k in CALLER_VARIABLES}, dict(CALLER_VARIABLES)
    _set_environ(CALLER_VARIABLES)
    # a head that trains nothing (0 CPUs, as on real clusters) and two worker nodes
    config = StackConfig(home=tmp_path_factory.mktemp("stack"), prefect_port=free_port(), mlflow_port=free_port(),
                         s3_port=free_port(), ray_port=free_port(), bucket="cafm-e2e", ray_cpus=0, ray_nodes=2,
                         ray_node_cpus=2)
    stack = Stack(config)
    start = time.perf_counter()
    try:
        stack.up(timeout_s=300, echo=lambda line: print(f"[stack] {line}"))
        print(f"[stack] up in {time.perf_counter() - start:.1f}s")
        # this process is a client too (boto3, s3fs, MlflowClient): it takes what the stack
        # publishes to its clients, as a user's shell does
        published = _published_env(stack)
        saved.update({k: os.environ.get(k) for k in published if k not in saved})
        ours.update(published)
        _set_environ(published)
        yield stack
    finally:
        stack.down()  # idempotent: the last test has already brought it down
        for key, value in saved.items():
            if os.environ.get(key) != ours[key]:
                continue  # another fixture (the session's S3 server) has set it since: leave it
            _set_environ({key: value})


def _secrets(stack: Stack) -> StackSecrets:
    return read_secrets(stack.home)


def _needles(stack: Stack) -> list[str]:
    """Every secret that must show up nowhere: the stack's (Prefect's auth string, MLflow's
    password and Flask key, the S3 secret) and the caller's own AWS key."""
    return [*_secrets(stack).values(), CALLER_SECRET]


def _api(stack: Stack, path: str, body: dict | None = None, method: str | None = None):
    """The stack's Prefect API, authenticated as its clients are (auth string, CSRF token)."""
    return api_json(f"{stack.config.prefect_api}{path}", body, method=method, auth=_secrets(stack).prefect_auth)


def _s3(stack: Stack, **keys):
    keys = keys or {"aws_access_key_id": _secrets(stack).s3_key_id, "aws_secret_access_key": _secrets(stack).s3_secret}
    return boto3.client("s3", endpoint_url=stack.config.s3_url, region_name="us-east-1", **keys)


def _keys(stack: Stack, prefix: str = "") -> list[str]:
    pages = _s3(stack).get_paginator("list_objects_v2").paginate(Bucket=stack.config.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _deployment(stack: Stack, name: str) -> dict:
    return _api(stack, f"/deployments/name/{name}")


def _wait(stack: Stack, run_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = _api(stack, f"/flow_runs/{run_id}")
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s}s; worker log:\n"
                         + (stack.logs / "worker.log").read_text()[-3000:])


def _trigger(stack: Stack, deployment: str, parameters: dict, timeout_s: float = 600) -> dict:
    """What the UI's "Custom run" does: POST create_flow_run with the parameters; then wait."""
    dep = _deployment(stack, deployment)
    run = _api(stack, f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
    return _wait(stack, run["id"], timeout_s)


def _artifacts(stack: Stack, run_id: str) -> dict[str, dict]:
    found = _api(stack, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    for artifact in found:
        if artifact["type"] == "table" and isinstance(artifact["data"], str):
            artifact["data"] = json.loads(artifact["data"])
    return {a["key"]: a for a in found}


def _logs(stack: Stack, run_id: str) -> str:
    logs = _api(stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def _listening_addresses(pid: int) -> set[str]:
    import psutil

    addresses = set()
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            addresses |= {c.laddr.ip for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return addresses


def test_stack_up_is_healthy_idempotent_and_on_loopback(stack):
    report = stack.status()
    assert all(info["healthy"] for info in report.values()), report
    start = time.perf_counter()
    assert stack.up(echo=lambda line: None) == {}  # nothing restarted
    assert time.perf_counter() - start < 30
    pids = stack.pids()
    for service in ("s3", "mlflow", "prefect"):
        assert _listening_addresses(pids[service]) == {"127.0.0.1"}, service


def _opener():
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_prefect_refuses_requests_without_the_auth_string_foreign_origins_and_writes_without_csrf(stack):
    """401 without (or with a wrong) auth string on every API route but the health probe;
    CORS only for the UI's own origin; a write without Prefect's CSRF token is refused."""
    import urllib.error
    import urllib.request

    secrets = _secrets(stack)
    api, ui = stack.config.prefect_api, stack.config.prefect_ui
    for path in ("/admin/version", "/deployments/filter", "/block_documents/filter", "/csrf-token?client=x"):
        assert http_status(api + path) == 401, path  # refused before any route (health probes excepted)
    assert http_status(f"{api}/admin/version", basic_auth("cafm:not-the-auth-string")) == 401
    assert http_status(f"{api}/admin/version", basic_auth(secrets.prefect_auth)) == 200
    assert http_status(f"{api}/health") == 200  # the probe path needs no auth string
    opener = _opener()

    def cors(origin: str, method: str) -> str | None:
        headers = {"Origin": origin, **({"Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization,content-type"}
                                         if method == "OPTIONS" else basic_auth(secrets.prefect_auth))}
        try:
            with opener.open(urllib.request.Request(f"{api}/admin/version", method=method, headers=headers), timeout=10) as r:
                return r.headers.get("Access-Control-Allow-Origin")
        except urllib.error.HTTPError as exc:
            return exc.headers.get("Access-Control-Allow-Origin")

    for method in ("OPTIONS", "GET"):  # a web page elsewhere may neither send its request nor read the answer
        assert cors("http://evil.example", method) is None, method
        assert cors(ui, method) == ui, method
    write = urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST",
                                   headers={"Content-Type": "application/json", **basic_auth(secrets.prefect_auth)})
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(write, timeout=10)
    assert refused.value.code == 403 and "CSRF" in refused.value.read().decode()
    assert isinstance(_api(stack, "/flows/filter", {}), list)  # with the token (as every client fetches it)


def test_mlflow_refuses_requests_without_the_stacks_login(stack):
    secrets = _secrets(stack)
    search = f"{stack.config.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    login = f"{secrets.mlflow_username}:{secrets.mlflow_password}"
    assert http_status(search) == 401
    assert http_status(search, basic_auth(f"{secrets.mlflow_username}:not-the-password")) == 401
    assert http_status(search, basic_auth(login)) == 200
    assert http_status(f"{stack.config.mlflow_url}/health") == 200  # the probe path needs no login
    assert http_status(f"{stack.config.mlflow_url}/signup") == 401  # nobody signs up without a login


def test_s3_refuses_wrong_keys_unsigned_requests_and_its_control_api(stack):
    """Only the stack's generated key pair is accepted (not the caller's AWS key, which the
    local stack never takes); moto's unauthenticated control API cannot switch that off."""
    import urllib.error
    import urllib.request

    from botocore.exceptions import ClientError

    secrets = _secrets(stack)
    opener = _opener()
    for keys in ({"aws_access_key_id": secrets.s3_key_id, "aws_secret_access_key": "not-the-secret"},
                 {"aws_access_key_id": "e2e-caller-key", "aws_secret_access_key": CALLER_SECRET}):
        with pytest.raises(ClientError) as denied:
            _s3(stack, **keys).list_objects_v2(Bucket=stack.config.bucket)
        assert denied.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "InvalidAccessKeyId")
    assert http_status(f"{stack.config.s3_url}/{stack.config.bucket}") == 403  # unsigned
    reset = urllib.request.Request(f"{stack.config.s3_url}/moto-api/reset-auth", data=b"inf", method="POST",
                                   headers={"Content-Type": "text/plain"})  # as moto's own client sends it
    with pytest.raises(urllib.error.HTTPError) as closed:
        opener.open(reset, timeout=10)
    assert closed.value.code == 403
    with pytest.raises(ClientError):  # still checked after the attempt to switch the checks off
        _s3(stack, aws_access_key_id="e2e-caller-key", aws_secret_access_key=CALLER_SECRET).list_buckets()
    assert stack.config.bucket in {b["Name"] for b in _s3(stack).list_buckets()["Buckets"]}
    # what `python -m infra.stack env` publishes (this process took it) is all a client needs
    import boto3

    from_env = boto3.session.Session().client("s3")  # a fresh session: endpoint, region and keys from the environment
    assert os.environ["AWS_ENDPOINT_URL"] == stack.config.s3_url
    assert stack.config.bucket in {b["Name"] for b in from_env.list_buckets()["Buckets"]}


@pytest.fixture(scope="module")
def code_repository(tmp_path_factory) -> str:
    """A bare repository holding this checkout's HEAD: what the deployments' pull step clones."""
    import subprocess

    bare = tmp_path_factory.mktemp("git") / "cafm-pipeline.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(REPO), str(bare)], check=True, timeout=120)
    return str(bare)


@pytest.fixture(scope="module")
def deployed(stack, code_repository):
    from infra.deploy import deploy, deploy_env

    start = time.perf_counter()
    env = {**deploy_env(stack.config, caller_wins=False), "CAFM_CODE_REPOSITORY": code_repository}
    deployments = deploy(env, REPO / "prefect.yaml")
    print(f"[stack] deployed in {time.perf_counter() - start:.1f}s")
    return deployments


@pytest.fixture(scope="module")
def pipeline_run(stack, deployed):
    start = time.perf_counter()
    run = _trigger(stack, "cafm-pipeline/main", {"params": _pipeline_params(stack.config.storage_root)})
    print(f"[stack] pipeline deployment run: {run['state']['type']} in {time.perf_counter() - start:.1f}s")
    return run


def test_pipeline_deployment_runs_to_completed_with_results_in_mlflow_and_the_bucket(stack, pipeline_run):
    from mlflow import MlflowClient

    assert pipeline_run["state"]["type"] == "COMPLETED", (pipeline_run["state"], _logs(stack, pipeline_run["id"])[-3000:])
    keys = _keys(stack)
    for stage, expected in (("data", "_COMPLETE.json"), ("fm", "model/checkpoint.json"), ("cafm", "model/checkpoint.json"),
                            ("samples", "_COMPLETE.json"), ("eval", "out/report.md"), ("eval", "_COMPLETE.json")):
        pattern = re.compile(rf"runs/{RUN_NAME}/{stage}/[0-9a-f]{{16}}/{re.escape(expected)}")  # <stage>/<fingerprint>/
        assert any(pattern.fullmatch(k) for k in keys), (stage, expected)
    # MLflow's artifacts are on the bucket too (served through the tracking server)
    assert any(k.startswith("mlflow/") and k.endswith("samples.png") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("checkpoint.json") for k in keys)  # the registered generator

    client = MlflowClient(stack.config.mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("cafm-pipeline").experiment_id])
    parent = [r for r in runs if r.info.run_name == f"pipeline-{RUN_NAME}"][0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"prepare", "fm", "cafm", "evaluate"} <= set(children)
    assert len(client.get_metric_history(children["fm"].info.run_id, "fm_loss")) >= 2
    assert any(k.startswith("cafm.nfe8") for k in children["evaluate"].data.metrics)
    version = client.get_model_version_by_alias("cafm-generator", "candidate")
    assert client.get_model_version_by_alias("cafm-generator", "champion").version == version.version == "1"

    # the prefect run shows the evaluation's artifacts
    assert {"fm-vs-cafm", "samples"} <= set(_artifacts(stack, pipeline_run["id"]))

    # the run's code is the worker's clone of the pinned commit (under the worker's own TMPDIR)
    code = re.search(r"code: (\S+) \(commit ([0-9a-f]{40}), digest", _logs(stack, pipeline_run["id"]))
    assert code and code.group(1).startswith(str(stack.config.node_home("worker") / "tmp")), code
    assert code.group(2) == _head_commit()
    assert parent.data.tags["cafm.code_commit"] == code.group(2)
    # both training stages ran one DDP worker on each worker node (node ids from Ray); the
    # sampling tasks ran on both nodes
    for stage in ("fm", "cafm"):
        workers = _stage_outputs(stack, stage)["workers"]
        assert [w["rank"] for w in workers] == [0, 1] and len({w["node_id"] for w in workers}) == 2, workers
    assert len(_stage_outputs(stack, "samples")["nodes"]) == 2

    # secrets reach neither Prefect (parameters, logs) nor MLflow (params, tags)
    for secret in _needles(stack):
        assert secret not in str(pipeline_run["parameters"]) and secret not in _logs(stack, pipeline_run["id"])
        for run in runs:
            assert secret not in str({**run.data.params, **run.data.tags})


def _head_commit() -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _stage_outputs(stack: Stack, stage: str) -> dict:
    """A stage's outputs as its completion marker on the bucket records them."""
    keys = [k for k in _keys(stack, f"runs/{RUN_NAME}/{stage}/") if k.endswith("/_COMPLETE.json")]
    assert len(keys) == 1, keys
    marker = json.loads(_s3(stack).get_object(Bucket=stack.config.bucket, Key=keys[0])["Body"].read())
    return marker["outputs"]["outputs"]  # the store's record holds the ledger's {fingerprint, outputs}


def _alias(stack: Stack, alias: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(stack.config.mlflow_url).get_model_version_by_alias("cafm-generator", alias).version


def _evaluation_runs(stack: Stack, protocol_id: str | None = None) -> list:
    """The registered versions' evaluation runs (under one protocol, when given)."""
    from mlflow import MlflowClient

    client = MlflowClient(stack.config.mlflow_url)
    experiment = client.get_experiment_by_name("cafm-model-evaluation")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if protocol_id is None or r.data.tags.get("cafm.protocol_id") == protocol_id]


def _protocol_id(report: str) -> str:
    """The evaluation protocol's id, as the champion-vs-candidate report names it."""
    return re.search(r"Evaluation protocol `([0-9a-f]{16})`", report).group(1)


def _register_degraded_copy(stack: Stack, tmp_path: Path) -> str:
    """Version 1's generator with its weights replaced by noise, registered as ``candidate``."""
    import mlflow
    import torch

    from cafm_core.checkpoint import load_checkpoint, save_checkpoint
    from tasks.tracking import Tracker

    mlflow.set_tracking_uri(stack.config.mlflow_url)  # the model registry too
    local = Path(mlflow.artifacts.download_artifacts("models:/cafm-generator/1", dst_path=str(tmp_path / "v1")))
    checkpoint = next(local.rglob("checkpoint.json")).parent
    tensors, config, metadata = load_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    noisy = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in tensors.items()}
    save_checkpoint(tmp_path / "degraded", noisy, config, metadata)
    tracker = Tracker(stack.config.mlflow_url, "cafm-pipeline")
    with tracker.run("degraded-copy"):
        version, refused = tracker.register_generator(str(tmp_path / "degraded"), "cafm-generator",
                                                      dataset=metadata["dataset"])
    assert refused is None, refused
    return version


def test_scheduled_evaluation_publishes_trend_is_idempotent_fails_on_regression_and_promotes(stack, pipeline_run, tmp_path):
    from mlflow import MlflowClient

    assert pipeline_run["state"]["type"] == "COMPLETED"
    deployment = _deployment(stack, "model-evaluation/scheduled")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 6 * * *"]
    params = {"params": _eval_params(stack.config.storage_root)}

    first = _trigger(stack, "model-evaluation/scheduled", params)
    assert first["state"]["type"] == "COMPLETED", (first["state"], _logs(stack, first["id"])[-3000:])
    artifacts = _artifacts(stack, first["id"])
    assert {"model-trend", "model-evaluation"} <= set(artifacts)
    assert [row["version"] for row in artifacts["model-trend"]["data"]] == ["1"]
    protocol = _protocol_id(artifacts["model-evaluation"]["data"])
    [logged] = _evaluation_runs(stack, protocol)
    series = MlflowClient(stack.config.mlflow_url).get_metric_history(logged.info.run_id, "fd")
    assert sorted(m.step for m in series) == [4, 8]  # the metric as a series over NFE

    again = _trigger(stack, "model-evaluation/scheduled", params)
    assert again["state"]["type"] == "COMPLETED"
    assert len(_evaluation_runs(stack, protocol)) == 1  # same versions: nothing evaluated or logged again

    degraded = _register_degraded_copy(stack, tmp_path)
    assert _alias(stack, "candidate") == degraded == "2"
    failed = _trigger(stack, "model-evaluation/scheduled", params)
    assert failed["state"]["type"] == "FAILED"
    assert "regresses past the threshold of 10.0%" in failed["state"]["message"]
    assert _alias(stack, "champion") == "1"  # a regressing candidate is never promoted
    assert "Regression" in _artifacts(stack, failed["id"])["model-evaluation"]["data"]

    client = MlflowClient(stack.config.mlflow_url)
    client.set_registered_model_alias("cafm-generator", "champion", "2")  # the weak one holds the title ...
    client.set_registered_model_alias("cafm-generator", "candidate", "1")
    promoted = _trigger(stack, "model-evaluation/scheduled", params)
    assert promoted["state"]["type"] == "COMPLETED", promoted["state"]
    assert _alias(stack, "champion") == "1"  # ... until the better candidate takes it
    trend = _artifacts(stack, promoted["id"])["model-trend"]["data"]
    assert [row["version"] for row in trend] == ["1", "2"] and trend[0]["role"] == "champion, candidate"
    assert len(_evaluation_runs(stack, protocol)) == 2  # each version evaluated once in all
    for run_id, secret in ((r, s) for r in (first["id"], failed["id"], promoted["id"]) for s in _needles(stack)):
        assert secret not in str(_artifacts(stack, run_id)) and secret not in _logs(stack, run_id)


def _browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}); `make browser` installs the Debian "
                    "packages chromium and chromium-driver (needs root or sudo)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="cafm-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(15)
    return driver, profile


def _screenshot(driver, name: str) -> Path:
    """Save what the browser shows under ``SCREENSHOT_DIR`` (a real page, not a blank one)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    picture = SCREENSHOT_DIR / name
    assert driver.save_screenshot(str(picture)) and picture.stat().st_size > 20_000
    return picture


def _click(driver, xpath: str, timeout_s: float = 30) -> None:
    """Click the element at ``xpath`` once it is clickable (the UI re-renders while loading)."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            WebDriverWait(driver, 5).until(expected_conditions.element_to_be_clickable((By.XPATH, xpath))).click()
            return
        except (StaleElementReferenceException, ElementClickInterceptedException, TimeoutException):
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing clickable at {xpath} after {timeout_s:.0f}s on {driver.current_url}") from None
            time.sleep(0.5)


def _page_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def login_to_ui(driver, ui_url: str, auth_string: str) -> None:
    """With the API auth string on, the UI sends every visitor to its login form first: type
    the stack's auth string there and press Login, as a user does (the UI keeps it in the
    browser's local storage for the pages after)."""
    from selenium.webdriver.common.by import By

    driver.get(f"{ui_url}/deployments")
    deadline = time.monotonic() + 30
    while "/login" not in driver.current_url and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "/login" in driver.current_url, f"the UI showed {driver.current_url} without asking for the auth string"
    driver.find_element(By.XPATH, "//input[@type='password']").send_keys(auth_string)
    _click(driver, "//button[normalize-space(.)='Login']")
    deadline = time.monotonic() + 30
    while "/login" in driver.current_url and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "/login" not in driver.current_url, f"the UI refused the stack's auth string: {_page_text(driver)[:300]}"


def quick_run_from_ui(driver, ui_url: str, deployment: str) -> None:
    """Deployments -> the deployment -> Run -> Quick run, as a user clicks it."""
    driver.get(f"{ui_url}/deployments")
    _click(driver, f"//a[normalize-space(.)='{deployment}']")
    _click(driver, "//button[normalize-space(.)='Run']")
    _click(driver, "//button[contains(@class, 'p-overflow-menu-item')][contains(., 'Quick run')]")


def test_prefect_ui_starts_the_evaluation_deployment_and_shows_it_completed(stack, pipeline_run):
    deployment = _deployment(stack, "model-evaluation/scheduled")
    # the operator sets the deployment's parameters (as "Edit" in the UI does) to the e2e held set
    _api(stack, f"/deployments/{deployment['id']}", {"parameters": {"params": _eval_params(stack.config.storage_root)}},
         method="PATCH")
    runs_filter = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    before = {r["id"] for r in _api(stack, "/flow_runs/filter", runs_filter)}
    evaluations_before = len(_evaluation_runs(stack))
    driver, profile = _browser()
    try:
        login_to_ui(driver, stack.config.prefect_ui, _secrets(stack).prefect_auth)
        quick_run_from_ui(driver, stack.config.prefect_ui, "scheduled")
        deadline, new = time.monotonic() + 30, []
        while not new and time.monotonic() < deadline:
            new = [r for r in _api(stack, "/flow_runs/filter", runs_filter)
                   if r["id"] not in before and not r.get("auto_scheduled")]
            time.sleep(1)
        assert len(new) == 1, f"the UI's Quick run created no flow run (new: {new})"
        run = _wait(stack, new[0]["id"], timeout_s=300)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert len(_evaluation_runs(stack)) == evaluations_before  # same versions again: nothing new logged

        driver.get(f"{stack.config.prefect_ui}/runs/flow-run/{run['id']}")
        deadline = time.monotonic() + 30
        while "Completed" not in _page_text(driver) and time.monotonic() < deadline:
            time.sleep(1)
        assert "Completed" in _page_text(driver) and run["name"] in _page_text(driver)
        _click(driver, "//li[contains(@class, 'p-tab')][normalize-space(.)='Artifacts']")
        deadline = time.monotonic() + 30
        while "model-trend" not in _page_text(driver) and time.monotonic() < deadline:
            time.sleep(1)
        assert "model-trend" in _page_text(driver) and "model-evaluation" in _page_text(driver)
        time.sleep(1)  # let the cards finish rendering before the picture
        _screenshot(driver, "prefect-ui-evaluation-run.png")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_prefect_ui_shows_the_pipelines_sample_grid(stack, pipeline_run):
    """The picture is where people look: the pipeline run's ``samples`` artifact is an image
    the browser loads (inline PNG, not a storage URL it cannot open)."""
    assert pipeline_run["state"]["type"] == "COMPLETED"
    artifact = _artifacts(stack, pipeline_run["id"])["samples"]
    assert artifact["type"] == "image" and artifact["data"].startswith("data:image/png;base64,")
    driver, profile = _browser()
    try:
        login_to_ui(driver, stack.config.prefect_ui, _secrets(stack).prefect_auth)
        driver.get(f"{stack.config.prefect_ui}/artifacts/artifact/{artifact['id']}")
        script = ("return Array.from(document.images).filter(i => i.src.startsWith('data:image/png') && i.complete)"
                  ".map(i => i.naturalWidth)")
        deadline, widths = time.monotonic() + 30, []
        while not widths and time.monotonic() < deadline:
            widths = driver.execute_script(script)
            time.sleep(0.5)
        assert widths and widths[0] > 100, widths  # decoded and laid out: the FM and CAFM grids beside real data
        _screenshot(driver, "prefect-ui-sample-grid.png")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_deploy_rejects_bad_input_with_clear_errors(stack, deployed, tmp_path):
    from infra.config import StackError
    from infra.deploy import deploy_env, preflight

    env = deploy_env(stack.config, caller_wins=False)
    yaml_file = REPO / "prefect.yaml"

    unreachable = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    with pytest.raises(StackError, match="Prefect server http://127.0.0.1:.* is unreachable"):
        preflight(yaml_file, unreachable)

    with pytest.raises(StackError, match=r"bucket 'no-such-bucket' does not exist"):
        preflight(yaml_file, {**env, "CAFM_STORAGE_ROOT": "s3://no-such-bucket/runs"})

    invalid = tmp_path / "prefect.yaml"
    invalid.write_text(yaml_file.read_text().replace("storage_root:", "fm: {steps: 0}\n        storage_root:"))
    for name in ("flows", "tasks", "cafm_core"):
        (tmp_path / name).symlink_to(REPO / name)
    with pytest.raises(StackError, match=r"(?s)deployment main .*invalid parameters.*params\.fm\.steps: Input should be greater than or equal to 1"):
        preflight(invalid, env)

    # the server itself refuses an invalid parameter set, before any run exists (what the UI shows)
    import urllib.error

    dep = _deployment(stack, "cafm-pipeline/main")
    with pytest.raises(urllib.error.HTTPError) as refused:
        _api(stack, f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"params": {"fm": {"steps": 0}}}})
    assert refused.value.code in (409, 422) and "steps" in str(refused.value.reason), refused.value.reason

    # the stack's own S3 server checks keys: a wrong secret is refused, with the clear error
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    with pytest.raises(StackError, match="credentials rejected") as error:
        preflight(yaml_file, wrong)
    assert "wrong-secret" not in str(error.value)

    # a wrong (or no) Prefect auth string and a wrong MLflow password are each refused by name
    for auth in ("cafm:wrong-auth-string", None):
        without = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
        with pytest.raises(StackError, match="refused (the|a request without an) API auth string") as error:
            preflight(yaml_file, {**without, **({"PREFECT_API_AUTH_STRING": auth} if auth else {})})
        assert "wrong-auth-string" not in str(error.value)
    with pytest.raises(StackError, match="MLflow tracking server .* refused the login of MLFLOW_TRACKING_USERNAME") as error:
        preflight(yaml_file, {**env, "MLFLOW_TRACKING_PASSWORD": "wrong-mlflow-password"})
    assert "wrong-mlflow-password" not in str(error.value)


def _files_under(*roots: Path):
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from (path for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def test_stack_secrets_are_private_files_and_in_no_log_or_state_file(stack):
    """The secrets' files are 0600; no secret (the stack's, or the caller's AWS key, which the
    local stack never takes) is in any service's log, the state file, or Ray's session logs
    of the head and both worker nodes, nor in what Prefect and MLflow keep (their databases:
    flow-run logs and parameters, MLflow's params and tags; the bucket: MLflow's artifacts and
    the run folders). Runs after the pipeline, evaluation and UI runs (file order), so the
    logs hold all of their output (the worker's log holds the flow runs')."""
    for name in (PREFECT_AUTH_FILE, MLFLOW_AUTH_FILE, S3_KEYS_FILE):
        assert (stack.home / name).stat().st_mode & 0o777 == 0o600, name
    needles = [secret.encode() for secret in _needles(stack)]
    assert len(needles) == 5 and all(len(n) >= 24 for n in needles)
    ray_dirs = [stack.config.ray_temp, *(stack.config.node_temp(n) for n in stack.config.node_names)]
    searched, found = 0, []
    for path in _files_under(stack.logs, stack.state_file, *ray_dirs):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # a socket or a file Ray removed meanwhile
        searched += 1
        found += [(str(path), needle[:6]) for needle in needles if needle in data]
    assert searched > 20 and found == [], found  # the services' logs, stack.json and Ray's logs were read
    databases = [path for path in _files_under(stack.home / "prefect", stack.home / "mlflow")
                 if path.name.endswith((".db", ".db-wal", ".db-journal"))]
    assert {"prefect.db", "mlflow.db"} <= {path.name for path in databases}
    for path in databases:
        data = path.read_bytes()
        found += [(str(path), needle[:6]) for needle in needles if needle in data]
    client, objects = _s3(stack), 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.config.bucket):
        for item in page.get("Contents", []):
            if item["Size"] <= 4 * 1024 * 1024:
                data = client.get_object(Bucket=stack.config.bucket, Key=item["Key"])["Body"].read()
                found += [(f"s3://{stack.config.bucket}/{item['Key']}", needle[:6]) for needle in needles if needle in data]
                objects += 1
    assert objects > 20 and found == [], found  # Prefect's and MLflow's databases, the bucket's objects
    # what the services were started with: their environment holds only the secrets they use
    pids = stack.pids()
    environ = {service: Path(f"/proc/{pid}/environ").read_bytes() for service, pid in pids.items()}
    secrets = _secrets(stack)
    assert secrets.prefect_auth.encode() not in environ["ray"] + environ["mlflow"] + environ["s3"]
    assert secrets.mlflow_password.encode() not in environ["ray"] + environ["prefect"] + environ["s3"]
    assert secrets.s3_secret.encode() not in environ["prefect"]
    assert CALLER_SECRET.encode() not in b"".join(environ.values())


def test_stack_down_leaves_no_process_behind(stack):
    pids = stack.pids()
    start = time.perf_counter()
    assert stack.down(echo=lambda line: None) == []
    print(f"[stack] down in {time.perf_counter() - start:.1f}s")
    assert stack_processes(stack.config.stack_id) == []
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    for port in (stack.config.prefect_port, stack.config.mlflow_port, stack.config.s3_port, stack.config.ray_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    assert stack.down(echo=lambda line: None) == []  # idempotent
    assert not any(info["healthy"] for info in stack.status().values())
