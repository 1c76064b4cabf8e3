"""The core demo end to end on a low-dim set, and its input checks."""

import json

import pytest
import torch

from cafm_core.checkpoint import load_model
from cafm_core.checks import CAFMInputError
from cafm_core.demo import main, run_demo


def test_demo_runs_and_writes_its_outputs(tmp_path):
    result = run_demo("eight_gaussians", profile="smoke", output=tmp_path, nfes=(4,), fm_steps=60, cafm_steps=30)
    for name in ("samples.png", "metrics.json", "report.md", "fm/checkpoint.json", "cafm/checkpoint.json"):
        assert (tmp_path / name).exists(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["model"] for row in metrics["rows"]] == ["FM", "CAFM"]
    assert all(0.0 <= row["on_manifold_fraction"] <= 1.0 for row in result["rows"])
    generator = load_model(tmp_path / "cafm")
    assert generator(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)

    # the same checkpoints evaluated without training (a model trained elsewhere, e.g. on a
    # GPU): the same rows, and no training ran
    again = run_demo("eight_gaussians", profile="smoke", output=tmp_path / "again", nfes=(4,), fm_steps=60,
                     cafm_steps=30, trained=tmp_path)
    assert again["rows"] == result["rows"]
    assert again["fm"]["seconds"] is None and again["cafm"]["seconds"] is None and again["trained"] == str(tmp_path)
    assert not (tmp_path / "again" / "fm").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "two_moons", "--nfe", "7"], "heun needs an even nfe"),
    ],
)
def test_demo_rejects_bad_input_before_compute(tmp_path, capsys, argv, message):
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "fm").exists()


def test_run_demo_rejects_unknown_profile(tmp_path):
    with pytest.raises(CAFMInputError, match="unknown profile 'huge'"):
        run_demo("digits", profile="huge", output=tmp_path)
