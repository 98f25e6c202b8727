"""Folding a frame into one quadrant around the beam centre, and unfolding it back.

Conventions (see ``docs/conventions.md``; points and ``rotation_deg`` as in
:mod:`live_bgsub.geometry`):

- The fold has the beam centre at ``[0, 0]``, axis 1 along the equator and axis 0
  along the meridian; ``fold[i, j]`` averages the valid detector samples at
  ``center + u * e + v * m`` for ``(u, v) = (+-j, +-i)``, with ``e`` the equator's and
  ``m`` the meridian's unit vector. ``count[i, j]`` is how many of the four quadrant
  samples were valid.

Folding a stream of frames with a fixed geometry builds a :class:`FoldMap` once: a
sparse matrix that turns a raveled frame into the fold (bilinear sampling of the four
quadrants, averaging the valid ones) in one sparse product per frame or batch.
:meth:`FoldMap.taps` gives the same fold as tap tables (:class:`FoldTaps`) for other
implementations of it (the device path's fixed 16-tap gather).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse

from .errors import GeometryError
from .geometry import Geometry

__all__ = ["FoldMap", "FoldTaps", "fold", "fold_extent", "unfold"]


_QUADRANT_SIGNS = ((1, 1), (-1, 1), (1, -1), (-1, -1))  # (equator, meridian)


def fold_extent(shape, geometry) -> tuple[int, int]:
    """Fold shape (rows, cols) covering every detector pixel's distance from the centre:
    a :class:`FoldMap`'s ``fold_shape`` for a frame of ``shape`` folded at ``geometry``."""
    h, w = shape
    cx, cy = geometry.center
    ex, ey = geometry.equator_vector
    mx, my = geometry.meridian_vector
    corners = np.array([[-0.5 - cx, -0.5 - cy], [w - 0.5 - cx, -0.5 - cy], [-0.5 - cx, h - 0.5 - cy], [w - 0.5 - cx, h - 0.5 - cy]])
    u = np.abs(corners @ np.array([ex, ey])).max()
    v = np.abs(corners @ np.array([mx, my])).max()
    return int(math.ceil(v)), int(math.ceil(u))


@dataclass(frozen=True)
class FoldTaps:
    """A :class:`FoldMap`'s fold as tap tables (:meth:`FoldMap.taps`), read-only views.

    Fold pixel ``k`` (``k = i * fw + j``, row-major over ``fold_shape``) has four
    quadrant samples ``q`` in the order of the quadrant signs ``(equator, meridian)``
    ``(+, +), (-, +), (+, -), (-, -)``. Sample ``[k, q]`` is the bilinear interpolation
    of the raveled frame ``flat`` (``w`` columns) at its four taps::

        a = flat[base], b = flat[base + 1], c = flat[base + w], d = flat[base + w + 1]
        value = (1 - fy) * ((1 - fx) * a + fx * b) + fy * ((1 - fx) * c + fx * d)

    and the fold is ``sum over q of scale[k, q] * value[k, q]``: with the static
    validity this is :meth:`FoldMap.fold` (up to float32 rounding). A tap with zero
    weight (``fx == 0`` for the right taps, ``fy == 0`` for the lower ones) may lie
    past the frame's last column or row: clip or redirect it before gathering.

    Attributes
    ----------
    base : ndarray of int32, ``(n_fold, 4)``
        Flat frame index of each quadrant sample's top-left bilinear tap (clipped onto
        the frame for samples off the detector).
    fx, fy : ndarray of float32, ``(n_fold, 4)``
        Fractional column and row offsets of the sample from its top-left tap, in [0, 1).
    inside : ndarray of bool, ``(n_fold, 4)``
        Samples on the detector (every tap with weight is a pixel of the frame).
    footprint : ndarray of int8, ``(n_fold, 4)``
        Which taps carry weight: ``(fx > 0) + 2 * (fy > 0)`` (0: the top-left tap only,
        1: the top pair, 2: the left pair, 3: all four).
    scale : ndarray of float32, ``(n_fold, 4)``
        Weight of each sample in the quadrant mean for the map's static validity:
        ``1 / count`` for the samples that count (:meth:`FoldMap.sample_ok`), 0 for the
        others.
    """

    base: np.ndarray
    fx: np.ndarray
    fy: np.ndarray
    inside: np.ndarray
    footprint: np.ndarray
    scale: np.ndarray


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


class FoldMap:
    """Precomputed fold (and unfold) of frames of one shape, geometry and mask.

    Building the map does all the geometric work once. The first frame is folded by
    direct gathers of the bilinear taps (no matrix to build for a one-off fold); from
    the second frame (or the first batch) on, a sparse matrix built once serves, and a
    fold costs one sparse product per frame or batch.

    Parameters
    ----------
    shape : (int, int)
        Detector frame shape (rows, columns).
    geometry : Geometry
        Beam centre and rotation.
    mask : ndarray of bool, optional
        Static validity mask of the detector (True = valid); default all valid.
    edge : int, optional
        Pixels next to invalid pixels excluded as well (default 1: the edges of gaps).
    fold_shape : (int, int), optional
        Shape of the fold; by default large enough for every detector pixel.

    Attributes
    ----------
    count : ndarray of int8
        Number of valid quadrant samples per fold pixel for the static mask.
    usable : ndarray of bool
        The static mask after the ``edge`` erosion (:meth:`usable_from`).

    Notes
    -----
    Each quadrant sample is bilinearly interpolated from four detector pixels and
    counts only when all four are valid (after the ``edge`` erosion). A frame whose own
    mask invalidates more pixels than the static mask is folded through a slower path
    that recomputes the validity for that frame only. :meth:`taps` exposes the bilinear
    tap tables, :meth:`usable_from` and :meth:`sample_ok` the validity rule.
    """

    def __init__(self, shape, geometry: Geometry, mask=None, *, edge: int = 1, fold_shape=None):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 2:
            raise GeometryError(f"shape must be (rows, columns) of a 2-D frame, got {shape!r}")
        if not isinstance(geometry, Geometry):
            raise GeometryError(f"geometry must be a Geometry, got {type(geometry).__name__}")
        self.shape = shape
        self.geometry = geometry
        if mask is None:
            mask = np.ones(shape, bool)
        mask = np.asarray(mask, bool)
        if mask.shape != shape:
            raise GeometryError(f"mask has shape {mask.shape}, expected {shape}")
        self.edge = int(edge)
        self.mask = mask
        self.usable = self.usable_from(mask)
        self.fold_shape = tuple(fold_shape) if fold_shape is not None else fold_extent(shape, geometry)
        self._used = False
        self._build()

    # -- construction
    def _build(self):
        h, w = self.shape
        fh, fw = self.fold_shape
        n_fold = fh * fw
        cx, cy = self.geometry.center
        ex, ey = self.geometry.equator_vector
        mx, my = self.geometry.meridian_vector
        # float32 coordinates: 1e-4 px resolution at 2000 px, half the memory traffic.
        su = np.array([q[0] for q in _QUADRANT_SIGNS], np.float32)
        sv = np.array([q[1] for q in _QUADRANT_SIGNS], np.float32)
        jj = np.arange(fw, dtype=np.float32)[None, :, None]
        ii = np.arange(fh, dtype=np.float32)[:, None, None]
        # Arrays of shape (n_fold, 4 quadrants): the top-left bilinear tap (flat index)
        # and the fractional offsets; the other taps are base + 1, base + w, base + w + 1.
        x = ((ex * jj) * su + (mx * ii) * sv).reshape(n_fold, 4)
        x += np.float32(cx)
        y = ((ey * jj) * su + (my * ii) * sv).reshape(n_fold, 4)
        y += np.float32(cy)
        x0 = np.floor(x)
        y0 = np.floor(y)
        fx = np.subtract(x, x0, out=x)
        fy = np.subtract(y, y0, out=y)
        # On the detector; a sample exactly on the last row/column needs no neighbour.
        inside = (x0 >= 0) & (y0 >= 0) & ((x0 + 1 < w) | ((x0 < w) & (fx == 0)))
        inside &= (y0 + 1 < h) | ((y0 < h) & (fy == 0))
        base = np.clip(y0, 0, h - 1).astype(np.int32) * w + np.clip(x0, 0, w - 1).astype(np.int32)
        self._base, self._fx, self._fy, self._inside = base, fx, fy, inside
        # Which taps carry weight (fx > 0: the right ones, fy > 0: the lower ones).
        self._footprint = (fx > 0).astype(np.int8) + 2 * (fy > 0).astype(np.int8)
        ok = self.sample_ok(self.usable)
        count = np.count_nonzero(ok, axis=1)
        norm = np.where(count > 0, 1.0 / np.maximum(count, 1), 0.0).astype(np.float32)
        # Weight of each quadrant sample in the mean, 0 for samples that do not count.
        self._scale = ok * norm[:, None]
        self.count = count.astype(np.int8).reshape(self.fold_shape)
        self._matrix = None
        self._unfold_matrix = None

    def _build_matrix(self):
        """The sparse (n_fold, n_pixels) fold matrix: 16 taps per row, zeros dropped."""
        h, w = self.shape
        n_fold = self._base.shape[0]
        wx = np.stack([1 - self._fx, self._fx], axis=-1)
        wy = np.stack([1 - self._fy, self._fy], axis=-1)
        data = (wy[:, :, :, None] * wx[:, :, None, :] * self._scale[:, :, None, None]).reshape(n_fold, 4, 4)
        indices = self._base[:, :, None] + np.array([0, 1, w, w + 1], np.int32)
        np.minimum(indices, h * w - 1, out=indices)
        indptr = np.arange(0, 16 * n_fold + 1, 16, dtype=np.int32 if 16 * n_fold < 2**31 else np.int64)
        matrix = sparse.csr_matrix((data.ravel(), indices.ravel(), indptr), shape=(n_fold, h * w))
        matrix.eliminate_zeros()
        return matrix

    def _gather(self, flat: np.ndarray) -> np.ndarray:
        """Bilinear value of every quadrant sample of a raveled frame, (n_fold, 4)."""
        w = self.shape[1]
        # Pad so that base + w + 1 stays in range; a shifted view replaces "base + k".
        padded = np.concatenate([flat.astype(np.float32, copy=False), np.zeros(w + 1, np.float32)])
        base = self._base
        top = padded[base]
        top += self._fx * (padded[1:][base] - top)
        bottom = padded[w:][base]
        bottom += self._fx * (padded[w + 1 :][base] - bottom)
        top += self._fy * (bottom - top)
        return top

    def _apply(self, flat: np.ndarray) -> np.ndarray:
        """Fold raveled frame(s) (n_pixels,) or (n_pixels, n) with the static validity."""
        if self._matrix is None and (flat.ndim == 1 and not self._used):
            self._used = True
            return (self._gather(flat) * self._scale).sum(axis=1)
        if self._matrix is None:
            self._matrix = self._build_matrix()
        return self._matrix @ flat

    # -- folding
    def fold(self, data, mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Fold one frame (or a stack of frames) into the quadrant.

        Parameters
        ----------
        data : ndarray, shape ``self.shape`` or ``(n, *self.shape)``
            Frame(s) in counts.
        mask : ndarray of bool, optional
            The frame's own validity mask (same shape as one frame, or one per frame).
            Pixels invalid here but valid in the map's static mask are excluded with a
            per-frame validity pass. Default: NaN and negative pixels are invalid.

        Returns
        -------
        fold : ndarray of float32, shape ``fold_shape`` (or ``(n, *fold_shape)``)
            Mean of the valid quadrant samples; 0 where ``count == 0``.
        count : ndarray of int8, same shape
            Number of quadrant samples averaged per fold pixel.
        """
        data = np.asarray(data)
        if data.shape[-2:] != self.shape or data.ndim not in (2, 3):
            raise GeometryError(f"frame has shape {data.shape}, expected {self.shape} or (n, {self.shape[0]}, {self.shape[1]})")
        if data.ndim == 3:
            if mask is not None and np.ndim(mask) == 3:
                results = [self.fold(f, m) for f, m in zip(data, mask)]
                return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])
            frame_masks = None if mask is None else np.asarray(mask, bool)
            if frame_masks is None:
                frame_masks = np.isfinite(data) & (data >= 0)
                extra = ~frame_masks & self.usable
                if extra.any():
                    results = [self.fold(f, m) for f, m in zip(data, frame_masks)]
                    return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])
            elif (~frame_masks & self.usable).any():
                results = [self.fold(f, frame_masks) for f in data]
                return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])
            flat = data.reshape(data.shape[0], -1).astype(np.float32, copy=False)
            out = self._apply(flat.T).T.reshape((data.shape[0],) + self.fold_shape)
            return out.astype(np.float32, copy=False), np.broadcast_to(self.count, out.shape).copy()
        if mask is None:
            mask = np.isfinite(data) & (data >= 0)
        else:
            mask = np.asarray(mask, bool)
            if mask.shape != self.shape:
                raise GeometryError(f"mask has shape {mask.shape}, expected {self.shape}")
        extra_invalid = ~mask & self.usable
        flat = np.where(mask, data, 0).astype(np.float32, copy=False).ravel()
        if not extra_invalid.any():
            out = self._apply(flat)
            return out.reshape(self.fold_shape).astype(np.float32, copy=False), self.count.copy()
        return self._fold_masked(flat, extra_invalid)

    def usable_from(self, mask) -> np.ndarray:
        """Valid pixels that are not within ``edge`` pixels of an invalid one.

        ``mask`` (bool, ``self.shape``, True = valid) is the frame's validity, static
        mask included; the result is what :meth:`sample_ok` takes (``self.usable`` for
        the static mask). Borders of the frame count as valid.
        """
        mask = self._frame_bool(mask, "mask")
        if self.edge <= 0:
            return mask.copy()
        # Separable 3x3 minimum (= binary erosion, borders count as valid), faster than
        # ndimage.binary_erosion on detector-sized masks.
        size = 2 * self.edge + 1
        return ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)

    def sample_ok(self, usable) -> np.ndarray:
        """(n_fold, 4) bool: quadrant samples on the detector whose weighted taps are all usable.

        ``usable`` (bool, ``self.shape``) comes from :meth:`usable_from`. The samples
        that count for a frame's validity, in the layout of :class:`FoldTaps`; the
        fold's ``count`` is their number per fold pixel.
        """
        usable = self._frame_bool(usable, "usable")
        # One gather per sample: which taps carry weight depends on whether fx, fy are
        # zero, so look up the AND of the usable pixels over the matching footprint.
        right = np.zeros_like(usable)
        right[:, :-1] = usable[:, 1:]
        down = np.zeros_like(usable)
        down[:-1, :] = usable[1:, :]
        pair_x = usable & right
        pair_y = usable & down
        quad = pair_x.copy()
        quad[:-1, :] &= pair_x[1:, :]
        quad[-1, :] = False
        table = np.stack([usable.ravel(), pair_x.ravel(), pair_y.ravel(), quad.ravel()])
        return self._inside & table[self._footprint, self._base]

    def _frame_bool(self, a, name: str) -> np.ndarray:
        a = np.asarray(a, bool)
        if a.shape != self.shape:
            raise GeometryError(f"{name} has shape {a.shape}, expected {self.shape}")
        return a

    def taps(self) -> FoldTaps:
        """The fold's tap tables (read-only views of the map's own arrays, no copy).

        For implementations of the fold outside this class (the device path's 16-tap
        gather); see :class:`FoldTaps` for the layout and the arithmetic.
        """
        return FoldTaps(
            base=_read_only(self._base),
            fx=_read_only(self._fx),
            fy=_read_only(self._fy),
            inside=_read_only(self._inside),
            footprint=_read_only(self._footprint),
            scale=_read_only(self._scale),
        )

    def _fold_masked(self, flat, extra_invalid):
        ok = self.sample_ok(self.usable_from(self.mask & ~extra_invalid))
        values = self._gather(flat)
        count = ok.sum(axis=1)
        total = np.where(ok, values, 0).sum(axis=1, dtype=np.float64)
        out = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        return out.reshape(self.fold_shape).astype(np.float32), count.reshape(self.fold_shape).astype(np.int8)

    # -- unfolding
    def unfold(self, folded, count=None) -> tuple[np.ndarray, np.ndarray]:
        """Map a fold back onto the detector frame.

        Parameters
        ----------
        folded : ndarray, shape ``fold_shape``
            A fold (for example a background or a corrected fold).
        count : ndarray, optional
            Its per-pixel count; fold pixels with ``count == 0`` are not used
            (default: the map's static count).

        Returns
        -------
        image : ndarray of float32, shape ``self.shape``
            Bilinear interpolation of the fold at each detector pixel's (|v|, |u|);
            0 where no valid fold pixel is near.
        valid : ndarray of bool
            Detector pixels that received a value.
        """
        folded = np.asarray(folded)
        if folded.shape != self.fold_shape:
            raise GeometryError(f"fold has shape {folded.shape}, expected {self.fold_shape}")
        count = self.count if count is None else np.asarray(count)
        have = (count > 0).ravel().astype(np.float32)
        if self._unfold_matrix is None:
            self._unfold_matrix = self._build_unfold()
        m = self._unfold_matrix
        num = m @ (np.where(count > 0, folded, 0).astype(np.float32).ravel())
        den = m @ have
        valid = den > 0.5
        image = np.where(valid, num / np.where(valid, den, 1), 0).astype(np.float32)
        return image.reshape(self.shape), valid.reshape(self.shape)

    def _build_unfold(self):
        h, w = self.shape
        fh, fw = self.fold_shape
        cx, cy = self.geometry.center
        ex, ey = self.geometry.equator_vector
        mx, my = self.geometry.meridian_vector
        yy, xx = np.mgrid[0:h, 0:w]
        dx = xx.ravel() - cx
        dy = yy.ravel() - cy
        j = np.abs(dx * ex + dy * ey)
        i = np.abs(dx * mx + dy * my)
        i0 = np.floor(i).astype(np.int64)
        j0 = np.floor(j).astype(np.int64)
        fi = (i - i0).astype(np.float32)
        fj = (j - j0).astype(np.float32)
        ok_i = (i0 + 1 < fh) | ((i0 < fh) & (fi == 0))
        ok_j = (j0 + 1 < fw) | ((j0 < fw) & (fj == 0))
        i0 = np.clip(i0, 0, fh - 1)
        j0 = np.clip(j0, 0, fw - 1)
        i1 = np.minimum(i0 + 1, fh - 1)
        j1 = np.minimum(j0 + 1, fw - 1)
        on = (ok_i & ok_j).astype(np.float32)
        idx = np.stack([i0 * fw + j0, i0 * fw + j1, i1 * fw + j0, i1 * fw + j1], axis=1).astype(np.int32)
        wts = np.stack([(1 - fi) * (1 - fj), (1 - fi) * fj, fi * (1 - fj), fi * fj], axis=1) * on[:, None]
        matrix = sparse.csr_matrix(
            (wts.astype(np.float32).ravel(), idx.ravel(), np.arange(0, 4 * h * w + 1, 4)), shape=(h * w, fh * fw)
        )
        matrix.eliminate_zeros()
        return matrix


def fold(data, geometry: Geometry, mask=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Fold one frame into the quadrant (builds a :class:`FoldMap` for this call).

    For a stream of frames with one geometry, build a :class:`FoldMap` once instead.

    Returns
    -------
    fold : ndarray of float32
    count : ndarray of int8
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise GeometryError(f"expected a 2-D frame, got an array of shape {data.shape}")
    if mask is None:
        mask = np.isfinite(data) & (data >= 0)
    return FoldMap(data.shape, geometry, mask, **kwargs).fold(data, mask)


def unfold(folded, geometry: Geometry, shape, count=None) -> tuple[np.ndarray, np.ndarray]:
    """Map a fold back onto a detector frame of ``shape`` (see :meth:`FoldMap.unfold`)."""
    folded = np.asarray(folded)
    fm = FoldMap(shape, geometry, None, edge=0, fold_shape=folded.shape)
    return fm.unfold(folded, count)
