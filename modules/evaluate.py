"""`--evaluate`: how good is a trained surrogate on held-out runs with known fields?

`--predict INPUTS --evaluate TRUE.npy --out FILE.npy` predicts the runs of INPUTS (CSV rows
or images, in order) and compares them with the true fields of TRUE.npy (n, T, N), run by run:
  per run     relative L2, RMSE and max abs error of the point prediction;
  per step    the relative L2 over the runs at each time step (where in time it goes wrong);
  VAE only    the true fields encoded and decoded: the compression's share of the error,
              so that surrogate − VAE is the conditioner's share;
  baselines   the training-mean field, and POD + GPR refitted on all the training runs
              (on the CSV rows or the GP's picture features; training fields up to the
              baseline's size limit);
  calibration with --samples K: band coverage, CRPS, spread-skill, spread-error correlation.
It writes FILE_evaluation.json (everything) and FILE_evaluation.csv (one row per run), and
with --plot=1 the worst runs' traces and the error over time beside FILE.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from modules.baseline import relative_l2
from modules.errors import UserError

log = logging.getLogger("simulgen")

WORST_FIGURES = 3


def load_truth(path: Path, runs: int, shape: tuple[int, int]) -> np.ndarray:
    """The held-out true fields (runs, T, N), as float64; the training's step and node
    reduction (the first T steps and N nodes) is applied when the file holds more."""
    from modules.data import open_dataset, reduce
    if not path.is_file() or path.suffix not in (".npy", ".pickle", ".pkl"):
        raise UserError(f"--evaluate {path} {'not found' if not path.is_file() else 'is not a .npy file'}; give the "
                        f"held-out runs' true fields as a .npy [n, T, N].")
    try:
        array = open_dataset(path)
    except UserError as exc:
        raise UserError(f"--evaluate {exc}") from None
    if array.ndim != 3:
        raise UserError(f"--evaluate {path} holds an array of shape {array.shape}; it must be [n, T, N] like the "
                        f"training dataset.")
    if len(array) != runs:
        raise UserError(f"--evaluate {path} holds {len(array)} runs but the inputs give {runs}; one true run per input "
                        f"row or image, in the same order.")
    t, n = shape
    if array.shape[1] < t or array.shape[2] < n:
        raise UserError(f"--evaluate {path} has {array.shape[1]} steps × {array.shape[2]} nodes; the surrogate predicts "
                        f"{t} × {n}, so the file must hold at least that many.")
    return np.asarray(reduce(array, t, n), np.float64)


def _baselines(surrogate, truth: np.ndarray, inputs: np.ndarray) -> dict:
    """Mean field, and POD + GPR fitted on every training run on the conditioner's inputs where
    it has them (`inputs`: CSV rows, or the GP's picture features)."""
    from modules.baseline import BASELINE_MAX_BYTES, classical_baselines
    from modules.data import open_dataset, reduce
    if surrogate.dataset is None or not surrogate.dataset.is_file():
        return {"skipped": f"the training dataset {surrogate.dataset} is not there"}
    train = open_dataset(surrogate.dataset)
    if train.shape[0] * truth.shape[1] * truth.shape[2] * 8 > BASELINE_MAX_BYTES:
        return {"skipped": "training fields above the baseline's 2 GiB limit"}
    train = np.asarray(reduce(train, truth.shape[1], truth.shape[2]), np.float64)
    domain = surrogate.domain
    fitted = domain is not None and domain.runs is not None and len(domain.runs) == len(train)
    result = classical_baselines(train, truth, domain.runs if fitted else None, inputs if fitted else None,
                                 methods=("mean", "pod_gpr") if fitted else ("mean",),
                                 blocks=surrogate.field_scaler.blocks)
    out = {f"{k}_rel_l2_per_run": v.tolist() for k, v in result.rel_l2.items()}
    out.update({f"{k}_rel_l2": float(v.mean()) for k, v in result.rel_l2.items()})
    out["pod_modes"] = result.modes
    return out


def evaluate(surrogate, inputs: np.ndarray, files: list[str], truth: np.ndarray, truth_path: Path, point: np.ndarray,
             draws: np.ndarray | None, sampling: str, band_scales: dict[float, float], domain: dict | None) -> dict:
    """The report of the point prediction (n, T, N) and, with --samples, the draws (n, K, T, N) against the
    true fields `truth` (`load_truth`, from `truth_path`); `inputs`: the surrogate's domain_inputs of the
    predicted inputs. Writes nothing (`evaluation_files`)."""
    n = len(truth)
    diff = point - truth
    report: dict = {"truth": str(truth_path), "runs": n, "inputs": files,
                    "network_weight": 0.0 if surrogate.frame_net is None else float(surrogate.frame_net.weight)}
    blocks = surrogate.field_scaler.blocks
    per_run = {"rel_l2": relative_l2(point, truth, blocks), "rmse": np.sqrt((diff ** 2).reshape(n, -1).mean(axis=1)),
               "max_abs_error": np.abs(diff).reshape(n, -1).max(axis=1),
               "vae_rel_l2": relative_l2(surrogate.reconstruct(truth), truth, blocks)}
    report["per_step_rel_l2"] = (np.linalg.norm(diff, axis=2) / np.maximum(np.linalg.norm(truth, axis=2), 1e-30)).mean(axis=0).tolist()
    report["baselines"] = _baselines(surrogate, truth, inputs)
    for key in ("mean_rel_l2_per_run", "pod_gpr_rel_l2_per_run"):
        if key in report["baselines"]:
            per_run["baseline_" + key.replace("_per_run", "")] = np.asarray(report["baselines"][key])
    if draws is not None:
        from modules.calibration import calibration_metrics
        report["calibration"] = {"sampling": sampling, **calibration_metrics(draws, point, truth, band_scales)}
    if domain is not None:
        per_run["out_of_domain"] = np.asarray(domain["out_of_domain"], dtype=bool)
    report["summary"] = {k: {"mean": float(np.mean(v)), "median": float(np.median(v)), "max": float(np.max(v))}
                         for k, v in per_run.items() if v.dtype != bool}
    report["per_run"] = {k: v.tolist() for k, v in per_run.items()}
    return report


def evaluation_files(report: dict, out: Path, files: list[str]) -> dict[Path, object]:
    """FILE_evaluation.json (everything) and FILE_evaluation.csv (one row per run, numbered from 1): their
    paths and writers, for modules/checkpoint.py's `write_together`."""
    from modules.checkpoint import json_bytes
    per_run = {k: np.asarray(v) for k, v in report["per_run"].items()}
    return {out.with_name(out.stem + "_evaluation.json"): lambda f: f.write(json_bytes(report)),
            out.with_name(out.stem + "_evaluation.csv"): lambda f: _write_csv(f, files, per_run)}


def _write_csv(f, files: list[str], per_run: dict[str, np.ndarray]) -> None:
    import io
    text = io.StringIO()
    writer = csv.writer(text)
    names = list(per_run)
    writer.writerow(["run", "input", *names])
    for i in range(len(per_run["rel_l2"])):
        source = files[i] if len(files) == len(per_run["rel_l2"]) else f"{files[0]} row {i + 1}"
        writer.writerow([i + 1, source, *[(int(per_run[k][i]) if per_run[k].dtype == bool else f"{per_run[k][i]:.6g}")
                                          for k in names]])
    f.write(text.getvalue().encode())


def figures(plot: int, out: Path, truth: np.ndarray, point: np.ndarray, report: dict) -> list[str]:
    """The worst runs' traces (file names number the runs from 1) and the error over time, beside FILE."""
    from modules.plots import Figures
    rel = np.asarray(report["per_run"]["rel_l2"])
    saved = Figures(plot, out.parent)
    for rank, run in enumerate(np.argsort(rel)[::-1][:WORST_FIGURES], start=1):
        saved.traces(truth[run], point[run], int(run), f"{out.stem}_worst{rank}_run{run + 1}",
                     f"prediction (rel-L2 {rel[run]:.3g})")
    saved.curve(np.asarray(report["per_step_rel_l2"]), f"{out.stem}_error_over_time", "time step",
                "relative L2 over the runs")
    return [str(p) for p in saved.saved]


def describe(report: dict) -> list[str]:
    """The evaluation in a few lines for the terminal."""
    s = report["summary"]

    def triple(key):
        v = s[key]
        return f"mean {v['mean']:.4g}, median {v['median']:.4g}, max {v['max']:.4g}"

    lines = [f"evaluation on {report['runs']} held-out runs ({report['truth']}):",
             f"  surrogate: relative L2 {triple('rel_l2')}; RMSE mean {s['rmse']['mean']:.4g}; "
             f"max abs error {s['max_abs_error']['max']:.4g}",
             f"  VAE alone (true fields encoded and decoded): relative L2 {triple('vae_rel_l2')} — the compression's "
             + ("share; the rest is the conditioner's" if not report["network_weight"] else
                f"share of the GP's part; the networks blended in (weight {report['network_weight']:.2f} in all) do "
                f"not decode through the VAE")]
    if "baseline_pod_gpr_rel_l2" in s:
        ratio = s["rel_l2"]["mean"] / max(s["baseline_pod_gpr_rel_l2"]["mean"], 1e-30)
        lines.append(f"  POD + GPR (refitted on all training runs): {s['baseline_pod_gpr_rel_l2']['mean']:.4g} "
                     f"(surrogate / POD + GPR = {ratio:.2f}); training-mean field {s['baseline_mean_rel_l2']['mean']:.4g}")
    elif "baseline_mean_rel_l2" in s:
        lines.append(f"  training-mean field: {s['baseline_mean_rel_l2']['mean']:.4g}")
    cal = report.get("calibration")
    if cal:
        lines.append(f"  {cal['samples']} samples ({cal['sampling']}): the 50 % band covers {cal['coverage_50']:.2f} and "
                     f"the 90 % band {cal['coverage_90']:.2f} of the true values; CRPS {cal['crps']:.4g} (point MAE "
                     f"{cal['mae']:.4g}); spread/skill "
                     f"{cal['spread_skill']:.2f}; Spearman(spread, error) {cal['spread_error_spearman']:.2f}")
    flagged = sum(report["per_run"].get("out_of_domain", []))
    if flagged:
        lines.append(f"  {flagged} run(s) outside the training inputs (column out_of_domain in the CSV)")
    lines.append(f"  details: {', '.join(report['files'])}")
    return lines
