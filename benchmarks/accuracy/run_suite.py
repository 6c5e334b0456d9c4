"""The accuracy suite: the tool's default recipe against the strongest classical reduced-order models,
under a locked test protocol (NOTES.md, "Protocol").

Problems: the five generated ones of `problems.py` (their 96 training runs) and the four finite-element
studies of `fem.py` (scikit-fem, written as XDMF files and brought in through `--import_runs`, as a user's
would be). Two modes:

    --mode dev      (default) every problem's training runs split into FOLDS seeded folds; the tool and the
                    classical models train on all folds but one (`--fold`) and are scored on that one.
                    Development decisions (NOTES hypotheses, defaults) are judged here, and only here.
    --mode locked   train on every training run, score on the problem's locked test runs, drawn from a seed
                    of their own (`problems.generate_locked`, fem.py's "locked" part). Run once per release,
                    by this command; RESULTS.md shows these numbers beside the dev fold's.

In each, per problem and on the same runs: the tool through its command line (the shipped
input_data/condition.txt with only the data keys changed: VAE + GP conditioner + networks, then the
picture route with --lc_only=1 on problems with pictures, then for the FEM studies the point network
without the mesh's coordinates, `node_positions embedding`), predicting and evaluating the scored runs
with `--predict --evaluate --samples`; beside it the training-mean field, POD + GPR at 99.9 % energy,
POD + GPR at its best (modes and one GP per coefficient or one shared kernel, chosen by leave-one-out on
the training runs), POD + RBF and the POD projection floor; and the VAE's own reconstruction.

    python benchmarks/accuracy/run_suite.py                                  # dev fold 0, every problem
    python benchmarks/accuracy/run_suite.py --mode locked                    # the release numbers
    python benchmarks/accuracy/run_suite.py --problems heat_plate --set point_net_steps=3000 --tag probe

Writes benchmarks/accuracy/results/<mode>[_<tag>].json and, for the default tag, RESULTS.md's table.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))            # benchmarks/_common.py

import _common as C  # noqa: E402
import fem  # noqa: E402
from problems import PROBLEMS, generate, generate_locked  # noqa: E402

FOLDS = 5
SAMPLES = 16            # --samples of the calibration measurement
BASELINES = {"mean": "training-mean field", "pod_gpr": "POD + GPR (99.9 % energy)",
             "pod_gpr_best": "POD + GPR (modes, variant: leave-one-out)", "pod_rbf": "POD + RBF",
             "pod_floor": "POD floor", "pod_gpr_picture": "POD + GPR (picture features)"}


@dataclass
class Runs:
    """One side of a split: the runs' parameters, fields (n, T, N) and, where the problem has them, pictures
    (files) or solver files (XDMF)."""
    params: np.ndarray
    fields: np.ndarray | None = None
    pictures: list[Path] | None = None
    files: list[Path] | None = None


def fold_split(count: int, fold: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training, scored) indices of `count` runs: fold `fold` of FOLDS seeded folds is scored."""
    parts = np.array_split(np.random.default_rng(seed).permutation(count), FOLDS)
    scored = np.sort(parts[fold])
    return np.setdiff1d(np.arange(count), scored), scored


def generated_runs(name: str, mode: str, fold: int, data: Path) -> tuple[Runs, Runs]:
    """A problems.py problem's (training, scored) runs."""
    src = generate(name, data)
    fields = np.load(src / "dataset1.npy", mmap_mode="r")
    params = np.loadtxt(src / "params.csv", delimiter=",", ndmin=2)
    pool = np.asarray(json.loads((src / "split.json").read_text())["train"])
    pictures = [src / "images" / f"{r + 1}.png" for r in range(len(params))] if PROBLEMS[name].has_images else None

    def side(idx):
        return Runs(params[idx], np.asarray(fields[idx], np.float64), [pictures[i] for i in idx] if pictures else None)
    if mode == "dev":
        train, scored = fold_split(len(pool), fold)
        return side(pool[train]), side(pool[scored])
    locked = generate_locked(name, data)
    lp = np.loadtxt(locked / "params.csv", delimiter=",", ndmin=2)
    locked_pictures = [locked / "images" / f"{r + 1}.png" for r in range(len(lp))] if pictures else None
    return side(pool), Runs(lp, np.load(locked / "dataset1.npy").astype(np.float64), locked_pictures)


def study_runs(name: str, mode: str, fold: int, data: Path) -> tuple[Runs, Runs]:
    """A fem.py study's (training, scored) runs, as solver files."""
    src = fem.write_study(name, data)

    def part(folder):
        params = np.loadtxt(src / folder / "params.csv", delimiter=",", ndmin=2)
        return params, [src / folder / f"run_{i + 1}.xdmf" for i in range(len(params))]
    params, files = part("train")
    if mode == "dev":
        train, scored = fold_split(len(params), fold)
        return (Runs(params[train], files=[files[i] for i in train]),
                Runs(params[scored], files=[files[i] for i in scored]))
    locked_params, locked_files = part("locked")
    return Runs(params, files=files), Runs(locked_params, files=locked_files)


def stage(folder: Path, runs: Runs, work: Path, log: Path, imported: tuple[str, ...]) -> np.ndarray:
    """`folder` holds the runs as the tool reads them (dataset1.npy, params.csv, images/), solver files
    brought in with --import_runs; returns their fields (n, T, N) in the dataset's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "params.csv", runs.params, delimiter=",", fmt="%.10g")
    if runs.pictures:
        (folder / "images").mkdir(exist_ok=True)
        for new, picture in enumerate(runs.pictures, start=1):
            shutil.copy(picture, folder / "images" / f"{new}.png")
    if runs.files is None:
        np.save(folder / "dataset1.npy", runs.fields.astype(np.float32))
        return runs.fields
    links = folder / "sims"              # numbered 1.. in this side's order (--import_runs sorts naturally); each
    links.mkdir(exist_ok=True)           # .xdmf names its .h5 as the solver wrote it
    for new, source in enumerate(runs.files, start=1):
        (links / f"run_{new}.xdmf").symlink_to(source)
        (links / source.with_suffix(".h5").name).symlink_to(source.with_suffix(".h5"))
    fields = [a for f in imported for a in ("--field", f)]
    C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), "--import_runs", str(links / "run_*.xdmf"), *fields,
                  "--set", f"dataset_dir={folder.relative_to(work)}"], work, log)
    return np.load(folder / "dataset1.npy").astype(np.float64)


def stats(rel: np.ndarray, reference: float) -> dict:
    return {"mean": float(rel.mean()), "median": float(np.median(rel)), "max": float(rel.max()),
            "over_best_classical": float(rel.mean() / reference)}


def baselines(train: Runs, scored: Runs, train_fields, scored_fields, blocks: int) -> tuple[dict, dict]:
    from modules.baseline import classical_baselines
    from modules.cond_inputs import ImageFeatures, load_images
    result = classical_baselines(train_fields, scored_fields, train.params, scored.params, blocks=blocks)
    out = {k: v for k, v in result.rel_l2.items()}
    info = {"pod_modes": result.modes, "pod_gpr_best_modes": result.best.modes,
            "pod_gpr_best_variant": result.best.variant}
    if train.pictures:
        images = load_images(train.pictures + scored.pictures, 256)
        feats = ImageFeatures.fit(images, np.arange(len(train.pictures))).transform(images)
        picture = classical_baselines(train_fields, scored_fields, feats[:len(train.pictures)],
                                      feats[len(train.pictures):], methods=("pod_gpr",), blocks=blocks)
        out["pod_gpr_picture"] = picture.rel_l2["pod_gpr"]
    return out, info


def run_cli(work: Path, args: list[str], log: Path) -> float:
    return C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), *args], work, log)


def tool_route(work: Path, route: str, first: bool, overrides: list[str], scored_fields: np.ndarray,
               truth: Path, blocks: int, reference: float, log: Path, shape: tuple, num_param: int) -> dict:
    """Train (the VAE too when `first`), predict and evaluate the scored runs through the command line."""
    from modules.baseline import relative_l2
    values = {"Dim1": shape[0], "Dim2": shape[1], "Dim3": shape[2], "Dim2_red": shape[1], "Dim3_red": shape[2],
              "n_sample": shape[0], "num_param": num_param,
              "param_dir": "/input_data/params.csv" if route != "image" else "/input_data/images",
              "input_type": "csvs" if route != "image" else "image"}
    (work / "input_data" / "condition.txt").write_text(C.condition_text(ROOT / "input_data" / "condition.txt", values))
    sets = [a for o in overrides for a in ("--set", o)]
    seconds = run_cli(work, ["--preset=1", "--plot=2", f"--lc_only={0 if first else 1}", "--size=small",
                             "--load_all=1", *sets], log)
    summary = json.loads(max((work / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime).read_text())
    source = work / "test_inputs" / ("images" if route == "image" else "params.csv")
    out = work / f"pred_{route}.npy"
    run_cli(work, ["--predict", str(source), "--evaluate", str(truth), "--out", str(out), "--samples", str(SAMPLES)],
            log)
    report = json.loads(out.with_name(out.stem + "_evaluation.json").read_text())
    rel = relative_l2(np.load(out), scored_fields, blocks)          # the point prediction
    keys = ("lc_val_rel_l2", "baseline_best_rel_l2", "baseline_best", "lc_frame_net_weight", "lc_point_net_weight",
            "lc_point_net_positions", "vae_epochs", "lc_frame_net_steps", "lc_point_net_steps", "seconds_total")
    return {**stats(rel, reference), "seconds": seconds, "calibration": report.get("calibration"),
            "in_run": {k: summary.get(k) for k in keys}}


def run_problem(name: str, mode: str, fold: int, overrides: list[str], data: Path, work_root: Path,
                tag: str, routes: set[str]) -> dict:
    from modules.baseline import relative_l2
    started = time.perf_counter()
    is_study = name in fem.STUDIES
    train, scored = (study_runs if is_study else generated_runs)(name, mode, fold, data)
    work = work_root / f"{mode}_{tag}" / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "input_data").mkdir(parents=True)
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    log = work / "train.log"
    imported = fem.STUDIES[name].imported if is_study else ()
    train_fields = stage(work / "input_data", train, work, log, imported)
    scored_fields = stage(work / "test_inputs", scored, work, log, imported)
    truth = work / "test_inputs" / "dataset1.npy"
    blocks = len(imported) if is_study else 1
    result: dict = {"problem": name, "mode": mode, "fold": fold if mode == "dev" else None,
                    "shape": list(train_fields.shape), "scored_runs": len(scored_fields), "overrides": overrides}
    rel, info = baselines(train, scored, train_fields, scored_fields, blocks)
    reference = min(rel[k].mean() for k in ("pod_gpr", "pod_gpr_best", "pod_rbf"))
    result["baselines"] = {k: stats(v, reference) for k, v in rel.items()}
    result.update(info)
    result["best_classical"] = float(reference)
    result["routes"] = {}
    result["routes"]["csvs"] = tool_route(work, "csvs", True, overrides, scored_fields, truth, blocks, reference,
                                          log, train_fields.shape, train.params.shape[1])
    from modules.run import Paths
    from modules.surrogate import Surrogate
    import torch
    recon = Surrogate.load(Paths(work), torch.device("cpu")).reconstruct(scored_fields)
    result["vae_reconstruction"] = stats(relative_l2(recon, scored_fields, blocks), reference)
    if train.pictures and "image" in routes:
        result["routes"]["image"] = tool_route(work, "image", False, overrides, scored_fields, truth, blocks,
                                               reference, log, train_fields.shape, train.params.shape[1])
    if is_study and "embedding" in routes:       # without the mesh's coordinates
        result["routes"]["csvs, no coordinates"] = tool_route(
            work, "csvs", False, [*overrides, "node_positions=embedding"], scored_fields, truth, blocks, reference,
            log, train_fields.shape, train.params.shape[1])
    result["seconds"] = time.perf_counter() - started
    return result


def markdown(results: list[dict]) -> str:
    rows = ["| problem | method | rel-L2 mean | median | max | / best classical |", "|---|---|---|---|---|---|"]
    for r in results:
        entries = [(f"tool: {k}", v) for k, v in r["routes"].items()]
        entries += [("tool: VAE reconstruction", r["vae_reconstruction"])]
        names = {**BASELINES, "pod_floor": f"POD floor ({r['pod_modes']} modes)",
                 "pod_gpr_best": f"POD + GPR best ({r['pod_gpr_best_modes']} modes, {r['pod_gpr_best_variant']})"}
        entries += [(names[k], v) for k, v in r["baselines"].items()]
        for label, s in entries:
            rows.append(f"| {r['problem']} | {label} | {s['mean']:.4g} | {s['median']:.4g} | {s['max']:.4g} | "
                        f"{s['over_best_classical']:.2f} |")
    return "\n".join(rows)


def side_by_side(dev: list[dict], locked: list[dict]) -> str:
    """One row per problem and route: the tool over the best classical model on the dev fold and on the
    locked runs."""
    by = {(r["problem"], route): v for r in locked for route, v in r["routes"].items()}
    rows = ["| problem | route | dev fold: tool | best classical | ratio | locked: tool | best classical | ratio | "
            "locked 90 % / 50 % band covers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in dev:
        lk = next((x for x in locked if x["problem"] == r["problem"]), None)
        for route, v in r["routes"].items():
            w = by.get((r["problem"], route))
            cal = (w or {}).get("calibration") or {}
            locked_cells = (f"{w['mean']:.4g} | {lk['best_classical']:.4g} | **{w['over_best_classical']:.2f}** | "
                            f"{cal.get('coverage_90', float('nan')):.2f} / {cal.get('coverage_50', float('nan')):.2f}"
                            if w else "— | — | — | —")
            rows.append(f"| {r['problem']} | {route} | {v['mean']:.4g} | {r['best_classical']:.4g} | "
                        f"{v['over_best_classical']:.2f} | {locked_cells} |")
    return "\n".join(rows)


def readme_table(dev: list[dict], locked: list[dict]) -> str:
    """README's accuracy table: per problem, the parameter route's ratio to the best classical model on the dev
    fold and on the locked runs, the locked runs' band covers, and the other routes' locked ratios."""
    rows = ["| problem | dev fold | locked test | locked 90 % / 50 % covers | other routes (locked) |",
            "|---|---|---|---|---|"]
    for r in dev:
        lk = next((x for x in locked if x["problem"] == r["problem"]), {"routes": {}})
        main = lk["routes"].get("csvs")
        cal = (main or {}).get("calibration") or {}
        others = ", ".join(f"{k.replace('csvs, ', '')} {v['over_best_classical']:.2f}×" for k, v in lk["routes"].items()
                           if k != "csvs")
        rows.append(f"| {r['problem']} | {r['routes']['csvs']['over_best_classical']:.2f}× | "
                    + (f"**{main['over_best_classical']:.2f}×** | {cal.get('coverage_90', float('nan')):.2f} / "
                       f"{cal.get('coverage_50', float('nan')):.2f}" if main else "— | —") + f" | {others or '—'} |")
    return "\n".join(rows)


def replace_marked(text: str, marker: str, body: str) -> str:
    block = f"<!-- {marker} -->\n{body}\n<!-- /{marker} -->"
    pattern = rf"<!-- {marker} -->.*<!-- /{marker} -->"
    return re.sub(pattern, lambda _: block, text, flags=re.S) if f"<!-- {marker} -->" in text else text + "\n" + block + "\n"


def main() -> None:
    names = [*PROBLEMS, *fem.STUDIES]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("dev", "locked"), default="dev")
    p.add_argument("--fold", type=int, default=0, choices=range(FOLDS), help="the dev fold scored")
    p.add_argument("--problems", nargs="+", default=names, choices=names)
    p.add_argument("--routes", nargs="+", default=["image", "embedding"], choices=["image", "embedding"],
                   help="beside the CSV route: the picture route, and the FEM studies without coordinates")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="extra condition-file overrides for every training run (experiments)")
    p.add_argument("--data", type=Path, default=HERE / "data", help="where the problems are generated")
    p.add_argument("--work", type=Path, default=HERE / "work", help="working directories of the runs")
    p.add_argument("--tag", default="default", help="name of this configuration's results")
    p.add_argument("--tables", action="store_true",
                   help="only write RESULTS.md's and README's tables from results/dev.json and results/locked.json")
    args = p.parse_args()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    if not args.tables:
        stem = args.mode if args.tag == "default" else f"{args.mode}_{args.tag}"
        results = []
        for name in args.problems:
            print(f"== {name} ({args.mode})", flush=True)
            results.append(run_problem(name, args.mode, args.fold, args.overrides, args.data, args.work, args.tag,
                                       set(args.routes)))
            (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
            print(markdown(results[-1:]), flush=True)
        if args.tag != "default" or args.overrides:
            return
    write_tables(out_dir)


def write_tables(out_dir: Path) -> None:
    """RESULTS.md's side-by-side and per-mode tables and README's accuracy table, from the saved results."""
    dev, locked = ([] if not (out_dir / f"{m}.json").is_file() else json.loads((out_dir / f"{m}.json").read_text())
                   for m in ("dev", "locked"))
    text = (HERE / "RESULTS.md").read_text() if (HERE / "RESULTS.md").exists() else ""
    text = replace_marked(text, "side-by-side", side_by_side(dev, locked))
    for mode, results in (("dev", dev), ("locked", locked)):
        if results:
            text = replace_marked(text, f"{mode}-table", markdown(results))
    (HERE / "RESULTS.md").write_text(text)
    readme = (ROOT / "README.md").read_text()
    (ROOT / "README.md").write_text(replace_marked(readme, "accuracy", readme_table(dev, locked)))


if __name__ == "__main__":
    main()
