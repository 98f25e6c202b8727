"""Shared plumbing of the background methods: input checks, masks, radii, resampling."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..resample import block_mean, upsample_linear  # noqa: F401  (re-exported for the registry)

__all__ = [
    "prepare_fold",
    "finish_background",
    "radius_grid",
    "check_real",
    "check_int",
    "check_optional_real",
    "check_percentiles",
    "percentile_slice",
    "block_mean",
    "upsample_linear",
]


# --------------------------------------------------------------------------- inputs


def prepare_fold(fold, mask):
    """Validate ``fold`` and ``mask``; return the working copy, the valid mask and dtypes.

    Returns
    -------
    data : ndarray
        ``fold`` as the working dtype (float32 for float32/float16/integer inputs,
        float64 otherwise) with every invalid pixel set to 0, so that no later
        arithmetic can see an invalid value (NaN, sentinel, ...).
    valid : ndarray of bool
        ``mask`` (all True when None) and-ed with ``isfinite(fold)``: a non-finite
        value is never intensity.
    out_dtype : numpy.dtype
        The dtype of the returned background: the input's floating dtype, float32
        for integer or boolean input.
    """
    arr = np.asarray(fold)
    if arr.ndim != 2:
        raise ValueError(
            f"fold must be a 2-D array (rows = meridian, columns = equator), "
            f"got an array of shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"fold must not be empty, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        out_dtype = arr.dtype
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        out_dtype = np.dtype(np.float32)
    else:
        raise ValueError(
            f"fold must hold real numbers (a floating or integer dtype), got dtype {arr.dtype}"
        )
    work_dtype = np.dtype(np.float32) if out_dtype.itemsize <= 4 else np.dtype(np.float64)

    if mask is None:
        valid = np.ones(arr.shape, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise ValueError(
                f"mask must be a boolean array (True = valid pixel), got dtype {m.dtype}"
            )
        if m.shape != arr.shape:
            raise ValueError(
                f"mask must have the fold's shape {arr.shape}, got shape {m.shape}"
            )
        valid = m.copy()
    if np.issubdtype(arr.dtype, np.floating):
        valid &= np.isfinite(arr)
    data = np.zeros(arr.shape, dtype=work_dtype)
    np.copyto(data, arr, where=valid, casting="unsafe")
    return data, valid, out_dtype


def finish_background(background, valid, out_dtype):
    """Zero the invalid pixels and cast to the output dtype (in place where possible)."""
    background = np.asarray(background)
    background[~valid] = 0
    return background.astype(out_dtype, copy=False)


def radius_grid(shape, dtype=np.float64):
    """Radius ``hypot(i, j)`` of every fold pixel (beam centre at index [0, 0])."""
    i = np.arange(shape[0], dtype=dtype)[:, None]
    j = np.arange(shape[1], dtype=dtype)[None, :]
    return np.sqrt(i * i + j * j)


# --------------------------------------------------------------------------- checks


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_real(name, value, *, minimum=None, exclusive=False, maximum=None, unit=""):
    """Return ``float(value)`` or raise ValueError naming the parameter and the expectation."""
    unit_txt = f" {unit}" if unit else ""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number{unit_txt}, got {value!r}")
    v = float(value)
    if minimum is not None:
        if exclusive and not v > minimum:
            raise ValueError(f"{name} must be > {minimum:g}{unit_txt}, got {value!r}")
        if not exclusive and not v >= minimum:
            raise ValueError(f"{name} must be >= {minimum:g}{unit_txt}, got {value!r}")
    if maximum is not None and not v <= maximum:
        raise ValueError(f"{name} must be <= {maximum:g}{unit_txt}, got {value!r}")
    return v


def check_optional_real(name, value, **kwargs):
    """Like :func:`check_real` but ``None`` passes through."""
    if value is None:
        return None
    return check_real(name, value, **kwargs)


def check_int(name, value, *, minimum=None, unit=""):
    """Return ``int(value)`` for an integral value or raise ValueError."""
    unit_txt = f" {unit}" if unit else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{unit_txt}, got {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{unit_txt}, got {value!r}")
    return v


def check_percentiles(cirmin, cirmax):
    """Validate the percentile pair ``0 <= cirmin <= cirmax <= 100``; return fractions."""
    lo = check_real("cirmin", cirmin, minimum=0.0, maximum=100.0, unit="(percent)")
    hi = check_real("cirmax", cirmax, minimum=0.0, maximum=100.0, unit="(percent)")
    if hi < lo:
        raise ValueError(
            f"cirmax must be >= cirmin (a percentile range), got cirmin={cirmin!r}, "
            f"cirmax={cirmax!r}"
        )
    return lo / 100.0, hi / 100.0


def percentile_slice(n, lo_frac, hi_frac):
    """Order-statistic range ``[lo, hi)`` of ``n`` sorted values for a percentile range.

    ``lo = floor(lo_frac * n)``, ``hi = floor(hi_frac * n)``, widened to hold at least
    one value (so equal percentiles select one order statistic). Works on arrays.
    """
    n = np.asarray(n)
    lo = np.floor(lo_frac * n).astype(np.int64)
    hi = np.floor(hi_frac * n).astype(np.int64)
    lo = np.minimum(lo, np.maximum(n - 1, 0))
    hi = np.minimum(np.maximum(hi, lo + 1), n)
    return lo, hi


