"""The diagnostic curve: same noise at every point, EMA measured on the shadow weights."""

import copy

import pytest
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.data import load_builtin
from cafm_core.ema import EMA
from cafm_core.evaluation import SamplerSetting, TrainingCurve
from cafm_core.metrics import sliced_wasserstein
from cafm_core.models import MLPConfig, build_generator

from .helpers import perturbed


@pytest.fixture(scope="module")
def points():
    return load_builtin("eight_gaussians", num_samples=1000, seed=0)


def _mlp():
    torch.manual_seed(0)
    return perturbed(build_generator(MLPConfig(data_dim=2, hidden_size=32, depth=2, num_classes=0)), 0.3)


def test_points_are_repeatable_and_the_ema_is_measured_on_its_shadow(points):
    curve = TrainingCurve(points, SamplerSetting("euler", 4), num_samples=256, seed=3)
    model = _mlp()
    ema = EMA(model, decay=0.9)
    first = curve(model, ema)
    assert set(first) == {"sliced_wasserstein_model", "sliced_wasserstein_ema"}
    assert first["sliced_wasserstein_model"] == pytest.approx(first["sliced_wasserstein_ema"], rel=1e-6)
    assert curve(model) == {"sliced_wasserstein_model": first["sliced_wasserstein_model"]}  # same noise

    shadow_model = copy.deepcopy(model)
    perturbed(model, 0.5)  # the live weights move, the shadow does not
    second = curve(model, ema)
    assert second["sliced_wasserstein_model"] != pytest.approx(first["sliced_wasserstein_model"], rel=1e-3)
    assert second["sliced_wasserstein_ema"] == pytest.approx(curve(shadow_model)["sliced_wasserstein_model"], rel=1e-6)
    assert model.training  # left as it was


def test_a_model_that_ignores_its_input_scores_far_worse_than_fresh_data(points):
    # velocity 0 leaves the Gaussian noise where it is: far from the eight modes
    class Still(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    curve = TrainingCurve(points, SamplerSetting("euler", 2), num_samples=512)
    still = curve(Still())["sliced_wasserstein_model"]
    fresh = sliced_wasserstein(points.data, load_builtin("eight_gaussians", num_samples=512, seed=5).data)
    assert still > 3 * fresh


def test_bad_arguments_are_rejected(points):
    with pytest.raises(CAFMInputError, match="num_samples"):
        TrainingCurve(points, SamplerSetting("euler", 4), num_samples=4)
    digits = load_builtin("digits")
    with pytest.raises(CAFMInputError, match="feature network"):
        TrainingCurve(digits, SamplerSetting("euler", 4))
