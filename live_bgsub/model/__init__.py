"""The U-Net background model (Keras 3): network, loss, metrics and shared preprocessing.

Contract: ``docs/model.md``. Importing this package imports Keras and registers the
custom objects (``live_bgsub>BackgroundUNet``, ``>BackgroundLoss``, ``>MAE``, ``>PSNR``,
``>SSIM``) that ``keras.saving.load_model(..., safe_mode=True)`` needs; ``import
live_bgsub`` alone never imports it.
"""

from live_bgsub.model.keras_metrics import MAE, PSNR, SSIM
from live_bgsub.model.losses import SMOOTH_ON, BackgroundLoss
from live_bgsub.model.preprocessing import (
    NORMALIZATIONS,
    ROBUST_OFFSET_PERCENTILE,
    cap_isolated,
    padded_shape,
    prepare,
    restore,
    robust_levels,
)
from live_bgsub.model.unet import (
    UPSAMPLING,
    BackgroundUNet,
    build_unet,
    unet_flops,
    unet_traffic_bytes,
    with_background,
)

__all__ = [
    "MAE",
    "NORMALIZATIONS",
    "ROBUST_OFFSET_PERCENTILE",
    "PSNR",
    "SMOOTH_ON",
    "SSIM",
    "UPSAMPLING",
    "BackgroundLoss",
    "BackgroundUNet",
    "build_unet",
    "cap_isolated",
    "padded_shape",
    "prepare",
    "restore",
    "robust_levels",
    "unet_flops",
    "unet_traffic_bytes",
    "with_background",
]
