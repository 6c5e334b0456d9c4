"""Batched, on-device augmentations (training batches only, never validation).

Each augmentation is decided per sample with a Bernoulli mask and applied with tensor
ops over the whole batch: no Python loop over samples and no host synchronisation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from modules.config import AugmentConfig, ConditionerConfig


@dataclass(frozen=True)
class SeriesAugmentation:
    """Augmentations of time series laid out [B, N, T] (nodes are channels)."""
    noise_prob: float = 0.2
    noise_level: float = 0.03
    scale_prob: float = 0.1
    scale_min: float = 0.9
    scale_max: float = 1.1
    shift_prob: float = 0.0
    shift_max: float = 0.1
    mixup_prob: float = 0.2
    mixup_alpha: float = 0.2
    cutout_prob: float = 0.0
    cutout_max: float = 0.1
    mixup_lambda_min: float = 0.1       # λ (the weight of the run itself) is clipped to this range
    mixup_lambda_max: float = 0.9

    @classmethod
    def from_config(cls, aug: AugmentConfig) -> SeriesAugmentation:
        """Each field from the config key of the same name with `aug_` in front (by name, so
        no two values can be swapped)."""
        return cls(**{f.name: getattr(aug, "aug_" + f.name) for f in dataclasses.fields(cls)})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return self._chosen_rows(x)
        return self._masked(x)

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Every augmentation computed for the whole batch, kept where a mask says so: no
        host synchronisation, which is what an accelerator wants."""
        B, _, T = x.shape                                   # (B, N, T)
        dev, dt = x.device, x.dtype

        def chosen(p: float) -> torch.Tensor:               # (B, 1, 1) boolean mask
            return (torch.rand(B, 1, 1, device=dev) < p)

        if self.mixup_prob > 0:
            partner = x[torch.randperm(B, device=dev)]
            lam = self._mixup_weights(B, dev, dt)
            x = torch.where(chosen(self.mixup_prob), lam * x + (1 - lam) * partner, x)
        if self.scale_prob > 0:
            factor = torch.empty(B, 1, 1, device=dev, dtype=dt).uniform_(self.scale_min, self.scale_max)
            x = torch.where(chosen(self.scale_prob), x * factor, x)
        if self.shift_prob > 0 and self.shift_max > 0:
            shift = self._shifts(B, T, dev)
            shift = torch.where(chosen(self.shift_prob), shift, torch.zeros_like(shift))
            x = _roll(x, shift)
        if self.cutout_prob > 0 and self.cutout_max > 0:
            window = self._cutout_windows(B, T, dev) & chosen(self.cutout_prob)
            x = x.masked_fill(window, 0.0)
        if self.noise_prob > 0:
            x = torch.where(chosen(self.noise_prob), x + self.noise_level * torch.randn_like(x), x)
        return x

    def _chosen_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The same augmentations, computed only for the samples they were drawn for.

        On the CPU a host sync costs nothing, while each whole-batch pass costs a memory
        sweep (64 MB per pass at N = 20,000 nodes): with p = 0.2 most of that work was
        thrown away by the mask. The random draws are those of `_masked`, in the same
        order, so the chosen samples, partners, factors, shifts and windows are identical;
        only the Gaussian noise is drawn for the chosen samples alone, from the same
        distribution (its random stream therefore differs from `_masked`'s).
        """
        B, _, T = x.shape                                   # (B, N, T)
        dt = x.dtype
        out = x.clone()                                     # never write the caller's batch

        def rows(p: float) -> torch.Tensor:                 # indices of the chosen samples
            return torch.nonzero(torch.rand(B, 1, 1) < p)[:, 0]

        if self.mixup_prob > 0:
            perm = torch.randperm(B)
            lam = self._mixup_weights(B, x.device, dt)
            r = rows(self.mixup_prob)
            if len(r):
                out[r] = lam[r] * x[r] + (1 - lam[r]) * x[perm[r]]
        if self.scale_prob > 0:
            factor = torch.empty(B, 1, 1, dtype=dt).uniform_(self.scale_min, self.scale_max)
            r = rows(self.scale_prob)
            if len(r):
                out[r] = out[r] * factor[r]
        if self.shift_prob > 0 and self.shift_max > 0:
            shift = self._shifts(B, T, x.device)
            r = rows(self.shift_prob)
            if len(r):
                out[r] = _roll(out[r], shift[r])
        if self.cutout_prob > 0 and self.cutout_max > 0:
            window = self._cutout_windows(B, T, x.device)
            r = rows(self.cutout_prob)
            if len(r):
                out[r] = out[r].masked_fill(window[r], 0.0)
        if self.noise_prob > 0:
            r = rows(self.noise_prob)
            if len(r):
                sub = out[r]
                out[r] = sub + self.noise_level * torch.randn_like(sub)
        return out

    # the random draws both paths share (same calls, same order)
    def _mixup_weights(self, B: int, dev, dt) -> torch.Tensor:
        beta = torch.distributions.Beta(torch.tensor(self.mixup_alpha, device=dev),
                                        torch.tensor(self.mixup_alpha, device=dev))
        return beta.sample((B, 1, 1)).clamp_(self.mixup_lambda_min, self.mixup_lambda_max).to(dt)   # (B, 1, 1)

    def _shifts(self, B: int, T: int, dev) -> torch.Tensor:
        largest = max(1, int(self.shift_max * T))          # at least one step when switched on
        return torch.randint(-largest, largest + 1, (B, 1, 1), device=dev)

    def _cutout_windows(self, B: int, T: int, dev) -> torch.Tensor:
        longest = max(1, int(self.cutout_max * T))
        length = torch.randint(1, longest + 1, (B, 1, 1), device=dev)
        start = (torch.rand(B, 1, 1, device=dev) * (T - length + 1)).long()
        steps = torch.arange(T, device=dev).view(1, 1, T)
        return (steps >= start) & (steps < start + length)  # (B, 1, T)


def stretch_copy(x: torch.Tensor, generator: torch.Generator, noise_level: float = 0.03,
                 shift_max: float = 0.1) -> torch.Tensor:
    """The `Stretch 1` copy of runs [B, N, T]: fixed noise (std `noise_level`) and a fixed time
    roll (up to `shift_max` of the steps) per run; keys stretch_noise_level / stretch_shift_max."""
    B, _, T = x.shape
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)
    largest = max(1, int(shift_max * T)) if shift_max > 0 else 0     # shift_max 0: no shift at all
    shift = torch.randint(-largest, largest + 1, (B, 1, 1), generator=generator).to(x.device)
    return _roll(x, shift) + noise_level * noise


def _roll(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Roll each run of x (B, N, T) in time by its own number of steps, shift (B, 1, 1)."""
    T = x.shape[-1]
    steps = torch.arange(T, device=x.device).view(1, 1, T)
    return torch.gather(x, 2, ((steps - shift) % T).expand_as(x))


@dataclass(frozen=True)
class ConditionerAugmentation:
    """Mixup and input noise for (input, main target, hierarchical target) batches, plus
    outline-safe image augmentation (horizontal flip, ±1-pixel shifts) for images."""
    mixup_prob: float = 0.15
    mixup_alpha: float = 0.2
    noise_prob: float = 0.1
    noise: float = 0.01
    image_prob: float = 0.8
    flip_prob: float = 0.5

    @classmethod
    def from_config(cls, cond: ConditionerConfig) -> ConditionerAugmentation:
        return cls(mixup_prob=cond.lc_mixup_prob, mixup_alpha=cond.lc_mixup_alpha, noise_prob=cond.lc_input_noise_prob,
                   noise=cond.lc_input_noise, image_prob=cond.lc_image_aug_prob, flip_prob=cond.lc_flip_prob)

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, *targets = batch
        B, dev = x.shape[0], x.device
        if x.dim() == 4 and self.image_prob > 0:
            x = _outline_safe(x, self.image_prob, self.flip_prob)
        if self.mixup_prob > 0 and B > 1:
            perm = torch.randperm(B, device=dev)
            beta = torch.distributions.Beta(torch.tensor(self.mixup_alpha, device=dev),
                                            torch.tensor(self.mixup_alpha, device=dev))
            lam = beta.sample((B,))
            mix = torch.rand(B, device=dev) < self.mixup_prob
            lam = torch.where(mix, lam, torch.ones_like(lam))

            def blend(t: torch.Tensor) -> torch.Tensor:
                w = lam.view(B, *([1] * (t.dim() - 1))).to(t.dtype)
                return w * t + (1 - w) * t[perm]

            x = blend(x)
            targets = [blend(t) for t in targets]
        if self.noise_prob > 0:
            chosen = (torch.rand(B, device=dev) < self.noise_prob).view(B, *([1] * (x.dim() - 1)))
            x = torch.where(chosen, x + self.noise * torch.randn_like(x), x)
        return (x, *targets)


def _outline_safe(x: torch.Tensor, prob: float, flip_prob: float) -> torch.Tensor:
    """Per image: with `prob`, flip horizontally (with `flip_prob`) and shift by -1..1 px in y and x."""
    B, _, H, W = x.shape                                     # (B, 1, H, W)
    dev = x.device
    active = torch.rand(B, device=dev) < prob
    flip = (torch.rand(B, device=dev) < flip_prob) & active
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    dy = torch.randint(-1, 2, (B,), device=dev) * active
    dx = torch.randint(-1, 2, (B,), device=dev) * active
    rows = (torch.arange(H, device=dev).view(1, H) - dy.view(B, 1)).clamp_(0, H - 1)   # (B, H)
    cols = (torch.arange(W, device=dev).view(1, W) - dx.view(B, 1)).clamp_(0, W - 1)   # (B, W)
    x = torch.gather(x, 2, rows.view(B, 1, H, 1).expand(B, 1, H, W))
    return torch.gather(x, 3, cols.view(B, 1, 1, W).expand(B, 1, H, W))
