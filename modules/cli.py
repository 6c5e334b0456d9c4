"""The command line: the original's flags, the port's additions, and clean failure.

Every problem the user can cause ends as one line on stderr and exit status 2; no
traceback reaches the user for those.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from modules import interrupt
from modules.errors import UserError

EXIT_USER_ERROR = 2

EPILOG = """examples:
  python SimulGen-VAE.py --preset=1 --plot=1 --lc_only=0 --size=small --load_all=1
  python SimulGen-VAE.py --lc_only=1 --preset=1
  torchrun --nproc_per_node=2 SimulGen-VAE.py --use_ddp --preset=1 --plot=2 --lc_only=0 --size=small --load_all=1
  python SimulGen-VAE.py --predict new_params.csv --out predictions.npy --samples 8
  python SimulGen-VAE.py --import_runs 'sims/run_*.xdmf' --field T --set dataset_dir=input_data
  python SimulGen-VAE.py --predict new_params.csv --out pred.npy --vtk pred_vtk
  python SimulGen-VAE.py --list_keys
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="SimulGen-VAE.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                description="Train a hierarchical-VAE surrogate of transient simulations and a latent conditioner "
                            "that predicts it from run parameters or geometry images; or predict new runs.")
    _original_flags(p.add_argument_group("the original's flags"))
    _port_flags(p.add_argument_group("additions of the port"))
    _prediction_flags(p.add_argument_group("prediction (no training)"))
    _import_flags(p.add_argument_group("import of solver files (no training)"))
    _explore_flags(p.add_argument_group("design exploration with a trained surrogate (no training)"))
    return p


def _original_flags(g) -> None:
    g.add_argument("--preset", type=int, default=None, metavar="N",
                   help="use preset block N of the preset file; without it, ask on a terminal (error otherwise)")
    g.add_argument("--plot", type=int, choices=(0, 1, 2), default=2,
                   help="0 show figures, 1 save them as PNG in runs/<run-id>/, 2 no figures (default 2)")
    g.add_argument("--lc_only", type=int, choices=(0, 1), default=0,
                   help="0 train VAE, latents and conditioner; 1 reuse the saved VAE and latents, train only the "
                        "conditioner (default 0)")
    g.add_argument("--size", choices=("small", "large", "big"), default="small",
                   help="VAE block variant; big = large (default small)")
    g.add_argument("--load_all", type=int, choices=(0, 1), default=0,
                   help="1 preload the dataset onto the training device; 0 stream batches from host memory or the "
                        "memory-mapped .npy (default 0)")
    g.add_argument("--use_ddp", action="store_true",
                   help="DistributedDataParallel over the processes started by torchrun (NCCL on GPUs, Gloo on CPUs)")
    g.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # old launchers pass it


def _port_flags(a) -> None:
    a.add_argument("--config", type=Path, default=Path("input_data/condition.txt"), metavar="PATH",
                   help="condition file (default input_data/condition.txt)")
    a.add_argument("--preset_file", type=Path, default=Path("preset.txt"), metavar="PATH",
                   help="preset file (default preset.txt)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a condition-file key for this run, validated like the file (repeatable), "
                        "e.g. --set Training_epochs=5 --set use_ema=1")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU (default auto)")
    a.add_argument("--seed", type=int, default=None, metavar="N", help="seed of every RNG and of the split (key 'seed'); with --predict, of the draws (default 0)")
    a.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in checkpoints/ from its last checkpoint (exact on CPU)")
    a.add_argument("--run", default=None, metavar="RUN_ID",
                   help="an earlier run kept in checkpoints/history/ (or the current one): --predict reads it there, "
                        "--lc_only=1 and --resume first make it the current run again")
    a.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (default: OMP_NUM_THREADS if set, else one per physical "
                        "core, shared among torchrun's processes on this machine)")
    a.add_argument("--list_keys", action="store_true", help="print every condition-file key with its default and exit")


def _prediction_flags(q) -> None:
    q.add_argument("--predict", type=Path, default=None, metavar="PATH",
                   help="CSV of new parameter rows, or a folder of new images, matching the trained input_type")
    q.add_argument("--out", type=Path, default=None, metavar="FILE.npy",
                   help="where to write the point prediction [n, T, N] in physical units (and FILE.json beside it, "
                        "which says what every output holds)")
    q.add_argument("--samples", type=int, default=1, metavar="K",
                   help="K > 1: also K stochastic realisations per input, FILE_samples.npy [n, K, T, N], and their "
                        "mean, std and calibrated bands, FILE_bands.npz (default 1)")
    q.add_argument("--evaluate", type=Path, default=None, metavar="TRUE.npy",
                   help="with --predict: the held-out runs' true fields [n, T, N], one per input in order; writes "
                        "FILE_evaluation.json and .csv (errors per run and per step, VAE-only error, baselines, "
                        "calibration with --samples) and, with --plot=1, the worst runs' figures")
    q.add_argument("--sampling", choices=("auto", "predictive", "vae_levels"), default="auto",
                   help="with --samples K > 1: predictive draws the latents from the GP conditioner's posterior; "
                        "vae_levels (the original's) draws the VAE's hierarchical levels; auto: predictive where "
                        "the conditioner has one (default auto)")
    q.add_argument("--checkpoints", type=Path, default=None, metavar="DIR",
                   help="the working directory whose checkpoints/ to predict with (default: the current one)")
    q.add_argument("--vtk", type=Path, default=None, metavar="DIR",
                   help="also write DIR/run_<i>.xdmf (+ .h5) per input (i from 1) on the mesh.vtu beside the "
                        "training dataset, for ParaView: the point prediction, with --samples also its bands")


def _import_flags(m) -> None:
    m.add_argument("--import_runs", nargs="+", default=None, metavar="GLOB",
                   help="one run per match, in natural order: an XDMF time series or a folder of per-step mesh files "
                        "(.vtu, .vtk, ...); writes dataset1.npy, mesh.vtu and dataset1.fields.json to the working "
                        "directory or to --set dataset_dir=DIR")
    m.add_argument("--field", action="append", default=[], metavar="NAME",
                   help="point-data array to import: NAME, NAME:<component> or NAME:mag; repeat to stack several "
                        "fields as extra nodes")
    m.add_argument("--force", action="store_true",
                   help="with --import_runs (or --export, --suggest): replace a dataset (or an export, or suggested "
                        "rows) already in the folder "
                        "(its files are kept beside it, renamed *.replaced-<time>); without it they refuse")


def _explore_flags(e) -> None:
    e.add_argument("--suggest", type=int, default=None, metavar="K",
                   help="propose K new parameter rows where the calibrated predictive spread is largest, spread "
                        "apart; writes them to --out FILE.csv (ready for the solver) and FILE.json (each row's "
                        "predicted spread); with --plot=1 a figure of the candidates")
    e.add_argument("--sensitivity", type=int, default=None, metavar="N",
                   help="Sobol first-order and total indices (SALib, N base samples, bootstrap confidence "
                        "intervals) of each --qoi through the surrogate; writes --out FILE.json and FILE.csv, "
                        "with --plot=1 a bar figure per quantity")
    e.add_argument("--qoi", action="append", default=[], metavar="SPEC",
                   help="with --sensitivity: l2 (the field's L2 norm over the run, the default), max (the maximum "
                        "over nodes at each saved step), node:I (the value at node I, from 1, at each step) or "
                        "nodes:FILE (the mean over the nodes listed in FILE); repeatable")
    e.add_argument("--bounds", type=Path, default=None, metavar="CSV",
                   help="with --suggest or --sensitivity: a CSV of two rows, the parameters' minima and maxima "
                        "(default: the training runs' box)")
    e.add_argument("--export", nargs=2, default=None, metavar=("FORMAT", "DIR"),
                   help="onnx DIR: write DIR/surrogate.onnx (parameter rows to the point prediction in physical "
                        "units, and with the GP conditioner its latents' posterior std) and DIR/surrogate.json (input "
                        "columns, their training ranges, the outputs); checked against PyTorch with onnxruntime; "
                        "an existing export is replaced only with --force")


def _setup_logging(is_main: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("simulgen")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if is_main else logging.ERROR)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank == 0)
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except UserError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except interrupt.Stopped as exc:         # saved at an epoch end after a signal
        if rank == 0:
            print(str(exc), file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:                # a second signal, or Ctrl-C outside training
        if rank == 0:
            print(interrupt.interrupted_message(), file=sys.stderr, flush=True)
        return interrupt.exit_code(130)
    finally:
        distributed = sys.modules.get("modules.distributed")   # not imported: no process group (and no torch import)
        if distributed is not None:
            distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    if args.list_keys:
        from modules.config import key_table
        lines, current = [], None
        for section, key, default, text in key_table():
            if section != current:
                lines += [""] * (current is not None) + [f"[{section}]"]
                current = section
            lines.append(f"  {key:<34} {default:<10} {text}")
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:                  # `--list_keys | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give a whole number of at least 1.")
    if args.import_runs is not None or args.field:
        return _import_runs(args)
    if args.suggest is not None or args.sensitivity is not None or args.export is not None:
        if args.qoi and args.sensitivity is None:
            raise UserError("--qoi goes with --sensitivity N; drop it or add --sensitivity.")
        return _explore(args)
    if args.qoi or args.bounds is not None:
        raise UserError(f"{'--qoi' if args.qoi else '--bounds'} goes with --sensitivity N or --suggest K; drop it or "
                        f"add one of them.")
    if args.predict is not None or args.out is not None or args.vtk is not None or args.evaluate is not None:
        return _predict(args)
    if args.samples != 1 or args.sampling != "auto":
        raise UserError("--samples and --sampling go with --predict PATH --out FILE.npy.")
    # The config and preset are checked before torch is imported: a typo costs no start-up.
    from modules.config import load_preset, parse_condition
    overrides = tuple(args.overrides) + ((f"seed={args.seed}",) if args.seed is not None else ())
    cfg = parse_condition(args.config, overrides)
    preset = load_preset(args.preset_file, args.preset)
    from modules.threads import configure_threads
    configure_threads(args.threads)
    from modules.pipeline import Flags, train
    interrupt.install()        # Ctrl-C / SIGTERM: save at the next epoch end, then stop
    flags = Flags(plot=args.plot, lc_only=bool(args.lc_only), small=args.size == "small",
                  load_all=bool(args.load_all), use_ddp=args.use_ddp, device=args.device, resume=args.resume,
                  run=args.run)
    train(flags, cfg, preset, Path.cwd())
    return 0


def _trained(args: argparse.Namespace, purpose: str):
    """The trained model's paths (--checkpoints, --run) and the device, for a command that uses it."""
    if args.checkpoints is not None and not args.checkpoints.is_dir():
        raise UserError(f"--checkpoints {args.checkpoints}: no such folder; give the working directory of a trained "
                        f"model (the folder that holds its checkpoints/).")
    from modules.threads import configure_threads
    configure_threads(args.threads, purpose)
    from modules.distributed import resolve_device
    from modules.history import check_current_finished, locate
    from modules.run import Paths
    paths = Paths(args.checkpoints or Path.cwd())
    if args.run is not None:
        paths = Paths(paths.workdir, locate(paths, args.run))
    else:
        check_current_finished(paths)
    return paths, resolve_device(args.device)


def _explore(args: argparse.Namespace) -> int:
    chosen = [flag for flag, value in (("--suggest", args.suggest), ("--sensitivity", args.sensitivity),
                                       ("--export", args.export)) if value is not None]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)}: give one of them per command.")
    if args.predict is not None or args.evaluate is not None or args.vtk is not None:
        raise UserError(f"{chosen[0]} does not predict; run --predict separately.")
    if args.export is not None:
        from modules.export import export_cli
        return export_cli(args, *_trained(args, "the export"))
    if args.suggest is not None:
        from modules.suggest import suggest_cli
        return suggest_cli(args, *_trained(args, "the suggestion"))
    from modules.sensitivity import sensitivity_cli
    return sensitivity_cli(args, *_trained(args, "the sensitivity analysis"))


def _predict(args: argparse.Namespace) -> int:
    if args.predict is None or args.out is None:
        raise UserError("prediction needs both --predict PATH and --out FILE.npy.")
    paths, device = _trained(args, "prediction")
    from modules.predict import run_prediction
    meta = run_prediction(args.predict, args.out, args.samples, paths, device, vtk=args.vtk, sampling=args.sampling,
                          truth=args.evaluate, plot=args.plot, seed=0 if args.seed is None else args.seed)
    runs = meta["shape"][0]
    source = "a CSV file" if meta["input_type"] == "csvs" else f"{len(meta['inputs'])} images"
    print(f"wrote {args.out} {tuple(meta['shape'])} (the point prediction, physical units): {runs} run{'s' * (runs != 1)} "
          f"predicted from {source} in {meta['seconds'] * 1000:.1f} ms; details in {args.out.with_suffix('.json')}")
    if args.samples > 1:
        print(f"wrote {meta['samples_file']} ({args.samples} samples per run, {meta['sampling']}) and {meta['bands']}")
    if "evaluation" in meta:
        from modules.evaluate import describe
        print("\n".join(describe(meta["evaluation"])))
    if args.vtk is not None:
        print(f"wrote {len(meta['vtk'])} XDMF time series (run_<i>.xdmf + .h5, i = input number from 1) and "
              f"{Path(meta['vtk_collection']).name} (every run in one file, for ParaView) to {args.vtk}, on {meta['mesh']}")
    return 0


def _import_runs(args: argparse.Namespace) -> int:
    if args.import_runs is None or not args.field:
        raise UserError("importing needs both --import_runs GLOB and --field NAME (e.g. --import_runs 'sims/run_*' "
                        "--field T).")
    if args.predict is not None or args.out is not None or args.vtk is not None or args.evaluate is not None:
        raise UserError("--import_runs only imports; run --predict separately, after training.")
    dataset_dir = ""
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip() != "dataset_dir":
            raise UserError(f"--set {item}: with --import_runs only --set dataset_dir=DIR applies (the folder that "
                            f"receives the dataset); drop the other --set flags.")
        dataset_dir = value.strip()
    from modules.mesh_io import condition_lines, import_runs
    interrupt.install()
    interrupt.set_stage("import", "nothing was written; run the import again")
    result = import_runs(args.import_runs, args.field, Path(dataset_dir or "."), args.force)
    P, T, N = result.shape
    shown = result.times if len(result.times) <= 20 else [*result.times[:5], "…", *result.times[-5:]]
    times = ", ".join(t if isinstance(t, str) else f"{t:g}" for t in shown)
    print(f"imported {P} runs × {T} steps × {N} nodes ({result.nodes} mesh nodes × {len(result.fields)} field(s): "
          f"{', '.join(result.fields)})")
    print(f"  time values: {times}" + (f" (all {T} in {result.layout.name})" if len(result.times) > 20 else ""))
    print(f"  wrote {result.dataset}, {result.mesh}, {result.layout}")
    print("  for input_data/condition.txt (preset dataset number 1):")
    for line in condition_lines(result, dataset_dir):
        print(f"    {line}")
    return 0
