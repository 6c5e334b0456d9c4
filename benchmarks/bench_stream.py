"""Streaming against preloading: VAE epochs with --load_all=0 (with and without the background
reader, `prefetch_batches`) against --load_all=1, interleaved in one run, on the CPU.

    .venv/bin/python benchmarks/bench_stream.py             # N = 2,000 and 20,000 nodes
    .venv/bin/python benchmarks/bench_stream.py --quick     # smoke run

Runs the real VAETrainer through StageTrainer.fit on a synthetic memory-mapped dataset (in
the page cache after the first pass), and reports whole-epoch samples/s, the median over
rounds, and each streaming mode's ratio to the preloaded one (issue 15's goal: ≥ 0.8).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT))

MODES = {"preloaded": (True, 0), "streamed": (False, 0), "streamed + prefetch 2": (False, 2)}


def epoch_rate(data: Path, workdir: Path, *, runs: int, steps: int, nodes: int, epochs: int, load_all: bool,
               prefetch: int) -> float:
    """Samples/s over the epochs after the first (which compiles nothing but warms the caches)."""
    from modules.train_vae import VAETrainer
    ctx, store, train_idx, val_idx = C.vae_context(
        C.ROOT, workdir, data, runs=runs, steps=steps, nodes=nodes, filters=(64, 32, 16, 8), batch=16,
        epochs=epochs, precision="fp32", load_all=load_all, monitor=False,
        extra=(f"prefetch_batches={prefetch}", "val_every=1000", "checkpoint_every=1000", "checkpoint_minutes=0"))
    trainer = VAETrainer(ctx, store, train_idx, val_idx)
    ends = C.time_epochs(trainer)
    return (len(ends) - 1) * trainer.steps_per_epoch * trainer.batch / (ends[-1] - ends[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--nodes", nargs="+", type=int, default=[2000, 20000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(C.RESULTS / "bench_stream.json"))
    args = parser.parse_args(argv)
    warning = C.busy_warning()
    runs, steps, epochs = (20, 8, 3) if args.quick else (64, 50, 6)
    nodes_list = [96] if args.quick else args.nodes
    rounds = 1 if args.quick else args.rounds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in nodes_list:
            data = C.write_dataset(Path(tmp) / f"dataset_{nodes}.npy", runs, steps, nodes)
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(rounds):                      # interleaved: every mode once per round
                for mode, (load_all, prefetch) in MODES.items():
                    rates[mode].append(epoch_rate(data, Path(tmp) / f"w{nodes}_{r}_{prefetch}_{load_all}", runs=runs,
                                                  steps=steps, nodes=nodes, epochs=epochs, load_all=load_all,
                                                  prefetch=prefetch))
            base = C.median(rates["preloaded"])
            for mode in MODES:
                rate = C.median(rates[mode])
                rows.append({"nodes": nodes, "mode": mode, "samples_per_s": rate, "rounds": rates[mode],
                             "over_preloaded": rate / base})
                print(f"N={nodes:>6}  {mode:<22} {rate:8.1f} samples/s  ({rate / base:.2f}× preloaded)", flush=True)
    report = {"machine": C.machine(), "load_average_before": C.load_average(), "runs": runs, "steps": steps,
              "epochs": epochs, "rows": rows, "warning": warning}
    C.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
