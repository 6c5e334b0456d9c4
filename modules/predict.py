"""The prediction mode: `--predict PATH --out FILE.npy [--samples K] [--vtk DIR] [--evaluate TRUE.npy]`
reads new inputs, runs the trained surrogate (modules/surrogate.py) and writes the fields,
their bands and `pred.json`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from modules.checkpoint import ensure_writable, json_bytes
from modules.cond_inputs import list_images, load_images, read_param_csv
from modules.errors import UserError
from modules.run import Paths
from modules.surrogate import IMAGE_SIZE, Surrogate

log = logging.getLogger("simulgen")


def read_inputs(surrogate: Surrogate, source: Path) -> tuple[np.ndarray, list[str]]:
    """New inputs of the trained kind: CSV rows or a folder of images."""
    if surrogate.input_type == "csvs":
        if source.is_dir():
            raise UserError(f"--predict {source} is a folder, but the conditioner was trained on CSV parameters "
                            f"(input_type csvs); pass a CSV file with {surrogate.num_param} columns per row.")
        fix = (f"(the conditioner was trained on {surrogate.num_param} parameters); give every row exactly "
               f"{surrogate.num_param} comma-separated values, in the order of the training CSV's columns")
        rows, names = read_param_csv(source, surrogate.num_param, None, columns_fix=fix)
        check_names(names, surrogate.param_names, f"--predict {source}")
        return rows, [str(source)]
    if not source.is_dir():
        raise UserError(f"--predict {source} is not a folder, but the conditioner was trained on images "
                        f"(input_type {surrogate.input_type}); pass a folder of {surrogate.image_ext} images.")
    files = list_images(source, surrogate.image_ext)
    return load_images(files, IMAGE_SIZE), [str(f) for f in files]


def check_names(given: list[str] | None, trained: list[str] | None, where: str) -> None:
    """A header's names must be the training CSV's, in its order; a file without a header, or a model trained
    without one, is not checked."""
    if given is None or trained is None or given == trained:
        return
    how = "the same names in another order" if sorted(given) == sorted(trained) else "other names"
    raise UserError(f"{where}: its header names the columns {','.join(given)}, but the model was trained on "
                    f"{','.join(trained)} ({how}); put the columns in the training CSV's order under its header, "
                    f"or remove the header line.")


def column_labels(surrogate: Surrogate) -> list[str] | None:
    """How messages name the input columns: picture features by name, CSV columns numbered from 1 as in the
    file, with the header's name where training had one; None: numbers alone."""
    if surrogate.image_features is not None:
        return surrogate.image_features.names()
    if surrogate.param_names is not None:
        return [f"column {c + 1} ({name})" for c, name in enumerate(surrogate.param_names)]
    return None


def check_writable(out: Path) -> None:
    if out.suffix != ".npy":
        raise UserError(f"--out {out}: the output must be a .npy file, e.g. --out predictions.npy.")
    ensure_writable([out.parent], f"--out {out}", "choose a writable folder")


SAMPLING_MEANING = {
    "predictive": "the conditioner's Gaussian-process posterior of the latents, each draw decoded, widened by the "
                  "error the training runs' leave-one-out errors predict at that input (gp_difficulty) and scaled "
                  "as the validation runs say (gp_draw_scale: by default by the factor that minimises the draws' "
                  "CRPS); the calibrated 50 % and 90 % bands are the bands file's, not the draws' own quantiles "
                  "(README, 'Uncertainty')",
    "vae_levels": "the original's: the VAE's hierarchical levels drawn around the predicted latents; the spread is "
                  "not related to the prediction's error (README, 'Uncertainty')",
}


def read_bounds(path: Path, num: int, names: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """`--bounds CSV` of --suggest and --sensitivity: two rows of the `num` parameters (under a header of the
    model's `names`, if it has any), the minima and the maxima."""
    if not path.is_file():
        raise UserError(f"--bounds {path} not found; give a CSV of two rows, the {num} parameters' minima and their "
                        f"maxima.")
    rows, given = read_param_csv(path, num, None, columns_fix=f"(the model has {num} parameters); give two rows of "
                                                              f"{num} values: the minima, then the maxima")
    check_names(given, names, f"--bounds {path}")
    if len(rows) != 2:
        raise UserError(f"--bounds {path}: found {len(rows)} rows; give exactly two: the {num} parameters' minima, "
                        f"then their maxima.")
    low, high = rows.astype(np.float64)
    if (low > high).any():
        j = int(np.flatnonzero(low > high)[0])
        name = f" ({names[j]})" if names else ""
        raise UserError(f"--bounds {path}, column {j + 1}{name}: the minimum {low[j]:g} is above the maximum "
                        f"{high[j]:g}; the first row holds the minima, the second the maxima.")
    return low, high


def band_arrays(samples: np.ndarray, centre: np.ndarray, band_scales: dict[float, float]) -> dict[str, np.ndarray]:
    """(n, K, T, N) samples → mean, std, median and the 50 % and 90 % bands' edges, (n, T, N)
    float32 each; each band widened about the point prediction `centre` by its calibrated
    scale (modules/calibration.py; 1 where there is none). Two scales about the point
    prediction, and a median of few draws on the other side of it, can cross the edges; they
    are put back in order (monotone rearrangement), so the 90 % band holds the 50 % band and
    both hold the median."""
    from modules.calibration import calibrated_band
    out = {"mean": samples.mean(axis=1), "std": samples.std(axis=1), "q50": np.median(samples, axis=1)}
    for level, (lo, hi) in ((0.5, ("q25", "q75")), (0.9, ("q05", "q95"))):
        out[lo], out[hi] = calibrated_band(samples, centre, level, band_scales.get(level, 1.0))
    edges = ("q05", "q25", "q50", "q75", "q95")
    for name, value in zip(edges, np.sort(np.stack([out[e] for e in edges]), axis=0)):
        out[name] = value
    return {k: v.astype(np.float32) for k, v in out.items()}


def _domain_entries(domain: dict, names: list[str] | None = None) -> dict:
    """pred.json's out-of-range flags (modules/domain.py), rows and columns numbered from 1 as in the file;
    `names`: the columns' names (the training CSV's header), listed as outside_names too."""
    named = {} if names is None else {"outside_names": [[names[c] for c in cols] for cols in domain["outside_columns"]]}
    return {"out_of_domain": domain["out_of_domain"],
            "domain": {"outside_columns": [[c + 1 for c in cols] for cols in domain["outside_columns"]], **named,
                       "nearest_run_ratio": domain.get("nearest_run_ratio"),
                       "meaning": "out_of_domain[i]: input i (the i-th row or picture) has a column outside the "
                                  "training range (outside_columns, numbered from 1 as in the CSV; outside_names, "
                                  "their header names where the training CSV had a header) or lies farther "
                                  "from every training run than any training run from its nearest neighbour "
                                  "(nearest_run_ratio > 1; scaled inputs); the surrogate extrapolates there"}}


def _bands_entries(bands: Path, sampling: str) -> dict:
    """pred.json's entries that say what the samples and the bands file hold."""
    return {"sampling": sampling, "sampling_meaning": SAMPLING_MEANING[sampling], "bands": str(bands),
            "bands_meaning": "per input, step and node over the K samples: mean, std, median q50, the 50 % "
                             "band q25-q75 and the 90 % band q05-q95, each [n, T, N]"
                             + ("; each band calibrated on the validation runs (its own scale about the point "
                                "prediction)" if sampling == "predictive" else "")}


def output_files(out: Path) -> dict[str, Path]:
    """Where a prediction writes: FILE.npy (the point prediction), FILE_samples.npy and FILE_bands.npz (with
    --samples), FILE.json (what they hold; written last)."""
    return {"point": out, "samples": out.with_name(out.stem + "_samples.npy"),
            "bands": out.with_name(out.stem + "_bands.npz"), "meta": out.with_suffix(".json")}


def run_prediction(source: Path, out: Path, samples: int, paths: Paths, device: torch.device,
                   vtk: Path | None = None, sampling: str = "auto", truth: Path | None = None, plot: int = 2,
                   seed: int = 0) -> dict:
    """Predict the inputs of `source`; with `truth` (the held-out runs' fields) also evaluate the predictions
    against them (modules/evaluate.py). Every input, `truth` included, is checked before anything is written,
    and the outputs are written together (modules/checkpoint.py, `write_together`), the JSON that describes
    them last. The draws are seeded (`seed`), so the same command gives the same samples and bands."""
    from modules.checkpoint import write_together
    from modules.evaluate import evaluate, evaluation_files, load_truth
    if samples < 1:
        raise UserError(f"--samples {samples}: give 1 or more realisations per input.")
    if not source.exists():
        raise UserError(f"--predict {source} not found; pass a CSV file or a folder of images.")
    check_writable(out)
    surrogate = Surrogate.load(paths, device)
    raw, files = read_inputs(surrogate, source)     # before the --vtk folder is made: a bad input leaves none
    mesh = None
    if vtk is not None:         # before anything is written: the mesh exists and fits the model
        from modules.mesh_io import check_prediction_mesh, load_dataset_mesh
        mesh = check_prediction_mesh(load_dataset_mesh(surrogate.dataset), surrogate.dataset,
                                     surrogate.field_scaler.num_nodes, vtk)
    sampling = surrogate.sampling_for(sampling)
    truth_fields = None if truth is None else load_truth(truth, len(raw), surrogate.shape)
    inputs = surrogate.domain_inputs(raw)       # CSV rows or picture features: computed once
    domain = None
    if surrogate.domain is not None:
        domain = surrogate.domain.check(inputs)
        pictures = surrogate.image_features is not None
        line = surrogate.domain.warning(inputs, domain, str(source), rows=[Path(f).name for f in files] if pictures else None,
                                        columns=column_labels(surrogate))
        if line:
            log.warning(line)
    started = time.perf_counter()
    x = surrogate.prepare(raw, inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        point, draws = surrogate.sample(x, samples, sampling=sampling)
    seconds = time.perf_counter() - started
    where = output_files(out)
    meta = {"inputs": files, "input_type": surrogate.input_type, "shape": list(point.shape),
            "layout": "[n, T, N]: the point prediction (deterministic), one per input in order", "samples": samples,
            "seed": seed, "units": "physical (inverse of the per-node scaling)", "checkpoints": surrogate.sources,
            "seconds": seconds}
    if surrogate.param_names is not None:
        meta["param_names"] = surrogate.param_names
    writers = {where["point"]: lambda f: np.save(f, point.astype(np.float32))}
    scales = surrogate.band_scales(sampling)
    if draws is not None:
        bands = band_arrays(draws, point, scales)
        writers[where["samples"]] = lambda f: np.save(f, draws.astype(np.float32))
        writers[where["bands"]] = lambda f: np.savez(f, **bands)
        meta.update({"samples_file": str(where["samples"]), "samples_layout": "[n, K, T, N]",
                     **_bands_entries(where["bands"], sampling)})
    if domain is not None:
        meta.update(_domain_entries(domain, surrogate.param_names))
    report = None
    if truth_fields is not None:
        report = evaluate(surrogate, inputs, files, truth_fields, truth, point, draws, sampling, scales, domain)
        writers.update(evaluation_files(report, out, files))
        meta["evaluation"] = [str(p) for p in evaluation_files(report, out, files)]
    if mesh is not None:
        from modules.mesh_io import COLLECTION_FILE, write_prediction_series
        written = write_prediction_series(vtk, point, mesh, None if draws is None else bands)
        meta.update({"vtk": [str(p) for p in written if p.suffix == ".xdmf" and p.name != COLLECTION_FILE],
                     "vtk_collection": str(vtk / COLLECTION_FILE), "mesh": str(mesh.path),
                     "vtk_fields": mesh.vtk_fields(draws is not None)})
    writers[where["meta"]] = lambda f: f.write(json_bytes(meta))
    write_together(writers)
    if report is not None:
        report["files"] = meta["evaluation"]
        if plot != 2:
            from modules.evaluate import figures
            report["files"] += figures(plot, out, truth_fields, point, report)
        meta["evaluation"] = report
    return meta
