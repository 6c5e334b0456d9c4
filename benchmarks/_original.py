"""Whole-process speed against the original v1.4.3, interleaved in one run
(`bench_train.py --original-root PATH --original-python PY`).

Both programs get the same dataset pickle, condition file (the original's own, with only the
sizes, epochs and the CSV route changed), preset and command line, and run as whole processes
from fresh working folders. The per-epoch cost is (T(long) − T(short)) / (long − short): the
difference of two runs that differ only in `Training_epochs`, so start-up, compilation, the
conditioner stage and the final evaluation cancel. One untimed warm-up process per program
first fills torch.compile's on-disk caches (the original compiles its VAE: a cold compile of R2
took over 3 minutes, a warm one seconds). The order is interleaved (original, port
fp32, port bf16, then the next length, then the next round), so slow drift of the machine
hits every program alike.

The original is copied, never changed in place, and needs one CPU patch: its conditioner
dataset pins host memory unconditionally (`.float().pin_memory()` in modules/utils.py), which
raises "Found no NVIDIA driver" on a CUDA build of torch without a GPU. The copy drops the
`.pin_memory()`; the VAE stage, which is what is timed, is untouched. Tested against commit
ef24cac of github.com/leesihun/SimulGen-VAE (its condition.txt is tests/fixtures/).
"""
from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

import _common as C

TEMPLATE = C.ROOT / "tests" / "fixtures" / "original_condition.txt"
# (file, text, replacement): applied to the copy wherever the text occurs
PATCHES = (("modules/utils.py", ".float().pin_memory()", ".float()"),)
ARGS = ("--preset=1", "--plot=2", "--lc_only=0", "--size=small", "--load_all=1")
# the port doing what the original does: its recipe, and no classical baseline (the original fits none)
PORT_AS_ORIGINAL = ("--set", "recipe=original", "--set", "baseline=0")
IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".venv", "runs", "checkpoints", "model_save", "output")


def prepare_original(root: Path, dest: Path) -> list[str]:
    """Copy the original's checkout to `dest` and apply PATCHES; returns what was patched."""
    shutil.copytree(root, dest, ignore=IGNORE)
    for folder in ("checkpoints", "model_save", "output"):
        (dest / folder).mkdir(exist_ok=True)
    applied = []
    for rel, old, new in PATCHES:
        path = dest / rel
        text = path.read_text() if path.is_file() else ""
        if old in text:
            applied.append(f"{rel}: {old!r} → {new!r} ×{text.count(old)}")
            path.write_text(text.replace(old, new))
    return applied


def write_inputs(folder: Path, runs: int, steps: int, nodes: int, seed: int) -> Path:
    """dataset1.pickle (shared by every run), params.csv; returns the pickle's path."""
    folder.mkdir(parents=True, exist_ok=True)
    npy = C.write_dataset(folder / "fields.npy", runs, steps, nodes, seed=seed)
    data = folder / "dataset1.pickle"
    with open(data, "wb") as f:
        pickle.dump(np.load(npy), f, protocol=4)
    npy.unlink()
    rng = np.random.default_rng(seed)
    np.savetxt(folder / "params.csv", rng.uniform(0.0, 1.0, (runs, 3)), delimiter=",", fmt="%.6f")
    return data


def workdir(base: Path, data: Path, runs: int, steps: int, nodes: int, filters, epochs: int, lc_epochs: int,
            batch: int) -> None:
    """A fresh working folder with the condition file, preset and a link to the data."""
    (base / "input_data").mkdir(parents=True, exist_ok=True)
    values = {"Dim1": runs, "Dim2": steps, "Dim3": nodes, "Dim2_red": steps, "Dim3_red": nodes,
              "Training_epochs": epochs, "Batch_size": batch, "n_sample": runs, "num_param": 3,
              "param_dir": data.parent / "params.csv", "n_epoch": lc_epochs,
              "latent_conditioner_batch": batch, "input_type": "csv"}
    (base / "input_data" / "condition.txt").write_text(C.condition_text(TEMPLATE, values))
    (base / "preset.txt").write_text("data_No, init_beta_divisior, num_filter_enc, latent_conditioner_filter\n"
                                     f"1\n0\n{' '.join(map(str, filters))}\n16 32 64 128\n")
    link = base / "dataset1.pickle"
    if not link.exists():
        link.symlink_to(data)


def samples_per_epoch(program: str, runs: int, batch: int) -> int:
    """Training samples one epoch passes through the step: the original splits off int(0.2 P)
    validation runs and keeps its last, short batch; the port splits off round(0.2 P) and drops
    the short batch (modules/engine.py, batch_indices)."""
    if program == "original":
        return runs - int(runs * 0.2)
    return (runs - round(runs * 0.2)) // batch * batch


def compare(args, filters_of: dict[str, tuple[int, ...]]) -> dict:
    """The interleaved whole-process table; see the module's docstring."""
    original_root = Path(args.original_root).resolve()
    if not (original_root / "SimulGen-VAE.py").is_file():
        raise SystemExit(f"error: --original-root {original_root}: no SimulGen-VAE.py there; "
                         "give the folder of a checkout of the original v1.4.3")
    original_python = args.original_python
    port_script = Path(args.code_root).resolve() / "SimulGen-VAE.py"
    runs, steps, batch, lc_epochs = (24, 10, 8, 2) if args.quick else (64, 50, 16, 20)
    short, long = args.original_epochs
    programs = [("original", [original_python, "SimulGen-VAE.py"], None)]
    programs += [(f"port {p}", [args.port_python, str(port_script)], p) for p in args.precisions]
    warning, load_before = C.busy_warning(), C.load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_original_") as tmp:
        tmp = Path(tmp)
        for arch in args.archs:
            filters = (16, 8, 4, 2) if args.quick else filters_of[arch]
            for nodes in ([96] if args.quick else args.nodes):
                name = f"{arch}-N{nodes}"
                data = write_inputs(tmp / name, runs, steps, nodes, seed=nodes)
                times: dict[str, dict[int, list[float]]] = {label: {short: [], long: []} for label, _, _ in programs}
                patches = []
                # round 0 is untimed: it fills torch.compile's on-disk caches, which every later
                # process of the same program finds warm, as a user's second run would
                for rnd in range(args.rounds + 1):
                    for epochs in ((short,) if rnd == 0 else (short, long)):
                        for label, command, precision in programs:
                            base = tmp / name / f"{label.replace(' ', '-')}-{epochs}-{rnd}"
                            if precision is None:
                                patches = prepare_original(original_root, base)
                                cmd = command + list(ARGS)
                                if (original_root / "modules" / "api.py").is_file():    # this port as a stand-in
                                    cmd += list(PORT_AS_ORIGINAL)                      # (the tests): its recipe
                            else:
                                cmd = command + list(ARGS) + [*PORT_AS_ORIGINAL, "--set", f"precision={precision}"]
                            workdir(base, data, runs, steps, nodes, filters, epochs, lc_epochs, batch)
                            seconds = C.run_logged(cmd, base, base / "log.txt", args.process_timeout)
                            if rnd:
                                times[label][epochs].append(seconds)
                            print(f"  {name} {label:<10} {epochs:4d} epochs  {f'round {rnd}' if rnd else 'warm-up'}: "
                                  f"{seconds:7.1f} s", flush=True)
                row = {"config": name, "arch": arch, "filters": list(filters), "nodes": nodes, "patches": patches,
                       "seconds": times, "per_epoch_s": {}, "samples_per_s": {}, "fixed_s": {}}
                for label, _, _ in programs:
                    per_round = [(b - a) / (long - short) for a, b in zip(times[label][short], times[label][long])]
                    per_epoch = row["per_epoch_s"][label] = C.median(per_round)
                    row["samples_per_s"][label] = samples_per_epoch(label, runs, batch) / per_epoch if per_epoch > 0 else None
                    row["fixed_s"][label] = C.median(times[label][short]) - short * per_epoch
                rows.append(row)
    return {"machine": C.machine(), "load_average_before": load_before, "warning": warning,
            "mode": "original", "original_root": str(original_root), "original_python": original_python,
            "settings": {"runs": runs, "steps": steps, "batch": batch, "conditioner_epochs": lc_epochs,
                         "epochs": [short, long], "rounds": args.rounds, "quick": args.quick},
            "programs": [label for label, _, _ in programs], "rows": rows}


def table(report: dict) -> str:
    programs = report["programs"]
    s = report["settings"]
    lines = [f"whole processes, {s['runs']} runs × {s['steps']} steps, batch {s['batch']}, "
             f"per epoch = (T({s['epochs'][1]}) − T({s['epochs'][0]})) / {s['epochs'][1] - s['epochs'][0]}, "
             f"median of {s['rounds']} interleaved rounds ({report['machine']['cores']} cores, "
             f"load {report['load_average_before']:.2f})",
             f"{'config':<12}{'program':<14}{'s / epoch':>11}{'× (epoch)':>11}{'samples/s':>11}{'× (samples)':>13}"
             f"{'fixed s':>9}"]
    lines.append("-" * len(lines[-1]))
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    for row in report["rows"]:
        per, rate = row["per_epoch_s"], row["samples_per_s"]
        for label in programs:
            lines.append(f"{row['config']:<12}{label:<14}{C.fmt(per[label], '.3f'):>11}"
                         f"{C.fmt(ratio(per['original'], per[label]), '.2f') + '×':>11}{C.fmt(rate[label], '.0f'):>11}"
                         f"{C.fmt(ratio(rate[label], rate['original']), '.2f') + '×':>13}"
                         f"{C.fmt(row['fixed_s'][label], '.1f'):>9}")
    return "\n".join(lines)
