"""How well predictive samples describe the truth, and the scales that calibrate them.

Samples are (n, K, T, N) fields, truth (n, T, N), in physical units. Each band's scale is a
split-conformal calibration on the validation runs: each value's score is its deviation from
the point prediction divided by the sample band's half-width on that side, and the scale is
the score quantile at the nominal level, so the scaled 90 % band covers 90 % of those runs'
values (normalised conformal prediction; values within a run are correlated, so the level
holds on average over runs, not as a per-value guarantee). Each band level gets its own
scale: the errors' tails are heavier than the samples', so one scale cannot fit the 50 %
and the 90 % band at once (benchmarks/accuracy/NOTES.md). The samples themselves are spread
by the factor that minimises their CRPS on those runs (`crps_scale`), or by the 90 % band's."""
from __future__ import annotations

import numpy as np

LEVELS = (0.5, 0.9)


def band(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` band of the samples over axis 1."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return lo, hi


def calibrated_band(samples: np.ndarray, centre: np.ndarray, level: float, scale: float = 1.0):
    """The samples' central `level` band, widened `scale` times about the point prediction."""
    lo, hi = band(samples, level)
    return centre + scale * (lo - centre), centre + scale * (hi - centre)


def coverage(samples: np.ndarray, truth: np.ndarray, level: float, centre: np.ndarray | None = None,
             scale: float = 1.0) -> float:
    lo, hi = band(samples, level) if centre is None else calibrated_band(samples, centre, level, scale)
    return float(((truth >= lo) & (truth <= hi)).mean())


def scale_about(samples: np.ndarray, centre: np.ndarray, scale) -> np.ndarray:
    """Samples spread `scale` times (a number, or per run (n, 1, ...)) as far from the point prediction `centre` (n, T, N)."""
    return centre[:, None] + scale * (samples - centre[:, None])


def band_scales(samples: np.ndarray, centre: np.ndarray, truth: np.ndarray) -> dict[float, float]:
    """The conformal scale of each of LEVELS."""
    return {level: spread_scale(samples, centre, truth, level) for level in LEVELS}


def spread_scale(samples: np.ndarray, centre: np.ndarray, truth: np.ndarray, level: float = 0.9) -> float:
    """The factor by which the samples' spread about `centre` must grow (or shrink) so that
    the central `level` band covers that fraction of the true values."""
    lo, hi = band(samples, level)
    dev = truth - centre
    width = np.where(dev >= 0, hi - centre, centre - lo)
    score = np.abs(dev) / np.maximum(width, 1e-12 * (np.abs(truth).max() + 1e-30))
    return float(np.quantile(score, level))


def _half_pair_distance(samples: np.ndarray) -> np.ndarray:
    """Per value, ½ E|X − X'| over the samples (axis 1), from the sorted samples in O(K log K)."""
    k = samples.shape[1]
    weights = (2 * np.arange(1, k + 1) - k - 1).reshape((1, k) + (1,) * (samples.ndim - 2))
    return (weights * np.sort(samples, axis=1)).sum(axis=1) / (k * k)


def crps(samples: np.ndarray, truth: np.ndarray) -> float:
    """Mean continuous ranked probability score of the sample distribution (physical units):
    E|X − y| − ½ E|X − X'|."""
    return float((np.abs(samples - truth[:, None]).mean(axis=1) - _half_pair_distance(samples)).mean())


def crps_scale(samples: np.ndarray, centre: np.ndarray, truth: np.ndarray, most: float) -> float:
    """The factor in (0, most] on the samples' spread about `centre` that minimises their mean
    CRPS. The CRPS is convex in it (a mean of |a + s·b| minus s times the fixed ½ E|X − X'|),
    so a bounded scalar search finds the minimum; at 0 the CRPS is the point prediction's MAE."""
    from scipy.optimize import minimize_scalar
    dev = samples - centre[:, None]
    miss = centre[:, None] - truth[:, None]
    pair = float(_half_pair_distance(dev).mean())
    found = minimize_scalar(lambda s: float(np.abs(miss + s * dev).mean()) - s * pair, bounds=(0.0, most),
                            method="bounded", options={"xatol": 1e-3 * most})
    return float(found.x)


def spread_and_error(samples: np.ndarray, centre: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run: the samples' spread (root of the summed variance) and the point prediction's
    error, both relative to the true field's norm."""
    n = len(truth)
    norm = np.linalg.norm(truth.reshape(n, -1), axis=1)
    spread = np.sqrt(samples.var(axis=1).reshape(n, -1).sum(axis=1)) / norm
    return spread, np.linalg.norm((centre - truth).reshape(n, -1), axis=1) / norm


def widen(samples: np.ndarray, centre: np.ndarray, difficulty: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Samples (n, K, ...) spread about the point prediction `centre` so that each run's relative
    spread (spread_and_error's) becomes √(s² + d²), s its own and d its `difficulty` (n,), then
    `scale` times that. The latents' posterior knows only how far a run lies from the training
    inputs; d adds what the training runs' leave-one-out errors say about that region
    (benchmarks/accuracy/NOTES.md, H19). A run without spread stays as it is."""
    spread, _ = spread_and_error(samples, centre, centre)
    gain = np.sqrt(1 + (difficulty / np.where(spread > 0, spread, 1.0)) ** 2) * (spread > 0) + (spread <= 0)
    return scale_about(samples, centre, (scale * gain).reshape(-1, *[1] * (samples.ndim - 1)))


def calibration_metrics(samples: np.ndarray, centre: np.ndarray, truth: np.ndarray,
                        band_scales: dict[float, float] | None = None) -> dict:
    """Coverage of the 50 % and 90 % bands (each widened about the point prediction by its
    `band_scales` entry, as prediction writes them), CRPS next to the point prediction's MAE
    (a useful spread has CRPS below it), the spread-skill ratio (mean sample std over the point
    prediction's RMSE) and the rank correlation of each run's spread with its error."""
    band_scales = band_scales or {}
    from scipy.stats import spearmanr
    n = len(truth)
    spread, error = spread_and_error(samples, centre, truth)
    rmse = float(np.sqrt(np.mean((centre - truth) ** 2)))
    out = {f"coverage_{int(level * 100)}": coverage(samples, truth, level, centre, band_scales.get(level, 1.0))
           for level in LEVELS}
    out.update({"crps": crps(samples, truth), "mae": float(np.mean(np.abs(centre - truth))),
                "spread_skill": float(np.sqrt(samples.var(axis=1).mean()) / max(rmse, 1e-30)),
                "spread_error_spearman": (float(spearmanr(spread, error).statistic)
                                          if n > 2 and np.ptp(spread) > 0 and np.ptp(error) > 0 else float("nan")),
                "runs": n, "samples": samples.shape[1]})
    return out
