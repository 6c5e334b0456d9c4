"""Nothing is lost on a crash: SIGKILL a real run, --resume it, get the same weights."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ENTRY, FAST, clean_env, demo_workdir, run_cli

ARGS = ("--preset=1", "--plot=2", "--lc_only=0", "--size=small", "--load_all=1", *FAST,
        "--set", "Training_epochs=6", "--set", "n_epoch=5", "--set", "Batch_size=2", "--set", "log_every=1",
        "--set", "checkpoint_every=2", "--set", "use_ema=1", "--set", "val_every=2")


def kill_when(workdir, marker: str, delay: float = 0.0) -> int:
    """Start a run, SIGKILL it `delay` seconds after `marker` appears on its stdout."""
    proc = subprocess.Popen([sys.executable, str(ENTRY), *ARGS], cwd=workdir, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if marker in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(timeout=300)
    finally:
        proc.kill()


def final_state(workdir):
    vae = torch.load(workdir / "checkpoints/vae.pt", weights_only=True)
    cond = torch.load(workdir / "checkpoints/conditioner.pt", weights_only=True)
    latents = np.load(workdir / "checkpoints/latents.npz")
    return vae, cond, {k: latents[k] for k in latents.files}


def assert_same(a, b):
    for stage_a, stage_b in zip(a[:2], b[:2]):
        assert stage_a["finished"] and stage_b["finished"]
        for part in ("model", "export"):
            for key in stage_a[part]:
                assert torch.equal(stage_a[part][key], stage_b[part][key]), f"{part}.{key} differs"
        ema_a, ema_b = stage_a["engine"]["ema"], stage_b["engine"]["ema"]
        for key in ema_a:
            assert torch.equal(ema_a[key], ema_b[key]), f"ema.{key} differs"
    for key in a[2]:
        assert np.array_equal(a[2][key], b[2][key]), f"latents {key} differ"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same configuration."""
    work = demo_workdir(tmp_path_factory.mktemp("reference"))
    result = run_cli(work, *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    return final_state(work)


@pytest.mark.parametrize("marker,delay", [
    ("[VAE] epoch 3/6", 0.0),                 # at an epoch boundary (just after epoch 3)
    ("[VAE] epoch 4/6", 0.25),                # inside epoch 5, after the epoch-4 checkpoint
    ("[conditioner] epoch 3/5", 0.0),         # during the conditioner stage
], ids=["vae-epoch-boundary", "vae-mid-epoch", "conditioner"])
def test_killed_run_resumes_to_the_same_weights_bitwise(tmp_path, reference, marker, delay):
    work = demo_workdir(tmp_path / "work")
    code = kill_when(work, marker, delay)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted = torch.load(work / "checkpoints/vae.pt", weights_only=True)
    if marker.startswith("[VAE]"):
        assert not interrupted["finished"]
    result = run_cli(work, *ARGS, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming at epoch" in result.stderr
    # One run folder: the resumed run continues the interrupted one.
    assert len(list((work / "runs").iterdir())) == 1
    assert_same(reference, final_state(work))


def test_resume_refuses_a_checkpoint_of_another_architecture(workdir):
    code = kill_when(workdir, "[VAE] epoch 3/6")
    assert code == -signal.SIGKILL
    before = (workdir / "checkpoints/vae.pt").read_bytes()
    result = run_cli(workdir, *ARGS, "--set", "Latent_dim_end=16", "--resume")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "different architecture" in lines[-1] and "latent_dim_end" in lines[-1]
    assert "Traceback" not in result.stderr
    assert (workdir / "checkpoints/vae.pt").read_bytes() == before


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "state.pt"
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ENTRY.parent)!r})\n"
        "from modules.checkpoint import save_torch\n"
        f"save_torch({{'version': 1, 'w': torch.arange(10.)}}, {str(target)!r})\n"
        "print('saved', flush=True)\n"
        f"save_torch({{'version': 2, 'w': torch.zeros(400_000_000)}}, {str(target)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".state.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".state.pt.*.tmp")), "the second save should have been under way"
    from modules.checkpoint import load_torch
    state = load_torch(target, "checkpoint", "retrain")
    assert state["version"] == 1 and torch.equal(state["w"], torch.arange(10.))


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    from modules.checkpoint import load_torch, save_torch
    from modules.errors import UserError
    path = save_torch({"w": torch.randn(1000)}, tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_torch(path, "VAE checkpoint", "retrain it")
