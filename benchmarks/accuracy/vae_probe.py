"""Quick in-process probe of the VAE alone: train for a fixed number of epochs on a suite
problem's training runs and report the test runs' reconstruction error (encode → μ →
decode, physical units), next to the POD projection floor at the same number of latent
values. For hypotheses about the VAE recipe (NOTES.md); the suite is the real measurement.

    python benchmarks/accuracy/vae_probe.py heat_inclusion --epochs 60 --set spectral_norm=0 --set vae_norm=none
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from problems import generate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("problem")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--filters", default="64 32 16 8")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-mode", default="random", choices=("random", "fix"),
                   help="fix: train as a deterministic autoencoder (diagnostic)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from modules.baseline import POD, relative_l2
    from modules.config import parse_condition
    from modules.data import FieldScaler, FieldStore
    from modules.engine import EngineSettings, TrainingEngine, batch_indices
    from modules.schedules import cosine_decay, kl_weight
    from modules.losses import RECON_LOSSES
    from modules.vae import HierarchicalVAE, VAEArchitecture

    src = generate(args.problem, args.data)
    fields = np.load(src / "dataset1.npy")
    split = json.loads((src / "split.json").read_text())
    train, test = np.asarray(split["train"]), np.asarray(split["test"])
    cfg = parse_condition(HERE.parents[1] / "input_data" / "condition.txt", [
        f"Dim1={len(train)}", f"Dim2={fields.shape[1]}", f"Dim3={fields.shape[2]}", f"Dim2_red={fields.shape[1]}",
        f"Dim3_red={fields.shape[2]}", f"n_sample={len(train)}", *args.overrides])
    torch.manual_seed(cfg.run.seed)
    train_fields = fields[train]
    scaler = FieldScaler.fit(train_fields, cfg.data.field_scaling)
    store = FieldStore(train_fields, scaler, preload=True)
    filters = [int(f) for f in args.filters.split()]
    arch = VAEArchitecture(fields.shape[2], fields.shape[1], filters, cfg.vae.Latent_dim_end, cfg.vae.Latent_dim,
                           small=True, output_norm=cfg.vae.output_norm, spectral_norm=cfg.vae.spectral_norm,
                           norm=cfg.vae.vae_norm, logvar_init=cfg.vae.logvar_init, linear_modes=cfg.vae.linear_modes)
    model = HierarchicalVAE(arch)
    from modules.train_vae import init_from_training_runs
    init_from_training_runs(model, store, torch.arange(len(train)), cfg.vae.pod_init, cfg.run.seed)
    kl_unit = 1.0 / (fields.shape[1] * fields.shape[2]) if cfg.vae.kl_normalize == "values" else 1.0
    beta = torch.tensor(0.0)
    recon_loss = RECON_LOSSES[cfg.vae.loss_name]

    def loss_fn(net, batch):
        (x,) = batch
        out = net(x, mode=args.train_mode)
        recon = recon_loss(out.x_hat.float(), x)
        return cfg.vae.alpha * recon + beta * (out.kl_main + out.kl_levels) * kl_unit, {"recon": recon.detach()}

    engine = TrainingEngine(model, loss_fn, lr=cfg.vae.LearningR, weight_decay=cfg.vae.weight_decay,
                            settings=EngineSettings.from_config(cfg, torch.device("cpu"), cfg.vae.grad_clip),
                            device=torch.device("cpu"), ddp=False)
    idx = torch.arange(len(train))
    test_x = scaler.transform(torch.from_numpy(fields[test]), node_axis=-1).transpose(1, 2).contiguous()

    def test_error() -> float:
        net = engine.eval_module().eval()
        with torch.no_grad():
            mu, _, xs = net.encode(test_x)
            recon, _ = net.decode(mu, xs, mode="fix")
        net.train()
        pred = scaler.inverse_transform(recon.double()).transpose(1, 2).numpy()
        return float(relative_l2(pred, fields[test]).mean())

    started = time.perf_counter()
    for epoch in range(args.epochs):
        beta.fill_(kl_weight(epoch, args.epochs, cfg.vae.beta_start, cfg.vae.beta_end, cfg.vae.beta_ramp_start, cfg.vae.beta_ramp_end))
        engine.set_lr(cosine_decay(epoch, args.epochs, cfg.vae.LearningR, cfg.vae.lr_min_factor))
        batches = [(store.get(i),) for i in batch_indices(idx, cfg.vae.Batch_size, epoch=epoch, seed=cfg.run.seed)]
        result = engine.train_epoch(batches)
        if (epoch + 1) % max(1, args.epochs // 6) == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}: train recon {result.metrics['recon']:.3e}  test rel-L2 {test_error():.4f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    latent_values = cfg.vae.Latent_dim_end + (len(filters) - 2) * cfg.vae.Latent_dim
    pod = POD.fit(fields[train].astype(np.float64), energy=1.0, max_modes=latent_values)
    floor = relative_l2(pod.reconstruct(pod.coefficients(fields[test].astype(np.float64)), fields.shape[1:]),
                        fields[test]).mean()
    mean = relative_l2(np.broadcast_to(pod.mean.reshape(fields.shape[1:]), fields[test].shape), fields[test]).mean()
    print(json.dumps({"problem": args.problem, "overrides": args.overrides, "filters": filters, "epochs": args.epochs,
                      "test_rel_l2": test_error(), "pod_floor": float(floor), "latent_values": latent_values,
                      "mean_field": float(mean), "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
