"""The training recipes of SPEC §4–§6, checked on the real trainers and the shipped demo:
VAE validation cadence and augmentation, Stretch copies, Recon_iter best-of-draws,
conditioner early stopping / best weights / label smoothing, prediction's inverse scaling,
and the mixup λ clip keys."""
import math

import numpy as np
import pytest
import torch
from sklearn.preprocessing import MinMaxScaler as SklearnMinMaxScaler

from helpers.context import ROOT, demo_context
from modules.augment import SeriesAugmentation
from modules.checkpoint import clean_state_dict
from modules.cond_inputs import MinMaxScaler
from modules.config import parse_condition
from modules.engine import batch_indices
from modules.errors import UserError
from modules.surrogate import inverse_affine
from modules.train_conditioner import ConditionerData, ConditionerInputs, ConditionerTrainer
from modules.train_vae import VAETrainer, extract_latents
from modules.vae import HierarchicalVAE

CSV_INPUTS = ["input_type=csvs", "param_dir=/input_data/params.csv", "csv_conditioner=mlp"]
AUG_PROBS = ("noise", "scale", "shift", "mixup", "cutout")


pytestmark = pytest.mark.usefixtures("one_thread")


def csv_params() -> np.ndarray:
    return np.loadtxt(ROOT / "input_data/params.csv", delimiter=",", dtype=np.float32)   # (80, 4)


def random_latent_data(ctx, seed: int) -> ConditionerData:
    """The demo's parameters with random latent targets, unrelated to them: validation can only
    reach the mean."""
    rng = np.random.default_rng(seed)
    main = rng.normal(size=(80, ctx.cfg.vae.Latent_dim_end)).astype(np.float32)
    return ConditionerData.build(ConditionerInputs(csv_params(), []), main,
                                 rng.normal(size=(80, 3, 8)).astype(np.float32), ctx.device)


# ----------------------------------------------------------------------------- VAE validation

@pytest.mark.parametrize("epochs,val_every", [(12, None), (5, 2)])
def test_vae_validates_every_val_every_epochs_and_at_the_last_epoch(tmp_path, epochs, val_every):
    overrides = [f"Training_epochs={epochs}"] + ([f"val_every={val_every}"] if val_every else [])
    ctx, store, train_idx, val_idx = demo_context(tmp_path, overrides)
    if val_every is None:
        assert ctx.cfg.run.val_every == 10            # SPEC §4: every 10 epochs by default
    every = ctx.cfg.run.val_every
    trainer = VAETrainer(ctx, store, train_idx, val_idx)
    trainer.fit()
    history = trainer.history
    assert history["epoch"] == list(range(epochs))
    assert all(math.isfinite(v) for v in history["train_loss"])
    expected = [e for e in range(epochs) if (e + 1) % every == 0 or e + 1 == epochs]
    for column in ("val_recon_mse", "val_kl"):
        assert [e for e, v in zip(history["epoch"], history[column]) if math.isfinite(v)] == expected


def test_vae_validation_is_identical_with_every_augmentation_on_or_off(tmp_path):
    everything = [f"aug_{name}_prob=1" for name in AUG_PROBS] + [
        "aug_noise_level=0.3", "aug_shift_max=0.3", "aug_cutout_max=0.3", "aug_scale_min=0.5", "aug_scale_max=1.5"]
    ctx_on, store, train_idx, val_idx = demo_context(tmp_path / "on", ["Training_epochs=2", "use_augmentation=1",
                                                                        *everything])
    on = VAETrainer(ctx_on, store, train_idx, val_idx)
    on.fit()                                       # two epochs of heavily augmented training
    ctx_off, store_off, _, _ = demo_context(tmp_path / "off", ["Training_epochs=2", "use_augmentation=0"])
    off = VAETrainer(ctx_off, store_off, train_idx, val_idx)
    assert on.augment is not None and off.augment is None
    off.engine.module.load_state_dict(on.engine.module.state_dict())
    with_aug, without = on.validate(), off.validate()
    assert with_aug == without
    # the validation recorded in the loop (last epoch, same weights) is that one too
    assert on.history["val_recon_mse"][-1] == without["recon_mse"]


@pytest.mark.parametrize("case", ["noise_only", "defaults", "off"])
def test_vae_training_batches_reaching_the_model_are_augmented_only_when_on(tmp_path, case):
    overrides = {"noise_only": ["aug_noise_prob=1", "aug_noise_level=0.05", "aug_scale_prob=0", "aug_mixup_prob=0"],
                 "defaults": [],
                 "off": ["use_augmentation=0", "aug_noise_prob=1"]}[case]
    ctx, store, train_idx, val_idx = demo_context(tmp_path, ["Training_epochs=1", *overrides])
    trainer = VAETrainer(ctx, store, train_idx, val_idx)
    seen = []
    trainer.engine.module.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()) if module.training else None)
    trainer.fit()
    stored = [store.get(idx) for idx in batch_indices(trainer.train_idx, trainer.batch, epoch=0, seed=ctx.cfg.run.seed)]
    assert len(seen) == len(stored) > 0
    if case == "off":
        assert all(torch.equal(a, b) for a, b in zip(seen, stored))
    elif case == "defaults":
        # p = 0.2 noise, 0.1 scaling, 0.2 mixup per run: some runs of the epoch are changed, not all
        changed = [not torch.equal(a[i], b[i]) for a, b in zip(seen, stored) for i in range(len(a))]
        assert any(changed) and not all(changed)
    else:
        for a, b in zip(seen, stored):
            residual_std = (a - b).flatten(1).std(dim=1)                       # one per run
            assert residual_std.numpy() == pytest.approx(np.full(len(a), 0.05), rel=0.1)


def test_stretch_copies_follow_stretch_noise_level_and_stretch_shift_max(tmp_path):
    def copies(name, **keys):
        ctx, store, train_idx, val_idx = demo_context(tmp_path / name, ["Stretch=1"] + [f"{k}={v}" for k, v in keys.items()])
        trainer = VAETrainer(ctx, store, train_idx, val_idx)
        P = store.num_runs
        assert torch.equal(trainer.train_idx, torch.cat([torch.as_tensor(train_idx), torch.as_tensor(train_idx) + P]))
        runs = torch.as_tensor(train_idx[:16])
        return trainer.fetch(runs + P), store.get(runs), ctx.cfg.data.Dim2_red

    copy, run, _ = copies("none", stretch_noise_level=0, stretch_shift_max=0)
    assert torch.equal(copy, run)
    copy, run, _ = copies("noise", stretch_noise_level=0.2, stretch_shift_max=0)
    assert (copy - run).flatten(1).std(dim=1).numpy() == pytest.approx(np.full(len(run), 0.2), rel=0.1)
    copy, run, steps = copies("shift", stretch_noise_level=0, stretch_shift_max=0.25)
    largest = int(0.25 * steps)
    shifts = []
    for c, r in zip(copy, run):
        found = [s for s in range(-largest, largest + 1) if torch.equal(c, torch.roll(r, s, dims=-1))]
        assert found, "each copy is the run rolled in time by at most stretch_shift_max of the steps"
        shifts.append(found[0])
    assert max(abs(s) for s in shifts) > int(0.1 * steps)      # beyond the default's 10 %
    # the defaults: noise 0.03 of the range and a roll of at most 10 % of the steps
    copy, run, steps = copies("default")
    for c, r in zip(copy, run):
        residual = min((c - torch.roll(r, s, dims=-1)).std().item() for s in range(-int(0.1 * steps), int(0.1 * steps) + 1))
        assert residual == pytest.approx(0.03, rel=0.1)


# ----------------------------------------------------------------------------- Recon_iter

def test_extract_latents_keeps_the_best_of_recon_iter_draws(tmp_path):
    ctx, store, _, _ = demo_context(tmp_path)
    torch.manual_seed(0)
    model = HierarchicalVAE(ctx.vae_architecture()).eval()
    P, draws = store.num_runs, 8
    torch.manual_seed(123)
    best = extract_latents(model, store, recon_iter=draws, batch_size=P)
    torch.manual_seed(123)
    single = extract_latents(model, store, recon_iter=1, batch_size=P)

    # The same draws, made one by one here: z = mu + eps * std, decoded as predictions are (fix).
    with torch.no_grad():
        x = store.get(torch.arange(P))
        mu, log_var, xs = model.encode(x)
        std = torch.exp(0.5 * log_var).clamp(1e-8, 10.0)
        torch.manual_seed(123)
        zs = torch.stack([mu + torch.randn(mu.shape) * std for _ in range(draws)])           # (8, P, Lend)
        errors = torch.stack([(model.decode(z, xs, mode="fix")[0] - x).square().mean(dim=(1, 2)) for z in zs])
    np.testing.assert_allclose(best.recon_error, errors.min(dim=0).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(best.main, zs[errors.argmin(dim=0), torch.arange(P)].numpy(), rtol=1e-6)
    np.testing.assert_allclose(single.recon_error, errors[0].numpy(), rtol=1e-5)
    assert (best.recon_error <= single.recon_error).all() and (best.recon_error < single.recon_error).any()
    np.testing.assert_array_equal(best.hierarchical, xs.numpy())     # the encoder's vectors, never drawn


# ----------------------------------------------------------------------------- conditioner recipe

class RecordingConditionerTrainer(ConditionerTrainer):
    """The real trainer; it also keeps a copy of the weights it validated each time."""

    def after_validation(self, epoch, metrics):
        self.validated_weights.append({k: v.detach().clone()
                                       for k, v in clean_state_dict(self.engine.eval_module().state_dict()).items()})
        return super().after_validation(epoch, metrics)


def test_conditioner_stops_after_patience_epochs_without_improvement_and_keeps_the_best_weights(tmp_path):
    patience, epochs = 3, 60
    ctx, _, train_idx, val_idx = demo_context(tmp_path, CSV_INPUTS + [f"n_epoch={epochs}", f"lc_patience={patience}"])
    # Targets unrelated to the inputs: validation can only reach the mean, then stops improving.
    trainer = RecordingConditionerTrainer(ctx, random_latent_data(ctx, 0), train_idx, val_idx, vae_run_id="x")
    trainer.validated_weights = []
    trainer.fit()

    val = trainer.history["val_loss"]
    best, bad, stop = math.inf, 0, None            # the patience rule, applied to the recorded losses
    for epoch, loss in enumerate(val):
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
        if bad >= patience:
            stop = epoch
            break
    assert stop is not None and stop + 1 < epochs, "the run should have stopped early"
    assert len(val) == len(trainer.validated_weights) == stop + 1
    best_epoch = int(np.argmin(val))
    assert best_epoch == stop - patience

    exported = trainer.export_state()
    wanted = trainer.validated_weights[best_epoch]
    assert exported.keys() == wanted.keys()
    assert all(torch.equal(exported[k], wanted[k]) for k in wanted)
    last = trainer.validated_weights[-1]
    assert any(not torch.equal(exported[k], last[k]) for k in last), "the last weights are not the best ones"
    saved = torch.load(ctx.paths.conditioner, weights_only=True)["export"]
    assert all(torch.equal(saved[k], wanted[k]) for k in wanted)
    trainer.best_module()                          # loads the exported weights into the module validated
    assert trainer.validate()["loss"] == pytest.approx(min(val), rel=1e-6)


def test_conditioner_patience_counts_consecutive_validations_without_improvement(tmp_path):
    ctx, _, train_idx, val_idx = demo_context(tmp_path, CSV_INPUTS + ["lc_patience=3"])
    trainer = ConditionerTrainer(ctx, random_latent_data(ctx, 0), train_idx, val_idx, vae_run_id="x")
    name, weight = next(iter(trainer.engine.module.named_parameters()))
    # an improvement resets the count; an equal loss is not an improvement
    losses = [1.0, 0.9, 0.95, 0.8, 0.85, 0.8, 0.9]
    stops = []
    for epoch, loss in enumerate(losses):
        with torch.no_grad():
            weight.fill_(epoch)                    # marks the weights validated at this epoch
        stops.append(trainer.after_validation(epoch, {"loss": loss}))
    assert stops == [False] * 6 + [True]
    assert (trainer.export_state()[name] == losses.index(0.8)).all()   # the first 0.8, not the tie


def test_conditioner_progress_line_shows_the_validation_loss(tmp_path):
    ctx, _, train_idx, val_idx = demo_context(tmp_path, CSV_INPUTS)
    trainer = ConditionerTrainer(ctx, random_latent_data(ctx, 0), train_idx, val_idx, vae_run_id="x")
    val = trainer.validate()
    assert val["loss"] == pytest.approx(val["main"] + val["hier"])
    shown = trainer.progress_values({"loss": 1.0}, val, {"lr": 1e-3})
    assert shown["val"] == val["loss"]              # not one part of it (`hier` sorts first)


def random_latent_trainer(ctx, train_idx, val_idx) -> ConditionerTrainer:
    """An MLP conditioner trainer on the demo's parameters with random latent targets."""
    return ConditionerTrainer(ctx, random_latent_data(ctx, 1), train_idx, val_idx, vae_run_id="x")


@pytest.mark.parametrize("smoothing", [0.2, 0.0])
def test_conditioner_label_smoothing_shrinks_the_targets_towards_zero(tmp_path, smoothing):
    ctx, _, train_idx, val_idx = demo_context(tmp_path, CSV_INPUTS + [
        f"lc_label_smoothing={smoothing}", "lc_label_noise=0", "lc_mixup_prob=0", "lc_input_noise_prob=0"])
    trainer = random_latent_trainer(ctx, train_idx, val_idx)
    batch = trainer.train_batch(trainer.train_idx)
    x, y_main, y_hier = trainer.transform(batch)
    assert torch.equal(x, batch[0])
    torch.testing.assert_close(y_main, batch[1] * (1 - smoothing), rtol=1e-6, atol=0)
    torch.testing.assert_close(y_hier, batch[2] * (1 - smoothing), rtol=1e-6, atol=0)
    if smoothing == 0:
        assert torch.equal(y_main, batch[1]) and torch.equal(y_hier, batch[2])


def test_conditioner_label_noise_has_the_configured_std(tmp_path):
    ctx, _, train_idx, val_idx = demo_context(tmp_path, CSV_INPUTS + [
        "lc_label_smoothing=0.2", "lc_label_noise=0.05", "lc_mixup_prob=0", "lc_input_noise_prob=0"])
    trainer = random_latent_trainer(ctx, train_idx, val_idx)
    batch = trainer.train_batch(trainer.train_idx)
    _, y_main, y_hier = trainer.transform(batch)
    noise = torch.cat([(y_main - 0.8 * batch[1]).flatten(), (y_hier - 0.8 * batch[2]).flatten()])
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(0.05, rel=0.1)


# ----------------------------------------------------------------------------- prediction's inverse scaling

@pytest.mark.parametrize("shape", [(40, 5), (40, 3, 8)])
def test_inverse_affine_matches_sklearn_and_inverts_the_scaler_with_a_constant_column(shape):
    rng = np.random.default_rng(0)
    columns = int(np.prod(shape[1:]))
    data = (rng.normal(size=(shape[0], columns)) * rng.choice([0.01, 1.0, 1000.0], size=columns)
            + rng.choice([-5.0, 3.0, 1e4], size=columns))
    data[:, 1] = 7.0                                                # a constant column
    data = data.reshape(shape)
    scaler = MinMaxScaler().fit(data)
    a, b = inverse_affine(scaler, torch.device("cpu"))
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == shape[1:]

    def inverse(y: np.ndarray) -> np.ndarray:
        return (torch.from_numpy(y).float() * a + b).double().numpy()

    # conditioner outputs (Tanh) may leave [-0.9, 0.9]: the map is affine beyond it too
    y = rng.uniform(-1, 1, size=shape)
    flat_y, flat_got = y.reshape(len(y), -1), inverse(y).reshape(len(y), -1)
    varying = [c for c in range(columns) if c != 1]
    reference = SklearnMinMaxScaler(feature_range=(-0.9, 0.9)).fit(data.reshape(len(data), -1)[:, varying])
    np.testing.assert_allclose(flat_got[:, varying], reference.inverse_transform(flat_y[:, varying]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inverse(y), scaler.inverse_transform(y), rtol=1e-5, atol=1e-6)
    # round trip through the project's forward transform, the constant column included
    np.testing.assert_allclose(inverse(scaler.transform(data)), data, rtol=1e-5, atol=1e-6)
    assert (inverse(scaler.transform(data)).reshape(len(data), -1)[:, 1] == 7.0).all()


# ----------------------------------------------------------------------------- mixup λ and Stretch keys

def demo_config(*overrides):
    return parse_condition(ROOT / "input_data/condition.txt", list(overrides))


def test_mixup_lambda_and_stretch_keys_default_to_the_original_and_are_validated():
    cfg = demo_config()
    assert (cfg.augment.aug_mixup_lambda_min, cfg.augment.aug_mixup_lambda_max) == (0.1, 0.9)       # SPEC §6
    assert (cfg.augment.stretch_noise_level, cfg.augment.stretch_shift_max) == (0.03, 0.1)
    aug = SeriesAugmentation.from_config(cfg.augment)
    assert (aug.mixup_lambda_min, aug.mixup_lambda_max) == (0.1, 0.9)
    for bad, key in ((["aug_mixup_lambda_min=0.6", "aug_mixup_lambda_max=0.4"], "aug_mixup_lambda_max"),
                     (["aug_mixup_lambda_min=-0.1"], "aug_mixup_lambda_min"),
                     (["aug_mixup_lambda_max=1.5"], "aug_mixup_lambda_max"),
                     (["stretch_noise_level=-1"], "stretch_noise_level"),
                     (["stretch_shift_max=2"], "stretch_shift_max")):
        with pytest.raises(UserError, match=key):
            demo_config(*bad)


@pytest.mark.parametrize("path", ["cpu_rows", "masked"])
@pytest.mark.parametrize("keys,lo,hi", [((), 0.1, 0.9), (("aug_mixup_lambda_min=0.3", "aug_mixup_lambda_max=0.45"), 0.3, 0.45)])
def test_mixup_weight_is_clipped_to_the_configured_range(path, keys, lo, hi):
    cfg = demo_config("aug_mixup_prob=1", "aug_noise_prob=0", "aug_scale_prob=0", "aug_shift_prob=0",
                      "aug_cutout_prob=0", *keys)
    aug = SeriesAugmentation.from_config(cfg.augment)
    b = 128
    x = torch.zeros(b, b, 4)                  # run i is 1 on node i: a mix with run j shows λ on node i
    x[torch.arange(b), torch.arange(b)] = 1.0
    torch.manual_seed(0)
    y = aug(x) if path == "cpu_rows" else aug._masked(x)
    mixed = [i for i in range(b) if not torch.equal(y[i], x[i])]      # partner ≠ itself
    assert len(mixed) > b * 0.9
    lams = torch.stack([y[i, i, 0] for i in mixed])
    assert ((lams >= lo - 1e-6) & (lams <= hi + 1e-6)).all(), lams
    # Beta(0.2, 0.2) puts most of its mass near 0 and 1: both ends of the clip are reached
    assert (lams - lo).abs().min() < 1e-6 and (lams - hi).abs().min() < 1e-6
