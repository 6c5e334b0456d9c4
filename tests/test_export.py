"""`--export onnx DIR` (modules/export.py): one ONNX graph from the raw parameter rows to the point prediction,
which onnxruntime runs alone and which gives what the PyTorch surrogate gives."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import run_cli
from modules.api import Surrogate
from modules.cli import build_parser
from modules.cond_inputs import load_csv
from modules.data import FieldScaler
from modules.errors import UserError
from modules.export import FILES, PointPrediction, export_cli, exportable
from modules.frame_net import FrameNet, NetBlend
from modules.point_net import PointNet
from modules.run import Paths

TOLERANCE = 1e-5        # max |onnxruntime − PyTorch| / max |PyTorch|, fp32

pytestmark = pytest.mark.usefixtures("one_thread")


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def surrogate(trained_demo) -> Surrogate:
    """The demo's surrogate on the CPU, where the export computes its reference."""
    return Surrogate.load(trained_demo[0], device="cpu")


@pytest.fixture(scope="module")
def exported(trained_demo, tmp_path_factory):
    """The demo's export through the command line, with --force over a stale export (kept beside it)."""
    work, _, summary = trained_demo
    out = tmp_path_factory.mktemp("export") / "onnx"
    out.mkdir()
    (out / "surrogate.json").write_text("stale")
    return work, out, run_cli(work, "--export", "onnx", str(out), "--force"), summary


def test_the_command_writes_the_graph_and_keeps_the_export_it_replaced(exported):
    _, out, result, _ = exported
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'surrogate.onnx'}" in result.stdout
    assert sorted(p.name for p in out.iterdir() if "replaced" not in p.name) == sorted(FILES)
    kept = list(out.glob("surrogate.json.replaced-*"))
    assert len(kept) == 1 and kept[0].read_text() == "stale"


def test_onnxruntime_gives_the_pytorch_point_prediction_and_latent_std(exported, surrogate):
    work, out, _, _ = exported
    meta = json.loads((out / "surrogate.json").read_text())
    params = load_csv(work / "input_data/params.csv", 4, None)
    inside = np.random.default_rng(3).uniform(meta["input"]["min"], meta["input"]["max"], (16, 4)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(out / "surrogate.onnx"), providers=["CPUExecutionProvider"])
    for rows in (params, inside, params[:1]):          # the batch size is free
        field, std = session.run(["field", "latent_std"], {"params": rows})
        want = surrogate.predict(rows)
        assert field.shape == want.shape == (len(rows), 32, 256)
        assert relative(field, want) <= TOLERANCE
        with torch.inference_mode():
            want_std = surrogate.model.conditioner.predict(surrogate.model.prepare(rows))[1].numpy()
        assert std.shape == want_std.shape and relative(std, want_std) <= TOLERANCE


def test_the_json_says_what_the_graph_takes_and_gives(exported, surrogate):
    _, out, _, summary = exported
    meta = json.loads((out / "surrogate.json").read_text())
    graph = onnx.load(str(out / "surrogate.onnx"))
    onnx.checker.check_model(graph)
    assert meta["run_id"] == summary["run_id"] and meta["format"] == "onnx" and meta["model"] == "surrogate.onnx"
    names = surrogate.model.param_names or ["p1", "p2", "p3", "p4"]
    assert meta["input"]["columns"] == names and meta["input"]["shape"] == ["n", 4]
    np.testing.assert_array_equal(meta["input"]["min"], surrogate.model.input_scaler.data_min)
    np.testing.assert_array_equal(meta["input"]["max"], surrogate.model.input_scaler.data_max)
    assert [i.name for i in graph.graph.input] == [meta["input"]["name"]] == ["params"]
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value                                  # dynamic
    assert meta["output_names"] == [o.name for o in graph.graph.output] == ["field", "latent_std"]
    assert meta["outputs"]["field"]["shape"] == ["n", 32, 256]
    assert meta["outputs"]["latent_std"]["shape"] == ["n", surrogate.model.conditioner.y_mean.numel()]
    assert "not the field's standard deviation" in meta["outputs"]["latent_std"]["meaning"]
    assert meta["opset"] == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert 0 <= max(meta["check"]["relative_difference"].values()) <= TOLERANCE


def test_an_existing_export_is_a_one_line_error_that_writes_nothing(trained_demo, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "surrogate.onnx").write_bytes(b"mine")
    result = run_cli(trained_demo[0], "--export", "onnx", str(out))
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("INFO: ", "WARNING: "))]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "already exists" in lines[0] and "--force" in lines[0]
    assert [p.name for p in out.iterdir()] == ["surrogate.onnx"] and (out / "surrogate.onnx").read_bytes() == b"mine"


def test_a_wrong_format_is_a_one_line_error_that_writes_nothing(trained_demo, tmp_path):
    args = build_parser().parse_args(["--export", "tflite", str(tmp_path / "out")])
    with pytest.raises(UserError, match="unknown format; the one format is onnx") as error:
        export_cli(args, Paths(trained_demo[0]), torch.device("cpu"))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_the_picture_route_is_a_one_line_error(surrogate):
    model = surrogate.model
    for kind in ("image", "image_vit"):
        with pytest.raises(UserError, match="reads pictures") as error:
            exportable(dataclasses.replace(model, input_type=kind))
        assert "\n" not in str(error.value) and "nothing was written" in str(error.value)


def test_the_graph_blends_the_networks_and_pins_the_fixed_nodes_as_the_surrogate_does(surrogate):
    """The graph's module in PyTorch against `Surrogate.fields`, with a frame and a point network blended in and
    three nodes fixed (the demo's training kept neither); the ONNX export itself is the same code."""
    model = surrogate.model
    steps, nodes = model.shape
    torch.manual_seed(0)
    frame, point = FrameNet(4, steps, nodes), PointNet(4, steps, nodes, 2)
    for net in (frame, point):
        net.mean.normal_()
        net.unit.uniform_(0.5, 2.0)
    point.positions.uniform_()
    point.varies[::7] = 0.0
    scaler = model.field_scaler
    scale = np.broadcast_to(scaler.scale, (1, nodes)).copy()
    scale[0, [0, 5, 100]] = 0.0
    blended = dataclasses.replace(model, frame_net=NetBlend([frame.eval(), point.eval()], [0.3, 0.2]),
                                  field_scaler=FieldScaler(scaler.offset, scale, scaler.kind, scaler.blocks))
    rows = np.random.default_rng(4).uniform(model.input_scaler.data_min, model.input_scaler.data_max, (5, 4))
    rows = rows.astype(np.float32)
    want = blended.fields(blended.prepare(rows))
    with torch.no_grad():
        field, _ = PointPrediction(blended).eval()(torch.from_numpy(rows))
    assert relative(field.numpy(), want) <= 1e-6 and relative(want, model.fields(model.prepare(rows))) > 1e-2
    np.testing.assert_array_equal(field.numpy()[..., [0, 5, 100]],
                                  np.broadcast_to(scaler.offset[:, [0, 5, 100]].astype(np.float32), (5, steps, 3)))
