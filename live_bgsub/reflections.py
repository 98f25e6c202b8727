"""The reflection model of a corrected fold: radial sector profiles, arced peaks, the
equator search and fit, and the M3 fit.

Both metric paths read reflections with this one model: :func:`live_bgsub.metrics.roi_metrics`
(numpy, every frame) and :func:`live_bgsub.device_path.fit_windows`, which fits it on a run's
reference frame and freezes its linear part into window weights for the device. Pure
numpy/scipy. A fold has the beam centre at ``[0, 0]``, axis 1 along the equator and axis 0
along the meridian (``docs/conventions.md``).

Profiles. Each sector of the fold (azimuth measured from axis 1, :func:`sector`) is
integrated into a radial profile in unfolded (detector) counts: off-axis fold pixels count
twice, as they stand for both mirror halves of the sector's axis, and each pixel is split
linearly between its two neighbouring integer radii (:func:`sector_bins`,
:class:`SectorProfile`). Bins whose sector is partly masked are rescaled by their coverage;
bins covered less than 70 % are not used.

Peaks. A reflection of integrated intensity ``I`` at radius ``S`` is ``I * r / S * N(r; S,
sigma)`` (:func:`arced_peak`): an arced 2-D Gaussian integrated over azimuth, whose
integral over ``r`` is ``I``.

Equator. Four arced peaks at ``S10 * (1, z, sqrt(3), 2)`` (1,0, Z line with ``z`` ~1.46,
1,1, 2,0) of widths ``sigma^2 = sigma_c^2 + (sigma_k S)^2`` (the Z line has its own width)
plus a quadratic baseline in ``(r - S10) / S10``, fitted over ``0.6 S10 .. 2.25 S10``
(:func:`equator_positions`, :func:`equator_columns`, :func:`equator_window`). S10 is found
by a matched filter (:func:`search_equator`): for S10 on a grid (0.25 px, or 0.4 % of S10
when coarser; :func:`search_grid`) and three peak widths, a weighted linear least-squares
fit of the model with S10 and the widths fixed; the score is the smaller of the 1,0 and 1,1
t-values, so the 1,1 must be present at ``sqrt(3) S10``. The best candidate is refined by a
non-linear least-squares fit with free S10, widths, Z-line position and width, intensities
and baseline (:func:`fit_equator`); if that candidate fails, the candidate with the
strongest 1,0 is refined too.

Acceptance (:func:`analyse_equator`). The equator is accepted when the 1,0 and 1,1
intensities are positive with ``I10 / err >= min_snr`` and ``I11 / err >= min_snr_11`` and
both are concentrated on the equator: their intensity per degree in the equatorial sector
is at least ``min_anisotropy`` (1,0) and ``min_anisotropy / 2`` (1,1) times that of the
off-axis sector (``2 * sector_deg`` to ``90 - sector_deg``) at the same radii (a powder
ring has the same intensity at every azimuth). A reflection whose centre falls where the
fold has no data (a detector gap on every quadrant, :meth:`SectorProfile.covers`) is not
measured rather than extrapolated from its flanks.

M3 (:func:`analyse_m3`). The strongest arced peak on the meridian, with a linear baseline
(:func:`fit_single_peak`), within ``[2.3, 2.95] S10`` (``d10`` from 33 to 42 nm), or within
10 % of its physical position ``wavelength * distance / (14.3 nm * pixel)`` when the
geometry is given (:func:`m3_search_range`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

__all__ = [
    "M3_SPACING_NM",
    "SectorBins",
    "SectorProfile",
    "analyse_equator",
    "analyse_m3",
    "arced_peak",
    "arced_peak_derivatives",
    "equator_columns",
    "equator_positions",
    "equator_window",
    "fit_equator",
    "fit_single_peak",
    "m3_search_range",
    "s10_search_range",
    "search_equator",
    "search_grid",
    "sector",
    "sector_bins",
    "t_value",
]

#: Axial spacing (nm) of the M3 meridional reflection (myosin crowns).
M3_SPACING_NM = 14.3

_SQRT3 = math.sqrt(3.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------- profiles


def sector(name: str, sector_deg: float) -> dict:
    """Axis and azimuth range of one of the sectors the model profiles.

    Parameters
    ----------
    name : {"equator", "off-axis", "meridian"}
        ``equator``: azimuth 0 to ``sector_deg`` from the fold's axis 1; ``off-axis``:
        ``2 * sector_deg`` to ``90 - sector_deg`` (the isotropy check); ``meridian``:
        ``90 - sector_deg`` to 90.
    sector_deg : float
        Half-width (degrees) of the equatorial and meridional sectors.

    Returns
    -------
    dict
        ``axis``, ``lo_deg``, ``hi_deg``: keyword arguments of :func:`sector_bins` and
        :class:`SectorProfile`.
    """
    if name == "equator":
        return {"axis": "equator", "lo_deg": 0.0, "hi_deg": sector_deg}
    if name == "off-axis":
        return {"axis": "equator", "lo_deg": 2.0 * sector_deg, "hi_deg": 90.0 - sector_deg}
    if name == "meridian":
        return {"axis": "meridian", "lo_deg": 90.0 - sector_deg, "hi_deg": 90.0}
    raise ValueError(f"sector must be 'equator', 'off-axis' or 'meridian', got {name!r}")


@dataclass(eq=False)
class SectorBins:
    """Geometry of a fold sector's radial profile, made by :func:`sector_bins`.

    Attributes
    ----------
    shape : (int, int)
        ``(hmax, wmax)``: the top-left part of the fold the sector lies in.
    mask : ndarray of bool, ``shape``
        The sector's pixels (azimuth and radius) in that part.
    valid : ndarray of bool, ``shape``
        The fold's validity there.
    rows, cols : ndarray of int
        The sector pixels' fold indices (``mask``'s True entries, row-major).
    w : ndarray
        Mirror weights: 2 off the sector's axis (two detector pixels), 1 on it.
    k0, f : ndarray
        Radius of each pixel split as ``k0 + f`` (integer bin, fraction in [0, 1)).
    nr : int
        Number of bins is ``nr + 1`` (radii 0 to ``nr``).
    scale : ndarray
        Per bin, 1 / coverage for usable bins, 0 for the others.
    ok : ndarray of bool
        Per bin, usable (coverage at least ``min_coverage``, radius below ``rmax``).
    var : ndarray
        Per bin, variance of the profile value in units of one pixel's variance
        (``inf`` for unusable bins).
    """

    shape: tuple
    mask: np.ndarray
    valid: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    w: np.ndarray
    k0: np.ndarray
    f: np.ndarray
    nr: int
    scale: np.ndarray | None = None
    ok: np.ndarray | None = None
    var: np.ndarray | None = None

    def hist(self, weights, power=1):
        """Per-pixel ``weights`` split linearly between the two neighbouring integer radii.

        Parameters
        ----------
        weights : ndarray
            One value per sector pixel.
        power : int, optional
            Raise weights and split fractions to this power (2 for variances).

        Returns
        -------
        ndarray, (nr + 1,)
            Sum per radius bin.
        """
        n = self.nr + 1
        low = np.bincount(self.k0, weights**power * (1 - self.f) ** power, minlength=n)
        high = np.bincount(self.k0 + 1, weights**power * self.f**power, minlength=n)
        return low[:n] + high[:n]


def sector_bins(valid, *, axis, lo_deg, hi_deg, rmax, min_coverage=0.7) -> SectorBins:
    """The part of a :class:`SectorProfile` that depends on the validity only, not the values.

    Parameters
    ----------
    valid : ndarray of bool, 2-D
        Validity of the fold's pixels.
    axis : {"equator", "meridian"}
        The axis whose mirror halves the sector's off-axis pixels stand for.
    lo_deg, hi_deg : float
        Azimuth range from the fold's axis 1 (see :func:`sector`).
    rmax : float
        Largest radius (pixels); bins from ``floor(rmax)`` on are not usable.
    min_coverage : float, optional
        Least valid fraction of a bin's (weighted) pixels for the bin to be usable.

    Returns
    -------
    SectorBins
        A linear map from the sector's fold pixels to profile bins; the device path
        freezes it into window weights.
    """
    nr = int(math.floor(rmax)) + 2
    fh, fw = valid.shape
    if axis == "equator":  # azimuth measured from axis 1
        hmax = min(fh, int(math.ceil(rmax * math.sin(math.radians(hi_deg)))) + 2)
        wmax = min(fw, nr)
    else:
        hmax = min(fh, nr)
        wmax = min(fw, int(math.ceil(rmax * math.sin(math.radians(90.0 - lo_deg)))) + 2)
    ii, jj = np.indices((hmax, wmax))
    r = np.hypot(ii, jj)
    phi = np.degrees(np.arctan2(ii, jj))
    mask = (phi >= lo_deg) & (phi <= hi_deg) & (r <= rmax)
    w = np.where(ii > 0, 2.0, 1.0) if axis == "equator" else np.where(jj > 0, 2.0, 1.0)
    r = r[mask]
    sub_valid = valid[:hmax, :wmax]
    good = sub_valid[mask]
    k0 = np.floor(r).astype(np.intp)
    bins = SectorBins(
        shape=(hmax, wmax), mask=mask, valid=sub_valid, rows=ii[mask], cols=jj[mask], w=w[mask], k0=k0, f=r - k0, nr=nr
    )
    geo_all = bins.hist(bins.w)
    geo = bins.hist(bins.w * good)
    var = bins.hist(bins.w * good, power=2)  # in units of one pixel's variance
    with np.errstate(invalid="ignore", divide="ignore"):
        cover = np.where(geo_all > 0, geo / np.where(geo_all > 0, geo_all, 1), 0.0)
    ok = (cover >= min_coverage) & (geo_all > 0)
    ok[int(math.floor(rmax)) :] = False
    bins.scale = np.where(ok, 1.0 / np.where(cover > 0, cover, 1), 0.0)
    bins.ok = ok
    bins.var = np.where(ok, var * bins.scale**2, np.inf)
    return bins


class SectorProfile:
    """Radial profile of a fold sector, reconstructed to unfolded (detector) counts.

    ``values[k]`` is the intensity per pixel of radius at radius ``k`` (pixels), summed
    over the sector and over both mirror halves of the sector's axis (a fold pixel off
    the axis stands for two detector pixels of one reflection), with each pixel split
    linearly between its two neighbouring integer radii. Bins whose sector is partly
    masked are rescaled by their coverage; bins covered less than ``min_coverage`` are
    dropped (``ok`` False).

    Parameters
    ----------
    fold : ndarray, 2-D
        Corrected fold (invalid pixels may hold anything: they are not read).
    valid : ndarray of bool
        Its validity.
    axis, lo_deg, hi_deg, rmax, min_coverage
        As :func:`sector_bins`.

    Attributes
    ----------
    r : ndarray
        Bin radii ``0 .. nr`` (pixels).
    values : ndarray
        Profile values (0 in unusable bins).
    ok : ndarray of bool
        Usable bins.
    var : ndarray
        Relative variances of the values (``inf`` in unusable bins).
    width_deg : float
        Azimuthal width of the sector (degrees).
    """

    def __init__(self, fold, valid, *, axis, lo_deg, hi_deg, rmax, min_coverage=0.7):
        bins = sector_bins(valid, axis=axis, lo_deg=lo_deg, hi_deg=hi_deg, rmax=rmax, min_coverage=min_coverage)
        v = np.where(bins.valid, fold[: bins.shape[0], : bins.shape[1]], 0.0)[bins.mask]
        self.ok = bins.ok
        self.r = np.arange(bins.nr + 1, dtype=np.float64)
        self.values = bins.hist(bins.w * v) * bins.scale
        self.var = bins.var
        self.width_deg = hi_deg - lo_deg

    def covers(self, center, sigma, min_fraction=0.6) -> bool:
        """Whether the bins within 1.5 sigma of ``center`` are mostly usable (not in a gap)."""
        half = max(1.5 * sigma, 1.0)
        sel = (self.r >= center - half) & (self.r <= center + half)
        return bool(sel.any()) and float(self.ok[sel].mean()) >= min_fraction

    def window(self, lo, hi):
        """Radii, values and relative variances of the usable bins in ``[lo, hi]``."""
        sel = self.ok & (self.r >= lo) & (self.r <= hi)
        return self.r[sel], self.values[sel], self.var[sel]


# --------------------------------------------------------------------------- peak model


def arced_peak(r, center, sigma):
    """Unit-integral radial profile of an arced reflection.

    Parameters
    ----------
    r : array_like
        Radii (pixels).
    center, sigma : float or array_like
        Radius and radial width (pixels) of the reflection (broadcast with ``r``).

    Returns
    -------
    ndarray
        ``r / center * N(r; center, sigma)``: a 2-D Gaussian arc integrated over azimuth;
        its integral over ``r`` is 1 (for ``center`` many ``sigma`` from 0).
    """
    return (r / center) * np.exp(-0.5 * ((r - center) / sigma) ** 2) / (_SQRT2PI * sigma)


def arced_peak_derivatives(r, center, sigma):
    """First and second derivatives of :func:`arced_peak` with respect to ``center``.

    Returns
    -------
    [ndarray, ndarray]
        ``d/dc`` and ``d2/dc2`` of ``arced_peak(r, c, sigma)`` at ``c = center``.
    """
    peak = arced_peak(r, center, sigma)
    a = -1.0 / center + (r - center) / sigma**2
    return [peak * a, peak * (a * a + 1.0 / center**2 - 1.0 / sigma**2)]


def _linear_fit(columns, y, var):
    """Weighted linear least squares; returns coefficients, their std errors, chi2/dof."""
    a = np.column_stack(columns)
    wt = 1.0 / np.sqrt(var)
    aw = a * wt[:, None]
    yw = y * wt
    coef, *_ = np.linalg.lstsq(aw, yw, rcond=None)
    res = yw - aw @ coef
    dof = max(len(y) - a.shape[1], 1)
    s2 = float(res @ res) / dof
    try:
        cov = np.linalg.inv(aw.T @ aw) * s2
        err = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        err = np.full(a.shape[1], np.inf)
    return coef, err, s2


def t_value(value, error) -> float:
    """``value / error``; ``+-inf`` (the sign of ``value``) when the error is 0."""
    if error > 0:
        return float(value / error)
    return math.inf if value > 0 else -math.inf


# --------------------------------------------------------------------------- equator


def equator_positions(s10, sigma_c, sigma_k, z_ratio, sigma_z):
    """Positions and widths of the 1,0, Z, 1,1 and 2,0 peaks of the equatorial model.

    Parameters
    ----------
    s10 : float
        Radius of the 1,0 reflection (pixels).
    sigma_c, sigma_k : float
        Width ``sigma = hypot(sigma_c, sigma_k * position)`` of the lattice peaks.
    z_ratio, sigma_z : float
        Position (in units of S10) and width of the Z line.

    Returns
    -------
    positions, sigmas : list of 4 floats each
        In the order 1,0, Z, 1,1, 2,0.
    """
    pos = [s10, z_ratio * s10, _SQRT3 * s10, 2.0 * s10]
    sig = [math.hypot(sigma_c, sigma_k * p) for p in pos]
    sig[1] = sigma_z
    return pos, sig


def equator_columns(r, s10, sigma_c, sigma_k, z_ratio, sigma_z):
    """Design columns of the equatorial model at radii ``r``.

    Returns
    -------
    list of 7 ndarrays
        The unit-integral peaks 1,0, Z, 1,1, 2,0 (:func:`equator_positions`), then the
        baseline ``1, x, x^2`` with ``x = (r - s10) / s10``. Coefficients of the peaks
        are the reflections' integrated intensities.
    """
    pos, sig = equator_positions(s10, sigma_c, sigma_k, z_ratio, sigma_z)
    x = (r - s10) / s10
    return [arced_peak(r, p, s) for p, s in zip(pos, sig)] + [np.ones_like(r), x, x * x]


def equator_window(s10, r_first, rmax):
    """Radii ``(lo, hi)`` fitted for a given S10: from before the 1,0 to past the 2,0.

    ``lo = max(0.6 S10, r_first)`` (``r_first``: the profile's first usable radius),
    ``hi = min(2.25 S10, rmax)``.
    """
    return max(0.6 * s10, r_first), min(2.25 * s10, rmax)


def s10_search_range(r_first, rmax):
    """Default S10 search range ``(lo, hi)``: just outside the masked centre to ``rmax / 2``."""
    return max(r_first + 3.0, 5.0), rmax / 2.0


def search_grid(lo, hi, step=0.25, rel_step=0.004) -> np.ndarray:
    """Candidate radii from ``lo`` to ``hi``, spaced ``max(step, rel_step * r)``."""
    out = [lo]
    while out[-1] + max(step, rel_step * out[-1]) <= hi + 1e-9:
        out.append(out[-1] + max(step, rel_step * out[-1]))
    return np.array(out)


def search_equator(profile: SectorProfile, s_lo, s_hi, r_first, rmax, chunk=128):
    """Matched-filter search of S10: best ``min(t10, t11)`` over a grid of S10 and widths.

    For each candidate S10 (:func:`search_grid`) and peak width (1.5, 2.5, 4 px, with
    ``sigma_k = 0.015``), a weighted linear fit of the four arced peaks plus a quadratic
    baseline over the candidate's :func:`equator_window`, solved for a chunk of
    candidates at once (batched normal equations). Candidates need at least 16 usable
    bins and a window reaching ``(sqrt(3) + 0.15) S10``.

    Parameters
    ----------
    profile : SectorProfile
        The equatorial profile.
    s_lo, s_hi : float
        S10 range searched (pixels).
    r_first : float
        The profile's first usable radius.
    rmax : float
        Largest radius fitted.
    chunk : int, optional
        Candidates solved at once.

    Returns
    -------
    (best, strongest) or None
        Candidates ``(score, s10, width, coefficients)`` with the best ``min(t10, t11)``
        and with the best ``t10`` alone (``coefficients`` as :func:`equator_columns`);
        None if no candidate fits inside the profile.
    """
    prof = profile
    s_all = search_grid(s_lo, s_hi)
    lo = np.maximum(0.6 * s_all, r_first)
    hi = np.minimum(2.25 * s_all, rmax)
    s_all, lo, hi = (v[hi >= (_SQRT3 + 0.15) * s_all] for v in (s_all, lo, hi))
    if s_all.size == 0:
        return None
    strongest = None
    y_all = np.where(prof.ok, prof.values, 0.0)
    inv_var_all = np.where(prof.ok, 1.0 / prof.var, 0.0)
    best = None
    for start in range(0, s_all.size, chunk):
        part = slice(start, start + chunk)
        k_lo, k_hi = int(math.floor(lo[part].min())), int(math.ceil(hi[part].max()))
        r = prof.r[k_lo : k_hi + 1]
        y = y_all[k_lo : k_hi + 1]
        s = s_all[part, None]
        w = inv_var_all[None, k_lo : k_hi + 1] * ((r[None, :] >= lo[part, None]) & (r[None, :] <= hi[part, None]))
        n_used = (w > 0).sum(axis=1)
        x = (r[None, :] - s) / s
        for sc in (1.5, 2.5, 4.0):
            cols = [arced_peak(r[None, :], f * s, np.hypot(sc, 0.015 * f * s)) for f in (1.0, 1.46, _SQRT3, 2.0)]
            a = np.stack(cols + [np.ones_like(x), x, x * x], axis=-1)  # (n, K, 7)
            aw = a * w[..., None]
            awt = aw.transpose(0, 2, 1)
            g = awt @ a
            b = awt @ y
            try:
                g_inv = np.linalg.inv(g)
            except np.linalg.LinAlgError:
                g_inv = np.linalg.pinv(g)
            coef = (g_inv @ b[..., None])[..., 0]
            res = y[None, :] - (a @ coef[..., None])[..., 0]
            s2 = (w * res * res).sum(axis=1) / np.maximum(n_used - 7, 1)
            var10 = g_inv[:, 0, 0] * s2
            var11 = g_inv[:, 2, 2] * s2
            with np.errstate(divide="ignore", invalid="ignore"):
                t10 = np.where(var10 > 0, coef[:, 0] / np.sqrt(np.abs(var10)), np.sign(coef[:, 0]) * np.inf)
                t11 = np.where(var11 > 0, coef[:, 2] / np.sqrt(np.abs(var11)), np.sign(coef[:, 2]) * np.inf)
            score = np.where(n_used >= 16, np.minimum(t10, t11), -np.inf)
            score = np.nan_to_num(score, nan=-np.inf)
            n = int(np.argmax(score))
            if best is None or score[n] > best[0]:
                best = (float(score[n]), float(s[n, 0]), sc, coef[n])
            t10 = np.where(n_used >= 16, np.nan_to_num(t10, nan=-np.inf), -np.inf)
            n = int(np.argmax(t10))
            if strongest is None or t10[n] > strongest[0]:
                strongest = (float(t10[n]), float(s[n, 0]), sc, coef[n])
    if best is None or best[0] == -np.inf:
        return None
    return best, strongest


def fit_equator(profile: SectorProfile, s0, sigma0, coef0, r_first, rmax):
    """Non-linear refinement of an equator candidate of :func:`search_equator`.

    Parameters
    ----------
    profile : SectorProfile
        The equatorial profile.
    s0, sigma0, coef0
        The candidate's S10, width and linear coefficients (start values); S10 stays
        within 4 % of ``s0`` and the fit window is ``equator_window(s0, ...)``.
    r_first, rmax : float
        As :func:`search_equator`.

    Returns
    -------
    p, err : ndarray, (12,)
        Parameters ``S10, sigma_c, sigma_k, z_ratio, sigma_z, I10, IZ, I11, I20, b0, b1,
        b2`` (``p[:5]`` are :func:`equator_columns`' arguments after ``r``) and their
        standard errors.
    """
    lo, hi = equator_window(s0, r_first, rmax)
    r, y, var = profile.window(lo, hi)
    wt = 1.0 / np.sqrt(var)

    def resid(p):
        cols = equator_columns(r, *p[:5])
        return (np.column_stack(cols) @ p[5:] - y) * wt

    p0 = np.r_[s0, sigma0, 0.015, 1.46, sigma0, coef0]
    big = np.inf
    lower = np.r_[0.96 * s0, 0.3, 0.0, 1.38, 0.5, [-big] * 7]
    upper = np.r_[1.04 * s0, max(0.2 * s0, 1.0), 0.1, 1.56, max(0.12 * s0, 1.0), [big] * 7]
    p0 = np.clip(p0, lower + 1e-9, upper - 1e-9)
    res = optimize.least_squares(resid, p0, bounds=(lower, upper), x_scale="jac", method="trf")
    p = res.x
    dof = max(len(r) - len(p), 1)
    s2 = float(res.fun @ res.fun) / dof
    try:
        cov = np.linalg.pinv(res.jac.T @ res.jac) * s2
        err = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        err = np.full(len(p), np.inf)
    return p, err


# --------------------------------------------------------------------------- single peak (M3)


def m3_search_range(s10, geometry=None):
    """Radii searched for M3: ``(lo, hi, margin)``.

    Parameters
    ----------
    s10 : float
        Radius of the 1,0 reflection (pixels).
    geometry : float, optional
        ``wavelength * distance / pixel`` (nm x pixels). With it, within 10 % of the
        physical M3 position ``geometry / 14.3 nm``; without, ``[2.3, 2.95] S10``.

    Returns
    -------
    lo, hi, margin : float
        Range of the M3 centre and the least half-width of its fit window
        (``0.08 lo``), pixels.
    """
    if geometry is not None:
        c = geometry / M3_SPACING_NM
        lo, hi = 0.9 * c, 1.1 * c
    else:
        lo, hi = 2.3 * s10, 2.95 * s10
    return lo, hi, 0.08 * lo


def fit_single_peak(profile: SectorProfile, lo, hi, margin):
    """Locate and fit the strongest arced peak with centre in ``[lo, hi]``.

    A matched filter over centres (:func:`search_grid`) and widths (1.5, 2.5, 4 px), each
    a weighted linear fit of one :func:`arced_peak` plus a linear baseline over
    ``centre +- max(margin, 6 sigma)``, then a non-linear fit of the best candidate
    (centre bounded to ``[lo, hi]``).

    Returns
    -------
    (centre, intensity, t, sigma) or None
        Fitted centre (pixels), integrated intensity, its t-value and width; None when
        no window holds 10 usable bins.
    """
    prof = profile
    best = None
    for c in search_grid(lo, hi):
        for sc in (1.5, 2.5, 4.0):
            r, y, var = prof.window(c - max(margin, 6 * sc), c + max(margin, 6 * sc))
            if len(r) < 10:
                continue
            x = (r - c) / c
            coef, err, _ = _linear_fit([arced_peak(r, c, sc), np.ones_like(r), x], y, var)
            t = t_value(coef[0], err[0])
            if best is None or t > best[0]:
                best = (t, c, sc, coef)
    if best is None:
        return None
    _, c0, sc0, coef0 = best
    half = max(margin, 6 * sc0)
    r, y, var = prof.window(c0 - half, c0 + half)
    wt = 1.0 / np.sqrt(var)

    def resid(p):
        x = (r - c0) / c0
        return (p[2] * arced_peak(r, p[0], p[1]) + p[3] + p[4] * x - y) * wt

    lower = [lo, 0.5, -np.inf, -np.inf, -np.inf]
    upper = [hi, max(3.0 * sc0, 2.0), np.inf, np.inf, np.inf]
    p0 = np.clip(np.r_[c0, sc0, coef0], np.array(lower) + 1e-9, np.array(upper) - 1e-9)
    res = optimize.least_squares(resid, p0, bounds=(lower, upper), x_scale="jac")
    dof = max(len(r) - 5, 1)
    s2 = float(res.fun @ res.fun) / dof
    cov = np.linalg.pinv(res.jac.T @ res.jac) * s2
    t = t_value(res.x[2], math.sqrt(max(cov[2, 2], 0.0)))
    return float(res.x[0]), float(res.x[2]), t, float(res.x[1])


# --------------------------------------------------------------------------- analyses


def analyse_equator(img0, valid, rmax, s10_range_px, sector_deg, min_snr, min_snr_11, min_anisotropy):
    """Find and measure the fiber equator of a corrected fold.

    Parameters
    ----------
    img0 : ndarray, 2-D
        Corrected fold with 0 at invalid pixels.
    valid : ndarray of bool
        Its validity.
    rmax : float
        Largest radius analysed (pixels).
    s10_range_px : (float, float) or None
        S10 range searched; None for :func:`s10_search_range`.
    sector_deg, min_snr, min_snr_11, min_anisotropy : float
        As :func:`live_bgsub.metrics.roi_metrics`.

    Returns
    -------
    (dict, None) or (None, str)
        ``{s10_px, i10, i11, i11_i10}`` when an equator is accepted (module docstring),
        else None and the reason.
    """
    eq = SectorProfile(img0, valid, rmax=rmax, **sector("equator", sector_deg))
    usable = np.nonzero(eq.ok)[0]
    if usable.size < 16:
        return None, "no equatorial reflections: too few valid pixels along the equator"
    r_first = float(usable[0])
    if s10_range_px is None:
        s_lo, s_hi = s10_search_range(r_first, rmax)
    else:
        s_lo, s_hi = (float(v) for v in s10_range_px)
    found = search_equator(eq, s_lo, s_hi, r_first, rmax) if s_hi >= s_lo else None
    if found is None:
        return None, f"no equatorial profile long enough to test S10 in [{s_lo:.1f}, {s_hi:.1f}] px with its 1,1 at sqrt(3) * S10"

    # Refine the best 1,0 + 1,1 candidate; if it fails, the strongest 1,0 candidate.
    fits = []
    for cand in found:
        if any(abs(cand[1] - f[0][0]) < 1.0 for f in fits):
            continue
        p, err = fit_equator(eq, cand[1], cand[2], cand[3], r_first, rmax)
        fits.append((p, t_value(p[5], err[5]), t_value(p[7], err[7])))
        if fits[-1][1] >= min_snr and fits[-1][2] >= min_snr_11:
            break
    p, t10, t11 = fits[-1]
    if not t10 >= min_snr:
        p, t10, t11 = max(fits, key=lambda f: f[1])
        return None, (
            f"no significant equatorial 1,0 reflection (strongest candidate S10 = {p[0]:.1f} px: "
            f"I10 / error = {t10:.1f} < {min_snr})"
        )
    s10, i10, i11 = float(p[0]), float(p[5]), float(p[7])
    (_, _, pos11, _), (sig10, _, sig11, _) = equator_positions(*p[:5])
    for name, pos, sig in (("1,0", s10, sig10), ("1,1", pos11, sig11)):
        if not eq.covers(pos, sig):
            return None, f"the {name} reflection at {pos:.1f} px falls in a masked part of the fold (detector gaps)"
    if not t11 >= min_snr_11:
        return None, (
            f"equatorial peak at {s10:.1f} px (I10 / error = {t10:.1f}) but no significant 1,1 reflection at "
            f"sqrt(3) * S10 = {_SQRT3 * s10:.1f} px (I11 / error = {t11:.1f} < {min_snr_11}): no measurable fiber equator"
        )

    # Isotropy check: the same peaks in the off-axis sector, per degree of azimuth.
    off = SectorProfile(img0, valid, rmax=rmax, **sector("off-axis", sector_deg))
    r, y, var = off.window(*equator_window(s10, r_first, rmax))
    if len(r) >= 12:
        coef, _, _ = _linear_fit(equator_columns(r, *p[:5]), y, var)
        checks = (("1,0", s10, i10, coef[0], min_anisotropy), ("1,1", _SQRT3 * s10, i11, coef[2], min_anisotropy / 2))
        for name, radius, i_eq, i_off, least in checks:
            density_eq, density_off = i_eq / eq.width_deg, i_off / off.width_deg
            if density_off > 0 and density_eq < least * density_off:
                return None, (
                    f"the {name} candidate at {radius:.1f} px is isotropic (intensity per degree on the equator / "
                    f"off-axis = {density_eq / density_off:.2f} < {least:g}): rings (powder) rather than a fiber equator"
                )
    return {"s10_px": s10, "i10": i10, "i11": i11, "i11_i10": i11 / i10}, None


def analyse_m3(out, img0, valid, s10, geometry, rmax, sector_deg, min_snr):
    """Measure the M3 reflection on the meridian into ``out``.

    Parameters
    ----------
    out : dict
        Receives ``m3_px`` and ``m3_intensity`` when M3 is found (left alone otherwise).
    img0, valid, rmax, sector_deg, min_snr
        As :func:`analyse_equator`.
    s10 : float
        The equator's S10 (pixels).
    geometry : float or None
        ``wavelength * distance / pixel`` (:func:`m3_search_range`).

    Returns
    -------
    str or None
        None when M3 was measured, else why it is NaN.
    """
    m_lo, m_hi, margin = m3_search_range(s10, geometry)
    if m_hi + margin > rmax:
        return f"M3 search range [{m_lo:.0f}, {m_hi:.0f}] px reaches past rmax = {rmax:.0f} px"
    mer = SectorProfile(img0, valid, rmax=rmax, **sector("meridian", sector_deg))
    m3 = fit_single_peak(mer, m_lo, m_hi, margin)
    if m3 is not None and not mer.covers(m3[0], m3[3]):
        return f"equator found, but the M3 candidate at {m3[0]:.1f} px falls in a masked part of the fold (detector gaps)"
    if m3 is None or not (m3[2] >= min_snr and m3[1] > 0):
        t = float("nan") if m3 is None else m3[2]
        return (
            f"equator found, but no significant M3 reflection on the meridian in [{m_lo:.0f}, {m_hi:.0f}] px "
            f"(I / error = {t:.1f})"
        )
    out["m3_px"], out["m3_intensity"] = m3[0], m3[1]
    return None
