"""`--sensitivity N`: which parameters drive a quantity of interest, through the trained surrogate.

Sobol' first-order (S1: the share of the quantity's variance a parameter explains alone) and
total indices (ST: alone and in interaction with the others), with bootstrap confidence
intervals, from SALib: Saltelli's scheme on a scrambled Sobol' sequence (`SALib.sample.sobol`,
N·(K+2) designs for K varied parameters) and its estimators (`SALib.analyze.sobol`, no second
order). The parameters are drawn uniformly in a box, by default the training runs'; a column
whose box has zero width is held at that value and reported as fixed (SALib cannot sample it).

Quantities (`--qoi`): the field's L2 norm over the run (one number per run), or a curve over
the saved steps (the maximum over the nodes, the value at one node, the mean over a list of
nodes) whose indices are computed step by step. All of them come from one pass of the
surrogate over the designs.

`sobol_indices` takes any vectorised function of the parameter rows, so the same code serves
the surrogate, a solver (benchmarks/accuracy/sensitivity_check.py) and an analytic test function.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from modules.checkpoint import ensure_writable, json_bytes, write_together
from modules.errors import UserError
from modules.predict import read_bounds
from modules.run import Paths

log = logging.getLogger("simulgen")

CONF_LEVEL = 0.95
RESAMPLES = 100             # bootstrap resamples of SALib's confidence intervals (its default)
BATCH_VALUES = 2 ** 25      # field values (rows · T · N) per surrogate batch: ~128 MB of float32
CONSTANT = 1e-6             # an output whose spread is below this share of its magnitude has no variance to share


@dataclass(frozen=True)
class SobolResult:
    """Indices of Q outputs over the varied parameters; NaN rows where an output is constant."""
    base_samples: int           # N
    evaluations: int            # N·(K+2)
    varied: np.ndarray          # (K,) column numbers (from 0) that were sampled
    fixed: np.ndarray           # column numbers held at their single value
    S1: np.ndarray              # (Q, K)
    S1_conf: np.ndarray         # (Q, K) half-width of the CONF_LEVEL bootstrap interval
    ST: np.ndarray
    ST_conf: np.ndarray
    variance: np.ndarray        # (Q,) each output's variance over the designs
    constant: np.ndarray        # (Q,) bool: no variance, no indices
    seconds: dict               # {"model": evaluating `func`, "analysis": SALib's estimators and bootstrap}


def base_samples(n: int) -> int:
    """N for Saltelli's scheme: at least 2, a power of 2 (the Sobol' sequence's balance needs it)."""
    if n < 2:
        raise UserError(f"--sensitivity {n}: give N of at least 2 base samples (a power of 2; 512 to 4096 is usual).")
    rounded = 1 << (n - 1).bit_length()
    if rounded != n:
        log.warning("--sensitivity %d: using N = %d, the next power of 2 (the Sobol' sequence is balanced only at "
                    "powers of 2)", n, rounded)
    return rounded


def sobol_indices(func: Callable[[np.ndarray], np.ndarray], low: np.ndarray, high: np.ndarray, n: int,
                  seed: int = 0, batch: int = 4096) -> SobolResult:
    """S1 and ST of every output of `func` (rows (m, D) → (m,) or (m, Q)) for parameters uniform in [low, high];
    columns with low == high are held there. `func` is called on batches of at most `batch` rows."""
    from SALib.analyze import sobol as analyze
    from SALib.sample import sobol as sample
    from modules.progress import Ticker
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    if (high < low).any():
        raise UserError(f"bounds: a minimum lies above its maximum (column {int(np.argmax(high < low)) + 1}).")
    varied, fixed = np.flatnonzero(high > low), np.flatnonzero(high == low)
    if not len(varied):
        raise UserError("every parameter is held fixed (its minimum equals its maximum): nothing to vary; widen "
                        "--bounds.")
    n = base_samples(n)
    problem = {"num_vars": len(varied), "names": [f"x{j}" for j in varied],
               "bounds": [[low[j], high[j]] for j in varied]}
    free = sample.sample(problem, n, calc_second_order=False, seed=seed)         # (N·(K+2), K)
    rows = np.repeat(low[None], len(free), axis=0)                               # (M, D)
    rows[:, varied] = free
    ticker = Ticker("sensitivity: evaluating designs", len(rows), "design")
    started, parts = time.perf_counter(), []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        parts.append(np.asarray(func(chunk), np.float64).reshape(len(chunk), -1))              # (m, Q)
        ticker.tick(start + len(chunk))
    y = np.concatenate(parts)                                                    # (M, Q)
    if not np.isfinite(y).all():
        bad = int((~np.isfinite(y)).any(axis=1).sum())
        raise UserError(f"the model gave non-finite values at {bad} of {len(y)} sampled designs; narrow --bounds to "
                        f"where it is defined.")
    seconds = {"model": time.perf_counter() - started}
    started = time.perf_counter()
    spread = np.ptp(y, axis=0)
    constant = spread <= CONSTANT * np.abs(y).max(axis=0)
    shape = (y.shape[1], len(varied))
    out = {key: np.full(shape, np.nan) for key in ("S1", "S1_conf", "ST", "ST_conf")}
    ticker = Ticker("sensitivity: indices", y.shape[1], "output")
    for q in np.flatnonzero(~constant):
        # The same seed for every output: each is bootstrapped over the same resampled designs.
        si = analyze.analyze(problem, y[:, q], calc_second_order=False, num_resamples=RESAMPLES,
                             conf_level=CONF_LEVEL, seed=seed + 1)              # SALib ignores a seed of 0
        for key in out:
            out[key][q] = si[key]
        ticker.tick(q + 1)
    seconds["analysis"] = time.perf_counter() - started
    return SobolResult(n, len(rows), varied, fixed, **out, variance=y.var(axis=0), constant=constant, seconds=seconds)


# --- quantities of interest ------------------------------------------------------------

@dataclass(frozen=True)
class Qoi:
    """One `--qoi`: `values` maps fields (m, T, N) to (m,) (l2) or (m, T) (the curves)."""
    spec: str
    kind: str                       # l2 | max | node | nodes
    nodes: np.ndarray | None = None     # node numbers from 0 (node, nodes)

    @property
    def curve(self) -> bool:
        return self.kind != "l2"

    @property
    def label(self) -> str:
        """For file names: l2, max, node12, nodes_<file stem>."""
        if self.kind == "node":
            return f"node{self.nodes[0] + 1}"
        if self.kind == "nodes":
            return "nodes_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.spec[6:]).stem)
        return self.kind

    @property
    def meaning(self) -> str:
        if self.kind == "node":
            return f"the value at node {self.nodes[0] + 1} (from 1) at each saved step"
        if self.kind == "nodes":
            return f"the mean over the {len(self.nodes)} nodes listed in {self.spec[6:]} at each saved step"
        return {"l2": "the field's L2 norm over the run, sqrt(sum over steps and nodes of value^2); one number per run",
                "max": "the maximum over the nodes at each saved step"}[self.kind]

    def check(self, num_nodes: int) -> None:
        if self.nodes is not None and (self.nodes.min() < 0 or self.nodes.max() >= num_nodes):
            worst = int(self.nodes.max() if self.nodes.max() >= num_nodes else self.nodes.min()) + 1
            raise UserError(f"--qoi {self.spec}: node {worst} does not exist; the model has {num_nodes} nodes, "
                            f"numbered 1 to {num_nodes}.")

    def values(self, fields: np.ndarray) -> np.ndarray:
        if self.kind == "l2":
            return np.sqrt(np.square(fields, dtype=np.float64).sum(axis=(1, 2)))            # (m,)
        if self.kind == "max":
            return fields.max(axis=2).astype(np.float64)                                    # (m, T)
        return fields[:, :, self.nodes].astype(np.float64).mean(axis=2)                     # (m, T)


_QOI_HELP = "give l2, max, node:I (a node number from 1) or nodes:FILE (a file of node numbers from 1)"


def parse_qoi(spec: str) -> Qoi:
    """A `--qoi` spec; node ranges are checked against the model later (`Qoi.check`)."""
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind in ("l2", "max") and not arg:
        return Qoi(spec, kind)
    if kind == "node" and arg:
        if not re.fullmatch(r"\s*\d+\s*", arg):
            raise UserError(f"--qoi {spec}: {arg!r} is not a node number; give node:I with I a whole number from 1.")
        return Qoi(spec, "node", np.array([int(arg) - 1]))
    if kind == "nodes" and arg:
        return Qoi(spec, "nodes", _read_nodes(spec, Path(arg)))
    raise UserError(f"--qoi {spec}: unknown quantity; {_QOI_HELP}.")


def _read_nodes(spec: str, path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"--qoi {spec}: {path} not found; give a text file of node numbers (from 1), separated by "
                        f"commas, spaces or line breaks.")
    try:
        tokens = [t for t in re.split(r"[\s,;]+", path.read_text(encoding="utf-8-sig")) if t]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--qoi {spec}: cannot read {path} ({exc}); save it as a plain text file.") from None
    bad = next((t for t in tokens if not t.isdigit()), None)
    if bad is not None or not tokens:
        raise UserError(f"--qoi {spec}: {path} " + (f"holds {bad!r}, not a node number" if bad else "is empty")
                        + "; list node numbers (whole numbers from 1), separated by commas, spaces or line breaks.")
    return np.unique(np.array([int(t) for t in tokens])) - 1


# --- the command ---------------------------------------------------------------------------

def parameter_names(surrogate) -> list[str]:
    """The parameters' names where the model carries them (the CSV's header), else p1..pK."""
    names = getattr(surrogate, "param_names", None)
    if names is not None and len(names) == surrogate.num_param:
        return [str(name) for name in names]
    return [f"p{i}" for i in range(1, surrogate.num_param + 1)]


def check_out(out: Path | None) -> None:
    if out is None:
        raise UserError("--sensitivity needs --out FILE.json (it writes FILE.json and FILE.csv beside it).")
    if out.suffix != ".json":
        raise UserError(f"--out {out}: the output must be a .json file, e.g. --out sensitivity.json (FILE.csv is "
                        f"written beside it).")
    ensure_writable([out.parent], f"--out {out}", "choose a writable folder")


def sensitivity_cli(args: argparse.Namespace, paths: Paths, device: torch.device) -> int:
    """`--sensitivity N --qoi SPEC... [--bounds CSV] --out FILE.json [--plot] [--seed]`."""
    from modules.surrogate import Surrogate
    seed = 0 if args.seed is None else args.seed
    if seed < 0:
        raise UserError(f"--seed {seed}: give a whole number of 0 or more.")
    check_out(args.out)
    n = base_samples(args.sensitivity)
    qois = list({q.spec.strip(): q for q in map(parse_qoi, args.qoi or ["l2"])}.values())
    surrogate = Surrogate.load(paths, device)
    if surrogate.input_type != "csvs":
        raise UserError(f"--sensitivity varies parameter columns, but this surrogate reads pictures (input_type "
                        f"{surrogate.input_type}), which have no columns to vary; use a surrogate trained on CSV "
                        f"parameters (input_type csvs).")
    steps, num_nodes = surrogate.shape
    for qoi in qois:
        qoi.check(num_nodes)
    names = parameter_names(surrogate)
    if surrogate.domain is None:
        raise UserError(f"{paths.conditioner_scalers} lacks the training runs' parameter ranges; give --bounds CSV "
                        f"(two rows: the minima, then the maxima).")
    train_low, train_high = surrogate.domain.low.astype(np.float64), surrogate.domain.high.astype(np.float64)
    if args.bounds is None:
        low, high, source = train_low, train_high, "the training runs' minima and maxima"
    else:
        low, high = read_bounds(args.bounds, surrogate.num_param, surrogate.param_names)
        source = str(args.bounds)
        outside = np.flatnonzero((low < train_low) | (high > train_high))
        if len(outside):
            log.warning("--bounds %s reaches beyond the training runs in %s; the surrogate extrapolates there",
                        args.bounds, ", ".join(f"{names[j]} (trained {train_low[j]:g} to {train_high[j]:g})"
                                               for j in outside))

    def evaluate(rows: np.ndarray) -> np.ndarray:
        fields = surrogate.fields(surrogate.prepare(rows.astype(np.float32)), batch_size=256)   # (m, T, N)
        return np.concatenate([q.values(fields).reshape(len(rows), -1) for q in qois], axis=1)  # (m, Q)

    started, per_base = time.perf_counter(), int((high > low).sum()) + 2
    log.info("sensitivity: %d designs (N = %d base samples × %d) through the surrogate", n * per_base, n, per_base)
    result = sobol_indices(evaluate, low, high, n, seed, batch=max(1, min(4096, BATCH_VALUES // (steps * num_nodes))))
    seconds = time.perf_counter() - started
    report = _report(result, qois, names, low, high, source, steps, args.sensitivity, seed, surrogate.sources, seconds)
    out, table = args.out, args.out.with_suffix(".csv")
    report["csv"] = str(table)
    write_together({table: lambda f: f.write(_csv_bytes(report)), out: lambda f: f.write(json_bytes(report))})
    figures = figures_of(args.plot, out, report) if args.plot != 2 else []
    print("\n".join(describe(report, out, table, figures)))
    return 0


def _clean(a: np.ndarray):
    """An array as nested lists with NaN as None (JSON null)."""
    return np.where(np.isnan(a), None, a.astype(object)).tolist()


def _report(result: SobolResult, qois: list[Qoi], names: list[str], low: np.ndarray, high: np.ndarray,
            source: str, steps: int, requested: int, seed: int, checkpoints: dict, seconds: float) -> dict:
    varied = [names[j] for j in result.varied]
    why = ("it never varies in the training runs" if source.startswith("the training runs") else
           f"its minimum equals its maximum in {source}")
    fixed = [{"parameter": names[j], "column": int(j) + 1, "value": float(low[j]), "why": why}
             for j in result.fixed]
    entries, col = {}, 0
    for qoi in qois:
        width = steps if qoi.curve else 1
        part = {k: getattr(result, k)[col:col + width] for k in ("S1", "S1_conf", "ST", "ST_conf")}
        constant, variance = result.constant[col:col + width], result.variance[col:col + width]
        col += width
        entry = {"meaning": qoi.meaning, "spec": qoi.spec, "label": qoi.label, "parameters": varied}
        if qoi.curve:
            entry.update({key: _clean(value) for key, value in part.items()})
            entry["steps"] = steps
            entry["constant_steps"] = [int(t) + 1 for t in np.flatnonzero(constant)]
            weight = np.where(constant, 0.0, variance)
            if weight.sum() > 0:
                entry["variance_weighted"] = {key: (np.nan_to_num(part[key]) * weight[:, None]).sum(axis=0)
                                              / weight.sum() for key in ("S1", "ST")}
        else:
            entry.update({key: _clean(value[0]) for key, value in part.items()})
            entry["constant"] = bool(constant[0])
        entries[qoi.spec.strip()] = entry
    return {
        "method": "Sobol' first-order (S1) and total (ST) indices from SALib: Saltelli's scheme on a scrambled "
                  "Sobol' sequence (SALib.sample.sobol, calc_second_order=False) and the estimators of Saltelli et "
                  "al. 2010 (S1) and Jansen (ST) (SALib.analyze.sobol); each design's quantities from the "
                  "surrogate's point prediction",
        "parameters": varied, "fixed": fixed, "all_parameters": names,
        "bounds": {"source": source, "min": low, "max": high},
        "base_samples": result.base_samples, "requested_base_samples": requested,
        "evaluations": result.evaluations, "seed": seed, "conf_level": CONF_LEVEL, "resamples": RESAMPLES,
        "layout": "per quantity: S1, S1_conf, ST, ST_conf, one value per entry of 'parameters' (the varied ones; "
                  "the fixed ones have no index); for the curves (max, node:I, nodes:FILE) one such list per saved "
                  "step, step 1 first, null at constant_steps (no variance over the designs, no indices); *_conf: "
                  "the half-width of the conf_level bootstrap interval (SALib, 'resamples' resamples); "
                  "variance_weighted: each step's indices weighted by the quantity's variance at that step, the "
                  "indices of the whole curve (Gamboa et al. 2014's aggregated indices)",
        "qoi": entries, "checkpoints": checkpoints,
        "seconds": {"total": seconds, "surrogate": result.seconds["model"], "analysis": result.seconds["analysis"]},
    }


def _csv_bytes(report: dict) -> bytes:
    """The tidy table: one row per quantity, step (empty for l2; from 1) and varied parameter."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["qoi", "step", "parameter", "S1", "S1_conf", "ST", "ST_conf"])
    keys = ("S1", "S1_conf", "ST", "ST_conf")
    for spec, entry in report["qoi"].items():
        rows = ([(t + 1, [entry[k][t] for k in keys]) for t in range(entry["steps"])] if "steps" in entry
                else [("", [entry[k] for k in keys])])
        for step, values in rows:
            for j, name in enumerate(report["parameters"]):
                writer.writerow([spec, step, name, *("" if v is None else f"{v[j]:.6g}" for v in values)])
    return buffer.getvalue().encode()


def figures_of(plot: int, out: Path, report: dict) -> list[str]:
    """Per quantity, beside FILE: bars of S1 and ST (l2), or S1 and ST over the steps (the curves)."""
    from modules.plots import Figures
    figs = Figures(plot, out.parent)
    names = report["parameters"]
    for spec, entry in report["qoi"].items():
        if "steps" not in entry:
            if entry["constant"]:
                continue
            fig, ax = figs.plt.subplots(figsize=(1.2 * len(names) + 3, 3.5))
            x = np.arange(len(names))
            for shift, key in ((-0.2, "S1"), (0.2, "ST")):
                ax.bar(x + shift, entry[key], 0.4, yerr=entry[f"{key}_conf"], capsize=3, label=key)
            ax.set_xticks(x, names)
        else:
            fig, axes = figs.plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
            t = np.arange(1, entry["steps"] + 1)
            for ax, key in zip(axes, ("S1", "ST")):
                value = np.array([[np.nan] * len(names) if v is None else v for v in entry[key]], float)
                conf = np.array([[np.nan] * len(names) if v is None else v for v in entry[f"{key}_conf"]], float)
                for j, name in enumerate(names):
                    line, = ax.plot(t, value[:, j], label=name)
                    ax.fill_between(t, value[:, j] - conf[:, j], value[:, j] + conf[:, j], alpha=0.2,
                                    color=line.get_color())
                ax.set_ylabel(key)
                ax.grid(alpha=0.3)
            axes[-1].set_xlabel("saved step")
            ax = axes[0]
        ax.set_title(f"Sobol' indices of {spec} ({int(report['conf_level'] * 100)} % intervals)", fontsize=9)
        ax.legend(fontsize=7)
        figs.finish(fig, f"{out.stem}_{entry['label']}")
    return [str(p) for p in figs.saved]


def describe(report: dict, out: Path, table: Path, figures: list[str]) -> list[str]:
    """A few lines for the terminal: the files, and each quantity's indices (the curves' variance-weighted)."""
    names = report["parameters"]
    lines = [f"wrote {out} and {table}: Sobol' indices of {', '.join(report['qoi'])} over {len(names)} parameters "
             f"from {report['evaluations']} surrogate evaluations (N = {report['base_samples']}) in "
             f"{report['seconds']['total']:.1f} s"]
    for item in report["fixed"]:
        lines.append(f"  {item['parameter']} (column {item['column']}) held at {item['value']:g}: {item['why']}")
    width = max(len(n) for n in names)
    for spec, entry in report["qoi"].items():
        if "steps" in entry:
            agg = entry.get("variance_weighted")
            if agg is None:
                lines.append(f"  {spec}: constant over the designs, no indices")
                continue
            lines.append(f"  {spec} (over the {entry['steps']} steps, variance-weighted):  S1, ST")
            lines += [f"    {n:<{width}}  {agg['S1'][j]:6.3f}  {agg['ST'][j]:6.3f}" for j, n in enumerate(names)]
        elif entry["constant"]:
            lines.append(f"  {spec}: constant over the designs, no indices")
        else:
            level = int(report["conf_level"] * 100)
            lines.append(f"  {spec}:  S1 ± {level} %,  ST ± {level} %")
            lines += [f"    {n:<{width}}  {entry['S1'][j]:6.3f} ± {entry['S1_conf'][j]:.3f}  "
                      f"{entry['ST'][j]:6.3f} ± {entry['ST_conf'][j]:.3f}" for j, n in enumerate(names)]
    if figures:
        lines.append(f"figures: {', '.join(figures)}")
    return lines
