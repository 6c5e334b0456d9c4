"""Active sampling with `--suggest` against a scrambled Sobol' sequence: the test error against the number of runs.

Start from `--start` runs of one problems.py problem (a seeded Latin hypercube of its parameter box, run through
its solver), then add `--step` runs per round up to `--stop`, chosen either by `--suggest` on the model trained
on the runs so far (with `--bounds` the problem's box) or, separately, as the next points of a scrambled Sobol'
sequence of the same box; each round the new rows go through the solver and the tool is retrained from scratch
(the shipped condition file, its data keys set, shortened by `--set`). Each model's point prediction is scored
on test runs drawn from a Latin hypercube of their own (mean relative L2 over the runs), beside POD + GPR and
POD + RBF fitted on the same runs (what the design is worth without the tool's training noise). One training
at a time; each model's numbers are kept in its working folder (score.json) as soon as they exist, so an
interrupted curve keeps its finished points, and a rerun skips them.

    python benchmarks/accuracy/suggest_curve.py --problem demo --start 40 --step 8 --stop 96
    python benchmarks/accuracy/suggest_curve.py --problem demo --stop 64 --arms suggest --set Training_epochs=20

Writes benchmarks/accuracy/results/suggest_curve_<problem>[_<tag>].json and .png (error against runs, both arms),
and prints the runs the Sobol' arm needs to reach the error --suggest reached, per round ("runs saved").
"""
from __future__ import annotations

import argparse
import importlib.util
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
import problems as P  # noqa: E402

SEED = 31                   # the starting hypercube's; the test runs' is SEED + 1, the Sobol' arm's SEED + 2
TEST_RUNS = 64
DEFAULT_SETS = ("Training_epochs=30", "frame_net_epochs=60", "gp_point_net=off", "baseline=0")


def _demo():
    spec = importlib.util.spec_from_file_location("make_demo", P.DEMO_DIR / "make_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def solver(name: str):
    """(box (F, 2), decimals, simulate: params (n, F) → fields (n, T, N) float32) of a problems.py problem."""
    if name == "demo":
        demo = _demo()
        return np.array([[lo, hi] for _, lo, hi, _ in demo.PARAMETERS]), 4, demo.simulate
    table, simulate = {"heat_inclusion": (P.HEAT_PARAMETERS, P._heat_simulate),
                       "advection_front": (P.ADV_PARAMETERS, P._adv_simulate),
                       "burgers": (P.BURGERS_PARAMETERS,
                                   lambda p: P._burgers_simulate(p)[:, :, :: P.BURGERS_FINE // P.BURGERS_NODES]),
                       "wave_membrane": (P.WAVE_PARAMETERS, P._wave_simulate)}[name]
    return np.array([[lo, hi] for _, lo, hi, _, _ in table]), max(t[4] for t in table), simulate


def hypercube(box: np.ndarray, count: int, seed: int, decimals: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    unit = np.stack([(rng.permutation(count) + rng.random(count)) / count for _ in box], 1)
    return np.round(box[:, 0] + unit * (box[:, 1] - box[:, 0]), decimals)


def sobol(box: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The first `count` points of a scrambled Sobol' sequence of the box (the arm's whole sequence)."""
    from scipy.stats import qmc
    unit = qmc.Sobol(len(box), scramble=True, seed=seed).random_base2(max(count - 1, 1).bit_length())[:count]
    return qmc.scale(unit, box[:, 0], box[:, 1])


def simulate(fn, params: np.ndarray) -> np.ndarray:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):          # the demo's solver prints its time step
        return np.asarray(fn(params), np.float32)


def train_and_score(work: Path, params: np.ndarray, fields: np.ndarray, test: tuple[np.ndarray, np.ndarray],
                    sets: list[str], log: Path) -> dict:
    """A fresh working folder with these runs, trained by the command line; the test runs' mean relative L2."""
    from modules.baseline import relative_l2
    shutil.rmtree(work, ignore_errors=True)
    (work / "input_data").mkdir(parents=True)
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    np.save(work / "input_data" / "dataset1.npy", fields)
    np.savetxt(work / "input_data" / "params.csv", params, delimiter=",", fmt="%.10g")
    np.savetxt(work / "test_params.csv", test[0], delimiter=",", fmt="%.10g")
    shape = fields.shape
    values = {"Dim1": shape[0], "Dim2": shape[1], "Dim3": shape[2], "Dim2_red": shape[1], "Dim3_red": shape[2],
              "n_sample": shape[0], "num_param": params.shape[1], "param_dir": "/input_data/params.csv",
              "input_type": "csvs"}
    (work / "input_data" / "condition.txt").write_text(C.condition_text(ROOT / "input_data" / "condition.txt", values))
    started = time.perf_counter()
    C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), "--preset=1", "--plot=2", "--lc_only=0",
                  "--size=small", "--load_all=1", *[a for s in sets for a in ("--set", s)]], work, log)
    train_seconds = time.perf_counter() - started
    C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), "--predict", "test_params.csv", "--out", "pred.npy"],
                 work, log)
    rel = relative_l2(np.load(work / "pred.npy"), test[1].astype(np.float64))
    return {"runs": len(params), "rel_l2": float(rel.mean()), "rel_l2_median": float(np.median(rel)),
            "rel_l2_max": float(rel.max()), "train_seconds": train_seconds}


def classical(params: np.ndarray, fields: np.ndarray, test: tuple[np.ndarray, np.ndarray]) -> dict:
    """POD + GPR and POD + RBF on the same runs: what the design is worth without the tool's training noise."""
    from modules.baseline import classical_baselines
    result = classical_baselines(fields.astype(np.float64), test[1].astype(np.float64), params, test[0],
                                 methods=("pod_gpr", "pod_rbf"))
    return {key: float(value.mean()) for key, value in result.rel_l2.items()}


def suggested(work: Path, k: int, box: np.ndarray, seed: int, log: Path) -> tuple[np.ndarray, float, dict]:
    """`--suggest k` in the problem's box from the model in `work`: the rows as the solver reads them."""
    bounds = work / "bounds.csv"
    np.savetxt(bounds, box.T, delimiter=",", fmt="%.10g")
    out = work / "suggested.csv"
    seconds = C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), "--suggest", str(k), "--bounds",
                            str(bounds), "--out", str(out), "--seed", str(seed), "--force"], work, log)
    meta = json.loads(out.with_suffix(".json").read_text())
    return np.loadtxt(out, delimiter=",", ndmin=2), seconds, {"spread": [r["spread"] for r in meta["rows"]],
                                                              "candidate_spread": meta["candidate_spread"]}


def runs_for(curve: list[dict], error: float) -> float | None:
    """The runs at which `curve` (by runs) reaches `error`, interpolated linearly in log(error); None: it does not."""
    runs = np.array([p["runs"] for p in curve], float)
    errs = np.log(np.array([p["rel_l2"] for p in curve]))
    below = np.flatnonzero(errs <= np.log(error))
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(runs[0])
    t = (errs[i - 1] - np.log(error)) / (errs[i - 1] - errs[i])
    return float(runs[i - 1] + t * (runs[i] - runs[i - 1]))


def savings(report: dict) -> list[dict]:
    """Per point of the --suggest arm: the runs the Sobol' arm needs for the same error, and the difference."""
    out = []
    for point in report["arms"]["suggest"]:
        need = runs_for(report["arms"]["sobol"], point["rel_l2"])
        out.append({"runs": point["runs"], "rel_l2": point["rel_l2"], "sobol_runs_for_that_error": need,
                    "runs_saved": None if need is None else need - point["runs"]})
    return out


def figure(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, style in (("sobol", "o-"), ("suggest", "s-")):
        points = report["arms"][arm]
        name = "scrambled Sobol'" if arm == "sobol" else "--suggest"
        line, = ax.plot([p["runs"] for p in points], [p["rel_l2"] for p in points], style, label=f"{name}: the tool")
        if all("pod_gpr" in p for p in points):
            ax.plot([p["runs"] for p in points], [p["pod_gpr"] for p in points], style[0] + "--", alpha=0.6,
                    color=line.get_color(), label=f"{name}: POD + GPR")
    ax.set_xlabel("training runs")
    ax.set_ylabel("test relative L2 (mean over runs)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{report['problem']}: {report['test_runs']} test runs", fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="demo", choices=sorted(P.PROBLEMS))
    parser.add_argument("--start", type=int, default=40)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--stop", type=int, default=96)
    parser.add_argument("--arms", nargs="+", default=["suggest", "sobol"], choices=("suggest", "sobol"))
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"training keys (default: {' '.join(DEFAULT_SETS)})")
    parser.add_argument("--tag", default="")
    parser.add_argument("--work", type=Path, default=Path("/tmp/suggest_curve"))
    args = parser.parse_args()
    sets = list(args.set or DEFAULT_SETS)
    name = args.problem + (f"_{args.tag}" if args.tag else "")
    out = HERE / "results" / f"suggest_curve_{name}.json"
    box, decimals, fn = solver(args.problem)
    test_params = hypercube(box, TEST_RUNS, SEED + 1, decimals)
    test = (test_params, simulate(fn, test_params))
    start = hypercube(box, args.start, SEED, decimals)
    report = {"problem": args.problem, "start": args.start, "step": args.step, "sets": sets, "test_runs": TEST_RUNS,
              "arms": {arm: [] for arm in ("suggest", "sobol")}, "cores": C.machine()["cores"]}
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "suggest_curve.log"
    C.busy_warning()

    def save():
        report["savings"] = savings(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    sequence = sobol(box, args.stop - args.start, SEED + 2)
    state = {arm: (start, simulate(fn, start)) for arm in args.arms}
    for runs in range(args.start, args.stop + 1, args.step):      # both arms round by round: a cut curve is even
        for arm in args.arms:
            params, fields = state[arm]
            work, info = args.work / f"{arm}_{runs}", {}
            score = work / "score.json"
            if arm == "sobol" and runs == args.start and (args.work / f"suggest_{runs}" / "score.json").is_file():
                work, score = args.work / f"suggest_{runs}", args.work / f"suggest_{runs}" / "score.json"
            if score.is_file():                                 # finished by an earlier invocation: its runs
                point = json.loads(score.read_text())
                params = np.loadtxt(work / "input_data" / "params.csv", delimiter=",", ndmin=2)
                fields = np.load(work / "input_data" / "dataset1.npy")
            else:
                if runs != args.start:                          # the new rows, through the solver
                    if arm == "sobol":
                        new = np.round(sequence[runs - args.step - args.start:runs - args.start], decimals)
                    else:
                        new, seconds, info = suggested(args.work / f"{arm}_{runs - args.step}", args.step, box,
                                                       SEED + runs, log)
                        info["seconds"] = seconds
                    params = np.concatenate([params, new])
                    fields = np.concatenate([fields, simulate(fn, new)])
                point = {**train_and_score(work, params, fields, test, sets, log), **({"suggest": info} if info else {})}
                score.write_text(json.dumps(point, indent=1) + "\n")
                print(f"{arm} {runs} runs: test rel-L2 {point['rel_l2']:.4g} (training {point['train_seconds']:.0f} s)",
                      flush=True)
            if "pod_gpr" not in point:
                point.update(classical(params, fields, test))
                score.write_text(json.dumps(point, indent=1) + "\n")
            state[arm] = params, fields
            report["arms"][arm].append(point)
            save()
    save()
    figure(report, out.with_suffix(".png"))
    for item in report["savings"]:
        need = item["sobol_runs_for_that_error"]
        print(f"--suggest at {item['runs']} runs: rel-L2 {item['rel_l2']:.4g}; Sobol' needs "
              + ("more than it had" if need is None else f"{need:.1f} runs ({item['runs_saved']:+.1f})"))


if __name__ == "__main__":
    main()
