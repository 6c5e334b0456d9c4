"""Training speed of the real VAE stage: whole epochs, a bare step, start-up, memory.

    .venv/bin/python benchmarks/bench_train.py                       # the full table (~15 min)
    .venv/bin/python benchmarks/bench_train.py --baseline-root /tmp/baseline   # before/after (~30 min)
    .venv/bin/python benchmarks/bench_train.py --quick               # smoke run (tiny sizes)

Every configuration runs in a fresh interpreter (`--worker`), so each one reports its own
time to the first optimizer step (from the moment its process was spawned) and its own
peak RSS. A worker builds the stage exactly as modules/pipeline.py does (open + check the
.npy, stream the scaler, FieldStore, VAETrainer) and calls StageTrainer.fit, so the data
pipeline, augmentation, validation, checkpoints and TensorBoard logging are all inside the
"whole epochs" figure. Afterwards it times TrainingEngine.step on one fixed batch (the bare
step) and counts that step's FLOPs with FlopCounterMode. The parent measures the fp32 and
bf16 matmul peaks in the same run. Each figure is a median of several repeats.

With --baseline-root PATH the same workers also run against another checkout's `modules`
(e.g. `git archive <commit> modules input_data/condition.txt | tar -x -C PATH`), interleaved
config by config, and the table shows both and their ratio.

With --original-root PATH --original-python PY it instead times whole processes of the
original v1.4.3 (a checkout kept outside this repository, run by its own interpreter) and of
this port, interleaved on the same data: benchmarks/_original.py.

    .venv/bin/python benchmarks/bench_train.py --nodes 2000 --original-root ~/SimulGen-VAE --original-python ~/orig-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# The original v1.4.3 on this machine type (2 cores, fp32, eager, small, load_all=1, batch 16,
# 64 runs x 50 steps): the anchors of issue #6. Measured side by side (--original-root), the
# original compiled by torch 2.14.1 runs R1 at N = 2,000 twice as fast as this anchor.
ORIGINAL = {
    ("R1", 2000): {"samples_per_s": 141.0, "bare_runs_per_s": 184.0, "time_to_first_epoch_s": 7.6, "peak_rss_gb": 1.19},
    ("R1", 20000): {"samples_per_s": 23.8, "time_to_first_epoch_s": 11.7, "peak_rss_gb": 2.17},
    ("R2", 2000): {"bare_runs_per_s": 32.5},
}
FILTERS = {"R1": (64, 32, 16, 8), "R2": (256, 128, 64, 32)}


# ============================================================================= worker

def worker(spec: dict) -> None:
    """One configuration in a fresh process; writes a JSON result to spec['result']."""
    t_spawn = spec["t_spawn"]
    code_root = Path(spec["code_root"])
    sys.path.insert(0, str(code_root))
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    result: dict = {"name": spec["name"], "code_root": str(code_root)}
    marks: dict[str, float] = {}
    workdir = Path(spec["workdir"])
    # the order of modules/pipeline.py: data first, then the VAE stage's own imports
    ctx, store, train_idx, val_idx = C.vae_context(
        code_root, workdir, Path(spec["data"]), runs=spec["runs"], steps=spec["steps"], nodes=spec["nodes"],
        filters=spec["filters"], batch=spec["batch"], epochs=spec["epochs"], precision=spec["precision"],
        load_all=spec["load_all"], extra=tuple(spec.get("extra", ())))
    from modules.train_vae import VAETrainer
    trainer = VAETrainer(ctx, store, train_idx, val_idx)
    engine = trainer.engine

    def first_step(optimizer, args, kwargs):
        if "first_step" not in marks:
            marks["first_step"] = time.time()
            if spec.get("startup_only"):
                result["time_to_first_step_s"] = marks["first_step"] - t_spawn
                result["peak_rss_bytes"] = C.peak_rss_bytes()
                Path(spec["result"]).write_text(json.dumps(result))
                os._exit(0)

    engine.optimizer.register_step_post_hook(first_step)
    epoch_ends = C.time_epochs(trainer)
    result["time_to_first_step_s"] = marks["first_step"] - t_spawn
    result["time_to_first_epoch_s"] = (epoch_ends[0] - time.perf_counter()) + (time.time() - t_spawn)
    result["peak_rss_bytes"] = C.peak_rss_bytes()
    result["rss_after_fit"] = C.rss_bytes()

    # whole epochs: windows of val_every epochs (one validation each) after the warm-up
    per_epoch = trainer.steps_per_epoch * trainer.batch
    window, warm = spec["window"], spec["warmup_epochs"]
    rates = []
    for start in range(warm, len(epoch_ends) - window + 1, window):
        seconds = epoch_ends[start + window - 1] - epoch_ends[start - 1]
        rates.append(window * per_epoch / seconds)
    result["samples_per_s_windows"] = rates
    result["samples_per_s"] = C.median(rates)
    result["samples_per_epoch"] = per_epoch

    # bare step: TrainingEngine.step on one fixed batch, under the allocator settings that
    # train_epoch gives its steps (heap_allocations, where the measured code has it: in
    # modules/host_memory.py, or in modules/engine.py at earlier commits)
    import contextlib
    import importlib
    heap = lambda device: contextlib.nullcontext()  # noqa: E731
    for name in ("modules.host_memory", "modules.engine"):
        try:
            heap = getattr(importlib.import_module(name), "heap_allocations")
            break
        except (ImportError, AttributeError):
            continue
    x = store.get(torch.as_tensor(train_idx[:spec["batch"]]))
    batch = (x,)
    engine.module.train()
    step_times = []
    with heap(ctx.device):
        for _ in range(3):
            engine.step(batch)
        for _ in range(spec["step_repeats"]):
            t = time.perf_counter()
            for _ in range(spec["step_inner"]):
                out = engine.step(batch)
            out["loss"].item()
            step_times.append((time.perf_counter() - t) / spec["step_inner"])
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        engine.step(batch)
    step = C.median(step_times)
    result.update(step_s=step, step_s_repeats=step_times, bare_runs_per_s=spec["batch"] / step,
                  flops_per_step=counter.get_total_flops(), flop_per_s=counter.get_total_flops() / step,
                  threads=torch.get_num_threads())
    Path(spec["result"]).write_text(json.dumps(result))


# ============================================================================= parent

def configs(args) -> list[dict]:
    if args.quick:
        return [{"name": f"Q-{p}", "arch": "Q", "filters": (16, 8, 4, 2), "nodes": 96, "precision": p}
                for p in args.precisions]
    out = []
    for arch in args.archs:
        for n in args.nodes:
            for p in args.precisions:
                out.append({"name": f"{arch}-N{n}-{p}", "arch": arch, "filters": FILTERS[arch], "nodes": n,
                            "precision": p})
    return out


def measure(args) -> dict:
    here = Path(__file__).resolve()
    warning = C.busy_warning()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {p: C.matmul_peak(p, n=512 if args.quick else 2048, repeats=3 if args.quick else 7)
             for p in ("fp32", "bf16")}
    print(f"matmul peaks ({torch.get_num_threads()} threads): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    if args.quick:
        runs, steps, batch, window, warm, windows = 24, 10, 8, 2, 2, 2
        step_repeats, step_inner, ttfs_repeats = 3, 2, 0
    else:
        runs, steps, batch, window, warm, windows = 64, 50, 16, 10, args.warmup_epochs, args.windows
        step_repeats, step_inner, ttfs_repeats = args.step_repeats, args.step_inner, args.ttfs_repeats
    roots = {"after": Path(args.code_root).resolve()}
    if args.baseline_root:
        roots = {"before": Path(args.baseline_root).resolve(), **roots}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        datasets = {}
        for cfg in configs(args):
            n = cfg["nodes"]
            if n not in datasets:
                datasets[n] = C.write_dataset(tmp / f"dataset{n}.npy", runs, steps, n, seed=n)
            row = {"config": cfg["name"], "arch": cfg["arch"], "filters": list(cfg["filters"]), "nodes": n,
                   "precision": cfg["precision"], "original": ORIGINAL.get((cfg["arch"], n)) if cfg["precision"] == "fp32" else None}
            for label, root in roots.items():
                spec = {"name": f"{cfg['name']} ({label})", "code_root": str(root), "data": str(datasets[n]),
                        "runs": runs, "steps": steps, "nodes": n, "filters": list(cfg["filters"]), "batch": batch,
                        "epochs": warm + window * windows, "precision": cfg["precision"], "load_all": True,
                        "window": window, "warmup_epochs": warm, "step_repeats": step_repeats,
                        "step_inner": step_inner, "threads": args.threads,
                        "workdir": str(tmp / f"work-{cfg['name']}-{label}"), "result": str(tmp / "result.json")}
                if args.quick:
                    spec["extra"] = ["log_every=2", "val_every=2", "latent_conditioner_batch=8"]
                res = C.run_worker(here, spec)
                starts = [res["time_to_first_step_s"]]
                for i in range(ttfs_repeats):
                    again = dict(spec, startup_only=True, workdir=spec["workdir"] + f"-s{i}")
                    starts.append(C.run_worker(here, again)["time_to_first_step_s"])
                peak = peaks[cfg["precision"]] if cfg["precision"] in peaks else peaks["fp32"]
                res["time_to_first_step_s_repeats"] = starts
                res["time_to_first_step_s"] = C.median(starts)
                res["fraction_of_peak"] = res["flop_per_s"] / peak
                row[label] = res
                print(f"  {spec['name']:<28} {res['samples_per_s']:8.1f} samples/s  bare {res['bare_runs_per_s']:7.1f} runs/s "
                      f"{res['flop_per_s'] / 1e9:6.1f} GFLOP/s ({100 * res['fraction_of_peak']:4.1f} % of peak)  "
                      f"first step {res['time_to_first_step_s']:.2f} s  peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB",
                      flush=True)
            rows.append(row)
    return {"machine": C.machine(), "load_average_before": C.load_average(), "matmul_peak_flop_per_s": peaks,
            "settings": {"runs": runs, "steps": steps, "batch": batch, "window_epochs": window,
                         "warmup_epochs": warm, "windows": windows, "step_repeats": step_repeats,
                         "step_inner": step_inner, "ttfs_repeats": ttfs_repeats, "quick": args.quick},
            "roots": {k: str(v) for k, v in roots.items()}, "rows": rows, "warning": warning}


COLUMNS = [("samples/s", "samples_per_s", ".1f", 1.0), ("bare runs/s", "bare_runs_per_s", ".1f", 1.0),
           ("GFLOP/s", "flop_per_s", ".1f", 1e-9), ("% peak", "fraction_of_peak", ".1f", 100.0),
           ("1st step s", "time_to_first_step_s", ".2f", 1.0), ("peak RSS GiB", "peak_rss_bytes", ".2f", 2**-30)]


def table(report: dict) -> str:
    labels = [k for k in ("before", "after") if k in report["roots"]]
    lines = [f"matmul peak: fp32 {report['matmul_peak_flop_per_s']['fp32'] / 1e9:.0f} GFLOP/s, "
             f"bf16 {report['matmul_peak_flop_per_s']['bf16'] / 1e9:.0f} GFLOP/s "
             f"({report['machine']['torch_threads']} threads, load {report['load_average_before']:.2f})"]
    head = f"{'config':<16}{'code':<9}" + "".join(f"{c[0]:>14}" for c in COLUMNS)
    lines += [head, "-" * len(head)]
    for row in report["rows"]:
        orig = row.get("original") or {}
        if orig:
            o = {"samples_per_s": orig.get("samples_per_s"), "bare_runs_per_s": orig.get("bare_runs_per_s"),
                 "peak_rss_bytes": orig["peak_rss_gb"] * 2**30 if "peak_rss_gb" in orig else None}
            cells = "".join(f"{C.fmt(o.get(key) * scale if o.get(key) is not None else None, spec):>14}"
                            for _, key, spec, scale in COLUMNS)
            lines.append(f"{row['config']:<16}{'v1.4.3':<9}{cells}   (given anchors; 1st epoch "
                         f"{orig.get('time_to_first_epoch_s', '—')} s)")
        for label in labels:
            res = row[label]
            cells = "".join(f"{C.fmt(res.get(key) * scale if res.get(key) is not None else None, spec):>14}"
                            for _, key, spec, scale in COLUMNS)
            lines.append(f"{row['config']:<16}{label:<9}{cells}")
        if len(labels) == 2:
            b, a = row["before"], row["after"]
            ratio = lambda k: (a[k] / b[k]) if a.get(k) and b.get(k) else None  # noqa: E731
            cells = "".join(f"{C.fmt(ratio(key), '.2f') + '×':>14}" for _, key, _, _ in COLUMNS)
            lines.append(f"{row['config']:<16}{'ratio':<9}{cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--json", help="where to write the table as JSON (default: benchmarks/results/"
                                           "bench_train.json, or bench_original.json with --original-root)")
    parser.add_argument("--code-root", default=str(C.ROOT), help="checkout whose modules/ are measured")
    parser.add_argument("--baseline-root", help="another checkout to measure too (before/after table)")
    parser.add_argument("--archs", nargs="+", default=["R1", "R2"], choices=sorted(FILTERS))
    parser.add_argument("--nodes", nargs="+", type=int, default=[2000, 20000])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every worker (0: leave it)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows of 10 epochs (one validation each)")
    parser.add_argument("--warmup-epochs", type=int, default=10, help="untimed epochs first")
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--step-inner", type=int, default=5)
    parser.add_argument("--ttfs-repeats", type=int, default=2, help="extra start-up-only processes per config")
    original = parser.add_argument_group("against the original v1.4.3 (whole processes, interleaved)")
    original.add_argument("--original-root", help="a checkout of the original v1.4.3 (never changed: it is copied)")
    original.add_argument("--original-python", help="the interpreter that has the original's requirements")
    original.add_argument("--port-python", default=sys.executable, help="the interpreter for this port")
    original.add_argument("--original-epochs", nargs=2, type=int, default=[10, 100], metavar=("SHORT", "LONG"),
                          help="Training_epochs of the two runs whose difference is timed")
    original.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is reported)")
    original.add_argument("--process-timeout", type=float, default=3600, help="seconds one whole process may take")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if bool(args.original_root) != bool(args.original_python):
        parser.error("--original-root and --original-python go together")
    if args.original_root:
        import _original
        short, long = args.original_epochs
        if not 4 <= short < long:
            parser.error("--original-epochs: need 4 <= SHORT < LONG (the original's LR schedule needs at least 4 epochs)")
        report = _original.compare(args, FILTERS)
        text = _original.table(report)
        print(text)
        C.write_report(args.json or C.RESULTS / "bench_original.json", dict(report, table=text))
        return 0
    report = measure(args)
    text = table(report)
    print(text)
    C.write_report(args.json or C.RESULTS / "bench_train.json", dict(report, table=text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
