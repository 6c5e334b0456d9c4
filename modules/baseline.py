"""Classical reduced-order baselines, fitted on the same training runs as the surrogate.

A surrogate is worth training only if it beats these (benchmarks/accuracy/):
    mean field   every prediction is the training runs' mean field;
    POD + GPR    proper orthogonal decomposition of the training fields (modes up to 99.9 %
                 of the variance), one Gaussian process with an ARD kernel per mode
                 coefficient (modules/gp.py), on inputs scaled to [0, 1];
    POD + RBF    the same modes, coefficients interpolated with a thin-plate-spline radial
                 basis function (scipy);
    POD floor    the test fields projected onto the training modes: no regression error,
                 the best any method restricted to those modes can do.

Pictures enter through a few features (modules/cond_inputs.py, `ImageFeatures`): moments of
the intensity and of the drawn shape, and a small principal-component summary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modules.cond_inputs import MinMaxScaler
from modules.gp import KERNELS
from modules.gp import fit_predict as gp_fit_predict

ENERGY = 0.999           # POD modes kept: the smallest number holding this fraction of the variance (the issue's
                         # definition; more modes gain only where this keeps few, e.g. the demo: NOTES H0b)
BASELINE_MAX_BYTES = 2 * 2**30      # the in-run baselines' limit: the training fields are held in float64 for the SVD
CV_FOLDS = 5             # `choose_kernel`'s cross-validation
CV_MAX_RUNS = 150        # ... on a seeded subset of at most this many runs: 3 × 5 GP fits, each O(n³) per column


def relative_l2(pred: np.ndarray, true: np.ndarray, blocks: int = 1) -> np.ndarray:
    """Per run ‖pred − true‖ / ‖true‖ over all remaining axes; of fields (n, T, N) stacked as `blocks` node
    blocks of their own units (--import_runs with several --field), the mean of each field's."""
    diff = (np.asarray(pred, np.float64) - true).reshape(*np.shape(true)[:-1], blocks, -1)       # (n, ..., F, N/F)
    true = np.asarray(true, np.float64).reshape(diff.shape)
    axes = tuple(a for a in range(1, diff.ndim) if a != diff.ndim - 2)
    norm = np.sqrt((true * true).sum(axis=axes))                                                  # (n, F)
    return (np.sqrt((diff * diff).sum(axis=axes)) / np.maximum(norm, 1e-30)).mean(axis=1)


@dataclass(frozen=True)
class POD:
    mean: np.ndarray      # (D,)
    modes: np.ndarray     # (r, D), orthonormal rows
    sigma: np.ndarray     # (r,) singular values

    @classmethod
    def fit(cls, fields: np.ndarray, energy: float = ENERGY, max_modes: int | None = None) -> "POD":
        """fields (n, ...) → modes of the centred snapshots (the thin SVD; n ≪ D)."""
        x = fields.reshape(len(fields), -1).astype(np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s ** 2
        keep = int(np.searchsorted(np.cumsum(var) / max(var.sum(), 1e-300), energy) + 1)
        keep = min(keep, len(s), max_modes or len(s))
        return cls(mean, vt[:keep], s[:keep])

    def coefficients(self, fields: np.ndarray) -> np.ndarray:
        return (fields.reshape(len(fields), -1) - self.mean) @ self.modes.T      # (n, r)

    def reconstruct(self, coefficients: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (self.mean + coefficients @ self.modes).reshape(len(coefficients), *shape)


def loo_projection_errors(gram: np.ndarray, modes, absolute: bool = False) -> np.ndarray:
    """Per run j of the fields whose Gram matrix X Xᵀ is `gram` (n, n): the relative L2 error of
    projecting x_j onto the mean and `modes` leading POD modes of the other n − 1 runs, i.e. how
    far a run lies outside what the others span (the compression error a model of n − 1 runs
    would make there). From the Gram matrix alone: O(n⁴), no pass over the fields. `modes` may be a
    list: then (len(modes), n), one row per count. `absolute`: ‖error‖² instead of the relative error."""
    counts = np.atleast_1d(modes)
    n = len(gram)
    centre = np.eye(n - 1) - 1.0 / (n - 1)
    out = np.empty((len(counts), n))
    for j in range(n):
        others = np.delete(np.arange(n), j)
        g_oo = gram[np.ix_(others, others)]
        w, v = np.linalg.eigh(centre @ g_oo @ centre)                  # the others' centred Gram
        w, v = w[::-1], v[:, ::-1]
        cy = centre @ (gram[others, j] - g_oo.mean(axis=1))            # C·X_o·(x_j − m_j)
        real = w > 1e-10 * max(w[0], 1e-300)                           # the others' centred rank is n − 2
        inside = np.zeros(len(w))
        inside[real] = (v[:, real].T @ cy) ** 2 / w[real]               # each mode's share of ‖x_j − m_j‖²
        dev2 = gram[j, j] - 2 * gram[others, j].mean() + g_oo.mean()  # ‖x_j − m_j‖²
        left = np.maximum(dev2 - np.cumsum(inside)[np.minimum(counts, len(w)) - 1], 0.0)
        out[:, j] = left if absolute else np.sqrt(left / max(gram[j, j], 1e-300))
    return out if np.ndim(modes) else out[0]


MODE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)   # POD sizes the leave-one-out compares
PER_MODE_MAX = 64        # one GP per coefficient for at most this many modes (one kernel fit each)


@dataclass(frozen=True)
class PODGPR:
    """The classical reduced-order model at its best: POD of the training fields, and Gaussian processes
    from the inputs (scaled to [0, 1]) to the POD coefficients, either one GP per coefficient or one GP
    whose kernel all coefficients share (scaled together). The number of modes and the variant are chosen
    by the closed-form leave-one-out error on the training runs (`fit`): each run's projection error onto
    the POD of the others (`loo_projection_errors`) plus its coefficients' leave-one-out residuals
    (Rasmussen & Williams 2006, eq. 5.12). Fields stacked as `blocks` node blocks of other units are
    scaled to alike sizes first (each field's largest deviation from the mean), as the tool scales them."""
    pod: POD
    posterior: object                   # modules.gp.GPPosterior of the kept coefficients
    inputs: MinMaxScaler
    unit: np.ndarray                    # (N,) each node's field's scale
    modes: int
    variant: str                        # "per-mode" or "shared"
    loo: dict                           # (variant, modes) -> mean leave-one-out squared error (scaled units)

    @classmethod
    def fit(cls, fields: np.ndarray, inputs: np.ndarray, seed: int = 0, kernel: str = "rbf",
            blocks: int = 1) -> "PODGPR":
        from modules.gp import GPPosterior, fit_hyperparameters
        fields = np.asarray(fields, np.float64)
        deviation = np.abs(fields - fields.mean(axis=0)).max(axis=(0, 1)).reshape(blocks, -1).max(axis=1)
        unit = np.repeat(np.where(deviation > 0, deviation, 1.0), fields.shape[2] // blocks)
        scaled = fields / unit
        pod = POD.fit(scaled, energy=1.0, max_modes=max(1, len(fields) - 2))
        ladder = [r for r in MODE_LADDER if r < len(pod.sigma)] + [len(pod.sigma)]
        flat = scaled.reshape(len(fields), -1)
        projection = loo_projection_errors(flat @ flat.T, ladder, absolute=True) if len(fields) > 2 else \
            np.zeros((len(ladder), len(fields)))
        scale = MinMaxScaler((0.0, 1.0)).fit(inputs)
        x, coeff = scale.transform(inputs).astype(np.float64), pod.coefficients(scaled)
        candidates, loo = {}, {}
        for variant, top in (("shared", len(pod.sigma)), ("per-mode", min(len(pod.sigma), PER_MODE_MAX))):
            hyper = fit_hyperparameters(x, coeff[:, :top], seed, kernel=kernel, shared=variant == "shared")
            post = GPPosterior.condition(hyper, x, coeff[:, :top])
            residual = np.cumsum(post.loo_residuals() ** 2, axis=1) if len(fields) > 2 else np.zeros((len(x), top))
            for row, r in enumerate(ladder):
                if r <= top:
                    loo[(variant, r)] = float((projection[row] + residual[:, r - 1]).mean())
            candidates[variant] = hyper
        variant, modes = min(loo, key=loo.get)
        hyper = candidates[variant]
        keep = _columns(hyper, modes)
        posterior = GPPosterior.condition(keep, x, coeff[:, :modes])
        truncated = POD(pod.mean, pod.modes[:modes], pod.sigma[:modes])
        return cls(truncated, posterior, scale, unit, modes, variant, {f"{v} {r}": e for (v, r), e in loo.items()})

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Fields (n, T, N) in physical units at the inputs (n, d)."""
        x = self.inputs.transform(inputs).astype(np.float64)
        coeff = self.posterior.predict(x)[0]
        return self.pod.reconstruct(coeff, (-1, len(self.unit))) * self.unit


def _columns(hyper, count: int):
    """The first `count` columns of a GPHyper."""
    import dataclasses
    linear = None if hyper.linear is None else hyper.linear[:count]
    return dataclasses.replace(hyper, amplitude=hyper.amplitude[:count], length=hyper.length[:count],
                               noise=hyper.noise[:count], linear=linear)


def _rbf_fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Thin-plate spline in the span of the training inputs (an interpolant: duplicated inputs are one point
    at their runs' mean): rotating onto their principal axes keeps
    every distance, and dropping the axes without spread keeps its linear term solvable when inputs
    are collinear (picture features of black-and-white shapes: their intensity and shape moments
    coincide)."""
    from scipy.interpolate import RBFInterpolator
    x_train, rows = np.unique(x_train, axis=0, return_inverse=True)     # runs with the same inputs: one point,
    y_train = np.stack([y_train[rows.ravel() == i].mean(axis=0) for i in range(len(x_train))])   # their mean
    centre = x_train.mean(axis=0)
    _, s, vt = np.linalg.svd(x_train - centre, full_matrices=False)
    axes = vt[s > 1e-9 * max(s[0], 1e-300)].T
    return RBFInterpolator((x_train - centre) @ axes, y_train, kernel="thin_plate_spline")((x_test - centre) @ axes)


@dataclass(frozen=True)
class BaselineResult:
    rel_l2: dict[str, np.ndarray]       # method → per test run
    modes: int
    best: PODGPR | None = None          # "pod_gpr_best": the model, its modes and variant

    def mean(self, method: str) -> float:
        return float(self.rel_l2[method].mean())


def classical_baselines(train_fields: np.ndarray, test_fields: np.ndarray, train_inputs: np.ndarray | None,
                        test_inputs: np.ndarray | None, seed: int = 0,
                        methods: tuple[str, ...] = ("mean", "pod_gpr", "pod_gpr_best", "pod_rbf", "pod_floor"),
                        energy: float = ENERGY, blocks: int = 1, kernel: str = "rbf") -> BaselineResult:
    """Per-test-run relative L2 of each classical method, fitted on the training runs only.
    Fields (n, T, N) in physical units; inputs (n, d) (parameters or image features). `pod_gpr`: the modes
    holding `energy` of the variance, one GP each; `pod_gpr_best`: `PODGPR`, modes and variant chosen by
    leave-one-out on the training runs."""
    shape = train_fields.shape[1:]
    pod = POD.fit(train_fields, energy)
    out: dict[str, np.ndarray] = {}
    if "mean" in methods:
        out["mean"] = relative_l2(np.broadcast_to(pod.mean.reshape(shape), test_fields.shape), test_fields, blocks)
    if "pod_floor" in methods:
        out["pod_floor"] = relative_l2(pod.reconstruct(pod.coefficients(test_fields), shape), test_fields, blocks)
    if train_inputs is not None:
        scale = MinMaxScaler((0.0, 1.0)).fit(train_inputs)            # the training range to [0, 1]
        x_train, x_test = (scale.transform(x).astype(np.float64) for x in (train_inputs, test_inputs))
        coeff = pod.coefficients(train_fields)
        if "pod_gpr" in methods:
            pred = gp_fit_predict(x_train, coeff, x_test, seed)
            out["pod_gpr"] = relative_l2(pod.reconstruct(pred, shape), test_fields, blocks)
        if "pod_rbf" in methods:
            pred = _rbf_fit_predict(x_train, coeff, x_test)
            out["pod_rbf"] = relative_l2(pod.reconstruct(pred, shape), test_fields, blocks)
        if "pod_gpr_best" in methods:
            best = PODGPR.fit(train_fields, train_inputs, seed, kernel, blocks)
            out["pod_gpr_best"] = relative_l2(best.predict(test_inputs), test_fields, blocks)
            return BaselineResult(out, len(pod.sigma), best)
    return BaselineResult(out, len(pod.sigma))


def choose_kernel(fields: np.ndarray, inputs: np.ndarray, modes: int, seed: int,
                  folds: int = CV_FOLDS) -> tuple[str, dict[str, float]]:
    """The GP kernel family (modules/gp.py, KERNELS) that regresses the runs' POD coefficients best:
    the mean relative L2 of each run's field when it is held out, `folds`-fold, with the POD
    (`modes` modes) and the GPs refitted on the other folds, so that a held-out run is predicted
    as a new design would be. Fields (n, V) flat (a subset of positions will do), inputs (n, d).
    One family for the study: choosing per column, by marginal likelihood, on one validation
    split, or with the POD of all runs kept across folds, picked worse families on the accuracy
    suite (benchmarks/accuracy/NOTES.md, H28). Ties go to the RBF. Returns the family and each
    family's error; fewer than 2 × `folds` runs: the RBF, unscored."""
    if len(fields) < 2 * folds:
        return KERNELS[0], {}
    if len(fields) > CV_MAX_RUNS:
        rows = np.sort(np.random.default_rng(seed).choice(len(fields), CV_MAX_RUNS, replace=False))
        fields, inputs = fields[rows], inputs[rows]
    fields = np.asarray(fields, np.float64)
    errors = {kernel: np.empty(len(fields)) for kernel in KERNELS}
    for held in np.array_split(np.random.default_rng(seed).permutation(len(fields)), folds):
        fit = np.setdiff1d(np.arange(len(fields)), held)
        pod = POD.fit(fields[fit], energy=1.0, max_modes=modes)
        scale = MinMaxScaler((0.0, 1.0)).fit(inputs[fit])
        x_fit, x_held = (scale.transform(inputs[i]).astype(np.float64) for i in (fit, held))
        for kernel, err in errors.items():
            pred = gp_fit_predict(x_fit, pod.coefficients(fields[fit]), x_held, seed, kernel)
            err[held] = relative_l2(pod.reconstruct(pred, fields.shape[1:]), fields[held])
    scores = {kernel: float(err.mean()) for kernel, err in errors.items()}
    return min(scores, key=scores.get), scores
