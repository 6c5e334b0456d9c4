"""NOTES.md H23: which picture features let POD + GPR on pictures match POD + GPR on the
parameters? Test mean relative L2 on the suite's picture problems, as a ratio to POD + GPR on
the true parameters, every fit on the training runs only.

    .venv/bin/python benchmarks/accuracy/picture_probe.py [--problems heat_inclusion demo]

Rows: H15's features (6 intensity moments of the whole picture, 4 principal components), the
current `ImageFeatures`, and `ImageFeatures` on the same pictures inverted, with 4 grey levels of
noise, and at half the resolution. About a minute for the two problems on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.baseline import classical_baselines  # noqa: E402
from modules.cond_inputs import ImageFeatures, list_images, load_images  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def whole_picture_features(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """H15's features: intensity moments of the whole picture and 4 principal components."""
    features = ImageFeatures.fit(images, train, components=4)
    components = (ImageFeatures._downsample(np.asarray(images, np.float64)) - features.mean) @ features.modes.T
    return np.column_stack(ImageFeatures._moments(np.asarray(images, np.float64)) + [components])


def current_features(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    return ImageFeatures.fit(images, train).transform(images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["heat_inclusion", "demo"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    noise = np.random.default_rng(0)
    variants = {
        "H15 features (whole-picture moments, 4 components)": (whole_picture_features, lambda im: im),
        "ImageFeatures": (current_features, lambda im: im),
        "ImageFeatures, pictures inverted": (current_features, lambda im: 1.0 - im),
        "ImageFeatures, 4 grey levels of noise": (
            current_features, lambda im: np.clip(np.round((im + noise.normal(0, 4 / 255, im.shape)) * 255) / 255, 0, 1)),
        "ImageFeatures, half resolution": (
            current_features, lambda im: im.reshape(len(im), im.shape[1] // 2, 2, im.shape[2] // 2, 2).mean(axis=(2, 4))),
    }
    for name in args.problems:
        folder = DATA / name
        fields = np.load(folder / "dataset1.npy", mmap_mode="r")
        params = np.loadtxt(folder / "params.csv", delimiter=",", ndmin=2)
        split = json.loads((folder / "split.json").read_text())
        train, test = np.asarray(split["train"]), np.asarray(split["test"])
        tr, te = np.asarray(fields[train], np.float64), np.asarray(fields[test], np.float64)
        images = load_images(list_images(folder / "images", ".png", len(fields)), 256)
        reference = classical_baselines(tr, te, params[train], params[test], methods=("pod_gpr",)).mean("pod_gpr")
        print(f"{name}: POD + GPR on the parameters {reference:.4f}")
        for label, (features, change) in variants.items():
            x = features(change(images), train)
            error = classical_baselines(tr, te, x[train], x[test], methods=("pod_gpr",)).mean("pod_gpr")
            print(f"  {label:55s} {error:.4f}  ({error / reference:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
