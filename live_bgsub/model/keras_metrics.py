"""Keras metrics of the background U-Net: MAE, PSNR and SSIM, whole fold or centre ROI.

Pure ``keras.ops`` (any Keras 3 backend), matching the numpy reference
:mod:`live_bgsub.metrics` (``mae``, ``psnr``, ``ssim`` and ``center_roi``). Each metric
reads channel 0 of ``y_true`` (the target; ``docs/model.md``: ``y_true`` is
``[target, input]``) and compares it with ``y_pred`` (the corrected fold), computes one
value per fold and reports the mean over all folds seen.
"""

from __future__ import annotations

import math

import keras
from keras import ops

__all__ = ["MAE", "PSNR", "ROI_MIN_SIZE", "SSIM"]

#: Least side of the centre ROI (``live_bgsub.metrics.center_roi``'s default rule).
ROI_MIN_SIZE = 64

_WINDOW = 11
_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
_MAX_DB_MSE = 1e-12  # PSNR of identical folds is capped at 10 log10(L^2 / 1e-12) (120 dB for L = 1)


def _roi_size(rows, cols):
    """Side of the centre ROI: ``min(max(64, min(rows, cols) // 4), min(rows, cols))``."""
    side = ops.minimum(rows, cols)
    return ops.minimum(ops.maximum(ROI_MIN_SIZE, side // 4), side)


def _corner(n_rows, n_cols, limit, dtype):
    """``(1, n_rows, n_cols, 1)`` weights: 1 where row < limit and col < limit, else 0."""
    r = ops.cast(ops.arange(n_rows) < limit, dtype)
    c = ops.cast(ops.arange(n_cols) < limit, dtype)
    return ops.reshape(r, (1, -1, 1, 1)) * ops.reshape(c, (1, 1, -1, 1))


def _masked_mean(values, weights):
    """Mean over rows, cols, channels of ``values`` weighted by broadcast ``weights``."""
    weights = ops.broadcast_to(weights, ops.shape(values))
    return ops.sum(values * weights, axis=(1, 2, 3)) / ops.sum(weights, axis=(1, 2, 3))


class _FoldMetric(keras.metrics.Mean):
    """Mean over folds of a per-fold image metric of ``(y_true[..., 0:1], y_pred)``."""

    _base_name = ""

    def __init__(self, name=None, dtype=None, *, roi: bool = False, data_range: float = 1.0):
        if not float(data_range) > 0:
            raise ValueError(f"data_range must be positive, got {data_range!r}")
        if name is None:
            name = f"{self._base_name}_roi" if roi else self._base_name
        super().__init__(name=name, dtype=dtype)
        self.roi = bool(roi)
        self.data_range = float(data_range)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(y_pred, self.dtype)
        target = ops.cast(y_true, self.dtype)[..., 0:1]
        return super().update_state(self.per_fold(target, y_pred), sample_weight=sample_weight)

    def per_fold(self, target, pred):
        """One value per fold, shape ``(batch,)``."""
        raise NotImplementedError

    def _roi_weights(self, target):
        shape = ops.shape(target)
        return _corner(shape[1], shape[2], _roi_size(shape[1], shape[2]), target.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(roi=self.roi, data_range=self.data_range)
        return config


@keras.saving.register_keras_serializable(package="live_bgsub")
class MAE(_FoldMetric):
    """Mean absolute error of the corrected fold against the target (``y_true[..., 0]``).

    Parameters
    ----------
    name : str, optional
        Default ``"mae"`` (``"mae_roi"`` with ``roi=True``).
    dtype : str, optional
        Dtype of the computation and state.
    roi : bool, optional
        Score only the centre region of interest: the top-left ``s x s`` square with
        ``s = min(max(64, min(rows, cols) // 4), min(rows, cols))``, as
        ``live_bgsub.metrics.center_roi``.
    data_range : float, optional
        Unused by MAE; accepted so all metrics share one signature.

    Notes
    -----
    Use this rather than ``keras.metrics.MeanAbsoluteError``: ``y_true`` carries two
    channels (``[target, input]``) and only the first is the target.
    """

    _base_name = "mae"

    def per_fold(self, target, pred):
        err = ops.abs(target - pred)
        if self.roi:
            return _masked_mean(err, self._roi_weights(target))
        return ops.mean(err, axis=(1, 2, 3))


@keras.saving.register_keras_serializable(package="live_bgsub")
class PSNR(_FoldMetric):
    """Peak signal-to-noise ratio (dB) of the corrected fold against the target.

    Parameters
    ----------
    name : str, optional
        Default ``"psnr"`` (``"psnr_roi"`` with ``roi=True``).
    dtype : str, optional
        Dtype of the computation and state.
    roi : bool, optional
        Score only the centre ROI (see :class:`MAE`).
    data_range : float, optional
        Peak value ``L`` (default 1: folds normalised to [0, 1]).

    Notes
    -----
    Per fold ``10 log10(L^2 / mean((target - pred)^2))`` as ``live_bgsub.metrics.psnr``;
    the reported value is the mean over folds of the per-fold dB. The MSE is floored
    at 1e-12 so identical folds give 120 dB (for ``L = 1``) instead of infinity.
    """

    _base_name = "psnr"

    def per_fold(self, target, pred):
        sq = ops.square(target - pred)
        mse = _masked_mean(sq, self._roi_weights(target)) if self.roi else ops.mean(sq, axis=(1, 2, 3))
        mse = ops.maximum(mse, _MAX_DB_MSE)
        return (10.0 / math.log(10.0)) * ops.log(self.data_range**2 / mse)


@keras.saving.register_keras_serializable(package="live_bgsub")
class SSIM(_FoldMetric):
    """Structural similarity of the corrected fold and the target (``tf.image.ssim``'s).

    Parameters
    ----------
    name : str, optional
        Default ``"ssim"`` (``"ssim_roi"`` with ``roi=True``).
    dtype : str, optional
        Dtype of the computation and state.
    roi : bool, optional
        Score only the centre ROI (see :class:`MAE`): the windows lying entirely inside it.
    data_range : float, optional
        Dynamic range ``L`` (default 1).

    Notes
    -----
    The definition of ``live_bgsub.metrics.ssim`` and ``tf.image.ssim``: 11 x 11 Gaussian
    window (sigma 1.5), valid positions only, population moments,
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``; per fold the mean SSIM map, computed in the
    metric's dtype (float32 by default: agrees with the float64 reference to ~1e-6 on
    [0, 1] images). Folds (and ROIs) need at least 11 x 11 pixels; smaller give NaN.
    Cost: two separable 11-tap depthwise convolutions over 5 maps.
    """

    _base_name = "ssim"

    def per_fold(self, target, pred):
        dtype = target.dtype
        g = [math.exp(-0.5 * ((i - (_WINDOW - 1) / 2) / _SIGMA) ** 2) for i in range(_WINDOW)]
        g = ops.convert_to_tensor([v / sum(g) for v in g], dtype=dtype)
        maps = ops.concatenate([target, pred, target * target, pred * pred, target * pred], axis=-1)
        k_rows = ops.tile(ops.reshape(g, (_WINDOW, 1, 1, 1)), (1, 1, 5, 1))
        k_cols = ops.tile(ops.reshape(g, (1, _WINDOW, 1, 1)), (1, 1, 5, 1))
        local = ops.depthwise_conv(maps, k_rows, padding="valid")
        local = ops.depthwise_conv(local, k_cols, padding="valid")
        mu_t, mu_p, e_tt, e_pp, e_tp = (local[..., i : i + 1] for i in range(5))
        var_t = e_tt - mu_t * mu_t
        var_p = e_pp - mu_p * mu_p
        cov = e_tp - mu_t * mu_p
        c1 = (_K1 * self.data_range) ** 2
        c2 = (_K2 * self.data_range) ** 2
        lum = (2.0 * mu_t * mu_p + c1) / (mu_t * mu_t + mu_p * mu_p + c1)
        cs = (2.0 * cov + c2) / (var_t + var_p + c2)
        ssim_map = lum * cs
        if not self.roi:
            return ops.mean(ssim_map, axis=(1, 2, 3))
        # Window at map position p covers pixels p .. p + 10: inside the ROI iff p <= s - 11.
        shape = ops.shape(target)
        limit = _roi_size(shape[1], shape[2]) - (_WINDOW - 1)
        map_shape = ops.shape(ssim_map)
        return _masked_mean(ssim_map, _corner(map_shape[1], map_shape[2], limit, dtype))
