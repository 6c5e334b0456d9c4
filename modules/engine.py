"""One training engine for both stages.

A trainer supplies the model and a loss function `loss_fn(net, batch) -> (loss, metrics)`;
the engine owns everything else, each piece small and switchable: autocast, gradient
scaling, clipping, SAM, EMA, torch.compile, CUDA graphs, DDP and the checkpoint state.
Values that change during training (KL weight, dropout rate) must reach `loss_fn`
through tensors updated in place, so compiled code and captured graphs see new values.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from modules.distributed import all_reduce_max, all_reduce_sum, union_of_names
from modules.errors import UserError
from modules.host_memory import heap_allocations

log = logging.getLogger("simulgen")

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class EngineSettings:
    precision: str = "fp32"          # resolved: fp32 | bf16 | fp16
    grad_clip: float = 0.0           # 0: measure the norm, do not clip
    use_sam: bool = False
    sam_rho: float = 0.05
    use_ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = True
    compile: bool = False
    cuda_graphs: bool = False

    @classmethod
    def from_config(cls, cfg, device: torch.device, grad_clip: float) -> "EngineSettings":
        return cls(precision=resolve_precision(cfg.engine.precision, device), grad_clip=grad_clip,
                   use_sam=cfg.engine.use_sam, sam_rho=cfg.engine.sam_rho, use_ema=cfg.engine.use_ema,
                   ema_decay=cfg.engine.ema_decay, ema_warmup=cfg.engine.ema_warmup, compile=cfg.engine.compile,
                   cuda_graphs=cfg.engine.cuda_graphs)


def resolve_precision(choice: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on the CPU."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def graphs_in_use(settings: EngineSettings, device: torch.device, ddp: bool) -> bool:
    """Whether training steps will be captured in CUDA graphs; refuses graphs under DDP.

    Off CUDA the setting warns once and training runs eagerly. With DDP the gradients'
    all-reduce would be captured into the graph; doing that safely needs DDP built and warmed
    up on a side stream and NCCL's async error handling off, none of which can be tested
    without several GPUs, so the combination is refused rather than half supported.
    """
    if not settings.cuda_graphs:
        return False
    if device.type != "cuda":
        _warn_once("cuda_graphs 1 needs a CUDA device; training runs eagerly.")
        return False
    if ddp:
        raise UserError("cuda_graphs 1 is not supported together with --use_ddp; set cuda_graphs 0.")
    return True




def refresh_spectral_norm(module: nn.Module, source: nn.Module | None = None, iterations: int = 3) -> None:
    """Re-estimate the spectral-norm singular vectors of `module` for its current weights.

    An EMA copy averages the weights but not the power-iteration vectors u, v, so its
    σ estimate would belong to other weights. Start from `source`'s vectors (the live
    model's, close to the answer) and run a few power iterations on the averaged weights.
    """
    if source is not None:
        live = dict(source.named_buffers())
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name in live and name.endswith(("._u", "._v")):
                    buf.copy_(live[name])
    was_training = module.training
    module.train()
    with torch.no_grad():
        for sub in module.modules():
            if parametrize.is_parametrized(sub, "weight"):
                for _ in range(iterations):
                    sub.weight  # noqa: B018  (in train mode, reading runs one power iteration)
    module.train(was_training)


class TrainingEngine:
    def __init__(self, model: nn.Module, loss_fn: LossFn, *, lr: float, weight_decay: float,
                 settings: EngineSettings, device: torch.device, ddp: bool = False):
        self.use_graphs = graphs_in_use(settings, device, ddp)     # first: refuses before any work
        self.module = model                      # unwrapped: what EMA averages and checkpoints save
        self.loss_fn = loss_fn
        self.settings = settings
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        fused = device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=fused)
        self.autocast_dtype = _DTYPES.get(settings.precision)
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
        self.ema = None
        self._ema_updates = 0            # host copy of ema.n_averaged: the decay needs no device sync
        if settings.use_ema:
            from torch.optim.swa_utils import AveragedModel
            self.ema = AveragedModel(model, multi_avg_fn=self._ema_average)
        net: nn.Module = model
        self.ddp = ddp
        if ddp:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if settings.compile:
            net = torch.compile(net)
        self.net = net
        # Optimizer steps really applied (fp16 skips steps with inf/NaN gradients).
        self.applied_steps = torch.zeros((), dtype=torch.long, device=device)
        self._sam_saved: list[torch.Tensor] | None = None
        # Spectral-norm power-iteration vectors: SAM's perturbed pass must not advance them.
        self._sn_vectors = [b for name, b in model.named_buffers() if name.endswith(("._u", "._v"))]
        self._sn_saved = [torch.empty_like(b) for b in self._sn_vectors] if settings.use_sam else []
        self._graph = None
        self._static_batch: Batch | None = None
        self._static_out = None
        self._warmup_left = 3                    # eager steps before capture (graphs never run under DDP)

    # --- pieces ------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # Cached casts would outlive a captured graph's inputs; keep the cache off there.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.use_graphs)

    def _no_sync(self):
        ddp = self.net._orig_mod if hasattr(self.net, "_orig_mod") else self.net
        return ddp.no_sync() if self.ddp else contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _forward_backward(self, batch: Batch):
        if self.settings.use_sam:
            return self._sam_passes(batch)
        with self.autocast():
            loss, metrics = self.loss_fn(self.net, batch)
        self._backward(loss)
        return loss, metrics

    def _sam_passes(self, batch: Batch):
        """SAM: gradient at w + ρ·g/‖g‖, applied at w.

        Each pass has its own autocast block: autocast caches low-precision weight copies
        until its outermost block exits, so a shared block would run the second pass on the
        unperturbed weights. Under DDP the first pass must not all-reduce.
        """
        with self._no_sync():
            with self.autocast():
                loss, metrics = self.loss_fn(self.net, batch)
            self._backward(loss)
        with torch.no_grad():
            params = [p for p in self.params if p.grad is not None]
            grads = [p.grad for p in params]
            if self._sam_saved is None or len(self._sam_saved) != len(params):
                self._sam_saved = [torch.empty_like(p) for p in params]
            # A loss scale multiplies both g and ‖g‖, so the step ρ·g/‖g‖ needs no unscaling.
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            scale = self.settings.sam_rho / (norm + 1e-12)
            if self.scaler is not None:
                # fp16: skip the perturbation when the first gradients overflowed.
                scale = torch.where(torch.isfinite(norm), scale, torch.zeros_like(scale))
                grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
            torch._foreach_copy_(self._sam_saved, params)
            torch._foreach_add_(params, torch._foreach_mul(grads, scale.to(grads[0].dtype)))
            if self._sn_vectors:     # the perturbed forward runs a power iteration at w + e(w)
                torch._foreach_copy_(self._sn_saved, self._sn_vectors)
        self._zero_grad()
        with self.autocast():
            perturbed_loss, _ = self.loss_fn(self.net, batch)
        self._backward(perturbed_loss)
        with torch.no_grad():
            torch._foreach_copy_(params, self._sam_saved)   # in place: graph addresses stay valid
            if self._sn_vectors:
                torch._foreach_copy_(self._sn_vectors, self._sn_saved)
        return loss, metrics

    def _optimizer_step(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.settings.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        skipped = False
        if self.scaler is not None:
            # step() already waits for the device to learn whether to skip; update() lowers
            # the scale exactly when it skipped, so reading the scale costs no extra wait.
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.applied_steps += torch.isfinite(norm)
        if self.ema is not None and not skipped:      # a skipped step changed no weights
            self.ema.update_parameters(self.module)
            self._ema_updates += 1
        return norm

    def ema_decay_now(self) -> float:
        """Decay of the next EMA update. With warm-up it is min(decay, (1 + n) / (10 + n))
        after n updates, so a run much shorter than 1 / (1 - decay) steps is not averaged
        towards its initial weights."""
        decay, n = self.settings.ema_decay, self._ema_updates
        return min(decay, (1 + n) / (10 + n)) if self.settings.ema_warmup else decay

    def _ema_average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.ema_decay_now())

    # --- one step ------------------------------------------------------------------------
    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch`; returns detached 0-dim metric tensors (no host sync)."""
        if self._graph is not None:
            for static, new in zip(self._static_batch, batch):
                static.copy_(new, non_blocking=True)
            self._graph.replay()
            loss, metrics = self._static_out
        elif self.use_graphs and self._warmup_left == 0:
            loss, metrics = self._capture(batch)
        elif self.use_graphs:
            # Warm-up on a side stream, as graph capture requires.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._zero_grad()
                loss, metrics = self._forward_backward(batch)
            torch.cuda.current_stream().wait_stream(side)
            self._warmup_left -= 1
        else:
            self._zero_grad()
            loss, metrics = self._forward_backward(batch)
        norm = self._optimizer_step()
        out = {"loss": loss.detach(), "grad_norm": norm.detach()}
        out.update({k: v.detach() for k, v in metrics.items()})
        return out

    def _capture(self, batch: Batch):
        """Capture forward + backward (both SAM passes) of the fixed-shape step in a CUDA graph.

        The optimizer, the scaler's unscale/step and the EMA update stay outside the graph
        (step() runs them after each replay), so the LR, a Python float in the optimizer's
        param_groups, is read afresh at every step and needs no device tensor.
        """
        self._static_batch = tuple(t.clone() for t in batch)
        self._zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._forward_backward(self._static_batch)
        self._graph = graph
        graph.replay()      # capture records but does not run the work
        return self._static_out

    # --- epochs --------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable[Batch], transform: Callable[[Batch], Batch] | None = None) -> "EpochResult":
        """Run the steps of one epoch; sums metrics on the device and syncs once at the end."""
        self.module.train()
        sums: dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        count = 0
        with heap_allocations(self.device):
            for index, batch in enumerate(batches):
                if transform is not None:
                    batch = transform(batch)
                metrics = self.step(batch)
                for key, value in metrics.items():
                    value = value.double()        # float64 sums: the epoch mean does not drift
                    sums[key] = sums[key] + value if key in sums else value.clone()
                finite = torch.isfinite(metrics["loss"])
                if self.scaler is None:       # fp16 overflow of gradients is the scaler's business
                    finite &= torch.isfinite(metrics["grad_norm"])
                first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, index), first_bad)
                count += 1
        if count == 0:
            raise RuntimeError("train_epoch got no batches")
        names = sorted(sums)
        packed = torch.stack([sums[k] for k in names] + [torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        all_reduce_sum(packed)
        packed = torch.cat([packed, self.applied_steps.double().reshape(1)])
        # The earliest bad batch over ranks: max of its negation, with "none" as -inf.
        never = torch.full_like(first_bad, -(1 << 40))
        neg_bad = all_reduce_max(torch.where(first_bad < 0, never, -first_bad))
        values = torch.cat([packed, neg_bad.double().reshape(1)]).tolist()   # the epoch's one host sync
        total, applied, bad_index = values[-3], int(values[-2]), -int(values[-1])
        return EpochResult({k: v / total for k, v in zip(names, values[:-3])},
                           None if bad_index >= 1 << 40 else bad_index, applied)

    def eval_module(self) -> nn.Module:
        """The weights to validate, extract, predict and export with: the EMA when on."""
        if self.ema is None:
            return self.module
        refresh_spectral_norm(self.ema.module, self.module)
        return self.ema.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "applied_steps": int(self.applied_steps.item())}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
            self._ema_updates = int(self.ema.n_averaged)
        self.applied_steps.fill_(state.get("applied_steps", 0))


@dataclass(frozen=True)
class EpochResult:
    metrics: dict[str, float]            # means over the epoch's batches (and ranks)
    first_bad_batch: int | None          # first batch whose loss or gradient was not finite
    applied_steps: int                   # optimizer steps applied so far (fp16 skips some)


def evaluate(module: nn.Module, batches: Iterable[Batch], metric_fn: Callable[[nn.Module, Batch], dict[str, torch.Tensor]],
             device: torch.device) -> dict[str, float]:
    """Mean of `metric_fn` over batches (weighted by batch size), reduced over ranks.

    Any split of the validation runs over the ranks works, including ranks with no runs
    (fewer validation runs than processes): every rank reduces the same fixed-length vector
    of per-metric sums and the sample count, with zeros for what it did not see.
    """
    was_training = module.training
    module.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)
    # cached(): the weights are fixed here, so each spectral-normalised W/σ is computed once,
    # not once per batch (eval mode runs no power iteration; the values are the same)
    with torch.no_grad(), parametrize.cached():
        for batch in batches:
            n = batch[0].shape[0]
            if n == 0:            # a rank without validation runs gets an empty split
                continue
            for key, value in metric_fn(module, batch).items():
                value = value.double() * n
                sums[key] = sums[key] + value if key in sums else value
            count += n
    module.train(was_training)
    names = union_of_names(sums)          # the same sorted list on every rank
    zero = torch.zeros((), dtype=torch.float64, device=device)
    packed = all_reduce_sum(torch.stack([sums.get(k, zero) for k in names] + [count]))
    values = packed.tolist()
    return {k: v / values[-1] for k, v in zip(names, values[:-1])} if values[-1] else {}


def batch_indices(indices: Sequence[int] | torch.Tensor, batch_size: int, *, epoch: int, seed: int,
                  rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True) -> list[torch.Tensor]:
    """This rank's batches of `indices` for one epoch.

    A DistributedSampler (with set_epoch) deals the shuffled indices out to the ranks, so
    every rank sees the same permutation and the union of the ranks' k-th batches is the
    k-th global batch. `batch_size` is the per-rank batch.
    """
    from torch.utils.data.distributed import DistributedSampler
    indices = torch.as_tensor(indices, dtype=torch.long)
    sampler = DistributedSampler(range(len(indices)), num_replicas=world_size, rank=rank,
                                 shuffle=shuffle, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = indices[torch.tensor(list(sampler), dtype=torch.long)]
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
