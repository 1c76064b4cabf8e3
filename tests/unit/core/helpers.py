"""Small shared builders for unit tests."""

import torch

from cafm_core.models import MLPConfig, build_generator, discriminator_from_generator, dit_config


def perturbed(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised gates and heads are non-trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def tiny_dit_pair(num_classes: int = 10, dtype=torch.float64, **overrides):
    config = dit_config("tiny", num_classes=num_classes, depth=2, **overrides)
    generator = perturbed(build_generator(config)).to(dtype)
    discriminator = perturbed(discriminator_from_generator(generator)).to(dtype)
    return config, generator, discriminator


def mlp_pair(num_classes: int = 0, dtype=torch.float64):
    config = MLPConfig(data_dim=2, hidden_size=32, depth=3, num_classes=num_classes)
    generator = perturbed(build_generator(config)).to(dtype)
    discriminator = perturbed(discriminator_from_generator(generator)).to(dtype)
    return config, generator, discriminator


def image_batch(batch: int = 4, num_classes: int = 10, dtype=torch.float64):
    x = torch.randn(batch, 1, 8, 8, dtype=dtype)
    t = torch.rand(batch, dtype=dtype) * 0.9 + 0.05
    y = torch.randint(0, num_classes, (batch,)) if num_classes else None
    return x, t, y
