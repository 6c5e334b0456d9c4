"""No run deletes another run's finished model (modules/history.py): real runs and signals
for the issue's case, small real checkpoint files for the pruning rule."""
import hashlib
import json
import signal
import sys

import torch

from conftest import ENTRY, run_cli
from test_interrupt import demo_args, signal_when

MODEL_FILES = ("vae.pt", "conditioner.pt", "latents.npz", "field_scaler.npz", "conditioner_scalers.npz")


def digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in MODEL_FILES}


def test_a_finished_model_survives_two_interrupted_fresh_runs_and_run_picks_it_again(workdir, tmp_path):
    args = demo_args(2, 2)
    assert run_cli(workdir, *args).returncode == 0
    checkpoints = workdir / "checkpoints"
    good = digest(checkpoints)
    good_id = torch.load(checkpoints / "vae.pt", weights_only=True)["run"]["run_id"]
    for _ in range(2):           # two throw-away fresh runs, stopped with Ctrl-C in their first epoch
        status, _, err = signal_when([sys.executable, str(ENTRY), *demo_args(50, 2)], workdir,
                                     "SimulGenVAE run ", [signal.SIGINT])
        assert status == 130, err[-2000:]
    kept = checkpoints / "history" / good_id
    assert digest(kept) == good                                      # byte for byte
    assert json.loads((kept / "archive.json").read_text())["finished"] is True
    assert len(list((checkpoints / "history").iterdir())) == 2       # the good run and the first interrupted one
    # --predict --run reads it where it lies
    new = tmp_path / "new.csv"
    new.write_text("0.5,0.5,0.5,0.5\n")
    out = tmp_path / "pred.npy"
    predicted = run_cli(workdir, "--predict", str(new), "--out", str(out), "--run", good_id)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(out.with_suffix(".json").read_text())["checkpoints"]["vae"].startswith(str(kept))
    # --lc_only=1 --run makes it the current run again (and keeps the interrupted one); the conditioner it
    # trains replaces the current one only after keeping a copy of the whole model in the history, and its own
    # run id (the one it prints) names the new model
    interrupted = torch.load(checkpoints / "vae.pt", weights_only=True)["run"]["run_id"]
    again = run_cli(workdir, *args[:2], "--lc_only=1", *args[3:], "--run", good_id)
    assert again.returncode == 0, again.stderr[-2000:]
    assert digest(checkpoints)["vae.pt"] == good["vae.pt"] and digest(checkpoints)["conditioner.pt"] != good["conditioner.pt"]
    assert digest(kept) == good                                      # the model it replaced, byte for byte
    assert (checkpoints / "history" / interrupted / "vae.pt").is_file()
    conditioner_id = again.stdout.split("SimulGenVAE run ", 1)[1].split(":", 1)[0]
    assert torch.load(checkpoints / "conditioner.pt", weights_only=True)["run"]["run_id"] == conditioner_id
    for run_id, folder in ((conditioner_id, checkpoints), (good_id, kept)):
        predicted = run_cli(workdir, "--predict", str(new), "--out", str(out), "--run", run_id)
        assert predicted.returncode == 0, predicted.stderr
        assert json.loads(out.with_suffix(".json").read_text())["checkpoints"]["conditioner"] == str(folder / "conditioner.pt")
    # an unknown run is one line naming what is kept
    missing = run_cli(workdir, "--predict", str(new), "--out", str(out), "--run", "nope")
    assert missing.returncode != 0 and "--run nope: no such run" in missing.stderr and interrupted in missing.stderr
    assert "Traceback" not in missing.stderr


def _fake_run(folder, run_id: str, finished: bool) -> None:
    """A run's checkpoint files as the history reads them (run id, finished flags)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vae.pt", "conditioner.pt"):
        torch.save({"run": {"run_id": run_id}, "finished": finished}, folder / name)


def test_pruning_drops_unfinished_runs_first_and_never_a_finished_one_for_them(tmp_path):
    from modules.history import archive_current, archived
    from modules.run import Paths
    paths = Paths(tmp_path)
    plan = [("a", True), ("b", False), ("c", True), ("d", False), ("e", False)]
    for run_id, finished in plan:
        _fake_run(paths.checkpoints, run_id, finished)
        archive_current(paths, keep=2)
    kept = [(folder.name, info["finished"]) for folder, info in archived(paths)]
    assert kept == [("a", True), ("c", True)]                 # three unfinished runs came later; both finished stay
    for run_id in ("f", "g"):                                  # more finished runs: now the oldest finished goes
        _fake_run(paths.checkpoints, run_id, True)
        archive_current(paths, keep=2)
    assert [folder.name for folder, _ in archived(paths)] == ["f", "g"]
    assert not list(paths.checkpoints.glob("*.pt"))            # archiving empties checkpoints/
