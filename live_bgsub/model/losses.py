"""The training loss of the background U-Net: MAE to the target plus edge-aware smoothness.

Pure ``keras.ops`` (any Keras 3 backend). The contract is ``docs/model.md``: ``y_true``
carries two channels, ``[target, input]``; ``y_pred`` is the model output
(``input - B``).
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["SMOOTH_ON", "BackgroundLoss"]

#: Images the smoothness term may act on.
SMOOTH_ON = ("background", "output")


@keras.saving.register_keras_serializable(package="live_bgsub")
class BackgroundLoss(keras.losses.Loss):
    """``L = (1 - alpha) MAE(target, output) + alpha L_s``, the paper's loss.

    Parameters
    ----------
    alpha : float, optional
        Weight of the smoothness term, in [0, 1] (default 0.1; the paper gives no value).
    theta : float, optional
        Exponent of the log-gradient in the smoothness weights (default 1.2, DeepUPE's).
    eps : float, optional
        Offset inside the log and in the weights' denominator (default 1e-4).
    smooth_on : {"background", "output"}, optional
        Image ``S`` whose derivatives are penalised (default ``"background"``, see Notes).
    name : str, optional
        Loss name (default ``"background_loss"``).
    reduction : str, optional
        Keras reduction over the batch of per-fold losses (default
        ``"sum_over_batch_size"``: the batch mean).
    dtype : str, optional
        Keras dtype of the computation (default: the global float type).

    Notes
    -----
    ``y_true`` has shape ``(batch, rows, cols, 2)``: channel 0 the target, channel 1 the
    network input ``I`` (both normalised, see ``live_bgsub.model.preprocessing``);
    ``y_pred`` ``(batch, rows, cols, 1)`` is the corrected fold ``input - B``. Per fold::

        MAE = mean_p |target_p - y_pred_p|
        L_s = mean_p[ wx_p (dx S)_p^2 ] + mean_p[ wy_p (dy S)_p^2 ]
        w   = 1 / (|d log(eps + max(I, 0))|^theta + eps)      (same d as on S)

    ``dx`` is the forward difference along the columns (``rows x (cols - 1)``
    positions), ``dy`` along the rows (``(rows - 1) x cols``); each term is the **mean**
    over its own positions (the paper writes a sum; a mean keeps ``alpha`` independent
    of the image size, so the same ``alpha`` works for 256 x 256 patches and full
    folds). Weights come from the input's log-gradients (as in DeepUPE) and carry no
    gradient: where the input has an edge (a reflection) the smoothness is relaxed,
    elsewhere (``w -> 1/eps``) it is enforced. Negative inputs are clipped to 0 inside
    the log (normalised folds are non-negative; masked and padded pixels are 0).

    Smoothness decision: by default ``S`` is the predicted background
    ``B = input - y_pred``, the quantity that is smooth physically (diffuse
    scattering); ``smooth_on="output"`` applies it to the corrected fold itself, the
    alternative reading of the paper (which would also flatten the diffraction signal
    between edges). The two are compared in training.

    A third channel of ``y_true``, when present, is the validity mask ``v`` (1 valid, 0
    invalid or padding; ``prepare(..., mask_channel=True)``): the MAE is then the mean
    over valid pixels, ``sum_p v_p |target_p - y_pred_p| / sum_p v_p``, and a
    difference enters ``L_s`` only where both its pixels are valid (mean over those):
    the network is not asked for anything at a gap, a beam stop or the padding, where
    restore zeroes its output anyway. Without it, invalid (and padding) pixels are 0 in
    both target and input and pull the output to 0 there.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        theta: float = 1.2,
        eps: float = 1e-4,
        smooth_on: str = "background",
        name: str = "background_loss",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not float(theta) > 0:
            raise ValueError(f"theta must be positive, got {theta!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if smooth_on not in SMOOTH_ON:
            raise ValueError(f"smooth_on must be one of {SMOOTH_ON}, got {smooth_on!r}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = float(alpha)
        self.theta = float(theta)
        self.eps = float(eps)
        self.smooth_on = smooth_on

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        target = y_true[..., 0:1]
        image = y_true[..., 1:2]
        valid = y_true[..., 2:3] if y_true.shape[-1] > 2 else None
        loss = _mean(ops.abs(target - y_pred), valid)
        if self.alpha == 0.0:
            return loss
        smooth = image - y_pred if self.smooth_on == "background" else y_pred
        log_image = ops.stop_gradient(ops.log(self.eps + ops.maximum(image, 0.0)))
        l_s = 0.0
        for axis in (2, 1):  # dx: along columns; dy: along rows
            weight = 1.0 / (ops.power(ops.abs(_diff(log_image, axis)), self.theta) + self.eps)
            both = None if valid is None else _pair_min(valid, axis)
            l_s = l_s + _mean(weight * ops.square(_diff(smooth, axis)), both)
        return (1.0 - self.alpha) * loss + self.alpha * l_s

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, theta=self.theta, eps=self.eps, smooth_on=self.smooth_on)
        return config


def _mean(values, weights):
    """Per-fold mean of ``(batch, rows, cols, 1)`` values, over ``weights`` when given."""
    axes = (1, 2, 3)
    if weights is None:
        return ops.mean(values, axis=axes)
    return ops.sum(weights * values, axis=axes) / ops.maximum(ops.sum(weights, axis=axes), 1.0)


def _pair_min(valid, axis):
    """1 where both pixels of a forward difference along ``axis`` are valid."""
    if axis == 1:
        return ops.minimum(valid[:, 1:], valid[:, :-1])
    return ops.minimum(valid[:, :, 1:], valid[:, :, :-1])


def _diff(x, axis):
    """Forward difference of a ``(batch, rows, cols, channels)`` tensor along ``axis``."""
    if axis == 1:
        return x[:, 1:] - x[:, :-1]
    return x[:, :, 1:] - x[:, :, :-1]
