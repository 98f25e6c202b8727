"""Folds to model tensors and back (numpy), shared by training and inference.

:func:`prepare` masks, normalises and pads folds into the channels-last tensors of the
U-Net (``docs/model.md``); :func:`restore` crops the model's outputs back to the folds'
shape and scale.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NORMALIZATIONS", "ROBUST_OFFSET_PERCENTILE", "cap_isolated", "padded_shape", "prepare", "restore", "robust_levels"]

#: ``"unified"``: input and target divided by the input's maximum (paper, Table 1);
#: ``"independent"``: each divided by its own maximum (Tables 2-3); ``"robust"``: like
#: ``"unified"`` (one scale, detector units back) but the input's floor is taken off
#: first and a pixel above all its neighbours cannot set the scale (:func:`robust_levels`):
#: a CCD's bias level and a single hot pixel leave the network's input as it was.
NORMALIZATIONS = ("unified", "independent", "robust")

#: Percentile of a fold's valid pixels taken as its floor by ``"robust"`` normalisation.
ROBUST_OFFSET_PERCENTILE = 1.0


def padded_shape(shape, depth: int = 4) -> tuple[int, int]:
    """``(rows, cols)`` rounded up to multiples of ``2**depth``."""
    m = 2 ** int(depth)
    return tuple(-(-int(n) // m) * m for n in shape)


def _stack(arrays, what):
    arr = np.asarray(arrays)
    if arr.ndim == 2:
        return arr[None], False
    if arr.ndim == 3:
        return arr, True
    raise ValueError(f"{what} must be one 2-D fold or a 3-D batch of folds, got shape {arr.shape}")


def _max_scale(values):
    """Per-fold maximum of ``(n, rows, cols)`` values; 1 where it is not positive."""
    if values.size == 0:
        return np.ones(len(values))
    peak = values.reshape(len(values), -1).max(axis=1)
    return np.where(peak > 0, peak, 1.0).astype(np.float64)


def cap_isolated(image, valid):
    """Each valid pixel capped at the largest of its valid 8-neighbours (numpy).

    A hot pixel (or any pixel above every neighbour) is brought down to its highest
    neighbour; a reflection, spread over several pixels, loses at most the excess of
    its top pixel over the next. A valid pixel without a valid neighbour is kept.

    Parameters
    ----------
    image : ndarray, ``(n, rows, cols)``
    valid : ndarray of bool, same shape

    Returns
    -------
    ndarray of float64, same shape; 0 at invalid pixels.

    Examples
    --------
    >>> img = np.zeros((1, 3, 4)); img[0, 1, 1] = 1000.0; img[0, 1, 2] = 5.0
    >>> cap_isolated(img, np.ones(img.shape, bool))[0, 1, 1:3]
    array([5., 5.])
    """
    image = np.asarray(image, np.float64)
    padded = np.pad(np.where(valid, image, -np.inf), ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    rows, cols = image.shape[1:]
    neighbours = np.full(image.shape, -np.inf)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            if di != 1 or dj != 1:
                np.maximum(neighbours, padded[:, di : di + rows, dj : dj + cols], out=neighbours)
    capped = np.where(np.isfinite(neighbours), np.minimum(image, neighbours), image)
    return np.where(valid, capped, 0.0)


def robust_levels(image, valid):
    """Floor, capped image and scale of ``"robust"`` normalisation (numpy, per fold).

    The floor is the :data:`ROBUST_OFFSET_PERCENTILE` percentile of the valid pixels (a
    CCD's bias plus the lowest background; about 0 on a photon-counting frame); the
    image less the floor is capped by :func:`cap_isolated`, and the scale is the capped
    image's maximum (1 where it is not positive).

    Returns
    -------
    offset : ndarray ``(n,)``, capped : ndarray ``(n, rows, cols)``, scale : ndarray ``(n,)``
    """
    n = len(image)
    offset = np.zeros(n)
    for k in range(n):
        if valid[k].any():
            offset[k] = np.percentile(image[k][valid[k]], ROBUST_OFFSET_PERCENTILE)
    capped = cap_isolated(image - offset[:, None, None], valid)
    return offset, capped, _max_scale(capped)


def prepare(folds, masks=None, *, depth: int = 4, normalization: str = "unified", targets=None, mask_channel: bool = False):
    """Normalise, mask and pad folds into model input (and training target) tensors.

    Parameters
    ----------
    folds : array_like
        One fold ``(rows, cols)`` or a batch ``(n, rows, cols)``; beam centre at ``[0, 0]``.
    masks : array_like of bool, optional
        True where a fold pixel is valid (``count > 0``), same shape as ``folds``.
        Non-finite pixels are invalid too. Default: every finite pixel.
    depth : int, optional
        U-Net depth: rows and cols are padded to multiples of ``2**depth`` (default 4).
    normalization : {"unified", "independent", "robust"}, optional
        ``"unified"``: input and target divided by the input's maximum over valid
        pixels (per fold); ``"independent"``: each divided by its own maximum. A fold
        whose maximum is not positive keeps scale 1. ``"robust"``: the input less its
        floor, capped by :func:`cap_isolated`, over the capped maximum
        (:func:`robust_levels`); the target less what the cap took off, over the same
        scale (the background, input minus target, is unchanged by the cap).
    targets : array_like, optional
        Training targets (background-corrected folds), same shape as ``folds``.
    mask_channel : bool, optional
        Append the validity mask (1 valid, 0 invalid or padding) to ``y`` as a third
        channel, which :class:`BackgroundLoss` then confines itself to (default False).

    Returns
    -------
    x : ndarray, float32, ``(n, R, C, 1)``
        Model input; ``R, C`` multiples of ``2**depth``. Invalid pixels are 0; the
        padding (rows ``>= rows``, cols ``>= cols``: the far edges, away from the beam
        centre at ``[0, 0]``) is 0.
    y : ndarray, float32, ``(n, R, C, 2)``, or None
        ``[target, input]`` channels as :class:`BackgroundLoss` expects (None without
        ``targets``); ``[target, input, valid]``, ``(n, R, C, 3)``, with
        ``mask_channel``. Invalid and padded target pixels are 0.
    info : dict
        What :func:`restore` needs: ``shape`` (original ``(rows, cols)``), ``padded``
        (``(R, C)``), ``batched`` (input was 3-D), ``dtype`` (output dtype: the fold's
        floating dtype, float32 for integers), ``normalization``, ``depth``,
        ``input_scale`` and ``target_scale`` (per-fold divisors, float64 ``(n,)``;
        ``target_scale`` is None without targets), ``masks`` (bool ``(n, rows, cols)``),
        ``input_offset`` (the floor, ``(n,)``; 0 but for ``"robust"``) and ``excess``
        (what the cap took off, ``(n, rows, cols)``, or None but for ``"robust"``).

    Examples
    --------
    >>> x, y, info = prepare(np.ones((37, 50)), depth=4)
    >>> x.shape, info["shape"]
    ((1, 48, 64, 1), (37, 50))
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    folds_arr, batched = _stack(folds, "folds")
    dtype = folds_arr.dtype if np.issubdtype(folds_arr.dtype, np.floating) else np.dtype(np.float32)
    _, rows, cols = folds_arr.shape
    valid = np.isfinite(folds_arr)
    if masks is not None:
        masks_arr = np.asarray(masks, dtype=bool)
        if masks_arr.shape != np.shape(folds):
            raise ValueError(f"masks have shape {masks_arr.shape}, expected the folds' shape {np.shape(folds)}")
        valid &= masks_arr.reshape(folds_arr.shape)
    image = np.where(valid, folds_arr, 0).astype(np.float64)
    offset, excess = np.zeros(len(image)), None
    if normalization == "robust":
        offset, capped, input_scale = robust_levels(image, valid)
        excess = np.where(valid, image - offset[:, None, None] - capped, 0.0)
        image = capped
    else:
        input_scale = _max_scale(image)
    big_r, big_c = padded_shape((rows, cols), depth)
    pad = ((0, 0), (0, big_r - rows), (0, big_c - cols))
    x = np.pad(image / input_scale[:, None, None], pad).astype(np.float32)[..., None]

    y = None
    target_scale = None
    if targets is not None:
        targets_arr = np.asarray(targets)
        if targets_arr.shape != np.shape(folds):
            raise ValueError(f"targets have shape {targets_arr.shape}, expected the folds' shape {np.shape(folds)}")
        targets_arr = targets_arr.reshape(folds_arr.shape)
        target = np.where(valid & np.isfinite(targets_arr), targets_arr, 0).astype(np.float64)
        if excess is not None:
            target = np.where(valid, target - excess, 0.0)
        target_scale = _max_scale(target) if normalization == "independent" else input_scale
        t = np.pad(target / target_scale[:, None, None], pad).astype(np.float32)[..., None]
        channels = [t, x]
        if mask_channel:
            channels.append(np.pad(valid, pad).astype(np.float32)[..., None])
        y = np.concatenate(channels, axis=-1)

    info = {
        "shape": (rows, cols),
        "padded": (big_r, big_c),
        "batched": batched,
        "dtype": dtype,
        "normalization": normalization,
        "depth": int(depth),
        "input_scale": input_scale,
        "target_scale": target_scale,
        "masks": valid,
        "input_offset": offset,
        "excess": excess,
    }
    return x, y, info


def restore(outputs, info):
    """Crop model outputs back to the folds' shape and scale; invalid pixels set to 0.

    Parameters
    ----------
    outputs : array_like
        Model outputs ``(n, R, C, 1)`` or ``(n, R, C)`` for the folds :func:`prepare`
        made (the corrected folds, or the predicted backgrounds: both scale alike).
    info : dict
        The ``info`` returned by :func:`prepare`.

    Returns
    -------
    ndarray
        ``(rows, cols)`` or ``(n, rows, cols)`` (as the folds given to :func:`prepare`),
        in the folds' dtype. For ``"unified"`` normalisation in detector units (outputs
        times the input's maximum); for ``"robust"`` the outputs (corrected folds) times
        the scale plus what the cap took off, so that ``fold - restore(...)`` is the
        background of the whole fold. For ``"independent"`` the model's output is in units
        of the target's own maximum: ``restore`` multiplies by ``info["target_scale"]``
        when :func:`prepare` had targets (evaluation) and raises otherwise, since at
        inference that maximum is unknown.

    Examples
    --------
    >>> fold = np.arange(12.0).reshape(3, 4)
    >>> x, _, info = prepare(fold, depth=2)
    >>> np.allclose(restore(x, info), fold, rtol=1e-6)
    True
    """
    out = np.asarray(outputs)
    if out.ndim == 4:
        if out.shape[-1] != 1:
            raise ValueError(f"outputs must have one channel, got shape {out.shape}")
        out = out[..., 0]
    n = len(info["input_scale"])
    rows, cols = info["shape"]
    if out.ndim != 3 or out.shape[0] != n or out.shape[1] < rows or out.shape[2] < cols:
        raise ValueError(
            f"outputs have shape {np.shape(outputs)}, expected ({n}, >= {rows}, >= {cols}[, 1]) "
            "for the folds that prepare() made"
        )
    if info["normalization"] in ("unified", "robust"):
        scale = info["input_scale"]
    elif info["target_scale"] is not None:
        scale = info["target_scale"]
    else:
        raise ValueError(
            "an 'independent' model's output is in units of the target's own maximum, unknown at "
            "inference: restore() gives detector units only for 'unified' or 'robust' normalisation "
            "(or for 'independent' with the targets given to prepare())"
        )
    out = out[:, :rows, :cols].astype(np.float64) * scale[:, None, None]
    if info.get("excess") is not None:
        out = out + info["excess"]
    out = np.where(info["masks"], out, 0).astype(info["dtype"])
    return out if info["batched"] else out[0]
