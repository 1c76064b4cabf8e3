"""A Ray cluster of a head and two worker nodes on one machine, as the stack starts it
(``python -m infra.stack up --ray-nodes 2``): separate raylets, each worker node with its own
node id, temp dir, custom resource (``ray-node-N``), copy of the code, HOME and TMPDIR, and
its own copy of the cluster's token. Storage is S3 only (moto on loopback); the driver (this
process) runs from a folder without the code, so the nodes' workers import their own copy.

Tests run in file order and share the cluster; the last one stops a worker node. About 3
minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cafm_core.data import load_builtin
from cafm_core.models import MLPConfig
from infra.config import StackConfig, free_port
from infra.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")

NODES = ("ray-node-1", "ray-node-2")
MODEL = MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=0).to_dict()  # points: unconditional


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A head that runs no training (0 CPUs, as on real clusters) and two worker nodes of 3
    CPUs (a training worker, Ray Data's reads, sampling; after a node is lost, the other one
    holds both workers and the reads); yields the Stack."""
    import boto3

    home = tmp_path_factory.mktemp("multinode")
    bucket = f"cafm-multinode-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    config = StackConfig(home=home, ray_port=free_port(), ray_cpus=0, ray_nodes=2, ray_node_cpus=3,
                         s3_endpoint=s3_server["endpoint"], bucket=bucket)
    stack = Stack(config)
    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    driver_dir = tmp_path_factory.mktemp("driver")  # no code here: Ray puts the driver's cwd on the workers' path
    cwd = os.getcwd()
    try:
        stack.up(timeout_s=120, only=("ray", *NODES), echo=lambda line: print(f"[cluster] {line}"))
        os.environ.update({"RAY_ADDRESS": config.ray_address, "RAY_AUTH_MODE": "token"})
        _reload_ray_auth()
        os.chdir(driver_dir)
        yield stack
    finally:
        os.chdir(cwd)
        ray.shutdown()
        left = stack.down(echo=lambda line: None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_auth()  # later tests' local clusters run without the token again
        assert not left, f"cluster processes left behind: {left}"


@pytest.fixture(scope="module")
def shards_on_s3(cluster, s3_server, tmp_path_factory):
    """Eight-Gaussians shards uploaded to the cluster's bucket (the nodes read them from S3)."""
    from tasks.storage import Store
    from tests.integration.test_ray_train import write_shards

    bucket = cluster.config.bucket
    local = write_shards(load_builtin("eight_gaussians", num_samples=4096, seed=0),
                         tmp_path_factory.mktemp("shards"), 2, fixed_size=True)
    store = Store(f"s3://{bucket}")
    urls = []
    for path in local:
        url = store.join(store.root, "shards", os.path.basename(path))
        with open(path, "rb") as handle:
            store.write_bytes(url, handle.read())
        urls.append(url)
    for path in local:
        os.remove(path)  # nothing of the data is left on a local disk
    return {"bucket": f"s3://{bucket}", "urls": urls}


def _reload_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE once per process; this test process changes it (a driver
    started with the variable set, as the stack's clients are, needs none of this)."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


def _nodes_by_resource() -> dict[str, str]:
    """node id -> ``ray-node-N`` (or ``head``), from Ray's node table."""
    named = {}
    for node in ray.nodes():
        if node["Alive"]:
            names = [k for k in node["Resources"] if k in NODES]
            named[node["NodeID"]] = names[0] if names else "head"
    return named


def _fm(shards: dict, tmp_path, run_name: str, steps: int) -> dict:
    from tasks.train.driver import run_flow_matching

    return run_flow_matching(
        shard_urls=shards["urls"], sample_shape=(2,), num_classes=0, model_config=MODEL,
        fm_config={"steps": steps, "batch_size": 64, "lr": 3e-3, "log_every": 20},
        output_dir=str(tmp_path / "out"), num_workers=2, cpus_per_worker=1, placement_strategy="SPREAD",
        checkpoint_every=20, storage_path=f"{shards['bucket']}/ray", run_name=run_name,
    )


def test_training_workers_run_on_both_nodes_from_their_own_code_with_s3_only(cluster, shards_on_s3, tmp_path):
    from tests.integration.test_ray_train import assert_history_ok, assert_in_sync

    result = _fm(shards_on_s3, tmp_path, "fm-spread", steps=60)
    named = _nodes_by_resource()
    assert len(named) == 3, named
    placed = {w["rank"]: named[w["node_id"]] for w in result["workers"]}
    assert sorted(placed.values()) == list(NODES), placed  # one worker on each worker node
    for worker in result["workers"]:  # each imported its own node's copy, not the driver's checkout
        assert worker["code_path"] == str(cluster.config.node_home(named[worker["node_id"]]) / "code"), worker
    assert result["steps"] == 60 and [row["step"] for row in result["history"]] == [20, 40, 60]
    assert_history_ok(result["history"], ("fm_loss",))
    assert_in_sync(result)
    assert result["ray_checkpoint"].startswith(f"{shards_on_s3['bucket']}/ray/fm-spread/")
    # nothing of the run went through a worker node's disk: no shard, checkpoint or weights there
    for name in NODES:
        root = cluster.config.node_home(name)
        stray = [p for p in root.rglob("*") if p.suffix in (".parquet", ".safetensors") or p.name == "checkpoint.json"]
        assert not stray, stray
    # the S3 secret is in each node's environment, never in Ray's job config: no Ray log or
    # session file of any node holds it
    from tests.integration.conftest import TEST_SECRET_KEY

    temps = [cluster.config.ray_temp, *(cluster.config.node_temp(n) for n in NODES)]
    files = [p for temp in temps for p in temp.rglob("*") if p.is_file() and not p.is_socket()]
    assert len(files) > 20, temps  # the logs are there to search
    leaked = [p for p in files if TEST_SECRET_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_sampling_tasks_spread_over_the_nodes(cluster, shards_on_s3, tmp_path):
    """The sampling stage's shard tasks, from a generator on S3, land on more than one node."""
    from cafm_core.evaluation import SamplerSetting
    from cafm_core.protocol import protocol_for_dataset
    from tasks.sampling import generate_sample_shards
    from tasks.storage import Store

    store = Store(shards_on_s3["bucket"])
    done = _fm(shards_on_s3, tmp_path, "fm-spread", steps=60)  # the run above: returns at once
    model_url = store.join(store.root, "models", "fm")
    store.upload_dir(done["model_dir"], model_url, marker_last="checkpoint.json")
    protocol = protocol_for_dataset(load_builtin("eight_gaussians", num_samples=4096, seed=0),
                                    [SamplerSetting("euler", 4, 1.0)], [0], num_samples=2048, shard_size=256)
    layout, nodes = generate_sample_shards(store, models={"fm": model_url}, out_url=store.join(store.root, "samples"),
                                           protocol=protocol)
    named = _nodes_by_resource()
    assert sum(nodes.values()) == 8 == len(next(iter(layout.values())))
    assert {named[n] for n in nodes} >= set(NODES), {named[n]: c for n, c in nodes.items()}


def test_gpu_workers_on_a_cpu_only_cluster_are_refused_after_a_bounded_wait(cluster, shards_on_s3, tmp_path, monkeypatch):
    from tasks import ray_cluster
    from tasks.train.driver import run_flow_matching

    monkeypatch.setattr(ray_cluster, "RESOURCE_WAIT_S", 3.0)
    started = time.monotonic()
    with pytest.raises(ray_cluster.ClusterTooSmall, match=r"holds 0 of the 2 training workers.*GPU.*waited 3 s"):
        run_flow_matching(
            shard_urls=shards_on_s3["urls"], sample_shape=(2,), num_classes=0, model_config=MODEL,
            fm_config={"steps": 20, "batch_size": 64}, output_dir=str(tmp_path / "out"), num_workers=2,
            cpus_per_worker=1, use_gpu=True, checkpoint_every=20, storage_path=f"{shards_on_s3['bucket']}/ray",
            run_name="fm-gpu",
        )
    assert time.monotonic() - started < 60


def test_workers_the_nodes_cannot_place_fail_the_run_after_bounded_retries(cluster, shards_on_s3, tmp_path, monkeypatch):
    """Three workers that must be on three different nodes, on two worker nodes: the totals
    fit (so the driver's own check lets it through), the placement group never does. Ray
    Train's default retries that forever; here each start times out (5 s for the test) and
    after PLACEMENT_RETRIES the run fails with a clear error."""
    from tasks.ray_cluster import ClusterTooSmall
    from tasks.train import driver

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    started = time.monotonic()
    with pytest.raises(ClusterTooSmall, match=r"could not place 3 workers .*STRICT_SPREAD.* in 3 attempts"):
        driver.run_flow_matching(
            shard_urls=shards_on_s3["urls"], sample_shape=(2,), num_classes=0, model_config=MODEL,
            fm_config={"steps": 20, "batch_size": 64}, output_dir=str(tmp_path / "out"), num_workers=3,
            cpus_per_worker=1, placement_strategy="STRICT_SPREAD", checkpoint_every=20,
            storage_path=f"{shards_on_s3['bucket']}/ray", run_name="fm-unplaceable",
        )
    assert time.monotonic() - started < 120


def test_a_worker_node_lost_mid_training_the_run_finishes_on_what_remains(cluster, shards_on_s3, tmp_path, s3_client):
    """Stop ray-node-2 (its raylet and every process of it, as when a machine goes away)
    once the step-40 checkpoint is on S3: Ray Train restarts the worker group on what is
    left, the workers resume from the newest checkpoint that verifies, every step once."""
    from tests.integration.test_ray_train import assert_history_ok, assert_in_sync

    bucket = shards_on_s3["bucket"].removeprefix("s3://")
    marker = "ray/fm-node-lost/checkpoint_00000040/checkpoint.json"
    lost = {}
    stop = threading.Event()

    def stop_node_2_after_step_40() -> None:
        while not stop.is_set():
            listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=marker).get("Contents", [])
            if listed:
                pid = cluster.pids()["ray-node-2"]
                os.killpg(pid, signal.SIGKILL)
                lost["at"] = time.monotonic()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_node_2_after_step_40)
    watcher.start()
    try:
        result = _fm(shards_on_s3, tmp_path, "fm-node-lost", steps=160)
    finally:
        stop.set()
        watcher.join()
    assert lost, "training ended before the step-40 checkpoint was seen"
    assert result["steps"] == 160
    assert 40 <= result["restored_from_step"] < 160, result["restored_from_step"]
    assert [row["step"] for row in result["history"]] == list(range(20, 161, 20))  # each once, none missing
    assert_history_ok(result["history"], ("fm_loss",))
    assert_in_sync(result)
    named = _nodes_by_resource()
    assert "ray-node-2" not in named.values()
    assert {named.get(w["node_id"]) for w in result["workers"]} == {"ray-node-1"}, result["workers"]
    print(f"node lost at step >= 40; the run restored from step {result['restored_from_step']} on ray-node-1")
