"""bench/evidence_gpu.py: its settings are the pipeline's, its step choice fits the budget,
and its summary pairs models by training seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cafm_core.path import TimeSampler
from flows.params import CAFMParams, FMParams

_PATH = Path(__file__).resolve().parents[3] / "bench" / "evidence_gpu.py"
_spec = importlib.util.spec_from_file_location("evidence_gpu", _PATH)
evidence_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evidence_gpu)


def test_settings_are_the_pipeline_defaults():
    fm, cafm = FMParams(), CAFMParams()
    assert evidence_gpu.PIPELINE_FM == {k: getattr(fm, k) for k in evidence_gpu.PIPELINE_FM}
    settings = dict(evidence_gpu.PIPELINE_CAFM)
    assert settings.pop("time_sampler") == TimeSampler(**cafm.time_sampler.model_dump())
    assert settings == {k: getattr(cafm, k) for k in settings}


def test_choose_steps_fits_the_budget():
    fm, cafm = evidence_gpu.choose_steps(300, 0.04, 0.08, warmup=200)
    assert (fm, cafm) == (2200, 2600)
    assert fm * 0.04 + cafm * 0.08 <= 300
    # a budget too small for CAFM still leaves one round of generator steps after the warmup
    assert evidence_gpu.choose_steps(1, 0.04, 0.08, warmup=200) == (100, 300)
    with pytest.raises(ValueError):
        evidence_gpu.choose_steps(0, 0.04, 0.08, warmup=200)


def _result(fm_fd: float, cafm_fd: float) -> dict:
    rows = []
    for model, fd in (("FM", fm_fd), ("CAFM", cafm_fd)):
        for seed, noise in ((0, -0.01), (1, 0.01)):  # two sampling seeds around the value
            rows.append({"model": model, "method": "heun", "nfe": 8, "cfg_scale": 1.0, "seed": seed, "fd": fd + noise})
    return {"rows": rows}


def test_rows_average_sampling_seeds_and_the_verdict_pairs_training_seeds():
    results = [_result(1.0, 0.8), _result(1.1, 0.85), _result(0.9, 0.75)]
    rows = evidence_gpu.per_training_seed(results, [0, 1, 2])
    fm = sorted((r["seed"], round(r["fd"], 6)) for r in rows if r["model"] == "FM")
    assert fm == [(0, 1.0), (1, 1.1), (2, 0.9)]
    (line,) = evidence_gpu.verdict(rows)
    assert "lower in every training seed (3/3)" in line and "ahead by more than the spread" in line
    # one seed where CAFM is worse: not lower in every seed, and the gap is within the spread
    rows = evidence_gpu.per_training_seed([_result(1.0, 0.8), _result(1.1, 1.3), _result(0.9, 0.85)], [0, 1, 2])
    (line,) = evidence_gpu.verdict(rows)
    assert "not lower in every training seed (2/3)" in line and "not beyond the spread" in line
