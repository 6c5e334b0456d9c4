"""Batched augmentations: each one checked for what it does to every sample of a real batch."""

from __future__ import annotations

import pytest
import torch

from modules.augment import ConditionerAugmentation, SeriesAugmentation, stretch_copy

OFF = dict(noise_prob=0.0, scale_prob=0.0, shift_prob=0.0, mixup_prob=0.0, cutout_prob=0.0)


def only(**kwargs) -> SeriesAugmentation:
    return SeriesAugmentation(**{**OFF, **kwargs})


def series(b=32, n=6, t=40, seed=0, dtype=torch.float32) -> torch.Tensor:
    """(B, N, T) runs with no zeros and no two samples alike."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, t, generator=g, dtype=torch.float64) + 0.5).to(dtype)


# -----------------------------------------------------------------------------
# SeriesAugmentation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_series_keeps_shape_and_dtype_and_never_writes_the_input(dtype):
    torch.manual_seed(0)
    x = series(dtype=dtype)
    before = x.clone()
    aug = SeriesAugmentation(noise_prob=1, scale_prob=1, shift_prob=1, mixup_prob=1, cutout_prob=1)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(x, before)
    assert not torch.equal(y, x)
    y = SeriesAugmentation()(x)                           # the defaults
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("which", ["noise_prob", "scale_prob", "shift_prob", "mixup_prob", "cutout_prob"])
def test_series_each_augmentation_leaves_the_input_tensor_alone(which):
    torch.manual_seed(0)
    x = series()
    before = x.clone()
    y = only(**{which: 1.0})(x)
    assert torch.equal(x, before)
    assert not torch.equal(y, x)


def test_series_all_probabilities_zero_is_identity():
    torch.manual_seed(0)
    x = series()
    assert torch.equal(only()(x), x)


def test_series_noise_residual_std_is_the_noise_level():
    torch.manual_seed(0)
    x = series(b=64, n=16, t=64)
    y = only(noise_prob=1.0, noise_level=0.03)(x)
    residual = y - x
    assert residual.std().item() == pytest.approx(0.03, rel=0.03)
    assert residual.mean().abs().item() < 1e-3
    per_sample = residual.flatten(1).std(dim=1)
    assert (per_sample > 0.02).all()                     # every sample got noise


def test_series_probability_is_per_sample():
    torch.manual_seed(0)
    x = series(b=4000, n=2, t=8)
    y = only(noise_prob=0.3)(x)
    changed = (y != x).flatten(1).any(dim=1).float()
    assert changed.mean().item() == pytest.approx(0.3, abs=0.03)
    # a sample is either untouched or noisy everywhere
    assert torch.equal((y != x).flatten(1).all(dim=1), changed.bool())


def test_series_scaling_gives_one_ratio_per_sample_within_bounds():
    torch.manual_seed(0)
    x = series(b=64)
    y = only(scale_prob=1.0, scale_min=0.9, scale_max=1.1)(x)
    ratio = (y / x).flatten(1)                           # (B, N*T)
    per_sample = ratio[:, :1]
    torch.testing.assert_close(ratio, per_sample.expand_as(ratio))
    assert (per_sample >= 0.9 - 1e-6).all() and (per_sample <= 1.1 + 1e-6).all()
    assert per_sample.std() > 0.01                       # not one factor for the whole batch


def test_series_shift_rolls_each_sample_in_time_within_the_limit():
    torch.manual_seed(0)
    b, t = 64, 40
    x = series(b=b, t=t)
    y = only(shift_prob=1.0, shift_max=0.1)(x)
    largest = int(0.1 * t)
    found = []
    for i in range(b):
        shifts = [s for s in range(-largest, largest + 1) if torch.equal(y[i], torch.roll(x[i], s, dims=-1))]
        assert shifts, f"sample {i} is not a time roll of its input by at most {largest} steps"
        found.append(shifts[0])
    assert len(set(found)) > 3                           # shifts differ between samples


def test_series_mixup_is_a_convex_combination_with_another_sample():
    torch.manual_seed(0)
    b = 32
    x = series(b=b).double()
    y = only(mixup_prob=1.0, mixup_alpha=0.2)(x)
    flat_x, flat_y = x.flatten(1), y.flatten(1)
    lams, mixed = [], 0
    for i in range(b):
        if torch.allclose(flat_y[i], flat_x[i]):
            continue                                     # partner is itself: still its own sample
        best = None
        for j in range(b):
            if j == i:
                continue
            d = flat_x[i] - flat_x[j]
            lam = torch.dot(flat_y[i] - flat_x[j], d) / torch.dot(d, d)
            err = (flat_y[i] - (lam * flat_x[i] + (1 - lam) * flat_x[j])).abs().max()
            if best is None or err < best[0]:
                best = (err.item(), lam.item())
        assert best[0] < 1e-9, f"sample {i} is not a mix of itself and one other sample"
        lams.append(best[1])
        mixed += 1
    assert mixed >= b - 3
    assert all(0.1 - 1e-9 <= lam <= 0.9 + 1e-9 for lam in lams), lams


def test_series_cutout_zeroes_one_contiguous_window_per_sample():
    torch.manual_seed(0)
    b, t = 64, 50
    x = series(b=b, t=t)
    y = only(cutout_prob=1.0, cutout_max=0.1)(x)
    longest = int(0.1 * t)
    zero = y == 0                                        # (B, N, T); x has no zeros
    assert torch.equal(y[~zero], x[~zero])               # the rest is untouched
    for i in range(b):
        cols = zero[i].all(dim=0)                        # a window covers every node
        assert torch.equal(zero[i], cols.expand_as(zero[i]))
        steps = torch.nonzero(cols).flatten()
        assert 1 <= len(steps) <= longest, (i, steps)
        assert steps[-1] - steps[0] + 1 == len(steps)    # contiguous


def test_stretch_copy_is_deterministic_and_differs_from_input():
    x = series(b=4, t=30)
    before = x.clone()
    a = stretch_copy(x, torch.Generator().manual_seed(7))
    b = stretch_copy(x, torch.Generator().manual_seed(7))
    c = stretch_copy(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(x, before)
    assert not torch.allclose(a, x, atol=1e-3)
    # each copy is a time roll (≤ 10 % of the steps) plus noise of std noise_level
    for i in range(4):
        residuals = [(a[i] - torch.roll(x[i], s, dims=-1)).std().item() for s in range(-3, 4)]
        assert min(residuals) == pytest.approx(0.03, rel=0.25)


# -----------------------------------------------------------------------------
# ConditionerAugmentation

LC_OFF = dict(mixup_prob=0.0, noise_prob=0.0, image_prob=0.0)


def linear_batch(b=64, p=5, levels=3, dim=8, seed=0):
    """Inputs x and targets that are affine functions of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, p, generator=g, dtype=torch.float64)
    a1, c1 = torch.randn(p, 32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    a2, c2 = (torch.randn(p, levels * dim, generator=g, dtype=torch.float64),
              torch.randn(levels * dim, generator=g, dtype=torch.float64))

    def targets(inp):
        return inp @ a1 + c1, (inp @ a2 + c2).view(-1, levels, dim)   # (B, 32), (B, L, D)

    return x, targets


def images(b=8, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g)                        # (B, 1, H, W)


def test_conditioner_all_probabilities_zero_returns_the_batch_unchanged():
    torch.manual_seed(0)
    aug = ConditionerAugmentation(**LC_OFF)
    x, targets = linear_batch()
    y_main, y_hier = targets(x)
    out = aug((x, y_main, y_hier))
    assert len(out) == 3
    for a, b in zip(out, (x, y_main, y_hier)):
        assert torch.equal(a, b)
    img = images()
    assert torch.equal(aug((img, y_main[:8]))[0], img)


def test_conditioner_mixup_uses_the_same_lambda_and_partner_for_inputs_and_targets():
    torch.manual_seed(0)
    x, targets = linear_batch()
    y_main, y_hier = targets(x)
    before = [t.clone() for t in (x, y_main, y_hier)]
    xm, ym, yh = ConditionerAugmentation(**{**LC_OFF, "mixup_prob": 1.0})((x, y_main, y_hier))
    assert not torch.allclose(xm, x)                      # it did mix
    main_again, hier_again = targets(xm)
    torch.testing.assert_close(ym, main_again)            # still y = f(x) after mixing
    torch.testing.assert_close(yh, hier_again)
    for t, b in zip((x, y_main, y_hier), before):
        assert torch.equal(t, b)
    # mixed inputs stay inside the box spanned by the batch (convex combinations)
    assert (xm >= x.min(0).values - 1e-12).all() and (xm <= x.max(0).values + 1e-12).all()


def test_conditioner_input_noise_leaves_targets_alone():
    torch.manual_seed(0)
    x, targets = linear_batch()
    y_main, y_hier = targets(x)
    xn, ym, yh = ConditionerAugmentation(**{**LC_OFF, "noise_prob": 1.0, "noise": 0.01})((x, y_main, y_hier))
    assert (xn - x).std().item() == pytest.approx(0.01, rel=0.2)
    assert torch.equal(ym, y_main) and torch.equal(yh, y_hier)


def candidates(img: torch.Tensor) -> list[torch.Tensor]:
    """The 9 × 2 outline-safe versions of one (1, H, W) image, compared on the interior only
    (so the test does not depend on how the border row/column is filled)."""
    out = []
    for flipped in (img, img.flip(-1)):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out.append(torch.roll(flipped, (dy, dx), dims=(-2, -1))[..., 1:-1, 1:-1])
    return out


def match(aug_img: torch.Tensor, img: torch.Tensor) -> int | None:
    inner = aug_img[..., 1:-1, 1:-1]
    for k, cand in enumerate(candidates(img)):
        if torch.equal(inner, cand):
            return k
    return None


def test_image_augmentation_flips_horizontally_and_shifts_at_most_one_pixel():
    torch.manual_seed(0)
    x = images(b=200)
    y = torch.zeros(200, 4)
    aug = ConditionerAugmentation(**{**LC_OFF, "image_prob": 1.0, "flip_prob": 0.5})
    out, y_out = aug((x, y))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(y_out, y)
    seen = []
    for i in range(len(x)):
        k = match(out[i], x[i])
        assert k is not None, f"image {i} is not a horizontal flip / ±1-px shift of its input"
        seen.append(k)
    assert any(k >= 9 for k in seen) and any(k < 9 for k in seen)    # flipped and not flipped
    assert len({k % 9 for k in seen}) == 9                           # every shift occurs


def test_image_augmentation_without_flips_never_flips():
    torch.manual_seed(0)
    x = images(b=100)
    out, = ConditionerAugmentation(**{**LC_OFF, "image_prob": 1.0, "flip_prob": 0.0})((x,))
    for i in range(len(x)):
        k = match(out[i], x[i])
        assert k is not None and k < 9


def test_image_augmentation_leaves_vectors_alone():
    torch.manual_seed(0)
    x, targets = linear_batch()
    out = ConditionerAugmentation(**{**LC_OFF, "image_prob": 1.0, "flip_prob": 1.0})((x, *targets(x)))
    assert torch.equal(out[0], x)
