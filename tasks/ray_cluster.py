"""Ray start-up: join ``RAY_ADDRESS`` or start a loopback-only local Ray sized for the
training workers (used by training, sampling and the sweep). Ray's behaviour this relies
on is written down in docs/ray.md."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

import ray

from tasks.ray_worker_setup import quiet_worker_logs
from tasks.validation import check_int

__all__ = ["LOCAL_NODE_IP", "ClusterTooSmall", "CodeMismatch", "check_nodes_code", "ensure_ray", "placements",
           "start_cluster", "wait_for_capacity", "worker_cpus", "worker_resources"]

logger = logging.getLogger(__name__)

# Ray replaces 127.0.0.1 (and "localhost") given as a node's address by this machine's
# outward address (its route to the internet, e.g. eth0's), which its processes then advertise
# and connect to, and which Ray Train hands to torch as the workers' rendezvous address. Any
# other 127.x.x.x is kept as given and on Linux is loopback too (lo holds all of 127/8);
# elsewhere Ray keeps 127.0.0.1 for a single-machine cluster.
LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray; no-op if initialised.

    No credential travels in Ray's job config (``runtime_env``, which Ray writes to its
    logs): a local cluster's workers inherit this process's ``AWS_*`` variables (the raylet
    is its child), and the nodes of a joined cluster hold their own (docs/multinode.md). A
    local cluster advertises a loopback address (:data:`LOCAL_NODE_IP`), so Ray's own traffic
    and the training workers' process-group rendezvous stay on loopback; it has no dashboard
    and no usage-stats reporting; other hosts are kept out by Ray's token authentication
    (docs/ray.md).
    """
    if ray.is_initialized():
        return
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be a positive int or None, got {num_cpus!r}")
    address = os.environ.get("RAY_ADDRESS") or None
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": f"{quiet_worker_logs.__module__}.quiet_worker_logs"}
    kwargs: dict[str, Any] = {"log_to_driver": True, "runtime_env": runtime_env}
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOCAL_NODE_IP)
    ray.init(address=address, **kwargs)


def worker_cpus(num_workers: int, cpus_per_worker: int | None) -> int:
    """CPUs (and torch threads) per training worker: as given, else this machine's cores
    split evenly over the workers when Ray is local, else 1."""
    check_int("num_workers", num_workers, 1)
    if cpus_per_worker is not None:
        return check_int("cpus_per_worker", cpus_per_worker, 1)
    if os.environ.get("RAY_ADDRESS"):
        return 1
    return max(1, (os.cpu_count() or 1) // num_workers)


def worker_resources(cpus_per_worker: int, use_gpu: bool) -> str:
    """What one training worker asks of the cluster, in words (for error messages)."""
    return f"{cpus_per_worker} CPU(s){' and 1 GPU' if use_gpu else ''}"


class ClusterTooSmall(RuntimeError):
    """The Ray cluster cannot hold the requested workers, even when idle."""


class CodeMismatch(RuntimeError):
    """A Ray node runs other code than the driver."""


def check_nodes_code() -> None:
    """On a joined cluster, every alive node must run the driver's code (each node installs
    its own copy: docs/multinode.md); else :class:`CodeMismatch` names the nodes, before any
    work is placed. One zero-CPU task per node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tasks.code_version import code_identity

    def node_code() -> dict:  # nested: Ray ships it by value, so a node with other code can run it
        import ray as node_ray
        try:
            from tasks.code_version import code_identity as node_identity
            found = node_identity()
        except Exception as exc:  # noqa: BLE001 - a node without this package, or with an old one
            found = {"path": f"(no usable cafm-pipeline: {exc})", "digest": None, "commit": None}
        return {**found, "node_id": node_ray.get_runtime_context().get_node_id()}

    mine = code_identity()
    probe = ray.remote(num_cpus=0)(node_code)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                     for node in nodes], timeout=120)
    other = [f"{f['node_id'][:8]}: {f['path']} (digest {f['digest']}, commit {f['commit']})"
             for f in found if f["digest"] != mine["digest"]]
    if other:
        raise CodeMismatch(f"Ray nodes run other code than this driver ({mine['path']}, digest {mine['digest']}, "
                           f"commit {mine['commit']}): {'; '.join(other)}. Install this version of cafm-pipeline on "
                           "those nodes and restart them (docs/multinode.md)")


# how long a joined cluster may take to grow (an autoscaler adding nodes) before a request it
# cannot hold is refused; a local cluster never grows, so it is refused at once
RESOURCE_WAIT_S = 120.0


def placements(num_workers: int, cpus_per_worker: int, use_gpu: bool) -> int:
    """How many workers of ``cpus_per_worker`` CPUs (and one GPU each with ``use_gpu``) the
    alive nodes of the cluster hold when idle (a worker lives on one node)."""
    fits = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = node.get("Resources", {})
        per_node = math.floor(total.get("CPU", 0) / cpus_per_worker + 1e-9)
        if use_gpu:
            per_node = min(per_node, math.floor(total.get("GPU", 0) + 1e-9))
        fits += per_node
    return fits


def wait_for_capacity(num_workers: int, cpus_per_worker: int, use_gpu: bool, timeout_s: float | None = None) -> None:
    """Return once the cluster can hold the workers; else raise :class:`ClusterTooSmall`
    after ``timeout_s`` (default: :data:`RESOURCE_WAIT_S` on a joined cluster, 0 on a local
    one). Without this, Ray Train waits for resources that never come (``use_gpu`` on a
    CPU-only cluster waits forever)."""
    if timeout_s is None:
        timeout_s = RESOURCE_WAIT_S if os.environ.get("RAY_ADDRESS") else 0.0
    deadline = time.monotonic() + timeout_s
    announced = False
    while (fits := placements(num_workers, cpus_per_worker, use_gpu)) < num_workers:
        if time.monotonic() >= deadline:
            each = worker_resources(cpus_per_worker, use_gpu)
            nodes = ", ".join(f"{n['NodeID'][:8]} (CPU={n['Resources'].get('CPU', 0):g}, GPU={n['Resources'].get('GPU', 0):g})"
                              for n in ray.nodes() if n.get("Alive")) or "none"
            advice = "add nodes with those resources, or ask for fewer workers or CPUs per worker"
            if use_gpu:
                advice += ", or set compute.use_gpu=false"
            waited = f" (waited {timeout_s:.0f} s for the cluster to grow)" if timeout_s else ""
            raise ClusterTooSmall(f"the Ray cluster holds {fits} of the {num_workers} training workers asked for, "
                                  f"{each} each on one node; alive nodes: {nodes}{waited}. To go on: {advice}")
        if not announced:
            logger.warning("the Ray cluster holds %d of %d workers now; waiting up to %.0f s for it to grow",
                           fits, num_workers, max(deadline - time.monotonic(), 0))
            announced = True
        time.sleep(2.0)


def start_cluster(num_workers: int, cpus_per_worker: int, use_gpu: bool = False) -> None:
    """Start (or connect to) Ray for ``num_workers`` training workers of ``cpus_per_worker``
    CPUs; on a joined cluster check that every node runs this code (:func:`check_nodes_code`);
    make sure the cluster can hold the workers (:func:`wait_for_capacity`).

    A local cluster gets one logical CPU beyond the workers' for Ray Data's read tasks
    (training stalls without it); on an existing cluster a shortfall is logged.
    """
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        ensure_ray(num_cpus=max(os.cpu_count() or 1, num_workers * cpus_per_worker + 1))
    else:
        ensure_ray()
    if os.environ.get("RAY_ADDRESS"):
        check_nodes_code()
    wait_for_capacity(num_workers, cpus_per_worker, use_gpu)
    cpus = ray.cluster_resources().get("CPU", 0)
    needed = num_workers * cpus_per_worker
    if cpus < needed + 1:
        logger.warning(
            "the Ray cluster has %s CPUs: %d workers x %d CPUs take %d, leaving %s for Ray Data's read tasks "
            "(training stalls without one unless the cluster autoscales)",
            cpus, num_workers, cpus_per_worker, needed, max(cpus - needed, 0),
        )
