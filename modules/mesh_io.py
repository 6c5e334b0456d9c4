"""Simulation files in and out: solver runs → `dataset1.npy` + `mesh.vtu`; predictions → XDMF.

`--import_runs GLOB --field NAME` reads each run (an XDMF time series, or a folder of one
mesh file per step) with meshio and writes the [P, T, N] dataset run by run into a
memory-mapped `.npy`, so datasets larger than RAM import. Several `--field`s are stacked
as extra nodes (the VAE takes one variable per node): field f occupies nodes f·N … (f+1)·N-1,
and `dataset1.fields.json` beside the dataset records the layout so that prediction and the
figures can split the blocks again.

Everything is written under temporary names and renamed at the end, so a bad input leaves
nothing behind. meshio and matplotlib are imported only when needed.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from modules.errors import UserError
from modules.progress import Ticker

log = logging.getLogger("simulgen")

MESH_FILE = "mesh.vtu"
DATASET_NUMBER = 1
_SERIES_SUFFIXES = (".xdmf", ".xmf")
_COORD_TOL = 1e-6            # coordinates must agree to this fraction of the mesh's bounding-box diagonal


def fields_file(dataset: Path) -> Path:
    """The layout file beside a dataset: dataset1.npy → dataset1.fields.json."""
    return dataset.with_name(f"{dataset.name.split('.')[0]}.fields.json")


# --- which array: NAME, NAME:<component>, NAME:mag --------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    text: str                 # as the user wrote it
    name: str                 # the point-data array
    component: int | None = None
    magnitude: bool = False

    @property
    def label(self) -> str:
        """The name in output files: NAME, NAME_0, NAME_mag (a colon confuses some readers)."""
        if self.component is not None:
            return f"{self.name}_{self.component}"
        return f"{self.name}_mag" if self.magnitude else self.name

    def values(self, point_data: dict, where: str) -> np.ndarray:
        """The selected nodal values (N,) from one step's point data."""
        if self.name not in point_data:
            available = ", ".join(sorted(point_data)) or "none"
            raise UserError(f"{where}: no point-data field {self.name!r} (--field {self.text}); the file has: "
                            f"{available}; pass one of those with --field.")
        array = np.asarray(point_data[self.name], dtype=np.float64)
        array = array.reshape(array.shape[0], -1)                     # (N, components)
        k = array.shape[1]
        if self.magnitude:
            return np.linalg.norm(array, axis=1)
        if self.component is not None:
            if self.component >= k:
                raise UserError(f"{where}: --field {self.text} asks for component {self.component}, but "
                                f"{self.name!r} has {k} component(s); use {self.name}:0 … {self.name}:{k - 1} "
                                f"or {self.name}:mag.")
            return array[:, self.component]
        if k != 1:
            raise UserError(f"{where}: {self.name!r} has {k} components per node; choose one with "
                            f"--field {self.name}:0 (… :{k - 1}) or its magnitude with --field {self.name}:mag.")
        return array[:, 0]


def parse_field(text: str) -> FieldSpec:
    name, sep, tail = text.rpartition(":")
    if sep and name:
        if tail.isdigit():
            return FieldSpec(text, name, component=int(tail))
        if tail == "mag":
            return FieldSpec(text, name, magnitude=True)
    if not text:
        raise UserError("--field needs the name of a point-data array, e.g. --field T, --field U:0 or --field U:mag.")
    return FieldSpec(text, text)


# --- one run: its steps ------------------------------------------------------------------------------
@dataclass
class Step:
    time: float
    points: np.ndarray        # (N, dim)
    cells: list               # meshio CellBlocks
    point_data: dict
    where: str                # the file (and step) for messages


def natural_sorted(paths) -> list[Path]:
    from modules.cond_inputs import natural_key
    return sorted((Path(p) for p in paths), key=lambda p: natural_key(str(p)))


def list_runs(patterns: list[str]) -> list[Path]:
    """Every match of every pattern, once each, in natural order (run_2 before run_10)."""
    matches = {Path(m) for pattern in patterns for m in glob.glob(os.path.expanduser(pattern))}
    if not matches:
        raise UserError(f"--import_runs {' '.join(patterns)} matches nothing; give a pattern (in quotes) that "
                        f"matches one .xdmf time series or one folder of per-step mesh files per run, "
                        f"e.g. --import_runs 'sims/run_*.xdmf'.")
    # An XDMF series' heavy-data file (run_1.h5 beside run_1.xdmf) is part of that run, not a run.
    runs = [m for m in natural_sorted(matches)
            if not (m.suffix.lower() in (".h5", ".hdf5") and any(m.with_suffix(s).is_file() for s in _SERIES_SUFFIXES))]
    for run in runs:
        if not run.is_dir() and run.suffix.lower() not in _SERIES_SUFFIXES:
            raise UserError(f"--import_runs: {run} is neither an XDMF time series (.xdmf) nor a folder of per-step "
                            f"mesh files; narrow the pattern so that it matches only runs.")
    return runs


def _step_files(folder: Path) -> list[Path]:
    import meshio
    known = tuple(meshio.extension_to_filetypes)
    files = [f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(known)]
    if not files:
        raise UserError(f"{folder} holds no mesh files meshio reads (.vtu, .vtk, .xdmf, …); put one file per "
                        f"time step in each run folder.")
    return natural_sorted(files)


def _unreadable(where, exc: Exception) -> UserError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if len(reason) > 200:                                   # whole words: a cut one reads as a typo
        reason = reason[:200].rsplit(" ", 1)[0] + " …"
    return UserError(f"cannot read {where} ({reason}); check that the file is complete and in a format meshio "
                     f"reads (.xdmf with its .h5 beside it, .vtu, .vtk, …).")


def count_steps(run: Path) -> int:
    if run.is_dir():
        return len(_step_files(run))
    import meshio
    try:
        return meshio.xdmf.TimeSeriesReader(run).num_steps
    except Exception as exc:                # malformed XML, not an XDMF time series, ...
        raise _unreadable(run, exc) from None


def read_steps(run: Path) -> Iterator[Step]:
    import meshio
    if run.is_dir():
        for k, path in enumerate(_step_files(run)):
            try:
                mesh = meshio.read(path)
            except Exception as exc:
                raise _unreadable(path, exc) from None
            time = mesh.field_data.get("TimeValue", mesh.field_data.get("time"))
            time = float(np.ravel(time)[0]) if time is not None else float(k)
            yield Step(time, np.asarray(mesh.points), mesh.cells, mesh.point_data, str(path))
        return
    try:
        with meshio.xdmf.TimeSeriesReader(run) as reader:
            points, cells = reader.read_points_cells()
            for k in range(reader.num_steps):
                time, point_data, _ = reader.read_data(k)
                yield Step(float(time), np.asarray(points), cells, point_data, f"{run} (step {k})")
    except UserError:
        raise
    except Exception as exc:                # a missing .h5, a truncated dataset, ...
        raise _unreadable(run, exc) from None


def _check_same_mesh(points: np.ndarray, reference: Step, where: str) -> None:
    ref = reference.points
    if points.shape[0] != ref.shape[0]:
        raise UserError(f"{where} has {points.shape[0]} nodes, but {reference.where} has {ref.shape[0]}: every run "
                        f"must be on the same mesh; re-export the runs on one mesh (or import them separately).")
    dim = max(points.shape[1], ref.shape[1])
    a = np.pad(points, ((0, 0), (0, dim - points.shape[1])))
    b = np.pad(ref, ((0, 0), (0, dim - ref.shape[1])))
    tol = _COORD_TOL * max(float(np.linalg.norm(b.max(0) - b.min(0))), 1e-300)
    dist = np.linalg.norm(a - b, axis=1)
    worst = int(dist.argmax())
    if dist[worst] > tol:
        raise UserError(f"{where}: node {worst} is at {a[worst].tolist()}, but at {b[worst].tolist()} in "
                        f"{reference.where} (tolerance {tol:.3g}): every run must be on the same mesh with the same "
                        f"node numbering; re-export the runs on one mesh.")


# --- the import ----------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    dataset: Path
    mesh: Path
    layout: Path
    runs: list[Path]
    steps: int
    nodes: int                # per field
    fields: list[str]
    times: list[float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.runs), self.steps, self.nodes * len(self.fields)


def import_runs(patterns: list[str], field_texts: list[str], out_dir: Path, force: bool = False) -> ImportResult:
    """Read every run, check it, and write dataset1.npy, mesh.vtu and dataset1.fields.json to
    `out_dir`; all or nothing. A dataset already there is replaced only with `force`, and then kept beside
    it (`<name>.replaced-<time>`)."""
    from modules.checkpoint import current_umask, ensure_writable
    specs = [parse_field(t) for t in field_texts]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--field is given twice for the same values ({', '.join(field_texts)}); name each field once.")
    runs = list_runs(patterns)
    dataset = out_dir / f"dataset{DATASET_NUMBER}.npy"
    outputs = {dataset: None, out_dir / MESH_FILE: None, fields_file(dataset): None}
    present = [path for path in outputs if path.exists()]
    if present and not force:
        raise UserError(f"{present[0]} already exists; importing would replace it: pass --force to replace it (the "
                        f"old files are kept beside it as *.replaced-<time>), or import into another folder with "
                        f"--set dataset_dir=DIR.")
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]      # the folders ensure_writable makes
    ensure_writable([out_dir], "--import_runs", "choose a writable folder with --set dataset_dir=DIR")
    try:
        for path in outputs:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
            os.close(fd)
            outputs[path] = Path(tmp)
        result = _import(runs, specs, dataset, outputs)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in present:                # kept, as a fresh training run keeps the previous checkpoints
            os.replace(path, path.with_name(f"{path.name}.replaced-{stamp}"))
            log.warning("kept the replaced %s as %s", path, path.with_name(f"{path.name}.replaced-{stamp}"))
        for path, tmp in outputs.items():
            os.chmod(tmp, 0o666 & ~current_umask())            # mkstemp made it 0600
            os.replace(tmp, path)
        created = []
        return result
    except OSError as exc:
        raise UserError(f"cannot write to {out_dir} ({exc.strerror or exc}); free disk space or choose another "
                        f"folder with --set dataset_dir=DIR; nothing was written.") from None
    finally:
        for tmp in outputs.values():
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        for folder in created:      # a failed import leaves no empty folder either (innermost first)
            with contextlib.suppress(OSError):
                folder.rmdir()


def _step_row(step: Step, specs: list[FieldSpec]) -> np.ndarray:
    """One step's requested fields stacked as node blocks (F·N,), every value nodal and finite."""
    parts = [spec.values(step.point_data, step.where) for spec in specs]
    for spec, part in zip(specs, parts):
        if len(part) != len(step.points):
            raise UserError(f"{step.where}: --field {spec.text} has {len(part)} values but the mesh "
                            f"{len(step.points)} nodes; export it as point (nodal) data.")
    row = np.concatenate(parts)
    bad = ~np.isfinite(row)
    if bad.any():
        node = int(np.flatnonzero(bad)[0])
        raise UserError(f"{step.where}: {int(bad.sum())} NaN/Inf value(s) in --field "
                        f"{specs[node // len(step.points)].text} (first at node {node % len(step.points)}); "
                        f"fix or leave out this run.")
    return row


def _import(runs: list[Path], specs: list[FieldSpec], dataset: Path, outputs: dict[Path, Path]) -> ImportResult:
    import meshio
    from numpy.lib.format import open_memmap

    num_steps = count_steps(runs[0])
    if num_steps == 0:
        raise UserError(f"{runs[0]} holds no time steps; every run needs at least one.")
    reference: Step | None = None
    times: list[float] = []
    store = None
    ticker = Ticker("import", len(runs), "run")
    log.info("importing %d runs from %s … %s", len(runs), runs[0], runs[-1])
    for i, run in enumerate(runs):
        ticker.tick(i)
        n = count_steps(run)
        if n != num_steps:
            raise UserError(f"{run} has {n} time steps, but {runs[0]} has {num_steps}: every run needs the same "
                            f"number of steps; re-export the runs with the same output times (or drop this one).")
        run_times = []
        for k, step in enumerate(read_steps(run)):
            if reference is None:
                reference = step
            _check_same_mesh(step.points, reference, step.where)
            row = _step_row(step, specs)                                                         # (F·N,)
            if store is None:    # (P, T, F·N), written run by run: only one step is in memory at a time
                store = open_memmap(outputs[dataset], mode="w+", dtype=np.float32,
                                    shape=(len(runs), num_steps, row.size))
            store[i, k] = row
            run_times.append(step.time)
        store.flush()
        if i == 0:
            times = run_times
        elif not np.allclose(run_times, times, rtol=1e-6, atol=0):
            log.warning("%s has other time values than %s; the dataset assumes step k is the same time in every "
                        "run", run, runs[0])
    del store
    nodes = len(reference.points)
    points = np.pad(reference.points, ((0, 0), (0, 3 - reference.points.shape[1])))    # VTU stores x, y, z
    meshio.write(outputs[dataset.with_name(MESH_FILE)], meshio.Mesh(points, reference.cells), file_format="vtu")
    layout = {"fields": [s.label for s in specs], "field_args": [s.text for s in specs], "nodes_per_field": nodes,
              "layout": "[P, T, F*N]: field f occupies nodes f*N ... (f+1)*N-1, in mesh.vtu's node order",
              "times": times, "mesh": MESH_FILE, "runs": [str(r) for r in runs]}
    outputs[fields_file(dataset)].write_text(json.dumps(layout, indent=2) + "\n")
    return ImportResult(dataset, dataset.with_name(MESH_FILE), fields_file(dataset), runs, num_steps, nodes,
                        layout["fields"], times)


def condition_lines(result: ImportResult, dataset_dir: str) -> list[str]:
    """The condition.txt lines that match the imported dataset."""
    P, T, N = result.shape
    lines = [f"Dim1\t\t{P}", f"Dim2\t\t{T}", f"Dim3\t\t{N}", f"Dim2_red\t{T}", f"Dim3_red\t{N}", f"n_sample\t{P}"]
    if dataset_dir:
        lines.append(f"dataset_dir\t{dataset_dir}")
    return lines


# --- the mesh beside a dataset (figures, prediction) ---------------------------------------------------
@dataclass
class DatasetMesh:
    path: Path
    points: np.ndarray        # (N, dim)
    cells: list               # meshio CellBlocks
    fields: list[str]
    times: list[float] | None

    @property
    def nodes(self) -> int:
        return len(self.points)

    @property
    def total_nodes(self) -> int:
        return self.nodes * len(self.fields)

    def split(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """(..., F·N) → {field: (..., N)} in the stored order."""
        return {name: values[..., f * self.nodes:(f + 1) * self.nodes] for f, name in enumerate(self.fields)}

    def vtk_fields(self, with_bands: bool) -> list[str]:
        """The point-data names `write_prediction_series` writes."""
        return [*self.fields, *[f"{n}_{b}" for n in self.fields for b in BAND_FIELDS]] if with_bands else list(self.fields)


def load_dataset_mesh(dataset: Path) -> DatasetMesh | None:
    """mesh.vtu beside `dataset` (and the field layout from dataset<d>.fields.json), or None."""
    path = Path(dataset).parent / MESH_FILE
    if not path.is_file():
        return None
    import meshio
    try:
        mesh = meshio.read(path)
    except Exception as exc:
        raise _unreadable(path, exc) from None
    fields, times = ["field"], None
    layout = fields_file(Path(dataset))
    if layout.is_file():
        try:
            info = json.loads(layout.read_text())
            fields, times = list(info["fields"]), [float(t) for t in info["times"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{layout} is damaged ({type(exc).__name__}: {exc}); import the runs again with "
                            f"--import_runs, or delete it (the field is then called 'field').") from None
    return DatasetMesh(path, np.asarray(mesh.points, dtype=np.float64), mesh.cells, fields, times)


# --- predictions as XDMF time series ---------------------------------------------------------------------
def check_prediction_mesh(mesh: DatasetMesh | None, dataset: Path, nodes: int, vtk_dir: Path) -> DatasetMesh:
    from modules.checkpoint import ensure_writable
    where = Path(dataset).parent / MESH_FILE
    if mesh is None:
        raise UserError(f"--vtk needs the mesh of the training data, {where} (beside the dataset the model was "
                        f"trained on), but it is not there; import the runs with --import_runs (which writes it), or "
                        f"put the mesh there as a .vtu with the dataset's nodes in order.")
    if mesh.total_nodes != nodes:
        raise UserError(f"--vtk: the model predicts {nodes} nodes, but {mesh.path} has {mesh.nodes} nodes × "
                        f"{len(mesh.fields)} field(s) = {mesh.total_nodes}; train with Dim3_red = Dim3 to write "
                        f"whole fields on the mesh.")
    ensure_writable([vtk_dir], f"--vtk {vtk_dir}", "choose a writable folder")
    return mesh


BAND_FIELDS = ("mean", "std", "q05", "q95")      # with --samples: written beside the point prediction
COLLECTION_FILE = "runs.xdmf"                    # every run in one file, for ParaView


def write_collection(path: Path, series: list[Path]) -> None:
    """One XDMF file listing every run of `series` (meshio time series in path's folder): a temporal
    collection whose every step is a spatial collection of one grid per run, named after its file.

    ParaView's .pvd lists VTK XML files (.vtu) only, so the runs are gathered in XDMF, the canonical
    temporal-of-spatial nesting that ParaView's XDMF readers and VisIt read as one multiblock per step.
    Each grid points at its own run's .h5 (names relative to the folder): the XML is meshio's,
    rearranged, with the mesh's Geometry and Topology spelled out where meshio includes them."""
    import xml.etree.ElementTree as ET
    steps: list[tuple[str, list[ET.Element]]] = []
    for k, file in enumerate(series):
        domain = ET.parse(path.parent / file).getroot().find("Domain")
        mesh = domain.find("Grid[@Name='mesh']")
        shape = [mesh.find("Geometry"), mesh.find("Topology")]
        temporal = domain.find("Grid[@CollectionType='Temporal']")
        for j, step in enumerate(temporal.findall("Grid")):
            if k == 0:
                steps.append((step.find("Time").get("Value"), []))
            grid = ET.Element("Grid", Name=file.stem, GridType="Uniform")
            grid.extend(shape + step.findall("Attribute"))
            steps[j][1].append(grid)
    root = ET.Element("Xdmf", Version="3.0")
    runs = ET.SubElement(ET.SubElement(root, "Domain"), "Grid", Name="runs", GridType="Collection",
                         CollectionType="Temporal")
    for time_value, grids in steps:
        step = ET.SubElement(runs, "Grid", Name=f"t={time_value}", GridType="Collection", CollectionType="Spatial")
        ET.SubElement(step, "Time", Value=time_value)
        step.extend(grids)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_prediction_series(vtk_dir: Path, point: np.ndarray, mesh: DatasetMesh,
                            bands: dict[str, np.ndarray] | None = None) -> list[Path]:
    """One XDMF time series (+ .h5) per input: `run_<i>.xdmf` holds input i (numbered from 1); and
    `runs.xdmf` (COLLECTION_FILE), every run in one file (`write_collection`), written last.

    point: (n, T, F·N), the point prediction, under each field's name; with `bands` (--samples: the bands
    file's arrays) also the samples' mean and std and the calibrated 90 % band's edges as `<name>_mean`,
    `<name>_std`, `<name>_q05` and `<name>_q95`."""
    import meshio
    T = point.shape[-2]
    times = mesh.times[:T] if mesh.times and len(mesh.times) >= T else list(range(T))
    staging = Path(tempfile.mkdtemp(prefix=".vtk-", dir=vtk_dir))
    written = []
    try:
        # meshio's TimeSeriesWriter creates the .h5 in the current directory and references it by
        # its bare name; writing from inside the folder keeps the pair together and relative.
        with contextlib.chdir(staging):
            for i in range(point.shape[0]):
                with meshio.xdmf.TimeSeriesWriter(f"run_{i + 1}.xdmf") as writer:
                    writer.write_points_cells(mesh.points, mesh.cells)
                    for k, t in enumerate(times):
                        data = {n: np.ascontiguousarray(v) for n, v in mesh.split(point[i, k]).items()}
                        for band in BAND_FIELDS if bands is not None else ():
                            data.update({f"{n}_{band}": np.ascontiguousarray(v)
                                         for n, v in mesh.split(bands[band][i, k]).items()})
                        writer.write_data(t, point_data=data)
                written.append(i + 1)
            write_collection(Path(COLLECTION_FILE), [Path(f"run_{i}.xdmf") for i in written])
        paths = []
        for i in written:
            for suffix in (".xdmf", ".h5"):
                target = vtk_dir / f"run_{i}{suffix}"
                os.replace(staging / target.name, target)
                paths.append(target)
        os.replace(staging / COLLECTION_FILE, vtk_dir / COLLECTION_FILE)   # last: every run it lists is there
        return [*paths, vtk_dir / COLLECTION_FILE]
    except OSError as exc:
        raise UserError(f"cannot write to --vtk {vtk_dir} ({exc.strerror or exc}); free disk space or choose "
                        f"another folder.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- geometry for figures ------------------------------------------------------------------------------
_FACES = {        # the corner faces of volume cells (meshio's node order = VTK's)
    "tetra": [(0, 1, 2), (0, 1, 3), (1, 2, 3), (0, 2, 3)],
    "hexahedron": [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)],
    "wedge": [(0, 1, 2), (3, 4, 5), (0, 1, 4, 3), (1, 2, 5, 4), (2, 0, 3, 5)],
    "pyramid": [(0, 1, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)],
}
_SURFACE = {"triangle": 3, "quad": 4}


def _base_type(cell_type: str) -> str:
    return cell_type.rstrip("0123456789")        # triangle6 → triangle, hexahedron20 → hexahedron


def surface_triangles(cells: list) -> np.ndarray:
    """Triangles (M, 3) to draw: the 2-D cells themselves (quads split in two), or, for a
    volume mesh, its boundary faces (faces of exactly one cell). Corner nodes only."""
    volume = [c for c in cells if _base_type(c.type) in _FACES]
    faces: list[np.ndarray] = []
    if volume:
        by_size: dict[int, list] = {}
        for block in volume:
            data = np.asarray(block.data)
            for face in _FACES[_base_type(block.type)]:
                by_size.setdefault(len(face), []).append(data[:, list(face)])
        for size, groups in by_size.items():
            all_faces = np.concatenate(groups)                                    # (M, size)
            _, first, count = np.unique(np.sort(all_faces, axis=1), axis=0, return_index=True, return_counts=True)
            faces.append(all_faces[first[count == 1]])                            # faces of one cell only
    else:
        faces = [np.asarray(c.data)[:, :_SURFACE[_base_type(c.type)]] for c in cells if _base_type(c.type) in _SURFACE]
    triangles = []
    for f in faces:
        if f.shape[1] == 3:
            triangles.append(f)
        else:                                          # a quad (0 1 2 3) → (0 1 2) + (0 2 3)
            triangles += [f[:, [0, 1, 2]], f[:, [0, 2, 3]]]
    return np.concatenate(triangles).astype(np.int64) if triangles else np.zeros((0, 3), np.int64)


def plane_coordinates(points: np.ndarray) -> np.ndarray | None:
    """(N, 2) coordinates when the mesh lies in a coordinate plane (z = const, …), else None."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape[1] == 2:
        return points
    extent = points.max(0) - points.min(0)
    flat = extent <= 1e-9 * max(float(extent.max()), 1e-300)
    if flat.sum() >= 1:
        keep = np.flatnonzero(~flat)[:2]
        if len(keep) == 2:
            return points[:, keep]
    return None
