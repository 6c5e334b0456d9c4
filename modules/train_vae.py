"""Stage 1: train the hierarchical VAE, then extract every run's latents."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from modules.augment import SeriesAugmentation, stretch_copy
from modules.checkpoint import check_same_split, save_npz
from modules.data import FieldStore, HostBatch, prefetch
from modules.engine import Batch, EngineSettings, TrainingEngine, evaluate
from modules.gaussian import Gaussian
from modules.losses import RECON_LOSSES
from modules.run import RunContext
from modules.schedules import cosine_decay, cosine_warm_restarts, kl_weight
from modules.stage import StageTrainer
from modules.vae import HierarchicalVAE

log = logging.getLogger("simulgen")

def frame_basis(store: FieldStore, runs: torch.Tensor, k: int, seed: int, max_frames: int = 2048) -> torch.Tensor:
    """The k leading POD modes (N, k) of the scaled snapshots (one per run and time step) of
    `runs`, from at most `max_frames` of them (a seeded sample)."""
    gen = torch.Generator().manual_seed(seed)
    total = len(runs) * store.num_time
    keep = torch.zeros(total, dtype=torch.bool)                           # which (run, step) frames
    keep[torch.randperm(total, generator=gen)[:max_frames]] = True
    frames = []
    for chunk, idx in enumerate(runs.split(8)):                           # streamed: a few runs at a time
        x = store.get(idx).float().cpu().transpose(1, 2).reshape(-1, store.num_nodes)   # (B·T, N)
        start = chunk * 8 * store.num_time
        frames.append(x[keep[start:start + len(x)]])
    return frame_basis_of(torch.cat(frames).T.unsqueeze(0), k)


def frame_basis_of(runs: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading POD modes (N, k) of the snapshots of `runs` (P, N, T), via the snapshots'
    Gram matrix (cheap: snapshots ≪ nodes on large meshes)."""
    x = runs.transpose(1, 2).reshape(-1, runs.shape[1]).cpu()             # (P·T, N)
    gram = (x.double() @ x.double().T)                                    # (F, F)
    values, vectors = torch.linalg.eigh(gram)                             # ascending
    order = values.flip(0)[:k].clamp_min(1e-30)
    basis = (x.double().T @ vectors.flip(1)[:, :k]) / order.sqrt()        # (N, k), orthonormal columns
    return basis[:, order > order[0] * 1e-12].float()


def init_from_training_runs(model: HierarchicalVAE, store: FieldStore, runs: torch.Tensor, pod_init: bool,
                            seed: int) -> None:
    """Data-driven initialisation, before the engine copies the model (EMA); a resume loads
    over it: the linear POD path, and with `pod_init` the first and last 1×1 convolutions."""
    if not pod_init and model.linear is None:
        return
    k = max(model.encoder.levels[0][0][0].out_channels, model.linear.modes if model.linear is not None else 0)
    basis = frame_basis(store, runs, k, seed).to(next(model.parameters()).device)
    if pod_init:
        model.init_from_frame_basis(basis)
    if model.linear is not None:
        model.init_from_data(basis, (store.get(i).to(basis.device) for i in runs.split(8)))


def refit_linear_path(model: HierarchicalVAE, store: FieldStore, runs, seed: int) -> HierarchicalVAE:
    """A copy of `model` whose linear POD path is refitted on `runs` (their frame modes and run-level
    POD); the networks are unchanged. The GP conditioner's saved model uses it with every
    training run, validation runs included (`gp_refit_basis`, benchmarks/accuracy/NOTES.md H22)."""
    final = copy.deepcopy(model)
    runs = torch.as_tensor(runs)
    basis = frame_basis(store, runs, final.linear.modes, seed).to(final.linear.frame.device)
    final.linear.init_from_data(basis, (store.get(i).to(basis.device) for i in runs.split(8)))
    return final


class VAETrainer(StageTrainer):
    stage = "vae"
    title = "VAE"

    def __init__(self, ctx: RunContext, store: FieldStore, train_idx: np.ndarray, val_idx: np.ndarray):
        cfg = ctx.cfg
        self.store = store
        self.num_runs = store.num_runs
        model = HierarchicalVAE(ctx.vae_architecture()).to(ctx.device)
        init_from_training_runs(model, store, torch.as_tensor(train_idx), cfg.vae.pod_init, cfg.run.seed)
        self.beta = torch.tensor(0.0, device=ctx.device)     # a tensor: compile/graphs see updates
        recon_loss = RECON_LOSSES[cfg.vae.loss_name]
        alpha = cfg.vae.alpha
        # the KL is a sum over a run's latents, the reconstruction a mean over its N·T values
        kl_unit = 1.0 / (store.num_nodes * store.num_time) if cfg.vae.kl_normalize == "values" else 1.0
        self.kl_unit = kl_unit

        def loss_fn(net, batch: Batch):
            (x,) = batch
            out = net(x)
            recon = recon_loss(out.x_hat.float(), x)
            kl = (out.kl_main + out.kl_levels) * kl_unit
            return alpha * recon + self.beta * kl, {"recon": recon.detach(), "kl": kl.detach()}

        settings = EngineSettings.from_config(cfg, ctx.device, cfg.vae.grad_clip)
        engine = TrainingEngine(model, loss_fn, lr=cfg.vae.LearningR, weight_decay=cfg.vae.weight_decay,
                                settings=settings, device=ctx.device, ddp=ctx.dist.enabled)
        super().__init__(ctx, engine, cfg.vae.Training_epochs, ctx.paths.vae, ctx.vae_architecture(),
                         "train the VAE first (--lc_only=0)")
        train = torch.as_tensor(train_idx, dtype=torch.long)
        if cfg.augment.Stretch:
            # Stretch: a second, fixed noisy/time-shifted copy of every training run (index + P).
            train = torch.cat([train, train + self.num_runs])
        self.set_split(train, val_idx, cfg.vae.Batch_size, "Batch_size")
        self.augment = SeriesAugmentation.from_config(cfg.augment) if cfg.augment.use_augmentation else None
        self.best_metric = "recon_mse" if cfg.vae.vae_keep_best or cfg.vae.vae_patience else None
        self.keep_best = cfg.vae.vae_keep_best
        if cfg.vae.vae_patience:           # in validations (every val_every epochs), 1 % a gain
            self.patience, self.min_gain = -(-cfg.vae.vae_patience // cfg.run.val_every), 0.01
        self.initial_val: dict[str, float] | None = None

    # --- data --------------------------------------------------------------------------
    def fetch(self, indices: torch.Tensor, host: HostBatch | None = None) -> torch.Tensor:
        """Scaled runs (B, N, T); indices ≥ P are the Stretch copies of run index - P. `host`:
        the runs already read from the file (streaming, `train_batches`)."""
        x = self.store.finish(host) if host is not None else self.store.get(indices % self.num_runs)
        if not self.ctx.cfg.augment.Stretch:
            return x
        for row in torch.nonzero(indices >= self.num_runs).flatten().tolist():
            gen = torch.Generator().manual_seed(self.ctx.cfg.run.seed * 1_000_003 + int(indices[row]))
            x[row:row + 1] = stretch_copy(x[row:row + 1], gen, self.ctx.cfg.augment.stretch_noise_level,
                                          self.ctx.cfg.augment.stretch_shift_max)
        return x

    def train_batch(self, idx: torch.Tensor) -> Batch:
        return (self.fetch(idx),)

    def train_batches(self, epoch: int):
        """Streamed (--load_all=0): the next batches' runs are read from the file in a background
        thread while this one trains (`prefetch_batches`); the same batches as reading each in turn."""
        if self.store.preloaded:
            yield from super().train_batches(epoch)
            return
        order = self._batch_order(epoch)
        hosts = prefetch(lambda idx: self.store.read(idx % self.num_runs), order, self.ctx.cfg.engine.prefetch_batches)
        for idx, host in zip(order, hosts):
            yield (self.fetch(idx, host),)

    def val_batch(self, idx: torch.Tensor) -> Batch:
        return (self.store.get(idx),)

    def transform(self, batch: Batch) -> Batch:
        return (self.augment(batch[0]),) if self.augment is not None else batch

    # --- hooks ---------------------------------------------------------------------------
    def schedule(self, epoch: int, lr_epoch: int) -> dict[str, float]:
        cfg = self.ctx.cfg
        beta = kl_weight(epoch, self.epochs, self.ctx.beta_start, cfg.vae.beta_end, cfg.vae.beta_ramp_start, cfg.vae.beta_ramp_end)
        if cfg.vae.lr_schedule == "cosine":
            lr = cosine_decay(lr_epoch, self.epochs, cfg.vae.LearningR, cfg.vae.lr_min_factor)
        else:
            lr = cosine_warm_restarts(lr_epoch, self.epochs, cfg.vae.LearningR, cfg.vae.lr_restart_epochs,
                                      cfg.vae.lr_restart_mult, cfg.vae.lr_min_factor)
        lr *= self.lr_scale
        self.beta.fill_(beta)
        self.engine.set_lr(lr)
        return {"beta": beta, "lr": lr}

    def should_validate(self, epoch: int) -> bool:
        return (epoch + 1) % self.ctx.cfg.run.val_every == 0 or epoch + 1 == self.epochs

    def validate(self) -> dict[str, float]:
        """Deterministic (`fix`) reconstruction of the validation runs, no augmentation."""
        def metrics(module, batch: Batch):
            out = module(batch[0], mode="fix")
            return {"recon_mse": F.mse_loss(out.x_hat.float(), batch[0]),
                    "kl": (out.kl_main + out.kl_levels) * self.kl_unit}

        return evaluate(self.engine.eval_module(), self.val_batches(), metrics, self.ctx.device)

    def progress_values(self, train, val, sched):
        values = {"loss": train["loss"], "recon": train["recon"]}
        if val:
            values["val_recon"] = val["recon_mse"]
        values.update(sched)
        return values

    def extra_state(self) -> dict:
        return {"split": {"train": self.train_idx.clone(), "val": self.val_idx.clone()},
                "initial_val": self.initial_val}

    def load_extra_state(self, state: dict) -> None:
        check_same_split(state["split"], self.val_idx, self.checkpoint)
        self.initial_val = state.get("initial_val")

    def fit(self) -> None:
        if self.initial_val is None and not (self.ctx.resume and self.checkpoint.is_file()):
            self.initial_val = self.validate()
        super().fit()


@dataclass(frozen=True)
class Latents:
    main: np.ndarray            # (P, Latent_dim_end)
    hierarchical: np.ndarray    # (P, L-1, Latent_dim)
    recon_error: np.ndarray     # (P,) MSE in scaled space of the kept draw
    rel_l2: np.ndarray          # (P,) ‖x̂ − x‖ / ‖x‖ in physical units


@torch.no_grad()
def extract_latents(model: HierarchicalVAE, store: FieldStore, recon_iter: int, batch_size: int) -> Latents:
    """Encode every run; the main latent is μ (recon_iter = 0) or the best-reconstructing of
    `recon_iter` random draws around it (the original's).

    The hierarchical latents are the encoder's (deterministic) vectors. Candidates are
    decoded in `fix` mode, the way predictions are decoded, so the choice is not noise.
    """
    model.eval()
    mains, hiers, errors, rel = [], [], [], []
    scaler = store.scaler
    for idx in torch.arange(store.num_runs).split(batch_size):
        x = store.get(idx)                                       # (B, N, T)
        mu, log_var, xs = model.encode(x)
        best_err = torch.full((x.shape[0],), float("inf"), device=x.device)
        best_z = mu.clone()
        best_x = torch.zeros_like(x)
        std = Gaussian(mu, log_var).std
        for _ in range(max(recon_iter, 1)):
            z = mu if recon_iter == 0 else mu + torch.randn_like(std) * std
            x_hat, _ = model.decode(z, xs, mode="fix")
            err = (x_hat.float() - x).square().mean(dim=(1, 2))  # (B,)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_z = torch.where(better[:, None], z, best_z)
            best_x = torch.where(better[:, None, None], x_hat.float(), best_x)
        true = scaler.inverse_transform(x.double())
        pred = scaler.inverse_transform(best_x.double())
        rel.append((torch.linalg.vector_norm(pred - true, dim=(1, 2))
                    / torch.linalg.vector_norm(true, dim=(1, 2)).clamp_min(1e-30)).cpu())
        mains.append(best_z.cpu())
        hiers.append(xs.cpu())
        errors.append(best_err.cpu())
    return Latents(torch.cat(mains).numpy(), torch.cat(hiers).numpy(), torch.cat(errors).numpy(),
                   torch.cat(rel).numpy())


def save_latents(path, latents: Latents) -> None:
    save_npz(path, main=latents.main.astype(np.float32), hierarchical=latents.hierarchical.astype(np.float32),
             recon_error=latents.recon_error.astype(np.float32), rel_l2=latents.rel_l2.astype(np.float32))
