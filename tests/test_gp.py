"""Gaussian-process regression (modules/gp.py): the closed-form posterior against
scikit-learn's, the torch conditioner against the numpy posterior, and the two-start fit."""
import numpy as np
import pytest
import torch
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

from modules.conditioners import ConditionerArchitecture
from modules.gp import KERNELS, GPConditioner, GPHyper, GPPosterior, fit_hyperparameters


def smooth(x: np.ndarray) -> np.ndarray:
    return np.sin(6 * x[:, 0]) + x[:, 1] ** 2


def test_posterior_equals_scikit_learn_for_the_same_kernel():
    rng = np.random.default_rng(0)
    x, x_new = rng.uniform(size=(30, 2)), rng.uniform(size=(7, 2))
    y = np.column_stack([smooth(x), 5 + 3 * x[:, 1]])
    hyper = GPHyper(np.array([1.7, 0.4]), np.array([[0.3, 0.8], [2.0, 0.5]]), np.array([1e-3, 1e-2]))
    mean, std = GPPosterior.condition(hyper, x, y).predict(x_new)
    for j in range(2):
        kernel = (ConstantKernel(hyper.amplitude[j], "fixed") * RBF(hyper.length[j], "fixed")
                  + WhiteKernel(hyper.noise[j], "fixed"))
        ref = GaussianProcessRegressor(kernel, normalize_y=True, optimizer=None).fit(x, y[:, j])
        ref_mean, ref_std = ref.predict(x_new, return_std=True)
        np.testing.assert_allclose(mean[:, j], ref_mean, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(std[:, j], ref_std, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kernel", ["matern52", "rbf+linear"])
def test_other_kernel_families_equal_scikit_learns(kernel):
    from sklearn.gaussian_process.kernels import DotProduct, Matern
    rng = np.random.default_rng(5)
    x, x_new = rng.uniform(2, 6, size=(30, 2)), rng.uniform(1, 7, size=(7, 2))   # new inputs also outside the box
    y = np.column_stack([smooth(x / 4), 5 + 3 * x[:, 1]])
    centre, span = np.array([4.0, 3.5]), np.array([4.0, 2.0])
    linear = np.array([[0.3, 0.5], [2.0, 0.1]]) if kernel == "rbf+linear" else None
    hyper = GPHyper(np.array([1.7, 0.4]), np.array([[0.3, 0.8], [2.0, 0.5]]), np.array([1e-3, 1e-2]), kernel,
                    linear, centre if linear is not None else None, span if linear is not None else None)
    mean, std = GPPosterior.condition(hyper, x, y).predict(x_new)
    u, u_new = (x - centre) / span, (x_new - centre) / span         # sklearn's dot product works about 0
    for j in range(2):
        amp, length = ConstantKernel(hyper.amplitude[j], "fixed"), hyper.length[j] / span
        if kernel == "matern52":
            signal = amp * Matern(length, "fixed", nu=2.5)
        else:
            signal = (amp * RBF(length, "fixed")
                      + ConstantKernel(linear[j, 0], "fixed") * DotProduct(np.sqrt(linear[j, 1]), "fixed"))
        ref = GaussianProcessRegressor(signal + WhiteKernel(hyper.noise[j], "fixed"), normalize_y=True,
                                       optimizer=None).fit(u, y[:, j])
        ref_mean, ref_std = ref.predict(u_new, return_std=True)
        np.testing.assert_allclose(mean[:, j], ref_mean, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(std[:, j], ref_std, rtol=1e-6, atol=1e-9)


def _arch(num_runs: int) -> ConditionerArchitecture:
    return ConditionerArchitecture("csvs", num_param=3, latent_dim_end=4, latent_dim=3, num_levels=2, model="gp",
                                   num_runs=num_runs)


@pytest.mark.parametrize("kernel", ["rbf", "rbf+linear", "matern52"])
def test_torch_conditioner_evaluates_the_posterior_and_splits_main_and_levels(kernel):
    rng = np.random.default_rng(1)
    offset = np.array([1.0, -0.5, 2.0])          # a box off the origin: the linear term is about its middle
    x, x_new = rng.uniform(-0.9, 0.9, size=(25, 3)) + offset, rng.uniform(-0.9, 0.9, size=(6, 3)) + offset
    y = rng.normal(size=(25, 4 + 2 * 3)) + 3 * x[:, :1]
    post = GPPosterior.condition(fit_hyperparameters(x, y, seed=0, restarts=0, kernel=kernel), x, y)
    assert post.hyper.kernel == kernel and (post.hyper.linear is not None) == (kernel == "rbf+linear")
    module = GPConditioner(_arch(25)).set_posterior(post)
    mean, std = module.predict(torch.from_numpy(x_new).float())
    ref_mean, ref_std = post.predict(x_new.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(std.numpy(), ref_std, rtol=1e-7, atol=1e-10)
    main, hier = module(torch.from_numpy(x_new).float())
    assert main.shape == (6, 4) and hier.shape == (6, 2, 3) and main.dtype == torch.float32
    np.testing.assert_allclose(hier.reshape(6, -1).numpy(), ref_mean[:, 4:], rtol=1e-5, atol=1e-6)
    # a state dict round trip is the whole model (how checkpoints carry it)
    again = GPConditioner(_arch(25))
    again.load_state_dict(module.state_dict())
    torch.testing.assert_close(again(torch.from_numpy(x_new).float())[0], main)
    with pytest.raises(ValueError, match="shape"):
        GPConditioner(_arch(24)).set_posterior(post)


def test_a_noisy_first_column_does_not_spoil_the_next_columns_fit():
    """The warm start alone carries column 0's all-noise optimum to column 1 (a smooth,
    noise-free function) and predicts its mean; the default start finds the function."""
    rng = np.random.default_rng(0)
    x, x_new = rng.uniform(size=(40, 2)), rng.uniform(0.1, 0.9, size=(20, 2))
    y = np.column_stack([rng.normal(size=40), smooth(x)])
    hyper = fit_hyperparameters(x, y, seed=0)
    mean, _ = GPPosterior.condition(hyper, x, y).predict(x_new)
    truth = smooth(x_new)
    error = np.abs(mean[:, 1] - truth).max()
    assert error < 0.05 * np.ptp(truth)
    assert hyper.noise[0] > 0.5 and hyper.noise[1] < 1e-3            # noise found where it is, not elsewhere
    warm_only = GPHyper(hyper.amplitude[[0, 0]], hyper.length[[0, 0]], hyper.noise[[0, 0]])
    stuck, _ = GPPosterior.condition(warm_only, x, y).predict(x_new)
    assert np.abs(stuck[:, 1] - truth).max() > 10 * error          # what the test guards against


def test_the_noise_floor_keeps_the_fit_from_interpolating():
    """Noise-free smooth data: the free fit takes almost no noise, the floored one sits at its floor."""
    x = np.random.default_rng(3).uniform(size=(40, 2))
    y = smooth(x)[:, None]
    assert fit_hyperparameters(x, y, seed=0).noise[0] < 1e-3
    assert fit_hyperparameters(x, y, seed=0, min_noise=0.05).noise[0] == pytest.approx(0.05)


def test_leave_one_out_residuals_equal_conditioning_on_the_other_runs():
    """The closed form αᵢ/[K⁻¹]ᵢᵢ is the residual of run i under the posterior conditioned on the
    other runs (same kernel, same standardisation), for every run and column."""
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(15, 2))
    y = np.column_stack([smooth(x), 2 - x[:, 0]]) + 0.01 * rng.normal(size=(15, 2))
    hyper = GPHyper(np.array([1.3, 0.7]), np.array([[0.3, 0.5], [0.8, 0.4]]), np.array([1e-3, 1e-2]))
    post = GPPosterior.condition(hyper, x, y)
    loo = post.loo_residuals()
    for j in range(2):
        z = (y[:, j] - post.y_mean[j]) / post.y_std[j]
        d = (x[:, None] - x[None]) / hyper.length[j]
        k = hyper.amplitude[j] * np.exp(-0.5 * (d * d).sum(-1)) + (hyper.noise[j] + 1e-10) * np.eye(15)
        for i in range(15):
            o = np.delete(np.arange(15), i)
            mu = k[i, o] @ np.linalg.solve(k[np.ix_(o, o)], z[o])
            assert loo[i, j] == pytest.approx((z[i] - mu) * post.y_std[j], rel=1e-7, abs=1e-12)


def test_difficulty_model_is_off_until_set_and_then_predicts_the_exponentiated_gp():
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(12, 3))
    arch = ConditionerArchitecture(input_type="csvs", model="gp", num_param=3, num_runs=12, latent_dim_end=2,
                                   latent_dim=1, num_levels=1)
    gp = GPConditioner(arch).set_posterior(GPPosterior.condition(
        GPHyper(np.ones(3), np.full((3, 3), 0.5), np.full(3, 1e-4)), x, rng.normal(size=(12, 3))))
    x_new = torch.from_numpy(rng.uniform(size=(5, 3)))
    assert torch.equal(gp.difficulty(x_new), torch.zeros(5, dtype=torch.float64))
    log_err = np.log(0.01 + x[:, :1])
    post = GPPosterior.condition(GPHyper(np.ones(1), np.full((1, 3), 0.7), np.full(1, 1e-3)), x, log_err)
    gp.set_difficulty(post)
    np.testing.assert_allclose(gp.difficulty(x_new).numpy(), np.exp(post.predict(x_new.numpy())[0][:, 0]), rtol=1e-10)
    with pytest.raises(ValueError, match="latents' inputs"):
        gp.set_difficulty(GPPosterior.condition(post.hyper, x + 1, log_err))
    old = {k: v for k, v in gp.state_dict().items() if not k.startswith(("difficulty_", "matern", "linear"))}
    fresh = GPConditioner(arch)
    fresh.load_state_dict(fresh.with_defaults(old))     # a checkpoint from before the model and the kernel families
    assert torch.equal(fresh.difficulty(x_new), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(fresh.predict(x_new)[0], gp.predict(x_new)[0])


def test_the_fit_does_not_depend_on_how_the_inputs_are_scaled():
    """The optimiser works in the inputs' own box: inputs in other units (here a thousandth, below
    the kernel's length-scale bound if taken as they are) give the same kernels, in those units,
    and the same predictions."""
    rng = np.random.default_rng(4)
    x, x_new = rng.uniform(size=(40, 2)), rng.uniform(0.1, 0.9, size=(20, 2))
    y = smooth(x)[:, None]
    hyper = fit_hyperparameters(x, y, seed=0)
    small = fit_hyperparameters(x * 1e-3 - 2.0, y, seed=0)
    np.testing.assert_allclose(small.length, hyper.length * 1e-3, rtol=0.01)     # the optimiser's tolerance
    mean, std = GPPosterior.condition(hyper, x, y).predict(x_new)
    mean_small, std_small = GPPosterior.condition(small, x * 1e-3 - 2.0, y).predict(x_new * 1e-3 - 2.0)
    np.testing.assert_allclose(mean_small, mean, atol=1e-4 * np.ptp(y))
    np.testing.assert_allclose(std_small, std, rtol=0.05, atol=1e-4 * np.ptp(y))
    assert np.abs(mean[:, 0] - smooth(x_new)).max() < 0.05 * np.ptp(smooth(x_new))


@pytest.mark.parametrize("kernel", KERNELS)
def test_an_input_that_never_varies_is_left_out_of_the_fit(kernel):
    """A parameter column with one value in every run: the kernels of the other columns are those fitted
    without it (no restart is drawn for it), and it has no influence on a prediction."""
    rng = np.random.default_rng(8)
    x, x_new = rng.uniform(size=(30, 2)), rng.uniform(0.1, 0.9, size=(6, 2))
    y = np.stack([smooth(x), smooth(x[:, ::-1])], 1)
    hyper = fit_hyperparameters(x, y, seed=0, kernel=kernel)
    with_constant = fit_hyperparameters(np.insert(x, 1, 0.25, axis=1), y, seed=0, kernel=kernel)
    np.testing.assert_allclose(with_constant.length[:, [0, 2]], hyper.length, rtol=1e-3)     # the optimiser's tolerance
    assert (with_constant.length[:, 1] == 1e3).all()
    mean = GPPosterior.condition(hyper, x, y).predict(x_new)[0]
    post = GPPosterior.condition(with_constant, np.insert(x, 1, 0.25, axis=1), y)
    np.testing.assert_allclose(post.predict(np.insert(x_new, 1, 0.25, axis=1))[0], mean, rtol=1e-4, atol=1e-6)


def test_above_max_rows_the_kernels_come_from_a_subset_and_the_gp_conditions_on_every_row():
    """Large studies: the kernels are fitted on a seeded subset of `max_rows` rows (the fit is
    O(n³) per optimiser step), and the posterior still uses every row, so it predicts better than
    the same kernels conditioned on the subset alone."""
    rng = np.random.default_rng(5)
    x, x_new = rng.uniform(size=(120, 2)), rng.uniform(0.1, 0.9, size=(50, 2))
    y = smooth(x)[:, None]
    capped = fit_hyperparameters(x, y, seed=0, max_rows=30)
    assert fit_hyperparameters(x, y, seed=0, max_rows=30).length.tolist() == capped.length.tolist()   # seeded
    rows = np.sort(np.random.default_rng(0).choice(len(x), 30, replace=False))
    on_subset = fit_hyperparameters(x[rows], y[rows], seed=0)
    np.testing.assert_allclose(capped.length, on_subset.length, rtol=1e-12)
    assert not np.allclose(capped.length, fit_hyperparameters(x, y, seed=0).length, rtol=1e-3)
    error = {name: np.abs(GPPosterior.condition(capped, xs, ys).predict(x_new)[0][:, 0] - smooth(x_new)).mean()
             for name, xs, ys in (("all", x, y), ("subset", x[rows], y[rows]))}
    assert error["all"] < 0.5 * error["subset"], error
