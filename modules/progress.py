"""Long loops outside the epoch loop (the GP's columns, the networks' steps, the classical
baseline, an import): a plain line at least every `INTERVAL` seconds with what, how far and an
ETA, and the stop rule of modules/interrupt.py at every step: after a first Ctrl-C or SIGTERM,
the loop ends its current unit of work and raises `interrupt.Stopped`, whose line says what
`--resume` will redo (`interrupt.set_stage`)."""
from __future__ import annotations

import logging
import os
import time

from modules import interrupt

log = logging.getLogger("simulgen")

INTERVAL = 30.0             # seconds between progress lines at most (SIMULGEN_PROGRESS_SECONDS overrides it)


def interval() -> float:
    return float(os.environ.get("SIMULGEN_PROGRESS_SECONDS", INTERVAL))


class Ticker:
    """`tick(done)` after each unit of `total`: a line when INTERVAL has passed since the last, and a stop
    after a signal."""

    def __init__(self, what: str, total: int, unit: str = "step") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.started = self.last = time.monotonic()

    def tick(self, done: int, detail=None) -> None:
        """`detail`: a callable giving more of the line (called only when a line is due)."""
        interrupt.stop_if_requested()
        now = time.monotonic()
        if now - self.last >= interval():
            self.last = now
            eta = (now - self.started) / max(done, 1) * (self.total - done)
            log.info("%s: %s %d of %d%s, eta %s", self.what, self.unit, done, self.total,
                     f", {detail()}" if detail else "", duration(eta))


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"
