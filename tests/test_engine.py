"""The training engine: each switch must really do something (SAM, EMA, AMP, compile,
CUDA graphs, clipping, the non-finite report, the DDP batch split)."""
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.conditioners import ScheduledDropout
from modules.engine import EngineSettings, TrainingEngine, batch_indices, graphs_in_use, resolve_precision
from modules.errors import UserError

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = [pytest.param(CPU, id="cpu"), pytest.param(CUDA, id="cuda", marks=needs_cuda)]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def mse_loss(net, batch):
    x, y = batch
    pred = net(x)
    loss = F.mse_loss(pred.float(), y)
    return loss, {"mse": loss.detach()}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    return x, torch.randn(8, 3, generator=g)


def make_engine(model=None, device=CPU, **settings):
    model = (model if model is not None else tiny_model()).to(device)
    return TrainingEngine(model, mse_loss, lr=1e-2, weight_decay=0.0, settings=EngineSettings(**settings), device=device)


def grads_at(model, batch, dtype=None):
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device.type
    ctx = torch.autocast(device, dtype=dtype) if dtype else torch.autocast(device, enabled=False)
    with ctx:
        loss, _ = mse_loss(model, batch)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


# --- SAM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_sam_second_pass_gradient_is_taken_at_the_perturbed_weights(batch, precision, dtype, device):
    """fp16 also checks SAM with the gradient scaler: the scaled first gradients (here
    finite) still give the step ρ·g/‖g‖, and the second gradient is the scaled one at w + that."""
    rho = 0.05
    batch = tuple(t.to(device) for t in batch)
    engine = make_engine(device=device, precision=precision, use_sam=True, sam_rho=rho)
    model = engine.module
    weights = [p.detach().clone() for p in model.parameters()]
    g1 = grads_at(model, batch, dtype)

    # The reference: the gradient at w + rho * g / ||g||, computed by hand on a copy.
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1]))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(shifted.parameters(), g1):
            p.add_(rho * g / norm)
    expected = grads_at(shifted, batch, dtype)

    engine._zero_grad()
    engine._sam_passes(batch)
    scale = engine.scaler.get_scale() if engine.scaler is not None else 1.0
    assert (scale > 1) == (precision == "fp16")
    g2 = [p.grad / scale for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in g2)
    largest_change = max((a - b).abs().max().item() for a, b in zip(g1, g2))
    assert largest_change > 1e-3, "SAM's second gradient equals the first: the perturbation was not seen"
    # Low precision on a GPU may pick other kernels for the two runs; the SAM change is ~2.5e-2.
    tol = dict(rtol=1e-4, atol=1e-6) if device.type == "cpu" or dtype is None else dict(rtol=1e-2, atol=1e-4)
    for got, want in zip(g2, expected):
        torch.testing.assert_close(got, want, **tol)
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w), "weights must be restored exactly after the SAM passes"


def test_one_sam_run_differs_from_plain_adamw_from_the_same_state(batch):
    """Three steps, not one: Adam's first update is lr·m̂/(√v̂ + ε) = lr·g/(|g| + ε), about
    lr·sign(g), so after one step SAM's weights equal plain AdamW's (to rounding) wherever the
    perturbed gradient keeps the plain one's sign; here that is 162 of the 163 weights, and a
    one-step test would hang on one near-zero gradient component. Once Adam's moments carry
    the different gradients the gap spreads (27 weights after three steps). That SAM's
    gradient is the one at the perturbed weights is checked exactly by the test above."""
    plain, sam = make_engine(), make_engine(use_sam=True)
    for _ in range(3):
        plain.step(batch)
        sam.step(batch)
    diffs = [(a - b).abs().max().item() for a, b in zip(plain.module.parameters(), sam.module.parameters())]
    assert max(diffs) > 1e-5


# --- EMA ------------------------------------------------------------------------------------

def test_ema_weights_equal_the_closed_form_average_of_the_history(batch):
    decay, k = 0.9, 6
    engine = make_engine(use_ema=True, ema_decay=decay, ema_warmup=False)
    history = []
    for _ in range(k):
        engine.step(batch)
        history.append([p.detach().clone() for p in engine.module.parameters()])
    # AveragedModel copies the first weights, then ema = d·ema + (1 - d)·w after each step.
    expected = [decay ** (k - 1) * w for w in history[0]]
    for t in range(1, k):
        expected = [e + (1 - decay) * decay ** (k - 1 - t) * w for e, w in zip(expected, history[t])]
    ema = engine.eval_module()
    assert ema is engine.ema.module
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    live = list(engine.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), live))


def test_ema_warmup_uses_the_smaller_early_decays(batch):
    decay, k = 0.99, 5
    engine = make_engine(use_ema=True, ema_decay=decay)
    expected = None
    for n in range(k):
        engine.step(batch)
        weights = [p.detach().clone() for p in engine.module.parameters()]
        d = min(decay, (1 + n) / (10 + n))       # decay after n earlier updates
        expected = weights if expected is None else [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    for got, want in zip(engine.ema.module.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert engine.ema_decay_now() == pytest.approx(min(decay, 6 / 15))


def test_ema_state_survives_a_checkpoint_round_trip(batch):
    engine = make_engine(use_ema=True, ema_decay=0.5)
    for _ in range(3):
        engine.step(batch)
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = make_engine(tiny_model(seed=5), use_ema=True, ema_decay=0.5)
    other.module.load_state_dict(engine.module.state_dict())
    other.load_state_dict(state)
    for a, b in zip(engine.ema.module.parameters(), other.ema.module.parameters()):
        assert torch.equal(a, b)
    assert int(other.ema.n_averaged) == 3
    engine.step(batch)
    other.step(batch)
    for a, b in zip(engine.ema.module.parameters(), other.ema.module.parameters()):
        assert torch.equal(a, b)


# --- mixed precision --------------------------------------------------------------------------

def test_precision_auto_is_fp32_on_cpu_and_bf16_needs_no_scaler():
    assert resolve_precision("auto", CPU) == "fp32"
    assert make_engine(precision="bf16").scaler is None
    assert make_engine(precision="fp16").scaler is not None


def test_bf16_autocast_really_runs_in_bf16(batch):
    seen = []
    engine = make_engine(precision="bf16")
    engine.module[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    engine.step(batch)
    assert seen == [torch.bfloat16]


def test_fp16_overflowing_step_is_skipped_and_does_not_count(batch):
    blow_up = torch.tensor(1.0)

    def loss_fn(net, b):
        loss, metrics = mse_loss(net, b)
        return loss * blow_up, metrics

    engine = TrainingEngine(tiny_model(), loss_fn, lr=1e-2, weight_decay=0.0,
                            settings=EngineSettings(precision="fp16"), device=CPU)
    engine.step(batch)
    assert int(engine.applied_steps) == 1
    before = [p.detach().clone() for p in engine.module.parameters()]
    scale = engine.scaler.get_scale()
    blow_up.fill_(float("inf"))
    engine.step(batch)
    assert int(engine.applied_steps) == 1, "a skipped fp16 step must not advance the LR clock"
    assert engine.scaler.get_scale() < scale
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    blow_up.fill_(1.0)
    engine.step(batch)
    assert int(engine.applied_steps) == 2


# --- clipping, non-finite report ----------------------------------------------------------------

def test_gradients_are_clipped_to_the_configured_norm(batch):
    engine = make_engine(grad_clip=1e-3)
    metrics = engine.step(batch)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.module.parameters()]))
    assert metrics["grad_norm"] > 1e-3
    assert total <= 1e-3 * (1 + 1e-4)


def test_train_epoch_names_the_first_non_finite_batch(batch):
    calls = {"n": 0}

    def loss_fn(net, b):
        loss, metrics = mse_loss(net, b)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    engine = TrainingEngine(tiny_model(), loss_fn, lr=1e-3, weight_decay=0.0, settings=EngineSettings(), device=CPU)
    result = engine.train_epoch([batch] * 5)
    assert result.first_bad_batch == 2
    clean = make_engine().train_epoch([batch] * 4)
    assert clean.first_bad_batch is None and clean.applied_steps == 4
    assert clean.metrics["loss"] > 0


# --- torch.compile, CUDA graphs -----------------------------------------------------------------

def test_compiled_training_step_matches_the_eager_one(batch):
    eager, compiled = make_engine(), make_engine(compile=True)
    for _ in range(2):
        a, b = eager.step(batch), compiled.step(batch)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    assert hasattr(compiled.net, "_orig_mod"), "the model must really be compiled"
    for p, q in zip(eager.module.parameters(), compiled.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_on_cpu_warn_once_and_run_eagerly(batch, caplog):
    from modules import engine as engine_module
    engine_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="simulgen"):
        first, second = make_engine(cuda_graphs=True), make_engine(cuda_graphs=True)
        for _ in range(5):
            first.step(batch)
    warnings = [r for r in caplog.records if "cuda_graphs" in r.getMessage()]
    assert len(warnings) == 1
    assert first._graph is None and not second.use_graphs
    eager = make_engine()
    for _ in range(5):
        eager.step(batch)
    for p, q in zip(eager.module.parameters(), first.module.parameters()):
        assert torch.equal(p, q)


def test_cuda_graphs_under_ddp_are_refused_when_construction_would_use_them():
    """Capturing DDP's gradient all-reduce needs DDP built and warmed up on a side stream and
    NCCL async error handling off; untestable without GPUs, so the combination is refused
    before anything is built (no GPU is touched, so this runs on the CPU too)."""
    with pytest.raises(UserError, match=r"^cuda_graphs 1 is not supported together with --use_ddp; set cuda_graphs 0\.$"):
        TrainingEngine(tiny_model(), mse_loss, lr=1e-2, weight_decay=0.0,
                       settings=EngineSettings(cuda_graphs=True), device=CUDA, ddp=True)
    assert graphs_in_use(EngineSettings(cuda_graphs=True), CUDA, ddp=False)
    assert not graphs_in_use(EngineSettings(cuda_graphs=False), CUDA, ddp=True)
    # Off CUDA graphs are never used (warned once, eager), so DDP on the CPU is not refused.
    assert not graphs_in_use(EngineSettings(cuda_graphs=True), CPU, ddp=True)


@needs_cuda
@pytest.mark.parametrize("use_sam,precision", [(False, "fp32"), (True, "fp32"), (True, "fp16"), (False, "bf16")])
def test_cuda_graph_replays_match_eager_steps(use_sam, precision):
    """Graphs with SAM's two passes and with fp16 scaling replay what the eager steps do."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 6, device=CUDA), torch.randn(8, 3, device=CUDA)) for _ in range(8)]
    engines = [make_engine(device=CUDA, cuda_graphs=graphs, use_sam=use_sam, precision=precision)
               for graphs in (False, True)]
    for b in data:
        for e in engines:
            e.step(b)
    assert engines[1]._graph is not None and engines[0]._graph is None
    assert int(engines[1].applied_steps) == len(data)
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=1e-3, atol=1e-3)
    for p, q in zip(engines[0].module.parameters(), engines[1].module.parameters()):
        torch.testing.assert_close(p, q, **tol)


class DropNet(nn.Module):
    """Hidden features times a ScheduledDropout mask; also returns the fraction dropped."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.drop, self.out = nn.Linear(6, 256), ScheduledDropout(0.0), nn.Linear(256, 3)

    def forward(self, x):
        mask = self.drop(torch.ones(x.shape[0], self.hidden.out_features, device=x.device))
        return self.out(F.gelu(self.hidden(x)) * mask), (mask == 0).float().mean()


@needs_cuda
def test_cuda_graph_sees_beta_dropout_rate_and_lr_changed_after_capture():
    """β (a tensor filled in place), the dropout rate (a buffer filled in place) and the LR
    (a float in the optimizer, which runs outside the graph) change after the capture; the
    replays must follow them like eager steps do."""
    from modules.conditioners import set_dropout_rate
    torch.manual_seed(1)
    data = [(torch.randn(8, 6, device=CUDA), torch.randn(8, 3, device=CUDA)) for _ in range(9)]
    engines, betas = [], []
    for graphs in (False, True):
        model, beta = DropNet().to(CUDA), torch.zeros((), device=CUDA)

        def loss_fn(net, batch, model=model, beta=beta):
            pred, dropped = net(batch[0])
            loss = F.mse_loss(pred, batch[1]) + beta * model.hidden.weight.square().mean()
            return loss, {"dropped": dropped.detach()}

        engines.append(TrainingEngine(model, loss_fn, lr=1e-2, weight_decay=0.0,
                                      settings=EngineSettings(cuda_graphs=graphs), device=CUDA))
        betas.append(beta)

    def step(batch):        # read at once: a replay's outputs live in the graph's static memory
        return [{k: v.item() for k, v in e.step(batch).items()} for e in engines]

    def assert_same_weights():
        for p, q in zip(engines[0].module.parameters(), engines[1].module.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)

    for b in data[:5]:                   # 3 eager warm-ups, the capture, a replay
        eager, graph = step(b)
        assert graph["loss"] == pytest.approx(eager["loss"], rel=1e-5) and graph["dropped"] == 0.0
    assert engines[1]._graph is not None
    penalty = 0.5 * engines[0].module.hidden.weight.square().mean().item()
    assert penalty > 1e-3                # the β term below is not negligible
    for beta in betas:
        beta.fill_(0.5)
    for e in engines:
        e.set_lr(3e-3)
    for b in data[5:8]:
        eager, graph = step(b)
        assert graph["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert_same_weights()
    for e in engines:
        set_dropout_rate(e.module, 0.5)
    eager, graph = step(data[8])
    assert abs(graph["dropped"] - 0.5) < 0.06 and abs(eager["dropped"] - 0.5) < 0.06


# --- the DDP batch split ----------------------------------------------------------------------

def test_ranks_batches_together_are_the_single_process_batches():
    indices = torch.arange(100, 140)
    single = batch_indices(indices, 8, epoch=3, seed=7)
    ranks = [batch_indices(indices, 4, epoch=3, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for k, whole in enumerate(single):
        assert sorted(torch.cat([ranks[0][k], ranks[1][k]]).tolist()) == sorted(whole.tolist())
    assert batch_indices(indices, 8, epoch=4, seed=7)[0].tolist() != single[0].tolist()
    assert all(len(b) == 8 for b in batch_indices(torch.arange(21), 8, epoch=0, seed=0))   # drop_last


def test_sam_perturbed_pass_does_not_advance_the_spectral_norm_vectors(batch):
    """Each step runs one power iteration, at the weights the step starts from. SAM's second
    forward, at the perturbed weights, would run another one there: after one step the u, v
    of a SAM engine must equal those of a plain engine (the same first forward)."""
    from modules.layers import spectral_norm

    def sn_model():
        torch.manual_seed(0)
        return nn.Sequential(spectral_norm(nn.Linear(6, 16)), nn.GELU(), spectral_norm(nn.Linear(16, 3)))

    plain, sam = make_engine(sn_model()), make_engine(sn_model(), use_sam=True, sam_rho=0.5)
    vectors = lambda e: {k: v.clone() for k, v in e.module.named_buffers() if k.endswith(("._u", "._v"))}  # noqa: E731
    before = vectors(sam)
    assert len(before) == 4
    plain.step(batch)
    sam.step(batch)
    after_plain, after_sam = vectors(plain), vectors(sam)
    assert any(not torch.equal(before[k], after_plain[k]) for k in before), "a step must run a power iteration"
    for key in before:
        assert torch.equal(after_sam[key], after_plain[key]), f"{key}: the perturbed pass moved it"


def test_ema_is_not_updated_when_the_fp16_scaler_skips_the_step(batch):
    blow_up = torch.tensor(1.0)

    def loss_fn(net, b):
        loss, metrics = mse_loss(net, b)
        return loss * blow_up, metrics

    engine = TrainingEngine(tiny_model(), loss_fn, lr=1e-2, weight_decay=0.0,
                            settings=EngineSettings(precision="fp16", use_ema=True), device=CPU)
    engine.step(batch)
    averaged = [p.detach().clone() for p in engine.ema.module.parameters()]
    assert any(not torch.equal(a, p) for a, p in zip(averaged, tiny_model().parameters())), "EMA moved on a real step"
    updates, n = engine._ema_updates, int(engine.ema.n_averaged)
    scale = engine.scaler.get_scale()
    blow_up.fill_(float("inf"))
    engine.step(batch)
    assert engine.scaler.get_scale() < scale, "the step was skipped"
    assert all(torch.equal(a, p) for a, p in zip(averaged, engine.ema.module.parameters()))
    assert (engine._ema_updates, int(engine.ema.n_averaged)) == (updates, n)
    blow_up.fill_(1.0)
    engine.step(batch)
    assert engine._ema_updates == updates + 1
