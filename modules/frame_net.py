"""The frame network: a run's inputs and one saved time → that time's field, trained on every
saved frame of the training runs, and the blend of such networks (this one and the point
network, modules/point_net.py) with the GP conditioner's prediction.

A model with one latent vector per run (the VAE, a POD) learns from P samples, one per run;
where a feature moves with the parameters (a front, a shock, a wave) its coefficients oscillate
with them, and ~100 runs cannot pin that down (benchmarks/accuracy/NOTES.md, H30). This network
sees P × T samples: the field at time t of a run with inputs x, as a smooth function of (x, t),
e.g. a pulse at x0 + u·t. On the suite it cut the test error against POD + GPR 4.5× on
advection_front, 2× on burgers and 1.7× on wave_membrane; on the diffusion problem, where the
runs differ by a few %, it overfits and errs 1.4× as much as the GP, so its prediction is blended
with the GP's, beside the point network, by the weights that predict the validation runs best
(`choose_weights`).

The targets are the frames minus the training runs' mean frame at the same time, divided by
their largest deviation from it; the inputs are the conditioner's scaled inputs (CSV columns or
picture features) and the time index mapped to [0, 1].
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from torch import nn

from modules.net_training import WEIGHTS, Fitted, HeldRuns, centred_targets, fit_network, repeat_batches

log = logging.getLogger("simulgen")

WIDTH = 256                 # three hidden layers of this width, then HEAD features decoded to the nodes
HEAD = 512
BATCH = 128                 # frames per optimiser step
MAX_GIB = 2                 # training frames held at once (float32); above this the network is skipped
MAX_STEPS = 10_000          # optimiser steps at most, whatever the epochs (the suite's problems need 2,400-9,000)
CPU_NODE_STEPS = 2 * 10**7  # on CPU also steps × nodes at most: a step costs ~4.7 µs per node on 2 cores, so
                            # ~1.5 min per training on any mesh (the suite's problems need up to 1.8e7)


def frame_inputs(x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """(B, d) runs' inputs and (T,) times → (B·T, d + 1): each run's inputs beside each of its times."""
    return torch.cat([x.repeat_interleave(len(times), 0), times.to(x).repeat(len(x))[:, None]], 1)


class FrameNet(nn.Module):
    """(B, d) scaled inputs → (B, T, N) fields in physical units."""

    kind = "frame"

    def __init__(self, inputs: int, steps: int, nodes: int, width: int = WIDTH) -> None:
        super().__init__()
        self.shape = {"inputs": inputs, "steps": steps, "nodes": nodes, "width": width}
        self.net = nn.Sequential(nn.Linear(inputs + 1, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, HEAD), nn.GELU(),
                                 nn.Linear(HEAD, nodes))
        self.register_buffer("mean", torch.zeros(steps, nodes))
        self.register_buffer("unit", torch.ones(nodes))             # each node's field's largest deviation
        self.register_buffer("times", torch.linspace(0.0, 1.0, steps))

    def with_defaults(self, saved: dict) -> dict:
        """A saved state of an earlier version completed with what it meant: one unit for every node."""
        return {**saved, "unit": torch.as_tensor(saved["unit"]).expand_as(self.unit).clone()} if "unit" in saved \
            else saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().to(self.mean.device)
        out = self.net(frame_inputs(x, self.times)).unflatten(0, (len(x), len(self.times)))
        return out * self.unit + self.mean

    def stored(self) -> dict:
        """The kind, the sizes and the weights, for NetBlend.stored."""
        return {"kind": self.kind, "shape": dict(self.shape),
                "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}


class NetBlend(nn.Module):
    """Networks blended with the GP (`gp_frame_net`, `gp_point_net`): the prediction is
    GP + Σ wᵢ (netᵢ − GP), i.e. the GP's point moved by `weight` = Σ wᵢ times the disagreement of
    the networks' weighted mean with it."""

    def __init__(self, members: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("weight", self.weights.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The networks' weighted mean (B, T, N)."""
        return sum(float(w / self.weight) * net(x) for w, net in zip(self.weights, self.members))

    def disagreement(self, point: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The networks' weighted mean minus the GP's `point` (B, T, N); the blend moves `point` by
        `weight` times it."""
        return self(x).to(point) - point

    def stored(self) -> dict:
        """For a conditioner checkpoint's `extra["frame_net"]` (`load_blend` reads it back)."""
        return {"members": [net.stored() for net in self.members], "weights": self.weights.tolist()}


def load_blend(stored: dict, where: str, hint: str) -> NetBlend:
    """The NetBlend of a conditioner checkpoint, also of the earlier layout (one frame network holding its
    own `weight`); a damaged entry is a UserError naming `where` (`hint`: how to fix weights that do not fit)."""
    from modules.checkpoint import load_model_state
    from modules.errors import UserError
    from modules.point_net import PointNet          # noqa: the blend holds either kind
    kinds = {"frame": FrameNet, "point": PointNet}
    entries, weights = stored.get("members"), stored.get("weights")
    if entries is None:                                     # the earlier layout
        state = dict(stored.get("state", {}))
        entries, weights = [{"kind": "frame", **stored, "state": state}], [float(state.pop("weight", 0.0))]
    if not isinstance(entries, list) or not isinstance(weights, list) or len(weights) != len(entries):
        raise UserError(f"{where}: its blended networks are unreadable (members and weights do not match); the file "
                        f"is damaged or from another tool: retrain the conditioner with --lc_only=1.")
    members = []
    for entry in entries:
        try:
            net = kinds[entry["kind"]](**entry["shape"])
        except (TypeError, KeyError) as err:
            raise UserError(f"{where}: its blended network's sizes are unreadable ({err}); the file is damaged "
                            f"or from another tool: retrain the conditioner with --lc_only=1.") from None
        load_model_state(net, net.with_defaults(entry["state"]), where, "conditioner checkpoint", hint)
        members.append(net)
    return NetBlend(members, list(weights))


def training_epochs(epochs: int, batches: int, nodes: int, device: torch.device) -> int:
    """`epochs`, cut to MAX_STEPS optimiser steps of `batches` each, and on CPU to CPU_NODE_STEPS / `nodes`
    steps (large meshes: the blend weight, chosen on the validation runs, then falls to what the shorter
    training earns); at least one epoch."""
    steps = MAX_STEPS if device.type != "cpu" else min(MAX_STEPS, CPU_NODE_STEPS // nodes)
    return min(epochs, max(1, steps // batches))


def fits_in_memory(runs: int, steps: int, nodes: int) -> bool:
    return runs * steps * nodes * 4 <= MAX_GIB * 2**30


def train_frame_net(inputs: np.ndarray, fields: np.ndarray, epochs: int, seed: int, device: torch.device,
                    blocks: int = 1, held: HeldRuns | None = None, steps: int | None = None) -> tuple[FrameNet, Fitted]:
    """A FrameNet trained (modules/net_training.py, `fit_network`) on every frame of `fields` (n, T, N),
    physical units, whose runs have the scaled `inputs` (n, d): for `epochs` or fewer (`training_epochs`: the
    cost of a step grows with N), stopping early on the `held` runs; or for exactly `steps` optimiser steps
    (the refit on every run). Deterministic for a seed (on CPU)."""
    n, times, nodes = fields.shape
    mean, y, unit = centred_targets(fields, blocks)
    y = y.flatten(0, 1).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FrameNet(inputs.shape[1], times, nodes)
    net.mean.copy_(mean)
    net.unit.copy_(unit)
    net = net.to(device)
    x = frame_inputs(torch.as_tensor(inputs, dtype=torch.float32, device=device), net.times)
    batches = (len(x) + BATCH - 1) // BATCH
    if steps is None:
        cut = training_epochs(epochs, batches, nodes, torch.device(device))
        if cut < epochs:
            log.info("frame network: %d epochs, not %d (at most %d optimiser steps%s)", cut, epochs, MAX_STEPS,
                     f", {CPU_NODE_STEPS:.0e} steps × nodes on CPU" if torch.device(device).type == "cpu" else "")
        steps = cut * batches
    order = torch.Generator().manual_seed(seed)
    stream = repeat_batches(lambda _: ((x[idx], y[idx]) for idx in
                                       torch.randperm(len(x), generator=order).to(device).split(BATCH)))
    judge = predict_held = None
    if held is not None:
        judge = held.judge(mean, unit)
        held_x = frame_inputs(torch.as_tensor(held.x, dtype=torch.float32, device=device), net.times)
        predict_held = lambda: net.net(held_x).reshape(len(held.x), -1)[:, held.keep].cpu().numpy()   # noqa: E731
    fitted = fit_network(net, stream, max(1, steps), "frame network", predict_held, judge)
    return net.eval().requires_grad_(False), fitted


def blend_errors(gp: np.ndarray, nets: list[np.ndarray], truth: np.ndarray, weights: np.ndarray,
                 blocks: int = 1) -> np.ndarray:
    """The mean relative L2 against `truth` (modules/baseline.py, `relative_l2`, of `blocks` stacked fields) of
    gp + Σ wᵢ (netsᵢ − gp) (all (n, T, N)) for each row of `weights` (c, k): each run's and field's squared
    error is a quadratic form in w, so the fields are read once."""
    def flat(a):            # (n, T, N) -> (n, F, T·N/F): each run's fields apart
        return np.asarray(a, np.float64).reshape(len(truth), truth.shape[1], blocks, -1).swapaxes(1, 2) \
            .reshape(len(truth), blocks, -1)
    base = flat(gp) - flat(truth)
    apart = [flat(net) - flat(gp) for net in nets]
    cross = np.array([[np.einsum("rfv,rfv->rf", a, b) for b in apart] for a in apart])     # (k, k, n, F)
    linear = np.array([np.einsum("rfv,rfv->rf", a, base) for a in apart])                 # (k, n, F)
    squared = (np.einsum("rfv,rfv->rf", base, base)[None] + 2 * np.einsum("ci,irf->crf", weights, linear)
               + np.einsum("ci,ijrf,cj->crf", weights, cross, weights))
    norm = np.maximum(np.linalg.norm(flat(truth), axis=2), 1e-30)                          # (n, F)
    return (np.sqrt(np.maximum(squared, 0.0)) / norm).mean(axis=(1, 2))


def choose_weights(gp: np.ndarray, nets: list[np.ndarray], truth: np.ndarray,
                   blocks: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blend weights (one per network, each in WEIGHTS, their sum at most 1) whose
    gp + Σ wᵢ (netsᵢ − gp) has the lowest mean relative L2 against `truth`; ties go to the smaller
    sum, the GP's side. Also every combination tried (c, k) and its error (c,)."""
    steps = len(WEIGHTS) - 1
    grid = [c for c in itertools.product(range(steps + 1), repeat=len(nets)) if sum(c) <= steps]
    combos = np.array(sorted(grid, key=lambda c: (sum(c), c)), dtype=np.float64).reshape(-1, len(nets)) / steps
    errors = blend_errors(gp, nets, truth, combos, blocks)
    return combos[int(np.argmin(errors))], combos, errors
