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
