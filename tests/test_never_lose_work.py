"""No command loses or hides finished work: real processes, real signals, real files.

Signals stop every stage without epochs too (the GP's fit, each network, the classical baseline, an
import) within a unit of work, with one line saying what `--resume` redoes; a failing `--evaluate`
writes nothing; `--import_runs` refuses to replace a dataset; every file follows the umask; the point
prediction is always saved; progress lines reach a log file while the run goes on."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import meshio
import numpy as np
import pytest

from conftest import ENTRY, ROOT, clean_env, demo_workdir, run_cli

# the default GP conditioner with its networks, kept short: the stages' plumbing, not their accuracy
SHORT = ("--preset=1", "--plot=2", "--lc_only=0", "--size=small", "--load_all=1", "--set", "Training_epochs=2",
         "--set", "frame_net_epochs=10", "--set", "point_net_steps=100", "--set", "baseline=0")
WITH_BASELINE = (*SHORT[:-2], "--set", "baseline=1")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def signal_on(cmd: list[str], cwd: Path, marker: str, signals: list[int], env: dict | None = None,
              timeout: float = 600) -> tuple[int, str, float]:
    """Start `cmd` (stdout and stderr together), send `signals[0]` when `marker` appears, `signals[1]` once the
    run has acknowledged the first; return (exit status, the whole output, seconds from the first signal to
    the exit)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, sent = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if sent is None and marker in line:
                os.kill(proc.pid, signals[0])
                sent = time.monotonic()
                if len(signals) == 1:
                    break
            elif sent is not None and "send it again to stop at once" in line:
                os.kill(proc.pid, signals[1])
                break
        else:
            raise AssertionError("the run ended before the marker: " + "".join(lines)[-3000:])
        rest, _ = proc.communicate(timeout=timeout)
        return proc.returncode, "".join(lines) + rest, time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()


def last_line(output: str) -> str:
    return [ln for ln in output.splitlines() if ln.strip()][-1]


@pytest.mark.parametrize("sig,code,marker,where", [
    (signal.SIGINT, 130, "GP conditioner: GP fitted on the training runs", "conditioner stage"),
    (signal.SIGTERM, 143, "frame network: training for at most", "conditioner stage"),
    (signal.SIGINT, 130, "point network: training for at most", "conditioner stage"),
    (signal.SIGTERM, 143, "classical baselines: fitting", "classical baseline"),
], ids=["sigint-gp-fit", "sigterm-frame-network", "sigint-point-network", "sigterm-baseline"])
def test_a_signal_in_a_stage_without_epochs_stops_it_within_a_unit_and_resume_finishes(tmp_path, sig, code, marker,
                                                                                       where):
    """The first signal ends the current GP column or network step (well within 30 s), the run exits 130 / 143
    with one line naming what --resume redoes, nothing finished is lost (the VAE), and --resume completes
    the model without training the VAE again."""
    work = demo_workdir(tmp_path / "work")
    args = WITH_BASELINE if where == "classical baseline" else SHORT
    status, output, seconds = signal_on([sys.executable, str(ENTRY), *args], work, marker, [sig])
    assert status == code and "Traceback" not in output, output[-3000:]
    assert seconds < 30
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    line = last_line(output)
    assert line.startswith(f"stopped by {name} during the {where}: "), line
    vae = digest(work / "checkpoints")["vae.pt"]
    if where == "classical baseline":        # the model was finished before: predict with it, nothing to resume
        assert "the surrogate is finished and saved" in line
        assert run_cli(work, "--predict", "input_data/params.csv", "--out", str(tmp_path / "p.npy")).returncode == 0
        return
    assert "--resume trains the conditioner stage again" in line and not (work / "checkpoints/conditioner.pt").exists()
    resumed = run_cli(work, *SHORT, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(work / "checkpoints")["vae.pt"] == vae and "[VAE] epoch" not in resumed.stdout
    assert run_cli(work, "--predict", "input_data/params.csv", "--out", str(tmp_path / "p.npy")).returncode == 0


def test_a_second_signal_in_the_conditioner_stage_stops_at_once_and_keeps_the_vae(tmp_path):
    work = demo_workdir(tmp_path / "work")
    status, output, _ = signal_on([sys.executable, str(ENTRY), *SHORT], work, "point network: training for at most",
                                  [signal.SIGINT, signal.SIGINT])
    assert status == 130 and "Traceback" not in output
    assert last_line(output).startswith("interrupted by SIGINT, stopped at once")
    assert (work / "checkpoints/vae.pt").is_file() and not (work / "checkpoints/conditioner.pt").exists()


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One training with stdout and stderr redirected to a file, as under a batch scheduler or nohup (the
    progress interval made short by SIMULGEN_PROGRESS_SECONDS; it is 30 s): the working folder, and what the
    file held when the last stage began, with whether the run was still going then."""
    work = demo_workdir(tmp_path_factory.mktemp("model") / "work")
    log = work.parent / "run.log"
    env = {**clean_env(), "SIMULGEN_PROGRESS_SECONDS": "0.2"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ENTRY), *WITH_BASELINE], cwd=work, env=env, stdout=f, stderr=f)
        try:
            seen, deadline = "", time.monotonic() + 900
            while "classical baselines: fitting" not in seen and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
                seen = log.read_text()
            running = proc.poll() is None
        finally:
            assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return work, seen, running


@pytest.fixture(scope="module")
def trained(logged_run):
    return logged_run[0]


@pytest.fixture(scope="module")
def good_prediction(trained, tmp_path_factory):
    """A finished prediction of 4 runs with samples (FILE.npy, FILE.json, ...) in a folder of its own."""
    folder = tmp_path_factory.mktemp("good")
    rows = folder / "rows.csv"
    np.savetxt(rows, np.loadtxt(trained / "input_data/params.csv", delimiter=",")[:4], delimiter=",")
    assert run_cli(trained, "--predict", str(rows), "--out", str(folder / "good.npy"), "--samples", "4").returncode == 0
    return folder


def test_lc_only_stopped_in_the_gp_leaves_the_model_as_it_was(trained, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(trained, work)
    before = {k: v for k, v in digest(work / "checkpoints").items() if not k.startswith("history/")}
    args = [*SHORT[:2], "--lc_only=1", *SHORT[3:]]
    status, output, _ = signal_on([sys.executable, str(ENTRY), *args], work, "GP conditioner: GP fitted", [signal.SIGINT])
    assert status == 130 and "Traceback" not in output
    assert "the model in checkpoints/ is unchanged: run the same command again" in last_line(output)
    after = {k: v for k, v in digest(work / "checkpoints").items() if not k.startswith("history/")}
    assert after == before


@pytest.mark.parametrize("truth", ["one-run", "other-nodes", "text", "missing"])
def test_a_failing_evaluate_writes_nothing(trained, good_prediction, tmp_path, truth):
    """--predict … --evaluate TRUE.npy --out FILE.npy: TRUE.npy is checked before anything is written, so the
    outputs of the earlier prediction (FILE.npy and FILE.json, which describe each other) stay as they were."""
    shutil.copytree(good_prediction, tmp_path, dirs_exist_ok=True)
    rows, out = tmp_path / "rows.csv", tmp_path / "good.npy"
    bad = tmp_path / "fake.npy"
    if truth == "one-run":                   # the reported case: one run, [1, 32, 256], for 4 inputs
        np.save(bad, np.zeros((1, 32, 256), np.float32))
    elif truth == "other-nodes":
        np.save(bad, np.zeros((4, 32, 100), np.float32))
    elif truth == "text":
        bad.write_text("not an array")
    before = digest(tmp_path)
    result = run_cli(trained, "--predict", str(rows), "--out", str(out), "--evaluate", str(bad), "--samples", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --evaluate")
    assert digest(tmp_path) == before


def test_the_point_prediction_is_saved_beside_the_samples_and_in_the_xdmf(trained, tmp_path):
    """--samples K: FILE.npy is the point prediction (the same as without samples), FILE_samples.npy the K
    draws, FILE_bands.npz their bands; the JSON says so."""
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, np.loadtxt(trained / "input_data/params.csv", delimiter=",")[:3], delimiter=",")
    assert run_cli(trained, "--predict", str(rows), "--out", str(tmp_path / "point.npy")).returncode == 0
    assert run_cli(trained, "--predict", str(rows), "--out", str(tmp_path / "both.npy"), "--samples", "5").returncode == 0
    point = np.load(tmp_path / "point.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "both.npy"), point)
    samples = np.load(tmp_path / "both_samples.npy")
    assert point.shape == (3, 32, 256) and samples.shape == (3, 5, 32, 256)
    with np.load(tmp_path / "both_bands.npz") as bands:
        np.testing.assert_allclose(bands["mean"], samples.mean(axis=1), rtol=1e-5)
    meta = json.loads((tmp_path / "both.json").read_text())
    assert meta["shape"] == [3, 32, 256] and meta["samples_layout"] == "[n, K, T, N]"
    assert meta["samples_file"] == str(tmp_path / "both_samples.npy") and "point prediction" in meta["layout"]


def test_import_refuses_to_replace_a_dataset_unless_forced_and_then_keeps_it(tmp_path):
    from test_mesh_io import grid_mesh, write_xdmf
    points, cells = grid_mesh(4)
    for run in range(1, 4):
        write_xdmf(tmp_path / "sims" / f"run_{run}.xdmf", points, cells, {"T": np.full((2, 16), float(run))}, [0.1, 0.2])
    data = tmp_path / "input_data"
    data.mkdir()
    np.save(data / "dataset1.npy", np.zeros((2, 2, 2), np.float32))
    before = digest(data)
    refused = run_cli(tmp_path, "--import_runs", "sims/run_*.xdmf", "--field", "T", "--set", "dataset_dir=input_data")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "dataset1.npy already exists" in refused.stderr and "--force" in refused.stderr
    assert digest(data) == before
    forced = run_cli(tmp_path, "--import_runs", "sims/run_*.xdmf", "--field", "T", "--set", "dataset_dir=input_data",
                     "--force")
    assert forced.returncode == 0, forced.stderr
    assert np.load(data / "dataset1.npy").shape == (3, 2, 16)
    (kept,) = data.glob("dataset1.npy.replaced-*")
    np.testing.assert_array_equal(np.load(kept), np.zeros((2, 2, 2)))


def test_an_import_stopped_by_a_signal_writes_nothing(tmp_path):
    from test_mesh_io import grid_mesh, write_xdmf
    points, cells = grid_mesh(30)
    for run in range(1, 41):
        write_xdmf(tmp_path / "sims" / f"run_{run}.xdmf", points, cells,
                   {"T": np.random.default_rng(run).random((60, 900))}, np.arange(1, 61.0))
    status, output, seconds = signal_on([sys.executable, str(ENTRY), "--import_runs", "sims/run_*.xdmf", "--field", "T",
                                         "--set", "dataset_dir=data"], tmp_path, "importing 40 runs", [signal.SIGINT])
    assert status == 130 and "Traceback" not in output and seconds < 30
    assert last_line(output) == "stopped by SIGINT during the import: nothing was written; run the import again."
    assert not (tmp_path / "data").exists()


def test_every_file_follows_the_umask_in_every_mode(tmp_path):
    """Under umask 027 every file the tool writes is rw-r----- (0640) and every folder rwxr-x---: training,
    history, import, prediction with samples, evaluation and XDMF output."""
    from test_mesh_io import grid_mesh, write_xdmf
    work = demo_workdir(tmp_path / "work")
    env = clean_env()

    def run(*args):
        result = subprocess.run([sys.executable, str(ENTRY), *args], cwd=work, env=env, capture_output=True, text=True,
                                preexec_fn=lambda: os.umask(0o027), timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    before = {p for p in work.rglob("*")}
    points, cells = grid_mesh(16)
    params = np.random.default_rng(0).random((12, 2))
    for run_number, (a, b) in enumerate(params, start=1):
        values = a * np.sin(points[:, 0] * (1 + b) * np.arange(1, 5)[:, None]) + points[:, 1]
        write_xdmf(work / "sims" / f"run_{run_number}.xdmf", points, cells, {"T": values}, [1.0, 2.0, 3.0, 4.0])
    np.savetxt(work / "fem_params.csv", params, delimiter=",")
    before |= {p for p in work.rglob("*")}
    run("--import_runs", "sims/run_*.xdmf", "--field", "T", "--set", "dataset_dir=fem")
    sets = {"Dim1": 12, "Dim2": 4, "Dim3": 256, "Dim2_red": 4, "Dim3_red": 256, "n_sample": 12, "num_param": 2,
            "param_dir": "/fem_params.csv", "dataset_dir": "fem", "frame_net_epochs": 5, "point_net_steps": 50}
    train = [*SHORT, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    run(*train)
    run(*[a if a != "--lc_only=0" else "--lc_only=1" for a in train])   # keeps the first model in the history
    np.save(work / "truth.npy", np.load(work / "fem/dataset1.npy")[:3])
    np.savetxt(work / "new.csv", params[:3], delimiter=",")
    before |= {work / "truth.npy", work / "new.csv"}
    run("--predict", "new.csv", "--out", "out/pred.npy", "--samples", "3", "--evaluate", "truth.npy", "--vtk", "vtk",
        "--plot", "1")
    written = [p for p in work.rglob("*") if p not in before and not p.is_symlink()]
    kinds = {p.suffix for p in written if p.is_file()}
    assert {".npy", ".vtu", ".json", ".pt", ".npz", ".xdmf", ".h5", ".csv", ".png"} <= kinds, kinds
    assert any("history" in p.parts for p in written)
    wrong = [f"{p.relative_to(work)} {oct(p.stat().st_mode & 0o777)}" for p in written
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)]
    assert not wrong, wrong


def test_progress_lines_reach_a_log_file_while_the_run_goes_on(logged_run):
    """stdout and stderr redirected to a file: every stage's lines are in the file before the run ends
    (flushed), the GP's, the networks' and the baseline's included."""
    _, seen, running = logged_run
    assert running, "the run ended before its last stage showed in the file"
    for line in ("[VAE] epoch 1/2", "GP fit (64 runs): column", "frame network: step", "point network: step",
                 "classical baselines: fitting"):
        assert line in seen, line
