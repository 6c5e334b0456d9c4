"""The Python API: what the command line does, from a notebook or a script.

    from modules.api import Surrogate, config, fit
    cfg = config("input_data/condition.txt", Training_epochs=50)      # the condition file, keys overridden
    s, summary = fit(cfg, workdir=".")                               # train, as `SimulGen-VAE.py --preset=1`
    s = Surrogate.load(".")                                          # or load a trained one (its working folder)
    fields = s.predict(params)                                       # (n, T, N), physical units
    point, samples, bands = s.sample(params, 16)                     # K realisations and their bands
    report = s.evaluate(params, true_fields)                         # errors, baselines, calibration

Inputs are what the surrogate was trained on: parameter rows (n, num_param) as in the CSV, or pictures
(n, 256, 256) greyscale in [0, 1]. Every user error is a `modules.errors.UserError` with the same one-line
message the command line prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.config import Config, load_preset, parse_condition
from modules.errors import UserError
from modules.run import Paths
from modules.surrogate import Surrogate as _Model


def config(path: str | Path = "input_data/condition.txt", **keys) -> Config:
    """The condition file `path` with `keys` set as `--set KEY=VALUE` would, validated alike."""
    return parse_condition(path, [f"{key}={value}" for key, value in keys.items()])


def fit(cfg: Config, workdir: str | Path = ".", preset: int = 1, preset_file: str | Path | None = None,
        lc_only: bool = False, device: str = "auto", resume: bool = False, plot: int = 2,
        small: bool = True, load_all: bool = True) -> tuple["Surrogate", dict]:
    """Train as the command line does (`--preset`, `--lc_only`, `--device`, `--resume`, `--plot`, `--size`,
    `--load_all`) in `workdir`, whose checkpoints/ and runs/ it writes; returns the trained surrogate and the
    run's summary (summary.json). Ctrl-C stops it as it stops the command line (modules/interrupt.py)."""
    import signal

    from modules import interrupt
    from modules.pipeline import Flags, train
    workdir = Path(workdir)
    chosen = load_preset(Path(preset_file) if preset_file else workdir / "preset.txt", preset)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupt.reset()
    interrupt.install()
    try:
        summary = train(Flags(plot=plot, lc_only=lc_only, small=small, load_all=load_all, use_ddp=False,
                              device=device, resume=resume), cfg, chosen, workdir)
    finally:                                 # the caller's handlers again (a notebook's Ctrl-C)
        for sig, handler in before.items():
            if handler is not None:
                signal.signal(sig, handler)
    return Surrogate.load(workdir, device), summary


@dataclass
class Surrogate:
    """A trained surrogate: `load` it from its working folder (or a run kept in its history), then predict,
    sample and evaluate new designs."""
    model: _Model
    paths: Paths

    @classmethod
    def load(cls, workdir: str | Path = ".", device: str = "auto", run: str | None = None) -> "Surrogate":
        """The model in `workdir`/checkpoints (a path to checkpoints/ itself works too), or run `run` of its
        history (`--run`)."""
        from modules.distributed import resolve_device
        from modules.history import check_current_finished, locate
        workdir = Path(workdir)
        if workdir.name == "checkpoints" and not (workdir / "checkpoints").is_dir():
            workdir = workdir.parent
        if not workdir.is_dir():
            raise UserError(f"{workdir}: no such folder; give the working folder of a trained model (the one that "
                            f"holds its checkpoints/).")
        paths = Paths(workdir)
        if run is not None:
            paths = Paths(workdir, locate(paths, run))
        else:
            check_current_finished(paths)
        return cls(_Model.load(paths, resolve_device(device)), paths)

    @property
    def shape(self) -> tuple[int, int]:
        """(T, N) of every predicted field."""
        return self.model.shape

    @property
    def param_names(self) -> list[str] | None:
        """The parameters' names from the training CSV's header line; None where it had none."""
        return self.model.param_names

    @property
    def names(self) -> list[str]:
        """The parameters' names: the training CSV's header, else p1..pK (pictures: [])."""
        if self.model.param_names is not None:
            return list(self.model.param_names)
        return [f"p{i + 1}" for i in range(self.model.num_param)] if self.model.input_type == "csvs" else []

    def _inputs(self, inputs) -> tuple[np.ndarray, torch.Tensor]:
        raw = np.asarray(inputs, dtype=np.float32)
        if self.model.input_type == "csvs":
            raw = np.atleast_2d(raw)
            if raw.shape[1] != self.model.num_param:
                raise UserError(f"the surrogate takes rows of {self.model.num_param} parameters, not {raw.shape[1]}.")
        elif raw.ndim != 3:
            raise UserError(f"the surrogate takes pictures (n, 256, 256) in [0, 1], not an array of {raw.shape}.")
        domain = self.model.domain_inputs(raw)
        return domain, self.model.prepare(raw, domain)

    def outside(self, inputs) -> list[bool]:
        """Per input: does it lie outside the training data (modules/domain.py), where the surrogate extrapolates."""
        domain, _ = self._inputs(inputs)
        return self.model.domain.check(domain)["out_of_domain"] if self.model.domain is not None else [False] * len(domain)

    def predict(self, inputs) -> np.ndarray:
        """The point prediction (n, T, N) in physical units."""
        return self.model.fields(self._inputs(inputs)[1])

    def sample(self, inputs, samples: int, seed: int = 0, sampling: str = "auto"):
        """(point (n, T, N), samples (n, K, T, N), bands): K realisations per input, seeded, and their mean,
        std and calibrated 50 % and 90 % bands; float32, as `--samples` writes them."""
        from modules.predict import band_arrays
        if samples < 2:
            raise UserError(f"sample(…, {samples}): ask for 2 or more realisations; predict() gives the point.")
        sampling = self.model.sampling_for(sampling)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            point, draws = self.model.sample(self._inputs(inputs)[1], samples, sampling=sampling)
        return point, draws.astype(np.float32), band_arrays(draws, point, self.model.band_scales(sampling))

    def evaluate(self, inputs, truth, samples: int = 16, seed: int = 0) -> dict:
        """The `--evaluate` report (errors per run and per step, the VAE's share, the classical baselines, the
        calibration of `samples` draws) of the inputs' predictions against their true fields (n, T, N)."""
        from modules.evaluate import evaluate
        truth = np.asarray(truth, dtype=np.float64)
        domain, x = self._inputs(inputs)
        if truth.shape != (len(x), *self.shape):
            raise UserError(f"the true fields are {truth.shape}; they must be {(len(x), *self.shape)}, one per input.")
        sampling = self.model.sampling_for("auto")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            point, draws = self.model.sample(x, samples, sampling=sampling)
        check = self.model.domain.check(domain) if self.model.domain is not None else None
        return evaluate(self.model, domain, [f"input {i + 1}" for i in range(len(x))], truth, Path("(array)"), point,
                        draws, sampling, self.model.band_scales(sampling), check)
