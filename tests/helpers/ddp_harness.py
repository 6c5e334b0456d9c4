"""Train the real VAE and MLP-conditioner stages for a few epochs, deterministically, and
save the final weights: run once as a single process and once under torchrun, the DDP test
compares the two. Augmentation, dropout and label noise are off, and the VAE is trained on
its posterior means (`fix` mode), so the only difference left is how the batch is split.
Everything runs in float64: Adam's first steps are about lr·sign(g), so fp32 rounding of
near-zero gradients (summed in another order across ranks) would flip whole steps."""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.distributed import init_distributed, shutdown  # noqa: E402
from modules.train_conditioner import ConditionerData, ConditionerInputs, ConditionerTrainer  # noqa: E402
from modules.train_vae import VAETrainer  # noqa: E402
from tests.helpers.context import demo_context  # noqa: E402

OVERRIDES = ["Training_epochs=3", "n_epoch=3", "Batch_size=16", "latent_conditioner_batch=16", "use_augmentation=0",
             "val_every=1", "input_type=csvs", "param_dir=/input_data/params.csv", "use_progressive_dropout=1",
             "dropout_start=0", "dropout_end=0", "lc_label_noise=0", "lc_mixup_prob=0", "lc_input_noise_prob=0",
             "lc_warmup_epochs=1", "LearningR=0.002"]


def main(workdir: str, out: str) -> None:
    info, device = init_distributed(len(sys.argv) > 3 and sys.argv[3] == "ddp", "cpu")
    torch.set_default_dtype(torch.float64)
    ctx, store, train_idx, val_idx = demo_context(Path(workdir), OVERRIDES, info, device)
    cfg, preset = ctx.cfg, ctx.preset
    store._data = store._data.double()          # float64 batches for the float64 models

    vae = VAETrainer(ctx, store, train_idx, val_idx)

    def posterior_mean_loss(net, batch):
        x = batch[0]
        o = net(x, mode="fix")
        recon = F.mse_loss(o.x_hat, x)
        return cfg.alpha * recon + vae.beta * (o.kl_main + o.kl_levels), {"recon": recon.detach()}

    vae.engine.loss_fn = posterior_mean_loss
    vae.fit()

    rng = np.random.default_rng(0)
    latents_main = rng.normal(size=(cfg.Dim1, cfg.Latent_dim_end)).astype(np.float32)
    latents_hier = rng.normal(size=(cfg.Dim1, len(preset.encoder_filters) - 1, cfg.Latent_dim)).astype(np.float32)
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
    if info.is_main:
        torch.save({"vae": vae.engine.module.state_dict(), "conditioner": cond.engine.module.state_dict(),
                    "vae_history": vae.history, "conditioner_history": cond.history}, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
