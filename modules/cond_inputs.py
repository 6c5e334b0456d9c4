"""Conditioner inputs (SPEC §3): the parameter CSV or the folder of geometry images,
and the per-column min-max scaler shared by CSV inputs and latent targets.

Every problem a user can cause is a UserError whose message names the file and the fix.
Pillow is imported only when images are read.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from modules.errors import UserError

log = logging.getLogger("simulgen")

# -----------------------------------------------------------------------------
# paths


def resolve_param_dir(value: str, cwd: str | Path) -> Path:
    """Where `param_dir` points.

    The original joined the working directory and the value as strings, so its files say
    `/images` for `<cwd>/images`. A leading "/" is therefore read as relative to `cwd`
    unless the value exists as an absolute path; other relative values are relative to cwd.
    """
    path = Path(value)
    if value.startswith("/") and not path.exists():
        return Path(cwd) / value.lstrip("/")
    if path.is_absolute():
        return path
    return Path(cwd) / path


# -----------------------------------------------------------------------------
# CSV


_PARAM_DIR_RULE = ("a value starting with / that is not an existing absolute path is read relative to "
                   "the working directory")

_COLUMNS_FIX = ("(the num_param key in condition.txt); make every row have num_param comma-separated values "
                "or change num_param")


HEADER_RULE = ("the first line is a header when every cell of it is a name (not a number, with a letter in it); "
               "otherwise it is a data row")


def _is_name(cell: str) -> bool:
    """A header cell: not a number and with a letter in it (so `1.2.3` is a bad number, not a name)."""
    try:
        float(cell)
    except ValueError:
        return any(c.isalpha() for c in cell)
    return False


def _cell(path: Path, line: int, column: int, cell: str, first_row: bool) -> float:
    """One CSV cell as a finite number, or a UserError naming its line and column."""
    try:
        v = float(cell)
    except ValueError:
        hint = (" (a header line must name every column, each name with a letter in it, and no number)"
                if first_row else "")
        raise UserError(
            f"{path}, line {line}, column {column + 1}: {cell.strip()!r} is not a number{hint}; fix that cell"
        ) from None
    if not math.isfinite(v):
        raise UserError(
            f"{path}, line {line}, column {column + 1}: {cell.strip()!r} is not a finite number; replace NaN/Inf values"
        )
    return v


def load_csv(path: str | Path, num_param: int, n_expected: int | None,
             columns_fix: str = _COLUMNS_FIX) -> np.ndarray:
    """Read the parameter CSV as float32 (P, num_param), without its header's names (`read_param_csv`)."""
    return read_param_csv(path, num_param, n_expected, columns_fix)[0]


def read_param_csv(path: str | Path, num_param: int, n_expected: int | None,
                   columns_fix: str = _COLUMNS_FIX) -> tuple[np.ndarray, list[str] | None]:
    """The parameter CSV as float32 (P, num_param) and its header's names (None: no header line;
    HEADER_RULE decides); n_expected=None: any row count.

    `columns_fix` ends the wrong-column-count message (what to change, where)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"param_dir points at the folder {path}, but input_type csvs reads one CSV file; set param_dir "
            f"to the CSV (for the demo: --set param_dir=/input_data/params.csv) or use input_type image"
        )
    if not path.is_file():
        raise UserError(
            f"parameter CSV not found: {path} (set param_dir in condition.txt to the CSV file; "
            f"{_PARAM_DIR_RULE})"
        )
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            numbered = enumerate(csv.reader(f), start=1)
            rows = [(i, r) for i, r in numbered if any(c.strip() for c in r)]  # skip blank lines
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(
            f"{path} is not a readable text CSV ({e}); save it as plain UTF-8 CSV"
        ) from None

    names = None
    if rows and all(_is_name(c.strip()) for c in rows[0][1]):
        line, header = rows.pop(0)
        names = [c.strip() for c in header]
        if len(names) != num_param:
            raise UserError(f"{path}, line {line}: the header names {len(names)} columns, expected {num_param} "
                            f"{columns_fix}")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise UserError(f"{path}, line {line}: the header names two columns {twice!r}; give every column its "
                            f"own name")

    values = np.empty((len(rows), num_param), dtype=np.float64)
    for k, (line, row) in enumerate(rows):
        if len(row) != num_param:
            raise UserError(
                f"{path}, line {line}: found {len(row)} columns, expected {num_param} {columns_fix}"
            )
        values[k] = [_cell(path, line, j, cell, first_row=k == 0 and names is None)
                     for j, cell in enumerate(row)]

    if not rows:
        raise UserError(f"{path} holds no data rows; put one row of {num_param} values per run in it")
    if n_expected is not None and len(rows) != n_expected:
        raise UserError(
            f"{path}: found {len(rows)} data rows, expected {n_expected} (n_sample / Dim1 in "
            "condition.txt, one row per run); fix the CSV or those keys"
        )
    out = values.astype(np.float32)
    if not np.isfinite(out).all():
        k, j = np.argwhere(~np.isfinite(out))[0]
        raise UserError(
            f"{path}, line {rows[k][0]}, column {j + 1}: value overflows float32; "
            "rescale that column"
        )
    return out, names


# -----------------------------------------------------------------------------
# images

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that orders embedded numbers by value: 2.png < 10.png < a2 < a10.

    Each part is tagged (0 = number, 1 = text) so numbers and text never compare directly.
    """
    parts = _DIGITS.split(name)
    return [(0, int(p)) if i % 2 else (1, p.lower()) for i, p in enumerate(parts)]


def list_images(folder: str | Path, ext: str, n_expected: int | None = None) -> list[Path]:
    """Files of `folder` ending in `ext` (case-insensitive), in natural order."""
    folder = Path(folder)
    ext = ext.lower() if ext.startswith(".") else "." + ext.lower()
    if folder.is_file():
        raise UserError(
            f"param_dir points at the file {folder}, but image inputs are read from a folder; set param_dir "
            f"to the image folder (for the demo: --set param_dir=/input_data/images) or use input_type csvs"
        )
    if not folder.is_dir():
        raise UserError(
            f"image folder not found: {folder} (set param_dir in condition.txt to the folder "
            f"of input images; {_PARAM_DIR_RULE})"
        )
    files = [f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(ext)]
    if not files:
        raise UserError(
            f"no '{ext}' files in {folder}; put the images there or set param_data_type in "
            "condition.txt to their extension (.png or .jpg)"
        )
    files.sort(key=lambda f: natural_key(f.name))
    if n_expected is not None and len(files) != n_expected:
        raise UserError(
            f"{folder} holds {len(files)} '{ext}' images, expected {n_expected} ({_odd_files(files, n_expected, ext)}; "
            "n_sample / Dim1 in condition.txt, one image per run); add or remove images or fix those keys"
        )
    return files


def _names(items: Sequence[str], most: int = 5) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _odd_files(files: Sequence[Path], n_expected: int, ext: str) -> str:
    """Which files are missing or extra: by number when the images are numbered 1..P (or
    0..P-1), else the extra ones at the end of the natural order."""
    numbers = [int(f.name[: -len(ext)]) for f in files if f.name[: -len(ext)].isdigit()]
    if len(numbers) == len(files):
        first = 0 if 0 in numbers else 1
        wanted = set(range(first, first + n_expected))
        missing = [f"{n}{ext}" for n in sorted(wanted - set(numbers))]
        extra = [f"{n}{ext}" for n in sorted(set(numbers) - wanted)]
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"extra {_names(extra)}"] if extra else [])
        return "; ".join(parts) or "numbers repeat"
    if len(files) > n_expected:
        return f"extra, the last in natural order: {_names([f.name for f in files[n_expected:]])}"
    return f"{n_expected - len(files)} missing; name them 1{ext} ... {n_expected}{ext} to be told which"


def load_images(files: Sequence[str | Path], size: int = 256) -> np.ndarray:
    """Greyscale images resized (bicubic) to size x size: float32 (P, size, size) in [0, 1]."""
    from PIL import Image

    out = np.empty((len(files), size, size), dtype=np.float32)
    first_size: tuple[Path, tuple[int, int]] | None = None
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im.load()  # decode now: truncated files fail here, not later
                if im.mode.startswith("I"):
                    # 16-bit greyscale: convert("L") would clip at 255 instead of rescaling
                    grey = Image.fromarray(np.asarray(im, dtype=np.float32) / 65535.0)  # mode "F"
                else:
                    grey = im.convert("L")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(
                f"cannot read image {f} ({type(e).__name__}: {e}); replace or remove that file"
            ) from None
        if first_size is None:
            first_size = (Path(f), grey.size)
        elif grey.size != first_size[1] and first_size[0] is not None:
            (w, h), (w0, h0) = grey.size, first_size[1]
            log.warning("images differ in size: %s is %dx%d, %s is %dx%d; each is resized to %dx%d, so their "
                        "geometry is %s; make them one size", f, w, h, first_size[0], w0, h0, size, size,
                        "stretched differently" if w * h0 != h * w0 else "scaled differently")
            first_size = (None, first_size[1])          # warn once
        resized = np.asarray(grey.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        if grey.mode == "L":
            out[i] = resized / 255.0
        else:
            out[i] = np.clip(resized, 0.0, 1.0)  # bicubic overshoots in float mode
    return out


# -----------------------------------------------------------------------------
# picture features


class ImageFeatures:
    """A few numbers per greyscale picture that a Gaussian process can regress on: where something
    is drawn, and how bright it is drawn, kept apart.

    "Intensity" is the distance of a pixel from the background grey level (the training pictures'
    most common level), so white-on-black and black-on-white pictures give the same features; a
    pixel whose value is the same in every training picture (a frame, a fixed part) is dropped.
    The "shape" is the soft mask of intensity above SHAPE_LEVEL, less the pixels it touches in
    every training picture: the geometry that varies, whatever its grey level.
        6 moments of the intensity: total, centroid x and y, second central moments xx, yy, xy;
        6 moments of the shape: area, centroid, second central moments;
        the mean intensity over the shape (a grey level that encodes a material, a load);
        the leading principal components of the 32×32 downsample (what the moments miss).
    Moments of the whole picture alone mix a shape's size with its grey level and with the fixed
    drawing around it: the GP on them was 2.3× (heat_inclusion) and 1.8× (demo) POD + GPR on the
    parameters, on these 1.03× and 0.96× (benchmarks/accuracy/NOTES.md, H23).

    They are what the GP picture conditioner (`image_conditioner gp`) and the classical baseline
    read, and what the input-range check compares new pictures by. Own code, not a library: the
    moments are sums over the pixels, and the PCA is scikit-learn's."""

    COMPONENTS = 2          # 0, 2 and 4 measured alike on the suite (NOTES H23)
    GRID = 32
    SHAPE_LEVEL = 0.1       # intensity (of full scale) from which a pixel belongs to a shape
    SHAPE_EDGE = 0.05       # width of the soft threshold: the shape's moments vary continuously
    FIXED = 0.5 / 255       # a pixel whose training values all lie within this is fixed
    CHUNK = 32              # pictures per pass: bounds the float64 temporaries

    def __init__(self, mean: np.ndarray, modes: np.ndarray, background: float, fixed_ink: np.ndarray,
                 fixed_shape: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float64)        # (S,) the training pictures' mean downsample
        self.modes = np.asarray(modes, np.float64)      # (k, S) orthonormal principal directions
        self.background = float(background)             # the training pictures' most common grey level
        self.fixed_ink = np.asarray(fixed_ink, bool)    # (H, W) the same value in every training picture
        self.fixed_shape = np.asarray(fixed_shape, bool)  # (H, W) touched by the shape in every training picture

    @staticmethod
    def count(num_train: int, components: int = COMPONENTS) -> int:
        """Features per picture when fitted on `num_train` pictures."""
        return 13 + min(components, num_train - 1)

    @classmethod
    def fit(cls, images: np.ndarray, train_idx, components: int = COMPONENTS) -> ImageFeatures:
        from sklearn.decomposition import PCA
        train = np.sort(np.asarray(train_idx))
        levels = np.zeros(256, np.int64)
        low, high = np.full(images.shape[1:], np.inf), np.full(images.shape[1:], -np.inf)
        small = []
        for chunk in cls._chunks(images, train):
            levels += np.bincount(np.round(chunk * 255).astype(np.int64).ravel(), minlength=256)[:256]
            low, high = np.minimum(low, chunk.min(axis=0)), np.maximum(high, chunk.max(axis=0))
            small.append(cls._downsample(chunk))
        background = levels.argmax() / 255.0
        fixed_ink = (high - low < cls.FIXED) & (np.abs(low - background) >= cls.FIXED)
        small = np.concatenate(small)
        pca = PCA(n_components=min(components, len(small) - 1), svd_solver="full").fit(small)
        no_shape = cls(pca.mean_, pca.components_, background, fixed_ink, np.zeros(images.shape[1:], bool))
        touched = np.ones(images.shape[1:], bool)
        for chunk in cls._chunks(images, train):
            touched &= (no_shape._shape(no_shape._ink(chunk)) > 0.0).all(axis=0)
        return cls(pca.mean_, pca.components_, background, fixed_ink, touched)

    @classmethod
    def _chunks(cls, images: np.ndarray, idx: np.ndarray):
        for start in range(0, len(idx), cls.CHUNK):
            yield np.asarray(images[idx[start:start + cls.CHUNK]], np.float64)

    @classmethod
    def _downsample(cls, images: np.ndarray) -> np.ndarray:
        n, h, w = images.shape
        fy, fx = max(1, h // cls.GRID), max(1, w // cls.GRID)
        img = images[:, :h // fy * fy, :w // fx * fx]
        return img.reshape(n, h // fy, fy, w // fx, fx).mean(axis=(2, 4)).reshape(n, -1)

    def _ink(self, img: np.ndarray) -> np.ndarray:
        return np.where(self.fixed_ink, 0.0, np.abs(img - self.background))

    def _shape(self, ink: np.ndarray) -> np.ndarray:
        return np.clip((ink - self.SHAPE_LEVEL) / self.SHAPE_EDGE + 0.5, 0.0, 1.0)

    @staticmethod
    def _moments(weight: np.ndarray) -> list[np.ndarray]:
        """Total (per pixel), centroid and second central moments of (n, H, W) weights, on [0, 1]²."""
        n, h, w = weight.shape
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
        rows, cols = weight.sum(axis=2), weight.sum(axis=1)                  # (n, H), (n, W)
        mass = rows.sum(axis=1)
        safe = np.maximum(mass, 1e-12)
        cx, cy = cols @ xs / safe, rows @ ys / safe
        sxx = cols @ xs ** 2 / safe - cx ** 2
        syy = rows @ ys ** 2 / safe - cy ** 2
        sxy = np.einsum("nhw,h,w->n", weight, ys, xs) / safe - cx * cy
        return [mass / (h * w), cx, cy, sxx, syy, sxy]

    def transform(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W) pictures in [0, 1] → (n, 13 + k) features, float64."""
        n, h, w = images.shape
        if (h, w) != self.fixed_ink.shape:
            raise UserError(f"pictures of {h}×{w} pixels, but the conditioner's picture features were fitted on "
                            f"{self.fixed_ink.shape[0]}×{self.fixed_ink.shape[1]}; use pictures of the training size.")
        rows = []
        for chunk in self._chunks(images, np.arange(n)):
            ink = self._ink(chunk)
            shape = np.where(self.fixed_shape, 0.0, self._shape(ink))
            level = (ink * shape).sum(axis=(1, 2)) / np.maximum(shape.sum(axis=(1, 2)), 1e-12)
            components = (self._downsample(chunk) - self.mean) @ self.modes.T
            rows.append(np.column_stack(self._moments(ink) + self._moments(shape) + [level, components]))
        return np.concatenate(rows)

    def names(self) -> list[str]:
        """What each feature is, for messages."""
        moments = ["centroid x", "centroid y", "spread in x", "spread in y", "xy covariance"]
        return (["total intensity"] + [f"intensity {m}" for m in moments]
                + ["shape area"] + [f"shape {m}" for m in moments] + ["mean intensity over the shape"]
                + [f"principal component {i + 1}" for i in range(len(self.modes))])

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.copy(), "modes": self.modes.copy(), "background": np.asarray(self.background),
                "fixed_ink": self.fixed_ink.copy(), "fixed_shape": self.fixed_shape.copy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], source: str) -> ImageFeatures:
        if "fixed_shape" not in state:
            raise UserError(f"{source} holds picture features of an earlier version of this tool; retrain the "
                            f"conditioner with --lc_only=1.")
        return cls(state["mean"], state["modes"], float(state["background"]), state["fixed_ink"],
                   state["fixed_shape"])


# -----------------------------------------------------------------------------
# scaling


class MinMaxScaler:
    """Per-column min-max scaling to `feature_range` (default [-0.9, 0.9]).

    Columns are every axis but the first: (P, F) and (P, L, D) arrays both work. A constant
    column (zero range) maps to the middle of the range, whatever value it is given (a parameter
    that never varied carries no information a model could have learnt), and back to its value,
    without dividing by zero. Transforms return float32; statistics are kept in float64.
    """

    def __init__(self, feature_range: tuple[float, float] = (-0.9, 0.9)) -> None:
        lo, hi = feature_range
        if not lo < hi:
            raise ValueError(f"feature_range must be increasing, got {feature_range}")
        self.feature_range = (float(lo), float(hi))
        self.data_min: np.ndarray | None = None
        self.data_max: np.ndarray | None = None

    def fit(self, x: np.ndarray, joint: bool = False) -> MinMaxScaler:
        """joint: every column keeps its own centre but all share the widest column's range, so
        the columns' relative sizes (a POD's energies) survive the scaling."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"cannot fit a scaler on an array of shape {x.shape}")
        self.data_min = x.min(axis=0)
        self.data_max = x.max(axis=0)
        if joint:
            centre, half = (self.data_max + self.data_min) / 2, (self.data_max - self.data_min).max() / 2
            self.data_min, self.data_max = centre - half, centre + half
        return self

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b), float64 per column: inverse_transform(y) = y·a + b, transform(x) = (x − b)/a."""
        if self.data_min is None or self.data_max is None:
            raise RuntimeError("MinMaxScaler is not fitted")
        lo, hi = self.feature_range
        half = (self.data_max - self.data_min) / 2
        a = np.where(half > 0, half, 1.0) / ((hi - lo) / 2)          # a constant column: no division by 0
        return a, (self.data_max + self.data_min) / 2 - (hi + lo) / 2 * a

    def _check(self, x: np.ndarray) -> None:
        assert self.data_min is not None
        if x.shape[1:] != self.data_min.shape:
            raise ValueError(
                f"scaler was fitted on columns of shape {self.data_min.shape}, got {x.shape[1:]}"
            )

    def transform(self, x: np.ndarray) -> np.ndarray:
        a, b = self.affine()
        x = np.asarray(x, dtype=np.float64)
        self._check(x)
        return np.where(self.data_max > self.data_min, (x - b) / a, sum(self.feature_range) / 2).astype(np.float32)

    def inverse_transform(self, y: np.ndarray) -> np.ndarray:
        a, b = self.affine()
        y = np.asarray(y, dtype=np.float64)
        self._check(y)
        return (y * a + b).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.data_min is None or self.data_max is None:
            raise RuntimeError("MinMaxScaler is not fitted")
        return {
            "data_min": self.data_min.copy(),
            "data_max": self.data_max.copy(),
            "feature_range": np.asarray(self.feature_range, dtype=np.float64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> MinMaxScaler:
        lo, hi = (float(v) for v in np.asarray(state["feature_range"]))
        scaler = cls((lo, hi))
        scaler.data_min = np.asarray(state["data_min"], dtype=np.float64)
        scaler.data_max = np.asarray(state["data_max"], dtype=np.float64)
        return scaler
