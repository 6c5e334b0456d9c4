"""The original's `.pickle` datasets, read safely: an unpickler that builds numpy arrays and
refuses every other global, so a file cannot run code or write files (own code: pickle has no
such mode, and numpy's allow_pickle=True trusts the file)."""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np

from modules.errors import UserError, one_line


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocols 0-2 store an array's raw bytes as a latin-1 str and rebuild them with
    # _codecs.encode; allowing the real codec lookup would let a file pick any codec.
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


# (module, name) pairs numpy arrays pickle to; numpy 2 writes `numpy._core`, numpy 1 `numpy.core`.
# An array pickles as _reconstruct(ndarray, ...) + ndarray.__setstate__ (under protocol 5 as
# _frombuffer(bytes, dtype, shape, order)), its dtype as dtype(...) + __setstate__, a numpy
# scalar as scalar(dtype, bytes). Nothing here writes a file or runs code: `ndarray` and `memmap`
# (a pickled memmap names its class) stand only for the array type handed to _reconstruct and are
# never called (np.ndarray(shape, object, buffer) would turn raw bytes into object pointers, and
# np.memmap(path, mode="w+") creates or truncates any file); _codecs.encode is limited to latin-1.
_PICKLE_ALLOWED = frozenset({
    (core + module, name)
    for core in ("numpy.core.", "numpy._core.")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "memmap"), ("numpy", "dtype"), ("_codecs", "encode")})
_ARRAY_TYPES = {"ndarray", "memmap"}


class _ArrayType:
    """What `numpy.ndarray` / `numpy.memmap` resolve to in a pickle: a token _reconstruct accepts
    as the array type (building a plain ndarray); calling it is refused."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def __call__(self, *args, **kwargs):
        raise UserError(
            f"refusing to unpickle a call of numpy.{self.name} from {self.path}: only numpy arrays are allowed; "
            f"convert it with np.save in a session you trust"
        )


def _numpy_global(module: str, name: str):
    # Either spelling resolves under numpy 1 and 2 without the numpy.core deprecation shim.
    tail = module.split(".", 2)[2]
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + tail), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and refuses every other global, so a pickle cannot run code or write files."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise UserError(
                f"refusing to unpickle {module}.{name} from {self._path}: only numpy arrays are allowed; "
                f"convert it with np.save in a session you trust"
            )
        if module == "_codecs":
            return _latin1_encode
        if module == "numpy":
            return _ArrayType(name, self._path) if name in _ARRAY_TYPES else np.dtype
        found = _numpy_global(module, name)
        if name == "_reconstruct":
            return _plain_reconstruct(found)
        return found


def _plain_reconstruct(reconstruct):
    def _reconstruct(subtype, shape, dtype):
        if not isinstance(subtype, _ArrayType):
            raise pickle.UnpicklingError(f"_reconstruct of a {type(subtype).__name__}, not of a numpy array type")
        return reconstruct(np.ndarray, shape, dtype)     # a plain array, even for a pickled memmap
    return _reconstruct


def load_numpy_pickle(path: Path) -> np.ndarray:
    """The numpy array a `.pickle` file holds; any other content is a one-line UserError."""
    try:
        with path.open("rb") as file:
            obj = _NumpyOnlyUnpickler(file, path).load()
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {path}: {one_line(exc)}") from exc
    except Exception as exc:  # a corrupt pickle can fail with almost any exception type
        raise UserError(
            f"cannot unpickle {path} ({type(exc).__name__}: {one_line(exc)}); the file is truncated or corrupt: "
            f"write it again, preferably with np.save as dataset<d>.npy"
        ) from exc
    if not isinstance(obj, np.ndarray):
        raise UserError(
            f"{path} holds a {type(obj).__name__}, not a numpy array; pickle the [Dim1, Dim2, Dim3] "
            f"array itself, or better save it with np.save"
        )
    return np.asarray(obj)
