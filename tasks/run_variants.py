"""The variants of a pipeline run: one per set of parameters it was run with.

A run's name is the human handle; each invocation with other parameters is a *variant*,
identified by its evaluation stage's fingerprint (which chains every upstream stage's).
``<run_url>/variants/<variant>.json`` records the parameters, each stage's fingerprint and
when it was first run. Variants share the stages their parameters share (change a CAFM
setting: the data and FM folders are reused), so removing one deletes only the stage
folders no other variant uses.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from tasks.stage_ledger import RESULTS_DIR, StageFolder
from tasks.storage import Store

__all__ = ["VARIANTS_DIR", "differences", "list_variants", "record_variant", "remove_variant", "stage_status"]

VARIANTS_DIR = "variants"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def differences(params: dict, reference: dict) -> dict[str, Any]:
    """The settings of ``params`` that differ from ``reference`` (dotted keys -> value)."""
    ours, theirs = _flatten(params), _flatten(reference)
    return {key: ours.get(key) for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)}


def record_variant(store: Store, run_url: str, variant: str, params: dict, stages: dict[str, str]) -> dict:
    """Write (once) the record of a variant; returns it, with ``changes`` from the run's first variant."""
    url = Store.join(run_url, VARIANTS_DIR, f"{variant}.json")
    if store.exists(url):
        record = store.read_json(url)
    else:
        record = {"variant": variant, "created_at": datetime.now(timezone.utc).isoformat(), "params": params,
                  "stages": stages}
        store.write_json(url, record)
    variants = list_variants(store, run_url)
    first = variants[-1] if variants else record  # newest first
    record["changes"] = differences(record["params"], first["params"]) if first["variant"] != variant else {}
    return record


def list_variants(store: Store, run_url: str) -> list[dict]:
    """Every variant record of the run, newest first."""
    folder = Store.join(run_url, VARIANTS_DIR)
    if not store.exists(folder):
        return []
    records = [store.read_json(url) for url in store.list(folder) if url.endswith(".json")]
    return sorted(records, key=lambda r: r["created_at"], reverse=True)


def stage_status(store: Store, run_url: str, run_name: str, stage: str, stage_fingerprint: str) -> str:
    """``complete``, ``incomplete`` (started, not finished) or ``missing``."""
    folder = StageFolder(store.root, run_url, run_name, stage, stage_fingerprint)
    if store.completed(folder.url) is not None:
        return "complete"
    return "incomplete" if store.exists(folder.url) else "missing"


def remove_variant(store: Store, run_url: str, run_name: str, variant: str, *, dry_run: bool = False) -> list[str]:
    """Delete a variant: its record and the stage folders (with their Ray run directories
    and cached results) that no other variant of the run uses. Returns what was (or, with
    ``dry_run``, would be) deleted."""
    records = {r["variant"]: r for r in list_variants(store, run_url)}
    if variant not in records:
        known = ", ".join(sorted(records)) or "none"
        raise ValueError(f"run {run_url} has no variant {variant!r} (its variants: {known})")
    kept = {(stage, fp) for other, record in records.items() if other != variant for stage, fp in record["stages"].items()}
    doomed = []
    for stage, stage_fp in records[variant]["stages"].items():
        if (stage, stage_fp) in kept:
            continue
        folder = StageFolder(store.root, run_url, run_name, stage, stage_fp)
        doomed += [folder.url, Store.join(run_url, RESULTS_DIR, folder.cache_key)]
        if stage in ("fm", "cafm"):
            doomed.append(Store.join(run_url, "ray", folder.ray_run_name))
    doomed.append(Store.join(run_url, VARIANTS_DIR, f"{variant}.json"))
    removed = [url for url in doomed if store.exists(url)]
    if not dry_run:
        for url in removed:
            store.remove(url)
    return removed
