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
