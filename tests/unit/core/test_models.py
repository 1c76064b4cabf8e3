"""Model families: shapes, parameterisations, presets, discriminator initialisation."""

import pytest
import torch

from cafm_core.checks import CAFMInputError
from cafm_core.models import (
    DIT_PRESETS,
    MLPConfig,
    build_discriminator,
    build_generator,
    config_from_dict,
    discriminator_from_generator,
    dit_config,
    twice_differentiable,
)
from cafm_core.path import interpolate

from .helpers import image_batch, perturbed


def test_discriminator_init_reproduces_generator_hidden_states():
    generator = perturbed(build_generator(dit_config("tiny", num_classes=10))).double()
    discriminator = discriminator_from_generator(generator).double()
    x, t, y = image_batch()
    generator_hidden, generator_c = generator.backbone(x, t, y)
    discriminator_hidden, discriminator_c = discriminator.backbone(x, t, y)
    torch.testing.assert_close(discriminator_hidden, generator_hidden, rtol=0, atol=0)
    torch.testing.assert_close(discriminator_c, generator_c, rtol=0, atol=0)
    # only the token and the head are new
    shared = {k for k in discriminator.state_dict() if k.startswith("backbone.")}
    assert set(discriminator.state_dict()) - shared == {"token", "head_norm.weight", "head_norm.bias", "head.weight", "head.bias"}
    # and a freshly built discriminator does not reproduce them
    fresh_hidden, _ = build_discriminator(generator.config).double().backbone(x, t, y)
    assert not torch.allclose(fresh_hidden, generator_hidden)


def test_mlp_discriminator_init_copies_backbone():
    generator = perturbed(build_generator(MLPConfig(num_classes=4)))
    discriminator = discriminator_from_generator(generator)
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.randint(0, 4, (6,))
    torch.testing.assert_close(discriminator.backbone(x, t, y), generator.backbone(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_presets_build_and_output_velocity_shaped_like_input(preset):
    config = dit_config(preset, image_size=8, in_channels=3, num_classes=10)
    generator = build_generator(config)
    discriminator = build_discriminator(config)
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.rand(2), torch.tensor([1, 10])  # 10 = null class
    assert generator(x, t, y).shape == x.shape
    assert discriminator(x, t, y).shape == (2,)


def test_fresh_generator_outputs_zero_velocity_adaln_zero():
    generator = build_generator(dit_config("tiny"))
    x, t, y = image_batch(dtype=torch.float32)
    assert torch.count_nonzero(generator(x, t, y)) == 0


def test_x_prediction_converts_to_velocity_on_the_path():
    """If the network predicted x0 exactly, the returned velocity is eps - x0 (for t >= min_t)."""
    config = dit_config("tiny", prediction="x", num_classes=0)
    generator = build_generator(config).double()
    x0, eps = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = interpolate(x0, eps, t)
    generator.unpatchify = lambda tokens: x0  # an oracle network output
    torch.testing.assert_close(generator(x_t, t, None), eps - x0)


def test_config_round_trip_and_unknown_fields():
    config = dit_config("mini", num_classes=3, prediction="x")
    assert config_from_dict(config.to_dict()) == config
    assert config_from_dict(MLPConfig().to_dict()) == MLPConfig()
    with pytest.raises(CAFMInputError, match="unknown dit config fields \\['depthh'\\]"):
        config_from_dict({**config.to_dict(), "depthh": 3})
    with pytest.raises(CAFMInputError, match="unknown model kind 'unet'"):
        config_from_dict({"kind": "unet"})


def test_mlp_activation_exact_gelu_by_default_and_tanh_for_configs_saved_before_the_field():
    config = dit_config("tiny")
    assert config.mlp_activation == "gelu"
    assert build_generator(config).backbone.blocks[0].mlp[1].approximate == "none"
    old = {k: v for k, v in config.to_dict().items() if k != "mlp_activation"}  # a checkpoint of 2026-11
    assert config_from_dict(old).mlp_activation == "gelu_tanh"
    assert build_generator(config_from_dict(old)).backbone.blocks[0].mlp[1].approximate == "tanh"
    assert config_from_dict({**old, "mlp_activation": "gelu"}) == config
    with pytest.raises(CAFMInputError, match="mlp_activation"):
        dit_config("tiny", mlp_activation="relu")


def test_bad_model_inputs_name_the_value():
    with pytest.raises(CAFMInputError, match="unknown DiT preset 'huge'"):
        dit_config("huge")
    with pytest.raises(CAFMInputError, match="divisible by patch_size"):
        dit_config("tiny", image_size=9)
    with pytest.raises(CAFMInputError, match="unknown prediction 'eps'"):
        dit_config("tiny", prediction="eps")
    generator = build_generator(dit_config("tiny", num_classes=10))
    with pytest.raises(CAFMInputError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        generator(torch.randn(2, 3, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(CAFMInputError, match="y must be int labels"):
        generator(torch.randn(2, 1, 8, 8), torch.rand(2), None)
    with pytest.raises(CAFMInputError, match="floating point"):
        generator(torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(CAFMInputError, match="unconditional"):
        build_generator(MLPConfig())(torch.randn(2, 2), torch.rand(2), torch.zeros(2, dtype=torch.long))


def test_discriminator_last_block_computes_only_the_token_and_changes_nothing():
    """The discriminator reads only its token's final state, so its last block computes that
    row alone (the other tokens serve as keys and values): value and every gradient equal
    the full computation's."""
    config = dit_config("tiny", num_classes=10, depth=3)
    discriminator = perturbed(build_discriminator(config)).double()
    x, t, y = image_batch()
    x.requires_grad_(True)
    t = t.clone().requires_grad_(True)
    pruned = discriminator(x, t, y)
    prefix = discriminator.token.expand(x.shape[0], -1, -1)
    full_tokens, _ = discriminator.backbone(x, t, y, prefix=prefix)
    full = discriminator.head(discriminator.head_norm(full_tokens[:, 0])).squeeze(-1)
    assert full_tokens.shape[1] == config.num_patches + 1
    torch.testing.assert_close(pruned, full, rtol=1e-12, atol=1e-12)
    params = [x, t, *discriminator.parameters()]
    for a, b in zip(torch.autograd.grad(pruned.square().sum(), params), torch.autograd.grad(full.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    pruned_tokens, _ = discriminator.backbone(x, t, y, prefix=prefix, prefix_only=True)
    assert pruned_tokens.shape[1] == 1
    with pytest.raises(CAFMInputError, match="prefix_only needs prefix tokens"):
        discriminator.backbone(x, t, y, prefix_only=True)


def test_layer_norm_runs_the_fused_kernel_except_under_forward_mode_ad(monkeypatch):
    from torch.func import jvp

    from cafm_core.models import dit

    norm = perturbed(dit.LayerNorm(16, affine=True)).double()
    x = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)

    def composed(v):
        centred = v - v.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias

    calls = []
    fused_layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(dit.F, "layer_norm", lambda *a, **k: calls.append(1) or fused_layer_norm(*a, **k))
    out, expected = norm(x), composed(x)
    assert calls == [1]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # first and second derivatives (the D step's create_graph) equal the composed ops'
    params = [x, norm.weight, norm.bias]
    first = torch.autograd.grad(out.sin().sum(), params, create_graph=True)
    first_ref = torch.autograd.grad(expected.sin().sum(), params, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), params)
    second_ref = torch.autograd.grad(sum(g.square().sum() for g in first_ref), params)
    for a, b in zip((*first, *second), (*first_ref, *second_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # under torch.func.jvp the composed ops run, and the tangent is right
    calls.clear()
    tangent = torch.randn_like(x)
    _, derivative = jvp(norm, (x.detach(),), (tangent,))
    assert calls == []
    _, derivative_ref = jvp(composed, (x.detach(),), (tangent,))
    torch.testing.assert_close(derivative, derivative_ref, rtol=1e-12, atol=1e-12)


def test_attention_runs_the_fused_kernel_except_where_it_must_be_differentiated_again(monkeypatch):
    from torch.func import jvp

    from cafm_core.logits import input_gradient
    from cafm_core.models import dit

    torch.manual_seed(0)
    config = dit_config("tiny", image_size=8, in_channels=1, patch_size=2)
    discriminator = perturbed(build_discriminator(config)).double()
    x, t = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    y = torch.tensor([0, 4, 9])
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(dit.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    params = list(discriminator.parameters())

    def value_and_grads():
        out = discriminator(x.requires_grad_(True), t, y)
        return (out, *torch.autograd.grad(out.square().sum(), [x, *params]))

    fused_results = value_and_grads()
    assert len(calls) == config.depth  # every block, the pruned last one included
    calls.clear()
    with twice_differentiable():
        explicit_results = value_and_grads()
    assert calls == []
    for a, b in zip(fused_results, explicit_results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the D step's graph: input gradient with create_graph, then backpropagated to D's parameters
    _, grad_x, grad_t = input_gradient(discriminator, x.detach(), t, y, create_graph=True)
    assert calls == []
    second = torch.autograd.grad(grad_x.square().sum() + grad_t.sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in second)
    # without it the input gradient is a constant (the G step), and the fused kernel runs
    input_gradient(discriminator, x.detach(), t, y, create_graph=False)
    assert len(calls) == config.depth
    calls.clear()
    jvp(lambda v: discriminator(v, t, y), (x.detach(),), (torch.ones_like(x),))
    assert calls == []
