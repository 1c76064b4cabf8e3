"""Conditioning embeddings shared by the model families: time and class label."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, scale: float, max_period: float = 10000.0) -> torch.Tensor:
    """Sin/cos features of ``scale * t`` at geometrically spaced frequencies ([B] -> [B, dim]).

    ``scale`` sets how fast the features vary in ``t``: DiT uses ``t * 1000``; a smaller
    scale gives a time embedding smoother in ``t``, which matters for CAFM because the
    discriminator's logit contains ``dD/dt``.
    """
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # at least fp32; fp64 stays fp64
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = (scale * t.to(dtype))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar time ``t in [0, 1]`` -> hidden vector (sinusoidal features, then a 2-layer MLP)."""

    def __init__(self, hidden_size: int, *, scale: float, frequency_dim: int = 256) -> None:
        super().__init__()
        self.scale = scale
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim, scale=self.scale)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> hidden vector; index ``num_classes`` is the null class used for CFG.

    Label dropout is done by the training step (``cafm_core.path.drop_labels``), so this
    module is a plain table lookup.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)
