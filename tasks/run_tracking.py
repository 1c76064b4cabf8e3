"""One pipeline run's tracking across its stages and attempts.

A :class:`RunTracking` names the MLflow store and experiment, the pipeline run's folder on
storage (its URL tags every MLflow run of that pipeline run) and the parent MLflow run.
The stages of one process share one ``Tracker`` per store, so what one stage could not log
(server unavailable) is sent by a later one; what is still unsent when a stage ends is
kept in ``<run>/tracking_unlogged.json`` and replayed by the next attempt
(:meth:`RunTracking.replay_unlogged`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from tasks.storage import Store
from tasks.tracking import OWNER_PID_TAG, Tracker, owner_state

__all__ = ["RUN_URL_TAG", "UNLOGGED_FILE", "VARIANT_CHANGES_TAG", "VARIANT_TAG", "RunTracking", "stage_logger"]

RUN_URL_TAG = "cafm.run_url"
VARIANT_TAG = "cafm.variant"
VARIANT_CHANGES_TAG = "cafm.variant_changes"
UNLOGGED_FILE = "tracking_unlogged.json"

_TRACKERS: dict[tuple[str, str], Tracker] = {}


def stage_logger() -> logging.Logger:
    """The Prefect run logger inside a flow or task (shown in the UI), else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@dataclass(frozen=True)
class RunTracking:
    """Where one pipeline run's stages log (plain data: it travels into Prefect tasks)."""

    tracking_uri: str
    experiment: str
    store_root: str
    run_url: str
    parent_run_id: str | None = None
    variant: str | None = None  # the run's variant (its evaluation fingerprint)
    variant_changes: str | None = None  # the settings that differ from the run's first variant

    @property
    def tracker(self) -> Tracker:
        """This process's tracker for the store (buffers what an outage keeps from MLflow)."""
        key = (self.tracking_uri, self.experiment)
        if key not in _TRACKERS:
            _TRACKERS[key] = Tracker(self.tracking_uri, self.experiment, strict=False)
        return _TRACKERS[key]

    @property
    def tags(self) -> dict[str, str]:
        """Tags of every MLflow run of this pipeline run (and of its variant)."""
        tags = {RUN_URL_TAG: self.run_url}
        if self.variant is not None:
            tags.update({VARIANT_TAG: self.variant, VARIANT_CHANGES_TAG: self.variant_changes or ""})
        return tags

    def with_variant(self, variant: str, changes: str) -> RunTracking:
        return replace(self, variant=variant, variant_changes=changes)

    def under(self, parent_run_id: str | None) -> RunTracking:
        """The same tracking with MLflow runs nested under ``parent_run_id``."""
        return replace(self, parent_run_id=parent_run_id)

    def stage_run(self, name: str, params: dict | None = None, *, tags: dict | None = None):
        """An MLflow run for one stage, under the parent run, tagged with the run's URL."""
        return self.tracker.run(name, params, parent_run_id=self.parent_run_id, tags={**self.tags, **(tags or {})})

    @property
    def unlogged_url(self) -> str:
        return Store.join(self.run_url, UNLOGGED_FILE)

    def note_unlogged(self) -> list[dict]:
        """After a stage: what MLflow has not received yet, with its values, in
        ``<run>/tracking_unlogged.json`` (removed once everything is logged); returns the summary."""
        store, tracker = Store(self.store_root), self.tracker
        if tracker.flush():
            store.remove(self.unlogged_url, recursive=False)
            return []
        # plain json.dumps: a NaN metric must not stop the record (Python's json reads it back)
        store.write_bytes(self.unlogged_url, json.dumps(tracker.unlogged_record(), indent=2, default=str).encode())
        summary = tracker.unlogged()
        stage_logger().warning("MLflow unavailable (%s): %d item(s) not logged yet, kept in %s: %s", tracker.last_error,
                               len(summary), self.unlogged_url,
                               "; ".join(f"{i['run']}: {i['what']}" for i in summary[:8]))
        return summary

    def replay_unlogged(self) -> dict:
        """Send what an earlier attempt of this run could not log (it stopped while MLflow
        was down), then end the MLflow runs a killed attempt left RUNNING. A record whose
        process is still alive is left to that process."""
        store, tracker, url = Store(self.store_root), self.tracker, self.unlogged_url
        result = {"record": url, "found": store.exists(url), "replayed": 0, "left": 0}
        if result["found"]:
            record = json.loads(store.read_bytes(url))
            if owner_state(record) == "alive":
                stage_logger().info("%s belongs to the live process %s: left to it", url, record[OWNER_PID_TAG])
                result["left"] = len(record["items"])
            else:
                sent = tracker.replay(record)
                result["replayed"] = len(record["items"]) if sent else 0
                result["left"] = 0 if sent else len(tracker.pending)
                self.note_unlogged()  # removes the file, or rewrites it with what is still queued
                stage_logger().warning("%s: %s item(s) an earlier attempt could not log %s", url, len(record["items"]),
                                       "are now in MLflow" if sent else f"are still queued ({tracker.last_error})")
        result["ended_runs"] = tracker.end_orphaned_runs(RUN_URL_TAG, self.run_url)
        return result
