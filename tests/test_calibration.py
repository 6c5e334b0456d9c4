"""Calibration numbers and the conformal spread scale (modules/calibration.py) on
synthetic predictive distributions whose right answers are known."""
import numpy as np

from modules.calibration import (band_scales, calibration_metrics, coverage, crps, crps_scale, scale_about,
                                 spread_and_error, spread_scale, widen)


def gaussian_case(seed: int, runs: int = 30, k: int = 200, sigma_true: float = 1.0, sigma_samples: float = 1.0):
    """Per run its own error scale s_r; truth = centre + s_r·σ_true·ε, samples = centre + s_r·σ_s·η."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(runs, 4, 50)) + 10
    s = rng.uniform(0.5, 3.0, size=(runs, 1, 1))
    truth = centre + s * sigma_true * rng.normal(size=centre.shape)
    samples = centre[:, None] + s[:, None] * sigma_samples * rng.normal(size=(runs, k, 4, 50))
    return samples, centre, truth


def test_a_calibrated_distribution_scores_as_calibrated():
    samples, centre, truth = gaussian_case(0)
    m = calibration_metrics(samples, centre, truth)
    assert abs(m["coverage_90"] - 0.9) < 0.02 and abs(m["coverage_50"] - 0.5) < 0.02
    assert abs(m["spread_skill"] - 1.0) < 0.05
    assert m["spread_error_spearman"] > 0.8             # runs with larger errors get larger spreads
    assert m["runs"] == 30 and m["samples"] == 200
    assert m["mae"] == np.abs(centre - truth).mean()
    # a calibrated Gaussian's expected CRPS is σ/√π against the point MAE's σ·√(2/π): a ratio of 1/√2
    assert abs(m["crps"] / m["mae"] - 2 ** -0.5) < 0.02
    collapsed = calibration_metrics(centre[:, None] + 0 * samples[:, :2], centre, truth)
    assert collapsed["crps"] == collapsed["mae"]          # no spread: the CRPS is the MAE


def test_the_spread_scale_fixes_an_overconfident_distribution():
    samples, centre, truth = gaussian_case(1, sigma_samples=0.4)
    assert coverage(samples, truth, 0.9) < 0.5
    scale = spread_scale(samples, centre, truth)
    assert 2.2 < scale < 2.8                              # 1 / 0.4, up to sampling noise
    scaled = scale_about(samples, centre, scale)
    assert abs(coverage(scaled, truth, 0.9) - 0.9) < 0.005          # by construction on these values
    fresh_samples, fresh_centre, fresh_truth = gaussian_case(2, sigma_samples=0.4)   # and on new ones
    assert abs(coverage(scale_about(fresh_samples, fresh_centre, scale), fresh_truth, 0.9) - 0.9) < 0.02
    wide = gaussian_case(3, sigma_samples=3.0)
    assert spread_scale(*wide) < 0.45                     # an underconfident one is narrowed


def test_crps_equals_its_definition():
    rng = np.random.default_rng(4)
    samples, truth = rng.normal(size=(3, 7, 2, 5)), rng.normal(size=(3, 2, 5))
    first = np.abs(samples - truth[:, None]).mean(axis=1)
    pairwise = np.abs(samples[:, :, None] - samples[:, None, :]).mean(axis=(1, 2))
    np.testing.assert_allclose(crps(samples, truth), (first - 0.5 * pairwise).mean(), rtol=1e-12)
    # a sharper distribution centred on the truth scores better than a wide one
    assert crps(truth[:, None] + 0.1 * samples, truth) < crps(truth[:, None] + samples, truth)


def test_each_band_gets_its_own_scale_when_the_errors_have_heavier_tails_than_the_samples():
    """Student-t errors against Gaussian samples: one scale cannot make both bands right."""
    rng = np.random.default_rng(5)
    centre = np.zeros((40, 3, 30))
    truth = rng.standard_t(3, size=centre.shape)
    samples = rng.normal(size=(40, 100, 3, 30))
    scales = band_scales(samples, centre, truth)
    assert scales[0.9] > 1.2 * scales[0.5]                      # the tails need more widening
    m = calibration_metrics(samples, centre, truth, scales)
    assert abs(m["coverage_50"] - 0.5) < 0.005 and abs(m["coverage_90"] - 0.9) < 0.005
    one = calibration_metrics(scale_about(samples, centre, scales[0.9]), centre, truth)
    assert one["coverage_50"] > 0.55                            # the 90 % scale alone over-covers the 50 % band


def test_the_crps_scale_recovers_the_true_spread_and_minimises_the_crps():
    """CRPS is a proper score: for Gaussian samples 0.4 times too narrow the minimising factor
    is 1 / 0.4. With heavy-tailed errors it stays below the 90 % band's conformal factor, and
    scores better than that factor does."""
    samples, centre, truth = gaussian_case(1, sigma_samples=0.4)
    scale = crps_scale(samples, centre, truth, most=10.0)
    assert 2.3 < scale < 2.7
    best = crps(scale_about(samples, centre, scale), truth)
    assert best < min(crps(scale_about(samples, centre, scale * f), truth) for f in (0.9, 1.1))
    rng = np.random.default_rng(6)
    centre = np.zeros((40, 3, 30))
    truth = rng.standard_t(2, size=centre.shape) * rng.uniform(0.05, 1.0, size=centre.shape)
    samples = rng.normal(size=(40, 100, 3, 30))
    scale, band90 = crps_scale(samples, centre, truth, most=20.0), band_scales(samples, centre, truth)[0.9]
    assert scale < 0.8 * band90
    assert crps(scale_about(samples, centre, scale), truth) < crps(scale_about(samples, centre, band90), truth)


def test_widen_adds_the_difficulty_to_each_runs_relative_spread_in_quadrature():
    """Surrogate draws widened by the difficulty model: each run's relative spread, as
    spread_and_error measures it, becomes scale·√(s² + d²); d = 0 leaves a run as it was."""
    samples, centre, _ = gaussian_case(6, runs=4, k=32)
    difficulty = np.array([0.0, 0.01, 0.05, 0.2])
    before, _ = spread_and_error(samples, centre, centre)
    out = widen(samples, centre, difficulty, 1.5)
    after, _ = spread_and_error(out, centre, centre)
    np.testing.assert_allclose(after, 1.5 * np.sqrt(before ** 2 + difficulty ** 2), rtol=1e-9)
    np.testing.assert_allclose(out[0], centre[0] + 1.5 * (samples[0] - centre[0]), rtol=1e-12)
    flat = centre[:, None].repeat(3, 1)
    np.testing.assert_array_equal(widen(flat, centre, difficulty), flat)        # no spread: nothing to widen


def test_band_edges_stay_in_order_when_the_two_bands_scales_and_the_median_disagree():
    """A 90 % band narrowed about the point prediction while the draws' median lies to one side
    of it: the edges are put back in order, so the 90 % band holds the 50 % band and the median."""
    from modules.predict import band_arrays
    rng = np.random.default_rng(11)
    centre = np.zeros((2, 3, 4))
    samples = rng.normal(-0.8, 1.0, size=(2, 8, 3, 4))            # median well below the point prediction
    bands = band_arrays(samples, centre, {0.5: 1.0, 0.9: 0.3})
    order = np.stack([bands[k] for k in ("q05", "q25", "q50", "q75", "q95")])
    assert (np.diff(order, axis=0) >= 0).all()
    scale = {5: 0.3, 25: 1.0, 75: 1.0, 95: 0.3}
    raw = [centre + scale[q] * (np.percentile(samples, q, axis=1) - centre) for q in (5, 25)]
    raw += [np.median(samples, axis=1)]
    raw += [centre + scale[q] * (np.percentile(samples, q, axis=1) - centre) for q in (75, 95)]
    assert (raw[0] > raw[2]).any()                                    # the case the rearrangement repairs
    np.testing.assert_allclose(order, np.sort(np.stack(raw), axis=0), rtol=1e-5, atol=1e-6)   # the same values
