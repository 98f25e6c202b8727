"""Tests of the synthetic fiber-diffraction generator (live_bgsub.synth)."""

import math
import time

import numpy as np
import pytest

from live_bgsub import synth
from live_bgsub.synth import PRESETS, SyntheticPattern, make_pattern, make_powder

PARAM_KEYS = {
    "center", "rotation_deg", "s10_px", "i10", "i11", "i11_i10", "m3_px", "m3_intensity",
    "preset", "seed", "d10_nm", "counts", "sigma_c_px", "sigma_k", "sigma_phi_deg",
    "bg_a", "bg_b", "bg_c", "bg_d", "bg_e", "wavelength_nm", "distance_mm", "pixel_size_mm",
    "reflections", "layer_lines", "beam_stop_radius_px", "n_dead",
}  # fmt: skip


@pytest.fixture(scope="module")
def pilatus():
    return make_pattern(seed=11)


def _equatorial_spot_centroid(signal, center, angle_deg, s10, half=None):
    """Intensity centroid (x, y) of the signal in a window around one 1,0 spot."""
    a = math.radians(angle_deg)
    x0, y0 = center[0] + s10 * math.cos(a), center[1] + s10 * math.sin(a)
    half = half or int(0.25 * s10)
    ys, xs = slice(int(y0) - half, int(y0) + half + 1), slice(int(x0) - half, int(x0) + half + 1)
    win = signal[ys, xs].astype(np.float64)
    yy, xx = np.mgrid[ys, xs]
    return (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()


# --------------------------------------------------------------------------- API


def test_result_fields_and_params(pilatus):
    assert isinstance(pilatus, SyntheticPattern)
    for name in ("frame", "background", "signal"):
        arr = getattr(pilatus, name)
        assert arr.dtype == np.float32 and arr.shape == (1043, 981)
    assert pilatus.mask.dtype == bool and pilatus.mask.shape == (1043, 981)
    assert PARAM_KEYS <= set(pilatus.params)
    p = pilatus.params
    assert p["preset"] == "pilatus-1m" and p["seed"] == 11
    assert p["i11_i10"] == pytest.approx(p["i11"] / p["i10"])
    assert 40 <= p["s10_px"] <= 70 and 0.3 <= p["i11_i10"] <= 2.2
    assert -10 <= p["rotation_deg"] <= 10
    assert abs(p["center"][0] - 410) <= 40 and abs(p["center"][1] - 491) <= 40
    # M3 at S10 * d10 / 14.3 nm and d10 = lambda L / (S10 pixel).
    assert p["m3_px"] == pytest.approx(p["s10_px"] * p["d10_nm"] / 14.3)
    assert p["d10_nm"] == pytest.approx(p["wavelength_nm"] * p["distance_mm"] / (p["s10_px"] * p["pixel_size_mm"]))


def test_outputs_are_zero_at_invalid_pixels(pilatus):
    bad = ~pilatus.mask
    assert not pilatus.frame[bad].any()
    assert not pilatus.background[bad].any()
    assert not pilatus.signal[bad].any()
    assert (pilatus.background[pilatus.mask] > 0).all()


def test_same_seed_same_arrays_different_seed_different():
    a, b, c = make_pattern(seed=5), make_pattern(seed=5), make_pattern(seed=6)
    for name in ("frame", "background", "signal", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.params["s10_px"] == b.params["s10_px"]
    assert not np.array_equal(a.frame, c.frame)
    assert a.params["s10_px"] != c.params["s10_px"]


def test_seed_none_is_recorded_and_reproducible():
    a = make_pattern(seed=None)
    b = make_pattern(seed=a.params["seed"])
    np.testing.assert_array_equal(a.frame, b.frame)


def test_overrides_replace_one_value_and_keep_the_rest():
    base = make_pattern(seed=3)
    over = make_pattern(seed=3, s10_px=55.0, i11_i10=0.5)
    assert over.params["s10_px"] == 55.0 and over.params["i11_i10"] == 0.5
    assert over.params["i11"] == pytest.approx(0.5 * over.params["i10"])
    assert over.params["i10"] == base.params["i10"]
    assert over.params["center"] == base.params["center"]
    assert over.params["bg_a"] == base.params["bg_a"]
    np.testing.assert_array_equal(over.background, base.background)


def test_counts_scales_expectation():
    a = make_pattern(seed=4, noise=False)
    b = make_pattern(seed=4, noise=False, counts=3.0)
    np.testing.assert_allclose(b.background, 3 * a.background, rtol=1e-6)
    np.testing.assert_allclose(b.signal, 3 * a.signal, rtol=1e-5, atol=1e-6)
    assert b.params["i10"] == pytest.approx(3 * a.params["i10"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown detector preset"):
        make_pattern("pilatus-2m")
    with pytest.raises(TypeError, match="unknown override"):
        make_pattern(seed=1, s11_px=3)
    with pytest.raises(ValueError, match="counts"):
        make_pattern(seed=1, counts=0)


# --------------------------------------------------------------------------- detectors


@pytest.mark.parametrize("name", ["pilatus-1m", "mar"])
def test_preset_shapes_and_dtypes(name):
    pat = make_pattern(name, seed=2)
    det = PRESETS[name]
    assert pat.frame.shape == det.shape and pat.frame.dtype == np.float32
    assert pat.background.dtype == np.float32 and pat.signal.dtype == np.float32
    raw = pat.raw()
    assert raw.dtype == np.int32 and raw.shape == det.shape
    # S10 scales with the pixel size (same camera length).
    k = 0.172 / det.pixel_size_mm
    assert 40 * k <= pat.params["s10_px"] <= 70 * k


@pytest.mark.slow
def test_eiger_preset_shape_gaps_and_speed():
    make_pattern("eiger2-9m", seed=0)  # warm-up
    t0 = time.perf_counter()
    pat = make_pattern("eiger2-9m", seed=1)
    elapsed = time.perf_counter() - t0
    assert pat.frame.shape == (3262, 3108) and pat.frame.dtype == np.float32
    valid = PRESETS["eiger2-9m"].valid_mask()
    # 3 x 6 modules of 1028 x 512 px, gaps of 12 (columns) and 38 (rows) px.
    assert not valid[512:550].any() and not valid[:, 1028:1040].any()
    assert valid[:512, :513].all()
    assert not valid[:, 513:515].any()  # modelled chip seam
    assert elapsed < 5.0


def test_pilatus_gaps_are_masked_and_sentinels(pilatus):
    gap_rows = [r for start in (195, 407, 619, 831) for r in range(start, start + 17)]
    gap_cols = list(range(487, 494))
    assert not pilatus.mask[gap_rows].any()
    assert not pilatus.mask[:, gap_cols].any()
    valid = PRESETS["pilatus-1m"].valid_mask()
    assert (~valid).sum() == 73533  # the -1 pixels of a real BioCAT Pilatus 1M frame
    raw = pilatus.raw()
    assert (raw == -1).sum() == 73533
    assert (raw == -2).sum() == pilatus.params["n_dead"] > 0
    assert ((raw == -1) == ~valid).all()
    # The beam-stop shadow is masked but reads 0 counts, as on the detector.
    cx, cy = pilatus.params["center"]
    assert not pilatus.mask[int(round(cy)), int(round(cx))]
    assert raw[int(round(cy)), int(round(cx))] == 0
    np.testing.assert_array_equal(raw[pilatus.mask], pilatus.frame[pilatus.mask].astype(np.int32))


def test_mar_active_area_is_circular():
    valid = PRESETS["mar"].valid_mask()
    assert valid[1024, 1024] and valid[1024, 2] and not valid[0, 0] and not valid[2047, 2047]


# --------------------------------------------------------------------------- physics


def test_frame_matches_expectation_within_poisson_error(pilatus):
    m = pilatus.mask
    lam = pilatus.background.astype(np.float64) + pilatus.signal
    for region in (np.s_[:, :], np.s_[600:1000, 500:900], np.s_[400:600, 300:520]):
        sel = m[region]
        observed = pilatus.frame[region][sel].astype(np.float64).sum()
        expected = lam[region][sel].sum()
        assert abs(observed - expected) < 5 * math.sqrt(expected)


def test_realistic_count_statistics():
    # BioCAT Pilatus muscle frames: median 1-2 counts, 99th percentile ~20, max ~1000.
    for seed in range(4):
        pat = make_pattern(seed=seed)
        v = pat.frame[pat.mask]
        assert 1 <= np.median(v) <= 2.5
        assert 15 <= np.percentile(v, 99) <= 35
        assert 150 <= v.max() <= 2000


def test_true_center_and_rotation_are_honoured():
    for seed, vertical in ((21, False), (22, False), (23, True)):
        pat = make_pattern(seed=seed, vertical=vertical, noise=False)
        p = pat.params
        a = p["equator_angle_deg"]
        right = _equatorial_spot_centroid(pat.signal, p["center"], a, p["s10_px"])
        left = _equatorial_spot_centroid(pat.signal, p["center"], a + 180.0, p["s10_px"])
        mid = ((right[0] + left[0]) / 2, (right[1] + left[1]) / 2)
        assert mid == pytest.approx(p["center"], abs=0.05)
        angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
        assert angle == pytest.approx(a, abs=0.05)
        # An arc's centroid sits a little inside its radius (by r * sigma_phi^2 / 2).
        half_dist = math.hypot(right[0] - left[0], right[1] - left[1]) / 2
        assert half_dist == pytest.approx(p["s10_px"], abs=0.3)


def test_equator_sign_convention():
    # rotation_deg = +5: the equator's right-hand side dips toward larger rows.
    pat = make_pattern(seed=8, rotation_deg=5.0, noise=False)
    p = pat.params
    assert synth._EQUATOR_SIGN in (1.0, -1.0)
    assert p["equator_angle_deg"] == synth._EQUATOR_SIGN * 5.0
    x, y = _equatorial_spot_centroid(pat.signal, p["center"], p["equator_angle_deg"], p["s10_px"])
    assert math.copysign(1.0, y - p["center"][1]) == synth._EQUATOR_SIGN
    assert x > p["center"][0]


def test_vertical_equator_option():
    pat = make_pattern(seed=9, vertical=True, noise=False)
    p = pat.params
    assert p["vertical"] and abs(p["rotation_deg"]) >= 80
    cx, cy = p["center"]
    s = p["s10_px"]
    # The 1,0 spots lie above and below the centre, not left and right of it.
    col = pat.signal[int(cy - s - 20) : int(cy + s + 21), int(cx) - 3 : int(cx) + 4].sum()
    row = pat.signal[int(cy) - 3 : int(cy) + 4, int(cx - s - 20) : int(cx + s + 21)].sum()
    assert col > 20 * row
    assert make_pattern(seed=9, rotation_deg=-89.4).params["vertical"]


def test_signal_has_fourfold_mirror_symmetry():
    cx, cy = 400, 500
    pat = make_pattern(seed=13, center=(cx, cy), rotation_deg=0.0, noise=False)
    n = 380
    sig = pat.signal.astype(np.float64)
    m = pat.mask
    q = [
        (sig[cy : cy + n, cx : cx + n], m[cy : cy + n, cx : cx + n]),
        (sig[cy : cy - n : -1, cx : cx + n], m[cy : cy - n : -1, cx : cx + n]),
        (sig[cy : cy + n, cx : cx - n : -1], m[cy : cy + n, cx : cx - n : -1]),
        (sig[cy : cy - n : -1, cx : cx - n : -1], m[cy : cy - n : -1, cx : cx - n : -1]),
    ]
    both = q[0][1] & q[1][1] & q[2][1] & q[3][1]
    assert both.sum() > 50000
    peak = sig.max()
    for other, _ in q[1:]:
        np.testing.assert_allclose(other[both], q[0][0][both], rtol=1e-6, atol=1e-6 * peak)


def test_i10_is_the_pixel_sum_of_one_spot():
    # Centre inside a module so the right-hand 1,0 spot is fully on sensitive pixels.
    pat = make_pattern(seed=17, center=(300.0, 300.0), rotation_deg=0.0, noise=False, n_dead=0)
    p = pat.params
    yy, xx = np.indices(pat.signal.shape)
    r = np.hypot(xx - 300.0, yy - 300.0)
    phi = np.degrees(np.arctan2(yy - 300.0, xx - 300.0))
    spot = (np.abs(r - p["s10_px"]) < 0.2 * p["s10_px"]) & (np.abs(phi) < 6 * p["sigma_phi_deg"])
    assert pat.mask[spot].all()
    assert pat.signal[spot].sum(dtype=np.float64) == pytest.approx(p["i10"], rel=1e-3)


def test_background_is_strongest_at_the_centre_and_along_the_equator(pilatus):
    p = pilatus.params
    cx, cy = p["center"]
    a = math.radians(p["equator_angle_deg"])
    bg = pilatus.background

    def at(u, v):
        x = cx + u * math.cos(a) - v * math.sin(a)
        y = cy + u * math.sin(a) + v * math.cos(a)
        return float(bg[int(round(y)), int(round(x))])

    assert at(40, 0) > at(0, 40) * 2  # equatorial streak
    assert at(0, 40) > at(0, 150) > at(0, 300)  # decays with radius


def test_pilatus_generation_is_fast():
    make_pattern(seed=0)
    t0 = time.perf_counter()
    for seed in range(3):
        make_pattern(seed=seed)
    assert (time.perf_counter() - t0) / 3 < 0.5


# --------------------------------------------------------------------------- powder


def test_powder_is_isotropic_with_nan_fiber_truth():
    pow_ = make_powder(seed=1, noise=False)
    p = pow_.params
    assert math.isnan(p["s10_px"]) and math.isnan(p["i11_i10"])
    cx, cy = p["center"]
    r0 = p["ring_radii_px"][0]
    a = [pow_.signal[int(round(cy + r0 * math.sin(t))), int(round(cx + r0 * math.cos(t)))] for t in np.radians([0, 45, 90, 135])]
    np.testing.assert_allclose(a, a[0], rtol=0.1)
    assert pow_.frame.shape == (1043, 981)
