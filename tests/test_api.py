"""The Python API (modules/api.py) does what the command line does, on the same model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, demo_workdir, run_cli
from modules.api import Surrogate, config, fit
from modules.errors import UserError


@pytest.fixture(scope="module")
def fitted(trained_demo):
    return trained_demo


def test_fit_trains_in_the_working_folder_as_the_command_line_does(fitted):
    work, surrogate, summary = fitted
    assert (work / "checkpoints/conditioner.pt").is_file() and summary["vae_epochs"] == 2
    assert json.loads(next((work / "runs").glob("*/summary.json")).read_text())["run_id"] == summary["run_id"]
    assert surrogate.shape == (32, 256)


def test_predict_sample_and_evaluate_equal_the_command_lines(fitted, tmp_path):
    work, surrogate, _ = fitted
    rows = np.loadtxt(work / "input_data/params.csv", delimiter=",")[:3]
    np.savetxt(tmp_path / "rows.csv", rows, delimiter=",")
    truth = np.load(work / "input_data/dataset1.npy")[:3]
    np.save(tmp_path / "truth.npy", truth)
    result = run_cli(work, "--predict", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "p.npy"), "--samples", "4",
                     "--evaluate", str(tmp_path / "truth.npy"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(surrogate.predict(rows), np.load(tmp_path / "p.npy"))
    point, samples, bands = surrogate.sample(rows, 4)
    np.testing.assert_array_equal(samples, np.load(tmp_path / "p_samples.npy"))
    with np.load(tmp_path / "p_bands.npz") as saved:
        for name in saved.files:
            np.testing.assert_array_equal(bands[name], saved[name])
    report = surrogate.evaluate(rows, truth, samples=4)
    cli_report = json.loads((tmp_path / "p_evaluation.json").read_text())
    np.testing.assert_allclose(report["per_run"]["rel_l2"], cli_report["per_run"]["rel_l2"], rtol=1e-6)
    assert report["calibration"]["coverage_90"] == pytest.approx(cli_report["calibration"]["coverage_90"])
    far = rows[:1].copy()
    far[0, 1] += 10 * np.ptp(np.loadtxt(work / "input_data/params.csv", delimiter=",")[:, 1])
    assert surrogate.outside(np.vstack([rows, far])) == [False, False, False, True]


def test_load_from_the_folder_or_checkpoints_and_wrong_inputs_are_one_line_errors(fitted, tmp_path):
    work, surrogate, _ = fitted
    rows = np.loadtxt(work / "input_data/params.csv", delimiter=",")[:2]
    again = Surrogate.load(work / "checkpoints")
    np.testing.assert_array_equal(again.predict(rows), surrogate.predict(rows))
    for call, fragment in ((lambda: surrogate.predict(rows[:, :3]), "rows of 4 parameters, not 3"),
                           (lambda: surrogate.evaluate(rows, np.zeros((2, 32, 100))), r"they must be \(2, 32, 256\)"),
                           (lambda: surrogate.sample(rows, 1), "2 or more"),
                           (lambda: Surrogate.load(tmp_path / "nowhere"), "no such folder"),
                           (lambda: config(ROOT / "input_data/condition.txt", Training_epoch=3), "did you mean")):
        with pytest.raises(UserError, match=fragment) as error:
            call()
        assert "\n" not in str(error.value)
