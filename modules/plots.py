"""Figures (`--plot`): 0 shows them, 1 saves PNGs in the run folder, 2 makes none.

matplotlib is imported only when a figure is made. On a machine without a display,
`--plot=0` warns once and saves the figures instead. When a `mesh.vtu` lies beside the
dataset (`--import_runs` writes it), snapshots are drawn as fields on the mesh.
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
    def __init__(self, mode: int, run_dir: Path, enabled: bool = True, dataset: Path | None = None):
        self.mode = mode if enabled else NONE
        self.run_dir = run_dir
        self.saved: list[Path] = []
        self._plt = None
        self.dataset = dataset          # mesh.vtu beside it turns snapshots into fields on the mesh
        self._mesh = False              # not looked up yet
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
        mesh = self.mesh(true.shape[1])
        if mesh is not None:
            self.on_mesh(mesh, true, other, run, name, label)
            name = f"{name}_traces"
        T, N = true.shape
        fig, (ax_t, ax_n) = self.plt.subplots(1, 2, figsize=(11, 4))
        for j, node in enumerate(np.linspace(0, N - 1, 4).astype(int)):
            ax_t.plot(true[:, node], color=f"C{j}", label=f"node {node}")
            ax_t.plot(other[:, node], color=f"C{j}", linestyle="--")
        ax_t.set_xlabel("time step")
        ax_t.set_title(f"run {run + 1}: nodal traces (solid true, dashed {label})")
        ax_t.legend(fontsize=7)
        for j, step in enumerate(np.linspace(0, T - 1, 3).astype(int)):
            ax_n.plot(true[step], color=f"C{j}", label=f"t = {step}")
            ax_n.plot(other[step], color=f"C{j}", linestyle="--")
        ax_n.set_xlabel("node")
        ax_n.set_title("snapshots over the nodes")
        ax_n.legend(fontsize=7)
        self.finish(fig, name)

    def mesh(self, nodes: int):
        """The dataset's mesh when it fits `nodes` values per step, else None (node-index plots)."""
        from modules.mesh_io import plane_coordinates, surface_triangles
        if self._mesh is False:
            from modules.errors import UserError
            from modules.mesh_io import load_dataset_mesh
            try:            # a figure is not worth a failed training run: fall back to node-index plots
                self._mesh = load_dataset_mesh(self.dataset) if self.dataset is not None else None
            except UserError as exc:
                log.warning("%s; figures plot over the node index", exc)
                self._mesh = None
            if self._mesh is not None:      # once: a volume mesh's boundary search is not free
                self._triangles = surface_triangles(self._mesh.cells)
        mesh = self._mesh
        if mesh is not None and not len(self._triangles) and plane_coordinates(mesh.points) is None:
            log.warning("%s has no surface or volume cells to draw; figures plot over the node index", mesh.path)
            self._mesh = mesh = None
        if mesh is not None and nodes < mesh.nodes:
            log.warning("%s has %d nodes but the data %d (Dim3_red?); figures plot over the node index", mesh.path,
                        mesh.nodes, nodes)
            self._mesh = mesh = None
        return mesh

    def on_mesh(self, mesh, true: np.ndarray, other: np.ndarray, run: int, name: str, label: str,
                steps: int = 3) -> None:
        """True / `label` / error of one run's first field on the mesh at a few times; rows are
        times, with a colour bar for the values (shared by true and `label`) and one for the error."""
        from modules.mesh_io import plane_coordinates
        plt = self.plt
        T = true.shape[0]
        field = mesh.fields[0]
        true, other = true[:, :mesh.nodes], other[:, :mesh.nodes]              # (T, N) of the first field
        triangles = self._triangles
        xy = plane_coordinates(mesh.points)
        times = np.unique(np.linspace(0, T - 1, steps).astype(int))
        fig = plt.figure(figsize=(13, 3.6 * len(times)))
        norm = plt.Normalize(float(min(true[times].min(), other[times].min())),
                             float(max(true[times].max(), other[times].max())))
        err = other[times] - true[times]
        lim = float(np.abs(err).max()) or 1.0
        err_norm = plt.Normalize(-lim, lim)
        for r, step in enumerate(times):
            when = f"t = {mesh.times[step]:g}" if mesh.times and len(mesh.times) > step else f"step {step}"
            panels = [(true[step], norm, "viridis", f"true {field}, {when}"),
                      (other[step], norm, "viridis", f"{label}, {when}"),
                      (other[step] - true[step], err_norm, "coolwarm", f"{label} − true")]
            for c, (values, nrm, cmap, title) in enumerate(panels):
                if xy is not None:
                    ax = fig.add_subplot(len(times), 3, 3 * r + c + 1)
                    tri = (triangles,) if len(triangles) else ()       # no 2-D cells: Delaunay of the nodes
                    ax.tripcolor(xy[:, 0], xy[:, 1], *tri, values, shading="gouraud", cmap=cmap, norm=nrm)
                    ax.set_aspect("equal")
                else:       # a 3-D mesh: its boundary surface, coloured by the faces' mean values
                    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
                    ax = fig.add_subplot(len(times), 3, 3 * r + c + 1, projection="3d")
                    colours = plt.get_cmap(cmap)(nrm(values[triangles].mean(axis=1)))
                    ax.add_collection3d(Poly3DCollection(mesh.points[triangles], facecolors=colours, linewidths=0))
                    lo, hi = mesh.points.min(0), mesh.points.max(0)
                    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), zlim=(lo[2], hi[2]))
                    ax.set_box_aspect(np.maximum(hi - lo, 1e-9 * (hi - lo).max()))
                ax.set_title(title, fontsize=9)
                ax.tick_params(labelsize=7)
                fig.colorbar(plt.cm.ScalarMappable(norm=nrm, cmap=cmap), ax=ax, shrink=0.8)
        fig.suptitle(f"run {run + 1} on {mesh.path.name}: true, {label} and error")
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


    def curve(self, values: np.ndarray, name: str, xlabel: str, ylabel: str) -> None:
        if not self.active:
            return
        fig, ax = self.plt.subplots(figsize=(7, 4))
        ax.plot(np.arange(len(values)), values, marker=".")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        self.finish(fig, name)

    def calibration(self, samples: np.ndarray, centre: np.ndarray, truth: np.ndarray, name: str,
                    band_scales: dict[float, float] | None = None) -> None:
        """Nominal against observed coverage of the samples' central bands and of the calibrated
        bands (each widened by its `band_scales` entry, as the bands file holds them), and each
        run's spread against its error (modules/calibration.py), on the validation runs."""
        if not self.active:
            return
        from modules.calibration import coverage, spread_and_error
        levels = np.linspace(0.1, 0.9, 9)
        observed = [coverage(samples, truth, level) for level in levels]
        spread, error = spread_and_error(samples, centre, truth)
        fig, (left, right) = self.plt.subplots(1, 2, figsize=(10, 4.5))
        left.plot([0, 1], [0, 1], color="k", linewidth=0.8, label="ideal")
        left.plot(levels, observed, marker="o", label="the samples' own bands")
        if band_scales:
            left.plot(list(band_scales), [coverage(samples, truth, level, centre, scale)
                                          for level, scale in band_scales.items()],
                      linestyle="none", marker="s", markersize=8, label="calibrated bands (bands file)")
        left.set_xlabel("nominal coverage of the central band")
        left.set_ylabel("fraction of true values inside")
        left.legend()
        right.scatter(spread, error, s=12)
        lim = [0, max(spread.max(), error.max()) * 1.05]
        right.plot(lim, lim, color="k", linewidth=0.8)
        right.set_xlabel("predicted spread (relative L2)")
        right.set_ylabel("actual error (relative L2)")
        right.set_title("one point per validation run", fontsize=9)
        fig.suptitle("calibration of the predictive samples on the validation runs")
        self.finish(fig, name)


def _has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
