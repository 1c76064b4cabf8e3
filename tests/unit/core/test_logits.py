"""The CAFM logit D'(w) = grad_x D . w + dD/dt, computed two exact ways."""

import pytest
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.logits import DiscriminatorLogits, directional_logits, frozen

from .helpers import image_batch, mlp_pair, tiny_dit_pair


@pytest.fixture(params=["dit", "mlp"])
def setup(request):
    if request.param == "dit":
        _, generator, discriminator = tiny_dit_pair()
        x, t, y = image_batch()
    else:
        _, generator, discriminator = mlp_pair()
        x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
        y = None
    return generator, discriminator, x, t, y


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_logits_equal_central_finite_differences(setup, mode):
    _, discriminator, x, t, y = setup
    w = torch.randn_like(x)
    _, logits = directional_logits(discriminator, x, t, y, [w], mode=mode, create_graph=False)
    h = 1e-6
    with torch.no_grad():
        plus = discriminator(x + h * w, t + h, y)
        minus = discriminator(x - h * w, t - h, y)
    finite_difference = (plus - minus) / (2 * h)
    torch.testing.assert_close(logits[0].detach(), finite_difference, rtol=1e-6, atol=1e-7)
    assert finite_difference.abs().max() > 1e-3  # a non-trivial directional derivative


def _param_grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def test_forward_and_reverse_agree_in_values_and_discriminator_gradients(setup):
    _, discriminator, x, t, y = setup
    tangents = torch.stack([torch.randn_like(x), torch.randn_like(x)])
    results = {}
    for mode in ("forward", "reverse"):
        discriminator.zero_grad(set_to_none=True)
        values, logits = directional_logits(discriminator, x, t, y, tangents, mode=mode)
        (logits.square().sum() + values.square().sum()).backward()
        results[mode] = (values.detach(), logits.detach(), _param_grads(discriminator))
    torch.testing.assert_close(results["forward"][0], results["reverse"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results["forward"][1], results["reverse"][1], rtol=1e-9, atol=1e-9)
    for name in results["forward"][2]:
        torch.testing.assert_close(
            results["forward"][2][name], results["reverse"][2][name], rtol=1e-7, atol=1e-8, msg=name
        )


def test_generator_gradients_agree_between_modes(setup):
    generator, discriminator, x, t, y = setup
    grads = {}
    for mode in ("forward", "reverse"):
        generator.zero_grad(set_to_none=True)
        u = generator(x, t, y)
        with frozen(discriminator):
            _, logits = directional_logits(discriminator, x, t, y, u[None], mode=mode, create_graph=False)
        (logits - 1).square().mean().backward()
        assert all(p.grad is None for p in discriminator.parameters())
        grads[mode] = _param_grads(generator)
    for name in grads["forward"]:
        torch.testing.assert_close(grads["forward"][name], grads["reverse"][name], rtol=1e-7, atol=1e-9, msg=name)
    assert any(g.abs().max() > 0 for g in grads["reverse"].values())


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_two_tangent_call_equals_two_single_calls(setup, mode):
    _, discriminator, x, t, y = setup
    w1, w2 = torch.randn_like(x), torch.randn_like(x)
    values, both = directional_logits(discriminator, x, t, y, [w1, w2], mode=mode)
    _, first = directional_logits(discriminator, x, t, y, [w1], mode=mode)
    _, second = directional_logits(discriminator, x, t, y, [w2], mode=mode)
    torch.testing.assert_close(both[0], first[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(both[1], second[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(values, discriminator(x, t, y), rtol=1e-12, atol=1e-12)


def test_logit_is_linear_in_the_tangent(setup):
    _, discriminator, x, t, y = setup
    w = torch.randn_like(x)
    _, logits = directional_logits(discriminator, x, t, y, [w, 2 * w, torch.zeros_like(w)], create_graph=False)
    # D'(0) = dD/dt, and D'(2w) - D'(0) = 2 (D'(w) - D'(0))
    torch.testing.assert_close(logits[1] - logits[2], 2 * (logits[0] - logits[2]))


def test_wrapper_module_matches_function():
    _, _, discriminator = tiny_dit_pair()
    x, t, y = image_batch()
    tangents = torch.stack([torch.randn_like(x), torch.randn_like(x)])
    for mode in ("forward", "reverse"):
        wrapped = DiscriminatorLogits(discriminator, mode=mode)
        assert list(wrapped.parameters()) == list(discriminator.parameters())
        torch.testing.assert_close(
            wrapped(x, t, y, tangents)[1], directional_logits(discriminator, x, t, y, tangents, mode=mode)[1]
        )


def test_bad_tangent_shape_and_mode_are_rejected():
    _, _, discriminator = tiny_dit_pair()
    x, t, y = image_batch()
    with pytest.raises(CAFMInputError, match="tangents must have shape"):
        directional_logits(discriminator, x, t, y, torch.randn(2, 4, 1, 4, 4, dtype=x.dtype))
    with pytest.raises(CAFMInputError, match="unknown logit mode 'sideways'"):
        directional_logits(discriminator, x, t, y, [x], mode="sideways")
    with pytest.raises(CAFMInputError, match="t must have shape"):
        directional_logits(discriminator, x, t[:2], y, [x])
