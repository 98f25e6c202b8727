"""Folding into one quadrant and unfolding back: conventions, invariants, properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_bgsub.errors import GeometryError
from live_bgsub.fold import FoldMap, fold, unfold
from live_bgsub.geometry import Geometry


def symmetric_pattern(shape, geometry, a=2.0, b=50.0, su=15.0, sv=9.0):
    """Smooth pattern mirror-symmetric about the geometry's equator and meridian."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ex, ey = geometry.equator_vector
    mx, my = geometry.meridian_vector
    dx, dy = xx - geometry.center[0], yy - geometry.center[1]
    u = dx * ex + dy * ey
    v = dx * mx + dy * my
    return (a + b * np.exp(-0.5 * ((u / su) ** 2 + (v / sv) ** 2))).astype(np.float32), (u, v)


def test_integer_center_no_rotation_is_the_mean_of_four_quadrants():
    rng = np.random.default_rng(0)
    img = rng.random((21, 31)).astype(np.float32)
    g = Geometry((12, 9), 0.0)
    folded, count = fold(img, g, edge=0)
    # fold[i, j] averages img[9 +- i, 12 +- j] over the samples that exist.
    for i, j in [(0, 0), (1, 2), (5, 7), (9, 12), (11, 15), (3, 18)]:
        samples = [img[9 + si * i, 12 + sj * j] for si in (1, -1) for sj in (1, -1) if 0 <= 9 + si * i < 21 and 0 <= 12 + sj * j < 31]
        assert count[i, j] == len(samples)
        assert folded[i, j] == pytest.approx(np.mean(samples), rel=1e-6)


def test_center_at_index_00_and_equator_along_axis_1():
    g = Geometry((40.0, 30.0), 30.0)
    img = np.zeros((61, 81), np.float32)
    ex, ey = g.equator_vector
    mx, my = g.meridian_vector
    # A spot 15 px along the equator (both sides) and one 10 px along the meridian.
    for s in (1, -1):
        img[round(30 + s * 15 * ey), round(40 + s * 15 * ex)] = 100
        img[round(30 + s * 10 * my), round(40 + s * 10 * mx)] = 50
    folded, _ = fold(img, g, edge=0)
    eq = np.unravel_index(np.argmax(folded[:3, 5:]), folded[:3, 5:].shape)
    assert eq[0] <= 1 and abs(eq[1] + 5 - 15) <= 1
    mer = np.unravel_index(np.argmax(folded[5:, :3]), folded[5:, :3].shape)
    assert abs(mer[0] + 5 - 10) <= 1 and mer[1] <= 1


def test_rotation_sign_matches_docstring():
    """Equator along (cos t, sin t): positive rotation dips the right side downwards."""
    g = Geometry((50.0, 50.0), 10.0)
    ex, ey = g.equator_vector
    assert ex > 0 and ey > 0  # right side, larger row index
    assert Geometry((0, 0), 100.0).rotation_deg == pytest.approx(-80.0)
    assert Geometry((0, 0), -90.0).rotation_deg == pytest.approx(90.0)


def test_constant_frame_folds_to_constant_and_count_range():
    img = np.full((50, 70), 7.5, np.float32)
    folded, count = fold(img, Geometry((30.3, 22.8), 12.0))
    assert count.min() >= 0 and count.max() == 4
    np.testing.assert_allclose(folded[count > 0], 7.5, rtol=1e-6)
    assert np.all(folded[count == 0] == 0)


def test_masked_pixels_never_contribute():
    rng = np.random.default_rng(1)
    img = rng.random((60, 60)).astype(np.float32)
    mask = np.ones(img.shape, bool)
    mask[20:24, :] = False  # a gap
    mask[40, 41] = False
    g = Geometry((29.6, 31.2), 4.0)
    a, ca = fold(img, g, mask)
    spoiled = img.copy()
    spoiled[~mask] = 1e9
    b, cb = fold(spoiled, g, mask)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)
    assert ca.sum() < fold(img, g)[1].sum()  # the gap and its edges removed samples


def test_gap_edges_are_excluded():
    img = np.ones((40, 40), np.float32)
    mask = np.ones(img.shape, bool)
    mask[10, :] = False
    g = Geometry((20, 25), 0.0)
    _, c0 = fold(img, g, mask, edge=0)
    _, c1 = fold(img, g, mask, edge=1)
    # Row 10 is 15 rows above the centre (row 25); rows below 39 are off the detector
    # from i = 15 on. With edge=1 the gap's neighbours, rows 9 and 11, drop out too.
    for j in (0, 3):
        assert (c0[14, j], c0[15, j], c0[16, j]) == (4, 0, 2)
        assert (c1[14, j], c1[15, j], c1[16, j]) == (2, 0, 0)


def test_stream_of_frames_uses_one_map():
    rng = np.random.default_rng(2)
    shape = (64, 48)
    mask = rng.random(shape) > 0.05
    g = Geometry((23.4, 30.1), -7.0)
    fm = FoldMap(shape, g, mask)
    frames = rng.poisson(4.0, size=(5,) + shape).astype(np.float32)
    batch, counts = fm.fold(frames, mask)
    for k in range(5):
        single, c = fold(frames[k], g, mask)
        np.testing.assert_allclose(batch[k], single, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(counts[k], c)


def test_frame_with_extra_invalid_pixels_equals_a_map_built_with_them():
    rng = np.random.default_rng(3)
    shape = (64, 64)
    static = np.ones(shape, bool)
    static[30:33, :] = False
    g = Geometry((31.7, 28.2), 3.0)
    fm = FoldMap(shape, g, static)
    frame = rng.random(shape).astype(np.float32)
    frame_mask = static.copy()
    frame_mask[10, 12] = False  # a hot pixel this frame only
    frame_mask[50, 40:44] = False
    got, c_got = fm.fold(frame, frame_mask)
    want, c_want = FoldMap(shape, g, frame_mask).fold(frame, frame_mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(c_got, c_want)
    assert (c_got != fm.count).any()


def test_fold_then_unfold_returns_symmetric_pattern():
    shape = (90, 110)
    g = Geometry((52.3, 47.6), 8.0)
    img, _ = symmetric_pattern(shape, g)
    fm = FoldMap(shape, g, None, edge=0)
    folded, count = fm.fold(img)
    back, valid = fm.unfold(folded, count)
    assert valid.mean() > 0.95
    # Two bilinear interpolations of a smooth pattern: small relative error.
    rel = np.abs(back[valid] - img[valid]) / img[valid]
    assert rel.max() < 0.02 and np.median(rel) < 0.002
    back2, valid2 = unfold(folded, g, shape, count)
    np.testing.assert_array_equal(valid, valid2)
    np.testing.assert_allclose(back, back2, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(24, 64),
    w=st.integers(24, 64),
    fx=st.floats(0.3, 0.7),
    fy=st.floats(0.3, 0.7),
    rot=st.one_of(st.floats(-90, 90), st.sampled_from([0.0, 90.0, -45.0])),
)
def test_fold_of_symmetric_pattern_recovers_its_profile(h, w, fx, fy, rot):
    g = Geometry((fx * (w - 1), fy * (h - 1)), rot)
    img, _ = symmetric_pattern((h, w), g, su=6.0, sv=4.0)
    folded, count = fold(img, g, edge=0)
    ii, jj = np.nonzero(count)
    expected = 2.0 + 50.0 * np.exp(-0.5 * ((jj / 6.0) ** 2 + (ii / 4.0) ** 2))
    # Bilinear sampling of a smooth function: error bounded by its curvature.
    np.testing.assert_allclose(folded[ii, jj], expected, rtol=0.08, atol=0.5)
    assert count.max() <= 4 and count[0, 0] >= 1


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rot=st.floats(-90, 90),
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
)
def test_fold_is_linear_and_count_bounded(seed, rot, a, b):
    rng = np.random.default_rng(seed)
    shape = (30, 26)
    x = rng.random(shape)
    y = rng.random(shape)
    mask = rng.random(shape) > 0.1
    g = Geometry((rng.uniform(8, 18), rng.uniform(8, 22)), rot)
    fm = FoldMap(shape, g, mask)
    fx, c = fm.fold(x, mask)
    fy, _ = fm.fold(y, mask)
    fxy, _ = fm.fold(a * x + b * y, mask)  # negative values are data here: mask given
    np.testing.assert_allclose(fxy, a * fx + b * fy, atol=1e-4)
    assert c.min() >= 0 and c.max() <= 4
    assert np.all(fx[c == 0] == 0)


def test_bad_inputs_are_named():
    with pytest.raises(GeometryError, match="center must be a pair"):
        Geometry("middle", 0.0)
    with pytest.raises(GeometryError, match="finite"):
        Geometry((1.0, math.nan), 0.0)
    with pytest.raises(GeometryError, match=r"expected a 2-D frame, got an array of shape \(5,\)"):
        fold(np.zeros(5), Geometry((1, 1)))
    fm = FoldMap((10, 10), Geometry((5, 5)))
    with pytest.raises(GeometryError, match=r"frame has shape \(10, 11\)"):
        fm.fold(np.zeros((10, 11)))


def test_first_frame_gather_equals_the_sparse_matrix_of_later_frames():
    rng = np.random.default_rng(5)
    shape = (70, 90)
    mask = rng.random(shape) > 0.02
    fm = FoldMap(shape, Geometry((40.3, 33.9), 12.5), mask)
    frame = rng.poisson(20.0, size=shape).astype(np.float32)
    first, c1 = fm.fold(frame, mask)  # direct gathers, no matrix yet
    assert fm._matrix is None
    second, c2 = fm.fold(frame, mask)  # builds the matrix once
    assert fm._matrix is not None
    matrix = fm._matrix
    fm.fold(frame, mask)
    assert fm._matrix is matrix  # not rebuilt per frame
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(c1, c2)


# ---------------------------------------------------------------------- public tap tables


def _fold_from_taps(taps, flat, w, scale):
    """The fold as the weighted sum over quadrant samples of their four bilinear taps."""
    n = flat.size
    fx, fy = taps.fx.astype(np.float64), taps.fy.astype(np.float64)
    weights = ((1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx)
    value = np.zeros(taps.base.shape)
    for offset, weight in zip((0, 1, w, w + 1), weights):
        # A tap without weight may lie past the last pixel: clip it (its weight is 0).
        value += weight * flat[np.minimum(taps.base.astype(np.int64) + offset, n - 1)]
    return (value * scale).sum(axis=1)


def test_public_taps_reproduce_the_fold():
    rng = np.random.default_rng(11)
    shape = (57, 73)
    mask = rng.random(shape) > 0.03
    mask[20:23, :] = False  # a gap
    fm = FoldMap(shape, Geometry((35.4, 27.8), 17.0), mask)
    frame = rng.poisson(30.0, size=shape).astype(np.float32)
    taps = fm.taps()
    n_fold = fm.fold_shape[0] * fm.fold_shape[1]
    for name, dtype in (("base", np.int32), ("fx", np.float32), ("fy", np.float32), ("inside", bool), ("footprint", np.int8), ("scale", np.float32)):
        a = getattr(taps, name)
        assert a.shape == (n_fold, 4) and a.dtype == dtype, name
        assert not a.flags.writeable, name  # views of the map's own tables
    assert ((taps.fx >= 0) & (taps.fx < 1)).all() and ((taps.fy >= 0) & (taps.fy < 1)).all()
    np.testing.assert_array_equal(taps.footprint, (taps.fx > 0) + 2 * (taps.fy > 0))
    # The static count is the number of samples with weight; scale is 1 / count for them.
    np.testing.assert_array_equal((taps.scale > 0).sum(axis=1).reshape(fm.fold_shape), fm.count)
    ok = fm.sample_ok(fm.usable_from(mask))
    np.testing.assert_array_equal(fm.usable_from(mask), fm.usable)
    np.testing.assert_array_equal(ok, taps.scale > 0)
    assert not (ok & ~taps.inside).any()

    flat = np.where(mask, frame, 0).astype(np.float64).ravel()
    want, count = fm.fold(frame, mask)
    got = _fold_from_taps(taps, flat, shape[1], taps.scale)
    np.testing.assert_allclose(got.reshape(fm.fold_shape), want, rtol=1e-5, atol=1e-5 * want.max())
    np.testing.assert_array_equal(count, fm.count)

    # A frame with its own invalid pixels (away from the static gaps' edges, where
    # FoldMap.fold keeps the static erosion): usable_from + sample_ok give its mean.
    frame_mask = mask.copy()
    frame_mask.ravel()[rng.choice(np.flatnonzero(fm.usable), 12, replace=False)] = False
    want, count = fm.fold(frame, frame_mask)
    ok = fm.sample_ok(fm.usable_from(frame_mask))
    n_ok = ok.sum(axis=1)
    scale = np.where(ok, 1.0 / np.maximum(n_ok, 1)[:, None], 0.0)
    got = _fold_from_taps(taps, np.where(frame_mask, frame, 0).astype(np.float64).ravel(), shape[1], scale)
    np.testing.assert_allclose(got.reshape(fm.fold_shape), want, rtol=1e-5, atol=1e-5 * want.max())
    np.testing.assert_array_equal(n_ok.reshape(fm.fold_shape), count)
    assert (count != fm.count).any()


def test_usable_from_and_sample_ok_check_their_input():
    fm = FoldMap((12, 10), Geometry((4.5, 6.0)))
    with pytest.raises(GeometryError, match=r"mask has shape \(10, 12\), expected \(12, 10\)"):
        fm.usable_from(np.ones((10, 12), bool))
    with pytest.raises(GeometryError, match=r"usable has shape"):
        fm.sample_ok(np.ones((12, 11), bool))
    # Array-likes of any truthy dtype are taken as bool.
    np.testing.assert_array_equal(fm.usable_from(np.ones((12, 10), np.uint8)), fm.usable)


def test_folding_lives_in_one_module():
    """fold.py owns FoldMap, fold and unfold (no re-exports), and nothing outside it
    reaches into a FoldMap's private attributes or fold.py's private names."""
    import ast
    from pathlib import Path

    import live_bgsub.fold
    import live_bgsub.geometry

    for name in ("FoldMap", "FoldTaps", "fold", "unfold"):
        assert name in live_bgsub.fold.__all__
        assert not hasattr(live_bgsub.geometry, name), f"live_bgsub.geometry.{name} is a second name for it"

    fm = FoldMap((20, 30), Geometry((14.2, 9.7), 5.0))
    frame = np.ones((20, 30), np.float32)
    for _ in range(2):
        folded, _ = fm.fold(frame)
    fm.unfold(folded)  # every lazily made attribute exists now
    private = {n for n in set(vars(fm)) | set(dir(FoldMap)) if n.startswith("_") and not n.startswith("__")}
    private_module = {n for n in vars(live_bgsub.fold) if n.startswith("_") and not n.startswith("__")}
    assert {"_base", "_fx", "_fy", "_inside", "_footprint", "_scale"} <= private

    repo = Path(__file__).resolve().parents[1]
    fold_py = repo / "live_bgsub" / "fold.py"
    offenders = []
    for folder in ("live_bgsub", "training", "benchmarks"):
        for path in sorted((repo / folder).rglob("*.py")):
            if path == fold_py:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(repo)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Attribute) and node.attr in private | private_module:
                    # self._x / cls._x in another class is that class's own attribute.
                    if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                        offenders.append(f"{where}: {ast.unparse(node)}")
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "fold":
                    offenders += [f"{where}: imports {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, "private FoldMap / live_bgsub.fold names used outside fold.py:\n" + "\n".join(offenders)
