"""Field data pipeline: loading (memory-mapped / safe unpickling), checks, scaling, split, batches, demo files."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.data import (
    FieldScaler,
    FieldStore,
    check_dataset,
    find_dataset,
    open_dataset,
    reduce,
    split_indices,
)
from modules.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def runs(p=12, t=5, n=7, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(10.0, 3.0, size=(p, t, n)).astype(dtype)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# -----------------------------------------------------------------------------
# finding and opening files


def test_find_dataset_prefers_npy_then_pickle(tmp_path):
    with pytest.raises(UserError) as exc:
        find_dataset(tmp_path, 3)
    msg = one_line(exc)
    assert str(tmp_path / "dataset3.npy") in msg and str(tmp_path / "dataset3.pickle") in msg

    (tmp_path / "dataset3.pickle").write_bytes(pickle.dumps(runs()))
    assert find_dataset(tmp_path, 3) == tmp_path / "dataset3.pickle"
    np.save(tmp_path / "dataset3.npy", runs())
    assert find_dataset(tmp_path, 3) == tmp_path / "dataset3.npy"


def test_npy_is_memory_mapped_and_reduce_is_a_view(tmp_path):
    data = runs()
    np.save(tmp_path / "d.npy", data)
    arr = open_dataset(tmp_path / "d.npy")
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    np.testing.assert_array_equal(arr, data)

    view = reduce(arr, 3, 4)
    assert view.shape == (12, 3, 4)
    assert isinstance(view, np.memmap) and np.shares_memory(view, arr)
    assert reduce(arr, 5, 7) is arr or np.shares_memory(reduce(arr, 5, 7), arr)


def test_reduce_rejects_more_than_the_data_has():
    arr = runs()
    with pytest.raises(UserError, match="Dim2_red = 6"):
        reduce(arr, 6, 7)
    with pytest.raises(UserError, match="Dim3_red = 8"):
        reduce(arr, 5, 8)
    with pytest.raises(UserError, match="Dim2_red = 0"):
        reduce(arr, 0, 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_round_trip(tmp_path, dtype, protocol):
    data = runs(dtype=dtype)
    for i, array in enumerate([data, np.asfortranarray(data)]):   # Fortran order pickles via _frombuffer
        path = tmp_path / f"d{i}.pickle"
        path.write_bytes(pickle.dumps(array, protocol=protocol))
        loaded = open_dataset(path)
        assert type(loaded) is np.ndarray and loaded.dtype == dtype
        np.testing.assert_array_equal(loaded, data)


def test_pickle_written_by_numpy_1_loads(tmp_path):
    # numpy 1 names its reconstructor numpy.core.multiarray; protocol 2 stores names as text.
    blob = pickle.dumps(runs(), protocol=2)
    assert b"numpy._core.multiarray" in blob
    path = tmp_path / "d.pickle"
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(open_dataset(path), runs())


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for name, payload in [
        ("system", _RunsCommand(f"touch {marker}")),
        ("eval", _CallsEval()),
        ("inside_a_dict", {"runs": runs(), "x": _RunsCommand(f"touch {marker}")}),
        ("object_array", np.array([_RunsCommand(f"touch {marker}")], dtype=object)),
    ]:
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(UserError) as exc:
            open_dataset(path)
        msg = one_line(exc)
        assert msg.startswith("refusing to unpickle") and "np.save" in msg and str(path) in msg
        assert not marker.exists()
    assert "system" in msg or "eval" in msg or "posix" in msg


def test_pickle_codecs_encode_is_limited_to_latin1(tmp_path):
    # _codecs.encode is allowed only as numpy uses it (latin-1); any other codec is refused.
    blob = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "codec.pickle"
    path.write_bytes(blob)
    with pytest.raises(UserError, match="rot13"):
        open_dataset(path)


class _CallsMemmap:
    """Unpickling this would run numpy.memmap(target, 'uint8', 'w+', 0, (16,)): create or truncate target."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (np.memmap, (self.target, "uint8", "w+", 0, (16,)))


class _ArrayFromRawPointers:
    """Unpickling this would run numpy.ndarray((1,), object, buffer): an object array over raw bytes."""

    def __reduce__(self):
        return (np.ndarray, ((1,), np.dtype(object), b"\x41" * 8))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_cannot_call_memmap_to_write_a_file(tmp_path, protocol):
    existing = tmp_path / "precious.bin"
    existing.write_bytes(b"keep me" * 100)
    before = existing.read_bytes()
    absent = tmp_path / "never_created.bin"
    for i, target in enumerate([existing, absent]):
        blob = pickle.dumps(_CallsMemmap(target), protocol=protocol)
        assert b"memmap" in blob                    # the payload really names numpy.memmap
        path = tmp_path / f"memmap{i}.pickle"
        path.write_bytes(blob)
        with pytest.raises(UserError) as exc:
            open_dataset(path)
        msg = one_line(exc)
        assert msg.startswith("refusing to unpickle") and "numpy.memmap" in msg and str(path) in msg
    assert existing.read_bytes() == before
    assert not absent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memmap0.pickle", "memmap1.pickle", "precious.bin"]


@pytest.mark.parametrize("protocol", [2, 5])
def test_pickle_cannot_build_an_array_over_raw_bytes(tmp_path, protocol):
    path = tmp_path / "raw.pickle"
    path.write_bytes(pickle.dumps(_ArrayFromRawPointers(), protocol=protocol))
    with pytest.raises(UserError, match="refusing to unpickle a call of numpy.ndarray"):
        open_dataset(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_pickled_memmap_loads_as_a_plain_array(tmp_path, protocol):
    np.save(tmp_path / "d.npy", runs())
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    path = tmp_path / "d.pickle"
    path.write_bytes(pickle.dumps(mapped, protocol=protocol))
    assert b"memmap" in path.read_bytes()
    loaded = open_dataset(path)
    assert type(loaded) is np.ndarray
    np.testing.assert_array_equal(loaded, runs())


def test_pickle_allow_list_is_only_what_plain_arrays_need():
    from modules.pickles import _PICKLE_ALLOWED
    numpy_core = {(core + module, name) for core in ("numpy.core.", "numpy._core.")
                  for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                       ("numeric", "_frombuffer"))}
    assert _PICKLE_ALLOWED == numpy_core | {("numpy", "ndarray"), ("numpy", "memmap"), ("numpy", "dtype"),
                                            ("_codecs", "encode")}


@pytest.mark.parametrize("obj, kind", [({"a": 1}, "dict"), ([runs(), runs()], "list"),
                                        (np.float32(1.0), "float32"), ("text", "str")])
def test_pickle_of_something_else_than_an_array(tmp_path, obj, kind):
    path = tmp_path / "d.pickle"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UserError) as exc:
        open_dataset(path)
    assert f"holds a {kind}" in one_line(exc)


def test_non_numeric_arrays_are_refused(tmp_path):
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps(np.array([["a", "b"]])))
    with pytest.raises(UserError, match="must be numbers"):
        open_dataset(path)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read"):
        open_dataset(tmp_path / "o.npy")


@pytest.mark.parametrize("suffix", [".npy", ".pickle"])
def test_truncated_and_garbage_files(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".npy":
        np.save(good, runs())
    else:
        good.write_bytes(pickle.dumps(runs(), protocol=4))
    blob = good.read_bytes()
    for name, content in [("cut_body", blob[: len(blob) - 40]), ("cut_header", blob[:30]),
                          ("garbage", b"this is not an array\n" * 10), ("empty_file", b"")]:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(UserError) as exc:
            open_dataset(path)
        assert str(path) in one_line(exc)


@pytest.mark.parametrize("suffix", [".npy", ".pickle"])
def test_empty_array(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    empty = np.zeros((0, 5, 7), np.float32)
    np.save(path, empty) if suffix == ".npy" else path.write_bytes(pickle.dumps(empty))
    with pytest.raises(UserError, match="empty array"):
        open_dataset(path)


def test_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match=r"\.npy"):
        open_dataset(tmp_path / "d.h5")


# -----------------------------------------------------------------------------
# checks


def test_wrong_shape_names_both_shapes_and_keys():
    with pytest.raises(UserError) as exc:
        check_dataset(runs(12, 5, 7), (12, 6, 7), Path("dataset1.npy"))
    msg = one_line(exc)
    assert "(12, 5, 7)" in msg and "(12, 6, 7)" in msg and "Dim1" in msg and "Dim3" in msg
    assert "dataset1.npy" in msg

    with pytest.raises(UserError, match="swapaxes"):          # [runs, nodes, time] by mistake
        check_dataset(runs(12, 7, 5), (12, 5, 7), Path("d.npy"))
    with pytest.raises(UserError, match=r"\(60, 7\)"):
        check_dataset(runs().reshape(60, 7), (12, 5, 7), Path("d.npy"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_names_the_first_bad_run(tmp_path, bad):
    data = runs(20)
    data[7, 2, 3] = bad
    data[15, 0, 0] = bad
    np.save(tmp_path / "d.npy", data)
    arr = open_dataset(tmp_path / "d.npy")
    for chunk in (None, 1, 3, 7, 8, 100):                       # index 7 (run 8) at chunk edges and inside
        with pytest.raises(UserError) as exc:
            check_dataset(arr, (20, 5, 7), tmp_path / "d.npy", runs_chunk=chunk)
        assert "run 8 (numbered from 1" in one_line(exc)


def test_clean_data_passes_checks():
    check_dataset(runs(), (12, 5, 7), Path("d.npy"), runs_chunk=5)
    check_dataset(np.arange(12 * 5 * 7).reshape(12, 5, 7), (12, 5, 7), Path("d.npy"))


# -----------------------------------------------------------------------------
# scaling


def test_scaler_range_and_round_trip_numpy_and_torch():
    data = runs(12, 5, 7, dtype=np.float64)                     # (P, T, N)
    scaler = FieldScaler.fit_streaming(data, runs_chunk=5)
    x = data.transpose(0, 2, 1)                                 # (P, N, T)
    y = scaler.transform(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.min(axis=(0, 2)), -0.9, atol=1e-12)
    np.testing.assert_allclose(y.max(axis=(0, 2)), 0.9, atol=1e-12)
    np.testing.assert_allclose(scaler.inverse_transform(y), x, rtol=1e-12)
    # disk layout (P, T, N) with node_axis=-1 gives the same numbers
    np.testing.assert_allclose(scaler.transform(data, node_axis=-1), y.transpose(0, 2, 1), atol=1e-12)

    t = torch.from_numpy(x.astype(np.float32))
    ty = scaler.transform(t)
    assert ty.dtype == torch.float32
    np.testing.assert_allclose(ty.numpy(), y, atol=1e-5)
    np.testing.assert_allclose(scaler.inverse_transform(ty).numpy(), x, rtol=1e-5)
    t64 = torch.from_numpy(x)
    assert torch.allclose(scaler.inverse_transform(scaler.transform(t64)), t64, rtol=1e-12)
    # a single run (N, T) works too
    np.testing.assert_allclose(scaler.transform(x[3]), y[3], atol=1e-12)


def _min_max_of(scaler: FieldScaler) -> tuple[np.ndarray, np.ndarray]:
    """The per-node (min, max) a min-max scaler maps to (-0.9, 0.9)."""
    return (scaler.inverse_transform(np.full((1, scaler.num_nodes), -0.9), node_axis=-1)[0],
            scaler.inverse_transform(np.full((1, scaler.num_nodes), 0.9), node_axis=-1)[0])


def test_streaming_fit_equals_one_shot_fit(tmp_path):
    data = runs(23, 5, 7)
    np.save(tmp_path / "d.npy", data)
    arr = open_dataset(tmp_path / "d.npy")
    for chunk in (1, 4, 23, 100, None):
        low, high = _min_max_of(FieldScaler.fit_streaming(arr, runs_chunk=chunk))
        np.testing.assert_allclose(low, data.min(axis=(0, 1)), rtol=1e-12)
        np.testing.assert_allclose(high, data.max(axis=(0, 1)), rtol=1e-12)
    view = reduce(arr, 3, 4)
    _, high = _min_max_of(FieldScaler.fit_streaming(view, runs_chunk=6))
    np.testing.assert_allclose(high, data[:, :3, :4].max(axis=(0, 1)), rtol=1e-12)


def test_centered_scaler_subtracts_the_training_mean_field_and_uses_one_scale(tmp_path):
    data = runs(20, 5, 7, dtype=np.float64)
    data[:, :, 3] *= 50.0                                          # one node with a much larger range
    np.save(tmp_path / "d.npy", data)
    arr = open_dataset(tmp_path / "d.npy")
    train = np.array([0, 2, 3, 4, 9, 10, 11, 15, 19])             # non-contiguous: several chunks
    for chunk in (1, 3, 100):
        scaler = FieldScaler.fit(arr, "centered", train, runs_chunk=chunk)
        y = scaler.transform(data, node_axis=-1)
        np.testing.assert_allclose(y[train].mean(axis=0), 0.0, atol=1e-12)       # (T, N) mean field removed
        assert np.abs(y[train]).max() == pytest.approx(0.9, rel=1e-12)          # largest deviation at 0.9
        assert scaler.scale.shape == (1, 1)                                      # one scale: loss ∝ physical MSE
        np.testing.assert_allclose(scaler.inverse_transform(y, node_axis=-1), data, rtol=1e-12)
        # model layout (P, N, T) gives the same numbers, torch too
        t = torch.from_numpy(data.transpose(0, 2, 1).copy())
        np.testing.assert_allclose(scaler.transform(t).numpy(), y.transpose(0, 2, 1), atol=1e-12)
    changed = data.copy()
    changed[1] += 100.0                                            # a validation run does not move the fit
    again = FieldScaler.fit(changed, "centered", train)
    np.testing.assert_array_equal(again.offset, scaler.offset)
    np.testing.assert_array_equal(again.scale, scaler.scale)


def test_centered_scaler_checks_the_time_axis():
    scaler = FieldScaler.fit(runs(6, 5, 7), "centered", np.arange(4))
    with pytest.raises(ValueError, match="time steps"):
        scaler.transform(np.zeros((2, 4, 7)), node_axis=-1)


@pytest.mark.parametrize("kind", ["minmax", "centered"])
def test_constant_node_does_not_divide_by_zero(kind):
    """A Dirichlet node (the same value in every run and step) maps back to that value whatever the model
    outputs there, with either scaling, in float32 and float64; a node constant in time only is not fixed."""
    data = runs()
    data[:, :, 2] = 5.25
    data[:, :, 4] = np.arange(len(data))[:, None] * 0.5                  # constant in time, one value per run
    scaler = FieldScaler.fit(data, kind, np.arange(8))
    assert scaler.fixed_nodes.tolist() == [i == 2 for i in range(data.shape[2])]
    y = scaler.transform(data, node_axis=-1)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, :, 2], 0.0)
    back = scaler.inverse_transform(y + 0.3, node_axis=-1)      # any model output maps back to the constant
    np.testing.assert_array_equal(back[:, :, 2], 5.25)
    pinned = scaler.pin(data.astype(np.float32) + 1.0)
    np.testing.assert_array_equal(pinned[:, :, 2], 5.25)
    np.testing.assert_array_equal(pinned[:, :, 4], data[:, :, 4] + 1.0)
    t = torch.from_numpy(data).transpose(1, 2)
    assert torch.isfinite(scaler.transform(t)).all()


def test_stacked_fields_get_a_scale_each_and_the_scaler_remembers_them():
    data = runs(n=10)
    data[:, :, 5:] *= 1e-6                                                 # a second field of tiny units
    scaler = FieldScaler.fit(data, "centered", np.arange(8), blocks=2)
    assert scaler.blocks == 2 and scaler.scale.shape == (1, 10)
    y = scaler.transform(data[np.arange(8)], node_axis=-1)
    np.testing.assert_allclose(np.abs(y).reshape(-1, 2, 5).max(axis=(0, 2)), [0.9, 0.9])


def test_scaler_state_dict_round_trip(tmp_path):
    from modules.checkpoint import save_npz
    from modules.data import load_field_scaler
    x = runs(seed=1).transpose(0, 2, 1)
    for scaler in (FieldScaler.fit_streaming(runs()), FieldScaler.fit(runs(), "centered", np.arange(8))):
        state = scaler.state_dict()
        assert set(state) == {"offset", "scale", "kind", "blocks"}
        assert all(isinstance(v, np.ndarray) for v in state.values())
        save_npz(tmp_path / "s.npz", **state)                      # stored as plain arrays, no pickle
        again = load_field_scaler(tmp_path / "s.npz", "train again")
        assert again.kind == scaler.kind and again.blocks == scaler.blocks
        np.testing.assert_array_equal(again.transform(x), scaler.transform(x))
    # files written before the kinds existed hold data_min/data_max and load as min-max
    old = FieldScaler.fit_streaming(runs())
    low, high = _min_max_of(old)
    save_npz(tmp_path / "old.npz", data_min=low, data_max=high)
    np.testing.assert_allclose(load_field_scaler(tmp_path / "old.npz", "").transform(x), old.transform(x), atol=1e-12)
    save_npz(tmp_path / "bad.npz", something=low)
    with pytest.raises(UserError, match="lacks offset/scale"):
        load_field_scaler(tmp_path / "bad.npz", "train again")


def test_scaler_rejects_wrong_node_count():
    scaler = FieldScaler.fit_streaming(runs())
    with pytest.raises(ValueError):
        scaler.transform(np.zeros((2, 8, 5), np.float32))


# -----------------------------------------------------------------------------
# split


def test_split_is_seeded_disjoint_and_covering():
    train, val = split_indices(80, 0.2, seed=42)
    assert len(train) == 64 and len(val) == 16
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(80))
    train2, val2 = split_indices(80, 0.2, seed=42)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert not np.array_equal(split_indices(80, 0.2, seed=43)[1], val)
    assert len(split_indices(484, 0.2, 0)[0]) == 387            # the original's int(0.8 * 484)
    for n, frac in [(2, 0.01), (2, 0.9), (3, 0.5), (5, 0.99)]:
        tr, va = split_indices(n, frac, 0)
        assert len(tr) >= 1 and len(va) >= 1 and len(tr) + len(va) == n


def test_split_is_identical_in_another_process():
    train, val = split_indices(97, 0.2, seed=7)
    code = ("from modules.data import split_indices; t, v = split_indices(97, 0.2, seed=7); "
            "print(','.join(map(str, v)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ",".join(map(str, val))


def test_split_errors():
    with pytest.raises(UserError, match="at least 2 runs"):
        split_indices(1, 0.2, 0)
    with pytest.raises(UserError, match="validation fraction"):
        split_indices(10, 1.0, 0)


# -----------------------------------------------------------------------------
# batches


class _RecordingArray(np.ndarray):
    """An ndarray view that records every index it is asked for."""

    keys: list

    def __getitem__(self, key):
        _RecordingArray.keys.append(key)
        return super().__getitem__(key)


def test_store_modes_give_identical_batches_in_the_requested_order(tmp_path):
    data = runs(30, 9, 11, dtype=np.float64)
    np.save(tmp_path / "d.npy", data)
    view = reduce(open_dataset(tmp_path / "d.npy"), 7, 10)      # non-contiguous memmap view
    scaler = FieldScaler.fit_streaming(view, runs_chunk=4)
    pre = FieldStore(view, scaler, preload=True, chunk_bytes=1000)  # several preload chunks
    lazy = FieldStore(view, scaler, preload=False)
    assert pre.preloaded and not lazy.preloaded
    assert (lazy.num_runs, lazy.num_nodes, lazy.num_time) == (30, 10, 7)

    for idx in ([3, 1, 29, 1], np.array([0, 5, 6]), torch.tensor([17, 2, 2, 8]), [12]):
        a, b = pre.get(idx), lazy.get(idx)
        assert a.shape == b.shape == (len(idx), 10, 7) and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        expected = scaler.transform(data[np.asarray(idx), :7, :10].transpose(0, 2, 1)).astype(np.float32)
        np.testing.assert_allclose(b.numpy(), expected, atol=1e-6)
    with pytest.raises(IndexError):
        lazy.get([30])
    with pytest.raises(IndexError):
        pre.get([-1])
    with pytest.raises(IndexError):
        pre.get(torch.tensor([30]))


def test_streaming_store_reads_only_the_requested_runs(tmp_path):
    data = runs(40, 6, 8)
    np.save(tmp_path / "d.npy", data)
    mm = open_dataset(tmp_path / "d.npy")
    spy = mm.view(_RecordingArray)
    scaler = FieldScaler.fit_streaming(mm)
    _RecordingArray.keys = []
    store = FieldStore(spy, scaler, preload=False)
    assert _RecordingArray.keys == []                          # building it reads nothing
    held = [v for v in vars(store).values() if isinstance(v, (np.ndarray, torch.Tensor))]
    assert len(held) == 1 and held[0] is spy                   # no scaled copy is kept
    batch = store.get([33, 4, 21])
    read = [np.asarray(k).tolist() for k in _RecordingArray.keys]
    assert read == [[4, 21, 33]]                               # one sorted read of the three runs
    np.testing.assert_allclose(batch.numpy(), scaler.transform(data[[33, 4, 21]], node_axis=-1).transpose(0, 2, 1))


def test_streaming_store_does_not_materialise_a_large_file(tmp_path):
    p, t, n = 64, 128, 1024                                     # 32 MiB of float32, 512 KiB per run
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(p, t, n))
    big[:] = np.linspace(0.0, 1.0, n, dtype=np.float32)
    big[:, :, 0] = np.arange(p, dtype=np.float32)[:, None]     # run id on node 0
    big.flush()
    del big
    scaler = FieldScaler.fit_streaming(open_dataset(path), runs_chunk=4)

    tracemalloc.start()                                         # numpy copies
    try:
        batch = FieldStore(open_dataset(path), scaler, preload=False).get([63, 0, 31, 5])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"streaming batch allocated {peak / 2**20:.1f} MiB of numpy memory"
    assert batch.shape == (4, n, t)
    np.testing.assert_allclose(batch[:, 0, 0].numpy(), (np.array([63, 0, 31, 5]) - 31.5) / (63 / 1.8), atol=1e-5)

    # Peak resident memory also sees torch allocations and the file pages a fresh mapping
    # touches; the preloading store is the control that shows the measurement works.
    def peak_growth(preload):
        FieldStore(open_dataset(path), scaler, preload=False).get([1, 2])   # warm torch's lazy init
        arr = open_dataset(path)                                # fresh mapping: no page touched yet
        try:
            Path("/proc/self/clear_refs").write_text("5")       # reset VmHWM to the current RSS
        except OSError:
            pytest.skip("cannot reset the peak RSS counter here")
        base = _proc_status_kib("VmRSS")
        FieldStore(arr, scaler, preload=preload).get([63, 0, 31, 5])
        return (_proc_status_kib("VmHWM") - base) / 1024

    if not Path("/proc/self/clear_refs").exists():
        return
    assert peak_growth(preload=False) < 16                      # 4 runs = 2 MiB of the 32 MiB file
    assert peak_growth(preload=True) > 48                       # all pages + a 32 MiB tensor


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_store_rejects_a_scaler_for_other_nodes():
    scaler = FieldScaler.fit_streaming(runs(12, 5, 7))
    with pytest.raises(ValueError):
        FieldStore(runs(12, 5, 6), scaler, preload=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preload", [True, False])
def test_store_on_cuda_matches_cpu(tmp_path, preload):
    data = runs(20, 6, 9)
    np.save(tmp_path / "d.npy", data)
    arr = open_dataset(tmp_path / "d.npy")
    scaler = FieldScaler.fit_streaming(arr)
    cpu = FieldStore(arr, scaler, preload=False)
    gpu = FieldStore(arr, scaler, preload=preload, device="cuda", pin_memory=True)
    for idx in ([3, 1, 19, 1], torch.tensor([5, 0], device="cuda")):
        out = gpu.get(idx)
        assert out.device.type == "cuda" and out.is_contiguous()
        torch.testing.assert_close(out.cpu(), cpu.get(idx.cpu() if isinstance(idx, torch.Tensor) else idx))


# -----------------------------------------------------------------------------
# the shipped demo


def _condition(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith(("%", "'")) and len(line.split()) >= 2:
            key, value = line.split()[:2]
            values[key] = value
    return values


def test_demo_files_match_condition_txt():
    cfg = _condition(REPO / "input_data" / "condition.txt")
    p, t, n = int(cfg["Dim1"]), int(cfg["Dim2"]), int(cfg["Dim3"])
    path = find_dataset(REPO / cfg.get("dataset_dir", "."), int((REPO / "preset.txt").read_text().split("\n")[1]))
    arr = open_dataset(path)
    check_dataset(arr, (p, t, n), path)
    assert arr.dtype == np.float32
    assert int(cfg["n_sample"]) == p and int(cfg["Dim2_red"]) <= t and int(cfg["Dim3_red"]) <= n

    assert cfg["input_type"] == "csvs" and cfg["param_dir"] == "/input_data/params.csv"   # the demo's route
    images = REPO / "input_data" / "images"                     # the picture routes' param_dir
    pngs = sorted(images.glob("*" + cfg["param_data_type"]))
    assert len(pngs) == p and {f.stem for f in pngs} == {str(i) for i in range(1, p + 1)}
    with Image.open(pngs[0]) as im:
        assert im.mode == "L"
    params = np.loadtxt(REPO / "input_data" / "params.csv", delimiter=",", ndmin=2)
    assert params.shape == (p, int(cfg["num_param"]))

    total = sum(f.stat().st_size for f in [path, REPO / "input_data" / "params.csv", *pngs])
    assert total <= 5 * 10**6


def test_demo_generator_reproduces_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "input_data" / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    make_demo.main(tmp_path)
    shipped = REPO / "input_data"
    np.testing.assert_allclose(np.load(tmp_path / "dataset1.npy"), np.load(shipped / "dataset1.npy"), rtol=1e-6)
    assert (tmp_path / "params.csv").read_text() == (shipped / "params.csv").read_text()
    for i in (1, 17, make_demo.NUM_RUNS):                       # pixels, not PNG bytes: zlib versions differ
        with Image.open(tmp_path / "images" / f"{i}.png") as a, Image.open(shipped / "images" / f"{i}.png") as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_centered_scaler_gives_each_stacked_field_its_own_scale():
    """Fields stacked as node blocks (--import_runs --field T --field U:0) keep their own units."""
    data = runs(10, 4, 6, dtype=np.float64)
    data[:, :, 3:] *= 1000.0                                   # the second field in other units
    scaler = FieldScaler.fit(data, "centered", np.arange(10), blocks=2)
    y = scaler.transform(data, node_axis=-1)
    for block in (slice(0, 3), slice(3, 6)):
        assert np.abs(y[:, :, block]).max() == pytest.approx(0.9, rel=1e-12)
    assert scaler.scale.shape == (1, 6) and scaler.scale[0, 3] > 100 * scaler.scale[0, 0]
    np.testing.assert_allclose(scaler.inverse_transform(y, node_axis=-1), data, rtol=1e-12)
    single = FieldScaler.fit(data, "centered", np.arange(10))
    assert np.abs(single.transform(data, node_axis=-1)[:, :, :3]).max() < 0.01    # one scale: the first field vanishes
