"""Out-of-training-range inputs (modules/domain.py) on a sampled parameter box with a hole."""
import numpy as np

from modules.domain import InputDomain


def domain_with_a_gap() -> tuple[InputDomain, np.ndarray]:
    """Training runs on a 9×9 grid of [0, 2] × [10, 30], without the runs near the centre."""
    a, b = np.meshgrid(np.linspace(0, 2, 9), np.linspace(10, 30, 9))
    runs = np.column_stack([a.ravel(), b.ravel()])
    centre = (np.abs(runs[:, 0] - 1) < 0.6) & (np.abs(runs[:, 1] - 20) < 6)
    runs = runs[~centre]
    low, high = runs.min(axis=0), runs.max(axis=0)
    return InputDomain(low, high, runs), runs


def test_rows_outside_the_range_or_far_from_every_run_are_flagged_and_named():
    domain, runs = domain_with_a_gap()
    rows = np.array([runs[3], [0.9, 20.0], [2.5, 20.0], [1.0, 5.0]])
    result = domain.check(rows)
    assert result["out_of_domain"] == [False, True, True, True]
    assert result["outside_columns"] == [[], [], [0], [1]]
    assert result["nearest_run_ratio"][0] == 0 and result["nearest_run_ratio"][1] > 1
    line = domain.warning(rows, result, "new.csv")
    assert line.startswith("3 of 4 inputs in new.csv lie outside the training data")
    assert "row 2 is" in line and "farther from every training run" in line
    assert "row 3 column 1 = 2.5 outside the training range [0, 2]" in line
    assert "row 4 column 2 = 5 outside the training range [10, 30]" in line


def test_rows_between_training_runs_are_not_flagged_and_no_warning_is_made():
    domain, runs = domain_with_a_gap()
    between = (runs[:-1] + runs[1:]) / 2                    # midway between neighbouring grid runs
    between = between[np.linalg.norm(np.diff(runs, axis=0) / [2, 20], axis=1) < 0.2]
    result = domain.check(between)
    assert not any(result["out_of_domain"])
    assert domain.warning(between, result, "x.csv") is None


def test_without_the_training_runs_only_the_range_is_checked():
    domain, runs = domain_with_a_gap()
    range_only = InputDomain(domain.low, domain.high, None)
    result = range_only.check(np.array([[0.9, 20.0], [3.0, 20.0]]))
    assert result["out_of_domain"] == [False, True] and "nearest_run_ratio" not in result
