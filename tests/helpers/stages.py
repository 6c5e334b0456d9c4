"""A cheap real stage for stage-level tests: the MLP conditioner on the demo's parameters."""
from pathlib import Path

import numpy as np

from helpers.context import ROOT, demo_context
from modules.train_conditioner import ConditionerData, ConditionerInputs, ConditionerTrainer

CONDITIONER = ["input_type=csvs", "param_dir=/input_data/params.csv", "csv_conditioner=mlp", "lc_warmup_epochs=4", "use_progressive_dropout=0"]


def conditioner_stage(tmp_path: Path, overrides=()):
    """(ctx, ConditionerTrainer) on latents that depend on the parameters; `overrides` are
    condition-file keys on top of CONDITIONER."""
    ctx, _, train_idx, val_idx = demo_context(tmp_path, CONDITIONER + list(overrides))
    rng = np.random.default_rng(0)
    params = np.loadtxt(ROOT / "input_data/params.csv", delimiter=",", dtype=np.float32)
    main = np.tanh(params @ rng.normal(size=(4, ctx.cfg.vae.Latent_dim_end))).astype(np.float32)
    hier = np.tanh(params @ rng.normal(size=(4, 24))).reshape(80, 3, 8).astype(np.float32)
    data = ConditionerData.build(ConditionerInputs(params, []), main, hier, ctx.device)
    return ctx, ConditionerTrainer(ctx, data, train_idx, val_idx, vae_run_id="x")
