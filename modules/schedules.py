"""Training schedules as pure functions of the epoch (nothing stateful to checkpoint)."""
from __future__ import annotations

import math


def kl_weight(epoch: int, epochs: int, start: float, end: float,
              ramp_start: float = 0.3, ramp_end: float = 0.8) -> float:
    """β: `start` until `ramp_start`·epochs, linear to `end` at `ramp_end`·epochs, then `end`."""
    a, b = ramp_start * epochs, ramp_end * epochs
    if epoch < a:
        return start
    if epoch >= b or b <= a:
        return end
    return start + (end - start) * (epoch - a) / (b - a)


def cosine_warm_restarts(epoch: int, epochs: int, base_lr: float, t0: int = 0, t_mult: int = 2,
                         min_factor: float = 1e-4) -> float:
    """The LR CosineAnnealingWarmRestarts gives when stepped once per epoch.

    T_0 = t0 or epochs // 4 (at least 1); eta_min = base_lr · min_factor.
    """
    period = t0 if t0 > 0 else max(1, epochs // 4)
    t = epoch
    if t_mult == 1:
        t %= period
    else:
        while t >= period:
            t -= period
            period *= t_mult
    eta_min = base_lr * min_factor
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / period)) / 2


def cosine_decay(epoch: int, epochs: int, base_lr: float, min_factor: float = 1e-4) -> float:
    """One cosine from base_lr at the first epoch to base_lr·min_factor at the last."""
    progress = min(1.0, epoch / max(1, epochs - 1))
    eta_min = base_lr * min_factor
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine(epoch: int, epochs: int, base_lr: float, warmup: int = 10,
                  warmup_start: float = 0.01, lr_min: float = 1e-8) -> float:
    """Linear warm-up from warmup_start·lr over `warmup` epochs, then cosine down to lr_min."""
    if epoch < warmup:
        return base_lr * (warmup_start + (1 - warmup_start) * epoch / warmup)
    span = max(1, epochs - warmup)
    progress = min(1.0, (epoch - warmup) / span)
    return lr_min + (base_lr - lr_min) * (1 + math.cos(math.pi * progress)) / 2


def progressive_dropout(epoch: int, epochs: int, start: float = 0.3, end: float = 0.1) -> float:
    """Dropout rate moving linearly from `start` (first epoch) to `end` (last epoch)."""
    if epochs <= 1:
        return end
    return start + (end - start) * min(1.0, epoch / (epochs - 1))
