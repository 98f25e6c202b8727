"""Resampling between full and reduced resolution: block means and their bilinear inverse.

Shared by the background methods (MuscleX's ``downsample``), the geometry search and the
model engine. Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

__all__ = ["block_mean", "upsample_linear"]


def block_mean(data, valid, factor):
    """Mean of the valid pixels of each ``factor x factor`` block (edges padded).

    Returns the reduced image (0 where a block holds no valid pixel), in ``data``'s
    dtype, and its mask.
    """
    h, w = data.shape
    hb, wb = -(-h // factor), -(-w // factor)
    ph, pw = hb * factor - h, wb * factor - w
    vals = np.where(valid, data, 0).astype(data.dtype, copy=False)
    weights = valid.astype(data.dtype)
    if ph or pw:
        vals = np.pad(vals, ((0, ph), (0, pw)))
        weights = np.pad(weights, ((0, ph), (0, pw)))
    sums = np.zeros((hb, wb), dtype=data.dtype)
    counts = np.zeros((hb, wb), dtype=data.dtype)
    for p in range(factor):
        for q in range(factor):
            sums += vals[p::factor, q::factor]
            counts += weights[p::factor, q::factor]
    small_valid = counts > 0
    small = np.zeros((hb, wb), dtype=data.dtype)
    np.divide(sums, counts, out=small, where=small_valid)
    return small, small_valid


def _interpolation_matrix(n_out, n_in, factor, dtype):
    """Sparse (n_out, n_in) matrix of the linear interpolation from block centres."""
    # Full-resolution pixel p lies at reduced coordinate (p - (factor - 1) / 2) / factor.
    u = (np.arange(n_out, dtype=np.float64) - (factor - 1) / 2.0) / factor
    u = np.clip(u, 0.0, n_in - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = u - i0
    rows = np.arange(n_out)
    return sparse.csr_matrix(
        (np.concatenate([1.0 - frac, frac]).astype(dtype),
         (np.concatenate([rows, rows]), np.concatenate([i0, i1]))),
        shape=(n_out, n_in),
    )


def upsample_linear(small, small_valid, factor, shape):
    """Bilinear (spline order 1) upsampling of a reduced image, normalised by validity.

    Reduced pixels that are invalid get zero weight; every full-resolution pixel of a
    block holding valid data keeps a weight above 1/4 from its own block, so the
    normalisation never divides by zero there. Implemented as two sparse
    interpolation-matrix products per image (``R_y @ small @ R_x.T``).
    """
    rows = _interpolation_matrix(shape[0], small.shape[0], factor, small.dtype)
    cols = _interpolation_matrix(shape[1], small.shape[1], factor, small.dtype)

    def interp(image):
        return np.asarray((cols @ (rows @ image).T).T)

    if small_valid.all():
        return np.ascontiguousarray(interp(small), dtype=small.dtype)
    num = interp(np.where(small_valid, small, 0).astype(small.dtype, copy=False))
    den = interp(small_valid.astype(small.dtype))
    out = np.zeros(shape, dtype=small.dtype)
    np.divide(num, den, out=out, where=den > 0)
    return out
