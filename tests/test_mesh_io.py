"""Solver files in and out: `--import_runs` (XDMF time series and folders of per-step
meshes, written here with meshio), every import error, `--predict --vtk` read back with
meshio's own reader, and figures drawn on real meshes.

One module fixture solves a transient heat problem with scikit-fem for a few runs, imports
them, trains a tiny model on them (2 + 2 epochs) and is reused by the prediction and figure
tests."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import meshio
import numpy as np
import pytest

from conftest import ROOT, run_cli
from modules import cli


# --- small real files ---------------------------------------------------------------------------------
def grid_mesh(n: int = 5, quads: bool = False, shift: float = 0.0):
    """An n × n node grid in z = 0 (triangles, or quads), node j at (j % n, j // n)."""
    x, y = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    points = np.column_stack([x.ravel() + shift, y.ravel(), np.zeros(n * n)])
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1))
    a = (j * n + i).ravel()
    b, c, d = a + 1, a + n + 1, a + n
    if quads:
        return points, [("quad", np.column_stack([a, b, c, d]))]
    return points, [("triangle", np.concatenate([np.column_stack([a, b, c]), np.column_stack([a, c, d])]))]


def _messages(stderr: str) -> list[str]:
    """stderr without the informational lines (threads, progress) and the busy-machine warning."""
    return [line for line in stderr.strip().splitlines()
            if not line.startswith(("INFO: ", "WARNING: the 1-minute load average"))]


def run_values(run: int, steps: int, nodes: int) -> np.ndarray:
    """Distinct, recognisable values (T, N): 1000·run + 10·step + node/100."""
    return (1000.0 * run + 10.0 * np.arange(steps)[:, None] + np.arange(nodes)[None, :] / 100).astype(np.float64)


def write_xdmf(path: Path, points, cells, steps: dict[str, np.ndarray], times) -> Path:
    """One XDMF time series; `steps` maps a field name to its (T, N, ...) values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(path.parent), meshio.xdmf.TimeSeriesWriter(path.name) as writer:   # .h5 goes to cwd
        writer.write_points_cells(points, cells)
        for k, t in enumerate(times):
            writer.write_data(t, point_data={name: v[k] for name, v in steps.items()})
    return path


def write_folder(folder: Path, points, cells, steps: dict[str, np.ndarray], ext: str = ".vtu") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    T = len(next(iter(steps.values())))
    for k in range(T):
        meshio.write(folder / f"step_{k}{ext}", meshio.Mesh(points, cells, point_data={n: v[k] for n, v in steps.items()}))
    return folder


def import_cli(workdir: Path, capsys, *args: str) -> tuple[int, str, str]:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        code = cli.main(["--import_runs", *args])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    return code, out.out, out.err


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- round trips -------------------------------------------------------------------------------------
def test_xdmf_time_series_import_round_trips_values_in_natural_run_order(tmp_path, capsys):
    points, cells = grid_mesh()
    times = [0.0, 0.5, 1.25]
    for run in (1, 2, 10):                     # written out of order; plain sorting would put 10 before 2
        write_xdmf(tmp_path / "sims" / f"run_{run}.xdmf", points, cells, {"T": run_values(run, 3, 25)}, times)
    code, out, err = import_cli(tmp_path, capsys, "sims/run_*.xdmf", "--field", "T")
    assert code == 0, err
    data = np.load(tmp_path / "dataset1.npy", mmap_mode="r")
    assert data.dtype == np.float32 and data.shape == (3, 3, 25)
    for i, run in enumerate((1, 2, 10)):
        np.testing.assert_allclose(data[i], run_values(run, 3, 25), rtol=1e-6)
    mesh = meshio.read(tmp_path / "mesh.vtu")
    np.testing.assert_array_equal(mesh.points, points)
    np.testing.assert_array_equal(mesh.cells[0].data, cells[0][1])
    layout = json.loads((tmp_path / "dataset1.fields.json").read_text())
    assert layout["fields"] == ["T"] and layout["nodes_per_field"] == 25 and layout["times"] == times
    assert [Path(r).name for r in layout["runs"]] == ["run_1.xdmf", "run_2.xdmf", "run_10.xdmf"]
    assert "imported 3 runs × 3 steps × 25 nodes" in out and "0, 0.5, 1.25" in out
    for line in ("Dim1\t\t3", "Dim2\t\t3", "Dim3\t\t25", "n_sample\t3"):
        assert line in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_folders_of_vtu_and_vtk_steps_stack_fields_and_vector_components_as_extra_nodes(tmp_path, capsys):
    points, cells = grid_mesh(4, quads=True)
    N, T = 16, 12                               # step_2 must come before step_10
    expected = []
    for run, ext in ((1, ".vtu"), (2, ".vtk")):
        temp = run_values(run, T, N)
        velocity = np.stack([temp + 1, -temp, 2 * temp], axis=-1)                     # (T, N, 3)
        write_folder(tmp_path / "sims" / f"case{run}", points, cells, {"temp": temp, "U": velocity}, ext)
        expected.append(np.concatenate([temp, -temp, np.linalg.norm(velocity, axis=-1)], axis=1))
    code, out, err = import_cli(tmp_path, capsys, "sims/case*", "--field", "temp", "--field", "U:1",
                                "--field", "U:mag", "--set", "dataset_dir=data")
    assert code == 0, err
    data = np.load(tmp_path / "data/dataset1.npy")
    assert data.shape == (2, T, 3 * N)                                                # field-major blocks of N nodes
    np.testing.assert_allclose(data, np.stack(expected), rtol=1e-6)
    layout = json.loads((tmp_path / "data/dataset1.fields.json").read_text())
    assert layout["fields"] == ["temp", "U_1", "U_mag"] and layout["times"] == list(map(float, range(T)))
    assert meshio.read(tmp_path / "data/mesh.vtu").cells[0].type == "quad"
    assert "Dim3\t\t48" in out and "dataset_dir\tdata" in out
    assert not (tmp_path / "dataset1.npy").exists()


# --- every error: one line naming the file, exit 2, nothing written --------------------------------------
def _two_runs(tmp_path: Path, second=None, field="T", steps=3):
    points, cells = grid_mesh()
    write_xdmf(tmp_path / "sims/run_1.xdmf", points, cells, {field: run_values(1, steps, 25)}, range(steps))
    if second is not None:
        second(tmp_path / "sims/run_2.xdmf", points, cells)


def _bad_nodes(path, points, cells):
    p, c = grid_mesh(4)
    write_xdmf(path, p, c, {"T": run_values(2, 3, 16)}, range(3))


def _moved_nodes(path, points, cells):
    p = points.copy()
    p[7, 1] += 0.01
    write_xdmf(path, p, cells, {"T": run_values(2, 3, 25)}, range(3))


def _fewer_steps(path, points, cells):
    write_xdmf(path, points, cells, {"T": run_values(2, 2, 25)}, range(2))


def _nan(path, points, cells):
    v = run_values(2, 3, 25)
    v[2, 11] = np.nan
    write_xdmf(path, points, cells, {"T": v}, range(3))


def _vector(path, points, cells):
    write_xdmf(path, points, cells, {"T": np.zeros((3, 25, 3))}, range(3))


def _cell_values(path, points, cells):
    write_xdmf(path, points, cells, {"T": np.zeros((3, 24))}, range(3))      # 24 values on 25 nodes


def _missing_h5(path, points, cells):
    write_xdmf(path, points, cells, {"T": run_values(2, 3, 25)}, range(3))
    path.with_suffix(".h5").unlink()


def _stray_file(path, points, cells):
    path.with_name("run_3.txt").write_text("notes")


ERRORS = {   # case: (make the second run, import args, fragments of the one error line)
    "other node count": (_bad_nodes, ["--field", "T"], ["run_2.xdmf", "16 nodes", "25", "same mesh"]),
    "moved node": (_moved_nodes, ["--field", "T"], ["run_2.xdmf", "node 7", "same mesh"]),
    "other step count": (_fewer_steps, ["--field", "T"], ["run_2.xdmf", "2 time steps", "3", "same number of steps"]),
    "missing field": (None, ["--field", "p"], ["run_1.xdmf", "'p'", "the file has: T"]),
    "NaN": (_nan, ["--field", "T"], ["run_2.xdmf (step 2)", "NaN", "node 11"]),
    "vector without component": (_vector, ["--field", "T"], ["run_2.xdmf", "3 components", "T:0", "T:mag"]),
    "component out of range": (_vector, ["--field", "T:3"], ["run_1.xdmf", "component 3", "1 component"]),
    "not nodal": (_cell_values, ["--field", "T"], ["run_2.xdmf", "24 values", "25 nodes"]),
    "missing .h5": (_missing_h5, ["--field", "T"], ["cannot read", "run_2.xdmf", ".h5"]),
    "not a run": (_stray_file, ["--field", "T"], ["run_3.txt", "neither an XDMF"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_import_error_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, case):
    second, args, fragments = ERRORS[case]
    _two_runs(tmp_path, second)
    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "dataset1.npy").write_bytes(b"an earlier import")
    before = files_under(earlier)
    pattern = "sims/run_*" if case == "not a run" else "sims/run_*.xdmf"
    code, out, err = import_cli(tmp_path, capsys, pattern, *args, "--set", "dataset_dir=out", "--force")
    lines = _messages(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert files_under(earlier) == before, "a failed import changed or left files"


@pytest.mark.parametrize("args,fragment", [
    (["nothing_*.xdmf", "--field", "T"], "matches nothing"),
    (["sims/run_*.xdmf"], "both --import_runs GLOB and --field NAME"),
    (["sims/run_*.xdmf", "--field", "T", "--set", "Dim1=3"], "only --set dataset_dir=DIR"),
    (["sims/run_*.xdmf", "--field", "T", "--field", "T"], "twice"),
])
def test_import_flag_errors(tmp_path, capsys, args, fragment):
    _two_runs(tmp_path)
    code, _, err = import_cli(tmp_path, capsys, *args)
    assert code == 2 and fragment in err and len(_messages(err)) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sims"]


# --- a real solver, a tiny model on it, --vtk and figures -------------------------------------------------
P, STEPS, DT = 8, 6, 0.02


def heat_runs(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward-Euler heat equation u_t = k Δu + q on the unit square (u = 0 on the boundary),
    P1 triangles, one XDMF per run; k and q vary per run. Returns (params, fields, points)."""
    from skfem import Basis, ElementTriP1, LinearForm, MeshTri, asm, condense, solve
    from skfem.models.poisson import laplace, mass

    mesh = MeshTri.init_symmetric().refined(2)                      # 41 nodes
    basis = Basis(mesh, ElementTriP1())
    K, M = asm(laplace, basis), asm(mass, basis)

    @LinearForm
    def bump(v, w):
        x, y = w.x
        return np.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) / 0.05) * v

    f = asm(bump, basis)
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(0.5, 2.0, P), rng.uniform(5.0, 20.0, P)])     # (k, q)
    fields = np.zeros((P, STEPS, mesh.p.shape[1]))
    for r, (k, q) in enumerate(params):
        u = np.zeros(mesh.p.shape[1])
        for s in range(STEPS):
            u = solve(*condense(M + DT * k * K, M @ u + DT * q * f, D=mesh.boundary_nodes()))
            fields[r, s] = u
        write_xdmf(folder / f"heat_{r + 1}.xdmf", mesh.p.T, [("triangle", mesh.t.T)], {"temperature": fields[r]},
                   [DT * (s + 1) for s in range(STEPS)])
    return params, fields, mesh.p.T


@pytest.fixture(scope="module")
def solver_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("solver")
    shutil.copytree(ROOT / "input_data", work / "input_data", ignore=shutil.ignore_patterns("*.npy", "images", "*.py"))
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    params, fields, points = heat_runs(work / "sims")
    np.savetxt(work / "params.csv", params, delimiter=",")
    imported = run_cli(work, "--import_runs", "sims/heat_*.xdmf", "--field", "temperature", "--set", "dataset_dir=data")
    assert imported.returncode == 0, imported.stderr
    N = len(points)
    sets = {"Dim1": P, "Dim2": STEPS, "Dim3": N, "Dim2_red": STEPS, "Dim3_red": N, "n_sample": P, "num_param": 2,
            "param_dir": "/params.csv", "input_type": "csvs", "dataset_dir": "data", "Training_epochs": 2,
            "n_epoch": 2, "Batch_size": 2, "latent_conditioner_batch": 2, "point_net_steps": 50}
    trained = run_cli(work, "--preset=1", "--plot=1", "--lc_only=0", "--size=small", "--load_all=1",
                      *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert trained.returncode == 0, trained.stderr[-3000:]
    return work, params, fields, imported.stdout


def test_a_real_scikit_fem_solve_imports_exactly(solver_model):
    work, _, fields, out = solver_model
    data = np.load(work / "data/dataset1.npy")
    np.testing.assert_allclose(data, fields.astype(np.float32))
    assert data[:, -1].max() > data[:, 0].max() > 0                 # the plate heats up
    assert f"Dim1\t\t{P}" in out and "0.02, 0.04, 0.06, 0.08, 0.1, 0.12" in out


def test_predict_vtk_writes_one_relocatable_xdmf_series_per_input_on_the_mesh(solver_model, tmp_path):
    work, params, _, _ = solver_model
    new = tmp_path / "new.csv"
    np.savetxt(new, params[[3, 0, 5]], delimiter=",")
    result = run_cli(work, "--predict", str(new), "--out", str(tmp_path / "pred.npy"), "--vtk", str(tmp_path / "vtk"))
    assert result.returncode == 0, result.stderr
    pred = np.load(tmp_path / "pred.npy")                           # (3, T, N)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "vtk", moved)                             # the .h5 reference must be relative
    # one file pair per input, numbered from 1 as the inputs are, and runs.xdmf listing them (tests/test_param_names.py)
    assert sorted(p.name for p in moved.iterdir()) == [f"run_{i}{s}" for i in (1, 2, 3) for s in (".h5", ".xdmf")] + [
        "runs.xdmf"]
    assert moved.name not in (moved / "runs.xdmf").read_text()
    mesh = meshio.read(work / "data/mesh.vtu")
    for i in range(3):
        assert f"{moved.name}" not in (moved / f"run_{i + 1}.xdmf").read_text()
        with meshio.xdmf.TimeSeriesReader(moved / f"run_{i + 1}.xdmf") as reader:
            points, cells = reader.read_points_cells()
            np.testing.assert_allclose(points, mesh.points)
            np.testing.assert_array_equal(cells[0].data, mesh.cells[0].data)
            assert reader.num_steps == STEPS
            for k in range(STEPS):
                t, point_data, _ = reader.read_data(k)
                assert t == pytest.approx(DT * (k + 1))
                np.testing.assert_array_equal(point_data["temperature"], pred[i, k])
    assert json.loads((tmp_path / "pred.json").read_text())["vtk_fields"] == ["temperature"]


def test_predict_vtk_with_samples_writes_the_point_prediction_and_the_bands(solver_model, tmp_path):
    """With --samples the XDMF's main field is the point prediction, as pred.npy; the samples' mean and std and
    the calibrated 90 % band's edges, as the bands file holds them, are extra fields."""
    work, params, _, _ = solver_model
    new = tmp_path / "new.csv"
    np.savetxt(new, params[:2], delimiter=",")
    result = run_cli(work, "--predict", str(new), "--out", str(tmp_path / "pred.npy"), "--samples", "4",
                     "--vtk", str(tmp_path / "vtk"))
    assert result.returncode == 0, result.stderr
    point = np.load(tmp_path / "pred.npy")                          # (2, T, N)
    bands = np.load(tmp_path / "pred_bands.npz")
    with meshio.xdmf.TimeSeriesReader(tmp_path / "vtk/run_2.xdmf") as reader:
        reader.read_points_cells()
        _, point_data, _ = reader.read_data(2)
    np.testing.assert_array_equal(point_data["temperature"], point[1, 2])
    for band in ("mean", "std", "q05", "q95"):
        np.testing.assert_array_equal(point_data[f"temperature_{band}"], bands[band][1, 2])
    assert point_data["temperature_std"].max() > 0
    assert json.loads((tmp_path / "pred.json").read_text())["vtk_fields"] == [
        "temperature", "temperature_mean", "temperature_std", "temperature_q05", "temperature_q95"]


def test_predict_vtk_without_a_mesh_is_an_error_before_anything_is_written(solver_model, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(solver_model[0], work, ignore=shutil.ignore_patterns("runs", "sims"))
    (work / "data/mesh.vtu").unlink()
    result = run_cli(work, "--predict", "params.csv", "--out", str(tmp_path / "pred.npy"), "--vtk", str(tmp_path / "vtk"))
    lines = _messages(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--vtk" in lines[0] and str(Path("data") / "mesh.vtu") in lines[0] and "--import_runs" in lines[0]
    assert not (tmp_path / "pred.npy").exists() and not (tmp_path / "vtk").exists()


def _not_blank(png: Path) -> None:
    import matplotlib.image
    image = matplotlib.image.imread(png)[..., :3]
    colours = np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"{png} looks blank ({len(colours)} colours)"
    assert (image.min(axis=-1) < 0.9).mean() > 0.15, f"{png} is mostly white"


def test_training_figures_draw_snapshots_on_the_triangulated_mesh(solver_model):
    run_dir = next((solver_model[0] / "runs").iterdir())
    for name in ("vae_reconstruction", "conditioner_prediction"):
        _not_blank(run_dir / f"{name}.png")
        assert (run_dir / f"{name}_traces.png").stat().st_size > 10_000     # the nodal traces stay


def test_the_point_network_places_the_nodes_at_the_imported_mesh_points(solver_model):
    """The mesh.vtu that --import_runs writes beside the dataset gives the point network its nodes'
    positions (node_positions auto): the mesh's points, one scale for both axes; `embedding` ignores it."""
    import json
    import meshio
    from modules.point_net import node_positions
    work, _, fields, _ = solver_model
    summary = json.loads((next((work / "runs").iterdir()) / "summary.json").read_text())
    assert summary["lc_point_net_positions"] == "mesh.vtu"
    dataset = work / "data/dataset1.npy"
    positions, source = node_positions("auto", work, dataset, fields, fields.shape[2], 0)
    points = meshio.read(work / "data/mesh.vtu").points[:, :2]
    assert source == "mesh.vtu"
    np.testing.assert_allclose(positions, (points - points.min(axis=0)) / np.ptp(points, axis=0).max(), atol=1e-6)
    assert node_positions("embedding", work, dataset, fields, fields.shape[2], 0)[1] == "embedding"


def test_node_index_plots_stay_without_a_mesh(tmp_path):
    from modules.plots import SAVE, Figures
    figures = Figures(SAVE, tmp_path, dataset=tmp_path / "dataset1.npy")    # no mesh.vtu beside it
    figures.traces(np.random.default_rng(0).random((5, 25)), np.zeros((5, 25)), 0, "recon", "reconstruction")
    assert [p.name for p in figures.saved] == ["recon.png"]


def _hex_box(n: int = 3):
    """An n×n×n grid of hexahedra (VTK node order)."""
    ax = np.arange(n + 1)
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    points = np.column_stack([x.ravel(), y.ravel(), z.ravel()]).astype(float)
    idx = lambda i, j, k: (k * (n + 1) + j) * (n + 1) + i                      # noqa: E731
    hexes = [[idx(i, j, k), idx(i + 1, j, k), idx(i + 1, j + 1, k), idx(i, j + 1, k),
              idx(i, j, k + 1), idx(i + 1, j, k + 1), idx(i + 1, j + 1, k + 1), idx(i, j + 1, k + 1)]
             for k in range(n) for j in range(n) for i in range(n)]
    return points, np.array(hexes)


def test_volume_mesh_figures_draw_the_boundary_surface(tmp_path):
    from modules.mesh_io import surface_triangles
    from modules.plots import SAVE, Figures
    points, hexes = _hex_box(3)
    triangles = surface_triangles([meshio.CellBlock("hexahedron", hexes)])
    assert len(triangles) == 6 * 9 * 2                                       # 54 boundary quads, no interior face
    on_boundary = ((points == 0) | (points == 3)).any(axis=1)
    assert on_boundary[triangles].all()
    meshio.write(tmp_path / "mesh.vtu", meshio.Mesh(points, [("hexahedron", hexes)]))
    figures = Figures(SAVE, tmp_path, dataset=tmp_path / "dataset1.npy")
    true = np.sin(points[:, 0])[None] * np.arange(1, 5)[:, None]             # (T, N)
    figures.traces(true, true * 1.1, 0, "recon", "reconstruction")
    assert [p.name for p in figures.saved] == ["recon.png", "recon_traces.png"]
    _not_blank(tmp_path / "recon.png")


def test_several_fields_are_split_back_into_named_arrays_in_the_xdmf_output(tmp_path):
    from modules.mesh_io import DatasetMesh, write_prediction_series
    points, cells = grid_mesh(3)
    mesh = DatasetMesh(tmp_path / "mesh.vtu", points, [meshio.CellBlock(*cells[0])], ["T", "U_0"], [0.5, 1.0])
    pred = np.random.default_rng(1).random((2, 2, 18)).astype(np.float32)           # (n, T, 2 fields × 9 nodes)
    (tmp_path / "vtk").mkdir()
    write_prediction_series(tmp_path / "vtk", pred, mesh)
    with meshio.xdmf.TimeSeriesReader(tmp_path / "vtk/run_2.xdmf") as reader:
        reader.read_points_cells()
        t, point_data, _ = reader.read_data(1)
    assert t == 1.0
    np.testing.assert_array_equal(point_data["T"], pred[1, 1, :9])
    np.testing.assert_array_equal(point_data["U_0"], pred[1, 1, 9:])


def test_vtk_refuses_a_mesh_that_does_not_fit_the_model(tmp_path):
    from modules.errors import UserError
    from modules.mesh_io import DatasetMesh, check_prediction_mesh
    points, cells = grid_mesh(3)
    mesh = DatasetMesh(tmp_path / "mesh.vtu", points, [meshio.CellBlock(*cells[0])], ["T"], None)
    with pytest.raises(UserError, match=r"predicts 8 nodes, but .*mesh.vtu has 9 nodes"):
        check_prediction_mesh(mesh, tmp_path / "dataset1.npy", 8, tmp_path / "vtk")
    assert not (tmp_path / "vtk").exists()


def test_a_failed_import_into_a_new_folder_leaves_no_folder(tmp_path, capsys):
    _two_runs(tmp_path, _nan)
    code, _, err = import_cli(tmp_path, capsys, "sims/run_*.xdmf", "--field", "T", "--set", "dataset_dir=new/data")
    assert code == 2 and "NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sims"]
