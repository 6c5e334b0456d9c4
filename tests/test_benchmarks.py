"""The benchmark scripts still run: each with its smoke flags, each writing finite figures."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_bench_train_quick_writes_a_finite_table(tmp_path):
    out = tmp_path / "train.json"
    result = _run("bench_train.py", "--quick", "--json", str(out))
    report = json.loads(out.read_text())
    assert _finite(*report["matmul_peak_flop_per_s"].values())
    assert {row["precision"] for row in report["rows"]} == {"fp32", "bf16"}
    for row in report["rows"]:
        res = row["after"]
        assert _finite(res["samples_per_s"], res["bare_runs_per_s"], res["flop_per_s"], res["fraction_of_peak"],
                       res["time_to_first_step_s"], res["peak_rss_bytes"])
        assert res["samples_per_s"] > 0 and res["flops_per_step"] > 0 and 0 < res["time_to_first_step_s"] < 60
    assert "samples/s" in result.stdout and report["table"] in result.stdout


def test_bench_predict_quick_writes_finite_latencies(tmp_path):
    out = tmp_path / "predict.json"
    _run("bench_predict.py", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(_finite(r["batch1_ms"], r["batch64_runs_per_s"]) and r["finite"] for r in rows)


def test_bench_memory_quick_trains_from_the_mapped_file_and_cleans_up(tmp_path):
    out = tmp_path / "memory.json"
    _run("bench_memory.py", "--quick", "--dir", str(tmp_path / "data"), "--json", str(out))
    report = json.loads(out.read_text())
    assert _finite(report["peak_rss_bytes"], report["train_samples_per_s"], report["final_loss"])
    assert not report["store_preloaded"] and report["store_tensor_bytes"] == 0     # no scaled copy
    assert not any((tmp_path / "data").rglob("*.npy"))                              # the dataset is gone


def test_bench_memory_refuses_when_the_disk_is_too_small(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH / "bench_memory.py"), "--size-gb", "100000",
                             "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "refusing to start" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["bench_train.py", "bench_predict.py", "bench_memory.py"])
def test_benchmark_help(script):
    assert "usage" in _run(script, "--help").stdout


def test_bench_stream_quick_compares_streaming_with_preloading(tmp_path):
    out = tmp_path / "stream.json"
    result = _run("bench_stream.py", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["preloaded", "streamed", "streamed + prefetch 2"]
    assert all(_finite(r["samples_per_s"], r["over_preloaded"]) and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["over_preloaded"] == 1.0 and "× preloaded" in result.stdout


def test_original_comparison_writes_the_originals_condition_file_with_the_sizes(tmp_path):
    """The comparison's condition file is the original's own with only the named values changed,
    and it parses as the port's condition file with exactly those values."""
    sys.path.insert(0, str(BENCH))
    import _common
    import _original
    from modules.config import parse_condition
    values = {"Dim1": 400, "n_sample": 400, "Dim3": 300, "Dim3_red": 300, "Training_epochs": 7, "input_type": "csv",
              "param_dir": tmp_path / "p.csv"}
    text = _common.condition_text(_original.TEMPLATE, values)
    original = (ROOT / "tests" / "fixtures" / "original_condition.txt").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, text.splitlines()) if a != b]
    assert len(changed) == 7 and len(text.splitlines()) == len(original)
    assert any("# num nodes" in b for _, b in changed)                       # comments stay
    path = tmp_path / "condition.txt"
    path.write_text(text)
    cfg = parse_condition(path)
    assert (cfg.data.Dim1, cfg.data.Dim3, cfg.data.Dim3_red, cfg.vae.Training_epochs, cfg.conditioner.input_type,
            cfg.conditioner.param_dir) == (400, 300, 300, 7, "csv", str(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match="'no_such_key' found 0 times"):
        _common.condition_text(_original.TEMPLATE, {"no_such_key": 1})


def test_original_comparison_patches_a_copy_and_never_the_checkout(tmp_path):
    sys.path.insert(0, str(BENCH))
    import _original
    root = tmp_path / "original"
    (root / "modules").mkdir(parents=True)
    source = "x = torch.from_numpy(a).float().pin_memory()\ny = torch.from_numpy(b).float().pin_memory()\n"
    (root / "modules" / "utils.py").write_text(source)
    (root / "SimulGen-VAE.py").write_text("print('hi')\n")
    applied = _original.prepare_original(root, tmp_path / "copy")
    assert applied == ["modules/utils.py: '.float().pin_memory()' → '.float()' ×2"]
    assert (tmp_path / "copy" / "modules" / "utils.py").read_text().count("pin_memory") == 0
    assert (root / "modules" / "utils.py").read_text() == source                   # the checkout is untouched
    assert (tmp_path / "copy" / "model_save").is_dir()


def test_bench_train_against_an_original_times_whole_processes(tmp_path):
    """The mode end to end, with this checkout standing in for the original (same command line
    and condition file): four whole processes, per-epoch times from their differences."""
    out = tmp_path / "original.json"
    result = _run("bench_train.py", "--quick", "--archs", "R1", "--precisions", "fp32", "--original-root", str(ROOT),
                  "--original-python", sys.executable, "--original-epochs", "4", "6", "--rounds", "1",
                  "--json", str(out))
    report = json.loads(out.read_text())
    assert report["programs"] == ["original", "port fp32"]
    (row,) = report["rows"]
    assert row["patches"] == []                                   # this checkout has no pinned dataset
    for label in report["programs"]:
        (short,), (long,) = row["seconds"][label].values()                 # one timed round of 4 and 6 epochs
        assert 0 < short and 0 < long and row["per_epoch_s"][label] == pytest.approx((long - short) / 2)
        assert row["fixed_s"][label] == pytest.approx(short - 4 * row["per_epoch_s"][label])
    assert "× (samples)" in result.stdout and report["table"] in result.stdout


def test_bench_train_original_mode_refuses_a_folder_without_the_original(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--original-root", str(tmp_path),
                             "--original-python", sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no SimulGen-VAE.py there" in result.stderr
    assert "Traceback" not in result.stderr
