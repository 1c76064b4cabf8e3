"""The stage ledger: where a stage's outputs live on storage, whether they are complete, and
the Prefect cache that shows a reused stage as Cached.

A stage's outputs are addressed by what made them: ``<run_url>/<stage>/<fingerprint>/``,
where the fingerprint hashes the parameters that change the stage's outputs, chained with
its inputs' fingerprints. A changed setting therefore makes new folders for exactly the
stages downstream of it and reuses the others; nothing complete is overwritten. Each folder
ends with ``_COMPLETE.json`` (written last) holding the fingerprint and the outputs.

The pipeline's stage tasks use :data:`STAGE_CACHE`: the cache key is the stage and its
fingerprint, results are persisted as JSON beside the run (``<run_url>/prefect-results``),
and a record whose folder is not complete (a crash, a removed variant) is dropped before
Prefect could serve it, so a cached result always names outputs that exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from tasks.storage import Store, s3_storage_options

__all__ = ["RESULTS_DIR", "STAGE_CACHE", "StageCache", "StageFolder", "StageMismatch", "fingerprint", "result_storage"]

RESULTS_DIR = "prefect-results"


class StageMismatch(RuntimeError):
    """A stage folder holds outputs made with other parameters."""


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (parameters, upstream fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageFolder:
    """One stage's outputs in a pipeline run (``<run_url>/<stage>/<fingerprint>``). Plain
    data: it travels into Prefect tasks."""

    store_root: str
    run_url: str
    run_name: str
    stage: str
    fingerprint: str

    @property
    def store(self) -> Store:
        return Store(self.store_root)

    @property
    def url(self) -> str:
        return Store.join(self.run_url, self.stage, self.fingerprint)

    @property
    def cache_key(self) -> str:
        """The Prefect cache key of this stage's task (a file name under ``RESULTS_DIR``)."""
        return f"{self.stage.replace('/', '-')}-{self.fingerprint}"

    @property
    def ray_run_name(self) -> str:
        """Ray Train's run directory name for a training stage (under ``<run_url>/ray``)."""
        return f"{self.run_name}-{self.stage}-{self.fingerprint}"

    def join(self, *parts: str) -> str:
        return Store.join(self.url, *parts)

    def completed(self) -> dict | None:
        """The stage's outputs if complete with this fingerprint; None if not complete;
        :class:`StageMismatch` if the folder's record names another fingerprint."""
        record = self.store.completed(self.url)
        if record is None:
            return None
        done = record["outputs"]
        if done.get("fingerprint") != self.fingerprint:
            raise StageMismatch(
                f"{self.url} is complete but its record names fingerprint {done.get('fingerprint')}, "
                f"not {self.fingerprint} (edited by hand?); remove that folder to recompute it"
            )
        return done["outputs"]

    def require(self) -> dict:
        """The outputs of a stage that must be complete (a stage flow run on its own)."""
        outputs = self.completed()
        if outputs is None:
            raise RuntimeError(f"stage {self.stage!r} has no complete output at {self.url}; run it first")
        return outputs

    def complete(self, outputs: dict) -> dict:
        """Mark the stage complete (after every other write) and return its outputs."""
        self.store.mark_complete(self.url, {"fingerprint": self.fingerprint, "outputs": outputs})
        return outputs


def result_storage(store_root: str, run_url: str):
    """The Prefect result storage of one pipeline run: ``<run_url>/prefect-results`` on the
    run's own storage. Locally a path; on ``s3://`` a ``RemoteFileSystem`` block (Prefect
    wants result storage saved server-side) named after the URL, holding no credentials (s3fs
    reads them from the environment of whoever runs the task)."""
    store = Store(store_root)
    url = Store.join(run_url, RESULTS_DIR)
    if not store.is_s3:
        return Path(store.fs_path(url))
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(basepath=url, settings=s3_storage_options())
    block.save(f"cafm-results-{hashlib.sha256(url.encode()).hexdigest()[:16]}", overwrite=True)
    return block


class StageCache(CachePolicy):
    """Cache a stage task by its folder's fingerprint (the task's ``folder`` input)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        folder = inputs.get("folder")
        if not isinstance(folder, StageFolder):
            return None
        try:
            complete = folder.completed() is not None
        except StageMismatch:
            return None  # the task itself reports it
        if not complete:  # never serve a record of a stage that is not (or no longer) complete
            record = Store.join(folder.run_url, RESULTS_DIR, folder.cache_key)
            if folder.store.exists(record):
                folder.store.remove(record, recursive=False)
        return folder.cache_key


STAGE_CACHE = StageCache()
