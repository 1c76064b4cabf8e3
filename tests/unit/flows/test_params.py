"""Pipeline parameters are validated before any compute, with the field named."""

import json

import pytest
from pydantic import ValidationError

from flows.cli import build_params, main
from flows.params import PipelineParams, smoke_params


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampling.nfes=[7]"], "heun needs even NFEs"),
        (["sampling.nfes=[0]"], "sampling.nfes must be >= 1"),
        (["cafm.discriminator_steps=0"], "discriminator_steps"),
        (["cafm.warmup_steps=5000"], "cafm.warmup_steps \\(5000\\) must be < cafm.steps"),
        (["fm.batch_size=129", "compute.num_workers=2"], "fm.batch_size 129 must be divisible by compute.num_workers 2"),
        (["compute.cpus_per_worker=0"], "cpus_per_worker"),
        (["data.source=/no/such/folder"], "set data.resolution and data.channels"),
        (["model.preset=huge"], "preset"),
        (["fm.stepz=3"], "stepz"),
        (["run_name=../escape"], "run_name"),
        (["sampling.method=rk4"], "method"),
        (["compute.rollback_lr_factor=1.5"], "rollback_lr_factor"),
        (["compute.max_rollbacks=-1"], "max_rollbacks"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ValidationError, match=message):
        build_params("default", None, overrides)


def test_overrides_and_params_file_merge_over_the_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"fm": {"lr": 0.002}, "sampling": {"nfes": [4]}}))
    params = build_params("smoke", str(path), ["fm.steps=77", "storage_root=s3://bucket/runs"])
    assert params.fm.steps == 77 and params.fm.lr == 0.002 and params.sampling.nfes == [4]
    assert params.storage_root == "s3://bucket/runs"
    assert params.cafm.steps == smoke_params().cafm.steps


def test_cli_reports_invalid_parameters_without_running(capsys):
    assert main(["run", "--set", "sampling.nfes=[3]"]) == 2
    assert "heun needs even NFEs" in capsys.readouterr().err


def test_cli_prints_parameters_as_json(capsys):
    assert main(["params", "--profile", "smoke"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert PipelineParams.model_validate(printed) == smoke_params()


def test_defaults_are_the_documented_main_job():
    params = PipelineParams()
    assert (params.data.source, params.model.preset, params.fm.steps, params.cafm.steps) == ("digits", "tiny", 2000, 1000)
    assert params.sampling.nfes == [8, 32] and params.sampling.cfg_scales == [1.0]


def test_missing_inception_weights_fail_before_any_stage(tmp_path):
    from cafm_core.checks import CAFMInputError
    from flows.pipeline import preflight

    params = smoke_params(storage_root=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                          inception_weights=str(tmp_path / "inception.pt"))
    with pytest.raises(CAFMInputError, match="inception.pt' is not an existing file"):
        preflight(params)
    assert not (tmp_path / "runs" / "smoke").exists()


def test_unreachable_mlflow_server_fails_early(tmp_path):
    from flows.pipeline import preflight
    from tasks.tracking import TrackingError

    params = smoke_params(storage_root=str(tmp_path / "runs"), tracking_uri="http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="MLflow tracking server http://127.0.0.1:9 is unreachable"):
        preflight(params)


def test_training_defaults_are_the_cores_except_the_stated_main_job_differences():
    """One owner per default: every training field the pipeline exposes defaults to
    cafm_core's value, unless MAIN_JOB_DIFFERENCES names it (and then to that value)."""
    from dataclasses import asdict

    from cafm_core.path import TimeSampler
    from cafm_core.training import CAFMConfig, FlowMatchingConfig
    from flows.params import MAIN_JOB_DIFFERENCES, CAFMParams, FMParams

    for stage, params, core in (("fm", FMParams(), FlowMatchingConfig()), ("cafm", CAFMParams(), CAFMConfig())):
        differences = MAIN_JOB_DIFFERENCES[stage]
        pipeline = params.core_config(seed=0)
        expected = asdict(core)
        for name, value in differences.items():
            if name == "time_sampler":
                value = asdict(TimeSampler(**value))
            assert pipeline[name] == value and expected[name] != value, (stage, name)
        same = {k: v for k, v in pipeline.items() if k not in differences}
        assert same == {k: expected[k] for k in same}, stage
        assert set(pipeline) <= set(expected)
    # the time sampler exposes every field of the core's
    assert set(FMParams().time_sampler.model_dump()) == set(asdict(TimeSampler()))


def test_cafm_from_scratch_depends_on_no_fm_setting_and_excludes_an_init_checkpoint():
    """From scratch, the CAFM stage's identity (its folder, its cache key) ignores the FM
    stage: no FM checkpoint is an input of it."""
    import pytest
    from pydantic import ValidationError

    from flows.params import PipelineParams
    from flows.run_layout import RunLayout

    base = PipelineParams.model_validate({"cafm": {"from_scratch": True}, "storage_root": "/tmp/unused-root"})
    other_fm = base.model_copy(update={"fm": base.fm.model_copy(update={"steps": 7, "lr": 0.5})})
    assert RunLayout(base).fingerprint("cafm") == RunLayout(other_fm).fingerprint("cafm")
    assert RunLayout(base).fingerprint("fm") != RunLayout(other_fm).fingerprint("fm")
    post_trained = base.model_copy(update={"cafm": base.cafm.model_copy(update={"from_scratch": False})})
    assert RunLayout(post_trained).fingerprint("cafm") != RunLayout(
        post_trained.model_copy(update={"fm": other_fm.fm})).fingerprint("cafm")  # post-training does depend on FM
    with pytest.raises(ValidationError, match="from_scratch and cafm.init_checkpoint exclude each other"):
        PipelineParams.model_validate({"cafm": {"from_scratch": True, "init_checkpoint": "s3://b/fm/model"}})


@pytest.mark.parametrize("source", ["http://example.com/images", "https://host/x", "gcs://bucket/images",
                                    "gs://bucket/images", "memory://images", "ftp://host/images",
                                    "simplecache::s3://bucket/images", "data:text/plain,abc", "S3://bucket/images"])
def test_data_source_schemes_other_than_local_file_and_s3_are_refused(source):
    with pytest.raises(ValidationError, match=r"data source .* is not supported; give a built-in name, a local path, "
                                              r"file://<path> or s3://<bucket>/<prefix>"):
        build_params("default", None, [f"data.source={source}", "data.resolution=8", "data.channels=1"])


@pytest.mark.parametrize("source", ["digits", "eight_gaussians", "/data/images", "relative/images",
                                    "file:///data/images", "s3://bucket/images"])
def test_built_in_names_local_paths_file_and_s3_sources_are_accepted(source):
    shape = [] if source in ("digits", "eight_gaussians") else ["data.resolution=8", "data.channels=1"]
    assert build_params("default", None, [f"data.source={source}", *shape]).data.source == source


def test_the_image_size_cap_is_a_parameter_of_50_mib_by_default():
    params = build_params("default", None, ["data.max_file_bytes=1000"])
    assert params.data.max_file_bytes == 1000 and PipelineParams().data.max_file_bytes == 50 * 1024 * 1024
    with pytest.raises(ValidationError, match="max_file_bytes"):
        build_params("default", None, ["data.max_file_bytes=0"])
