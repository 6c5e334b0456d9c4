"""The hierarchical VAE (SPEC §4): encoder tower, NVAE-style decoder, the linear POD path
and the model, built from the blocks of modules/blocks.py.

Runs enter as x (B, N, T): mesh nodes are channels, time is the sequence axis, and T is
kept at every layer. `small` selects the lighter block variants of the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from modules.gaussian import Gaussian, kl_residual
from modules.layers import Architecture
from modules.blocks import (ConvBlock, DecoderResidualBlock, LatentToSequence, OutputTanh, PosteriorNet, PriorNet,
                            ResidualBlock, UpBlock, group_norm, he_init_and_spectral_norm)

# the networks' gains beside a freshly initialised linear POD path
NET_GAIN_INIT = 0.01
# -----------------------------------------------------------------------------
# encoder / decoder

class Encoder(nn.Module):
    def __init__(
        self,
        num_nodes: int,
        num_time: int,
        filters: Sequence[int],
        latent_dim_end: int,
        latent_dim: int,
        small: bool,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        channels = [num_nodes, *filters]
        self.latent_dim_end = latent_dim_end
        self.levels = nn.ModuleList(
            nn.Sequential(ConvBlock(a, b, small), ResidualBlock(b, small))
            for a, b in zip(channels[:-1], channels[1:])
        )
        # One Linear per level, as in the original. The last level's output was computed
        # and then thrown away there; forward() skips computing it (pure waste), but the
        # layer stays so the parameter count and state dict match the original network.
        self.xs_linear = nn.ModuleList(nn.Linear(f * num_time, latent_dim) for f in filters)
        self.head = nn.Linear(filters[-1] * num_time, 2 * latent_dim_end)
        he_init_and_spectral_norm(self, spectral)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """x (B, N, T) -> mu, log_var (B, Lend) and L-1 vectors (B, Ld), deepest first."""
        xs = []
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            x = level(x)  # (B, F_i, T)
            if i < last:
                xs.append(self.xs_linear[i](x.flatten(1)))  # (B, F_i*T) -> (B, Ld)
        mu, log_var = self.head(x.flatten(1)).chunk(2, dim=1)  # 2 x (B, Lend)
        xs.reverse()
        return mu, log_var, xs


class Decoder(nn.Module):
    """NVAE-style top-down decoder over D = reversed(filters).

    Level i (0 .. L-2): h = residual(up(D_i -> D_{i+1})(input)), input = start(z) for
    i = 0 and h_prev + z_prev after. Every level but the last then builds a prior from h,
    optionally a residual posterior from the hierarchical vector x_i, and draws z_i.

    As in the original, prior/posterior/xs nets are built for all L-1 levels, but the
    last level's are never used: the encoder hands over L-1 vectors and only the first
    L-2 are consumed (the last one, from encoder level 0, is saved but never decoded).
    The unused pieces are kept so shapes (saved latents (P, L-1, Ld)) and parameter
    counts match the original. They and encoder.xs_linear[0] and [-1] get no gradient;
    HierarchicalVAE freezes them (unused_parameters), so DDP waits for none of them.
    """

    def __init__(
        self,
        num_nodes: int,
        num_time: int,
        filters: Sequence[int],
        latent_dim_end: int,
        latent_dim: int,
        small: bool,
        output_norm: bool = True,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        d = list(reversed(filters))
        outs = d[1:]  # channels of level i = D_{i+1}
        self.num_levels = len(outs)  # L-1
        self.start = LatentToSequence(latent_dim_end, d[0], num_time)
        self.up_blocks = nn.ModuleList(UpBlock(a, b) for a, b in zip(d[:-1], outs))
        self.res_blocks = nn.ModuleList(DecoderResidualBlock(c, small) for c in outs)
        self.condition_z = nn.ModuleList(PriorNet(c, small) for c in outs)
        self.condition_xz = nn.ModuleList(PosteriorNet(c, small) for c in outs)
        self.xs_sequence = nn.ModuleList(LatentToSequence(latent_dim, c, num_time) for c in outs)
        # The original normalises the output with GroupNorm(N). That standardises each run's
        # nodes x time per group, so runs that differ mainly in amplitude (a load, a power)
        # all come out alike; output_norm=False drops it (see the `output_norm` key).
        norm = group_norm(num_nodes) if output_norm else nn.Identity()
        self.recon = nn.Sequential(nn.Conv1d(d[-1], num_nodes, 1), norm, OutputTanh())
        he_init_and_spectral_norm(self, spectral)

    def forward(
        self, z: Tensor, xs: Sequence[Tensor] | Tensor | None = None, mode: str = "random"
    ) -> tuple[Tensor, Tensor]:
        """z (B, Lend); xs: L-1 tensors (B, Ld) or one (B, L-1, Ld), or None to sample
        every level from its prior. Returns x_hat (B, N, T) and the summed level KL
        (fp32 scalar; zero without xs)."""
        if mode not in ("random", "fix"):
            raise ValueError(f"mode must be 'random' or 'fix', got {mode!r}")
        if torch.is_tensor(xs):
            xs = xs.unbind(1)  # L-1 x (B, Ld)
        kl = torch.zeros((), device=z.device, dtype=torch.float32)
        h = self.start(z)  # (B, D0, T)
        z_level = None
        last = self.num_levels - 1
        for i in range(self.num_levels):
            if z_level is not None:
                h = h + z_level  # (B, D_i, T)
            h = self.res_blocks[i](self.up_blocks[i](h))  # (B, D_{i+1}, T)
            if i == last:
                break
            prior_mu, prior_log_var = self.condition_z[i](h).chunk(2, dim=1)  # 2 x (B, D_{i+1}, T)
            if xs is None:
                dist = Gaussian(prior_mu, prior_log_var)
            else:
                x_hat_i = self.xs_sequence[i](xs[i])  # (B, D_{i+1}, T)
                delta = self.condition_xz[i](torch.cat([x_hat_i, h], dim=1))  # (B, 2*D_{i+1}, T)
                delta_mu, delta_log_var = delta.chunk(2, dim=1)
                kl = kl + kl_residual(delta_mu, delta_log_var, prior_log_var)
                dist = Gaussian(prior_mu + delta_mu, prior_log_var + delta_log_var)
            z_level = dist.draw(mode)
        return self.recon(h), kl  # (B, N, T)


class LinearPath(nn.Module):
    """A linear encoder/decoder pair beside the networks: x (B, N, T) → frame coefficients
    c = Bᵀx (B, k, T) → μ_lin = E·vec(c), and back z → vec(c) = D·z → x_lin = B·c.

    Started (`init_from_data`) as the proper orthogonal decomposition of the training runs,
    factored through the k leading frame modes B (N, k) so its size stays N·k + 2·k·T·L at
    any mesh size, the VAE begins as a POD of `latent` modes and its networks learn what
    a linear model misses. Without it, gradient descent spends thousands of steps finding
    the dominant linear structure that a POD gets exactly (benchmarks/accuracy/NOTES.md).
    Fixed (buffers) and not spectral-normalised: its scale is the data's.
    """

    def __init__(self, num_nodes: int, num_time: int, modes: int, latent: int) -> None:
        super().__init__()
        self.modes, self.num_time = modes, num_time
        # Buffers, not parameters: trained at the networks' learning rate the POD is lost within
        # a few epochs (0.0057 → 0.0175 test error on heat_inclusion); the networks learn the rest.
        self.register_buffer("frame", torch.zeros(num_nodes, modes))            # B (N, k)
        self.register_buffer("enc", torch.zeros(latent, modes * num_time))      # E (L, k·T)
        self.register_buffer("dec", torch.zeros(modes * num_time, latent))      # D (k·T, L)
        self.register_buffer("mean", torch.zeros(modes * num_time))             # m (k·T): coefficients' mean

    def encode(self, x: Tensor) -> Tensor:
        c = torch.einsum("bnt,nk->bkt", x, self.frame.to(x.dtype))              # (B, k, T)
        return (c.flatten(1) - self.mean.to(c.dtype)) @ self.enc.to(c.dtype).T  # (B, L)

    def decode(self, z: Tensor) -> Tensor:
        c = (z @ self.dec.to(z.dtype).T + self.mean.to(z.dtype)).view(z.shape[0], self.modes, self.num_time)
        return torch.einsum("bkt,nk->bnt", c, self.frame.to(c.dtype))           # (B, N, T)

    @torch.no_grad()
    def init_from_data(self, frame_basis: Tensor, chunks) -> None:
        """frame_basis (N, k') orthonormal columns; chunks: the scaled training runs as (B, N, T)
        tensors (streamed: only their (B, k·T) coefficients are kept).
        The run-level POD of the frame coefficients gives E = (V/std)ᵀ and D = V·std, so the
        latents start as POD coefficients, the leading one of unit variance."""
        k = min(frame_basis.shape[1], self.modes)
        self.frame.zero_()
        self.frame[:, :k] = frame_basis[:, :k]
        coeff = torch.cat([torch.einsum("pnt,nk->pkt", runs.double(), self.frame.double()).flatten(1)
                           for runs in chunks])                                                # (P, k·T)
        mean = coeff.mean(0)                   # ≈ 0 for centred fields; not for `field_scaling minmax`
        _, s, vt = torch.linalg.svd(coeff - mean, full_matrices=False)
        r = min(self.enc.shape[0], len(s))
        # one scale for all latents (the leading mode's std): their sizes keep the POD's energies,
        # so a loss on the latents weighs the modes as the field does
        std = (s[:1] / max(len(coeff) - 1, 1) ** 0.5).clamp_min(1e-12)                        # (1,)
        self.enc.zero_()
        self.dec.zero_()
        self.mean.copy_(mean.float())
        self.enc[:r] = (vt[:r] / std).float()
        self.dec[:, :r] = (vt[:r].T * std).float()


# -----------------------------------------------------------------------------
# the model

def _drop_inner_norms(model: nn.Module) -> None:
    """Replace every GroupNorm inside the blocks by the identity (the output norm follows
    `output_norm`). GroupNorm standardises each run on its own, so a run's amplitude
    reaches the next layer only through ratios between groups."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and parent is not model.decoder.recon:
                setattr(parent, name, nn.Identity())


class VAEOutput(NamedTuple):
    x_hat: Tensor  # (B, N, T)
    mu: Tensor  # (B, Lend)
    log_var: Tensor  # (B, Lend), clamped
    kl_main: Tensor  # fp32 scalar, batch mean
    kl_levels: Tensor  # fp32 scalar, batch mean, summed over consumed levels


@dataclass(frozen=True)
class VAEArchitecture(Architecture):
    """What fixes the VAE's shapes. Its checkpoint stores it (`stored()`), a resumed or reused
    VAE must agree on all of it, and `HierarchicalVAE(arch)` builds from it alone. The defaults
    of the later fields are what checkpoints written before them were built with."""
    num_nodes: int
    num_time: int
    filters: tuple[int, ...]             # the preset's encoder filters; the decoder reverses them
    latent_dim_end: int
    latent_dim: int
    small: bool = True
    output_norm: bool = True
    spectral_norm: bool = True
    norm: str = "group"                  # or "none"
    logvar_init: float = 0.0
    linear_modes: int = 0

    def build(self) -> HierarchicalVAE:
        return HierarchicalVAE(self)


class HierarchicalVAE(nn.Module):
    def __init__(self, arch: VAEArchitecture) -> None:
        super().__init__()
        filters = [int(f) for f in arch.filters]
        if len(filters) < 2:
            raise ValueError(f"need at least 2 encoder filters, got {filters}")
        self.arch = arch
        args = (arch.num_nodes, arch.num_time, filters, arch.latent_dim_end, arch.latent_dim, arch.small)
        self.encoder = Encoder(*args, spectral=arch.spectral_norm)
        self.decoder = Decoder(*args, output_norm=arch.output_norm, spectral=arch.spectral_norm)
        if arch.norm == "none":
            _drop_inner_norms(self)
        if arch.logvar_init:
            self._init_log_variances(arch.logvar_init)
        # the linear POD path (0: the original network alone); see LinearPath
        modes = arch.linear_modes
        self.linear = LinearPath(arch.num_nodes, arch.num_time, modes, arch.latent_dim_end) if modes else None
        # log-gains of the networks' μ and output beside the linear path (learned; gains 1 until
        # init_from_data). Logarithmic: a gain learned directly collapsed to 0 within a few Adam
        # steps, before the networks had learned anything it could pass on.
        self.net_log_gain = nn.Parameter(torch.zeros(2)) if modes else None
        self.num_levels = self.decoder.num_levels  # L-1 hierarchical vectors per run
        # The last hierarchical branch is built (for fidelity) but never used: frozen, so
        # neither AdamW nor DDP waits for gradients that never come.
        for p in self.unused_parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _init_log_variances(self, value: float) -> None:
        """Start the main posterior at variance e^value instead of 1. With unit variance the
        sampled noise drowns the few-% differences between runs early on, and the decoder first
        learns to ignore its latent (benchmarks/accuracy/NOTES.md). The level priors keep the
        original's start: a tight prior makes every level's KL (Δμ²/σp²) explode."""
        half = self.encoder.head.bias.shape[0] // 2
        self.encoder.head.bias[half:] = value             # [mu, log var]: the second half

    @torch.no_grad()
    def init_from_frame_basis(self, basis: Tensor) -> None:
        """Start the encoder's first 1×1 convolution as the projection onto `basis` (N, k),
        orthonormal columns (the leading POD modes of the training snapshots), and the
        decoder's last one as the expansion back. Orthonormal: σ = 1, so spectral norm leaves
        them unchanged. Only the first min(k, channels) channels are set."""
        first = self.encoder.levels[0][0][0]          # Conv1d(N -> F0, 1)
        last = self.decoder.recon[0]                  # Conv1d(D_last -> N, 1)
        k = min(basis.shape[1], first.out_channels, last.in_channels)
        for layer, weight in ((first, basis[:, :k].T), (last, basis[:, :k])):
            target = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") \
                else layer.weight
            rows, cols = weight.shape
            target[:rows, :cols, 0] = weight.to(target.dtype)
            if layer is first:
                target[k:] *= 1e-3            # the rest stays random but small: the basis dominates
            else:
                target[:, k:] *= 1e-3
            layer.bias.zero_()
        if parametrize.is_parametrized(first, "weight"):
            for layer in (first, last):       # re-estimate σ for the new weights
                was = layer.training
                layer.train()
                for _ in range(20):
                    layer.weight  # noqa: B018  (in train mode each read runs one power iteration)
                layer.train(was)

    @torch.no_grad()
    def init_from_data(self, frame_basis: Tensor, chunks) -> None:
        """Start the linear path as the POD of the training runs (`chunks` of (B, N, T)), with the networks' own
        contributions to μ and to the output scaled down (their gains; spectral norm would undo
        a scaling of the weights), so training starts from the POD."""
        self.linear.init_from_data(frame_basis, chunks)
        self.net_log_gain.fill_(math.log(NET_GAIN_INIT))

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        mu, log_var, xs = self.encoder(x)
        if self.linear is not None:
            mu = self.net_log_gain[0].exp() * mu + self.linear.encode(x)
        return mu, log_var, xs

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, T) -> mu, clamped log_var (B, Lend), xs (B, L-1, Ld)."""
        mu, log_var, xs = self._encode(x)
        return mu, Gaussian(mu, log_var).log_var, torch.stack(xs, dim=1)  # (B, L-1, Ld)

    def decode(
        self, z: Tensor, xs: Sequence[Tensor] | Tensor | None = None, mode: str = "random"
    ) -> tuple[Tensor, Tensor]:
        x_hat, kl = self.decoder(z, xs, mode)
        if self.linear is not None:
            x_hat = self.net_log_gain[1].exp() * x_hat + self.linear.decode(z)
        return x_hat, kl

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters no forward pass reaches, kept so the network matches the original:
        the encoder's first-level vector is never decoded and its last-level Linear never
        applied; the decoder's last level builds prior/posterior/xs nets it never runs."""
        last = self.decoder.num_levels - 1
        modules = (self.encoder.xs_linear[0], self.encoder.xs_linear[-1], self.decoder.condition_z[last],
                   self.decoder.condition_xz[last], self.decoder.xs_sequence[last])
        return [p for m in modules for p in m.parameters()]

    def forward(self, x: Tensor, mode: str = "random") -> VAEOutput:
        mu, log_var, xs = self._encode(x)
        posterior = Gaussian(mu, log_var)
        z = posterior.draw(mode)  # (B, Lend)
        x_hat, kl_levels = self.decode(z, xs, mode)
        return VAEOutput(x_hat, mu, posterior.log_var, posterior.kl_standard(), kl_levels)
