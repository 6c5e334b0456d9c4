"""Whole runs of the shipped demo through the command line: the VAE learns, the latents
are saved, every conditioner beats the mean, and prediction works from a fresh process."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import FAST, demo_workdir, run_cli

# The demo's own VAE recipe (300 epochs), the MLP conditioner for 300 epochs.
VAE_ARGS = ("--preset=1", "--plot=1", "--lc_only=0", "--size=small", "--load_all=1", *FAST, "--set", "n_epoch=300")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = demo_workdir(tmp_path_factory.mktemp("demo"))
    result = run_cli(work, *VAE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((work / "runs").iterdir())
    return work, run_dir, json.loads((run_dir / "summary.json").read_text()), result


def test_vae_validation_error_falls_to_half_and_outputs_are_complete(trained):
    work, run_dir, summary, result = trained
    assert summary["vae_val_recon_mse"] <= 0.5 * summary["vae_val_recon_mse_initial"]
    assert 0 < summary["vae_recon_rel_l2"] < 0.5
    latents = np.load(work / "checkpoints/latents.npz")
    assert latents["main"].shape == (80, 32)
    assert latents["hierarchical"].shape == (80, 3, 8)          # L-1 levels of filters 64 32 16 8
    assert latents["recon_error"].shape == (80,)
    assert np.isfinite(latents["main"]).all()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["n_epoch"] == 300 and config["preset"]["encoder_filters"] == [64, 32, 16, 8]
    for name in ("vae_losses", "vae_reconstruction", "conditioner_losses", "conditioner_latents", "conditioner_prediction"):
        assert (run_dir / f"{name}.png").stat().st_size > 10_000
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "Summary" in result.stdout and "relative L2" in result.stdout


def test_checkpoints_are_plain_state_dicts_loadable_with_weights_only(trained):
    work = trained[0]
    for name in ("vae.pt", "conditioner.pt"):
        state = torch.load(work / "checkpoints" / name, weights_only=True)
        assert state["finished"] and {"model", "export", "engine", "rng", "run"} <= set(state)
        assert all(not k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    for name in ("field_scaler.npz", "conditioner_scalers.npz", "latents.npz"):
        with np.load(work / "checkpoints" / name, allow_pickle=False) as arrays:    # no pickles inside
            assert arrays.files and all(arrays[k].dtype != object for k in arrays.files)


def test_mlp_conditioner_beats_the_mean_and_its_fields_beat_the_mean_field(trained):
    summary = trained[2]
    assert summary["lc_val_latent_mse"] < summary["baseline_mean_latent_mse"]
    assert summary["lc_val_rel_l2"] < summary["baseline_mean_field_rel_l2"]
    assert len(summary["lc_val_rel_l2_per_run"]) == 16


@pytest.mark.parametrize("kind,epochs", [("image_vit", 60), ("image", 12)])
def test_image_conditioners_train_from_the_saved_vae_and_beat_the_mean_latent(trained, tmp_path, kind, epochs):
    work = tmp_path / "copy"              # keep the MLP run intact for the prediction tests
    shutil.copytree(trained[0], work, ignore=shutil.ignore_patterns("runs"))
    result = run_cli(work, "--preset=1", "--plot=2", "--lc_only=1", "--set", f"input_type={kind}",
                     "--set", f"n_epoch={epochs}", "--set", "lc_flip_prob=0")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = sorted((work / "runs").iterdir())[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["conditioner"] == kind and "vae_recon_rel_l2" not in summary
    assert summary["lc_val_latent_mse"] < summary["baseline_mean_latent_mse"]


def test_predicted_fields_are_in_physical_units_deterministic_and_documented(trained, tmp_path):
    work = trained[0]
    new = tmp_path / "new.csv"
    rows = np.loadtxt(work / "input_data/params.csv", delimiter=",")[:5]
    np.savetxt(new, rows, delimiter=",")
    out = tmp_path / "pred.npy"
    first = run_cli(work, "--predict", str(new), "--out", str(out))
    assert first.returncode == 0, first.stderr
    fields = np.load(out)
    assert fields.shape == (5, 32, 256)
    data = np.load(work / "input_data/dataset1.npy")
    # Physical units: the predictions live in the data's range (20-65 °C), not in [-0.9, 0.9].
    assert fields.min() > data.min() - 5 and fields.max() < data.max() + 5 and fields.mean() > 15
    rel = np.linalg.norm(fields - data[:5]) / np.linalg.norm(data[:5])
    assert rel < 0.2
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["shape"] == [5, 32, 256] and meta["inputs"] == [str(new)]
    assert meta["checkpoints"]["vae"].endswith("vae.pt")
    again = tmp_path / "again.npy"
    assert run_cli(work, "--predict", str(new), "--out", str(again)).returncode == 0
    assert np.array_equal(np.load(again), fields), "a point prediction must be deterministic"
    spread = tmp_path / "samples.npy"
    result = run_cli(work, "--predict", str(new), "--out", str(spread), "--samples", "4")
    assert result.returncode == 0, result.stderr
    samples = np.load(spread)
    assert samples.shape == (5, 4, 32, 256)
    assert samples.std(axis=1).mean() > 0
