"""The trained surrogate: inputs → conditioner → latents → VAE decoder → physical field.

Used at the end of conditioner training (evaluation on the validation runs) and by the
prediction mode (`--predict PATH --out FILE.npy [--samples K]`), so both decode alike.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modules.checkpoint import (atomic_write, build_from_checkpoint, ensure_writable, load_checkpoint, load_model_state,
                               load_npz, save_json, save_npz)
from modules.cond_inputs import MinMaxScaler, list_images, load_csv, load_images
from modules.config import stored_sections
from modules.data import FieldScaler, load_field_scaler
from modules.domain import InputDomain
from modules.errors import UserError
from modules.run import Paths

log = logging.getLogger("simulgen")

IMAGE_SIZE = 256
_TRAIN_HINT = "train first: python SimulGen-VAE.py --preset=1 --lc_only=0"


def inverse_affine(scaler: MinMaxScaler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with scaler.inverse_transform(y) == y·a + b, as float32 tensors (differentiable use)."""
    lo, hi = scaler.feature_range
    half = (scaler.data_max - scaler.data_min) / 2
    half = np.where(half > 0, half, 1.0)
    centre = (scaler.data_max + scaler.data_min) / 2
    a = half / ((hi - lo) / 2)
    b = centre - (hi + lo) / 2 * a
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
    input_scaler: MinMaxScaler | None      # CSV inputs only
    input_type: str
    num_param: int
    image_ext: str
    device: torch.device
    sources: dict
    dataset: Path | None = None            # the training dataset (its mesh.vtu is beside it, for --vtk)
    domain: InputDomain | None = None      # the training inputs' domain (CSV inputs only)

    def __post_init__(self):
        # Once here, not per call: .eval() walks every submodule (0.5 ms of a 3 ms prediction).
        self.conditioner.eval()
        self.decoder.eval()

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
                            "(csv_conditioner gp); this one is a network: use --sampling vae_levels, or "
                            "retrain with input_type csvs and csv_conditioner gp.")
        return requested

    @torch.inference_mode()
    def fields(self, inputs: torch.Tensor, samples: int = 1, batch_size: int = 64,
               sampling: str = "vae_levels") -> np.ndarray:
        """Physical fields for model-ready inputs: (n, T, N), or (n, K, T, N) when samples > 1.

        One sample is the deterministic point prediction (`fix` mode). K > 1 draws, with
        `predictive`, the latents from the conditioner's (GP's) posterior, each decoded in `fix`
        mode, their spread about the point prediction scaled by the calibrated `spread_scale`;
        with `vae_levels` (the original's), the VAE's hierarchical levels at random around the
        predicted latents.
        """
        out = []
        for chunk in inputs.split(max(1, batch_size // samples)):
            chunk = chunk.to(self.device)
            if samples == 1:
                field = self.decoder(*self.conditioner(chunk), mode="fix")[:, None]          # (B, 1, N, T)
            elif sampling == "predictive":
                mean, std = self.conditioner.predict(chunk)                                 # (B, m)
                draws = mean[:, None] + std[:, None] * torch.randn(
                    (len(chunk), samples, mean.shape[1]), dtype=mean.dtype, device=mean.device)
                point = self.decoder(*self.conditioner.split(mean.float()), mode="fix")[:, None]
                field = self.decoder(*self.conditioner.split(draws.flatten(0, 1).float()), mode="fix")
                scale = self.conditioner.spread_scale.float()
                field = point + scale * (field.unflatten(0, (len(chunk), samples)) - point)  # (B, K, N, T)
            else:
                main, hier = self.conditioner(chunk)
                reps = self.decoder(main.repeat_interleave(samples, 0), hier.repeat_interleave(samples, 0),
                                    mode="random")                                          # (B·K, N, T)
                field = reps.unflatten(0, (len(chunk), samples))                            # (B, K, N, T)
            field = self.field_scaler.inverse_transform(field.float()).transpose(-1, -2)    # (B, K, T, N)
            out.append(field.cpu())
        result = torch.cat(out).numpy()
        return result[:, 0] if samples == 1 else result

    def reconstruct(self, fields: np.ndarray) -> np.ndarray:
        """The VAE alone on true fields (n, T, N): encoded to μ and decoded, physical units."""
        from modules.evaluate import reconstruct_fields
        return reconstruct_fields(self.decoder.vae, self.field_scaler, fields, self.device)

    def band_scales(self, sampling: str) -> dict[float, float]:
        """Each band level's calibrated scale relative to the drawn samples (predictive sampling)."""
        if sampling != "predictive":
            return {}
        from modules.calibration import LEVELS
        return dict(zip(LEVELS, self.conditioner.band_scales.tolist()))

    def prepare(self, raw: np.ndarray) -> torch.Tensor:
        """Raw inputs (CSV rows (n, F) or images (n, H, W) in [0, 1]) → model inputs."""
        if self.input_scaler is not None:
            return torch.from_numpy(self.input_scaler.transform(raw))
        return torch.from_numpy(raw).unsqueeze(1)                                           # (n, 1, H, W)

    @classmethod
    def load(cls, paths: Paths, device: torch.device) -> "Surrogate":
        from modules.conditioners import build_from_architecture
        from modules.train_vae import build_vae

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
        vae = build_from_checkpoint(build_vae, vae_state, paths.vae, "VAE checkpoint", _TRAIN_HINT).to(device)
        load_model_state(vae, vae_state["export"], paths.vae, "VAE checkpoint", _TRAIN_HINT)
        arch = cond_state["architecture"]
        conditioner = build_from_checkpoint(build_from_architecture, cond_state, cond_path, "conditioner checkpoint",
                                            _TRAIN_HINT).to(device)
        load_model_state(conditioner, cond_state["export"], cond_path, "conditioner checkpoint", _TRAIN_HINT)
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
        config = stored_sections(cond_state["run"]["config"])
        if "param_data_type" not in config["conditioner"]:
            raise UserError(f"{cond_path} lacks the config it was trained with (param_data_type); {_TRAIN_HINT}.")
        preset = cond_state["run"].get("preset", {})
        dataset = (paths.workdir / config["run"].get("dataset_dir", "") /
                   f"dataset{preset.get('dataset_number', 1)}.npy")
        return cls(conditioner, LatentDecoder(vae, main_scaler, hier_scaler, device),
                   field, input_scaler, arch["input_type"], arch["num_param"],
                   config["conditioner"]["param_data_type"], device,
                   {"vae": str(paths.vae), "conditioner": str(cond_path), "field_scaler": str(paths.field_scaler),
                    "conditioner_scalers": str(paths.conditioner_scalers),
                    "weights": "EMA" if config["engine"].get("use_ema") else "trained"}, dataset, domain)


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def read_inputs(surrogate: Surrogate, source: Path) -> tuple[np.ndarray, list[str]]:
    """New inputs of the trained kind: CSV rows or a folder of images."""
    if surrogate.input_type == "csvs":
        if source.is_dir():
            raise UserError(f"--predict {source} is a folder, but the conditioner was trained on CSV parameters "
                            f"(input_type csvs); pass a CSV file with {surrogate.num_param} columns per row.")
        fix = (f"(the conditioner was trained on {surrogate.num_param} parameters); give every row exactly "
               f"{surrogate.num_param} comma-separated values, in the order of the training CSV's columns")
        return load_csv(source, surrogate.num_param, None, columns_fix=fix), [str(source)]
    if not source.is_dir():
        raise UserError(f"--predict {source} is not a folder, but the conditioner was trained on images "
                        f"(input_type {surrogate.input_type}); pass a folder of {surrogate.image_ext} images.")
    files = list_images(source, surrogate.image_ext)
    return load_images(files, IMAGE_SIZE), [str(f) for f in files]


def check_writable(out: Path) -> None:
    if out.suffix != ".npy":
        raise UserError(f"--out {out}: the output must be a .npy file, e.g. --out predictions.npy.")
    ensure_writable([out.parent], f"--out {out}", "choose a writable folder")


SAMPLING_MEANING = {
    "predictive": "the conditioner's Gaussian-process posterior of the latents, each draw decoded: the spread is "
                  "the regression's uncertainty (README, 'Uncertainty')",
    "vae_levels": "the original's: the VAE's hierarchical levels drawn around the predicted latents; the spread is "
                  "not related to the prediction's error (README, 'Uncertainty')",
}


def band_arrays(samples: np.ndarray, centre: np.ndarray, band_scales: dict[float, float]) -> dict[str, np.ndarray]:
    """(n, K, T, N) samples → mean, std, median and the 50 % and 90 % bands' edges, (n, T, N)
    float32 each; each band widened about the point prediction `centre` by its calibrated
    scale (modules/calibration.py; 1 where there is none)."""
    from modules.calibration import calibrated_band
    out = {"mean": samples.mean(axis=1), "std": samples.std(axis=1), "q50": np.median(samples, axis=1)}
    for level, (lo, hi) in ((0.5, ("q25", "q75")), (0.9, ("q05", "q95"))):
        out[lo], out[hi] = calibrated_band(samples, centre, level, band_scales.get(level, 1.0))
    return {k: v.astype(np.float32) for k, v in out.items()}


def run_prediction(source: Path, out: Path, samples: int, paths: Paths, device: torch.device,
                   vtk: Path | None = None, sampling: str = "auto", truth: Path | None = None, plot: int = 2) -> dict:
    """Predict the inputs of `source`; with `truth` (the held-out runs' fields) also evaluate
    the predictions against them (modules/evaluate.py)."""
    if samples < 1:
        raise UserError(f"--samples {samples}: give 1 or more realisations per input.")
    if not source.exists():
        raise UserError(f"--predict {source} not found; pass a CSV file or a folder of images.")
    check_writable(out)
    surrogate = Surrogate.load(paths, device)
    mesh = None
    if vtk is not None:         # before anything is written: the mesh exists and fits the model
        from modules.mesh_io import check_prediction_mesh, load_dataset_mesh
        mesh = check_prediction_mesh(load_dataset_mesh(surrogate.dataset), surrogate.dataset,
                                     surrogate.field_scaler.num_nodes, vtk)
    sampling = surrogate.sampling_for(sampling)
    raw, files = read_inputs(surrogate, source)
    domain = None
    if surrogate.domain is not None:
        domain = surrogate.domain.check(raw)
        line = surrogate.domain.warning(raw, domain, str(source))
        if line:
            log.warning(line)
    started = time.perf_counter()
    fields = surrogate.fields(surrogate.prepare(raw), samples, sampling=sampling)
    seconds = time.perf_counter() - started
    atomic_write(out, lambda f: np.save(f, fields.astype(np.float32)))
    meta = {"inputs": files, "input_type": surrogate.input_type, "shape": list(fields.shape),
            "layout": "[n, T, N]" if samples == 1 else "[n, K, T, N]", "samples": samples,
            "units": "physical (inverse of the per-node scaling)", "checkpoints": surrogate.sources,
            "seconds": seconds}
    if domain is not None:
        meta["out_of_domain"] = domain["out_of_domain"]
        meta["domain"] = {"outside_columns": domain["outside_columns"],
                          "nearest_run_ratio": domain.get("nearest_run_ratio"),
                          "meaning": "out_of_domain[i]: row i has a column outside the training range "
                                     "(outside_columns, 0-based) or lies farther from every training run than "
                                     "any training run from its nearest neighbour (nearest_run_ratio > 1; "
                                     "scaled inputs); the surrogate extrapolates there"}
    point = fields if samples == 1 else surrogate.fields(surrogate.prepare(raw))
    scales = surrogate.band_scales(sampling)
    if samples > 1:
        bands = out.with_name(out.stem + "_bands.npz")
        save_npz(bands, **band_arrays(fields, point, scales))
        meta.update({"sampling": sampling, "sampling_meaning": SAMPLING_MEANING[sampling], "bands": str(bands),
                     "bands_meaning": "per input, step and node over the K samples: mean, std, median q50, the 50 % "
                                      "band q25-q75 and the 90 % band q05-q95, each [n, T, N]"
                                      + ("; each band calibrated on the validation runs (its own scale about the point "
                                         "prediction)" if sampling == "predictive" else "")})
    if mesh is not None:
        from modules.mesh_io import write_prediction_series
        written = write_prediction_series(vtk, fields, mesh, samples)
        meta.update({"vtk": [str(p) for p in written if p.suffix == ".xdmf"], "mesh": str(mesh.path),
                     "vtk_fields": mesh.fields if samples == 1 else [f"{n}{s}" for n in mesh.fields for s in ("", "_std")]})
    if truth is not None:
        from modules.evaluate import evaluate
        meta["evaluation"] = evaluate(surrogate, raw, files, truth, out, point, fields if samples > 1 else None,
                                      sampling, scales, plot, domain)
    save_json(out.with_suffix(".json"), {k: (v["files"] if k == "evaluation" else v) for k, v in meta.items()})
    return meta

