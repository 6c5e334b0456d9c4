"""The bad-input catalogue: every mistake a user can make with the config, the preset, the
data, the conditioner inputs or the flags, driven through the real command line.

Each case runs `SimulGen-VAE.py` in a subprocess, in a working directory that already
holds one successful (tiny) training run, and checks that the tool

* exits with a non-zero status (2, the CLI's status for problems the user can fix);
* prints exactly one non-empty `error: ...` line on stderr that says what is wrong,
  where (file / line / key / flag) and how to fix it (asserted on distinctive fragments);
  other stderr lines may only be the tool's own log lines (`WARNING: ...`, `INFO: ...`,
  e.g. the warning about the original's free-text title line);
* prints no traceback;
* leaves every file of the earlier run under checkpoints/ and runs/ byte-identical and
  creates no new run folder.

All cases fail in the input checks, before any training starts. Broken variants are
written to new files under `<workdir>/bad/<case>/` and passed with --config,
--preset_file, --set dataset_dir=..., --set param_dir=... or --predict, so the files of
the earlier run are never edited. Cases that damage a checkpoint do so in a full copy of
the trained workdir; --lc_only / --resume without checkpoints run in a fresh workdir.

To keep the file fast, the `outcomes` fixture runs the selected cases' commands side by
side (each is ~1.5 s, mostly `import torch`); the tests then check each outcome.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "SimulGen-VAE.py"
WORKERS = max(2, min(4, os.cpu_count() or 2))   # commands run side by side
TIMEOUT = 120            # per command; a case that slipped through into training would show here

# One tiny, fast training run: 2 VAE epochs, 2 conditioner epochs, the GP on params.csv, a 20-step point network.
QUICK = {"Training_epochs": "2", "n_epoch": "2", "input_type": "csvs", "param_dir": "/input_data/params.csv"}
QUICK_SETS = [*(a for k, v in QUICK.items() for a in ("--set", f"{k}={v}")), "--set", "point_net_steps=20",
              "--set", "frame_net_epochs=5"]
BASE = ["--preset=1", "--plot=2"]
# What torchrun sets; none may leak into the cases (--use_ddp must see "not under torchrun").
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# ----------------------------------------------------------------------------- helpers

def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(MPLBACKEND="Agg", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


def snapshot(workdir: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under checkpoints/ and runs/; of
    checkpoints or runs itself where a case made it a regular file."""
    out = {}
    for top in ("checkpoints", "runs"):
        root = workdir / top
        if root.is_file():
            out[top] = "<file> " + hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(workdir).as_posix()
            out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_inputs(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "input_data", dst / "input_data")
    shutil.copy2(src / "preset.txt", dst / "preset.txt")
    return dst


def line_of(text: str, key: str) -> int:
    """1-based number of the line of `text` whose first word is `key`."""
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if words and words[0] == key:
            return number
    raise AssertionError(f"no line for key {key!r}")


def set_value(text: str, key: str, value: str | None) -> str:
    """`text` with the value of `key` replaced (value=None: the line removed)."""
    lines = text.splitlines()
    n = line_of(text, key) - 1
    if value is None:
        del lines[n]
    else:
        lines[n] = f"{key}\t{value}"
    return "\n".join(lines) + "\n"


@dataclass
class Ctx:
    wd: Path           # the working directory the command runs in
    case: Path         # a fresh folder for this case's broken files, inside wd
    condition: str     # text of the quick condition file (QUICK values written into it)

    def write_file(self, text: str, name: str = "condition.txt") -> str:
        path = self.case / name
        path.write_text(text)
        return str(path.relative_to(self.wd))

    def config_with(self, key: str, value: str | None) -> list[str]:
        return ["--config", self.write_file(set_value(self.condition, key, value))]

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.wd))

    def dataset(self, name: str | None = None, content: object = None) -> list[str]:
        """Arguments that read the runs from a separate folder bad/<case>/data holding `name`:
        raw bytes as given, else np.save (.npy) or pickle.dumps (.pickle) of `content`."""
        folder = self.case / "data"
        folder.mkdir()
        if name is not None:
            path = folder / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif name.endswith(".npy"):
                np.save(path, content)
            else:
                path.write_bytes(pickle.dumps(content, protocol=4))
        return [*BASE, *QUICK_SETS, "--set", f"dataset_dir={self.rel(folder)}"]

    def csv(self, rows: list[str]) -> list[str]:
        path = self.case / "params.csv"
        path.write_text("\n".join(rows) + "\n")
        return [*BASE, *QUICK_SETS, "--set", f"param_dir={path}"]

    def images(self, prepare: Callable[[Path], None] | None) -> list[str]:
        """A copy of the demo images in bad/<case>/images, changed by `prepare(folder)`; None: no folder."""
        folder = self.case / "images"
        if prepare is not None:
            shutil.copytree(self.wd / "input_data" / "images", folder)
            prepare(folder)
        return [*BASE, *QUICK_SETS, "--set", "input_type=image", "--set", f"param_dir={folder}"]

    def params_rows(self) -> list[str]:
        return (self.wd / "input_data" / "params.csv").read_text().splitlines()

    def runs_array(self) -> np.ndarray:
        return np.load(self.wd / "input_data" / "dataset1.npy")


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]                 # the command-line arguments
    expect: tuple[str, ...]                           # fragments the error line must contain
    where: str = "trained"                            # trained | fresh | copy (of the trained workdir)
    after: Callable[[Ctx], None] | None = None        # extra checks after the run
    line_of: str | None = None                        # the message must name the line of this key in --config


# ----------------------------------------------------------------------------- data writers

def _with_bad_value(ctx: Ctx, run: int, value: float) -> np.ndarray:
    a = ctx.runs_array()
    a[run, 3, 5] = value
    return a


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _marker_absent(ctx: Ctx) -> None:
    assert not (ctx.case / "PWNED").exists(), "the pickle's payload ran"


def _corrupt_png(folder: Path) -> None:
    data = (folder / "5.png").read_bytes()
    (folder / "5.png").write_bytes(data[: len(data) // 3])


def _text_as_png(folder: Path) -> None:
    (folder / "7.png").write_text("run 7: heater at 2.1 cm, 1.2 W/cm^2\n")


def _truncate_checkpoint(ctx: Ctx, args: list[str]) -> list[str]:
    """Cut checkpoints/vae.pt in half (only ever in a copy of the trained workdir); return `args`."""
    assert ctx.wd.name == "copy"
    vae = ctx.wd / "checkpoints" / "vae.pt"
    data = vae.read_bytes()
    vae.write_bytes(data[: len(data) // 2])
    return args


def _replace_checkpoint(ctx: Ctx, args: list[str], name: str = "vae.pt", change=None) -> list[str]:
    """Replace checkpoints/<name> (only ever in a copy of the trained workdir) by a valid torch
    file: `change(state)` of the real one, or, without `change`, a dict that is no checkpoint."""
    import torch
    assert ctx.wd.name == "copy"
    path = ctx.wd / "checkpoints" / name
    if change is None:
        state = {"w": torch.zeros(1)}
    else:
        state = torch.load(path, weights_only=True)
        change(state)
    torch.save(state, path)
    return args


def _misshape_first_weight(state: dict) -> None:
    """The first tensor of both saved weight sets gets another shape; everything else is intact."""
    import torch
    key = next(iter(state["export"]))
    for part in ("model", "export"):
        state[part][key] = torch.zeros(3)


def _damage_frame_net(state: dict) -> None:
    """The conditioner checkpoint's frame network (gp_frame_net) loses its sizes."""
    state["extra"]["frame_net"] = {"shape": {"inputs": 4}, "state": {}}


def _remove(ctx: Ctx, relative: str, args: list[str]) -> list[str]:
    """Delete <copy>/relative (a file or a folder); return `args`."""
    assert ctx.wd.name == "copy"
    target = ctx.wd / relative
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return args


def _file_instead_of(ctx: Ctx, folder: str, args: list[str]) -> list[str]:
    """Make <copy>/folder a regular file. For checkpoints/ the earlier run's checkpoints go
    with it: what must stay unchanged is that file, and the earlier run's folder in runs/."""
    _remove(ctx, folder, args)
    (ctx.wd / folder).write_text("a regular file where the tool writes a folder\n")
    return args


def _under_a_file(ctx: Ctx) -> str:
    """An --out path whose parent folder would have to be created inside a regular file."""
    (ctx.case / "a_file").write_text("not a folder")
    return ctx.rel(ctx.case / "a_file" / "sub" / "pred.npy")


# ----------------------------------------------------------------------------- the catalogue

CASES = [
    # --- the config file --------------------------------------------------------------
    Case("config-missing-file",
         lambda c: [*BASE, "--config", "input_data/no_such_condition.txt"],
         ("no_such_condition.txt", "not found", "--config")),
    Case("config-missing-required-key",
         lambda c: [*BASE, *c.config_with("Latent_dim_end", None)],
         ("config-missing-required-key/condition.txt: required key 'Latent_dim_end' is missing",
          "add a line 'Latent_dim_end <value>'")),
    Case("config-unparsable-value",
         lambda c: [*BASE, *c.config_with("LearningR", "1e-3x")],
         ("key 'LearningR'", "'1e-3x' is not a number"),
         line_of="LearningR"),
    Case("config-value-out-of-range",
         lambda c: [*BASE, *c.config_with("Loss_type", "7")],
         ("key 'Loss_type'", "out of range", "at most 4"),
         line_of="Loss_type"),
    Case("config-key-typo",
         lambda c: [*BASE, "--config", c.write_file(c.condition.replace("Batch_size", "Batch_sise"))],
         ("unknown key 'Batch_sise'", "did you mean 'Batch_size'?"),
         line_of="Batch_sise"),
    Case("config-unknown-input-type",
         lambda c: [*BASE, *c.config_with("input_type", "table")],
         ("key 'input_type'", "'table' is not one of", "csvs", "image_vit"), line_of="input_type"),
    Case("config-dim2-red-above-dim2",
         lambda c: [*BASE, *c.config_with("Dim2_red", "64")],
         ("key 'Dim2_red'", "64 is larger than Dim2 = 32", "set it to 32 or less"),
         line_of="Dim2_red"),
    Case("config-filter-list-in-condition-file",
         lambda c: [*BASE, *c.config_with("Latent_dim", "8 8")],
         ("key 'Latent_dim'", "expected one value, found 2"), line_of="Latent_dim"),
    Case("set-invalid-value",
         lambda c: [*BASE, *QUICK_SETS, "--set", "Training_epochs=-3"],
         ("--set Training_epochs=-3", "key 'Training_epochs'", "out of range", "at least 1")),
    Case("set-unknown-key-typo",
         lambda c: [*BASE, *QUICK_SETS, "--set", "Trainig_epochs=3"],
         ("--set Trainig_epochs=3", "unknown key 'Trainig_epochs'", "did you mean 'Training_epochs'?")),
    Case("set-unknown-key",
         lambda c: [*BASE, *QUICK_SETS, "--set", "warp_speed=9"],
         ("unknown key 'warp_speed'", "--list_keys")),
    Case("set-not-key-value",
         lambda c: [*BASE, *QUICK_SETS, "--set", "Training_epochs"],
         ("--set 'Training_epochs'", "KEY=VALUE")),

    # --- the preset -------------------------------------------------------------------
    Case("preset-file-missing",
         lambda c: [*BASE, *QUICK_SETS, "--preset_file", "no_such_preset.txt"],
         ("preset file no_such_preset.txt not found", "--preset_file")),
    Case("preset-filter-list-not-numeric",
         lambda c: [*BASE, *QUICK_SETS, "--preset_file", c.write_file(
             (c.wd / "preset.txt").read_text().replace("64 32 16 8", "64 32 x 8"), "preset.txt")],
         ("preset.txt line 4", "encoder filter list '64 32 x 8'", "whole numbers")),
    Case("preset-short-block",
         lambda c: [*BASE, *QUICK_SETS, "--preset_file", c.write_file(
             "\n".join((c.wd / "preset.txt").read_text().splitlines()[:4]) + "\n", "preset.txt")],
         ("preset block 1 does not exist", "no complete block", "4 lines per block")),
    Case("preset-block-does-not-exist",
         lambda c: ["--preset=3", "--plot=2", *QUICK_SETS],
         ("preset.txt", "preset block 3 does not exist", "it has 1 complete block", "--preset=1..1")),
    Case("preset-not-given-no-tty",
         lambda c: ["--plot=2", *QUICK_SETS],
         ("no preset chosen", "--preset=N", "no terminal")),

    # --- the dataset ------------------------------------------------------------------
    Case("dataset-missing",
         lambda c: c.dataset(),
         ("no dataset 1", "data/dataset1.npy", "data/dataset1.pickle", "dataset_dir", "preset.txt")),
    Case("dataset-wrong-shape",
         lambda c: c.dataset("dataset1.npy", c.runs_array()[:, :, :200]),
         ("dataset1.npy has shape (80, 32, 200)", "(Dim1, Dim2, Dim3) = (80, 32, 256)", "fix Dim1/Dim2/Dim3")),
    Case("dataset-transposed",
         lambda c: c.dataset("dataset1.npy", c.runs_array().swapaxes(1, 2)),
         ("(80, 256, 32)", "(80, 32, 256)", "np.swapaxes")),
    Case("dataset-nan",
         lambda c: c.dataset("dataset1.npy", _with_bad_value(c, 17, np.nan)),
         ("dataset1.npy: run 18 (numbered from 1", "NaN or Inf", "fix or remove that run")),   # index 17
    Case("dataset-inf-in-pickle",
         lambda c: c.dataset("dataset1.pickle", _with_bad_value(c, 63, -np.inf)),
         ("dataset1.pickle: run 64 ", "NaN or Inf")),
    Case("dataset-pickle-holds-dict",
         lambda c: c.dataset("dataset1.pickle", {"runs": [1.0, 2.0]}),
         ("dataset1.pickle holds a dict, not a numpy array", "np.save")),
    Case("dataset-malicious-pickle",
         lambda c: c.dataset("dataset1.pickle", _Payload(c.case / "PWNED")),
         ("refusing to unpickle", "system", "dataset1.pickle", "only numpy arrays"),
         after=_marker_absent),
    Case("dataset-truncated-npy",
         lambda c: c.dataset("dataset1.npy", _half(_npy_bytes(c.runs_array()))),
         ("cannot read", "dataset1.npy", "truncated", "regenerate it with np.save")),
    Case("dataset-truncated-pickle",
         lambda c: c.dataset("dataset1.pickle", _half(pickle.dumps(c.runs_array(), protocol=4))),
         ("cannot unpickle", "dataset1.pickle", "truncated or corrupt", "write it again")),
    Case("dataset-empty-array",
         lambda c: c.dataset("dataset1.npy", np.zeros((0, 32, 256), np.float32)),
         ("dataset1.npy holds an empty array of shape (0, 32, 256)", "[Dim1, Dim2, Dim3]")),

    # --- the conditioner inputs: CSV --------------------------------------------------
    Case("csv-wrong-column-count",
         lambda c: c.csv([r if i != 4 else r + ",0.5" for i, r in enumerate(c.params_rows())]),
         ("params.csv, line 5: found 5 columns, expected 4", "num_param")),
    Case("csv-wrong-row-count",
         lambda c: c.csv(c.params_rows()[:-1]),
         ("params.csv: found 79 data rows, expected 80", "n_sample / Dim1")),
    Case("csv-non-numeric-cell",
         lambda c: c.csv([r if i != 9 else "1.2,abc,0.9,1.0" for i, r in enumerate(c.params_rows())]),
         ("params.csv, line 10, column 2: 'abc' is not a number", "fix that cell")),
    Case("csv-header-wrong-count",
         lambda c: c.csv(["offset,height,radius", *c.params_rows()]),
         ("params.csv, line 1: the header names 3 columns, expected 4", "num_param")),
    Case("csv-first-row-bad-cell",
         lambda c: c.csv(["offset," + c.params_rows()[0].split(",", 1)[1], *c.params_rows()[1:]]),
         ("line 1, column 1: 'offset' is not a number", "a header line must name every column")),
    Case("csv-missing",
         lambda c: [*BASE, *QUICK_SETS, "--set", "param_dir=/input_data/no_such_params.csv"],
         ("parameter CSV not found", "no_such_params.csv", "param_dir")),

    Case("node-positions-wrong-rows",
         lambda c: [*BASE, *QUICK_SETS, "--set",
                    "node_positions=" + c.write_file("".join(f"{i},0.5\n" for i in range(10)), "nodes.csv")],
         ("node_positions", "nodes.csv: holds a 10x2 table", "it needs 256 rows")),

    # --- the conditioner inputs: images -----------------------------------------------
    Case("images-folder-missing",
         lambda c: c.images(None),
         ("image folder not found", "images-folder-missing/images", "param_dir", "relative to the working directory")),
    Case("images-folder-empty",
         lambda c: c.images(lambda f: [p.unlink() for p in f.iterdir()]),
         ("no '.png' files in", "param_data_type")),
    Case("images-wrong-count",
         lambda c: c.images(lambda f: (f / "17.png").unlink()),
         ("holds 79 '.png' images, expected 80", "missing 17.png", "one image per run")),
    Case("images-corrupt-image",
         lambda c: c.images(_corrupt_png),
         ("cannot read image", "5.png", "replace or remove that file")),
    Case("images-text-file-with-png-extension",
         lambda c: c.images(_text_as_png),
         ("cannot read image", "7.png", "replace or remove that file")),

    # --- flags ------------------------------------------------------------------------
    Case("flag-invalid-plot-value",
         lambda c: ["--preset=1", "--plot=5", *QUICK_SETS],
         ("--plot", "invalid choice: 5", "0, 1, 2", "--help")),
    Case("flag-unknown",
         lambda c: [*BASE, "--epochs=3"],
         ("unrecognized arguments: --epochs=3", "--help")),
    Case("flag-lc-only-without-vae",
         lambda c: [*BASE, *QUICK_SETS, "--lc_only=1"],
         ("--lc_only=1 needs a finished VAE", "vae.pt", "missing", "--lc_only=0"),
         where="fresh"),
    Case("flag-resume-without-checkpoint",
         lambda c: [*BASE, *QUICK_SETS, "--resume"],
         ("--resume: no checkpoint", "start without --resume"),
         where="fresh"),
    Case("flag-use-ddp-outside-torchrun",
         lambda c: [*BASE, *QUICK_SETS, "--use_ddp"],
         ("--use_ddp must be started by torchrun", "RANK", "WORLD_SIZE", "torchrun --nproc_per_node")),
    Case("predict-folder-for-csv-model",
         lambda c: ["--predict", "input_data/images", "--out", c.rel(c.case / "pred.npy")],
         ("--predict input_data/images is a folder", "input_type csvs", "CSV file with 4 columns")),
    Case("predict-input-missing",
         lambda c: ["--predict", "input_data/no_such.csv", "--out", c.rel(c.case / "pred.npy")],
         ("--predict input_data/no_such.csv not found", "CSV file")),
    Case("predict-csv-wrong-column-count",
         lambda c: ["--predict", c.write_file("1.0,2.0,3.0\n2.0,3.0,4.0\n", "new.csv"),
                    "--out", c.rel(c.case / "pred.npy")],
         ("new.csv, line 1: found 3 columns, expected 4", "trained on 4 parameters")),
    Case("predict-out-under-a-file",
         lambda c: ["--predict", "input_data/params.csv", "--out", _under_a_file(c)],
         ("--out", "a_file/sub/pred.npy", "cannot write to", "choose a writable folder")),
    Case("evaluate-truth-not-npy",
         lambda c: ["--predict", "input_data/params.csv", "--evaluate", "input_data/params.csv",
                    "--out", c.rel(c.case / "pred.npy")],
         ("--evaluate input_data/params.csv is not a .npy file", "[n, T, N]")),
    Case("evaluate-truth-other-run-count",
         lambda c: ["--predict", c.write_file("\n".join(c.params_rows()[:3]) + "\n", "three.csv"),
                    "--evaluate", "input_data/dataset1.npy", "--out", c.rel(c.case / "pred.npy")],
         ("holds 80 runs but the inputs give 3", "same order")),
    Case("run-unknown",
         lambda c: ["--predict", "input_data/params.csv", "--run", "19990101-000000", "--out", c.rel(c.case / "pred.npy")],
         ("--run 19990101-000000: no such run", "runs kept:", "(current")),
    Case("run-with-a-fresh-run",
         lambda c: [*BASE, *QUICK_SETS, "--run", "19990101-000000"],
         ("--run 19990101-000000 picks an earlier run", "drop --run")),
    Case("predict-out-not-npy",
         lambda c: ["--predict", "input_data/params.csv", "--out", c.rel(c.case / "pred.csv")],
         ("pred.csv", "must be a .npy file")),
    Case("predict-truncated-checkpoint",
         lambda c: _truncate_checkpoint(c, ["--predict", "input_data/params.csv", "--out",
                                             c.rel(c.case / "pred.npy")]),
         ("VAE checkpoint", "vae.pt is truncated or corrupt", "delete it and train first"),
         where="copy"),
    Case("lc-only-truncated-checkpoint",
         lambda c: _truncate_checkpoint(c, [*BASE, *QUICK_SETS, "--lc_only=1"]),
         ("VAE checkpoint", "vae.pt is truncated or corrupt", "delete it and train the VAE first"),
         where="copy"),

    # --- checkpoints that load but hold the wrong thing ---------------------------------
    Case("resume-checkpoint-wrong-content",
         lambda c: _replace_checkpoint(c, [*BASE, *QUICK_SETS, "--resume"]),
         ("VAE checkpoint", "vae.pt loads, but is not a SimulGenVAE VAE checkpoint", "missing 'kind'",
          "it holds 'w'", "delete it and train the VAE first"),
         where="copy"),
    Case("predict-checkpoint-wrong-content",
         lambda c: _replace_checkpoint(c, ["--predict", "input_data/params.csv", "--out", c.rel(c.case / "pred.npy")]),
         ("VAE checkpoint", "vae.pt loads, but is not a SimulGenVAE VAE checkpoint", "missing 'kind'",
          "delete it and train first"),
         where="copy"),
    Case("lc-only-checkpoint-wrong-content",
         lambda c: _replace_checkpoint(c, [*BASE, *QUICK_SETS, "--lc_only=1"]),
         ("VAE checkpoint", "vae.pt loads, but is not a SimulGenVAE VAE checkpoint", "missing 'kind'",
          "delete it and train the VAE first"),
         where="copy"),
    Case("predict-conditioner-checkpoint-wrong-content",
         lambda c: _replace_checkpoint(c, ["--predict", "input_data/params.csv", "--out", c.rel(c.case / "pred.npy")],
                                       "conditioner.pt"),
         ("conditioner checkpoint", "conditioner.pt loads, but is not a SimulGenVAE conditioner checkpoint"),
         where="copy"),
    Case("predict-frame-net-damaged",
         lambda c: _replace_checkpoint(c, ["--predict", "input_data/params.csv", "--out", c.rel(c.case / "pred.npy")],
                                       "conditioner.pt", change=_damage_frame_net),
         ("conditioner.pt: its blended network's sizes are unreadable", "retrain the conditioner with --lc_only=1"),
         where="copy"),
    Case("resume-checkpoint-weights-do-not-fit",
         lambda c: _replace_checkpoint(c, [*BASE, *QUICK_SETS, "--resume"], change=_misshape_first_weight),
         ("vae.pt: its weights do not fit", "wrong shape", "(3,) instead of", "delete it and train the VAE first"),
         where="copy"),
    Case("predict-checkpoint-weights-do-not-fit",
         lambda c: _replace_checkpoint(c, ["--predict", "input_data/params.csv", "--out", c.rel(c.case / "pred.npy")],
                                       change=_misshape_first_weight),
         ("vae.pt: its weights do not fit", "wrong shape", "(3,) instead of"),
         where="copy"),
    Case("lc-only-checkpoint-weights-do-not-fit",
         lambda c: _replace_checkpoint(c, [*BASE, *QUICK_SETS, "--lc_only=1"], change=_misshape_first_weight),
         ("vae.pt: its weights do not fit", "wrong shape", "(3,) instead of"),
         where="copy"),

    # --- resuming what cannot be resumed ------------------------------------------------
    Case("resume-lc-only-without-conditioner-checkpoint",
         lambda c: _remove(c, "checkpoints/conditioner.pt", [*BASE, *QUICK_SETS, "--lc_only=1", "--resume"]),
         ("--resume --lc_only=1", "no conditioner checkpoint", "conditioner.pt", "nothing to resume",
          "run without --resume"),
         where="copy"),
    Case("resume-without-vae-checkpoint",
         lambda c: _remove(c, "checkpoints/vae.pt", [*BASE, *QUICK_SETS, "--resume"]),
         ("--resume: no checkpoint", "vae.pt", "start without --resume"),
         where="copy"),
    Case("resume-conditioner-with-another-split",
         lambda c: [*BASE, *QUICK_SETS, "--lc_only=1", "--resume", "--seed", "7"],
         ("conditioner.pt used another train/validation split", "seed", "start afresh without --resume")),
    Case("resume-vae-with-another-split",
         lambda c: [*BASE, *QUICK_SETS, "--resume", "--set", "val_split=0.25"],
         ("vae.pt used another train/validation split", "val_split", "start afresh without --resume")),

    # --- outputs that cannot be written -------------------------------------------------
    Case("output-runs-is-a-file",
         lambda c: _file_instead_of(c, "runs", [*BASE, *QUICK_SETS]),
         ("training outputs: cannot write to", "runs is a file, not a folder", "nothing was written"),
         where="copy"),
    Case("output-checkpoints-is-a-file",
         lambda c: _file_instead_of(c, "checkpoints", [*BASE, *QUICK_SETS]),
         ("training outputs: cannot write to", "checkpoints is a file, not a folder", "nothing was written"),
         where="copy"),
]


# ----------------------------------------------------------------------------- running

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A working directory with the demo inputs and one successful quick training run."""
    wd = copy_inputs(REPO, tmp_path_factory.mktemp("trained"))
    res = cli([*BASE, "--lc_only=0", "--size=small", "--load_all=1", *QUICK_SETS], wd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    snap = snapshot(wd)
    assert "checkpoints/vae.pt" in snap and "checkpoints/conditioner.pt" in snap, sorted(snap)
    assert sum(1 for k in snap if k.count("/") == 1 and k.startswith("runs/")) == 1, sorted(snap)
    return wd


def _quick_condition(wd: Path) -> str:
    text = (wd / "input_data" / "condition.txt").read_text()
    for key, value in QUICK.items():
        text = set_value(text, key, value)
    return text


@dataclass
class Outcome:
    ctx: Ctx
    args: list[str]
    before: dict[str, str]          # snapshot of ctx.wd just before the command
    after: dict[str, str] = field(default_factory=dict)
    result: subprocess.CompletedProcess | None = None
    crash: str = ""                 # a timeout or an exception of the runner itself


def _prepare(case: Case, trained: Path, scratch: Path) -> Outcome:
    if case.where == "trained":
        wd = trained
    elif case.where == "fresh":
        wd = copy_inputs(REPO, scratch / "fresh")
    else:   # a full copy of the trained workdir, so a damaged checkpoint never touches `trained`
        wd = scratch / "copy"
        shutil.copytree(trained, wd, ignore=shutil.ignore_patterns("bad"))
    case_dir = wd / "bad" / case.id
    case_dir.mkdir(parents=True)
    ctx = Ctx(wd, case_dir, _quick_condition(wd))
    args = [str(a) for a in case.build(ctx)]
    return Outcome(ctx, args, snapshot(wd))    # after the case damaged its own copy, if it does


def _run(outcome: Outcome) -> None:
    try:
        outcome.result = cli(outcome.args, outcome.ctx.wd)
    except Exception as exc:   # noqa: BLE001 - reported by the case's test
        outcome.crash = f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def outcomes(request, trained, tmp_path_factory) -> dict[str, Outcome]:
    """Prepare every selected case, run them all concurrently (each is ~1.5 s of mostly
    `import torch`), and snapshot checkpoints/ and runs/ before and after.

    The cases that share the trained workdir run side by side, so its snapshot is taken
    once before the first and once after the last of them; a case in its own fresh or
    copied workdir is compared on that workdir alone."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    prepared = {c.id: _prepare(c, trained, tmp_path_factory.mktemp(c.id)) for c in CASES if c.id in selected}
    trained_before = snapshot(trained)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(_run, prepared.values()))
    trained_after = snapshot(trained)
    for outcome in prepared.values():
        outcome.after = snapshot(outcome.ctx.wd)
        if outcome.ctx.wd == trained:
            outcome.before, outcome.after = trained_before, trained_after
    prepared["<trained>"] = Outcome(Ctx(trained, trained, ""), [], trained_before, trained_after)
    return prepared


def _diff(before: dict[str, str], after: dict[str, str]) -> str:
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return (f"changed {changed}, new {sorted(after.keys() - before.keys())}, "
            f"gone {sorted(before.keys() - after.keys())}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome]):
    outcome = outcomes[case.id]
    assert not outcome.crash, outcome.crash
    res, args, wd = outcome.result, outcome.args, outcome.ctx.wd
    output = res.stdout + res.stderr
    command = "SimulGen-VAE.py " + " ".join(args)

    assert "Traceback" not in output, f"{command}\n{output}"
    assert res.returncode != 0, f"exit status 0: {command}\n{output}"
    assert res.returncode == 2, f"exit status {res.returncode}, not 2 (user error): {command}\n{output}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, f"expected one 'error: ' line on stderr, got {len(errors)}: {command}\n{res.stderr}"
    others = [ln for ln in lines if not ln.startswith(("error: ", "WARNING: ", "INFO: "))]
    assert not others, f"stray stderr lines (the message must be a single line): {command}\n{res.stderr}"
    message = errors[0]
    assert "SimulGenVAE run " not in res.stdout, f"training started: {command}\n{res.stdout}"
    for fragment in case.expect:
        assert fragment in message, f"{fragment!r} not in the error line of {command}:\n{message}"
    if case.line_of:     # "<file> line N": N is the line of the bad key in the file the case wrote
        config = wd / args[args.index("--config") + 1]
        assert f"{config.relative_to(wd)} line {line_of(config.read_text(), case.line_of)}" in message, message
    if case.after:
        case.after(outcome.ctx)

    culprits = [k for k, o in outcomes.items() if o.result is not None and o.result.returncode == 0]
    assert outcome.after == outcome.before, (
        f"checkpoints/ or runs/ of {wd} changed while the bad-input cases ran: {_diff(outcome.before, outcome.after)}; "
        f"cases that exited 0: {culprits}")
    trained = outcomes["<trained>"]
    assert trained.after == trained.before, (
        f"the trained workdir changed: {_diff(trained.before, trained.after)}; cases that exited 0: {culprits}")


def test_ddp_batch_that_does_not_split_over_the_processes_fails_before_anything_is_written(trained, tmp_path):
    """Under torchrun with 2 processes a global Batch_size of 3 cannot be split: refused with
    one error line (rank 0's) before the earlier run's checkpoints move or a run folder appears."""
    wd = tmp_path / "copy"
    shutil.copytree(trained, wd, ignore=shutil.ignore_patterns("bad"))
    before = snapshot(wd)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           "--use_ddp", *BASE, *QUICK_SETS, "--set", "Batch_size=3"]
    res = subprocess.run(cmd, cwd=wd, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "Batch_size = 3 is not divisible by the 2 DDP processes" in errors[0] and "multiple of 2" in errors[0]
    assert "SimulGenVAE run " not in res.stdout, "training started"
    assert snapshot(wd) == before, _diff(before, snapshot(wd))
