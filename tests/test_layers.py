"""The modules read top to bottom (README, "Development"): each imports only from its own
layer or the layers above it, lazily imported modules included. So prediction needs only
the models, scalers and checkpoints, and no trainer imports the other trainer."""
import ast
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
    ["pipeline", "predict", "evaluate", "history", "sensitivity", "suggest", "export"],
    ["cli", "api"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def imports(path: Path) -> set[str]:
    """The modules `path` imports, at the top or inside a function; not those imported only for type checking."""
    tree = ast.parse(path.read_text())
    checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in checking and (node.module or "").startswith("modules"):
            names |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
    return names & set(LEVEL)


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


def test_no_import_cycles():
    """No module reaches itself through the modules it imports (lazily imported ones included)."""
    graph = {p.stem: imports(p) for p in MODULES.glob("*.py") if p.stem in LEVEL}

    def reaches(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False
    assert not [m for m in graph if reaches(m)]
