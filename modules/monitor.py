"""Progress you can watch: tqdm bars on a terminal, plain lines in a log, TensorBoard.

Every helper here checks the rank itself: only rank 0 prints progress and writes events.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("simulgen")


class Monitor:
    def __init__(self, run_dir: Path | None, is_main: bool, log_every: int = 10):
        self.run_dir = run_dir
        self.is_main = is_main and run_dir is not None
        self.log_every = max(1, log_every)
        self._writer = None
        self._purge_step: int | None = None

    @property
    def writer(self):
        if self._writer is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter   # slow import: only when used
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self._purge_step)
        return self._writer

    def resume_from(self, step: int) -> None:
        """A resumed run: the next event file starts with a purge marker at `step`, so
        TensorBoard drops the interrupted run's events from `step` on (logged after its last
        checkpoint) instead of showing two values per step. The marker drops every tag's
        events from `step` on, so it is only for the first stage of a run (the VAE)."""
        self.close()
        self._purge_step = step

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{stage}/{key}", value, step)

    def text(self, tag: str, text: str) -> None:
        if self.is_main:
            self.writer.add_text(tag, text.replace("\n", "  \n"))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def progress(self, stage: str, first_epoch: int, epochs: int) -> "Progress":
        return Progress(stage, first_epoch, epochs, self.is_main, self.log_every)


# shorter names on the terminal bar, which must fit on one line
_BAR_NAMES = {"dropout": "drop", "recon": "rec", "val_recon": "vrec", "grad_norm": "gnorm"}


class Progress:
    """A tqdm bar per stage on a terminal; otherwise a plain line every `log_every` epochs,
    or after an epoch that ends `interval` seconds or more after the last line."""

    def __init__(self, stage: str, first_epoch: int, epochs: int, enabled: bool, log_every: int,
                 interval: float | None = None):
        from modules.progress import interval as default_interval
        self.stage, self.epochs, self.enabled, self.log_every = stage, epochs, enabled, log_every
        self.first_epoch = first_epoch
        self.interval = default_interval() if interval is None else interval
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        self.shown: dict[str, str] = {}     # the latest value of every field (validation runs only now and then)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=epochs, initial=first_epoch, desc=stage, unit="epoch",
                            dynamic_ncols=True, leave=True)

    def update(self, epoch: int, values: dict[str, float]) -> None:
        """`epoch` is 0-based and just finished."""
        if not self.enabled:
            return
        self.shown.update({k: _fmt(v) for k, v in values.items()})
        text = self.shown
        if self.bar is not None:
            self._fit_postfix({_BAR_NAMES.get(k, k): _short(v) for k, v in values.items()})
            self.bar.update(1)
            return
        done = epoch + 1
        now = time.perf_counter()
        if (done % self.log_every == 0 or done == self.epochs or done == self.first_epoch + 1
                or now - self.last_line >= self.interval):
            self.last_line = now
            elapsed = now - self.started
            rate = (done - self.first_epoch) / elapsed if elapsed > 0 else 0.0
            eta = (self.epochs - done) / rate if rate > 0 else 0.0
            fields = " ".join(f"{k}={v}" for k, v in text.items())
            print(f"[{self.stage}] epoch {done}/{self.epochs} {fields} eta={_duration(eta)}", flush=True)

    def batches(self, epoch: int, batches, count: int):
        """`batches` of the 0-based `epoch`, with a plain line whenever `interval` seconds pass inside a long
        epoch (no bar: the bar shows epochs)."""
        for done, batch in enumerate(batches, start=1):
            yield batch
            now = time.perf_counter()
            if self.enabled and self.bar is None and now - self.last_line >= self.interval:
                self.last_line = now
                print(f"[{self.stage}] epoch {epoch + 1}/{self.epochs} batch {done}/{count}", flush=True)

    def _fit_postfix(self, values: dict[str, str]) -> None:
        """Keep the fields (latest values, in order) that fit on one terminal line with a bar
        of at least 5 characters; tqdm would otherwise cut the line at the terminal's edge."""
        from tqdm.utils import disp_len
        self.bar_values = {**getattr(self, "bar_values", {}), **values}
        width = self.bar.format_dict["ncols"] or shutil.get_terminal_size((80, 24)).columns - 1   # tqdm's width
        kept: dict[str, str] = {}
        for key, value in self.bar_values.items():
            self.bar.set_postfix({**kept, key: value}, refresh=False)
            meter = self.bar.format_meter(**{**self.bar.format_dict, "ncols": None, "n": self.bar.n + 1})
            if disp_len(meter) - 5 > width:       # measured with tqdm's default 10-character bar
                break
            kept[key] = value
        self.bar.set_postfix(kept, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
