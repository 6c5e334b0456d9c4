"""Real multi-process training with torchrun and the Gloo backend on CPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, cwd, timeout=300):
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_ranks_at_half_batch_match_one_process_at_full_batch(tmp_path):
    harness = str(ROOT / "tests/helpers/ddp_harness.py")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run([sys.executable, harness, str(tmp_path / "one"), str(tmp_path / "one.pt")], ROOT)
    _run(TORCHRUN + [harness, str(tmp_path / "two"), str(tmp_path / "two.pt"), "ddp"], ROOT)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for stage in ("vae", "conditioner"):
        assert one[stage].keys() == two[stage].keys()
        worst = max((one[stage][k] - two[stage][k]).abs().max().item() for k in one[stage])
        assert worst < 1e-5, f"{stage}: DDP weights differ from the single process by {worst}"
    # The runs really trained (the comparison is not between two untouched models).
    for stage in ("vae", "conditioner"):
        losses = one[f"{stage}_history"]["train_loss"]
        assert len(losses) == 3 and losses[-1] < losses[0]


def test_a_whole_ddp_demo_run_with_sam_and_ema_completes(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "input_data", work / "input_data")
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    cmd = TORCHRUN + [str(ROOT / "SimulGen-VAE.py"), "--use_ddp", "--preset=1", "--plot=2", "--lc_only=0",
                      "--size=small", "--load_all=1", "--set", "Training_epochs=3", "--set", "n_epoch=3",
                      "--set", "use_sam=1", "--set", "use_ema=1", "--set", "input_type=csvs",
                      "--set", "param_dir=/input_data/params.csv"]
    result = _run(cmd, work, timeout=600)
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1, "one run folder, written by rank 0 only"
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["vae_epochs"] == 3 and summary["lc_epochs"] == 3
    assert 0 < summary["lc_val_rel_l2"] < 10
    state = torch.load(work / "checkpoints/vae.pt", weights_only=True)
    assert state["finished"] and state["engine"]["ema"] is not None
    assert state["run"]["world_size"] == 2 and len(state["rng"]) == 2
    assert result.stdout.count("Summary") == 1, "only rank 0 prints"
