"""What a training run carries from stage to stage: settings, places, device, ranks."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.conditioners import ConditionerArchitecture
from modules.cond_inputs import ImageFeatures
from modules.config import Config, Preset, train_split_size
from modules.distributed import DistInfo
from modules.monitor import Monitor
from modules.vae import VAEArchitecture


@dataclass(frozen=True)
class Paths:
    """Outputs live under the working directory: checkpoints/ (the current run; earlier runs in
    checkpoints/history/<run-id>/, modules/history.py) and runs/<run-id>/. `checkpoint_dir`
    reads an archived run's checkpoints instead (prediction with --run)."""
    workdir: Path
    checkpoint_dir: Path | None = None

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.workdir / "checkpoints"

    @property
    def history(self) -> Path:
        return self.workdir / "checkpoints" / "history"

    @property
    def vae(self) -> Path:
        return self.checkpoints / "vae.pt"

    @property
    def field_scaler(self) -> Path:
        return self.checkpoints / "field_scaler.npz"

    @property
    def latents(self) -> Path:
        return self.checkpoints / "latents.npz"

    @property
    def conditioner(self) -> Path:
        return self.checkpoints / "conditioner.pt"

    @property
    def conditioner_e2e(self) -> Path:
        return self.checkpoints / "conditioner_e2e.pt"

    @property
    def conditioner_scalers(self) -> Path:
        return self.checkpoints / "conditioner_scalers.npz"

    def run_dir(self, run_id: str) -> Path:
        return self.workdir / "runs" / run_id


def new_run_id(paths: Paths) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id, n = stamp, 1
    while paths.run_dir(run_id).exists():
        n += 1
        run_id = f"{stamp}-{n}"
    return run_id


@dataclass
class RunContext:
    cfg: Config
    preset: Preset
    small: bool
    load_all: bool
    plot: int                    # 0 show, 1 save PNGs, 2 none
    device: torch.device
    dist: DistInfo
    paths: Paths
    run_id: str
    resume: bool = False
    monitor: Monitor | None = None

    @property
    def run_dir(self) -> Path:
        return self.paths.run_dir(self.run_id)

    @property
    def encoder_filters(self) -> tuple[int, ...]:
        return self.preset.encoder_filters

    @property
    def beta_start(self) -> float:
        """A preset exponent k > 0 starts the KL weight at 10^-k."""
        k = self.preset.beta_exponent
        return 10.0 ** (-k) if k > 0 else self.cfg.vae.beta_start

    def vae_architecture(self) -> VAEArchitecture:
        """What fixes the VAE's shapes; a checkpoint must agree on all of it."""
        data, vae = self.cfg.data, self.cfg.vae
        return VAEArchitecture(num_nodes=data.Dim3_red, num_time=data.Dim2_red, filters=self.preset.encoder_filters,
                               latent_dim_end=vae.Latent_dim_end, latent_dim=vae.Latent_dim, small=self.small,
                               output_norm=vae.output_norm, spectral_norm=vae.spectral_norm, norm=vae.vae_norm,
                               logvar_init=vae.logvar_init, linear_modes=vae.linear_modes)

    def conditioner_architecture(self) -> ConditionerArchitecture:
        cond, vae = self.cfg.conditioner, self.cfg.vae
        common = dict(input_type=cond.kind, num_param=cond.num_param, latent_dim_end=vae.Latent_dim_end,
                      latent_dim=vae.Latent_dim, num_levels=len(self.preset.encoder_filters) - 1)
        if cond.uses_image_features:       # the GP regresses on picture features, not on CSV columns
            num_train = train_split_size(self.cfg.data.Dim1, self.cfg.run.val_split)
            common["num_param"] = ImageFeatures.count(num_train)
        if cond.uses_gp:
            return ConditionerArchitecture(**common, model="gp", num_runs=self.cfg.data.Dim1)
        return ConditionerArchitecture(**common, filters=self.preset.conditioner_filters,
                                       dropout_rate=cond.latent_conditioner_dropout_rate,
                                       use_se=cond.use_spatial_attention)

    def describe(self) -> dict:
        return {"config": self.cfg.to_dict(), "preset": dataclasses.asdict(self.preset),
                "size": "small" if self.small else "large", "load_all": self.load_all,
                "device": str(self.device), "world_size": self.dist.world_size, "run_id": self.run_id}
