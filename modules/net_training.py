"""What the frame and point networks (modules/frame_net.py, modules/point_net.py) share: their
centred targets and one training loop, which stops early on held-out runs.

The loop is AdamW with a one-cycle learning rate over the budget. Every `CHECKS`-th of the budget
it asks a judge how well the network, blended with the GP as the blend will use it, predicts
held-out runs (`BlendJudge`), keeps the best weights, and stops when `PATIENCE` checks in a row
brought no gain. A network that never improves on the GP alone (its blend weight would be 0) is
so found out after PATIENCE / CHECKS of its budget.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from modules.progress import Ticker

log = logging.getLogger("simulgen")

LR = 2e-3                   # peak of the one-cycle schedule
WEIGHT_DECAY = 1e-5
CHECKS = 20                 # held-out checks over the budget
PATIENCE = 5                # checks without a gain before the training stops
MIN_GAIN = 1e-3             # a gain is a relative drop of the judged error by more than this
WEIGHTS = np.arange(21) / 20          # the blend weights the judge and `choose_weights` try: 0, 0.05, ..., 1


def centred_targets(fields: np.ndarray, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The networks' targets: the runs' mean frame (T, N), the frames (n, T, N) minus it divided by their
    largest deviation from it within each of `blocks` stacked fields (float32, the only copy; `fields` is
    left as it was), and that deviation per node (N,): fields of other units weigh alike in the loss."""
    mean = torch.from_numpy(fields.mean(axis=0, dtype=np.float64).astype(np.float32))
    y = torch.as_tensor(fields, dtype=torch.float32).sub(mean)
    largest = torch.maximum(y.amax(dim=(0, 1)), -y.amin(dim=(0, 1))).view(blocks, -1).amax(dim=1)    # (blocks,)
    unit = torch.where(largest > 0, largest, torch.ones(())).repeat_interleave(fields.shape[2] // blocks)
    return mean, y.div_(unit), unit


@dataclass
class BlendJudge:
    """Held-out runs at fixed points, in the networks' centred units: the truth (v, S) and the GP's
    prediction there (v, S). `error(pred)` is the mean squared error of the best blend
    gp + w (pred − gp), w in WEIGHTS, so that a network is judged by what it adds to the GP."""
    truth: np.ndarray
    gp: np.ndarray

    def error(self, pred: np.ndarray) -> float:
        base = (self.gp - self.truth).ravel().astype(np.float64)
        apart = (pred - self.gp).ravel().astype(np.float64)
        errors = (base @ base + 2 * WEIGHTS * (apart @ base) + WEIGHTS ** 2 * (apart @ apart)) / base.size
        return float(errors.min())


@dataclass
class HeldRuns:
    """Runs held out of a network's training that judge it (`fit_network`): their scaled inputs (v, d), true
    fields and the GP's prediction (v, T, N), physical units, and the flat (step, node) positions `keep` (S,)
    the judge reads (a fixed subset on large meshes)."""
    x: np.ndarray
    truth: np.ndarray
    gp: np.ndarray
    keep: np.ndarray

    def judge(self, mean: torch.Tensor, unit: torch.Tensor) -> BlendJudge:
        """The judge in the centred units of a network whose targets have `mean` (T, N) and `unit` (N,)."""
        def centred(fields):
            flat = (fields - mean.numpy()) / unit.numpy()                                # (v, T, N)
            return flat.reshape(len(fields), -1)[:, self.keep]
        return BlendJudge(centred(self.truth), centred(self.gp))


@dataclass
class Fitted:
    steps: int                  # the optimiser steps of the kept weights
    stopped: int                # the steps it took
    budget: int                 # the steps it could have taken
    judged: list[float]         # the judge's error at each check (empty without a judge)
    gp_error: float | None      # the judge's error of the GP alone


def fit_network(net: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], budget: int, name: str,
                predict_held: Callable[[], np.ndarray] | None = None, judge: BlendJudge | None = None) -> Fitted:
    """Train `net` (its `net.net` holds the weights) on `batches` of (inputs, targets) for at most `budget`
    steps; with a judge, check `predict_held()` against it CHECKS times over the budget, keep the best
    weights and stop after PATIENCE checks without a gain. Leaves `net` in eval mode without gradients."""
    opt = torch.optim.AdamW(net.net.parameters(), LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=budget)
    every = max(1, budget // CHECKS)
    best, best_state, best_step, bad, judged, step = np.inf, None, 0, 0, [], 0
    gp_error = judge.error(judge.gp) if judge is not None else None
    log.info("%s: training for at most %d steps%s", name, budget,
             ", stopping when the held-out runs gain nothing" if judge is not None else "")
    ticker = Ticker(name, budget)
    net.train()
    for step, (x, y) in zip(range(1, budget + 1), batches):
        loss = nn.functional.mse_loss(net.net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        ticker.tick(step, lambda: f"loss {loss.item():.3g}")
        if judge is None or (step % every and step != budget):
            continue
        net.eval()
        with torch.no_grad():
            error = judge.error(predict_held())
        net.train()
        judged.append(error)
        if error < best * (1 - MIN_GAIN):
            best, best_step, bad = error, step, 0
            best_state = {k: v.detach().clone() for k, v in net.net.state_dict().items()}
        else:
            bad += 1
            if bad >= PATIENCE:
                log.info("%s: stopped at step %d of %d (no gain on the held-out runs in %d checks; best at step %d)",
                         name, step, budget, PATIENCE, best_step)
                break
    if best_state is not None:
        net.net.load_state_dict(best_state)
    return Fitted(best_step if judge is not None else budget, step, budget, judged, gp_error)


def repeat_batches(make: Callable[[int], Iterator]) -> Iterator:
    """make(0), make(1), ... chained: one pass over the data after another."""
    return itertools.chain.from_iterable(make(epoch) for epoch in itertools.count())
