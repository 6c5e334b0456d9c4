"""Build the real stage objects for the shipped demo without the command line."""
from pathlib import Path

import torch

from modules.checkpoint import seed_everything
from modules.config import load_preset, parse_condition
from modules.data import FieldScaler, FieldStore, open_dataset, reduce, split_indices
from modules.distributed import SINGLE, DistInfo
from modules.monitor import Monitor
from modules.run import Paths, RunContext

ROOT = Path(__file__).resolve().parents[2]


def demo_context(workdir: Path, overrides=(), dist: DistInfo = SINGLE, device=torch.device("cpu")):
    """(ctx, store, train_idx, val_idx) for the demo data, outputs under `workdir`."""
    cfg = parse_condition(ROOT / "input_data/condition.txt", list(overrides))
    preset = load_preset(ROOT / "preset.txt", 1)
    seed_everything(cfg.run.seed)
    ctx = RunContext(cfg, preset, True, True, 2, device, dist, Paths(Path(workdir)), "test-run")
    ctx.monitor = Monitor(None, False)
    runs = reduce(open_dataset(ROOT / "input_data/dataset1.npy"), cfg.data.Dim2_red, cfg.data.Dim3_red)
    train_idx, val_idx = split_indices(cfg.data.Dim1, cfg.run.val_split, cfg.run.seed)
    store = FieldStore(runs, FieldScaler.fit(runs, cfg.data.field_scaling, train_idx), preload=True, device=device)
    return ctx, store, train_idx, val_idx
