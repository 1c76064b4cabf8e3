"""The stack's Ray worker nodes as configuration and commands (no process is started)."""

from __future__ import annotations

import json

import pytest

from infra.auth import ensure_secrets
from infra.config import StackConfig, StackError
from infra.stack import Stack


def test_worker_nodes_start_after_the_head_and_before_the_prefect_worker(tmp_path):
    stack = Stack(StackConfig(home=tmp_path, ray_nodes=2))
    assert stack.services() == ("s3", "ray", "mlflow", "prefect", "ray-node-1", "ray-node-2", "worker")
    assert Stack(StackConfig(home=tmp_path / "one")).services() == ("s3", "ray", "mlflow", "prefect", "worker")


def test_each_worker_node_joins_the_head_with_its_own_resource_temp_dir_and_ports(tmp_path):
    config = StackConfig(home=tmp_path, ray_port=7001, ray_nodes=2, ray_node_cpus=3)
    stack = Stack(config)
    commands = {name: stack._command(name) for name in config.node_names}
    for name, command in commands.items():
        arg = dict(zip(command, command[1:]))
        assert arg["--address"] == "127.0.0.1:7001" and "--head" not in command
        assert json.loads(arg["--resources"]) == {name: 1} and arg["--num-cpus"] == "3"
        assert arg["--temp-dir"] == str(config.node_temp(name)) != str(config.ray_temp)
    ranges = [(int(dict(zip(c, c[1:]))["--min-worker-port"]), int(dict(zip(c, c[1:]))["--max-worker-port"]))
              for c in commands.values()]
    assert ranges[0][1] < ranges[1][0]  # the nodes' worker ports never overlap
    assert len({str(config.node_temp(n)) for n in config.node_names}) == 2


def test_a_node_gets_its_own_code_home_tmpdir_and_the_clusters_token(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("secret-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    config = StackConfig(home=tmp_path / "stack", ray_nodes=1)
    ensure_secrets(config.home)  # as `up` does first: the node gets the stack's S3 keys
    env, cwd = Stack(config)._machine("ray-node-1", code=True)
    root = config.node_home("ray-node-1")
    assert cwd == root / "code" and env["PYTHONPATH"] == str(root / "code")
    assert (root / "code" / "tasks" / "train" / "worker_loop.py").exists() and not list((root / "code").rglob("__pycache__"))
    assert env["HOME"] == str(root / "home") and env["TMPDIR"] == str(root / "tmp")
    copied = root / "home" / ".ray" / "auth_token"
    assert copied.read_text() == "secret-token" and copied.stat().st_mode & 0o777 == 0o600
    assert "RAY_AUTH_TOKEN_PATH" not in env  # the node reads its own HOME's token, as on a real machine


def test_node_counts_from_the_environment_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("CAFM_RAY_NODES", "2")
    monkeypatch.setenv("CAFM_RAY_NODE_CPUS", "4")
    config = StackConfig.from_env(tmp_path)
    assert config.node_names == ("ray-node-1", "ray-node-2") and config.ray_node_cpus == 4
    monkeypatch.setenv("CAFM_RAY_NODES", "two")
    with pytest.raises(StackError, match="CAFM_RAY_NODES='two' is not a count"):
        StackConfig.from_env(tmp_path)


def test_up_refuses_a_service_the_stack_does_not_have(tmp_path):
    with pytest.raises(StackError, match="no service \\['ray-node-3'\\]"):
        Stack(StackConfig(home=tmp_path, ray_nodes=2)).up(only=("ray", "ray-node-3"))


def test_a_node_is_healthy_only_while_its_raylet_lives(tmp_path):
    """The log says the node joined; health also needs a live raylet with the node's temp dir."""
    import subprocess
    import sys
    import time

    from infra.health import healthy

    config = StackConfig(home=tmp_path, ray_nodes=1)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ray-node-1.log").write_text("==== 2026 starting ray-node-1\nRay runtime started.\n")
    assert not healthy(config, "ray-node-1")  # joined once, but no raylet now (stopped or killed)
    fake = subprocess.Popen(["bash", "-c", f"exec -a {tmp_path}/raylet {sys.executable} -c 'import time; time.sleep(30)' "
                             f"--temp_dir={config.node_temp('ray-node-1')}"])
    try:
        deadline = time.monotonic() + 10
        while not healthy(config, "ray-node-1") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert healthy(config, "ray-node-1")
        (tmp_path / "logs" / "ray-node-1.log").write_text("==== later starting ray-node-1\nerror: auth\n")
        assert not healthy(config, "ray-node-1")  # the latest start has not joined
    finally:
        fake.kill()
        fake.wait()
