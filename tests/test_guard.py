"""The non-finite guard: roll back once with half the learning rate, then stop clearly.
A NaN loss and an infinite gradient (finite loss) both trigger it in fp32; with fp16 an
overflowing gradient is the scaler's business: the step is skipped, not rolled back, and
the LR clock does not advance for it."""
import math

import pytest
import torch

from helpers.context import demo_context
from helpers.stages import conditioner_stage
from modules.checkpoint import load_torch
from modules.errors import UserError
from modules.schedules import cosine_warm_restarts, warmup_cosine
from modules.train_vae import VAETrainer

OVERRIDES = ["Training_epochs=6", "checkpoint_every=2", "val_every=2", "use_augmentation=0", "lr_schedule=restarts"]


class GradientTimes(torch.autograd.Function):
    """Identity on the value; multiplies the gradient flowing back through it by `factor`."""

    @staticmethod
    def forward(ctx, value, factor):
        ctx.save_for_backward(factor)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None


def poisoned(trainer, bad, how="nan_loss"):
    """Wrap the stage's loss so that the listed (epoch, batch) steps go non-finite: a NaN
    loss, or (`how="inf_gradient"`) a finite loss whose gradient is infinite."""
    loss_fn, state = trainer.engine.loss_fn, {"step": 0}

    def loss(net, batch):
        value, metrics = loss_fn(net, batch)
        step = state["step"]
        state["step"] += 1
        if divmod(step, trainer.steps_per_epoch) not in bad:
            return value, metrics
        if how == "nan_loss":
            return value * float("nan"), metrics
        return GradientTimes.apply(value, torch.tensor(math.inf, device=value.device)), metrics

    trainer.engine.loss_fn = loss
    return trainer


def conditioner_lr(ctx, lr_epoch, epochs):
    cfg = ctx.cfg
    return warmup_cosine(lr_epoch, epochs, cfg.conditioner.latent_conditioner_lr, cfg.conditioner.lc_warmup_epochs, cfg.conditioner.lc_warmup_start,
                         cfg.conditioner.lc_lr_min)


def test_one_non_finite_loss_rolls_back_once_with_half_the_learning_rate(tmp_path):
    ctx, store, train_idx, val_idx = demo_context(tmp_path, OVERRIDES)
    trainer = poisoned(VAETrainer(ctx, store, train_idx, val_idx), {(3, 1)})   # epoch 4, batch 2
    trainer.fit()
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert trainer.finished and trainer.history["epoch"] == [0, 1, 2, 3, 4, 5]
    # From the restored epoch 2 on, the learning rate is half the schedule's.
    cfg = ctx.cfg
    for epoch, lr in zip(trainer.history["epoch"], trainer.history["lr"]):
        scale = 1.0 if epoch < 2 else 0.5
        assert lr == pytest.approx(scale * cosine_warm_restarts(epoch, 6, cfg.vae.LearningR))
    state = load_torch(ctx.paths.vae, "VAE checkpoint", "")
    assert state["finished"] and state["lr_scale"] == 0.5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_an_infinite_gradient_with_a_finite_loss_rolls_back_once_with_half_the_learning_rate(tmp_path):
    ctx, trainer = conditioner_stage(tmp_path, ["n_epoch=6", "checkpoint_every=2"])
    seen = []
    # The guard's own reading of the bad step: finite loss, infinite gradient norm.
    hook = trainer.engine.train_epoch

    def recording_epoch(batches, transform=None):
        result = hook(batches, transform)
        seen.append(result.first_bad_batch)
        return result

    trainer.engine.train_epoch = recording_epoch
    poisoned(trainer, {(3, 1)}, how="inf_gradient")       # epoch 4, batch 2
    trainer.fit()
    assert seen == [None, None, None, 1, None, None, None, None]    # epochs 1-4, then 3-6 again
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert trainer.finished and trainer.history["epoch"] == [0, 1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for v in trainer.history["train_loss"])
    for epoch, lr in zip(trainer.history["epoch"], trainer.history["lr"]):
        scale = 1.0 if epoch < 2 else 0.5
        assert lr == pytest.approx(scale * conditioner_lr(ctx, epoch, 6))
    state = load_torch(ctx.paths.conditioner, "conditioner checkpoint", "")
    assert state["finished"] and state["lr_scale"] == 0.5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_an_fp16_overflow_is_skipped_not_rolled_back_and_does_not_advance_the_lr_schedule(tmp_path):
    """fp16 on the CPU (autocast and GradScaler("cpu")): one step with an infinite gradient
    and a finite loss. The scaler skips it; the LR clock counts applied steps, so from the
    next epoch on the schedule runs one epoch behind: epochs 0, 1, 2, 3 train at the
    warm-up's lr(0), lr(1), lr(1), lr(2)."""
    ctx, trainer = conditioner_stage(tmp_path, ["n_epoch=4", "precision=fp16"])
    assert trainer.engine.scaler is not None and trainer.engine.autocast_dtype == torch.float16
    poisoned(trainer, {(1, 0)}, how="inf_gradient")       # epoch 2, batch 1
    scale = trainer.engine.scaler.get_scale()
    trainer.fit()
    assert trainer.rollbacks == 0 and trainer.lr_scale == 1.0
    assert trainer.engine.scaler.get_scale() == scale / 2, "exactly one step was skipped"
    assert trainer.applied_steps == 4 * trainer.steps_per_epoch - 1
    lrs = [conditioner_lr(ctx, e, 4) for e in (0, 1, 1, 2)]
    assert len(set(lrs)) == 3                              # the warm-up rises every epoch
    assert trainer.history["lr"] == pytest.approx(lrs, rel=1e-12)
    assert all(math.isfinite(v) for v in trainer.history["train_loss"])


def test_a_second_non_finite_loss_stops_with_stage_epoch_and_batch_and_keeps_the_checkpoint(tmp_path):
    ctx, store, train_idx, val_idx = demo_context(tmp_path, OVERRIDES)
    # NaN at epoch 4 batch 2; after the rollback to the epoch-2 checkpoint, again in the
    # re-run epoch 4 at batch 3 (the wrapper's step counter runs on across the rollback).
    trainer = poisoned(VAETrainer(ctx, store, train_idx, val_idx), {(3, 1), (5, 2)})
    with pytest.raises(UserError) as err:
        trainer.fit()
    message = str(err.value)
    assert "VAE training" in message and "epoch 4, batch 3" in message and "again" in message
    assert "\n" not in message
    state = load_torch(ctx.paths.vae, "VAE checkpoint", "")
    assert state["epoch"] == 2 and not state["finished"]
    assert all(torch.isfinite(v).all() for v in state["model"].values())
