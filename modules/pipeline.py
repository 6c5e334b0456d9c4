"""A training run, top to bottom: configuration → inputs → VAE → latents → conditioner →
evaluation. Every input is checked before anything is written, so a bad config or file
never touches the outputs of an earlier run."""
from __future__ import annotations

import dataclasses
import json
import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modules import interrupt
from modules.checkpoint import (build_from_checkpoint, check_architecture, same_architecture, check_same_split, check_state_dict,
                               ensure_writable, load_checkpoint, load_model_state, load_npz, save_json, save_npz,
                               seed_everything)
from modules.config import Config, Preset
from modules.data import (FieldScaler, FieldStore, ValidationRuns, check_dataset, find_dataset, load_field_scaler,
                          open_dataset, reduce, split_indices)
from modules.distributed import barrier, init_distributed
from modules.errors import UserError
from modules.monitor import Monitor
from modules.plots import Figures
from modules.run import Paths, RunContext, new_run_id
from modules.calibration import LEVELS
from modules.stage import save_fitted
from modules.vae import VAEArchitecture

if TYPE_CHECKING:
    from modules.train_conditioner import ConditionerInputs

log = logging.getLogger("simulgen")

_VAE_HINT = "train the VAE first: python SimulGen-VAE.py --preset=1 --lc_only=0"
_COND_HINT = "train the conditioner again: python SimulGen-VAE.py --preset=1 --lc_only=1"
_OUTPUT_FIX = ("make it a writable folder (move away a file of that name) or run in another working directory; "
               "nothing was written")


@dataclass(frozen=True)
class Flags:
    """The command-line choices a training run needs (besides the config and preset)."""
    plot: int
    lc_only: bool
    small: bool
    load_all: bool
    use_ddp: bool
    device: str
    resume: bool
    run: str | None = None          # --run: make this archived run current first (modules/history.py)


def _peek(path: Path, kind: str, what: str, hint: str) -> dict | None:
    return load_checkpoint(path, kind, what, hint) if path.is_file() else None


def train(flags: Flags, cfg: Config, preset: Preset, workdir: Path) -> dict:
    dist_info, device = init_distributed(flags.use_ddp, flags.device)
    paths = Paths(workdir)
    seed_everything(cfg.run.seed)
    if flags.run is not None:
        _make_current(flags, paths, cfg.run.keep_runs, dist_info.is_main)
    plan = _preflight(flags, cfg, preset, paths, dist_info, device)
    figures = _first_writes(plan, flags)
    return _train_stages(plan, flags, figures)


@dataclass
class _Plan:
    """What the pre-flight checks established, before anything is written."""
    ctx: RunContext
    data_path: Path
    runs: np.ndarray                 # (P, T', N'), a view of the dataset
    inputs: ConditionerInputs        # CSV rows or pictures
    train_idx: np.ndarray
    val: ValidationRuns              # the validation runs that select and those that check
    fresh_vae: bool                  # this run trains a new VAE (and archives the current run)
    vae_run_id: str                  # the run whose VAE the conditioner is trained on


def _make_current(flags: Flags, paths: Paths, keep_runs: int, is_main: bool) -> None:
    """--run RUN_ID: restore that archived run to checkpoints/ (modules/history.py)."""
    if not (flags.lc_only or flags.resume):
        raise UserError(f"--run {flags.run} picks an earlier run to continue (--resume) or to train a conditioner "
                        f"on (--lc_only=1), or to predict with (--predict); a fresh run starts a new run, so drop --run.")
    from modules.history import locate, restore
    locate(paths, flags.run)                    # a one-line error on every rank when it does not exist
    if is_main:
        restore(paths, flags.run, keep_runs)
    barrier()


def _preflight(flags: Flags, cfg: Config, preset: Preset, paths: Paths, dist_info, device) -> _Plan:
    """Every input checked before anything is written: dataset, conditioner inputs, batch
    splits, engine options, and the checkpoints this run continues from."""
    from modules.distributed import per_rank_batch
    from modules.engine import EngineSettings, graphs_in_use
    from modules.train_conditioner import read_conditioner_inputs
    workdir = paths.workdir
    data_path = find_dataset(workdir / cfg.run.dataset_dir if cfg.run.dataset_dir else workdir, preset.dataset_number)
    array = open_dataset(data_path)
    check_dataset(array, (cfg.data.Dim1, cfg.data.Dim2, cfg.data.Dim3), data_path)
    runs = reduce(array, cfg.data.Dim2_red, cfg.data.Dim3_red)                      # (P, T', N'), a view
    inputs = read_conditioner_inputs(cfg, workdir)
    if cfg.conditioner.uses_gp and cfg.conditioner.gp_point_net == "blend" \
            and cfg.conditioner.node_positions not in ("auto", "embedding"):
        from modules.point_net import positions_file, read_positions
        read_positions(positions_file(cfg.conditioner.node_positions, workdir), cfg.data.Dim3, cfg.data.Dim3_red)
    if not flags.lc_only:       # the global batches must split evenly over the DDP processes
        per_rank_batch(cfg.vae.Batch_size, dist_info.world_size, "Batch_size")
    per_rank_batch(cfg.conditioner.latent_conditioner_batch, dist_info.world_size, "latent_conditioner_batch")
    graphs_in_use(EngineSettings.from_config(cfg, device, grad_clip=0.0), device, dist_info.enabled)  # refuses graphs + DDP
    train_idx, val_idx = split_indices(cfg.data.Dim1, cfg.run.val_split, cfg.run.seed)
    val = ValidationRuns.split(val_idx, cfg.run.seed)
    vae_state, cond_state = _checkpoints_to_continue(flags, paths)
    run_id = _choose_run_id(flags, paths, vae_state, cond_state)
    ctx = RunContext(cfg, preset, flags.small, flags.load_all, flags.plot, device, dist_info, paths, run_id, flags.resume)
    if flags.lc_only and not same_architecture(vae_state["architecture"], ctx.vae_architecture()):
        raise UserError(f"{paths.vae} was trained with another VAE architecture ({vae_state['architecture']}) than "
                        f"this config and preset give ({ctx.vae_architecture().stored()}); {_VAE_HINT}.")
    fresh_vae = not flags.lc_only and not (flags.resume and vae_state is not None)
    vae_run_id = run_id if fresh_vae else vae_state["run"]["run_id"]
    _check_checkpoints_fit(ctx, flags, vae_state, cond_state, vae_run_id, val.select)
    ensure_writable([paths.checkpoints, ctx.run_dir.parent], "training outputs", _OUTPUT_FIX)
    return _Plan(ctx, data_path, runs, inputs, train_idx, val, fresh_vae, vae_run_id)


def _checkpoints_to_continue(flags: Flags, paths: Paths) -> tuple[dict | None, dict | None]:
    """The current VAE and conditioner checkpoints (None where absent), checked against what
    --lc_only and --resume need of them."""
    vae_state = _peek(paths.vae, "vae", "VAE checkpoint", _VAE_HINT)
    if flags.lc_only:
        if vae_state is None or not vae_state.get("finished"):
            raise UserError(f"--lc_only=1 needs a finished VAE in {paths.vae}, but it is "
                            f"{'missing' if vae_state is None else 'unfinished'}; {_VAE_HINT} (or --resume it).")
        load_npz(paths.latents, "latents file", _VAE_HINT, ("main", "hierarchical"))
        load_field_scaler(paths.field_scaler, _VAE_HINT)
    cond_state = _peek(paths.conditioner, "conditioner", "conditioner checkpoint", _COND_HINT)
    if flags.resume and flags.lc_only and cond_state is None:
        raise UserError(f"--resume --lc_only=1: no conditioner checkpoint {paths.conditioner}, so there is nothing to "
                        f"resume; run without --resume to train the conditioner afresh on the saved VAE.")
    if flags.resume and not flags.lc_only and vae_state is None:
        raise UserError(f"--resume: no checkpoint {paths.vae} in {paths.checkpoints} to continue from; "
                        f"start without --resume.")
    return vae_state, cond_state


def _first_writes(plan: _Plan, flags: Flags) -> Figures:
    """Archive the current run (a fresh VAE), create the run folder, write config.json, open
    TensorBoard and print the resolved config."""
    ctx, paths, is_main = plan.ctx, plan.ctx.paths, plan.ctx.dist.is_main
    if is_main:
        try:
            if plan.fresh_vae or (flags.lc_only and not flags.resume):
                from modules.history import archive_current
                archive_current(paths, ctx.cfg.run.keep_runs, copy=not plan.fresh_vae)
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write to {exc.filename or paths.checkpoints} ({exc.strerror or exc}); "
                            f"make it writable (or free disk space) and run again.") from None
        save_json(ctx.run_dir / "config.json", ctx.describe())
    barrier()
    ctx.monitor = Monitor(ctx.run_dir, is_main, ctx.cfg.run.log_every)
    ctx.monitor.text("config", "\n".join(f"{k}: {v}" for k, v in ctx.cfg.flat().items()))
    if is_main:
        _print_config(ctx, plan.data_path)
    return Figures(flags.plot, ctx.run_dir, is_main, dataset=plan.data_path)


def _train_stages(plan: _Plan, flags: Flags, figures: Figures) -> dict:
    """The VAE (unless --lc_only), the conditioner and the classical baseline; summary.json."""
    ctx, cfg = plan.ctx, plan.ctx.cfg
    started = time.perf_counter()
    scaler = _field_scaler(ctx, plan.runs, flags.lc_only, plan.train_idx, plan.data_path)
    store = FieldStore(plan.runs, scaler, preload=flags.load_all, device=ctx.device,
                       pin_memory=ctx.device.type == "cuda")
    summary: dict = {"run_id": ctx.run_id, "dataset_preloaded": store.preloaded}
    if flags.lc_only:
        latents = load_npz(ctx.paths.latents, "latents file", _VAE_HINT, ("main", "hierarchical"))
    else:
        latents = _vae_stage(ctx, store, plan.train_idx, plan.val.select, figures, summary)
    interrupt.set_stage("conditioner stage", "nothing of it was saved and the model in checkpoints/ is unchanged: "
                        "run the same command again" if flags.lc_only else
                        f"the VAE is finished in {ctx.paths.vae}; --resume trains the conditioner stage again on it")
    summary.update(_conditioner_stage(ctx, plan.inputs, latents, store, plan.train_idx, plan.val,
                                      plan.vae_run_id, figures))
    if ctx.dist.is_main and cfg.run.baseline:
        interrupt.set_stage("classical baseline", f"the surrogate is finished and saved in {ctx.paths.checkpoints} "
                            f"(predict with it); only this run's comparison with the classical models was left out")
        summary.update(classical_baseline(plan.runs, plan.inputs.raw, plan.train_idx, plan.val.check, cfg.run.seed,
                                          scaler.blocks, cfg.conditioner.gp_kernel))
    interrupt.set_stage(None)
    summary["seconds_total"] = time.perf_counter() - started
    summary["figures"] = [str(p) for p in figures.saved]
    if ctx.dist.is_main:
        save_json(ctx.run_dir / "summary.json", summary)
        _print_summary(summary, ctx)
    ctx.monitor.close()
    barrier()
    return summary


def _choose_run_id(flags: Flags, paths: Paths, vae_state, cond_state) -> str:
    if flags.resume:
        if not flags.lc_only and vae_state is not None and not vae_state.get("finished"):
            return vae_state["run"]["run_id"]
        if cond_state is not None and not cond_state.get("finished"):
            return cond_state["run"]["run_id"]
        if vae_state is not None and not flags.lc_only:
            return vae_state["run"]["run_id"]
    from modules.distributed import broadcast_object
    return broadcast_object(new_run_id(paths))


def _check_checkpoints_fit(ctx: RunContext, flags: Flags, vae_state: dict | None, cond_state: dict | None,
                           vae_run_id: str, val_idx: np.ndarray) -> None:
    """Every checkpoint this run will load must fit this config: the same architecture and
    data split (`val_idx`: the validation runs that select, which the stages validate on), weights
    that fit the network. Checked before anything is written, so a mismatch never touches the
    earlier run's checkpoints or run folder."""
    paths = ctx.paths
    if flags.lc_only:           # the VAE's exported weights decode the conditioner's latents
        _check_weights(VAEArchitecture, vae_state, paths.vae, "VAE checkpoint", _VAE_HINT, ("export",))
    elif flags.resume:
        _check_resumable(vae_state, paths.vae, "VAE checkpoint", ctx.vae_architecture(), val_idx, _VAE_HINT)
    if not flags.resume:
        return
    stages = [(paths.conditioner, cond_state)]
    if ctx.cfg.conditioner.use_e2e_training and not ctx.cfg.conditioner.uses_gp:
        stages.append((paths.conditioner_e2e, _peek(paths.conditioner_e2e, "conditioner_e2e", "conditioner checkpoint",
                                                    _COND_HINT)))
    for path, state in stages:
        if state is not None and state["extra"]["vae_run_id"] == vae_run_id:      # it will be resumed
            _check_resumable(state, path, "conditioner checkpoint", ctx.conditioner_architecture(), val_idx,
                             _COND_HINT)


def _check_resumable(state: dict, path: Path, what: str, architecture, val_idx: np.ndarray, hint: str) -> None:
    check_architecture(state["architecture"], architecture, path)
    check_same_split(state["extra"]["split"], val_idx, path)
    _check_weights(type(architecture), state, path, what, hint, ("model", "export"))


def _check_weights(arch_cls: type, state: dict, path: Path, what: str, hint: str, parts: tuple[str, ...]) -> None:
    """The saved weights fit the network the checkpoint's architecture describes (built on the
    CPU, without drawing from the RNG streams the training uses)."""
    with torch.random.fork_rng(devices=[]):
        expected = build_from_checkpoint(arch_cls, state, path, what, hint).state_dict()
    for part in parts:
        check_state_dict(expected, state[part], path, what, hint)


def _imported_field_count(data_path: Path, num_nodes: int) -> int:
    """Fields stacked as node blocks by --import_runs (dataset<d>.fields.json), else 1."""
    from modules.mesh_io import fields_file
    layout = fields_file(data_path)
    try:
        info = json.loads(layout.read_text())
        count = len(info["fields"])
        return count if info.get("nodes_per_field", 0) * count == num_nodes else 1
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def _field_scaler(ctx: RunContext, runs: np.ndarray, lc_only: bool, train_idx: np.ndarray,
                  data_path: Path) -> FieldScaler:
    if lc_only:
        scaler = load_field_scaler(ctx.paths.field_scaler, _VAE_HINT)
        if scaler.num_nodes != runs.shape[2]:
            raise UserError(f"{ctx.paths.field_scaler} covers {scaler.num_nodes} nodes, the data {runs.shape[2]}; {_VAE_HINT}.")
        return scaler
    scaler = FieldScaler.fit(runs, ctx.cfg.data.field_scaling, train_idx,                # streamed: a memmap is never
                             blocks=_imported_field_count(data_path, runs.shape[2]))  # read whole
    if ctx.dist.is_main:
        save_npz(ctx.paths.field_scaler, **scaler.state_dict())
    return scaler


def _vae_stage(ctx: RunContext, store: FieldStore, train_idx, val_idx, figures: Figures, summary: dict) -> dict:
    from modules.train_vae import VAETrainer, extract_latents, save_latents
    cfg = ctx.cfg
    trainer = VAETrainer(ctx, store, train_idx, val_idx)
    if ctx.dist.enabled:
        seed_everything(cfg.run.seed + ctx.dist.rank)    # same initial weights, different augmentation streams
    trainer.fit()
    model = trainer.best_module()
    if ctx.dist.is_main:
        latents = extract_latents(model, store, _recon_iter(cfg), max(cfg.vae.Batch_size, 1))
        save_latents(ctx.paths.latents, latents)
        history = trainer.history
        summary.update({
            "vae_epochs": len(history.get("epoch", [])),
            "vae_train_loss": history["train_loss"][-1] if history.get("train_loss") else None,
            "vae_val_recon_mse_initial": (trainer.initial_val or {}).get("recon_mse"),
            "vae_val_recon_mse": _last_finite(history.get("val_recon_mse", [])),
            "vae_recon_mse": float(latents.recon_error.mean()),
            "vae_recon_rel_l2": float(latents.rel_l2.mean()),
            "vae_recon_rel_l2_max": float(latents.rel_l2.max()),
            "vae_seconds": trainer.seconds, "vae_rollbacks": trainer.rollbacks,
        })
        figures.losses(history, "vae_losses", "VAE training")
        if figures.active:
            run = int(val_idx[0])
            true = store.scaler.inverse_transform(store.get([run]).double())[0].T.cpu().numpy()
            with torch.no_grad():
                recon, _ = model.decode(torch.from_numpy(latents.main[run:run + 1]).to(ctx.device),
                                        torch.from_numpy(latents.hierarchical[run:run + 1]).to(ctx.device), mode="fix")
            recon = store.scaler.inverse_transform(recon.double())[0].T.cpu().numpy()
            figures.traces(true, recon, run, "vae_reconstruction", "reconstruction")
    barrier()
    return load_npz(ctx.paths.latents, "latents file", _VAE_HINT, ("main", "hierarchical"))


def _recon_iter(cfg: Config) -> int:
    """Draws per run when extracting the latents: 0 takes μ (`latent_target mu`)."""
    return 0 if cfg.vae.latent_target == "mu" else cfg.vae.Recon_iter


def _frozen_vae(ctx: RunContext) -> torch.nn.Module:
    """The saved VAE's exported weights, in eval mode and without gradients."""
    paths = ctx.paths
    vae_state = load_checkpoint(paths.vae, "vae", "VAE checkpoint", _VAE_HINT)
    vae = build_from_checkpoint(VAEArchitecture, vae_state, paths.vae, "VAE checkpoint", _VAE_HINT).to(ctx.device)
    load_model_state(vae, vae_state["export"], paths.vae, "VAE checkpoint", _VAE_HINT)
    return vae.eval().requires_grad_(False)


def _conditioner_stage(ctx: RunContext, inputs: ConditionerInputs, latents: dict, store: FieldStore, train_idx,
                       val: ValidationRuns, vae_run_id: str, figures: Figures) -> dict:
    from modules.surrogate import LatentDecoder, Surrogate
    from modules.train_conditioner import ConditionerData, ConditionerTrainer
    cfg, paths = ctx.cfg, ctx.paths
    joint = cfg.conditioner.lc_target_scaling == "joint"

    def with_decoder(vae, data: ConditionerData):
        """The conditioner's data with a decoder of `vae` and a maker of surrogates."""
        decoder = LatentDecoder(vae, data.main_scaler, data.hier_scaler, ctx.device)

        def surrogate(module, frame_net=None) -> Surrogate:
            return Surrogate(module, decoder, store.scaler, data.input_scaler, cfg.conditioner.kind,
                             cfg.conditioner.num_param, cfg.conditioner.param_data_type, ctx.device, {},
                             frame_net=frame_net, param_names=data.param_names)
        return data, decoder, surrogate

    vae = _frozen_vae(ctx)
    data, decoder, surrogate = with_decoder(vae, ConditionerData.build(
        inputs, latents["main"], latents["hierarchical"], ctx.device, joint_targets=joint,
        feature_runs=train_idx if cfg.conditioner.uses_image_features else None))
    if cfg.conditioner.uses_gp:
        final = None
        if cfg.conditioner.gp_refit_basis and vae.linear is not None:
            from modules.train_vae import extract_latents, refit_linear_path
            final_vae = refit_linear_path(vae, store, np.arange(store.num_runs), cfg.run.seed)
            fitted = extract_latents(final_vae, store, _recon_iter(cfg), max(cfg.vae.Batch_size, 1))
            final = with_decoder(final_vae, data.with_latents(fitted.main, fitted.hierarchical, joint))
        return _gp_conditioner_stage(ctx, data, surrogate, store, train_idx, val, vae_run_id, figures, final)
    if ctx.dist.is_main:
        data.save_scalers(paths.conditioner_scalers)
    resume = ctx.resume and _belongs_to(paths.conditioner, "conditioner", vae_run_id)
    ctx_stage = _with_resume(ctx, resume)
    trainer = ConditionerTrainer(ctx_stage, data, train_idx, val.select, vae_run_id=vae_run_id)
    if ctx.dist.enabled:
        seed_everything(cfg.run.seed + ctx.dist.rank)
    trainer.fit()
    best = trainer.best_module()
    out: dict = {"conditioner": cfg.conditioner.kind, "lc_epochs": len(trainer.history.get("epoch", [])),
                 "lc_best_val_loss": trainer.best_val, "lc_seconds": trainer.seconds, "lc_rollbacks": trainer.rollbacks}
    if cfg.conditioner.use_e2e_training:
        if ctx.dist.is_main:
            out["lc_val_rel_l2_before_e2e"] = _validation_report(surrogate(best), data, store, train_idx, val, best,
                                                                 None)["lc_val_rel_l2"]
        e2e_resume = ctx.resume and _belongs_to(paths.conditioner_e2e, "conditioner_e2e", vae_run_id)
        e2e = ConditionerTrainer(_with_resume(ctx, e2e_resume), data, train_idx, val.select, decoder=decoder,
                                 store=store, initial_state=trainer.export_state(), vae_run_id=vae_run_id)
        e2e.fit()
        best = e2e.best_module()
        out.update({"e2e_epochs": len(e2e.history.get("epoch", [])), "e2e_best_val_loss": e2e.best_val,
                    "e2e_seconds": e2e.seconds})
        figures.losses(e2e.history, "e2e_losses", "end-to-end fine-tuning")
    elif ctx.dist.is_main and paths.conditioner_e2e.exists():
        paths.conditioner_e2e.unlink()      # stale: it belongs to an earlier conditioner
    if ctx.dist.is_main:
        figures.losses(trainer.history, "conditioner_losses", "conditioner training")
        out.update(_validation_report(surrogate(best), data, store, train_idx, val, best, figures))
    barrier()
    return out


def _validation_report(surrogate, data, store: FieldStore, train_idx, val: ValidationRuns, module,
                       figures: Figures | None) -> dict:
    """The surrogate on the validation runs that check (they chose nothing: its `lc_val_rel_l2` is what a new
    design can expect) beside the mean field, and on those that select (`lc_select_rel_l2`, optimistic)."""
    from modules.train_conditioner import evaluate_surrogate
    train_t = torch.as_tensor(train_idx)
    evaluation = evaluate_surrogate(surrogate, data, store, train_t, torch.as_tensor(val.check))
    selected = evaluate_surrogate(surrogate, data, store, train_t, torch.as_tensor(val.select))
    evaluation.update(lc_select_rel_l2=selected["lc_val_rel_l2"], lc_select_runs=val.select.tolist(),
                      lc_val_apart=val.apart)
    if figures is None:
        evaluation.pop("_pred"), evaluation.pop("_true")
        return evaluation
    return _conditioner_report(evaluation, module, data, val.check, figures)


def _conditioner_report(evaluation: dict, module, data, val_idx: np.ndarray, figures: Figures) -> dict:
    """The validation evaluation for the summary, and its figures."""
    pred, true = evaluation.pop("_pred"), evaluation.pop("_true")
    if figures.active:
        with torch.no_grad():
            main, _ = module(data.inputs[torch.as_tensor(val_idx).to(data.inputs.device)])
        figures.latents(main.float().cpu().numpy(), data.main[val_idx].cpu().numpy(), "conditioner_latents")
        figures.traces(true[0], pred[0], int(val_idx[0]), "conditioner_prediction", "prediction")
    return evaluation


def _gp_conditioner_stage(ctx: RunContext, data, surrogate, store: FieldStore, train_idx, val: ValidationRuns,
                          vae_run_id: str, figures: Figures, final_basis: tuple | None = None) -> dict:
    """`csv_conditioner gp` / `image_conditioner gp`. The GP's kernels are fitted on, and its posterior
    conditioned on, the training runs; the networks blended with it (`_networks`) stop early and get their
    weights on the validation runs that select, and the spread is calibrated there; the reported numbers
    are those of the validation runs that check, which chose nothing. The saved GP is then refitted on every
    run (training and validation), as a model is refitted on all its data once it is validated: on the suite
    this cut the test error by 10-15 % (benchmarks/accuracy/NOTES.md, H10). `final_basis` (the conditioner
    data, decoder and surrogate maker of the VAE with its linear path refitted on every run;
    `gp_refit_basis`) does the same for the VAE's POD path: the saved GP is conditioned on that VAE's
    latents, the saved scalers are theirs, and the conditioner checkpoint carries the path (H22)."""
    from modules.baseline import CV_FOLDS, choose_kernel
    from modules.gp import GPPosterior, fit_hyperparameters
    from modules.train_conditioner import DIFFICULTY_VALUES, fit_difficulty, sample_positions, sampled_fields
    cfg, paths = ctx.cfg, ctx.paths
    if cfg.conditioner.use_e2e_training:
        log.warning("use_e2e_training 1 has no effect with the GP conditioner (it has nothing to fine-tune)")
    started = time.perf_counter()
    x = data.inputs.double().cpu().numpy()

    def targets(d) -> np.ndarray:
        return torch.cat([d.main, d.hier.flatten(1)], 1).double().cpu().numpy()

    y = targets(data)
    train_idx = np.asarray(train_idx)
    arch = ctx.conditioner_architecture()
    seed = cfg.run.seed
    kernel, kernel_scores, values = cfg.conditioner.gp_kernel, {}, None
    if kernel == "auto" or (cfg.conditioner.gp_difficulty and ctx.dist.is_main):
        keep = sample_positions(store, DIFFICULTY_VALUES, seed)
        values = sampled_fields(store, keep)
    if kernel == "auto":        # on every run, as the saved GP is: on the training split alone (4/5 of them) the
        # folds' fits had too few runs and misjudged the families (NOTES H28); one choice among three leaks little
        # into the validation error
        kernel, kernel_scores = choose_kernel(values, x, arch.latent_dim_end, seed)
        log.info("GP kernel: %s (%d-fold cross-validated rel. L2 of the runs' POD: %s)", kernel, CV_FOLDS,
                 ", ".join(f"{k} {v:.4g}" for k, v in kernel_scores.items()) or "too few runs to compare")
    progress = _StageProgress("GP conditioner")
    hyper = fit_hyperparameters(x[train_idx], y[train_idx], seed, kernel=kernel)
    held_out = dataclasses.replace(arch, num_runs=len(train_idx)).build()
    held_post = GPPosterior.condition(hyper, x[train_idx], y[train_idx])
    held_out.set_posterior(held_post)
    progress.line("GP fitted on the training runs")
    final_data, final_decoder, final_surrogate = final_basis or (data, None, surrogate)
    y_final = y if final_basis is None else targets(final_data)
    saved = fit_hyperparameters(x, y_final, seed, kernel=kernel)
    final_post = GPPosterior.condition(saved, x, y_final)
    final = arch.build().set_posterior(final_post)
    progress.line("GP refitted on every run")
    out: dict = {"conditioner": f"{cfg.conditioner.kind} (gp)", "lc_gp_kernel": kernel,
                 "lc_gp_kernel_cv_rel_l2": kernel_scores, "lc_gp_length_scales": saved.length.tolist(),
                 "lc_gp_noise": saved.noise.tolist()}
    held_net = final_net = None
    if ctx.dist.is_main:
        module = held_out.to(ctx.device)
        if cfg.conditioner.gp_difficulty:
            module.set_difficulty(fit_difficulty(surrogate(module), held_post, y, values, keep, train_idx,
                                                 x[train_idx], seed)[0])
            post, errors = fit_difficulty(final_surrogate(final), final_post, y_final, values, keep, np.arange(len(x)),
                                          x, seed)
            final.set_difficulty(post)
            out["lc_loo_rel_l2"] = {"mean": float(errors.mean()), "max": float(errors.max())}
            progress.line("difficulty model fitted")
        if "blend" in (cfg.conditioner.gp_frame_net, cfg.conditioner.gp_point_net):
            held_net, final_net, blend_out = _networks(ctx, surrogate(module), data, store, train_idx, val.select,
                                                       figures.dataset)
            out.update(blend_out)
        held_surrogate = surrogate(module, held_net)
        out.update(_validation_report(held_surrogate, data, store, train_idx, val, module, figures))
        out.update(_calibrate_spread(held_surrogate, data, store, val, seed, figures, cfg.conditioner.gp_draw_scale))
        progress.line("validated and calibrated")
        final.spread_scale.fill_(out["lc_spread_scale"])
        final.band_scales.copy_(torch.tensor([out["lc_band_scales"][str(level)] for level in LEVELS]))
        cal = out.get("calibration", {})
        ctx.monitor.scalars("conditioner", 0, {"val_rel_l2": out["lc_val_rel_l2"], "val_latent_mse": out["lc_val_latent_mse"],
                                               **{f"val_{k}": cal[k] for k in ("coverage_50", "coverage_90", "crps") if k in cal}})
    seconds = time.perf_counter() - started
    extra = {"vae_run_id": vae_run_id, "split": val.stored(train_idx)}
    if final_net is not None:
        extra["frame_net"] = final_net.stored()
    if final_decoder is not None:
        extra["linear_path"] = {k: v.cpu() for k, v in final_decoder.vae.linear.state_dict().items()}
        out["lc_refit_basis"] = True
    if ctx.dist.is_main:
        final_data.save_scalers(paths.conditioner_scalers)
    save_fitted(ctx, paths.conditioner, "conditioner", final, arch, extra, seconds)
    if ctx.dist.is_main and paths.conditioner_e2e.exists():
        paths.conditioner_e2e.unlink()      # stale: it belongs to an earlier conditioner
    out["lc_seconds"] = seconds
    barrier()
    return out


class _StageProgress:
    """A plain line per finished part of a stage without epochs, with the seconds since the last."""

    def __init__(self, stage: str) -> None:
        self.stage, self.last = stage, time.perf_counter()

    def line(self, what: str) -> None:
        now = time.perf_counter()
        log.info("%s: %s (%.1f s)", self.stage, what, now - self.last)
        self.last = now


JUDGE_VALUES = 20_000       # (step, node) positions per held-out run that judge the networks while they train


def _networks(ctx: RunContext, gp_surrogate, data, store: FieldStore, train_idx: np.ndarray,
              select_idx: np.ndarray, dataset: Path | None) -> tuple:
    """`gp_frame_net blend` and `gp_point_net blend` (modules/frame_net.py, modules/point_net.py): each network
    trained on the training runs, stopping early when its blend with the GP stops gaining on the validation
    runs that select, the blend weights chosen together on those runs, and, for the saved model, each network
    with a weight refitted on every run for as many passes as it took, as the GP is refitted. Returns the
    held-out and the saved NetBlend, None for both where every weight is 0 or no network could be trained
    (the summary says why), and the summary's entries."""
    from modules.baseline import relative_l2
    from modules.frame_net import MAX_GIB, NetBlend, choose_weights, fits_in_memory, train_frame_net
    from modules.net_training import HeldRuns
    from modules.point_net import node_positions, train_point_net
    from modules.train_conditioner import physical_fields, sample_positions
    conditioner = ctx.cfg.conditioner
    wanted = [kind for kind, key in (("frame", conditioner.gp_frame_net), ("point", conditioner.gp_point_net))
              if key == "blend"]
    if not fits_in_memory(store.num_runs, store.num_time, store.num_nodes):
        log.info("frame and point networks skipped: the training frames need more than %d GiB", MAX_GIB)
        why = f"skipped: the training frames need more than {MAX_GIB} GiB"
        return None, None, {f"lc_{kind}_net": why for kind in wanted}
    x = data.inputs.float().cpu().numpy()
    fields = physical_fields(store, torch.arange(store.num_runs), dtype=np.float32)    # every run, read once
    seed, out, blocks = ctx.cfg.run.seed, {}, store.scaler.blocks
    gp = gp_surrogate.fields(data.inputs[torch.as_tensor(select_idx).to(data.inputs.device)])
    held = HeldRuns(x[select_idx], fields[select_idx], gp, sample_positions(store, JUDGE_VALUES, seed + 1))
    trainers = {}
    if "frame" in wanted:
        trainers["frame"] = lambda idx, **how: train_frame_net(x[idx], fields[idx], conditioner.frame_net_epochs,
                                                               seed, ctx.device, blocks, **how)
    if "point" in wanted:
        started = time.perf_counter()
        positions, source = node_positions(conditioner.node_positions, ctx.paths.workdir, dataset,
                                           fields[train_idx], ctx.cfg.data.Dim3, seed)
        out["lc_point_net_positions"] = source
        if positions is None:
            out["lc_point_net"] = source
        else:
            trainers["point"] = lambda idx, steps=None, **how: train_point_net(
                x[idx], fields[idx], positions, steps or conditioner.point_net_steps, seed, ctx.device, blocks,
                exact=steps is not None, **how)
        out["lc_point_net_positions_seconds"] = time.perf_counter() - started
    held_nets, own, seconds, fitted = {}, {}, {}, {}
    for kind, train in trainers.items():
        started = time.perf_counter()
        held_nets[kind], fitted[kind] = train(train_idx, held=held)
        with torch.inference_mode():
            own[kind] = held_nets[kind](torch.as_tensor(x[select_idx], device=ctx.device)).cpu().numpy()
        seconds[kind] = time.perf_counter() - started
    if not held_nets:
        return None, None, out
    truth = fields[select_idx]
    weights, _, errors = choose_weights(gp, list(own.values()), truth, blocks)
    out["lc_select_rel_l2_gp"] = float(errors[0])
    for kind, weight in zip(held_nets, weights):
        out.update({f"lc_{kind}_net": "blend", f"lc_{kind}_net_weight": float(weight),
                    f"lc_select_rel_l2_{kind}_net": float(relative_l2(own[kind], truth, blocks).mean()),
                    f"lc_{kind}_net_steps": fitted[kind].steps, f"lc_{kind}_net_stopped": fitted[kind].stopped,
                    f"lc_{kind}_net_budget": fitted[kind].budget})
    kept = [kind for kind, weight in zip(held_nets, weights) if weight > 0]
    held_blend = final_blend = None
    if kept:            # else the GP alone, its draws calibrated without the networks' disagreement, as it is saved
        shares = [float(w) for w in weights if w > 0]
        held_blend = NetBlend([held_nets[kind] for kind in kept], shares)
        refitted = []
        for kind in kept:           # as many passes over every run as the held-out training took over its runs
            started = time.perf_counter()
            steps = max(1, round(fitted[kind].steps * store.num_runs / len(train_idx)))
            refitted.append(trainers[kind](slice(None), steps=steps)[0])
            seconds[kind] += time.perf_counter() - started
        final_blend = NetBlend(refitted, shares)
    for kind in held_nets:
        out[f"lc_{kind}_net_seconds"] = seconds[kind]
    log.info("blend on the validation runs that select: GP %.4g%s -> %.4g with weights %s", errors[0],
             "".join(f", {kind} network {out[f'lc_select_rel_l2_{kind}_net']:.4g}" for kind in held_nets),
             errors.min(), ", ".join(f"{kind} {w:.2f}" for kind, w in zip(held_nets, weights)))
    return held_blend, final_blend, out


CALIBRATION_MIN_RUNS = 3


def _calibrate_spread(surrogate, data, store: FieldStore, val: ValidationRuns, seed: int, figures: Figures,
                      draw_scale: str = "crps") -> dict:
    """The predictive draws' scale (`gp_draw_scale`: the CRPS-minimising one, or the 90 % band's) and each
    band's relative to it, split-conformal on the validation runs that select (modules/calibration.py), and
    the calibration numbers before and after them on the runs that check, which fitted nothing."""
    from modules.calibration import band_scales, calibration_metrics, crps_scale, scale_about
    from modules.train_conditioner import predictive_validation
    if len(val.select) < CALIBRATION_MIN_RUNS:
        log.warning("only %d validation run(s) select: the predictive spread is left uncalibrated (raise val_split)",
                    len(val.select))
        return {"lc_spread_scale": 1.0, "lc_band_scales": {str(level): 1.0 for level in LEVELS}}

    def drawn(runs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return predictive_validation(surrogate, data, store, torch.as_tensor(runs), seed=seed)

    draws, point, truth = drawn(val.select)
    raw = band_scales(draws, point, truth)
    band90 = raw[0.9] if raw[0.9] > 0 else 1.0
    scale = band90
    if draw_scale == "crps":        # at least 1 % of the 90 % band's, so that the draws keep a spread to scale
        scale = max(crps_scale(draws, point, truth, 2 * band90), 0.01 * band90)
    relative = {level: raw[level] / scale for level in LEVELS}
    if not val.apart:
        log.warning("one validation run both selects and checks: the calibration reported is on the runs it was "
                    "fitted on")
    draws, point, truth = drawn(val.check) if val.apart else (draws, point, truth)
    scaled = scale_about(draws, point, scale)
    figures.calibration(scaled, point, truth, "calibration", relative)
    return {"lc_spread_scale": scale, "lc_band_scales": {str(k): v for k, v in relative.items()},
            "calibration_unscaled": calibration_metrics(draws, point, truth),
            "calibration": calibration_metrics(scaled, point, truth, relative)}


def classical_baseline(runs: np.ndarray, raw_inputs: np.ndarray, train_idx: np.ndarray, check_idx: np.ndarray,
                       seed: int, blocks: int = 1, kernel: str = "rbf") -> dict:
    """The classical models fitted on the training runs, scored on the validation runs that check, as the
    surrogate is (modules/baseline.py): POD + GPR at its best (modes and one GP per coefficient or one shared
    kernel, chosen by leave-one-out on the training runs), POD + GPR at 99.9 % energy, POD + RBF, on the CSV
    parameters or on simple features of the pictures. `kernel`: the GP's family, as the conditioner's."""
    from modules.baseline import BASELINE_MAX_BYTES, classical_baselines
    from modules.cond_inputs import ImageFeatures
    need = len(train_idx) * runs.shape[1] * runs.shape[2] * 8
    if need > BASELINE_MAX_BYTES:
        log.info("classical baseline skipped: the training fields need %.1f GiB (limit %.0f GiB)",
                 need / 2**30, BASELINE_MAX_BYTES / 2**30)
        return {"baseline_skipped": f"training fields of {need / 2**30:.1f} GiB"}
    started = time.perf_counter()
    log.info("classical baselines: fitting POD + GPR and POD + RBF on the %d training runs", len(train_idx))
    features = raw_inputs if raw_inputs.ndim == 2 else ImageFeatures.fit(raw_inputs, train_idx).transform(raw_inputs)
    train_idx, check_idx = np.sort(train_idx), np.sort(check_idx)
    result = classical_baselines(np.asarray(runs[train_idx], dtype=np.float64),
                                 np.asarray(runs[check_idx], dtype=np.float64), features[train_idx],
                                 features[check_idx], seed, methods=("pod_gpr", "pod_gpr_best", "pod_rbf"),
                                 blocks=blocks, kernel="rbf" if kernel == "auto" else kernel)
    scores = {name: float(rel.mean()) for name, rel in result.rel_l2.items()}
    best = min(scores, key=scores.get)
    log.info("classical baselines on the validation runs that check: %s (%.1f s)",
             ", ".join(f"{NAMES[k]} {v:.4g}" for k, v in scores.items()), time.perf_counter() - started)
    return {"baseline_pod_gpr_rel_l2": scores["pod_gpr"], "baseline_pod_gpr_rel_l2_per_run": result.rel_l2["pod_gpr"].tolist(),
            "baseline_pod_modes": result.modes, "baseline_pod_gpr_best_rel_l2": scores["pod_gpr_best"],
            "baseline_pod_gpr_best_modes": result.best.modes, "baseline_pod_gpr_best_variant": result.best.variant,
            "baseline_pod_rbf_rel_l2": scores["pod_rbf"], "baseline_best": best, "baseline_best_rel_l2": scores[best],
            "baseline_inputs": "parameters" if raw_inputs.ndim == 2 else "picture features",
            "baseline_seconds": time.perf_counter() - started}


NAMES = {"pod_gpr": "POD + GPR (99.9 % energy)", "pod_gpr_best": "POD + GPR (modes and kernel chosen by leave-one-out)",
         "pod_rbf": "POD + RBF", "mean": "the mean field"}


def _belongs_to(path: Path, kind: str, vae_run_id: str) -> bool:
    """Resume a conditioner checkpoint only if it was trained on this VAE's latents."""
    state = _peek(path, kind, "conditioner checkpoint", _COND_HINT)
    if state is None:
        return False
    if state["extra"].get("vae_run_id") != vae_run_id:
        log.warning("%s belongs to another VAE run; the conditioner starts afresh", path)
        return False
    return True


def _with_resume(ctx: RunContext, resume: bool) -> RunContext:
    from dataclasses import replace
    return replace(ctx, resume=resume)


def _last_finite(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return finite[-1] if finite else None


def _print_config(ctx: RunContext, data_path: Path) -> None:
    cfg, p = ctx.cfg, ctx.preset
    print(f"SimulGenVAE run {ctx.run_id}: {cfg.data.Dim1} runs × {cfg.data.Dim2_red} steps × {cfg.data.Dim3_red} nodes from {data_path}")
    print(f"  VAE {'small' if ctx.small else 'large'}, filters {list(p.encoder_filters)}, latents {cfg.vae.Latent_dim_end} + "
          f"{len(p.encoder_filters) - 1}×{cfg.vae.Latent_dim}; {cfg.vae.Training_epochs} epochs, batch {cfg.vae.Batch_size}, lr {cfg.vae.LearningR}")
    if cfg.conditioner.uses_gp:
        on = "picture features" if cfg.conditioner.uses_image_features else "the parameters"
        print(f"  conditioner {cfg.conditioner.kind}: a Gaussian process per latent value on {on} ({cfg.vae.Latent_dim_end} + "
              f"{len(p.encoder_filters) - 1}×{cfg.vae.Latent_dim}), ARD kernels fitted on the training runs")
    else:
        print(f"  conditioner {cfg.conditioner.kind}, filters {list(p.conditioner_filters)}; {cfg.conditioner.n_epoch} epochs, "
              f"batch {cfg.conditioner.latent_conditioner_batch}, lr {cfg.conditioner.latent_conditioner_lr}")
    print(f"  device {ctx.device}, world size {ctx.dist.world_size}, precision {cfg.engine.precision}; outputs in "
          f"{ctx.paths.checkpoints} and {ctx.run_dir} (resolved config: {ctx.run_dir / 'config.json'})")
    print(resolved_config_text(cfg), flush=True)


def resolved_config_text(cfg: Config, width: int = 100) -> str:
    """Every resolved key=value once, section by section, several per line."""
    pairs = " ".join(f"{key}={_config_value(value)}" for key, value in cfg.flat().items())
    return "\n".join(textwrap.wrap(pairs, width=width, initial_indent="  config: ", subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False))


def _config_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))           # as the condition file writes it
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return repr(value)
    return str(value)


def _print_summary(summary: dict, ctx: RunContext) -> None:
    def f(key):
        v = summary.get(key)
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    print("Summary")
    if "vae_recon_rel_l2" in summary:
        print(f"  VAE: final train loss {f('vae_train_loss')}, validation recon MSE {f('vae_val_recon_mse_initial')} → "
              f"{f('vae_val_recon_mse')}; reconstruction over all runs: MSE {f('vae_recon_mse')} (scaled), "
              f"relative L2 {f('vae_recon_rel_l2')} (physical)")
    print(f"  conditioner ({summary.get('conditioner')}): relative L2 on the validation runs that check: mean "
          f"{f('lc_val_rel_l2')}, median {f('lc_val_rel_l2_median')}, max {f('lc_val_rel_l2_max')}; mean-field "
          f"baseline {f('baseline_mean_field_rel_l2')}; on the runs that selected {f('lc_select_rel_l2')}")
    if "lc_val_rel_l2_before_e2e" in summary:
        print(f"  end-to-end fine-tuning: {f('lc_val_rel_l2_before_e2e')} → {f('lc_val_rel_l2')}")
    print(f"  total {summary['seconds_total']:.1f} s; summary in {ctx.run_dir / 'summary.json'}")
    print(verdict(summary), flush=True)


def verdict(summary: dict) -> str:
    """The run's last line: did the surrogate beat the best classical model on the validation runs that
    checked (runs that chose neither the best epoch nor the blend weights)?"""
    ours, mean = summary.get("lc_val_rel_l2"), summary.get("baseline_mean_field_rel_l2")
    runs = (f"{len(summary.get('lc_val_runs', []))} validation runs that chose nothing" if summary.get("lc_val_apart", True)
            else "1 validation run that also chose the best epoch and the blend weights, so optimistic")
    base = summary.get("baseline_best_rel_l2")
    if base is None:
        return (f"Surrogate relative L2 {ours:.4g} on {runs}, against the mean field's {mean:.4g} "
                f"(classical baseline not fitted: {summary.get('baseline_skipped', 'baseline 0')}).")
    name = f"{NAMES[summary['baseline_best']]} on the {summary['baseline_inputs']}"
    if ours < base:
        return (f"The surrogate beats the best classical model: relative L2 {ours:.4g} on {runs}, against {name} "
                f"{base:.4g} ({ours / base:.2f}×) and the mean field {mean:.4g}.")
    return (f"The surrogate does NOT beat the best classical model: relative L2 {ours:.4g} on {runs}, against "
            f"{name} {base:.4g} ({ours / base:.2f}×; mean field {mean:.4g}). Until it does, the classical model is "
            f"the better surrogate for this data (README, 'Accuracy').")
