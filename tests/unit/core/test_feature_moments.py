"""Streaming feature statistics (cafm_core.metrics.FeatureMoments) and the bounded noise floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cafm_core import evaluation as evaluation_module
from cafm_core.checks import CAFMInputError
from cafm_core.data import Dataset, load_builtin
from cafm_core.evaluation import noise_floor
from cafm_core.metrics import FeatureMoments, feature_statistics, precision_recall


def test_streamed_moments_equal_the_in_memory_statistics():
    rng = np.random.default_rng(0)
    # features with a large common offset: the case where sums of squares lose digits
    features = rng.normal(3.0, 0.5, size=(1003, 16)) @ rng.normal(size=(16, 16)) + 5.0
    mu, sigma = feature_statistics(features)
    streamed = FeatureMoments(16)
    for start in range(0, 1003, 97):  # uneven batches
        streamed.add(features[start : start + 97].astype(np.float32))
    merged = FeatureMoments(16).add(features[:400]).merge(FeatureMoments(16).add(features[400:]))
    # float32 batches: the input itself is rounded, so compare against its in-memory statistics
    mu32, sigma32 = feature_statistics(features.astype(np.float32))
    for (m, s), (m_ref, s_ref) in ((streamed.statistics(), (mu32, sigma32)), (merged.statistics(), (mu, sigma))):
        assert streamed.count == merged.count == 1003
        np.testing.assert_allclose(m, m_ref, rtol=1e-6)
        np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-6 * np.abs(s_ref).max())
        assert np.array_equal(s, s.T)


def test_moments_refuse_wrong_dims_and_too_few_rows():
    with pytest.raises(CAFMInputError, match="dim 3, these moments 4"):
        FeatureMoments(4).add(np.zeros((2, 3)))
    with pytest.raises(CAFMInputError, match="at least 2 samples, got 1"):
        FeatureMoments(4).add(np.zeros((1, 4))).statistics()


def test_the_noise_floor_works_from_a_bounded_sample(monkeypatch):
    seen = []

    def spy(real, fake, **kwargs):  # every floor pair goes through precision/recall
        seen.append((len(real), len(fake)))
        return precision_recall(real, fake, **kwargs)

    monkeypatch.setattr(evaluation_module, "precision_recall", spy)
    images = torch.rand(900, 1, 8, 8) * 2 - 1
    dataset = Dataset(images, torch.arange(900) % 3, 3, "image", ["a", "b", "c"])
    features = torch.randn(900, 8)
    floor = noise_floor(dataset, real_features=features, seed=1, splits=2, max_samples=200)
    # 2 splits x (halves: 100 against 100, bootstrap: 200 against a resample of 200)
    assert seen == [(100, 100), (200, 200)] * 2 and floor["halves"]["samples"] == 200
    seen.clear()
    whole = noise_floor(dataset, real_features=features, seed=1, splits=2, max_samples=900)
    assert seen == [(450, 450), (900, 900)] * 2 and "samples" not in whole["halves"]  # small sets: as before


def test_the_bounded_floor_is_the_floor_of_a_seeded_random_subset():
    points = load_builtin("eight_gaussians", num_samples=500, seed=0)
    bounded = noise_floor(points, seed=4, max_samples=120)
    keep = torch.randperm(500, generator=torch.Generator().manual_seed(4))[:120].sort().values
    subset = Dataset(points.data[keep], points.labels[keep], points.num_classes, "points",
                     list(points.class_names), points.name)
    exact = noise_floor(subset, seed=4, max_samples=None)
    for name in ("halves", "bootstrap"):
        assert bounded[name]["sliced_wasserstein"] == pytest.approx(exact[name]["sliced_wasserstein"])
    assert noise_floor(points, seed=5, max_samples=120) != bounded  # another seed, another sample
