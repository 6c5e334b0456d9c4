"""Building blocks of the hierarchical VAE (SPEC §4): normalisation, initialisation and the
convolution, residual, up-sampling, latent-to-sequence and prior/posterior blocks that
modules/vae.py assembles into the encoder tower and the NVAE-style decoder. Every block
maps (B, C, T) to (B, C', T): time is the sequence axis and is kept at every layer."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from modules.layers import he_init, largest_divisor, spectral_norm

# residual branches are added with this weight (original value)
RESIDUAL_SCALE = 0.1
# channel expansion inside the decoder residual block
EXPANSION = 5


# -----------------------------------------------------------------------------
# helpers

def num_groups(c: int) -> int:
    """Largest divisor of c not above min(8, max(1, c // 4)).

    Equal to the original's group count wherever that divided c; the original crashed
    otherwise (e.g. c = 300 nodes gives 6 here, c = 1681 = 41^2 gives 1).
    """
    return largest_divisor(c, min(8, max(1, c // 4)))


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(c), c)


def conv_gn_gelu(c_in: int, c_out: int, kernel_size: int) -> list[nn.Module]:
    # odd kernels with "same" padding: the time axis never shrinks
    return [
        nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
        group_norm(c_out),
        nn.GELU(),
    ]


_WEIGHTED = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)


def he_init_and_spectral_norm(root: nn.Module, spectral: bool = True) -> None:
    """He (Kaiming-uniform) weights, zero biases, then spectral norm, on every Conv/Linear.

    Init comes first so the power-iteration vectors are seeded from the final weights.
    spectral_norm picks dim=1 for ConvTranspose1d by itself (its weight is (in, out, k)).
    The parametrization keeps the raw weight as `parametrizations.weight.original`, so
    parameter counts are those of the plain layers.
    """
    for m in list(root.modules()):  # list(): spectral_norm adds submodules while we walk
        if isinstance(m, _WEIGHTED):
            he_init(m, _WEIGHTED)        # layer by layer: the original's order of random draws
            if spectral:
                spectral_norm(m)


# -----------------------------------------------------------------------------
# blocks

class ConvBlock(nn.Sequential):
    """a -> b channels. small: 1x1 conv·GN·GELU; large adds 3x3 conv·GN·GELU."""

    def __init__(self, c_in: int, c_out: int, small: bool) -> None:
        layers = conv_gn_gelu(c_in, c_out, 1)
        if not small:
            layers += conv_gn_gelu(c_out, c_out, 3)
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """x + 0.1 f(x), f = [3-conv·GN·GELU] once (small) or twice (large).

    The original has two identical classes for this (encoder residual block and the
    residual block of the decoder's prior/posterior nets); one class serves both.
    """

    def __init__(self, c: int, small: bool) -> None:
        super().__init__()
        layers = conv_gn_gelu(c, c, 3)
        if not small:
            layers += conv_gn_gelu(c, c, 3)
        self.f = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + RESIDUAL_SCALE * self.f(x)


class DecoderResidualBlock(nn.Module):
    """x + 0.1 f(x) with a x5 channel expansion inside f."""

    def __init__(self, c: int, small: bool) -> None:
        super().__init__()
        wide = EXPANSION * c
        if small:
            layers = conv_gn_gelu(c, wide, 1) + conv_gn_gelu(wide, wide, 5)
        else:
            layers = (
                conv_gn_gelu(c, c, 1)
                + conv_gn_gelu(c, wide, 5)
                + conv_gn_gelu(wide, wide, 5)
            )
        layers += conv_gn_gelu(wide, c, 1)
        self.f = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + RESIDUAL_SCALE * self.f(x)


class OutputTanh(nn.Tanh):
    """Tanh computed in place, for the decoder's output only.

    Its input is always the fresh output of the GroupNorm (or the 1x1 conv) just before,
    which neither layer keeps for its backward, so overwriting it is safe (autograd would
    raise if it were not); it spares one (B, N, T) tensor per forward: 61 MiB at N = 20,000.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh_(x)


class UpBlock(nn.Sequential):
    """ConvTranspose1d(a, b, k=3, p=1)·GELU: changes channels, keeps T."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.ConvTranspose1d(c_in, c_out, 3, padding=1), nn.GELU())


class LatentToSequence(nn.Module):
    """Vector (B, d) -> Linear -> (B, d, T) -> 5-conv·GN·GELU -> (B, c, T).

    The decoder's start and its per-level hierarchical-vector nets.
    """

    def __init__(self, d: int, c_out: int, num_time: int) -> None:
        super().__init__()
        self.d, self.num_time = d, num_time
        self.linear = nn.Linear(d, d * num_time)
        self.conv = nn.Sequential(*conv_gn_gelu(d, c_out, 5))

    def forward(self, v: Tensor) -> Tensor:
        h = self.linear(v).view(v.shape[0], self.d, self.num_time)  # (B, d, T)
        return self.conv(h)  # (B, c, T)


class PriorNet(nn.Sequential):
    """h (B, c, T) -> (B, 2c, T) = [mu_p, log var_p]: residual·GELU·3-conv."""

    def __init__(self, c: int, small: bool) -> None:
        super().__init__(ResidualBlock(c, small), nn.GELU(), nn.Conv1d(c, 2 * c, 3, padding=1))


class PosteriorNet(nn.Sequential):
    """[x_hat, h] (B, 2c, T) -> (B, 2c, T) = [delta mu, delta log var]."""

    def __init__(self, c: int, small: bool) -> None:
        super().__init__(
            ResidualBlock(2 * c, small), nn.GELU(), nn.Conv1d(2 * c, 2 * c, 3, padding=1)
        )
