"""Sweep parameters are checked point by point before any compute; results are read back
from Tune's reports exactly."""

import pytest
from pydantic import ValidationError

from flows.cli import build_params
from flows.params import SweepParams
from tasks.sweep import rows_from_report, trial_name
from tasks.train.configs import train_config
from cafm_core.evaluation import SamplerSetting
from cafm_core.evaluation import rank_models


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["space.lr=[1e-4]"], "sweep space keys \\['lr'\\] are not cafm fields"),
        (['space={"generator_lr": [1e-5, -1]}'], "sweep point \\{'generator_lr': -1\\}"),
        (["space.warmup_steps=[100,2000]"], "warmup_steps 2000 >= steps 1000"),
        (["space.time_sampler.kind=[uniform,cosine]"], "kind"),
        (["space.discriminator_steps=[]"], "list no values"),
        (["curve_nfe=7"], "curve_nfe must be even"),
        (["name=../x"], "name"),
    ],
)
def test_bad_sweeps_are_rejected_before_compute(overrides, message):
    with pytest.raises(ValidationError, match=message):
        build_params("default", None, overrides, sweep=True)


def test_points_cover_the_grid_and_reach_the_time_sampler():
    sweep = build_params("default", None, ['space={"ema_decay": [0.99, 0.999], "time_sampler.kind": ["uniform", "logit_normal"]}'],
                         sweep=True)
    points = sweep.points()
    assert len(points) == 4 and points[1] == {"ema_decay": 0.99, "time_sampler.kind": "logit_normal"}
    cafm = sweep.cafm_for(points[1])
    assert cafm.time_sampler.kind == "logit_normal" and cafm.ema_decay == 0.99
    assert cafm.steps == SweepParams().pipeline.cafm.steps  # everything else from the pipeline's cafm
    added = build_params("default", None, ["space.ema_decay=[0.99,0.999]"], sweep=True)
    assert len(added.points()) == 2 * len(SweepParams().points())  # space.<field> adds a dimension


def test_trial_configs_become_cafm_configs():
    config = train_config("cafm", {"steps": 50, "warmup_steps": 10, "betas": [0.0, 0.9], "time_sampler": {"kind": "logit_normal"}})
    assert config.betas == (0.0, 0.9) and config.time_sampler.kind == "logit_normal"
    assert trial_name(3, {"generator_lr": 3e-5, "time_sampler.kind": "uniform"}) == "t03-generator_lr=3e-05,kind=uniform"


def test_rows_round_trip_through_a_flat_report():
    settings = [SamplerSetting("heun", 8), SamplerSetting("heun", 32)]
    final = {"final": 1.0, "step": 100, "eval.heun-nfe8-cfg1.seed0.fd": 1.5, "eval.heun-nfe8-cfg1.seed1.fd": 1.7,
             "eval.heun-nfe32-cfg1.seed0.fd": 0.9, "eval.heun-nfe32-cfg1.seed0.kid": 0.01}
    rows = rows_from_report(final, settings, [0, 1])
    assert rows == [
        {"method": "heun", "nfe": 8, "cfg_scale": 1.0, "seed": 0, "fd": 1.5},
        {"method": "heun", "nfe": 8, "cfg_scale": 1.0, "seed": 1, "fd": 1.7},
        {"method": "heun", "nfe": 32, "cfg_scale": 1.0, "seed": 0, "fd": 0.9, "kid": 0.01},
    ]


def test_ranking_averages_guidance_free_settings_only():
    summary = [
        {"model": "FM", "nfe": 8, "cfg_scale": 1.0, "fd": 2.0},
        {"model": "FM", "nfe": 32, "cfg_scale": 1.0, "fd": 1.0},
        {"model": "t00", "nfe": 8, "cfg_scale": 1.0, "fd": 1.8},
        {"model": "t00", "nfe": 32, "cfg_scale": 1.0, "fd": 1.1},
        {"model": "t00", "nfe": 32, "cfg_scale": 2.0, "fd": 0.1},  # guided: not counted
    ]
    assert rank_models(summary, "fd") == [("t00", pytest.approx(1.45)), ("FM", pytest.approx(1.5))]


def test_parameters_map_onto_the_core_configs_exactly():
    params = SweepParams().pipeline
    assert train_config("fm", params.fm.core_config(7)).seed == 7
    cafm = train_config("cafm", params.cafm.core_config(7))
    assert cafm.discriminator_steps == params.cafm.discriminator_steps and cafm.seed == 7
    sweep = SweepParams()
    assert train_config("cafm", sweep.cafm_for(sweep.points()[-1]).core_config(0)).generator_lr == sweep.points()[-1]["generator_lr"]
