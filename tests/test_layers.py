"""The modules read top to bottom (README, "Development"): each imports only from its own
layer or the layers above it, lazily imported modules included. So prediction needs only
the models, scalers and checkpoints, and no trainer imports the other trainer."""
import re
from pathlib import Path

MODULES = Path(__file__).resolve().parents[1] / "modules"
LAYERS = [
    ["errors", "interrupt", "progress"],
    ["config"],
    ["pickles", "data", "cond_inputs", "augment", "checkpoint"],
    ["layers", "gaussian", "blocks", "vae", "conditioners", "gp", "losses"],
    ["host_memory", "engine", "distributed", "threads", "monitor", "schedules", "run", "stage"],
    ["net_training", "surrogate", "frame_net", "point_net", "calibration", "domain", "baseline", "mesh_io", "plots"],
    ["train_vae", "train_conditioner"],
    ["pipeline", "predict", "evaluate", "history"],
    ["cli"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def imports(path: Path) -> set[str]:
    found = re.findall(r"^\s*from modules(?:\.([a-z_]+))? import ([a-z_, ]+)", path.read_text(), flags=re.M)
    names = set()
    for module, what in found:
        names |= {module} if module else {w.strip() for w in what.split(",")}
    return names


def test_every_module_has_a_layer():
    assert {p.stem for p in MODULES.glob("*.py")} - {"__init__"} == set(LEVEL)


def test_modules_import_only_from_their_layer_or_above():
    upward = [f"{p.stem} imports {dep}" for p in MODULES.glob("*.py") if p.stem in LEVEL
              for dep in imports(p) if LEVEL[dep] > LEVEL[p.stem]]
    assert not upward, upward


def test_trainers_do_not_import_each_other_or_the_prediction_mode():
    for trainer in ("train_vae", "train_conditioner"):
        deps = imports(MODULES / f"{trainer}.py")
        assert not deps & {"train_vae", "train_conditioner", "predict", "evaluate", "pipeline"} - {trainer}, deps
    for mode in ("surrogate", "predict", "evaluate"):
        assert not imports(MODULES / f"{mode}.py") & {"train_vae", "train_conditioner", "stage", "pipeline"}, mode
