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


def relative_l2(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per run ‖pred − true‖ / ‖true‖ over all remaining axes."""
    diff = (np.asarray(pred, np.float64) - true).reshape(len(true), -1)
    norm = np.linalg.norm(np.asarray(true, np.float64).reshape(len(true), -1), axis=1)
    return np.linalg.norm(diff, axis=1) / np.maximum(norm, 1e-30)


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


def loo_projection_errors(gram: np.ndarray, modes: int) -> np.ndarray:
    """Per run j of the fields whose Gram matrix X Xᵀ is `gram` (n, n): the relative L2 error of
    projecting x_j onto the mean and `modes` leading POD modes of the other n − 1 runs, i.e. how
    far a run lies outside what the others span (the compression error a model of n − 1 runs
    would make there). From the Gram matrix alone: O(n⁴), no pass over the fields."""
    n = len(gram)
    centre = np.eye(n - 1) - 1.0 / (n - 1)
    out = np.empty(n)
    for j in range(n):
        others = np.delete(np.arange(n), j)
        g_oo = gram[np.ix_(others, others)]
        w, v = np.linalg.eigh(centre @ g_oo @ centre)                  # the others' centred Gram
        w, v = w[::-1][:modes], v[:, ::-1][:, :modes]
        real = w > 1e-10 * max(w[0], 1e-300)                           # the others' centred rank is n − 2
        w, v = w[real], v[:, real]
        cy = centre @ (gram[others, j] - g_oo.mean(axis=1))            # C·X_o·(x_j − m_j)
        inside = ((v.T @ cy) ** 2 / w).sum()
        dev2 = gram[j, j] - 2 * gram[others, j].mean() + g_oo.mean()  # ‖x_j − m_j‖²
        out[j] = np.sqrt(max(dev2 - inside, 0.0) / max(gram[j, j], 1e-300))
    return out


def _rbf_fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Thin-plate spline in the span of the training inputs: rotating onto their principal axes keeps
    every distance, and dropping the axes without spread keeps its linear term solvable when inputs
    are collinear (picture features of black-and-white shapes: their intensity and shape moments
    coincide)."""
    from scipy.interpolate import RBFInterpolator
    centre = x_train.mean(axis=0)
    _, s, vt = np.linalg.svd(x_train - centre, full_matrices=False)
    axes = vt[s > 1e-9 * max(s[0], 1e-300)].T
    return RBFInterpolator((x_train - centre) @ axes, y_train, kernel="thin_plate_spline")((x_test - centre) @ axes)


@dataclass(frozen=True)
class BaselineResult:
    rel_l2: dict[str, np.ndarray]       # method → per test run
    modes: int

    def mean(self, method: str) -> float:
        return float(self.rel_l2[method].mean())


def classical_baselines(train_fields: np.ndarray, test_fields: np.ndarray, train_inputs: np.ndarray | None,
                        test_inputs: np.ndarray | None, seed: int = 0,
                        methods: tuple[str, ...] = ("mean", "pod_gpr", "pod_rbf", "pod_floor"),
                        energy: float = ENERGY) -> BaselineResult:
    """Per-test-run relative L2 of each classical method, fitted on the training runs only.
    Fields (n, T, N) in physical units; inputs (n, d) (parameters or image features)."""
    shape = train_fields.shape[1:]
    pod = POD.fit(train_fields, energy)
    out: dict[str, np.ndarray] = {}
    if "mean" in methods:
        out["mean"] = relative_l2(np.broadcast_to(pod.mean.reshape(shape), test_fields.shape), test_fields)
    if "pod_floor" in methods:
        out["pod_floor"] = relative_l2(pod.reconstruct(pod.coefficients(test_fields), shape), test_fields)
    if train_inputs is not None:
        scale = MinMaxScaler((0.0, 1.0)).fit(train_inputs)            # the training range to [0, 1]
        x_train, x_test = (scale.transform(x).astype(np.float64) for x in (train_inputs, test_inputs))
        coeff = pod.coefficients(train_fields)
        if "pod_gpr" in methods:
            pred = gp_fit_predict(x_train, coeff, x_test, seed)
            out["pod_gpr"] = relative_l2(pod.reconstruct(pred, shape), test_fields)
        if "pod_rbf" in methods:
            pred = _rbf_fit_predict(x_train, coeff, x_test)
            out["pod_rbf"] = relative_l2(pod.reconstruct(pred, shape), test_fields)
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
