"""The trained surrogate: inputs → conditioner → latents → VAE decoder → physical field.

Built from the saved checkpoints and scalers alone. Used at the end of conditioner training
(evaluation on the validation runs), by `--predict` and by `--evaluate`, so all decode alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modules.calibration import widen
from modules.checkpoint import build_from_checkpoint, load_checkpoint, load_model_state, load_npz
from modules.cond_inputs import ImageFeatures, MinMaxScaler
from modules.conditioners import ConditionerArchitecture
from modules.config import stored_sections
from modules.data import FieldScaler, load_field_scaler
from modules.domain import InputDomain
from modules.errors import UserError
from modules.frame_net import NetBlend, load_blend
from modules.run import Paths
from modules.vae import VAEArchitecture

log = logging.getLogger("simulgen")

IMAGE_SIZE = 256
_TRAIN_HINT = "train first: python SimulGen-VAE.py --preset=1 --lc_only=0"


def inverse_affine(scaler: MinMaxScaler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scaler.affine() as float32 tensors on `device` (decoding inside autograd and graphs)."""
    a, b = scaler.affine()
    return (torch.as_tensor(a, dtype=torch.float32, device=device),
            torch.as_tensor(b, dtype=torch.float32, device=device))


class LatentDecoder(nn.Module):
    """Scaled conditioner outputs → VAE latents → decoded, scaled field (B, N, T)."""

    def __init__(self, vae: nn.Module, main_scaler: MinMaxScaler, hier_scaler: MinMaxScaler, device: torch.device):
        super().__init__()
        self.vae = vae
        a, b = inverse_affine(main_scaler, device)
        self.register_buffer("main_a", a)
        self.register_buffer("main_b", b)
        a, b = inverse_affine(hier_scaler, device)
        self.register_buffer("hier_a", a)
        self.register_buffer("hier_b", b)

    def forward(self, main: torch.Tensor, hier: torch.Tensor, mode: str = "fix") -> torch.Tensor:
        z = main.float() * self.main_a + self.main_b             # (B, Lend)
        xs = hier.float() * self.hier_a + self.hier_b            # (B, L-1, Ld)
        field, _ = self.vae.decode(z, xs, mode=mode)
        return field                                             # (B, N, T)


@dataclass
class Surrogate:
    conditioner: nn.Module
    decoder: LatentDecoder
    field_scaler: FieldScaler
    input_scaler: MinMaxScaler | None      # CSV rows or picture features
    input_type: str
    num_param: int
    image_ext: str
    device: torch.device
    sources: dict
    dataset: Path | None = None            # the training dataset (its mesh.vtu is beside it, for --vtk)
    domain: InputDomain | None = None      # the training inputs' domain (CSV rows or picture features)
    image_features: ImageFeatures | None = None   # pictures through the GP: what it reads of them
    frame_net: NetBlend | None = None      # networks blended with the GP's prediction (gp_frame_net, gp_point_net)
    param_names: list[str] | None = None   # the training CSV's header names; None: it had none (p1..pK)

    def __post_init__(self):
        # Once here, not per call: .eval() walks every submodule (0.5 ms of a 3 ms prediction).
        self.conditioner.eval()
        self.decoder.eval()
        if self.frame_net is not None:
            self.frame_net.eval()

    @property
    def shape(self) -> tuple[int, int]:
        """(T, N) of every predicted field."""
        arch = self.decoder.vae.arch
        return arch.num_time, arch.num_nodes

    @property
    def has_predictive(self) -> bool:
        """Whether the conditioner gives a predictive distribution of the latents (the GP)."""
        return hasattr(self.conditioner, "predict")

    def sampling_for(self, requested: str) -> str:
        """`auto`: the conditioner's predictive distribution where it has one, else the VAE's levels."""
        if requested == "auto":
            return "predictive" if self.has_predictive else "vae_levels"
        if requested == "predictive" and not self.has_predictive:
            raise UserError("--sampling predictive needs a conditioner with a predictive distribution "
                            "(csv_conditioner gp or image_conditioner gp); this one is a network: use --sampling "
                            "vae_levels, or retrain with the GP conditioner (--lc_only=1).")
        return requested

    def fields(self, inputs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """The deterministic point prediction (`fix` mode) for model-ready inputs: (n, T, N), physical units."""
        return self.sample(inputs, 1, batch_size)[0]

    @torch.inference_mode()
    def sample(self, inputs: torch.Tensor, samples: int, batch_size: int = 64,
               sampling: str = "vae_levels") -> tuple[np.ndarray, np.ndarray | None]:
        """The point prediction (n, T, N) and, when samples > 1, K draws (n, K, T, N), physical units.

        With `predictive` the draws take the latents from the conditioner's (GP's) posterior, each
        decoded in `fix` mode; each run's spread about the point prediction is then widened by the
        conditioner's difficulty model (`widen`) and scaled by the calibrated `spread_scale`. With
        `vae_levels` (the original's), the VAE's hierarchical levels at random around the
        predicted latents. The point prediction is decoded once, for both.

        With networks blended in (`gp_frame_net`, `gp_point_net`) the point prediction moves by the
        blend's total weight times the disagreement of the networks' weighted mean with the GP, and
        so does every draw; predictive draws also take a standard-normal multiple of that
        disagreement each (where the models disagree, the truth may lie on either side), before the
        widening and scaling, which the validation runs calibrate on these draws. Nodes that never
        changed in the training runs (`FieldScaler.fixed_nodes`) are that value in every output.
        """
        points, draws = [], []
        for chunk in inputs.split(max(1, batch_size // samples)):
            chunk = chunk.to(self.device)
            predictive = samples > 1 and sampling == "predictive"
            if predictive:
                mean, std = self.conditioner.predict(chunk)                                 # (B, m)
                latents = mean[:, None] + std[:, None] * torch.randn(
                    (len(chunk), samples, mean.shape[1]), dtype=mean.dtype, device=mean.device)
                point = self._physical(self.decoder(*self.conditioner.split(mean.float()), mode="fix"))
                field = self._physical(self.decoder(*self.conditioner.split(latents.flatten(0, 1).float()),
                                                    mode="fix").unflatten(0, (len(chunk), samples)))
            else:
                main, hier = self.conditioner(chunk)
                point = self._physical(self.decoder(main, hier, mode="fix"))
                field = None
                if samples > 1:
                    reps = self.decoder(main.repeat_interleave(samples, 0), hier.repeat_interleave(samples, 0),
                                        mode="random")                                      # (B·K, N, T)
                    field = self._physical(reps.unflatten(0, (len(chunk), samples)))        # (B, K, T, N)
            if self.frame_net is not None:
                apart = self.frame_net.disagreement(point, chunk).cpu()
                shift = float(self.frame_net.weight) * apart
                point = point + shift
                if field is not None:
                    field = field + shift[:, None]
                if predictive:
                    field = field + torch.randn((len(chunk), samples, 1, 1), dtype=field.dtype) * apart[:, None]
            if predictive:
                field = torch.from_numpy(widen(field.numpy(), point.numpy(), self.conditioner.difficulty(chunk).cpu().numpy(),
                                               float(self.conditioner.spread_scale)))
            points.append(point)
            if field is not None:
                draws.append(field)
        pin = self.field_scaler.pin                 # nodes held fixed in training stay exactly there
        return pin(torch.cat(points).numpy()), (pin(torch.cat(draws).numpy()) if draws else None)

    @torch.inference_mode()
    def decode_latents(self, flat: np.ndarray) -> np.ndarray:
        """Flat scaled targets (n, m) of a GP conditioner → decoded fields (n, T, N), physical units."""
        latents = torch.from_numpy(np.asarray(flat)).float().to(self.device)
        return self._physical(self.decoder(*self.conditioner.split(latents), mode="fix")).numpy()

    def _physical(self, field: torch.Tensor) -> torch.Tensor:
        """Decoder output (..., N, T) → physical units (..., T, N) on the host."""
        return self.field_scaler.inverse_transform(field.float()).transpose(-1, -2).cpu()

    def reconstruct(self, fields: np.ndarray, batch: int = 16) -> np.ndarray:
        """The VAE alone on true fields (n, T, N): encoded to μ and decoded (`fix`), physical units."""
        vae, scaler, out = self.decoder.vae, self.field_scaler, []
        with torch.inference_mode():
            for start in range(0, len(fields), batch):
                x = torch.from_numpy(np.asarray(fields[start:start + batch], np.float32)).to(self.device)
                x = scaler.transform(x, node_axis=-1).transpose(1, 2)                   # (B, N, T)
                mu, _, xs = vae.encode(x)
                recon, _ = vae.decode(mu, xs, mode="fix")
                out.append(scaler.inverse_transform(recon.double()).transpose(1, 2).cpu().numpy())
        return np.concatenate(out)

    def band_scales(self, sampling: str) -> dict[float, float]:
        """Each band level's calibrated scale relative to the drawn samples (predictive sampling)."""
        if sampling != "predictive":
            return {}
        from modules.calibration import LEVELS
        return dict(zip(LEVELS, self.conditioner.band_scales.tolist()))

    def domain_inputs(self, raw: np.ndarray) -> np.ndarray:
        """What the input-range check and the baselines compare: CSV rows, or picture features."""
        return raw if self.image_features is None else self.image_features.transform(raw)

    def prepare(self, raw: np.ndarray, inputs: np.ndarray | None = None) -> torch.Tensor:
        """Raw inputs (CSV rows (n, F) or images (n, H, W) in [0, 1]) → model inputs; `inputs`:
        their domain_inputs when the caller has them already."""
        if self.input_scaler is not None:
            return torch.from_numpy(self.input_scaler.transform(self.domain_inputs(raw) if inputs is None else inputs))
        return torch.from_numpy(raw).unsqueeze(1)                                           # (n, 1, H, W)

    @classmethod
    def load(cls, paths: Paths, device: torch.device) -> "Surrogate":
        vae_state = load_checkpoint(paths.vae, "vae", "VAE checkpoint", _TRAIN_HINT)
        cond_path, cond_state = paths.conditioner, None
        if paths.conditioner_e2e.is_file():     # an end-to-end fine-tuned conditioner wins once finished
            cond_state = load_checkpoint(paths.conditioner_e2e, "conditioner_e2e", "conditioner checkpoint",
                                         _TRAIN_HINT)
            cond_path = paths.conditioner_e2e if cond_state.get("finished") else paths.conditioner
        if cond_path == paths.conditioner:
            cond_state = load_checkpoint(cond_path, "conditioner", "conditioner checkpoint", _TRAIN_HINT)
        if not vae_state.get("finished") or not cond_state.get("finished"):
            unfinished = paths.vae if not vae_state.get("finished") else cond_path
            raise UserError(f"{unfinished} is from an unfinished training run; finish it with --resume first.")
        vae_run = vae_state["run"]["run_id"]
        if cond_state["extra"].get("vae_run_id") != vae_run:
            raise UserError(f"{cond_path} was trained on the latents of another VAE (run {cond_state['extra'].get('vae_run_id')}) "
                            f"than {paths.vae} (run {vae_run}); retrain the conditioner with --lc_only=1.")
        vae = build_from_checkpoint(VAEArchitecture, vae_state, paths.vae, "VAE checkpoint", _TRAIN_HINT).to(device)
        load_model_state(vae, vae_state["export"], paths.vae, "VAE checkpoint", _TRAIN_HINT)
        if cond_state["extra"].get("linear_path") is not None:      # the GP's: refitted on every run (gp_refit_basis)
            if vae.linear is None:
                raise UserError(f"{cond_path} carries a linear POD path, but the VAE in {paths.vae} has none; "
                                f"retrain the conditioner with --lc_only=1.")
            load_model_state(vae.linear, cond_state["extra"]["linear_path"], cond_path, "conditioner checkpoint",
                             _TRAIN_HINT)
        conditioner = build_from_checkpoint(ConditionerArchitecture, cond_state, cond_path, "conditioner checkpoint",
                                            _TRAIN_HINT).to(device)
        arch = ConditionerArchitecture.from_stored(cond_state["architecture"])     # it built: it is valid
        export = cond_state["export"]
        if arch.model == "gp":
            export = conditioner.with_defaults(export)
        load_model_state(conditioner, export, cond_path, "conditioner checkpoint", _TRAIN_HINT)
        field = load_field_scaler(paths.field_scaler, _TRAIN_HINT)
        scalers = load_npz(paths.conditioner_scalers, "conditioner scalers", _TRAIN_HINT,
                           ("main_data_min", "hier_data_min"))
        main_scaler = MinMaxScaler.from_state_dict(_prefixed(scalers, "main_"))
        hier_scaler = MinMaxScaler.from_state_dict(_prefixed(scalers, "hier_"))
        input_scaler = (MinMaxScaler.from_state_dict(_prefixed(scalers, "input_"))
                        if "input_data_min" in scalers else None)
        domain = None                        # files of earlier versions lack the runs: the range check only
        if input_scaler is not None:
            domain = InputDomain(input_scaler.data_min, input_scaler.data_max, scalers.get("domain_runs"))
        features = (ImageFeatures.from_state_dict(_prefixed(scalers, "features_"), str(paths.conditioner_scalers))
                    if "features_modes" in scalers else None)
        if arch.model == "gp" and arch.input_type != "csvs" and (features is None or input_scaler is None):
            raise UserError(f"{paths.conditioner_scalers} lacks the picture-feature basis of the GP conditioner in "
                            f"{cond_path}; it belongs to another run: retrain the conditioner with --lc_only=1.")
        config = stored_sections(cond_state["run"]["config"])
        if "param_data_type" not in config["conditioner"]:
            raise UserError(f"{cond_path} lacks the config it was trained with (param_data_type); {_TRAIN_HINT}.")
        preset = cond_state["run"].get("preset", {})
        dataset = (paths.workdir / config["run"].get("dataset_dir", "") /
                   f"dataset{preset.get('dataset_number', 1)}.npy")
        frame_net = None
        if (stored := cond_state["extra"].get("frame_net")) is not None:
            frame_net = load_blend(stored, str(cond_path), _TRAIN_HINT).to(device)
        return cls(conditioner, LatentDecoder(vae, main_scaler, hier_scaler, device),
                   field, input_scaler, arch.input_type, arch.num_param,
                   config["conditioner"]["param_data_type"], device,
                   {"vae": str(paths.vae), "conditioner": str(cond_path), "field_scaler": str(paths.field_scaler),
                    "conditioner_scalers": str(paths.conditioner_scalers),
                    "weights": "EMA" if config["engine"].get("use_ema") else "trained"}, dataset, domain, features,
                   frame_net, [str(n) for n in scalers["param_names"]] if "param_names" in scalers else None)


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


