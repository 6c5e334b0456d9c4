"""Earlier runs' checkpoints: a fresh run never deletes another run's finished model.

checkpoints/ holds the current run. A fresh run first moves the files there to
checkpoints/history/<run-id>/ (with archive.json: the run id, whether it held a finished
model, when it was archived); a conditioner run on the saved VAE (`--lc_only=1`) first keeps a
copy of them there (hard links: the files are never changed in place, only replaced), so the
model it replaces stays one `--run` away. A run's id is its conditioner's run (the one
`--lc_only=1` prints), else its VAE's. The history keeps at most `keep_runs` runs; beyond that it
drops unfinished runs first (oldest first), and a finished run only when more than
`keep_runs` finished runs are kept, so a finished model is never dropped for an
unfinished one. `--run RUN_ID` picks an archived run: prediction reads it where it lies,
training (`--lc_only=1`, `--resume`) first makes it the current run again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from modules.checkpoint import save_json
from modules.errors import UserError
from modules.run import Paths

log = logging.getLogger("simulgen")

MARKER = "archive.json"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith("."))


def _state(path: Path) -> dict | None:
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:           # unreadable or not ours: the archive is kept, marked unfinished
        return None
    return state if isinstance(state, dict) else None


def describe(folder: Path) -> dict:
    """The run id of the checkpoints in `folder` (the conditioner's run, else the VAE's) and
    whether they make a finished model (a finished VAE and conditioner)."""
    vae, cond = _state(folder / "vae.pt"), _state(folder / "conditioner.pt")
    run_id = None
    for state in (cond, vae):
        run = state.get("run") if state else None
        if isinstance(run, dict) and isinstance(run.get("run_id"), str):
            run_id = run_id or run["run_id"]
    finished = bool(vae and vae.get("finished") and cond and cond.get("finished"))
    return {"run_id": run_id, "finished": finished}


def current_run_id(paths: Paths) -> str | None:
    return describe(paths.checkpoints)["run_id"] if (paths.checkpoints / "vae.pt").is_file() else None


def archive_current(paths: Paths, keep: int, copy: bool = False) -> Path | None:
    """Move checkpoints/'s files to history/<run-id>/ (`copy`: link them there, keeping them current); prune
    the history to `keep` runs."""
    files = _files(paths.checkpoints)
    if not files:
        return None
    info = describe(paths.checkpoints)
    name = info["run_id"] or time.strftime("unknown-%Y%m%d-%H%M%S", time.localtime(max(f.stat().st_mtime for f in files)))
    dest, n = paths.history / name, 1
    while dest.exists():
        n += 1
        dest = paths.history / f"{name}-{n}"
    dest.mkdir(parents=True)
    for f in files:
        if not copy:
            f.rename(dest / f.name)
            continue
        try:
            os.link(f, dest / f.name)
        except OSError:                 # a file system without hard links
            shutil.copy2(f, dest / f.name)
    save_json(dest / MARKER, {**info, "archived_at": time.strftime("%Y-%m-%d %H:%M:%S"), "archived_ns": time.time_ns()})
    log.info("%s the previous run's checkpoints (%s, %s) %s %s", "kept" if copy else "moved", name,
             "finished" if info["finished"] else "unfinished", "as a copy in" if copy else "to", dest)
    prune(paths, keep)
    return dest


def archived(paths: Paths) -> list[tuple[Path, dict]]:
    """The archived runs, oldest first."""
    if not paths.history.is_dir():
        return []
    out = []
    for folder in paths.history.iterdir():
        if folder.is_dir():
            try:
                info = json.loads((folder / MARKER).read_text())
            except (OSError, ValueError):
                info = {"finished": False}
            out.append((folder, info))
    return sorted(out, key=lambda item: (item[1].get("archived_ns", 0), item[0].stat().st_mtime_ns))


def prune(paths: Paths, keep: int) -> None:
    runs = archived(paths)
    drop = [r for r in runs if not r[1].get("finished")][:max(0, len(runs) - keep)]
    kept = [r for r in runs if r not in drop]
    drop += [r for r in kept if r[1].get("finished")][:max(0, len(kept) - keep)]
    for folder, info in drop:
        shutil.rmtree(folder)
        log.info("dropped the archived %s run %s (keep_runs %d)",
                 "finished" if info.get("finished") else "unfinished", folder.name, keep)


def _available(paths: Paths) -> str:
    names = [f"{folder.name} ({'finished' if info.get('finished') else 'unfinished'})" for folder, info in archived(paths)]
    current = current_run_id(paths)
    if current:
        names.append(f"{current} (current, in {paths.checkpoints})")
    return ", ".join(names) or "none"


def locate(paths: Paths, run_id: str) -> Path:
    """The checkpoint folder of run `run_id`: checkpoints/ when it is the current run."""
    if current_run_id(paths) == run_id:
        return paths.checkpoints
    folder = paths.history / run_id
    if "/" in run_id or "\\" in run_id or run_id in ("", ".", "..") or not folder.is_dir():
        raise UserError(f"--run {run_id}: no such run in {paths.history}; runs kept: {_available(paths)}.")
    return folder


def restore(paths: Paths, run_id: str, keep: int) -> None:
    """Make run `run_id` the current one (archiving the current run first)."""
    folder = locate(paths, run_id)
    if folder == paths.checkpoints:
        return
    archive_current(paths, keep + 1)        # the run about to leave the history still counts
    for f in _files(folder):
        if f.name != MARKER:
            f.rename(paths.checkpoints / f.name)
    shutil.rmtree(folder)
    log.info("run %s is the current run again (in %s)", run_id, paths.checkpoints)


def check_current_finished(paths: Paths) -> None:
    """Prediction from checkpoints/: a one-line UserError when the current run there is unfinished, naming
    `--resume` and the finished runs kept in the history (`--run`)."""
    def ours(path: Path) -> bool:
        state = _state(path) if path.is_file() else None
        return state is not None and {"kind", "finished", "run"} <= state.keys()
    cond = paths.checkpoints / "conditioner.pt"
    if not ours(paths.vae) or (cond.is_file() and not ours(cond)):
        return                  # nothing there, or not ours: the checkpoint loader's own message says what to do
    info = describe(paths.checkpoints)
    if info["finished"]:
        return
    kept = [folder.name for folder, meta in archived(paths) if meta.get("finished")]
    others = (f"; or predict with a finished earlier run: --run {kept[-1]} (kept: {', '.join(kept)})" if kept
              else "; no finished earlier run is kept in the history")
    raise UserError(f"{paths.checkpoints} holds the unfinished run {info['run_id']}: finish it with --resume"
                    f"{others}.")
