"""The non-finite guard: roll back once with half the learning rate, then stop clearly."""
import pytest
import torch

from helpers.context import demo_context
from modules.checkpoint import load_torch
from modules.errors import UserError
from modules.schedules import cosine_warm_restarts
from modules.train_vae import VAETrainer

OVERRIDES = ["Training_epochs=6", "checkpoint_every=2", "val_every=2", "use_augmentation=0"]


def poisoned(trainer, bad):
    """Wrap the stage's loss so that the listed (epoch, batch) steps return NaN."""
    loss_fn, state = trainer.engine.loss_fn, {"step": 0}

    def loss(net, batch):
        value, metrics = loss_fn(net, batch)
        step = state["step"]
        state["step"] += 1
        where = divmod(step, trainer.steps_per_epoch)
        return (value * float("nan") if where in bad else value), metrics

    trainer.engine.loss_fn = loss
    return trainer


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
        assert lr == pytest.approx(scale * cosine_warm_restarts(epoch, 6, cfg.LearningR))
    state = load_torch(ctx.paths.vae, "VAE checkpoint", "")
    assert state["finished"] and state["lr_scale"] == 0.5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


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
