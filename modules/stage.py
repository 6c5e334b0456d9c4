"""The epoch loop both stages share: schedules, checkpoints, exact resume, the non-finite
guard, validation, logging and progress. A stage supplies its data, schedules and
validation through a few hooks; the engine does the steps."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from modules import interrupt
from modules.checkpoint import (check_architecture, clean_state_dict, load_checkpoint, rng_state, save_torch,
                               set_rng_state)
from modules.distributed import barrier, per_rank_batch
from modules.engine import Batch, EpochResult, TrainingEngine, batch_indices
from modules.errors import UserError
from modules.layers import Architecture
from modules.run import RunContext

log = logging.getLogger("simulgen")

CHECKPOINT_VERSION = 1


def save_fitted(ctx: RunContext, path: Path, kind: str, module: torch.nn.Module, architecture: Architecture, extra: dict,
                seconds: float) -> None:
    """A model fitted in closed form (no epochs, e.g. the GP conditioner), written in the stage
    checkpoint format as a finished stage, so loading, prediction and the checks read it alike."""
    weights = clean_state_dict(module.state_dict())
    payload = {"kind": kind, "version": CHECKPOINT_VERSION, "epoch": 0, "epochs": 0, "finished": True,
               "model": weights, "export": weights, "engine": {"applied_steps": 0}, "lr_scale": 1.0, "rollbacks": 0,
               "rng": [rng_state()], "history": {}, "seconds": seconds, "architecture": architecture.stored(),
               "best": {"val": math.inf, "bad_epochs": 0, "saved": False}, "run": ctx.describe(), "extra": extra}
    if ctx.dist.is_main:
        save_torch(payload, path)
    barrier()


class StageTrainer:
    stage = "stage"           # "vae" or "conditioner": TensorBoard prefix and checkpoint kind
    title = "stage"           # human name for messages
    best_metric: str | None = None   # validation metric whose best weights are exported; None: the last
    patience: int | None = None      # early stopping: validations without improvement of best_metric
    min_gain: float = 0.0            # ... an improvement being a relative drop by more than this
    keep_best: bool = True           # export the best validation's weights (else the last, also when stopping early)

    def __init__(self, ctx: RunContext, engine: TrainingEngine, epochs: int, checkpoint: Path,
                 architecture: Architecture, how_to_make: str):
        self.ctx = ctx
        self.engine = engine
        self.epochs = epochs
        self.checkpoint = checkpoint
        self.architecture = architecture
        self.how_to_make = how_to_make
        self.lr_scale = 1.0            # halved by a rollback after a non-finite loss
        self.rollbacks = 0
        self.history: dict[str, list[float]] = {}
        self.finished = False
        self.seconds = 0.0
        self.applied_steps = 0
        self.steps_per_epoch = 1       # set by the stage: training batches per epoch
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val = math.inf
        self.gain_from = math.inf      # the value the next improvement that counts for `patience` must beat
        self.bad_epochs = 0
        self._saved_epoch: int | None = None     # the epoch the checkpoint on disk holds
        self._last_save = time.monotonic()

    # --- hooks -------------------------------------------------------------------------
    def schedule(self, epoch: int, lr_epoch: int) -> dict[str, float]:
        """Set the epoch's LR (a function of `lr_epoch`) and other scheduled values (functions
        of `epoch`); return them for the log."""
        raise NotImplementedError

    def train_batch(self, idx: torch.Tensor) -> Batch:
        """The training batch of runs `idx`."""
        raise NotImplementedError

    def val_batch(self, idx: torch.Tensor) -> Batch:
        """The validation batch of runs `idx`."""
        raise NotImplementedError

    # --- the split ----------------------------------------------------------------------
    def set_split(self, train_idx, val_idx, global_batch: int, key: str) -> None:
        """The runs each epoch trains and validates on, and the per-rank batch of the global
        batch size `key` (DDP: every rank draws its share of the same seeded order)."""
        self.train_idx = torch.as_tensor(train_idx, dtype=torch.long)
        self.val_idx = torch.as_tensor(val_idx, dtype=torch.long)
        self.batch = per_rank_batch(global_batch, self.ctx.dist.world_size, key)
        self.steps_per_epoch = len(self._batch_order(0))

    def _batch_order(self, epoch: int) -> list[torch.Tensor]:
        d = self.ctx.dist
        return batch_indices(self.train_idx, self.batch, epoch=epoch, seed=self.ctx.cfg.run.seed, rank=d.rank,
                             world_size=d.world_size)

    def train_batches(self, epoch: int):
        for idx in self._batch_order(epoch):
            yield self.train_batch(idx)

    def val_batches(self):
        d = self.ctx.dist
        for idx in self.val_idx[d.rank::d.world_size].split(max(self.batch, 1)):
            yield self.val_batch(idx)

    def transform(self, batch: Batch) -> Batch:
        return batch

    def should_validate(self, epoch: int) -> bool:
        return True

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def after_validation(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Keep the weights of the best validation so far; return True to stop early."""
        if self.best_metric is None:
            return False
        value = metrics[self.best_metric]
        if value < self.best_val:
            self.best_val = value
            self.best_state = {k: v.detach().clone()
                               for k, v in clean_state_dict(self.engine.eval_module().state_dict()).items()}
        if value < self.gain_from * (1 - self.min_gain):
            self.gain_from, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def export_state(self) -> dict[str, torch.Tensor]:
        """The weights prediction should use: the best validation's (EMA weights when EMA is
        on) with a `best_metric`, else the last."""
        if self.best_state is not None and self.keep_best:
            return self.best_state
        return clean_state_dict(self.engine.eval_module().state_dict())

    def best_module(self):
        """The evaluation module (EMA when on) holding the exported weights, in eval mode."""
        module = self.engine.eval_module()
        module.load_state_dict(self.export_state())
        return module.eval()

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def progress_values(self, train: dict[str, float], val: dict[str, float] | None, sched: dict[str, float]) -> dict:
        values = {"loss": train["loss"]}
        if val:
            values["val"] = val["loss"] if "loss" in val else next(iter(val.values()))
        values.update(sched)
        return values

    # --- checkpoints -------------------------------------------------------------------
    def _payload(self, epoch: int) -> dict:
        rngs = [rng_state()]
        if dist.is_initialized():
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, rng_state())
        return {"kind": self.stage, "version": CHECKPOINT_VERSION, "epoch": epoch, "epochs": self.epochs,
                "finished": self.finished, "model": clean_state_dict(self.engine.module.state_dict()),
                "export": self.export_state(), "engine": self.engine.state_dict(),
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "rng": rngs,
                "history": self.history, "seconds": self.seconds, "architecture": self.architecture.stored(),
                "best": {"val": self.best_val, "bad_epochs": self.bad_epochs, "saved": self.best_state is not None,
                         "gain_from": self.gain_from},
                "run": self.ctx.describe(), "extra": self.extra_state()}

    def save(self, epoch: int) -> None:
        payload = self._payload(epoch)          # collective under DDP: every rank builds it
        if self.ctx.dist.is_main:
            save_torch(payload, self.checkpoint)
        barrier()
        self._noted(epoch)

    def _noted(self, epoch: int) -> None:
        self._saved_epoch, self._last_save = epoch, time.monotonic()
        interrupt.note_saved(self.checkpoint, self.title, epoch, self.epochs, self.finished)

    def load(self) -> dict:
        state = load_checkpoint(self.checkpoint, self.stage, f"{self.title} checkpoint", self.how_to_make)
        check_architecture(state["architecture"], self.architecture, self.checkpoint)
        return state

    def restore(self, state: dict) -> int:
        self.engine.module.load_state_dict(state["model"])
        self.engine.load_state_dict(state["engine"])
        self.applied_steps = state["engine"]["applied_steps"]
        self.lr_scale = state["lr_scale"]
        self.rollbacks = state["rollbacks"]
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.seconds = state.get("seconds", 0.0)
        self.finished = state["finished"]
        best = state.get("best", {})
        self.best_val, self.bad_epochs = best.get("val", math.inf), best.get("bad_epochs", 0)
        self.gain_from = best.get("gain_from", self.best_val)
        self.best_state = state["export"] if best.get("saved") else None
        rngs = state["rng"]
        rank = self.ctx.dist.rank
        if len(rngs) == self.ctx.dist.world_size:
            set_rng_state(rngs[rank])
        else:
            log.warning("%s was saved by %d process(es), this run has %d; random streams restart from the seed",
                        self.checkpoint, len(rngs), self.ctx.dist.world_size)
        self.load_extra_state(state["extra"])
        return state["epoch"]

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> None:
        ctx, monitor = self.ctx, self.ctx.monitor
        epoch = 0
        if ctx.resume and self.checkpoint.is_file():
            epoch = self.restore(self.load())
            self._noted(epoch)
            if self.finished:
                log.info("%s: already finished in %s; nothing to resume", self.title, self.checkpoint)
                return
            log.info("%s: resuming at epoch %d of %d from %s", self.title, epoch, self.epochs, self.checkpoint)
            if self.stage == "vae":
                # Later stages have no events yet. A resumed conditioner (the VAE's events
                # come first, at steps a marker would drop) relies on TensorBoard dropping a
                # tag's events when its steps go backwards.
                monitor.resume_from(epoch + 1)
        else:
            self.save(0)       # a known-good state to roll back to and resume from
        progress = monitor.progress(self.title, epoch, self.epochs)
        try:
            while epoch < self.epochs:
                self._between_epochs(epoch)
                started = time.perf_counter()
                # The LR clock counts applied optimizer steps: a step the fp16 scaler skipped
                # does not advance the LR schedule.
                sched = self.schedule(epoch, self.applied_steps // self.steps_per_epoch)
                result = self.engine.train_epoch(progress.batches(epoch, self.train_batches(epoch),
                                                                  self.steps_per_epoch), self.transform)
                if result.first_bad_batch is not None:
                    epoch = self._roll_back(epoch, result)
                    continue
                self.applied_steps = result.applied_steps
                val = self.validate() if self.should_validate(epoch) else None
                stop = self.after_validation(epoch, val) if val is not None else False
                elapsed = time.perf_counter() - started
                self.seconds += elapsed
                self._record(epoch, result.metrics, val, sched, elapsed)
                progress.update(epoch, self.progress_values(result.metrics, val, sched))
                epoch += 1
                if stop:
                    log.info("%s: early stop at epoch %d (no validation improvement)", self.title, epoch)
                    break
                if epoch % ctx.cfg.run.checkpoint_every == 0 and epoch < self.epochs:
                    self.save(epoch)
        finally:
            progress.close()
        self.finished = True
        self.save(epoch)
        monitor.flush()

    def _between_epochs(self, epoch: int) -> None:
        """Before each epoch: stop after saving if a signal came (interrupt.py), and write a
        checkpoint when `checkpoint_minutes` have passed since the last one. Under DDP the
        ranks agree first (one all-reduce), so all of them save and stop at the same epoch."""
        minutes = self.ctx.cfg.run.checkpoint_minutes
        due = minutes > 0 and time.monotonic() - self._last_save >= 60.0 * minutes
        signum = interrupt.signal_number()
        if dist.is_initialized():
            flags = torch.tensor([signum, int(due)], dtype=torch.long, device=self.ctx.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, due = int(flags[0]), bool(flags[1])
            interrupt.adopt(signum)
        if signum:
            saved_now = self._saved_epoch != epoch
            if saved_now:
                self.save(epoch)
            self.ctx.monitor.flush()        # the TensorBoard events up to this epoch, as the checkpoint
            raise interrupt.Stopped(interrupt.stop_message(saved_now), interrupt.exit_code())
        if due and self._saved_epoch != epoch:
            self.save(epoch)

    def _record(self, epoch: int, train: dict[str, float], val: dict[str, float] | None, sched: dict[str, float],
                seconds: float) -> None:
        """Append the epoch to the history and, every log_every epochs, at validations and at
        the end, write it to TensorBoard as `<stage>/<key>`, with `<stage>/epoch_time_s`: the
        epoch's wall time (training and validation). The history holds no timings, so runs
        that must agree (resumed, DDP) have identical histories."""
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, **sched,
               **{f"val_{k}": v for k, v in (val or {}).items()}}
        done = len(self.history.get("epoch", []))
        for key in self.history.keys() | row.keys():      # one column per key, NaN where absent
            self.history.setdefault(key, [math.nan] * done).append(row.get(key, math.nan))
        if (epoch + 1) % self.ctx.cfg.run.log_every == 0 or val is not None or epoch + 1 == self.epochs:
            scalars = {k: v for k, v in row.items() if k != "epoch" and math.isfinite(v)}
            self.ctx.monitor.scalars(self.stage, epoch + 1, {**scalars, "epoch_time_s": seconds})

    def _roll_back(self, epoch: int, result: EpochResult) -> int:
        where = f"{self.title} training: non-finite loss or gradient at epoch {epoch + 1}, batch {result.first_bad_batch + 1}"
        if self.rollbacks >= 1:
            raise UserError(f"{where}, again after a rollback with half the learning rate; stopped. The last good "
                            f"checkpoint {self.checkpoint} is kept: lower the learning rate or check the data, then --resume.")
        state = self.load()
        restored = self.restore(state)
        self.rollbacks += 1
        self.lr_scale *= 0.5
        log.warning("%s; rolled back to the checkpoint of epoch %d with the learning rate halved", where, restored)
        return restored
