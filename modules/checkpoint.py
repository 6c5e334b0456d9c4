"""Atomic writes, safe loading and RNG state: nothing saved is lost to a crash.

Every file the tool writes goes through `atomic_write`: a temporary file in the same
folder, flushed and fsync'ed, then `os.replace`d over the target, so a crash mid-save
leaves the previous version intact. Checkpoints are loaded with `weights_only=True` and
hold only tensors and plain Python values; arrays go to `.npz` files without pickles.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from modules.errors import UserError


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write `path` through `write(fileobj)` so that it is either complete or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(path: str | Path, obj: Any) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_torch(path: str | Path, what: str, how_to_make: str) -> dict:
    """Load a checkpoint with weights_only=True; any damage is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; {how_to_make}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcode, disallowed global, ...
        text = " ".join(str(exc).split())
        reason = (text.split(". ")[0].rstrip(".") if text else type(exc).__name__)[:160]
        raise UserError(f"{what} {path} is truncated or corrupt ({reason}); delete it and {how_to_make}.") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} does not hold a SimulGenVAE checkpoint; delete it and {how_to_make}.")
    return obj


def load_npz(path: str | Path, what: str, how_to_make: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; {how_to_make}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{what} {path} is truncated or corrupt ({exc}); delete it and {how_to_make}.") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise UserError(f"{what} {path} lacks {', '.join(missing)}; delete it and {how_to_make}.")
    return arrays


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# --- RNG state ------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG this process draws from, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
