"""Latent conditioners: fidelity (SPEC §9 parameter counts), shapes, scheduled dropout,
and a short CPU run that learns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modules.conditioners import (
    CNNConditioner,
    MLPConditioner,
    ScheduledDropout,
    ViTConditioner,
    _cnn_groups,
    ConditionerArchitecture,
    build_conditioner,
    count_parameters,
    set_dropout_rate,
)
from modules.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# SPEC §9 configuration: 5 CSV inputs, Latent_dim_end 32, Latent_dim 8, 3 hierarchical levels
BASE = dict(
    num_param=5,
    image_size=256,
    filters=[16, 32, 64, 128],
    latent_dim_end=32,
    latent_dim=8,
    num_levels=3,
    dropout_rate=0.2,
    use_se=True,
)


def build(input_type: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_conditioner(ConditionerArchitecture(input_type=input_type, **{**BASE, **overrides}))


# -----------------------------------------------------------------------------
# fidelity


@pytest.mark.parametrize(
    "filters, expected",
    [([16, 32, 64, 128], 4_296), ([8, 16, 32, 64, 128, 256, 128], 48_808)],
)
def test_mlp_parameter_count_is_exact(filters, expected):
    assert count_parameters(build("csvs", filters=filters)) == expected


@pytest.mark.parametrize(
    "input_type, overrides, expected",
    [
        ("image", dict(use_se=True), 772_040),
        ("image", dict(use_se=False), 766_600),
        ("image_vit", dict(image_size=64), 85_706),
        ("image_vit", dict(image_size=256), 101_066),
    ],
)
def test_image_parameter_counts_within_two_percent(input_type, overrides, expected):
    n = count_parameters(build(input_type, **overrides))
    assert abs(n - expected) <= 0.02 * expected, f"{input_type} {overrides}: {n} vs {expected}"


def test_registry_spellings_and_unknown_type():
    assert isinstance(build("csv"), MLPConditioner)
    assert isinstance(build("csvs"), MLPConditioner)
    assert isinstance(build("image", filters=[8, 16]), CNNConditioner)
    assert isinstance(build("image_vit", image_size=64), ViTConditioner)
    with pytest.raises(UserError, match="input_type 'images'.*csvs.*image_vit"):
        build("images")


def test_too_short_filter_list_is_a_user_error():
    with pytest.raises(UserError, match="preset.txt"):
        build("csvs", filters=[16])


def test_cnn_group_count_divides_and_matches_original_where_it_worked():
    for c in range(1, 513):
        g = _cnn_groups(c)
        original = min(16, max(2, c // 2))
        assert c % g == 0 and 1 <= g <= original
        if c % original == 0:
            assert g == original


def test_importing_for_mlp_does_not_import_torchvision():
    code = (
        "import sys, modules.conditioners as c\n"
        "c.build_conditioner(c.ConditionerArchitecture('csvs', num_param=3, filters=[8, 16, 32],"
        " latent_dim_end=4, latent_dim=2, num_levels=2, dropout_rate=0.2, use_se=True))\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -----------------------------------------------------------------------------
# shapes and range


def _check_outputs(main, hier, batch):
    assert main.shape == (batch, BASE["latent_dim_end"])
    assert hier.shape == (batch, BASE["num_levels"], BASE["latent_dim"])
    for t in (main, hier):
        assert torch.isfinite(t).all()
        assert t.abs().max() <= 1.0  # Tanh heads


@pytest.mark.parametrize("training", [False, True])
def test_mlp_shapes(training):
    m = build("csvs").train(training)
    _check_outputs(*m(torch.randn(7, 5) * 10), 7)


@pytest.mark.parametrize("use_se", [True, False])
def test_cnn_shapes_at_256(use_se):
    m = build("image", use_se=use_se)
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        _check_outputs(*m.eval()(x), 2)
        _check_outputs(*m.train()(x), 2)  # DropBlock active


def test_cnn_deep_stack_runs_in_training_with_tiny_maps():
    # 6 stages at 64x64 end on 1x1 maps: DropBlock sizes must shrink (odd) to fit
    m = build("image", image_size=64, filters=[8, 8, 16, 16, 32, 32]).train()
    with torch.no_grad():
        _check_outputs(*m(torch.rand(2, 1, 64, 64)), 2)


@pytest.mark.parametrize("size", [64, 256])
def test_vit_shapes(size):
    m = build("image_vit", image_size=size)
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        _check_outputs(*m.eval()(x), 3)
        _check_outputs(*m.train()(x), 3)


def test_vit_rejects_size_not_multiple_of_patch():
    with pytest.raises(UserError, match="multiple of 16"):
        build("image_vit", image_size=100)


# -----------------------------------------------------------------------------
# scheduled dropout


def test_scheduled_dropout_uses_its_buffer():
    d = ScheduledDropout(0.5).train()
    assert d.p.dtype == torch.float32 and d.p.dim() == 0
    assert "p" not in d.state_dict()  # set by the schedule, not restored from checkpoints
    x = torch.randn(200_000) + 3.0  # no exact zeros in the input

    set_dropout_rate(d, 0.0)
    assert torch.equal(d(x), x)

    set_dropout_rate(d, 0.3)
    y = d(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.7)  # inverted dropout

    set_dropout_rate(d, 1.0)
    assert torch.equal(d(x), torch.zeros_like(x))  # no NaN at p = 1

    d.eval()
    assert torch.equal(d(x), x)


def test_set_dropout_rate_reaches_every_layer_and_changes_outputs():
    for input_type, kw in [("csvs", {}), ("image", dict(image_size=64, filters=[8, 16])),
                           ("image_vit", dict(image_size=64))]:
        m = build(input_type, **kw)
        layers = [d for d in m.modules() if isinstance(d, ScheduledDropout)]
        assert len(layers) >= 3, input_type
        set_dropout_rate(m, 0.25)
        assert all(d.p.item() == 0.25 for d in layers), input_type

    # the MLP has no other randomness: p = 0 is deterministic in train mode, p > 0 is not
    m = build("csvs").train()
    x = torch.randn(16, 5)
    set_dropout_rate(m, 0.0)
    torch.testing.assert_close(m(x), m.eval()(x))
    m.train()
    set_dropout_rate(m, 0.5)
    assert not torch.equal(m(x)[0], m(x)[0])


def test_dropout_rate_change_does_not_recompile():
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    m = build("csvs").train()
    cm = torch.compile(m, backend=counting_backend)
    x = torch.randn(8, 5)
    set_dropout_rate(m, 0.0)
    torch.testing.assert_close(cm(x), m.eval()(x))  # the new rate is honoured...
    m.train()
    set_dropout_rate(m, 0.9)
    assert not torch.equal(cm(x)[0], cm(x)[0])
    assert len(compiled_graphs) == 1  # ...without a second compilation
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# learning


@pytest.mark.parametrize(
    "input_type, overrides, shape",
    [
        ("csvs", {}, (5,)),
        ("image", dict(image_size=64, filters=[16, 32, 64]), (1, 64, 64)),
        ("image_vit", dict(image_size=64), (1, 64, 64)),
    ],
)
def test_a_few_steps_reduce_the_loss(input_type, overrides, shape):
    m = build(input_type, dropout_rate=0.0, **overrides)
    set_dropout_rate(m, 0.0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((8, *shape), generator=g)
    y_main = torch.rand(8, 32, generator=g) * 1.8 - 0.9
    y_hier = torch.rand(8, 3, 8, generator=g) * 1.8 - 0.9

    def loss_eval() -> float:
        m.eval()
        with torch.no_grad():
            main, hier = m(x)
        return (nn.functional.mse_loss(main, y_main) + nn.functional.mse_loss(hier, y_hier)).item()

    before = loss_eval()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(40):
        main, hier = m(x)
        loss = nn.functional.mse_loss(main, y_main) + nn.functional.mse_loss(hier, y_hier)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_eval()
    assert after < 0.7 * before, f"{input_type}: {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("input_type,kw", [("image", dict(image_size=64, filters=[8, 16])),
                                           ("image_vit", dict(image_size=64))])
def test_progressive_dropout_reaches_every_random_layer_of_the_image_conditioners(input_type, kw):
    """At rate 0 a conditioner in train mode must compute what it computes in eval mode: no
    DropBlock, attention dropout or drop path left at a fixed rate."""
    from modules.conditioners import scale_dropout_rates
    m = build(input_type, dropout_rate=0.2, **kw)
    x = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        expected = m(x)
    m.train()
    scale_dropout_rates(m, 0.0)
    with torch.no_grad():
        got = m(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    scale_dropout_rates(m, 1.0)
    with torch.no_grad():
        assert not torch.allclose(m(x)[0], expected[0])


def test_scaling_keeps_the_fixed_ratios_between_layers():
    from modules.conditioners import _scheduled, scale_dropout_rates
    for input_type, kw in [("csvs", {}), ("image", dict(image_size=64, filters=[8, 16])),
                           ("image_vit", dict(image_size=64))]:
        m = build(input_type, dropout_rate=0.2, **kw)
        layers = _scheduled(m)
        assert len({layer.base for layer in layers}) >= 2, input_type
        scale_dropout_rates(m, 0.5)
        assert all(layer.p.item() == pytest.approx(layer.base * 0.5) for layer in layers), input_type
