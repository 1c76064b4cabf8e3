"""Where a deployment's code comes from: ``prefect.yaml``'s ``git_clone`` pull step, the
``CAFM_CODE_*`` defaults of ``infra.deploy`` and the preflight's checks of them, on git
repositories made here (no server: the Prefect health check is stubbed where needed)."""

import subprocess
from pathlib import Path

import pytest
import yaml

import infra.deploy
from infra.config import REPO, StackError
from infra.deploy import check_code_source, code_source, head_commit, preflight

GIT_ID = ["-c", "user.name=cafm-test", "-c", "user.email=cafm-test@127.0.0.1", "-c", "commit.gpgsign=false"]


def _git(*args, cwd) -> str:
    return subprocess.run(["git", *GIT_ID, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout with two commits on ``main``; HEAD is the second."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git("init", "--quiet", "--initial-branch=main", cwd=repo)
    (repo / "flow.py").write_text("x = 1\n")
    _git("add", "flow.py", cwd=repo)
    _git("commit", "--quiet", "-m", "one", cwd=repo)
    (repo / "flow.py").write_text("x = 2\n")
    _git("commit", "--quiet", "-am", "two", cwd=repo)
    return repo


def _warnings(**kwargs) -> list[str]:
    lines: list[str] = []
    check_code_source(echo=lines.append, **kwargs)
    return lines


def test_the_checkouts_head_in_the_checkout_and_in_a_bare_clone_passes_without_warning(checkout, tmp_path):
    head = head_commit(checkout)
    first = _git("rev-parse", "HEAD~1", cwd=checkout)
    bare = tmp_path / "code.git"
    _git("clone", "--quiet", "--bare", str(checkout), str(bare), cwd=tmp_path)
    assert len(head) == 40 and head != first
    assert _warnings(repository=str(checkout), commit=head, checkout=checkout) == []
    assert _warnings(repository=str(bare), commit=first, checkout=checkout) == []  # not a branch tip: looked up
    assert _warnings(repository=f"file://{bare}", commit=head) == []
    assert _warnings(repository=str(bare), branch="main") == []


def test_a_commit_the_repository_does_not_hold_is_a_clear_error(checkout, tmp_path):
    bare = tmp_path / "code.git"
    _git("clone", "--quiet", "--bare", str(checkout), str(bare), cwd=tmp_path)
    (checkout / "flow.py").write_text("x = 3\n")
    _git("commit", "--quiet", "-am", "three, not pushed", cwd=checkout)
    unpushed = head_commit(checkout)
    with pytest.raises(StackError, match=rf"commit {unpushed} is not in the code repository {bare}: push it there"):
        check_code_source(str(bare), unpushed)
    with pytest.raises(StackError, match=f"commit {'0' * 40} is not in the code repository"):
        check_code_source(str(checkout), "0" * 40)


def test_an_unreachable_repository_is_a_clear_error(tmp_path):
    (tmp_path / "not-a-repo").mkdir()
    for repository in (tmp_path / "missing.git", tmp_path / "not-a-repo"):
        with pytest.raises(StackError, match=rf"code repository {repository} does not answer \(`git ls-remote`: fatal: "):
            check_code_source(str(repository), "a" * 40)


def test_a_token_in_the_repository_url_is_never_shown():
    with pytest.raises(StackError, match="does not answer") as error:
        check_code_source("https://ci-bot:s3cret-token@127.0.0.1:9/code.git", "a" * 40)
    assert "s3cret-token" not in str(error.value) and "https://***@127.0.0.1:9/code.git" in str(error.value)


def test_a_commit_must_be_a_full_sha_and_a_branch_must_exist(checkout):
    with pytest.raises(StackError, match=r"CAFM_CODE_COMMIT='main' is not a full commit sha"):
        check_code_source(str(checkout), "main")
    with pytest.raises(StackError, match="CAFM_CODE_COMMIT='.{12}' is not a full commit sha"):
        check_code_source(str(checkout), head_commit(checkout)[:12])
    with pytest.raises(StackError, match="branch 'release' is not in the code repository"):
        check_code_source(str(checkout), branch="release")


def test_uncommitted_changes_to_tracked_files_warn_that_the_commit_runs_without_them(checkout):
    head = head_commit(checkout)
    (checkout / "untracked.py").write_text("y = 1\n")
    assert _warnings(repository=str(checkout), commit=head, checkout=checkout) == []  # untracked files: not code
    (checkout / "flow.py").write_text("x = 'edited'\n")
    [warning] = _warnings(repository=str(checkout), commit=head, checkout=checkout)
    assert warning.startswith(f"warning: {checkout} has uncommitted changes to 1 tracked file(s) (flow.py)")
    assert warning.endswith(f"the deployments run commit {head} of {checkout} without them")


def test_code_source_defaults_to_the_checkout_and_its_head_unless_the_caller_sets_them(checkout, tmp_path, monkeypatch):
    monkeypatch.delenv("CAFM_CODE_REPOSITORY", raising=False)
    monkeypatch.delenv("CAFM_CODE_COMMIT", raising=False)
    head = head_commit(checkout)
    assert code_source(checkout=checkout) == {"CAFM_CODE_REPOSITORY": str(checkout), "CAFM_CODE_COMMIT": head}
    # another repository: still this checkout's HEAD (the preflight says when it is not pushed there)
    monkeypatch.setenv("CAFM_CODE_REPOSITORY", "https://git.example/team/cafm.git")
    assert code_source(checkout=checkout) == {"CAFM_CODE_REPOSITORY": "https://git.example/team/cafm.git",
                                              "CAFM_CODE_COMMIT": head}
    monkeypatch.setenv("CAFM_CODE_COMMIT", "b" * 40)
    assert code_source(checkout=checkout)["CAFM_CODE_COMMIT"] == "b" * 40
    assert code_source(checkout=checkout, caller_wins=False) == {"CAFM_CODE_REPOSITORY": str(checkout),
                                                                 "CAFM_CODE_COMMIT": head}
    (tmp_path / "plain").mkdir()
    assert code_source(checkout=tmp_path / "plain", caller_wins=False) == {"CAFM_CODE_REPOSITORY": str(tmp_path / "plain")}


def test_the_project_file_clones_the_code_repository_at_the_commit_for_every_deployment():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert config["pull"] == [{"prefect.deployments.steps.git_clone": {
        "repository": "{{ $CAFM_CODE_REPOSITORY }}", "commit_sha": "{{ $CAFM_CODE_COMMIT }}"}}]
    assert all("pull" not in deployment for deployment in config["deployments"])  # none replaces it


# ---- the preflight: the code is checked before any flow is loaded or anything registered ----------


def _project(checkout: Path) -> Path:
    """``checkout`` with a prefect.yaml like the project's: the same pull step, one deployment
    whose entrypoint does not exist (so reaching the flow check shows the code checks passed)."""
    config = {"name": "t", "pull": yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"],
              "deployments": [{"name": "main", "entrypoint": "flows/missing.py:pipeline", "work_pool": {"name": "p"}}]}
    (checkout / "prefect.yaml").write_text(yaml.safe_dump(config))
    _git("add", "prefect.yaml", cwd=checkout)
    _git("commit", "--quiet", "-m", "project file", cwd=checkout)
    return checkout / "prefect.yaml"


@pytest.fixture
def server_answers(monkeypatch):
    monkeypatch.setattr(infra.deploy, "http_ok", lambda *args, **kwargs: True)
    monkeypatch.setattr(infra.deploy, "api_json", lambda *args, **kwargs: {})  # and takes the auth string
    return {"PREFECT_API_URL": "http://127.0.0.1:9/api"}


def test_preflight_refuses_a_missing_commit_or_an_unreachable_repository_before_loading_any_flow(checkout, tmp_path,
                                                                                                 server_answers):
    prefect_file = _project(checkout)
    with pytest.raises(StackError, match=f"commit {'c' * 40} is not in the code repository {checkout}"):
        preflight(prefect_file, {**server_answers, "CAFM_CODE_REPOSITORY": str(checkout), "CAFM_CODE_COMMIT": "c" * 40})
    with pytest.raises(StackError, match=f"code repository {tmp_path / 'gone.git'} does not answer"):
        preflight(prefect_file, {**server_answers, "CAFM_CODE_REPOSITORY": str(tmp_path / "gone.git"),
                                 "CAFM_CODE_COMMIT": head_commit(checkout)})
    # the code checks pass: the preflight goes on to the flows (and fails on this one's missing file)
    lines: list[str] = []
    (checkout / "flow.py").write_text("x = 'edited'\n")
    with pytest.raises(Exception, match="missing.py"):
        preflight(prefect_file, {**server_answers, **code_source(checkout=checkout, caller_wins=False)}, echo=lines.append)
    assert len(lines) == 1 and f"run commit {head_commit(checkout)} of {checkout} without them" in lines[0]


def test_preflight_names_the_code_variables_when_no_commit_is_known(checkout, server_answers, monkeypatch):
    monkeypatch.delenv("CAFM_CODE_COMMIT", raising=False)
    prefect_file = _project(checkout)
    with pytest.raises(StackError, match=r"not set: \['CAFM_CODE_COMMIT'\] .*the full sha of the commit to run"):
        preflight(prefect_file, {**server_answers, "CAFM_CODE_REPOSITORY": str(checkout)})
