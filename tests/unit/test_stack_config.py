"""The stack's configuration from the environment, without starting anything."""

import pytest

from infra.stack import StackConfig, StackError, redact_url


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
