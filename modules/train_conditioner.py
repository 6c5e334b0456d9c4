"""Stage 2: train the latent conditioner (MLP / CNN / ViT) on the extracted latents,
optionally fine-tune it end to end through the frozen VAE decoder, and evaluate the
whole surrogate on the validation runs in physical units."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.augment import ConditionerAugmentation
from modules.baseline import relative_l2
from modules.checkpoint import check_same_split, save_npz
from modules.cond_inputs import ImageFeatures, MinMaxScaler, list_images, load_images, read_param_csv, resolve_param_dir
from modules.conditioners import scale_dropout_rates
from modules.data import FieldStore
from modules.engine import Batch, EngineSettings, TrainingEngine, evaluate
from modules.losses import RECON_LOSSES, conditioner_loss, latent_mse
from modules.run import RunContext
from modules.schedules import progressive_dropout, warmup_cosine
from modules.stage import StageTrainer
from modules.surrogate import IMAGE_SIZE, LatentDecoder, Surrogate

log = logging.getLogger("simulgen")


@dataclass(frozen=True)
class ConditionerInputs:
    raw: np.ndarray          # CSV rows (P, num_param) or greyscale images (P, 256, 256) in [0, 1]
    files: list[str]
    names: list[str] | None = None    # the CSV header's parameter names, if it has one


def read_conditioner_inputs(cfg, workdir: Path) -> ConditionerInputs:
    """The run inputs named by param_dir; every problem is a one-line UserError."""
    path = resolve_param_dir(cfg.conditioner.param_dir, workdir)
    if cfg.conditioner.kind == "csvs":
        rows, names = read_param_csv(path, cfg.conditioner.num_param, cfg.conditioner.n_sample)
        return ConditionerInputs(rows, [str(path)], names)
    files = list_images(path, cfg.conditioner.param_data_type, cfg.conditioner.n_sample)
    return ConditionerInputs(load_images(files, IMAGE_SIZE), [str(f) for f in files])


def _scaled_targets(main: np.ndarray, hier: np.ndarray, joint: bool, device: torch.device):
    """Latents → their min-max scaled tensors on `device` and the two scalers."""
    main_scaler = MinMaxScaler().fit(main, joint=joint)
    hier_scaler = MinMaxScaler().fit(hier, joint=joint)
    return (torch.from_numpy(main_scaler.transform(main)).to(device),
            torch.from_numpy(hier_scaler.transform(hier)).to(device), main_scaler, hier_scaler)


@dataclass
class ConditionerData:
    inputs: torch.Tensor             # model-ready inputs (P, F) or (P, 1, 256, 256), on the device
    main: torch.Tensor               # scaled targets (P, Lend)
    hier: torch.Tensor               # scaled targets (P, L-1, Ld)
    input_scaler: MinMaxScaler | None
    main_scaler: MinMaxScaler
    hier_scaler: MinMaxScaler
    input_runs: np.ndarray | None = None     # the raw CSV rows or picture features (P, F): the input-domain check
    image_features: ImageFeatures | None = None   # pictures through the GP: its feature extractor
    param_names: list[str] | None = None          # the CSV header's names, saved with the scalers

    @classmethod
    def build(cls, inputs: ConditionerInputs, main: np.ndarray, hier: np.ndarray, device: torch.device,
              joint_targets: bool = False, feature_runs=None) -> "ConditionerData":
        """feature_runs: pictures enter as ImageFeatures fitted on these runs (the GP on
        pictures); otherwise CSV rows are min-max scaled and pictures enter as pixels."""
        input_scaler, features, raw = None, None, inputs.raw
        if feature_runs is not None:
            features = ImageFeatures.fit(raw, feature_runs)
            raw = features.transform(raw)                                # (P, F)
        if raw.ndim == 2:
            input_scaler = MinMaxScaler().fit(raw)
            x = torch.from_numpy(input_scaler.transform(raw))
        else:
            x = torch.from_numpy(raw).unsqueeze(1)                       # (P, 1, H, W)
        scaled_main, scaled_hier, main_scaler, hier_scaler = _scaled_targets(main, hier, joint_targets, device)
        return cls(x.to(device), scaled_main, scaled_hier, input_scaler, main_scaler, hier_scaler,
                   np.asarray(raw, np.float64) if raw.ndim == 2 else None, features, inputs.names)

    def with_latents(self, main: np.ndarray, hier: np.ndarray, joint_targets: bool = False) -> "ConditionerData":
        """The same inputs (scaler, picture features) with these latents as the scaled targets."""
        scaled_main, scaled_hier, main_scaler, hier_scaler = _scaled_targets(main, hier, joint_targets,
                                                                             self.inputs.device)
        return dataclasses.replace(self, main=scaled_main, hier=scaled_hier, main_scaler=main_scaler,
                                   hier_scaler=hier_scaler)

    def save_scalers(self, path: Path) -> None:
        arrays = {f"main_{k}": v for k, v in self.main_scaler.state_dict().items()}
        arrays.update({f"hier_{k}": v for k, v in self.hier_scaler.state_dict().items()})
        if self.input_scaler is not None:
            arrays.update({f"input_{k}": v for k, v in self.input_scaler.state_dict().items()})
            arrays["domain_runs"] = self.input_runs
        if self.image_features is not None:
            arrays.update({f"features_{k}": v for k, v in self.image_features.state_dict().items()})
        if self.param_names is not None:
            arrays["param_names"] = np.asarray(self.param_names, dtype=str)
        save_npz(path, **arrays)


class ConditionerTrainer(StageTrainer):
    """The latent phase (targets: scaled latents), or with `decoder` the end-to-end phase
    (target: the field, through the frozen VAE decoder in `fix` mode)."""

    def __init__(self, ctx: RunContext, data: ConditionerData, train_idx, val_idx, *,
                 decoder: LatentDecoder | None = None, store: FieldStore | None = None,
                 initial_state: dict | None = None, vae_run_id: str = ""):
        cfg = ctx.cfg
        self.e2e = decoder is not None
        self.stage = "conditioner_e2e" if self.e2e else "conditioner"
        self.title = "end-to-end fine-tuning" if self.e2e else "conditioner"
        self.data, self.store, self.vae_run_id = data, store, vae_run_id
        arch = ctx.conditioner_architecture()
        model = arch.build().to(ctx.device)
        if initial_state is not None:
            model.load_state_dict(initial_state)
        loss = conditioner_loss(decoder, RECON_LOSSES[cfg.vae.loss_name], cfg.conditioner.latent_reg_weight)

        def loss_fn(net, batch: Batch):
            value, parts = loss(net, batch)
            return value, {k: v.detach() for k, v in parts.items()}

        self.decoder = decoder
        settings = EngineSettings.from_config(cfg, ctx.device, cfg.conditioner.lc_grad_clip)
        engine = TrainingEngine(model, loss_fn, lr=cfg.conditioner.latent_conditioner_lr, weight_decay=cfg.conditioner.latent_conditioner_weight_decay,
                                settings=settings, device=ctx.device, ddp=ctx.dist.enabled)
        checkpoint = ctx.paths.conditioner_e2e if self.e2e else ctx.paths.conditioner
        super().__init__(ctx, engine, cfg.conditioner.e2e_epochs if self.e2e else cfg.conditioner.n_epoch, checkpoint, arch,
                         "train the conditioner first (--lc_only=1)")
        self.set_split(train_idx, val_idx, cfg.conditioner.latent_conditioner_batch, "latent_conditioner_batch")
        self.augment = ConditionerAugmentation.from_config(cfg.conditioner)
        self.best_metric, self.patience = "loss", cfg.conditioner.lc_patience

    # --- data ---------------------------------------------------------------------------
    def train_batch(self, idx: torch.Tensor) -> Batch:
        d = self.data
        idx = idx.to(d.inputs.device)
        batch = (d.inputs[idx], d.main[idx], d.hier[idx])
        return batch + (self.store.get(idx),) if self.e2e else batch

    val_batch = train_batch

    def transform(self, batch: Batch) -> Batch:
        x, y_main, y_hier, *rest = self.augment(batch)
        cfg = self.ctx.cfg
        # Label smoothing: shrink the latent targets towards 0, plus a little noise.
        keep = 1.0 - cfg.conditioner.lc_label_smoothing
        y_main = y_main * keep + cfg.conditioner.lc_label_noise * torch.randn_like(y_main)
        y_hier = y_hier * keep + cfg.conditioner.lc_label_noise * torch.randn_like(y_hier)
        return (x, y_main, y_hier, *rest)

    # --- hooks ----------------------------------------------------------------------------
    def schedule(self, epoch: int, lr_epoch: int) -> dict[str, float]:
        cfg = self.ctx.cfg
        lr = self.lr_scale * warmup_cosine(lr_epoch, self.epochs, cfg.conditioner.latent_conditioner_lr, cfg.conditioner.lc_warmup_epochs,
                                           cfg.conditioner.lc_warmup_start, cfg.conditioner.lc_lr_min)
        self.engine.set_lr(lr)
        values = {"lr": lr}
        if cfg.engine.use_progressive_dropout:
            rate = progressive_dropout(epoch, self.epochs, cfg.engine.dropout_start, cfg.engine.dropout_end)
            # every layer's own rate times rate/start: the layers keep their ratios
            reference = max(cfg.engine.dropout_start, cfg.engine.dropout_end)
            scale_dropout_rates(self.engine.module, rate / reference if reference > 0 else 0.0)
            values["dropout"] = rate
        return values

    def validate(self) -> dict[str, float]:
        # validated in MSE whatever Loss_type trains with, so runs with different losses compare
        loss = conditioner_loss(self.decoder, F.mse_loss, self.ctx.cfg.conditioner.latent_reg_weight)

        def metrics(module, batch: Batch):
            value, parts = loss(module, batch)
            return {"loss": value, **parts}
        return evaluate(self.engine.eval_module(), self.val_batches(), metrics, self.ctx.device)

    def extra_state(self) -> dict:
        return {"vae_run_id": self.vae_run_id, "split": {"train": self.train_idx.clone(), "val": self.val_idx.clone()}}

    def load_extra_state(self, state: dict) -> None:
        check_same_split(state["split"], self.val_idx, self.checkpoint)


def physical_fields(store: FieldStore, indices: torch.Tensor, batch: int = 64, dtype=np.float64) -> np.ndarray:
    """True fields of `indices` in physical units, (n, T, N), filled `batch` runs at a time (no second copy)."""
    out = np.empty((len(indices), store.num_time, store.num_nodes), dtype)
    for start, i in zip(range(0, len(indices), batch), indices.split(batch)):
        part = store.scaler.inverse_transform(store.get(i).double()).transpose(1, 2).cpu().numpy()
        out[start:start + len(i)] = part
    return out


def evaluate_surrogate(surrogate: Surrogate, data: ConditionerData, store: FieldStore,
                       train_idx: torch.Tensor, val_idx: torch.Tensor) -> dict:
    """Relative L2 of the predicted validation fields, next to the mean-field baseline."""
    true = physical_fields(store, val_idx)
    pred = surrogate.fields(data.inputs[val_idx.to(data.inputs.device)])
    rel = relative_l2(pred, true, store.scaler.blocks)
    total = None
    for i in train_idx.split(64):
        part = physical_fields(store, i).sum(axis=0)
        total = part if total is None else total + part
    mean_field = total / len(train_idx)
    base = relative_l2(np.broadcast_to(mean_field, true.shape), true, store.scaler.blocks)
    with torch.no_grad():
        main, hier = surrogate.conditioner(data.inputs[val_idx.to(data.inputs.device)])
        y_main, y_hier = data.main[val_idx], data.hier[val_idx]
        latent = sum(latent_mse(main, hier, y_main, y_hier)).item()
        tm, th = data.main[train_idx].mean(0, keepdim=True), data.hier[train_idx].mean(0, keepdim=True)
        base_latent = (F.mse_loss(tm.expand_as(y_main), y_main) + F.mse_loss(th.expand_as(y_hier), y_hier)).item()
    return {"lc_val_rel_l2": float(rel.mean()), "lc_val_rel_l2_median": float(np.median(rel)),
            "lc_val_rel_l2_max": float(rel.max()), "lc_val_rel_l2_per_run": rel.tolist(),
            "baseline_mean_field_rel_l2": float(base.mean()), "baseline_mean_field_rel_l2_per_run": base.tolist(),
            "lc_val_latent_mse": latent, "baseline_mean_latent_mse": base_latent,
            "lc_val_runs": val_idx.tolist(), "_pred": pred, "_true": true}


DIFFICULTY_VALUES = 200_000     # values per run the difficulty model reads (README, "Uncertainty")
DIFFICULTY_NOISE = 0.01        # the difficulty GP's least noise, a fraction of its standardised variance (NOTES H21)


def sample_positions(store: FieldStore, max_values: int, seed: int) -> np.ndarray:
    """One fixed random subset of ≤ max_values flat (step, node) positions, sorted."""
    size = store.num_time * store.num_nodes
    return np.sort(np.random.default_rng(seed).choice(size, min(size, max_values), replace=False))


def sampled_fields(store: FieldStore, keep: np.ndarray, batch: int = 8) -> np.ndarray:
    """Every run's physical values at the flat positions `keep`: (P, len(keep)), read once."""
    return np.concatenate([physical_fields(store, i).reshape(len(i), -1)[:, keep]
                           for i in torch.arange(store.num_runs).split(batch)])


def fit_difficulty(surrogate: Surrogate, post, latents: np.ndarray, values: np.ndarray, keep: np.ndarray,
                   runs: np.ndarray, inputs: np.ndarray, seed: int, batch: int = 8):
    """The difficulty model of a GP conditioner conditioned (`post`, modules/gp.py) on `runs`: a GP of
    the log of each run's leave-one-out relative error, √(p² + r²), where p is the run's projection
    error onto the POD of the other runs at the VAE's number of main latent values (compression)
    and r the decoded size of its closed-form leave-one-out latent residual (regression). Both on
    the runs' values at the positions `keep` (`sampled_fields`: full-size fields are never held
    whole). The GP treats at least DIFFICULTY_NOISE of the log errors' variance as noise: each is
    one run's error, and without that floor the marginal likelihood can pick a kernel that
    interpolates them exactly (benchmarks/accuracy/NOTES.md, H21). Returns the fitted posterior
    and the errors."""
    from modules.baseline import loo_projection_errors
    from modules.gp import GPPosterior, fit_hyperparameters
    values = values[runs]                                                            # (n, V)
    compression = loo_projection_errors(values @ values.T, surrogate.conditioner.latent_dim_end)
    fitted, moved = latents[runs], latents[runs] - post.loo_residuals()
    shift = np.concatenate([(surrogate.decode_latents(moved[s:s + batch]) - surrogate.decode_latents(fitted[s:s + batch]))
                            .reshape(len(fitted[s:s + batch]), -1)[:, keep] for s in range(0, len(runs), batch)])
    regression = np.linalg.norm(shift, axis=1) / np.maximum(np.linalg.norm(values, axis=1), 1e-30)
    errors = np.maximum(np.hypot(compression, regression), 1e-12)
    log_errors = np.log(errors)[:, None]
    hyper = fit_hyperparameters(inputs, log_errors, seed, min_noise=DIFFICULTY_NOISE)
    return GPPosterior.condition(hyper, inputs, log_errors), errors


def predictive_validation(surrogate: Surrogate, data: ConditionerData, store: FieldStore, val_idx: torch.Tensor,
                          samples: int = 16, max_values: int = 20_000, seed: int = 0):
    """Predictive draws (n, K, P), point predictions (n, P) and true values (n, P) of the
    validation runs, in physical units, at one fixed random subset of P ≤ max_values
    (step, node) positions (so full-size fields need not be held K times), run by run."""
    keep = sample_positions(store, max_values, seed)
    draws, points, truths = [], [], []
    for i in val_idx.tolist():
        idx = torch.tensor([i])
        true = physical_fields(store, idx)[0].reshape(-1)
        x = data.inputs[idx.to(data.inputs.device)]
        point, sampled = surrogate.sample(x, samples, sampling="predictive")
        draws.append(sampled[0].reshape(samples, -1)[:, keep])
        points.append(point[0].reshape(-1)[keep])
        truths.append(true[keep])
    return np.stack(draws), np.stack(points), np.stack(truths)

