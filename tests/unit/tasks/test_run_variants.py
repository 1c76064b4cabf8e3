"""Variants of a run: what differs is named, removal never touches a stage another variant
uses, and the stage cache never serves a record whose stage is not complete."""

from __future__ import annotations

from tasks.run_variants import differences, list_variants, record_variant, remove_variant, stage_status
from tasks.stage_ledger import RESULTS_DIR, STAGE_CACHE, StageFolder
from tasks.storage import Store


def _complete(store: Store, run_url: str, stage: str, fp: str) -> StageFolder:
    folder = StageFolder(store.root, run_url, "r", stage, fp)
    store.write_bytes(folder.join("out", "x.bin"), b"x")
    folder.complete({"where": folder.url})
    store.write_bytes(Store.join(run_url, RESULTS_DIR, folder.cache_key), b"{}")
    return folder


def test_differences_name_the_changed_settings_by_their_dotted_keys():
    first = {"cafm": {"steps": 1000, "time_sampler": {"mean": -1.0}}, "seed": 0}
    assert differences({"cafm": {"steps": 500, "time_sampler": {"mean": -1.0}}, "seed": 0}, first) == {"cafm.steps": 500}
    assert differences(first, first) == {}


def test_removing_a_variant_keeps_the_stages_another_variant_uses(tmp_path):
    store = Store(str(tmp_path))
    run_url = store.url("r")
    shared = {"data": "d1", "fm": "f1"}
    for stage, fp in {**shared, "cafm": "c1", "eval": "e1", "cafm2": "c2", "eval2": "e2"}.items():
        _complete(store, run_url, stage.rstrip("2"), fp)
    first = record_variant(store, run_url, "e1", {"cafm": {"steps": 1000}}, {**shared, "cafm": "c1", "eval": "e1"})
    second = record_variant(store, run_url, "e2", {"cafm": {"steps": 500}}, {**shared, "cafm": "c2", "eval": "e2"})
    assert first["changes"] == {} and second["changes"] == {"cafm.steps": 500}
    assert [v["variant"] for v in list_variants(store, run_url)] == ["e2", "e1"]  # newest first

    planned = remove_variant(store, run_url, "r", "e2", dry_run=True)
    assert store.exists(Store.join(run_url, "cafm", "c2"))  # a dry run deletes nothing
    removed = remove_variant(store, run_url, "r", "e2")
    assert removed == planned
    assert not store.exists(Store.join(run_url, "cafm", "c2")) and not store.exists(Store.join(run_url, "eval", "e2"))
    for stage, fp in (("data", "d1"), ("fm", "f1"), ("cafm", "c1"), ("eval", "e1")):
        assert stage_status(store, run_url, "r", stage, fp) == "complete"
    assert [v["variant"] for v in list_variants(store, run_url)] == ["e1"]


def test_the_stage_cache_drops_a_record_whose_stage_is_not_complete(tmp_path):
    store = Store(str(tmp_path))
    run_url = store.url("r")
    done = _complete(store, run_url, "fm", "f1")
    assert STAGE_CACHE.compute_key(None, {"folder": done}, {}) == "fm-f1"
    assert store.exists(Store.join(run_url, RESULTS_DIR, "fm-f1"))  # kept: its stage is complete
    store.remove(done.join("_COMPLETE.json"), recursive=False)  # e.g. removed by hand, or a crash mid-rewrite
    assert STAGE_CACHE.compute_key(None, {"folder": done}, {}) == "fm-f1"
    assert not store.exists(Store.join(run_url, RESULTS_DIR, "fm-f1"))  # never served stale
