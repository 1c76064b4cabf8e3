"""FM, discriminator and generator losses against hand-computed values and gradients."""

import pytest
import torch

from cafm_core.losses import discriminator_loss, flow_matching_loss, generator_loss

F64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=F64)


# --- values ----------------------------------------------------------------------------


def test_flow_matching_loss_is_the_mean_squared_error_over_all_elements():
    pred = _t([[1.0, 2.0], [3.0, 4.0]])
    target = _t([[0.0, 2.0], [1.0, 1.0]])
    # squared errors 1, 0, 4, 9 -> mean 14 / 4
    assert flow_matching_loss(pred, target).item() == pytest.approx(3.5, abs=1e-15)


def test_discriminator_loss_is_least_squares_to_plus_one_real_minus_one_fake_plus_centering():
    real = _t([1.5, 0.0])  # (0.25 + 1) / 2 = 0.625
    fake = _t([-1.0, 1.0])  # (0 + 4) / 2 = 2
    values = _t([2.0, -2.0])  # mean(D^2) = 4
    assert discriminator_loss(real, fake, values, centering_penalty=0.5).item() == pytest.approx(
        0.625 + 2.0 + 0.5 * 4.0, abs=1e-15
    )
    assert discriminator_loss(real, fake, values, centering_penalty=0.0).item() == pytest.approx(2.625, abs=1e-15)


def test_discriminator_loss_default_centering_penalty_is_one_thousandth():
    real, fake, values = _t([1.5, 0.0]), _t([-1.0, 1.0]), _t([2.0, -2.0])
    assert discriminator_loss(real, fake, values).item() == pytest.approx(2.625 + 1e-3 * 4.0, abs=1e-15)


def test_generator_loss_is_least_squares_to_plus_one_plus_transport_penalty():
    fake = _t([0.0, 3.0])  # (1 + 4) / 2 = 2.5
    u = _t([[1.0, -1.0], [2.0, 0.0]])  # mean(u^2) = 6 / 4 = 1.5
    assert generator_loss(fake, u, transport_penalty=0.1).item() == pytest.approx(2.5 + 0.1 * 1.5, abs=1e-15)


def test_generator_loss_ignores_the_velocity_size_by_default():
    fake = _t([0.0, 3.0])
    assert generator_loss(fake, _t([[1.0, -1.0], [2.0, 0.0]])).item() == pytest.approx(2.5, abs=1e-15)
    assert generator_loss(fake, 1e6 * torch.ones(2, 2, dtype=F64)).item() == pytest.approx(2.5, abs=1e-15)


def test_losses_are_zero_at_their_optimum():
    v = _t([[0.3, -0.2], [1.0, 4.0]])
    assert flow_matching_loss(v.clone(), v).item() == 0.0
    ones = torch.ones(5, dtype=F64)
    assert discriminator_loss(ones, -ones, torch.zeros(5, dtype=F64)).item() == 0.0
    assert generator_loss(ones, torch.zeros(5, 3, dtype=F64), transport_penalty=0.2).item() == 0.0


def test_losses_are_positive_away_from_their_optimum():
    ones = torch.ones(3, dtype=F64)
    # real and fake swapped: each term is (2)^2
    assert discriminator_loss(-ones, ones, torch.zeros(3, dtype=F64), centering_penalty=0.0).item() == 8.0
    assert generator_loss(-ones, torch.zeros(3, 2, dtype=F64)).item() == 4.0


# --- gradients with respect to the logits ------------------------------------------------


def test_discriminator_loss_gradients_are_the_hand_derivatives():
    real = _t([1.5, 0.0]).requires_grad_()
    fake = _t([-1.0, 1.0]).requires_grad_()
    values = _t([2.0, -2.0]).requires_grad_()
    cp = 0.5
    discriminator_loss(real, fake, values, centering_penalty=cp).backward()
    n = 2
    torch.testing.assert_close(real.grad, 2 * (real.detach() - 1) / n, rtol=0, atol=1e-15)
    torch.testing.assert_close(fake.grad, 2 * (fake.detach() + 1) / n, rtol=0, atol=1e-15)
    torch.testing.assert_close(values.grad, cp * 2 * values.detach() / n, rtol=0, atol=1e-15)


def test_loss_gradients_vanish_at_the_optimum():
    ones = torch.ones(4, dtype=F64)
    real, fake = ones.clone().requires_grad_(), (-ones).requires_grad_()
    values = torch.zeros(4, dtype=F64).requires_grad_()
    discriminator_loss(real, fake, values).backward()
    for g in (real.grad, fake.grad, values.grad):
        assert torch.equal(g, torch.zeros(4, dtype=F64))
    fake_g = ones.clone().requires_grad_()
    generator_loss(fake_g, torch.zeros(4, 2, dtype=F64)).backward()
    assert torch.equal(fake_g.grad, torch.zeros(4, dtype=F64))


# --- gradients through a closed-form discriminator -------------------------------------
# D(x, t) = <w, x> + c * t, so its logit along (dx, dt) = (z, 1) is D'(z) = <w, z> + c.
# The generator is u = a * x_t with one scalar parameter a.


def _setup():
    gen = torch.Generator().manual_seed(4)
    x_t = torch.randn(6, 3, generator=gen, dtype=F64)
    t = torch.rand(6, generator=gen, dtype=F64)
    v = torch.randn(6, 3, generator=gen, dtype=F64)
    w = torch.randn(3, generator=gen, dtype=F64).requires_grad_()
    c = torch.tensor(0.3, dtype=F64, requires_grad=True)
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    return x_t, t, v, w, c, a


def test_discriminator_loss_gives_no_gradient_to_the_generator_through_a_detached_u():
    x_t, t, v, w, c, a = _setup()
    u = (a * x_t).detach()
    real, fake = v @ w + c, u @ w + c
    values = x_t @ w + c * t
    cp = 0.1
    discriminator_loss(real, fake, values, centering_penalty=cp).backward()
    assert a.grad is None
    n = x_t.shape[0]
    with torch.no_grad():
        dr = 2 * (real - 1) / n
        df = 2 * (fake + 1) / n
        dv = cp * 2 * values / n
        expected_w = dr @ v + df @ u + dv @ x_t
        expected_c = dr.sum() + df.sum() + (dv * t).sum()
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.grad, expected_c, rtol=1e-12, atol=1e-12)


def test_generator_loss_with_a_frozen_discriminator_moves_only_the_generator():
    x_t, _, _, w, c, a = _setup()
    u = a * x_t
    fake = u @ w.detach() + c.detach()
    ot = 0.25
    generator_loss(fake, u, transport_penalty=ot).backward()
    assert w.grad is None and c.grad is None
    n = x_t.shape[0]
    with torch.no_grad():
        # d fake_i / d a = <w, x_i>;  d mean(u^2) / d a = 2 * a * mean(x^2)
        expected = (2 * (fake - 1) / n * (x_t @ w)).sum() + ot * 2 * a * x_t.square().mean()
    torch.testing.assert_close(a.grad, expected, rtol=1e-12, atol=1e-12)


def test_flow_matching_loss_gradient_is_two_times_the_error_over_the_element_count():
    pred = _t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    target = _t([[0.0, 2.0], [1.0, 1.0]])
    flow_matching_loss(pred, target).backward()
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - target) / 4, rtol=0, atol=1e-15)
