"""The stage ledger: where a stage's outputs live on storage and whether they are complete.

Every stage writes its outputs under its own folder and ends with ``_COMPLETE.json``
(written last) holding the stage's fingerprint (a hash of the parameters that made it,
chained with its inputs' fingerprints) and its outputs. A stage whose folder is complete
with the same fingerprint is skipped; one made with other parameters is never silently
overwritten (:class:`StageMismatch`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tasks.storage import Store

__all__ = ["StageFolder", "StageMismatch", "fingerprint"]


class StageMismatch(RuntimeError):
    """A stage folder holds outputs made with other parameters."""


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (parameters, upstream fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageFolder:
    """One stage's folder in a pipeline run (``<run_url>/<stage>``) and the fingerprint its
    outputs must carry. Plain data: it travels into Prefect tasks."""

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
        return Store.join(self.run_url, self.stage)

    def join(self, *parts: str) -> str:
        return Store.join(self.url, *parts)

    def completed(self) -> dict | None:
        """The stage's outputs if complete with this fingerprint; None if not complete;
        :class:`StageMismatch` if complete with another."""
        record = self.store.completed(self.url)
        if record is None:
            return None
        done = record["outputs"]
        if done.get("fingerprint") != self.fingerprint:
            raise StageMismatch(
                f"{self.url} is complete but was made with other parameters "
                f"(fingerprint {done.get('fingerprint')} != {self.fingerprint}); "
                + ("use another sweep name" if self.stage.startswith("sweep/") else
                   "use another run_name, or remove that folder to recompute it")
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
