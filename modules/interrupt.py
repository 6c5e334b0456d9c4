"""Ctrl-C and SIGTERM in every stage: finish the unit of work, save, then stop.

The first SIGINT or SIGTERM only sets a flag. The epoch loop (modules/stage.py) looks at
it after every epoch (all-reduced under DDP, so every rank stops after the same epoch),
writes the resumable checkpoint and raises `Stopped`; the loops without epochs (the GP's
columns, the networks' steps, the baseline, an import: modules/progress.py) look at it after
every unit and raise `Stopped` with the line `set_stage` gave for what `--resume` will redo.
The command line prints that one line and exits with 128 + the signal number (130 / 143).
A second signal stops at once (KeyboardInterrupt); the message then names only the
checkpoint this run is known to have completely written, if any.

torchrun starts its workers in their own sessions: a Ctrl-C reaches torchrun, which
forwards the signal to every worker and kills them 30 s later if they are still running.
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Stopped(Exception):
    """Training stopped on a signal after saving; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class _Saved:
    path: Path
    title: str
    epoch: int
    epochs: int
    finished: bool


class _State:
    signum: int | None = None          # the first signal received
    count: int = 0
    saved: _Saved | None = None        # the last checkpoint this process wrote or restored
    installed: bool = False
    stage: tuple[str, str] | None = None   # the stage without epochs now running, and what a stop keeps and redoes


_state = _State()


def _handler(signum, frame) -> None:
    _state.count += 1
    if _state.signum is None:
        _state.signum = signum
    if _state.count >= 2:
        raise KeyboardInterrupt        # the second signal: stop at once
    if os.environ.get("RANK", "0") == "0":
        # os.write, not logging or print: the signal may have interrupted either mid-write
        where = f"the current {_state.stage[0]} step" if _state.stage else "this epoch"
        os.write(2, f"{_NAMES.get(signum, signum)}: saving and stopping at the end of {where} "
                    f"(send it again to stop at once)\n".encode())


def install() -> None:
    """Catch SIGINT and SIGTERM from now on (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _NAMES:
        signal.signal(sig, _handler)
    _state.installed = True


def reset() -> None:
    _state.signum, _state.count, _state.saved, _state.stage = None, 0, None, None


def set_stage(title: str | None, redo: str = "") -> None:
    """Name the stage without epochs that runs now (None: none) and what `--resume` does after a stop in it."""
    _state.stage = None if title is None else (title, redo)


def stop_if_requested() -> None:
    """After a first signal, in a stage without epochs: raise `Stopped` with the stage's line."""
    if _state.signum is None:
        return
    title, redo = _state.stage or ("this stage", "")
    raise Stopped(f"stopped by {signal_name()} during the {title}: {redo or resume_hint()}.", exit_code())


def requested() -> bool:
    return _state.signum is not None


def signal_number() -> int:
    """The first signal received, 0 if none."""
    return int(_state.signum or 0)


def adopt(signum: int) -> None:
    """Take over another rank's signal (DDP), so every rank stops and reports alike."""
    if signum and _state.signum is None:
        _state.signum = signum


def exit_code(default: int = 130) -> int:
    return 128 + _state.signum if _state.signum is not None else default


def signal_name() -> str:
    return _NAMES.get(_state.signum, "a signal") if _state.signum is not None else "Ctrl-C"


def note_saved(path: Path, title: str, epoch: int, epochs: int, finished: bool) -> None:
    """Record the checkpoint just written completely (or restored): the only one a message may name."""
    _state.saved = _Saved(Path(path), title, epoch, epochs, finished)


def resume_hint() -> str:
    """Where `--resume` continues, from what this process knows it saved."""
    s = _state.saved
    if s is None:
        return "no checkpoint was written by this run; start it again (without --resume)"
    if s.finished:
        return (f"the {s.title} is finished in {s.path}; --resume continues with the stage after it")
    return f"{s.path} holds the {s.title} after epoch {s.epoch} of {s.epochs}; --resume continues from there"


def stop_message(saved_now: bool) -> str:
    how = "saved" if saved_now else "the checkpoint was already up to date"
    return f"stopped by {signal_name()} ({how}): {resume_hint()}."


def interrupted_message() -> str:
    """The line for a stop without a save (a second signal, or one outside the epoch loop)."""
    return f"interrupted by {signal_name()}, stopped at once: {resume_hint()}."
