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

One module per role:

- :mod:`~live_bgsub.device.taps`: the fold as a fixed 16-tap gather and the pixel
  validity rule (:func:`fold_taps`, :func:`reference_taps`, :func:`frame_validity`,
  :func:`validity_test`);
- :mod:`~live_bgsub.device.windows`: the window metrics fitted on a reference fold
  (:func:`fit_windows`, :class:`WindowFit`, :func:`window_support`,
  :func:`metrics_from_coef`);
- :mod:`~live_bgsub.device.batching`: the compiled batch sizes and the choice of one
  (:func:`compiled_batch_sizes`, :func:`choose_batch_size`);
- :mod:`~live_bgsub.device.backend`: the Keras backend's compiled call, the upload
  dtype and buffers, the accelerator (:func:`compiled_function`, :func:`upload_dtype`,
  :func:`aligned_zeros`, :func:`tf_view`, :func:`accelerator_present`);
- :mod:`~live_bgsub.device.path`: :class:`DevicePath`, which puts them together.

Keras (and the backend) is imported when a :class:`DevicePath` is built, never by
``import live_bgsub.device``.

Examples
--------
>>> import numpy as np
>>> from live_bgsub.device import DevicePath
>>> from live_bgsub.geometry import Geometry
>>> from live_bgsub.synth import make_pattern
>>> geometry = Geometry((410.0, 500.0), 2.0)                     # the run's beam centre and rotation
>>> frames = np.stack([make_pattern("pilatus-1m", seed=s, center=geometry.center,
...                                 rotation_deg=geometry.rotation_deg).raw() for s in (1, 2)])
>>> path = DevicePath("model:white-top-hat", geometry, frames.shape[1:], batch_size=2)
>>> corrected, metrics = path.process(frames)                    # (n, fh, fw), {name: (n,)}
>>> corrected.shape == (2, *path.fold_shape), metrics["i11_i10"].shape
(True, (2,))
>>> path.compilations                                            # 1 per batch size used
1
"""

from .backend import NATIVE_DTYPES, accelerator_present, aligned_zeros, compiled_function, tf_view, upload_dtype
from .batching import choose_batch_size, compiled_batch_sizes
from .path import DevicePath
from .taps import fold_taps, frame_validity, reference_taps, validity_test
from .windows import METRIC_NAMES, WINDOW_COLUMNS, WindowFit, fit_windows, metrics_from_coef, window_support

__all__ = [
    "METRIC_NAMES",
    "NATIVE_DTYPES",
    "WINDOW_COLUMNS",
    "DevicePath",
    "WindowFit",
    "accelerator_present",
    "aligned_zeros",
    "choose_batch_size",
    "compiled_batch_sizes",
    "compiled_function",
    "fit_windows",
    "fold_taps",
    "frame_validity",
    "metrics_from_coef",
    "reference_taps",
    "tf_view",
    "upload_dtype",
    "validity_test",
    "window_support",
]
