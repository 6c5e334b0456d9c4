"""NOTES.md H30: can a model that learns from every saved frame, rather than from one latent
vector per run, regress transport problems where run-level POD coefficients cannot?

Each saved frame [N] of the training runs is one sample (96 × T of them, against 96 run
snapshots for POD + GPR). Scored by the relative L2 of each test run's whole [T, N] field:

- the tool's frame network (`modules/frame_net.py`: (inputs, time) → frame, centred on the
  training runs' mean frame), alone and blended with run-level POD + GPR at fixed weights;
- with `--dims`: frame compressors to d values, "frame POD" (the d leading modes of the
  training frames, uncentred) and "frame AE" (an MLP autoencoder N → 512 → 128 → d → 128 → 512
  → N), each with a GP on (inputs, time) regressing the d values (the tool's fit, ARD-RBF,
  hyperparameters on 500 frames, conditioned on every second frame), and each one's floor
  (test frames encoded and decoded).

    .venv/bin/python benchmarks/accuracy/frame_probe.py [--problems advection_front ...] [--dims 4 8]

About 1-2 minutes per problem on 2 cores (the frame network), plus 2 minutes per d.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.baseline import POD, relative_l2  # noqa: E402
from modules.frame_net import frame_inputs, train_frame_net  # noqa: E402
from modules.gp import GPPosterior, fit_hyperparameters, fit_predict  # noqa: E402
from regressor_probe import load  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "frame_probe.json"


class FrameAE(torch.nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        act = torch.nn.GELU
        self.enc = torch.nn.Sequential(torch.nn.Linear(n, 512), act(), torch.nn.Linear(512, 128), act(),
                                       torch.nn.Linear(128, d))
        self.dec = torch.nn.Sequential(torch.nn.Linear(d, 128), act(), torch.nn.Linear(128, 512), act(),
                                       torch.nn.Linear(512, n))


def train_ae(frames: np.ndarray, d: int, seed: int, epochs: int) -> FrameAE:
    torch.manual_seed(seed)
    x = torch.as_tensor(frames, dtype=torch.float32)
    model = FrameAE(x.shape[1], d)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-5)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            loss = torch.nn.functional.mse_loss(model.dec(model.enc(x[idx])), x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def regress(z_train: np.ndarray, xin_train: np.ndarray, xin_test: np.ndarray, keep: np.ndarray, seed: int):
    hyper = fit_hyperparameters(xin_train, z_train, seed, max_rows=500)
    return GPPosterior.condition(hyper, xin_train[keep], z_train[keep]).predict(xin_test)[0]


def probe(name: str, dims: list[int], epochs: int, seed: int) -> dict:
    tr_f, te_f, tr_p, te_p = load(name)
    p, steps, n = tr_f.shape
    scale = float(np.abs(tr_f).max())
    frames_tr = (tr_f / scale).reshape(-1, n)
    frames_te = (te_f / scale).reshape(-1, n)
    times = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    xin_tr, xin_te = (frame_inputs(torch.as_tensor(p_), times).numpy() for p_ in (tr_p, te_p))
    keep = np.zeros(len(xin_tr), bool)
    keep[:: 2] = True
    out: dict = {"runs": [p, len(te_f)], "steps": steps, "nodes": n}
    run_pod = POD.fit(tr_f.reshape(p, -1), energy=0.999)
    gp_field = run_pod.reconstruct(fit_predict(tr_p, run_pod.coefficients(tr_f), te_p, seed), te_f.shape[1:])
    out["run POD + GPR"] = float(relative_l2(gp_field, te_f).mean())

    def score(decoded: np.ndarray) -> float:
        return float(relative_l2(decoded.reshape(te_f.shape) * scale, te_f).mean())

    started = time.perf_counter()
    net = train_frame_net(tr_p, tr_f, epochs, seed, torch.device("cpu"))[0]
    with torch.inference_mode():
        own = net(torch.as_tensor(te_p)).double().numpy()
        fit = net(torch.as_tensor(tr_p)).double().numpy()
    out["frame network"] = float(relative_l2(own, te_f).mean())
    out["frame network, training runs"] = float(relative_l2(fit, tr_f).mean())
    out["frame network seconds"] = time.perf_counter() - started
    for w in (0.25, 0.5, 0.75):
        out[f"blend {w}"] = float(relative_l2(gp_field + w * (own - gp_field), te_f).mean())
    print(name, {k: round(v, 4) for k, v in out.items() if isinstance(v, float)}, flush=True)
    for d in dims:
        started = time.perf_counter()
        _, _, vt = np.linalg.svd(frames_tr, full_matrices=False)
        basis = vt[:d]
        z_tr = frames_tr @ basis.T
        out[f"frame POD d={d} floor"] = score(frames_te @ basis.T @ basis)
        out[f"frame POD d={d} + GP"] = score(regress(z_tr, xin_tr, xin_te, keep, seed) @ basis)
        ae = train_ae(frames_tr, d, seed, epochs)
        with torch.no_grad():
            enc = lambda f: ae.enc(torch.as_tensor(f, dtype=torch.float32)).numpy().astype(np.float64)  # noqa: E731
            dec = lambda z: ae.dec(torch.as_tensor(z, dtype=torch.float32)).numpy().astype(np.float64)  # noqa: E731
            z_tr = enc(frames_tr)
            out[f"frame AE d={d} floor"] = score(dec(enc(frames_te)))
            out[f"frame AE d={d} train recon"] = float(relative_l2(dec(z_tr).reshape(tr_f.shape) * scale, tr_f).mean())
            out[f"frame AE d={d} + GP"] = score(dec(regress(z_tr, xin_tr, xin_te, keep, seed)))
        out[f"d={d} seconds"] = time.perf_counter() - started
        print(name, d, {k: round(v, 4) for k, v in out.items() if isinstance(v, float)}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["heat_inclusion", "advection_front", "burgers",
                                                           "wave_membrane", "demo"])
    parser.add_argument("--dims", nargs="*", type=int, default=[])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    OUT.parent.mkdir(exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for name in args.problems:          # written after each problem, kept beside earlier problems' results
        results[name] = probe(name, args.dims, args.epochs, args.seed)
        OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
