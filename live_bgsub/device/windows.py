"""Window metrics: the reflection model of :func:`live_bgsub.metrics.roi_metrics`, fitted once per
run on a reference fold and frozen into fixed per-pixel window weights.

:func:`fit_windows` fits the model on the CPU through :mod:`live_bgsub.reflections`' public
API (the one ``roi_metrics`` calls: the two paths share one reflection model) and returns
a :class:`WindowFit`, whose matrix the device multiplies each corrected fold with;
:func:`window_support` is the set of window pixels such a fit may weight (what the device
gathers); :func:`metrics_from_coef` is the host twin of the device's last step, from the
window coefficients to the metrics :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..engine import METRIC_KEYS

__all__ = ["METRIC_NAMES", "WINDOW_COLUMNS", "WindowFit", "fit_windows", "metrics_from_coef", "window_support"]

#: Metric columns of the device pipeline's output, in order (the callback's metric keys).
METRIC_NAMES = METRIC_KEYS

#: Columns of the window matrix (``live_bgsub.model.pipeline`` reads them in this order).
WINDOW_COLUMNS = ("i10", "i11", "d10", "m3", "dm3")


@dataclass
class WindowFit:
    """Fixed per-run window weights for the device metrics, fitted on a reference frame.

    Attributes
    ----------
    matrix : ndarray of float32, ``(hm * wm, 5)``
        Columns :data:`WINDOW_COLUMNS` over the top-left ``(hm, wm)`` of the fold:
        ``corrected[:hm, :wm].ravel() @ matrix`` gives the intensities ``i10``, ``i11``,
        ``m3`` and the position-derivative coefficients ``d10``, ``dm3`` (intensity x
        shift: ``S10 = s10_px + d10 / i10``, ``M3 = m3_px + dm3 / m3``).
    shape : (int, int)
        ``(hm, wm)``.
    s10_px, m3_px : float
        Positions of the reference fit (NaN for M3 when it was not found).
    equator_found, m3_found : bool
    params : dict
        The reference fit: ``roi_metrics`` output and the equatorial model parameters.
    """

    matrix: np.ndarray
    shape: tuple
    s10_px: float
    m3_px: float
    equator_found: bool
    m3_found: bool
    params: dict = field(default_factory=dict)


def _profile_operator(valid, *, axis, lo_deg, hi_deg, rmax, min_coverage=0.7):
    """The linear map fold -> radial profile of :class:`live_bgsub.reflections.SectorProfile`.

    Returns ``(rows, cols, pix_weight_low, pix_weight_high, k0, scale, ok, var)``: fold
    pixels ``(rows, cols)`` of the sector add ``pix_weight_low * value`` to bin ``k0``
    and ``pix_weight_high * value`` to bin ``k0 + 1``; bin values are then multiplied by
    ``scale`` (coverage); ``ok`` and ``var`` as the profile's.
    """
    from ..reflections import sector_bins

    b = sector_bins(valid, axis=axis, lo_deg=lo_deg, hi_deg=hi_deg, rmax=rmax, min_coverage=min_coverage)
    return b.rows, b.cols, b.w * (1 - b.f), b.w * b.f, b.k0, b.scale, b.ok, b.var


def _pixel_weights(op, q, shape):
    """Fold-pixel weights ``(hm * wm, n_coef)`` of coefficients ``q @ profile``; ``q``: (n_coef, n_bins)."""
    rows, cols, low, high, k0, scale, _, _ = op
    qs = q * scale[None, :]
    out = np.zeros((shape[0] * shape[1], q.shape[0]))
    np.add.at(out, rows * shape[1] + cols, low[:, None] * qs[:, k0].T + high[:, None] * qs[:, k0 + 1].T)
    return out


def _solver(columns, var):
    """Weighted least squares ``(A^T W A)^-1 A^T W``: (n_columns, n_bins)."""
    a = np.column_stack(columns)
    wt = 1.0 / var
    g = a.T @ (a * wt[:, None])
    return np.linalg.pinv(g) @ (a * wt[:, None]).T


def _bin_solver(op, sel, columns, n_bins):
    q = np.zeros((len(columns), n_bins))
    q[:, sel] = _solver(columns, op[7][sel])
    return q


def fit_windows(
    corrected,
    valid,
    *,
    background=None,
    sector_deg: float = 15.0,
    rmax: float | None = None,
    shape=None,
    wavelength_nm: float | None = None,
    distance_mm: float | None = None,
    pixel_size_mm: float | None = None,
) -> WindowFit:
    """Fit :func:`~live_bgsub.metrics.roi_metrics` on a reference fold and freeze its model into window weights.

    Parameters
    ----------
    corrected : ndarray, (fh, fw)
        A corrected fold of the run (the first frame).
    valid : ndarray of bool
        Its validity (``count > 0``); the coverage correction of the profiles is frozen
        with it.
    background : ndarray, optional
        Passed to ``roi_metrics`` (recorded in ``params``).
    sector_deg, rmax, wavelength_nm, distance_mm, pixel_size_mm
        As :func:`~live_bgsub.metrics.roi_metrics`.
    shape : (int, int), optional
        ``(hm, wm)`` of the window matrix (default: the smallest that holds both sectors).

    Returns
    -------
    WindowFit
        With ``equator_found`` False (and a zero matrix) when ``roi_metrics`` finds no
        fiber equator on the reference.

    Notes
    -----
    ``roi_metrics`` fits four arced peaks at ``S10 * (1, z, sqrt(3), 2)`` plus a quadratic
    baseline to the equatorial sector's radial profile. With the non-linear parameters
    (S10, widths, Z position) frozen at the reference fit, the intensities are a linear
    least-squares solution, hence a linear function of the fold: one weight map per
    coefficient. Peaks move during a run (S10 by ~1 %, M3 with it), and a peak frozen
    at the reference position under-reads a moved one (-36 % for M3 moved by one
    width in the tests). So the 1,0 and 1,1 (and M3) columns come with their first and
    second derivatives with respect to the position (a second-order Taylor expansion
    of ``I p(r; c + delta)``): the intensity is read off unbiased to second order in
    ``delta / sigma`` and ``d / I = delta`` is the position shift. M3: one arced peak,
    linear baseline and the two derivatives over the meridional profile. The model,
    its search, fit and windows are :mod:`live_bgsub.reflections`' public API, the one
    ``roi_metrics`` calls: the two paths share one reflection model.
    """
    from .. import reflections as rf
    from ..metrics import roi_analysis

    corrected = np.asarray(corrected, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(corrected)
    fh, fw = corrected.shape
    rmax = float(min(corrected.shape) - 1) if rmax is None else float(rmax)
    nr = math.floor(rmax) + 2
    if shape is None:
        shape = (min(fh, nr), min(fw, nr))
    shape = tuple(int(s) for s in shape)
    analysis = roi_analysis(
        corrected,
        mask=valid,
        background=background,
        wavelength_nm=wavelength_nm,
        distance_mm=distance_mm,
        pixel_size_mm=pixel_size_mm,
        rmax=rmax,
        sector_deg=sector_deg,
    )
    reference = analysis.metrics
    empty = WindowFit(
        np.zeros((shape[0] * shape[1], len(WINDOW_COLUMNS)), np.float32), shape, math.nan, math.nan, False, False,
        {"roi_metrics": reference},
    )
    if not reference["equator_found"]:
        return empty

    # Equator: the model roi_metrics accepted (its own fit, not a second one), its linear part frozen.
    eq_sector = rf.sector("equator", sector_deg)
    equator = analysis.equator
    p = equator.params
    op = _profile_operator(valid, rmax=rmax, **eq_sector)
    n_bins = nr + 1
    r_bins = np.arange(n_bins, dtype=np.float64)
    lo, hi = equator.window  # the window roi_metrics fitted over
    sel = op[6] & (r_bins >= lo) & (r_bins <= hi)
    r = r_bins[sel]
    positions, sigmas = rf.equator_positions(*p[:5])
    # I10, IZ, I11, I20, b0, b1 (and b2 where the fit kept it), then d/dS and d2/dS2 of
    # the 1,0 and the 1,1 peaks.
    columns = rf.equator_columns(r, *p[:5])[: 4 + rf.baseline_terms(p)]
    shift_10 = len(columns)  # the column of d/dS of the 1,0
    columns += rf.arced_peak_derivatives(r, positions[0], sigmas[0])
    columns += rf.arced_peak_derivatives(r, positions[2], sigmas[2])
    q = _bin_solver(op, sel, columns, n_bins)
    matrix = np.zeros((shape[0] * shape[1], len(WINDOW_COLUMNS)))
    matrix[:, :3] = _pixel_weights(op, np.stack([q[0], q[2], q[shift_10]]), shape)

    # M3: roi_metrics' own fit (centre, width, the bins it fitted), its linear part
    # (peak, constant, slope) frozen with the two position derivatives.
    m3_px = math.nan
    m3_found = analysis.m3 is not None
    params = {"roi_metrics": reference, "equator": [float(v) for v in p], "equator_window": [float(lo), float(hi)]}
    if m3_found:
        c, sig, (w_lo, w_hi) = analysis.m3.centre, analysis.m3.sigma, analysis.m3.window
        mop = _profile_operator(valid, rmax=rmax, **rf.sector("meridian", sector_deg))
        msel = mop[6] & (r_bins >= w_lo) & (r_bins <= w_hi)
        rm = r_bins[msel]
        mcols = [rf.arced_peak(rm, c, sig), np.ones_like(rm), (rm - c) / c] + rf.arced_peak_derivatives(rm, c, sig)
        mq = _bin_solver(mop, msel, mcols, n_bins)
        matrix[:, 3:] = _pixel_weights(mop, np.stack([mq[0], mq[3]]), shape)
        m3_px = float(c)
        params["m3"] = [float(c), float(sig)]
        params["m3_window"] = [float(w_lo), float(w_hi)]
    return WindowFit(matrix.astype(np.float32), shape, float(p[0]), m3_px, True, m3_found, params)


def window_support(shape, sector_deg: float = 15.0) -> np.ndarray:
    """Flat indices of the pixels of a ``shape`` window that :func:`fit_windows` may weight.

    Its weights come from the equatorial sector (azimuth 0 to ``sector_deg`` from the
    fold's axis 1) and the meridional one (``90 - sector_deg`` to 90), computed as
    :func:`live_bgsub.reflections.sector_bins` computes them; without a radius limit, so that
    the support depends on the window shape and the sector only (a compiled function
    serves every run whose window pads to the same shape). About a quarter of the
    window for 15 degree sectors; the fitted weights themselves cover ~1 % of it.
    """
    ii, jj = np.indices(tuple(int(v) for v in shape))
    phi = np.degrees(np.arctan2(ii, jj))
    return np.flatnonzero((phi <= sector_deg) | (phi >= 90.0 - sector_deg)).astype(np.int32)


def metrics_from_coef(coef, tdi, background_sum, reference):
    """Host twin of ``DevicePipeline.window_metrics``'s last step: ``{name: (n,) float64}``.

    Parameters
    ----------
    coef : array, ``(n, 5)``
        Window coefficients of ``n`` frames, columns :data:`WINDOW_COLUMNS` (a corrected
        fold's window times :attr:`WindowFit.matrix`).
    tdi, background_sum : array, ``(n,)``
        The radial totals, passed through.
    reference : sequence of 5 floats
        ``(s10_px, m3_px, wavelength * distance / pixel size (NaN: unknown), equator
        found, M3 found)`` of the reference fit, as the device holds them.

    Returns
    -------
    dict
        ``{name: (n,) float64}`` for the names of :data:`METRIC_NAMES`; NaN for the
        equatorial metrics without an equator, for the M3 ones without M3.
    """
    coef = np.asarray(coef, np.float64)
    s10_ref, m3_ref, d10_factor, has_eq, has_m3 = (float(v) for v in reference)
    i10, i11, d10, m3, dm3 = coef.T
    nan = np.full(len(coef), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        s10 = s10_ref + d10 / i10
        values = {
            "i10": i10,
            "i11": i11,
            "i11_i10": i11 / i10,
            "s10_px": s10,
            "m3_px": m3_ref + dm3 / m3,
            "m3_intensity": m3,
            "d10_nm": d10_factor / s10,
        }
    out = {}
    for name in METRIC_NAMES:
        if name == "tdi":
            out[name] = np.asarray(tdi, np.float64)
        elif name == "background_sum":
            out[name] = np.asarray(background_sum, np.float64)
        elif name in ("m3_px", "m3_intensity"):
            out[name] = values[name] if (has_eq and has_m3) else nan.copy()
        else:
            out[name] = values[name] if has_eq else nan.copy()
    return out
