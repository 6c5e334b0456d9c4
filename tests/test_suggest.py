"""--suggest: rows where the trained surrogate's calibrated spread is largest, spread apart (modules/suggest.py)."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from modules.calibration import spread_and_error
from modules.cli import main
from modules.cond_inputs import read_param_csv
from modules.gp import JITTER, GPPosterior
from modules.suggest import LatentVariance, _csv_bytes, gp_hyper, sobol_rows, suggest

ROWS = 6
# The least distance between suggested rows, in units of the box's sides: measured 0.42-0.88 over these tests' boxes,
# seeds and candidate counts (512, 1,024); the 6 candidates of the largest spread: 0.13-0.21.
APART = 0.35


def _box(model) -> tuple[np.ndarray, np.ndarray]:
    return model.input_scaler.data_min.astype(np.float64), model.input_scaler.data_max.astype(np.float64)


def _closest(rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """The least distance between two rows, each column scaled to the box's side."""
    unit = (rows - low) / (high - low)
    d = np.linalg.norm(unit[:, None] - unit[None], axis=-1)
    return float(d[np.triu_indices(len(rows), 1)].min())


def _inside(rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    tol = 1e-6 * (high - low)
    return bool(((rows >= low - tol) & (rows <= high + tol)).all())


def test_the_rank_one_update_is_the_gp_conditioned_on_the_picks(trained_demo):
    model = trained_demo[1].model
    gp = model.conditioner
    x = model.prepare(sobol_rows(*_box(model), np.zeros(model.num_param, bool), 64, 1).astype(np.float32)).double()
    latent = LatentVariance(gp, x.numpy())
    _, std = gp.predict(x)
    np.testing.assert_allclose(latent.variance(), std.numpy() ** 2, rtol=1e-8, atol=1e-12)
    latent.add(3)
    latent.add(40)
    inputs = np.concatenate([gp.x.numpy(), x.numpy()[[3, 40]]])
    post = GPPosterior.condition(gp_hyper(gp), inputs, np.random.default_rng(0).normal(size=(len(inputs), gp.y_std.numel())))
    _, after = post.predict(x.numpy())                       # a variance does not depend on the outcomes
    np.testing.assert_allclose(latent.variance(), (after / post.y_std * gp.y_std.numpy()) ** 2, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(latent.mean, gp.predict(x)[0].numpy(), rtol=1e-8, atol=1e-10)
    assert (latent.variance() <= std.numpy() ** 2 * (1 + 1e-9)).all()
    # the difficulty model's kernel conditioned on the picks alone, without noise: gone at a pick
    errors = LatentVariance.unconditioned(gp_hyper(gp, "difficulty_"), x.numpy())
    errors.add(3)
    kernel = gp_hyper(gp, "difficulty_")
    k = kernel.matrix(0, x.numpy(), x.numpy()[[3]])[:, 0]
    np.testing.assert_allclose(errors.reducible()[:, 0], kernel.amplitude[0] - k ** 2 / (kernel.amplitude[0] + JITTER),
                               rtol=1e-6, atol=1e-9)
    assert errors.reducible()[3, 0] < 1e-6 * kernel.amplitude[0]
    # at a simulated input the GP's own variance is at most its noise's
    assert (latent.reducible()[[3, 40]] <= (gp.noise.numpy() + JITTER) * gp.y_std.numpy() ** 2 * (1 + 1e-6)).all()


def test_rows_go_where_the_spread_is_largest_and_apart(trained_demo):
    model = trained_demo[1].model
    low, high = _box(model)
    result = suggest(model, ROWS, low, high, seed=0, candidates=512)
    assert result.rows.shape == (ROWS, model.num_param) and _inside(result.rows, low, high)
    assert result.spread[0] == result.candidate_spread.max() == result.when_chosen[0]
    assert (np.diff(result.when_chosen) <= 1e-12).all()          # each pick shrinks every candidate's spread
    top = result.candidates[np.argsort(result.candidate_spread)[::-1][:ROWS]]
    assert _closest(result.rows, low, high) > max(APART, _closest(top, low, high))
    # The closed form is the spread of the calibrated predictive draws Surrogate.sample gives.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        point, draws = model.sample(model.prepare(result.rows[:2].astype(np.float32)), 64, sampling="predictive")
    drawn, _ = spread_and_error(draws, point, point)
    np.testing.assert_allclose(result.spread[:2], drawn, rtol=0.15)


def test_command_line_writes_rows_for_the_solver(trained_demo, tmp_path, capsys):
    work, surrogate, _ = trained_demo
    train_low, train_high = _box(surrogate.model)
    low, high = train_low, train_low + 0.4 * (train_high - train_low)
    bounds = tmp_path / "bounds.csv"
    np.savetxt(bounds, np.stack([low, high]), delimiter=",")
    out = tmp_path / "next" / "rows.csv"
    out.parent.mkdir()
    out.write_text("finished work\n")
    # finished work is not replaced silently; with --force it is kept beside
    assert main(["--checkpoints", str(work), "--suggest", "2", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "finished work\n"
    done = run_cli(work, "--suggest", str(ROWS), "--bounds", str(bounds), "--out", str(out), "--plot", "1", "--seed",
                   "3", "--force")
    assert done.returncode == 0, done.stderr
    assert [p.read_text() for p in out.parent.glob("rows.csv.replaced-*")] == ["finished work\n"]
    rows = np.loadtxt(out, delimiter=",", ndmin=2)
    assert rows.shape == (ROWS, len(low)) and _inside(rows, low, high)
    assert _closest(rows, low, high) > APART, _closest(rows, low, high)
    meta = json.loads(out.with_suffix(".json").read_text())
    np.testing.assert_allclose([r["values"] for r in meta["rows"]], rows, rtol=1e-8)
    assert meta["rows"][0]["spread"] == meta["candidate_spread"]["max"] and meta["candidates"] == 1024
    assert meta["bounds"]["source"] == str(bounds) and meta["seed"] == 3
    assert (out.parent / "rows_candidates.png").stat().st_size > 0


def test_the_rows_file_reads_back_as_a_parameter_csv(tmp_path):
    """With the training CSV's header names where the model has them, without a header otherwise."""
    rows = np.array([[1.5, 2.0], [0.1234567891, 3e-7]])
    for names in (None, ["length", "load"]):
        path = tmp_path / "rows.csv"
        path.write_bytes(_csv_bytes(rows, names))
        back, header = read_param_csv(path, 2, None)
        assert header == names
        np.testing.assert_allclose(back, rows, rtol=1e-6)


@pytest.mark.parametrize("args, bounds, message", [
    (["--suggest", "0", "--out", "r.csv"], None, "--suggest 0: give a number of rows from 1"),
    (["--suggest", "4"], None, "--suggest needs --out FILE.csv"),
    (["--suggest", "4", "--out", "r.npy"], None, "the output must be a .csv file"),
    (["--suggest", "4", "--out", "r.csv"], "1,2,3,4\n2,3,4,5\n3,4,5,6\n", "found 3 rows; give exactly two"),
    (["--suggest", "4", "--out", "r.csv"], "1,2,3\n2,3,4\n", "found 3 columns, expected 4"),
    (["--suggest", "4", "--out", "r.csv"], "1,2,3,4\n2,3,2,5\n", "column 3: the minimum 3 is above the maximum 2"),
    (["--suggest", "4", "--out", "r.csv"], "1,2,nan,4\n2,3,4,5\n", "is not a finite number"),
])
def test_one_line_errors(trained_demo, tmp_path, capsys, monkeypatch, args, bounds, message):
    monkeypatch.chdir(tmp_path)
    if bounds is not None:
        (tmp_path / "b.csv").write_text(bounds)
        args = [*args, "--bounds", "b.csv"]
    assert main(["--checkpoints", str(trained_demo[0]), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "r.csv").exists()
