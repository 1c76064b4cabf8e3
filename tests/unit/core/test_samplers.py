"""Samplers against a closed-form Gaussian-to-Gaussian flow, plus determinism, CFG and input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cafm_core.checks import CAFMInputError
from cafm_core.samplers import (
    euler_sample,
    generate,
    guided_velocity,
    heun_sample,
    sample,
    time_grid,
)

M, S, DIM = 2.0, 0.5, 4


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact marginal velocity for x0 ~ N(M, S^2), eps ~ N(0, 1), per dimension."""
    t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    var = (1 - t) ** 2 * S**2 + t**2
    return -M + (t - (1 - t) * S**2) / var * (x - (1 - t) * M)


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return torch.randn(256, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _err(method: str, z: torch.Tensor, nfe: int) -> float:
    x0 = sample(gaussian_velocity, z, nfe=nfe, method=method)
    return float((x0 - (M + S * z)).abs().max())


def test_time_grid():
    g = time_grid(4)
    assert g.dtype == torch.float32 and g.shape == (5,)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert g[0] == 1.0 and g[-1] == 0.0
    with pytest.raises(CAFMInputError, match="num_steps"):
        time_grid(0)


def test_heun_beats_euler_at_same_nfe(z):
    assert _err("heun", z, 8) < 0.1 * _err("euler", z, 8)


def test_convergence_orders(z):
    # Heun's error constant only settles after a few steps, hence larger NFE for it.
    e_euler = [_err("euler", z, n) for n in (16, 32, 64)]
    e_heun = [_err("heun", z, n) for n in (32, 64, 128)]
    for a, b in zip(e_euler, e_euler[1:]):
        assert 1.7 < a / b < 2.3, e_euler  # first order: halving h halves the error
    for a, b in zip(e_heun, e_heun[1:]):
        assert 3.3 < a / b < 4.7, e_heun  # second order: halving h quarters the error


def test_heun_matches_exact_flow_map(z):
    x0 = heun_sample(gaussian_velocity, z.float(), 400)
    assert x0.dtype == torch.float32
    assert torch.allclose(x0, (M + S * z).float(), atol=1e-4, rtol=0)


def test_euler_counts_evaluations():
    calls = []

    def fn(x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    euler_sample(fn, torch.zeros(2, 3), 5)
    assert calls == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    calls.clear()
    heun_sample(fn, torch.zeros(2, 3), 6)
    assert len(calls) == 6 and calls[0] == 1.0 and calls[-1] == 0.0


# ---- generate: determinism -------------------------------------------------------------


class ToyModel(nn.Module):
    """Velocity depends on x, t and the label (an embedding), so CFG is visible."""

    def __init__(self, num_classes: int = 3, dim: int = DIM):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = nn.Parameter(torch.randn(num_classes + 1, dim, generator=g))
        self.lin = nn.Parameter(torch.randn(dim, generator=g) * 0.1)
        self.modes: list[bool] = []

    def forward(self, x, t, y):
        self.modes.append(self.training)
        e = self.emb[y] if y is not None else self.emb[-1]
        return x * self.lin + e * (1 + t[:, None])


def test_generate_deterministic_and_batch_size_independent():
    model = ToyModel()
    labels = torch.arange(10) % 3
    kw = dict(num_samples=10, sample_shape=(DIM,), labels=labels, nfe=4, cfg_scale=2.0, null_class=3)
    a = generate(model, seed=7, batch_size=4, **kw)
    b = generate(model, seed=7, batch_size=4, **kw)
    c = generate(model, seed=7, batch_size=3, **kw)
    d = generate(model, seed=8, batch_size=4, **kw)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (10, DIM)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


def test_generate_restores_training_mode():
    model = ToyModel()
    model.train()
    generate(model, num_samples=2, sample_shape=(DIM,), labels=None, nfe=2)
    assert model.training
    assert model.modes and not any(model.modes)  # evaluated in eval mode
    model.eval()
    generate(model, num_samples=2, sample_shape=(DIM,), labels=None, nfe=2)
    assert not model.training


# ---- CFG --------------------------------------------------------------------------------


def test_cfg_linear_combination():
    model = ToyModel()
    x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(2))
    t = torch.rand(5, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1])
    null = torch.full_like(y, 3)
    u_cond, u_null = model(x, t, y), model(x, t, null)
    assert not torch.allclose(u_cond, u_null)
    assert torch.allclose(guided_velocity(model, y, cfg_scale=1.0, null_class=3)(x, t), u_cond)
    assert torch.allclose(guided_velocity(model, y, cfg_scale=0.0, null_class=3)(x, t), u_null)
    for s in (0.5, 1.5, 4.0):
        got = guided_velocity(model, y, cfg_scale=s, null_class=3)(x, t)
        assert torch.allclose(got, u_null + s * (u_cond - u_null), atol=1e-6)


def test_cfg_uses_one_batched_call():
    model = ToyModel()
    model.modes.clear()
    guided_velocity(model, torch.tensor([0, 1]), cfg_scale=3.0, null_class=3)(torch.zeros(2, DIM), torch.ones(2))
    assert len(model.modes) == 1


def test_cfg_without_null_class_errors():
    with pytest.raises(CAFMInputError, match="null_class"):
        guided_velocity(ToyModel(), torch.tensor([0]), cfg_scale=2.0, null_class=None)


# ---- errors -----------------------------------------------------------------------------


def test_errors():
    noise = torch.randn(2, DIM)
    with pytest.raises(CAFMInputError, match="even"):
        sample(gaussian_velocity, noise, nfe=3, method="heun")
    with pytest.raises(CAFMInputError, match="even"):
        heun_sample(gaussian_velocity, noise, 1)
    with pytest.raises(CAFMInputError, match="nfe"):
        sample(gaussian_velocity, noise, nfe=0, method="euler")
    with pytest.raises(CAFMInputError, match="nfe"):
        sample(gaussian_velocity, noise, nfe=2.0, method="euler")
    with pytest.raises(CAFMInputError, match="method"):
        sample(gaussian_velocity, noise, nfe=4, method="rk4")
    bad = noise.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CAFMInputError, match="noise"):
        sample(gaussian_velocity, bad, nfe=4)
    with pytest.raises(CAFMInputError, match="noise"):
        sample(gaussian_velocity, torch.zeros(2, DIM, dtype=torch.int64), nfe=4)
    with pytest.raises(CAFMInputError, match="labels"):
        generate(ToyModel(), num_samples=4, sample_shape=(DIM,), labels=torch.tensor([0, 1, 2]), nfe=2)
    with pytest.raises(CAFMInputError, match="sample_shape"):
        generate(ToyModel(), num_samples=4, sample_shape=(0,), labels=None, nfe=2)
    with pytest.raises(CAFMInputError, match="shape"):
        sample(lambda x, t: x[:1], noise, nfe=2)
