"""The reflection model (live_bgsub.reflections) and the two metric paths that share it.

``roi_metrics`` (numpy, every frame) and the device path's window metrics
(``device_path.fit_windows`` frozen into weights, read by one product per frame) must give
the same S10, I10, I11 and M3 on the same corrected fold. Here the fold is the reference
fold itself: a noisy synthetic Pilatus frame folded with its true geometry, minus its
folded true background. The device's last step is evaluated by its host twin
(``device_path._metrics_from_coef``, float64, on the float32 window weights the device
holds); ``test_device_path.test_window_metrics_on_device_equal_host_twin`` checks the
compiled device function against that twin (rtol 1e-4).

Tolerances of the agreement, and why. The windows are frozen at roi_metrics' own equator
fit: its S10 is the windows' reference S10 bit for bit. What remains is the window
model's extra columns: the first and second position derivatives of the 1,0, 1,1 and M3
peaks (``docs/device.md``), which roi_metrics' joint non-linear fit does not have. On the
reference fold they only absorb part of the noise, so the two readings differ by a small
fraction of their statistical error. Measured on this kind of fold (Pilatus, counts=16,
seeds 1-40, with and without the geometry): S10 <= 5e-4 relative, I10 <= 5e-4,
I11 <= 1.2e-3, M3 position <= 0.011 px, M3 intensity <= 1 %. Asserted with about twice that
margin: S10 1e-3 relative, I10 1e-3, I11 2.5e-3, M3 position 0.03 px, M3 intensity 2 %,
10 to 30 times tighter than the device path's tolerances across the frames of a run (S10
moving by 1 %: 0.1 px, 3 %, 0.6 px, 20 %). A drift of one path's model (another window,
peak shape, sector or coverage rule) moves these readings by percents.
"""

import math

import numpy as np
import pytest

from live_bgsub import reflections as rf
from live_bgsub.device_path import WINDOW_COLUMNS, _metrics_from_coef, fit_windows
from live_bgsub.fold import fold
from live_bgsub.geometry import Geometry
from live_bgsub.metrics import roi_metrics
from live_bgsub.synth import make_pattern

GEOMETRY_KEYS = ("wavelength_nm", "distance_mm", "pixel_size_mm")

# (relative, absolute px) tolerances of the agreement: see the module docstring.
S10_REL = 1e-3
I10_REL = 1e-3
I11_REL = 2.5e-3
M3_PX = 0.03
M3_I_REL = 0.02


def _corrected_fold(seed, counts=16.0):
    """A noisy synthetic frame folded with its true geometry, minus its folded true background."""
    pat = make_pattern("pilatus-1m", seed=seed, counts=counts)
    geometry = Geometry(pat.params["center"], pat.params["rotation_deg"])
    frame, count = fold(pat.frame, geometry, pat.mask)
    background, _ = fold(pat.background, geometry, pat.mask)
    valid = count > 0
    return np.where(valid, frame - background, 0.0).astype(np.float32), valid, background, pat


def _window_metrics(corrected, fit, geometry):
    """The device's window metrics of ``corrected`` (host twin, float64 sums of float32 weights)."""
    hm, wm = fit.shape
    coef = corrected[None, :hm, :wm].reshape(1, -1).astype(np.float64) @ fit.matrix.astype(np.float64)
    reference = (fit.s10_px, fit.m3_px if fit.m3_found else 0.0, geometry, float(fit.equator_found), float(fit.m3_found))
    return {k: float(v[0]) for k, v in _metrics_from_coef(coef, [0.0], [0.0], reference).items()}


@pytest.mark.parametrize("seed, with_geometry", [(4, True), (12, False)])
def test_roi_metrics_and_window_metrics_agree_on_the_same_fold(seed, with_geometry):
    corrected, valid, background, pat = _corrected_fold(seed)
    roi = {k: pat.params[k] for k in GEOMETRY_KEYS} if with_geometry else {}
    geometry = pat.params["wavelength_nm"] * pat.params["distance_mm"] / pat.params["pixel_size_mm"] if roi else math.nan

    ref = roi_metrics(corrected, mask=valid, background=background, **roi)
    fit = fit_windows(corrected, valid, background=background, **roi)
    dev = _window_metrics(corrected, fit, geometry)

    assert ref["equator_found"] and fit.equator_found, ref["reason"]
    assert ref["reason"] is None and fit.m3_found
    assert fit.matrix.shape[1] == len(WINDOW_COLUMNS)
    # One model, one fit: the windows are frozen at roi_metrics' own equator fit.
    assert fit.s10_px == ref["s10_px"]
    assert fit.params["roi_metrics"]["i10"] == ref["i10"]
    assert fit.m3_px == pytest.approx(ref["m3_px"], abs=M3_PX)

    assert dev["s10_px"] == pytest.approx(ref["s10_px"], rel=S10_REL)
    assert dev["i10"] == pytest.approx(ref["i10"], rel=I10_REL)
    assert dev["i11"] == pytest.approx(ref["i11"], rel=I11_REL)
    assert dev["m3_px"] == pytest.approx(ref["m3_px"], abs=M3_PX)
    assert dev["m3_intensity"] == pytest.approx(ref["m3_intensity"], rel=M3_I_REL)
    # Both near the truth (the noise is common to both and much larger than their difference).
    assert ref["s10_px"] == pytest.approx(pat.params["s10_px"], rel=0.01)
    if with_geometry:
        assert dev["d10_nm"] == pytest.approx(ref["d10_nm"], rel=S10_REL)


# --------------------------------------------------------------------------- the model's pieces


@pytest.mark.parametrize("center, sigma", [(20.0, 1.5), (55.0, 2.2), (140.0, 4.0)])
def test_arced_peak_integrates_to_one(center, sigma):
    r = np.linspace(0.0, center + 12 * sigma, 200_001)
    y = rf.arced_peak(r, center, sigma)
    integral = float(np.sum((y[1:] + y[:-1]) * np.diff(r)) / 2)
    assert integral == pytest.approx(1.0, abs=1e-9)


def test_arced_peak_derivatives_are_the_centre_derivatives():
    r = np.linspace(30.0, 80.0, 501)
    c, s, h = 55.0, 2.2, 1e-4
    d1, d2 = rf.arced_peak_derivatives(r, c, s)
    up, mid, down = (rf.arced_peak(r, c + k * h, s) for k in (1, 0, -1))
    scale = float(np.abs(mid).max())
    np.testing.assert_allclose(d1, (up - down) / (2 * h), rtol=0, atol=1e-7 * scale)
    np.testing.assert_allclose(d2, (up - 2 * mid + down) / h**2, rtol=0, atol=1e-4 * scale)


def _profile(r, values, ok):
    """A :class:`SectorProfile` with given values (unit variances)."""
    prof = object.__new__(rf.SectorProfile)
    prof.r, prof.values, prof.ok = r, np.where(ok, values, 0.0), ok
    prof.var = np.where(ok, 1.0, np.inf)
    prof.width_deg = 15.0
    return prof


def test_equator_search_and_fit_recover_a_clean_profile():
    s10, sigma_c, sigma_k, z_ratio, sigma_z = 47.3, 2.0, 0.015, 1.46, 2.4
    intensities = np.array([5000.0, 800.0, 3500.0, 600.0])
    baseline = np.array([20.0, -8.0, 3.0])
    rmax = 200.0
    r = np.arange(0.0, 202.0)
    model = np.column_stack(rf.equator_columns(r, s10, sigma_c, sigma_k, z_ratio, sigma_z))
    values = model @ np.r_[intensities, baseline]
    ok = (r >= 8) & (r < rmax)
    prof = _profile(r, values, ok)
    r_first = 8.0

    found = rf.search_equator(prof, *rf.s10_search_range(r_first, rmax), r_first, rmax)
    assert found is not None
    best, strongest = found
    assert best[1] == pytest.approx(s10, abs=0.3)  # on the search grid (0.25 px steps here)
    p, err = rf.fit_equator(prof, best[1], best[2], best[3], r_first, rmax)
    np.testing.assert_allclose(p[:5], [s10, sigma_c, sigma_k, z_ratio, sigma_z], rtol=1e-5)
    np.testing.assert_allclose(p[5:9], intensities, rtol=1e-5)
    positions, sigmas = rf.equator_positions(*p[:5])
    assert positions[2] == pytest.approx(math.sqrt(3) * s10, rel=1e-5)
    assert sigmas[0] == pytest.approx(math.hypot(sigma_c, sigma_k * s10), rel=1e-4)
    assert rf.t_value(p[5], err[5]) > 100


def test_single_peak_fit_recovers_a_clean_peak():
    r = np.arange(0.0, 300.0)
    values = 900.0 * rf.arced_peak(r, 131.4, 2.5) + 15.0 - 4.0 * (r - 131.4) / 131.4
    prof = _profile(r, values, r < 290)
    lo, hi, margin = rf.m3_search_range(131.4 / 2.6)
    centre, intensity, t, sigma = rf.fit_single_peak(prof, lo, hi, margin)
    assert centre == pytest.approx(131.4, abs=1e-4)
    assert intensity == pytest.approx(900.0, rel=1e-4)
    assert sigma == pytest.approx(2.5, rel=1e-4)
    assert t > 100


def test_search_ranges_and_sectors():
    assert rf.m3_search_range(50.0) == pytest.approx((115.0, 147.5, 0.08 * 115.0))
    c = 1e5 / rf.M3_SPACING_NM
    assert rf.m3_search_range(50.0, 1e5) == pytest.approx((0.9 * c, 1.1 * c, 0.072 * c))
    assert rf.s10_search_range(4.0, 300.0) == (7.0, 150.0)
    assert rf.equator_window(50.0, 10.0, 100.0) == (30.0, 100.0)
    assert rf.sector("equator", 15.0) == {"axis": "equator", "lo_deg": 0.0, "hi_deg": 15.0}
    assert rf.sector("off-axis", 15.0) == {"axis": "equator", "lo_deg": 30.0, "hi_deg": 75.0}
    assert rf.sector("meridian", 15.0) == {"axis": "meridian", "lo_deg": 75.0, "hi_deg": 90.0}
    with pytest.raises(ValueError, match="sector must be"):
        rf.sector("diagonal", 15.0)
    grid = rf.search_grid(10.0, 200.0)
    assert grid[0] == 10.0 and grid[-1] <= 200.0 and np.diff(grid).min() == pytest.approx(0.25)
    assert rf.t_value(3.0, 0.0) == math.inf and rf.t_value(-3.0, 0.0) == -math.inf and rf.t_value(3.0, 2.0) == 1.5


def test_sector_profile_counts_both_mirror_halves():
    # A uniform fold of ones: the equatorial profile at radius k is the number of
    # unfolded detector pixels per pixel of radius in the sector, both halves across the
    # equator: 2 * k * (sector width in radians), up to the pixelation of the sector's
    # edge (+-5 % per bin at k = 30), which averages out over radii.
    fold_ = np.ones((120, 120))
    valid = np.ones(fold_.shape, bool)
    prof = rf.SectorProfile(fold_, valid, rmax=100.0, **rf.sector("equator", 15.0))
    k = np.arange(30, 90)
    np.testing.assert_allclose(prof.values[k], 2 * k * math.radians(15.0), rtol=0.06)
    assert prof.values[k].sum() == pytest.approx(np.sum(2 * k * math.radians(15.0)), rel=0.005)
    bins = rf.sector_bins(valid, rmax=100.0, **rf.sector("equator", 15.0))
    assert bins.ok[k].all() and not bins.ok[100:].any()
    assert prof.covers(50.0, 2.0) and prof.width_deg == 15.0
    r, y, var = prof.window(40, 60)
    assert r[0] == 40 and r[-1] == 60 and np.isfinite(var).all()
    # A gap over every quadrant at radius 50: not covered, those bins not used.
    holed = valid & ~((np.hypot(*np.indices(fold_.shape)) > 47) & (np.hypot(*np.indices(fold_.shape)) < 53))
    gap = rf.SectorProfile(fold_, holed, rmax=100.0, **rf.sector("equator", 15.0))
    assert not gap.covers(50.0, 1.5) and not gap.ok[49:52].any()
