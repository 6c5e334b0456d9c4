"""Field data: find, open, check, scale, split and batch the simulated runs.

Layouts:
    on disk and in numpy   (P, T, N)   runs x time steps x nodes, as the original stores it
    model batches          (B, N, T)   nodes are channels, time is the sequence axis

`.npy` files are memory-mapped, so nothing is read until a run is touched; with
`FieldStore(preload=False)` a dataset larger than RAM trains batch by batch. `.pickle`
files (the original's format) are read by modules/pickles.py, which builds numpy arrays
and nothing else.
"""

from __future__ import annotations

import mmap
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

import numpy as np
import torch

from modules.errors import UserError, one_line
from modules.pickles import load_numpy_pickle

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")
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
        array = load_numpy_pickle(path)
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
            f"cannot read {path} as a .npy array ({one_line(exc)}); the file is truncated or not written by "
            f"np.save: regenerate it with np.save"
        ) from exc


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
                f"{path}: run {run + 1} (numbered from 1 along Dim1) contains NaN or Inf values; "
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


@dataclass(frozen=True)
class ValidationRuns:
    """The validation runs in two halves (seeded): `select` chooses (the VAE's best epoch, when the networks
    stop, the blend weights, the spread's calibration), `check` only measures, so the numbers a run reports
    come from runs that chose nothing. One validation run does both (`apart` False)."""
    select: np.ndarray
    check: np.ndarray

    @classmethod
    def split(cls, val_idx: np.ndarray, seed: int) -> "ValidationRuns":
        val_idx = np.asarray(val_idx, dtype=np.int64)
        if len(val_idx) < 2:
            return cls(val_idx, val_idx)
        order = np.random.default_rng(seed + 1).permutation(val_idx)
        half = (len(val_idx) + 1) // 2
        return cls(np.sort(order[:half]), np.sort(order[half:]))

    @property
    def apart(self) -> bool:
        return not np.array_equal(self.select, self.check)

    @property
    def all(self) -> np.ndarray:
        return np.union1d(self.select, self.check)

    def stored(self, train_idx) -> dict[str, torch.Tensor]:
        """For a checkpoint's `extra["split"]`: "val" is every validation run, as earlier versions stored."""
        return {"train": torch.as_tensor(np.asarray(train_idx), dtype=torch.long),
                "val": torch.as_tensor(self.all, dtype=torch.long),
                "select": torch.as_tensor(self.select, dtype=torch.long),
                "check": torch.as_tensor(self.check, dtype=torch.long)}


# ----------------------------------------------------------------------------- scaling

def varying_nodes(fields: np.ndarray) -> np.ndarray:
    """(N,) bool: the nodes of `fields` (n, T, N) whose value is not the same in every run and step (a
    node held at a fixed value, a Dirichlet boundary, is bit for bit the same)."""
    low, high = fields[0].min(axis=0), fields[0].max(axis=0)
    for run in fields[1:]:                                                          # no (n, T, N) copy
        np.minimum(low, run.min(axis=0), out=low)
        np.maximum(high, run.max(axis=0), out=high)
    return high > low


class FieldScaler:
    """Affine scaling of the field, x_scaled = (x − offset) / scale, in one of two kinds.

    minmax    the original's: per node, min-max over all runs and time steps to [-0.9, 0.9]
              (offset (1, N'), scale (1, N')). Nodes whose value never changes map to 0
              and back to their constant exactly.
    centered  the port's default: the training runs' mean field is subtracted (offset
              (T', N')) and one scale for the whole field maps the largest training
              deviation to 0.9 (scale (1, 1); (1, N') with several stacked fields, one scale
              per field). The network then models only how runs
              differ from each other, in units where its loss is the physical MSE; with
              minmax the shared transient fills the range and a few-% difference between
              runs is near the noise floor (benchmarks/accuracy/NOTES.md).

    Either kind gives a node whose value never changes in the training runs (a Dirichlet
    boundary; `fixed_nodes`) scale 0, so that every prediction maps back to that value exactly.
    `blocks` is the number of stacked fields (--import_runs with several --field): each is a
    block of N'/blocks nodes with units of its own, which the metrics weigh alike.

    `transform` / `inverse_transform` accept numpy arrays and torch tensors. The node axis
    is `node_axis` (default -2, the model layout (..., N, T), time last); pass
    node_axis=-1 for the disk layout (..., T, N).
    """

    LOW, HIGH = -0.9, 0.9
    KINDS = ("centered", "minmax")

    def __init__(self, offset: np.ndarray, scale: np.ndarray, kind: str = "minmax", blocks: int = 1):
        self.offset = np.atleast_2d(np.asarray(offset, dtype=np.float64))  # (T' or 1, N')
        scale = np.atleast_2d(np.asarray(scale, dtype=np.float64))         # (1, N') or (1, 1)
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if self.offset.ndim != 2 or scale.ndim != 2 or scale.shape[0] != 1 \
                or scale.shape[1] not in (1, self.offset.shape[1]):
            raise ValueError(f"offset {self.offset.shape} must be (T, N) or (1, N), scale {scale.shape} (1, N) or (1, 1)")
        if blocks < 1 or self.offset.shape[1] % blocks:
            raise ValueError(f"{blocks} stacked fields do not split {self.offset.shape[1]} nodes evenly")
        self.kind = kind
        self.blocks = int(blocks)
        self.scale = scale                     # 0 where a node never changes: every output maps back to it
        self._inv_scale = 1.0 / np.where(scale > 0, scale, 1.0)
        self._torch_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_min_max(cls, data_min: np.ndarray, data_max: np.ndarray) -> FieldScaler:
        data_min, data_max = np.asarray(data_min, np.float64), np.asarray(data_max, np.float64)
        if data_min.shape != data_max.shape or data_min.ndim != 1:
            raise ValueError(f"data_min {data_min.shape} and data_max {data_max.shape} must be equal 1-D shapes")
        return cls(((data_max + data_min) / 2)[None], ((data_max - data_min) / (cls.HIGH - cls.LOW))[None], "minmax")

    @classmethod
    def fit(cls, array: np.ndarray, kind: str, train_idx=None, runs_chunk: int | None = None,
            blocks: int = 1) -> FieldScaler:
        """Fit on (P, T', N') in streaming passes over chunks of runs (a memmap is never read
        whole): `minmax` over every run, as the original; `centered` over `train_idx` only, so
        the validation runs stay unseen, with one scale per block of N'/blocks nodes (several
        imported fields stacked as node blocks keep their own units)."""
        blocks = blocks if blocks > 1 and array.shape[2] % blocks == 0 else 1
        if kind == "minmax":
            return cls.fit_streaming(array, runs_chunk, blocks)
        runs = np.arange(array.shape[0]) if train_idx is None else np.sort(np.asarray(train_idx, dtype=np.int64))
        step = runs_chunk or _runs_per_chunk(array)
        total = np.zeros(array.shape[1:], dtype=np.float64)
        for chunk in _chunks(array, runs, step):
            total += chunk.sum(axis=0, dtype=np.float64)
        mean = total / len(runs)                                              # (T', N')
        largest = np.zeros(array.shape[2])                                    # each node's largest deviation
        first = np.asarray(array[runs[0], 0], np.float64)                     # (N',)
        fixed = np.ones(array.shape[2], bool)                                 # the same value in every run and step
        for chunk in _chunks(array, runs, step):
            np.maximum(largest, np.abs(chunk - mean).max(axis=(0, 1)), out=largest)
            fixed &= (chunk == first).all(axis=(0, 1))
        per_block = largest.reshape(blocks, -1).max(axis=1) / cls.HIGH
        scale = np.repeat(per_block, array.shape[2] // blocks)[None]          # (1, N')
        if fixed.any() or blocks > 1:
            scale[0, fixed] = 0.0
        else:
            scale = scale[:, :1]                                              # (1, 1): one scale for the field
        return cls(mean, scale, "centered", blocks)

    @classmethod
    def fit_streaming(cls, array: np.ndarray, runs_chunk: int | None = None, blocks: int = 1) -> FieldScaler:
        """The original's per-node min-max over every run, in one pass over chunks of runs."""
        step = runs_chunk or _runs_per_chunk(array)
        data_min = data_max = None
        for chunk in _chunks(array, np.arange(array.shape[0]), step):
            low, high = chunk.min(axis=(0, 1)), chunk.max(axis=(0, 1))    # (N',)
            data_min = low if data_min is None else np.minimum(data_min, low)
            data_max = high if data_max is None else np.maximum(data_max, high)
        scaler = cls.from_min_max(data_min, data_max)
        scaler.blocks = blocks
        return scaler

    @property
    def num_nodes(self) -> int:
        return self.offset.shape[1]

    @property
    def fixed_nodes(self) -> np.ndarray:
        """(N',) bool: the nodes whose training values never changed (scale 0)."""
        return np.broadcast_to(self.scale[0] == 0, (self.num_nodes,))

    def pin(self, fields: np.ndarray) -> np.ndarray:
        """`fields` (..., T, N) in physical units with every fixed node set to its value, in place."""
        fixed = self.fixed_nodes
        if fixed.any():
            fields[..., fixed] = np.broadcast_to(self.offset[:, fixed], fields[..., fixed].shape)
        return fields

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"offset": self.offset.copy(), "scale": self.scale.copy(), "kind": np.array(self.kind),
                "blocks": np.array(self.blocks)}

    @classmethod
    def from_state_dict(cls, state: dict) -> FieldScaler:
        if "offset" not in state:                                 # files written before the `kind`s
            return cls.from_min_max(np.asarray(state["data_min"]), np.asarray(state["data_max"]))
        return cls(np.asarray(state["offset"]), np.asarray(state["scale"]), str(np.asarray(state["kind"])),
                   int(state.get("blocks", 1)))                   # files written before the blocks: one field

    def transform(self, x, node_axis: int = -2):
        """Physical values -> scaled values."""
        offset, _, inv_scale = self._params_like(x, node_axis)
        return (x - offset) * inv_scale

    def inverse_transform(self, x, node_axis: int = -2):
        """Scaled values -> physical values."""
        offset, scale, _ = self._params_like(x, node_axis)
        return x * scale + offset

    def _params_like(self, x, node_axis: int):
        """(offset, scale, 1/scale) in x's kind, dtype and device, shaped to broadcast over x."""
        axis = node_axis % x.ndim
        if x.shape[axis] != self.num_nodes:
            raise ValueError(f"axis {node_axis} of shape {tuple(x.shape)} has {x.shape[axis]} nodes, "
                             f"the scaler {self.num_nodes}")
        params = (self.offset, self.scale, self._inv_scale)                  # (T|1, N|1)
        if axis == x.ndim - 2:                                               # (..., N, T)
            params = tuple(p.T for p in params)
        elif axis != x.ndim - 1:                                             # nodes last, nothing after
            raise ValueError(f"node_axis {node_axis} must be -1 (..., T, N) or -2 (..., N, T)")
        time_axis = x.ndim - 1 if axis == x.ndim - 2 else x.ndim - 2
        if x.ndim >= 2 and self.offset.shape[0] > 1 and x.shape[time_axis] != self.offset.shape[0]:
            raise ValueError(f"shape {tuple(x.shape)} has {x.shape[time_axis]} time steps, the scaler "
                             f"{self.offset.shape[0]}")
        if x.ndim == 1:                                                      # one snapshot (N,)
            if self.offset.shape[0] > 1:
                raise ValueError("a time-dependent offset needs the time axis: pass (..., T, N) or (..., N, T)")
            params = tuple(p.reshape(-1) for p in params)
        if isinstance(x, torch.Tensor):
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            key = (x.device, dtype, axis == x.ndim - 2, x.ndim == 1)
            if key not in self._torch_cache:
                self._torch_cache[key] = tuple(torch.as_tensor(np.ascontiguousarray(p), dtype=dtype).to(x.device)
                                               for p in params)
            return self._torch_cache[key]
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        return tuple(p.astype(dtype) for p in params)


def load_field_scaler(path: Path, how_to_make: str) -> FieldScaler:
    """checkpoints/field_scaler.npz, either kind (files from before the kinds are min-max)."""
    from modules.checkpoint import load_npz
    state = load_npz(path, "field scaler", how_to_make, ())
    if not ({"offset", "scale", "kind"} <= state.keys() or {"data_min", "data_max"} <= state.keys()):
        raise UserError(f"field scaler {path} lacks offset/scale (or data_min/data_max); delete it and {how_to_make}.")
    try:
        return FieldScaler.from_state_dict(state)
    except ValueError as exc:
        raise UserError(f"field scaler {path} is inconsistent ({exc}); delete it and {how_to_make}.") from None


def _chunks(array: np.ndarray, runs: np.ndarray, step: int):
    """Float64 copies of array[runs] in chunks of `step` runs, releasing each chunk's pages."""
    for start in range(0, len(runs), step):
        idx = runs[start:start + step]
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx):                    # contiguous: a slice
            chunk = np.asarray(array[idx[0]:idx[-1] + 1], dtype=np.float64)
            release_pages(array, slice(int(idx[0]), int(idx[-1]) + 1))
        else:
            chunk = np.asarray(array[idx], dtype=np.float64)
            release_pages(array, idx)
        yield chunk


# ----------------------------------------------------------------------------- batches

class HostBatch(NamedTuple):
    raw: torch.Tensor                 # (b, T', N') the distinct runs as read, sorted
    order: np.ndarray | None          # rows of `raw` in the requested order (None: already)


def prefetch(read: Callable[[_Item], _Result], items: Iterable[_Item], depth: int = 2) -> Iterator[_Result]:
    """read(item) for each item in order, computed up to `depth` items ahead by one background
    thread, so reading the next batch from the file overlaps the current training step (numpy's
    copies and pin_memory release the GIL). An error in `read` is raised here, at its item; when
    the consumer stops early, the thread stops too. depth 0: no thread. Own code: torch's
    DataLoader would pickle the memory-mapped store into worker processes, or, with threads,
    still read one batch per call without looking ahead."""
    if depth <= 0:
        for item in items:
            yield read(item)
        return
    done = object()
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((read(item), None)):
                    return
            put((done, None))
        except BaseException as exc:          # handed to the consumer, raised there
            put((None, exc))

    thread = threading.Thread(target=work, name="simulgen-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value, error = results.get()
            if error is not None:
                raise error
            if value is done:
                return
            yield value
    finally:
        stop.set()
        thread.join()


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
            offset, _, inv_scale = self.scaler._params_like(chunk, node_axis=-1)
            chunk.sub_(offset).mul_(inv_scale)         # = scaler.transform: the same two ops, in place
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

        return self.finish(self.read(indices))

    def read(self, indices) -> HostBatch:
        """The host half of a streamed batch: its runs read from the file (sorted, each once) into
        float32, pinned for a CUDA device. Touches no torch state but its own tensors, so a
        background thread can run it one batch ahead (`prefetch`)."""
        wanted = self._check_indices(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices)
        runs, inverse = np.unique(wanted, return_inverse=True)             # sorted reads
        raw = torch.from_numpy(np.ascontiguousarray(self._array[runs], dtype=np.float32))  # (b, T', N')
        release_pages(self._array, runs)          # the RSS stays at one batch, not the touched file
        if self._pin:
            raw = raw.pin_memory()
        return HostBatch(raw, None if np.array_equal(runs, wanted) else inverse.reshape(-1))

    def finish(self, host: HostBatch) -> torch.Tensor:
        """The device half: copy, scale (on the device) and lay out as (b, N', T')."""
        raw = host.raw.to(self.device, non_blocking=self._pin)
        batch = self.scaler.transform(raw, node_axis=-1).transpose(1, 2)   # (b, N', T')
        if host.order is not None:
            batch = batch.index_select(0, torch.from_numpy(host.order).to(self.device))
        return batch.contiguous()

    def _check_indices(self, indices) -> np.ndarray:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_runs):
            raise IndexError(f"run indices must lie in [0, {self.num_runs}); got {index.min()}..{index.max()}")
        return index
