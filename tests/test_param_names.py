"""Parameter names from a header line of the parameter CSV (saved with the model, checked at prediction,
used in messages and pred.json), and `--vtk`'s runs.xdmf listing every predicted run.

One short training on the demo with a header and a mesh beside the dataset; the rest reads it."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import demo_workdir, run_cli
from modules.cond_inputs import read_param_csv
from modules.errors import UserError

NAMES = ["length", "width", "load", "temp"]
# the MLP conditioner, one thread (~15 s on a busy machine; the GP's per-column fits took minutes there): the
# names take one path, ConditionerData.save_scalers, for every conditioner (the GP's: the unit test below)
QUICK = ("--threads", "1", "--set", "Training_epochs=2", "--set", "csv_conditioner=mlp", "--set", "n_epoch=2",
         "--set", "baseline=0")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _csv(path: Path, rows: np.ndarray, header: list[str] | None = None) -> Path:
    lines = ([",".join(header)] if header else []) + [",".join(f"{v:.6g}" for v in row) for row in rows]
    return _write(path, "\n".join(lines) + "\n")


def _messages(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


# --- reading the header -----------------------------------------------------------------------------------

def test_a_header_line_gives_the_names_and_the_same_rows(tmp_path):
    rows = np.array([[1.0, 2.5, -3.0], [4e1, 5.0, 6.0]])
    plain, none = read_param_csv(_csv(tmp_path / "a.csv", rows), 3, 2)
    named, names = read_param_csv(_write(tmp_path / "b.csv", " length , width [mm],load\n1,2.5,-3\n4e1,5,6\n"), 3, 2)
    assert none is None and names == ["length", "width [mm]", "load"]
    np.testing.assert_array_equal(plain, named)
    assert named.dtype == np.float32 and named.shape == (2, 3)


def test_blank_lines_before_the_header_and_a_bom_are_skipped(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes("\ufeff\nx,y\n1,2\n".encode("utf-8"))
    rows, names = read_param_csv(f, 2, 1)
    assert names == ["x", "y"] and rows.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("first, where", [("a,2", "column 1: 'a'"), ("1,b", "column 2: 'b'"),
                                          ("1.2.3,4", "column 1: '1.2.3'"), ("x,", "column 1: 'x'")])
def test_a_first_row_that_is_not_all_names_is_a_data_row_with_a_clear_error(tmp_path, first, where):
    f = _write(tmp_path / "p.csv", f"{first}\n1,2\n")
    with pytest.raises(UserError, match=rf"p\.csv, line 1, {where} is not a number.*header line must name every"):
        read_param_csv(f, 2, None)


def test_a_bad_cell_after_a_header_has_no_header_hint(tmp_path):
    with pytest.raises(UserError, match=r"line 2, column 2: 'oops' is not a number; fix that cell$"):
        read_param_csv(_write(tmp_path / "p.csv", "x,y\n1,oops\n"), 2, None)


def test_a_header_of_the_wrong_width_or_with_a_repeated_name_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"line 1: the header names 3 columns, expected 2"):
        read_param_csv(_write(tmp_path / "p.csv", "x,y,z\n1,2\n"), 2, None)
    with pytest.raises(UserError, match=r"line 1: the header names two columns 'x'; give every column its own"):
        read_param_csv(_write(tmp_path / "q.csv", "x,x\n1,2\n"), 2, None)
    with pytest.raises(UserError, match="holds no data rows"):
        read_param_csv(_write(tmp_path / "r.csv", "x,y\n"), 2, None)


def test_the_header_does_not_count_as_a_run(tmp_path):
    rows = np.arange(6.0).reshape(3, 2)
    with pytest.raises(UserError, match="found 3 data rows, expected 4"):
        read_param_csv(_csv(tmp_path / "p.csv", rows, ["x", "y"]), 2, 4)


def test_scalers_carry_the_names_only_when_the_csv_had_them(tmp_path):
    import torch

    from modules.train_conditioner import ConditionerData, ConditionerInputs
    rows = np.random.default_rng(0).random((6, 2)).astype(np.float32)
    main, hier = np.ones((6, 3), np.float32), np.ones((6, 1, 2), np.float32)
    for names, file in ((["a", "b"], "named.npz"), (None, "plain.npz")):
        data = ConditionerData.build(ConditionerInputs(rows, [], names), main, hier, torch.device("cpu"))
        data.with_latents(main, hier).save_scalers(tmp_path / file)   # the GP's refitted basis saves this copy
    with np.load(tmp_path / "named.npz", allow_pickle=False) as named:
        assert named["param_names"].tolist() == ["a", "b"]
    with np.load(tmp_path / "plain.npz", allow_pickle=False) as plain:
        assert "param_names" not in plain.files


# --- a model trained on a CSV with a header ----------------------------------------------------------------

@pytest.fixture(scope="module")
def named_model(tmp_path_factory):
    """The demo trained on params.csv under the header NAMES, with a 16×16 quad mesh beside the dataset."""
    import meshio
    work = demo_workdir(tmp_path_factory.mktemp("named") / "work")
    params = np.loadtxt(work / "input_data/params.csv", delimiter=",")
    _csv(work / "input_data/params.csv", params, NAMES)
    x, y = np.meshgrid(np.arange(16.0), np.arange(16.0))
    points = np.column_stack([x.ravel(), y.ravel(), np.zeros(256)])
    corner = (np.arange(15)[:, None] * 16 + np.arange(15)[None, :]).ravel()
    quads = np.column_stack([corner, corner + 1, corner + 17, corner + 16])
    meshio.write(work / "input_data/mesh.vtu", meshio.Mesh(points, [("quad", quads)]))
    result = run_cli(work, "--preset=1", "--lc_only=0", "--size=small", "--load_all=1", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, params


def test_the_names_are_saved_with_the_model_and_read_back(named_model):
    from modules.api import Surrogate
    work, _ = named_model
    with np.load(work / "checkpoints/conditioner_scalers.npz", allow_pickle=False) as scalers:
        assert scalers["param_names"].tolist() == NAMES
    surrogate = Surrogate.load(work)
    assert surrogate.param_names == NAMES and surrogate.names == NAMES
    assert surrogate.model.param_names == NAMES


def test_a_model_without_names_loads_and_falls_back_to_numbered_names(named_model, tmp_path):
    """Scalers written before names were kept (or from a header-less CSV) lack the key: names are None."""
    from modules.api import Surrogate
    work = tmp_path / "old"
    shutil.copytree(named_model[0], work, ignore=shutil.ignore_patterns("runs"))
    scalers = work / "checkpoints/conditioner_scalers.npz"
    with np.load(scalers, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "param_names"}
    np.savez(scalers, **arrays)
    surrogate = Surrogate.load(work)
    assert surrogate.param_names is None and surrogate.names == ["p1", "p2", "p3", "p4"]
    # a header is then not checked, and its rows predict as the same rows without it
    header_less = surrogate.predict(named_model[1][:2])
    np.testing.assert_array_equal(header_less, Surrogate.load(named_model[0]).predict(named_model[1][:2]))


def test_predict_with_the_header_names_columns_in_messages_json_and_writes_runs_xdmf(named_model, tmp_path):
    """Matching header; a row with width beyond the training range; --vtk: runs.xdmf lists every run, and each
    of its grids points at that run's own .h5 datasets, which hold the prediction."""
    import h5py
    work, params = named_model
    rows = params[[0, 5, 9]].copy()
    rows[1, 1] = params[:, 1].max() * 2                                  # width outside the training range
    new = _csv(tmp_path / "new.csv", rows, NAMES)
    out, vtk = tmp_path / "pred.npy", tmp_path / "vtk"
    result = run_cli(work, "--predict", str(new), "--out", str(out), "--vtk", str(vtk))
    assert result.returncode == 0, result.stderr
    warning = [ln for ln in result.stderr.splitlines() if "outside the training data" in ln]
    assert len(warning) == 1 and "row 2 column 2 (width) = " in warning[0], result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["param_names"] == NAMES
    assert meta["domain"]["outside_columns"][1] == [2] and meta["domain"]["outside_names"][1] == ["width"]
    assert meta["out_of_domain"][1] and meta["vtk_collection"] == str(vtk / "runs.xdmf")
    assert "runs.xdmf" in result.stdout

    pred = np.load(out)                                                  # (3, T, N)
    root = ET.parse(vtk / "runs.xdmf").getroot()
    temporal = root.find("Domain/Grid")
    assert temporal.get("CollectionType") == "Temporal"
    steps = temporal.findall("Grid")
    assert len(steps) == pred.shape[1]
    for k, step in enumerate(steps):
        assert step.get("CollectionType") == "Spatial" and float(step.find("Time").get("Value")) == k
        grids = step.findall("Grid")
        assert [g.get("Name") for g in grids] == ["run_1", "run_2", "run_3"]
        for i, grid in enumerate(grids):
            items = {child.tag: child.find("DataItem").text for child in grid}
            assert set(items) == {"Geometry", "Topology", "Attribute"}
            for ref in items.values():
                file, dataset = ref.split(":")
                assert file == f"run_{i + 1}.h5" and (vtk / file).is_file()
                with h5py.File(vtk / file, "r") as h5:
                    assert dataset in h5
            file, dataset = items["Attribute"].split(":")
            with h5py.File(vtk / file, "r") as h5:
                np.testing.assert_array_equal(h5[dataset][()], pred[i, k])
                np.testing.assert_array_equal(h5[items["Geometry"].split(":")[1]][()][:, :2],
                                              np.column_stack([np.tile(np.arange(16.0), 16),
                                                               np.repeat(np.arange(16.0), 16)]))
    assert sorted(p.name for p in vtk.iterdir()) == sorted(
        ["runs.xdmf"] + [f"run_{i}{s}" for i in (1, 2, 3) for s in (".xdmf", ".h5")])

    # the same rows without a header: the same prediction, read by position
    plain = _csv(tmp_path / "plain.csv", rows)
    result = run_cli(work, "--predict", str(plain), "--out", str(tmp_path / "plain.npy"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), pred)


@pytest.mark.parametrize("header, how", [(["width", "length", "load", "temp"], "the same names in another order"),
                                         (["a", "b", "c", "d"], "other names")])
def test_a_header_that_differs_from_the_training_names_is_one_line_and_writes_nothing(named_model, tmp_path,
                                                                                      header, how):
    from modules.api import Surrogate
    from modules.predict import read_inputs
    work, params = named_model
    new = _csv(tmp_path / "new.csv", params[:2], header)
    with pytest.raises(UserError) as error:
        read_inputs(Surrogate.load(work).model, new)
    message = str(error.value)
    assert "\n" not in message and how in message
    assert ",".join(header) in message and ",".join(NAMES) in message and str(new) in message
    if how == "other names":          # the command line: exit 2, one line, nothing written
        out, vtk = tmp_path / "pred.npy", tmp_path / "vtk"
        result = run_cli(work, "--predict", str(new), "--out", str(out), "--vtk", str(vtk))
        assert result.returncode == 2 and _messages(result.stderr) == [f"error: {message}"], result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists() and not out.with_suffix(".json").exists() and not vtk.exists()
