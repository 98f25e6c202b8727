"""Radial integration: equal to pyFAI's histogram integrator, and consistent on the fold."""

import numpy as np
import pytest

from live_bgsub.fold import fold
from live_bgsub.geometry import Geometry, radial_profile
from live_bgsub.synth import make_powder

pyFAI = pytest.importorskip("pyFAI", reason="pyFAI is the reference; it comes with the test extra")


def test_equals_pyfai_histogram_on_a_powder_frame():
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    p = make_powder("pilatus-1m", seed=5, noise=False)
    cx, cy = p.params["center"]
    px = 1e-3
    ai = AzimuthalIntegrator(dist=1.0, poni1=(cy + 0.5) * px, poni2=(cx + 0.5) * px, pixel1=px, pixel2=px)
    res = ai.integrate1d(
        p.frame, 400, unit="r_mm", radial_range=(0, 400), mask=(~p.mask).astype(np.int8),
        method=("no", "histogram", "cython"), correctSolidAngle=False, polarization_factor=None,
    )
    radius, mean, count = radial_profile(p.frame, p.mask, (cx, cy), bin_width=1.0, rmax=400)
    np.testing.assert_allclose(radius, res.radial, atol=1e-3)
    ok = count > 20
    assert ok.sum() > 300
    np.testing.assert_allclose(mean[ok], res.intensity[ok], rtol=1e-5)


def test_fold_keeps_the_radial_profile():
    p = make_powder("pilatus-1m", seed=6, noise=False)
    g = Geometry(p.params["center"], 0.0)
    folded, count = fold(p.frame, g, p.mask)
    _, on_frame, n_frame = radial_profile(p.frame, p.mask, g.center, bin_width=4.0, rmax=400)
    _, on_fold, n_fold = radial_profile(folded, count > 0, (0.0, 0.0), bin_width=4.0, rmax=400)
    ok = (n_frame > 50) & (n_fold > 20)
    rel = np.abs(on_fold[ok] / on_frame[ok] - 1)
    # The fold resamples bilinearly: rings of a few px width blur slightly.
    assert np.median(rel) < 0.01 and rel.max() < 0.08


def test_empty_bins_are_nan_and_bad_width_is_named():
    img = np.ones((5, 5))
    _, mean, count = radial_profile(img, center=(2, 2), bin_width=1.0, rmax=10)
    assert np.isnan(mean[-1]) and count[-1] == 0 and mean[0] == 1.0
    with pytest.raises(ValueError, match="bin_width must be > 0 pixels, got 0"):
        radial_profile(img, bin_width=0)
