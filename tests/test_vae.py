"""Hierarchical VAE and Gaussian helper: shapes, SPEC §9 parameter counts, KL, modes."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.nn.utils import parametrize

from modules.gaussian import (
    LOG_VAR_MAX,
    LOG_VAR_MIN,
    STD_MAX,
    Gaussian,
    kl_residual,
    kl_standard_normal,
)
from modules.blocks import (
    ConvBlock,
    DecoderResidualBlock,
    LatentToSequence,
    PosteriorNet,
    PriorNet,
    ResidualBlock,
    UpBlock,
    group_norm,
    he_init_and_spectral_norm,
    num_groups,
)
from modules.vae import Decoder, Encoder, HierarchicalVAE, VAEArchitecture, VAEOutput

# the SPEC §9 small configuration: N=296, T=20, F=64 32 16 8, Lend=32, Ld=8
N, T, F, LEND, LD = 296, 20, (64, 32, 16, 8), 32, 8
B = 3


CONV_LINEAR = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def n_convs(m: nn.Module) -> int:
    return sum(isinstance(s, (nn.Conv1d, nn.ConvTranspose1d)) for s in m.modules())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[True, False], ids=["small", "large"])
def vae(request):
    torch.manual_seed(0)
    return HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=request.param))


@pytest.fixture(scope="module")
def small_vae():
    # eval(): in train mode spectral norm runs a power iteration on every forward, so the
    # weights themselves move slightly between two calls; the comparisons below are about
    # the sampling, so they use the frozen (eval) weights, as prediction does
    torch.manual_seed(0)
    return HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=True)).eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(B, N, T)


# ----------------------------------------------------------------------------- GroupNorm

@pytest.mark.parametrize(
    "c, groups",
    [(1, 1), (4, 1), (8, 2), (12, 3), (64, 8), (1024, 8), (296, 8), (300, 6), (1681, 1), (10, 2)],
)
def test_num_groups_is_largest_divisor_not_above_original(c, groups):
    assert num_groups(c) == groups
    original = min(8, max(1, c // 4))
    assert c % num_groups(c) == 0 and num_groups(c) <= original
    if c % original == 0:
        assert num_groups(c) == original
    gn = group_norm(c)
    assert gn.num_groups == groups and gn.num_channels == c


@pytest.mark.parametrize("nodes", [300, 1681])
def test_awkward_node_counts_build_and_run(nodes):
    torch.manual_seed(0)
    model = HierarchicalVAE(VAEArchitecture(nodes, 4, (8, 6, 4), 4, 2, small=True))
    out = model(torch.randn(2, nodes, 4))
    assert out.x_hat.shape == (2, nodes, 4)
    assert torch.isfinite(out.x_hat).all()


# ----------------------------------------------------------------------------- block shapes

@pytest.mark.parametrize("small", [True, False])
def test_block_shapes(small):
    torch.manual_seed(0)
    h = torch.randn(B, 12, T)
    assert ConvBlock(12, 7, small)(h).shape == (B, 7, T)
    assert ResidualBlock(12, small)(h).shape == (B, 12, T)
    assert DecoderResidualBlock(12, small)(h).shape == (B, 12, T)
    assert UpBlock(12, 5)(h).shape == (B, 5, T)
    assert LatentToSequence(LD, 12, T)(torch.randn(B, LD)).shape == (B, 12, T)
    assert PriorNet(12, small)(h).shape == (B, 24, T)
    assert PosteriorNet(12, small)(torch.randn(B, 24, T)).shape == (B, 24, T)


def test_block_variants_differ_in_depth():
    assert (n_convs(ConvBlock(4, 4, True)), n_convs(ConvBlock(4, 4, False))) == (1, 2)
    assert (n_convs(ResidualBlock(4, True)), n_convs(ResidualBlock(4, False))) == (1, 2)
    assert (n_convs(DecoderResidualBlock(4, True)),
            n_convs(DecoderResidualBlock(4, False))) == (3, 4)


@pytest.mark.parametrize("small", [True, False])
def test_encoder_decoder_shapes(small):
    torch.manual_seed(0)
    enc = Encoder(N, T, F, LEND, LD, small)
    dec = Decoder(N, T, F, LEND, LD, small)
    mu, log_var, xs = enc(torch.randn(B, N, T))
    assert mu.shape == log_var.shape == (B, LEND)
    assert len(xs) == len(F) - 1 and all(v.shape == (B, LD) for v in xs)
    x_hat, kl = dec(mu, xs)
    assert x_hat.shape == (B, N, T)
    assert kl.shape == () and kl.dtype == torch.float32


def test_encoder_returns_levels_deepest_first(small_vae, x):
    # xs[0] must come from level L-2's Linear, xs[-1] from level 0's; level L-1's is dropped
    enc = small_vae.encoder
    assert not enc.training
    _, _, before = enc(x)
    L = len(F)
    for level, expect_changed in [(L - 2, 0), (0, L - 2), (L - 1, None)]:
        bias = enc.xs_linear[level].bias
        with torch.no_grad():
            bias += 1.0
            _, _, after = enc(x)
            bias -= 1.0
        changed = [i for i in range(L - 1) if not torch.equal(before[i], after[i])]
        assert changed == ([] if expect_changed is None else [expect_changed])


def test_vae_shapes_and_api(vae, x):
    out = vae(x)
    assert isinstance(out, VAEOutput)
    assert out.x_hat.shape == (B, N, T)
    assert out.mu.shape == out.log_var.shape == (B, LEND)
    assert out.kl_main.shape == out.kl_levels.shape == ()
    assert vae.num_levels == len(F) - 1
    mu, log_var, xs = vae.encode(x)
    assert mu.shape == log_var.shape == (B, LEND)
    assert xs.shape == (B, len(F) - 1, LD)  # saved latents are (P, L-1, Ld)
    x_hat, kl = vae.decode(mu, xs)
    assert x_hat.shape == (B, N, T) and kl.shape == ()
    assert (x_hat.abs() <= 1).all()  # Tanh output


# ----------------------------------------------------------------------------- SPEC §9 counts

@pytest.mark.parametrize(
    "nodes, time, filters, small, total, enc, dec",
    [
        (296, 20, (64, 32, 16, 8), True, 1_036_096, 68_208, 967_888),
        (296, 20, (64, 32, 16, 8), False, 1_264_336, 101_568, 1_162_768),
        (2000, 50, (1024, 512, 256, 128), True, 243_678_400, 8_103_264, 235_575_136),
        (2000, 50, (1024, 512, 256, 128), False, 301_612_480, 16_470_624, 285_141_856),
    ],
)
def test_parameter_counts_match_original(nodes, time, filters, small, total, enc, dec):
    with torch.device("meta"):  # ~1.2 GB of weights for the big ones: count, don't allocate
        model = HierarchicalVAE(VAEArchitecture(nodes, time, filters, 32, 8, small=small))
    assert n_params(model.encoder) == enc
    assert n_params(model.decoder) == dec
    assert n_params(model) == total


# ----------------------------------------------------------------------------- init + spectral norm

def test_every_conv_and_linear_is_spectral_normalised_after_he_init(vae):
    layers = [m for m in vae.modules() if isinstance(m, CONV_LINEAR)]
    assert len(layers) > 20
    n_transposed = 0
    for m in layers:
        assert parametrize.is_parametrized(m, "weight"), m
        sn = m.parametrizations.weight[0]
        assert type(sn).__name__ == "_SpectralNorm"
        if isinstance(m, nn.ConvTranspose1d):
            assert sn.dim == 1  # output channels are dim 1 of a transposed conv's weight
            n_transposed += 1
        else:
            assert sn.dim == 0
        w = m.parametrizations.weight.original
        bound = math.sqrt(2.0) * math.sqrt(3.0 / nn.init._calculate_correct_fan(w, "fan_in"))
        assert w.abs().max() <= bound * (1 + 1e-6)
        if w.numel() >= 500:  # He bound is reached; PyTorch's default init stays at 41 % of it
            assert w.abs().max() > 0.8 * bound
    assert n_transposed == len(F) - 1


def test_biases_start_at_zero(vae):
    biases = [m.bias for m in vae.modules() if isinstance(m, CONV_LINEAR)]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_spectral_norm_bounds_effective_weight():
    torch.manual_seed(0)
    lin = nn.Linear(40, 200)
    he_init_and_spectral_norm(lin)
    assert torch.linalg.matrix_norm(lin.parametrizations.weight.original, ord=2) > 2
    lin.train()
    with torch.no_grad():
        for _ in range(300):  # one power iteration per access in train mode
            w = lin.weight
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=1e-3)


# ----------------------------------------------------------------------------- Gaussian helper

@pytest.mark.parametrize("shape", [(5, 32), (4, 6, 7)])
def test_kl_standard_normal_matches_torch_distributions(shape):
    torch.manual_seed(0)
    mu = torch.randn(shape) * 2
    log_var = torch.rand(shape) * 8 - 4
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0))
    ref = ref.flatten(1).sum(1).mean()
    got = kl_standard_normal(mu, log_var)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert Gaussian(mu, log_var).kl_standard().item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_residual_matches_torch_distributions():
    torch.manual_seed(0)
    shape = (4, 6, 9)
    mu_p, lv_p = torch.randn(shape), torch.rand(shape) * 6 - 3
    d_mu, d_lv = torch.randn(shape), torch.rand(shape) * 4 - 2
    posterior = Normal(mu_p + d_mu, torch.exp(0.5 * (lv_p + d_lv)))
    prior = Normal(mu_p, torch.exp(0.5 * lv_p))
    ref = kl_divergence(posterior, prior).flatten(1).sum(1).mean()
    got = kl_residual(d_mu, d_lv, lv_p)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_residual(torch.zeros(shape), torch.zeros(shape), lv_p).item() == 0.0


def test_kl_is_fp32_for_low_precision_inputs():
    torch.manual_seed(0)
    mu = torch.randn(4, 8).half()
    lv = torch.full((4, 8), 20.0).half()  # exp(20) overflows fp16
    kl = kl_standard_normal(mu, lv)
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    kl = kl_residual(mu, lv, -lv)  # exp(dlv) and exp(-log_var_p) overflow fp16
    assert kl.dtype == torch.float32 and torch.isfinite(kl)


def test_clamping():
    mu = torch.zeros(2, 3)
    huge = Gaussian(mu, torch.full((2, 3), 1000.0))
    tiny = Gaussian(mu, torch.full((2, 3), -1000.0))
    assert (huge.log_var == LOG_VAR_MAX).all() and (tiny.log_var == LOG_VAR_MIN).all()
    assert (huge.std == STD_MAX).all()  # exp(15) > 10: sigma is clamped before sampling
    assert torch.allclose(tiny.std, torch.full((2, 3), math.exp(-15.0)))
    torch.manual_seed(0)
    draws = Gaussian(torch.zeros(10_000), torch.full((10_000,), 60.0)).sample()
    assert draws.std().item() == pytest.approx(STD_MAX, rel=0.05)
    # the KL sees the clamped log-variance too
    assert kl_standard_normal(mu, torch.full((2, 3), 1000.0)) == kl_standard_normal(
        mu, torch.full((2, 3), LOG_VAR_MAX)
    )
    assert torch.isfinite(kl_residual(mu, torch.full((2, 3), 1e4), torch.full((2, 3), -1e4)))


def test_gaussian_modes():
    torch.manual_seed(0)
    g = Gaussian(torch.randn(3, 4), torch.zeros(3, 4))
    assert torch.equal(g.draw("fix"), g.mu)
    assert not torch.equal(g.draw("random"), g.draw("random"))
    with pytest.raises(ValueError):
        g.draw("frozen")


# ----------------------------------------------------------------------------- sampling modes

def test_fix_mode_is_deterministic_random_mode_is_not(small_vae, x):
    a, b = small_vae(x, mode="fix"), small_vae(x, mode="fix")
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.kl_levels, b.kl_levels)
    r1, r2 = small_vae(x, mode="random"), small_vae(x, mode="random")
    assert not torch.equal(r1.x_hat, r2.x_hat)
    assert not torch.equal(r1.x_hat, a.x_hat)
    with pytest.raises(ValueError):
        small_vae(x, mode="frozen")


def test_forward_fix_equals_encode_then_decode_means(small_vae, x):
    mu, _, xs = small_vae.encode(x)
    x_hat, kl = small_vae.decode(mu, xs, mode="fix")
    out = small_vae(x, mode="fix")
    assert torch.allclose(out.x_hat, x_hat) and torch.allclose(out.kl_levels, kl)
    # hierarchical vectors as a (B, L-1, Ld) tensor or as a list give the same decode
    x_hat_list, _ = small_vae.decode(mu, list(xs.unbind(1)), mode="fix")
    assert torch.equal(x_hat, x_hat_list)


def test_prior_sampling_without_hierarchical_vectors(small_vae):
    torch.manual_seed(0)
    z = torch.randn(B, LEND)
    a, kl_a = small_vae.decode(z)
    b, _ = small_vae.decode(z)
    assert a.shape == (B, N, T) and torch.isfinite(a).all()
    assert kl_a.dtype == torch.float32 and kl_a.item() == 0.0
    assert not torch.equal(a, b)  # fresh noise at every level
    f1, _ = small_vae.decode(z, mode="fix")
    f2, _ = small_vae.decode(z, mode="fix")
    assert torch.equal(f1, f2)


# ----------------------------------------------------------------------------- mixed precision

def test_bf16_autocast_forward_keeps_kl_fp32(small_vae, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = small_vae(x)
    assert out.kl_main.dtype == torch.float32 and out.kl_levels.dtype == torch.float32
    assert torch.isfinite(out.x_hat).all()
    assert torch.isfinite(out.kl_main) and torch.isfinite(out.kl_levels)
    assert out.x_hat.shape == (B, N, T)


# ----------------------------------------------------------------------------- level KL wiring

def test_level_kl_is_consumed_and_trains_the_used_posterior_nets(x):
    torch.manual_seed(0)
    model = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=True))
    out = model(x)
    assert out.kl_levels.item() > 0
    (out.kl_main + out.kl_levels + out.x_hat.square().mean()).backward()

    def grad_norm(module):
        grads = [p.grad for p in module.parameters()]
        return sum(0.0 if g is None else g.abs().sum().item() for g in grads)

    dec, enc = model.decoder, model.encoder
    used = model.num_levels - 1  # L-2 posterior levels are consumed
    for i in range(used):
        assert grad_norm(dec.condition_xz[i]) > 0
        assert grad_norm(dec.xs_sequence[i]) > 0
        assert grad_norm(dec.condition_z[i]) > 0
    # the original's unused last branch: built, never run
    last = model.num_levels - 1
    assert grad_norm(dec.condition_xz[last]) == 0
    assert grad_norm(dec.xs_sequence[last]) == 0
    assert grad_norm(dec.condition_z[last]) == 0
    # encoder Linears of the consumed vectors (levels 1 .. L-2) get gradient
    for level in range(1, len(F) - 1):
        assert grad_norm(enc.xs_linear[level]) > 0
    # level 0's vector is returned (saved latents) but not consumed; level L-1's is skipped
    assert grad_norm(enc.xs_linear[0]) == 0 and grad_norm(enc.xs_linear[len(F) - 1]) == 0


def test_level_kl_only_counts_when_vectors_are_given(small_vae, x):
    mu, _, xs = small_vae.encode(x)
    _, kl_post = small_vae.decode(mu, xs)
    _, kl_prior = small_vae.decode(mu, None)
    assert kl_post.item() > 0 and kl_prior.item() == 0.0


def _capture_level_parameters(model):
    """Forward hooks on the nets that produce each level's prior and posterior shift, the
    residual blocks (h) and the up blocks (whose input is h + z of the previous level)."""
    dec, seen = model.decoder, {"prior": {}, "delta": {}, "h": {}, "up_in": {}, "head": []}
    hooks = [model.encoder.head.register_forward_hook(lambda m, a, out: seen["head"].append(out.chunk(2, dim=1)))]
    for i in range(dec.num_levels):
        hooks += [
            dec.condition_z[i].register_forward_hook(lambda m, a, out, i=i: seen["prior"].__setitem__(i, out.chunk(2, dim=1))),
            dec.condition_xz[i].register_forward_hook(lambda m, a, out, i=i: seen["delta"].__setitem__(i, out.chunk(2, dim=1))),
            dec.res_blocks[i].register_forward_hook(lambda m, a, out, i=i: seen["h"].__setitem__(i, out)),
            dec.up_blocks[i].register_forward_pre_hook(lambda m, a, i=i: seen["up_in"].__setitem__(i, a[0])),
        ]
    return seen, hooks


@pytest.fixture(scope="module")
def wide_prior_vae():
    # At initialisation the prior log-variances are all near 0, so a posterior that forgot the
    # prior's variance would look the same; offsets make them clearly differ (prior σ² ≈ e^1.5,
    # posterior shift Δlog σ² ≈ -1).
    torch.manual_seed(0)
    model = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=True)).eval()
    with torch.no_grad():
        for prior_net, posterior_net in zip(model.decoder.condition_z, model.decoder.condition_xz):
            c = prior_net[-1].bias.shape[0] // 2
            prior_net[-1].bias[c:] += 1.5
            posterior_net[-1].bias[c:] -= 1.0
    return model


@pytest.mark.parametrize("mode", ["random", "fix"])
def test_decoder_kl_is_the_kl_of_the_distributions_it_samples_from(wide_prior_vae, x, mode):
    model = wide_prior_vae
    seen, hooks = _capture_level_parameters(model)
    try:
        torch.manual_seed(3)
        out = model(x * 3, mode=mode)
    finally:
        for h in hooks:
            h.remove()
    consumed = model.num_levels - 1                      # L-2 levels draw a posterior z
    assert sorted(seen["prior"]) == sorted(seen["delta"]) == list(range(consumed))
    total = torch.zeros((), dtype=torch.float64)
    for i in range(consumed):
        (mu_p, lv_p), (d_mu, d_lv) = seen["prior"][i], seen["delta"][i]
        prior = Normal(mu_p.double(), torch.exp(0.5 * lv_p.double()))
        posterior = Normal((mu_p + d_mu).double(), torch.exp(0.5 * (lv_p + d_lv).double()))
        total += kl_divergence(posterior, prior).flatten(1).sum(1).mean()
        # the next level's input is h + z, z drawn from that same posterior
        z = (seen["up_in"][i + 1] - seen["h"][i]).double()
        if mode == "fix":
            torch.testing.assert_close(z, posterior.mean, rtol=0, atol=1e-5)
        else:
            eps = (z - posterior.mean) / posterior.stddev
            assert abs(eps.mean().item()) < 0.1 and eps.std().item() == pytest.approx(1.0, abs=0.1)
    assert out.kl_levels.item() > 1.0
    assert out.kl_levels.item() == pytest.approx(total.item(), rel=1e-4)
    mu, log_var = seen["head"][0]
    main = kl_divergence(Normal(mu.double(), torch.exp(0.5 * log_var.double())), Normal(0.0, 1.0))
    assert out.kl_main.item() == pytest.approx(main.sum(1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("filters", [(64, 32, 16, 8), (16, 8), (32, 16, 8)])
def test_unused_parameters_are_exactly_those_without_gradient(filters):
    torch.manual_seed(0)
    model = HierarchicalVAE(VAEArchitecture(N, T, filters, LEND, LD, small=True))
    out = model(torch.rand(2, N, T))
    (out.x_hat.square().mean() + out.kl_main + out.kl_levels).backward()
    no_grad = {id(p) for p in model.parameters() if p.grad is None}
    assert no_grad == {id(p) for p in model.unused_parameters()}


def test_output_norm_off_drops_only_the_output_groupnorm():
    with torch.device("meta"):
        base = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=True))
        plain = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=True, output_norm=False))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(base) - count(plain) == 2 * N
    assert isinstance(plain.decoder.recon[1], nn.Identity)


def test_without_output_norm_the_amplitude_of_a_run_reaches_the_output():
    """GroupNorm(N) standardises each run: scaling the decoder's pre-norm signal does nothing."""
    torch.manual_seed(0)
    for output_norm, should_change in ((True, False), (False, True)):
        model = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, small=True, output_norm=output_norm)).eval()
        h = torch.randn(2, F[0], T)
        conv, rest = model.decoder.recon[0], model.decoder.recon[1:]
        with torch.no_grad():
            a = rest(conv(h))
            b = rest(2 * conv(h) - conv.bias.view(1, -1, 1))   # twice the amplitude around the bias
        assert (not torch.allclose(a, b, atol=1e-4)) == should_change


# -----------------------------------------------------------------------------
# the linear POD path and the data-driven initialisation (benchmarks/accuracy/NOTES.md)

def _low_rank_runs(p=24, n=40, t=10, rank=4, seed=0):
    """Runs (P, N, T) spanning `rank` fixed space-time patterns built on 3 spatial shapes: a
    POD of `rank` modes through 3 or more frame modes is exact."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.einsum("nj,rjt->rnt", torch.randn(n, 3, generator=g), torch.randn(rank, 3, t, generator=g))
    return torch.einsum("pr,rnt->pnt", torch.randn(p, rank, generator=g), patterns) * 0.05


def _linear_vae(n=40, t=10, modes=16, **kw):
    torch.manual_seed(0)
    return HierarchicalVAE(VAEArchitecture(n, t, (16, 8, 4), 8, 4, small=True, output_norm=False, linear_modes=modes, **kw))


@pytest.mark.parametrize("spectral", [True, False])
def test_linear_path_starts_the_vae_as_the_pod_of_the_training_runs(spectral):
    from modules.train_vae import frame_basis_of
    runs = _low_rank_runs()
    vae = _linear_vae(spectral_norm=spectral)
    before = vae.decode(*vae.encode(runs)[::2], mode="fix")[0]
    vae.init_from_data(frame_basis_of(runs, 16), runs.split(5))
    vae.eval()
    with torch.no_grad():
        mu, _, xs = vae.encode(runs)
        after = vae.decode(mu, xs, mode="fix")[0]
        linear = vae.linear.decode(vae.linear.encode(runs))
    rel = lambda a: ((a - runs).norm() / runs.norm()).item()       # noqa: E731
    assert rel(linear) < 1e-5                        # rank-4 data: the POD path alone is exact
    assert rel(after) < 0.05 < 0.5 < rel(before)     # the networks enter with a small gain only
    spread = mu[:, :4].std(0)                        # latents start as POD coefficients, the first of unit variance
    assert spread[0] == pytest.approx(1.0, abs=0.1) and (spread[1:] <= spread[:-1] + 0.05).all()


def test_linear_path_is_fixed_saved_and_restored():
    from modules.train_vae import frame_basis_of
    runs = _low_rank_runs()
    vae = _linear_vae()
    vae.init_from_data(frame_basis_of(runs, 16), [runs])
    fixed = {k: v.clone() for k, v in vae.linear.state_dict().items()}
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = vae(runs)
        opt.zero_grad()
        (out.x_hat - runs).square().mean().backward()
        opt.step()
    for key, value in vae.linear.state_dict().items():
        assert torch.equal(value, fixed[key]), key               # buffers: no optimizer moves them
    assert vae.net_log_gain.grad is not None                     # the networks' gains do learn
    again = _linear_vae()
    again.load_state_dict(vae.state_dict())
    assert torch.equal(again.linear.frame, vae.linear.frame)
    assert _linear_vae(modes=0).linear is None and "linear.frame" not in _linear_vae(modes=0).state_dict()


def test_log_variance_init_sets_the_main_posterior_variance(x):
    vae = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, logvar_init=-8.0))
    vae.eval()
    with torch.no_grad():
        mu, log_var, xs = vae.encode(x)
        out = vae(x, mode="fix")
    assert log_var.mean().item() == pytest.approx(-8.0, abs=1.5)
    assert out.kl_levels.item() < 1e4                          # the level priors are untouched: no KL blow-up
    default = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD))
    assert default.encode(x)[1].mean().abs().item() < 1.5        # the original's: around 0


@pytest.mark.parametrize("output_norm", [True, False])
def test_vae_norm_none_drops_the_inner_groupnorms_only(output_norm):
    vae = HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD, output_norm=output_norm, norm="none"))
    norms = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]
    assert norms == ([vae.decoder.recon[1]] if output_norm else [])
    assert sum(isinstance(m, nn.GroupNorm) for m in HierarchicalVAE(VAEArchitecture(N, T, F, LEND, LD)).modules()) > 10


def test_frame_basis_streams_the_store_and_spans_the_snapshots_pod():
    import numpy as np
    from modules.data import FieldScaler, FieldStore
    from modules.train_vae import frame_basis, frame_basis_of
    data = _low_rank_runs(p=20).transpose(1, 2).contiguous().numpy()           # (P, T, N), 3 spatial shapes
    store = FieldStore(data, FieldScaler.fit(data, "centered", np.arange(20)), preload=False)
    streamed = frame_basis(store, torch.arange(20), 3, seed=0, max_frames=50)  # a sample of the 200 frames
    full = frame_basis_of(store.get(torch.arange(20)), 3)
    overlap = torch.linalg.svdvals(streamed.double().T @ full.double())        # cosines of the subspace angles
    assert streamed.shape == (40, 3) and overlap.min() > 1 - 1e-6


def test_an_older_checkpoints_architecture_matches_by_its_defaults_and_names_only_real_differences():
    from modules.checkpoint import check_architecture, same_architecture
    from modules.errors import UserError
    current = VAEArchitecture(40, 8, (16, 8, 4), 8, 4, small=True, output_norm=False)
    older = {k: v for k, v in current.stored().items() if k not in ("norm", "logvar_init", "linear_modes")}
    assert same_architecture(older, current)                   # missing fields: the defaults they were built with
    check_architecture(older, current, "vae.pt")
    with pytest.raises(UserError) as err:
        check_architecture({**older, "latent_dim": 6}, current, "vae.pt")
    assert "latent_dim: checkpoint 6, now 4" in str(err.value) and "linear_modes" not in str(err.value)
    assert not same_architecture({**older, "unknown_field": 1}, current)
