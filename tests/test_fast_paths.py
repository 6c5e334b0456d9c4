"""The speed-ups of issue #6 compute what the straightforward code computed."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from modules.augment import SeriesAugmentation
from modules.data import FieldScaler, FieldStore, open_dataset, prefetch, release_pages
from modules.host_memory import heap_allocations
from modules.layers import _DivideBySigma, spectral_norm
from modules.blocks import OutputTanh
from modules.vae import HierarchicalVAE, VAEArchitecture


# ----------------------------------------------------------------------------- augmentation

def _series(b=16, n=12, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, t, generator=g) + 0.5


@pytest.mark.parametrize("probs", [dict(mixup_prob=0.5, scale_prob=0.5, shift_prob=0.5, cutout_prob=0.5),
                                   dict(mixup_prob=0.2, scale_prob=0.1), dict(mixup_prob=1.0, scale_prob=1.0)])
def test_chosen_rows_path_equals_the_masked_path_bit_for_bit_without_noise(probs):
    aug = SeriesAugmentation(noise_prob=0.0, **{**dict(shift_prob=0.0, cutout_prob=0.0), **probs})
    x = _series()
    for seed in range(5):
        torch.manual_seed(seed)
        masked = aug._masked(x)
        torch.manual_seed(seed)
        rows = aug._chosen_rows(x)
        assert torch.equal(masked, rows)


def test_chosen_rows_path_draws_noise_for_the_same_samples():
    aug = SeriesAugmentation(noise_prob=0.4, mixup_prob=0.3, scale_prob=0.3)
    x = _series(b=64)
    torch.manual_seed(3)
    masked = aug._masked(x)
    torch.manual_seed(3)
    rows = aug._chosen_rows(x)
    # same choices everywhere, so the two differ exactly on the noisy samples, by noise of the same size
    differs = (masked != rows).flatten(1).any(dim=1)
    assert 0 < differs.sum() < 64
    residual = (masked - rows)[differs]
    assert residual.std().item() == pytest.approx(aug.noise_level * 2 ** 0.5, rel=0.1)
    assert torch.equal(masked[~differs], rows[~differs])


def test_cpu_batches_take_the_chosen_rows_path():
    aug = SeriesAugmentation()
    x = _series()
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    assert torch.equal(a, aug._chosen_rows(x))


# ----------------------------------------------------------------------------- spectral norm

LAYERS = [lambda: nn.Conv1d(7, 5, 3, padding=1), lambda: nn.ConvTranspose1d(7, 5, 3, padding=1),
          lambda: nn.Linear(9, 4)]


@pytest.mark.parametrize("make", LAYERS, ids=["conv", "convtranspose", "linear"])
def test_spectral_norm_matches_torch_forward_exactly_and_gradient_to_rounding(make):
    torch.manual_seed(0)
    base = make()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    torch_spectral_norm(theirs)
    torch.manual_seed(1)
    spectral_norm(ours)
    x = torch.randn(3, 9) if isinstance(base, nn.Linear) else torch.randn(3, 7, 6)
    for _ in range(3):                                   # train mode: one power iteration per call
        for m in (ours, theirs):
            m.zero_grad()
            (m(x) ** 2).sum().backward()
        assert torch.equal(ours.weight, theirs.weight)
        assert torch.equal(ours.parametrizations.weight[0]._u, theirs.parametrizations.weight[0]._u)
        # float32 sums in another order: one element of 105 once differed by 2.8e-5 of its value
        torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                                   theirs.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_divide_by_sigma_gradient_is_exact_in_float64():
    torch.manual_seed(0)
    u = nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    v = nn.functional.normalize(torch.randn(12, dtype=torch.float64), dim=0)
    w0 = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: _DivideBySigma.apply(w, w.detach().flatten(1), u, v, 0), (w0,))
    assert torch.autograd.gradcheck(
        lambda w: _DivideBySigma.apply(w, w.detach().movedim(1, 0).flatten(1), u, v, 1), (w1,))


def _decode(model, z, xs):
    with torch.no_grad():
        return model.decode(z, xs, mode="fix")[0]


def _fresh(model):
    """The same weights with no cached W/σ."""
    other = copy.deepcopy(model)
    other.train()
    return other.eval()


def test_eval_cache_is_invalidated_by_every_kind_of_weight_change():
    torch.manual_seed(0)
    model = HierarchicalVAE(VAEArchitecture(40, 8, [16, 8, 4], 8, 4)).eval()
    z, xs = torch.randn(2, 8), torch.randn(2, 2, 4)
    first = _decode(model, z, xs)
    assert torch.equal(first, _decode(model, z, xs))
    with torch.no_grad():                                                # an optimizer-style in-place step
        for p in model.parameters():
            p.mul_(1.01)
    stepped = _decode(model, z, xs)
    assert not torch.equal(stepped, first) and torch.equal(stepped, _decode(_fresh(model), z, xs))
    state = {k: v * 0.99 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)                                         # copies into the tensors
    with torch.inference_mode():
        loaded = model.decode(z, xs, mode="fix")[0]
    assert torch.equal(loaded, _decode(_fresh(model), z, xs)) and not torch.equal(loaded, stepped)
    model.train()
    model(torch.randn(2, 40, 8))                                         # a power iteration moves u, v
    model.eval()
    assert torch.equal(_decode(model, z, xs), _decode(_fresh(model), z, xs))


def test_eval_without_no_grad_still_builds_the_graph():
    torch.manual_seed(0)
    model = HierarchicalVAE(VAEArchitecture(40, 8, [16, 8, 4], 8, 4)).eval()
    out, _ = model.decode(torch.randn(2, 8), torch.randn(2, 2, 4), mode="fix")
    out.sum().backward()
    assert all(p.grad is not None for p in model.decoder.recon.parameters())


def test_output_tanh_in_place_equals_tanh_and_trains():
    torch.manual_seed(0)
    conv, norm = nn.Conv1d(4, 6, 1), nn.GroupNorm(2, 6)
    x = torch.randn(3, 4, 5)
    a = nn.Sequential(conv, norm, nn.Tanh())(x)
    b = nn.Sequential(conv, norm, OutputTanh())(x)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.square().sum(), conv.weight)[0]
    gb = torch.autograd.grad(b.square().sum(), conv.weight)[0]
    assert torch.equal(ga, gb)


def test_vae_still_uses_torch_spectral_norm_parametrization_class():
    model = HierarchicalVAE(VAEArchitecture(40, 8, [16, 8, 4], 8, 4))
    sn = model.decoder.recon[0].parametrizations.weight[0]
    assert isinstance(sn, torch.nn.utils.parametrizations._SpectralNorm)
    assert parametrize.is_parametrized(model.decoder.recon[0], "weight")


# ----------------------------------------------------------------------------- data and allocator

def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_release_pages_unmaps_what_a_streaming_read_touched(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.random.default_rng(0).standard_normal((32, 64, 1024)).astype(np.float32))   # 8 MiB
    array = open_dataset(path)
    before = _rss_file_kib()
    np.asarray(array[:32]).sum()
    touched = _rss_file_kib() - before
    release_pages(array, slice(0, 32))
    released = _rss_file_kib() - before
    assert touched > 6 * 1024 and released < 1024
    np.testing.assert_array_equal(array[3], np.load(path)[3])          # the data are still there


def test_streaming_store_keeps_its_mapped_pages_bounded(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.random.default_rng(0).standard_normal((64, 32, 1024)).astype(np.float32))   # 8 MiB
    array = open_dataset(path)
    store = FieldStore(array, FieldScaler.fit_streaming(array), preload=False)
    before = _rss_file_kib()
    for start in range(0, 64, 8):
        store.get(list(range(start, start + 8)))
    assert _rss_file_kib() - before < 2 * 1024


def test_heap_allocations_is_a_plain_block_elsewhere():
    with heap_allocations(torch.device("meta")):
        x = torch.ones(3)
    with heap_allocations(torch.device("cpu")):
        y = torch.ones(1 << 20) * 2
    assert x.sum() == 3 and y.sum() == 2 * (1 << 20)


# --- prefetching the streamed batches ---------------------------------------------------------

def test_prefetched_batches_are_the_batches_read_in_turn(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.random.default_rng(1).standard_normal((20, 6, 50)).astype(np.float32))
    array = open_dataset(path)
    store = FieldStore(array, FieldScaler.fit(array, "centered"), preload=False)
    order = [torch.tensor([3, 1, 3]), torch.tensor([0, 19]), torch.tensor([7, 5, 6, 2])]    # repeats, unsorted
    direct = [store.get(i) for i in order]
    for depth in (0, 1, 3):
        streamed = [store.finish(h) for h in prefetch(store.read, order, depth)]
        assert all(torch.equal(a, b) for a, b in zip(direct, streamed)) and len(streamed) == 3
    np.testing.assert_array_equal(direct[0][0].numpy(), direct[0][2].numpy())


def test_a_read_error_surfaces_at_its_batch_and_an_early_stop_ends_the_thread():
    import threading

    def read(i):
        if i == 3:
            raise OSError("disk gone")
        return i * 10
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for value in prefetch(read, range(6), depth=2):
            got.append(value)
    assert got == [0, 10, 20]
    calls = []

    def slow(i):
        calls.append(i)
        return i
    stream = prefetch(slow, range(1000), depth=2)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()                                   # the consumer stops: so does the reader
    assert not any(t.name == "simulgen-prefetch" for t in threading.enumerate())
    assert len(calls) <= 2 + 2 + 1                   # at most `depth` ahead (plus the one being read)
