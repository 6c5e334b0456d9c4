"""Configuration: one strict parser for `condition.txt` and `preset.txt`.

Every key of the original's `condition.txt` is a field of one of six frozen sections
(`DataConfig`, `VAEConfig`, `AugmentConfig`, `ConditionerConfig`, `EngineConfig`,
`RunConfig`; `Config` holds one of each), named exactly as in the file, which stays flat.
Every value the original hard-coded is an optional key whose default is the original's
value (or the port's, with the original's under `recipe original`), so the original file
still parses and nothing is hidden in code. Each field's metadata (range, choices, help)
drives parsing, validation, `--list_keys` and the README's key table: one source of truth.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from modules.errors import UserError

log = logging.getLogger("simulgen")

_REQUIRED = object()
# Values derived from other keys when absent (e.g. Dim2_red defaults to Dim2).
_DERIVED = None


def _key(default: Any = _REQUIRED, *, lo=None, hi=None, lo_open=False, choices=None,
         help: str, reserved: bool = False):
    return field(default=None if default is _REQUIRED else default,
                 metadata=dict(required=default is _REQUIRED, lo=lo, hi=hi, lo_open=lo_open,
                               choices=choices, help=help, reserved=reserved))


# `csv` is accepted as a spelling of `csvs` (the original's files use both).
INPUT_TYPES = ("csvs", "csv", "image", "image_vit")
LOSS_TYPES = {1: "MSE", 2: "MAE", 3: "SmoothL1", 4: "Huber"}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The dataset's shape, the part of it that is used, and how its fields are scaled."""
    SECTION: ClassVar[str] = "data"      # its heading in --list_keys and the README

    Dim1: int = _key(lo=1, help="number of runs P in the dataset")
    Dim2: int = _key(lo=1, help="time steps T per run")
    Dim3: int = _key(lo=1, help="nodes N per time step")
    num_var: int = _key(1, lo=1, hi=1,
                        help="variables per node; only 1 is supported (stack variables as extra nodes)")
    Dim2_red: int = _key(_DERIVED, lo=1,
                         help="keep only the first T' time steps (default: Dim2)")
    Dim3_red: int = _key(_DERIVED, lo=1,
                         help="keep only the first N' nodes (default: Dim3)")
    field_scaling: str = _key("centered", choices=("centered", "minmax"),
                              help="centered: subtract the training runs' mean field, one scale for the whole field; "
                                   "minmax: the original's per-node min-max to [-0.9, 0.9]")

    def check(self, where) -> None:
        if self.Dim2_red > self.Dim2:
            raise UserError(f"{where('Dim2_red')}, key 'Dim2_red': {self.Dim2_red} is larger than Dim2 = {self.Dim2}; it keeps the first T' of the {self.Dim2} steps, so set it to {self.Dim2} or less.")
        if self.Dim3_red > self.Dim3:
            raise UserError(f"{where('Dim3_red')}, key 'Dim3_red': {self.Dim3_red} is larger than Dim3 = {self.Dim3}; it keeps the first N' of the {self.Dim3} nodes, so set it to {self.Dim3} or less.")
        if self.Dim1 < 2:
            raise UserError(f"{where('Dim1')}, key 'Dim1': at least 2 runs are needed (one to train on, one to validate).")


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The VAE: size, loss, KL schedule, optimiser and the port's recipe switches."""
    SECTION: ClassVar[str] = "VAE"

    Training_epochs: int = _key(lo=1, help="VAE training epochs")
    Batch_size: int = _key(lo=1,
                           help="VAE batch size (global: divided across DDP ranks)")
    LearningR: float = _key(lo=0.0, lo_open=True, help="VAE learning rate")
    Latent_dim: int = _key(lo=1, help="size of each hierarchical latent")
    Latent_dim_end: int = _key(lo=1, help="size of the main latent")
    Loss_type: int = _key(1, lo=1, hi=4,
                          help="reconstruction loss: 1 MSE, 2 MAE, 3 SmoothL1, 4 Huber")
    alpha: float = _key(lo=0.0, lo_open=True,
                        help="weight of the reconstruction loss")
    num_aug_f: int = _key(0, lo=0, help="reserved (unused, as in the original)",
                          reserved=True)
    num_aug_a: int = _key(0, lo=0, help="reserved (unused, as in the original)",
                          reserved=True)
    rec_graph: int = _key(0, lo=0, hi=1,
                          help="reserved; reconstruction figures follow --plot", reserved=True)
    Recon_iter: int = _key(1, lo=1,
                           help="latent draws per run at extraction; the best reconstruction is kept")
    weight_decay: float = _key(5e-4, lo=0.0, help="VAE AdamW weight decay")
    grad_clip: float = _key(10.0, lo=0.0, help="VAE gradient-norm clip (0 = off)")
    beta_start: float = _key(1e-4, lo=0.0, lo_open=True,
                             help="initial KL weight (a preset's k > 0 overrides it with 10^-k)")
    beta_end: float = _key(1e-2, lo=0.0, lo_open=True, help="final KL weight")
    beta_ramp_start: float = _key(0.3, lo=0.0, hi=1.0,
                                  help="fraction of epochs at which the KL weight starts rising")
    beta_ramp_end: float = _key(0.8, lo=0.0, hi=1.0,
                                help="fraction of epochs at which the KL weight reaches beta_end")
    lr_restart_epochs: int = _key(0, lo=0,
                                  help="first cosine-restart period T_0 (0 = Training_epochs//4)")
    lr_restart_mult: int = _key(2, lo=1, help="cosine-restart period multiplier")
    lr_min_factor: float = _key(1e-4, lo=0.0, hi=1.0,
                                help="minimum LR as a fraction of LearningR")
    kl_normalize: str = _key("values", choices=("values", "none"),
                             help="values: divide the KL term by the N·T field values of a run, so the balance of "
                                  "alpha·recon (a mean over values) and beta·KL does not depend on the mesh size; "
                                  "none: the original's per-run KL, under which large meshes collapse the posterior")
    latent_target: str = _key("mu", choices=("mu", "draw"),
                              help="conditioner targets: the encoder's mean mu, or the original's best of Recon_iter "
                                   "random draws")
    vae_patience: int = _key(30, lo=0,
                             help="stop the VAE when its validation reconstruction has not improved by 1 % in this "
                                  "many epochs (the best weights are kept); 0: train every epoch, as the original")
    vae_keep_best: bool = _key(True,
                               help="export the VAE weights of the best validation reconstruction (0: the last epoch's)")
    lr_schedule: str = _key("cosine", choices=("cosine", "restarts"),
                            help="VAE LR: one cosine decay to LearningR*lr_min_factor, or the original's warm restarts")
    logvar_init: float = _key(-8.0,
                              help="initial log-variance of the posterior and the level priors (0: the original's "
                                   "unit variance)")
    linear_modes: int = _key(64, lo=0,
                             help="a linear POD encoder/decoder beside the networks through this many frame modes, "
                                  "started as the POD of the training runs (0: the original network alone)")
    pod_init: bool = _key(True,
                          help="start the encoder's first and the decoder's last 1×1 convolution from the leading "
                               "POD modes of the training snapshots (0: the original's random He initialisation)")
    vae_norm: str = _key("group", choices=("group", "none"),
                         help="normalisation inside the VAE's blocks: the original's GroupNorm, or none")
    spectral_norm: bool = _key(True, help="spectral normalisation of every VAE Conv/Linear (the original's)")
    output_norm: bool = _key(False,
                             help="GroupNorm on the decoder's output (the original's); 0 removes it, which "
                                  "fields whose runs differ mainly in amplitude need")

    @property
    def loss_name(self) -> str:
        return LOSS_TYPES[self.Loss_type]

    def check(self, where) -> None:
        if self.beta_ramp_end < self.beta_ramp_start:
            raise UserError(f"{where('beta_ramp_end')}, key 'beta_ramp_end': {self.beta_ramp_end} is before beta_ramp_start = {self.beta_ramp_start}.")


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """The VAE's augmentations of the training runs."""
    SECTION: ClassVar[str] = "augmentation"

    Stretch: int = _key(0, lo=0, hi=1,
                        help="1 = offline augmentation doubling the dataset with noisy/shifted copies")
    use_augmentation: bool = _key(True, help="master switch of the augmentations")
    aug_noise_prob: float = _key(0.2, lo=0.0, hi=1.0, help="Gaussian-noise probability")
    aug_noise_level: float = _key(0.03, lo=0.0, help="noise std (fraction of the range)")
    aug_scale_prob: float = _key(0.1, lo=0.0, hi=1.0, help="amplitude-scaling probability")
    aug_scale_min: float = _key(0.9, lo=0.0, lo_open=True, help="smallest scale factor")
    aug_scale_max: float = _key(1.1, lo=0.0, lo_open=True, help="largest scale factor")
    aug_shift_prob: float = _key(0.0, lo=0.0, hi=1.0, help="time-shift probability")
    aug_shift_max: float = _key(0.1, lo=0.0, hi=1.0,
                                help="largest time shift (fraction of the steps)")
    aug_mixup_prob: float = _key(0.2, lo=0.0, hi=1.0, help="mixup probability")
    aug_mixup_alpha: float = _key(0.2, lo=0.0, lo_open=True, help="mixup Beta(a, a)")
    aug_mixup_lambda_min: float = _key(0.1, lo=0.0, hi=1.0,
                                       help="smallest mixup weight λ of the run itself (draws below are clipped)")
    aug_mixup_lambda_max: float = _key(0.9, lo=0.0, hi=1.0,
                                       help="largest mixup weight λ of the run itself (draws above are clipped)")
    aug_cutout_prob: float = _key(0.0, lo=0.0, hi=1.0, help="cutout probability")
    aug_cutout_max: float = _key(0.1, lo=0.0, hi=1.0,
                                 help="longest cutout (fraction of the steps)")
    stretch_noise_level: float = _key(0.03, lo=0.0,
                                      help="Stretch copies: noise std (fraction of the range)")
    stretch_shift_max: float = _key(0.1, lo=0.0, hi=1.0,
                                    help="Stretch copies: largest time shift (fraction of the steps)")

    def check(self, where) -> None:
        for low, high in (("aug_scale_min", "aug_scale_max"), ("aug_mixup_lambda_min", "aug_mixup_lambda_max")):
            if getattr(self, high) < getattr(self, low):
                raise UserError(f"{where(high)}, key '{high}': {getattr(self, high)} is smaller than {low} = {getattr(self, low)}.")


@dataclass(frozen=True, kw_only=True)
class ConditionerConfig:
    """The latent conditioner: its inputs, model and training recipe."""
    SECTION: ClassVar[str] = "conditioner"

    num_param: int = _key(lo=1, help="number of CSV input columns")
    n_sample: int = _key(_DERIVED, lo=1,
                         help="number of conditioner samples; must equal Dim1 (default: Dim1)")
    param_dir: str = _key(
                          help="CSV file or image folder; a leading / that does not exist as an "
                               "absolute path is relative to the working directory")
    n_epoch: int = _key(lo=1, help="conditioner training epochs")
    latent_conditioner_lr: float = _key(lo=0.0, lo_open=True,
                                        help="conditioner learning rate")
    latent_conditioner_batch: int = _key(lo=1, help="conditioner batch size (global)")
    latent_conditioner_weight_decay: float = _key(1e-4, lo=0.0,
                                                  help="conditioner AdamW weight decay")
    latent_conditioner_dropout_rate: float = _key(0.2, lo=0.0, hi=0.95,
                                                  help="dropout of the CNN (DropBlock) and the ViT")
    use_spatial_attention: bool = _key(True,
                                       help="squeeze-excitation attention in the CNN (0/1)")
    input_type: str = _key(choices=INPUT_TYPES,
                           help="csvs: CSV parameters (csv accepted); image or image_vit: a folder of pictures (the model: csv_conditioner, image_conditioner)")
    param_data_type: str = _key(".png", choices=(".png", ".jpg"),
                                help="image file extension")
    lc_warmup_epochs: int = _key(10, lo=0, help="linear LR warm-up epochs")
    lc_warmup_start: float = _key(0.01, lo=0.0, hi=1.0, lo_open=True,
                                  help="warm-up starts at this fraction of the LR")
    lc_lr_min: float = _key(1e-8, lo=0.0, help="LR at the end of the cosine decay")
    lc_grad_clip: float = _key(1.0, lo=0.0, help="gradient-norm clip (0 = off)")
    lc_label_smoothing: float = _key(0.0, lo=0.0, hi=1.0,
                                     help="shrink latent targets towards 0 by this fraction")
    lc_label_noise: float = _key(0.01, lo=0.0, help="std of noise added to the targets")
    lc_mixup_prob: float = _key(0.15, lo=0.0, hi=1.0, help="mixup probability")
    lc_mixup_alpha: float = _key(0.2, lo=0.0, lo_open=True, help="mixup Beta(a, a)")
    lc_input_noise_prob: float = _key(0.1, lo=0.0, hi=1.0, help="input-noise probability")
    lc_input_noise: float = _key(0.01, lo=0.0, help="input-noise std")
    lc_image_aug_prob: float = _key(0.8, lo=0.0, hi=1.0,
                                    help="probability of outline-safe image augmentation (flip, ±1-px shift)")
    lc_flip_prob: float = _key(0.0, lo=0.0, hi=1.0,
                               help="horizontal-flip probability within image augmentation "
                                    "(set 0 when a mirrored geometry gives a different field)")
    lc_target_scaling: str = _key("column", choices=("joint", "column"),
                                  help="latent targets to [-0.9, 0.9]: joint keeps the latents' relative sizes (one "
                                       "range for all), column is the original's per-column min-max")
    csv_conditioner: str = _key("gp", choices=("gp", "mlp"),
                                help="input_type csvs: one Gaussian process per latent value (ARD kernel, fitted in "
                                     "seconds; README, \"Recipes\") or the original's MLP")
    image_conditioner: str = _key("gp", choices=("gp", "network"),
                                  help="input_type image / image_vit: one Gaussian process per latent value on simple "
                                       "picture features (moments of the intensity and of the drawn shape; README, \"Recipes\") "
                                       "or the original's network (CNN for image, ViT for image_vit)")
    gp_difficulty: bool = _key(True,
                               help="GP conditioner: widen each prediction's spread by a GP of the training runs' "
                                    "leave-one-out errors (README, \"Uncertainty\"); 0: the latents' posterior alone")
    gp_refit_basis: bool = _key(True,
                                help="GP conditioner, VAE with a linear path (linear_modes > 0): once validated, refit "
                                     "that POD path on every training run, validation runs too, for the saved model, "
                                     "as the GP is refitted (README, \"Accuracy\"); 0: keep the VAE's, fitted on its "
                                     "training split")
    gp_kernel: str = _key("rbf", choices=("rbf", "rbf+linear", "matern52", "auto"),
                          help="GP conditioner: the kernel family of its GPs (ARD-RBF, ARD-RBF + a linear term, "
                               "ARD-Matérn 5/2), or auto: the family whose POD + GP predicts the training runs' "
                               "fields best in 5-fold cross-validation of every run (README, \"Accuracy\": not the "
                               "default, its choices were right only where the families differ by several %)")
    gp_draw_scale: str = _key("crps", choices=("crps", "band90"),
                              help="GP conditioner: spread the predictive draws by the factor that minimises their "
                                   "CRPS on the validation runs (crps; the bands file carries each band's coverage "
                                   "calibration) or so that their own 5-95 % range is the calibrated 90 % band "
                                   "(band90) (README, \"Uncertainty\")")
    gp_frame_net: str = _key("blend", choices=("blend", "off"),
                             help="GP conditioner: also train a network from the inputs and the time to each saved "
                                  "frame, on every frame of the training runs, and blend its prediction with the GP's "
                                  "by the weight that predicts the validation runs best (README, \"Accuracy\"); "
                                  "off: the GP alone")
    frame_net_epochs: int = _key(150, lo=1, help="epochs of the frame network at most (gp_frame_net blend), at most "
                                                 "10,000 optimiser steps of 128 frames in all, on CPU at most 2e7 / "
                                                 "nodes; it stops earlier when its blend gains nothing on the "
                                                 "validation runs that select")
    gp_point_net: str = _key("blend", choices=("blend", "off"),
                             help="GP conditioner: also train a network from the inputs, the time and a node's "
                                  "position to the field there, on random points of the training runs, and blend it "
                                  "in beside the frame network by the weights that predict the validation runs best "
                                  "(README, \"Accuracy\"); off: without it")
    point_net_steps: int = _key(6000, lo=1, help="optimiser steps of the point network at most (gp_point_net "
                                                 "blend), 4,096 random points each, and at most 80 per training run; "
                                                 "it stops earlier as the frame network does")
    node_positions: str = _key("auto", help="where the point network's nodes are: auto (the mesh.vtu that "
                                            "--import_runs writes beside the dataset, else an embedding of the "
                                            "nodes learnt from the training fields), embedding, or a CSV / .npy "
                                            "file of one row of 1-3 coordinates per node, read as param_dir is")
    lc_patience: int = _key(20000, lo=1,
                            help="early stopping: epochs without validation improvement")
    use_e2e_training: bool = _key(False,
                                  help="fine-tune end to end through the frozen VAE decoder")
    e2e_epochs: int = _key(_DERIVED, lo=1,
                           help="end-to-end fine-tuning epochs (default: n_epoch//4)")
    latent_reg_weight: float = _key(0.1, lo=0.0,
                                    help="weight of the latent loss during end-to-end fine-tuning")

    @property
    def kind(self) -> str:
        """csvs, image or image_vit (`csv` is a spelling of `csvs`)."""
        return "csvs" if self.input_type == "csv" else self.input_type

    @property
    def uses_gp(self) -> bool:
        return (self.csv_conditioner if self.kind == "csvs" else self.image_conditioner) == "gp"

    @property
    def uses_image_features(self) -> bool:
        """The GP on pictures: it regresses on ImageFeatures, not on the pixels."""
        return self.kind != "csvs" and self.uses_gp


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The training engine shared by both stages: precision, SAM, EMA, compile, graphs."""
    SECTION: ClassVar[str] = "engine"

    precision: str = _key("auto", choices=("auto", "fp32", "bf16", "fp16"),
                          help="auto: bf16 on CUDA with bf16, fp16 on older CUDA, fp32 on CPU")
    use_sam: bool = _key(False, help="sharpness-aware minimisation (two passes a step)")
    sam_rho: float = _key(0.05, lo=0.0, lo_open=True, help="SAM neighbourhood size")
    use_ema: bool = _key(False,
                         help="EMA of the weights, used for validation, latents, prediction and saving")
    ema_decay: float = _key(0.999, lo=0.0, hi=1.0, lo_open=True, help="EMA decay")
    ema_warmup: bool = _key(True,
                            help="EMA decay min(ema_decay, (1+n)/(10+n)) after n updates, so short runs "
                                 "are not averaged towards their initial weights")
    compile: bool = _key(False, help="torch.compile the model")
    cuda_graphs: bool = _key(False,
                             help="capture the training step in a CUDA graph (CUDA only)")
    prefetch_batches: int = _key(2, lo=0,
                                 help="--load_all=0: read up to this many VAE batches ahead from the dataset file in a "
                                      "background thread, overlapping the training step (0 = read each when needed)")
    use_progressive_dropout: bool = _key(False,
                                         help="schedule the conditioner's dropout from dropout_start to dropout_end")
    dropout_start: float = _key(0.3, lo=0.0, hi=0.95, help="progressive dropout: first rate")
    dropout_end: float = _key(0.1, lo=0.0, hi=0.95, help="progressive dropout: last rate")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the data lives, seeding, the split, checkpoints, logging and the baseline."""
    SECTION: ClassVar[str] = "run"

    dataset_dir: str = _key("",
                            help="folder of dataset<d>.npy / .pickle (default: the working directory)")
    recipe: str = _key("default", choices=("default", "original"),
                       help="original: every optional key the file does not set takes the original v1.4.3's value "
                            "instead of the port's default (README, 'Recipes')")
    baseline: bool = _key(True,
                          help="fit the classical models (POD + GPR, at its best and at 99.9 % energy, POD + RBF) on "
                               "the training runs and compare the surrogate with the best of them (skipped when the "
                               "training fields exceed 2 GiB)")
    seed: int = _key(42, lo=0, help="seed of every RNG and of the data split")
    val_split: float = _key(0.2, lo=0.0, hi=0.9, lo_open=True,
                            help="fraction of runs held out for validation: half select, half check")
    checkpoint_every: int = _key(100, lo=1,
                                 help="write a resumable checkpoint every N epochs (and at the end)")
    checkpoint_minutes: float = _key(10.0, lo=0.0,
                                     help="also write one at the first epoch end N minutes after the last (0 = off)")
    keep_runs: int = _key(5, lo=1,
                          help="earlier runs' checkpoints kept in checkpoints/history/ (unfinished runs are dropped "
                               "first; a finished model is never dropped for an unfinished one)")
    val_every: int = _key(10, lo=1,
                          help="validate every N epochs (and at the last epoch)")
    log_every: int = _key(10, lo=1,
                          help="progress line / TensorBoard scalars every N epochs (a line also every 30 s)")


SECTIONS: dict[str, type] = {"data": DataConfig, "vae": VAEConfig, "augment": AugmentConfig,
                              "conditioner": ConditionerConfig, "engine": EngineConfig, "run": RunConfig}


@dataclass(frozen=True)
class Config:
    """The whole configuration: one frozen section per part of the tool. Every key keeps the name
    it has in `condition.txt`; `FIELDS` says which section holds it."""
    data: DataConfig
    vae: VAEConfig
    augment: AugmentConfig
    conditioner: ConditionerConfig
    engine: EngineConfig
    run: RunConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every key with its value, in section order (the file's names, one level)."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}


# key name -> its dataclass field, and -> the attribute of Config that holds its section
FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
SECTION_OF: dict[str, str] = {f.name: attr for attr, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def stored_sections(stored: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A checkpoint's `config` entry in the section layout. Checkpoints written before the
    sections hold one flat key -> value dict; their keys are sorted into sections here."""
    if stored and set(stored) <= set(SECTIONS):
        return stored
    nested: dict[str, dict[str, Any]] = {attr: {} for attr in SECTIONS}
    for key, value in stored.items():
        if key in SECTION_OF:
            nested[SECTION_OF[key]][key] = value
    return nested
# `recipe original`: the original v1.4.3's values of the optional keys whose port default differs
# (measured on benchmarks/accuracy/; README, "Recipes").
ORIGINAL_RECIPE: dict[str, Any] = {
    "field_scaling": "minmax", "kl_normalize": "none", "latent_target": "draw", "vae_keep_best": False, "vae_patience": 0, "lr_schedule": "restarts",
    "spectral_norm": True, "output_norm": True, "pod_init": False, "logvar_init": 0.0, "linear_modes": 0, "lc_label_smoothing": 0.2,
    "lc_flip_prob": 0.5, "csv_conditioner": "mlp", "image_conditioner": "network",
}
assert set(ORIGINAL_RECIPE) <= set(FIELDS)
# Keys the original's files carry that have no meaning here.
IGNORED_KEYS = {"RESERVED"}
# The original's conditioner keys had earlier names ("pinn_*"); accept them.
ALIASES = {"pinn_lr": "latent_conditioner_lr", "pinn_batch": "latent_conditioner_batch",
           "pinn_weight_decay": "latent_conditioner_weight_decay",
           "pinn_dropout_rate": "latent_conditioner_dropout_rate"}


def _convert(name: str, raw: str, where: str) -> Any:
    f = FIELDS[name]
    meta = f.metadata
    kind = f.type
    if kind == "bool":
        if raw not in ("0", "1"):
            raise UserError(f"{where}, key '{name}': '{raw}' is not 0 or 1; write 1 to switch it on or 0 to switch it off.")
        return raw == "1"
    if kind == "int":
        try:
            value = int(raw)
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                as_float = math.nan
            if not as_float.is_integer():
                raise UserError(f"{where}, key '{name}': '{raw}' is not a whole number; write an integer such as {f.default if isinstance(f.default, int) and not isinstance(f.default, bool) else 1}.") from None
            value = int(as_float)
    elif kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{where}, key '{name}': '{raw}' is not a number; write a value such as {f.default if f.default is not None else '0.001'}.") from None
        if not math.isfinite(value):
            raise UserError(f"{where}, key '{name}': '{raw}' is not a finite number.")
    else:
        value = raw
        if name == "param_data_type" and not raw.startswith("."):
            value = "." + raw
        if meta["choices"] and value.lower() in meta["choices"]:
            value = value.lower()
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{where}, key '{name}': '{raw}' is not one of {', '.join(meta['choices'])}.")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        bound = f"greater than {lo}" if meta["lo_open"] else f"at least {lo}"
        raise UserError(f"{where}, key '{name}': {raw} is out of range; it must be {bound}"
                        + (f" and at most {hi}." if hi is not None else "."))
    if hi is not None and value > hi:
        raise UserError(f"{where}, key '{name}': {raw} is out of range; it must be at most {hi}"
                        + (f" ({meta['help']})." if name == "num_var" else "."))
    return value


def _suggest(name: str) -> str | None:
    candidates = list(FIELDS) + list(ALIASES)
    lowered = {c.lower(): c for c in candidates}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.8)
    return lowered[close[0]] if close else None


def _parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value or len(value.split()) != 1:
        raise UserError(f"--set {text!r}: write it as KEY=VALUE, for example --set Training_epochs=5.")
    return key, value


def parse_condition(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Parse a `condition.txt`, apply `--set KEY=VALUE` overrides, validate, return a Config."""
    path = Path(path)
    raw = _read_condition(path)             # key -> (value text, where it was set)
    _apply_overrides(raw, overrides)
    values: dict[str, Any] = {}
    original = "recipe" in raw and _convert("recipe", *raw["recipe"]) == "original"
    for name, f in FIELDS.items():
        if name in raw:
            values[name] = _convert(name, raw[name][0], raw[name][1])
        elif original and name in ORIGINAL_RECIPE:
            values[name] = ORIGINAL_RECIPE[name]
        elif f.metadata["required"]:
            raise UserError(f"{path}: required key '{name}' is missing; add a line '{name} <value>' ({f.metadata['help']}).")
    data = DataConfig(**_section(values, DataConfig))
    data = dataclasses.replace(data, Dim2_red=data.Dim2 if data.Dim2_red is None else data.Dim2_red,
                               Dim3_red=data.Dim3 if data.Dim3_red is None else data.Dim3_red)
    cond = ConditionerConfig(**_section(values, ConditionerConfig))
    cond = dataclasses.replace(cond, n_sample=data.Dim1 if cond.n_sample is None else cond.n_sample,
                               e2e_epochs=max(1, cond.n_epoch // 4) if cond.e2e_epochs is None else cond.e2e_epochs)
    cfg = Config(data=data, vae=VAEConfig(**_section(values, VAEConfig)),
                 augment=AugmentConfig(**_section(values, AugmentConfig)), conditioner=cond,
                 engine=EngineConfig(**_section(values, EngineConfig)), run=RunConfig(**_section(values, RunConfig)))
    return _check_consistency(cfg, lambda key: raw[key][1] if key in raw else str(path))


def _read_condition(path: Path) -> dict[str, tuple[str, str]]:
    """The file's key -> (value text, 'FILE line N'), every line checked."""
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass --config PATH or run from the folder that holds input_data/condition.txt.")
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}.") from None
    raw: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith(("%", "'")):
            continue
        parts = text.split()
        where = f"{path} line {number}"
        key = ALIASES.get(parts[0], parts[0])
        if key in IGNORED_KEYS:
            continue
        if key not in FIELDS:
            hint = _suggest(parts[0])
            if hint:
                raise UserError(f"{where}: unknown key '{parts[0]}'; did you mean '{hint}'?")
            if number > 1:      # the first line may be a free-text title ("Common params")
                log.warning("%s: ignoring unrecognised line %r", where, text)
            continue
        if len(parts) < 2:
            raise UserError(f"{where}, key '{key}': no value given; write '{key} <value>'.")
        if len(parts) > 2:
            # Filter lists and the like belong in preset.txt; a stray second value is a mistake.
            raise UserError(f"{where}, key '{key}': expected one value, found {len(parts) - 1} ({' '.join(parts[1:])}).")
        if key in raw:
            log.warning("%s: key '%s' repeated; the later value wins (first at %s)", where, key, raw[key][1])
        raw[key] = (parts[1], where)
    return raw


def _apply_overrides(raw: dict[str, tuple[str, str]], overrides) -> None:
    """`--set KEY=VALUE` values over the file's, in order."""
    for text in overrides:
        key, value = _parse_override(text)
        key = ALIASES.get(key, key)
        if key not in FIELDS:
            hint = _suggest(key)
            raise UserError(f"--set {text}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "; run with --list_keys to see every key."))
        if key in raw and raw[key][1].startswith("--set "):
            log.warning("--set %s=%s: key '%s' set twice on the command line; the later value wins (first %s)",
                        key, value, key, raw[key][1])
        raw[key] = (value, f"--set {key}={value}")


def _section(values: dict[str, Any], cls: type) -> dict[str, Any]:
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}


def train_split_size(num_runs: int, val_split: float) -> int:
    """Runs in the training part of the split (at least one run on each side)."""
    num_val = min(num_runs - 1, max(1, round(num_runs * val_split)))
    return num_runs - num_val


def _check_consistency(cfg: Config, where) -> Config:
    """Each section's own checks, then the ones that span sections. A batch larger than the training
    split becomes the split, with a warning, so that one condition file serves small studies too."""
    for attr in ("data", "vae", "augment"):
        getattr(cfg, attr).check(where)
    data, cond = cfg.data, cfg.conditioner
    if cond.n_sample != data.Dim1:
        raise UserError(f"{where('n_sample')}, key 'n_sample': {cond.n_sample} differs from Dim1 = {data.Dim1}; the conditioner needs one input per run, so set n_sample {data.Dim1}.")
    n_train = train_split_size(data.Dim1, cfg.run.val_split)
    for attr, key in (("vae", "Batch_size"), ("conditioner", "latent_conditioner_batch")):
        if getattr(getattr(cfg, attr), key) > n_train:
            log.warning("%s, key '%s': %d is larger than the %d training runs (%d runs, val_split %g); %d is used",
                        where(key), key, getattr(getattr(cfg, attr), key), n_train, data.Dim1, cfg.run.val_split,
                        n_train)
            cfg = dataclasses.replace(cfg, **{attr: dataclasses.replace(getattr(cfg, attr), **{key: n_train})})
    return cfg


# --- preset.txt --------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    dataset_number: int
    beta_exponent: int                    # k > 0: the KL weight starts at 10^-k
    encoder_filters: tuple[int, ...]      # the decoder uses them reversed
    conditioner_filters: tuple[int, ...]


def _int_list(text: str, what: str, where: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split())
    except ValueError:
        raise UserError(f"{where}: the {what} '{text.strip()}' must be whole numbers separated by spaces, e.g. 64 32 16 8.") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{where}: the {what} '{text.strip()}' must list positive whole numbers, e.g. 64 32 16 8.")
    return values


def parse_preset(path: str | Path, number: int) -> Preset:
    """Block `number` (1-based) of a preset file: a header line, then 4 lines per block."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preset file {path} not found; pass --preset_file PATH or create it (see README, 'preset.txt').")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blocks = (len(lines) - 1) // 4
    if number < 1 or number > blocks:
        have = f"it has {blocks} complete block{'s' if blocks != 1 else ''}" if blocks else "it has no complete block (a header line, then 4 lines per block)"
        raise UserError(f"{path}: preset block {number} does not exist; {have}. Use --preset=1..{max(blocks, 1)} or add the block.")
    first = 1 + 4 * (number - 1)
    block = lines[first:first + 4]
    where = [f"{path} line {first + i + 1}" for i in range(4)]
    names = ("dataset number", "KL initial-weight exponent", "encoder filter list", "conditioner filter list")
    for text, loc, name in zip(block, where, names):
        if not text:
            raise UserError(f"{loc}: the {name} of preset block {number} is empty.")
    try:
        dataset_number = int(block[0])
        beta_exponent = int(block[1])
    except ValueError:
        bad = 0 if not block[0].lstrip("-").isdigit() else 1
        raise UserError(f"{where[bad]}: the {names[bad]} '{block[bad]}' of preset block {number} must be a whole number.") from None
    if dataset_number < 0 or beta_exponent < 0:
        bad = 0 if dataset_number < 0 else 1
        raise UserError(f"{where[bad]}: the {names[bad]} of preset block {number} must not be negative.")
    return Preset(dataset_number, beta_exponent,
                  _int_list(block[2], names[2], where[2]), _int_list(block[3], names[3], where[3]))


def ask_preset() -> Preset:
    """The original's interactive fallback, used only on a terminal."""
    print("No --preset given: enter the preset values (or rerun with --preset=N).")

    def ask(prompt: str, convert):
        while True:
            text = input(prompt).strip()
            try:
                return convert(text)
            except (UserError, ValueError) as exc:
                print(f"  {exc}")

    return Preset(ask("dataset number d (dataset<d>.npy / .pickle): ", int),
                  ask("KL initial-weight exponent k (0 = default): ", int),
                  ask("encoder filters, e.g. 64 32 16 8: ", lambda t: _int_list(t, "encoder filter list", "input")),
                  ask("conditioner filters, e.g. 16 32 64 128: ", lambda t: _int_list(t, "conditioner filter list", "input")))


def load_preset(path: str | Path, number: int | None) -> Preset:
    if number is not None:
        preset = parse_preset(path, number)
    elif sys.stdin.isatty():
        preset = ask_preset()
    else:
        raise UserError(f"no preset chosen: pass --preset=N to use block N of {path} (there is no terminal to ask on).")
    for name, filters, example in (("encoder", preset.encoder_filters, "64 32 16 8"),
                                   ("conditioner", preset.conditioner_filters, "16 32 64 128")):
        if len(filters) < 2:
            raise UserError(f"{path}: the {name} filter list {' '.join(map(str, filters))} of the preset needs at "
                            f"least 2 values, e.g. {example}.")
    return preset


def key_table() -> list[tuple[str, str, str, str]]:
    """(section, key, default, help) rows for --list_keys and the README."""
    rows = []
    for name, f in FIELDS.items():
        section = SECTIONS[SECTION_OF[name]].SECTION
        meta = f.metadata
        if meta["required"]:
            default = "required"
        elif f.default is None:
            default = "derived"
        elif isinstance(f.default, bool):
            default = str(int(f.default))
        else:
            default = repr(f.default) if isinstance(f.default, str) else str(f.default)
        rows.append((section, name, default, meta["help"]))
    return rows
