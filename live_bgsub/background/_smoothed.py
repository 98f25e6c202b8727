"""Iterative low-pass background (Ivanova & Makowski): B <- min(B, smooth(B)), repeated."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._common import check_int, check_real, finish_background, prepare_fold

__all__ = ["smoothed_gaussian", "smoothed_boxcar", "SeparableFilter", "gaussian_kernel",
           "boxcar_kernel", "check_gaussian_params", "check_boxcar_params"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548...

# A pixel is lowered only when the smoothed value is below it by more than this many
# float epsilons (relative): rounding noise of the filter never counts as a change.
_REL_TOL_EPS = 8.0


def gaussian_kernel(fwhm, truncate=4.0):
    """Normalised 1-D Gaussian of full width at half maximum ``fwhm`` (px)."""
    sigma = fwhm / FWHM_PER_SIGMA
    reach = int(truncate * sigma + 0.5)
    if reach == 0:
        return np.ones(1)
    x = np.arange(-reach, reach + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def boxcar_kernel(width):
    """Normalised, centred 1-D box of ``width`` px sampled on pixels.

    Tap ``k`` weighs the overlap of the pixel ``[k - 1/2, k + 1/2]`` with the box
    ``[-width/2, width/2]``: an odd integer width gives ``width`` equal taps, an even
    one ``width + 1`` taps with half-weight ends (no half-pixel shift), and a real
    width (from a downsampled call) fractional end taps.
    """
    half = width / 2.0
    reach = int(math.floor(half + 0.5))
    k = np.arange(-reach, reach + 1, dtype=np.float64)
    overlap = np.clip(np.minimum(k + 0.5, half) - np.maximum(k - 0.5, -half), 0.0, 1.0)
    overlap = overlap[overlap > 0] if overlap.size > 1 else overlap
    return overlap / overlap.sum()


def _mirror_indices(positions, size):
    """Whole-sample symmetric (mirror) indices: -i -> i, size - 1 + i -> size - 1 - i."""
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    p = np.mod(positions, period)
    return np.where(p > size - 1, period - p, p)


class SeparableFilter:
    """Separable correlation with mirror boundaries by batched banded matrix products.

    ``SeparableFilter(shape, k0, k1, dtype)(image)`` correlates ``image`` with
    ``k0`` along axis 0 and ``k1`` along axis 1 (odd-length kernels) and mirror
    (whole-sample symmetric) boundaries, the boundary of scipy.ndimage's ``mode=
    'mirror'``; the result equals ``scipy.ndimage.correlate1d`` applied twice to
    rounding. Each axis is cut into blocks of ``b`` output lines; every block is one
    product of a ``b x (b + 2 R)`` Toeplitz matrix with the ``b + 2 R`` input lines it
    needs (a strided view of a padded buffer, no copy), all blocks in one batched
    ``numpy.matmul``. This runs at BLAS speed: about 4x faster than
    ``scipy.ndimage.gaussian_filter`` for 20-tap kernels on a 285 x 275 float32
    image. Buffers are allocated once, so a filter object is meant to be reused;
    the returned array may be a view of an internal buffer, valid until the next
    call.
    """

    def __init__(self, shape, k0, k1, dtype=np.float32):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        h, w = self.shape
        self._axis0 = self._plan(np.asarray(k0, dtype=np.float64), h)
        self._axis1 = self._plan(np.asarray(k1, dtype=np.float64), w, transpose=True)
        it = self.dtype.itemsize
        if self._axis0 is not None:
            reach, block, n_blocks, _, _ = self._axis0
            self._pad0 = np.zeros((n_blocks * block + 2 * reach, w), dtype=self.dtype)
            self._view0 = as_strided(self._pad0, (n_blocks, block + 2 * reach, w),
                                     (block * w * it, w * it, it), writeable=False)
            self._out0 = np.empty((n_blocks, block, w), dtype=self.dtype)
        if self._axis1 is not None:
            reach, block, n_blocks, _, _ = self._axis1
            width = n_blocks * block + 2 * reach
            self._pad1 = np.zeros((h, width), dtype=self.dtype)
            self._view1 = as_strided(self._pad1, (n_blocks, h, block + 2 * reach),
                                     (block * it, width * it, it), writeable=False)
            self._out1 = np.empty((n_blocks, h, block), dtype=self.dtype)

    def _plan(self, kernel, size, transpose=False):
        if kernel.ndim != 1 or kernel.size % 2 == 0:
            raise ValueError(f"kernel must be 1-D with an odd length, got shape {kernel.shape}")
        reach = (kernel.size - 1) // 2
        if reach == 0 and kernel[0] == 1.0:
            return None
        block = int(min(size, 16 if reach < 16 else 32))  # measured sweet spots
        n_blocks = -(-size // block)
        toeplitz = np.zeros((block, block + 2 * reach))
        for r in range(block):
            toeplitz[r, r:r + kernel.size] = kernel
        low = _mirror_indices(np.arange(-reach, 0), size)
        high = _mirror_indices(np.arange(size, size + reach), size)
        if transpose:
            toeplitz = toeplitz.T
        toeplitz = np.ascontiguousarray(toeplitz, dtype=self.dtype)
        return reach, block, n_blocks, toeplitz, (low, high)

    def __call__(self, image):
        h, w = self.shape
        out = image
        # Axis 1 first: its blocked result is scattered back to row order while being
        # copied into the axis-0 buffer, so no separate transpose copy is needed.
        if self._axis1 is not None:
            reach, block, n_blocks, toeplitz_t, (low, high) = self._axis1
            pad = self._pad1
            pad[:, reach:reach + w] = out
            if reach:
                pad[:, :reach] = out[:, low]
                pad[:, reach + w:2 * reach + w] = out[:, high]
            np.matmul(self._view1, toeplitz_t, out=self._out1)
            out = self._out1.transpose(1, 0, 2).reshape(h, n_blocks * block)[:, :w]
        if self._axis0 is not None:
            reach, block, n_blocks, toeplitz, (low, high) = self._axis0
            pad = self._pad0
            pad[reach:reach + h] = out
            if reach:
                pad[:reach] = pad[reach + low]
                pad[reach + h:2 * reach + h] = pad[reach + high]
            np.matmul(toeplitz, self._view0, out=self._out0)
            out = self._out0.reshape(n_blocks * block, w)[:h]
        if out is image:
            out = image.copy()
        return out


def iterate_low_pass(data, valid, k0, k1, cycles):
    """Run ``B <- min(B, smooth(B))`` up to ``cycles`` times; stop when nothing changes.

    ``smooth`` is the normalised convolution ``K * (B m) / K * m`` over the valid
    pixels ``m``. Returns the background and the number of cycles that changed it.
    """
    background = data.copy()
    filt = SeparableFilter(data.shape, k0, k1, data.dtype)
    masked = not valid.all()
    if masked:
        weight = filt(valid.astype(data.dtype))
        inv_weight = np.zeros(data.shape, dtype=data.dtype)
        np.divide(1.0, weight, out=inv_weight, where=valid)
    rel = _REL_TOL_EPS * np.finfo(data.dtype).eps
    # Non-negative data stay non-negative (a normalised convolution with positive
    # weights), so the tolerance threshold B - rel |B| is one multiplication.
    non_negative = bool(background.min() >= 0)
    threshold = np.empty_like(background)
    lower = np.empty(data.shape, dtype=bool)
    done = 0
    for _ in range(cycles):
        smoothed = filt(background)
        if masked:
            smoothed *= inv_weight
        if non_negative:
            np.multiply(background, 1.0 - rel, out=threshold)
        else:
            np.abs(background, out=threshold)
            threshold *= -rel
            threshold += background
        if not np.less(smoothed, threshold, out=lower).any():
            break
        np.minimum(background, smoothed, out=background)
        done += 1
    return background, done


def check_gaussian_params(*, fwhm, cycles):
    """Validate the smoothed-Gaussian parameters."""
    return {
        "fwhm": check_real("fwhm", fwhm, minimum=0.0, unit="(px, full width at half maximum)"),
        "cycles": check_int("cycles", cycles, minimum=0),
    }


def check_boxcar_params(*, boxcar_x, boxcar_y, cycles):
    """Validate the smoothed-boxcar parameters."""
    return {
        "boxcar_x": check_real("boxcar_x", boxcar_x, minimum=0.0, exclusive=True,
                               unit="(px, box width)"),
        "boxcar_y": check_real("boxcar_y", boxcar_y, minimum=0.0, exclusive=True,
                               unit="(px, box width)"),
        "cycles": check_int("cycles", cycles, minimum=0),
    }


def smoothed_gaussian(fold, mask=None, *, fwhm=12.25, cycles=250):
    """Iterative low-pass background with a Gaussian kernel (Ivanova & Makowski 1998).

    Repeats ``B <- min(B, G * B)`` ``cycles`` times (or until nothing changes),
    starting from ``B = fold``, with ``G`` a Gaussian of full width at half maximum
    ``fwhm``.

    Parameters
    ----------
    fold : (M, N) array_like
        Quadrant-folded image, beam centre at index ``[0, 0]``; integer input is
        processed as float32 (float32 input is processed in float32).
    mask : (M, N) array_like of bool, optional
        True where the pixel is valid (None: every finite pixel). Invalid pixels get
        zero weight in the smoothing.
    fwhm : float, optional
        True full width at half maximum of the Gaussian, in full-resolution pixels
        (>= 0; ``sigma = fwhm / 2.3548``, kernel truncated at 4 sigma). Default
        12.25: the width MuscleX's default actually applies (see Notes).
    cycles : int, optional
        Maximum number of cycles (>= 0). Default 250 (MuscleX's default).

    Returns
    -------
    background : (M, N) ndarray
        Same shape and floating dtype as ``fold``; 0 at invalid pixels.

    Notes
    -----
    Fix of a MuscleX defect: MuscleX's "fwhm" (default 15, in downsampled pixels) is
    passed to OpenCV as the kernel *size* with sigma 0, so the Gaussian actually used
    has ``sigma = 0.3 ((15 - 1) / 2 - 1) + 0.8 = 2.6`` downsampled pixels, a true
    FWHM of 6.12 downsampled = 12.25 full-resolution pixels. Here ``fwhm`` is the
    true FWHM, and its default reproduces MuscleX's default smoothing.
    Each cycle replaces every pixel by the smaller of itself and its smoothed value,
    so peaks narrower than the kernel are eroded step by step while a background
    that is convex at the kernel's scale is left unchanged. The smoothing is a
    normalised convolution over the valid pixels (invalid pixels carry zero weight)
    with mirror boundaries, which is the fold's own symmetry at the equator and
    meridian and OpenCV's default border (used by MuscleX) at the outer edges.
    Iteration stops early when no pixel would be lowered by more than 8 float
    epsilons (relative): that is "nothing changes" up to the filter's rounding.
    Cost: ``cycles`` separable Gaussian smoothings done as batched banded matrix
    products (see :class:`SeparableFilter`), float32 for float32 input. About 60 ms
    for 250 cycles on a 285 x 275 float32 fold and 0.3 s on 570 x 550 (2 cores),
    against 0.13 s (downsampled) and 0.66 s for MuscleX on the unfolded image.

    References
    ----------
    .. [1] M. I. Ivanova and L. Makowski, "Iterative low-pass filtering for
       estimation of the background in fiber diffraction patterns",
       Acta Cryst. A54, 626-631 (1998).
    .. [2] H. Knutsson and C.-F. Westin, "Normalized and differential convolution",
       Proc. IEEE CVPR, 515-523 (1993).
    .. [3] J. Jiratrakanvong et al., "MuscleX: data analysis software for fiber
       diffraction patterns from muscle", J. Synchrotron Rad. 31 (2024),
       doi:10.1107/S1600577524006167.

    Examples
    --------
    >>> import numpy as np
    >>> from live_bgsub.background import smoothed_gaussian
    >>> fold = np.full((60, 70), 4.0)
    >>> fold[30, 35] = 100.0
    >>> background = smoothed_gaussian(fold, fwhm=6, cycles=100)
    >>> background.dtype, bool(background[30, 35] < 5.0)
    (dtype('float64'), True)
    """
    p = check_gaussian_params(fwhm=fwhm, cycles=cycles)
    fwhm, cycles = p["fwhm"], p["cycles"]
    data, valid, out_dtype = prepare_fold(fold, mask)
    kernel = gaussian_kernel(fwhm)
    background, _ = iterate_low_pass(data, valid, kernel, kernel, cycles)
    return finish_background(background, valid, out_dtype)


def smoothed_boxcar(fold, mask=None, *, boxcar_x=30, boxcar_y=30, cycles=250):
    """Iterative low-pass background with a boxcar kernel (Ivanova & Makowski 1998).

    Repeats ``B <- min(B, box * B)`` ``cycles`` times (or until nothing changes),
    starting from ``B = fold``, with a ``boxcar_x`` x ``boxcar_y`` moving average.

    Parameters
    ----------
    fold : (M, N) array_like
        Quadrant-folded image, beam centre at index ``[0, 0]``; integer input is
        processed as float32 (float32 input is processed in float32).
    mask : (M, N) array_like of bool, optional
        True where the pixel is valid (None: every finite pixel). Invalid pixels get
        zero weight in the smoothing.
    boxcar_x, boxcar_y : int, optional
        Full width of the box along x (columns, equator) and y (rows, meridian), in
        full-resolution pixels (> 0). The box is centred: an even width has
        half-weight end taps, a real width (from a downsampled call) fractional
        ones. Default 30 each (MuscleX: 15 downsampled pixels).
    cycles : int, optional
        Maximum number of cycles (>= 0). Default 250 (MuscleX's default).

    Returns
    -------
    background : (M, N) ndarray
        Same shape and floating dtype as ``fold``; 0 at invalid pixels.

    Notes
    -----
    MuscleX builds its kernel as ``numpy.ones((boxcar_x, boxcar_y))``, i.e. with
    ``boxcar_x`` *rows*; here ``boxcar_x`` is the width along x as its name says
    (identical for the default square box). OpenCV anchors an even box half a pixel
    off centre; here even boxes are centred.
    Each cycle replaces every pixel by the smaller of itself and its smoothed value,
    so peaks narrower than the kernel are eroded step by step while a background
    that is convex at the kernel's scale is left unchanged. The smoothing is a
    normalised convolution over the valid pixels (invalid pixels carry zero weight)
    with mirror boundaries, which is the fold's own symmetry at the equator and
    meridian and OpenCV's default border (used by MuscleX) at the outer edges.
    Iteration stops early when no pixel would be lowered by more than 8 float
    epsilons (relative): that is "nothing changes" up to the filter's rounding.
    Cost: ``cycles`` separable box smoothings done as batched banded matrix products
    (see :class:`SeparableFilter`). About 50 ms for 250 cycles on a 285 x 275
    float32 fold (15 x 15 box) and 0.3 s on 570 x 550 (30 x 30), against 0.55 s
    (downsampled) and 1.75 s for MuscleX on the unfolded image.

    References
    ----------
    .. [1] M. I. Ivanova and L. Makowski, "Iterative low-pass filtering for
       estimation of the background in fiber diffraction patterns",
       Acta Cryst. A54, 626-631 (1998).
    .. [2] J. Jiratrakanvong et al., "MuscleX: data analysis software for fiber
       diffraction patterns from muscle", J. Synchrotron Rad. 31 (2024),
       doi:10.1107/S1600577524006167.

    Examples
    --------
    >>> import numpy as np
    >>> from live_bgsub.background import smoothed_boxcar
    >>> fold = np.full((60, 70), 4.0, dtype=np.float32)
    >>> fold[30, 35] = 100.0
    >>> background = smoothed_boxcar(fold, boxcar_x=7, boxcar_y=7, cycles=100)
    >>> background.dtype, bool(background[30, 35] < 5.0)
    (dtype('float32'), True)
    """
    p = check_boxcar_params(boxcar_x=boxcar_x, boxcar_y=boxcar_y, cycles=cycles)
    width_x, width_y, cycles = p["boxcar_x"], p["boxcar_y"], p["cycles"]
    data, valid, out_dtype = prepare_fold(fold, mask)
    background, _ = iterate_low_pass(
        data, valid, boxcar_kernel(width_y), boxcar_kernel(width_x), cycles,
    )
    return finish_background(background, valid, out_dtype)

