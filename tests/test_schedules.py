"""Schedules are pure functions of the epoch; they must match the original's torch schedulers.
At stage level, the scheduled values and each logged epoch's wall time reach TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    LinearLR,
    SequentialLR,
)

from helpers.stages import conditioner_stage
from modules.config import Preset, parse_condition
from modules.distributed import DistInfo
from modules.monitor import Monitor
from modules.run import Paths, RunContext
from modules.schedules import cosine_warm_restarts, kl_weight, progressive_dropout, warmup_cosine

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def torch_lrs(make_scheduler, lr: float, epochs: int) -> list[float]:
    """The LR each epoch trains with when the scheduler is stepped once at the end of every epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def assert_close_all(ours: list[float], reference: list[float], rel=1e-9, abs_=1e-18):
    assert len(ours) == len(reference)
    for epoch, (a, b) in enumerate(zip(ours, reference)):
        assert a == pytest.approx(b, rel=rel, abs=abs_), f"epoch {epoch}: {a} != {b}"


# -----------------------------------------------------------------------------
# VAE learning rate


@pytest.mark.parametrize("epochs", [100, 10002 // 50, 7])
def test_cosine_warm_restarts_matches_torch_default(epochs):
    lr = 5e-4
    ours = [cosine_warm_restarts(e, epochs, lr) for e in range(epochs)]
    reference = torch_lrs(lambda opt: CosineAnnealingWarmRestarts(
        opt, T_0=max(1, epochs // 4), T_mult=2, eta_min=lr * 1e-4), lr, epochs)
    assert_close_all(ours, reference)
    assert ours[0] == pytest.approx(lr)
    if epochs == 100:                       # restarts at 25 and 25 + 50
        assert ours[25] == pytest.approx(lr) and ours[75] == pytest.approx(lr)
        assert ours[24] < 0.01 * lr and ours[74] < 0.01 * lr


@pytest.mark.parametrize("t0, t_mult", [(7, 1), (10, 1), (5, 3), (1, 2)])
def test_cosine_warm_restarts_explicit_period_and_multiplier(t0, t_mult):
    lr, epochs, factor = 1e-3, 100, 1e-2
    ours = [cosine_warm_restarts(e, epochs, lr, t0=t0, t_mult=t_mult, min_factor=factor)
            for e in range(epochs)]
    reference = torch_lrs(lambda opt: CosineAnnealingWarmRestarts(
        opt, T_0=t0, T_mult=t_mult, eta_min=lr * factor), lr, epochs)
    assert_close_all(ours, reference)


def test_cosine_warm_restarts_stays_between_min_and_lr():
    lr = 2e-3
    values = [cosine_warm_restarts(e, 1000, lr) for e in range(1000)]
    assert min(values) >= lr * 1e-4 and max(values) <= lr * (1 + 1e-12)


# -----------------------------------------------------------------------------
# KL weight


def test_kl_weight_start_ramp_end():
    epochs, start, end = 1000, 1e-4, 1e-2
    beta = [kl_weight(e, epochs, start, end) for e in range(epochs)]
    assert all(b == start for b in beta[:300])            # before 30 %
    assert all(b == end for b in beta[800:])              # from 80 % on
    assert beta[550] == pytest.approx((start + end) / 2)  # halfway through the ramp
    assert beta[400] == pytest.approx(start + (end - start) * 0.2)
    # linear: constant step inside the ramp
    steps = [b - a for a, b in zip(beta[300:801], beta[301:801])]
    assert max(steps) == pytest.approx(min(steps)) and min(steps) > 0
    assert all(b >= a for a, b in zip(beta, beta[1:]))    # monotone


def test_kl_weight_custom_ramp_and_short_runs():
    assert kl_weight(0, 10, 1e-3, 1e-1, ramp_start=0.0, ramp_end=0.5) == pytest.approx(1e-3)
    assert kl_weight(5, 10, 1e-3, 1e-1, ramp_start=0.0, ramp_end=0.5) == pytest.approx(1e-1)
    for epochs in (1, 2, 3):
        values = [kl_weight(e, epochs, 1e-4, 1e-2) for e in range(epochs)]
        assert all(1e-4 <= v <= 1e-2 for v in values)
        assert values == sorted(values)


def make_context(tmp_path, beta_exponent: int, overrides=()) -> RunContext:
    cfg = parse_condition(FIXTURES / "original_condition.txt", overrides=overrides)
    preset = Preset(1, beta_exponent, (64, 32, 16, 8), (16, 32, 64, 128))
    return RunContext(cfg=cfg, preset=preset, small=True, load_all=True, plot=2,
                      device=torch.device("cpu"), dist=DistInfo(), paths=Paths(tmp_path), run_id="t")


def test_preset_exponent_sets_the_kl_start(tmp_path):
    assert make_context(tmp_path, 1).beta_start == pytest.approx(1e-1)
    assert make_context(tmp_path, 3).beta_start == pytest.approx(1e-3)
    assert make_context(tmp_path, 5).beta_start == pytest.approx(1e-5)
    # k = 0 keeps the config's start (default 1e-4, or whatever the config says)
    assert make_context(tmp_path, 0).beta_start == pytest.approx(1e-4)
    assert make_context(tmp_path, 0, ["beta_start=2e-3"]).beta_start == pytest.approx(2e-3)
    # the preset wins over the config key when k > 0
    assert make_context(tmp_path, 2, ["beta_start=2e-3"]).beta_start == pytest.approx(1e-2)
    ctx = make_context(tmp_path, 3)
    assert kl_weight(0, 100, ctx.beta_start, ctx.cfg.vae.beta_end) == pytest.approx(1e-3)


# -----------------------------------------------------------------------------
# conditioner learning rate


@pytest.mark.parametrize("epochs", [60, 11, 200])
def test_warmup_cosine_matches_torch_linear_then_cosine(epochs):
    """The spec is the original's torch pair, LinearLR(0.01, 10 epochs) then
    CosineAnnealingLR(T_max=epochs-10, eta_min=1e-8), stepped once per epoch. It reaches
    lr_min at step `epochs`, i.e. right after the last epoch; the last epoch itself trains
    at one cosine step above lr_min (tiny, but not exactly lr_min)."""
    lr, warmup, lr_min = 1e-3, 10, 1e-8
    ours = [warmup_cosine(e, epochs, lr) for e in range(epochs + 1)]
    reference = torch_lrs(lambda opt: SequentialLR(opt, [
        LinearLR(opt, start_factor=0.01, total_iters=warmup),
        CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=lr_min)], milestones=[warmup]),
        lr, epochs + 1)
    assert_close_all(ours, reference, rel=1e-9, abs_=1e-15)
    assert ours[0] == pytest.approx(0.01 * lr)
    assert ours[warmup] == pytest.approx(lr)
    assert all(b > a for a, b in zip(ours[:warmup], ours[1:warmup + 1]))     # warm-up rises
    assert all(b < a for a, b in zip(ours[warmup:], ours[warmup + 1:]))      # then decays
    last = lr_min + (lr - lr_min) * (1 - math.cos(math.pi / (epochs - warmup))) / 2
    assert ours[epochs - 1] == pytest.approx(last)
    assert ours[epochs] == pytest.approx(lr_min)


def test_warmup_cosine_linear_warmup_values():
    lr = 2e-3
    for e in range(10):
        assert warmup_cosine(e, 100, lr) == pytest.approx(lr * (0.01 + 0.99 * e / 10))
    assert warmup_cosine(0, 100, lr, warmup=4, warmup_start=0.1) == pytest.approx(0.1 * lr)
    assert warmup_cosine(4, 100, lr, warmup=4, warmup_start=0.1) == pytest.approx(lr)


def test_warmup_cosine_without_warmup_starts_at_lr():
    assert warmup_cosine(0, 50, 1e-3, warmup=0) == pytest.approx(1e-3)
    assert warmup_cosine(50, 50, 1e-3, warmup=0, lr_min=1e-6) == pytest.approx(1e-6)


# -----------------------------------------------------------------------------
# progressive dropout


def test_progressive_dropout_linear_from_point_three_to_point_one():
    epochs = 101
    rates = [progressive_dropout(e, epochs) for e in range(epochs)]
    assert rates[0] == pytest.approx(0.3)
    assert rates[-1] == pytest.approx(0.1)
    assert rates[50] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert max(steps) == pytest.approx(min(steps)) and max(steps) < 0
    assert progressive_dropout(0, 20, start=0.5, end=0.0) == pytest.approx(0.5)
    assert progressive_dropout(19, 20, start=0.5, end=0.0) == pytest.approx(0.0)


def test_progressive_dropout_single_epoch():
    assert 0.1 <= progressive_dropout(0, 1) <= 0.3


# -----------------------------------------------------------------------------
# what a stage logs


def test_each_logged_epoch_writes_its_schedule_and_wall_time_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ctx, trainer = conditioner_stage(tmp_path, ["n_epoch=3", "log_every=1"])
    ctx.monitor = Monitor(tmp_path / "tb", True)
    trainer.fit()
    ctx.monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"conditioner/lr", "conditioner/train_loss", "conditioner/val_loss", "conditioner/epoch_time_s"} <= tags
    lrs = events.Scalars("conditioner/lr")
    assert [e.value for e in lrs] == pytest.approx(trainer.history["lr"], rel=1e-6)
    times = events.Scalars("conditioner/epoch_time_s")
    assert [e.step for e in times] == [1, 2, 3]
    assert all(e.value > 0 for e in times)
    # The epochs' times add up to the stage's recorded training time.
    assert sum(e.value for e in times) == pytest.approx(trainer.seconds, rel=1e-5)
    assert "epoch_time_s" not in trainer.history        # the history stays free of timings


def test_plain_progress_lines_keep_the_latest_validation_value(capsys):
    """In a log (not a terminal) a line every log_every epochs; validation values, which come
    only every few epochs, stay on the lines in between with their latest value."""
    from modules.monitor import Progress

    progress = Progress("vae", 0, 20, True, 5)
    progress.update(0, {"loss": 2.0, "val": 1.5})
    for epoch in range(1, 10):
        progress.update(epoch, {"loss": 1.0 - epoch / 100})
    progress.update(10, {"loss": 0.5, "val": 0.25})
    for epoch in range(11, 20):
        progress.update(epoch, {"loss": 0.4})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["1/20", "5/20", "10/20", "15/20", "20/20"]
    assert "loss=2.0000 val=1.5000" in lines[0]
    assert "loss=0.9600 val=1.5000" in lines[1] and "loss=0.9100 val=1.5000" in lines[2]
    assert "val=0.2500" in lines[3] and "val=0.2500" in lines[4] and "loss=0.4000" in lines[4]


def test_terminal_progress_bar_shows_epoch_losses_beta_lr_and_eta(monkeypatch):
    import io
    import sys

    from modules.monitor import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("COLUMNS", "200")
    progress = Progress("vae", 0, 50, True, 10)
    for epoch in range(3):
        progress.update(epoch, {"loss": 1.25, "val_recon": 0.5, "beta": 1e-4, "lr": 1e-3})
    progress.close()
    final = screen.getvalue().split("\r")[-1]
    assert "vae" in final and "3/50" in final and "epoch" in final
    assert "loss=1.25" in final and "vrec=0.5" in final and "beta=0.0001" in final and "lr=0.001" in final
    assert "<" in final               # tqdm's elapsed<remaining: the ETA


def test_terminal_progress_bar_fits_the_terminal_width(monkeypatch):
    """tqdm cuts a line at the terminal's edge: the bar shows the fields that fit, the
    first (the loss) always, with a bar of at least 5 characters. A real pseudo-terminal of
    80 and of 120 columns."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import sys
    import termios

    from modules.monitor import Progress

    shown = {}
    for columns in (80, 120):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        with os.fdopen(slave, "w") as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            progress = Progress("conditioner", 0, 1000, True, 10)
            for epoch in range(3):
                progress.update(epoch, {"loss": 1234.5678, "val": 0.000123456, "recon": 0.5, "beta": 1e-4,
                                        "lr": 1e-3, "dropout": 0.05})
            progress.close()
            terminal.flush()
            chunks = []
            while select.select([master], [], [], 0)[0]:
                chunks.append(os.read(master, 1 << 16))
            screen = b"".join(chunks).decode()
        os.close(master)
        lines = [line.rstrip() for line in screen.replace("\n", "\r").split("\r") if line.strip()]
        assert lines and all(len(line) < columns for line in lines), (columns, lines)
        assert "loss=1.23e+03" in lines[-1] and "<" in lines[-1] and "|     " in lines[-1]
        shown[columns] = lines[-1].split(", ")[2:]
    names = ["loss", "val", "rec", "beta", "lr", "drop"]     # shorter keys; the leading fields that fit
    assert [f.split("=")[0] for f in shown[80]] == names[:len(shown[80])]
    assert [f.split("=")[0] for f in shown[120]] == names[:len(shown[120])] and len(shown[120]) > len(shown[80])


def test_plain_progress_lines_come_at_least_every_interval(capsys):
    """A line every log_every epochs or, when epochs are slow, once `interval` seconds have
    passed since the last line (here 0 s: every epoch)."""
    from modules.monitor import Progress

    for interval, expected in ((60.0, ["1/30", "10/30", "20/30", "30/30"]), (0.0, [f"{e}/30" for e in range(1, 31)])):
        progress = Progress("vae", 0, 30, True, 10, interval=interval)
        for epoch in range(30):
            progress.update(epoch, {"loss": 1.0})
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[2] for line in lines] == expected


def test_a_resumed_writer_marks_the_steps_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    """The interrupted run logged epochs 1-4 after a checkpoint at epoch 2; the resumed run's
    event file starts with a purge marker at step 3, so each step is shown once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    first = Monitor(tmp_path, True)
    for step in range(1, 5):
        first.scalars("vae", step, {"loss": 10.0 + step})
    first.close()
    resumed = Monitor(tmp_path, True)
    resumed.text("config", "x")                 # a writer opened before the stage resumes
    resumed.resume_from(3)
    for step in range(3, 6):
        resumed.scalars("vae", step, {"loss": float(step)})
    resumed.close()
    files = sorted(tmp_path.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load()
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts == [3]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("vae/loss")] == [(1, 11.0), (2, 12.0), (3, 3.0), (4, 4.0), (5, 5.0)]
