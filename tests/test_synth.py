"""Tests of the synthetic fiber-diffraction generator (live_bgsub.synth)."""

import dataclasses
import math

import numpy as np
import pytest

from live_bgsub import synth
from live_bgsub.synth import FAMILIES, PRESETS, DetectorPreset, SyntheticPattern, make_pattern, make_powder

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
        make_pattern("pilatus-6m")
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
def test_eiger_preset_shape_and_gaps():
    # What a pattern costs per preset: python -m benchmarks.synth (BENCHMARKS.md,
    # "Costs the tests no longer bound").
    pat = make_pattern("eiger2-9m", seed=1)
    assert pat.frame.shape == (3262, 3108) and pat.frame.dtype == np.float32
    valid = PRESETS["eiger2-9m"].valid_mask()
    # 3 x 6 modules of 1028 x 512 px, gaps of 12 (columns) and 38 (rows) px.
    assert not valid[512:550].any() and not valid[:, 1028:1040].any()
    assert valid[:512, :513].all()
    assert not valid[:, 513:515].any()  # modelled chip seam


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
    assert synth.EQUATOR_SIGN in (1.0, -1.0)
    assert p["equator_angle_deg"] == synth.EQUATOR_SIGN * 5.0
    x, y = _equatorial_spot_centroid(pat.signal, p["center"], p["equator_angle_deg"], p["s10_px"])
    assert math.copysign(1.0, y - p["center"][1]) == synth.EQUATOR_SIGN
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


def test_reflections_one_by_one_sum_to_the_signal():
    pat = make_pattern("ccd-1k", seed=4, noise=False)
    names = [rf["name"] for rf in pat.params["reflections"]]
    assert {"1,0", "1,1", "2,0", "Z", "M3", "ML1"} <= set(names)
    parts = {name: pat.reflection(name) for name in names}
    total = sum(parts.values())
    np.testing.assert_allclose(total, pat.signal, rtol=0, atol=1e-4 * float(pat.signal.max()))
    assert not parts["1,1"][~pat.mask].any()
    # Both symmetry mates of an equatorial reflection, each holding its intensity.
    assert parts["1,1"].sum() == pytest.approx(2 * pat.params["i11"], rel=0.02)
    with pytest.raises(KeyError, match="no reflection '3,0'"):
        pat.reflection("3,0")


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


# --------------------------------------------------------------------------- detector families

# Pixel counts (w x h) and pitch of the presets, from the detectors' data sheets.
LAYOUTS = {
    "pilatus-1m": ((981, 1043), 0.172),
    "pilatus-2m": ((1475, 1679), 0.172),
    "eiger2-4m": ((2068, 2162), 0.075),
    "eiger2-9m": ((3108, 3262), 0.075),
    "mar165": ((2048, 2048), 0.079),
    "mar225": ((3072, 3072), 0.073),
    "rayonix": ((2880, 2880), 0.078),
    "ccd-1k": ((1024, 1024), 0.100),
    "mar": ((2048, 2048), 0.080),
}
CCDS = ("mar165", "mar225", "rayonix", "ccd-1k")

# Seeded outputs of the generator as it was before the detector families were added
# (computed with that code): make_pattern("pilatus-1m", seed=11) and
# make_pattern("mar", seed=2, counts=0.5).
REF_PILATUS_11 = dict(
    s10_px=40.86067025115834,
    i11_i10=0.43379909469297395,
    center=(380.285616221536, 490.9422289952092),
    frame_sum=2390535.0,
    raw_sum=2316938,
)
REF_MAR_2 = dict(frame_sum=965601.0)


def _spot_peak(signal, mask, center, angle_deg, s10, sigma_phi_deg):
    """Radius and azimuth (deg) of the brightest valid signal pixel near one 1,0 spot.

    The window is ``|r - s10| < 0.3 s10`` with the azimuth within 3 sigma_phi of
    ``angle_deg``. None when the 7 x 7 pixels around the spot's expected centre are not
    all on the frame and valid (a gap, the frame edge or the beam stop hides it).
    """
    cx, cy = center
    h, w = signal.shape
    a = math.radians(angle_deg)
    px, py = int(round(cx + s10 * math.cos(a))), int(round(cy + s10 * math.sin(a)))
    if not (3 <= px <= w - 4 and 3 <= py <= h - 4) or not mask[py - 3 : py + 4, px - 3 : px + 4].all():
        return None
    r_hi = 1.3 * s10
    x0, x1 = max(int(math.floor(cx - r_hi)), 0), min(int(math.ceil(cx + r_hi)) + 1, w)
    y0, y1 = max(int(math.floor(cy - r_hi)), 0), min(int(math.ceil(cy + r_hi)) + 1, h)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    r = np.hypot(xx - cx, yy - cy)
    dphi = (np.degrees(np.arctan2(yy - cy, xx - cx)) - angle_deg + 180.0) % 360.0 - 180.0
    win = (np.abs(r - s10) < 0.3 * s10) & (np.abs(dphi) < 3 * sigma_phi_deg) & mask[y0:y1, x0:x1]
    i = int(np.argmax(signal[y0:y1, x0:x1][win]))
    return float(r[win][i]), float(dphi[win][i])


def test_presets_and_families():
    assert {"pilatus-1m", "eiger2-9m", "mar"} <= set(PRESETS)  # the original names still work
    assert set(FAMILIES) <= set(PRESETS) and len(set(FAMILIES)) == len(FAMILIES)
    assert {"pilatus-1m", "pilatus-2m", "eiger2-4m", "eiger2-9m", "mar165", "mar225", "rayonix", "ccd-1k"} <= set(FAMILIES)
    for name, ((w, h), pixel) in LAYOUTS.items():
        det = PRESETS[name]
        assert det.name == name and det.shape == (h, w) and det.pixel_size_mm == pixel
        # The beam-stop shadow has the same physical size on every detector (~2.4 mm).
        assert det.beam_stop_radius_px * det.pixel_size_mm == pytest.approx(2.4, abs=0.05)
        assert det.kind == ("ccd" if name in CCDS else "photon-counting")
    assert PRESETS["ccd-1k"].beam_stop_arm_width_px > 0
    assert all(PRESETS[n].beam_stop_arm_width_px == 0 for n in PRESETS if n != "ccd-1k")


def test_module_layouts_of_the_new_detectors():
    # Pilatus3 2M: 3 x 8 modules of 487 x 195 px, gaps of 7 (columns) and 17 (rows) px.
    valid = PRESETS["pilatus-2m"].valid_mask()
    assert valid[:195, :487].all() and not valid[195:212].any() and not valid[:, 487:494].any()
    assert not valid[:, 981:988].any() and valid[:, 988:].any() and not valid[1467:1484].any()
    assert valid.sum() == 24 * 487 * 195
    # EIGER2 4M: 2 x 4 modules of 1028 x 512 px, gaps of 12 (columns) and 38 (rows) px,
    # with the modelled 2 px chip seam in the middle of each module.
    valid = PRESETS["eiger2-4m"].valid_mask()
    assert not valid[512:550].any() and not valid[1062:1100].any() and not valid[1612:1650].any()
    assert not valid[:, 1028:1040].any() and not valid[:, 513:515].any() and not valid[:, 1553:1555].any()
    assert valid.sum() == 8 * 1026 * 512
    # MAR CCDs: circular active area; Rayonix and the 1k CCD: every pixel sensitive.
    for name in ("mar165", "mar225"):
        valid = PRESETS[name].valid_mask()
        n = valid.shape[0]
        assert valid.mean() == pytest.approx(math.pi / 4, abs=0.002)
        assert valid[n // 2, 1] and valid[1, n // 2] and not valid[0, 0] and not valid[n - 1, n - 1]
    assert PRESETS["rayonix"].valid_mask().all() and PRESETS["ccd-1k"].valid_mask().all()


@pytest.mark.parametrize("name", [*FAMILIES, "mar"])
def test_every_preset_draws_a_pattern_where_params_say(name):
    det = PRESETS[name]
    pat = make_pattern(name, seed=31, noise=False)
    p = pat.params
    k = 0.172 / det.pixel_size_mm
    for arr in (pat.frame, pat.background, pat.signal):
        assert arr.shape == det.shape and arr.dtype == np.float32
    assert p["preset"] == name and tuple(p["shape"]) == det.shape
    # Mask: the sensitive area less the beam-stop shadow and the dead pixels.
    valid = det.valid_mask()
    assert not (pat.mask & ~valid).any()
    lost = valid.sum() - pat.mask.sum()
    stop_area = math.pi * p["beam_stop_radius_px"] ** 2
    assert 0.5 * stop_area <= lost - p["n_dead"]
    if not det.beam_stop_arm_width_px:
        assert lost - p["n_dead"] <= 1.1 * stop_area + 10
    assert 0.7 <= pat.mask.mean() <= 1.0 and 0.7 <= valid.mean()
    # The true centre: on the frame, near the nominal one, on the sensitive area.
    cx, cy = p["center"]
    h, w = det.shape
    assert abs(cx - det.nominal_center[0]) <= 40 * k and abs(cy - det.nominal_center[1]) <= 40 * k
    assert 0.2 * w <= cx <= 0.8 * w and 0.2 * h <= cy <= 0.8 * h
    assert not pat.mask[int(round(cy)), int(round(cx))]  # beam stop
    if det.active_radius_px is not None:
        # Far enough inside the circle for the equatorial reflections out to 2,1.
        assert math.hypot(cx - (w - 1) / 2, cy - (h - 1) / 2) + 3 * p["s10_px"] < det.active_radius_px
    assert 40 * k <= p["s10_px"] <= 70 * k
    # The 1,0 spots: the brightest signal pixel near each is at S10 on the equator.
    checked = 0
    for side in (0.0, 180.0):
        peak = _spot_peak(pat.signal, pat.mask, p["center"], p["equator_angle_deg"] + side, p["s10_px"], p["sigma_phi_deg"])
        if peak is None:
            continue
        r, dphi = peak
        assert r == pytest.approx(p["s10_px"], abs=1.0)
        assert abs(dphi) <= 0.5 * p["sigma_phi_deg"] + math.degrees(1.5 / p["s10_px"])
        checked += 1
    assert checked >= 1
    # Photons: the noise-free frame is the truth's sum.
    np.testing.assert_allclose(pat.frame, pat.background + pat.signal, rtol=1e-6)


LARGE = ("eiger2-9m", "mar225", "rayonix")  # ~1-2 s per pattern


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in FAMILIES])
@pytest.mark.parametrize("s10", [20.0, 300.0])
def test_s10_from_20_to_300_px_renders_on_every_preset(name, s10):
    det = PRESETS[name]
    h, w = det.shape
    # A centre inside a module well away from the gaps, to see the spots.
    center = {"pilatus-1m": (740.0, 530.0), "pilatus-2m": (740.0, 740.0), "eiger2-4m": (1554.0, 800.0)}.get(name)
    if name == "eiger2-9m":
        center = (1554.0 + 260.0, 1380.0)
    pat = make_pattern(name, seed=5, noise=False, rotation_deg=0.0, center=center, s10_px=s10, n_dead=0)
    p = pat.params
    assert p["s10_px"] == s10 and p["reflections"][0]["radius_px"] == s10
    assert p["m3_px"] == pytest.approx(s10 * p["d10_nm"] / 14.3)
    assert np.isfinite(pat.frame).all() and pat.signal.max() > 0
    checked = 0
    for side in (0.0, 180.0):
        peak = _spot_peak(pat.signal, pat.mask, p["center"], side, s10, p["sigma_phi_deg"])
        if peak is not None:
            assert peak[0] == pytest.approx(s10, abs=1.0)
            checked += 1
    if s10 == 300.0:
        assert checked >= 1  # on every preset at least one 1,0 spot lies on valid pixels


def test_scale_background_magnifies_the_background_with_s10():
    base = make_pattern(seed=12, noise=False)
    m = 2.0
    big = make_pattern(seed=12, noise=False, s10_px=m * base.params["s10_px"], scale_background=True)
    same = make_pattern(seed=12, noise=False, s10_px=m * base.params["s10_px"])
    assert base.params["background_scale"] == 1.0 and same.params["background_scale"] == 1.0
    assert big.params["background_scale"] == pytest.approx(m)
    np.testing.assert_array_equal(same.background, base.background)
    for key in ("streak_length_px", "streak_width_px", "streak_widening_px", "bg_r0_px"):
        assert big.params[key] == pytest.approx(m * base.params[key])
    for key in ("bg_c", "bg_e"):
        assert big.params[key] == pytest.approx(base.params[key] / m)
    for key in ("bg_a", "bg_b", "bg_d", "bg_f", "streak_amp"):
        assert big.params[key] == pytest.approx(base.params[key] / m**2)
    assert big.params["i10"] == base.params["i10"]
    # The background at radius m r is the background at radius r over m**2.
    cx, cy = base.params["center"]
    a = math.radians(base.params["equator_angle_deg"])
    checked = 0
    for u, v in ((60.0, 0.0), (0.0, 90.0), (120.0, 50.0), (45.0, 30.0)):
        x, y = cx + u * math.cos(a) - v * math.sin(a), cy + u * math.sin(a) + v * math.cos(a)
        xm, ym = cx + m * (x - cx), cy + m * (y - cy)
        at, at_m = (int(round(y)), int(round(x))), (int(round(ym)), int(round(xm)))
        if not (base.mask[at] and big.mask[at_m]):
            continue  # a gap or the beam stop: the background is 0 there
        assert big.background[at_m] == pytest.approx(base.background[at] / m**2, rel=0.05)
        checked += 1
    assert checked >= 3
    # Overridden background values are kept as given.
    kept = make_pattern(seed=12, noise=False, s10_px=100.0, scale_background=True, bg_c=0.05, streak_amp=10.0)
    assert kept.params["bg_c"] == 0.05 and kept.params["streak_amp"] == 10.0


# --------------------------------------------------------------------------- detector response


def test_photon_counting_raw_is_unchanged_by_default(pilatus):
    p = pilatus.params
    assert (p["detector_kind"], p["bias"], p["read_noise"], p["gain"], p["bit_depth"]) == ("photon-counting", 0.0, 0.0, 1.0, 32)
    raw = pilatus.raw()
    assert raw.dtype == np.int32
    np.testing.assert_array_equal(raw, pilatus.raw())
    expected = np.rint(pilatus.frame).astype(np.int32)
    expected[pilatus.invalid == synth.GAP] = -1
    expected[pilatus.invalid == synth.DEAD] = -2
    np.testing.assert_array_equal(raw, expected)


@pytest.mark.parametrize("name", ["pilatus-2m", "eiger2-4m"])
def test_photon_counting_sentinels_on_the_new_detectors(name):
    pat = make_pattern(name, seed=2, counts=0.5)
    raw = pat.raw()
    valid = PRESETS[name].valid_mask()
    assert raw.dtype == np.int32
    assert ((raw == -1) == ~valid).all()
    assert (raw == -2).sum() == pat.params["n_dead"] > 0
    assert (raw[pat.mask] >= 0).all()
    np.testing.assert_array_equal(raw[pat.mask], pat.frame[pat.mask].astype(np.int32))
    cx, cy = pat.params["center"]
    assert raw[int(round(cy)), int(round(cx))] == 0


def test_ccd_raw_dtype_sentinels_and_bias_level():
    pat = make_pattern("mar165", seed=4, counts=2.0)
    p = pat.params
    assert (p["detector_kind"], p["bias"], p["gain"], p["bit_depth"]) == ("ccd", 100.0, 1.0, 16)
    raw = pat.raw()
    assert raw.dtype == np.uint16 and raw.shape == (2048, 2048)
    off = ~PRESETS["mar165"].valid_mask()
    assert not raw[off].any()  # 0 outside the circular active area
    dead = pat.invalid == synth.DEAD
    assert dead.sum() == p["n_dead"] > 0 and not raw[dead].any()
    # Under the beam stop the CCD reads its bias (no photons) plus read noise.
    stop = pat.invalid == synth.BEAM_STOP
    assert np.median(raw[stop]) == pytest.approx(p["bias"], abs=1)
    assert raw[stop].std() == pytest.approx(p["read_noise"], rel=0.25)
    # At valid pixels: bias + gain * photons + read noise.
    diff = raw[pat.mask].astype(np.float64) - p["bias"] - p["gain"] * pat.frame[pat.mask]
    assert abs(diff.mean()) < 0.05
    assert diff.std() == pytest.approx(math.hypot(p["read_noise"], math.sqrt(1 / 12)), rel=0.02)
    np.testing.assert_array_equal(raw, pat.raw())  # the read noise is a seeded draw


def test_ccd_bias_gain_and_read_noise_statistics():
    # A background region away from the reflections: median of raw ~ bias + gain * bg.
    bias, gain, read_noise = 250.0, 3.0, 4.0
    pat = make_pattern("ccd-1k", seed=9, counts=20.0, bias=bias, gain=gain, read_noise=read_noise, rotation_deg=0.0)
    p = pat.params
    assert (p["bias"], p["gain"], p["read_noise"]) == (bias, gain, read_noise)
    raw = pat.raw().astype(np.float64)
    cx, cy = p["center"]
    region = np.s_[int(cy) + 250 : int(cy) + 330, int(cx) - 300 : int(cx) - 220]  # lower left, off-axis
    m = pat.mask[region]
    bg = pat.background[region][m].astype(np.float64)
    assert pat.signal[region][m].max() < 0.01 * bg.mean()
    assert np.median(raw[region][m]) == pytest.approx(bias + gain * np.median(bg), abs=0.05 * gain * bg.mean() + 2)
    assert raw[region][m].mean() == pytest.approx(bias + gain * bg.mean(), rel=0.01)
    # Variance: gain^2 * Poisson + read noise^2 (+ rounding).
    var = gain**2 * bg.mean() + read_noise**2 + 1 / 12
    assert raw[region][m].var() == pytest.approx(var, rel=0.15)
    # frame stays photons: the response is in raw() only.
    plain = make_pattern("ccd-1k", seed=9, counts=20.0, rotation_deg=0.0)
    np.testing.assert_array_equal(pat.frame, plain.frame)
    np.testing.assert_array_equal(pat.background, plain.background)


def test_ccd_raw_clips_to_16_bits():
    pat = make_pattern("ccd-1k", seed=3, counts=50.0, gain=200.0, bias=0.0, read_noise=5.0)
    raw = pat.raw()
    assert raw.dtype == np.uint16 and raw.max() == 65535
    hot = pat.frame * 200.0 > 65535 + 50
    assert hot.sum() > 100 and (raw[hot] == 65535).all()  # saturated, not wrapped
    # No bias and read noise: the shadow's negative readings are clipped to 0, not wrapped.
    stop = pat.invalid == synth.BEAM_STOP
    assert (raw[stop] == 0).mean() == pytest.approx(0.5, abs=0.05) and raw[stop].max() < 30


def test_beam_stop_arm_is_masked_to_the_frame_edge():
    pat = make_pattern("ccd-1k", seed=6, noise=False)
    p = pat.params
    assert p["beam_stop_arm_width_px"] == 12.0 and p["beam_stop_arm_angle_deg"] == -60.0
    cx, cy = p["center"]
    a = math.radians(p["beam_stop_arm_angle_deg"])
    h, w = pat.frame.shape
    t = 2 * p["beam_stop_radius_px"]
    n_on_arm = 0
    while True:
        x, y = cx + t * math.cos(a), cy + t * math.sin(a)
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            break
        assert not pat.mask[int(round(y)), int(round(x))]
        assert pat.invalid[int(round(y)), int(round(x))] == synth.BEAM_STOP
        # Beside the arm (2 widths away) the detector is sensitive.
        for side in (1, -1):
            xs, ys = x - side * 12.0 * math.sin(a), y + side * 12.0 * math.cos(a)
            if 0 <= xs <= w - 1 and 0 <= ys <= h - 1:
                assert pat.invalid[int(round(ys)), int(round(xs))] != synth.BEAM_STOP
        n_on_arm += 1
        t += 5.0
    assert n_on_arm > 50
    # Opposite the arm only the round stop.
    x, y = cx - 2 * p["beam_stop_radius_px"] * math.cos(a), cy - 2 * p["beam_stop_radius_px"] * math.sin(a)
    assert pat.mask[int(round(y)), int(round(x))]
    # The CCD reads its bias along the arm; raw() of the arm is the beam stop's.
    raw = pat.raw()
    arm = pat.invalid == synth.BEAM_STOP
    assert np.median(raw[arm]) == pytest.approx(p["bias"], abs=1)
    # An arm on any preset, from the overrides.
    armed = make_pattern("pilatus-1m", seed=6, beam_stop_arm_width_px=8.0, beam_stop_arm_angle_deg=90.0)
    ax, ay = armed.params["center"]
    assert not armed.mask[armed.frame.shape[0] - 1, int(round(ax))]
    assert armed.raw()[armed.frame.shape[0] - 1, int(round(ax))] == 0


@pytest.mark.parametrize("name", ["pilatus-1m", "ccd-1k"])
def test_eight_bit_images(name):
    pat = make_pattern(name, seed=8, counts=3.0)
    raw8 = pat.raw(bit_depth=8)
    assert raw8.dtype == np.uint8 and raw8.max() == 255
    assert not raw8[~PRESETS[name].valid_mask()].any()
    assert not raw8[pat.invalid == synth.DEAD].any()
    # Monotone in the detector's response: a brighter pixel is never darker.
    full = pat.raw().astype(np.float64)
    sel = pat.mask
    order = np.argsort(full[sel], kind="stable")
    assert (np.diff(raw8[sel][order].astype(int)) >= 0).all()
    # The bit depth may also be the pattern's default.
    by_default = make_pattern(name, seed=8, counts=3.0, bit_depth=8)
    assert by_default.params["bit_depth"] == 8
    np.testing.assert_array_equal(by_default.raw(), raw8)


def test_new_presets_are_deterministic_and_old_streams_unshifted():
    a, b = make_pattern("ccd-1k", seed=21), make_pattern("ccd-1k", seed=21)
    for name in ("frame", "background", "signal", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.raw(), b.raw())
    assert not np.array_equal(a.raw(), make_pattern("ccd-1k", seed=22).raw())
    # The detector response draws from its own stream: read noise changes raw() only,
    # and the photon frame is the same whatever the response.
    quiet = make_pattern("ccd-1k", seed=21, read_noise=0.0, bias=0.0)
    np.testing.assert_array_equal(quiet.frame, a.frame)
    np.testing.assert_array_equal(quiet.raw()[a.mask], np.rint(a.frame[a.mask]).astype(np.uint16))
    # A preset that differs from an old one only in its response draws the same photons.
    legacy = make_pattern("pilatus-1m", seed=21)
    as_ccd = make_pattern(dataclasses.replace(PRESETS["pilatus-1m"], kind="ccd", bias=100.0), seed=21)
    np.testing.assert_array_equal(as_ccd.frame, legacy.frame)
    assert as_ccd.raw().dtype == np.uint16 and legacy.raw().dtype == np.int32
    np.testing.assert_array_equal(as_ccd.raw()[legacy.mask], legacy.raw()[legacy.mask] + 100)
    assert not as_ccd.raw()[legacy.raw() < 0].any()  # gaps and dead pixels read 0 on a CCD


def test_old_presets_keep_their_seeded_values():
    # Spot values of the seeded outputs of the original generator (before the detector
    # families were added): new features must not shift the random stream.
    pat = make_pattern("pilatus-1m", seed=11)
    p = pat.params
    assert p["s10_px"] == pytest.approx(REF_PILATUS_11["s10_px"], rel=1e-12)
    assert p["i11_i10"] == pytest.approx(REF_PILATUS_11["i11_i10"], rel=1e-12)
    assert p["center"] == pytest.approx(REF_PILATUS_11["center"], rel=1e-12)
    assert float(pat.frame.sum(dtype=np.float64)) == REF_PILATUS_11["frame_sum"]
    assert int(pat.raw().sum(dtype=np.int64)) == REF_PILATUS_11["raw_sum"]
    mar = make_pattern("mar", seed=2, counts=0.5)
    assert float(mar.frame.sum(dtype=np.float64)) == REF_MAR_2["frame_sum"]
    assert mar.raw().dtype == np.int32


def test_bad_response_arguments_raise():
    with pytest.raises(ValueError, match="bit_depth"):
        make_pattern(seed=1, bit_depth=16)  # a Pilatus writes 32 or 8 bits
    with pytest.raises(ValueError, match="bit_depth"):
        make_pattern("ccd-1k", seed=1, bit_depth=32)
    with pytest.raises(ValueError, match="bit_depth"):
        make_pattern(seed=1).raw(bit_depth=12)
    with pytest.raises(ValueError, match="gain"):
        make_pattern(seed=1, gain=0)
    with pytest.raises(ValueError, match="read_noise"):
        make_pattern(seed=1, read_noise=-1)
    with pytest.raises(ValueError, match="s10_px"):
        make_pattern(seed=1, s10_px=0)
    with pytest.raises(ValueError, match="kind"):
        DetectorPreset(name="x", shape=(10, 10), pixel_size_mm=0.1, kind="image-plate")


def test_powder_on_a_ccd():
    pow_ = make_powder("ccd-1k", seed=2, read_noise=0.0)
    p = pow_.params
    assert (p["detector_kind"], p["bias"], p["read_noise"]) == ("ccd", 100.0, 0.0)
    raw = pow_.raw()
    assert raw.dtype == np.uint16
    stop = pow_.invalid == synth.BEAM_STOP
    assert (raw[stop] == 100).all() and stop.sum() > math.pi * p["beam_stop_radius_px"] ** 2 + 1000  # stop + arm
    np.testing.assert_array_equal(raw[pow_.mask], pow_.frame[pow_.mask] + 100)


def test_curved_residual_follows_the_background_and_vanishes_at_its_centre():
    background = np.full((40, 60), 2.0)
    res = synth.curved_residual(background, s10_px=10.0, amplitude=0.5, centre=1.5)
    assert res[0, 0] == pytest.approx(0.5 * 2.0 * 1.5**2)  # at the beam centre
    assert res[0, 15] == pytest.approx(0.0) and res[9, 12] == pytest.approx(0.0)  # r = 15 = 1.5 S10
    assert res[0, 30] == pytest.approx(0.5 * 2.0 * 1.5**2)  # r = 3 S10
    np.testing.assert_allclose(synth.curved_residual(2 * background, 10.0, 0.5, 1.5), 2 * res)
