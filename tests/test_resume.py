"""Nothing is lost on a crash: SIGKILL a real run, --resume it, get the same weights."""
import hashlib
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


def kill_when(workdir, marker: str, delay: float = 0.0, saved_epoch: int | None = None) -> tuple[int, str]:
    """Start a run, SIGKILL it `delay` seconds after `marker` appears on its stdout (with
    `saved_epoch`: after checkpoints/vae.pt also holds that epoch); return the exit status
    and everything the run printed before it died."""
    proc = subprocess.Popen([sys.executable, str(ENTRY), *ARGS], cwd=workdir, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if marker in line:
                if saved_epoch is not None:
                    wait_for_checkpoint(workdir / "checkpoints/vae.pt", saved_epoch)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        code = proc.wait(timeout=300)
        printed.append(proc.stdout.read())
        return code, "".join(printed)
    finally:
        proc.kill()


def wait_for_checkpoint(path, epoch: int, timeout: float = 120) -> None:
    """Until `path` (replaced atomically by each save) holds `epoch`; read only when it changed."""
    deadline, seen = time.time() + timeout, None
    while time.time() < deadline:
        stat = path.stat()
        if (stat.st_ino, stat.st_mtime_ns) != seen:
            seen = (stat.st_ino, stat.st_mtime_ns)
            if torch.load(path, weights_only=True)["epoch"] == epoch:
                return
        time.sleep(0.005)
    raise AssertionError(f"{path} never held epoch {epoch}")


def tree(workdir) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under checkpoints/ and runs/."""
    return {p.relative_to(workdir).as_posix(): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("checkpoints", "runs") for p in sorted((workdir / top).rglob("*"))}


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
    assert_config_printed_once(result.stdout)
    return final_state(work)


def assert_config_printed_once(stdout: str) -> None:
    """The fully resolved configuration is printed once: every key, once, section by section,
    with the values of this run (its --set overrides included)."""
    from modules.config import FIELDS
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("  config: ")]
    assert len(starts) == 1, stdout[:3000]
    block = [lines[starts[0]][len("  config: "):]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    assert all(len(line) <= 100 for line in lines[starts[0]:starts[0] + len(block)])
    pairs = [item.split("=", 1) for line in block for item in line.split()]
    assert [k for k, _ in pairs] == list(FIELDS)
    values = dict(pairs)
    assert values["Training_epochs"] == "6" and values["Batch_size"] == "2" and values["use_ema"] == "1"
    assert values["input_type"] == "csvs" and values["param_dir"] == "/input_data/params.csv"


@pytest.mark.parametrize("marker,delay,saved_epoch", [
    ("[VAE] epoch 3/6", 0.0, None),           # at an epoch boundary (just after epoch 3)
    ("[VAE] epoch 4/6", 0.05, 4),             # inside epoch 5, after the epoch-4 checkpoint
    ("[conditioner] epoch 3/5", 0.0, None),   # during the conditioner stage
], ids=["vae-epoch-boundary", "vae-mid-epoch", "conditioner"])
def test_killed_run_resumes_to_the_same_weights_bitwise(tmp_path, reference, marker, delay, saved_epoch):
    work = demo_workdir(tmp_path / "work")
    code, printed = kill_when(work, marker, delay, saved_epoch)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted = torch.load(work / "checkpoints/vae.pt", weights_only=True)
    if marker.startswith("[VAE]"):
        assert not interrupted["finished"]
    if saved_epoch is not None:     # killed inside epoch 5: after the epoch-4 checkpoint, before epoch 5 ended
        assert interrupted["epoch"] == saved_epoch
        assert f"[VAE] epoch {saved_epoch + 1}/6" not in printed, "the kill came after epoch 5 had finished"
    result = run_cli(work, *ARGS, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming at epoch" in result.stderr
    # One run folder: the resumed run continues the interrupted one.
    assert len(list((work / "runs").iterdir())) == 1
    assert_same(reference, final_state(work))
    if marker.startswith("[VAE]"):
        assert_tensorboard_steps_once(work, interrupted["epoch"])


def assert_tensorboard_steps_once(work, saved_epoch: int) -> None:
    """The resumed run's event file starts with a purge marker at the first epoch after the
    checkpoint, so TensorBoard shows each VAE epoch once (log_every=1: the interrupted run
    had logged epochs after its checkpoint too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    run_dir = next((work / "runs").iterdir())
    files = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) >= 2
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load()
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts == [saved_epoch + 1]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("vae/train_loss")] == list(range(1, 7))


def test_resume_refuses_a_checkpoint_of_another_architecture(workdir):
    code, _ = kill_when(workdir, "[VAE] epoch 1/6")
    assert code == -signal.SIGKILL
    before = tree(workdir)
    assert "checkpoints/vae.pt" in before and any(k.endswith("/config.json") for k in before)
    result = run_cli(workdir, *ARGS, "--set", "Latent_dim_end=16", "--resume")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "different architecture" in lines[-1] and "latent_dim_end" in lines[-1]
    assert "Traceback" not in result.stderr
    # Nothing of the interrupted run changed: not its checkpoints, not its run folder (config.json, events).
    assert tree(workdir) == before


def test_conditioner_resume_refuses_a_checkpoint_of_another_split(tmp_path):
    """ConditionerTrainer itself checks the saved split on resume (as the VAE trainer does)."""
    from dataclasses import replace

    from helpers.context import ROOT, demo_context
    from modules.errors import UserError
    from modules.train_conditioner import ConditionerData, ConditionerInputs, ConditionerTrainer
    keys = ["input_type=csvs", "param_dir=/input_data/params.csv", "csv_conditioner=mlp", "n_epoch=2"]
    ctx, _, train_idx, val_idx = demo_context(tmp_path, keys)
    params = np.loadtxt(ROOT / "input_data/params.csv", delimiter=",", dtype=np.float32)
    rng = np.random.default_rng(0)
    latents = (rng.normal(size=(80, ctx.cfg.vae.Latent_dim_end)).astype(np.float32),
               rng.normal(size=(80, 3, 8)).astype(np.float32))
    data = ConditionerData.build(ConditionerInputs(params, []), *latents, ctx.device)
    ConditionerTrainer(ctx, data, train_idx, val_idx, vae_run_id="v").fit()
    saved = ctx.paths.conditioner.read_bytes()
    same = ConditionerTrainer(replace(ctx, resume=True), data, train_idx, val_idx, vae_run_id="v")
    same.fit()                                         # the same split: restored (finished, nothing to do)
    assert same.finished and same.best_val < float("inf")
    other_ctx, _, other_train, other_val = demo_context(tmp_path, [*keys, "seed=7"])
    assert not np.array_equal(other_val, val_idx)
    other = ConditionerTrainer(replace(other_ctx, resume=True), data, other_train, other_val, vae_run_id="v")
    with pytest.raises(UserError, match="conditioner.pt used another train/validation split"):
        other.fit()
    assert ctx.paths.conditioner.read_bytes() == saved


# The child's second save goes through the real atomic_write and torch.save into the real
# temporary file, on a slow disk: 1 MiB pieces with a pause after each (about 2 s for 32 MB),
# so the kill lands while the checkpoint is being written, not before or after.
_SLOW_SAVE = """
import io, sys, time, torch
sys.path.insert(0, {root!r})
from modules.checkpoint import atomic_write, save_torch

class SlowDisk(io.RawIOBase):
    def __init__(self, f):
        self.f, self.pieces = f, 0
    def writable(self):
        return True
    def write(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 1 << 20):
            self.f.write(view[start:start + (1 << 20)])
            self.f.flush()
            self.pieces += 1
            if self.pieces == 2:
                print("writing", flush=True)
            time.sleep(0.05)
        return len(view)

save_torch({{"version": 1, "w": torch.arange(10.)}}, {target!r})
print("saved", flush=True)
atomic_write({target!r}, lambda f: torch.save({{"version": 2, "w": torch.zeros({n})}}, SlowDisk(f)))
print("replaced", flush=True)
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "state.pt"
    n = 8_000_000                                    # 32 MB of float32
    script = _SLOW_SAVE.format(root=str(ENTRY.parent), target=str(target), n=n)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert "replaced" not in proc.stdout.read()
    partial = list(tmp_path.glob(".state.pt.*.tmp"))
    assert len(partial) == 1, "the second save should have been under way"
    assert 0 < partial[0].stat().st_size < 4 * n, "the kill should have come in the middle of the write"
    from modules.checkpoint import load_torch
    state = load_torch(target, "checkpoint", "retrain")
    assert state["version"] == 1 and torch.equal(state["w"], torch.arange(10.))


def test_a_write_that_cannot_happen_is_a_clear_error_naming_the_path(tmp_path):
    from modules.checkpoint import save_torch
    from modules.errors import UserError
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError) as exc:
        save_torch({"w": torch.zeros(3)}, tmp_path / "a_file" / "sub" / "c.pt")
    message = str(exc.value)
    assert "\n" not in message and f"cannot write {tmp_path / 'a_file' / 'sub' / 'c.pt'}" in message
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in message
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    from modules.checkpoint import load_torch, save_torch
    from modules.errors import UserError
    path = save_torch({"w": torch.randn(1000)}, tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_torch(path, "VAE checkpoint", "retrain it")


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Checkpoints, .npz, JSON and figures all go through atomic_write: 0666 minus the umask,
    as open() would create them (mkstemp alone gives 0600)."""
    import os
    import stat

    from modules.checkpoint import save_json, save_npz, save_torch
    old = os.umask(umask)
    try:
        written = [save_torch({"w": torch.zeros(2)}, tmp_path / "c.pt"), save_npz(tmp_path / "a.npz", x=np.zeros(2)),
                   save_json(tmp_path / "s.json", {"a": 1}), save_json(tmp_path / "s.json", {"a": 2})]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
