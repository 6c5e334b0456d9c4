"""`--sensitivity` against the truth: Sobol' indices through a trained surrogate beside the same indices
computed with the solver itself, on the same designs (issue 31, item 2).

Problem "advection_front" (problems.py): its solver is the exact solution, so thousands of solves cost
seconds. The surrogate is the tool's default recipe (VAE + GP conditioner + networks, the shipped
condition.txt with only the data keys changed), trained on the first --runs of the problem's training
runs; an existing finished model in --work is reused. Both sides use modules/sensitivity.py's
`sobol_indices` with the same seed, so at N they see the same N·(K+2) designs and the same
bootstrap resamples: the difference is the surrogate's error (plus the estimator's noise, which
pairing reduces). The solver also gives the indices at --reference N (many more designs, narrow
intervals): the truth both are judged by. The surrogate's N is small because each design costs a
prediction, and with the networks blended in (the default recipe) that is ~0.5 s on 2 busy CPU
cores for this problem's 60 × 1024 field. The box is the training runs' (the command line's
default). Quantities: l2, max (a curve over the steps) and node:512 (the concentration at x = 4.995
km over time); the curves are compared through their variance-weighted indices.

    python benchmarks/accuracy/sensitivity_check.py [--runs 64] [--n 256] [--reference 4096] [--work DIR]

Writes benchmarks/accuracy/results/sensitivity.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))            # benchmarks/_common.py

import _common as C  # noqa: E402
from problems import ADV_PARAMETERS, _adv_simulate, generate  # noqa: E402

PROBLEM = "advection_front"
QOIS = ("l2", "max", "node:512")
NAMES = [row[0] for row in ADV_PARAMETERS]


def train(work: Path, params: np.ndarray, fields: np.ndarray) -> None:
    """The default recipe on these runs in `work`, unless a finished model on them is there."""
    marker = work / "trained_on.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"runs": len(params), "problem": PROBLEM}:
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / "input_data").mkdir(parents=True)
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    np.save(work / "input_data" / "dataset1.npy", fields.astype(np.float32))
    np.savetxt(work / "input_data" / "params.csv", params, delimiter=",", fmt="%.10g")
    P, T, N = fields.shape
    values = {"Dim1": P, "Dim2": T, "Dim3": N, "Dim2_red": T, "Dim3_red": N, "n_sample": P,
              "num_param": params.shape[1], "param_dir": "/input_data/params.csv", "input_type": "csvs"}
    (work / "input_data" / "condition.txt").write_text(C.condition_text(ROOT / "input_data" / "condition.txt", values))
    C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), "--preset=1", "--plot=2", "--lc_only=0",
                            "--size=small", "--load_all=1"], work, work / "train.log")
    marker.write_text(json.dumps({"runs": len(params), "problem": PROBLEM}))


def side(result, qois, steps: int) -> dict:
    """Per quantity: S1, ST and their intervals (l2), or the variance-weighted S1 and ST (the curves)."""
    out, col = {}, 0
    for qoi in qois:
        width = steps if qoi.curve else 1
        part = {k: getattr(result, k)[col:col + width] for k in ("S1", "S1_conf", "ST", "ST_conf")}
        weight = np.where(result.constant[col:col + width], 0.0, result.variance[col:col + width])
        col += width
        if qoi.curve:
            out[qoi.spec] = {k: ((np.nan_to_num(part[k]) * weight[:, None]).sum(0) / weight.sum()).tolist()
                             for k in ("S1", "ST")}
        else:
            out[qoi.spec] = {k: v[0].tolist() for k, v in part.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=64, help="training runs (the first of the problem's 96)")
    p.add_argument("--n", type=int, default=256, help="base samples N of the paired comparison (a power of 2)")
    p.add_argument("--reference", type=int, default=4096, help="base samples of the solver's reference indices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=HERE / "data", help="where the problem is generated")
    p.add_argument("--work", type=Path, default=HERE / "work" / "sensitivity", help="the surrogate's working folder")
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")        # the progress lines (modules/progress.py)
    from modules.api import Surrogate
    from modules.baseline import relative_l2
    from modules.sensitivity import parse_qoi, sobol_indices

    src = generate(PROBLEM, args.data)
    params = np.loadtxt(src / "params.csv", delimiter=",", ndmin=2)
    fields = np.load(src / "dataset1.npy", mmap_mode="r")
    split = json.loads((src / "split.json").read_text())
    chosen = np.asarray(split["train"][:args.runs])
    train(args.work, params[chosen], np.asarray(fields[chosen]))
    summary = max((args.work / "runs").glob("*/summary.json"), key=lambda f: f.stat().st_mtime)
    train_seconds = json.loads(summary.read_text())["seconds_total"]        # also when the model was reused
    surrogate = Surrogate.load(args.work, "cpu")
    test = np.asarray(split["test"])
    test_rel = relative_l2(surrogate.predict(params[test]), np.asarray(fields[test], np.float64))
    qois = [parse_qoi(spec) for spec in QOIS]
    steps = surrogate.shape[0]
    low, high = surrogate.model.domain.low.astype(np.float64), surrogate.model.domain.high.astype(np.float64)

    def quantities(fields_of):
        def f(rows):
            out = fields_of(rows)
            return np.concatenate([q.values(out).reshape(len(rows), -1) for q in qois], axis=1)
        return f
    reference = sobol_indices(quantities(_adv_simulate), low, high, args.reference, seed=args.seed, batch=512)
    solver = sobol_indices(quantities(_adv_simulate), low, high, args.n, seed=args.seed, batch=512)
    model = sobol_indices(quantities(surrogate.predict), low, high, args.n, seed=args.seed, batch=64)
    report = {"problem": PROBLEM, "training_runs": int(len(chosen)), "train_seconds": train_seconds,
              "test_rel_l2_mean": float(test_rel.mean()), "test_rel_l2_max": float(test_rel.max()),
              "base_samples": solver.base_samples, "evaluations": solver.evaluations, "seed": args.seed,
              "bounds": {"min": low.tolist(), "max": high.tolist()}, "parameters": NAMES,
              "reference_base_samples": reference.base_samples, "reference_evaluations": reference.evaluations,
              "seconds": {"reference": reference.seconds, "solver": solver.seconds, "surrogate": model.seconds},
              "reference": side(reference, qois, steps), "solver": side(solver, qois, steps),
              "surrogate": side(model, qois, steps),
              "machine": {"cores": C.machine()["cores"], "load_average": C.load_average()}}
    out = HERE / "results" / "sensitivity.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"wrote {out}")


def markdown(r: dict) -> str:
    sec = {k: sum(v.values()) for k, v in r["seconds"].items()}
    rows = [f"{r['problem']}: surrogate trained on {r['training_runs']} runs in {r['train_seconds']:.0f} s "
            f"(test rel-L2 mean {r['test_rel_l2_mean']:.3g}, max {r['test_rel_l2_max']:.3g}); solver reference N = "
            f"{r['reference_base_samples']} ({r['reference_evaluations']} solves, {sec['reference']:.0f} s); paired "
            f"N = {r['base_samples']} ({r['evaluations']} designs: solver {sec['solver']:.1f} s, surrogate "
            f"{sec['surrogate']:.0f} s)",
            "", "| quantity | parameter | S1 reference | S1 solver | S1 surrogate | ST reference | ST solver | "
                "ST surrogate |", "|---|---|---|---|---|---|---|---|"]
    for spec in r["solver"]:
        sides = [r[k][spec] for k in ("reference", "solver", "surrogate")]
        label = spec if "S1_conf" in sides[0] else f"{spec} (variance-weighted)"
        for j, name in enumerate(r["parameters"]):
            cells = []
            for key in ("S1", "ST"):
                for s in sides:
                    conf = f" ± {s[key + '_conf'][j]:.3f}" if key + "_conf" in s else ""
                    cells.append(f"{s[key][j]:.3f}{conf}")
            rows.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
