"""The linear path, its velocity, x-prediction, time samplers and label dropout, in closed form."""

import math

import pytest
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.path import (
    TimeSampler,
    drop_labels,
    interpolate,
    target_velocity,
    velocity_from_x_prediction,
)


def _pair(n=4, shape=(3, 2), dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, *shape, generator=gen, dtype=dtype)
    eps = torch.randn(n, *shape, generator=gen, dtype=dtype)
    return x0, eps


# --- path ------------------------------------------------------------------------------


def test_interpolate_is_data_at_t0_and_noise_at_t1():
    x0, eps = _pair()
    n = x0.shape[0]
    assert torch.equal(interpolate(x0, eps, torch.zeros(n, dtype=x0.dtype)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(n, dtype=x0.dtype)), eps)


def test_interpolate_is_the_per_sample_convex_combination():
    x0, eps = _pair()
    t = torch.tensor([0.1, 0.25, 0.5, 0.9], dtype=x0.dtype)
    x_t = interpolate(x0, eps, t)
    for i, ti in enumerate(t.tolist()):  # each sample uses its own time
        torch.testing.assert_close(x_t[i], (1 - ti) * x0[i] + ti * eps[i], rtol=0, atol=1e-15)


def test_interpolate_on_scalar_numbers():
    x0 = torch.tensor([[2.0]])
    eps = torch.tensor([[-6.0]])
    # (1 - 0.25) * 2 + 0.25 * (-6) = 1.5 - 1.5 = 0
    assert interpolate(x0, eps, torch.tensor([0.25])).item() == 0.0


def test_interpolate_rejects_mismatched_shapes_and_bad_time_shape():
    x0, eps = _pair()
    with pytest.raises(CAFMInputError, match="equal shapes"):
        interpolate(x0, eps[:, :2], torch.zeros(4, dtype=x0.dtype))
    with pytest.raises(CAFMInputError, match="t must have shape"):
        interpolate(x0, eps, torch.zeros(3, dtype=x0.dtype))
    with pytest.raises(CAFMInputError, match="floating-point"):
        interpolate(x0, eps, torch.zeros(4, dtype=torch.long))


def test_target_velocity_equals_time_derivative_of_the_path_by_finite_differences():
    x0, eps = _pair()
    t = torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=x0.dtype)
    h = 1e-6
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    v = target_velocity(x0, eps)
    torch.testing.assert_close(fd, v, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=0)


def test_velocity_from_exact_x_prediction_recovers_the_true_velocity():
    x0, eps = _pair()
    t = torch.tensor([0.06, 0.3, 0.7, 1.0], dtype=x0.dtype)  # all above min_t
    x_t = interpolate(x0, eps, t)
    u = velocity_from_x_prediction(x_t, t, x0)
    torch.testing.assert_close(u, target_velocity(x0, eps), rtol=1e-12, atol=1e-12)


def test_velocity_from_x_prediction_divides_by_min_t_below_it():
    x_t = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    x0_hat = torch.zeros_like(x_t)
    t = torch.tensor([0.0, 0.01, 0.5], dtype=torch.float64)
    u = velocity_from_x_prediction(x_t, t, x0_hat, min_t=0.05)
    expected = x_t / torch.tensor([[0.05], [0.05], [0.5]], dtype=torch.float64)
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-12)
    assert torch.isfinite(u).all()
    # the default is 0.05, as in the design
    torch.testing.assert_close(velocity_from_x_prediction(x_t, t, x0_hat), u, rtol=0, atol=0)
    # another min_t moves the clamp
    u2 = velocity_from_x_prediction(x_t, t, x0_hat, min_t=0.2)
    torch.testing.assert_close(u2[0], x_t[0] / 0.2, rtol=0, atol=1e-12)


# --- time sampler ----------------------------------------------------------------------

N_DRAWS = 200_000


def _draws(sampler, n=N_DRAWS, seed=0):
    return sampler.sample(n, generator=torch.Generator().manual_seed(seed)).double()


def test_uniform_time_sampler_has_mean_one_half_and_variance_one_twelfth():
    t = _draws(TimeSampler())
    assert t.min() >= 0 and t.max() <= 1
    # standard errors: 0.00065 on the mean, 0.00019 on the variance; allow about 5 of them
    assert abs(t.mean().item() - 0.5) < 3e-3
    assert abs(t.var().item() - 1 / 12) < 1e-3


def test_time_sampler_returns_one_time_per_sample_and_is_reproducible():
    s = TimeSampler(kind="logit_normal", mean=-0.4, std=1.2)
    a = s.sample(7, generator=torch.Generator().manual_seed(3))
    b = s.sample(7, generator=torch.Generator().manual_seed(3))
    assert a.shape == (7,)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mean", [0.0, -0.8, 1.1])
def test_logit_normal_time_sampler_has_median_sigmoid_of_its_mean(mean):
    t = _draws(TimeSampler(kind="logit_normal", mean=mean, std=1.0))
    assert abs(t.median().item() - 1 / (1 + math.exp(-mean))) < 5e-3
    assert t.min() > 0 and t.max() < 1


def test_logit_normal_logit_has_the_given_mean_and_std():
    t = _draws(TimeSampler(kind="logit_normal", mean=0.3, std=0.7))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.3) < 1e-2
    assert abs(logit.std().item() - 0.7) < 1e-2


def test_shift_applies_the_closed_form_map_to_the_same_draws():
    shift = 3.0
    base = _draws(TimeSampler(kind="logit_normal"), n=1000, seed=5)
    shifted = _draws(TimeSampler(kind="logit_normal", shift=shift), n=1000, seed=5)
    torch.testing.assert_close(shifted, shift * base / (1 + (shift - 1) * base), rtol=1e-6, atol=1e-6)
    assert (shifted >= base - 1e-6).all()  # shift > 1 moves mass towards noise (t = 1)


def test_shift_moves_the_uniform_median_to_its_closed_form_value():
    # P(t' <= m) = 1/2 where m = s * 0.5 / (1 + (s - 1) * 0.5) = s / (1 + s)
    shift = 3.0
    t = _draws(TimeSampler(shift=shift))
    assert abs(t.median().item() - shift / (1 + shift)) < 5e-3


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_min_t_and_max_t_rescale_into_their_range(kind):
    base = _draws(TimeSampler(kind=kind), n=5000, seed=2)
    t = _draws(TimeSampler(kind=kind, min_t=0.2, max_t=0.6), n=5000, seed=2)
    assert t.min() >= 0.2 and t.max() <= 0.6
    torch.testing.assert_close(t, 0.2 + 0.4 * base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "beta"}, "unknown time sampler"),
        ({"std": 0.0}, "std must be > 0"),
        ({"std": -1.0}, "std must be > 0"),
        ({"shift": 0.0}, "shift must be > 0"),
        ({"min_t": 0.5, "max_t": 0.5}, "min_t < max_t"),
        ({"min_t": -0.1}, "min_t < max_t"),
        ({"max_t": 1.5}, "min_t < max_t"),
        ({"std": float("nan")}, "std must be > 0"),
    ],
)
def test_bad_time_sampler_settings_raise(kwargs, message):
    with pytest.raises(CAFMInputError, match=message):
        TimeSampler(**kwargs)


# --- label dropout ---------------------------------------------------------------------


def test_drop_labels_with_probability_zero_keeps_every_label():
    labels = torch.arange(100) % 10
    assert torch.equal(drop_labels(labels, null_class=10, drop_prob=0.0), labels)


def test_drop_labels_with_probability_one_drops_every_label():
    labels = torch.arange(100) % 10
    out = drop_labels(labels, null_class=10, drop_prob=1.0)
    assert torch.equal(out, torch.full_like(labels, 10))
    assert out.dtype == labels.dtype


def test_drop_labels_drops_at_the_given_rate_and_only_to_the_null_class():
    n = 100_000
    labels = torch.arange(n) % 10
    out = drop_labels(labels, null_class=10, drop_prob=0.3, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    # standard error sqrt(0.3 * 0.7 / n) = 0.0014; allow about 5 of them
    assert abs(dropped.double().mean().item() - 0.3) < 7e-3
    assert torch.equal(out[~dropped], labels[~dropped])


def test_drop_labels_passes_none_through_and_rejects_bad_probabilities():
    assert drop_labels(None, null_class=10, drop_prob=0.5) is None
    for p in (-0.1, 1.1):
        with pytest.raises(CAFMInputError, match="label drop probability"):
            drop_labels(torch.zeros(3, dtype=torch.long), null_class=10, drop_prob=p)
