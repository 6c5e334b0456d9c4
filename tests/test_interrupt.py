"""Ctrl-C and SIGTERM save before they stop: real training processes, real signals."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENTRY, FAST, clean_env, demo_workdir

# Default checkpoint_every (100) and checkpoint_minutes (10): only the signal makes a save
# after epoch 0 in these short runs.
def demo_args(vae_epochs: int, lc_epochs: int) -> tuple[str, ...]:
    return ("--preset=1", "--plot=2", "--lc_only=0", "--size=small", "--load_all=1", *FAST, "--set",
            f"Training_epochs={vae_epochs}", "--set", f"n_epoch={lc_epochs}", "--set", "Batch_size=2",
            "--set", "log_every=1")


ARGS = demo_args(6, 4)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SAVED = re.compile(r"holds the (VAE|conditioner) after epoch (\d+) of (\d+); --resume continues from there")


def env_one_thread() -> dict:
    return {**clean_env(), "OMP_NUM_THREADS": "1"}      # a busy 2-core machine: no thread contention


def signal_when(cmd, workdir, marker: str, signals, target=None):
    """Start `cmd`, send `signals` once `marker` appears on its stdout (to the process
    `target(proc)` returns, default the process itself; a second signal after the run has
    acknowledged the first on stderr); return (exit status, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=workdir, env=env_one_thread(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    printed, logged = [], []
    try:
        for line in proc.stdout:
            printed.append(line)
            if marker in line:
                pid = target(proc) if target else proc.pid
                os.kill(pid, signals[0])
                if len(signals) > 1:
                    for text in proc.stderr:      # two signals at once would be delivered as one
                        logged.append(text)
                        if "send it again to stop at once" in text:
                            break
                    os.kill(pid, signals[1])
                break
        else:
            raise AssertionError("the run ended before the marker: " + "".join(printed)[-2000:])
        out, err = proc.communicate(timeout=600)
        return proc.returncode, "".join(printed) + out, "".join(logged) + err
    finally:
        proc.kill()
        proc.wait()


def saved_epoch(stderr: str, stage: str) -> int:
    found = SAVED.findall(stderr)
    assert len(found) == 1 and found[0][0] == stage, stderr[-2000:]
    return int(found[0][1])


@pytest.mark.parametrize("sig,code,marker,stage,path", [
    (signal.SIGINT, 130, "[VAE] epoch 3/6", "VAE", "checkpoints/vae.pt"),
    (signal.SIGTERM, 143, "[conditioner] epoch 1/4", "conditioner", "checkpoints/conditioner.pt"),
], ids=["sigint-vae", "sigterm-conditioner"])
def test_a_signal_saves_at_the_epoch_end_and_resume_continues_there(tmp_path, sig, code, marker, stage, path):
    work = demo_workdir(tmp_path / "work")
    cmd = [sys.executable, str(ENTRY), *ARGS]
    status, out, err = signal_when(cmd, work, marker, [sig])
    assert status == code, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert lines[-1].startswith(f"stopped by {name} (saved): ")
    epoch = saved_epoch(err, stage)
    seen = int(re.findall(rf"\[{stage}\] epoch (\d+)/", out)[-1])
    assert epoch == seen >= int(marker.split()[-1].split("/")[0])   # the epoch it was in when stopped
    state = torch.load(work / path, weights_only=True)
    assert state["epoch"] == epoch and not state["finished"]
    result = subprocess.run([sys.executable, str(ENTRY), *ARGS, "--resume"], cwd=work, env=env_one_thread(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{stage}: resuming at epoch {epoch} of" in result.stderr
    assert f"[{stage}] epoch {epoch + 1}/" in result.stdout and f"[{stage}] epoch {epoch}/" not in result.stdout


def test_a_second_signal_stops_at_once_and_names_only_the_checkpoint_on_disk(workdir):
    status, out, err = signal_when([sys.executable, str(ENTRY), *ARGS], workdir, "[VAE] epoch 2/6",
                                   [signal.SIGINT, signal.SIGINT])
    assert status == 130, err[-2000:]
    assert "Traceback" not in err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("interrupted by SIGINT, stopped at once: ")
    # No save after the signals: the checkpoint on disk is still the one of epoch 0, and the
    # message says so (not the epoch the run had reached).
    assert saved_epoch(err, "VAE") == 0
    assert torch.load(workdir / "checkpoints/vae.pt", weights_only=True)["epoch"] == 0
    assert "[VAE] epoch 3/6" not in out


def test_the_message_claims_no_checkpoint_before_one_is_written():
    from modules import interrupt
    interrupt.reset()
    try:
        assert "no checkpoint was written by this run" in interrupt.interrupted_message()
        interrupt.note_saved(Path("c/vae.pt"), "VAE", 3, 9, False)
        assert "c/vae.pt holds the VAE after epoch 3 of 9" in interrupt.interrupted_message()
    finally:
        interrupt.reset()


def test_checkpoint_minutes_writes_a_checkpoint_between_the_every_n_epoch_ones(workdir):
    """checkpoint_every is 100: only the time rule can save epoch 3 of this run."""
    from test_resume import wait_for_checkpoint
    proc = subprocess.Popen([sys.executable, str(ENTRY), *ARGS, "--set", "checkpoint_minutes=0.0001"], cwd=workdir,
                            env=env_one_thread(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if "[VAE] epoch 3/6" in line:
                wait_for_checkpoint(workdir / "checkpoints/vae.pt", 3)
                break
    finally:
        proc.kill()
        proc.wait()


def _rank_one(torchrun: subprocess.Popen) -> int:
    """The pid of torchrun's worker with RANK=1."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"RANK=1" in env:
            return int(pid)
    raise AssertionError(f"no rank-1 worker among {children}")


def test_under_ddp_a_signal_to_one_rank_stops_every_rank_after_the_same_epoch(workdir):
    env = env_one_thread()
    cmd = TORCHRUN + [str(ENTRY), "--use_ddp", *demo_args(4, 1)]
    status, out, err = signal_when(cmd, workdir, "[VAE] epoch 1/4", [signal.SIGTERM], target=_rank_one)
    assert status != 0
    epoch = saved_epoch(err, "VAE")             # printed once: by rank 0, which got no signal itself
    assert err.count("stopped by SIGTERM (saved)") == 1
    state = torch.load(workdir / "checkpoints/vae.pt", weights_only=True)
    assert state["epoch"] == epoch >= 1 and not state["finished"] and len(state["rng"]) == 2
    result = subprocess.run(cmd + ["--resume"], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"VAE: resuming at epoch {epoch} of 4" in result.stderr
