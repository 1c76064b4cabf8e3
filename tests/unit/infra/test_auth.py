"""The stack's secrets (infra/auth.py): generated once per stack into 0600 files, reused, refused
when others could read them, handed only to the services that use them, never in the state
file; `stack env` prints them for a shell. Nothing is started."""

import json
import os
import shlex
import stat
import subprocess

import pytest

from infra.auth import (MLFLOW_AUTH_FILE, PREFECT_AUTH_FILE, S3_KEYS_FILE, SECRET_VARIABLES, ensure_secrets,
                        read_secrets)
from infra.config import StackConfig, StackError
from infra.deploy import deploy_env
from infra.stack import Stack, shell_env

FILES = (PREFECT_AUTH_FILE, MLFLOW_AUTH_FILE, S3_KEYS_FILE)


@pytest.fixture
def loose_umask():
    old = os.umask(0)  # the files must be 0600 whatever the umask
    try:
        yield
    finally:
        os.umask(old)


def test_secrets_are_made_once_as_files_only_the_owner_can_read(tmp_path, loose_umask):
    first = ensure_secrets(tmp_path)
    for name in FILES:
        info = (tmp_path / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid(), name
    assert first.prefect_auth and first.mlflow_password and first.mlflow_flask_key and first.s3_secret
    assert ensure_secrets(tmp_path) == first == read_secrets(tmp_path)  # a later `up` reuses them
    other = ensure_secrets(tmp_path / "other-stack")
    assert not set(first.values()) & set(other.values())  # per stack
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_each_secret_is_long_and_random(tmp_path):
    secrets = ensure_secrets(tmp_path)
    assert len(secrets.prefect_auth) >= 40 and len(secrets.mlflow_password) >= 24 and len(secrets.s3_secret) >= 40
    assert secrets.s3_key_id.startswith("AKIA") and len(secrets.s3_key_id) == 20


def test_a_secret_file_others_could_read_is_refused_with_the_fix(tmp_path):
    ensure_secrets(tmp_path)
    (tmp_path / PREFECT_AUTH_FILE).chmod(0o644)
    with pytest.raises(StackError, match=r"prefect-auth can be read by others \(mode 0o644\).*chmod 600"):
        read_secrets(tmp_path)
    with pytest.raises(StackError, match="can be read by others"):
        ensure_secrets(tmp_path)  # `up` refuses too, and adds nothing


def test_a_deleted_secret_is_made_anew_and_mlflows_old_users_database_goes_with_it(tmp_path):
    old = ensure_secrets(tmp_path)
    auth_db = tmp_path / "mlflow" / "auth.db"
    auth_db.parent.mkdir(exist_ok=True)
    auth_db.write_bytes(b"users of the old admin password")
    ensure_secrets(tmp_path)
    assert auth_db.exists()  # the same password: its users database stays
    (tmp_path / MLFLOW_AUTH_FILE).unlink()
    new = ensure_secrets(tmp_path)
    assert new.mlflow_password != old.mlflow_password and not auth_db.exists()
    assert new.prefect_auth == old.prefect_auth and new.s3_secret == old.s3_secret


def test_no_s3_keys_for_a_real_endpoint(tmp_path):
    secrets = ensure_secrets(tmp_path, local_s3=False)
    assert not (tmp_path / S3_KEYS_FILE).exists() and secrets.s3_env() == {}


def test_repr_names_the_secrets_never_their_values(tmp_path):
    secrets = ensure_secrets(tmp_path)
    for text in (repr(secrets), str(secrets), f"{secrets}"):
        assert not [value for value in secrets.values() if value in text]


def test_mlflow_reads_the_auth_file_as_its_own_configuration(tmp_path, monkeypatch):
    """The file is MLflow's basic-auth configuration: admin login, users database under the
    stack's folder, no permission for anyone else by default."""
    from mlflow.server.auth.config import read_auth_config

    secrets = ensure_secrets(tmp_path)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", secrets.mlflow_server_env()["MLFLOW_AUTH_CONFIG_PATH"])
    config = read_auth_config()
    assert (config.admin_username, config.admin_password) == (secrets.mlflow_username, secrets.mlflow_password)
    assert config.database_uri == f"sqlite:///{tmp_path / 'mlflow' / 'auth.db'}"
    assert config.default_permission == "NO_PERMISSIONS"


def _stack(tmp_path, monkeypatch) -> Stack:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "callers-own-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "callers-own-secret")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "a-stale-auth-string")  # e.g. another stack's `env`
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-stale-password")
    stack = Stack(StackConfig(home=tmp_path, prefect_port=4321, ray_nodes=2))
    ensure_secrets(tmp_path)
    return stack


def test_each_service_gets_only_the_secrets_it_uses(tmp_path, monkeypatch):
    stack = _stack(tmp_path, monkeypatch)
    secrets = read_secrets(tmp_path)
    env = {service: stack._env(service) for service in stack.services()}
    env["cli"] = stack._env()

    prefect = env["prefect"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == secrets.prefect_auth
    assert prefect["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321"  # the UI's own origin, not *
    assert prefect["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    for client in ("worker", "cli"):
        assert env[client]["PREFECT_API_AUTH_STRING"] == secrets.prefect_auth
        assert "PREFECT_SERVER_API_AUTH_STRING" not in env[client]
    assert env["worker"]["MLFLOW_TRACKING_USERNAME"] == secrets.mlflow_username
    assert env["worker"]["MLFLOW_TRACKING_PASSWORD"] == secrets.mlflow_password
    assert env["mlflow"]["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / MLFLOW_AUTH_FILE)
    assert env["mlflow"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == secrets.mlflow_flask_key
    for service in ("s3", "ray", "mlflow", "worker", "ray-node-1", "ray-node-2"):
        assert (env[service]["AWS_ACCESS_KEY_ID"], env[service]["AWS_SECRET_ACCESS_KEY"]) == (secrets.s3_key_id, secrets.s3_secret)
    assert "AWS_SECRET_ACCESS_KEY" not in env["prefect"] and "AWS_SECRET_ACCESS_KEY" not in env["cli"]
    for service in ("s3", "ray", "mlflow", "ray-node-1", "ray-node-2"):
        assert secrets.prefect_auth not in env[service].values(), service
    for service in ("s3", "ray", "mlflow", "prefect", "ray-node-1", "ray-node-2"):
        assert secrets.mlflow_password not in env[service].values(), service  # MLflow's server reads it from the file
    every = json.dumps(env)
    assert "callers-own-secret" not in every and "a-stale-auth-string" not in every and "a-stale-password" not in every


def test_the_servers_are_started_with_their_checks_on(tmp_path, monkeypatch):
    stack = _stack(tmp_path, monkeypatch)
    mlflow = stack._command("mlflow")
    assert mlflow[mlflow.index("--app-name") + 1] == "basic-auth"
    assert stack._command("s3")[1:3] == ["-m", "infra.s3_server"]  # moto behind the signature check
    assert stack._env("s3")["PYTHONPATH"]


def test_the_state_file_holds_no_secret(tmp_path, monkeypatch):
    stack = _stack(tmp_path, monkeypatch)
    stack._write_state({"prefect": 1})
    text = stack.state_file.read_text()
    assert not [value for value in read_secrets(tmp_path).values() if value in text]
    assert set(SECRET_VARIABLES).isdisjoint(json.loads(text)["urls"])


def test_stack_env_prints_what_a_shell_needs_and_a_shell_reads_it_back(tmp_path, monkeypatch):
    stack = _stack(tmp_path, monkeypatch)
    secrets = read_secrets(tmp_path)
    printed = shell_env(stack.config)
    names = "PREFECT_API_URL PREFECT_API_AUTH_STRING MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY"
    script = printed + "".join(f'printf "%s\\n" "${name}"\n' for name in names.split())
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert out.splitlines() == [stack.config.prefect_api, secrets.prefect_auth, secrets.mlflow_username,
                                secrets.mlflow_password, secrets.s3_key_id, secrets.s3_secret]
    assert all(shlex.split(line) for line in printed.splitlines())


def test_stack_env_before_up_is_a_clear_error(tmp_path):
    with pytest.raises(StackError, match=r"prefect-auth does not exist yet: `python -m infra.stack up` makes it"):
        shell_env(StackConfig(home=tmp_path))


def test_deploy_runs_with_the_stacks_logins(tmp_path, monkeypatch):
    stack = _stack(tmp_path, monkeypatch)
    secrets = read_secrets(tmp_path)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    env = deploy_env(stack.config)
    assert env["PREFECT_API_AUTH_STRING"] == secrets.prefect_auth
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (secrets.mlflow_username, secrets.mlflow_password)
    assert env["AWS_SECRET_ACCESS_KEY"] == secrets.s3_secret
