"""NOTES.md H18: is there a regressor of the POD coefficients that beats the per-mode GP
(modules/gp.py) on every suite problem? Test mean relative L2, POD at 99.9 % energy, inputs
scaled to the training box, every choice made on the training runs only.

    .venv/bin/python benchmarks/accuracy/regressor_probe.py [--problems heat_inclusion ...]

Variants: the current GP; an RBF + linear kernel; a least-squares linear trend with the GP on
its residual; the current GP with each mode's prediction shrunk by its leave-one-out optimal
factor. About 40 seconds for the four problems on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.baseline import POD, relative_l2  # noqa: E402
from modules.cond_inputs import MinMaxScaler  # noqa: E402
from modules.gp import GPPosterior, fit_hyperparameters, fit_predict  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
PROBLEMS = ("heat_inclusion", "advection_front", "burgers", "demo")


def load(name: str):
    folder = DATA / name
    fields = np.load(folder / "dataset1.npy", mmap_mode="r")
    params = np.loadtxt(folder / "params.csv", delimiter=",", ndmin=2)
    split = json.loads((folder / "split.json").read_text())
    tr, te = np.asarray(split["train"]), np.asarray(split["test"])
    scale = MinMaxScaler((0.0, 1.0)).fit(params[tr])
    return (np.asarray(fields[tr], np.float64), np.asarray(fields[te], np.float64),
            scale.transform(params[tr]).astype(np.float64), scale.transform(params[te]).astype(np.float64))


def gp_mean(x, y, x_new, shrink: bool = False):
    """The current GP's posterior mean; with `shrink`, each column's K⁻¹y scaled by the factor
    that minimises its closed-form leave-one-out error (clipped to [0, 1])."""
    post = GPPosterior.condition(fit_hyperparameters(x, y, seed=0), x, y)
    if shrink:
        alpha = post.alpha.copy()
        z = (y - post.y_mean) / post.y_std
        for j in range(y.shape[1]):
            inv = np.linalg.inv(post.chol[j])
            loo = z[:, j] - alpha[j] / (inv * inv).sum(axis=0)            # diag(K⁻¹) from the factor
            alpha[j] *= np.clip(z[:, j] @ loo / max(loo @ loo, 1e-300), 0.0, 1.0)
        post = GPPosterior(post.x, post.hyper, post.y_mean, post.y_std, alpha, post.chol)
    return post.predict(x_new)[0]


def rbf_linear_mean(x, y, x_new):
    """Constant × ARD-RBF + constant × a linear kernel + white noise, per column, with the current
    fit's starts (modules/gp.py, kernel "rbf+linear": the tool's `gp_kernel rbf+linear`)."""
    return fit_predict(x, y, x_new, 0, "rbf+linear")


def linear_trend_mean(x, y, x_new):
    """Least squares in [1, x] per column, the current GP on the residual."""
    design = lambda a: np.c_[np.ones(len(a)), a]  # noqa: E731
    w = np.linalg.lstsq(design(x), y, rcond=None)[0]
    return design(x_new) @ w + gp_mean(x, y - design(x) @ w, x_new)


VARIANTS = {"current GP": gp_mean, "RBF + linear kernel": rbf_linear_mean,
            "linear trend + GP": linear_trend_mean, "GP, LOO shrink": lambda x, y, n: gp_mean(x, y, n, shrink=True)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    args = parser.parse_args(argv)
    for name in args.problems:
        train, test, x, x_test = load(name)
        pod = POD.fit(train)
        coeff = pod.coefficients(train)
        errors = {label: relative_l2(pod.reconstruct(fit(x, coeff, x_test), train.shape[1:]), test).mean()
                  for label, fit in VARIANTS.items()}
        ref = errors["current GP"]
        print(name + ": " + ", ".join(f"{k} {v:.4g} ({v / ref:.3f}×)" for k, v in errors.items()), flush=True)


if __name__ == "__main__":
    main()
