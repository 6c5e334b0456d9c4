"""Probe of issue 13's spread–error correlation: which per-run difficulty estimate, computed
from the training runs only, ranks the test runs' errors?

Uses the suite's trained surrogate (work/<tag>/<problem>, from run_suite.py; train it with
`gp_difficulty 0` to see the posterior's spread alone). For the test runs
it reports the Spearman correlation with the surrogate's actual per-run error of
  - the GP draws' spread (what the tool reports now),
  - leave-one-out POD projection errors of the training runs, interpolated to the test inputs
    (how far a run lies outside the span of the others: the compression part),
  - closed-form leave-one-out GP residuals of the training runs' POD coefficients, interpolated
    the same way (the regression part),
  - the spread combined with each (root of the sum of squares).

    python benchmarks/accuracy/spread_probe.py heat_inclusion advection_front burgers demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def loo_gp_residuals(x: np.ndarray, coeff: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per run: the field-space norm of the closed-form leave-one-out GP residuals of its POD
    coefficients (hyperparameters fitted once on all runs; the modes are orthonormal)."""
    from modules.gp import GPPosterior, fit_hyperparameters
    return np.linalg.norm(GPPosterior.condition(fit_hyperparameters(x, coeff, seed), x, coeff).loo_residuals(), axis=1)


def interpolate(x_train: np.ndarray, values: np.ndarray, x_test: np.ndarray, seed: int = 0) -> np.ndarray:
    """A GP of log(values) on the scaled inputs, back-transformed."""
    from modules.gp import fit_predict
    return np.exp(fit_predict(x_train, np.log(values)[:, None], x_test, seed)[:, 0])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("problems", nargs="+")
    p.add_argument("--tag", default="default")
    p.add_argument("--samples", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    from modules.baseline import POD, loo_projection_errors, relative_l2
    from modules.calibration import spread_and_error
    from modules.run import Paths
    from modules.surrogate import Surrogate

    for name in args.problems:
        src = HERE / "data" / name
        fields = np.load(src / "dataset1.npy")
        params = np.loadtxt(src / "params.csv", delimiter=",")
        split = json.loads((src / "split.json").read_text())
        tr, te = np.asarray(split["train"]), np.asarray(split["test"])
        lo, hi = params[tr].min(0), params[tr].max(0)
        xs_tr, xs_te = (params[tr] - lo) / (hi - lo), (params[te] - lo) / (hi - lo)
        sur = Surrogate.load(Paths(HERE / "work" / args.tag / name), torch.device("cpu"))
        torch.manual_seed(0)
        point, draws = sur.sample(sur.prepare(params[te].astype(np.float32)), args.samples, sampling="predictive")
        spread, err = spread_and_error(draws, point, fields[te])
        recon = relative_l2(sur.reconstruct(fields[te]), fields[te])
        train = fields[tr].reshape(len(tr), -1).astype(np.float64)
        proj = loo_projection_errors(train @ train.T, sur.conditioner.latent_dim_end)
        pod = POD.fit(fields[tr])
        gres = loo_gp_residuals(xs_tr, pod.coefficients(fields[tr])) / np.linalg.norm(train, axis=1)
        d_proj, d_gp = interpolate(xs_tr, proj, xs_te), interpolate(xs_tr, gres, xs_te)
        d_both = np.sqrt(d_proj ** 2 + d_gp ** 2)

        def rho(a):
            return f"{spearmanr(a, err).statistic:+.2f}"

        print(f"{name}: error mean {err.mean():.4f}; Spearman with the error: spread {rho(spread)}, "
              f"true VAE recon {rho(recon)}, LOO projection {rho(d_proj)}, LOO GP residual {rho(d_gp)}, "
              f"both {rho(d_both)}, spread ⊕ both {rho(np.hypot(spread, d_both))}, "
              f"spread ⊕ proj {rho(np.hypot(spread, d_proj))}; mean spread {spread.mean():.4f}, "
              f"mean d_both {d_both.mean():.4f}")


if __name__ == "__main__":
    main()
