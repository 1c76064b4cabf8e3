"""DiT/SiT-style image transformer: generator and discriminator share one backbone.

Backbone: patchify -> fixed 2-D sin-cos positions -> blocks with adaLN-zero modulation by
``c = embed(t) + embed(y)``. The generator adds a final adaLN layer mapping tokens back to
pixels; the discriminator prepends a learned token and reads a scalar from its final
hidden state (norm -> linear). Attention runs PyTorch's fused kernel
(``scaled_dot_product_attention``) where it can: not under forward-mode AD
(``torch.func.jvp``: fused kernels lack JVP rules) and not inside
``twice_differentiable()`` (their backward has no derivative); there it is written out
explicitly, the same function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from cafm_core.checks import CAFMInputError, check_choice, check_positive
from cafm_core.models.embeddings import LabelEmbedder, TimestepEmbedder
from cafm_core.path import velocity_from_x_prediction

# Size presets as data: name -> (hidden_size, depth, num_heads).
DIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "depth": 4, "num_heads": 4},
    "mini": {"hidden_size": 128, "depth": 6, "num_heads": 4},
    "small": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "base": {"hidden_size": 768, "depth": 12, "num_heads": 12},
}


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to rebuild a DiT generator or its discriminator."""

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10  # 0: unconditional
    prediction: str = "velocity"  # "velocity" (SiT) or "x" (JiT)
    time_scale: float = 1000.0
    x_prediction_min_t: float = 0.05
    # the blocks' MLP nonlinearity: exact GELU, or DiT's tanh approximation (the same cost on
    # GPUs; on CPUs PyTorch's tanh kernel and its double backward are several times slower)
    mlp_activation: str = "gelu"
    kind: str = "dit"

    def __post_init__(self) -> None:
        if self.kind != "dit":
            raise CAFMInputError(f"DiTConfig.kind must be 'dit', got {self.kind!r}")
        check_choice("prediction", self.prediction, ("velocity", "x"))
        check_choice("mlp_activation", self.mlp_activation, tuple(GELU_APPROXIMATION))
        for name in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            check_positive(name, getattr(self, name), integer=True)
        if self.image_size % self.patch_size:
            raise CAFMInputError(
                f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise CAFMInputError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_classes < 0:
            raise CAFMInputError(f"num_classes must be >= 0, got {self.num_classes}")
        check_positive("time_scale", self.time_scale)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return asdict(self)


GELU_APPROXIMATION = {"gelu": "none", "gelu_tanh": "tanh"}
"""``DiTConfig.mlp_activation`` -> ``nn.GELU``'s ``approximate``."""


def dit_config(preset: str = "tiny", **overrides) -> DiTConfig:
    """A config from a size preset (``tiny``, ``mini``, ``small``, ``base``) plus overrides."""
    check_choice("DiT preset", preset, DIT_PRESETS)
    return replace(DiTConfig(), **{**DIT_PRESETS[preset], **overrides})


def _sincos_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table ``[grid_size**2, hidden_size]``."""
    def one_axis(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    if hidden_size % 4:
        raise CAFMInputError(f"hidden_size must be divisible by 4 for 2-D positions, got {hidden_size}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")
    table = np.concatenate([one_axis(hidden_size // 2, rows), one_axis(hidden_size // 2, cols)], axis=1)
    return torch.from_numpy(table).float()


def _forward_mode_ad_active() -> bool:
    """True inside ``torch.func`` transforms (``jvp``, ``vmap``) or a forward-AD dual level;
    also where a PyTorch without these (private) hooks cannot tell: the composed ops are
    exact everywhere."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0
    except AttributeError:
        return True


_TWICE_DIFFERENTIABLE: ContextVar[bool] = ContextVar("twice_differentiable", default=False)


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Build models' graphs so that their backward can itself be differentiated.

    Needed around a forward whose input gradient is taken with ``create_graph=True`` and
    then backpropagated (the discriminator step's reverse-mode logits): the fused
    attention kernel's backward has no derivative, so attention is composed of matmuls
    and a softmax inside this context. Elsewhere the fused kernel runs (faster)."""
    token = _TWICE_DIFFERENTIABLE.set(True)
    try:
        yield
    finally:
        _TWICE_DIFFERENTIABLE.reset(token)


def _fused_attention_allowed() -> bool:
    return not _TWICE_DIFFERENTIABLE.get() and not _forward_mode_ad_active()


class LayerNorm(nn.Module):
    """LayerNorm, optionally with affine terms; from primitive ops under forward-mode AD.

    In PyTorch 2.13 the fused kernel's forward-mode derivative gives wrong parameter
    gradients when it is backpropagated (the D step in forward logit mode; measured in
    ``tests/unit/core/test_logits.py``), so inside ``torch.func`` transforms the norm is
    composed of mean, variance and rsqrt, exact in both modes. Elsewhere (the generator,
    the reverse-mode logits, their double backward) the fused kernel runs: the same
    function, faster (docs/benchmarks.md).
    """

    def __init__(self, hidden_size: int, *, affine: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _forward_mode_ad_active():
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        out = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight + self.bias
        return out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention softmax(QK^T / sqrt(d)) V: PyTorch's fused kernel, or the
    explicit matmuls and softmax under forward-mode AD and in ``twice_differentiable()``."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, query_rows: int | None = None) -> torch.Tensor:
        """Attend from every token, or only from the first ``query_rows`` tokens (all tokens
        still serve as keys and values); returns ``[B, query_rows or T, H]``."""
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        if query_rows is None:
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # one stack in backward, not three zero-filled selects
        else:
            q_weight, kv_weight = self.qkv.weight.split([width, 2 * width])
            q_bias, kv_bias = self.qkv.bias.split([width, 2 * width])
            q = F.linear(x[:, :query_rows], q_weight, q_bias)
            q = q.reshape(batch, query_rows, self.num_heads, head_dim).transpose(1, 2)
            kv = F.linear(x, kv_weight, kv_bias).reshape(batch, tokens, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
        if _fused_attention_allowed():
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax((q @ k.transpose(-2, -1)) * head_dim**-0.5, dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, q.shape[2], width)
        return self.proj(out)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-zero: shift/scale/gate from ``c``, gates start at 0."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, activation: str) -> None:
        super().__init__()
        self.norm1 = LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = LayerNorm(hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate=GELU_APPROXIMATION[activation]),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, query_rows: int | None = None) -> torch.Tensor:
        """``query_rows``: compute only the first rows' outputs (the others are unused)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        attended = self.attn(modulate(self.norm1(x), shift_a, scale_a), query_rows)
        x = (x if query_rows is None else x[:, :query_rows]) + gate_a[:, None] * attended
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class DiTBackbone(nn.Module):
    """Patch embedding, conditioning and the transformer blocks (shared by G and D)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.patch_embed = nn.Conv2d(config.in_channels, h, kernel_size=config.patch_size, stride=config.patch_size)
        self.register_buffer("pos_embed", _sincos_2d(h, config.image_size // config.patch_size)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(h, scale=config.time_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, h) if config.num_classes > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(h, config.num_heads, config.mlp_ratio, config.mlp_activation) for _ in range(config.depth)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        """Shape/dtype checks only (no data-dependent checks: must work under vmap/jvp)."""
        cfg = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != cfg.sample_shape:
            raise CAFMInputError(f"x must have shape (B, {', '.join(map(str, cfg.sample_shape))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise CAFMInputError(f"x must be floating point, got {x.dtype}")
        if t.shape != (x.shape[0],):
            raise CAFMInputError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if cfg.num_classes > 0:
            if y is None or y.shape != (x.shape[0],) or y.is_floating_point():
                got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise CAFMInputError(f"y must be int labels of shape ({x.shape[0]},) for a class-conditional model, got {got}")
        elif y is not None:
            raise CAFMInputError("this model is unconditional (num_classes=0): pass y=None")

    def conditioning(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        prefix: torch.Tensor | None = None,
        *,
        prefix_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return final hidden states ``[B, P + T, H]`` (``P`` prefix tokens) and ``c``.

        ``prefix_only``: the caller reads only the prefix tokens' final states, so the last
        block computes just those rows (``[B, P, H]``; the same values, exactly: a token's
        output in the last block depends on the others only as keys and values).
        """
        self.check_inputs(x, t, y)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        if prefix is not None:
            tokens = torch.cat([prefix, tokens], dim=1)
        elif prefix_only:
            raise CAFMInputError("prefix_only needs prefix tokens")
        c = self.conditioning(t, y)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, prefix.shape[1] if prefix_only and i == last else None)
        return tokens, c


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patch pixels (zero-initialised)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Generator ``u_theta(x_t, t, y)``: returns a velocity for either parameterisation."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DiTBackbone(config)
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.in_channels)

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        p, c, g = cfg.patch_size, cfg.in_channels, cfg.image_size // cfg.patch_size
        x = tokens.reshape(tokens.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(tokens.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        tokens, c = self.backbone(x, t, y)
        out = self.unpatchify(self.final_layer(tokens, c))
        if self.config.prediction == "x":
            return velocity_from_x_prediction(x, t, out, self.config.x_prediction_min_t)
        return out


class DiTDiscriminator(nn.Module):
    """``D_phi(x, t, y)``: the generator's backbone with a learned token prepended.

    The token's final hidden state goes through a LayerNorm and a linear head to one
    scalar per sample. Parameter names under ``backbone.`` match the generator's, so
    ``init_from_generator`` copies them; only ``token`` and the head are new.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DiTBackbone(config)
        self.token = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)
        self.head_norm = LayerNorm(config.hidden_size, affine=True)
        self.head = nn.Linear(config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        prefix = self.token.expand(x.shape[0], -1, -1).to(x.dtype)
        tokens, _ = self.backbone(x, t, y, prefix=prefix, prefix_only=True)
        return self.head(self.head_norm(tokens[:, 0])).squeeze(-1)
