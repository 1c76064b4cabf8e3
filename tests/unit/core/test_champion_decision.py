"""Promotion and regression decisions of the scheduled model evaluation."""

import math

import pytest

from cafm_core.checks import CAFMInputError
from cafm_core.evaluation import decide_promotion, relative_worsening


def test_relative_worsening_respects_metric_direction():
    assert relative_worsening("fd", 10.0, 12.0) == pytest.approx(0.2)
    assert relative_worsening("fd", 10.0, 8.0) == pytest.approx(-0.2)
    assert relative_worsening("class_accuracy", 0.8, 0.6) == pytest.approx(0.25)
    assert relative_worsening("class_accuracy", 0.8, 0.9) < 0
    assert math.isinf(relative_worsening("fd", 0.0, 1.0))


def test_better_candidate_is_promoted():
    decision = decide_promotion({"fd": 10.0, "class_accuracy": 0.8}, {"fd": 9.0, "class_accuracy": 0.79},
                                primary="fd", watched=["fd", "class_accuracy"], max_regression=0.1)
    assert decision.promote and decision.regressions == ()


def test_candidate_worse_past_threshold_is_a_regression_and_not_promoted():
    decision = decide_promotion({"fd": 10.0, "class_accuracy": 0.8}, {"fd": 9.0, "class_accuracy": 0.5},
                                primary="fd", watched=["fd", "class_accuracy"], max_regression=0.1)
    assert not decision.promote
    assert [r["metric"] for r in decision.regressions] == ["class_accuracy"]
    assert "class_accuracy: champion 0.8, candidate 0.5" in decision.describe(0.1)


def test_slightly_worse_candidate_is_kept_out_without_failing():
    decision = decide_promotion({"fd": 10.0}, {"fd": 10.5}, primary="fd", watched=["fd"], max_regression=0.1)
    assert not decision.promote and decision.regressions == ()


def test_missing_metric_is_a_clear_error():
    with pytest.raises(CAFMInputError, match="kid"):
        decide_promotion({"fd": 1.0}, {"fd": 1.0}, primary="fd", watched=["kid"], max_regression=0.1)
