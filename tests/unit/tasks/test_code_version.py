"""The line and the MLflow tags that say which code a run ran (``tasks.code_version``)."""

from pathlib import Path

from tasks.code_version import CODE_COMMIT_TAG, CODE_DIGEST_TAG, code_identity, code_tags, describe_code

ROOT = Path(__file__).resolve().parents[3]


def test_the_line_and_tags_name_the_path_commit_and_digest():
    code = {"path": "/tmp/w/tmpabcprefect/code", "commit": "1" * 40, "digest": "0123456789abcdef"}
    assert describe_code(code) == f"code: /tmp/w/tmpabcprefect/code (commit {'1' * 40}, digest 0123456789abcdef)"
    assert code_tags(code) == {CODE_COMMIT_TAG: "1" * 40, CODE_DIGEST_TAG: "0123456789abcdef"}
    assert (CODE_COMMIT_TAG, CODE_DIGEST_TAG) == ("cafm.code_commit", "cafm.code_digest")


def test_code_outside_a_checkout_has_no_commit_tag_and_says_so():
    code = {"path": "/opt/cafm", "commit": None, "digest": "fedcba9876543210"}
    assert code_tags(code) == {CODE_DIGEST_TAG: "fedcba9876543210"}
    assert describe_code(code) == "code: /opt/cafm (commit unknown: not a git checkout, digest fedcba9876543210)"


def test_this_process_runs_the_code_of_this_tree():
    code = code_identity()
    assert code["path"] == str(ROOT) and len(code["digest"]) == 16
    assert describe_code().startswith(f"code: {ROOT} (commit ")
