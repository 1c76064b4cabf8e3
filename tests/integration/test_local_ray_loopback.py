"""The local Ray cluster the pipeline starts (no ``RAY_ADDRESS``) stays on loopback.

Ray turns a node address of 127.0.0.1 into the machine's outward address (eth0's, say); its
processes then advertise and dial that address, and Ray Train gives it to torch as the
training workers' rendezvous address. ``tasks.ray_cluster.ensure_ray`` starts the local
cluster on a loopback address Ray keeps as given.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, psutil, ray
from tasks.ray_cluster import ensure_ray
ensure_ray(num_cpus=1)

@ray.remote
def worker_address():
    import ray.util
    return ray.util.get_node_ip_address()

me = psutil.Process()
listening = set()
for process in [me, *me.children(recursive=True)]:
    try:
        listening |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print(json.dumps({"node": ray.nodes()[0]["NodeManagerAddress"], "gcs": ray.get_runtime_context().gcs_address,
                  "worker": ray.get(worker_address.remote()), "listening": sorted(listening)}))
ray.shutdown()
"""


def test_the_local_cluster_advertises_and_dials_only_loopback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for what in ("node", "worker"):
        assert ipaddress.ip_address(seen[what]).is_loopback, seen
    assert ipaddress.ip_address(seen["gcs"].rsplit(":", 1)[0]).is_loopback, seen
    # sockets bound to one address are bound to a loopback one; Ray's gRPC servers bind every
    # interface (no setting changes that; token authentication guards them, docs/security.md)
    specific = [ip for ip in seen["listening"] if not ipaddress.ip_address(ip).is_unspecified]
    assert specific and all(ipaddress.ip_address(ip).is_loopback for ip in specific), seen
