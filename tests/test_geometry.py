"""Beam centre and equator rotation: synthetic truth, the real P40 run, venus32int."""

import math

import numpy as np
import pytest
from conftest import MUSCLEX_GEOMETRY

from live_bgsub import geometry as geometry_module
from live_bgsub.errors import GeometryError
from live_bgsub.geometry import Geometry, find_center, find_geometry, find_rotation, find_run_geometry
from live_bgsub.io import mask_invalid, read_image
from live_bgsub.synth import make_pattern


def _rotation_error(a, b):
    """Difference of two axis angles (degrees, modulo 180)."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


@pytest.mark.slow
def test_fifty_synthetic_pilatus_patterns(capsys):
    """Centre within 0.5 px and rotation within 0.2 degrees of the truth."""
    rng = np.random.default_rng(2026)
    center_err, rot_err = [], []
    for k in range(50):
        # +-40 px centre offsets and +-10 degrees; every fifth pattern has a vertical equator.
        rotation = rng.uniform(-10, 10) + (90.0 if k % 5 == 4 else 0.0)
        p = make_pattern("pilatus-1m", seed=1000 + k, rotation_deg=rotation)
        g = find_geometry(p.frame, p.mask)
        center_err.append(math.dist(g.center, p.params["center"]))
        rot_err.append(_rotation_error(g.rotation_deg, p.params["rotation_deg"]))
    with capsys.disabled():
        print(
            f"\n50 synthetic Pilatus patterns: centre error median {np.median(center_err):.3f} px, "
            f"worst {max(center_err):.3f} px; rotation error median {np.median(rot_err):.3f} deg, "
            f"worst {max(rot_err):.3f} deg"
        )
    assert max(center_err) < 0.5
    assert max(rot_err) < 0.2



def test_a_run_whose_beam_moved_is_flagged_and_each_frame_keeps_its_own_centre():
    """The frames' estimates start from the run's centre but are not pinned to it."""
    rotation = 3.0
    centers = [(431.3, 505.8), (431.3, 505.8), (434.3, 503.8), (434.3, 503.8)]  # the beam moved 3.6 px
    frames = [make_pattern("pilatus-1m", seed=40 + k, center=c, rotation_deg=rotation) for k, c in enumerate(centers)]
    run = find_run_geometry([p.frame for p in frames], frames[0].mask)
    for g, c in zip(run.per_frame, centers):
        assert math.dist(g.center, c) < 0.5
    assert math.hypot(*run.center_spread_px) > geometry_module.MAX_CENTER_SPREAD_PX
    assert run.quality.verdict == "doubtful"
    assert any("centres scatter" in r for r in run.quality.reasons)

def test_vertical_equator_is_found_near_90():
    p = make_pattern("pilatus-1m", seed=7, rotation_deg=88.0)
    g = find_geometry(p.frame, p.mask)
    assert _rotation_error(g.rotation_deg, 88.0) < 0.2
    assert abs(g.rotation_deg) > 80


def test_run_estimate_is_at_least_as_good_as_single_frames():
    center, rotation = (431.3, 505.8), 4.0
    frames = [make_pattern("pilatus-1m", seed=s, center=center, rotation_deg=rotation, counts=0.3) for s in range(4)]
    # counts=0.3: photon-starved frames, where summing pays.
    run = find_run_geometry([p.frame for p in frames], frames[0].mask)
    assert len(run.per_frame) == 4
    assert math.dist(run.geometry.center, center) < 0.5
    assert _rotation_error(run.geometry.rotation_deg, rotation) < 0.2
    assert run.center_spread_px[0] < 1 and run.center_spread_px[1] < 1 and run.rotation_spread_deg < 0.5


def test_all_masked_or_wrong_shape_is_a_clear_error():
    with pytest.raises(GeometryError, match="every pixel of the frame is masked"):
        find_center(np.ones((50, 50)), np.zeros((50, 50), bool))
    with pytest.raises(GeometryError, match=r"expected a 2-D frame, got an array of shape \(3, 4, 5\)"):
        find_rotation(np.ones((3, 4, 5)))
    with pytest.raises(GeometryError, match="mask has shape"):
        find_geometry(np.ones((50, 50)), np.ones((40, 50), bool))
    with pytest.raises(GeometryError, match="at least one frame"):
        find_run_geometry([])


# --------------------------------------------------------------------------- real frames


def _equator_angle_from_10_spots(image, mask, center, s_range=(25, 60)):
    """Independent check: the angle of the line through the two 1,0 spot centroids."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dx, dy = xx - center[0], yy - center[1]
    r = np.hypot(dx, dy)
    ang = np.degrees(np.arctan2(dy, dx))
    band = (r > s_range[0]) & (r < s_range[1]) & mask
    points = []
    for side in (0.0, 180.0):
        sector = band & (np.abs((ang - side + 180) % 360 - 180) < 15)
        wts = np.clip(image - np.percentile(image[sector], 60), 0, None) * sector
        points.append(((wts * xx).sum() / wts.sum(), (wts * yy).sum() / wts.sum()))
    (x1, y1), (x0, y0) = points
    return math.degrees(math.atan2(y1 - y0, x1 - x0))


@pytest.fixture(scope="module")
def p40(real_data):
    return [read_image(real_data / f"P40_1_3_0000{i}.tif") for i in range(6)]


@pytest.mark.realdata
def test_p40_frames_against_musclex(p40, capsys):
    """Per frame: within 2 px and 1 degree of MuscleX where MuscleX agrees with itself.

    MuscleX's per-frame answers on these six frames (one geometry) scatter over
    3.2 px in x and 1.6 degrees; the run mean of its values is the stable reference.
    """
    ours = [find_geometry(im.data, im.mask) for im in p40]
    mx_centers = np.array([MUSCLEX_GEOMETRY[f"P40_1_3_0000{i}"][0] for i in range(6)])
    mx_rot = np.array([MUSCLEX_GEOMETRY[f"P40_1_3_0000{i}"][1] for i in range(6)])
    lines = []
    for i, g in enumerate(ours):
        dc = math.dist(g.center, mx_centers[i])
        dr = _rotation_error(g.rotation_deg, mx_rot[i])
        lines.append(f"P40_1_3_0000{i}: ours ({g.center[0]:.2f}, {g.center[1]:.2f}) {g.rotation_deg:.2f} deg; "
                     f"MuscleX ({mx_centers[i][0]:.2f}, {mx_centers[i][1]:.2f}) {mx_rot[i]:.1f} deg; |dc| {dc:.2f} px, |drot| {dr:.2f} deg")
        # Against MuscleX's run mean: the 2 px and 1 degree.
        assert math.dist(g.center, mx_centers.mean(axis=0)) < 2.0
        assert _rotation_error(g.rotation_deg, mx_rot.mean()) < 1.0
        # Against each MuscleX frame: within MuscleX's own scatter plus the bound.
        assert dc < 2.0 + 0.5 * np.ptp(mx_centers[:, 0])
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # Far steadier than MuscleX on frames that share one geometry.
    centers = np.array([g.center for g in ours])
    rots = np.array([g.rotation_deg for g in ours])
    assert centers.std(axis=0).max() < 0.2
    assert rots.std() < 0.3 < mx_rot.std()


@pytest.mark.realdata
def test_p40_run_estimate_and_independent_rotation_check(p40, capsys):
    run = find_run_geometry([im.data for im in p40], p40[0].mask)
    g = run.geometry
    with capsys.disabled():
        print(f"\nP40 run estimate: centre ({g.center[0]:.2f}, {g.center[1]:.2f}) +- "
              f"({run.center_spread_px[0]:.2f}, {run.center_spread_px[1]:.2f}) px, rotation "
              f"{g.rotation_deg:.2f} +- {run.rotation_spread_deg:.2f} deg")
    mx = np.array([v[0] for k, v in MUSCLEX_GEOMETRY.items() if k.startswith("P40")])
    assert math.dist(g.center, mx.mean(axis=0)) < 1.0
    assert run.center_spread_px[0] < 0.2 and run.center_spread_px[1] < 0.2
    # The line through the left and right 1,0 spots of the summed run, measured
    # without any symmetry assumption, agrees with the mirror-axis rotation.
    total = sum(im.data for im in p40)
    spots = _equator_angle_from_10_spots(total, p40[0].mask, g.center)
    assert _rotation_error(g.rotation_deg, spots) < 0.3


def _center_from_10_spots(image, mask, center, axis_deg, s_range, iterations=3):
    """Independent check: the midpoint of the two 1,0 spot centroids (iterated from ``center``)."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(iterations):
        dx, dy = xx - center[0], yy - center[1]
        r = np.hypot(dx, dy)
        ang = np.degrees(np.arctan2(dy, dx))
        band = (r > s_range[0]) & (r < s_range[1]) & mask
        points = []
        for side in (axis_deg, axis_deg + 180.0):
            sector = band & (np.abs((ang - side + 180) % 360 - 180) < 15)
            wts = np.clip(image - np.percentile(image[sector], 60), 0, None) * sector
            points.append(((wts * xx).sum() / wts.sum(), (wts * yy).sum() / wts.sum()))
        center = ((points[0][0] + points[1][0]) / 2, (points[0][1] + points[1][1]) / 2)
    return center


@pytest.mark.realdata
def test_venus_equator_is_vertical(real_data):
    """MuscleX's automatic centre sits 2 px toward the beam stop's centre (392.5, 563.8):
    with the shadow counted as data (a Pilatus reads 0 there) the old estimate did too
    (564.2). With the shadow masked the centre moves to ~565.8 with a 1 px refinement
    blur and to 566.2 with the 3 px default; the centroid midpoint of the two 1,0 spots
    (weak in this frame) is ~564.5. Which is right is not known: the bounds say how far
    apart the three are, 2.53 px from MuscleX's and 1.68 px from the spots."""
    im = read_image(real_data / "venus32int.tif")
    g = find_geometry(im.data, im.mask)
    (mx_center, mx_rot) = MUSCLEX_GEOMETRY["venus32int"]
    assert abs(g.rotation_deg) > 85  # vertical equator
    assert _rotation_error(g.rotation_deg, mx_rot) < 1.0
    assert math.dist(g.center, mx_center) < 2.7
    spots = _center_from_10_spots(im.data, im.mask, g.center, g.rotation_deg, (40, 64))
    assert math.dist(g.center, spots) < 1.8


@pytest.mark.realdata
def test_marccd_cardiac_frame(real_data):
    """uint16 with a bias, circular active area, a beam stop reading the bias, vertical equator.

    On bebe8fc the centre was (1020.5, 1042.9): the unmasked shadow, not the pattern.
    The expert centre (1024.0, 1046.0) and MuscleX's automatic one are 2.7 px from the
    midpoint of the two 1,0 spots (1021.9, 1044.3), which is the symmetry centre of the
    reflections; we meet the spots. Two checks that assume no centre: local 2-D Gaussian
    fits (with a linear baseline) of the two 1,0 spots put them at (1020.82, 934.81) and
    (1022.93, 1153.89), midpoint (1021.88, 1044.35); and the frame's point-symmetry
    residual (log counts, annuli of 40-90 and 90-130 px) is 40-50 times larger about the
    expert centre than about ours. The issue's 1.5 px from the expert centre is not met.
    """
    im = read_image(real_data / "CD_PIGLV_PIG3_FB_SHORT_PRE_BUFFER_00001.tif")
    run = find_run_geometry([im.data], [im.mask])
    g = run.geometry
    assert run.beam_stop is not None and run.beam_stop.radius_px > 8
    assert run.quality.verdict == "good", run.quality.reasons
    assert _rotation_error(g.rotation_deg, 89.9) < 0.6  # MuscleX's rotation
    spots = _center_from_10_spots(im.data, im.mask, g.center, g.rotation_deg, (92, 128))
    assert math.dist(g.center, spots) < 0.5
    assert math.dist(g.center, (1024.0, 1046.0)) < 3.0


def test_geometry_dict_round_trip():
    g = Geometry((1.5, 2.5), 181.0)
    assert g.to_dict() == {"center": [1.5, 2.5], "rotation_deg": pytest.approx(1.0)}


def _ccd_frame(p, stop_center, stop_radius, *, bias=100.0, read_noise=3.0, arm_deg=None, arm_width=0.0, seed=0):
    """A CCD's uint16 frame of a synthetic pattern: bias + counts + read noise, 0 off the
    active area, and a beam stop (with an optional arm) that reads the bias. The stop is
    placed where the beam stop is, not where the beam is."""
    rng = np.random.default_rng(seed)
    h, w = p.frame.shape
    sx, sy = stop_center
    yy, xx = np.mgrid[0:h, 0:w]
    shadow = (xx - sx) ** 2 + (yy - sy) ** 2 <= stop_radius**2
    if arm_deg is not None:
        t = math.radians(arm_deg)
        along = (xx - sx) * math.cos(t) + (yy - sy) * math.sin(t)
        across = -(xx - sx) * math.sin(t) + (yy - sy) * math.cos(t)
        shadow |= (along > 0) & (np.abs(across) <= arm_width / 2)
    raw = bias + np.where(shadow, 0.0, p.frame) + rng.normal(0.0, read_noise, p.frame.shape)
    active = p.raw() != -1  # not a module gap, not off the circular active area
    return np.where(active, np.clip(np.rint(raw), 1, 65535), 0).astype(np.uint16), shadow


@pytest.mark.parametrize(
    "preset, kwargs, offset, radius, arm",
    [
        # MarCCD-like: circular active area, bias, vertical equator, a stop 8.6 px off the beam.
        ("mar", dict(seed=3, counts=10, vertical=True), (7, -5), 30, None),
        # The same with an arm to the frame's edge (bebe8fc: 6.8 px off).
        ("mar", dict(seed=4, counts=10, rotation_deg=6.0), (6, 4), 30, (-60, 14)),
        # A Pilatus-sized frame read like a CCD, with a stop and arm (bebe8fc: 4.4 px off).
        ("pilatus-1m", dict(seed=5, counts=3, rotation_deg=6.0), (4, 3), 16, (120, 8)),
    ],
)
def test_offset_beam_stop_with_bias_and_arm(preset, kwargs, offset, radius, arm):
    """A beam stop (and arm) off the beam centre reading a CCD's bias is an asymmetric
    object: unmasked, it pulled bebe8fc's centre 4-7 px toward itself."""
    p = make_pattern(preset, beam_stop_radius_px=0.5, **kwargs)
    cx, cy = p.params["center"]
    raw, shadow = _ccd_frame(
        p, (cx + offset[0], cy + offset[1]), radius, arm_deg=None if arm is None else arm[0], arm_width=0 if arm is None else arm[1]
    )
    run = find_run_geometry([raw.astype(np.float32)], [raw > 0])
    assert math.dist(run.geometry.center, (cx, cy)) < 0.5
    assert _rotation_error(run.geometry.rotation_deg, p.params["rotation_deg"]) < 0.2
    assert run.quality.verdict == "good"
    # The shadow is found and masked: its disc entirely, and the disc's size.
    assert run.beam_stop is not None
    assert run.beam_stop.radius_px == pytest.approx(radius, rel=0.25)
    disc = shadow & (np.hypot(*np.subtract(np.indices(shadow.shape)[::-1], np.reshape((cx + offset[0], cy + offset[1]), (2, 1, 1)))) <= radius)
    assert run.beam_stop.mask[disc].mean() > 0.99


def test_quality_verdict_flags_a_pattern_without_symmetry():
    """Noise with no pattern: no centre can be trusted, and the verdict says so."""
    rng = np.random.default_rng(0)
    frame = rng.poisson(5.0, (400, 400)).astype(np.float32)
    run = find_run_geometry([frame])
    assert run.quality.verdict == "doubtful"
    assert run.quality.reasons


def test_faint_beam_stop_arm_is_masked_to_the_edge():
    """An older 1k CCD (bias 100, read noise 5) with a large S10: far from the beam the
    background is a few counts, so pixel by pixel the arm's shadow is lost in the read
    noise and the connected shadow ended ~90 px out; the unmasked rest of the arm (bias
    only, next to bright background on the mirror side) pulled the centre 2.9 px along
    the arm (ac629de). Followed as a band, the arm is masked to the frame's edge."""
    p = make_pattern("ccd-1k", seed=8, s10_px=209.5, counts=5.0, rotation_deg=-84.0, beam_stop_radius_px=29.5)
    data, mask = mask_invalid(p.raw())
    run = find_run_geometry([data], [mask])
    assert math.dist(run.geometry.center, p.params["center"]) < 0.5
    shadow = ~p.mask & mask  # the stop and its arm read the bias; dead pixels and gaps aside
    assert (shadow & ~run.beam_stop.mask).sum() < 0.01 * shadow.sum()
    # The arm runs to the edge: its far end is masked.
    cx, cy = run.beam_stop.center
    t = math.radians(p.params["beam_stop_arm_angle_deg"])
    far = (int(round(cy + 0.9 * 500 * math.sin(t))), int(round(cx + 0.9 * 500 * math.cos(t))))
    assert run.beam_stop.mask[far]


def test_centre_off_by_more_than_the_goal_is_not_called_good():
    """A faint Rayonix frame with S10 = 21 px: the centre lands 0.59 px off with a standard
    error of 0.29 px, which the earlier 0.35 px threshold called good (the one geometry
    confident wrong answer of ``benchmarks.robustness --seed 2``)."""
    pat = make_pattern("rayonix", seed=2029, s10_px=21.25, rotation_deg=74.95, counts=0.461, beam_stop_radius_px=10.62)
    run = find_run_geometry(*[[a] for a in mask_invalid(pat.raw())])
    off = math.dist(run.geometry.center, pat.params["center"])
    assert off > 0.5
    assert run.quality.center_sigma_px > geometry_module.MAX_CENTER_SIGMA_PX
    assert run.quality.verdict == "doubtful"


def test_photon_starved_frame_has_an_uncertain_centre():
    """At 0.4 of the preset's counts an EIGER2 4M frame's centre misses 0.5 px (0.69 px
    here); the centre's standard error from the pattern's noise says so, where the
    symmetry alone called it good (ac629de). The same pattern bright is good."""
    kw = dict(seed=2002, s10_px=52.9, rotation_deg=-5.0, beam_stop_radius_px=26.0)
    dim = make_pattern("eiger2-4m", counts=0.39, **kw)
    run = find_run_geometry(*[[a] for a in mask_invalid(dim.raw())])
    assert run.quality.verdict == "doubtful"
    assert run.quality.center_sigma_px > geometry_module.MAX_CENTER_SIGMA_PX
    assert any("uncertain" in r for r in run.quality.reasons)
    bright = make_pattern("eiger2-4m", counts=20.0, **kw)
    run = find_run_geometry(*[[a] for a in mask_invalid(bright.raw())])
    assert math.dist(run.geometry.center, bright.params["center"]) < 0.5
    assert run.quality.verdict == "good", run.quality.reasons
    assert run.quality.center_sigma_px < geometry_module.MAX_CENTER_SIGMA_PX


def test_beam_stop_of_a_faint_ccd_frame_is_found():
    """A 1k CCD at half its preset's counts: most of the frame reads the bias (100) plus a
    count or two, the 0.5th percentile lies 2.6 read-noise sigmas below the bias, and
    against that floor the shadow (the bias) is not dark. f7a9f21 found no beam stop;
    the unmasked shadow and arm turned the rotation 0.73 degrees with a good verdict.
    The floor the centre itself reads finds the shadow."""
    p = make_pattern("ccd-1k", seed=2002, s10_px=34.26, rotation_deg=102.08, counts=0.46, beam_stop_radius_px=17.13)
    data, mask = mask_invalid(p.raw())
    run = find_run_geometry([data], [mask])
    assert run.beam_stop is not None
    assert run.beam_stop.radius_px == pytest.approx(17.13, rel=0.25)
    assert math.dist(run.beam_stop.center, p.params["center"]) < 2.0
    assert _rotation_error(run.geometry.rotation_deg, p.params["rotation_deg"]) < 0.2
