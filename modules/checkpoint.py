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
    """Write `path` through `write(fileobj)` so that it is either complete or untouched.

    A failing write (no space, no permission, a file where a folder should be) is a one-line
    UserError naming the path; the previous version of the file, if any, is kept."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({_why_not_writable(path.parent, exc)}); make its folder "
                        f"writable (or free disk space) and run again.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; give the file the mode open() would: 0666 minus the umask
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path} ({exc.strerror or exc}); the previous version of the file, if "
                            f"any, is unchanged: free disk space or make its folder writable, then run again.") from None
        raise
    return path


def write_together(files: dict[Path, Callable[[io.BufferedWriter], None]]) -> list[Path]:
    """Write several files as one: each to a temporary file beside it first (mode 0666 minus the umask), then
    all renamed into place in the given order (put the file that describes the others last). A failing write
    is a one-line UserError and leaves every earlier version untouched."""
    staged: dict[Path, str] = {}
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, staged[path] = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in staged.items():
            os.replace(tmp, path)
        return list(files)
    except OSError as exc:
        where = next((p for p, t in staged.items() if os.path.exists(t)), next(iter(files), Path(".")))
        raise UserError(f"cannot write {where} ({_why_not_writable(where.parent, exc)}); nothing was replaced: "
                        f"free disk space or make its folder writable, then run again.") from None
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)      # a brief window in which another thread's new file gets 022
    os.umask(mask)
    return mask


def ensure_writable(folders: list[Path], what: str, fix: str) -> None:
    """Check that every folder in `folders` exists or can be created and takes a new file;
    otherwise a one-line UserError '<what>: cannot write to <folder> (<why>); <fix>.'

    First, without creating anything, that no path on the way is a regular file; then each
    folder is created (if missing) and a probe file written in it and removed again."""
    for folder in folders:
        blocker = _file_in_the_way(folder)
        if blocker is not None:
            raise UserError(f"{what}: cannot write to {folder} ({blocker} is a file, not a folder); {fix}.")
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"{what}: cannot write to {folder} ({_why_not_writable(folder, exc)}); {fix}.") from None


def _file_in_the_way(folder: Path) -> Path | None:
    """The first existing path among `folder` and its parents, if it is not a folder."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
        if candidate.is_symlink():        # a dangling link cannot become a folder either
            return candidate
    return None


def _why_not_writable(folder: Path, exc: OSError) -> str:
    blocker = _file_in_the_way(folder)
    return f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or str(exc))


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def json_bytes(obj: Any) -> bytes:
    """`obj` as the tool writes JSON: indented, keys sorted, numpy values and paths as plain values."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode()


def save_json(path: str | Path, obj: Any) -> Path:
    data = json_bytes(obj)
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


# What every stage checkpoint (StageTrainer._payload) holds, and the type of each entry.
_NUMBER = (int, float)
_STAGE_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "kind": str, "version": int, "epoch": int, "epochs": int, "finished": bool, "model": dict, "export": dict,
    "engine": dict, "lr_scale": _NUMBER, "rollbacks": int, "rng": list, "history": dict, "architecture": dict,
    "run": dict, "extra": dict}
_KIND_NAMES = {"vae": "VAE", "conditioner": "conditioner", "conditioner_e2e": "end-to-end conditioner"}
# Entries of `extra` each kind's trainer reads back on resume.
_EXTRA_ENTRIES = {"vae": ("split",), "conditioner": ("split", "vae_run_id"), "conditioner_e2e": ("split", "vae_run_id")}


def load_checkpoint(path: str | Path, kind: str, what: str, how_to_make: str) -> dict:
    """Load a stage checkpoint of `kind` ("vae", "conditioner", "conditioner_e2e") and check that
    it holds what the tool reads from it; a file that loads but is something else is a one-line
    UserError naming the file, what is missing and how to fix it."""
    path = Path(path)
    state = load_torch(path, what, how_to_make)
    problem = _schema_problem(state, kind)
    if problem:
        raise UserError(f"{what} {path} loads, but is not a SimulGenVAE {_KIND_NAMES.get(kind, kind)} checkpoint "
                        f"({problem}); delete it and {how_to_make}{_previous_hint(path)}.")
    return state


def _schema_problem(state: dict, kind: str) -> str:
    missing = [k for k in _STAGE_ENTRIES if k not in state]
    if missing:
        names = ", ".join(repr(k) for k in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        held = ", ".join(repr(k)[:40] for k in list(state)[:4]) + (", ..." if len(state) > 4 else "")
        return f"missing {names}; it holds {held or 'nothing'}"
    for key, types in _STAGE_ENTRIES.items():
        if not isinstance(state[key], types) or (types is int and isinstance(state[key], bool)):
            return f"entry {key!r} is a {type(state[key]).__name__}"
    if state["kind"] != kind:
        return f"it is a {state['kind']!r} checkpoint"
    for part in ("model", "export"):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[part].items()):
            return f"entry {part!r} is not a state dict of tensors"
    run = state["run"]
    if not isinstance(run.get("run_id"), str) or not isinstance(run.get("config"), dict):
        return "entry 'run' lacks the run id or the config"
    if not isinstance(state["engine"].get("applied_steps"), int):
        return "entry 'engine' lacks 'applied_steps'"
    missing = [k for k in _EXTRA_ENTRIES.get(kind, ()) if k not in state["extra"]]
    if missing:
        return f"entry 'extra' lacks {', '.join(repr(k) for k in missing)}"
    split = state["extra"].get("split")
    if "split" in _EXTRA_ENTRIES.get(kind, ()) and not (
            isinstance(split, dict) and all(isinstance(split.get(k), torch.Tensor) for k in ("train", "val"))):
        return "entry 'extra' holds no train/validation split"
    return ""


def _previous_hint(path: Path) -> str:
    history = path.parent / "history"
    if history.is_dir() and any(history.glob(f"*/{path.name}")):
        return f" (or make an earlier run current with --run RUN_ID --lc_only=1: see {history})"
    return ""


def check_state_dict(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: str | Path,
                     what: str, how_to_make: str) -> None:
    """A saved state dict must have exactly the expected keys and shapes; otherwise a one-line UserError."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {tuple(saved[k].shape)} instead of {tuple(v.shape)}" for k, v in expected.items()
              if k in saved and isinstance(v, torch.Tensor) and tuple(saved[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
    raise UserError(f"{what} {path}: its weights do not fit the network its architecture entry describes "
                    f"({'; '.join(parts)}); delete it and {how_to_make}{_previous_hint(Path(path))}.")


def load_model_state(module: torch.nn.Module, saved: dict[str, torch.Tensor], path: str | Path, what: str,
                     how_to_make: str) -> None:
    """module.load_state_dict(saved), with any key or shape mismatch as a one-line UserError."""
    check_state_dict(module.state_dict(), saved, path, what, how_to_make)
    try:
        module.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{what} {path}: its weights do not load into the network ({reason}); delete it and "
                        f"{how_to_make}{_previous_hint(Path(path))}.") from None


def build_from_checkpoint(arch_cls: type, state: dict, path: str | Path, what: str,
                          how_to_make: str) -> torch.nn.Module:
    """The network `state['architecture']` describes (`arch_cls.from_stored(...).build()`: a
    VAEArchitecture or ConditionerArchitecture), with an unusable description as a one-line UserError."""
    try:
        return arch_cls.from_stored(state["architecture"]).build()
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]
        raise UserError(f"{what} {path}: its architecture entry does not describe a network this tool builds "
                        f"({reason}); delete it and {how_to_make}{_previous_hint(Path(path))}.") from None


def same_architecture(saved: dict, current) -> bool:
    """Whether a checkpoint's stored architecture describes `current` (fields it predates take their defaults)."""
    try:
        return type(current).from_stored(saved) == current
    except (KeyError, TypeError, ValueError):
        return False


def check_architecture(saved: dict, current, path: str | Path) -> None:
    """A resumed stage must build the network its checkpoint was trained with."""
    if not same_architecture(saved, current):
        now = current.stored()
        try:                         # fields the checkpoint predates take their defaults, as when it loads
            saved = type(current).from_stored(saved).stored()
        except (KeyError, TypeError, ValueError):
            pass
        keys = sorted(set(saved) | set(now))
        diff = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
                         for k in keys if saved.get(k) != now.get(k))
        raise UserError(f"{path} was trained with a different architecture ({diff}); "
                        f"restore the config it was made with, or start afresh without --resume.")


def check_same_split(saved_split: dict, val_idx, path: str | Path) -> None:
    """A resumed stage must validate on the runs it was trained to validate on (`val_idx`: the validation
    runs that select; a GP conditioner stores them apart from every validation run)."""
    if not torch.equal(saved_split.get("select", saved_split["val"]), torch.as_tensor(val_idx, dtype=torch.long)):
        raise UserError(f"{path} used another train/validation split (seed, val_split or Dim1 changed, or an "
                        "earlier version of this tool wrote it); restore them, or start afresh without --resume.")


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
