"""NOTES.md H28: does choosing the GP's kernel family once per study by cross-validation
(`modules/baseline.py`, `choose_kernel`: the tool's `gp_kernel auto`) beat the fixed ARD-RBF on
every suite problem? Test mean relative L2 of POD (64 modes, as the tool's main latent) + per-mode
GP of each family, inputs scaled to the training box, and the family the cross-validation of the
training runs picks, for a few fold seeds.

    .venv/bin/python benchmarks/accuracy/kernel_probe.py [--problems ...] [--seeds 0 1] [--extra 120]

`--extra N` also scores every family on N more held-out runs, drawn from a fresh Latin hypercube
and simulated by the problem's own solver (`problems.py`; the demo's `make_demo.py`): 24 (the
demo: 16) test runs cannot tell apart families a few % apart. About 2 minutes per problem and
seed on 2 cores, plus the simulations (heat_inclusion: a minute per 100 runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.baseline import POD, choose_kernel, relative_l2  # noqa: E402
from modules.gp import KERNELS, fit_predict  # noqa: E402
from modules.cond_inputs import MinMaxScaler  # noqa: E402
from regressor_probe import DATA, load  # noqa: E402

EXTRA_SEED = 777


def extra_runs(name: str, num: int):
    """`num` fresh runs of problem `name`: (fields, parameters), physical units."""
    import problems
    rng = np.random.default_rng(EXTRA_SEED)
    if name == "demo":
        sys.path.insert(0, str(ROOT / "input_data"))
        import make_demo
        params = make_demo.latin_hypercube(rng, num)
        return make_demo.simulate(params), params
    table, simulate = {"heat_inclusion": (problems.HEAT_PARAMETERS, problems._heat_simulate),
                       "advection_front": (problems.ADV_PARAMETERS, problems._adv_simulate),
                       "burgers": (problems.BURGERS_PARAMETERS, lambda p: problems._burgers_simulate(p)[
                           :, :, :: problems.BURGERS_FINE // problems.BURGERS_NODES]),
                       "wave_membrane": (problems.WAVE_PARAMETERS, problems._wave_simulate)}[name]
    params = problems.latin_hypercube(rng, table, num)
    return simulate(params), params

PROBLEMS = ("heat_inclusion", "advection_front", "burgers", "wave_membrane", "demo")
MODES = 64


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--extra", type=int, default=0, help="this many more held-out runs, freshly simulated")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernel_probe.json"))
    args = parser.parse_args(argv)
    report = {}
    for name in args.problems:
        t0 = time.perf_counter()
        train, test, x, x_test = load(name)
        pod = POD.fit(train, energy=1.0, max_modes=MODES)
        coeff = pod.coefficients(train)
        if args.extra:
            fields, params = extra_runs(name, args.extra)
            scale = MinMaxScaler((0.0, 1.0)).fit(np.loadtxt(DATA / name / "params.csv", delimiter=",", ndmin=2)[
                json.loads((DATA / name / "split.json").read_text())["train"]])
            test = np.concatenate([test, fields.astype(np.float64)])
            x_test = np.concatenate([x_test, scale.transform(params).astype(np.float64)])
        test_err = {k: float(relative_l2(pod.reconstruct(fit_predict(x, coeff, x_test, 0, k), train.shape[1:]),
                                         test).mean()) for k in KERNELS}
        print(f"{name}: {len(test)} test runs: " + ", ".join(f"{k} {v:.4g} ({v / test_err['rbf']:.3f}x)"
                                                            for k, v in test_err.items()), flush=True)
        report[name] = {"test": test_err, "choices": {}}
        for seed in args.seeds:
            pick, cv = choose_kernel(train.reshape(len(train), -1), x, MODES, seed)
            report[name]["choices"][seed] = {"pick": pick, "cv": cv}
            print(f"  fold seed {seed}: cv " + ", ".join(f"{k} {v:.4g}" for k, v in cv.items())
                  + f" -> {pick}: test {test_err[pick] / test_err['rbf']:.3f}x the RBF's", flush=True)
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
