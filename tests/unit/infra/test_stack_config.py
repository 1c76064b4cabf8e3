"""The stack's configuration from the environment, without starting anything."""

import ast
import os
from pathlib import Path

import pytest

from infra.auth import ensure_secrets
from infra.config import StackConfig, StackError, environ_scope, redact_url, s3_credentials

INFRA = Path(__file__).resolve().parents[3] / "infra"


def _without_aws_keys(monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)


def test_ports_from_environment_accept_numbers_and_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("CAFM_PREFECT_PORT", "4321")
    monkeypatch.setenv("CAFM_MLFLOW_PORT", "auto")
    config = StackConfig.from_env(tmp_path)
    assert config.prefect_api == "http://127.0.0.1:4321/api"
    assert config.mlflow_port not in (5000, 0)
    assert config.client_env()["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")


def test_bad_port_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CAFM_S3_PORT", "nine-thousand")
    with pytest.raises(StackError, match="CAFM_S3_PORT='nine-thousand' is not a port number"):
        StackConfig.from_env(tmp_path)


def test_real_endpoint_replaces_the_local_s3_server(monkeypatch, tmp_path):
    monkeypatch.setenv("CAFM_S3_ENDPOINT", "https://minio.internal:9000")
    config = StackConfig.from_env(tmp_path)
    assert not config.local_s3 and config.client_env()["AWS_ENDPOINT_URL"] == "https://minio.internal:9000"


def test_client_env_and_redacted_database_url_hold_no_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    config = StackConfig.from_env(tmp_path)
    assert "very-secret" not in str(config.client_env())
    assert redact_url("postgresql+asyncpg://cafm:pa55word@db:5432/prefect") == "postgresql+asyncpg://cafm:***@db:5432/prefect"
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"


def test_local_s3_gets_the_stacks_generated_keys_and_endpoint(monkeypatch, tmp_path):
    _without_aws_keys(monkeypatch)
    secrets = ensure_secrets(tmp_path)
    config = StackConfig(home=tmp_path, s3_port=9123)
    env = s3_credentials(config)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (secrets.s3_key_id, secrets.s3_secret)
    assert env["AWS_ACCESS_KEY_ID"].startswith("AKIA") and len(env["AWS_ACCESS_KEY_ID"]) == 20
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 40 and env["AWS_SECRET_ACCESS_KEY"] != "cafm-local-secret"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9123"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and env["AWS_EC2_METADATA_DISABLED"] == "true"


def test_local_s3_never_takes_the_callers_keys_or_session_but_keeps_the_region(monkeypatch, tmp_path):
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mine")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "my-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "my-session")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    secrets = ensure_secrets(tmp_path)
    env = s3_credentials(StackConfig(home=tmp_path))
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (secrets.s3_key_id, secrets.s3_secret)
    assert "my-secret" not in str(env) and "AWS_SESSION_TOKEN" not in env and env["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_local_s3_before_up_is_a_clear_error(monkeypatch, tmp_path):
    _without_aws_keys(monkeypatch)
    with pytest.raises(StackError, match=r"s3-keys does not exist yet: `python -m infra.stack up` makes it"):
        s3_credentials(StackConfig(home=tmp_path))


def test_real_endpoint_without_keys_is_a_clear_error(monkeypatch, tmp_path):
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-id")
    config = StackConfig(home=tmp_path, s3_endpoint="https://minio.internal:9000")
    with pytest.raises(StackError, match="CAFM_S3_ENDPOINT=https://minio.internal:9000 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        s3_credentials(config)


def test_real_endpoint_uses_the_callers_keys_never_the_local_dummies(monkeypatch, tmp_path):
    _without_aws_keys(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "operator")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    env = s3_credentials(StackConfig(home=tmp_path, s3_endpoint="https://minio.internal:9000"))
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("operator", "operator-secret")
    assert env["AWS_ENDPOINT_URL"] == "https://minio.internal:9000"


def test_environ_scope_restores_changed_and_removes_added_variables_even_on_error(monkeypatch):
    monkeypatch.setenv("CAFM_TEST_KEPT", "before")
    monkeypatch.delenv("CAFM_TEST_ADDED", raising=False)
    with pytest.raises(RuntimeError), environ_scope({"CAFM_TEST_KEPT": "inside", "CAFM_TEST_ADDED": "new"}):
        assert (os.environ["CAFM_TEST_KEPT"], os.environ["CAFM_TEST_ADDED"]) == ("inside", "new")
        raise RuntimeError("boom")
    assert os.environ["CAFM_TEST_KEPT"] == "before"
    assert "CAFM_TEST_ADDED" not in os.environ



def test_environ_scope_unsets_variables_for_the_block_and_puts_them_back(monkeypatch):
    monkeypatch.setenv("CAFM_TEST_SESSION", "a-token")
    with environ_scope({"CAFM_TEST_KEPT": "inside"}, unset=("CAFM_TEST_SESSION",)):
        assert "CAFM_TEST_SESSION" not in os.environ
    assert os.environ["CAFM_TEST_SESSION"] == "a-token" and "CAFM_TEST_KEPT" not in os.environ

def _infra_imports(module: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from infra.X import name`` in ``module``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("infra"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("infra")]
    return found


@pytest.mark.parametrize("name", ["config.py", "health.py", "deploy.py"])
def test_config_health_and_deploy_never_import_infra_stack(name):
    assert not [m for m, _ in _infra_imports(INFRA / name) if m == "infra.stack"]


def test_infra_modules_import_no_private_name_from_each_other():
    private = [(path.name, m, n) for path in INFRA.glob("*.py") for m, n in _infra_imports(path) if n.startswith("_")]
    assert private == []
