"""A dataset larger than RAM: one epoch with --load_all=0, and the peak resident memory.

    .venv/bin/python benchmarks/bench_memory.py                  # 1.25 x RAM on disk (~30 GB here)
    .venv/bin/python benchmarks/bench_memory.py --size-gb 0.5    # a small smoke run
    .venv/bin/python benchmarks/bench_memory.py --quick          # seconds, for the tests

Writes a synthetic [P, T, N] float32 .npy of --size-gb GiB in chunks (never whole in memory,
never mapped), then runs, in a fresh process, what a `--load_all=0` training run does with
it: open (memory-mapped) and check it, fit the scaler in one streaming pass, build a
FieldStore(preload=False) and train one epoch through the real VAETrainer (StageTrainer.fit,
augmentation and validation included). A sampling thread records the process's RSS, split
into anonymous memory and mapped file pages. The file is deleted afterwards, also after an
error, Ctrl-C or SIGTERM. It needs --size-gb of free disk (plus 1 GiB) where it writes (--dir);
it refuses to start otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MARGIN = 2**30          # free disk to leave beyond the file


# ============================================================================= worker

class _Sampler(threading.Thread):
    """Peak RSS, RssAnon and RssFile of this process, sampled every `every` seconds."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    def sample(self) -> None:
        for key, value in C.rss_bytes().items():
            self.peak[key] = max(self.peak.get(key, 0), value)


def worker(spec: dict) -> None:
    sys.path.insert(0, spec["code_root"])
    sampler = _Sampler()
    sampler.start()
    import torch
    marks = {"start": time.perf_counter()}
    if spec.get("no_release"):
        import modules.data
        modules.data.release_pages = lambda *a, **k: None          # the A/B control
    ctx, store, train_idx, val_idx = C.vae_context(
        Path(spec["code_root"]), Path(spec["workdir"]), Path(spec["data"]), runs=spec["runs"], steps=spec["steps"],
        nodes=spec["nodes"], filters=spec["filters"], batch=spec["batch"], epochs=1, precision=spec["precision"],
        load_all=False, extra=tuple(spec.get("extra", ())))
    marks["data_ready"] = time.perf_counter()
    sampler.sample()
    after_data = dict(sampler.peak)
    from modules.train_vae import VAETrainer
    trainer = VAETrainer(ctx, store, train_idx, val_idx)
    held = [v for v in vars(store).values() if isinstance(v, torch.Tensor)]
    epoch_end = []
    record = trainer._record
    trainer._record = lambda *a, **k: (record(*a, **k), epoch_end.append(time.perf_counter()))
    trainer.fit()
    marks["end"] = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    samples = trainer.steps_per_epoch * trainer.batch
    result = {"peak_rss_bytes": C.peak_rss_bytes(), "peak_sampled": sampler.peak, "peak_after_data": after_data,
              "rss_end": C.rss_bytes(), "store_preloaded": bool(store.preloaded),
              "store_tensor_bytes": sum(t.numel() * t.element_size() for t in held),
              "seconds_data": marks["data_ready"] - marks["start"], "seconds_fit": marks["end"] - marks["data_ready"],
              "train_samples": samples, "val_runs": len(val_idx),
              "train_samples_per_s": samples / (marks["end"] - marks["data_ready"]),
              "final_loss": trainer.history.get("train_loss", [None])[-1]}
    Path(spec["result"]).write_text(json.dumps(result))


# ============================================================================= parent

def main(argv=None) -> int:
    ram = C.machine()["ram_bytes"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (a few MB)")
    parser.add_argument("--size-gb", type=float, default=1.25 * ram / 2**30,
                        help="dataset size in GiB (default 1.25 x RAM = %(default).1f)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the dataset")
    parser.add_argument("--nodes", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--filters", nargs="+", type=int, default=[64, 32, 16, 8])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--val-split", type=float, default=0.05,
                        help="validation share (each validation pass reads it from disk twice)")
    parser.add_argument("--no-release", action="store_true",
                        help="control run: keep read file pages mapped (modules.data.release_pages off)")
    parser.add_argument("--code-root", default=str(C.ROOT))
    parser.add_argument("--keep", action="store_true", help="do not delete the dataset (debugging)")
    parser.add_argument("--json", default=str(C.RESULTS / "bench_memory.json"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.quick:
        args.size_gb, args.nodes, args.steps, args.filters, args.batch = 0.004, 256, 16, [16, 8, 4], 8
        args.val_split = 0.2

    run_bytes = args.steps * args.nodes * 4
    runs = int(args.size_gb * 2**30 // run_bytes)
    if runs < 24:
        print(f"--size-gb {args.size_gb} holds only {runs} runs of {args.steps} x {args.nodes}; need at least 24",
              file=sys.stderr)
        return 2
    size = runs * run_bytes
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < size + MARGIN:
        print(f"refusing to start: the dataset needs {size / 2**30:.1f} GiB (+{MARGIN / 2**30:.0f} GiB margin) in "
              f"{folder}, which has {free / 2**30:.1f} GiB free. Free some space, pass --dir on a larger disk, or "
              f"pass a smaller --size-gb.", file=sys.stderr)
        return 2
    warning = C.busy_warning()

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=folder))
    data = tmp / "dataset1.npy"
    proc = None
    try:
        print(f"writing {runs} runs x {args.steps} steps x {args.nodes} nodes = {size / 2**30:.2f} GiB to {data} "
              f"(RAM {ram / 2**30:.1f} GiB)", flush=True)
        started = time.perf_counter()
        C.write_dataset(data, runs, args.steps, args.nodes, seed=1, progress=not args.quick)
        write_s = time.perf_counter() - started
        spec = {"code_root": str(Path(args.code_root).resolve()), "data": str(data), "runs": runs, "steps": args.steps,
                "nodes": args.nodes, "filters": args.filters, "batch": args.batch, "precision": args.precision,
                "workdir": str(tmp / "work"), "result": str(tmp / "result.json"), "no_release": args.no_release,
                "extra": [f"val_split={args.val_split}", f"latent_conditioner_batch={args.batch}"]}
        print("training one epoch with load_all=0 in a fresh process ...", flush=True)
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate()
        if proc.returncode != 0 or not Path(spec["result"]).exists():
            print(output[-4000:], file=sys.stderr)
            raise RuntimeError(f"the training process failed (exit {proc.returncode})")
        res = json.loads(Path(spec["result"]).read_text())
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            print(f"kept {data}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    peak = res["peak_rss_bytes"]
    report = {"machine": C.machine(), "dataset_bytes": size, "runs": runs, "steps": args.steps, "nodes": args.nodes,
              "filters": args.filters, "batch": args.batch, "precision": args.precision, "write_seconds": write_s,
              "dataset_over_ram": size / ram, "release_pages": not args.no_release, **res, "warning": warning}
    print(f"dataset {size / 2**30:.2f} GiB ({size / ram:.2f} x RAM), one epoch of {res['train_samples']} samples + "
          f"2 validations of {res['val_runs']} runs: data ready in {res['seconds_data']:.1f} s, fit {res['seconds_fit']:.1f} s "
          f"({res['train_samples_per_s']:.1f} samples/s)")
    print(f"peak RSS {peak / 2**30:.2f} GiB (anonymous ≤ {res['peak_sampled'].get('RssAnon', 0) / 2**30:.2f} GiB, "
          f"mapped file pages ≤ {res['peak_sampled'].get('RssFile', 0) / 2**30:.2f} GiB); scaled copy held: "
          f"{'yes' if res['store_preloaded'] or res['store_tensor_bytes'] else 'no'}")
    C.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
