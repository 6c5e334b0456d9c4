"""The frame network: a run's inputs and one saved time → that time's field, trained on every
saved frame of the training runs, and blended with the GP conditioner's prediction.

A model with one latent vector per run (the VAE, a POD) learns from P samples, one per run;
where a feature moves with the parameters (a front, a shock, a wave) its coefficients oscillate
with them, and ~100 runs cannot pin that down (benchmarks/accuracy/NOTES.md, H30). This network
sees P × T samples: the field at time t of a run with inputs x, as a smooth function of (x, t),
e.g. a pulse at x0 + u·t. On the suite it cut the test error against POD + GPR 4.5× on
advection_front, 2× on burgers and 1.7× on wave_membrane; on the diffusion problem, where the
runs differ by a few %, it overfits and errs 1.4× as much as the GP, so its prediction is blended
with the GP's by the weight that predicts the validation runs best (`choose_weight`): 0.45 there,
0.95 on advection_front.

The targets are the frames minus the training runs' mean frame at the same time, divided by
their largest deviation from it; the inputs are the conditioner's scaled inputs (CSV columns or
picture features) and the time index mapped to [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

WIDTH = 256                 # three hidden layers of this width, then HEAD features decoded to the nodes
HEAD = 512
BATCH = 128                 # frames per optimiser step
LR = 2e-3                   # peak of the one-cycle schedule
WEIGHT_DECAY = 1e-5
WEIGHTS = np.arange(21) / 20           # the blend weights `choose_weight` tries: 0, 0.05, ..., 1
MAX_GIB = 2                 # training frames held at once (float32); above this the network is skipped
MAX_STEPS = 10_000          # optimiser steps at most, whatever the epochs (the suite's problems need 2,400-9,000)


class FrameNet(nn.Module):
    """(B, d) scaled inputs → (B, T, N) fields in physical units."""

    def __init__(self, inputs: int, steps: int, nodes: int, width: int = WIDTH) -> None:
        super().__init__()
        self.shape = {"inputs": inputs, "steps": steps, "nodes": nodes, "width": width}
        self.net = nn.Sequential(nn.Linear(inputs + 1, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, HEAD), nn.GELU(),
                                 nn.Linear(HEAD, nodes))
        self.register_buffer("mean", torch.zeros(steps, nodes))
        self.register_buffer("unit", torch.ones(()))
        self.register_buffer("weight", torch.zeros(()))          # the blend weight of this network's prediction
        self.register_buffer("times", torch.linspace(0.0, 1.0, steps))

    def frame_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) → (B·T, d + 1): each run's inputs beside each of its times."""
        steps = len(self.times)
        return torch.cat([x.float().repeat_interleave(steps, 0), self.times.repeat(len(x))[:, None]], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.frame_inputs(x)).unflatten(0, (len(x), len(self.times)))
        return out * self.unit + self.mean

    def disagreement(self, point: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """This network's prediction minus the GP's `point` (B, T, N); the blend moves `point` by
        `weight` times it."""
        return self(x.to(self.mean.device)).to(point) - point

    def stored(self) -> dict:
        """The sizes and the weights, for a conditioner checkpoint's `extra` (modules/surrogate.py loads them)."""
        return {"shape": dict(self.shape), "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}


def fits_in_memory(runs: int, steps: int, nodes: int) -> bool:
    return runs * steps * nodes * 4 <= MAX_GIB * 2**30


def train_frame_net(inputs: np.ndarray, fields: np.ndarray, epochs: int, seed: int,
                    device: torch.device) -> FrameNet:
    """A FrameNet trained by AdamW with a one-cycle schedule on every frame of `fields` (n, T, N),
    physical units, whose runs have the scaled `inputs` (n, d), for `epochs` or MAX_STEPS optimiser
    steps, whichever is fewer (the cost of a step grows with N). Deterministic for a seed (on CPU)."""
    n, steps, nodes = fields.shape
    mean = fields.mean(axis=0)
    unit = float(np.abs(fields - mean).max()) or 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FrameNet(inputs.shape[1], steps, nodes)
    net.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    net.unit.fill_(unit)
    net = net.to(device)
    x = net.frame_inputs(torch.as_tensor(inputs, dtype=torch.float32, device=device))
    y = torch.as_tensor((fields - mean) / unit, dtype=torch.float32, device=device).flatten(0, 1)
    batches = (len(x) + BATCH - 1) // BATCH
    epochs = min(epochs, max(1, MAX_STEPS // batches))
    opt = torch.optim.AdamW(net.net.parameters(), LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=epochs * batches)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).to(device).split(BATCH):
            loss = nn.functional.mse_loss(net.net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval().requires_grad_(False)


def choose_weight(gp: np.ndarray, net: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    """The blend weight w in WEIGHTS whose (1 − w)·gp + w·net has the lowest mean relative L2
    against `truth` (all (n, T, N)); ties go to the smaller weight. Also each weight's error."""
    from modules.baseline import relative_l2
    errors = np.array([relative_l2(gp + w * (net - gp), truth).mean() for w in WEIGHTS])
    return float(WEIGHTS[int(np.argmin(errors))]), errors
