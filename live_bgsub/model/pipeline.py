"""The device pipeline (pure Keras 3): raw frames in, corrected folds and window metrics out.

One :class:`DevicePipeline` is a ``keras.Model`` whose input is a batch of raw detector
frames ``(n, rows, cols)`` and whose outputs are the corrected folds, the per-pixel
quadrant counts and a metric vector per frame. Every step runs inside the one function
that the backend traces and compiles per input shape
(:func:`live_bgsub.device.compiled_function`: ``tf.function``, ``jax.jit``, or
``torch.compile``):

1. validity (negative, non-finite and sentinel pixels are invalid): whether the batch
   has the run's usual invalid pixels, tested on the device or given by the host;
2. the fold (:class:`FoldGather`): a fixed 16-tap gather per fold pixel (4 quadrant
   samples x 4 bilinear taps) from a pixel-major table of the batch; for batches with
   the run's usual invalid pixels one weighted gather with the quadrant mean folded
   into the weights, otherwise the
   general path (the fold map's ``edge`` erosion of the invalid pixels, NaN taps, the
   mean of the valid samples);
3. the model's working downsample (block mean over valid pixels), unified
   normalisation (divide by the per-fold maximum), zero padding to multiples of
   ``2**depth``, the U-Net's background head, restore to detector units and bilinear
   upsampling normalised by validity; ``corrected = fold - background``;
4. the window metrics: radial totals, and one product of the corrected fold's sector
   pixels with fixed per-run window weights (:func:`live_bgsub.device.fit_windows`).

Only ``keras.ops`` are used (no ``tf.*``): the same code runs on TensorFlow, JAX and
PyTorch. The constant tensors (tap indices and weights, reference validity, window
weights) are non-trainable variables, filled by :class:`live_bgsub.device.DevicePath`;
assigning new values does not recompile. Contract and measurements: ``docs/device.md``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from .preprocessing import ROBUST_OFFSET_PERCENTILE

#: Metric columns of the output, in order. The model floor imports nothing of the
#: package above it, so these restate ``live_bgsub.engine.METRIC_KEYS`` and
#: ``live_bgsub.device.WINDOW_COLUMNS`` (tests/test_device_path.py checks they agree).
METRIC_NAMES = ("i10", "i11", "i11_i10", "s10_px", "m3_px", "m3_intensity", "tdi", "background_sum", "d10_nm")
#: Columns of the window matrix filled by ``live_bgsub.device.fit_windows``.
WINDOW_COLUMNS = ("i10", "i11", "d10", "m3", "dm3")

__all__ = [
    "PRECISIONS",
    "DevicePipeline",
    "FoldGather",
    "background_head",
]


#: Precision option -> Keras dtype policy of the U-Net (everything else stays float32).
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}

# Batches up to this size build the fold's pixel-major table inside the gather (see FoldGather.call).
_FUSED_TABLE_MAX_BATCH = 2

# Reference vector layout: S10 and M3 of the reference fit, wavelength * distance / pixel
# (nm px, NaN when unknown), equator found (0/1), M3 found (0/1).
_REF_SIZE = 5


def _constant(layer, name, shape, dtype="float32", value=0.0):
    """A non-trainable variable (device memory, assignable without a recompile)."""
    return layer.add_weight(
        name=name,
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        initializer=keras.initializers.Constant(value),
        trainable=False,
    )


class FoldGather(keras.layers.Layer):
    """Fold raw frames with a run's fixed geometry, per-frame validity included.

    Parameters
    ----------
    frame_shape : (int, int)
        Raw frame shape ``(rows, cols)``.
    fold_shape : (int, int)
        Fold shape ``(fh, fw)``.
    edge : int, optional
        Pixels next to an invalid pixel are unusable too (the fold map's ``edge``).
    sentinel : float, optional
        Values at or above it are invalid (an integer detector's dtype maximum as
        float32; ``inf`` for float frames: then only non-finite values).
    static_mask : bool, optional
        Whether a static detector validity mask (variable ``static_valid``) applies.

    Notes
    -----
    Two paths, chosen per batch on the device (``ops.cond``):

    - *reference validity* (the common case): every frame of the batch has exactly the
      validity of the run's reference frame (variable ``reference_valid``; detector gaps
      and dead pixels do not change within a run). The fold is then one weighted
      16-tap gather with weights that already hold the quadrant mean
      (``tap_weight_reference``) and the count is ``reference_count``: no erosion,
      no per-sample test, and for integer frames no masking either (every tap with a
      weight is a valid pixel, the others are multiplied by 0).
    - *general*: the frame's own invalid pixels are grown by ``edge`` (a separable
      max filter), set to NaN, the 16 taps gathered with the bilinear weights
      (``tap_weight``, NaN for samples off the detector), a sample is valid when its
      weighted tap sum is not NaN, and the fold is the mean of the valid samples.

    Both give :meth:`live_bgsub.fold.FoldMap.fold` to float32 rounding. Whether the
    batch has the reference validity is tested on the device, or given by the caller
    (``same``: the host tests it while staging the frames, which on a CPU is ~10x
    cheaper than the device's pass over the frames).

    The gather reads a pixel-major table ``(rows * cols, n)`` (one index fetches a
    contiguous row of ``n`` frames), built outside the branches so that it is
    materialised once: fused into the gather, the transpose would turn every tap into
    ``n`` scattered reads. The tap variables (filled by
    :func:`live_bgsub.device.fold_taps` and
    :func:`live_bgsub.device.reference_taps`) are ``(16, fh * fw)``, row
    ``4 * q + t`` for tap ``t`` of quadrant ``q``'s sample: ``tap_index`` (int32) is
    the flat frame index, taps carrying no weight point at the sample's first tap.
    While no reference is set (all zeros), only all-invalid frames take the reference
    path, which is then exact too (zeros).

    Input ``(n, rows, cols)`` any real dtype (and optionally ``same``, a bool scalar);
    outputs ``fold`` float32, ``count`` float32 (valid quadrant samples, 0..4), both
    ``(n, fh, fw)``, and ``reference`` (bool scalar: the batch took the
    reference-validity path).
    """

    def __init__(self, frame_shape, fold_shape, *, edge=1, sentinel=math.inf, static_mask=False, **kwargs):
        kwargs.setdefault("dtype", "float32")  # never autocast by a global mixed policy
        super().__init__(**kwargs)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.fold_shape = tuple(int(s) for s in fold_shape)
        self.edge = int(edge)
        self.sentinel = float(sentinel)
        self.static_mask = bool(static_mask)

    def build(self, input_shape=None):
        taps = (16, self.fold_shape[0] * self.fold_shape[1])
        self.tap_index = _constant(self, "tap_index", taps, "int32", 0)
        self.tap_weight = _constant(self, "tap_weight", taps, "float32", 0.0)
        self.tap_weight_reference = _constant(self, "tap_weight_reference", taps, "float32", 0.0)
        self.reference_valid = _constant(self, "reference_valid", self.frame_shape, "bool", False)
        self.reference_count = _constant(self, "reference_count", self.fold_shape, "float32", 0.0)
        self.static_valid = _constant(self, "static_valid", self.frame_shape, "bool", True) if self.static_mask else None
        self.built = True

    def validity(self, x):
        """Valid pixels of float32 frames: not negative, not NaN, below the sentinel, in the static mask."""
        valid = ops.logical_and(ops.greater_equal(x, 0.0), ops.less(x, self.sentinel))  # NaN: False
        if self.static_valid is not None:
            valid = ops.logical_and(valid, self.static_valid)
        return valid

    def call(self, frames, same=None):
        if same is None:
            same = ops.all(ops.equal(self.validity(ops.cast(frames, "float32")), self.reference_valid))
        n = frames.shape[0]
        if n is not None and n <= _FUSED_TABLE_MAX_BATCH:
            # A table of one or two frames is not worth materialising: fused into the
            # gather, each tap reads n scattered values instead (EIGER2 9M pairs on
            # XLA:CPU: 46 against 49-53 ms per frame, measured).
            reference = lambda: self._fold_reference(self._table(frames))  # noqa: E731
        else:
            table = self._table(frames)
            reference = lambda: self._fold_reference(table)  # noqa: E731
        fold, count = ops.cond(same, reference, lambda: self._fold_general(frames))
        # Back to frame-major after the branches: fused into the gather's reduction, this
        # transpose would make it ~9x slower on XLA:CPU (measured).
        fh, fw = self.fold_shape
        fold = ops.reshape(ops.transpose(fold), (-1, fh, fw))
        count = ops.reshape(ops.transpose(count), (-1, fh, fw))
        return fold, count, same

    def _pixels(self, values):
        """(rows * cols, n): one index gathers a contiguous row of n frames."""
        rows, cols = self.frame_shape
        return ops.transpose(ops.reshape(values, (-1, rows * cols)))

    def _table(self, frames):
        """The reference path's pixel-major table: integer frames as they are (invalid pixels
        only ever meet a weight of 0), float frames with invalid pixels (NaN, inf) zeroed."""
        if "int" in keras.backend.standardize_dtype(frames.dtype):
            return self._pixels(frames)
        x = ops.cast(frames, "float32")
        return self._pixels(ops.where(self.validity(x), x, 0.0))

    def _fold_reference(self, table):
        """Pixel-major ``(fold, count)``, each ``(fh * fw, n)``."""
        taps = ops.cast(ops.take(table, self.tap_index, axis=0), "float32")  # (16, fh * fw, n)
        fold = ops.sum(taps * self.tap_weight_reference[:, :, None], axis=0)
        return fold, ops.zeros_like(fold) + ops.reshape(self.reference_count, (-1, 1))

    def _fold_general(self, frames):
        """Pixel-major ``(fold, count)``, each ``(fh * fw, n)``."""
        fh, fw = self.fold_shape
        x = ops.cast(frames, "float32")
        valid = self.validity(x)
        usable = ops.where(_dilate(ops.logical_not(valid), self.edge), math.nan, x)
        taps = ops.take(self._pixels(usable), self.tap_index, axis=0)  # (16, fh * fw, n)
        taps = ops.reshape(taps * self.tap_weight[:, :, None], (4, 4, fh * fw, -1))
        samples = ops.sum(taps, axis=1)  # (4, fh * fw, n); NaN where a weighted tap is unusable
        ok = ops.logical_not(ops.isnan(samples))
        count = ops.sum(ops.cast(ok, "float32"), axis=0)
        total = ops.sum(ops.where(ok, samples, 0.0), axis=0)
        fold = ops.where(count > 0.0, total / ops.maximum(count, 1.0), 0.0)
        return fold, count

    def compute_output_spec(self, frames, same=None):
        shape = (frames.shape[0], *self.fold_shape)
        return keras.KerasTensor(shape, "float32"), keras.KerasTensor(shape, "float32"), keras.KerasTensor((), "bool")


def _materialized(pred, tensors):
    """``tensors`` unchanged, computed once and stored before any later use.

    A branch boundary (``ops.cond`` with the same function on both sides; ``pred`` is
    any boolean scalar of the graph): XLA does not fuse across it. Without it, XLA:CPU
    fused the corrected fold's whole computation (upsampling gathers included) into the
    window-metrics reduction and recomputed it there: the whole device function took
    7.6 ms per Pilatus frame without the U-Net, 4.1 ms with the boundary (measured,
    same process). keras.ops has no optimisation barrier of its own.
    """
    tensors = tuple(tensors)
    return ops.cond(pred, lambda: tensors, lambda: tensors)


def _dilate(mask, edge):
    """Boolean ``(n, rows, cols)`` mask grown by ``edge`` pixels (a separable square
    max filter; beyond the border counts as False, like ``minimum_filter(mode="nearest")``
    on the valid mask)."""
    for axis in (1, 2):
        for _ in range(edge):
            pad = [(0, 0)] * 3
            pad[axis] = (1, 1)
            p = ops.pad(mask, pad)
            n = mask.shape[axis]
            lo = p[:, :n] if axis == 1 else p[:, :, :n]
            mid = p[:, 1 : n + 1] if axis == 1 else p[:, :, 1 : n + 1]
            hi = p[:, 2:] if axis == 1 else p[:, :, 2:]
            mask = ops.logical_or(ops.logical_or(lo, mid), hi)
    return mask


def _linear_taps(n_out, n_in, factor):
    """Indices and weights of ``live_bgsub.resample``'s linear interpolation from block
    centres: full-resolution pixel ``p`` at reduced coordinate ``(p - (f - 1) / 2) / f``."""
    u = (np.arange(n_out, dtype=np.float64) - (factor - 1) / 2.0) / factor
    u = np.clip(u, 0.0, n_in - 1)
    i0 = np.floor(u).astype(np.int32)
    i1 = np.minimum(i0 + 1, n_in - 1).astype(np.int32)
    frac = u - i0
    return i0, i1, (1.0 - frac).astype(np.float32), frac.astype(np.float32)


def background_head(unet, precision: str = "float32"):
    """The U-Net's background head ``B`` (layer ``"background"``) as a model, in ``precision``.

    Parameters
    ----------
    unet : keras.Model
        A loaded background U-Net (``live_bgsub.model.BackgroundUNet`` or a functional
        model with a layer named ``"background"``).
    precision : {"float32", "bfloat16", "float16"}
        Compute dtype. Mixed precision rebuilds the network under the Keras dtype policy
        ``mixed_bfloat16`` / ``mixed_float16`` (float32 variables, low-precision compute;
        the backends' convolutions accumulate in float32) and copies the weights.

    Returns
    -------
    keras.Model
        ``(n, R, C, 1)`` normalised folds -> ``(n, R, C, 1)`` predicted background in
        the same normalised units (compute dtype; the pipeline casts it to float32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if precision != "float32":
        policy = PRECISIONS[precision]
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            if hasattr(unet, "depth") and hasattr(unet, "base_filters"):  # BackgroundUNet: rebuild from its arguments
                clone = unet.__class__.from_config(unet.get_config())
            else:
                clone = keras.models.clone_model(
                    unet, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": policy})
                )
        finally:
            keras.config.set_dtype_policy(previous)
        clone.set_weights(unet.get_weights())
        unet = clone
    return keras.Model(unet.inputs, unet.get_layer("background").output, name=f"{unet.name}_background_{precision}")


class DevicePipeline(keras.Model):
    """Raw frames -> (corrected folds, counts, metric vectors[, backgrounds]) in one function.

    Parameters
    ----------
    frame_shape, fold_shape : (int, int)
        Raw frame and fold shapes.
    head : keras.Model
        The U-Net background head (:func:`background_head`).
    downsample : int
        The model's working downsample (block mean; 1 for none).
    depth : int
        U-Net depth: the working fold is padded to multiples of ``2**depth``.
    window_shape : (int, int)
        ``(rows, cols)`` of the top-left part of the fold that the window metrics cover.
    window_support : int
        Pixels of that window that the window weights may weight (the two sectors of
        :func:`live_bgsub.device.window_support`).
    edge, sentinel, static_mask
        As :class:`FoldGather`.
    with_background : bool, optional
        Also output the background folds (default False: one fold less to download).
    normalization : {"unified", "robust"}, optional
        The model's (``live_bgsub.model.NORMALIZATIONS``): ``"robust"`` takes each working
        fold's floor off and caps isolated pixels before the scale, as
        :func:`live_bgsub.model.robust_levels` does on the host.
    host_validity : bool, optional
        The caller tells whether each frame has the run's reference validity: the input
        is then ``(frames, same)`` with ``same`` float32 ``(n,)`` (1 where the frame's
        invalid pixels are the reference's; the batch takes the fold's fast path when
        all are). Default False: the device tests it.

    Notes
    -----
    Outputs: ``corrected`` float32 ``(n, fh, fw)`` (0 at invalid fold pixels),
    ``count`` uint8 ``(n, fh, fw)``, ``metrics`` float32 ``(n, len(METRIC_NAMES))``,
    ``reference`` float32 ``(n,)`` (1 where the batch took the fold's reference-validity
    path) and, with ``with_background``, ``background`` float32 ``(n, fh, fw)``.

    Variables besides the fold's: ``window_index`` (int32 ``(window_support,)``: flat
    indices of the sector pixels in the fold's top-left ``(hm, wm)``), ``window_weights``
    (``(len(WINDOW_COLUMNS), window_support)``: the window-metric weights of those
    pixels), ``radial_window`` (bool ``(hm, wm)``: ``hypot(i, j) <= rmax``, for ``tdi``
    and ``background_sum``) and ``reference`` (S10 and M3 of the reference fit,
    ``wavelength * distance / pixel`` or NaN, equator found, M3 found).

    ``traces`` counts the compilations of this model by
    :func:`live_bgsub.device.compiled_function`, which counts where the backend
    traces or compiles (the ``tf.function`` or ``jax.jit`` body, the ``torch.compile``
    backend); called eagerly, it counts calls. The count is kept out of :meth:`call`:
    ``torch.compile`` guards on attributes that ``call`` changes and would recompile on
    every call.
    """

    def __init__(
        self,
        frame_shape,
        fold_shape,
        head,
        *,
        downsample: int = 1,
        depth: int = 4,
        window_shape=(1, 1),
        window_support: int = 1,
        edge: int = 1,
        sentinel: float = math.inf,
        static_mask: bool = False,
        with_background: bool = False,
        host_validity: bool = False,
        normalization: str = "unified",
        name: str = "device_pipeline",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")  # only the head follows a mixed precision policy
        super().__init__(name=name, **kwargs)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.fold_shape = tuple(int(s) for s in fold_shape)
        self.downsample = int(downsample)
        self.depth = int(depth)
        self.window_shape = tuple(int(s) for s in window_shape)
        self.window_support = int(window_support)
        self.with_background = bool(with_background)
        self.host_validity = bool(host_validity)
        if normalization not in ("unified", "robust"):
            raise ValueError(f"normalization must be 'unified' or 'robust' (detector units), got {normalization!r}")
        self.normalization = normalization
        self.fold_layer = FoldGather(
            self.frame_shape, self.fold_shape, edge=edge, sentinel=sentinel, static_mask=static_mask, name="fold"
        )
        self.head = head
        fh, fw = self.fold_shape
        f = self.downsample
        self.work_shape = (-(-fh // f), -(-fw // f))
        m = 2**self.depth
        self.padded_shape = tuple(-(-s // m) * m for s in self.work_shape)
        # backend tensors, once: a backend tensor times a numpy array goes through numpy
        # under PyTorch (fails for a CUDA tensor, leaves the device on the CPU)
        r0, r1, rw0, rw1 = _linear_taps(fh, self.work_shape[0], f)
        self._row_taps = [ops.convert_to_tensor(a) for a in (r0, r1, rw0[:, None], rw1[:, None])]
        self._col_taps = [ops.convert_to_tensor(a) for a in _linear_taps(fw, self.work_shape[1], f)]
        self.traces = 0

    def build(self, input_shape=None):
        self.fold_layer.build(input_shape)
        self.window_index = _constant(self, "window_index", (self.window_support,), "int32", 0)
        self.window_weights = _constant(self, "window_weights", (len(WINDOW_COLUMNS), self.window_support), "float32", 0.0)
        self.radial_window = _constant(self, "radial_window", self.window_shape, "bool", False)
        self.reference = _constant(self, "reference", (_REF_SIZE,), "float32", 0.0)
        self.built = True

    # ------------------------------------------------------------------ stages

    def block_mean(self, fold, valid):
        """Mean of the valid pixels of each ``f x f`` block (``live_bgsub.resample.block_mean``)."""
        f = self.downsample
        fh, fw = self.fold_shape
        hb, wb = self.work_shape
        pad = ((0, 0), (0, hb * f - fh), (0, wb * f - fw))
        vals = ops.pad(ops.where(valid, fold, 0.0), pad)
        weights = ops.pad(ops.cast(valid, "float32"), pad)
        # f * f strided slices summed: ~1.0 ms per Pilatus frame on XLA:CPU against
        # ~1.4 ms for a reshape to (n, hb, f, wb, f) and a sum over the block axes (measured).
        sums = sum(vals[:, i::f, j::f] for i in range(f) for j in range(f))
        counts = sum(weights[:, i::f, j::f] for i in range(f) for j in range(f))
        small_valid = counts > 0.0
        small = ops.where(small_valid, sums / ops.maximum(counts, 1.0), 0.0)
        return small, small_valid

    def robust_levels(self, image, valid):
        """Floor ``(n, 1, 1)`` and capped image of ``"robust"`` normalisation
        (``live_bgsub.model.robust_levels``: the percentile interpolated as numpy's)."""
        hb, wb = self.work_shape
        flat = ops.sort(ops.reshape(ops.where(valid, image, math.inf), (-1, hb * wb)), axis=1)
        n_valid = ops.sum(ops.cast(ops.reshape(valid, (-1, hb * wb)), "float32"), axis=1)
        pos = ops.maximum(n_valid - 1.0, 0.0) * (ROBUST_OFFSET_PERCENTILE / 100.0)
        lo = ops.floor(pos)
        lo_i = ops.cast(lo, "int32")[:, None]
        hi_i = ops.cast(ops.minimum(lo + 1.0, ops.maximum(n_valid - 1.0, 0.0)), "int32")[:, None]
        v_lo = ops.take_along_axis(flat, lo_i, axis=1)[:, 0]
        v_hi = ops.take_along_axis(flat, hi_i, axis=1)[:, 0]
        offset = ops.where(n_valid > 0.0, v_lo + (v_hi - v_lo) * (pos - lo), 0.0)[:, None, None]
        shifted = ops.where(valid, image - offset, -math.inf)
        padded = ops.pad(shifted, ((0, 0), (1, 1), (1, 1)), constant_values=-math.inf)
        neighbours = None
        for di in (0, 1, 2):
            for dj in (0, 1, 2):
                if di != 1 or dj != 1:
                    part = padded[:, di : di + hb, dj : dj + wb]
                    neighbours = part if neighbours is None else ops.maximum(neighbours, part)
        capped = ops.where(neighbours > -math.inf, ops.minimum(shifted, neighbours), shifted)
        return offset, ops.where(valid, capped, 0.0)

    def predict_background(self, work, work_valid, *, head=True):
        """Normalisation, padding, the U-Net head, restore: background in detector units.

        ``head=False`` skips the U-Net (the background is then the normalised input, for
        timing the steps around the model).
        """
        hb, wb = self.work_shape
        big_r, big_c = self.padded_shape
        image = ops.where(work_valid, work, 0.0)
        offset = 0.0
        if self.normalization == "robust":
            offset, image = self.robust_levels(image, work_valid)
        peak = ops.max(ops.reshape(image, (-1, hb * wb)), axis=1)
        scale = ops.where(peak > 0.0, peak, 1.0)[:, None, None]
        x = ops.pad(image / scale, ((0, 0), (0, big_r - hb), (0, big_c - wb)))[..., None]
        b = ops.cast(self.head(x, training=False), "float32") if head else x
        # The floor is background; what the cap took off stays in the corrected fold.
        return ops.where(work_valid, b[:, :hb, :wb, 0] * scale + offset, 0.0)

    def upsample(self, small, small_valid):
        """Bilinear upsampling normalised by validity (``live_bgsub.resample.upsample_linear``)."""

        def interp(image):
            r0, r1, rw0, rw1 = self._row_taps
            c0, c1, cw0, cw1 = self._col_taps
            image = ops.take(image, r0, axis=1) * rw0 + ops.take(image, r1, axis=1) * rw1
            return ops.take(image, c0, axis=2) * cw0 + ops.take(image, c1, axis=2) * cw1

        num = interp(ops.where(small_valid, small, 0.0))
        den = interp(ops.cast(small_valid, "float32"))
        return ops.where(den > 0.0, num / ops.where(den > 0.0, den, 1.0), 0.0)

    def window_metrics(self, corrected, background):
        """Radial totals and the window metrics -> ``(n, len(METRIC_NAMES))``."""
        hm, wm = self.window_shape
        sub = corrected[:, :hm, :wm]
        # The window weights are zero outside the two sectors: gather the sector pixels
        # (``window_index``) and take one small product. Against the dense (n, P) x (P, 6)
        # product: 0.58 against 0.73 ms per Pilatus frame in batches of 8, 8.4 against
        # 45 ms per EIGER2 9M frame in pairs on XLA:CPU (measured, one process).
        picked = ops.take(ops.reshape(sub, (-1, hm * wm)), self.window_index, axis=1)  # (n, S)
        coef = ops.einsum("ns,ks->nk", picked, self.window_weights)  # (n, len(WINDOW_COLUMNS))
        radial = ops.convert_to_tensor(self.radial_window)  # (JAX's where takes no Keras variable)
        tdi = ops.sum(ops.where(radial, sub, 0.0), axis=(1, 2))
        background_sum = ops.sum(ops.where(radial, background[:, :hm, :wm], 0.0), axis=(1, 2))
        s10_ref, m3_ref, d10_factor, has_eq, has_m3 = (self.reference[i] for i in range(_REF_SIZE))
        nan = ops.full_like(tdi, math.nan)
        i10, i11, d10, m3, dm3 = (coef[:, i] for i in range(len(WINDOW_COLUMNS)))
        s10 = s10_ref + d10 / i10  # the position shift of the Taylor-expanded 1,0 peak
        eq = has_eq > 0.5
        mer = ops.logical_and(eq, has_m3 > 0.5)
        columns = {
            "i10": ops.where(eq, i10, nan),
            "i11": ops.where(eq, i11, nan),
            "i11_i10": ops.where(eq, i11 / i10, nan),
            "s10_px": ops.where(eq, s10, nan),
            "m3_px": ops.where(mer, m3_ref + dm3 / m3, nan),
            "m3_intensity": ops.where(mer, m3, nan),
            "tdi": tdi,
            "background_sum": background_sum,
            "d10_nm": ops.where(eq, d10_factor / s10, nan),
        }
        return ops.stack([columns[k] for k in METRIC_NAMES], axis=1)

    # ------------------------------------------------------------------ the function

    def subtract(self, fold, count, *, head=True):
        """``(corrected, background)`` of folds with their counts (the model's part)."""
        valid = count > 0.0
        if self.downsample > 1:
            work, work_valid = self.block_mean(fold, valid)
            background = self.upsample(self.predict_background(work, work_valid, head=head), work_valid)
        else:
            background = self.predict_background(fold, valid, head=head)
        background = ops.where(valid, background, 0.0)
        return ops.where(valid, fold - background, 0.0), background

    def _split(self, inputs):
        """``(frames, same)``: ``same`` None when the device tests the validity."""
        if not self.host_validity:
            return inputs, None
        frames, same = inputs
        return frames, ops.all(same > 0.5)

    def call(self, inputs):
        frames, same = self._split(inputs)
        fold, count, reference = self.fold_layer(frames, same)
        corrected, background = _materialized(reference, self.subtract(fold, count))
        flags = ops.zeros_like(fold[:, 0, 0]) + ops.cast(reference, "float32")
        outputs = (corrected, ops.cast(count, "uint8"), self.window_metrics(corrected, background), flags)
        if self.with_background:
            outputs = outputs + (background,)
        return outputs

    def compute_output_spec(self, inputs):
        frames = inputs[0] if self.host_validity else inputs
        n = frames.shape[0]
        fold = keras.KerasTensor((n, *self.fold_shape), "float32")
        outputs = (
            fold,
            keras.KerasTensor((n, *self.fold_shape), "uint8"),
            keras.KerasTensor((n, len(METRIC_NAMES)), "float32"),
            keras.KerasTensor((n,), "float32"),
        )
        return outputs + (fold,) if self.with_background else outputs
