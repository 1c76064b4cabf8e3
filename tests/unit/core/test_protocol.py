"""Evaluation protocols: how samples are drawn is part of the protocol, and bad protocols are refused."""

from __future__ import annotations

import pytest
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.evaluation import SamplerSetting
from cafm_core.protocol import EvaluationProtocol


def _protocol(**overrides) -> EvaluationProtocol:
    values = dict(dataset="d" * 64, dataset_name="toy", kind="image", sample_shape=(1, 8, 8), num_classes=3, class_counts=(10, 20, 30),
                  feature_net="f" * 64, reference_stats="r" * 64, settings=(SamplerSetting("euler", 4),),
                  num_samples=300, seeds=(0, 1), shard_size=128)
    return EvaluationProtocol(**{**values, **overrides})


def test_draws_cover_the_sample_set_in_shards_with_their_own_noise():
    protocol = _protocol()
    setting = protocol.settings[0]
    draws = protocol.draws(setting, 0)
    assert [(d.start, d.count) for d in draws] == [(0, 128), (128, 128), (256, 44)]
    assert len({d.noise_seed for d in draws}) == 3
    assert draws == protocol.draws(setting, 0)  # deterministic
    assert [d.noise_seed for d in protocol.draws(setting, 1)] != [d.noise_seed for d in draws]  # per seed
    other = SamplerSetting("heun", 4)
    assert [d.noise_seed for d in protocol.draws(other, 0)] != [d.noise_seed for d in draws]  # per setting


def test_labels_follow_the_class_proportions_and_unconditional_sets_have_none():
    labels = _protocol().labels()
    assert labels.shape == (300,) and torch.bincount(labels).tolist() == [50, 100, 150]
    assert _protocol(num_classes=0, class_counts=None).labels() is None


@pytest.mark.parametrize("overrides, message", [
    ({"settings": ()}, "at least one sampler setting"),
    ({"seeds": (0, 0)}, "distinct seeds"),
    ({"num_samples": 0}, "num_samples must be a positive int"),
    ({"class_counts": (1, 2)}, "2 entries for 3 classes"),
])
def test_bad_protocols_are_refused_naming_the_value(overrides, message):
    with pytest.raises(CAFMInputError, match=message):
        _protocol(**overrides)
