"""Real multi-process training with torchrun and the Gloo backend on CPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def harness_runs(tmp_path_factory):
    """The harness (tests/helpers/ddp_harness.py) run once as one process and once as two
    Gloo ranks at half the per-rank batch: (single-process results, DDP results)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    harness = str(ROOT / "tests/helpers/ddp_harness.py")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run([sys.executable, harness, str(tmp_path / "one"), str(tmp_path / "one.pt")], ROOT)
    _run(TORCHRUN + [harness, str(tmp_path / "two"), str(tmp_path / "two.pt"), "ddp"], ROOT)
    return torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)


def _assert_same_metrics(one: dict, two: dict, what: str, tol: float = 1e-6) -> None:
    """Equal keys, and values equal to `tol` (relative to values above 1)."""
    assert one.keys() == two.keys(), f"{what}: {sorted(one)} != {sorted(two)}"
    for key in one:
        a, b = torch.as_tensor(one[key], dtype=torch.float64), torch.as_tensor(two[key], dtype=torch.float64)
        assert a.shape == b.shape, f"{what} {key}: {a.shape} != {b.shape}"
        assert torch.isnan(a).equal(torch.isnan(b)), f"{what} {key}: NaN in different places"
        gap = ((a - b).abs() / a.abs().clamp_min(1.0)).nan_to_num(0.0).max().item()
        assert gap <= tol, f"{what} {key}: the DDP run logged {b.tolist()}, the single process {a.tolist()}"


def test_two_ranks_at_half_batch_match_one_process_at_full_batch(harness_runs):
    one, two = harness_runs
    for stage in ("vae", "conditioner"):
        assert one[stage].keys() == two[stage].keys()
        worst = max((one[stage][k] - two[stage][k]).abs().max().item() for k in one[stage])
        assert worst < 1e-5, f"{stage}: DDP weights differ from the single process by {worst}"
    # The runs really trained (the comparison is not between two untouched models).
    for stage in ("vae", "conditioner"):
        losses = one[f"{stage}_history"]["train_loss"]
        assert len(losses) == 3 and losses[-1] < losses[0]


def test_the_logged_history_of_two_ranks_is_the_single_process_history(harness_runs):
    """Logged metrics are all-reduced: a rank's local loss over its half batch would differ."""
    one, two = harness_runs
    for stage in ("vae", "conditioner"):
        history = one[f"{stage}_history"]
        assert {"train_loss", "train_grad_norm", "lr"} <= history.keys()
        assert any(k.startswith("val_") for k in history) and all(len(v) == 3 for v in history.values())
        _assert_same_metrics(history, two[f"{stage}_history"], f"{stage} history")


def test_validation_with_fewer_runs_than_ranks_matches_the_single_process(harness_runs):
    """One validation run for two ranks: rank 1 validates nothing, yet the reduction is the
    single-process value (and does not hang or fail on vectors of different lengths)."""
    one, two = harness_runs
    assert one["val_runs"] >= 2          # the full validation set would give both ranks runs
    for stage in ("vae", "conditioner"):
        metrics = one[f"{stage}_val_one_run"]
        assert metrics and all(v > 0 for v in metrics.values())
        _assert_same_metrics(metrics, two[f"{stage}_val_one_run"], f"{stage} validation on one run")


def test_sam_synchronises_gradients_once_per_step_under_ddp(harness_runs):
    """SAM's first forward and backward run inside no_sync: 3 steps, 3 all-reduces (of the
    one gradient bucket). Without no_sync the first pass would all-reduce too: 6."""
    _, two = harness_runs
    assert two["syncs"] == {"sam": 3, "sam_without_no_sync": 6}


def test_a_whole_ddp_demo_run_with_sam_and_ema_completes(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "input_data", work / "input_data")
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    cmd = TORCHRUN + [str(ROOT / "SimulGen-VAE.py"), "--use_ddp", "--preset=1", "--plot=2", "--lc_only=0",
                      "--size=small", "--load_all=1", "--set", "Training_epochs=3", "--set", "n_epoch=3",
                      "--set", "use_sam=1", "--set", "use_ema=1", "--set", "input_type=csvs",
                      "--set", "param_dir=/input_data/params.csv", "--set", "csv_conditioner=mlp"]
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
    # the default GP conditioner on the same VAE: every rank fits it, rank 0 writes it once
    gp = _run([*cmd[:cmd.index("--lc_only=0")], "--lc_only=1", *cmd[cmd.index("--lc_only=0") + 1:-2],
               "--set", "frame_net_epochs=5", "--set", "point_net_steps=50"], work, timeout=600)
    assert gp.stdout.count("Summary") == 1
    summary = json.loads((sorted((work / "runs").iterdir())[-1] / "summary.json").read_text())
    assert summary["conditioner"] == "csvs (gp)" and 0 < summary["lc_val_rel_l2"] < summary["baseline_mean_field_rel_l2"]
    assert torch.load(work / "checkpoints/conditioner.pt", weights_only=True)["architecture"]["model"] == "gp"
