"""Prediction speed: design parameters → full physical field, on the CPU.

    .venv/bin/python benchmarks/bench_predict.py            # N = 2,000 and 20,000
    .venv/bin/python benchmarks/bench_predict.py --quick    # smoke run

Builds the real prediction path with random weights (no training needed): an MLP
conditioner (`csvs`) and the hierarchical VAE, wrapped in modules.surrogate.LatentDecoder and
Surrogate exactly as `--predict` does, and times Surrogate.fields, which includes the input
→ latents → decoded field → inverse scaling → numpy path. Reports the latency of one run
(batch 1) and the throughput at batch 64, medians of many repeats, in fp32.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def build(code_root: Path, nodes: int, steps: int, filters, num_param: int = 4, seed: int = 0):
    sys.path.insert(0, str(code_root))
    import numpy as np
    import torch
    from modules.cond_inputs import MinMaxScaler
    from modules.conditioners import ConditionerArchitecture, build_conditioner
    from modules.data import FieldScaler
    from modules.surrogate import LatentDecoder, Surrogate
    from modules.vae import HierarchicalVAE, VAEArchitecture

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device("cpu")
    levels = len(filters) - 1
    vae = HierarchicalVAE(VAEArchitecture(nodes, steps, filters, latent_dim_end=32, latent_dim=8))
    vae.eval().requires_grad_(False)
    conditioner = build_conditioner(ConditionerArchitecture("csvs", num_param=num_param, latent_dim_end=32, latent_dim=8,
                                                            num_levels=levels, filters=(16, 32, 64, 128))).eval()
    main = MinMaxScaler().fit(rng.normal(size=(64, 32)))
    hier = MinMaxScaler().fit(rng.normal(size=(64, levels, 8)))
    inputs = MinMaxScaler().fit(rng.uniform(size=(64, num_param)))
    low = rng.uniform(-1, 0, nodes)
    field = FieldScaler(low, low + rng.uniform(0.5, 2, nodes))
    surrogate = Surrogate(conditioner, LatentDecoder(vae, main, hier, device), field, inputs, "csvs", num_param,
                          ".png", device, {})
    params = surrogate.prepare(rng.uniform(size=(64, num_param)))
    return surrogate, params


def time_call(fn, repeats: int, min_seconds: float) -> list[float]:
    fn()
    fn()
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50 * repeats:
            break
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--nodes", nargs="+", type=int, default=[2000, 20000])
    parser.add_argument("--filters", nargs="+", type=int, default=[64, 32, 16, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--code-root", default=str(C.ROOT))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=str(C.RESULTS / "bench_predict.json"))
    args = parser.parse_args(argv)
    warning = C.busy_warning()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    nodes = [96] if args.quick else args.nodes
    steps = 10 if args.quick else args.steps
    repeats, min_seconds = (5, 0.0) if args.quick else (30, 2.0)
    rows = []
    for n in nodes:
        surrogate, params = build(Path(args.code_root), n, steps, args.filters)
        one = time_call(lambda: surrogate.fields(params[:1]), repeats, min_seconds)
        many = time_call(lambda: surrogate.fields(params[:64]), max(3, repeats // 5), min_seconds)
        out = surrogate.fields(params[:2])
        row = {"nodes": n, "steps": steps, "filters": list(args.filters), "output_shape": list(out.shape),
               "batch1_ms": 1e3 * statistics.median(one), "batch1_ms_min": 1e3 * min(one), "batch1_repeats": len(one),
               "batch64_runs_per_s": 64 / statistics.median(many), "batch64_repeats": len(many),
               "finite": bool(torch.isfinite(torch.from_numpy(out)).all())}
        rows.append(row)
        print(f"N={n:>6}  batch 1: {row['batch1_ms']:7.2f} ms/run (min {row['batch1_ms_min']:.2f})   "
              f"batch 64: {row['batch64_runs_per_s']:8.1f} runs/s", flush=True)
    report = {"machine": C.machine(), "load_average_before": C.load_average(), "code_root": args.code_root,
              "precision": "fp32", "rows": rows, "warning": warning}
    C.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
