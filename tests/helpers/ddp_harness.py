"""Train the real VAE and MLP-conditioner stages for a few epochs, deterministically, and
save the final weights: run once as a single process and once under torchrun, the DDP test
compares the two. Augmentation, dropout and label noise are off, and the VAE is trained on
its posterior means (`fix` mode), so the only difference left is how the batch is split.
Everything runs in float64: Adam's first steps are about lr·sign(g), so fp32 rounding of
near-zero gradients (summed in another order across ranks) would flip whole steps.

After training, each stage also validates on a single validation run (fewer runs than
ranks: under DDP rank 1 has none), and under DDP a tiny SAM engine counts its gradient
all-reduces with a DDP communication hook."""
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.distributed import init_distributed, shutdown  # noqa: E402
from modules.engine import EngineSettings, TrainingEngine  # noqa: E402
from modules.train_conditioner import ConditionerData, ConditionerInputs, ConditionerTrainer  # noqa: E402
from modules.train_vae import VAETrainer  # noqa: E402
from tests.helpers.context import demo_context  # noqa: E402

OVERRIDES = ["Training_epochs=3", "n_epoch=3", "Batch_size=16", "latent_conditioner_batch=16", "use_augmentation=0",
             "val_every=1", "input_type=csvs", "param_dir=/input_data/params.csv", "use_progressive_dropout=1",
             "dropout_start=0", "dropout_end=0", "lc_label_noise=0", "lc_mixup_prob=0", "lc_input_noise_prob=0",
             "lc_warmup_epochs=1", "LearningR=0.002",
             # DDP equivalence does not depend on the recipe; the original's network starts from random
             # weights, so three epochs visibly train it (the default starts at the POD's optimum)
             "recipe=original"]


def validate_on_one_run(trainer) -> dict[str, float]:
    """The stage's own validation with the validation set cut to its first run."""
    kept = trainer.val_idx
    trainer.val_idx = kept[:1]
    try:
        return trainer.validate()
    finally:
        trainer.val_idx = kept


def sam_gradient_syncs(steps: int, with_no_sync: bool) -> int:
    """All-reduces of gradient buckets that DDP launched over `steps` SAM steps of a model
    small enough for one bucket. `with_no_sync=False` removes the engine's no_sync around
    SAM's first pass (the counterfactual the test needs to see the counter move)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def loss_fn(net, batch):
        x, y = batch
        loss = F.mse_loss(net(x), y)
        return loss, {}

    engine = TrainingEngine(model, loss_fn, lr=1e-2, weight_decay=0.0, settings=EngineSettings(use_sam=True),
                            device=torch.device("cpu"), ddp=True)
    if not with_no_sync:
        engine._no_sync = contextlib.nullcontext
    calls = []

    def counting_allreduce(state, bucket):      # DDP's default all-reduce, counted
        calls.append(1)
        return allreduce_hook(None, bucket)

    engine.net.register_comm_hook(None, counting_allreduce)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        engine.step((torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)))
    return len(calls)


def main(workdir: str, out: str) -> None:
    info, device = init_distributed(len(sys.argv) > 3 and sys.argv[3] == "ddp", "cpu")
    torch.set_default_dtype(torch.float64)
    ctx, store, train_idx, val_idx = demo_context(Path(workdir), OVERRIDES, info, device)
    cfg, preset = ctx.cfg, ctx.preset
    store._data = store._data.double()          # float64 batches for the float64 models

    vae = VAETrainer(ctx, store, train_idx, val_idx)
    beta = vae.beta                             # a tensor the trainer fills in place each epoch

    def posterior_mean_loss(net, batch):
        x = batch[0]
        o = net(x, mode="fix")
        recon = F.mse_loss(o.x_hat, x)
        return cfg.vae.alpha * recon + beta * (o.kl_main + o.kl_levels), {"recon": recon.detach()}

    vae.engine.loss_fn = posterior_mean_loss
    vae.fit()
    vae_one_run = validate_on_one_run(vae)

    rng = np.random.default_rng(0)
    latents_main = rng.normal(size=(cfg.data.Dim1, cfg.vae.Latent_dim_end)).astype(np.float32)
    latents_hier = rng.normal(size=(cfg.data.Dim1, len(preset.encoder_filters) - 1, cfg.vae.Latent_dim)).astype(np.float32)
    params = np.loadtxt(ROOT / "input_data/params.csv", delimiter=",", dtype=np.float32)
    data = ConditionerData.build(ConditionerInputs(params, []), latents_main, latents_hier, device)
    data.inputs, data.main, data.hier = data.inputs.double(), data.main.double(), data.hier.double()
    cond = ConditionerTrainer(ctx, data, train_idx, val_idx, vae_run_id="harness")

    def float64_loss(net, batch):
        x, y_main, y_hier = batch
        main, hier = net(x)
        lm, lh = F.mse_loss(main, y_main), F.mse_loss(hier, y_hier)
        return lm + lh, {"main": lm.detach()}

    cond.engine.loss_fn = float64_loss
    cond.fit()
    cond_one_run = validate_on_one_run(cond)
    syncs = {}
    if info.enabled:
        syncs = {"sam": sam_gradient_syncs(3, with_no_sync=True), "sam_without_no_sync": sam_gradient_syncs(3, False)}
    if info.is_main:
        torch.save({"vae": vae.engine.module.state_dict(), "conditioner": cond.engine.module.state_dict(),
                    "vae_history": vae.history, "conditioner_history": cond.history,
                    "vae_val_one_run": vae_one_run, "conditioner_val_one_run": cond_one_run,
                    "val_runs": len(val_idx), "syncs": syncs}, out)
    del vae, cond          # their DDP wrappers go with the process group (see shutdown())
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
