"""Which code a process runs: where the project's packages were imported from, a digest of
their source, and the git commit when they sit in a checkout.

On a cluster every node runs its own installed copy of the code (docs/multinode.md); the
training workers compare their digest with the driver's before any step, so two versions of
the code never train one model.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

__all__ = ["CODE_COMMIT_TAG", "CODE_DIGEST_TAG", "PACKAGES", "code_identity", "code_tags", "describe_code"]

PACKAGES = ("cafm_core", "tasks", "flows")  # what a stage runs (infra only starts services)
CODE_COMMIT_TAG, CODE_DIGEST_TAG = "cafm.code_commit", "cafm.code_digest"  # MLflow tags of a pipeline run


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, str | None]:
    """``{"path", "digest", "commit"}`` of the code this process imported.

    ``path`` is the folder holding the packages, ``digest`` a sha256 over every ``.py`` file
    of :data:`PACKAGES` (relative path and bytes, in sorted order; caches excluded), and
    ``commit`` the checkout's ``HEAD`` when ``path`` is a git checkout, else None.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            if "__pycache__" in file.parts:
                continue
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return {"path": str(root), "digest": digest.hexdigest()[:16], "commit": _git_head(root)}


def _git_head(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def describe_code(identity: dict | None = None) -> str:
    """One line for a run's log: ``code: <path> (commit <sha>, digest <digest>)``."""
    code = identity or code_identity()
    return f"code: {code['path']} (commit {code['commit'] or 'unknown: not a git checkout'}, digest {code['digest']})"


def code_tags(identity: dict | None = None) -> dict[str, str]:
    """The MLflow tags naming the code: its digest, and its commit when known."""
    code = identity or code_identity()
    return {CODE_DIGEST_TAG: code["digest"], **({CODE_COMMIT_TAG: code["commit"]} if code["commit"] else {})}
