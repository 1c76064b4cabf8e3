"""The data stage's fingerprint follows the prepared-data format and the feature sample, so a
run with a new format or sample writes new stage folders beside those of older runs."""

from __future__ import annotations

from flows import run_layout
from flows.params import DataParams, PipelineParams
from flows.run_layout import RunLayout


def test_a_new_prepared_format_makes_new_folders_for_every_stage(monkeypatch):
    params = PipelineParams()
    before = RunLayout(params).stage_fingerprints()
    monkeypatch.setattr(run_layout, "MANIFEST_VERSION", run_layout.MANIFEST_VERSION + 1)
    after = RunLayout(params).stage_fingerprints()
    assert all(before[stage] != after[stage] for stage in before)  # data, and everything downstream of it


def test_the_feature_sample_is_part_of_the_data_stage():
    base = PipelineParams()
    smaller = base.model_copy(update={"data": DataParams(feature_sample=10_000)})
    assert base.data.feature_sample == 50_000
    assert RunLayout(base).fingerprint("data") != RunLayout(smaller).fingerprint("data")


def test_the_size_cap_is_part_of_a_folders_data_stage_and_leaves_the_built_in_sets_alone():
    folder = {"source": "/data/images", "resolution": 8, "channels": 1}
    base = PipelineParams(data=DataParams(**folder))
    capped = PipelineParams(data=DataParams(**folder, max_file_bytes=1000))
    assert RunLayout(base).fingerprint("data") != RunLayout(capped).fingerprint("data")
    digits, digits_capped = PipelineParams(), PipelineParams(data=DataParams(max_file_bytes=1000))
    assert RunLayout(digits).stage_fingerprints() == RunLayout(digits_capped).stage_fingerprints()
