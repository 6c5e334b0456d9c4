"""The point network: a run's inputs, one saved time and one node's position → the field there,
trained on random (run, time, node) points of the training runs and blended with the GP
conditioner's prediction beside the frame network (modules/frame_net.py).

The frame network learns each node's value separately (its last layer has one output per node),
so a feature that moves across the mesh with the parameters, such as heat_inclusion's inclusion,
must be learnt at every node from ~100 runs. Given where each node is, one smooth function of
(inputs, time, position) can learn the feature once, as a shape that moves: on heat_inclusion,
with the grid's coordinates, 0.0041 against POD + GPR's 0.0094 and the frame network's 0.0130
(benchmarks/accuracy/NOTES.md, H32).

Positions (`node_positions`): the points of the `mesh.vtu` that `--import_runs` writes beside
the dataset, or a file of one row per node; else an embedding of the nodes learnt from the
training fields (scikit-learn's spectral embedding of the nodes' signals: nodes whose values
move together lie close), which recovers the layout only roughly (heat_inclusion 0.0086).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modules.data import varying_nodes
from modules.errors import UserError
from modules.net_training import Fitted, HeldRuns, centred_targets, fit_network

log = logging.getLogger("simulgen")

WIDTH = 128                 # four hidden layers of this width
DEPTH = 4
BATCH = 4096                # points per optimiser step
STEPS_PER_RUN = 80          # optimiser steps per training run at most, whatever `point_net_steps` says
CHUNK = 1 << 16             # points per forward pass when predicting whole fields
EMBED_DIMS = 3              # values per node of the learnt embedding (a 3-D mesh needs three)
EMBED_NEIGHBOURS = 8
EMBED_MODES = 64            # the nodes' signals are compared in this many leading frame-POD directions
EMBED_MAX_NODES = 200_000   # above this the embedding's neighbour graph is too costly: no point network
EMBED_MIN_NODES = 20        # below this the nodes are placed in their order on a line


class PointNet(nn.Module):
    """(B, d) scaled inputs → (B, T, N) fields in physical units, one point at a time."""

    kind = "point"

    def __init__(self, inputs: int, steps: int, nodes: int, dims: int, width: int = WIDTH) -> None:
        super().__init__()
        self.shape = {"inputs": inputs, "steps": steps, "nodes": nodes, "dims": dims, "width": width}
        layers: list[nn.Module] = [nn.Linear(inputs + 1 + dims, width), nn.GELU()]
        for _ in range(DEPTH - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.register_buffer("mean", torch.zeros(steps, nodes))
        self.register_buffer("unit", torch.ones(nodes))             # each node's field's largest deviation
        self.register_buffer("positions", torch.zeros(nodes, dims))     # each node's position, [0, 1] per column
        self.register_buffer("times", torch.linspace(0.0, 1.0, steps))
        self.register_buffer("varies", torch.ones(nodes))              # 0 where the training runs never moved

    def points(self, x: torch.Tensor, run: torch.Tensor, step: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """The network's input rows for the points (run, step, node) of the runs with inputs `x`."""
        return torch.cat([x[run], self.times[step, None], self.positions[node]], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().to(self.mean.device)
        steps, nodes = self.mean.shape
        total = len(x) * steps * nodes
        out = torch.empty(total, device=self.mean.device)
        for start in range(0, total, CHUNK):
            flat = torch.arange(start, min(start + CHUNK, total), device=self.mean.device)
            run, rest = flat // (steps * nodes), flat % (steps * nodes)
            out[start:start + len(flat)] = self.net(self.points(x, run, rest // nodes, rest % nodes))[:, 0]
        return out.view(len(x), steps, nodes) * (self.unit * self.varies) + self.mean          # (B, T, N)

    def stored(self) -> dict:
        return {"kind": self.kind, "shape": dict(self.shape),
                "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    def with_defaults(self, saved: dict) -> dict:
        """A saved state of an earlier version completed with what it meant: every node moves, one unit for all."""
        saved = {"varies": torch.ones_like(self.varies), **saved}
        return {**saved, "unit": torch.as_tensor(saved["unit"]).expand_as(self.unit).clone()} if "unit" in saved \
            else saved


def point_budget(steps: int, runs: int) -> int:
    """The point network's optimiser steps: `point_net_steps`, at most STEPS_PER_RUN per training run (what a
    network can learn grows with the runs, not the mesh: a study of 10 runs stops at 800 steps)."""
    return max(1, min(steps, STEPS_PER_RUN * runs))


def train_point_net(inputs: np.ndarray, fields: np.ndarray, positions: np.ndarray, steps: int, seed: int,
                    device: torch.device, blocks: int = 1, held: HeldRuns | None = None,
                    exact: bool = False) -> tuple[PointNet, Fitted]:
    """A PointNet trained (modules/net_training.py, `fit_network`) on random points of `fields` (n, T, N),
    physical units, BATCH a step, whose runs have the scaled `inputs` (n, d) and whose nodes lie at
    `positions` (N, D): for at most `point_budget(steps, n)` steps, stopping early on the `held` runs; or
    (`exact`, the refit on every run) for `steps`. Targets centred on the runs' mean frame; nodes that never
    move are left out and predicted as that mean exactly. Deterministic for a seed (on CPU); a step costs
    the same on any mesh."""
    n, times, nodes = fields.shape
    mean, y, unit = centred_targets(fields, blocks)
    moving = torch.from_numpy(np.flatnonzero(varying_nodes(fields)))     # constant nodes are the mean frame exactly
    y = y.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = PointNet(inputs.shape[1], times, nodes, positions.shape[1])
    net.mean.copy_(mean)
    net.unit.copy_(unit)
    net.positions.copy_(torch.as_tensor(positions, dtype=torch.float32))
    net.varies.zero_()[moving] = 1.0
    net = net.to(device)
    x = torch.as_tensor(inputs, dtype=torch.float32, device=device)
    draw = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            run, step, pick = (torch.randint(size, (BATCH,), generator=draw) for size in (n, times, max(len(moving), 1)))
            node = moving[pick] if len(moving) else pick
            run, step, node = run.to(device), step.to(device), node.to(device)
            yield net.points(x, run, step, node), y[run, step, node][:, None]

    judge = predict_held = None
    if held is not None:
        judge = held.judge(mean, unit)
        held_x = torch.as_tensor(held.x, dtype=torch.float32, device=device)
        flat = torch.as_tensor(held.keep, device=device)
        rows = torch.arange(len(held.x), device=device).repeat_interleave(len(flat))
        where = flat.repeat(len(held.x))
        points = net.points(held_x, rows, where // nodes, where % nodes)

        def predict_held():
            return torch.cat([net.net(part) for part in points.split(CHUNK)])[:, 0].view(len(held.x), -1).cpu().numpy()
    fitted = fit_network(net, batches(), steps if exact else point_budget(steps, n), "point network",
                         predict_held, judge)
    return net.eval().requires_grad_(False), fitted


def _unit_columns(points: np.ndarray) -> np.ndarray:
    """Columns that vary, each mapped to [0, 1] by one common scale (a mesh keeps its aspect ratio)."""
    points = np.asarray(points, np.float64)
    span = points.max(axis=0) - points.min(axis=0)
    keep = span > 1e-9 * max(float(span.max()), 1e-300)
    return ((points[:, keep] - points[:, keep].min(axis=0)) / span[keep].max()).astype(np.float32)


def embed_nodes(fields: np.ndarray, seed: int) -> np.ndarray:
    """(N, EMBED_DIMS) positions learnt from the training fields (n, T, N): the spectral embedding
    (scikit-learn) of each varying node's centred signal over every frame, compared in the EMBED_MODES
    leading frame-POD directions and normalised, so that nodes whose values move together lie close.
    Nodes without a signal (`varying_nodes`) sit at the origin: the point network predicts them as the
    mean frame whatever their position."""
    from sklearn.manifold import SpectralEmbedding
    from sklearn.utils.extmath import randomized_svd
    moving = np.flatnonzero(varying_nodes(fields))
    out = np.zeros((fields.shape[2], 1 if len(moving) < EMBED_MIN_NODES else EMBED_DIMS), np.float32)
    if len(moving) < EMBED_MIN_NODES:                # too few for a neighbour graph: the nodes' order
        out[moving, 0] = np.linspace(0.0, 1.0, len(moving))
        return out
    frames = (fields[:, :, moving] - fields[:, :, moving].mean(axis=0, dtype=np.float64)).reshape(-1, len(moving))
    modes = min(EMBED_MODES, *frames.shape)
    left, values, _ = randomized_svd(frames.T, modes, random_state=seed)             # the nodes' signals, (N', modes)
    signals = left * values
    signals /= np.maximum(np.linalg.norm(signals, axis=1, keepdims=True), 1e-300)    # float64: no underflow
    neighbours = min(EMBED_NEIGHBOURS, len(signals) - 1)
    embedded = SpectralEmbedding(n_components=EMBED_DIMS, n_neighbors=neighbours,
                                 random_state=seed).fit_transform(signals)
    out[moving] = _unit_columns(embedded)
    return out


def mesh_positions(mesh: Path, dataset_nodes: int, nodes: int) -> np.ndarray | None:
    """The points of `mesh` (a mesh.vtu from --import_runs) for the first `nodes` of the dataset's
    `dataset_nodes`: one point per node, or the same points once per stacked field (README "From
    solver files to ParaView") with the field's number, times the mesh's size, as one more column.
    None where the counts do not fit."""
    import meshio
    points = meshio.read(mesh).points
    fields, rest = divmod(dataset_nodes, len(points))
    if rest or not fields:
        return None
    tiled = np.tile(points, (fields, 1))
    if fields > 1:
        size = float(np.ptp(points, axis=0).max()) or 1.0
        tiled = np.concatenate([tiled, size * np.repeat(np.arange(fields, dtype=np.float64), len(points))[:, None]], 1)
    return _unit_columns(tiled[:nodes])


def read_positions(path: Path, dataset_nodes: int, nodes: int) -> np.ndarray:
    """`node_positions` given as a file: one row of 1-3 coordinates per node of the dataset (CSV or .npy);
    the first `nodes` rows are used (Dim3_red)."""
    try:
        table = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as err:
        raise UserError(f"node_positions {path}: unreadable ({err}); give a CSV or .npy of one row of "
                        f"coordinates per node.") from None
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or len(table) not in (dataset_nodes, nodes) or not 1 <= table.shape[1] <= 3 \
            or not np.isfinite(table).all():
        raise UserError(f"node_positions {path}: holds a {'x'.join(map(str, table.shape))} table; it needs "
                        f"{dataset_nodes} rows (one per node, in the dataset's order) of 1-3 finite coordinates.")
    return _unit_columns(table[:nodes])


def node_positions(setting: str, workdir: Path, dataset: Path | None, fields: np.ndarray, dataset_nodes: int,
                   seed: int) -> tuple[np.ndarray | None, str]:
    """Each node's position for the point network, for the training `fields` (n, T, N) of a dataset of
    `dataset_nodes` nodes, and where it came from: the `node_positions` file, else (`auto`) the mesh.vtu
    beside the dataset, else the nodes' embedding (None above EMBED_MAX_NODES nodes)."""
    nodes = fields.shape[2]
    if setting not in ("auto", "embedding"):
        return read_positions(positions_file(setting, workdir), dataset_nodes, nodes), f"file {Path(setting).name}"
    mesh = dataset.parent / "mesh.vtu" if dataset is not None else None
    if setting == "auto" and mesh is not None and mesh.is_file():
        if (points := mesh_positions(mesh, dataset_nodes, nodes)) is not None:
            return points, "mesh.vtu"
        log.info("point network: %s does not fit the %d nodes; the nodes' embedding is used", mesh, dataset_nodes)
    if nodes > EMBED_MAX_NODES:
        return None, f"skipped: more than {EMBED_MAX_NODES} nodes to embed and no mesh.vtu or node_positions file"
    return embed_nodes(fields, seed), "embedding"


def positions_file(setting: str, workdir: Path) -> Path:
    """The `node_positions` file, read as param_dir is ("/nodes.csv" is under the working directory)."""
    from modules.cond_inputs import resolve_param_dir
    return resolve_param_dir(setting, workdir)
