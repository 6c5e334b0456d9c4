"""`--sensitivity` (modules/sensitivity.py): Sobol' indices that match the analytic ones, and the command line
on a trained surrogate."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import run_cli
from modules.errors import UserError
from modules.predict import read_bounds
from modules.sensitivity import base_samples, check_out, parse_qoi, sobol_indices

# Ishigami (a = 7, b = 0.1) on [-pi, pi]^3: the analytic first-order and total indices.
ISHIGAMI_S1 = np.array([0.3139, 0.4424, 0.0])
ISHIGAMI_ST = np.array([0.5576, 0.4424, 0.2437])


def ishigami(x: np.ndarray) -> np.ndarray:
    return np.sin(x[:, 0]) + 7 * np.sin(x[:, 1]) ** 2 + 0.1 * x[:, 2] ** 4 * np.sin(x[:, 0])


def test_ishigami_indices_are_recovered_within_their_intervals():
    seen = []

    def model(x):                   # (m, 4) → (m, 3): Ishigami, x2 alone, a constant
        seen.append(x[:, 3])
        return np.stack([ishigami(x), x[:, 1], np.full(len(x), 2.0)], axis=1)
    low, high = np.array([-np.pi] * 3 + [0.5]), np.array([np.pi] * 3 + [0.5])
    r = sobol_indices(model, low, high, 1024, seed=0, batch=1000)
    assert r.base_samples == 1024 and r.evaluations == 1024 * 5
    assert r.varied.tolist() == [0, 1, 2] and r.fixed.tolist() == [3]
    assert np.all(np.concatenate(seen) == 0.5)                  # the fixed column is held, not sampled
    for est, conf, true in ((r.S1[0], r.S1_conf[0], ISHIGAMI_S1), (r.ST[0], r.ST_conf[0], ISHIGAMI_ST)):
        assert np.all((conf > 0) & (conf < 0.12)), conf
        assert np.all(np.abs(est - true) <= conf), (est, conf)  # measured: |error| <= 0.4 conf over seeds 0-9
        assert np.all(np.abs(est - true) < 0.03), est           # measured: <= 0.022 over seeds 0-9
    np.testing.assert_allclose(r.S1[1], [0, 1, 0], atol=0.02)   # x2 alone explains all of x2
    np.testing.assert_allclose(r.ST[1], [0, 1, 0], atol=0.02)
    assert r.constant.tolist() == [False, False, True] and np.isnan(r.S1[2]).all()
    again = sobol_indices(model, low, high, 1024, seed=0)
    np.testing.assert_array_equal(again.ST_conf, r.ST_conf)     # seeded: designs and bootstrap alike


def test_bad_requests_are_one_line_user_errors(tmp_path):
    names = ["a", "b", "c"]
    (tmp_path / "three.csv").write_text("0,0,0\n1,1,1\n2,2,2\n")
    (tmp_path / "crossed.csv").write_text("0,5,0\n1,1,1\n")
    (tmp_path / "narrow.csv").write_text("0,0\n1,1\n")
    (tmp_path / "nodes.txt").write_text("1, 2\nx\n")
    cases = [(lambda: base_samples(1), "at least 2"),
             (lambda: check_out(None), "needs --out FILE.json"),
             (lambda: check_out(tmp_path / "s.npy"), "must be a .json file"),
             (lambda: parse_qoi("mean"), "unknown quantity"),
             (lambda: parse_qoi("node:x"), "not a node number"),
             (lambda: parse_qoi(f"nodes:{tmp_path / 'nodes.txt'}"), "holds 'x'"),
             (lambda: parse_qoi(f"nodes:{tmp_path / 'none.txt'}"), "not found"),
             (lambda: parse_qoi("node:300").check(256), "node 300 does not exist; the model has 256 nodes"),
             (lambda: read_bounds(tmp_path / "three.csv", 3, names), "found 3 rows; give exactly two"),
             (lambda: read_bounds(tmp_path / "crossed.csv", 3, names), r"column 2 \(b\): the minimum 5 is above"),
             (lambda: read_bounds(tmp_path / "narrow.csv", 3, names), "found 2 columns, expected 3"),
             (lambda: sobol_indices(ishigami, np.zeros(3), np.zeros(3), 8), "nothing to vary")]
    for call, fragment in cases:
        with pytest.raises(UserError, match=fragment) as error:
            call()
        assert "\n" not in str(error.value)
    assert base_samples(300) == 512 and base_samples(256) == 256    # rounded up to a power of 2, with a warning


def test_command_line_on_the_trained_demo(trained_demo, tmp_path):
    """Every quantity in one run, one parameter held by --bounds; the l2 indices equal those computed here from
    the API's predictions; an error is one line (the other errors: test_bad_requests_are_one_line_user_errors)."""
    work, surrogate, _ = trained_demo
    params = np.loadtxt(work / "input_data/params.csv", delimiter=",")
    low, high = params.min(axis=0), params.max(axis=0)
    low[2] = high[2] = params[0, 2]                                # p3 held at the first run's value
    np.savetxt(tmp_path / "bounds.csv", np.stack([low, high]), delimiter=",", fmt="%.9g")
    (tmp_path / "hot.txt").write_text("1 2 3\n17\n")
    out = tmp_path / "sens" / "s.json"
    result = run_cli(work, "--sensitivity", "60", "--qoi", "l2", "--qoi", "max", "--qoi", "node:5", "--qoi",
                     f"nodes:{tmp_path / 'hot.txt'}", "--bounds", str(tmp_path / "bounds.csv"), "--out", str(out),
                     "--plot", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "using N = 64" in result.stderr
    report = json.loads(out.read_text())
    assert report["parameters"] == ["p1", "p2", "p4"] and report["all_parameters"] == ["p1", "p2", "p3", "p4"]
    assert [(f["parameter"], f["column"]) for f in report["fixed"]] == [("p3", 3)]
    assert report["base_samples"] == 64 and report["evaluations"] == 64 * 5
    np.testing.assert_allclose(report["bounds"]["min"], low, rtol=1e-6)
    assert list(report["qoi"]) == ["l2", "max", "node:5", f"nodes:{tmp_path / 'hot.txt'}"]
    for spec, entry in report["qoi"].items():
        curve = spec != "l2"
        s1, c1, st, ct = (np.array(entry[k], dtype=float) for k in ("S1", "S1_conf", "ST", "ST_conf"))
        assert s1.shape == ((32, 3) if curve else (3,)), spec
        ok = ~np.isnan(st)
        assert ok.any() and np.all(st[ok] >= s1[ok] - c1[ok] - ct[ok]), spec
        assert np.all((st[ok] > -0.1) & (st[ok] < 1.5)) and np.all(c1[ok] >= 0), spec
        if curve:
            assert len(entry["variance_weighted"]["ST"]) == 3
    with (out.with_suffix(".csv")).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (1 + 3 * 32) * 3 and {r["parameter"] for r in rows} == {"p1", "p2", "p4"}
    assert [r["step"] for r in rows[:4]] == ["", "", "", "1"]
    assert float(rows[0]["ST"]) == pytest.approx(report["qoi"]["l2"]["ST"][0], rel=1e-5)
    assert sorted(p.name for p in out.parent.glob("*.png")) == ["s_l2.png", "s_max.png", "s_node5.png",
                                                               "s_nodes_hot.png"]

    # The same l2 indices from the API's point predictions and the same seeded designs.
    def l2(rows):
        return np.sqrt((surrogate.predict(rows).astype(np.float64) ** 2).sum(axis=(1, 2)))
    mine = sobol_indices(l2, low, high, 64, seed=0)
    np.testing.assert_allclose(report["qoi"]["l2"]["ST"], mine.ST[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(report["qoi"]["l2"]["S1_conf"], mine.S1_conf[0], rtol=1e-4, atol=1e-6)

    # Through the command line, an error after the model is loaded: one line, exit 2, nothing written.
    bad = run_cli(work, "--sensitivity", "8", "--qoi", "max", "--qoi", "node:999", "--out", str(tmp_path / "e.json"),
                  "--threads", "1")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr
    assert "node 999 does not exist; the model has 256 nodes" in errors[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "e.json").exists()


def test_qoi_and_bounds_without_their_command_are_one_line_errors(tmp_path):
    for args, fragment in ((["--qoi", "l2"], "--qoi goes with --sensitivity N or --suggest K"),
                           (["--bounds", "b.csv"], "--bounds goes with --sensitivity N or --suggest K"),
                           (["--export", "onnx", "x", "--qoi", "max"], "--qoi goes with --sensitivity N")):
        result = run_cli(tmp_path, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: " + fragment), result.stderr
    assert not any(tmp_path.iterdir())
