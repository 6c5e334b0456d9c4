"""Gaussian-process regression, one independent GP per output column: the classical
baseline's regression (modules/baseline.py) and the default conditioner (CSV parameters or
picture features).

Hyperparameters (constant × ARD-RBF + white noise, on standardised targets; `gp_kernel` also
offers the RBF plus a linear term and the ARD-Matérn 5/2) are fitted by scikit-learn's
marginal-likelihood optimiser. The posterior itself is computed here in
closed form, so the fitted model is a handful of arrays: the conditioner evaluates it in
torch (on any device, in a checkpoint like any other conditioner) without pickling
scikit-learn objects.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from modules.progress import Ticker

if TYPE_CHECKING:                   # built by ConditionerArchitecture.build (modules/conditioners.py), which imports this
    from modules.conditioners import ConditionerArchitecture

JITTER = 1e-10          # scikit-learn's default `alpha`: added to the kernel's diagonal
FIT_MAX_RUNS = 500      # kernels are fitted on at most this many rows (a seeded subset); the GP is still
                        # conditioned on all of them: the fit costs O(n³) per optimiser step and column


MIN_LENGTH = 0.01       # the shortest length scale, a fraction of each input's range (0.05: NOTES H29)
KERNELS = ("rbf", "rbf+linear", "matern52")     # the kernel families (`gp_kernel`; modules/baseline.py chooses)


@dataclass(frozen=True)
class GPHyper:
    amplitude: np.ndarray     # (m,) signal variance of each column (standardised units)
    length: np.ndarray        # (m, d) ARD length scales
    noise: np.ndarray         # (m,) white-noise variance
    kernel: str = "rbf"       # one of KERNELS
    # "rbf+linear": each column's linear term, variance × (bias + u·u') with u = (x − centre) / span
    linear: np.ndarray | None = None      # (m, 2) variance and bias of each column's linear term
    centre: np.ndarray | None = None      # (d,) the middle of the fitted inputs' box
    span: np.ndarray | None = None        # (d,) its extent

    def matrix(self, j: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Column j's kernel between the rows of a and b, without the white noise."""
        d = (a[:, None, :] - b[None, :, :]) / self.length[j]
        r2 = (d * d).sum(axis=-1)
        if self.kernel == "matern52":
            r = np.sqrt(5.0 * r2)
            k = self.amplitude[j] * (1.0 + r + r * r / 3.0) * np.exp(-r)
        else:
            k = self.amplitude[j] * np.exp(-0.5 * r2)
        if self.linear is not None:
            ua, ub = (a - self.centre) / self.span, (b - self.centre) / self.span
            k = k + self.linear[j, 0] * (self.linear[j, 1] + ua @ ub.T)
        return k

    def prior_variance(self, j: int, a: np.ndarray) -> np.ndarray:
        """The diagonal of `matrix(j, a, a)`."""
        var = np.full(len(a), self.amplitude[j])
        if self.linear is not None:
            var = var + self.linear[j, 0] * (self.linear[j, 1] + (((a - self.centre) / self.span) ** 2).sum(axis=1))
        return var


def fit_hyperparameters(x: np.ndarray, y: np.ndarray, seed: int, restarts: int = 2,
                        min_noise: float = 1e-10, max_rows: int = FIT_MAX_RUNS, kernel: str = "rbf",
                        shared: bool = False) -> GPHyper:
    """Maximum-marginal-likelihood kernels of the family `kernel` (KERNELS: constant × ARD-RBF,
    the same + constant × a linear kernel, or constant × ARD-Matérn 5/2; each + white noise), one
    per column of y (n, m), on inputs x (n, d); the white noise is at least `min_noise` of each
    standardised column. The optimiser works on x divided by each column's range, so its starts
    and bounds, and the kernels it finds, do not depend on how the caller scaled the inputs
    (NOTES H25). Each column's optimiser starts from
    the default kernel (with random restarts for the leading columns) and, separately, from the
    previous column's optimum; the start with the higher marginal likelihood wins. Neighbouring
    latent or POD columns vary on similar scales, so the warm start often finds the better
    optimum, but alone it carries one column's poor optimum on to all the rest
    (benchmarks/accuracy/NOTES.md). Above `max_rows` rows the kernels are fitted on a seeded
    subset of that many: at 500 rows one column's fit takes seconds, at 2,000 over a minute.

    `shared`: one kernel for all the columns, fitted to them scaled together (centred, one scale for
    all, so a column weighs by its size: the leading POD coefficients most, and the small ones cannot
    each pick a kernel that fits their noise), returned per column in each column's standardised units."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor

    if kernel not in KERNELS:
        raise ValueError(f"unknown GP kernel {kernel!r}; expected one of {KERNELS}")
    if len(x) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
        x, y = x[rows], y[rows]
    varies = np.ptp(x, axis=0) > 0
    if not varies.all():        # an input that never varies: no length scale to fit, and none to draw restarts for
        fitted = fit_hyperparameters(x[:, varies], y, seed, restarts, min_noise, max_rows, kernel, shared)
        return _with_constant_inputs(fitted, x[0], varies)
    d, m = x.shape[1], y.shape[1]
    low, span = x.min(axis=0), np.ptp(x, axis=0)
    span = np.where(span > 0, span, 1.0)
    centre = low + 0.5 * span
    x = (x - centre) / span                 # the box [-0.5, 0.5]: a linear term about its middle
    default = _default_kernel(kernel, d, min_noise)

    def fit(start, targets, tries, normalise):
        gp = GaussianProcessRegressor(start, normalize_y=normalise, n_restarts_optimizer=tries, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return gp.fit(x, targets)

    if shared:
        centred = y - y.mean(axis=0)
        unit = float(np.sqrt((centred ** 2).mean())) or 1.0
        std = np.where(y.std(axis=0) > 0, y.std(axis=0), 1.0)
        amp, length, noise, linear = _read_kernel(fit(default, centred / unit, restarts, False).kernel_, kernel, d)
        per = (unit / std) ** 2                            # the shared kernel in each column's standardised units
        amp, noise = amp * per, noise * per
        length, linear = np.tile(length, (m, 1)), np.tile(linear, (m, 1)) * np.stack([per, np.ones(m)], 1)
    else:
        amp, length, noise, linear = np.empty(m), np.empty((m, d)), np.empty(m), np.empty((m, 2))
        previous, ticker = None, Ticker(f"GP fit ({len(x)} runs)", m, "column")
        for j in range(m):
            ticker.tick(j)
            best = None
            for start, tries in ((default, restarts if j < 3 else 0), (previous, 0)):
                if start is None:
                    continue
                gp = fit(start, y[:, j], tries, True)
                if best is None or gp.log_marginal_likelihood_value_ > best.log_marginal_likelihood_value_:
                    best = gp
            previous = best.kernel_
            amp[j], length[j], noise[j], linear[j] = _read_kernel(previous, kernel, d)
    if kernel != "rbf+linear":
        return GPHyper(amp, length * span, noise, kernel)
    return GPHyper(amp, length * span, noise, kernel, linear, centre, span)


def _default_kernel(kernel: str, d: int, min_noise: float):
    """The optimiser's first start: constant × (ARD-RBF | ARD-Matérn 5/2) [+ constant × linear] + white noise."""
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, DotProduct, Matern, WhiteKernel
    bounds = (MIN_LENGTH, 1e3)
    base = Matern(np.ones(d), bounds, nu=2.5) if kernel == "matern52" else RBF(np.ones(d), bounds)
    signal = ConstantKernel(1.0, (1e-3, 1e3)) * base
    if kernel == "rbf+linear":
        signal = signal + ConstantKernel(0.1, (1e-6, 1e3)) * DotProduct(1.0, (1e-3, 1e3))
    return signal + WhiteKernel(max(1e-4, min_noise), (min_noise, 1e0))


def _read_kernel(fitted, kernel: str, d: int) -> tuple[float, np.ndarray, float, np.ndarray]:
    """(amplitude, length scales (d,), noise, (linear variance, bias)) of a kernel `_default_kernel` built."""
    stationary = fitted.k1.k1 if kernel == "rbf+linear" else fitted.k1
    linear = np.zeros(2)
    if kernel == "rbf+linear":
        linear = np.array([fitted.k1.k2.k1.constant_value, fitted.k1.k2.k2.sigma_0 ** 2])
    return (stationary.k1.constant_value, np.broadcast_to(stationary.k2.length_scale, (d,)).copy(),
            fitted.k2.noise_level, linear)


def _with_constant_inputs(fitted: GPHyper, row: np.ndarray, varies: np.ndarray) -> GPHyper:
    """`fitted` (on the inputs where `varies`) on every input of which `row` is one: a constant one gets the
    longest length scale and the linear term's centre at its value, so that it has no influence (its values
    are all one, and the input scaler maps any new value to that one)."""
    length = np.full((len(fitted.length), len(varies)), 1e3)
    length[:, varies] = fitted.length
    extent = {}
    if fitted.centre is not None:
        extent = {"centre": np.asarray(row, np.float64).copy(), "span": np.ones(len(varies))}
        extent["centre"][varies], extent["span"][varies] = fitted.centre, fitted.span
    return dataclasses.replace(fitted, length=length, **extent)


@dataclass(frozen=True)
class GPPosterior:
    """The GPs conditioned on (x, y), as arrays: everything a prediction needs."""
    x: np.ndarray             # (n, d) conditioning inputs
    hyper: GPHyper
    y_mean: np.ndarray        # (m,)
    y_std: np.ndarray         # (m,)
    alpha: np.ndarray         # (m, n)  K⁻¹ (y − mean) / std
    chol: np.ndarray          # (m, n, n) lower Cholesky factor of K

    @classmethod
    def condition(cls, hyper: GPHyper, x: np.ndarray, y: np.ndarray) -> "GPPosterior":
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        mean = y.mean(axis=0)
        std = y.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        z = (y - mean) / std
        n, m = y.shape
        alpha, chol = np.empty((m, n)), np.empty((m, n, n))
        for j in range(m):
            k = hyper.matrix(j, x, x)
            k[np.diag_indices(n)] += hyper.noise[j] + JITTER
            chol[j] = np.linalg.cholesky(k)
            alpha[j] = np.linalg.solve(chol[j].T, np.linalg.solve(chol[j], z[:, j]))
        return cls(x, hyper, mean, std, alpha, chol)

    def predict(self, x_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (of a new noisy observation), (b, m) each."""
        x_new = np.asarray(x_new, np.float64)
        mean, std = np.empty((len(x_new), len(self.y_mean))), np.empty((len(x_new), len(self.y_mean)))
        for j in range(len(self.y_mean)):
            ks = self.hyper.matrix(j, x_new, self.x)                                        # (b, n)
            mean[:, j] = ks @ self.alpha[j]
            v = np.linalg.solve(self.chol[j], ks.T)                                         # (n, b)
            var = self.hyper.prior_variance(j, x_new) + self.hyper.noise[j] - (v * v).sum(axis=0)
            std[:, j] = np.sqrt(np.maximum(var, 0.0))
        return mean * self.y_std + self.y_mean, std * self.y_std

    def loo_residuals(self) -> np.ndarray:
        """Closed-form leave-one-out residuals y_i − μ₋ᵢ(x_i), (n, m) in the targets' units: each run
        predicted by the posterior conditioned on the others, same hyperparameters
        (Rasmussen & Williams 2006, eq. 5.12: αᵢ / [K⁻¹]ᵢᵢ)."""
        out = np.empty(self.alpha.T.shape)
        for j in range(len(self.y_mean)):
            inv_chol = np.linalg.inv(self.chol[j])                                         # L⁻¹; K⁻¹ = L⁻ᵀL⁻¹
            out[:, j] = self.alpha[j] / (inv_chol * inv_chol).sum(axis=0) * self.y_std[j]
        return out


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int,
                kernel: str = "rbf") -> np.ndarray:
    """Posterior mean at x_test of GPs fitted and conditioned on the training data."""
    hyper = fit_hyperparameters(x_train, y_train, seed, kernel=kernel)
    return GPPosterior.condition(hyper, x_train, y_train).predict(x_test)[0]


class GPConditioner(nn.Module):
    """The GP conditioner (`csv_conditioner gp`, `image_conditioner gp`): one GP per latent
    value, from the scaled parameters (or picture features, modules/cond_inputs.py) to the
    scaled latent targets. No trainable parameters: the posterior is held in float64 buffers and evaluated in closed form, so prediction is a few small matmuls, and
    `predict` also gives the posterior std that `--sampling predictive` draws from."""

    def __init__(self, arch: ConditionerArchitecture) -> None:
        super().__init__()
        self.latent_dim_end, self.latent_dim, self.num_levels = arch.latent_dim_end, arch.latent_dim, arch.num_levels
        m = arch.latent_dim_end + arch.num_levels * arch.latent_dim
        num_runs, num_param = arch.num_runs, arch.num_param
        f64 = torch.float64
        self.register_buffer("x", torch.zeros(num_runs, num_param, dtype=f64))
        self.register_buffer("inv_length", torch.ones(m, num_param, dtype=f64))
        self.register_buffer("amplitude", torch.ones(m, dtype=f64))
        self.register_buffer("noise", torch.zeros(m, dtype=f64))
        self.register_buffer("y_mean", torch.zeros(m, dtype=f64))
        self.register_buffer("y_std", torch.ones(m, dtype=f64))
        self.register_buffer("alpha", torch.zeros(m, num_runs, dtype=f64))
        self.register_buffer("chol", torch.eye(num_runs, dtype=f64).repeat(m, 1, 1))
        # the kernel family (GPHyper): 1 for the Matérn 5/2, 0 for the RBF; each column's linear term
        # (variance, bias; zeros: none) about the inputs' box (centre, span)
        self.register_buffer("matern", torch.zeros((), dtype=f64))
        self.register_buffer("linear", torch.zeros(m, 2, dtype=f64))
        self.register_buffer("linear_centre", torch.zeros(num_param, dtype=f64))
        self.register_buffer("linear_span", torch.ones(num_param, dtype=f64))
        # decoded draws spread this many times as far from the point prediction (calibrated on
        # the validation runs: modules/calibration.py)
        self.register_buffer("spread_scale", torch.ones((), dtype=f64))
        # the 50 % and 90 % bands' own scales, relative to the scaled draws (prediction's bands file)
        self.register_buffer("band_scales", torch.ones(2, dtype=f64))
        # The difficulty model: a GP of log(leave-one-out relative error) of the conditioning runs,
        # whose prediction widens each run's draws (`difficulty`); off (0) until set_difficulty.
        self.register_buffer("difficulty_on", torch.zeros((), dtype=f64))
        for name, shape, fill in (("inv_length", (1, num_param), 1.0), ("amplitude", (1,), 1.0),
                                  ("noise", (1,), 0.0), ("y_mean", (1,), 0.0), ("y_std", (1,), 1.0),
                                  ("alpha", (1, num_runs), 0.0)):
            self.register_buffer(f"difficulty_{name}", torch.full(shape, fill, dtype=f64))
        self.register_buffer("difficulty_chol", torch.eye(num_runs, dtype=f64)[None])

    @torch.no_grad()
    def set_posterior(self, post: GPPosterior, prefix: str = "") -> "GPConditioner":
        hyper = post.hyper
        values = {"inv_length": 1.0 / hyper.length, "amplitude": hyper.amplitude,
                  "noise": hyper.noise, "y_mean": post.y_mean, "y_std": post.y_std, "alpha": post.alpha,
                  "chol": post.chol}
        if not prefix:
            values["x"] = post.x
            values["matern"] = np.array(float(hyper.kernel == "matern52"))
            if hyper.linear is not None:
                values.update(linear=hyper.linear, linear_centre=hyper.centre, linear_span=hyper.span)
            else:
                values["linear"] = np.zeros_like(self.linear.cpu().numpy())
        elif not np.array_equal(post.x, self.x.cpu().numpy()):
            raise ValueError("the difficulty GP must be conditioned on the latents' inputs")
        elif hyper.kernel != "rbf":
            raise ValueError(f"the difficulty GP must have the RBF kernel, not {hyper.kernel}")
        for name, value in values.items():
            buf = getattr(self, prefix + name)
            if buf.shape != value.shape:
                raise ValueError(f"GP buffer {prefix + name}: shape {tuple(value.shape)}, expected {tuple(buf.shape)}")
            buf.copy_(torch.from_numpy(np.asarray(value, np.float64)))
        return self

    def set_difficulty(self, post: GPPosterior) -> "GPConditioner":
        """The difficulty model: a one-column GP of log(relative error), on the same inputs."""
        self.set_posterior(post, "difficulty_")
        self.difficulty_on.fill_(1.0)
        return self

    LATER_BUFFERS = ("difficulty_", "matern", "linear")      # prefixes of buffers earlier versions did not save

    def with_defaults(self, saved: dict[str, Tensor]) -> dict[str, Tensor]:
        """A saved state dict of an earlier version completed with what it meant: no difficulty
        model (off), the RBF kernel without a linear term."""
        return {**{k: v for k, v in self.state_dict().items() if k.startswith(self.LATER_BUFFERS)}, **saved}

    def _posterior(self, x: Tensor, prefix: str = "") -> tuple[Tensor, Tensor]:
        """Mean and std of the GP columns stored under `prefix`, (B, m) each, float64."""
        inv_length, amplitude, noise, y_mean, y_std, alpha, chol = (
            getattr(self, prefix + name) for name in ("inv_length", "amplitude", "noise", "y_mean", "y_std", "alpha",
                                                      "chol"))
        x = x.to(self.x.dtype)
        a = x[None] * inv_length[:, None, :]                              # (m, B, d)
        b = self.x[None] * inv_length[:, None, :]                         # (m, n, d)
        dist = torch.cdist(a, b)
        if prefix or not self.matern:                                     # the difficulty GP is an RBF
            ks = amplitude[:, None, None] * torch.exp(-0.5 * dist.square())                # (m, B, n)
        else:
            r = 5.0 ** 0.5 * dist
            ks = amplitude[:, None, None] * (1.0 + r + r.square() / 3.0) * torch.exp(-r)
        prior = amplitude[:, None].expand(-1, len(x))                    # (m, B)
        if not prefix and self.linear[:, 0].any():
            ua, ub = (x - self.linear_centre) / self.linear_span, (self.x - self.linear_centre) / self.linear_span
            variance, bias = self.linear[:, :1, None], self.linear[:, 1:, None]
            ks = ks + variance * (bias + ua @ ub.T)
            prior = prior + self.linear[:, :1] * (self.linear[:, 1:] + ua.square().sum(1))
        mean = torch.einsum("mbn,mn->bm", ks, alpha) * y_std + y_mean
        v = torch.linalg.solve_triangular(chol, ks.transpose(1, 2), upper=False)          # (m, n, B)
        var = prior + noise[:, None] - v.square().sum(1)                                  # (m, B)
        return mean, var.clamp_min(0).sqrt().T * y_std

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and std of the flat scaled targets, (B, m) each, float64."""
        return self._posterior(x)

    def difficulty(self, x: Tensor) -> Tensor:
        """The expected relative L2 error of each input's prediction beyond the latents' own
        posterior spread, (B,) float64: the difficulty GP's median, exp(E[log error]); zeros
        when no difficulty model was fitted."""
        if not self.difficulty_on:
            return torch.zeros(len(x), dtype=self.x.dtype, device=self.x.device)
        return self._posterior(x, "difficulty_")[0][:, 0].exp()

    def split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        main = flat[:, :self.latent_dim_end]
        hier = flat[:, self.latent_dim_end:].unflatten(1, (self.num_levels, self.latent_dim))
        return main, hier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, _ = self.predict(x)
        return self.split(mean.float())

