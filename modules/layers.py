"""Helpers both model families (modules/vae.py, modules/conditioners.py) build with."""
from __future__ import annotations

from torch import nn


def largest_divisor(c: int, cap: int) -> int:
    """The largest divisor of c that is not above cap (GroupNorm's group count)."""
    g = max(1, min(cap, c))
    while c % g:
        g -= 1
    return g


def he_init(root: nn.Module, types: tuple[type[nn.Module], ...]) -> None:
    """He (Kaiming-uniform, ReLU gain) weights and zero biases on every module of `types`,
    as the original initialised both its VAE and its conditioners. Call it before
    spectral norm, so the power iteration starts from the final weights."""
    for m in root.modules():
        if isinstance(m, types):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
