"""The accuracy suite: the tool's default recipe against classical reduced-order models.

For every problem of `problems.py` (generated on first use, deterministic), in one run:
  1. the training runs (the fixed split's train part) become a working directory with the
     shipped input_data/condition.txt, of which only the data keys are changed (Dim1-3,
     num_param, n_sample, param_dir, input_type), exactly what a new user would do;
  2. the tool trains through its command line (VAE + MLP conditioner, then the picture
     conditioners with --lc_only=1 on the same VAE), and predicts the held-out test runs
     with --predict;
  3. beside it, on the same split: the training-mean field, POD + GPR and POD + RBF on the
     parameters (and POD + GPR on simple picture features), and the POD projection floor;
     and the VAE's own reconstruction of the test fields (encode → μ → decode).

    python benchmarks/accuracy/run_suite.py                       # every problem, every route
    python benchmarks/accuracy/run_suite.py --problems heat_inclusion --routes csvs
    python benchmarks/accuracy/run_suite.py --set Training_epochs=100 --tag short

Writes benchmarks/accuracy/results/<tag>.json and, for the default tag, RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import re
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
from problems import PROBLEMS, generate, node_coordinates  # noqa: E402

ROUTES = ("csvs", "image", "image_vit")
SAMPLES = 16            # --samples of the calibration measurement
FINE_ENERGY = 0.99999   # a second POD + GPR that keeps more modes: the strongest of the variants measured (NOTES H0b)
DATA_KEYS = ("Dim1", "Dim2", "Dim3", "Dim2_red", "Dim3_red", "n_sample", "num_param", "param_dir", "input_type")


def stage_inputs(folder: Path, src: Path, runs: np.ndarray, fields: np.ndarray, params: np.ndarray,
                 with_images: bool) -> None:
    """dataset1.npy, params.csv and images/1.png.. of `runs`, renumbered from 1."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "dataset1.npy", np.ascontiguousarray(fields[runs]))
    np.savetxt(folder / "params.csv", params[runs], delimiter=",", fmt="%.10g")
    if with_images:
        (folder / "images").mkdir(exist_ok=True)
        for new, old in enumerate(runs, start=1):
            shutil.copy(src / "images" / f"{old + 1}.png", folder / "images" / f"{new}.png")


def run_cli(workdir: Path, args: list[str], log: Path) -> float:
    return C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), *args], workdir, log)


def vae_reconstruction(workdir: Path, test_fields: np.ndarray) -> np.ndarray:
    """The trained VAE's encode (μ) → decode (`fix`) of the test fields, physical units."""
    import torch
    from modules.surrogate import Surrogate
    from modules.run import Paths
    return Surrogate.load(Paths(workdir), torch.device("cpu")).reconstruct(test_fields)


def stats(rel: np.ndarray, mean_rel: np.ndarray) -> dict:
    return {"mean": float(rel.mean()), "median": float(np.median(rel)), "max": float(rel.max()),
            "over_mean_field": float(rel.mean() / mean_rel.mean())}


def run_problem(name: str, routes: list[str], overrides: list[str], data_dir: Path, work_root: Path,
                tag: str, reuse_vae: bool = False, positions: bool = False) -> dict:
    from modules.baseline import classical_baselines, relative_l2
    from modules.cond_inputs import ImageFeatures, list_images, load_images

    problem = PROBLEMS[name]
    src = generate(name, data_dir)
    fields = np.load(src / "dataset1.npy", mmap_mode="r")
    params = np.loadtxt(src / "params.csv", delimiter=",", ndmin=2)
    split = json.loads((src / "split.json").read_text())
    train, test = np.asarray(split["train"]), np.asarray(split["test"])
    train_fields, test_fields = np.asarray(fields[train], np.float64), np.asarray(fields[test], np.float64)
    result: dict = {"problem": name, "description": problem.description, "shape": list(fields.shape),
                    "train_runs": len(train), "test_runs": len(test), "overrides": overrides}

    started = time.perf_counter()
    base = classical_baselines(train_fields, test_fields, params[train], params[test])
    result["baselines"] = {k: stats(v, base.rel_l2["mean"]) for k, v in base.rel_l2.items()}
    result["pod_modes"] = base.modes
    fine = classical_baselines(train_fields, test_fields, params[train], params[test], methods=("pod_gpr",),
                               energy=FINE_ENERGY)
    result["baselines"]["pod_gpr_fine"] = stats(fine.rel_l2["pod_gpr"], base.rel_l2["mean"])
    result["pod_modes_fine"] = fine.modes
    if problem.has_images:
        images = load_images(list_images(src / "images", ".png", len(fields)), 256)
        feats = ImageFeatures.fit(images, train).transform(images)
        picture = classical_baselines(train_fields, test_fields, feats[train], feats[test], methods=("pod_gpr",))
        result["baselines"]["pod_gpr_picture"] = stats(picture.rel_l2["pod_gpr"], base.rel_l2["mean"])
    result["baseline_seconds"] = time.perf_counter() - started

    work = work_root / tag / name
    if not reuse_vae:
        shutil.rmtree(work, ignore_errors=True)
        stage_inputs(work / "input_data", src, train, fields, params, problem.has_images)
        stage_inputs(work / "test_inputs", src, test, fields, params, problem.has_images)
        shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    elif not (work / "checkpoints" / "vae.pt").is_file():
        sys.exit(f"error: --reuse-vae: {work} holds no trained VAE; run this tag without --reuse-vae first.")
    if positions:           # the nodes' true coordinates for the point network, as a mesh would give them
        np.savetxt(work / "input_data" / "nodes.csv", node_coordinates(name), delimiter=",")
        overrides = [*overrides, "node_positions=/input_data/nodes.csv"]
    log = work / "train.log"
    result["routes"] = {}
    first = True
    for route in routes:
        if route != "csvs" and not problem.has_images:
            continue
        values = {"Dim1": len(train), "Dim2": fields.shape[1], "Dim3": fields.shape[2], "Dim2_red": fields.shape[1],
                  "Dim3_red": fields.shape[2], "n_sample": len(train), "num_param": params.shape[1],
                  "param_dir": "/input_data/params.csv" if route == "csvs" else "/input_data/images",
                  "input_type": route}
        (work / "input_data" / "condition.txt").write_text(C.condition_text(ROOT / "input_data" / "condition.txt", values))
        sets = [a for o in overrides for a in ("--set", o)]
        seconds = run_cli(work, ["--preset=1", "--plot=2", f"--lc_only={0 if first and not reuse_vae else 1}", "--size=small",
                                 "--load_all=1", *sets], log)
        summary = json.loads(max((work / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime).read_text())
        if first:
            recon = vae_reconstruction(work, test_fields)
            result["vae_reconstruction"] = stats(relative_l2(recon, test_fields), base.rel_l2["mean"])
            result["vae_seconds"] = summary.get("vae_seconds")
        source = work / "test_inputs" / ("params.csv" if route == "csvs" else "images")
        out = work / f"pred_{route}.npy"
        run_cli(work, ["--predict", str(source), "--out", str(out)], log)
        point = np.load(out)
        rel = relative_l2(point, test_fields)
        drawn = work / f"pred_{route}_samples.npy"           # the tool's own --evaluate gives the calibration
        run_cli(work, ["--predict", str(source), "--evaluate", str(work / "test_inputs" / "dataset1.npy"),
                       "--out", str(drawn), "--samples", str(SAMPLES)], log)
        calibration = json.loads(drawn.with_name(drawn.stem + "_evaluation.json").read_text())["calibration"]
        drawn.unlink()
        result["routes"][route] = {**stats(rel, base.rel_l2["mean"]), "seconds": seconds, "calibration": calibration,
                                   "over_pod_gpr": float(rel.mean() / base.mean("pod_gpr")),
                                   "in_run_baseline": {k: summary.get(k) for k in
                                                       ("lc_val_rel_l2", "baseline_pod_gpr_rel_l2",
                                                        "baseline_mean_field_rel_l2")}}
        first = False
    return result


def markdown(results: list[dict]) -> str:
    rows = ["| problem | method | test rel-L2 mean | median | max | / mean field | / POD+GPR |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        gpr = r["baselines"]["pod_gpr"]["mean"]
        entries = [(f"tool: {k}", v) for k, v in r["routes"].items()]
        entries += [("tool: VAE reconstruction", r["vae_reconstruction"])] if "vae_reconstruction" in r else []
        names = {"mean": "training-mean field", "pod_gpr": "POD + GPR (parameters)", "pod_rbf": "POD + RBF (parameters)",
                 "pod_gpr_picture": "POD + GPR (picture features)", "pod_floor": f"POD floor ({r['pod_modes']} modes)",
                 "pod_gpr_fine": f"POD + GPR (parameters, {r.get('pod_modes_fine')} modes: {FINE_ENERGY:.3%} energy)"}
        entries += [(names[k], v) for k, v in r["baselines"].items()]
        for label, s in entries:
            rows.append(f"| {r['problem']} | {label} | {s['mean']:.4f} | {s['median']:.4f} | {s['max']:.4f} | "
                        f"{s['over_mean_field']:.2f} | {s['mean'] / gpr:.2f} |")
    return "\n".join(rows)


def calibration_markdown(results: list[dict]) -> str:
    rows = ["| problem | route | sampling | 50 % band covers | 90 % band covers | CRPS | MAE (point) | spread / skill | "
            "Spearman(spread, error) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for route, v in r["routes"].items():
            c = v.get("calibration")
            if c:
                rows.append(f"| {r['problem']} | {route} | {c['sampling']} | {c['coverage_50']:.2f} | "
                            f"{c['coverage_90']:.2f} | {c['crps']:.4g} | {c.get('mae', float('nan')):.4g} | "
                            f"{c['spread_skill']:.2f} | "
                            f"{c['spread_error_spearman']:.2f} |")
    return "\n".join(rows)


def replace_marked(text: str, marker: str, body: str) -> str:
    block = f"<!-- {marker} -->\n{body}\n<!-- /{marker} -->"
    pattern = rf"<!-- {marker} -->.*<!-- /{marker} -->"
    return re.sub(pattern, lambda _: block, text, flags=re.S) if f"<!-- {marker} -->" in text else text + "\n" + block + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="extra condition-file overrides for every training run (experiments)")
    p.add_argument("--data", type=Path, default=HERE / "data", help="where the problems are generated")
    p.add_argument("--work", type=Path, default=HERE / "work", help="working directories of the runs")
    p.add_argument("--tag", default="default", help="name of this configuration's results")
    p.add_argument("--positions", action="store_true",
                   help="give the point network the nodes' true coordinates (node_positions, a nodes.csv) rather "
                        "than the embedding it learns without a mesh")
    p.add_argument("--reuse-vae", action="store_true",
                   help="keep the VAEs an earlier run of this tag trained and retrain only the conditioners "
                        "(--lc_only=1): for conditioner experiments")
    args = p.parse_args()
    results = []
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    for name in args.problems:
        print(f"== {name}", flush=True)
        results.append(run_problem(name, args.routes, args.overrides, args.data, args.work, args.tag, args.reuse_vae,
                                   args.positions))
        (out_dir / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
        print(markdown(results[-1:]), flush=True)
    if args.tag == "default" and not args.overrides and not args.reuse_vae and not args.positions:
        text = (HERE / "RESULTS.md").read_text() if (HERE / "RESULTS.md").exists() else ""
        text = replace_marked(text, "table", markdown(results))
        text = replace_marked(text, "calibration", calibration_markdown(results))
        (HERE / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
