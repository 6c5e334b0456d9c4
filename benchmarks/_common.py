"""Helpers the benchmark scripts share: matmul peaks, memory, load checks, data, a RunContext.

Nothing here imports `modules` at import time: a worker first puts the code root it should
measure (this checkout, or an older one for a before/after table) on sys.path.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- machine

def load_average() -> float:
    return os.getloadavg()[0]


def busy_warning(threshold: float = 0.5) -> str | None:
    """A line, printed on stderr and returned for the report, when other work competes for the
    cores (OpenMP degrades badly then); None otherwise."""
    load, cores = load_average(), os.cpu_count() or 1
    if load > threshold * cores:
        line = (f"warning: 1-min load average {load:.2f} on {cores} cores before measuring; "
                f"other processes compete for the cores and the figures below will be low")
        print(line, file=sys.stderr)
        return line
    return None


def machine() -> dict:
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    import torch
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch": torch.__version__, "python": sys.version.split()[0],
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 7, inner: int = 3) -> float:
    """FLOP/s of an n×n matmul in `dtype_name` (fp32 | bf16), median of `repeats`."""
    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        times.append((time.perf_counter() - t) / inner)
    return 2 * n ** 3 / statistics.median(times)


# ----------------------------------------------------------------------------- memory

def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss as fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> dict[str, int]:
    """Current RSS split into anonymous and file-backed (page-cache) pages, in bytes."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------- data

def write_dataset(path: Path, runs: int, steps: int, nodes: int, seed: int = 0,
                  chunk_bytes: int = 256 * 2**20, progress: bool = False) -> Path:
    """A synthetic [P, T, N] float32 .npy written chunk by chunk with plain file writes.

    Never whole in memory, and never mapped (a mapping would keep what was written in this
    process's RSS). Each run is a travelling wave whose amplitude, speed and offset depend on
    the run: smooth in time and space like a simulation, and distinct per run. The wave is
    built from rank-1 products (sin(a − b) = sin a cos b − cos a sin b), so writing is
    bound by the disk, not by numpy.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    phase_x = 2 * np.pi * 3 * np.linspace(0.0, 1.0, nodes)                       # (N,)
    sin_x, cos_x = np.sin(phase_x).astype(np.float32), np.cos(phase_x).astype(np.float32)
    t = np.linspace(0.0, 1.0, steps)
    per_chunk = max(1, chunk_bytes // (steps * nodes * 4))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (runs, steps, nodes)}
    written, started = 0, time.perf_counter()
    block = np.empty((per_chunk, steps, nodes), dtype=np.float32)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, runs, per_chunk):
            n = min(per_chunk, runs - start)
            amp = rng.uniform(0.5, 2.0, n)
            speed = rng.uniform(0.5, 3.0, n)
            offset = rng.uniform(-1.0, 1.0, n)
            phase_t = 2 * np.pi * speed[:, None] * t[None, :]                        # (n, T)
            a = (amp[:, None] * np.cos(phase_t)).astype(np.float32)[:, :, None]       # (n, T, 1)
            b = (amp[:, None] * np.sin(phase_t)).astype(np.float32)[:, :, None]
            out = block[:n]
            np.multiply(a, sin_x, out=out)                                             # amp·sin(x − speed·t)
            out -= b * cos_x
            out += offset.astype(np.float32)[:, None, None]
            out.tofile(f)
            written += out.nbytes
            if progress:
                rate = written / max(time.perf_counter() - started, 1e-9)
                print(f"\r  wrote {written / 2**30:6.1f} of {runs * steps * nodes * 4 / 2**30:.1f} GiB "
                      f"({rate / 2**20:.0f} MiB/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return path


# ----------------------------------------------------------------------------- the real stage objects

def vae_context(code_root: Path, workdir: Path, data_path: Path, *, runs: int, steps: int, nodes: int,
                filters, batch: int, epochs: int, precision: str, load_all: bool, small: bool = True,
                extra: tuple[str, ...] = (), monitor: bool = True):
    """(ctx, store, train_idx, val_idx) built the way modules/pipeline.py builds them.

    Opening, checking, scaling and batching the data go through the real functions, so the
    benchmark measures what a training run does. `code_root` must already be on sys.path.
    """
    from modules.checkpoint import seed_everything
    from modules.config import FIELDS, Preset, parse_condition
    from modules.data import FieldScaler, FieldStore, check_dataset, open_dataset, reduce, split_indices
    from modules.distributed import SINGLE
    from modules.monitor import Monitor
    from modules.run import Paths, RunContext

    overrides = [f"Dim1={runs}", f"Dim2={steps}", f"Dim3={nodes}", f"Dim2_red={steps}", f"Dim3_red={nodes}",
                 f"Batch_size={batch}", f"Training_epochs={epochs}", f"precision={precision}",
                 f"n_sample={runs}"]
    if "output_norm" in FIELDS:
        overrides.append("output_norm=1")               # the original network, as in the anchors
    overrides += list(extra)
    cfg = parse_condition(Path(code_root) / "input_data" / "condition.txt", overrides)
    preset = Preset(1, 0, tuple(int(f) for f in filters), (16, 32, 64, 128))
    seed_everything(cfg.run.seed)
    paths = Paths(Path(workdir))
    ctx = RunContext(cfg, preset, small, load_all, 2, __import__("torch").device("cpu"), SINGLE, paths, "bench")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    ctx.monitor = Monitor(ctx.run_dir if monitor else None, monitor, cfg.run.log_every)
    ctx.monitor.text("config", "\n".join(f"{k}: {v}" for k, v in ctx.cfg.flat().items()))
    array = open_dataset(data_path)
    check_dataset(array, (runs, steps, nodes), data_path)
    data = reduce(array, steps, nodes)
    scaler = FieldScaler.fit_streaming(data)
    store = FieldStore(data, scaler, preload=load_all, device="cpu")
    train_idx, val_idx = split_indices(runs, cfg.run.val_split, cfg.run.seed)
    return ctx, store, train_idx, val_idx


def time_epochs(trainer) -> list[float]:
    """trainer.fit(), returning time.perf_counter() at the end of every epoch."""
    ends: list[float] = []
    record = trainer._record

    def timed(*args, **kwargs):
        record(*args, **kwargs)
        ends.append(time.perf_counter())

    trainer._record = timed
    trainer.fit()
    return ends


# ----------------------------------------------------------------------------- subprocesses

def condition_text(template: Path, values: dict[str, object]) -> str:
    """The condition file `template` with each named key's value replaced (comments and layout
    kept); a key that is not in it exactly once is an error."""
    text = Path(template).read_text()
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^({re.escape(key)}[ \t]+)[^\s#]+", lambda m: f"{m.group(1)}{value}", text)
        if count != 1:
            raise ValueError(f"{template}: key {key!r} found {count} times, expected once")
    return text


def run_logged(command: list[str], cwd: Path, log: Path, timeout: float | None = None) -> float:
    """Wall seconds of one whole process, its output appended to `log`; a failure stops the
    benchmark with one line and the end of that log."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"error: {' '.join(map(str, command))} (in {cwd}) exited with {proc.returncode}; "
                         f"the end of its output ({log}):\n{tail}")
    return seconds


def run_worker(script: Path, spec: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run `script --worker SPEC` in a fresh interpreter; return the JSON it wrote."""
    result_path = Path(spec["result"])
    if result_path.exists():
        result_path.unlink()
    spec = dict(spec, t_spawn=time.time())
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"worker failed (exit {proc.returncode}) for {spec.get('name')}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def write_report(path: str | Path, report: dict) -> None:
    """Write a benchmark's JSON report (creating its folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    return format(value, spec)
