"""The device-resident processing path: one compiled function per batch shape from raw frames to
corrected folds and window metrics, built for one run's fixed geometry.

:class:`DevicePath` is the numpy side: it turns a run's :class:`~live_bgsub.fold.FoldMap`
and a :class:`~live_bgsub.inference.BackgroundModel` into the constant tensors of a
:class:`live_bgsub.model.pipeline.DevicePipeline` (fold taps :func:`fold_taps`, the
reference frame's validity :func:`reference_taps`, the window weights), pads
micro-batches to a few fixed batch sizes so that the pipeline compiles once per size,
and fits the window metrics once per run on a reference frame (:func:`fit_windows`, on
the CPU with :mod:`live_bgsub.reflections`, the model of
:func:`live_bgsub.metrics.roi_metrics`). Design, accuracy and measurements:
``docs/device.md``.

Keras (and the backend) is imported when a :class:`DevicePath` is built, never by
``import live_bgsub.device_path``.

Examples
--------
>>> from live_bgsub.device_path import DevicePath                      # doctest: +SKIP
>>> path = DevicePath("model:white-top-hat", geometry, frame.shape, batch_size=8)
>>> corrected, metrics = path.process(frames)                     # (n, fh, fw), {name: (n,)}
>>> path.compilations                                             # 1 per batch size used
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .engine import METRIC_KEYS, new_results
from .errors import ProcessingError
from .fold import FoldMap
from .geometry import Geometry

__all__ = [
    "METRIC_NAMES",
    "WINDOW_COLUMNS",
    "DevicePath",
    "WindowFit",
    "choose_batch_size",
    "compiled_function",
    "fit_windows",
    "fold_taps",
    "frame_validity",
    "reference_taps",
    "tf_view",
    "validity_test",
    "window_support",
]

#: Metric columns of the device pipeline's output, in order (the callback's metric keys).
METRIC_NAMES = METRIC_KEYS

#: Columns of the window matrix (``live_bgsub.model.pipeline`` reads them in this order).
WINDOW_COLUMNS = ("i10", "i11", "d10", "m3", "dm3")

#: Pixels per block of the host's validity test (:meth:`DevicePath._same`).
_VALIDITY_BLOCK = 1 << 18

#: Frame dtypes uploaded as they are (cast to float32 on the device); others are cast on the host.
NATIVE_DTYPES = ("float32", "int16", "uint16", "int32")


# ---------------------------------------------------------------------- fold taps


def fold_taps(fold_map: FoldMap) -> tuple[np.ndarray, np.ndarray]:
    """The fold map as a fixed 16-tap gather: ``(tap_index, tap_weight)``, each ``(16, fh * fw)``.

    Tap ``t`` of quadrant ``q``'s sample for fold pixel ``k`` sits at ``[4 * q + t, k]``
    (each row walks its quadrant's part of the frame in order, which keeps the gather
    cache-friendly; the weighted sum over taps is one reduction over the rows). Taps
    are the bilinear corners
    ``(0, 0), (0, 1), (1, 0), (1, 1)`` (``base + 0, 1, w, w + 1``) with the bilinear
    weights of :meth:`FoldMap.taps <live_bgsub.fold.FoldMap.taps>` (without the quadrant
    mean, :attr:`~live_bgsub.fold.FoldTaps.scale`). A tap that carries no weight
    points at the sample's first tap (which always carries weight), so that a NaN
    (unusable) pixel there only invalidates a sample whose own footprint is unusable,
    exactly as the fold map's footprint test. Samples off the detector get NaN weights
    (and index 0): they are never valid.
    """
    h, w = fold_map.shape
    if h * w + w + 1 >= 2**31:
        raise ProcessingError(f"frames of {h} x {w} pixels are too large for int32 tap indices")
    taps = fold_map.taps()
    base = taps.base.T  # (4, n_fold) int32: top-left tap of each quadrant sample
    fx, fy = taps.fx.T, taps.fy.T
    gx, gy = 1 - fx, 1 - fy
    weight = np.empty(base.shape + (4,), np.float32)
    for t, (wy, wx) in enumerate(((gy, gx), (gy, fx), (fy, gx), (fy, fx))):
        np.multiply(wy, wx, out=weight[:, :, t])  # = the fold matrix's wy * wx
    index = np.empty(base.shape + (4,), np.int32)
    for t, offset in enumerate((0, 1, w, w + 1)):
        tap = np.minimum(base + np.int32(offset), np.int32(h * w - 1))
        index[:, :, t] = np.where(weight[:, :, t] > 0, tap, base)
    outside = ~taps.inside.T
    index[outside] = 0
    weight[outside] = np.nan
    return _tap_major(index), _tap_major(weight)


def _tap_major(taps: np.ndarray) -> np.ndarray:
    """``(4 quadrants, n_fold, 4 taps)`` -> ``(16, n_fold)``, row ``4 * q + t``."""
    q, n_fold, t = taps.shape
    return np.ascontiguousarray(taps.transpose(0, 2, 1).reshape(q * t, n_fold))


def frame_validity(frame, sentinel: float, static_mask=None) -> np.ndarray:
    """The device's validity rule on the host: float32 value >= 0, below ``sentinel``, not NaN."""
    x = np.asarray(frame).astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):
        valid = (x >= 0) & (x < np.float32(sentinel))
    if static_mask is not None:
        valid &= static_mask
    return valid


def validity_test(dtype, sentinel: float, static_mask=None):
    """A fast host twin of :func:`frame_validity` for frames of ``dtype``: ``test(frame) -> valid``,
    or ``test(block, rows)`` for the rows ``rows`` (a slice) of a frame.

    Integer frames are compared with the exact integer threshold of the float32 rule
    (``float32(x) < sentinel``; for int32 the values from ``2**31 - 64`` up round to the
    sentinel), negative values by their unsigned view: one comparison per pixel, no
    float cast (0.1 ms per Pilatus 1M frame here against 0.2 ms for the two-sided test).
    """
    dtype = np.dtype(dtype)

    def mask(rows):
        return None if static_mask is None else static_mask[rows]

    if dtype.kind not in "iu":
        return lambda frame, rows=slice(None): frame_validity(frame, sentinel, mask(rows))
    info = np.iinfo(dtype)
    lo, hi = 0, int(info.max) + 1  # smallest v >= 0 with float32(v) >= sentinel, in [0, max + 1]
    while lo < hi:
        mid = (lo + hi) // 2
        if float(np.float32(mid)) >= sentinel:
            hi = mid
        else:
            lo = mid + 1
    unsigned = np.dtype(f"u{dtype.itemsize}")
    if lo > np.iinfo(unsigned).max:
        return lambda frame, rows=slice(None): frame_validity(frame, sentinel, mask(rows))
    threshold = unsigned.type(lo)  # <= 2**(bits - 1) for signed dtypes: negatives wrap above it

    def test(frame, rows=slice(None)):
        valid = np.asarray(frame).view(unsigned) < threshold
        if static_mask is not None:
            valid &= static_mask[rows]
        return valid

    return test


def reference_taps(fold_map: FoldMap, valid, tap_weight=None) -> tuple[np.ndarray, np.ndarray]:
    """Fold weights for frames whose validity is ``valid``: ``(tap_weight_reference, reference_count)``.

    The bilinear weights of :func:`fold_taps` (``tap_weight``, computed when not given)
    times the quadrant mean's ``1 / count`` for the samples that the fold map counts for
    this validity (``edge`` erosion and footprint test, ``FoldMap.usable_from`` and
    ``FoldMap.sample_ok``), 0 for the others; ``reference_count`` is the count
    ``(fh, fw)`` as float32. Same layout as :func:`fold_taps`.
    """
    ok = fold_map.sample_ok(fold_map.usable_from(np.asarray(valid, bool) & fold_map.mask))  # (n_fold, 4)
    count = ok.sum(axis=1)
    scale = np.where(ok, 1.0 / np.maximum(count, 1)[:, None], 0.0).astype(np.float32).T[:, None, :]  # (4, 1, n_fold)
    if tap_weight is None:
        tap_weight = fold_taps(fold_map)[1]
    weight = tap_weight.reshape(4, 4, -1) * scale
    weight[np.broadcast_to(scale == 0, weight.shape)] = 0.0  # off the detector: NaN * 0
    return weight.reshape(16, -1), count.reshape(fold_map.fold_shape).astype(np.float32)


# ---------------------------------------------------------------------- window metrics


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
    from .reflections import sector_bins

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
    from . import reflections as rf
    from .metrics import roi_metrics

    corrected = np.asarray(corrected, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(corrected)
    fh, fw = corrected.shape
    rmax = float(min(corrected.shape) - 1) if rmax is None else float(rmax)
    nr = math.floor(rmax) + 2
    if shape is None:
        shape = (min(fh, nr), min(fw, nr))
    shape = tuple(int(s) for s in shape)
    geometry = None
    if wavelength_nm is not None and distance_mm is not None and pixel_size_mm is not None:
        geometry = float(wavelength_nm) * float(distance_mm) / float(pixel_size_mm)
    reference = roi_metrics(
        corrected,
        mask=valid,
        background=background,
        wavelength_nm=wavelength_nm,
        distance_mm=distance_mm,
        pixel_size_mm=pixel_size_mm,
        rmax=rmax,
        sector_deg=sector_deg,
    )
    empty = WindowFit(
        np.zeros((shape[0] * shape[1], len(WINDOW_COLUMNS)), np.float32), shape, math.nan, math.nan, False, False,
        {"roi_metrics": reference},
    )
    if not reference["equator_found"]:
        return empty
    img0 = np.where(valid, corrected, 0.0)

    # Equator: the model roi_metrics accepted (the same analysis), its linear part frozen.
    eq_sector = rf.sector("equator", sector_deg)
    equator, _ = rf.analyse_equator(img0, valid, rmax, None, sector_deg, **rf.ACCEPTANCE)
    if equator is None or equator.s10_px != reference["s10_px"]:  # roi_metrics' defaults: the same answer
        raise RuntimeError("fit_windows: the equator analysis disagrees with roi_metrics on the same fold")
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

    # M3: the arced peak roi_metrics found, plus its linear baseline and derivatives.
    m3_px = math.nan
    m3_found = bool(np.isfinite(reference["m3_px"]))
    params = {"roi_metrics": reference, "equator": [float(v) for v in p], "equator_window": [float(lo), float(hi)]}
    if m3_found:
        mer_sector = rf.sector("meridian", sector_deg)
        mer = rf.SectorProfile(img0, valid, rmax=rmax, **mer_sector)
        # roi_metrics' search range for M3 (it may pin M3 at its bound), narrowed around its answer.
        m_lo, m_hi, margin = rf.m3_search_range(reference["s10_px"], geometry)
        lo_m3, hi_m3 = max(m_lo, reference["m3_px"] - 1.0), min(m_hi, reference["m3_px"] + 1.0)
        fit = rf.fit_single_peak(mer, lo_m3, hi_m3, margin)
        if fit is None:
            m3_found = False
        else:
            c, _, _, sig = fit
            half = max(margin, 6.0 * sig)
            mop = _profile_operator(valid, rmax=rmax, **mer_sector)
            msel = mop[6] & (r_bins >= c - half) & (r_bins <= c + half)
            rm = r_bins[msel]
            mcols = [rf.arced_peak(rm, c, sig), np.ones_like(rm), (rm - c) / c] + rf.arced_peak_derivatives(rm, c, sig)
            mq = _bin_solver(mop, msel, mcols, n_bins)
            matrix[:, 3:] = _pixel_weights(mop, np.stack([mq[0], mq[3]]), shape)
            m3_px = float(c)
            params["m3"] = [float(c), float(sig)]
            params["m3_window"] = [float(c - half), float(c + half)]
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


def _metrics_from_coef(coef, tdi, background_sum, reference):
    """Host twin of ``DevicePipeline.window_metrics``'s last step: ``{name: (n,) float64}``."""
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


# ---------------------------------------------------------------------- batch sizing


def choose_batch_size(batch_times_s: dict, latency_budget_s: float, frame_period_s: float = 0.0) -> int:
    """The largest batch size whose worst frame latency fits a budget.

    Parameters
    ----------
    batch_times_s : dict
        Measured seconds per batch, by batch size (:meth:`DevicePath.measure_batch_times`).
    latency_budget_s : float
        Most seconds from a frame's arrival to its result.
    frame_period_s : float, optional
        Seconds between frames. The first frame of a batch of ``b`` waits ``(b - 1)``
        periods for the batch to fill, then the batch time: worst latency
        ``(b - 1) * period + t(b)``. Default 0 (frames already queued: latency ``t(b)``).

    Returns
    -------
    int
        The largest ``b`` meeting the budget (larger batches have more frames/s on every
        backend measured); the smallest measured size when none does.

    Examples
    --------
    >>> choose_batch_size({1: 0.04, 4: 0.12, 8: 0.22}, 0.15)
    4
    >>> choose_batch_size({1: 0.04, 4: 0.12, 8: 0.22}, 0.15, frame_period_s=0.02)
    1
    """
    if not batch_times_s:
        raise ValueError("batch_times_s is empty: measure at least one batch size")
    if not latency_budget_s > 0:
        raise ValueError(f"latency_budget_s must be positive, got {latency_budget_s!r}")
    fits = [b for b, t in batch_times_s.items() if (b - 1) * frame_period_s + t <= latency_budget_s]
    return int(max(fits)) if fits else int(min(batch_times_s))


def _buckets(batch_size: int) -> tuple[int, ...]:
    """Batch sizes the pipeline is compiled for: powers of two below ``batch_size``, and it."""
    sizes = {batch_size}
    b = 1
    while b < batch_size:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def _upload_dtype(dtype) -> tuple[np.dtype, float]:
    """(dtype the frames are uploaded in, sentinel: values >= it are invalid)."""
    dtype = np.dtype(dtype)
    sentinel = float(np.float32(np.iinfo(dtype).max)) if dtype.kind in "iu" else math.inf
    upload = dtype if dtype.name in NATIVE_DTYPES else np.dtype(np.float32)
    return upload, sentinel


def _aligned_zeros(shape, dtype, align: int = 64) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def compiled_function(model, jit: bool = True, *, to_numpy: bool = True):
    """``inputs -> tuple of numpy arrays``: ``model``'s inference call compiled on the Keras backend.

    With ``to_numpy=False`` the outputs stay the backend's tensors on the device (for
    timing a stage without its download, or chaining calls).

    What ``model.predict_on_batch`` runs, without its per-call machinery (~10 ms a call
    with TensorFlow here, measured: 1.2 ms per frame in batches of 8; a GPU would do
    the whole batch in less). One trace per input shape, like Keras':

    - TensorFlow: ``tf.function`` (XLA with ``jit``);
    - JAX: ``jax.jit`` of ``stateless_call`` with the variables' current values passed
      in, so that assigning a variable (a new run's constants) needs no new trace;
    - PyTorch: ``torch.compile`` with ``jit``, else the eager call; under ``no_grad``.

    ``model.traces`` (when the model has it) counts the traces or compilations: in the
    traced body (TensorFlow, JAX), in the ``torch.compile`` backend, or per call when
    eager.
    """
    import keras

    def count():
        if hasattr(model, "traces"):
            model.traces += 1

    def numpy(out):
        if not to_numpy:
            return tuple(keras.tree.flatten(out))
        return tuple(keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(out))

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def body(x):
            count()  # Python: runs once per trace
            return model(x, training=False)

        # reduce_retracing, as Keras' own predict function: from the second input shape on,
        # one shape-relaxed trace (XLA still compiles an executable per concrete shape
        # beneath it), and no retracing warnings from a long-running callback.
        fn = tf.function(body, jit_compile=bool(jit), autograph=False, reduce_retracing=True)
        # In and out without copies on the CPU: tf.function copies a numpy argument (an
        # EIGER2 9M pair: 40 ms), a DLPack view of an aligned one is free; EagerTensor.numpy()
        # shares the tensor's memory where np.array() (Keras' convert_to_numpy) copies.
        def call(x):
            out = tf.nest.flatten(fn(tf.nest.map_structure(tf_view, x)))
            return tuple(t.numpy() for t in out) if to_numpy else tuple(out)

        return call
    if backend == "jax":
        import jax

        def pure(trainable, non_trainable, x):
            count()  # Python: runs once per trace under jit, per call without
            return model.stateless_call(trainable, non_trainable, x)[0]

        fn = jax.jit(pure) if jit else pure

        return lambda x: numpy(
            fn([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], x)
        )
    if backend == "torch" and jit:
        import torch
        from torch._inductor.compile_fx import compile_fx

        def counting_backend(graph, example_inputs):
            count()  # runs once per graph compiled
            return compile_fx(graph, example_inputs)

        forward = torch.compile(lambda x: model(x, training=False), backend=counting_backend)

        def call(x):
            with torch.no_grad():
                return numpy(forward(x))

        return call

    def eager(x):
        count()
        if backend == "torch":
            import torch

            with torch.no_grad():
                return numpy(model(x, training=False))
        return numpy(model(x, training=False))

    return eager


def tf_view(x):
    """A TensorFlow tensor viewing ``x`` without a copy (DLPack) where ``x`` is a writable,
    C-contiguous numpy array aligned to 64 bytes (TensorFlow's and XLA's alignment);
    anything else is returned as it is (``tf.function`` then converts it, with a copy).

    The tensor aliases ``x``: ``x`` must not change while a computation reads it (a
    synchronous call on the CPU, as :func:`compiled_function` makes, is over on return).
    """
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % 64 == 0):
        return x
    import tensorflow as tf

    try:
        return tf.experimental.dlpack.from_dlpack(x.__dlpack__())
    except (BufferError, TypeError, ValueError, tf.errors.InvalidArgumentError):  # a dtype DLPack or TF lacks
        return x


def accelerator_present() -> bool:
    """Whether the Keras backend runs on an accelerator (a GPU), not the CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    return False


# ---------------------------------------------------------------------- the path


class DevicePath:
    """Raw frames of one run -> corrected folds and metrics, in one compiled function per batch size.

    Parameters
    ----------
    model : str, BackgroundModel or a model ProcessingStep
        ``"model:NAME"`` / a ``.keras`` path, a loaded
        :class:`~live_bgsub.inference.BackgroundModel`, or the engine's model step.
    geometry : Geometry
        The run's fixed beam centre and rotation.
    shape : (int, int)
        Raw frame shape.
    mask : ndarray of bool, optional
        Static detector validity (True = valid), as :class:`~live_bgsub.engine.Engine`'s.
        Each frame's own invalid pixels (negative, NaN, the integer dtype's maximum) are
        found per frame (see ``validity_check``).
    edge : int, optional
        The fold map's edge erosion (default 1).
    batch_size : int, optional
        Most frames per device call (default 8); a smaller batch is padded (with copies
        of its last frame) to the next of :attr:`batch_sizes`: the powers of two below
        ``batch_size``, and ``batch_size``; one compilation each.
    precision : {"float32", "bfloat16", "float16"}, optional
        Compute dtype of the U-Net (the fold, normalisation, restore and metrics stay
        float32).
    jit_compile : bool or "auto", optional
        XLA (TensorFlow, JAX) / ``torch.compile`` (PyTorch) for the whole function.
        ``"auto"``: True on TensorFlow and JAX, False on PyTorch.
    metrics : bool, optional
        Fit the window metrics on the run's first frame(s) with an equator (default True).
        The radial totals (``tdi``, ``background_sum``) are always computed.
    with_background : bool, optional
        Also return the background folds (``process(...)[1]["background"]``).
    fold_map : FoldMap, optional
        A fold map already built for ``shape``, ``geometry`` and ``mask`` (an Engine's).
    pixel_size_mm, wavelength_nm, distance_mm : float, optional
        For ``d10_nm`` and the M3 search, as ``roi_metrics``.
    sector_deg : float, optional
        Sector half-width of the metrics (default 15, as ``roi_metrics``).
    reference_attempts : int, optional
        Frames tried as the metrics reference before giving up for the run (default 5).
    validity_refit : int, optional
        After this many consecutive batches whose invalid pixels differ from the
        reference frame's (the fold's slower general path), the last frame becomes the
        new reference (default 3; 0 never).
    validity_check : {"auto", "host", "device"}, optional
        Where each frame's invalid pixels are compared with the reference frame's (the
        fold's fast-path test): ``"host"`` while staging the batch (numpy, ~0.1 ms per
        Pilatus 1M frame), ``"device"`` inside the compiled function (a pass over the
        frames: cheap on a GPU, ~1 ms per Pilatus 1M frame on XLA:CPU). ``"auto"``
        (default): the device when the backend has an accelerator, else the host.
    cache : dict, optional
        Compiled device functions shared between device paths (the callback keeps one
        for all its runs): a run whose frame shape, model, precision and dtype match an
        earlier one's, and whose fold has the same :attr:`device_fold_shape` (the fold
        padded to multiples of ``downsample * 2**depth``: geometries a few pixels apart
        share it), reuses its function with this run's constants assigned, instead of
        compiling again (~2 s for a Pilatus 1M on this CPU).

    Attributes
    ----------
    compilations : int
        Traces of the device function so far (one per batch size used).
    device_fold_shape, device_window_shape : (int, int)
        The fold and the metrics window as the device computes them: padded to
        multiples of ``downsample * 2**depth`` (results are cropped back to
        ``fold_shape``).
    windows : WindowFit or None
        The metrics reference fit once made.
    fold_paths : dict
        Batches folded on the reference-validity path and on the general path, and
        the reference validity refits.
    last_timings_s : dict
        Seconds of the last :meth:`process` call per stage: ``stage`` (host copy into
        the upload buffer, and the host validity test), ``device`` (the compiled call: upload, fold, model, metrics,
        download), ``reference`` (the one-off CPU fit of the window metrics).
    """

    def __init__(
        self,
        model,
        geometry: Geometry,
        shape,
        mask=None,
        *,
        edge: int = 1,
        batch_size: int = 8,
        precision: str = "float32",
        jit_compile="auto",
        metrics: bool = True,
        with_background: bool = False,
        fold_map: FoldMap | None = None,
        pixel_size_mm: float | None = None,
        wavelength_nm: float | None = None,
        distance_mm: float | None = None,
        sector_deg: float = 15.0,
        reference_attempts: int = 5,
        validity_refit: int = 3,
        validity_check: str = "auto",
        cache: dict | None = None,
        geometry_quality=None,
    ):
        from .inference import BackgroundModel

        if hasattr(model, "model") and isinstance(model.model, BackgroundModel):
            model = model.model  # the engine's model step
        if not isinstance(model, BackgroundModel):
            if not (isinstance(model, str) or hasattr(model, "__fspath__")):
                raise ProcessingError(f"model must be 'model:NAME', a .keras path or a BackgroundModel, got {model!r}")
            model = BackgroundModel.load(model)
        if model.normalization != "unified":
            raise ProcessingError(f"model {model.name!r} uses {model.normalization!r} normalisation: only 'unified' works")
        if not isinstance(geometry, Geometry):
            raise ProcessingError(f"geometry must be a live_bgsub.geometry.Geometry, got {geometry!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ProcessingError(f"batch_size must be a positive integer, got {batch_size!r}")
        if precision not in ("float32", "bfloat16", "float16"):
            raise ProcessingError(f"precision must be 'float32', 'bfloat16' or 'float16', got {precision!r}")
        if validity_check not in ("auto", "host", "device"):
            raise ProcessingError(f"validity_check must be 'auto', 'host' or 'device', got {validity_check!r}")
        self.model = model
        self.geometry = geometry
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2:
            raise ProcessingError(f"frame shape must be (rows, cols), got {shape!r}")
        if fold_map is None:
            fold_map = FoldMap(self.shape, geometry, mask, edge=edge)
        elif fold_map.shape != self.shape:
            raise ProcessingError(f"fold_map is for frames of shape {fold_map.shape}, not {self.shape}")
        self.fold_map = fold_map
        self.fold_shape = tuple(fold_map.fold_shape)
        self.batch_size = int(batch_size)
        self.batch_sizes = _buckets(self.batch_size)
        self.precision = precision
        self.jit_compile = jit_compile
        self.compute_metrics = bool(metrics)
        self.geometry_quality = geometry_quality
        self.with_background = bool(with_background)
        self.roi = {"pixel_size_mm": pixel_size_mm, "wavelength_nm": wavelength_nm, "distance_mm": distance_mm}
        self.sector_deg = float(sector_deg)
        self.reference_attempts = int(reference_attempts)
        self.rmax = float(min(self.fold_shape) - 1)
        nr = math.floor(self.rmax) + 2
        self.window_shape = (min(self.fold_shape[0], nr), min(self.fold_shape[1], nr))
        # The device computes on the fold padded to whole working blocks of the U-Net
        # (multiples of downsample * 2**depth, 32 for the shipped models; the padding is
        # invalid fold pixels, and the U-Net saw the same zero padding before): runs whose
        # geometries differ by a few pixels then share one compiled function.
        block = self.model.downsample * 2**self.model.depth
        self.device_fold_shape = tuple(-(-s // block) * block for s in self.fold_shape)
        self.device_window_shape = tuple(-(-s // block) * block for s in self.window_shape)
        self.windows: WindowFit | None = None
        self.reference_seq: int | None = None
        self._attempts = 0
        self.pipeline = None
        self.upload_dtype = None
        self.frame_dtype = None
        self._staging: dict = {}
        self.last_timings_s: dict = {}
        self.validity_refit = int(validity_refit)
        self.cache = cache
        self.validity_check = validity_check
        self._validity_test = None
        self.fold_paths = {"reference": 0, "general": 0, "validity_refits": 0}
        self._misses = 0
        self._reference_valid = None

    @classmethod
    def from_engine(cls, engine, **kwargs) -> DevicePath:
        """A device path with an :class:`~live_bgsub.engine.Engine`'s model, geometry, fold map and ROI geometry."""
        kwargs.setdefault("metrics", engine.compute_metrics)
        for key in ("pixel_size_mm", "wavelength_nm", "distance_mm", "geometry_quality"):
            kwargs.setdefault(key, getattr(engine, key))
        return cls(engine.step, engine.geometry, engine.shape, fold_map=engine.fold_map, **kwargs)

    # ------------------------------------------------------------------ building

    @property
    def compilations(self) -> int:
        return 0 if self.pipeline is None else int(self.pipeline.traces)

    @property
    def backend(self) -> str:
        import keras

        return keras.backend.backend()

    def build(self, dtype=np.float32) -> None:
        """Build the device function for frames of ``dtype`` (done by the first :meth:`process`)."""
        import keras

        from .model.pipeline import DevicePipeline, background_head

        upload, sentinel = _upload_dtype(dtype)
        fm = self.fold_map
        self._support = window_support(self.device_window_shape, self.sector_deg)
        static = not bool(fm.mask.all())
        jit = self.jit_compile
        if jit == "auto":
            jit = keras.backend.backend() in ("tensorflow", "jax")
        if self.validity_check == "auto":
            self.validity_check = "device" if accelerator_present() else "host"
        host_validity = self.validity_check == "host"
        # Everything the compiled function's structure depends on; a later run with the
        # same key reuses it (new constants assigned below, no recompilation).
        key = (
            self.shape, self.device_fold_shape, id(self.model), self.precision, self.model.downsample,
            self.model.depth, self.device_window_shape, self.sector_deg, fm.edge, sentinel, static,
            self.with_background, np.dtype(upload).str, bool(jit), host_validity,
        )  # fmt: skip
        pipeline = self.cache.get(key) if self.cache is not None else None
        if pipeline is None:
            pipeline = DevicePipeline(
                self.shape,
                self.device_fold_shape,
                background_head(self.model.model, self.precision),
                downsample=self.model.downsample,
                depth=self.model.depth,
                window_shape=self.device_window_shape,
                window_support=len(self._support),
                edge=fm.edge,
                sentinel=sentinel,
                static_mask=static,
                with_background=self.with_background,
                host_validity=host_validity,
            )
            pipeline.build((None, *self.shape))
            pipeline.compile(jit_compile=bool(jit))  # records jit_compile; calls go through pipeline.run
            pipeline.run = compiled_function(pipeline, bool(jit))
            pipeline.warm_sizes = set()  # batch sizes run (compiled) so far
            if self.cache is not None:
                self.cache[key] = pipeline
        else:
            # Reused: forget the previous run's reference state before this run sets its own.
            for variable in (pipeline.reference, pipeline.fold_layer.reference_valid,
                             pipeline.fold_layer.tap_weight_reference, pipeline.fold_layer.reference_count):
                variable.assign(np.zeros(variable.shape, variable.dtype))
        index, self._tap_weight = fold_taps(fm)
        # Padded fold pixels: off the detector (index 0, NaN weight), never valid.
        pipeline.fold_layer.tap_index.assign(self._pad(index, self.fold_shape, self.device_fold_shape, 0))
        pipeline.fold_layer.tap_weight.assign(self._pad(self._tap_weight, self.fold_shape, self.device_fold_shape, np.nan))
        if static:
            pipeline.fold_layer.static_valid.assign(fm.mask)
        ii, jj = np.indices(self.window_shape)
        radial = self._pad((np.hypot(ii, jj) <= self.rmax).ravel(), self.window_shape, self.device_window_shape, False)
        pipeline.radial_window.assign(radial.reshape(self.device_window_shape))
        pipeline.window_index.assign(self._support)
        pipeline.window_weights.assign(np.zeros(pipeline.window_weights.shape, np.float32))
        self.pipeline = pipeline
        self.upload_dtype = upload
        self.frame_dtype = np.dtype(dtype)
        self._staging = {}
        self._validity_test = validity_test(upload, sentinel, fm.mask if static else None) if host_validity else None
        if self.windows is not None:
            self._assign_windows(self.windows)

    @staticmethod
    def _pad(values, shape, device_shape, fill):
        """``(..., h * w)`` values of a ``shape`` fold -> ``(..., H * W)`` of ``device_shape``, padded with ``fill``."""
        (h, w), (hd, wd) = shape, device_shape
        lead = values.shape[:-1]
        grid = values.reshape(*lead, h, w)
        pad = [(0, 0)] * len(lead) + [(0, hd - h), (0, wd - w)]
        return np.pad(grid, pad, constant_values=fill).reshape(*lead, hd * wd)

    def _assign_windows(self, fit: WindowFit) -> None:
        weights = self._pad(fit.matrix.T, self.window_shape, self.device_window_shape, 0)
        stray = np.any(np.delete(weights, self._support, axis=1), axis=0)
        if stray.any():
            # fit_windows and window_support disagree on the sectors: a bug, not bad data.
            raise ProcessingError(
                f"the window fit weights {np.count_nonzero(stray)} pixels outside "
                f"the {self.sector_deg} degree sectors that the device gathers"
            )
        self.pipeline.window_weights.assign(weights[:, self._support])
        self.pipeline.reference.assign(self._reference_vector(fit))

    def _reference_vector(self, fit: WindowFit) -> np.ndarray:
        """S10 and M3 of the fit, ``wavelength * distance / pixel`` (NaN unknown), found flags."""
        geometry = math.nan
        if all(self.roi[k] is not None for k in self.roi):
            geometry = self.roi["wavelength_nm"] * self.roi["distance_mm"] / self.roi["pixel_size_mm"]
        return np.array(
            [fit.s10_px, fit.m3_px if fit.m3_found else 0.0, geometry, float(fit.equator_found), float(fit.m3_found)],
            np.float32,
        )

    def warmup(self, dtype=np.float32, batch_sizes=None) -> int:
        """Compile for every batch size (default :attr:`batch_sizes`) before the first real frame.

        A batch size already run by this device function (also by another run's device
        path sharing it through ``cache``) is skipped, so calling this per run costs
        nothing once the function is warm (on TensorFlow the second trace is
        shape-relaxed and covers the other sizes). Returns how many sizes were run.
        """
        if self.pipeline is None:
            self.build(dtype)
        elif np.dtype(dtype) != self.frame_dtype:
            raise ProcessingError(f"warmup({np.dtype(dtype)}): this device path was built for {self.frame_dtype} frames")
        if self.compute_metrics:
            from . import reflections  # noqa: F401 - the first frame's reference fit imports scipy.optimize (~0.25 s)
        cold = [int(b) for b in (batch_sizes or self.batch_sizes) if int(b) not in self.pipeline.warm_sizes]
        for b in cold:
            self._call(self._buffer(b), False)
        return len(cold)

    def measure_batch_times(self, batch_sizes=None, repeats: int = 5, frames=None, dtype=np.float32) -> dict:
        """Median seconds of one device call per batch size, for :func:`choose_batch_size`.

        ``frames`` (default: zero frames with the run's reference invalid pixels, so
        that the fold takes its usual path) are tiled to each batch size.
        """
        import statistics

        if self.pipeline is None:
            self.build(dtype if frames is None else np.asarray(frames[0]).dtype)
        if frames is None:
            frame = np.zeros(self.shape, self.upload_dtype)
            if self._reference_valid is not None:
                bad = np.iinfo(frame.dtype).max if frame.dtype.kind == "u" else -1
                frame[~self._reference_valid] = bad
            frames = [frame]
        frames = [np.asarray(f) for f in frames]
        out = {}
        for b in batch_sizes or self.batch_sizes:
            buf = self._buffer(b)
            for i in range(b):
                buf[i] = frames[i % len(frames)]
            same = self._same(buf)
            self._call(buf, same)  # compile
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                self._call(buf, same)
                times.append(time.perf_counter() - t)
            out[int(b)] = statistics.median(times)
        return out

    def upload_buffer(self, n: int) -> np.ndarray:
        """The aligned upload buffer for a batch of ``n`` frames (``n`` one of :attr:`batch_sizes`).

        Reading frames straight into it (``h5py.Dataset.read_direct``) and passing it to
        :meth:`process` saves the staging copy. Only after the first :meth:`process`
        (the run's frame dtype is known then); the next :meth:`process` may overwrite it.
        """
        if self.pipeline is None:
            raise ProcessingError("upload_buffer() needs the run's first process() call (its frame dtype)")
        if n not in self.batch_sizes:
            raise ProcessingError(f"upload_buffer({n!r}): n must be one of the compiled batch sizes {self.batch_sizes}")
        return self._buffer(n)

    def device_inputs(self, buf):
        """The compiled function's input for a filled upload buffer: ``buf``, or with the
        host validity check ``(buf, same)``, ``same`` float32 ``(n,)`` (1 where the batch's
        frames all have the reference validity). For calling ``pipeline.run`` directly
        (benchmarks); :meth:`process` does this itself."""
        return self._inputs(buf, self._validity_test is not None and self._same(buf))

    def _buffer(self, size: int) -> np.ndarray:
        """The upload buffer for ``size`` frames, 64-byte aligned: TensorFlow wraps an aligned
        array without copying it (0.2 against 0.6 ms per Pilatus 1M frame here)."""
        buf = self._staging.get(size)
        if buf is None:
            buf = self._staging[size] = _aligned_zeros((size, *self.shape), self.upload_dtype)
        return buf

    def _same(self, frames) -> bool:
        """Whether every frame has the reference validity (host test; False before a reference).

        In blocks of rows (~256 k pixels) that stay in the cache, stopping at the first
        difference: 6.8 against 10.7 ms for a whole EIGER2 9M frame at once (measured).
        """
        if self._reference_valid is None:
            return False
        ref = self._reference_valid
        step = max(1, _VALIDITY_BLOCK // self.shape[1])
        for f in frames:
            for r in range(0, self.shape[0], step):
                rows = slice(r, r + step)
                if not np.array_equal(self._validity_test(f[rows], rows), ref[rows]):
                    return False
        return True

    def _inputs(self, buf, same: bool):
        """The compiled function's input; ``same`` is used when the host tests the validity."""
        if self._validity_test is None:
            return buf
        return (buf, np.full(len(buf), float(same), np.float32))

    def _call(self, buf, same: bool):
        """One device call; ``same`` is used when the host tests the validity."""
        out = self.pipeline.run(self._inputs(buf, same))
        self.pipeline.warm_sizes.add(len(buf))
        return out

    def _bucket(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    # ------------------------------------------------------------------ processing

    def process(self, frames):
        """Fold, subtract the background and measure a batch of raw frames of the run.

        Parameters
        ----------
        frames : ndarray ``(n, rows, cols)`` or sequence of 2-D arrays
            Raw frames as the detector wrote them, all of the run's shape and dtype
            (negative, non-finite and integer-maximum pixels are invalid).

        Returns
        -------
        corrected : ndarray of float32, ``(n, fh, fw)``
            Corrected folds, 0 at invalid fold pixels.
        metrics : dict
            ``{name: ndarray (n,)}`` for the names of :data:`METRIC_NAMES` (float64;
            NaN where not measured), ``equator_found`` (bool: the run's reference fit
            found an equator and this frame's I10 and I11 are positive), ``count``
            (uint8 ``(n, fh, fw)``: valid quadrant samples per fold pixel) and, with
            ``with_background``, ``background`` (float32 ``(n, fh, fw)``).

        Raises
        ------
        ProcessingError
            A frame of another shape or dtype than the run's.
        """
        frames = frames if isinstance(frames, np.ndarray) and frames.ndim == 3 else [np.asarray(f) for f in frames]
        n = len(frames)
        if n == 0:
            raise ProcessingError("process() needs at least one frame")
        dtype = frames.dtype if isinstance(frames, np.ndarray) else frames[0].dtype
        for f in frames:
            if f.shape != self.shape:
                raise ProcessingError(f"frame has shape {f.shape}, expected {self.shape} like the run's first frame")
            if f.dtype != dtype:
                raise ProcessingError(f"frames of one batch must share a dtype, got {dtype} and {f.dtype}")
        if self.pipeline is None:
            self.build(dtype)
        elif dtype != self.frame_dtype:
            raise ProcessingError(f"frames have dtype {dtype}; this run's device path was built for {self.frame_dtype} frames")
        if self._reference_valid is None:  # the run's first frame (also after warmup())
            self.set_reference_validity(frames[0])
        fh, fw = self.fold_shape
        corrected = np.empty((n, fh, fw), np.float32)
        count = np.empty((n, fh, fw), np.uint8)
        background = np.empty((n, fh, fw), np.float32) if self.with_background else None
        values = np.empty((n, len(METRIC_NAMES)), np.float64)
        timings = {"stage": 0.0, "device": 0.0, "reference": 0.0}
        for start in range(0, n, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            m = len(chunk)
            t0 = time.perf_counter()
            buf = self._buffer(self._bucket(m))
            if not (isinstance(chunk, np.ndarray) and m == len(buf) and chunk.ctypes.data == buf.ctypes.data):
                for i in range(m):  # (frames read into upload_buffer() are there already)
                    buf[i] = chunk[i]
                buf[m:] = chunk[m - 1]  # padding: a copy of a real frame keeps the fold on its usual path
            same = self._validity_test is not None and self._same(buf[:m])
            t1 = time.perf_counter()
            out = self._call(buf, same)
            corrected[start : start + m] = out[0][:m, :fh, :fw]
            count[start : start + m] = out[1][:m, :fh, :fw]
            values[start : start + m] = out[2][:m]
            if background is not None:
                background[start : start + m] = out[4][:m, :fh, :fw]
            t2 = time.perf_counter()
            self._track_fold_path(bool(out[3][0] > 0.5), chunk[m - 1])
            timings["stage"] += t1 - t0
            timings["device"] += t2 - t1
        metrics = {name: values[:, i] for i, name in enumerate(METRIC_NAMES)}
        if self.compute_metrics and self.windows is None and self._attempts < self.reference_attempts:
            t = time.perf_counter()
            if self._fit_reference(corrected, count, values):
                metrics = self._host_window_metrics(corrected, values)
            timings["reference"] = time.perf_counter() - t
        metrics["equator_found"] = np.isfinite(metrics["i10"]) & (metrics["i10"] > 0) & (metrics["i11"] > 0)
        metrics["count"] = count
        if background is not None:
            metrics["background"] = background
        self.last_timings_s = timings
        return corrected, metrics

    def set_reference_validity(self, frame) -> None:
        """Take ``frame``'s invalid pixels as the run's usual ones (the fold's fast path).

        Done on the first frame of the run, and again when ``validity_refit``
        consecutive batches had other invalid pixels (a new dead or saturated pixel).
        """
        layer = self.pipeline.fold_layer
        static = self.fold_map.mask if layer.static_valid is not None else None
        valid = frame_validity(frame, layer.sentinel, static)
        weight, count = reference_taps(self.fold_map, valid, self._tap_weight)
        layer.reference_valid.assign(valid)
        self._reference_valid = valid
        layer.tap_weight_reference.assign(self._pad(weight, self.fold_shape, self.device_fold_shape, 0))
        layer.reference_count.assign(self._pad(count.ravel(), self.fold_shape, self.device_fold_shape, 0).reshape(self.device_fold_shape))
        self.fold_paths["validity_refits"] += 1

    def _track_fold_path(self, reference: bool, last_frame) -> None:
        if reference:
            self.fold_paths["reference"] += 1
            self._misses = 0
            return
        self.fold_paths["general"] += 1
        self._misses += 1
        if self.validity_refit and self._misses >= self.validity_refit:
            self.set_reference_validity(last_frame)
            self._misses = 0

    def _fit_reference(self, corrected, count, values) -> bool:
        """Fit the window metrics on the first frames with data; True once found."""
        for i in range(len(corrected)):
            if self._attempts >= self.reference_attempts:
                return False
            valid = count[i] > 0
            if not valid.any() or not np.isfinite(corrected[i]).all():
                continue
            self._attempts += 1
            fit = fit_windows(corrected[i], valid, sector_deg=self.sector_deg, rmax=self.rmax, shape=self.window_shape, **self.roi)
            if fit.equator_found:
                self.windows = fit
                self._assign_windows(fit)
                return True
        return False

    def _host_window_metrics(self, corrected, values):
        """The window metrics of frames processed before the reference existed (numpy)."""
        hm, wm = self.window_shape
        coef = corrected[:, :hm, :wm].reshape(len(corrected), -1).astype(np.float64) @ self.windows.matrix.astype(np.float64)
        tdi = values[:, METRIC_NAMES.index("tdi")]
        bg = values[:, METRIC_NAMES.index("background_sum")]
        return _metrics_from_coef(coef, tdi, bg, self._reference_vector(self.windows))

    def results(self, frames, seq_nums=None) -> list:
        """Like :meth:`live_bgsub.engine.Engine.process`: one FrameResult per frame, never raising for a bad frame.

        A frame of the wrong shape or dtype, a fold without a valid pixel or non-finite
        output fails alone (``error`` set); the others are processed in one batch.
        ``metrics`` holds the :data:`METRIC_NAMES`, ``equator_found`` and ``reason``;
        ``background`` is set with ``with_background``.
        """
        frames, results = new_results(frames, seq_nums)
        good, arrays = [], []
        dtype = self.frame_dtype
        for result, raw in zip(results, frames):
            raw = np.asarray(raw)
            if raw.shape != self.shape:
                result.error = f"ProcessingError: frame has shape {raw.shape}, expected {self.shape} like the run's first frame"
                continue
            if dtype is None:
                dtype = raw.dtype
            if raw.dtype != dtype:
                result.error = f"ProcessingError: frame has dtype {raw.dtype}, expected {dtype} like the run's first frame"
                continue
            good.append(result)
            arrays.append(raw)
        if not good:
            return results
        t = time.perf_counter()
        try:
            corrected, metrics = self.process(arrays)  # each frame is copied once, into the upload buffer
        except Exception as exc:  # noqa: BLE001 - recorded per frame, never raised
            for result in good:
                result.error = f"device path failed: {type(exc).__name__}: {exc}"
            return results
        share = (time.perf_counter() - t) / len(good)
        reason = None
        if self.compute_metrics and self.windows is None:
            reason = "window metrics not fitted yet: no reference frame with a fiber equator"
        for i, result in enumerate(good):
            count = metrics["count"][i]
            if not count.any():
                result.error = "ProcessingError: the fold holds no valid pixel"
                continue
            if not np.isfinite(corrected[i]).all():
                result.error = "device path returned non-finite values"
                continue
            result.corrected = corrected[i]
            result.count = count.astype(np.int8)
            if self.with_background:
                result.background = metrics["background"][i]
            result.metrics = {name: float(metrics[name][i]) for name in METRIC_NAMES}
            result.metrics["equator_found"] = bool(metrics["equator_found"][i])
            result.metrics["reason"] = reason
            result.metrics["quality"] = self._frame_quality(result.metrics["equator_found"], reason)
            result.timings_s["device"] = share
        return results

    def _frame_quality(self, equator_found: bool, reason) -> dict:
        """A frame's metrics verdict: the reference fit's (its windows are that fit, frozen) and the geometry's.

        The window integrals carry no per-frame fit evidence; the reference frame's
        verdict (:func:`live_bgsub.metrics.roi_metrics` on it) stands for the run, and a
        frame whose 1,0 or 1,1 integral is not positive has no equator.
        """
        reasons = []
        if self.geometry_quality is not None and self.geometry_quality.verdict != "good":
            reasons += [f"geometry: {r}" for r in self.geometry_quality.reasons] or ["geometry: doubtful"]
        if not equator_found or self.windows is None:
            if reason:
                reasons.append(reason)
            return {"verdict": "no equator", "reasons": reasons, "evidence": {}}
        ref = self.windows.params["roi_metrics"]["quality"]
        reasons = [f"reference frame: {r}" for r in ref["reasons"] if not r.startswith("geometry: ")] + reasons
        return {"verdict": "doubtful" if reasons else "good", "reasons": reasons, "evidence": dict(ref["evidence"])}

    def describe(self) -> dict:
        """Provenance, as :meth:`live_bgsub.engine.Engine.describe` plus ``"device"`` (goes into the derived run's start)."""
        from .engine import make_step

        device = {
            "backend": self.backend,
            "precision": self.precision,
            "jit_compile": self.jit_compile if self.pipeline is None else bool(self.pipeline.jit_compile),
            "batch_sizes": list(self.batch_sizes),
            "fold_shape": list(self.device_fold_shape),
            "metrics": "windows" if self.compute_metrics else "totals",
            "metrics_reference": None
            if self.windows is None
            else {"s10_px": self.windows.s10_px, "m3_px": self.windows.m3_px if self.windows.m3_found else None},
            "fold_paths": dict(self.fold_paths),
        }
        return {
            **make_step(self.model).describe(),
            "center": [float(self.geometry.center[0]), float(self.geometry.center[1])],
            "rotation_deg": float(self.geometry.rotation_deg),
            "shape": list(self.shape),
            "fold_shape": list(self.fold_shape),
            "device": device,
        }
