"""Is a new input inside what the surrogate was trained on?

Two checks on CSV parameter rows, or on the features of pictures the GP conditioner reads
(modules/cond_inputs.py, ImageFeatures), both in the conditioner's scaled input space (each
column min-max scaled by the training runs):
  range     a column outside the training runs' [min, max];
  distance  the distance to the nearest training run, against the training runs' own
            nearest-neighbour distances (each run to the others): a row farther from every
            training run than any training run is from its nearest neighbour lies in a gap
            or beyond the data, even when each column is in range (a corner of the box that
            no run sampled).
A surrogate extrapolates there; the GP conditioner's predictive spread grows with the
distance (README, "Uncertainty")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_LISTED = 5          # rows named one by one in the warning; the rest are counted


def _nearest(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


@dataclass(frozen=True)
class InputDomain:
    low: np.ndarray             # (d,) training minimum per column (raw units)
    high: np.ndarray            # (d,) training maximum
    runs: np.ndarray | None     # (P, d) the training inputs (raw units); None: the range check only

    def _scaled(self, x: np.ndarray) -> np.ndarray:
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return (x - self.low) / span

    def threshold(self) -> float | None:
        """The largest nearest-neighbour distance among the training runs (scaled units)."""
        if self.runs is None or len(self.runs) < 2:
            return None
        runs = self._scaled(self.runs)
        return float(_nearest(runs, runs, exclude_self=True).max())

    def check(self, raw: np.ndarray) -> dict:
        """Per row: columns outside the training range, and the nearest training run's distance
        relative to the threshold (> 1: farther than any training run from its neighbours)."""
        raw = np.asarray(raw, np.float64)
        span = np.maximum(self.high - self.low, 1e-12 * np.maximum(np.abs(self.high), 1.0))
        tol = 1e-9 * span
        outside = (raw < self.low - tol) | (raw > self.high + tol)
        result = {"outside_columns": [np.flatnonzero(row).tolist() for row in outside]}
        limit = self.threshold()
        if limit is not None and limit > 0:
            ratio = _nearest(self._scaled(raw), self._scaled(self.runs)) / limit
            result["nearest_run_ratio"] = ratio.tolist()
            far = ratio > 1.0
        else:
            far = np.zeros(len(raw), bool)
        result["out_of_domain"] = (outside.any(axis=1) | far).tolist()
        return result

    def warning(self, raw: np.ndarray, result: dict, source: str, rows: list[str] | None = None,
                columns: list[str] | None = None) -> str | None:
        """One line naming the flagged inputs and columns, or None. By default inputs are CSV rows
        and columns numbered from 1, as in the file; pictures pass their file names (`rows`)
        and feature names (`columns`)."""
        flagged = np.flatnonzero(result["out_of_domain"])
        if not len(flagged):
            return None
        rows = rows or [f"row {i + 1}" for i in range(len(raw))]
        columns = columns or [f"column {c + 1}" for c in range(raw.shape[1])]
        parts = []
        for i in flagged[:MAX_LISTED]:
            cols = result["outside_columns"][i]
            if cols:
                c = cols[0]
                parts.append(f"{rows[i]} {columns[c]} = {raw[i, c]:.6g} outside the training range "
                             f"[{self.low[c]:.6g}, {self.high[c]:.6g}]" + (f" (+{len(cols) - 1} more columns)" if len(cols) > 1 else ""))
            else:
                parts.append(f"{rows[i]} is {result['nearest_run_ratio'][i]:.2f}× farther from every training run "
                             f"than the training runs are from each other")
        more = f"; and {len(flagged) - MAX_LISTED} more" if len(flagged) > MAX_LISTED else ""
        return (f"{len(flagged)} of {len(raw)} inputs in {source} lie outside the training data, so the surrogate "
                f"extrapolates there ({'; '.join(parts)}{more}); see 'out_of_domain' in the prediction's JSON.")
