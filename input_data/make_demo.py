"""Generate the demo study: transient heating of a thin plate by two heaters.

Physics
-------
A square carbon-steel plate, 10 cm x 10 cm x 2 mm, starts at the ambient temperature
(20 degC). At t = 0 two identical circular heaters, placed mirror-symmetrically about
the plate's vertical mid-line, are switched on. The plate loses heat from both faces
by convection; its edges are insulated. The thin-plate energy balance is

    rho*c*th * dT/dt = k*th * laplacian(T) - 2*h_c*(T - T_amb) + q(x, y)

with k = 50 W/(m K), rho*c = 3.85e6 J/(m^3 K), th = 2 mm, h_c = 20 W/(m^2 K), and q
the heater's areal power density inside the discs (0 elsewhere).

Discretisation: cell-centred finite volumes on a 16 x 16 grid (N = 256 nodes, the cell
centres), zero-flux edges through mirrored ghost cells, explicit Euler in time with a
step well inside the stability limit dt <= 1 / (4*alpha/h^2 + 2*h_c/(rho*c*th)). The
heater term of each cell is q times the fraction of the cell the discs cover
(supersampled), so the source varies smoothly with every parameter. T = 32 frames are
saved at t = 3.75, 7.5, ..., 120 s (the uniform initial state is not stored).

Node k is cell (iy, ix) = divmod(k, 16), centred at x = (ix + 0.5) * 6.25 mm,
y = (iy + 0.5) * 6.25 mm, y pointing up.

Parameters (params.csv columns, in this order; seeded Latin-hypercube sample)
---------------------------------------------------------------------------
1. heater_offset  distance of each heater centre from the vertical mid-line  1.5 - 3.3 cm
2. heater_height  height of the heater centres above the bottom edge        2.5 - 7.5 cm
3. heater_radius  radius of each heater disc                                0.6 - 1.4 cm
4. heater_flux    areal power density inside the discs                      0.5 - 2.0 W/cm^2

The values are rounded to 4 decimals before simulating, so params.csv holds exactly the
values that produced each run.

Pictures (images/<run>.png, 256 x 256, 8-bit greyscale, y up)
-------------------------------------------------------------
Black plate, white 4-pixel frame at the plate edge, the two heater discs drawn with
anti-aliased edges at a grey level that encodes heater_flux (80 at 0.5 W/cm^2 to 230 at
2.0 W/cm^2). Position and radius are the discs' geometry, so every parameter is
visible. The white frame keeps the grey levels meaningful even if an image is min-max
normalised on its own. Because the geometry (and hence the field) is mirror-symmetric,
a horizontal flip of a picture, the original's image augmentation, is label-preserving.

Outputs: dataset1.npy (float32 [P, T, N], degC), params.csv (no header, P rows),
images/1.png ... images/P.png. Run `python input_data/make_demo.py`; the output is
byte-identical on every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20240607
NUM_RUNS = 80                # P
GRID = 16                    # cells per side; N = GRID**2
NUM_FRAMES = 32              # T
FRAME_INTERVAL = 3.75        # s between saved frames

PLATE = 0.10                 # m, side length
THICKNESS = 0.002            # m
CONDUCTIVITY = 50.0          # W/(m K)
RHO_C = 3.85e6               # J/(m^3 K)
H_CONV = 20.0                # W/(m^2 K), per face
T_AMBIENT = 20.0             # degC

# name, low, high, unit (the unit of the params.csv column)
PARAMETERS = (
    ("heater_offset", 1.5, 3.3, "cm"),
    ("heater_height", 2.5, 7.5, "cm"),
    ("heater_radius", 0.6, 1.4, "cm"),
    ("heater_flux", 0.5, 2.0, "W/cm^2"),
)

IMAGE_SIZE = 256
IMAGE_SUPERSAMPLE = 4
FRAME_PIXELS = 4
GREY_MIN, GREY_MAX = 80, 230
SOURCE_SUPERSAMPLE = 16      # sub-points per cell side for the heater coverage


def latin_hypercube(rng: np.random.Generator, num_runs: int) -> np.ndarray:
    """One stratified sample per run and parameter: (P, num_param), physical units, rounded."""
    columns = []
    for _, low, high, _ in PARAMETERS:
        unit = (rng.permutation(num_runs) + rng.random(num_runs)) / num_runs
        columns.append(low + unit * (high - low))
    return np.round(np.stack(columns, axis=1), 4)


def disc_coverage(run_params: np.ndarray, cells: int, sub: int) -> np.ndarray:
    """Fraction of each of cells x cells square cells covered by the two heater discs.

    Row 0 is the bottom of the plate (y up); returns (cells, cells) float64.
    """
    offset, height, radius = run_params[:3] / 100.0                    # cm -> m
    fine = cells * sub
    centres = (np.arange(fine) + 0.5) / fine * PLATE                  # (fine,) m
    x, y = centres[None, :], centres[:, None]
    inside = np.zeros((fine, fine), dtype=bool)                         # (y, x)
    for cx in (PLATE / 2 - offset, PLATE / 2 + offset):
        inside |= (x - cx) ** 2 + (y - height) ** 2 <= radius ** 2
    return inside.reshape(cells, sub, cells, sub).mean(axis=(1, 3))


def simulate(params: np.ndarray) -> np.ndarray:
    """Explicit finite-volume heat conduction for all runs at once: (P, T, N) float32 degC."""
    h = PLATE / GRID
    alpha = CONDUCTIVITY / RHO_C
    loss = 2.0 * H_CONV / (RHO_C * THICKNESS)                           # 1/s
    dt_limit = 1.0 / (4.0 * alpha / h**2 + loss)
    substeps = int(np.ceil(FRAME_INTERVAL / (0.5 * dt_limit)))          # dt <= half the limit
    dt = FRAME_INTERVAL / substeps

    flux = params[:, 3] * 1e4                                           # W/cm^2 -> W/m^2
    coverage = np.stack([disc_coverage(p, GRID, SOURCE_SUPERSAMPLE) for p in params])
    heating = flux[:, None, None] * coverage / (RHO_C * THICKNESS)      # (P, G, G) K/s

    rise = np.zeros((len(params), GRID, GRID))                          # T - T_amb, (P, G, G)
    frames = np.empty((len(params), NUM_FRAMES, GRID * GRID), dtype=np.float32)
    for frame in range(NUM_FRAMES):
        for _ in range(substeps):
            padded = np.pad(rise, ((0, 0), (1, 1), (1, 1)), mode="edge")  # zero-flux ghost cells
            laplacian = (padded[:, 2:, 1:-1] + padded[:, :-2, 1:-1] + padded[:, 1:-1, 2:]
                         + padded[:, 1:-1, :-2] - 4.0 * rise) / h**2
            rise = rise + dt * (alpha * laplacian - loss * rise + heating)
        frames[:, frame] = (T_AMBIENT + rise).reshape(len(params), GRID * GRID)
    print(f"explicit Euler: dt = {dt:.4f} s (stability limit {dt_limit:.4f} s), "
          f"{substeps * NUM_FRAMES} steps to t = {FRAME_INTERVAL * NUM_FRAMES:g} s")
    return frames


def draw(run_params: np.ndarray) -> Image.Image:
    """The run's geometry picture: 8-bit greyscale, y up."""
    _, _, _, flux = run_params
    low, high = PARAMETERS[3][1:3]
    grey = GREY_MIN + (GREY_MAX - GREY_MIN) * (flux - low) / (high - low)
    coverage = disc_coverage(run_params, IMAGE_SIZE, IMAGE_SUPERSAMPLE)[::-1]  # row 0 = top
    pixels = np.round(grey * coverage).astype(np.uint8)
    frame = FRAME_PIXELS
    pixels[:frame, :] = pixels[-frame:, :] = pixels[:, :frame] = pixels[:, -frame:] = 255
    return Image.fromarray(pixels, mode="L")


def main(out: Path | None = None) -> None:
    """Write the demo files into `out` (default: the folder of this script)."""
    out = Path(__file__).resolve().parent if out is None else Path(out)
    rng = np.random.default_rng(SEED)
    params = latin_hypercube(rng, NUM_RUNS)
    fields = simulate(params)

    np.save(out / "dataset1.npy", fields)
    np.savetxt(out / "params.csv", params, fmt="%.4f", delimiter=",")
    images = out / "images"
    images.mkdir(exist_ok=True)
    for stale in images.glob("*.png"):
        stale.unlink()
    for run, run_params in enumerate(params, start=1):
        draw(run_params).save(images / f"{run}.png", optimize=True)

    files = [out / "dataset1.npy", out / "params.csv", *sorted(images.glob("*.png"))]
    total = sum(f.stat().st_size for f in files)
    p, t, n = fields.shape
    print(f"P = {p} runs, T = {t} time steps, N = {n} nodes; "
          f"temperature {fields.min():.2f} .. {fields.max():.2f} degC")
    print(f"dataset1.npy {(out / 'dataset1.npy').stat().st_size / 1e6:.2f} MB, "
          f"params.csv {(out / 'params.csv').stat().st_size / 1e3:.1f} kB, "
          f"{p} images {sum(f.stat().st_size for f in files[2:]) / 1e3:.1f} kB, "
          f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
