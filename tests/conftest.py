import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "SimulGen-VAE.py"

# Short runs of the shipped demo with the fast MLP conditioner.
# The CSV route with the original's MLP: these tests exercise the epoch loop of both stages
# (resume, signals, DDP, ...); the default GP conditioner is tested by test_pipeline and test_gp.
FAST = ("--set", "input_type=csvs", "--set", "param_dir=/input_data/params.csv", "--set", "baseline=0",
        "--set", "csv_conditioner=mlp")


def demo_workdir(path: Path) -> Path:
    """A working directory holding a copy of the shipped demo inputs."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "input_data", path / "input_data", ignore=shutil.ignore_patterns("make_demo.py"))
    shutil.copy(ROOT / "preset.txt", path / "preset.txt")
    return path


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(workdir: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY), *args], cwd=workdir, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    return demo_workdir(tmp_path / "work")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads buy nothing, and on a busy 2-core machine OpenMP barriers
    waiting for a preempted thread made each forward up to ~200x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """One short default (GP + networks) training on the demo, shared by every test of what a trained surrogate
    does (the Python API, --suggest, --sensitivity, --export). Tests read it; one that writes into a working folder
    copies it first (`copied_model`)."""
    from modules.api import config, fit
    work = demo_workdir(tmp_path_factory.mktemp("trained") / "work")
    cfg = config(work / "input_data/condition.txt", Training_epochs=2, frame_net_epochs=20, point_net_steps=100,
                 baseline=0)
    surrogate, summary = fit(cfg, work)
    return work, surrogate, summary


def copied_model(work: Path, to: Path) -> Path:
    """A copy of the trained working folder `work` (inputs, checkpoints, runs) at `to`."""
    shutil.copytree(work, to, symlinks=True)
    return to
