"""Metrics against closed forms and scipy references, and their input checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.data import load_builtin
from cafm_core.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    mode_coverage,
    precision_recall,
    sliced_wasserstein,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    covariance_mean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covariance_mean))


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_spd(rng, dim), _random_spd(rng, dim)
    expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    variances1, variances2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(variances1) - np.sqrt(variances2)) ** 2).sum()  # 5 + 4 + 1 + 0
    assert frechet_distance(mu1, np.diag(variances1), mu2, np.diag(variances2)) == pytest.approx(expected)


def test_frechet_distance_from_features_grows_with_shift():
    real = torch.randn(2000, 4)
    same = torch.randn(2000, 4)
    shifted = torch.randn(2000, 4) + 2.0
    assert frechet_distance_from_features(real, same) < 0.05
    assert frechet_distance_from_features(real, shifted) == pytest.approx(16.0, rel=0.05)
    mu, sigma = feature_statistics(real)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)


def test_kid_is_near_zero_for_same_distribution_and_positive_for_shifted():
    real, same, shifted = torch.randn(600, 8), torch.randn(600, 8), torch.randn(600, 8) + 1.0
    same_mean, same_std = kernel_inception_distance(real, same, subset_size=300, num_subsets=20)
    shifted_mean, _ = kernel_inception_distance(real, shifted, subset_size=300, num_subsets=20)
    assert abs(same_mean) < 0.01 and same_std >= 0.0
    assert shifted_mean > 0.1
    assert kernel_inception_distance(real, shifted, subset_size=300, num_subsets=20, seed=0)[0] == shifted_mean


def test_precision_recall_same_distribution_far_fake_and_collapsed_fake():
    real = load_builtin("eight_gaussians", num_samples=2000, seed=0).data
    same_dataset = load_builtin("eight_gaussians", num_samples=2000, seed=1)
    same = same_dataset.data
    precision, recall = precision_recall(real, same, k=3)
    assert precision > 0.9 and recall > 0.9

    far = same + 10.0
    precision, recall = precision_recall(real, far, k=3)
    assert precision < 0.05 and recall < 0.05

    one_mode = same[same_dataset.labels == 0]  # only the mode at angle 0
    precision, recall = precision_recall(real, one_mode, k=3)
    assert precision > 0.9 and recall < 0.25


def test_knn_tiles_give_the_same_radii_and_balls_as_all_pairs_at_once():
    """The bounded-memory tiling (rows x columns, running k smallest) must not change the
    answer: compare with every pairwise distance computed in one matrix."""
    from cafm_core.metrics import knn_radii, within_manifold

    generator = torch.Generator().manual_seed(3)
    points = torch.randn(103, 5, generator=generator, dtype=torch.float64)
    queries = torch.randn(61, 5, generator=generator, dtype=torch.float64) * 1.3
    k = 3
    all_pairs = torch.cdist(points, points)
    expected_radii = all_pairs.sort(dim=1).values[:, k]
    expected_inside = (torch.cdist(queries, points) <= expected_radii.unsqueeze(0)).any(dim=1)
    assert 0 < int(expected_inside.sum()) < len(queries)  # the check below can fail either way
    for rows, columns in [(7, 5), (1, 4), (1024, 8192), (103, 2)]:
        radii = knn_radii(points, k, rows=rows, columns=columns)
        torch.testing.assert_close(radii, expected_radii, rtol=1e-12, atol=1e-12)
        inside = within_manifold(queries, points, radii, rows=rows, columns=columns)
        assert torch.equal(inside, expected_inside), (rows, columns)


def test_sliced_wasserstein_is_zero_for_same_points_and_equals_1d_shift():
    points = torch.randn(1000, 1)
    assert sliced_wasserstein(points, points) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(points, points + 0.7) == pytest.approx(0.7, rel=1e-6)
    # unequal sample counts: W1 between a sample and a point mass is the mean distance
    assert sliced_wasserstein(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0]])) == pytest.approx(1.0)


@pytest.mark.parametrize("sizes", [(300, 300), (517, 203), (7, 1000)])
def test_sliced_wasserstein_in_1d_equals_scipys_w1_with_unequal_counts_and_ties(sizes):
    from scipy.stats import wasserstein_distance

    generator = torch.Generator().manual_seed(sum(sizes))
    a = torch.randint(-20, 20, (sizes[0], 1), generator=generator).double() / 4  # many ties, within and across sets
    b = torch.randn(sizes[1], 1, generator=generator, dtype=torch.float64) * 3 + 0.5
    b[: sizes[1] // 3] = a[: min(sizes[0], sizes[1] // 3)].repeat(sizes[1], 1)[: sizes[1] // 3]
    expected = wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy())
    assert sliced_wasserstein(a, b, num_projections=8) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_sliced_wasserstein_grows_with_shift_in_2d():
    real = torch.randn(800, 2)
    other = torch.randn(500, 2)
    distances = [sliced_wasserstein(real, other + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances[0] < 0.15
    assert distances == sorted(distances)


def test_mode_coverage_true_samples_versus_collapsed_sample():
    dataset = load_builtin("eight_gaussians", num_samples=4000, seed=2)
    true = dataset.data
    coverage = mode_coverage("eight_gaussians", true)
    assert coverage["modes_hit"] == 8 and coverage["num_modes"] == 8
    assert coverage["on_manifold_fraction"] > 0.99
    assert coverage["on_manifold_fraction"] + coverage["off_manifold_fraction"] == pytest.approx(1.0)
    assert all(abs(share - 1 / 8) < 0.03 for share in coverage["mode_shares"])

    collapsed = torch.cat([true[dataset.labels == 0], torch.zeros(100, 2)])  # one mode + junk at origin
    coverage = mode_coverage("eight_gaussians", collapsed)
    assert coverage["modes_hit"] == 1
    assert 0.0 < coverage["off_manifold_fraction"] < 0.5

    board = mode_coverage("checkerboard", load_builtin("checkerboard", num_samples=1000).data)
    assert board["on_manifold_fraction"] == 1.0 and "modes_hit" not in board


def test_metrics_reject_bad_inputs():
    real = torch.randn(50, 4)
    with pytest.raises(CAFMInputError, match="same feature dim"):
        frechet_distance_from_features(real, torch.randn(50, 3))
    with pytest.raises(CAFMInputError, match="NaN"):
        kernel_inception_distance(real, torch.full((50, 4), float("nan")))
    with pytest.raises(CAFMInputError, match="2-D"):
        precision_recall(real, torch.randn(50))
    with pytest.raises(CAFMInputError, match="at least 4 samples"):
        precision_recall(real, torch.randn(3, 4), k=3)
    with pytest.raises(CAFMInputError, match="sigma1"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(CAFMInputError, match="same feature dim"):
        sliced_wasserstein(real, torch.randn(10, 2))
    with pytest.raises(CAFMInputError, match="num_projections"):
        sliced_wasserstein(real, real, num_projections=0)
    with pytest.raises(CAFMInputError, match="synthetic"):
        mode_coverage("digits", real)


def test_summary_over_seeds_reports_mean_and_spread_and_table_has_floor():
    from cafm_core.evaluation import format_table, summarise_over_seeds

    rows = [
        {"model": "FM", "method": "heun", "nfe": 8, "cfg_scale": 1.0, "seed": s, "fd": v}
        for s, v in enumerate([1.0, 2.0, 3.0])
    ]
    (summary,) = summarise_over_seeds(rows, ("fd",))
    assert summary["seeds"] == 3 and summary["fd"] == 2.0 and summary["fd_std"] == 1.0
    table = format_table([summary], {"halves": {"fd": 0.5}}, ("fd", "kid"))
    assert "| FM | heun NFE 8, no CFG | 3 | 2 ± 1 |" in table
    assert "| real vs real (halves) | noise floor | | 0.5 |" in table
    assert "kid" not in table  # columns no row has are dropped


def test_paired_differences_pair_by_seed_and_ignore_unpaired_rows():
    from cafm_core.evaluation import paired_differences

    rows = [{"model": m, "method": "heun", "nfe": 8, "cfg_scale": 1.0, "seed": s, "fd": v}
            for m, s, v in [("FM", 0, 1.0), ("FM", 1, 1.5), ("CAFM", 1, 1.2), ("CAFM", 0, 0.9), ("CAFM", 2, 0.1)]]
    (d,) = paired_differences(rows, "fd")
    assert d["diffs"] == pytest.approx([-0.1, -0.3])  # seed order; seed 2 has no FM partner
    assert d["mean"] == pytest.approx(-0.2) and d["std"] == pytest.approx(0.1414, abs=1e-4)
    assert paired_differences(rows, "kid") == []


def test_kid_on_the_whole_sets_equals_torchmetrics_unbiased_mmd():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(200, 16))
    ours, _ = kernel_inception_distance(real, fake, subset_size=200, num_subsets=1)  # a permutation: same MMD
    reference = poly_mmd(torch.from_numpy(real), torch.from_numpy(fake), degree=3, gamma=None, coef=1.0)
    assert ours == pytest.approx(float(reference), rel=1e-9)


def _kid_one_subset_at_a_time(real, fake, size, num_subsets, seed):
    """KID as defined: per subset, the three kernels and the unbiased MMD^2 (the reference)."""
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = real[rng.choice(real.shape[0], size, replace=False)]
        y = fake[rng.choice(fake.shape[0], size, replace=False)]
        k = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3  # noqa: E731
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        estimates.append(within - 2.0 * kxy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


@pytest.mark.parametrize("n_real, n_fake, subset_size, num_subsets", [
    (300, 250, 100, 40),   # small sets, many subsets: the whole-set kernels
    (400, 900, 60, 3),     # few small subsets of larger sets: per subset
    (50, 50, 1000, 7),     # subsets as large as the sets
])
def test_kid_equals_its_definition_whichever_way_the_sums_are_taken(n_real, n_fake, subset_size, num_subsets,
                                                                     monkeypatch):
    from cafm_core import metrics

    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(n_real, 8)), rng.normal(0.2, 1.1, size=(n_fake, 8))
    size = min(subset_size, n_real, n_fake)
    expected = _kid_one_subset_at_a_time(real, fake, size, num_subsets, seed=11)
    auto = kernel_inception_distance(real, fake, subset_size=subset_size, num_subsets=num_subsets, seed=11)
    assert auto == pytest.approx(expected, rel=1e-9, abs=1e-12)
    chosen = []
    original = metrics.kid_subset_sums
    monkeypatch.setattr(metrics, "_KID_TILE_ENTRIES", 1000)  # several tiles of the whole-set kernels
    for method in ("subsets", "whole"):
        monkeypatch.setattr(metrics, "kid_subset_sums",
                            lambda x, y, subsets, method=method: chosen.append(method) or original(x, y, subsets, method))
        forced = kernel_inception_distance(real, fake, subset_size=subset_size, num_subsets=num_subsets, seed=11)
        assert forced == pytest.approx(expected, rel=1e-9, abs=1e-12), method
    assert chosen == ["subsets", "whole"]


def test_kid_takes_the_whole_set_kernels_where_they_cost_less():
    from cafm_core.metrics import kid_sum_method

    assert kid_sum_method(1797, 1797, 1000, 64, 100) == "whole"  # digits: the evaluation and its floor
    assert kid_sum_method(50_000, 50_000, 1000, 64, 100) == "subsets"  # a large reference
    assert kid_sum_method(1797, 1797, 1000, 64, 1) == "subsets"


def test_noise_floor_over_splits_is_the_mean_and_spread_of_single_splits():
    from cafm_core.evaluation import noise_floor

    dataset = load_builtin("eight_gaussians", num_samples=600, seed=0)
    singles = [noise_floor(dataset, seed=s) for s in (5, 6, 7)]
    floor = noise_floor(dataset, seed=5, splits=3)
    for name in ("halves", "bootstrap"):
        values = [single[name]["sliced_wasserstein"] for single in singles]
        assert floor[name]["sliced_wasserstein"] == pytest.approx(np.mean(values))
        assert floor[name]["sliced_wasserstein_std"] == pytest.approx(np.std(values, ddof=1))
        assert floor[name]["splits"] == 3
    assert floor["halves"]["sliced_wasserstein_std"] > 0  # splits differ, so the spread is real
    with pytest.raises(CAFMInputError, match="splits"):
        noise_floor(dataset, splits=0)


def test_a_difference_counts_only_beyond_the_floor_spread_and_in_the_right_direction():
    from cafm_core.evaluation import beyond_floor, format_differences

    floor = {"bootstrap": {"fd": 0.3, "fd_std": 0.1, "class_accuracy": 0.99, "class_accuracy_std": 0.002, "splits": 10}}
    diff = {"method": "heun", "nfe": 8, "cfg_scale": 1.0, "diffs": [-0.05, -0.07], "std": 0.01}
    assert beyond_floor({**diff, "metric": "fd", "mean": -0.06}, floor)["verdict"] == "within the floor's spread"
    assert beyond_floor({**diff, "metric": "fd", "mean": -0.2}, floor)["verdict"] == "better beyond the floor's spread"
    assert beyond_floor({**diff, "metric": "fd", "mean": 0.2}, floor)["verdict"] == "worse beyond the floor's spread"
    # higher is better for accuracy: a positive difference is the improvement
    assert beyond_floor({**diff, "metric": "class_accuracy", "mean": 0.01}, floor)["better"]
    assert beyond_floor({**diff, "metric": "kid", "mean": -1.0}, floor) is None  # no spread for that metric
    assert beyond_floor({**diff, "metric": "fd", "mean": -1.0}, {"bootstrap": {"fd": 0.3}}) is None  # one split
    line = format_differences([{**diff, "metric": "fd", "mean": -0.2}], floor=floor)
    assert "noise floor spread ±0.1 (bootstrap, 10 splits): **better beyond the floor's spread**" in line
    table_floor = {"halves": {"fd": 1.0, "fd_std": 0.34, "splits": 10}}
    from cafm_core.evaluation import format_table

    row = {"model": "FM", "method": "heun", "nfe": 8, "cfg_scale": 1.0, "seeds": 1, "fd": 1.1}
    assert "| real vs real (halves) | noise floor | 10 splits | 1 ± 0.34 |" in format_table([row], table_floor, ("fd",))
