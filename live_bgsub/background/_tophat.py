"""White top-hat background: the grey opening of the fold by a flat disk."""

from __future__ import annotations

import math

import numpy as np

from ._common import check_real, finish_background, prepare_fold

__all__ = ["white_top_hat", "disk_opening", "check_tophat_params"]


def _chord_half_widths(radius):
    """Half-width ``w(dy)`` of the disk ``dx**2 + dy**2 <= radius**2`` for each row offset."""
    reach = int(math.floor(radius))
    dys = np.arange(-reach, reach + 1)
    r2 = radius * radius
    # Largest integer w with w**2 <= r2 - dy**2 (sqrt corrected for rounding).
    widths = np.floor(np.sqrt(np.maximum(r2 - dys * dys, 0.0))).astype(np.int64)
    widths = np.where((widths + 1) ** 2 <= r2 - dys * dys, widths + 1, widths)
    widths = np.where(widths * widths > r2 - dys * dys, widths - 1, widths)
    return dys, widths


def _disk_extremum(image, radius, *, erode):
    """Erosion (min) or dilation (max) of ``image`` by the flat disk of ``radius``.

    Pixels outside the image are ignored (treated as +inf for the erosion, -inf for
    the dilation), which for a disk equals replicating the border.

    Exact algorithm (chord decomposition, Urbach & Wilkinson 2008): the disk is the
    union of horizontal chords of half-width ``w(dy)``. A sparse table of running
    minima over ``2**k`` columns answers every chord minimum with two array lookups;
    the result is the minimum over the ``2 r + 1`` vertically shifted chord images.
    """
    op = np.minimum if erode else np.maximum
    fill = np.inf if erode else -np.inf
    h, w = image.shape
    dys, widths = _chord_half_widths(radius)
    reach = int(widths.max())
    padded = np.full((h, w + 2 * reach), fill, dtype=image.dtype)
    padded[:, reach:reach + w] = image

    # Sparse table: level k holds, at column c, the extremum of padded[:, c:c + 2**k].
    levels = [padded]
    longest = 2 * reach + 1
    k = 1
    while (1 << k) <= longest:
        prev = levels[-1]
        step = 1 << (k - 1)
        levels.append(op(prev[:, :-step], prev[:, step:]))
        k += 1

    out = np.full((h, w), fill, dtype=image.dtype)
    chord = np.empty((h, w), dtype=image.dtype)
    for half in np.unique(widths):
        length = 2 * int(half) + 1
        level = length.bit_length() - 1
        table = levels[level]
        start = reach - int(half)
        stop = reach + int(half) - (1 << level) + 1
        op(table[:, start:start + w], table[:, stop:stop + w], out=chord)
        for dy in dys[widths == half]:
            dy = int(dy)
            r0, r1 = max(0, -dy), min(h, h - dy)
            if r0 >= r1:
                continue
            op(out[r0:r1], chord[r0 + dy:r1 + dy], out=out[r0:r1])
    return out


def disk_opening(image, radius, valid=None):
    """Exact grey opening of ``image`` by the flat disk ``dx**2 + dy**2 <= radius**2``.

    Invalid pixels (``valid`` False) are +inf for the erosion, so they never pull the
    minimum down; pixels outside the image are ignored. The value returned at
    invalid pixels is not meaningful.
    """
    work = np.array(image, copy=True)
    if valid is not None:
        work[~valid] = np.inf
    if radius < 1.0:
        return np.where(np.isfinite(work), work, 0).astype(image.dtype, copy=False)
    eroded = _disk_extremum(work, radius, erode=True)
    return _disk_extremum(eroded, radius, erode=False)


def check_tophat_params(*, tophat):
    """Validate the white top-hat parameters; return them as floats."""
    return {"tophat": check_real("tophat", tophat, minimum=0.0, exclusive=True,
                                 unit="(disk radius, px)")}


def white_top_hat(fold, mask=None, *, tophat=100.0):
    """Background of a fold by the white top-hat: the grey opening with a disk.

    The opening removes every bright feature into which the disk does not fit and
    keeps the slowly varying background; ``fold - background`` is the white top-hat.

    Parameters
    ----------
    fold : (M, N) array_like
        Quadrant-folded image, beam centre at index ``[0, 0]``, axis 1 along the
        equator, axis 0 along the meridian. Integer input is processed as float32.
    mask : (M, N) array_like of bool, optional
        True where the pixel is valid. None means every finite pixel is valid.
        Invalid pixels are treated as +inf by the erosion, so they never pull the
        minimum down and never influence the result at valid pixels.
    tophat : float, optional
        Radius of the flat disk ``dx**2 + dy**2 <= tophat**2``, in full-resolution
        pixels (> 0). Default 100, MuscleX's default of 50 in its 2x-downsampled
        pixels. A radius below 1 is a single pixel (background = fold).

    Returns
    -------
    background : (M, N) ndarray
        Same shape and floating dtype as ``fold`` (float32 for integer input);
        0 at invalid pixels.

    Notes
    -----
    The opening is exact for the disk (no polygon or line approximation): the disk
    is decomposed into its ``2 r + 1`` horizontal chords; a sparse table of running
    minima over power-of-two column spans (``log2(2 r + 1)`` array passes) gives each
    chord's minimum in two lookups, and the erosion is the minimum of the vertically
    shifted chord images [1]_; it equals ``scipy.ndimage.grey_erosion`` /
    ``grey_dilation`` with the disk footprint bit for bit. Cost: ``O(M N r)`` simple
    array operations (about ``2 (2 r + 1) + 2 sqrt(2) r`` whole-array minima or
    maxima), about 6 ms for a 285 x 275 float32 fold with r = 50 and 40 ms for
    570 x 550 with r = 100, against seconds for ``scipy.ndimage.grey_opening`` with a
    disk footprint. Memory: ``log2(2 r + 1)`` copies of the fold.

    Pixels outside the fold are ignored, which for a disk is the same as MuscleX's
    replicated border. MuscleX (``applyWhiteTophat``) uses OpenCV's elliptic kernel
    of size ``2 r + 1``, whose rim differs from the Euclidean disk by about one pixel
    on some rows; the disk here is the one of ``skimage.morphology.disk``.

    References
    ----------
    .. [1] E. R. Urbach and M. H. F. Wilkinson, "Efficient 2-D grayscale
       morphological transformations with arbitrary flat structuring elements",
       IEEE Trans. Image Process. 17(1), 1-8 (2008).
    .. [2] J. Serra, Image Analysis and Mathematical Morphology, Academic Press (1982).
    .. [3] J. Jiratrakanvong et al., "MuscleX: data analysis software for fiber
       diffraction patterns from muscle", J. Synchrotron Rad. 31 (2024),
       doi:10.1107/S1600577524006167.

    Examples
    --------
    >>> import numpy as np
    >>> from live_bgsub.background import white_top_hat
    >>> fold = np.full((64, 64), 3.0, dtype=np.float32)
    >>> fold[20, 30] = 50.0                       # a one-pixel peak
    >>> background = white_top_hat(fold, tophat=5)
    >>> background.dtype, float(background[20, 30])
    (dtype('float32'), 3.0)
    """
    radius = check_tophat_params(tophat=tophat)["tophat"]
    data, valid, out_dtype = prepare_fold(fold, mask)
    if not valid.any():
        return np.zeros(data.shape, dtype=out_dtype)
    background = disk_opening(data, radius, valid)
    return finish_background(background, valid, out_dtype)
