"""`--suggest K`: where to run the solver next, from a trained surrogate with a GP conditioner.

The candidates are a scrambled Sobol' sequence in a box (the training runs' by default, or
`--bounds`); each one's calibrated predictive spread is what `Surrogate.sample`'s predictive draws
would show there, in closed form (`spread_parts`): the GP's latent variance mapped to the field,
with the networks' disagreement and the difficulty model, times the calibrated `spread_scale`.
The K rows are picked greedily: the candidate with the largest spread, then the GP conditioned on
it as if it had been simulated (a posterior variance needs no outcome: `LatentVariance.add`),
every candidate's spread shrunk accordingly, and so on. So the rows go where the surrogate is
least sure of itself, and apart from each other and from the training runs.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import solve_triangular

from modules.checkpoint import ensure_writable, json_bytes, write_together
from modules.errors import UserError
from modules.gp import JITTER, GPHyper
from modules.predict import read_bounds
from modules.run import Paths
from modules.surrogate import Surrogate

log = logging.getLogger("simulgen")

CANDIDATES = 1024       # Sobol' candidates at least (a power of 2: the sequence is balanced there) ...
PER_ROW = 16            # ... and at least this many per suggested row
MAX_ROWS = 256          # rows per command: each pick adds a row per GP column and candidate to the update
REFERENCES = 2          # candidates at whose predicted latents the decoder's sensitivity is measured
BATCH = 256             # fields decoded at once

SPREAD_MEANING = ("the calibrated predictive spread of the surrogate at the row: the root of the summed variance "
                  "of --samples' predictive draws over steps and nodes, relative to the point prediction's norm "
                  "(as spread_and_error in modules/calibration.py measures it), before any row was picked; "
                  "spread_when_chosen: the same after the rows above it were added to the GP's inputs; spread_rms: "
                  "the spread as a root-mean-square per value, in the field's physical units")


@dataclass(frozen=True)
class Suggestion:
    rows: np.ndarray                # (K, F) the suggested parameter rows, raw units
    chosen: np.ndarray              # (K,) their candidate numbers
    spread: np.ndarray              # (K,) relative calibrated spread before any pick
    when_chosen: np.ndarray         # (K,) the same when picked (after the rows before it were added)
    rms: np.ndarray                 # (K,) spread as a root-mean-square per value, physical units
    candidates: np.ndarray          # (C, F) raw units
    candidate_spread: np.ndarray    # (C,)
    fixed: np.ndarray               # (F,) bool: columns held at one value


# --- the GP's posterior variance at fixed candidates ------------------------------------------------------

def gp_hyper(gp: torch.nn.Module, prefix: str = "") -> GPHyper:
    """The kernels a GPConditioner's buffers hold (under `prefix`: "difficulty_" for its difficulty model, an
    RBF), as the GPHyper that fitted them (modules/gp.py)."""
    buf = {name: getattr(gp, name).detach().cpu().numpy() for name in
           ("inv_length", "amplitude", "noise", "linear", "linear_centre", "linear_span")}
    buf.update({name: getattr(gp, prefix + name).detach().cpu().numpy() for name in ("inv_length", "amplitude", "noise")})
    kernel = "matern52" if float(gp.matern) and not prefix else "rbf"
    if prefix or not buf["linear"][:, 0].any():
        return GPHyper(buf["amplitude"], 1.0 / buf["inv_length"], buf["noise"], kernel)
    return GPHyper(buf["amplitude"], 1.0 / buf["inv_length"], buf["noise"], kernel, buf["linear"],
                   buf["linear_centre"], buf["linear_span"])


class LatentVariance:
    """Each GP column's posterior mean (`mean`, as `GPConditioner.predict`) and variance at fixed candidates
    (scaled inputs (C, d)), the variance conditioned on more of them one at a time. `v[j]` is
    L⁻¹ k(inputs, candidates) for column j's Cholesky factor L; conditioning on candidate i appends one row to
    it, the candidates' posterior covariance with i over i's variance (with the column's noise), and each
    variance drops by that row squared: a rank-one update, exact for the GP. `prefix`: "difficulty_", the
    conditioner's difficulty model (one column, on the same inputs)."""

    def __init__(self, gp: torch.nn.Module, candidates: np.ndarray, prefix: str = "") -> None:
        def host(name: str) -> np.ndarray:
            return getattr(gp, name).detach().cpu().numpy().astype(np.float64)
        self.hyper = gp_hyper(gp, prefix)
        self.x = np.asarray(candidates, np.float64)                                      # (C, d)
        # (n, d), (m, n, n), (m, n), (m,)
        inputs, chol, alpha, self.y_std = (host(name) for name in ("x", prefix + "chol", prefix + "alpha",
                                                                    prefix + "y_std"))
        self.v, mean = [], np.empty((len(self.x), len(self.y_std)))
        for j in range(len(chol)):
            k = self.hyper.matrix(j, inputs, self.x)                                       # (n, C)
            mean[:, j] = k.T @ alpha[j]
            self.v.append(solve_triangular(chol[j], k, lower=True))                       # m × (n, C)
        self.mean = mean * self.y_std + host(prefix + "y_mean")                            # (C, m) scaled targets
        # the latent function's variance, standardised units (m, C)
        self.latent = np.stack([self.hyper.prior_variance(j, self.x) - (v * v).sum(axis=0)
                                for j, v in enumerate(self.v)])

    @classmethod
    def unconditioned(cls, hyper: GPHyper, candidates: np.ndarray) -> "LatentVariance":
        """A GP with the kernels `hyper`, conditioned on nothing yet, whose observations will be exact (no noise)."""
        self = cls.__new__(cls)
        self.hyper = dataclasses.replace(hyper, noise=np.zeros_like(hyper.noise))
        self.x = np.asarray(candidates, np.float64)
        self.y_std, self.mean = np.ones(len(hyper.amplitude)), None
        self.v = [np.empty((0, len(self.x))) for _ in hyper.amplitude]
        self.latent = np.stack([self.hyper.prior_variance(j, self.x) for j in range(len(hyper.amplitude))])
        return self

    def variance(self) -> np.ndarray:
        """(C, m): the variance of a new observation, scaled-target units (the square of `GPConditioner.predict`'s
        std)."""
        return self.reducible() + self.hyper.noise * self.y_std ** 2

    def reducible(self) -> np.ndarray:
        """(C, m): the part of `variance` that more inputs can remove (the latent function's, without the noise)."""
        return (np.maximum(self.latent, 0.0) * self.y_std[:, None] ** 2).T

    def add(self, i: int) -> None:
        """Condition on candidate i as if it had been simulated (with the columns' noise)."""
        for j, v in enumerate(self.v):
            cov = self.hyper.matrix(j, self.x, self.x[i:i + 1])[:, 0] - v.T @ v[:, i]      # (C,)
            row = cov / np.sqrt(max(self.latent[j, i] + self.hyper.noise[j] + JITTER, 1e-300))
            self.v[j] = np.concatenate([v, row[None]])
            self.latent[j] -= row ** 2


# --- the spread in the field ----------------------------------------------------------------------------

@torch.inference_mode()
def _decode(surrogate: Surrogate, latents: torch.Tensor) -> torch.Tensor:
    """Flat scaled targets (B, m) → point fields (B, T, N), physical units, float64 on the host."""
    parts = [surrogate._physical(surrogate.decoder(*surrogate.conditioner.split(chunk.to(surrogate.device).float()),
                                                   mode="fix")).double() for chunk in latents.split(BATCH)]
    return torch.cat(parts)


def decoder_sensitivity(surrogate: Surrogate, latents: torch.Tensor, step: torch.Tensor) -> np.ndarray:
    """(m,): each latent's mean squared sensitivity ‖∂field/∂zⱼ‖² (physical units per scaled target), by
    central differences of size `step` (m,) about each row of `latents` (R, m)."""
    r, m = latents.shape
    eye = torch.diag(step.to(latents))                                                     # (m, m)
    shifted = torch.cat([latents[:, None] + eye, latents[:, None] - eye], 1).flatten(0, 1)  # (R·2m, m)
    fields = _decode(surrogate, shifted).flatten(1).unflatten(0, (r, 2, m))               # (R, 2, m, T·N)
    slope = (fields[:, 0] - fields[:, 1]) / (2 * step.to(fields))[None, :, None]
    return slope.square().sum(-1).mean(0).numpy()


def spread_parts(surrogate: Surrogate, x: torch.Tensor, latent: LatentVariance) -> dict[str, np.ndarray]:
    """Per model input (C, d) (`latent`'s candidates): the decoder's sensitivity `weights` (m,) and, per input,
    the GP's field variance `gp`, the rest of the draws' variance `extra` (the networks' disagreement), the point
    prediction's `norm` and the `difficulty`, as `Surrogate.sample` composes them. The GP's field variance is the
    delta method's, Σⱼ wⱼ σⱼ²(x): its per-latent variances weighted by the decoder's mean squared sensitivity to
    each latent (on the demo within 1 % of 128 decoded draws' spread, 8 % with a frame network blended in: the
    decoder is nearly linear over the posterior)."""
    gp = surrogate.conditioner
    mean, var = torch.from_numpy(latent.mean), latent.variance()                           # (C, m) each
    picks = torch.linspace(0, len(x) - 1, min(REFERENCES, len(x))).round().long()
    weights = decoder_sensitivity(surrogate, mean[picks], torch.from_numpy(np.sqrt(np.median(var, 0))).clamp_min(1e-6))
    norm, extra = np.empty(len(x)), np.zeros(len(x))
    for start in range(0, len(x), BATCH):
        point = _decode(surrogate, mean[start:start + BATCH])                              # (B, T, N)
        if surrogate.frame_net is not None:             # as `sample`: the blend's shift, and draws along the gap
            with torch.inference_mode():
                apart = surrogate.frame_net.disagreement(point.float(), x[start:start + BATCH].to(surrogate.device))
            apart = apart.cpu().double()
            point = point + float(surrogate.frame_net.weight) * apart
            extra[start:start + len(point)] = apart.flatten(1).square().sum(1).numpy()
        norm[start:start + len(point)] = point.flatten(1).norm(dim=1).numpy()
    difficulty = gp.difficulty(x.to(surrogate.device)).cpu().numpy()
    return {"weights": weights, "gp": var @ weights, "extra": extra, "norm": norm, "difficulty": difficulty}


def calibrated_spread(parts: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """The relative spread of the calibrated draws (`widen`, then `scale`): scale · √(s² + d²), s the draws' own."""
    own = (parts["gp"] + parts["extra"]) / np.maximum(parts["norm"], 1e-300) ** 2
    return scale * np.sqrt(own + parts["difficulty"] ** 2)


# --- the suggestion ---------------------------------------------------------------------------------------

def candidate_count(k: int) -> int:
    return 1 << (max(CANDIDATES, PER_ROW * k) - 1).bit_length()


def sobol_rows(low: np.ndarray, high: np.ndarray, fixed: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` scrambled Sobol' rows (count, F) in [low, high]; the `fixed` columns at `low`."""
    from scipy.stats import qmc
    free = np.flatnonzero(~fixed)
    rows = np.repeat(low[None].astype(np.float64), count, axis=0)
    unit = qmc.Sobol(len(free), scramble=True, seed=seed).random(count)                   # (count, len(free))
    rows[:, free] = qmc.scale(unit, low[free], high[free])
    return rows


def suggest(surrogate: Surrogate, k: int, low: np.ndarray, high: np.ndarray, seed: int = 0,
            candidates: int | None = None) -> Suggestion:
    """K rows in [low, high] where the calibrated predictive spread is largest, picked greedily with the GP
    conditioned on each pick (the module's docstring), from `candidates` Sobol' rows (default
    `candidate_count(k)`). Columns the training runs never varied, and those whose bounds have zero width, are
    held at that value."""
    train_low, train_high = surrogate.input_scaler.data_min, surrogate.input_scaler.data_max
    fixed = (train_high <= train_low) | (high <= low)
    low = np.where(train_high <= train_low, train_low, low)
    if fixed.all():
        raise UserError("every parameter is held at one value (the training runs never varied it, or its bounds "
                        "have zero width): there is nothing to vary; widen --bounds.")
    count = candidates or candidate_count(k)
    if k > count:
        raise UserError(f"{k} rows asked of {count} candidates; ask for fewer rows.")
    raw = sobol_rows(low, high, fixed, count, seed)
    x = surrogate.prepare(raw.astype(np.float32))                                          # (C, d) scaled
    latent = LatentVariance(surrogate.conditioner, x.double().numpy())
    parts = spread_parts(surrogate, x, latent)
    before = calibrated_spread(parts, float(surrogate.conditioner.spread_scale))           # (C,)
    # A pick removes part of the GP's own field variance, not its noise. The difficulty and the networks'
    # disagreement measure the GP's error where it lacks runs: a run removes it there and around, as far as errors
    # go together, which the difficulty model's kernel says. So they shrink as the variance of a noise-free GP
    # with that kernel conditioned on the picks alone (the training runs are in them already); without a
    # difficulty model, as the GP's own variance.
    gp = surrogate.conditioner
    hard = LatentVariance.unconditioned(gp_hyper(gp, "difficulty_"), latent.x) if float(gp.difficulty_on) else None

    def own() -> np.ndarray:
        return latent.reducible() @ parts["weights"]                                        # (C,)

    def errors() -> np.ndarray:
        return hard.reducible()[:, 0] if hard is not None else own()

    own0, errors0 = np.maximum(own(), 1e-300), np.maximum(errors(), 1e-300)
    total = np.maximum(parts["gp"] + parts["extra"] + (parts["difficulty"] * parts["norm"]) ** 2, 1e-300)
    noise, rest = (parts["gp"] - own0) / total, 1.0 - parts["gp"] / total                  # shares of spread²
    chosen, at_pick = [], []
    for _ in range(k):
        left = noise + (1.0 - noise - rest) * own() / own0 + rest * errors() / errors0
        now = before * np.sqrt(np.clip(left, 0.0, 1.0))
        now[chosen] = -np.inf
        i = int(np.argmax(now))
        chosen.append(i)
        at_pick.append(now[i])
        for model in (latent, hard) if hard is not None else (latent,):
            model.add(i)
    chosen = np.array(chosen)
    steps, nodes = surrogate.shape
    rms = before[chosen] * parts["norm"][chosen] / np.sqrt(steps * nodes)
    return Suggestion(raw[chosen], chosen, before[chosen], np.array(at_pick), rms, raw, before, fixed)


# --- the command ------------------------------------------------------------------------------------------

def output_files(out: Path, plot: int) -> dict[str, Path]:
    files = {"rows": out, "meta": out.with_suffix(".json")}
    if plot != 2:
        files["figure"] = out.with_name(out.stem + "_candidates.png")
    return files


def check_out(out: Path | None, plot: int, force: bool) -> None:
    if out is None:
        raise UserError("--suggest needs --out FILE.csv (it writes the rows there and FILE.json beside it).")
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {out}: the output must be a .csv file, e.g. --out next_runs.csv (FILE.json is "
                        f"written beside it).")
    present = [p for p in output_files(out, plot).values() if p.exists()]
    if present and not force:
        raise UserError(f"{present[0]} already exists; --suggest would replace it: pass --force to replace it (the "
                        f"old files are kept beside it as *.replaced-<time>), or choose another --out.")
    ensure_writable([out.parent], f"--out {out}", "choose a writable folder")


def _csv_bytes(rows: np.ndarray, names: list[str] | None) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if names is not None:
        writer.writerow(names)
    writer.writerows([[f"{v:.10g}" for v in row] for row in rows])
    return text.getvalue().encode()


def _report(result: Suggestion, surrogate: Surrogate, low: np.ndarray, high: np.ndarray, source: str,
            out: Path, seed: int, seconds: float) -> dict:
    names = surrogate.param_names
    train_low, train_high = surrogate.input_scaler.data_min, surrogate.input_scaler.data_max
    return {
        "csv": str(out), "param_names": names, "seed": seed, "seconds": seconds,
        "rows": [{"row": i + 1, "values": row, "spread": s, "spread_when_chosen": w, "spread_rms": r}
                 for i, (row, s, w, r) in enumerate(zip(result.rows.tolist(), result.spread.tolist(),
                                                        result.when_chosen.tolist(), result.rms.tolist()))],
        "spread_meaning": SPREAD_MEANING,
        "bounds": {"source": source, "min": low, "max": high},
        "fixed_columns": [{"column": int(j) + 1, "value": float(result.rows[0, j]),
                           "why": "the training runs never varied it" if train_high[j] <= train_low[j]
                           else "its bounds have zero width"} for j in np.flatnonzero(result.fixed)],
        "candidates": len(result.candidates),
        "candidate_spread": {"max": result.candidate_spread.max(), "median": np.median(result.candidate_spread),
                             "min": result.candidate_spread.min()},
        "method": "greedy: of a scrambled Sobol' set of candidates in the bounds, the one with the largest spread; "
                  "then the GP conditioned on it as if it had been simulated and every candidate's spread shrunk: "
                  "its GP share as the GP's variance, its difficulty and disagreement share as a noise-free GP "
                  "with the difficulty model's kernel conditioned on the picks; repeated for every row. The "
                  "spread is the closed form of --samples' predictive draws: the GP's per-latent posterior "
                  "variances weighted by the decoder's "
                  "mean squared sensitivity to each latent (the delta method), plus the networks' disagreement, "
                  "widened by the difficulty model and scaled by the calibrated draw scale",
        "checkpoints": surrogate.sources,
    }


def figure(plot: int, files: dict[str, Path], result: Suggestion, surrogate: Surrogate,
           labels: list[str]) -> list[str]:
    """The candidates in the two leading varied parameters, coloured by spread; the picks numbered, the training
    runs as dots (one varied parameter: the spread along it)."""
    from modules.plots import Figures
    figs = Figures(plot, files["rows"].parent)
    free = np.flatnonzero(~result.fixed)[:2]
    fig, ax = figs.plt.subplots(figsize=(6.4, 5))
    a = result.candidates[:, free[0]]
    b = result.candidates[:, free[1]] if len(free) > 1 else result.candidate_spread
    shade = ax.scatter(a, b, c=result.candidate_spread, s=8, cmap="viridis")
    fig.colorbar(shade, ax=ax, label="calibrated spread (relative to the field's norm)")
    if len(free) > 1 and surrogate.domain is not None and surrogate.domain.runs is not None:
        runs = surrogate.domain.runs
        ax.scatter(runs[:, free[0]], runs[:, free[1]], s=10, c="k", marker=".", label="training runs")
    picked_b = result.rows[:, free[1]] if len(free) > 1 else result.spread
    ax.scatter(result.rows[:, free[0]], picked_b, s=60, facecolors="none", edgecolors="r", label="suggested")
    for i, (u, v) in enumerate(zip(result.rows[:, free[0]], picked_b), start=1):
        ax.annotate(str(i), (u, v), xytext=(3, 3), textcoords="offset points", color="r", fontsize=8)
    ax.set_xlabel(labels[free[0]])
    ax.set_ylabel(labels[free[1]] if len(free) > 1 else "calibrated spread")
    ax.set_title(f"{len(result.rows)} suggested rows of {len(result.candidates)} candidates", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    figs.finish(fig, files["figure"].stem if "figure" in files else files["rows"].stem + "_candidates")
    return [str(p) for p in figs.saved]


def _bounds(bounds: Path | None, surrogate: Surrogate, labels: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """The box to suggest in: the training runs' or `--bounds`, which must hold every column that never varied."""
    train_low, train_high = surrogate.input_scaler.data_min, surrogate.input_scaler.data_max
    if bounds is None:
        low, high, source = train_low.copy(), train_high.copy(), "the training runs' minima and maxima"
    else:
        low, high = read_bounds(bounds, surrogate.num_param, surrogate.param_names)
        source = str(bounds)
        held = np.flatnonzero((train_high <= train_low) & ((low > train_low) | (high < train_low)))
        if len(held):
            j = int(held[0])
            raise UserError(f"--bounds {bounds}, {labels[j]}: the training runs never varied it (always "
                            f"{train_low[j]:g}), so the surrogate knows it only there; give bounds that hold "
                            f"{train_low[j]:g}.")
        beyond = np.flatnonzero(((low < train_low) | (high > train_high)) & (train_high > train_low))
        if len(beyond):
            log.warning("--bounds %s reaches beyond the training runs in %s; the surrogate extrapolates there, and "
                        "its spread grows with the distance", bounds,
                        ", ".join(f"{labels[j]} (trained {train_low[j]:g} to {train_high[j]:g})" for j in beyond))
    return low, high, source


def suggest_cli(args: argparse.Namespace, paths: Paths, device: torch.device) -> int:
    """`--suggest K --out FILE.csv [--bounds CSV] [--plot] [--seed] [--force]`."""
    k, seed = args.suggest, 0 if args.seed is None else args.seed
    if k < 1 or k > MAX_ROWS:
        raise UserError(f"--suggest {k}: give a number of rows from 1 to {MAX_ROWS}.")
    if seed < 0:
        raise UserError(f"--seed {seed}: give a whole number of 0 or more.")
    force = getattr(args, "force", False)
    check_out(args.out, args.plot, force)
    surrogate = Surrogate.load(paths, device)
    if surrogate.input_type != "csvs":
        raise UserError(f"--suggest proposes parameter rows, but this surrogate reads pictures (input_type "
                        f"{surrogate.input_type}); use a surrogate trained on CSV parameters (input_type csvs).")
    if not surrogate.has_predictive:
        raise UserError("--suggest needs the predictive spread of a GP conditioner, and this surrogate's conditioner "
                        "is a network (csv_conditioner mlp); retrain with csv_conditioner gp (the default) and "
                        "--lc_only=1.")
    labels = (surrogate.param_names or [f"column {j + 1}" for j in range(surrogate.num_param)])
    low, high, source = _bounds(args.bounds, surrogate, labels)
    started = time.perf_counter()
    result = suggest(surrogate, k, low, high, seed)
    report = _report(result, surrogate, low, high, source, args.out, seed, time.perf_counter() - started)
    files = output_files(args.out, args.plot)
    present = [p for p in files.values() if p.exists()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in present:        # kept (a copy: if the write fails, the originals are still in place)
        shutil.copy2(path, path.with_name(f"{path.name}.replaced-{stamp}"))
    rows, meta = _csv_bytes(result.rows, surrogate.param_names), json_bytes(report)
    write_together({files["rows"]: lambda f: f.write(rows), files["meta"]: lambda f: f.write(meta)})
    figures = figure(args.plot, files, result, surrogate, labels) if args.plot != 2 else []
    print(f"wrote {args.out} ({k} row{'s' * (k != 1)} for the solver, in the training CSV's column order) and "
          f"{files['meta']}: of {len(result.candidates)} candidates in {source}, spread {result.spread.min():.3g} to "
          f"{result.spread.max():.3g} of the field's norm (candidates: median "
          f"{np.median(result.candidate_spread):.3g}) in {report['seconds']:.1f} s")
    if figures:
        print(f"figure: {', '.join(figures)}")
    return 0
