"""Exercise every CUDA path of the training engine and time the training step on a GPU.

Part 1 (issue: one training engine): a few steps of the real VAE training step at a
mid-size config under fp32 eager (the reference), bf16, fp16 with a gradient scaler,
torch.compile, CUDA graphs (fp32 and bf16), SAM and EMA, from the same initial weights on
the same batches. Prints a table of step times and of the loss difference to fp32 eager.

Part 2 (issue: speed and scale): the original's full configuration (N = 95,008 nodes,
T = 200 steps, filters 1024 512 256 128, batch 16), small and large, bf16: the step time,
its FLOP/s (torch.utils.flop_counter) against the card's measured bf16 matmul peak, with
the dataset preloaded on the GPU (--load_all=1) and streamed from a memory-mapped .npy
(--load_all=0).

    python benchmarks/gpu_check.py                # on a machine with one GPU
    python benchmarks/gpu_check.py --quick --device cpu   # a smoke run of the code paths CPUs have
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.data import FieldScaler, FieldStore, prefetch  # noqa: E402
from modules.engine import EngineSettings, TrainingEngine  # noqa: E402
from modules.vae import HierarchicalVAE, VAEArchitecture  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def vae_loss(beta, mode="random"):
    def loss_fn(net, batch):
        (x,) = batch
        out = net(x, mode=mode)
        recon = F.mse_loss(out.x_hat.float(), x)
        return 1000.0 * recon + beta * (out.kl_main + out.kl_levels), {"recon": recon.detach()}
    return loss_fn


def arch(nodes, time_steps, filters, small=True):
    return VAEArchitecture(nodes, time_steps, filters, latent_dim_end=32, latent_dim=8, small=small)


def time_steps(engine, batches, device, warmup):
    """Median ms per step after `warmup` steps, and the final loss."""
    times, loss = [], None
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        out = engine.step(batch)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
        loss = out["loss"]
    return statistics.median(times), float(loss)


def part1(device, quick):
    nodes, steps_t, filters, batch = (64, 8, (16, 8, 4), 4) if quick else (2000, 50, (256, 128, 64, 32), 16)
    n_steps, warmup = (4, 1) if quick else (30, 12)
    g = torch.Generator(device="cpu").manual_seed(0)
    data = [(torch.rand(batch, nodes, steps_t, generator=g).mul_(1.8).sub_(0.9).to(device),) for _ in range(n_steps)]
    torch.manual_seed(0)
    init = HierarchicalVAE(arch(nodes, steps_t, filters)).state_dict()
    # Trained on the posterior means (`fix`), so every path sees the same numbers and the
    # loss differences measure numerics; the last rows use random sampling, as training does.
    modes = {
        "fp32 eager": EngineSettings(),
        "bf16": EngineSettings(precision="bf16"),
        "fp16 + GradScaler": EngineSettings(precision="fp16"),
        "compile (fp32)": EngineSettings(compile=True),
        "compile (bf16)": EngineSettings(precision="bf16", compile=True),
        "CUDA graphs (fp32)": EngineSettings(cuda_graphs=True),
        "CUDA graphs (bf16)": EngineSettings(precision="bf16", cuda_graphs=True),
        "SAM (bf16)": EngineSettings(precision="bf16", use_sam=True),
        "EMA (bf16)": EngineSettings(precision="bf16", use_ema=True),
        "SAM + EMA + graphs (bf16)": EngineSettings(precision="bf16", use_sam=True, use_ema=True, cuda_graphs=True),
        "random: bf16 eager": EngineSettings(precision="bf16"),
        "random: graphs (bf16)": EngineSettings(precision="bf16", cuda_graphs=True),
    }
    rows, reference = [], None
    for name, settings in modes.items():
        if device.type != "cuda" and (settings.cuda_graphs or settings.precision == "fp16"):
            continue
        torch.manual_seed(1)
        model = HierarchicalVAE(arch(nodes, steps_t, filters)).to(device)
        model.load_state_dict(init)
        beta = torch.tensor(1e-3, device=device)
        loss_fn = vae_loss(beta, "random" if name.startswith("random") else "fix")
        engine = TrainingEngine(model, loss_fn, lr=1e-3, weight_decay=5e-4, settings=settings, device=device)
        try:
            ms, loss = time_steps(engine, data, device, warmup)
        except Exception as exc:        # report, keep going: one broken path must not hide the others
            rows.append({"mode": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
            continue
        if reference is None:
            reference = (ms, loss)
        extra = ""
        if engine._graph is not None:
            extra = "graph captured"
        if engine.ema is not None:
            extra = (extra + ", " if extra else "") + f"EMA n={int(engine.ema.n_averaged)}"
        rows.append({"mode": name, "ms_per_step": ms, "speedup_vs_fp32_eager": reference[0] / ms,
                     "final_loss": loss, "loss_rel_diff_vs_fp32": abs(loss - reference[1]) / abs(reference[1]),
                     "note": extra})
        del engine, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nPart 1: training-step paths, N={nodes} T={steps_t} filters={list(filters)} batch={batch}, "
          f"{n_steps} steps ({warmup} warm-up), same init and batches")
    print("(rows without 'random:' train on posterior means so losses compare; SAM changes the trajectory by design)")
    print(f"{'mode':<28}{'ms/step':>10}{'speed-up':>10}{'final loss':>13}{'rel. diff':>11}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<28}  FAILED: {r['error']}")
        else:
            print(f"{r['mode']:<28}{r['ms_per_step']:>10.2f}{r['speedup_vs_fp32_eager']:>10.2f}"
                  f"{r['final_loss']:>13.4f}{r['loss_rel_diff_vs_fp32']:>11.2e}  {r['note']}")
    return rows


def matmul_peak(device, dtype, n):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def step_flops(engine, batch):
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        engine.step(batch)
    return counter.get_total_flops()


def part2(device, quick, workdir):
    nodes, steps_t, filters, batch, runs = (256, 20, (32, 16, 8, 4), 4, 8) if quick else (95008, 200, (1024, 512, 256, 128), 16, 48)
    n_steps, warmup = (3, 1) if quick else (12, 4)
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32, 1024 if quick else 8192)
    path = Path(workdir) / "big.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(runs, steps_t, nodes))
    rng = np.random.default_rng(0)
    for i in range(runs):
        array[i] = rng.random((steps_t, nodes), dtype=np.float32)
    array.flush()
    del array
    mm = np.load(path, mmap_mode="r")
    scaler = FieldScaler.fit_streaming(mm)
    precision = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    for small in (True, False):
        torch.manual_seed(0)
        model = HierarchicalVAE(arch(nodes, steps_t, filters, small)).to(device)
        params = sum(p.numel() for p in model.parameters())
        engine = TrainingEngine(model, vae_loss(torch.tensor(1e-3, device=device)), lr=5e-4, weight_decay=5e-4,
                                settings=EngineSettings(precision=precision, grad_clip=10.0), device=device)
        for load_all, depth in ((True, 0), (False, 0), (False, 2)):       # streamed: read in turn / 2 ahead
            store = FieldStore(mm, scaler, preload=load_all, device=device, pin_memory=device.type == "cuda")
            order = torch.arange(n_steps * batch) % runs
            batches = [order[k * batch:(k + 1) * batch] for k in range(n_steps)]
            flops = step_flops(engine, (store.get(batches[0]),))
            hosts = None if load_all else prefetch(store.read, batches, depth)
            times = []
            for k in range(n_steps):
                sync(device)
                start = time.perf_counter()
                x = store.get(batches[k]) if hosts is None else store.finish(next(hosts))
                engine.step((x,))                                                # data loading included
                sync(device)
                if k >= warmup:
                    times.append(time.perf_counter() - start)
            if hosts is not None:
                hosts.close()
            seconds = statistics.median(times)
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            rows.append({"size": "small" if small else "large", "load_all": int(load_all), "prefetch": depth, "params": params,
                         "ms_per_step": seconds * 1000, "runs_per_s": batch / seconds, "tflop_per_step": flops / 1e12,
                         "tflops": flops / seconds / 1e12, "peak_tflops": peak / 1e12,
                         "fraction_of_peak": flops / seconds / peak, "max_gpu_mem_gib": mem})
            del store
        del engine, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"\nPart 2: full-size VAE step, N={nodes} T={steps_t} filters={list(filters)} batch={batch}, {precision}, "
          f"measured matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'size':<7}{'load_all':>9}{'prefetch':>9}{'params':>13}{'ms/step':>10}{'runs/s':>9}{'TFLOP/step':>12}{'TFLOP/s':>9}"
          f"{'of peak':>9}{'GPU GiB':>9}")
    for r in rows:
        print(f"{r['size']:<7}{r['load_all']:>9}{r['prefetch']:>9}{r['params']:>13,}{r['ms_per_step']:>10.1f}{r['runs_per_s']:>9.1f}"
              f"{r['tflop_per_step']:>12.2f}{r['tflops']:>9.1f}{r['fraction_of_peak']:>9.1%}{r['max_gpu_mem_gib']:>9.1f}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the code")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--part", type=int, choices=(1, 2), default=None, help="run one part only")
    parser.add_argument("--json", type=Path, default=None, help="also write the tables as JSON")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu --quick for a smoke run)")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}")
    result = {"device": name, "torch": torch.__version__}
    if args.part in (None, 1):
        result["part1"] = part1(device, args.quick)
    if args.part in (None, 2):
        with tempfile.TemporaryDirectory() as tmp:
            result["part2"] = part2(device, args.quick, tmp)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
