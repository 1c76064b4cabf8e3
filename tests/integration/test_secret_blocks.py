"""Credentials from Prefect Secret blocks (CAFM_SECRET_BLOCKS), against Prefect's test server."""

import logging
import os

import pytest

from tasks.secrets import SECRET_BLOCKS_ENV, load_secret_blocks, parse_mapping

pytestmark = pytest.mark.integration


def test_mapping_errors_name_the_bad_entry():
    assert parse_mapping(" A=b , C=d ") == {"A": "b", "C": "d"}
    with pytest.raises(ValueError, match="'AWS_SECRET_ACCESS_KEY'"):
        parse_mapping("AWS_SECRET_ACCESS_KEY")


def test_secret_block_fills_only_unset_variables_and_never_logs_the_value(monkeypatch, caplog):
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        Secret(value="block-secret-value").save("cafm-test-secret", overwrite=True)
        monkeypatch.setenv(SECRET_BLOCKS_ENV, "CAFM_TEST_SECRET=cafm-test-secret,CAFM_TEST_SET=cafm-test-secret")
        monkeypatch.delenv("CAFM_TEST_SECRET", raising=False)
        monkeypatch.setenv("CAFM_TEST_SET", "from-env")
        with caplog.at_level(logging.DEBUG):
            assert load_secret_blocks() == ["CAFM_TEST_SECRET"]
        assert os.environ["CAFM_TEST_SECRET"] == "block-secret-value"
        assert os.environ["CAFM_TEST_SET"] == "from-env"  # the environment wins
        assert "block-secret-value" not in caplog.text and "CAFM_TEST_SECRET" in caplog.text
        monkeypatch.setenv(SECRET_BLOCKS_ENV, "CAFM_OTHER=no-such-block")
        with pytest.raises(ValueError, match="cannot load Secret block 'no-such-block' for CAFM_OTHER"):
            load_secret_blocks()
    monkeypatch.delenv("CAFM_TEST_SECRET", raising=False)
