"""EMA: exact update rule, decay 0 copies, state round trip, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cafm_core.checks import CAFMInputError
from cafm_core.ema import EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_update_rule():
    net = _net()
    ema = EMA(net, decay=0.9)
    old = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    new = net.state_dict()
    ema.update(net)
    assert ema.num_updates == 1
    for k, v in ema.shadow.items():
        if v.is_floating_point():
            expected = 0.9 * old[k] + (1 - 0.9) * new[k].float()
            assert torch.equal(v, expected), k
        else:
            assert torch.equal(v, new[k]), k  # integer buffers are copied
    assert not ema.shadow["0.weight"].requires_grad


def test_decay_zero_copies_and_copy_to():
    net = _net()
    ema = EMA(net, decay=0.0)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    ema.update(net)
    assert torch.equal(ema.shadow["0.weight"], net[0].weight)
    other = _net().to(torch.bfloat16)
    with torch.no_grad():
        other[0].weight.zero_()
    ema.copy_to(other)
    assert other[0].weight.dtype == torch.bfloat16
    assert torch.equal(other[0].weight, net[0].weight.to(torch.bfloat16))


def test_shadow_is_float32():
    net = _net().to(torch.bfloat16)
    ema = EMA(net, decay=0.5)
    assert ema.shadow["0.weight"].dtype == torch.float32
    ema.update(net)
    assert ema.shadow["0.weight"].dtype == torch.float32


def test_state_round_trip():
    net = _net()
    ema = EMA(net, decay=0.99)
    with torch.no_grad():
        net[0].bias.add_(1.0)
    ema.update(net)
    ema.update(net)
    restored = EMA(_net(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.99 and restored.num_updates == 2
    for k in ema.shadow:
        assert torch.equal(restored.shadow[k], ema.shadow[k])
    with pytest.raises(CAFMInputError, match="shape"):
        bad = ema.state_dict()
        bad["shadow"]["0.weight"] = torch.zeros(2, 2)
        restored.load_state_dict(bad)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan"), "0.9"])
def test_bad_decay(decay):
    with pytest.raises(CAFMInputError, match="decay"):
        EMA(_net(), decay=decay)


def test_mismatched_module():
    ema = EMA(_net())
    with pytest.raises(CAFMInputError, match="does not match"):
        ema.update(nn.Linear(4, 3))


def test_warmup_decay_ramps_up_to_the_configured_decay():
    import torch

    from cafm_core.ema import EMA

    module = torch.nn.Linear(2, 2)
    ema = EMA(module, decay=0.99, warmup=True)
    seen = []
    for _ in range(1000):
        seen.append(ema.current_decay)
        ema.update(module)
    assert seen[0] == 0.1 and seen[1] == 2 / 11
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert seen[-1] == 0.99
    assert EMA(module, decay=0.99).current_decay == 0.99


def test_post_training_ema_decay_matters_only_without_warmup():
    """Why CAFM's EMA has no warm-up by default: over 200 generator updates the warm-up
    schedule caps the decay below 0.99, so decays 0.99 and 0.998 give the same EMA; without
    it they differ, and the EMA keeps part of the starting (FM) weights as intended."""
    from cafm_core.training import CAFMConfig

    assert CAFMConfig().ema_warmup is False
    with pytest.raises(CAFMInputError, match="ema_warmup"):
        CAFMConfig(ema_warmup=1)
    start = nn.Linear(4, 3)
    weights = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(200)]

    def final(decay: float, warmup: bool) -> torch.Tensor:
        module = nn.Linear(4, 3)
        module.load_state_dict(start.state_dict())
        ema = EMA(module, decay, warmup=warmup)
        for w in weights:
            with torch.no_grad():
                module.weight.copy_(w)
            ema.update(module)
        return ema.shadow["weight"]

    torch.testing.assert_close(final(0.99, True), final(0.998, True))
    assert not torch.allclose(final(0.99, False), final(0.998, False))
    # no warm-up: 0.998 ** 200 = 67% of the starting weights remain
    expected = 0.998 ** 200 * start.weight + sum((1 - 0.998) * 0.998 ** (199 - i) * w for i, w in enumerate(weights))
    torch.testing.assert_close(final(0.998, False), expected.detach(), rtol=1e-4, atol=1e-5)
