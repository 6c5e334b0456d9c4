"""Realistic test problems of the accuracy benchmark suite: deterministic generators.

Every problem is a study of P = 120 runs of one transient simulation, saved as a float32
field [P, T, N] (runs, saved time steps, nodes) with its per-run parameters and, where
the geometry varies, one picture per run. The split is fixed: runs 0..95 train, runs
96..119 (the last 24) test. The two parts are drawn as two separate seeded Latin
hypercubes (96 and 24 points) in the same parameter box, so each part covers the whole
space on its own. Parameter values are rounded (to the decimals listed below) before
simulating, so params.csv holds exactly the values that produced each run. Every output
is byte-identical on every run of the generator (on one machine and library version).

Layout written by `generate(name, out_dir)` into out_dir/<name>/
------------------------------------------------------------------
    dataset1.npy   float32 [P, T, N]
    params.csv     P rows, num_param columns, no header, numbers only
    images/1.png .. images/P.png   (problems with pictures; 256 x 256, 8-bit greyscale, y up)
    split.json     {"train": [...], "test": [...]}, 0-based run indices
    nodes.npy      float64 [N, dim] node coordinates in metres (not for "demo")
    meta.json      parameters (names, units, ranges, sampling), physics, grid, times,
                   generator version; written last, so its presence with the current
                   version marks a complete folder, which `generate` then leaves alone.

Run `python benchmarks/accuracy/problems.py --out DIR [--only NAME ...]`: it generates
the problems and prints, per problem, the shape, the generation time, the relative L2
distance ||x - mean_train|| / ||x|| of each test run's (T, N) field from the mean of the
training fields (mean / min / max), and two POD floors of the test runs with 32 modes of
the training set: "run POD" (each run's whole (T, N) field is one snapshot, mean-centred,
the setting of a model with one latent vector per run) and "frame POD" (each saved frame
[N] is one snapshot, not centred, the setting of classic POD-Galerkin/POD-regression).

Problem "heat_inclusion": transient conduction in a plate with an inclusion
-----------------------------------------------------------------------------
A square carbon-steel plate, 10 cm x 10 cm x 2 mm (k = 50 W/(m K), rho*c = 3.85e6
J/(m^3 K)), starts at the ambient temperature, 20 degC. At t = 0 a fixed strip heater
along the left edge (x = 0 .. 0.8 cm, y = 1 .. 7 cm, not centred, so the field has no
mirror symmetry) is switched on; the plate loses heat by convection from both faces, its
edges are insulated. A circular inclusion of another material (same rho*c; conductivity
from a near-insulating polymer insert to stainless steel) sits somewhere in the plate:

    rho*c*th * dT/dt = div(k(x, y)*th * grad T) - 2*h_c*(T - T_amb) + q(x, y)

Discretisation: vertex-centred finite volumes on a 41 x 41 node grid (N = 1681, spacing
h = 2.5 mm, nodes on the edges, boundary control volumes halved). The conductance of the
face between two neighbouring nodes is upscaled from a supersampled (8 x 8 per cell),
anti-aliased conductivity map of the h x h region around the face: harmonic mean along
the flux (layers in series), arithmetic mean across it (in parallel), so it varies
continuously with every parameter. The heater's areal power density times the covered
fraction of each control volume gives the source. Time integration: BDF2 (first step
implicit Euler), dt = 0.9375 s, one sparse LU per matrix and run. T = 80 frames saved at
t = 7.5, 15, ..., 600 s. Node k is (iy, ix) = divmod(k, 41) at x = ix*h, y = iy*h (y up).
Field: temperature in degC.

Parameters (params.csv columns, in this order):
  1. inclusion_x      centre x of the inclusion               3.0 - 8.0 cm
  2. inclusion_y      centre y of the inclusion               2.5 - 7.5 cm
  3. inclusion_radius radius of the inclusion                 0.8 - 1.6 cm
  4. log10_k_ratio    log10(k_inclusion / k_plate)           -2.0 - -0.5 (k 0.5 - 15.8 W/(m K))
  5. heater_power     total power of the edge heater          9.5 - 10.5 W
  6. h_conv           convection coefficient per face         17.0 - 23.0 W/(m^2 K)

The inclusion always conducts worse than the steel (from a polymer insert, almost a hole,
to stainless steel), so every run's inclusion visibly deflects the heat flow. With these
ranges a run differs from the training-mean field by 1.1 - 9.5 % of its norm, 4.0 % on
average (test runs: 1.7 - 6.9 %, mean 4.3 %).

Pictures: black plate, white 4-pixel frame at the plate edge (the reference level);
the inclusion disc (anti-aliased) at a grey level encoding log10_k_ratio (40 at -2.0 to
240 at -0.5); the heater strip at a grey level encoding heater_power (80 at 9.5 W to 230
at 10.5 W); a bar 8 pixels high just inside the top of the frame at a grey level encoding
h_conv (80 at 17 to 230 at 23 W/(m^2 K)). A mirror image is a different plate: do not
flip these pictures for augmentation.

Problem "advection_front": a pollutant slug carried down a river
-----------------------------------------------------------------
1-D advection-dispersion along a 10 km river reach, c_t + u*c_x = D*c_xx, of a Gaussian
slug released at t = 0 (initial peak c0, standard deviation sigma0, centre x0). The
exact solution on the infinite line is used (no numerical error):

    c(x, t) = c0 * sigma0/s(t) * exp(-(x - x0 - u*t)^2 / (2*s(t)^2)),  s^2 = sigma0^2 + 2*D*t

N = 1024 nodes at x = (i + 0.5) * 9.765625 m; T = 60 frames at t = 150, 300, ..., 9000 s.
Peclet number u*L/D = 150 - 4000: the slug travels 2.7 - 7.2 km while its standard
deviation grows from 50 - 150 m to only 0.2 - 0.6 km, so runs overlap little and linear
POD needs many modes.
Field: concentration in mg/L.

Parameters:
  1. release_x   release position x0              0.5 - 2.0 km
  2. velocity    mean flow velocity u             0.3 - 0.8 m/s
  3. dispersion  longitudinal dispersion D        2.0 - 20.0 m^2/s
  4. width       initial standard deviation       50.0 - 150.0 m
  5. peak        initial peak concentration c0    5.0 - 15.0 mg/L

Problem "burgers": shock formation in viscous Burgers flow
-----------------------------------------------------------
u_t + u*u_x = nu*u_xx on a periodic domain of length 1 m, from

    u0(x) = U + a*(sin(2*pi*x) + b*sin(4*pi*x + psi))

Steepening produces one or two shocks (at t ~ 1/(2*pi*a*(1+2b)) = 0.1 - 0.3 s) that then
travel with speed ~U, merge and decay. Solved by a Fourier pseudo-spectral method on
1024 points (2/3 dealiasing, integrating factor for the viscous term, classical RK4, dt =
4e-4 s; the thinnest shock, ~4*nu/du ~ 4 mm, spans 4 or more points; against a 4096-point,
dt = 1e-4 s solution the saved fields of the least viscous runs differ by < 1e-6
relative) and saved on every 2nd point: N = 512 nodes at x = i/512 m; T = 60 frames at
t = 0.02, 0.04, ..., 1.2 s. The saved shocks are 1 - 3 nodes thick.
Field: velocity in m/s.

Parameters:
  1. mean_velocity  U                                  0.0 - 0.5 m/s
  2. amplitude      a                                  0.5 - 1.0 m/s
  3. harmonic       b (second-harmonic ratio)          0.0 - 0.6
  4. phase          psi (second-harmonic phase)        0.0 - 3.1416 rad
  5. viscosity      nu                                 0.002 - 0.006 m^2/s

Problem "wave_membrane": a struck drum membrane
----------------------------------------------
A square membrane, 1 m x 1 m, fixed along its edges, at rest until a mallet strikes it at
t = 0: the strike gives the membrane an initial velocity v0*exp(-r^2 / (2*w^2)) around the
struck point (v0 = 1 m/s). The damped wave equation

    u_tt + gamma*u_t = c^2 * (u_xx + u_yy),   u = 0 on the edges

is solved by second-order central differences in space (5-point Laplacian, 65 x 65 cells,
the 64 x 64 interior nodes saved: N = 4096, spacing 1/65 m) and time (leapfrog with the
damping term centred, dt = 0.625 ms, 8 steps per frame; CFL number <= 0.52). T = 40 frames
at t = 5, 10, ..., 200 ms: the waves cross the membrane 1.6 - 2.4 times and interfere with
their reflections, so the runs differ a lot, and the mesh is 2.4 - 8x larger than the other
problems'. Node k is (iy, ix) = divmod(k, 64) at x = (ix + 1)/65, y = (iy + 1)/65 m.
Field: transverse displacement in mm.

Parameters:
  1. strike_x     x of the struck point                0.25 - 0.75 m
  2. strike_y     y of the struck point                0.25 - 0.75 m
  3. wave_speed   c = sqrt(tension / areal mass)       8.0 - 12.0 m/s
  4. damping      gamma                                2.0 - 10.0 1/s
  5. width        w, the mallet's footprint            0.05 - 0.10 m

Problem "demo": the repository's own demo study (input_data/, see make_demo.py),
copied as it is, 80 runs [80, 32, 256] with pictures, the last 16 runs as test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
from PIL import Image
from scipy.sparse.linalg import splu

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "input_data"

NUM_RUNS = 120
TEST_RUNS = 24
IMAGE_SIZE = 256
FRAME_PIXELS = 4


@dataclass(frozen=True)
class Problem:
    """One problem of the suite. `generate(out_dir)` writes out_dir/<name> (cached) and returns it."""
    name: str
    description: str
    num_runs: int
    num_time: int
    num_nodes: int
    num_param: int
    has_images: bool
    test_runs: int
    generate: Callable[[Path], None]


# ----------------------------------------------------------------------------- shared helpers

def latin_hypercube(rng: np.random.Generator, table: tuple, num: int) -> np.ndarray:
    """One stratified sample per run and parameter: (num, num_param), physical units, rounded.

    `table` rows are (name, low, high, unit, decimals).
    """
    columns = []
    for _, low, high, _, decimals in table:
        unit = (rng.permutation(num) + rng.random(num)) / num
        columns.append(np.round(low + unit * (high - low), decimals))
    return np.stack(columns, axis=1)


def sample_parameters(seed: int, table: tuple) -> np.ndarray:
    """Training Latin hypercube (P - 24 runs) followed by a separate test hypercube (24 runs)."""
    rng = np.random.default_rng(seed)
    train = latin_hypercube(rng, table, NUM_RUNS - TEST_RUNS)
    test = latin_hypercube(rng, table, TEST_RUNS)
    return np.concatenate([train, test])


def split_indices(num_runs: int, test_runs: int) -> dict:
    return {"train": list(range(num_runs - test_runs)), "test": list(range(num_runs - test_runs, num_runs))}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_common(folder: Path, fields: np.ndarray, params: np.ndarray, table: tuple,
                 nodes: np.ndarray, meta: dict) -> None:
    """dataset1.npy, params.csv, nodes.npy, split.json; meta.json is written by `generate`."""
    assert fields.dtype == np.float32 and fields.shape[0] == NUM_RUNS
    np.save(folder / "dataset1.npy", fields)
    np.savetxt(folder / "params.csv", params, fmt=[f"%.{row[4]}f" for row in table], delimiter=",")
    np.save(folder / "nodes.npy", nodes.astype(np.float64))
    write_json(folder / "split.json", split_indices(NUM_RUNS, TEST_RUNS))
    meta["parameters"] = [{"name": n, "low": lo, "high": hi, "unit": u, "decimals": d,
                           "sampling": "uniform (Latin hypercube)"} for n, lo, hi, u, d in table]
    meta["shape"] = list(fields.shape)
    meta["node_coordinates"] = "nodes.npy (float64 [N, dim], metres)"


def grey_level(value: float, low: float, high: float, grey_low: float, grey_high: float) -> float:
    return grey_low + (grey_high - grey_low) * (value - low) / (high - low)


# ----------------------------------------------------------------------------- heat_inclusion

HEAT_SEED = 20250301
HEAT_GRID = 41                      # nodes per side; N = 1681
HEAT_FRAMES = 80
HEAT_FRAME_INTERVAL = 7.5           # s
HEAT_SUBSTEPS = 8                   # time steps per saved frame
HEAT_PLATE = 0.10                   # m
HEAT_THICKNESS = 0.002              # m
HEAT_K = 50.0                       # W/(m K)
HEAT_RHO_C = 3.85e6                 # J/(m^3 K)
HEAT_T_AMB = 20.0                   # degC
HEAT_STRIP = (0.0, 0.008, 0.01, 0.07)   # heater x0, x1, y0, y1 in m
HEAT_SUPERSAMPLE = 8                # sub-points per cell side for conductivity and heater maps
HEAT_PARAMETERS = (
    ("inclusion_x", 3.0, 8.0, "cm", 4),
    ("inclusion_y", 2.5, 7.5, "cm", 4),
    ("inclusion_radius", 0.8, 1.6, "cm", 4),
    ("log10_k_ratio", -2.0, -0.5, "log10(k_inclusion / 50 W/(m K))", 4),
    ("heater_power", 9.5, 10.5, "W", 4),
    ("h_conv", 17.0, 23.0, "W/(m^2 K)", 4),
)


def _disc_map(cx: float, cy: float, r: float, size: int, extent: float, sub: int) -> np.ndarray:
    """Anti-aliased coverage of a disc on a size x size grid of square pixels over [0, extent]^2.

    Row 0 is y = 0 (y up). Each pixel's coverage is the mean of sub x sub sample points,
    each with a linear ramp one sample wide across the circle, so coverage is continuous
    in (cx, cy, r).
    """
    fine = size * sub
    step = extent / fine
    c = (np.arange(fine) + 0.5) * step
    dist = np.sqrt((c[None, :] - cx) ** 2 + (c[:, None] - cy) ** 2)
    inside = np.clip(0.5 - (dist - r) / step, 0.0, 1.0)
    return inside.reshape(size, sub, size, sub).mean(axis=(1, 3))


def _rect_map(x0: float, x1: float, y0: float, y1: float, size: int, extent: float, sub: int,
              origin: float = 0.0) -> np.ndarray:
    """Exact covered fraction of pixels (row 0 at y = origin) by an axis-aligned rectangle."""
    edges = origin + np.arange(size + 1) * extent / size
    fx = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None) / (extent / size)
    fy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None) / (extent / size)
    return fy[:, None] * fx[None, :]


def _heat_conductances(run: np.ndarray):
    """Edge lists (i, j, conductance W/K) of the 41 x 41 vertex-centred FV grid for one run."""
    g, s = HEAT_GRID, HEAT_SUPERSAMPLE
    h = HEAT_PLATE / (g - 1)
    cx, cy, r = run[0] / 100.0, run[1] / 100.0, run[2] / 100.0
    ratio = 10.0 ** run[3]
    # conductivity samples on a fine grid over [-h/2, L + h/2]^2 (one half cell beyond each edge)
    fine = g * s
    step = h / s
    c = -h / 2 + (np.arange(fine) + 0.5) * step
    dist = np.sqrt((c[None, :] - cx) ** 2 + (c[:, None] - cy) ** 2)
    frac = np.clip(0.5 - (dist - r) / step, 0.0, 1.0)
    kmap = HEAT_K * (1.0 + (ratio - 1.0) * frac)                         # (y, x) W/(m K)
    inside = (c >= 0.0) & (c <= HEAT_PLATE)
    # face between node ix and ix+1 in row iy: region x in [ix*h, (ix+1)*h], y in [iy*h - h/2, iy*h + h/2]
    # in fine indices: x from s/2 + ix*s (s samples), y from iy*s (s samples)
    half = s // 2
    kx = kmap[:, half:half + (g - 1) * s]                                 # (fine, (g-1)*s)
    series = 1.0 / (1.0 / kx).reshape(fine, g - 1, s).mean(axis=2)        # harmonic along x
    w = inside.astype(float)[:, None]                                     # keep the plate only
    kx_face = (series * w).reshape(g, s, g - 1).sum(axis=1) / w.reshape(g, s, 1).sum(axis=1)
    ky = kmap[half:half + (g - 1) * s, :]
    series_y = 1.0 / (1.0 / ky).reshape(g - 1, s, fine).mean(axis=1)      # harmonic along y
    wy = inside.astype(float)[None, :]
    ky_face = (series_y * wy).reshape(g - 1, g, s).sum(axis=2) / wy.reshape(1, g, s).sum(axis=2)
    # face lengths: h inside, h/2 on the boundary rows/columns
    length = np.full(g, h)
    length[[0, -1]] = h / 2
    gx = kx_face * HEAT_THICKNESS * length[:, None] / h                   # (g, g-1)
    gy = ky_face * HEAT_THICKNESS * length[None, :] / h                   # (g-1, g)
    idx = np.arange(g * g).reshape(g, g)
    i = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    j = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    return i, j, np.concatenate([gx.ravel(), gy.ravel()])


def _heat_simulate(params: np.ndarray) -> np.ndarray:
    g = HEAT_GRID
    n = g * g
    h = HEAT_PLATE / (g - 1)
    side = np.full(g, h)
    side[[0, -1]] = h / 2
    area = np.outer(side, side).ravel()                                   # control-volume areas, m^2
    capacity = HEAT_RHO_C * HEAT_THICKNESS * area                         # J/K
    x0, x1, y0, y1 = HEAT_STRIP
    strip = _rect_map(x0, x1, y0, y1, g, g * h, 1, origin=-h / 2)         # covered fraction of (h x h) cells
    strip_area = np.sum(strip * h * h)                                    # the part inside the plate
    assert abs(strip_area - (x1 - x0) * (y1 - y0)) < 1e-12
    heater = (strip * h * h).ravel() / strip_area                         # share of the power per node
    dt = HEAT_FRAME_INTERVAL / HEAT_SUBSTEPS
    frames = np.empty((len(params), HEAT_FRAMES, n), dtype=np.float32)
    for run_index, run in enumerate(params):
        i, j, cond = _heat_conductances(run)
        lap = sp.coo_matrix((np.concatenate([cond, cond, -cond, -cond]),
                             (np.concatenate([i, j, i, j]), np.concatenate([i, j, j, i]))),
                            shape=(n, n)).tocsc()
        a = lap + sp.diags(2.0 * run[5] * area)                           # conduction + convection, W/K
        source = run[4] * heater                                          # W
        euler = splu((sp.diags(capacity / dt) + a).tocsc())
        bdf2 = splu((sp.diags(1.5 * capacity / dt) + a).tocsc())
        old = np.zeros(n)
        rise = euler.solve(source)                                        # first step: implicit Euler
        step = 1
        for frame in range(HEAT_FRAMES):
            while step < (frame + 1) * HEAT_SUBSTEPS:
                rise, old = bdf2.solve(capacity * (2.0 * rise - 0.5 * old) / dt + source), rise
                step += 1
            frames[run_index, frame] = HEAT_T_AMB + rise
    return frames


def _heat_draw(run: np.ndarray) -> Image.Image:
    size, sub = IMAGE_SIZE, 4
    cx, cy, r, logk, power, hconv = run
    table = HEAT_PARAMETERS
    disc = _disc_map(cx, cy, r, size, 10.0, sub)                          # cm
    pixels = disc * grey_level(logk, table[3][1], table[3][2], 40, 240)
    x0, x1, y0, y1 = (v * 100 for v in HEAT_STRIP)
    strip = _rect_map(x0, x1, y0, y1, size, 10.0, 1)
    pixels = np.maximum(pixels, strip * grey_level(power, table[4][1], table[4][2], 80, 230))
    pixels = np.round(pixels[::-1]).astype(np.uint8)                      # row 0 = top
    bar = np.uint8(round(grey_level(hconv, table[5][1], table[5][2], 80, 230)))
    f = FRAME_PIXELS
    pixels[f:f + 8, f:-f] = bar
    pixels[:f, :] = pixels[-f:, :] = pixels[:, :f] = pixels[:, -f:] = 255
    return Image.fromarray(pixels, mode="L")


def _build_heat(folder: Path) -> dict:
    params = sample_parameters(HEAT_SEED, HEAT_PARAMETERS)
    fields = _heat_simulate(params)
    g, h = HEAT_GRID, HEAT_PLATE / (HEAT_GRID - 1)
    iy, ix = np.divmod(np.arange(g * g), g)
    nodes = np.stack([ix * h, iy * h], axis=1)
    meta = {"physics": PROBLEMS["heat_inclusion"].description,
            "field": "temperature", "field_unit": "degC",
            "grid": "41 x 41 nodes, spacing 2.5 mm, node k = (iy, ix) = divmod(k, 41), y up",
            "times_s": [HEAT_FRAME_INTERVAL * (f + 1) for f in range(HEAT_FRAMES)],
            "constants": {"plate_m": HEAT_PLATE, "thickness_m": HEAT_THICKNESS, "k_W_per_mK": HEAT_K,
                          "rho_c_J_per_m3K": HEAT_RHO_C, "T_ambient_degC": HEAT_T_AMB,
                          "heater_strip_m": list(HEAT_STRIP)},
            "images": "images/<run>.png, 256 x 256 greyscale, y up; white frame; inclusion disc grey "
                      "40..240 = log10_k_ratio -2.0..-0.5; heater strip grey 80..230 = 9.5..10.5 W; "
                      "top bar grey 80..230 = h_conv 17..23 W/(m^2 K); not mirror-symmetric"}
    write_common(folder, fields, params, HEAT_PARAMETERS, nodes, meta)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for stale in images.glob("*.png"):
        stale.unlink()
    for run_number, run in enumerate(params, start=1):
        _heat_draw(run).save(images / f"{run_number}.png", optimize=True)
    return meta


# ----------------------------------------------------------------------------- advection_front

ADV_SEED = 20250302
ADV_NODES = 1024
ADV_LENGTH = 10_000.0               # m
ADV_FRAMES = 60
ADV_FRAME_INTERVAL = 150.0          # s
ADV_PARAMETERS = (
    ("release_x", 0.5, 2.0, "km", 4),
    ("velocity", 0.3, 0.8, "m/s", 4),
    ("dispersion", 2.0, 20.0, "m^2/s", 4),
    ("width", 50.0, 150.0, "m", 3),
    ("peak", 5.0, 15.0, "mg/L", 4),
)


def _adv_simulate(params: np.ndarray) -> np.ndarray:
    x = (np.arange(ADV_NODES) + 0.5) * ADV_LENGTH / ADV_NODES
    t = ADV_FRAME_INTERVAL * (np.arange(ADV_FRAMES) + 1)
    x0, u, d, s0, c0 = (params[:, k, None, None] for k in range(5))
    spread2 = s0 ** 2 + 2.0 * d * t[None, :, None]                        # (P, T, 1)
    centre = x0 * 1000.0 + u * t[None, :, None]
    field = c0 * s0 / np.sqrt(spread2) * np.exp(-(x[None, None, :] - centre) ** 2 / (2.0 * spread2))
    return field.astype(np.float32)


def _build_adv(folder: Path) -> dict:
    params = sample_parameters(ADV_SEED, ADV_PARAMETERS)
    fields = _adv_simulate(params)
    nodes = ((np.arange(ADV_NODES) + 0.5) * ADV_LENGTH / ADV_NODES)[:, None]
    meta = {"physics": PROBLEMS["advection_front"].description,
            "field": "concentration", "field_unit": "mg/L",
            "grid": "1024 nodes at x = (i + 0.5) * 9.765625 m along a 10 km reach",
            "times_s": [ADV_FRAME_INTERVAL * (f + 1) for f in range(ADV_FRAMES)],
            "solution": "exact: c0*sigma0/s*exp(-(x-x0-u t)^2/(2 s^2)), s^2 = sigma0^2 + 2 D t"}
    write_common(folder, fields, params, ADV_PARAMETERS, nodes, meta)
    return meta


# ----------------------------------------------------------------------------- burgers

BURGERS_SEED = 20250303
BURGERS_NODES = 512
BURGERS_FINE = 1024
BURGERS_FRAMES = 60
BURGERS_FRAME_INTERVAL = 0.02       # s
BURGERS_DT = 4e-4                   # s
BURGERS_PARAMETERS = (
    ("mean_velocity", 0.0, 0.5, "m/s", 4),
    ("amplitude", 0.5, 1.0, "m/s", 4),
    ("harmonic", 0.0, 0.6, "1", 4),
    ("phase", 0.0, 3.1416, "rad", 4),
    ("viscosity", 0.002, 0.006, "m^2/s", 6),
)


def _burgers_simulate(params: np.ndarray, fine: int = BURGERS_FINE, dt: float = BURGERS_DT) -> np.ndarray:
    """Pseudo-spectral integrating-factor RK4 for all runs at once: (P, T, fine) float64."""
    x = np.arange(fine) / fine                                            # m, periodic length 1
    k = 2.0 * np.pi * np.fft.rfftfreq(fine, d=1.0 / fine)                 # rad/m
    keep = (np.arange(k.size) < fine // 3).astype(float)                  # 2/3 dealiasing
    mean, amp, harm, phase, nu = (params[:, c, None] for c in range(5))
    u0 = mean + amp * (np.sin(2 * np.pi * x) + harm * np.sin(4 * np.pi * x + phase))
    v = np.fft.rfft(u0)
    decay_half = np.exp(-nu * k[None, :] ** 2 * dt / 2)                   # integrating factor over dt/2
    decay_full = decay_half ** 2

    def nonlinear(vh: np.ndarray) -> np.ndarray:                          # -(u^2/2)_x in Fourier space
        u = np.fft.irfft(vh * keep, n=fine)
        return -0.5j * k * np.fft.rfft(u * u) * keep

    steps = int(round(BURGERS_FRAME_INTERVAL / dt))
    out = np.empty((len(params), BURGERS_FRAMES, fine))
    for frame in range(BURGERS_FRAMES):
        for _ in range(steps):
            a = nonlinear(v)
            b = nonlinear(decay_half * (v + 0.5 * dt * a))
            c = nonlinear(decay_half * v + 0.5 * dt * b)
            d = nonlinear(decay_full * v + dt * decay_half * c)
            v = decay_full * v + dt / 6 * (decay_full * a + 2 * decay_half * (b + c) + d)
        out[:, frame] = np.fft.irfft(v, n=fine)
    return out


def _build_burgers(folder: Path) -> dict:
    params = sample_parameters(BURGERS_SEED, BURGERS_PARAMETERS)
    fine = _burgers_simulate(params)
    fields = fine[:, :, :: BURGERS_FINE // BURGERS_NODES].astype(np.float32)
    nodes = (np.arange(BURGERS_NODES) / BURGERS_NODES)[:, None]
    meta = {"physics": PROBLEMS["burgers"].description,
            "field": "velocity", "field_unit": "m/s",
            "grid": "512 nodes at x = i / 512 m, periodic domain of length 1 m "
                    "(solved on 1024 points, every 2nd saved)",
            "times_s": [round(BURGERS_FRAME_INTERVAL * (f + 1), 6) for f in range(BURGERS_FRAMES)],
            "solver": "Fourier pseudo-spectral, 2/3 dealiasing, integrating-factor RK4, dt = 4e-4 s"}
    write_common(folder, fields, params, BURGERS_PARAMETERS, nodes, meta)
    return meta


# ----------------------------------------------------------------------------- wave_membrane

WAVE_SEED = 20250304
WAVE_CELLS = 65                     # cells per side; (WAVE_CELLS - 1)^2 interior nodes saved
WAVE_FRAMES = 40
WAVE_FRAME_INTERVAL = 0.005         # s
WAVE_SUBSTEPS = 8
WAVE_STRIKE_SPEED = 1.0             # m/s
WAVE_PARAMETERS = (
    ("strike_x", 0.25, 0.75, "m", 4),
    ("strike_y", 0.25, 0.75, "m", 4),
    ("wave_speed", 8.0, 12.0, "m/s", 4),
    ("damping", 2.0, 10.0, "1/s", 4),
    ("width", 0.05, 0.10, "m", 4),
)


def _wave_simulate(params: np.ndarray) -> np.ndarray:
    """Leapfrog for all runs at once: (P, T, N) displacement in mm, float32."""
    inner = WAVE_CELLS - 1
    h = 1.0 / WAVE_CELLS
    dt = WAVE_FRAME_INTERVAL / WAVE_SUBSTEPS
    coord = (np.arange(inner) + 1) * h
    sx, sy, c, gamma, w = (params[:, k, None, None] for k in range(5))
    strike = WAVE_STRIKE_SPEED * np.exp(-((coord[None, None, :] - sx) ** 2 + (coord[None, :, None] - sy) ** 2)
                                        / (2.0 * w ** 2))                    # (P, iy, ix)
    courant2 = (c * dt / h) ** 2
    damp = gamma * dt / 2.0

    def laplacian(u: np.ndarray) -> np.ndarray:                              # times h^2, u = 0 outside
        padded = np.pad(u, ((0, 0), (1, 1), (1, 1)))
        return (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
                - 4.0 * u)

    previous = np.zeros_like(strike)
    current = dt * strike * (1.0 - damp)                                     # u(dt) from u(0) = 0, u_t(0) = strike
    out = np.empty((len(params), WAVE_FRAMES, inner * inner))
    step = 1
    for frame in range(WAVE_FRAMES):
        while step < (frame + 1) * WAVE_SUBSTEPS:
            following = (2.0 * current - (1.0 - damp) * previous + courant2 * laplacian(current)) / (1.0 + damp)
            previous, current = current, following
            step += 1
        out[:, frame] = current.reshape(len(params), -1)
    return (1000.0 * out).astype(np.float32)


def _build_wave(folder: Path) -> dict:
    params = sample_parameters(WAVE_SEED, WAVE_PARAMETERS)
    fields = _wave_simulate(params)
    inner = WAVE_CELLS - 1
    iy, ix = np.divmod(np.arange(inner * inner), inner)
    nodes = np.stack([(ix + 1) / WAVE_CELLS, (iy + 1) / WAVE_CELLS], axis=1)
    meta = {"physics": PROBLEMS["wave_membrane"].description,
            "field": "displacement", "field_unit": "mm",
            "grid": "64 x 64 interior nodes of a 65 x 65-cell square, node k = (iy, ix) = divmod(k, 64) at "
                    "((ix + 1)/65, (iy + 1)/65) m, y up",
            "times_s": [round(WAVE_FRAME_INTERVAL * (f + 1), 6) for f in range(WAVE_FRAMES)],
            "solver": "5-point finite differences, leapfrog with centred damping, dt = 0.625 ms"}
    write_common(folder, fields, params, WAVE_PARAMETERS, nodes, meta)
    return meta


# ----------------------------------------------------------------------------- demo

def _build_demo(folder: Path) -> dict:
    shutil.copyfile(DEMO_DIR / "dataset1.npy", folder / "dataset1.npy")
    shutil.copyfile(DEMO_DIR / "params.csv", folder / "params.csv")
    images = folder / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir()
    for png in sorted(DEMO_DIR.glob("images/*.png")):
        shutil.copyfile(png, images / png.name)
    write_json(folder / "split.json", split_indices(80, 16))
    return {"physics": PROBLEMS["demo"].description, "field": "temperature", "field_unit": "degC",
            "source": "input_data/ (see input_data/make_demo.py)",
            "parameters": [{"name": n, "unit": u} for n, u in
                           (("heater_offset", "cm"), ("heater_height", "cm"),
                            ("heater_radius", "cm"), ("heater_flux", "W/cm^2"))],
            "grid": "16 x 16 cells, node k = (iy, ix) = divmod(k, 16), 6.25 mm cells, y up",
            "shape": [80, 32, 256]}


# ----------------------------------------------------------------------------- registry

GENERATOR_VERSIONS = {"heat_inclusion": 1, "advection_front": 1, "burgers": 1, "wave_membrane": 1, "demo": 1}
_BUILDERS = {"heat_inclusion": _build_heat, "advection_front": _build_adv,
             "burgers": _build_burgers, "wave_membrane": _build_wave, "demo": _build_demo}


def _complete(folder: Path, problem: Problem) -> bool:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("generator_version") != GENERATOR_VERSIONS[problem.name]:
        return False
    needed = [folder / "dataset1.npy", folder / "params.csv", folder / "split.json"]
    if problem.has_images:
        needed += [folder / "images" / f"{r}.png" for r in range(1, problem.num_runs + 1)]
    return all(p.is_file() for p in needed)


def generate(name: str, out_dir: Path) -> Path:
    """Write problem `name` into out_dir/<name> unless it is already complete; return that folder."""
    problem = PROBLEMS[name]
    folder = Path(out_dir) / name
    if _complete(folder, problem):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    meta = _BUILDERS[name](folder)
    meta.update({"name": name, "generator": "benchmarks/accuracy/problems.py",
                 "generator_version": GENERATOR_VERSIONS[name],
                 "num_runs": problem.num_runs, "num_time": problem.num_time,
                 "num_nodes": problem.num_nodes, "num_param": problem.num_param,
                 "has_images": problem.has_images, "test_runs": problem.test_runs,
                 "split": "split.json: the last test_runs runs are the test set"})
    write_json(folder / "meta.json", meta)
    return folder


LOCKED_RUNS = 24
LOCKED_SEED_OFFSET = 1000           # the locked runs' Latin hypercube: the problem's seed + this, drawn once


def _locked_runs(name: str) -> tuple[np.ndarray, np.ndarray, list | None]:
    """(params, fields float32, pictures or None) of problem `name`'s locked test runs."""
    import importlib.util
    if name == "demo":
        spec = importlib.util.spec_from_file_location("make_demo", DEMO_DIR / "make_demo.py")
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)
        params = demo.latin_hypercube(np.random.default_rng(demo.SEED + LOCKED_SEED_OFFSET), LOCKED_RUNS)
        return params, demo.simulate(params).astype(np.float32), [demo.draw(run) for run in params]
    seed, table, simulate, draw = {
        "heat_inclusion": (HEAT_SEED, HEAT_PARAMETERS, _heat_simulate, _heat_draw),
        "advection_front": (ADV_SEED, ADV_PARAMETERS, _adv_simulate, None),
        "burgers": (BURGERS_SEED, BURGERS_PARAMETERS,
                    lambda p: _burgers_simulate(p)[:, :, :: BURGERS_FINE // BURGERS_NODES], None),
        "wave_membrane": (WAVE_SEED, WAVE_PARAMETERS, _wave_simulate, None)}[name]
    params = latin_hypercube(np.random.default_rng(seed + LOCKED_SEED_OFFSET), table, LOCKED_RUNS)
    return params, np.asarray(simulate(params), np.float32), [draw(run) for run in params] if draw else None


def generate_locked(name: str, out_dir: Path) -> Path:
    """out_dir/<name>_locked: the problem's locked test runs (dataset1.npy, params.csv, images/), drawn from a
    seed of their own once the defaults were set, so that no development decision has seen them
    (benchmarks/accuracy/NOTES.md, "Protocol"). Cached like `generate`."""
    folder = Path(out_dir) / f"{name}_locked"
    if (folder / "params.csv").is_file():
        return folder
    params, fields, pictures = _locked_runs(name)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "dataset1.npy", fields)
    if pictures is not None:
        (folder / "images").mkdir(exist_ok=True)
        for number, picture in enumerate(pictures, start=1):
            picture.save(folder / "images" / f"{number}.png", optimize=True)
    np.savetxt(folder / "params.csv", params, delimiter=",", fmt="%.10g")     # last: marks a complete folder
    return folder


def node_coordinates(name: str) -> np.ndarray:
    """(N, D) coordinates in m of problem `name`'s nodes, in the dataset's order (each problem's "grid" above)."""
    def grid(side: int, spacing: float, offset: float) -> np.ndarray:
        iy, ix = np.divmod(np.arange(side * side), side)
        return np.stack([ix, iy], 1) * spacing + offset
    return {"heat_inclusion": lambda: grid(HEAT_GRID, HEAT_PLATE / (HEAT_GRID - 1), 0.0),
            "advection_front": lambda: ((np.arange(ADV_NODES) + 0.5) * ADV_LENGTH / ADV_NODES)[:, None],
            "burgers": lambda: (np.arange(BURGERS_NODES) / BURGERS_NODES)[:, None],
            "wave_membrane": lambda: grid(WAVE_CELLS - 1, 1.0 / WAVE_CELLS, 1.0 / WAVE_CELLS),
            "demo": lambda: grid(16, 6.25e-3, 3.125e-3)}[name]()


def _problem(name: str, description: str, shape: tuple, num_param: int, has_images: bool,
             test_runs: int = TEST_RUNS) -> Problem:
    return Problem(name, description, *shape, num_param, has_images, test_runs, partial(generate, name))


PROBLEMS: dict[str, Problem] = {
    "heat_inclusion": _problem(
        "heat_inclusion",
        "Transient heat conduction in a 10 cm steel plate heated by a fixed edge strip with convective "
        "losses, around a circular inclusion whose position, radius and conductivity vary.",
        (NUM_RUNS, HEAT_FRAMES, HEAT_GRID ** 2), len(HEAT_PARAMETERS), True),
    "advection_front": _problem(
        "advection_front",
        "Advection-dispersion (Peclet 150-4000) of a Gaussian pollutant slug along a 10 km river reach, "
        "exact solution.",
        (NUM_RUNS, ADV_FRAMES, ADV_NODES), len(ADV_PARAMETERS), False),
    "burgers": _problem(
        "burgers",
        "1-D viscous Burgers flow on a periodic 1 m domain in which a two-harmonic initial velocity "
        "steepens into travelling, merging and decaying shocks.",
        (NUM_RUNS, BURGERS_FRAMES, BURGERS_NODES), len(BURGERS_PARAMETERS), False),
    "wave_membrane": _problem(
        "wave_membrane",
        "A damped square drum membrane struck by a mallet: waves that cross it twice and interfere with their "
        "reflections, on 4,096 nodes.",
        (NUM_RUNS, WAVE_FRAMES, (WAVE_CELLS - 1) ** 2), len(WAVE_PARAMETERS), False),
    "demo": _problem(
        "demo",
        "The repository's demo: transient heating of a thin steel plate by two mirror-symmetric "
        "circular heaters (input_data/make_demo.py).",
        (80, 32, 256), 4, True, test_runs=16),
}


# ----------------------------------------------------------------------------- difficulty report

def difficulty(folder: Path, modes: int = 32) -> dict:
    """Relative distances of the test runs from the training mean and POD floors at `modes` modes."""
    data = np.load(folder / "dataset1.npy").astype(np.float64)
    split = json.loads((folder / "split.json").read_text())
    train, test = data[split["train"]], data[split["test"]]
    p, t, n = train.shape
    norms = np.linalg.norm(test.reshape(len(test), -1), axis=1)
    mean = train.mean(axis=0)
    dist = np.linalg.norm((test - mean).reshape(len(test), -1), axis=1) / norms
    # run POD: snapshots are whole (T, N) fields, mean-centred
    centred = (train - mean).reshape(p, -1)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:modes]
    resid = (test - mean).reshape(len(test), -1)
    resid = resid - (resid @ basis.T) @ basis
    run_floor = np.linalg.norm(resid, axis=1) / norms
    # frame POD: snapshots are frames [N], not centred
    gram = train.reshape(-1, n).T @ train.reshape(-1, n)
    _, vec = np.linalg.eigh(gram)
    space = vec[:, ::-1][:, :modes]
    frames = test.reshape(-1, n)
    fres = (frames - (frames @ space) @ space.T).reshape(len(test), -1)
    frame_floor = np.linalg.norm(fres, axis=1) / norms
    stats = lambda v: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    return {"distance": stats(dist), "run_pod": stats(run_floor), "frame_pod": stats(frame_floor)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder that receives one subfolder per problem")
    parser.add_argument("--only", nargs="+", choices=sorted(PROBLEMS), help="generate only these problems")
    args = parser.parse_args(argv)
    for name in args.only or list(PROBLEMS):
        start = time.perf_counter()
        folder = generate(name, args.out)
        seconds = time.perf_counter() - start
        shape = tuple(np.load(folder / "dataset1.npy", mmap_mode="r").shape)
        d = difficulty(folder)
        fmt = lambda s: f"mean {100 * s['mean']:.2f} %  min {100 * s['min']:.2f} %  max {100 * s['max']:.2f} %"
        print(f"{name}: shape {shape}, {seconds:.1f} s -> {folder}")
        print(f"  test distance from training mean  {fmt(d['distance'])}")
        print(f"  run POD-32 floor (test)           {fmt(d['run_pod'])}")
        print(f"  frame POD-32 floor (test)         {fmt(d['frame_pod'])}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
