"""Whether the Ray cluster can hold the training workers, decided from its nodes' totals."""

from __future__ import annotations

import pytest

from tasks import ray_cluster
from tasks.ray_cluster import ClusterTooSmall, placements, wait_for_capacity


def _nodes(*resources, dead=()):
    return [{"NodeID": f"{i:02d}" * 28, "Alive": i not in dead, "Resources": r} for i, r in enumerate(resources)]


@pytest.fixture
def cluster(monkeypatch):
    def set_nodes(nodes):
        monkeypatch.setattr(ray_cluster.ray, "nodes", lambda: nodes)
    return set_nodes


def test_a_worker_lives_on_one_node(cluster):
    cluster(_nodes({"CPU": 3}, {"CPU": 3}))
    assert placements(4, 2, use_gpu=False) == 2  # 6 CPUs in all, but 2 per node fit once on each
    cluster(_nodes({"CPU": 4, "GPU": 1}, {"CPU": 4}))
    assert placements(2, 1, use_gpu=True) == 1
    cluster(_nodes({"CPU": 4}, {"CPU": 4}, dead=(1,)))
    assert placements(8, 1, use_gpu=False) == 4  # a dead node holds nothing


def test_gpu_workers_on_a_cpu_only_local_cluster_are_refused_at_once(cluster, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster(_nodes({"CPU": 8}))
    with pytest.raises(ClusterTooSmall, match=r"holds 0 of the 2 training workers.*1 GPU.*compute.use_gpu=false"):
        wait_for_capacity(2, 1, use_gpu=True)


def test_a_joined_cluster_is_given_time_to_grow_then_refused(cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    cluster(_nodes({"CPU": 1}))
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda s: None)
    clock = iter(range(0, 1000, 30))
    monkeypatch.setattr(ray_cluster.time, "monotonic", lambda: next(clock))
    with pytest.raises(ClusterTooSmall, match=r"holds 1 of the 2 .*waited 120 s"):
        wait_for_capacity(2, 1, use_gpu=False)


def test_a_cluster_that_grows_in_time_is_used(cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    views = iter([_nodes({"CPU": 1}), _nodes({"CPU": 1}, {"CPU": 2})])
    monkeypatch.setattr(ray_cluster.ray, "nodes", lambda: next(views))
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda s: None)
    wait_for_capacity(2, 1, use_gpu=False, timeout_s=60)
