"""What a default training costs on this machine, against the targets (issue "Real simulation data first"):

    the bundled demo (80 runs x 32 steps x 256 nodes)                    <= 60 s
    a 10-run study of 80 steps x 1,681 nodes (heat_inclusion's first 10)   <= 60 s
    96 runs x 80 steps x 1,681 nodes (heat_inclusion's training runs)      <= 180 s

Each is one whole process of the README's command (`SimulGen-VAE.py --preset=1 ...`) with the shipped
condition.txt (only the data keys changed), wall time from start to exit, the stages' own seconds from
its summary.json. The fp32 matmul peak is printed beside them: the targets were set on the CI machine
type at 215 GFLOP/s; on a slower or busier machine the times scale with it.

    python benchmarks/bench_costs.py [--only demo small large] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "accuracy"))

import _common as C  # noqa: E402

TARGETS = {"demo": 60.0, "small": 60.0, "large": 180.0}
STAGES = ("vae_seconds", "lc_seconds", "lc_frame_net_seconds", "lc_point_net_seconds", "baseline_seconds")


def stage_case(name: str, work: Path) -> None:
    """`work` as a user sets it up: the inputs, the shipped condition.txt with the data keys, preset.txt."""
    data = work / "input_data"
    if name == "demo":
        shutil.copytree(ROOT / "input_data", data, ignore=shutil.ignore_patterns("make_demo.py"))
    else:
        from problems import generate
        src = generate("heat_inclusion", HERE / "accuracy" / "data")
        train = json.loads((src / "split.json").read_text())["train"][: 10 if name == "small" else None]
        data.mkdir(parents=True)
        np.save(data / "dataset1.npy", np.load(src / "dataset1.npy", mmap_mode="r")[train])
        params = np.loadtxt(src / "params.csv", delimiter=",")[train]
        np.savetxt(data / "params.csv", params, delimiter=",", fmt="%.10g")
        runs, steps, nodes = np.load(data / "dataset1.npy", mmap_mode="r").shape
        values = {"Dim1": runs, "Dim2": steps, "Dim3": nodes, "Dim2_red": steps, "Dim3_red": nodes,
                  "n_sample": runs, "num_param": params.shape[1]}
        (data / "condition.txt").write_text(C.condition_text(ROOT / "input_data" / "condition.txt", values))
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")


def measure(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stage_case(name, work)
        log = work / "train.log"
        seconds = C.run_logged([sys.executable, str(ROOT / "SimulGen-VAE.py"), "--preset=1", "--plot=2",
                                "--lc_only=0", "--size=small", "--load_all=1"], work, log)
        summary = json.loads(next((work / "runs").glob("*/summary.json")).read_text())
    return {"case": name, "seconds": seconds, "target": TARGETS[name], "met": seconds <= TARGETS[name],
            "vae_epochs": summary.get("vae_epochs"), **{k: summary.get(k) for k in STAGES},
            "networks": {k: summary.get(f"lc_{k}_net_stopped") for k in ("frame", "point")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--json", type=Path, default=C.RESULTS / "bench_costs.json")
    args = p.parse_args()
    busy = C.busy_warning()
    peak = C.matmul_peak("fp32")
    rows = []
    for name in args.only:
        started = time.strftime("%H:%M:%S")
        rows.append({**measure(name), "started": started})
        r = rows[-1]
        parts = ", ".join(f"{k.replace('_seconds', '')} {r[k]:.0f} s" for k in STAGES if isinstance(r[k], float))
        print(f"{name}: {r['seconds']:.0f} s (target {r['target']:.0f} s: {'met' if r['met'] else 'NOT met'}); "
              f"{parts}; VAE epochs {r['vae_epochs']}", flush=True)
    report = {"machine": C.machine(), "matmul_fp32_gflops": peak / 1e9, "busy": busy, "rows": rows,
              "reference_gflops": 215.0}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (the targets' reference machine: 215); {args.json}")


if __name__ == "__main__":
    main()
