"""Latent conditioners (SPEC §5): run inputs -> (main latent, hierarchical latents).

Every conditioner maps its input to
    main         (B, latent_dim_end)
    hierarchical (B, num_levels, latent_dim)
with a Tanh at the end of each head, because the targets are min-max scaled to [-0.9, 0.9].

    csvs / csv  MLPConditioner  x (B, num_param)
    image       CNNConditioner  x (B, 1, H, W)
    image_vit   ViTConditioner  x (B, 1, H, W)

torchvision is imported only when a CNN is built: it costs about two seconds of start-up,
and CSV runs never need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from modules.config import INPUT_TYPES
from modules.errors import UserError
from modules.layers import Architecture, he_init, largest_divisor



@dataclass(frozen=True)
class ConditionerArchitecture(Architecture):
    """What fixes a conditioner's shapes. Its checkpoint stores it (`stored()`), a resumed
    stage must agree on all of it, and `build_conditioner` builds from it alone."""
    input_type: str                      # csvs, image or image_vit
    num_param: int
    latent_dim_end: int
    latent_dim: int
    num_levels: int
    filters: tuple[int, ...] = ()        # the preset's conditioner filters (networks)
    dropout_rate: float = 0.0            # CNN DropBlock / ViT dropout
    use_se: bool = True                  # CNN squeeze-excitation
    image_size: int = 256                # images are resized to this square side
    model: str = "network"               # or "gp": one Gaussian process per latent value (csvs)
    num_runs: int = 0                    # gp: the runs the posterior is conditioned on

    def build(self) -> nn.Module:
        return build_conditioner(self)


# -----------------------------------------------------------------------------
# scheduled dropout


class _ScheduledRate(nn.Module):
    """A dropout-like layer whose rate lives in a 0-dim float32 buffer `p`, next to the rate
    it was built with (`base`).

    Progressive dropout scales every such rate by one factor (`scale_dropout_rates`), so the
    layers keep their fixed ratios. A Python float would be baked into a captured CUDA graph
    and would make torch.compile recompile at every change; a buffer filled in place keeps one
    graph and one address. The buffer is not persistent: the schedule sets it, so checkpoints
    do not carry it.
    """

    p: Tensor

    def __init__(self, p: float) -> None:
        super().__init__()
        _check_rate(p)
        self.base = float(p)
        self.register_buffer("p", torch.tensor(float(p), dtype=torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3g}, base={self.base:.3g}"


class ScheduledDropout(_ScheduledRate):
    """Inverted dropout (elementwise) with a scheduled rate."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        # fp32 uniforms even under autocast: bf16 would quantise the keep probability
        keep = torch.rand(x.shape, device=x.device) >= self.p
        # clamp: p = 1 drops everything (0 / 1e-6 = 0) instead of producing 0 * inf = NaN
        scale = keep.to(torch.float32) / (1.0 - self.p).clamp_min(1e-6)
        return x * scale.to(x.dtype)


class ScheduledDropPath(_ScheduledRate):
    """Stochastic depth: drop a sample's whole residual branch with the scheduled rate."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p  # (B, 1, ...)
        return x * (keep.to(torch.float32) / (1.0 - self.p).clamp_min(1e-6)).to(x.dtype)


class ScheduledDropBlock2d(_ScheduledRate):
    """DropBlock (Ghiasi et al. 2018) with a scheduled rate.

    torchvision's DropBlock2d computes exactly this, but from a Python float (it branches on
    `p == 0` and passes `p` to bernoulli_), which a captured graph would freeze; this is its
    `drop_block2d` with the rate read from the buffer.
    """

    def __init__(self, p: float, block_size: int, eps: float = 1e-6) -> None:
        super().__init__(p)
        self.block_size, self.eps = block_size, eps

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        N, C, H, W = x.shape
        bs = min(self.block_size, W, H)
        gamma = (self.p * H * W) / ((bs ** 2) * ((H - bs + 1) * (W - bs + 1)))
        seeds = (torch.rand((N, C, H - bs + 1, W - bs + 1), device=x.device) < gamma).to(torch.float32)
        seeds = F.pad(seeds, [bs // 2] * 4, value=0.0)                        # (N, C, H', W')
        mask = 1.0 - F.max_pool2d(seeds, kernel_size=(bs, bs), stride=(1, 1), padding=bs // 2)  # (N, C, H, W)
        return x * (mask * (mask.numel() / (self.eps + mask.sum()))).to(x.dtype)


def _scheduled(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _ScheduledRate)]


def set_dropout_rate(model: nn.Module, p: float) -> None:
    """Set the rate of every scheduled dropout-like layer in `model` (wrappers included) to p."""
    _check_rate(p)
    for m in _scheduled(model):
        m.p.fill_(p)


def scale_dropout_rates(model: nn.Module, factor: float) -> None:
    """Set every scheduled layer's rate to its own base rate times `factor` (at most 1):
    progressive dropout keeps the fixed ratios between the layers."""
    if factor < 0:
        raise ValueError(f"dropout factor must be >= 0, got {factor}")
    for m in _scheduled(model):
        m.p.fill_(min(1.0, m.base * factor))


def _check_rate(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {p}")


# -----------------------------------------------------------------------------
# shared helpers

_WEIGHTED = (nn.Conv2d, nn.Linear)


def _he_init(root: nn.Module) -> None:
    """He init of every Conv2d/Linear: the original's trainer applied it to the whole conditioner."""
    he_init(root, _WEIGHTED)


def _apply_spectral_norm(layers: Sequence[nn.Module]) -> None:
    for m in layers:
        spectral_norm(m)


def _check_filters(filters: Sequence[int], minimum: int) -> list[int]:
    filters = [int(c) for c in filters]
    if len(filters) < minimum or any(c < 1 for c in filters):
        raise UserError(
            f"conditioner filter list {filters} needs at least {minimum} positive values: "
            "fix line 4 of the preset block in preset.txt"
        )
    return filters


class _TanhHead(nn.Sequential):
    """Dropout·Linear(in -> hidden)·GELU·Dropout·Linear(hidden -> out)·Tanh."""

    def __init__(self, c_in: int, hidden: int, c_out: int, p_in: float, p_mid: float) -> None:
        super().__init__(
            ScheduledDropout(p_in),
            nn.Linear(c_in, hidden),
            nn.GELU(),
            ScheduledDropout(p_mid),
            nn.Linear(hidden, c_out),
            nn.Tanh(),
        )


# -----------------------------------------------------------------------------
# MLP (csvs)


class MLPConditioner(nn.Module):
    """CSV parameters -> latents.

    Linear(num_param -> c0) with no activation, then Linear·LeakyReLU(0.2)·Dropout(0.1) up to
    c(m-2); the last filter value is never used, as in the original. Two heads with a
    32:1 bottleneck. The original used fixed dropout rates here, not the config's.
    """

    def __init__(self, arch: ConditionerArchitecture) -> None:
        super().__init__()
        c = _check_filters(arch.filters, 2)
        self.num_levels = arch.num_levels
        self.latent_dim = arch.latent_dim

        body: list[nn.Module] = [nn.Linear(arch.num_param, c[0])]
        for i in range(1, len(c) - 1):
            body += [nn.Linear(c[i - 1], c[i]), nn.LeakyReLU(0.2), ScheduledDropout(0.1)]
        self.body = nn.Sequential(*body)

        features = c[-2]
        hidden = max(8, features // 32)
        self.main_head = _TanhHead(features, hidden, arch.latent_dim_end, 0.2, 0.15)
        self.hier_head = _TanhHead(features, hidden, arch.num_levels * arch.latent_dim, 0.2, 0.15)
        _he_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)  # (B, c[m-2])
        main = self.main_head(h)  # (B, Lend)
        hier = self.hier_head(h).unflatten(1, (self.num_levels, self.latent_dim))  # (B, L, Ld)
        return main, hier


# -----------------------------------------------------------------------------
# CNN (image)

# DropBlock block size of the original; torchvision needs it odd and not above the map
_BLOCK_SIZE = 7
_SE_REDUCTION = 16


def _cnn_groups(c: int) -> int:
    """Largest divisor of c not above min(16, max(2, c // 2)) (the original's count)."""
    return largest_divisor(c, min(16, max(2, c // 2)))


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(_cnn_groups(c), c)


def _block_size(side: int) -> int:
    """Odd DropBlock size that fits a side x side feature map."""
    b = min(_BLOCK_SIZE, side)
    return b if b % 2 else b - 1


def _half(side: int) -> int:
    # output side of a stride-2 conv with "same" padding (7x7 p3, 3x3 p1 and 1x1 p0 alike)
    return (side + 1) // 2


class _ResidualBlock(nn.Module):
    """conv3x3·GN·SiLU·DropBlock·conv3x3·GN + shortcut, SiLU, optional squeeze-excitation."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, drop_p: float, block_size: int, use_se: bool
    ) -> None:
        super().__init__()
        from torchvision.ops import SqueezeExcitation

        self.residual = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            _gn(c_out),
            nn.SiLU(),
            ScheduledDropBlock2d(drop_p, block_size),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _gn(c_out),
        )
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _gn(c_out)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.SiLU()
        # torchvision's SE has biases (the original's had none): +c + c/16 parameters each
        self.se = (
            SqueezeExcitation(c_out, max(1, c_out // _SE_REDUCTION), activation=nn.SiLU)
            if use_se
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.se(self.act(self.residual(x) + self.shortcut(x)))


class CNNConditioner(nn.Module):
    """Greyscale image -> latents: ResNet stages, multi-scale fusion, two pathways.

    stem   conv7x7/2·GN·SiLU·DropBlock
    stages one per filter value, two residual blocks each; the first keeps resolution
    fusion every stage's pooled output projected to c_last/4 (1x1 conv·SiLU), concatenated
           with the pooled last stage, spectral-normalised Linear -> c_last·SiLU·Dropout
    paths  latent: SN Linear c_last -> c_last/2 -> c_last/4 -> Lend·Tanh
           hier:   SN Linear c_last -> c_last/2 -> c_last/2 -> L·Ld·Tanh

    `image_size` fixes the DropBlock block sizes (odd, at most 7, no larger than each map);
    other sizes still run as long as their maps are not smaller.
    """

    def __init__(self, arch: ConditionerArchitecture) -> None:
        super().__init__()
        c = _check_filters(arch.filters, 1)
        image_size, latent_dim_end, latent_dim = arch.image_size, arch.latent_dim_end, arch.latent_dim
        num_levels, dropout_rate, use_se = arch.num_levels, arch.dropout_rate, arch.use_se
        c_last = c[-1]
        if c_last < 4:
            raise UserError(
                f"the last conditioner filter ({c_last}) must be at least 4 for the image CNN: "
                "fix line 4 of the preset block in preset.txt"
            )
        self.num_levels = num_levels
        self.latent_dim = latent_dim

        side = _half(image_size)
        self.stem = nn.Sequential(
            nn.Conv2d(1, c[0], 7, stride=2, padding=3, bias=False),
            _gn(c[0]),
            nn.SiLU(),
            # the original kept the stem's DropBlock light for stability
            ScheduledDropBlock2d(max(0.01, dropout_rate / 10), _block_size(side)),
        )
        self._build_stages(c, side, dropout_rate, use_se)
        spectral = self._build_heads(c_last, len(c), latent_dim_end, num_levels * latent_dim, dropout_rate)
        _he_init(self)
        _apply_spectral_norm(spectral)

    def _build_stages(self, c: list[int], side: int, dropout_rate: float, use_se: bool) -> None:
        """Two residual blocks per filter value (stride 2 from the second on), each stage
        with a 1×1 projection of its pooled features to c_last/4 channels."""
        self.stages = nn.ModuleList()
        self.projections = nn.ModuleList()
        c_in = c[0]
        for i, c_out in enumerate(c):
            stride = 1 if i == 0 else 2
            if stride == 2:
                side = _half(side)
            bs = _block_size(side)
            self.stages.append(
                nn.Sequential(
                    _ResidualBlock(c_in, c_out, stride, dropout_rate, bs, use_se),
                    _ResidualBlock(c_out, c_out, 1, dropout_rate, bs, use_se),
                )
            )
            self.projections.append(nn.Conv2d(c_out, c[-1] // 4, 1))
            c_in = c_out

    def _build_heads(self, c_last: int, num_stages: int, main_out_dim: int, hier_out_dim: int,
                     dropout_rate: float) -> list[nn.Module]:
        """Fusion of the pooled features, then the main and hierarchical pathways and Tanh
        heads; returns the Linears that get spectral norm."""
        fused_in = c_last + (c_last // 4) * num_stages
        fuse = nn.Linear(fused_in, c_last)
        # the original wrote `dropout_rate // 2` and `// 3` (floor division: 0 for any rate
        # below 1); the port uses the halved / thirded rates it meant
        self.fusion = nn.Sequential(fuse, nn.SiLU(), ScheduledDropout(dropout_rate / 2))
        self.shared_dropout = ScheduledDropout(dropout_rate)

        enc = c_last // 2
        main_a, main_b = nn.Linear(c_last, enc), nn.Linear(enc, enc // 2)
        main_out = nn.Linear(enc // 2, main_out_dim)
        hier_a, hier_b = nn.Linear(c_last, enc), nn.Linear(enc, enc)
        hier_out = nn.Linear(enc, hier_out_dim)
        self.main_path = nn.Sequential(
            main_a, nn.SiLU(), ScheduledDropout(dropout_rate / 3), main_b, nn.SiLU()
        )
        self.hier_path = nn.Sequential(
            hier_a, nn.SiLU(), ScheduledDropout(dropout_rate / 3), hier_b, nn.SiLU()
        )
        self.main_head = nn.Sequential(main_out, nn.Tanh())
        self.hier_head = nn.Sequential(hier_out, nn.Tanh())
        return [fuse, main_a, main_b, main_out, hier_a, hier_b, hier_out]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem(x)  # (B, c0, H/2, W/2)
        pooled = []
        for stage, proj in zip(self.stages, self.projections):
            x = stage(x)  # (B, ci, h, w)
            pooled.append(F.silu(proj(x.mean((2, 3), keepdim=True))).flatten(1))  # (B, c_last/4)
        features = torch.cat([x.mean((2, 3))] + pooled, dim=1)  # (B, c_last + n·c_last/4)
        shared = self.shared_dropout(self.fusion(features))  # (B, c_last)
        main = self.main_head(self.main_path(shared))  # (B, Lend)
        hier = self.hier_head(self.hier_path(shared))  # (B, L·Ld)
        return main, hier.unflatten(1, (self.num_levels, self.latent_dim))  # (B, L, Ld)


# -----------------------------------------------------------------------------
# ViT (image_vit)

_PATCH = 16
_EMBED = 64
_DEPTH = 2
_HEADS = 4
_MLP_RATIO = 2
# attention-probability dropout of the original (fixed, not the config's rate)
_ATTN_DROPOUT = 0.3


class _Attention(nn.Module):
    """Multi-head self-attention on scaled_dot_product_attention, with the original's
    learned temperature (one scalar dividing the logits, clamped at 0.1)."""

    def __init__(self, dim: int, heads: int, dropout_rate: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.temperature = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = ScheduledDropout(_ATTN_DROPOUT)
        self.proj_drop = ScheduledDropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hs)
        q = q / self.temperature.clamp(min=0.1)
        if self.training:
            # written out: SDPA takes its dropout rate as a Python float, which a captured
            # graph would freeze and torch.compile would recompile for; this one is scheduled
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, N, N)
            y = self.attn_drop(attn.softmax(dim=-1)) @ v  # (B, nh, N, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(y))


class _TransformerBlock(nn.Module):
    """Pre-norm block: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio),
            nn.GELU(),
            ScheduledDropout(dropout_rate),
            nn.Linear(dim * mlp_ratio, dim),
            ScheduledDropout(dropout_rate),
        )
        # the original's stochastic-depth rate
        self.drop_path = ScheduledDropPath(0.5 * dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTConditioner(nn.Module):
    """Greyscale image -> latents with a two-layer ViT (16x16 patches, width 64).

    Linear patch embedding, learned position embedding, pre-norm transformer layers,
    final LayerNorm, mean over patches (no class token), two Tanh heads with an 8:1
    bottleneck. Built for one `image_size` (the position embedding has one row per patch).
    """

    def __init__(self, arch: ConditionerArchitecture) -> None:
        super().__init__()
        image_size, num_levels, latent_dim, dropout_rate = arch.image_size, arch.num_levels, arch.latent_dim, arch.dropout_rate
        if image_size % _PATCH:
            raise UserError(
                f"image size {image_size} is not a multiple of the ViT patch size {_PATCH}: "
                "use a multiple of 16 (the default is 256)"
            )
        self.num_levels = num_levels
        self.latent_dim = latent_dim
        self.grid = image_size // _PATCH

        self.patch_embed = nn.Linear(_PATCH * _PATCH, _EMBED)
        self.patch_drop = ScheduledDropout(dropout_rate)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, _EMBED))
        self.pos_drop = ScheduledDropout(dropout_rate)
        self.blocks = nn.Sequential(
            *[_TransformerBlock(_EMBED, _HEADS, _MLP_RATIO, dropout_rate) for _ in range(_DEPTH)]
        )
        self.norm = nn.LayerNorm(_EMBED)

        hidden = max(4, _EMBED // 8)
        self.main_head = _TanhHead(_EMBED, hidden, arch.latent_dim_end, 0.6, 0.5)
        self.hier_head = _TanhHead(_EMBED, hidden, num_levels * latent_dim, 0.6, 0.5)

        _he_init(self)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, C, H, W = x.shape
        p = _PATCH
        x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, p·p)
        x = self.patch_drop(self.patch_embed(x))  # (B, N, D)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(self.blocks(x))  # (B, N, D)
        h = x.mean(1)  # (B, D)
        main = self.main_head(h)  # (B, Lend)
        hier = self.hier_head(h).unflatten(1, (self.num_levels, self.latent_dim))  # (B, L, Ld)
        return main, hier


# -----------------------------------------------------------------------------
# registry

CONDITIONERS: dict[str, type[nn.Module]] = {
    "csvs": MLPConditioner,
    "csv": MLPConditioner,
    "image": CNNConditioner,
    "image_vit": ViTConditioner,
}
assert set(CONDITIONERS) == set(INPUT_TYPES)         # config.py lists them without importing torch


def build_conditioner(arch: ConditionerArchitecture) -> nn.Module:
    """The conditioner `arch` describes: a GP (`model gp`) or the network for its input_type."""
    if arch.model == "gp":
        from modules.gp import GPConditioner
        return GPConditioner(arch)
    if arch.input_type not in CONDITIONERS:
        raise UserError(f"unknown input_type {arch.input_type!r} in condition.txt: "
                        f"use one of {', '.join(sorted(CONDITIONERS))}")
    return CONDITIONERS[arch.input_type](arch)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CONDITIONERS",
    "CNNConditioner",
    "ConditionerArchitecture",
    "MLPConditioner",
    "ScheduledDropBlock2d",
    "ScheduledDropPath",
    "ScheduledDropout",
    "ViTConditioner",
    "build_conditioner",
    "count_parameters",
    "scale_dropout_rates",
    "set_dropout_rate",
]
