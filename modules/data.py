"""Field data: find, open, check, scale, split and batch the simulated runs.

Layouts:
    on disk and in numpy   (P, T, N)   runs x time steps x nodes, as the original stores it
    model batches          (B, N, T)   nodes are channels, time is the sequence axis

`.npy` files are memory-mapped, so nothing is read until a run is touched; with
`FieldStore(preload=False)` a dataset larger than RAM trains batch by batch. `.pickle`
files (the original's format) are read with an unpickler that builds numpy arrays and
nothing else.
"""

from __future__ import annotations

import importlib
import mmap
import pickle
from pathlib import Path

import numpy as np
import torch

from modules.errors import UserError

_CHUNK_BYTES = 64 * 2**20     # host memory one streaming pass may use per chunk of runs
_NUMERIC_KINDS = "biuf"       # bool, signed/unsigned int, float


# ----------------------------------------------------------------------------- files

def find_dataset(directory: Path, number: int) -> Path:
    """`dataset<number>.npy` in `directory` if it exists, else `dataset<number>.pickle`."""
    candidates = [Path(directory) / f"dataset{number}{suffix}" for suffix in (".npy", ".pickle")]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"no dataset {number}: neither {candidates[0]} nor {candidates[1]} exists; put the runs "
        f"there as a [Dim1, Dim2, Dim3] numpy array, set dataset_dir in condition.txt to the folder that "
        f"holds them, or fix the dataset number (first line of the preset block) in preset.txt"
    )


def open_dataset(path: Path) -> np.ndarray:
    """The runs array (P, T, N): memory-mapped for `.npy` (nothing read yet), in memory for `.pickle`."""
    path = Path(path)
    if path.suffix == ".npy":
        array = _open_npy(path)
    elif path.suffix in (".pickle", ".pkl"):
        array = _load_pickle(path)
    else:
        raise UserError(f"{path}: unknown dataset format {path.suffix!r}; use .npy (preferred) or .pickle")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise UserError(
            f"{path} holds a {array.dtype} array; the runs must be numbers (float32 is best): "
            f"convert it with np.save(path, array.astype(np.float32))"
        )
    if array.size == 0:
        raise UserError(
            f"{path} holds an empty array of shape {array.shape}; it must contain the runs [Dim1, Dim2, Dim3]"
        )
    return array


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.lib.format.open_memmap(path, mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(
            f"cannot read {path} as a .npy array ({_one_line(exc)}); the file is truncated or not written by "
            f"np.save: regenerate it with np.save"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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


def _load_pickle(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as file:
            obj = _NumpyOnlyUnpickler(file, path).load()
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {path}: {_one_line(exc)}") from exc
    except Exception as exc:  # a corrupt pickle can fail with almost any exception type
        raise UserError(
            f"cannot unpickle {path} ({type(exc).__name__}: {_one_line(exc)}); the file is truncated or corrupt: "
            f"write it again, preferably with np.save as dataset<d>.npy"
        ) from exc
    if not isinstance(obj, np.ndarray):
        raise UserError(
            f"{path} holds a {type(obj).__name__}, not a numpy array; pickle the [Dim1, Dim2, Dim3] "
            f"array itself, or better save it with np.save"
        )
    return np.asarray(obj)


# ----------------------------------------------------------------------------- mapped pages

def _mapping_of(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """(mmap, byte offset of array[0] in it) for a read-only view of a memory-mapped file."""
    if array.flags.writeable:
        return None                   # a writable or in-memory array: nothing to release
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or base.closed:
        return None
    start = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    return base, array.__array_interface__["data"][0] - start


def release_pages(array: np.ndarray, runs) -> None:
    """Unmap the file pages of `runs` (an int array, or a slice of run indices) from this process.

    Reading a memory-mapped run maps its file pages into the process, and they count in its
    resident set until they are unmapped: one pass over a 30 GB file would leave a 30 GB RSS
    that only memory pressure trims. MADV_DONTNEED drops the mapping (the data stay in the
    page cache, so a re-read is cheap), keeping the RSS at what the batches themselves need.
    A no-op for in-memory arrays.
    """
    found = _mapping_of(array)
    if found is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mm, offset = found
    stride = array.strides[0]
    page = mmap.PAGESIZE
    if isinstance(runs, slice):
        first, stop, _ = runs.indices(array.shape[0])
        spans = [(first, stop)] if stop > first else []
    else:
        spans = [(int(r), int(r) + 1) for r in np.unique(np.asarray(runs, dtype=np.int64))]
    for first, stop in spans:
        begin = (offset + first * stride) // page * page
        end = min(offset + stop * stride, len(mm))
        if end > begin:
            try:
                mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)
            except (OSError, ValueError):
                return


# ----------------------------------------------------------------------------- checks

def _runs_per_chunk(array: np.ndarray, chunk_bytes: int = _CHUNK_BYTES) -> int:
    run_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * max(array.dtype.itemsize, 4))
    return max(1, chunk_bytes // run_bytes)


def check_dataset(array: np.ndarray, expected_shape: tuple[int, int, int], path: Path,
                  runs_chunk: int | None = None) -> None:
    """Shape must be (Dim1, Dim2, Dim3) and every value finite; streams over runs in chunks."""
    expected_shape = tuple(int(v) for v in expected_shape)
    if tuple(array.shape) != expected_shape:
        hint = ""
        if len(array.shape) == 3 and tuple(array.shape) == (expected_shape[0], expected_shape[2], expected_shape[1]):
            hint = " (it looks like [runs, nodes, time]: store it as [runs, time, nodes] with np.swapaxes(a, 1, 2))"
        raise UserError(
            f"{path} has shape {tuple(array.shape)} but condition.txt expects (Dim1, Dim2, Dim3) = "
            f"{expected_shape}{hint}; fix Dim1/Dim2/Dim3 in condition.txt or the data file"
        )
    if array.dtype.kind not in "fc":
        return  # integers and booleans cannot hold NaN or Inf
    step = runs_chunk or _runs_per_chunk(array)
    for start in range(0, array.shape[0], step):
        bad = ~np.isfinite(array[start:start + step]).all(axis=(1, 2))   # (chunk,)
        release_pages(array, slice(start, start + step))
        if bad.any():
            run = start + int(np.argmax(bad))
            raise UserError(
                f"{path}: run {run} (0-based index along Dim1) contains NaN or Inf values; "
                f"fix or remove that run (and its row/image) before training"
            )


def reduce(array: np.ndarray, t_red: int, n_red: int) -> np.ndarray:
    """The first `t_red` time steps and `n_red` nodes, (P, T', N'); a view, never a copy."""
    _, num_time, num_nodes = array.shape
    if not 1 <= t_red <= num_time:
        raise UserError(f"Dim2_red = {t_red} must be between 1 and Dim2 = {num_time} (the time steps in the data); "
                        f"fix Dim2_red in condition.txt")
    if not 1 <= n_red <= num_nodes:
        raise UserError(f"Dim3_red = {n_red} must be between 1 and Dim3 = {num_nodes} (the nodes in the data); "
                        f"fix Dim3_red in condition.txt")
    return array[:, :t_red, :n_red]


def split_indices(num_runs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of run indices (sorted int64 arrays, both non-empty)."""
    if num_runs < 2:
        raise UserError(f"Dim1 = {num_runs}: at least 2 runs are needed to split them into training and "
                        f"validation runs")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"validation fraction {val_fraction} must be between 0 and 1 (exclusive)")
    num_val = min(max(round(num_runs * val_fraction), 1), num_runs - 1)
    order = np.random.default_rng(seed).permutation(num_runs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


# ----------------------------------------------------------------------------- scaling

class FieldScaler:
    """Per-node min-max scaling of the field to [-0.9, 0.9], over all runs and time steps.

    `transform` / `inverse_transform` accept numpy arrays and torch tensors. The node axis
    is `node_axis` (default -2, the model layout (..., N, T)); pass node_axis=-1 for the
    disk layout (..., T, N). Nodes whose value never changes map to 0 and back to their
    constant exactly.
    """

    LOW, HIGH = -0.9, 0.9

    def __init__(self, data_min: np.ndarray, data_max: np.ndarray):
        self.data_min = np.asarray(data_min, dtype=np.float64)   # (N',)
        self.data_max = np.asarray(data_max, dtype=np.float64)   # (N',)
        if self.data_min.shape != self.data_max.shape or self.data_min.ndim != 1:
            raise ValueError(f"data_min {self.data_min.shape} and data_max {self.data_max.shape} "
                             f"must be equal 1-D shapes")
        self._mid = (self.data_max + self.data_min) / 2
        self._half = (self.data_max - self.data_min) / (self.HIGH - self.LOW)
        self._inv_half = 1.0 / np.where(self._half > 0, self._half, 1.0)
        self._torch_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def fit_streaming(cls, array: np.ndarray, runs_chunk: int | None = None) -> FieldScaler:
        """Fit on (P, T, N') in one pass over chunks of runs; a memmap is never read whole."""
        step = runs_chunk or _runs_per_chunk(array)
        data_min = data_max = None
        for start in range(0, array.shape[0], step):
            chunk = np.asarray(array[start:start + step])                 # (chunk, T, N')
            low, high = chunk.min(axis=(0, 1)), chunk.max(axis=(0, 1))    # (N',)
            release_pages(array, slice(start, start + step))
            data_min = low if data_min is None else np.minimum(data_min, low)
            data_max = high if data_max is None else np.maximum(data_max, high)
        return cls(data_min, data_max)

    @property
    def num_nodes(self) -> int:
        return self.data_min.shape[0]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"data_min": self.data_min.copy(), "data_max": self.data_max.copy()}

    @classmethod
    def from_state_dict(cls, state: dict) -> FieldScaler:
        return cls(np.asarray(state["data_min"]), np.asarray(state["data_max"]))

    def transform(self, x, node_axis: int = -2):
        """Physical values -> [-0.9, 0.9]."""
        mid, _, inv_half = self._params_like(x, node_axis)
        return (x - mid) * inv_half

    def inverse_transform(self, x, node_axis: int = -2):
        """[-0.9, 0.9] -> physical values."""
        mid, half, _ = self._params_like(x, node_axis)
        return x * half + mid

    def _params_like(self, x, node_axis: int):
        """(mid, half, 1/half) in x's kind, dtype and device, shaped to broadcast along node_axis."""
        axis = node_axis % x.ndim
        if x.shape[axis] != self.num_nodes:
            raise ValueError(f"axis {node_axis} of shape {tuple(x.shape)} has {x.shape[axis]} nodes, "
                             f"the scaler {self.num_nodes}")
        shape = (self.num_nodes,) + (1,) * (x.ndim - 1 - axis)
        if isinstance(x, torch.Tensor):
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            key = (x.device, dtype)
            if key not in self._torch_cache:
                self._torch_cache[key] = tuple(
                    torch.as_tensor(p, dtype=dtype).to(x.device) for p in (self._mid, self._half, self._inv_half)
                )
            return tuple(p.reshape(shape) for p in self._torch_cache[key])
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        return tuple(p.astype(dtype).reshape(shape) for p in (self._mid, self._half, self._inv_half))


# ----------------------------------------------------------------------------- batches

class FieldStore:
    """Scaled float32 batches (B, N', T') of given runs from a (P, T', N') array.

    preload=True  (--load_all=1): scale the whole array once into one (P, N', T') tensor on
                  `device`; a batch is an index_select there.
    preload=False (--load_all=0): keep the (memory-mapped) array; each batch reads only its
                  runs, in sorted order for locality, and is transposed and scaled on the fly.
                  No scaled copy of the dataset exists.
    Pass the array through `reduce` first; the scaler must have been fitted on the same nodes.
    """

    def __init__(self, array: np.ndarray, scaler: FieldScaler, *, preload: bool,
                 device: torch.device | str = "cpu", pin_memory: bool = False,
                 chunk_bytes: int = _CHUNK_BYTES):
        if array.ndim != 3 or array.shape[2] != scaler.num_nodes:
            raise ValueError(f"array {array.shape} must be (P, T', N') with N' = {scaler.num_nodes} "
                             f"(the scaler's nodes)")
        self.scaler = scaler
        self.device = torch.device(device)
        self.num_runs, self.num_time, self.num_nodes = (int(v) for v in array.shape)
        self._pin = pin_memory and self.device.type == "cuda"
        self._array = None
        self._data = None
        if preload:
            self._data = self._preload(array, _runs_per_chunk(array, chunk_bytes))
        else:
            self._array = array

    def _preload(self, array: np.ndarray, step: int) -> torch.Tensor:
        data = torch.empty((self.num_runs, self.num_nodes, self.num_time), dtype=torch.float32, device=self.device)
        # One reused float32 buffer (a read-only memmap cannot back a tensor): scaling in place
        # there skips three fresh chunk-sized allocations per chunk, each page-faulted in anew.
        buffer = np.empty((min(step, self.num_runs), self.num_time, self.num_nodes), dtype=np.float32)
        for start in range(0, self.num_runs, step):
            stop = min(start + step, self.num_runs)
            raw = buffer[:stop - start]                                              # (c, T', N')
            np.copyto(raw, array[start:stop], casting="unsafe")
            release_pages(array, slice(start, stop))
            chunk = torch.from_numpy(raw).to(self.device)                            # the buffer itself on the CPU
            mid, _, inv_half = self.scaler._params_like(chunk, node_axis=-1)
            chunk.sub_(mid).mul_(inv_half)             # = scaler.transform: the same two ops, in place
            data[start:stop].copy_(chunk.transpose(1, 2))                           # (c, N', T')
        return data

    @property
    def preloaded(self) -> bool:
        return self._data is not None

    def get(self, indices) -> torch.Tensor:
        """Scaled runs `indices` (in that order, repeats allowed): (B, N', T') float32 on `device`."""
        if self._data is not None:
            if isinstance(indices, torch.Tensor) and indices.device.type != "cpu":
                # Indices already on the GPU are not range-checked: that would sync with it.
                index = indices.to(device=self.device, dtype=torch.long)
            else:
                host = indices.numpy() if isinstance(indices, torch.Tensor) else indices
                index = torch.from_numpy(self._check_indices(host)).to(self.device)
            return self._data.index_select(0, index)

        wanted = self._check_indices(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices)
        runs, inverse = np.unique(wanted, return_inverse=True)             # sorted reads
        raw = torch.from_numpy(np.ascontiguousarray(self._array[runs], dtype=np.float32))  # (b, T', N')
        release_pages(self._array, runs)          # the RSS stays at one batch, not the touched file
        if self._pin:
            raw = raw.pin_memory()
        raw = raw.to(self.device, non_blocking=self._pin)
        batch = self.scaler.transform(raw, node_axis=-1).transpose(1, 2)   # (b, N', T')
        if len(runs) != len(wanted) or np.any(runs != wanted):
            batch = batch.index_select(0, torch.from_numpy(inverse.reshape(-1)).to(self.device))
        return batch.contiguous()

    def _check_indices(self, indices) -> np.ndarray:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_runs):
            raise IndexError(f"run indices must lie in [0, {self.num_runs}); got {index.min()}..{index.max()}")
        return index
