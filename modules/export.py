"""`--export onnx DIR`: the trained surrogate's point prediction as one ONNX graph, DIR/surrogate.onnx, that
onnxruntime runs without this repository or torch, and DIR/surrogate.json, which says what it takes and gives.

The graph (`PointPrediction`) reproduces `Surrogate.fields` (modules/surrogate.py): the raw parameter row →
the input scaler → the conditioner (the GP's posterior mean, in float64 as the model computes it, or the
network) → the VAE decoder (`fix` mode) → the field scaler → the blended networks → the fixed nodes pinned.
With the GP it also gives the latents' posterior standard deviation. Before anything is written, onnxruntime
runs the graph on rows of the training box and its output is compared with the PyTorch prediction.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from modules.checkpoint import ensure_writable, json_bytes, write_together
from modules.errors import UserError
from modules.frame_net import FrameNet, NetBlend
from modules.gp import GPConditioner
from modules.point_net import PointNet
from modules.run import Paths
from modules.surrogate import Surrogate

FORMATS = ("onnx",)
FILES = ("surrogate.onnx", "surrogate.json")
OPSET = 18              # onnxruntime 1.16+ runs it; every operator the graph needs is in it
TOLERANCE = 1e-4        # the export refuses above this max |onnxruntime − PyTorch| / max |PyTorch| (fp32: ~1e-7)
CHECK_ROWS = 8          # rows of the training box the export checks the graph on
CHECK_BATCH = 2         # rows per onnxruntime call: the point network holds (rows·T·N, width) activations at once
STD_MEANING = ("the GP posterior standard deviation of each latent value (the conditioner's flat targets, main "
               "latents then the hierarchical levels, in the scaled units the GP regresses; the draws of "
               "--sampling predictive take their latents from N(mean, std²)). It is not the field's standard "
               "deviation: the --samples bands decode random draws, widen them by the difficulty model and "
               "scale them as calibrated, which no deterministic graph reproduces; use it as a measure of how far "
               "an input lies from the training runs")


class _InputScaler(nn.Module):
    """MinMaxScaler.transform in the graph: float64 arithmetic, float32 out; a constant column is the middle."""

    def __init__(self, surrogate: Surrogate) -> None:
        super().__init__()
        scaler = surrogate.input_scaler
        a, b = scaler.affine()
        self.register_buffer("a", torch.from_numpy(a))
        self.register_buffer("b", torch.from_numpy(b))
        self.register_buffer("varies", torch.from_numpy(scaler.data_max > scaler.data_min))
        self.register_buffer("middle", torch.tensor(sum(scaler.feature_range) / 2, dtype=torch.float64))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.where(self.varies, (raw.double() - self.b) / self.a, self.middle).float()     # (B, d)


class _GPPosterior(nn.Module):
    """GPConditioner._posterior (float64), written with ONNX's operators: the distances by their expansion (as
    torch.cdist computes them beyond 25 rows) and the triangular solve as a product with L⁻¹."""

    def __init__(self, gp: GPConditioner) -> None:
        super().__init__()
        self.matern = bool(gp.matern)
        self.linear_on = bool(gp.linear[:, 0].any())
        for name in ("inv_length", "amplitude", "noise", "y_mean", "y_std", "alpha", "linear", "linear_centre",
                     "linear_span", "x"):
            self.register_buffer(name, getattr(gp, name).detach().clone())
        eye = torch.eye(gp.chol.shape[-1], dtype=gp.chol.dtype).expand_as(gp.chol)
        self.register_buffer("chol_inv", torch.linalg.solve_triangular(gp.chol, eye, upper=False))  # (m, n, n)
        b = gp.x[None] * gp.inv_length[:, None, :]                                                 # (m, n, d)
        self.register_buffer("b", b)
        self.register_buffer("b2", b.square().sum(-1)[:, None, :])                                  # (m, 1, n)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        a = x[None] * self.inv_length[:, None, :]                                    # (m, B, d)
        r2 = a.square().sum(-1, keepdim=True) + self.b2 - 2.0 * a @ self.b.transpose(1, 2)   # (m, B, n)
        dist = r2.clamp_min(0.0).sqrt()
        if self.matern:
            r = 5.0 ** 0.5 * dist
            ks = self.amplitude[:, None, None] * (1.0 + r + r.square() / 3.0) * torch.exp(-r)
        else:
            ks = self.amplitude[:, None, None] * torch.exp(-0.5 * dist.square())
        prior = self.amplitude[:, None]                                              # (m, 1): broadcast
        if self.linear_on:
            ua, ub = (x - self.linear_centre) / self.linear_span, (self.x - self.linear_centre) / self.linear_span
            ks = ks + self.linear[:, :1, None] * (self.linear[:, 1:, None] + ua @ ub.T)
            prior = prior + self.linear[:, :1] * (self.linear[:, 1:] + ua.square().sum(1))
        mean = (ks @ self.alpha[:, :, None])[..., 0].T * self.y_std + self.y_mean    # (B, m)
        v = self.chol_inv @ ks.transpose(1, 2)                                       # (m, n, B)
        var = prior + self.noise[:, None] - v.square().sum(1)                        # (m, B)
        return mean, var.clamp_min(0.0).sqrt().T * self.y_std


class _Frame(nn.Module):
    """FrameNet.forward with every frame of a run in one (B, T, d + 1) batch."""

    def __init__(self, net: FrameNet) -> None:
        super().__init__()
        self.net = net.net
        for name in ("mean", "unit", "times"):
            self.register_buffer(name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        times = self.times[None, :, None].expand(x.shape[0], -1, 1)                   # (B, T, 1)
        rows = torch.cat([x[:, None, :].expand(-1, len(self.times), -1), times], 2)  # (B, T, d + 1)
        return self.net(rows) * self.unit + self.mean                                # (B, T, N)


class _Point(nn.Module):
    """PointNet.forward with every (step, node) of a run in one (B, T·N, d + 1 + D) batch, not in chunks."""

    def __init__(self, net: PointNet) -> None:
        super().__init__()
        self.net = net.net
        self.steps, self.nodes = net.mean.shape
        grid = torch.cat([net.times.repeat_interleave(self.nodes)[:, None], net.positions.repeat(self.steps, 1)], 1)
        self.register_buffer("grid", grid)                                           # (T·N, 1 + D)
        self.register_buffer("mean", net.mean)
        self.register_buffer("gain", net.unit * net.varies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid[None].expand(x.shape[0], -1, -1)                            # (B, T·N, 1 + D)
        rows = torch.cat([x[:, None, :].expand(-1, len(self.grid), -1), grid], 2)
        out = self.net(rows)[..., 0].unflatten(1, (self.steps, self.nodes))          # (B, T, N)
        return out * self.gain + self.mean


class PointPrediction(nn.Module):
    """Raw parameter rows (B, F) float32 → the point prediction (B, T, N) in physical units, as
    `Surrogate.fields`; with the GP conditioner also the latents' posterior std (B, m)."""

    def __init__(self, surrogate: Surrogate) -> None:
        super().__init__()
        self.scaler = _InputScaler(surrogate)
        gp = surrogate.conditioner if isinstance(surrogate.conditioner, GPConditioner) else None
        self.gp = _GPPosterior(gp) if gp is not None else None
        self.conditioner = surrogate.conditioner if gp is None else None        # a network: as it is
        self.split = (gp.latent_dim_end, gp.num_levels, gp.latent_dim) if gp is not None else None
        self.decoder = _baked(surrogate.decoder)
        field = surrogate.field_scaler
        self.register_buffer("scale", torch.as_tensor(field.scale.T, dtype=torch.float32))      # (N | 1, 1)
        self.register_buffer("offset", torch.as_tensor(field.offset.T, dtype=torch.float32))    # (N, T | 1)
        self.register_buffer("fixed", torch.from_numpy(field.fixed_nodes.copy()))               # (N,)
        self.register_buffer("fixed_value", torch.as_tensor(field.offset, dtype=torch.float32))  # (T | 1, N)
        self.pin = bool(field.fixed_nodes.any())
        blend = surrogate.frame_net
        self.members = nn.ModuleList(_member(net) for net in blend.members) if blend is not None else None
        self.shares = [float(w / blend.weight) for w in blend.weights] if blend is not None else []
        self.weight = float(blend.weight) if blend is not None else 0.0

    def forward(self, params: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.scaler(params)                                                      # (B, d)
        if self.gp is not None:
            mean, std = self.gp(x)                                                   # (B, m) each
            flat = mean.float()                                                      # as GPConditioner.split
            main, hier = flat[:, :self.split[0]], flat[:, self.split[0]:].unflatten(1, self.split[1:])
        else:
            main, hier = self.conditioner(x)
        field = self.decoder(main, hier, mode="fix")                                 # (B, N, T)
        point = (field * self.scale + self.offset).transpose(1, 2)                   # (B, T, N)
        if self.members is not None:            # as NetBlend.disagreement, then Surrogate.sample
            nets = sum(share * net(x) for share, net in zip(self.shares, self.members))
            point = point + self.weight * (nets - point)
        if self.pin:
            point = torch.where(self.fixed, self.fixed_value, point)
        return point if self.gp is None else (point, std.float())


def _member(net: nn.Module) -> nn.Module:
    if isinstance(net, FrameNet):
        return _Frame(net)
    if isinstance(net, PointNet):
        return _Point(net)
    raise UserError(f"--export onnx: the blended {type(net).__name__} has no ONNX form; nothing was written.")


def _baked(decoder: nn.Module) -> nn.Module:
    """A copy of `decoder` whose spectral-normalised weights are plain tensors, W/σ as evaluation computes it
    (the parametrization's custom autograd function has no ONNX form)."""
    decoder = copy.deepcopy(decoder).eval()
    with torch.no_grad():
        for module in list(decoder.modules()):
            if parametrize.is_parametrized(module):
                weights = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
                # not parametrize.remove_parametrizations: it deletes the property from the parametrized class,
                # which the copy shares with the model it came from
                module.__class__ = module.__class__.__bases__[0]
                del module.parametrizations
                for name, value in weights.items():
                    module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return decoder


def exportable(surrogate: Surrogate) -> None:
    """A one-line UserError naming the part of `surrogate` the ONNX graph cannot hold, and why."""
    if surrogate.input_type != "csvs":
        part = ("the GP's picture features (modules/cond_inputs.py, ImageFeatures)" if surrogate.image_features
                is not None else f"the {type(surrogate.conditioner).__name__} picture conditioner")
        raise UserError(f"--export onnx: this model reads pictures (input_type {surrogate.input_type}); the export "
                        f"takes parameter rows only: {part} works on pictures that are loaded and resized outside "
                        f"the model (use --predict); nothing was written.")
    if surrogate.input_scaler is None:
        raise UserError("--export onnx: the conditioner scalers hold no input scaler for the CSV rows; retrain the "
                        "conditioner with --lc_only=1; nothing was written.")


def check_rows(surrogate: Surrogate, count: int = CHECK_ROWS, seed: int = 0) -> np.ndarray:
    """`count` raw rows (float32) of the training box: its lower and upper corners, its centre, then uniform draws."""
    low, high = surrogate.input_scaler.data_min, surrogate.input_scaler.data_max
    draws = np.random.default_rng(seed).uniform(low, high, (max(count - 3, 0), len(low)))
    return np.concatenate([np.stack([low, high, (low + high) / 2]), draws])[:count].astype(np.float32)


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| / max |want|: the difference relative to the output's size."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def reference(surrogate: Surrogate, raw: np.ndarray) -> dict[str, np.ndarray]:
    """What the graph must give for raw rows (n, F): the point prediction and, with the GP, the latents' std."""
    x = surrogate.prepare(raw)
    out = {"field": surrogate.fields(x)}
    if isinstance(surrogate.conditioner, GPConditioner):
        with torch.inference_mode():
            out["latent_std"] = surrogate.conditioner.predict(x.to(surrogate.device))[1].float().cpu().numpy()
    return out


def run_onnx(model: bytes | str | Path, raw: np.ndarray, batch: int = CHECK_BATCH) -> dict[str, np.ndarray]:
    """The graph's outputs by name for raw rows (n, F), through onnxruntime on the CPU, `batch` rows a call."""
    import onnxruntime
    session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(None, {"params": raw[i:i + batch]}) for i in range(0, len(raw), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def to_onnx(surrogate: Surrogate) -> bytes:
    """The serialised ONNX model of `PointPrediction(surrogate)`, batch dimension dynamic."""
    module = PointPrediction(surrogate).eval()
    example = torch.from_numpy(check_rows(surrogate, 3))
    outputs = ["field", "latent_std"] if module.gp is not None else ["field"]
    try:
        with torch.no_grad():
            # torch.export first, on its own: torch.onnx.export would fall back to a draft export that fixes the
            # batch size where the trace specialises it; here that is an error
            batch = {"params": {0: torch.export.Dim("n", min=1)}}
            program = torch.export.export(module, (example,), dynamic_shapes=batch)
            proto = torch.onnx.export(program, dynamo=True, opset_version=OPSET, input_names=["params"],
                                      output_names=outputs, optimize=True, verbose=False).model_proto
    except Exception as err:        # the exporter's failures are many kinds; the user gets one line either way
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"--export onnx: torch.onnx could not export the {type(surrogate.conditioner).__name__} "
                        f"conditioner with the VAE decoder ({first[:200]}); nothing was written.") from None
    if proto.ByteSize() >= 2 ** 31 - 1:
        raise UserError(f"--export onnx: the graph is {proto.ByteSize() / 2**30:.1f} GiB, beyond the 2 GiB of a single "
                        f"ONNX file; nothing was written.")
    return proto.SerializeToString()


def metadata(surrogate: Surrogate, paths: Paths, parity: dict[str, float], rows: int) -> dict:
    """DIR/surrogate.json: what the graph takes and gives."""
    from modules.history import describe
    steps, nodes = surrogate.shape
    scaler = surrogate.input_scaler
    gp = isinstance(surrogate.conditioner, GPConditioner)
    outputs = {"field": {"shape": ["n", steps, nodes], "dtype": "float32", "layout": "[n, T, N]",
                         "meaning": "the point prediction (deterministic), one per input row, in physical units; as "
                                    "--predict writes FILE.npy"}}
    if gp:
        outputs["latent_std"] = {"shape": ["n", surrogate.conditioner.y_mean.numel()], "dtype": "float32",
                                 "meaning": STD_MEANING}
    blend = surrogate.frame_net
    return {
        "format": "onnx", "model": FILES[0], "opset": OPSET, "run_id": describe(paths.checkpoints)["run_id"],
        "input": {"name": "params", "dtype": "float32", "shape": ["n", surrogate.num_param],
                  "columns": surrogate.param_names or [f"p{i + 1}" for i in range(surrogate.num_param)],
                  "columns_source": "the training CSV's header" if surrogate.param_names else
                                    "p1..pK: the training CSV had no header line",
                  "min": scaler.data_min.tolist(), "max": scaler.data_max.tolist(),
                  "meaning": "one row per run: the raw parameters as in the training CSV, in its column order; min "
                             "and max are the training runs' range of each column (outside it the surrogate "
                             "extrapolates; the graph does not check)"},
        "outputs": outputs, "output_names": list(outputs),
        "units": "physical (the training fields' units: the inverse of the per-node scaling)",
        "conditioner": "gp" if gp else type(surrogate.conditioner).__name__,
        "blend": {} if blend is None else {net.kind: float(w) for net, w in zip(blend.members, blend.weights)},
        "fixed_nodes": int(surrogate.field_scaler.fixed_nodes.sum()),
        "check": {"rows": rows, "relative_difference": parity, "tolerance": TOLERANCE,
                  "meaning": "onnxruntime (CPU) against the PyTorch prediction on rows of the training box (its "
                             "corners, centre and uniform draws): max |difference| / max |PyTorch| per output"},
        "checkpoints": surrogate.sources, "torch": torch.__version__,
    }


def export_onnx(paths: Paths, folder: Path, force: bool = False) -> dict:
    """Write folder/surrogate.onnx and folder/surrogate.json for the trained model at `paths`, after checking
    the graph against the PyTorch prediction; returns the JSON's content. Existing files are replaced only with
    `force`, and then kept beside as *.replaced-<time>."""
    targets = [folder / name for name in FILES]
    present = [path for path in targets if path.exists()]
    if present and not force:
        raise UserError(f"{present[0]} already exists; the export would replace it: pass --force to replace it (the "
                        f"old files are kept beside it as *.replaced-<time>), or export to another folder.")
    # On the CPU whatever --device says: the graph does not depend on it, and onnxruntime's CPU run is the reference.
    surrogate = Surrogate.load(paths, torch.device("cpu"))
    exportable(surrogate)
    created = [d for d in (folder, *folder.parents) if not d.exists()]      # the folders ensure_writable makes
    ensure_writable([folder], f"--export onnx {folder}", "choose a writable folder")
    try:
        model = to_onnx(surrogate)
        rows = check_rows(surrogate)
        got, want = run_onnx(model, rows), reference(surrogate, rows)
        parity = {name: relative_difference(got[name], want[name]) for name in want}
        if max(parity.values()) > TOLERANCE:
            worst = max(parity, key=parity.get)
            raise UserError(f"--export onnx: onnxruntime's {worst} differs from the PyTorch prediction by "
                            f"{parity[worst]:.2g} of its size (at most {TOLERANCE:g} expected); nothing was written.")
        meta = metadata(surrogate, paths, parity, len(rows))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in present:        # kept (a copy: if the write fails, the originals are still in place)
            shutil.copy2(path, path.with_name(f"{path.name}.replaced-{stamp}"))
        data = json_bytes(meta)
        write_together({targets[0]: lambda f: f.write(model), targets[1]: lambda f: f.write(data)})
        created = []
        return meta
    finally:
        for made in created:        # a failed export leaves no empty folder either (innermost first)
            with contextlib.suppress(OSError):
                made.rmdir()


def export_cli(args: argparse.Namespace, paths: Paths, device: torch.device) -> int:
    """`--export FORMAT DIR` (`device` is not used: the export runs on the CPU)."""
    fmt, folder = args.export
    if fmt.lower() not in FORMATS:
        raise UserError(f"--export {fmt}: unknown format; the one format is onnx (--export onnx DIR).")
    if args.out is not None:
        raise UserError("--export writes DIR/surrogate.onnx and DIR/surrogate.json; drop --out.")
    folder = Path(folder)
    meta = export_onnx(paths, folder, args.force)
    size = (folder / FILES[0]).stat().st_size
    shapes = ", ".join(f"{name} ({', '.join(map(str, out['shape']))})" for name, out in meta["outputs"].items())
    print(f"wrote {folder / FILES[0]} ({size / 2**20:.1f} MiB, opset {meta['opset']}: params "
          f"(n, {meta['input']['shape'][1]}) -> {shapes}) and {folder / FILES[1]}; onnxruntime matches PyTorch to "
          f"{max(meta['check']['relative_difference'].values()):.1g} of the output's size on {meta['check']['rows']} "
          f"rows of the training box")
    return 0
