"""The classical baselines (modules/baseline.py) on small real parametric families."""
import numpy as np
import pytest

from modules.baseline import POD, classical_baselines, relative_l2
from modules.cond_inputs import ImageFeatures


def family(params: np.ndarray, t: int = 12, n: int = 40) -> np.ndarray:
    """A smooth transient field per parameter row (a, b, c): a travelling, decaying bump."""
    time = np.linspace(0, 1, t)[:, None]
    x = np.linspace(0, 1, n)[None]
    a, b, c = (params[:, i, None, None] for i in range(3))
    return 20 + a * np.exp(-((x - 0.3 - 0.4 * b * time) ** 2) / (0.02 + 0.05 * c)) * (1 - 0.5 * time)


def test_relative_l2_is_per_run():
    true = np.ones((3, 4, 5))
    pred = true.copy()
    pred[1] *= 1.5
    np.testing.assert_allclose(relative_l2(pred, true), [0.0, 0.5, 0.0])
    np.testing.assert_allclose(relative_l2(np.zeros_like(true), true), 1.0)


def test_relative_l2_of_stacked_fields_weighs_each_field_alike():
    """Temperature (~300) and displacement (~1e-5) stacked as two node blocks: each field's relative error
    counts, not the larger units'."""
    rng = np.random.default_rng(3)
    true = np.concatenate([300 + rng.normal(size=(4, 3, 5)), 1e-5 * rng.normal(size=(4, 3, 5))], axis=2)
    pred = true.copy()
    pred[:, :, 5:] *= 2.0                                               # the displacement wrong by its own size
    np.testing.assert_allclose(relative_l2(pred, true, blocks=2), 0.5, rtol=1e-12)
    assert relative_l2(pred, true).max() < 1e-7                          # one block: the temperature hides it


def test_pod_keeps_the_modes_holding_the_energy_and_projects_exactly():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(60, 3)))[0].T                  # 3 orthonormal rows
    coeff = rng.normal(size=(30, 3)) * [10.0, 3.0, 1.0]
    fields = (5.0 + coeff @ basis).reshape(30, 6, 10)
    pod = POD.fit(fields)
    assert len(pod.sigma) == 3                                           # rank 3 after centring
    test = (5.0 + rng.normal(size=(4, 3)) @ basis).reshape(4, 6, 10)
    np.testing.assert_allclose(pod.reconstruct(pod.coefficients(test), (6, 10)), test, atol=1e-9)
    assert len(POD.fit(fields, energy=0.5).sigma) == 1                   # the first mode holds > 50 %


def test_pod_gpr_and_rbf_learn_a_smooth_family_far_better_than_the_mean():
    rng = np.random.default_rng(1)
    train_p, test_p = rng.uniform(0.5, 1.5, (60, 3)), rng.uniform(0.6, 1.4, (10, 3))
    train, test = family(train_p), family(test_p)
    result = classical_baselines(train, test, train_p, test_p)
    mean, gpr, rbf, floor = (result.mean(k) for k in ("mean", "pod_gpr", "pod_rbf", "pod_floor"))
    assert floor < gpr and floor < rbf
    assert gpr < 0.1 * mean and rbf < 0.2 * mean
    # the regression really uses the inputs: shuffled inputs lose the relation
    shuffled = classical_baselines(train, test, train_p[rng.permutation(60)], test_p, methods=("pod_gpr",))
    assert shuffled.mean("pod_gpr") > 5 * gpr


def discs(centres, radii, greys, size=128, strip_greys=None):
    """Anti-aliased discs on black in a fixed white frame; optionally a fixed strip whose grey varies."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    images = []
    for i, ((cx, cy), r, g) in enumerate(zip(centres, radii, greys)):
        inside = np.clip(0.5 - (np.hypot(xx - cx, yy - cy) - r) * size, 0, 1)
        img = g * inside
        if strip_greys is not None:
            img[80:112, 6:10] = strip_greys[i]
        img[:2], img[-2:], img[:, :2], img[:, -2:] = 1.0, 1.0, 1.0, 1.0
        images.append(img)
    return np.stack(images).astype(np.float32)


def test_image_features_keep_where_a_shape_is_apart_from_how_bright_it_is():
    """The frame (the same in every picture) is dropped; the same disc drawn in another grey level
    keeps its shape's moments, and its intensity scales with the grey level."""
    rng = np.random.default_rng(2)
    centres, radii, greys = rng.uniform(0.3, 0.7, (12, 2)), rng.uniform(0.08, 0.16, 12), rng.uniform(0.3, 1.0, 12)
    images = discs(centres, radii, greys)
    features = ImageFeatures.fit(images, np.arange(10))
    feats = features.transform(images)
    assert feats.shape == (12, ImageFeatures.count(10)) == (12, 15)
    name = {n: i for i, n in enumerate(features.names())}
    for prefix in ("intensity ", "shape "):
        np.testing.assert_allclose(feats[:, name[prefix + "centroid x"]], centres[:, 0], atol=2e-3)
        np.testing.assert_allclose(feats[:, name[prefix + "centroid y"]], centres[:, 1], atol=2e-3)
    np.testing.assert_allclose(feats[:, name["intensity spread in x"]], radii ** 2 / 4, rtol=0.05)
    np.testing.assert_allclose(feats[:, name["total intensity"]], greys * np.pi * radii ** 2, rtol=0.03)
    assert np.corrcoef(feats[:, name["shape area"]], radii ** 2)[0, 1] > 0.999
    # the same discs in another grey level
    other = rng.uniform(0.3, 1.0, 12)
    again = features.transform(discs(centres, radii, other))
    for n in ("shape area", "shape spread in x", "shape spread in y"):      # only anti-aliased edge pixels move
        np.testing.assert_allclose(again[:, name[n]], feats[:, name[n]], rtol=0.05)
    for n in ("shape centroid x", "shape centroid y"):
        np.testing.assert_allclose(again[:, name[n]], feats[:, name[n]], atol=2e-3)
    np.testing.assert_allclose(again[:, name["total intensity"]] / feats[:, name["total intensity"]],
                               other / greys, rtol=1e-5)
    np.testing.assert_allclose(again[:, name["mean intensity over the shape"]] / other,
                               feats[:, name["mean intensity over the shape"]] / greys, rtol=0.02)


def test_image_features_read_black_on_white_as_white_on_black_and_ignore_fixed_parts():
    rng = np.random.default_rng(7)
    centres, radii, greys = rng.uniform(0.3, 0.7, (12, 2)), rng.uniform(0.08, 0.16, 12), rng.uniform(0.3, 1.0, 12)
    plain = discs(centres, radii, greys)
    train = np.arange(10)
    reference = ImageFeatures.fit(plain, train).transform(plain)
    inverted = 1.0 - plain
    flipped = ImageFeatures.fit(inverted, train).transform(inverted)
    moments = ImageFeatures.count(10, components=0)
    np.testing.assert_allclose(flipped[:, :moments], reference[:, :moments], atol=1e-6)
    np.testing.assert_allclose(np.abs(flipped[:, moments:]), np.abs(reference[:, moments:]), atol=1e-5)  # PCA's sign
    # a part drawn in the same place in every picture, in a grey that varies: the shape's moments
    # stay the disc's, the intensity counts the part
    strips = rng.uniform(0.4, 0.9, 12)
    marked = discs(centres, radii, greys, strip_greys=strips)
    features = ImageFeatures.fit(marked, train)
    feats = features.transform(marked)
    shape = [i for i, n in enumerate(features.names()) if n.startswith("shape") or n.startswith("mean intensity")]
    np.testing.assert_allclose(feats[:, shape], reference[:, shape], atol=1e-6)
    total = features.names().index("total intensity")
    np.testing.assert_allclose(feats[:, total] - reference[:, total], strips * 128 / 128 ** 2, rtol=1e-5)


def test_image_features_refuse_other_sizes_and_an_earlier_version():
    from modules.errors import UserError
    images = discs(np.full((4, 2), 0.5), np.linspace(0.1, 0.15, 4), np.ones(4))
    features = ImageFeatures.fit(images, np.arange(4))
    with pytest.raises(UserError, match="64×64 pixels, but .* fitted on 128×128"):
        features.transform(images[:, ::2, ::2])
    old = {k: v for k, v in features.state_dict().items() if k in ("mean", "modes")}
    with pytest.raises(UserError, match="scalers.npz holds picture features of an earlier version"):
        ImageFeatures.from_state_dict(old, "scalers.npz")
    again = ImageFeatures.from_state_dict(features.state_dict(), "scalers.npz")
    np.testing.assert_array_equal(again.transform(images), features.transform(images))


def test_pod_gpr_on_picture_features_learns_a_geometry_driven_field():
    """Pictures of a disc whose position sets the field: the features carry it to the GPR. The discs
    are black and white, so their intensity and shape moments coincide: POD + RBF must still solve."""
    rng = np.random.default_rng(3)
    size = 48
    yy, xx = np.mgrid[0:size, 0:size] / size
    params = rng.uniform(0.5, 1.5, (50, 3))
    images = np.stack([(((xx - 0.2 - 0.4 * (a - 0.5)) ** 2 + (yy - 0.2 - 0.4 * (b - 0.5)) ** 2) < 0.005 * (1 + c))
                       for a, b, c in params]).astype(np.float32)
    fields = family(params)
    train, test = np.arange(40), np.arange(40, 50)
    feats = ImageFeatures.fit(images, train).transform(images)
    result = classical_baselines(fields[train], fields[test], feats[train], feats[test])
    assert result.mean("pod_gpr") < 0.3 * result.mean("mean")
    assert result.mean("pod_rbf") < 0.5 * result.mean("mean")


@pytest.mark.parametrize("energy", [0.9, 0.999])
def test_more_energy_keeps_more_modes(energy):
    rng = np.random.default_rng(4)
    fields = family(rng.uniform(0.5, 1.5, (40, 3)))
    assert len(POD.fit(fields, energy=energy).sigma) <= len(POD.fit(fields, energy=0.99999).sigma)


def test_leave_one_out_projection_errors_equal_a_pod_of_the_other_runs():
    """From the Gram matrix alone: each run's error after projection onto the mean and k leading
    POD modes of the other runs, as POD.fit on those runs computes it."""
    from modules.baseline import loo_projection_errors
    rng = np.random.default_rng(5)
    fields = family(rng.uniform(0.5, 1.5, size=(14, 3))) + 0.01 * rng.normal(size=(14, 12, 40))
    flat = fields.reshape(14, -1)
    errors = loo_projection_errors(flat @ flat.T, 3)
    for j in range(14):
        pod = POD.fit(np.delete(fields, j, axis=0), energy=1.0, max_modes=3)
        assert len(pod.sigma) == 3
        recon = pod.reconstruct(pod.coefficients(fields[j:j + 1]), fields.shape[1:])
        assert errors[j] == pytest.approx(relative_l2(recon, fields[j:j + 1])[0], rel=1e-6)
    more = loo_projection_errors(flat @ flat.T, 6)
    assert (more < errors).all()                                        # more modes, less left out
    every = loo_projection_errors(flat @ flat.T, 40)                    # more modes than the others span
    assert np.isfinite(every).all() and (every <= more).all() and (every > 0).all()


def test_the_gp_kernel_family_is_chosen_by_cross_validation():
    """Fields whose mode coefficients are a linear trend with a small wiggle are the linear term's;
    coefficients with kinks are the Matérn's (the RBF's smoothness rounds them); too few runs to
    cross-validate keep the RBF. The scores are the held-out runs' mean relative L2."""
    from modules.baseline import choose_kernel
    from modules.gp import KERNELS
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(30, 3))
    shapes = np.linalg.qr(rng.normal(size=(50, 2)))[0].T                 # 2 orthonormal spatial patterns

    def fields(c: np.ndarray) -> np.ndarray:
        return 4.0 + c @ shapes

    trend = np.column_stack([x @ [1.0, -2.0, 0.5] + 0.05 * np.sin(9 * x[:, 0]), x @ [0.5, 1.0, -1.0]])
    kinks = np.column_stack([np.abs(x[:, 0] - 0.5) + 0.5 * np.abs(x[:, 1] - 0.3), np.abs(x[:, 2] - 0.4)])
    kernel, scores = choose_kernel(fields(trend), x, modes=2, seed=0)
    assert kernel == "rbf+linear" and set(scores) == set(KERNELS)
    assert scores["rbf+linear"] < 0.1 * scores["rbf"]
    kernel, scores = choose_kernel(fields(kinks), x, modes=2, seed=0)
    assert kernel == "matern52" and scores["matern52"] < 0.9 * min(scores["rbf"], scores["rbf+linear"])
    assert 0 < scores["matern52"] < 0.1                                  # a relative error of the fields
    assert choose_kernel(fields(trend)[:9], x[:9], modes=2, seed=0) == ("rbf", {})
