"""The default pipeline on data with the traits of real solver output, end to end.

Each case is a small study solved with scikit-fem (benchmarks/accuracy/fem.py), brought in as
a user brings theirs (a `.npy`, or XDMF files through `--import_runs`), trained with the shipped
condition.txt (only the data keys changed, a few epochs), then predicted with `--samples` and
scored with `--evaluate` on runs it never saw. Every command must succeed without a traceback,
and the property the case names must hold in the prediction (e.g. a node held at a fixed
value is predicted at that value).

Four studies carry the traits between them (each training costs CI time):

    trait                                   study
    nodes held at one value (Dirichlet)     plate (the right edge, 293.15 K in every run)
    nodes constant in time only             plate (the hole's wall: one temperature per run)
    no mesh at all (a plain .npy)           plate, few_runs
    float64 fields                          plate, few_runs (the solver's own float64)
    a parameter column that never varies    plate
    duplicate runs                          plate
    1 saved step                            few_runs
    fewer than 20 runs                      few_runs (8 runs; the shipped batch of 16 becomes 6)
    a large offset, small variation         block_3d (300 K ± 0.05 K)
    3-D tetrahedral mesh via --import_runs  block_3d
    2-D unstructured mesh via --import_runs thermoelastic
    negative and signed fields              thermoelastic (a displacement component, m, both signs)
    stacked fields of different units       thermoelastic (K and m)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import ROOT, clean_env

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))
import fem  # noqa: E402
from _common import condition_text  # noqa: E402

BUDGET = {"Training_epochs": 4, "point_net_steps": 60, "frame_net_epochs": 4}   # a few epochs: traits, not accuracy
HELD_OUT = 4                # runs kept out of training, predicted and evaluated at the end


@dataclass
class Study:
    params: np.ndarray                   # (P, d)
    fields: np.ndarray | None = None     # (P, T, N) for a .npy study
    mesh: object = None                  # scikit-fem mesh for an imported study
    values: dict = field(default_factory=dict)     # point-data name -> (P, T, N[, c]) for an imported study
    imported: tuple[str, ...] = ()      # --field arguments


def _plate_runs(runs: int, steps: int = 20, every: int = 4, seed: int = 3) -> tuple[np.ndarray, object, np.ndarray]:
    params = fem.latin_hypercube(np.random.default_rng(seed), fem.STUDIES["heat_plate"].parameters, runs)
    mesh, fields = fem.heat_plate(params, spacing=0.012, steps=steps, every=every)
    return params, mesh, fields


def _plate() -> Study:
    """Dirichlet and Robin boundaries, no mesh, a column that never varies (the third) and duplicate runs."""
    params, _, fields = _plate_runs(20 + HELD_OUT)
    pick = np.r_[np.arange(20), 2, 5, 5, 11, np.arange(20, 20 + HELD_OUT)]    # three training runs twice, one thrice
    params = np.column_stack([params[:, :2], np.full(len(params), 0.005), params[:, 2:]])
    return Study(params[pick], fields[pick])


def _few_runs() -> Study:
    params, _, fields = _plate_runs(8 + HELD_OUT, steps=8, every=8)
    return Study(params, fields)


def _block_3d() -> Study:
    table = list(fem.STUDIES["heat_block_3d"].parameters)
    table[3] = ("power", 1.0, 3.0, "W", 4)                                        # warms the block by ~0.05 K
    params = fem.latin_hypercube(np.random.default_rng(5), tuple(table), 24)
    mesh, fields = fem.heat_block_3d(params, cells=(6, 5, 3), steps=16, every=4)
    return Study(params, mesh=mesh, values={"T": fields + (300.0 - fem.T_AMBIENT)}, imported=("T",))   # 300 K ± 0.05


def _thermoelastic() -> Study:
    params = fem.latin_hypercube(np.random.default_rng(7), fem.STUDIES["thermoelastic"].parameters, 24)
    mesh, temperature, displacement = fem.thermoelastic(params, spacing=0.012, steps=16, every=4)
    return Study(params, mesh=mesh, values={"T": temperature, "displacement": displacement},
                 imported=("T", "displacement:0"))


CASES: dict[str, Callable[[], Study]] = {"plate": _plate, "few_runs": _few_runs, "block_3d": _block_3d,
                                         "thermoelastic": _thermoelastic}


def cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "SimulGen-VAE.py"), *args], cwd=work, env=clean_env(),
                            capture_output=True, text=True, timeout=900)
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def stage(study: Study, work: Path) -> np.ndarray:
    """The study's training runs in `work` as a user would put them there; returns the held-out runs'
    true fields (HELD_OUT, T, N) in the dataset's layout."""
    train = len(study.params) - HELD_OUT
    data = work / "input_data"
    data.mkdir(parents=True)
    np.savetxt(data / "params.csv", study.params[:train], delimiter=",", fmt="%.10g")
    np.savetxt(work / "new.csv", study.params[train:], delimiter=",", fmt="%.10g")
    if study.fields is not None:
        np.save(data / "dataset1.npy", study.fields[:train])
        return study.fields[train:]
    steps = next(iter(study.values.values())).shape[1]
    for i in range(len(study.params)):
        fem.write_xdmf(work / ("sims" if i < train else "held") / f"run_{i + 1}.xdmf", study.mesh,
                       {name: v[i] for name, v in study.values.items()}, np.arange(1, steps + 1, dtype=float))
    fields = [a for f in study.imported for a in ("--field", f)]
    cli(work, "--import_runs", "sims/run_*.xdmf", *fields, "--set", "dataset_dir=input_data")
    held = work / "held_data"
    cli(work, "--import_runs", "held/run_*.xdmf", *fields, "--set", "dataset_dir=held_data")
    return np.load(held / "dataset1.npy")


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    """(case, work, study, held-out truth, training summary) after the default training."""
    study = CASES[request.param]()
    work = tmp_path_factory.mktemp(request.param)
    truth = stage(study, work)
    runs, steps, nodes = np.load(work / "input_data/dataset1.npy", mmap_mode="r").shape
    values = {"Dim1": runs, "Dim2": steps, "Dim3": nodes, "Dim2_red": steps, "Dim3_red": nodes, "n_sample": runs,
              "num_param": study.params.shape[1], "param_dir": "/input_data/params.csv"}
    (work / "input_data/condition.txt").write_text(condition_text(ROOT / "input_data/condition.txt", values))
    shutil.copy(ROOT / "preset.txt", work / "preset.txt")
    sets = [a for k, v in BUDGET.items() for a in ("--set", f"{k}={v}")]
    result = cli(work, "--preset=1", "--plot=2", "--lc_only=0", "--size=small", "--load_all=1", *sets)
    summary = json.loads(next((work / "runs").glob("*/summary.json")).read_text())
    return request.param, work, study, truth, summary, result


def test_the_default_pipeline_trains_predicts_and_evaluates(trained):
    case, work, study, truth, summary, training = trained
    np.save(work / "truth.npy", truth)
    cli(work, "--predict", "new.csv", "--out", "pred.npy", "--samples", "4", "--evaluate", "truth.npy")
    point, draws = np.load(work / "pred.npy"), np.load(work / "pred_samples.npy")
    report = json.loads((work / "pred_evaluation.json").read_text())
    assert point.shape == truth.shape and draws.shape == (HELD_OUT, 4, *truth.shape[1:])
    assert np.isfinite(point).all() and np.isfinite(draws).all()
    ours = report["summary"]["rel_l2"]["mean"]
    mean_field = report["summary"]["baseline_mean_rel_l2"]["mean"]
    assert np.isfinite(ours) and ours < mean_field, (ours, mean_field)
    assert 0.0 <= report["calibration"]["coverage_90"] <= 1.0 and np.isfinite(report["calibration"]["crps"])
    assert np.isfinite(summary["lc_val_rel_l2"]) and np.isfinite(summary["vae_recon_rel_l2"])
    for check in CHECKS[case]:
        check(work, study, truth, point.astype(np.float64), summary, training)


def _fixed_nodes_stay_fixed(work, study, truth, point, summary, training):
    """The right edge (293.15 K in every run) is predicted exactly (to float32), the hole's wall (one temperature
    per run, a parameter) within 1.5 K (measured 1.23 K after 4 epochs on 20 runs and 4 duplicates)."""
    fixed = np.ptp(truth, axis=(0, 1)) == 0
    wall = (np.ptp(truth, axis=1) == 0).all(axis=0) & ~fixed
    assert fixed.sum() >= 5 and wall.sum() >= 5
    np.testing.assert_allclose(point[:, :, fixed], truth[:, :, fixed], rtol=0, atol=1e-4)
    assert np.abs(point[:, :, wall] - truth[:, :, wall]).max() < 1.5
    assert summary["lc_point_net_positions"] == "embedding"                 # no mesh: the nodes were embedded


def _a_constant_column_is_ignored(work, study, truth, point, summary, training):
    """A new value in the column that never varied changes nothing, and is flagged as outside the training data."""
    rows = np.loadtxt(work / "new.csv", delimiter=",", ndmin=2)
    rows[:, 2] = 0.007
    np.savetxt(work / "moved.csv", rows, delimiter=",")
    moved = cli(work, "--predict", "moved.csv", "--out", "moved.npy")
    np.testing.assert_array_equal(np.load(work / "moved.npy"), point.astype(np.float32))
    assert "outside the training data" in moved.stderr and "column 3 = 0.007" in moved.stderr


def _one_step(work, study, truth, point, summary, training):
    assert point.shape == (HELD_OUT, 1, truth.shape[2])


def _batches_fit_the_split(work, study, truth, point, summary, training):
    """8 runs: the shipped Batch_size 16 becomes the 6 training runs, with a warning."""
    assert "key 'Batch_size': 16 is larger than the 6 training runs" in training.stderr
    config = json.loads(next((work / "runs").glob("*/config.json")).read_text())
    assert config["config"]["vae"]["Batch_size"] == 6


def _small_variation(work, study, truth, point, summary, training):
    """300 K ± 0.05 K: the variation between runs is predicted better than by the training mean (measured 0.60 of
    the held-out runs' spread)."""
    spread = np.linalg.norm(truth - truth.mean(axis=0))
    assert np.linalg.norm(point - truth) < 0.8 * spread
    assert np.ptp(truth) < 0.1 and truth.min() > 299.9


def _on_the_mesh(work, study, truth, point, summary, training):
    assert summary["lc_point_net_positions"] == "mesh.vtu"


def _stacked_signed_units(work, study, truth, point, summary, training):
    """Temperature (K, ~400) and a displacement component of both signs (m, ~1e-5) stacked: each field is
    predicted in its own units (measured 0.0016 and 0.031 of each field's
    norm; before per-field units a displacement's error was 9,700 times its norm)."""
    half = truth.shape[2] // 2
    displacement = truth[..., half:]
    assert (displacement < 0).mean() > 0.2 and (displacement > 0).mean() > 0.2
    errors = [np.linalg.norm(point[..., part] - truth[..., part]) / np.linalg.norm(truth[..., part])
              for part in (slice(0, half), slice(half, None))]
    assert errors[0] < 0.002 and errors[1] < 0.04, errors


CHECKS = {"plate": (_fixed_nodes_stay_fixed, _a_constant_column_is_ignored),
          "few_runs": (_one_step, _batches_fit_the_split),
          "block_3d": (_small_variation, _on_the_mesh),
          "thermoelastic": (_stacked_signed_units, _on_the_mesh)}
