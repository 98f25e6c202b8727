"""``benchmarks.robustness``'s bounds on I11/I10: what a fit of the profile model can know."""

import numpy as np

from benchmarks.robustness import model_ratio_bound, ratio_bound
from live_bgsub.fold import FoldMap
from live_bgsub.geometry import Geometry
from live_bgsub.metrics import roi_metrics
from live_bgsub.synth import make_pattern


def _folded(preset, **kw):
    pat = make_pattern(preset, noise=False, **kw)
    fm = FoldMap(pat.frame.shape, Geometry(pat.params["center"], pat.params["rotation_deg"]), pat.mask)
    background, count = fm.fold(np.where(pat.mask, pat.background, 0).astype(np.float32), pat.mask)
    return pat, fm, background, count > 0


def test_the_model_bound_is_what_the_fit_reaches_on_a_resolved_pattern():
    """Pilatus 1M, S10 = 42 px, half the counts: 16 noise draws through ``roi_metrics``
    scatter I11/I10 by what the bound says (measured: 2.40 % against 2.38 %); the bound
    with only the intensities unknown is below it (2.09 %)."""
    pat, fm, background, valid = _folded("pilatus-1m", seed=4, counts=0.5)
    bound = model_ratio_bound(pat, fm, pat.mask, valid)
    assert ratio_bound(pat) < bound
    rng = np.random.default_rng(0)
    expected = (pat.background + pat.signal).astype(np.float64)
    errors = []
    for _ in range(16):
        folded, _ = fm.fold(np.where(pat.mask, rng.poisson(expected), 0).astype(np.float32), pat.mask)
        m = roi_metrics(np.where(valid, folded - background, 0.0), mask=valid)
        assert m["equator_found"], m["reason"]
        errors.append(m["i11_i10"] / pat.params["i11_i10"] - 1.0)
    spread = float(np.std(errors, ddof=1))
    assert 0.7 * bound < spread < 1.5 * bound


def test_the_model_bound_says_when_the_widths_cannot_be_known():
    """MAR 165 at S10 = 21 px with 5.5 px wide peaks (the conditions of seed 2's mar165 #4):
    with the peaks' positions and widths known I11/I10 could be had to 3.5 %; with the
    model's widths, Z line and baseline free, not at all (measured: 1560 %)."""
    pat, fm, _, valid = _folded("mar165", seed=2004, s10_px=21.07, counts=0.53, beam_stop_radius_px=10.5)
    assert ratio_bound(pat) < 0.05
    assert model_ratio_bound(pat, fm, pat.mask, valid) > 100 * ratio_bound(pat)
