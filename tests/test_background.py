"""Tests of the classical background methods (live_bgsub.background)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from scipy.interpolate import UnivariateSpline

from live_bgsub.background import (
    METHODS,
    Method,
    circularly_symmetric,
    convex_hull,
    get_method,
    parse_params,
    roving_window,
    smoothed_gaussian,
    subtract_background,
    transition,
    validate_params,
    white_top_hat,
)
from live_bgsub.background._convex_hull import lower_convex_hull
from live_bgsub.background._smoothed import (
    SeparableFilter,
    boxcar_kernel,
    gaussian_kernel,
    iterate_low_pass,
)
from live_bgsub.background._tophat import disk_opening

ALL_METHODS = list(METHODS)
SUBTRACTING = [name for name in METHODS if name != "none"]

# Parameters scaled to the small test folds (the defaults are sized for detector folds).
SMALL_PARAMS = {
    "white-top-hat": {"tophat": 10.0},
    "circularly-symmetric": {"radial_bin": 4.0},
    "roving-window": {"win_size_x": 6, "win_size_y": 6, "win_sep_x": 4, "win_sep_y": 4},
    "smoothed-gaussian": {"fwhm": 5.0, "cycles": 100},
    "smoothed-boxcar": {"boxcar_x": 7, "boxcar_y": 7, "cycles": 100},
    "convex-hull": {"degree": 2.0},
    "transition": {"transition_radius": 60.0, "transition_delta": 20.0,
                   "inner_params": {"radial_bin": 4.0}, "outer_params": {"tophat": 10.0}},
    "none": {},
}

PEAKS = [(0, 55, 300.0), (35, 40, 300.0), (70, 25, 250.0), (60, 85, 200.0)]  # (row, col, height)
PEAK_SIGMA = 1.2


def smooth_background(shape=(110, 120), dtype=np.float64):
    """A radially decaying background ``300 / (1 + r / 20)**2 + 20``: convex in r, with
    a non-negative Laplacian beyond r = 10 (so smoothing never lowers it there)."""
    radius = np.hypot(*np.indices(shape))
    return (300.0 / (1.0 + radius / 20.0) ** 2 + 20.0).astype(dtype)


def radius_of(shape):
    return np.hypot(*np.indices(shape))


def peak_image(shape=(110, 120)):
    i, j = np.indices(shape)
    out = np.zeros(shape)
    for row, col, height in PEAKS:
        out += height * np.exp(-((i - row) ** 2 + (j - col) ** 2) / (2 * PEAK_SIGMA**2))
    return out


def detector_like_fold(shape=(570, 550), seed=0):
    """A Pilatus-1M-sized float32 fold: decaying background, reflections, Poisson noise."""
    rng = np.random.default_rng(seed)
    i, j = np.indices(shape)
    r = np.hypot(i, j)
    image = 2000.0 / (1.0 + (r / 60.0) ** 2) + 50.0 * np.exp(-r / 400.0) + 5.0
    for x0, height in ((80, 3000.0), (140, 1500.0), (200, 600.0)):
        image += height * np.exp(-((j - x0) ** 2 / 18.0 + i**2 / 32.0))
    for y0 in (70, 140, 210, 280):
        image += 200.0 * np.exp(-((i - y0) ** 2) / 12.5) * np.exp(-j / 150.0)
    mask = np.ones(shape, dtype=bool)
    mask[:, 250:257] = False                       # a detector gap
    return rng.poisson(image).astype(np.float32), mask


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("method", SUBTRACTING)
@pytest.mark.parametrize("downsample", [1, 2])
def test_constant_fold_has_zero_residual(method, downsample):
    fold = np.full((64, 80), 37.5, dtype=np.float64)
    mask = np.ones(fold.shape, dtype=bool)
    mask[10:14, :] = False
    background, corrected = subtract_background(
        fold, method, mask, downsample=downsample, **SMALL_PARAMS[method])
    np.testing.assert_allclose(background[mask], 37.5, rtol=1e-9)
    np.testing.assert_allclose(corrected[mask], 0.0, atol=37.5 * 1e-9)
    assert np.all(background[~mask] == 0) and np.all(corrected[~mask] == 0)


@pytest.mark.parametrize("method", SUBTRACTING)
def test_constant_float32_fold_has_zero_residual_at_default_parameters(method):
    fold = np.full((150, 140), 1234.0, dtype=np.float32)
    _, corrected = subtract_background(fold, method)
    assert corrected.dtype == np.float32
    np.testing.assert_allclose(corrected, 0.0, atol=1234.0 * 1e-5)


def test_none_method_returns_zero_background_and_the_fold():
    fold = np.arange(20.0).reshape(4, 5)
    mask = fold != 7
    background, corrected = subtract_background(fold, "none", mask)
    assert np.all(background == 0)
    np.testing.assert_array_equal(corrected, np.where(mask, fold, 0))


@pytest.mark.parametrize("method", SUBTRACTING)
def test_narrow_peaks_survive_on_a_smooth_background(method):
    """Corrected peak heights are within 5 % of the true heights (all methods are
    within 1 % here); away from the peaks and the centre (r >= 20) the corrected
    image has a median below 1 % and a 95th percentile below 3 % of the peak
    height (the roving window's low-quarter bias on the slope is the largest)."""
    bg = smooth_background()
    peaks = peak_image()
    fold = bg + peaks
    background, corrected = subtract_background(fold, method, **SMALL_PARAMS[method])
    for row, col, height in PEAKS:
        assert corrected[row, col] == pytest.approx(height, rel=0.05), (row, col)
    far = (peaks < 1e-3) & (radius_of(fold.shape) >= 20)
    assert np.median(np.abs(corrected[far])) < 0.01 * 300.0
    assert np.percentile(np.abs(corrected[far]), 95) < 0.03 * 300.0


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floating_dtype_is_kept(method, dtype):
    fold = (smooth_background((40, 50)) + peak_image((40, 50))).astype(dtype)
    background, corrected = subtract_background(fold, method, **SMALL_PARAMS[method])
    assert background.dtype == dtype and corrected.dtype == dtype
    assert background.shape == fold.shape
    # the function itself keeps the dtype too
    direct = METHODS[method].function(fold, None, **SMALL_PARAMS[method])
    assert direct.dtype == dtype


@pytest.mark.parametrize("method", ALL_METHODS)
def test_integer_fold_gives_float32(method):
    fold = np.rint(smooth_background((40, 50))).astype(np.int32)
    background, corrected = subtract_background(fold, method, **SMALL_PARAMS[method])
    assert background.dtype == np.float32 and corrected.dtype == np.float32


@pytest.mark.parametrize("method", SUBTRACTING)
@pytest.mark.parametrize("downsample", [1, 2])
def test_masked_pixels_never_influence_valid_pixels(method, downsample):
    rng = np.random.default_rng(7)
    fold = smooth_background((90, 100)) + peak_image((90, 100))
    mask = rng.random(fold.shape) > 0.15
    mask[30:36, :] = False                          # a gap
    params = SMALL_PARAMS[method]
    bg1, cor1 = subtract_background(fold, method, mask, downsample=downsample, **params)
    altered = fold.copy()
    altered[~mask] = rng.choice([np.nan, -1.0, 1e9, -np.inf], size=(~mask).sum())
    bg2, cor2 = subtract_background(altered, method, mask, downsample=downsample, **params)
    np.testing.assert_allclose(bg2[mask], bg1[mask], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(cor2[mask], cor1[mask], rtol=1e-12, atol=1e-9)
    for out in (bg1, cor1, bg2, cor2):
        assert np.all(out[~mask] == 0)
        assert np.all(np.isfinite(out))


def test_non_finite_values_count_as_invalid_without_a_mask():
    fold = smooth_background((50, 60))
    fold[5, 5] = np.nan
    fold[20, 30] = np.inf
    background = white_top_hat(fold, tophat=5)
    assert background[5, 5] == 0 and background[20, 30] == 0
    assert np.all(np.isfinite(background))


@pytest.mark.parametrize("method", SUBTRACTING)
def test_downsample_2_is_close_to_full_resolution_on_a_smooth_background(method):
    fold = smooth_background((200, 180))
    params = SMALL_PARAMS[method]
    full, _ = subtract_background(fold, method, downsample=1, **params)
    half, _ = subtract_background(fold, method, downsample=2, **params)
    relative = (np.abs(half - full) / fold)[radius_of(fold.shape) >= 20]
    assert np.median(relative) < 0.005
    assert np.percentile(relative, 99) < 0.03
    assert relative.max() < 0.06


# --------------------------------------------------------------------------- MuscleX fixes


def test_roving_window_averages_the_lowest_quarter_not_the_first_in_raster_order():
    """Values fall down the rows, so every window's first 25 % in raster order are its
    highest values; the background must be the mean of its lowest 25 %."""
    rows, cols = 60, 41
    fold = np.repeat(1000.0 - 10.0 * np.arange(rows), cols).reshape(rows, cols)
    background = roving_window(fold, win_size_x=5, win_size_y=5, win_sep_x=10,
                               win_sep_y=10, cirmin=0, cirmax=25)
    window = fold[25:36, 15:26]                     # the window of the node (30, 20)
    n_low = int(0.25 * window.size)
    lowest = np.sort(window, axis=None)[:n_low].mean()
    raster_first = window.ravel()[:n_low].mean()
    assert raster_first - lowest > 50.0             # the two readings really differ
    assert background[30, 20] == pytest.approx(lowest, abs=1e-6)


def test_circularly_symmetric_skips_empty_bins_beyond_the_data():
    """The valid data end at radius 60 on a fold whose corner is at radius 113. MuscleX
    would fill the empty outer bins with 0 and drag the spline down near r = 60."""
    shape = (80, 80)
    radius = np.hypot(*np.indices(shape))
    fold = np.full(shape, 100.0)
    mask = radius <= 60.0
    background = circularly_symmetric(fold, mask, radial_bin=10.0, cirmin=0, cirmax=25,
                                      smooth=0.1)
    np.testing.assert_allclose(background[mask], 100.0, rtol=1e-6)
    # The MuscleX behaviour (empty bins -> 0) really is dragged down at the same radii.
    centres = np.arange(5.0, 120.0, 10.0)
    means = np.where(centres < 60.0, 100.0, 0.0)
    musclex = UnivariateSpline(centres, means, s=0.1 * centres.size)(radius[mask])
    assert musclex.min() < 90.0


def test_gaussian_fwhm_is_a_true_full_width_at_half_maximum():
    """The kernel is exp(-4 ln 2 x**2 / fwhm**2): exactly 1/2 of its peak at +-fwhm/2
    (MuscleX passes its 'fwhm' to OpenCV as a kernel size instead)."""
    for fwhm in (4.0, 12.25, 30.0):
        kernel = gaussian_kernel(fwhm)
        x = np.arange(kernel.size) - kernel.size // 2
        np.testing.assert_allclose(kernel / kernel.max(),
                                   np.exp(-4.0 * np.log(2.0) * x**2 / fwhm**2), rtol=1e-12)
        assert kernel.sum() == pytest.approx(1.0)
        assert x[-1] >= 1.69 * fwhm                  # truncated at 4 sigma


def test_defaults_are_musclex_defaults_in_full_resolution_pixels():
    assert METHODS["white-top-hat"].defaults["tophat"] == 2 * 50
    assert METHODS["circularly-symmetric"].defaults["radial_bin"] == 2 * 10
    rv = METHODS["roving-window"].defaults
    windows = (rv["win_size_x"], rv["win_size_y"], rv["win_sep_x"], rv["win_sep_y"])
    assert windows == (30, 30, 20, 20)
    assert (rv["cirmin"], rv["cirmax"]) == (0.0, 25.0)
    assert METHODS["smoothed-boxcar"].defaults["boxcar_x"] == 2 * 15
    assert METHODS["smoothed-gaussian"].defaults["cycles"] == 250
    # MuscleX's Gaussian 'fwhm' 15 is OpenCV's kernel size 15 -> sigma 2.6 (downsampled).
    sigma_opencv = 0.3 * ((15 - 1) * 0.5 - 1) + 0.8
    assert METHODS["smoothed-gaussian"].defaults["fwhm"] == pytest.approx(
        2 * 2.3548 * sigma_opencv, abs=0.01)
    assert METHODS["convex-hull"].defaults["degree"] == 1.0
    assert METHODS["transition"].defaults["transition_delta"] == 60.0


# --------------------------------------------------------------------------- method details


@pytest.mark.parametrize("radius", [1.0, 2.5, 4.0, 6.7])
def test_disk_opening_is_exact(radius):
    rng = np.random.default_rng(int(radius * 10))
    image = rng.random((31, 37)) * 100.0
    valid = rng.random(image.shape) > 0.2
    reach = int(radius)
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    footprint = dy**2 + dx**2 <= radius**2
    work = np.where(valid, image, np.inf)
    eroded = ndimage.grey_erosion(work, footprint=footprint, mode="constant", cval=np.inf)
    expected = ndimage.grey_dilation(eroded, footprint=footprint, mode="constant",
                                     cval=-np.inf)
    got = disk_opening(image, radius, valid)
    np.testing.assert_array_equal(got[valid], expected[valid])


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 24), st.integers(1, 24)),
                  elements=st.floats(-1e3, 1e3)),
       st.floats(0.5, 8.0))
def test_white_top_hat_is_an_opening(fold, radius):
    """Anti-extensive and idempotent, whatever the data."""
    opened = white_top_hat(fold, tophat=radius)
    assert np.all(opened <= fold)
    np.testing.assert_array_equal(white_top_hat(opened, tophat=radius), opened)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40))
def test_lower_convex_hull_is_the_greatest_convex_minorant(values):
    y = np.array(values)
    x = np.cumsum(np.linspace(1.0, 2.0, y.size))
    hull = lower_convex_hull(x, y)
    tol = 1e-9 * (1.0 + np.abs(y).max())
    assert np.all(hull <= y + tol)
    assert hull[0] == y[0] and abs(hull[-1] - y[-1]) <= tol
    if y.size >= 3:
        slopes = np.diff(hull) / np.diff(x)
        assert np.all(np.diff(slopes) >= -1e-9 * (1.0 + np.abs(slopes).max()))


@pytest.mark.parametrize("shape", [(1, 6), (5, 1), (9, 13), (64, 47)])
def test_separable_filter_equals_scipy_with_mirror_boundaries(shape):
    rng = np.random.default_rng(3)
    image = rng.random(shape)
    for k0, k1 in ((gaussian_kernel(7.0), gaussian_kernel(20.0)),
                   (boxcar_kernel(4), boxcar_kernel(9)),
                   (np.ones(1), gaussian_kernel(3.0))):
        expected = ndimage.correlate1d(image, k0, axis=0, mode="mirror")
        expected = ndimage.correlate1d(expected, k1, axis=1, mode="mirror")
        got = SeparableFilter(shape, k0, k1, np.float64)(image)
        np.testing.assert_allclose(got, expected, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("level", [50.0, -50.0])
def test_smoothed_iteration_stops_early_when_nothing_changes(dtype, level):
    # Isolated peaks on a flat background are eroded in a few cycles (6 in float32,
    # 13 in float64 here); after that nothing changes and 10**6 allowed cycles stop.
    fold = np.full((60, 70), level, dtype=dtype)
    fold[30, 35] += 500.0
    fold[10, 50] += 300.0
    valid = np.ones(fold.shape, dtype=bool)
    background, done = iterate_low_pass(fold, valid, gaussian_kernel(4.0),
                                        gaussian_kernel(4.0), 10**6)
    assert done < 50
    np.testing.assert_allclose(background, level, rtol=1e-6)
    assert smoothed_gaussian(np.full((20, 20), 3.0), cycles=10**6).max() == 3.0


def test_convex_hull_follows_a_convex_background_under_peaks():
    fold = smooth_background() + peak_image()
    background = convex_hull(fold, degree=2.0)
    far = (peak_image() < 1e-3) & (radius_of(fold.shape) >= 10)
    np.testing.assert_allclose(background[far], smooth_background()[far], rtol=0.01)


def test_convex_hull_ignores_radii_outside_rmin_rmax():
    fold = smooth_background()
    radius = np.hypot(*np.indices(fold.shape))
    spiked = fold.copy()
    spiked[radius < 20] = 1e6                        # inside rmin: never used
    spiked[radius > 100] = -1e6                      # beyond rmax: never used
    background = convex_hull(spiked, rmin=20.0, rmax=100.0, degree=2.0)
    inside = (radius >= 25) & (radius <= 95)
    np.testing.assert_allclose(background[inside], fold[inside], rtol=0.01)


def test_transition_blends_with_the_linear_ramp():
    fold = np.full((50, 70), 8.0)
    background = transition(fold, inner="none", outer="white-top-hat",
                            transition_radius=30.0, transition_delta=20.0,
                            outer_params={"tophat": 4.0})
    radius = np.hypot(*np.indices(fold.shape))
    weight = np.clip((radius - 30.0 + 10.0) / 20.0, 0.0, 1.0)
    np.testing.assert_allclose(background, 8.0 * weight, atol=1e-12)


def test_transition_default_radius_follows_musclex_rule():
    fold = np.full((100, 90), 5.0)
    background = transition(fold, inner="none", outer="white-top-hat",
                            transition_delta=0.0, outer_params={"tophat": 3.0})
    radius = np.hypot(*np.indices(fold.shape))
    # image height = 2 x 100 rows; MuscleX's radius = height // 5 = 40
    np.testing.assert_array_equal(background, np.where(radius >= 40.0, 5.0, 0.0))


def test_downsample_scales_nested_transition_lengths():
    fold = smooth_background((120, 110)) + peak_image((120, 110))
    params = {"inner": "white-top-hat", "outer": "white-top-hat",
              "inner_params": {"tophat": 12.0}, "outer_params": {"tophat": 12.0},
              "transition_radius": 50.0}
    via_transition, _ = subtract_background(fold, "transition", downsample=2, **params)
    direct, _ = subtract_background(fold, "white-top-hat", downsample=2, tophat=12.0)
    np.testing.assert_allclose(via_transition, direct, rtol=1e-12)


# --------------------------------------------------------------------------- registry and errors


def test_registry_lists_every_method_with_frozen_metadata():
    assert set(METHODS) == {"white-top-hat", "circularly-symmetric", "roving-window",
                            "smoothed-gaussian", "smoothed-boxcar", "convex-hull",
                            "transition", "none"}
    method = get_method("white-top-hat")
    assert isinstance(method, Method) and method.length_params == ("tophat",)
    with pytest.raises(AttributeError):
        method.name = "other"                        # frozen
    with pytest.raises(TypeError):
        method.defaults["tophat"] = 1.0              # read-only mapping
    for m in METHODS.values():
        assert set(m.length_params) <= set(m.defaults)


def test_unknown_method_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="rolling-ball") as err:
        subtract_background(np.ones((8, 8)), "rolling-ball")
    assert "white-top-hat" in str(err.value) and "convex-hull" in str(err.value)
    with pytest.raises(ValueError, match="rolling-ball"):
        get_method("rolling-ball")


def test_unknown_parameter_names_it_and_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="radius") as err:
        subtract_background(np.ones((8, 8)), "white-top-hat", radius=5)
    assert "tophat" in str(err.value)
    with pytest.raises(ValueError, match="win_size"):
        subtract_background(np.ones((8, 8)), "transition",
                            outer="roving-window", outer_params={"win_size": 3})


@pytest.mark.parametrize("method, params, name", [
    ("white-top-hat", {"tophat": -5.0}, "tophat"),
    ("white-top-hat", {"tophat": "big"}, "tophat"),
    ("white-top-hat", {"tophat": True}, "tophat"),
    ("circularly-symmetric", {"cirmin": 50.0, "cirmax": 25.0}, "cirmax"),
    ("circularly-symmetric", {"radial_bin": 0.0}, "radial_bin"),
    ("circularly-symmetric", {"cirmax": 120.0}, "cirmax"),
    ("roving-window", {"win_sep_x": 0}, "win_sep_x"),
    ("smoothed-gaussian", {"cycles": 2.5}, "cycles"),
    ("smoothed-gaussian", {"fwhm": float("nan")}, "fwhm"),
    ("smoothed-boxcar", {"cycles": -1}, "cycles"),
    ("convex-hull", {"degree": 0.0}, "degree"),
    ("convex-hull", {"rmin": 50.0, "rmax": 10.0}, "rmax"),
    ("transition", {"inner": "transition"}, "inner"),
    ("transition", {"outer": "nope"}, "nope"),
    ("transition", {"inner_params": [1, 2]}, "inner_params"),
    ("transition", {"transition_delta": -1.0}, "transition_delta"),
])
def test_bad_values_raise_value_error_naming_the_parameter(method, params, name):
    with pytest.raises(ValueError, match=name):
        subtract_background(np.ones((16, 16)), method, **params)


def test_bad_values_are_reported_before_downsampling():
    with pytest.raises(ValueError, match=r"tophat.*-5"):
        subtract_background(np.ones((16, 16)), "white-top-hat", downsample=2, tophat=-5.0)


@pytest.mark.parametrize("downsample", [0, -2, 1.5, True])
def test_bad_downsample_raises(downsample):
    with pytest.raises(ValueError, match="downsample"):
        subtract_background(np.ones((16, 16)), downsample=downsample)


@pytest.mark.parametrize("fold, mask, words", [
    (np.ones((3, 4, 2)), None, "2-D"),
    (np.ones((3, 4), dtype=complex), None, "dtype"),
    (np.ones((3, 4)), np.ones((4, 3), dtype=bool), "shape"),
    (np.ones((3, 4)), np.ones((3, 4)), "boolean"),
])
def test_bad_fold_or_mask_raise(fold, mask, words):
    with pytest.raises(ValueError, match=words):
        white_top_hat(fold, mask, tophat=2.0)


def test_parse_params_converts_to_the_default_types():
    assert parse_params("roving-window", ["win_size_x=20", "cirmax=30"]) == {
        "win_size_x": 20, "cirmax": 30.0}
    assert parse_params("convex-hull", ["rmax=none", "degree=2"]) == {
        "rmax": None, "degree": 2.0}
    assert parse_params("transition", ['outer_params={"tophat": 80}', "inner=none"]) == {
        "outer_params": {"tophat": 80}, "inner": "none"}
    params = parse_params("white-top-hat", ["tophat=120"])
    assert isinstance(params["tophat"], float)
    background, _ = subtract_background(np.ones((150, 150)), "white-top-hat", **params)
    assert background.shape == (150, 150)


@pytest.mark.parametrize("items, words", [
    (["win_size_x=2.5"], "win_size_x.*integer"),
    (["cirmax=lots"], "cirmax.*real number"),
    (["window=3"], "window"),
    (["win_size_x"], "KEY=VALUE"),
    (["win_size_x=3", "win_size_x=4"], "more than once"),
    (["cirmin=60"], "cirmax"),
])
def test_parse_params_errors_name_the_parameter(items, words):
    with pytest.raises(ValueError, match=words):
        parse_params("roving-window", items)


def test_validate_params_fills_defaults():
    full = validate_params("smoothed-boxcar", {"cycles": 10})
    assert full == {"boxcar_x": 30.0, "boxcar_y": 30.0, "cycles": 10}


def test_importing_the_methods_pulls_in_neither_skimage_nor_ml_or_daq_stacks():
    code = ("import sys, live_bgsub.background; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('skimage', 'keras', 'tensorflow', 'torch', 'bluesky', 'cv2')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- detector size


@pytest.mark.slow  # every method twice on a Pilatus-sized fold: about 6 s
def test_every_method_on_a_pilatus_sized_fold():
    """All methods at MuscleX's defaults on a 570 x 550 float32 fold, at full and at
    MuscleX's working resolution: finite float32 backgrounds below the data. What they
    cost is measured by ``python -m benchmarks.classical --downsample 1`` (and 2),
    BENCHMARKS.md section 1."""
    fold, mask = detector_like_fold()
    for name in METHODS:
        for downsample in (1, 2):
            background, corrected = subtract_background(fold, name, mask,
                                                        downsample=downsample)
            assert background.dtype == np.float32 and corrected.dtype == np.float32
            assert np.all(np.isfinite(background))
            assert np.all(background[mask] <= fold[mask] + 0.5 * fold.max())


# ---------------------------------------------------------------------- bounded inputs

from live_bgsub.background import MAX_DOWNSAMPLE, METHODS, check_fold_params  # noqa: E402


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].ranges])
def test_every_numeric_parameter_has_a_range_checked_at_both_ends(method):
    """Just outside either end is one ValueError naming the parameter, the value and the
    range; both ends themselves are accepted."""
    m = METHODS[method]
    numeric = [n for n, v in m.defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numeric += [n for n, t in m.optional_types.items() if t is float]
    assert set(numeric) <= set(m.ranges), f"{method}: parameters without a range: {set(numeric) - set(m.ranges)}"
    for name, rng in m.ranges.items():
        cast = int if isinstance(m.defaults.get(name), int) else float
        for value in (rng.low, rng.high):
            try:
                validate_params(method, {name: cast(value)})
            except ValueError as exc:  # only a rule between parameters (cirmin <= cirmax) may refuse it
                assert "must be from" not in str(exc), exc
        step = 1 if cast is int else max(1e-6, 1e-3 * (rng.high - rng.low))
        for value in (rng.low - step, rng.high + step):
            with pytest.raises(ValueError) as info:
                validate_params(method, {name: cast(value)})
            text = str(info.value)
            assert f"parameter {name!r} of method {method!r}" in text and f"from {rng.low:g} to {rng.high:g}" in text


def test_huge_lengths_and_downsample_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r"'tophat' of method 'white-top-hat' must be from 1 to 2000 \(px, disk radius\), got 1e\+09"):
        subtract_background(np.ones((200, 200)), "white-top-hat", tophat=1e9)
    with pytest.raises(ValueError, match=rf"downsample must be an integer from 1 to {MAX_DOWNSAMPLE} .*got 5000"):
        subtract_background(np.ones((200, 200)), "white-top-hat", downsample=5000)
    with pytest.raises(ValueError, match="must be from"):
        validate_params("smoothed-gaussian", {"fwhm": float("nan")})


def test_lengths_past_the_fold_and_a_too_coarse_working_fold_are_refused_with_the_fold_shape():
    fold = np.ones((120, 100))
    corner = np.hypot(119, 99)
    background, corrected = subtract_background(fold, "white-top-hat", tophat=150.0)  # within the corner radius
    assert background.shape == fold.shape
    with pytest.raises(ValueError) as info:
        subtract_background(fold, "white-top-hat", tophat=200.0)
    assert f"is 200, more than the corner radius ({corner:g} px) of the fold of shape (120, 100)" in str(info.value)
    with pytest.raises(ValueError, match=r"'win_size_x' .* more than the number of columns \(100 px\)"):
        check_fold_params("roving-window", {"win_size_x": 101}, (120, 100))
    with pytest.raises(ValueError, match=r"inner_params: parameter 'tophat'"):
        check_fold_params("transition", {"inner": "white-top-hat", "inner_params": {"tophat": 500.0}}, (120, 100))
    # downsample 3 leaves 40 x 34 working pixels, 4 leaves 30 x 25 (< 32).
    check_fold_params("white-top-hat", {}, (120, 100), downsample=3)
    with pytest.raises(ValueError, match=r"downsample 4 leaves a working fold of shape \(30, 25\) .* accepted range for this fold: from 1 to 3"):
        check_fold_params("white-top-hat", {}, (120, 100), downsample=4)


def test_an_engine_refuses_parameters_its_fold_cannot_take_at_set_up():
    from live_bgsub.engine import Engine, ProcessingError, make_step
    from live_bgsub.geometry import Geometry

    step = make_step("white-top-hat", {"tophat": 1500.0})
    with pytest.raises(ProcessingError, match=r"'tophat' .* is 1500, more than the corner radius"):
        Engine(step, Geometry((100.0, 110.0), 0.0), (220, 200))
    Engine(make_step("white-top-hat", {"tophat": 100.0}), Geometry((100.0, 110.0), 0.0), (220, 200))
