"""Ray start-up: join ``RAY_ADDRESS`` or start a loopback-only local Ray sized for the
training workers (used by training, sampling and the sweep). Ray's behaviour this relies
on is written down in docs/ray.md."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from tasks.validation import check_int

__all__ = ["ensure_ray", "forwarded_env", "quiet_worker_logs", "start_cluster", "worker_cpus"]

logger = logging.getLogger(__name__)

# Ray Train's placement-group cleaner asks the dashboard's state API every second whether the
# train controller lives and logs a WARNING each time it cannot (local clusters here run
# without a dashboard); this one logger is quietened in every worker, nothing else.
_NOISY_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker_logs() -> None:
    """Ray's ``worker_process_setup_hook`` for every worker of a cluster this project starts or joins."""
    logging.getLogger(_NOISY_LOGGER).setLevel(logging.ERROR)


def forwarded_env() -> dict[str, str]:
    """Environment the workers need (S3 access): every ``AWS_*`` variable that is set."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and v}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray; no-op if initialised.

    ``AWS_*`` variables (S3 endpoint/credentials) go to the workers through
    ``runtime_env`` only when set; their values are never logged. A local cluster
    advertises 127.0.0.1, has no dashboard and no usage-stats reporting; other hosts are
    kept out by Ray's token authentication (docs/ray.md).
    """
    if ray.is_initialized():
        return
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be a positive int or None, got {num_cpus!r}")
    address = os.environ.get("RAY_ADDRESS") or None
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"}
    env = forwarded_env()
    if env:
        runtime_env["env_vars"] = env
    kwargs: dict[str, Any] = {"log_to_driver": True, "runtime_env": runtime_env}
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
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


def start_cluster(num_workers: int, cpus_per_worker: int, use_gpu: bool = False) -> None:
    """Start (or connect to) Ray for ``num_workers`` training workers of ``cpus_per_worker`` CPUs.

    A local cluster gets one logical CPU beyond the workers' for Ray Data's read tasks
    (training stalls without it); on an existing cluster a shortfall is logged.
    """
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        ensure_ray(num_cpus=max(os.cpu_count() or 1, num_workers * cpus_per_worker + 1))
    else:
        ensure_ray()
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    needed = num_workers * cpus_per_worker
    if cpus < needed + 1:
        logger.warning(
            "the Ray cluster has %s CPUs: %d workers x %d CPUs take %d, leaving %s for Ray Data's read tasks "
            "(training stalls without one unless the cluster autoscales)",
            cpus, num_workers, cpus_per_worker, needed, max(cpus - needed, 0),
        )
    if use_gpu and gpus < num_workers:
        logger.warning("the Ray cluster has %s GPUs for %d GPU workers (waits unless it autoscales)", gpus, num_workers)
