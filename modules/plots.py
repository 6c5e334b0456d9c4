"""Figures (`--plot`): 0 shows them, 1 saves PNGs in the run folder, 2 makes none.

matplotlib is imported only when a figure is made. On a machine without a display,
`--plot=0` warns once and saves the figures instead.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("simulgen")

SHOW, SAVE, NONE = 0, 1, 2


class Figures:
    def __init__(self, mode: int, run_dir: Path, enabled: bool = True):
        self.mode = mode if enabled else NONE
        self.run_dir = run_dir
        self.saved: list[Path] = []
        self._plt = None
        if self.mode == SHOW and not _has_display():
            log.warning("--plot=0 asks to show figures, but this machine has no display; saving them to %s instead", run_dir)
            self.mode = SAVE

    @property
    def active(self) -> bool:
        return self.mode != NONE

    @property
    def plt(self):
        if self._plt is None:
            import matplotlib
            if self.mode == SAVE:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            self._plt = plt
        return self._plt

    def finish(self, fig, name: str) -> None:
        if self.mode == SAVE:
            from modules.checkpoint import atomic_write
            path = self.run_dir / f"{name}.png"
            try:      # a crash mid-save leaves the earlier figure (or none), never half a PNG
                atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
            finally:
                self.plt.close(fig)
            self.saved.append(path)
        else:
            self.plt.show()

    # --- the figures ------------------------------------------------------------------
    def losses(self, history: dict[str, list[float]], name: str, title: str) -> None:
        if not self.active or not history.get("epoch"):
            return
        fig, ax = self.plt.subplots(figsize=(7, 4))
        epochs = np.asarray(history["epoch"]) + 1
        for key, values in sorted(history.items()):
            if key == "epoch" or not (key.startswith("train_") or key.startswith("val_")):
                continue
            v = np.asarray(values, dtype=float)
            ok = np.isfinite(v) & (v > 0)
            if ok.any():
                ax.plot(epochs[ok], v[ok], label=key, marker="." if key.startswith("val_") else None)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        self.finish(fig, name)

    def traces(self, true: np.ndarray, other: np.ndarray, run: int, name: str, label: str) -> None:
        """Nodal traces (value over time at a few nodes) and temporal snapshots (over nodes
        at a few times) of one run; `true` and `other` are (T, N) in physical units."""
        if not self.active:
            return
        T, N = true.shape
        fig, (ax_t, ax_n) = self.plt.subplots(1, 2, figsize=(11, 4))
        for j, node in enumerate(np.linspace(0, N - 1, 4).astype(int)):
            ax_t.plot(true[:, node], color=f"C{j}", label=f"node {node}")
            ax_t.plot(other[:, node], color=f"C{j}", linestyle="--")
        ax_t.set_xlabel("time step")
        ax_t.set_title(f"run {run}: nodal traces (solid true, dashed {label})")
        ax_t.legend(fontsize=7)
        for j, step in enumerate(np.linspace(0, T - 1, 3).astype(int)):
            ax_n.plot(true[step], color=f"C{j}", label=f"t = {step}")
            ax_n.plot(other[step], color=f"C{j}", linestyle="--")
        ax_n.set_xlabel("node")
        ax_n.set_title("snapshots over the nodes")
        ax_n.legend(fontsize=7)
        self.finish(fig, name)

    def latents(self, pred: np.ndarray, true: np.ndarray, name: str) -> None:
        """Predicted vs true (scaled) latents of the validation runs."""
        if not self.active:
            return
        fig, ax = self.plt.subplots(figsize=(5, 5))
        ax.scatter(true.ravel(), pred.ravel(), s=4, alpha=0.5)
        lim = [min(true.min(), pred.min()), max(true.max(), pred.max())]
        ax.plot(lim, lim, color="k", linewidth=0.8)
        ax.set_xlabel("true latent (scaled)")
        ax.set_ylabel("predicted latent (scaled)")
        ax.set_title("conditioner on the validation runs")
        self.finish(fig, name)


def _has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
