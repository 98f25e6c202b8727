"""The device path of one run: :class:`DevicePath`, raw frames to corrected folds and window metrics
in one compiled function per batch size.

It turns a run's :class:`~live_bgsub.fold.FoldMap` and a
:class:`~live_bgsub.inference.BackgroundModel` into the constant tensors of a
:class:`live_bgsub.model.pipeline.DevicePipeline` (the fold taps and the reference
frame's validity of :mod:`live_bgsub.device.taps`, the window weights of
:mod:`live_bgsub.device.windows`), pads micro-batches to the sizes of
:func:`~live_bgsub.device.batching.compiled_batch_sizes` so that the pipeline compiles
once per size (:mod:`live_bgsub.device.backend`), and fits the window metrics once per
run on a reference frame. Keras (and the backend) is imported when a :class:`DevicePath`
is built.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..engine import new_results
from ..errors import ProcessingError
from ..fold import FoldMap
from ..geometry import Geometry
from .backend import accelerator_present, aligned_zeros, compiled_function, upload_dtype
from .batching import compiled_batch_sizes
from .taps import fold_taps, frame_validity, reference_taps, validity_test
from .windows import METRIC_NAMES, WindowFit, fit_windows, metrics_from_coef, window_support

__all__ = ["DevicePath"]

#: Pixels per block of the host's validity test (:meth:`DevicePath._same`).
_VALIDITY_BLOCK = 1 << 18


class DevicePath:
    """Raw frames of one run -> corrected folds and metrics, in one compiled function per batch size.

    Parameters
    ----------
    model : str, BackgroundModel or a model ProcessingStep
        ``"model:NAME"`` / a ``.keras`` path, a loaded
        :class:`~live_bgsub.inference.BackgroundModel`, or the engine's model step.
    geometry : Geometry
        The run's fixed beam centre and rotation.
    shape : (int, int)
        Raw frame shape.
    mask : ndarray of bool, optional
        Static detector validity (True = valid), as :class:`~live_bgsub.engine.Engine`'s.
        Each frame's own invalid pixels (negative, NaN, the integer dtype's maximum) are
        found per frame (see ``validity_check``).
    edge : int, optional
        The fold map's edge erosion (default 1).
    batch_size : int, optional
        Most frames per device call (default 8); a smaller batch is padded (with copies
        of its last frame) to the next of :attr:`batch_sizes`: the powers of two below
        ``batch_size``, and ``batch_size``; one compilation each.
    precision : {"float32", "bfloat16", "float16"}, optional
        Compute dtype of the U-Net (the fold, normalisation, restore and metrics stay
        float32).
    jit_compile : bool or "auto", optional
        XLA (TensorFlow, JAX) / ``torch.compile`` (PyTorch) for the whole function.
        ``"auto"``: True on TensorFlow and JAX, False on PyTorch.
    metrics : bool, optional
        Fit the window metrics on the run's first frame(s) with an equator (default True).
        The radial totals (``tdi``, ``background_sum``) are always computed.
    with_background : bool, optional
        Also return the background folds (``process(...)[1]["background"]``).
    fold_map : FoldMap, optional
        A fold map already built for ``shape``, ``geometry`` and ``mask`` (an Engine's).
    pixel_size_mm, wavelength_nm, distance_mm : float, optional
        For ``d10_nm`` and the M3 search, as ``roi_metrics``.
    sector_deg : float, optional
        Sector half-width of the metrics (default 15, as ``roi_metrics``).
    reference_attempts : int, optional
        Frames tried as the metrics reference before giving up for the run (default 5).
    validity_refit : int, optional
        After this many consecutive batches whose invalid pixels differ from the
        reference frame's (the fold's slower general path), the last frame becomes the
        new reference (default 3; 0 never).
    validity_check : {"auto", "host", "device"}, optional
        Where each frame's invalid pixels are compared with the reference frame's (the
        fold's fast-path test): ``"host"`` while staging the batch (numpy, ~0.1 ms per
        Pilatus 1M frame), ``"device"`` inside the compiled function (a pass over the
        frames: cheap on a GPU, ~1 ms per Pilatus 1M frame on XLA:CPU). ``"auto"``
        (default): the device when the backend has an accelerator, else the host.
    cache : dict, optional
        Compiled device functions shared between device paths (the callback keeps one
        for all its runs): a run whose frame shape, model, precision and dtype match an
        earlier one's, and whose fold has the same :attr:`device_fold_shape` (the fold
        padded to multiples of ``downsample * 2**depth``: geometries a few pixels apart
        share it), reuses its function with this run's constants assigned, instead of
        compiling again (~2 s for a Pilatus 1M on this CPU).

    Attributes
    ----------
    compilations : int
        Traces of the device function so far (one per batch size used).
    device_fold_shape, device_window_shape : (int, int)
        The fold and the metrics window as the device computes them: padded to
        multiples of ``downsample * 2**depth`` (results are cropped back to
        ``fold_shape``).
    windows : WindowFit or None
        The metrics reference fit once made.
    fold_paths : dict
        Batches folded on the reference-validity path and on the general path, and
        the reference validity refits.
    last_timings_s : dict
        Seconds of the last :meth:`process` call per stage: ``stage`` (host copy into
        the upload buffer, and the host validity test), ``device`` (the compiled call: upload, fold, model, metrics,
        download), ``reference`` (the one-off CPU fit of the window metrics).
    """

    def __init__(
        self,
        model,
        geometry: Geometry,
        shape,
        mask=None,
        *,
        edge: int = 1,
        batch_size: int = 8,
        precision: str = "float32",
        jit_compile="auto",
        metrics: bool = True,
        with_background: bool = False,
        fold_map: FoldMap | None = None,
        pixel_size_mm: float | None = None,
        wavelength_nm: float | None = None,
        distance_mm: float | None = None,
        sector_deg: float = 15.0,
        reference_attempts: int = 5,
        validity_refit: int = 3,
        validity_check: str = "auto",
        cache: dict | None = None,
        geometry_quality=None,
    ):
        from ..inference import DETECTOR_UNITS, BackgroundModel

        if hasattr(model, "model") and isinstance(model.model, BackgroundModel):
            model = model.model  # the engine's model step
        if not isinstance(model, BackgroundModel):
            if not (isinstance(model, str) or hasattr(model, "__fspath__")):
                raise ProcessingError(f"model must be 'model:NAME', a .keras path or a BackgroundModel, got {model!r}")
            model = BackgroundModel.load(model)
        if model.normalization not in DETECTOR_UNITS:
            raise ProcessingError(
                f"model {model.name!r} uses {model.normalization!r} normalisation: only {' or '.join(map(repr, DETECTOR_UNITS))} work"
            )
        if not isinstance(geometry, Geometry):
            raise ProcessingError(f"geometry must be a live_bgsub.geometry.Geometry, got {geometry!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ProcessingError(f"batch_size must be a positive integer, got {batch_size!r}")
        if precision not in ("float32", "bfloat16", "float16"):
            raise ProcessingError(f"precision must be 'float32', 'bfloat16' or 'float16', got {precision!r}")
        if validity_check not in ("auto", "host", "device"):
            raise ProcessingError(f"validity_check must be 'auto', 'host' or 'device', got {validity_check!r}")
        self.model = model
        self.geometry = geometry
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2:
            raise ProcessingError(f"frame shape must be (rows, cols), got {shape!r}")
        if fold_map is None:
            fold_map = FoldMap(self.shape, geometry, mask, edge=edge)
        elif fold_map.shape != self.shape:
            raise ProcessingError(f"fold_map is for frames of shape {fold_map.shape}, not {self.shape}")
        self.fold_map = fold_map
        self.fold_shape = tuple(fold_map.fold_shape)
        self.batch_size = int(batch_size)
        self.batch_sizes = compiled_batch_sizes(self.batch_size)
        self.precision = precision
        self.jit_compile = jit_compile
        self.compute_metrics = bool(metrics)
        self.geometry_quality = geometry_quality
        self.with_background = bool(with_background)
        self.roi = {"pixel_size_mm": pixel_size_mm, "wavelength_nm": wavelength_nm, "distance_mm": distance_mm}
        self.sector_deg = float(sector_deg)
        self.reference_attempts = int(reference_attempts)
        self.rmax = float(min(self.fold_shape) - 1)
        nr = math.floor(self.rmax) + 2
        self.window_shape = (min(self.fold_shape[0], nr), min(self.fold_shape[1], nr))
        # The device computes on the fold padded to whole working blocks of the U-Net
        # (multiples of downsample * 2**depth, 32 for the shipped models; the padding is
        # invalid fold pixels, and the U-Net saw the same zero padding before): runs whose
        # geometries differ by a few pixels then share one compiled function.
        block = self.model.downsample * 2**self.model.depth
        self.device_fold_shape = tuple(-(-s // block) * block for s in self.fold_shape)
        self.device_window_shape = tuple(-(-s // block) * block for s in self.window_shape)
        self.windows: WindowFit | None = None
        self.reference_seq: int | None = None
        self._attempts = 0
        self._domain_doubts: list | None = None  # the model's, from the run's first frame
        self.pipeline = None
        self.upload_dtype = None
        self.frame_dtype = None
        self._staging: dict = {}
        self.last_timings_s: dict = {}
        self.validity_refit = int(validity_refit)
        self.cache = cache
        self.validity_check = validity_check
        self._validity_test = None
        self.fold_paths = {"reference": 0, "general": 0, "validity_refits": 0}
        self._misses = 0
        self._reference_valid = None
        self._pending_valid = None  # the first batch's validity, until settle()

    @classmethod
    def from_engine(cls, engine, **kwargs) -> DevicePath:
        """A device path with an :class:`~live_bgsub.engine.Engine`'s model, geometry, fold map and ROI geometry."""
        kwargs.setdefault("metrics", engine.compute_metrics)
        for key in ("pixel_size_mm", "wavelength_nm", "distance_mm", "geometry_quality"):
            kwargs.setdefault(key, getattr(engine, key))
        return cls(engine.step, engine.geometry, engine.shape, fold_map=engine.fold_map, **kwargs)

    # ------------------------------------------------------------------ building

    @property
    def compilations(self) -> int:
        return 0 if self.pipeline is None else int(self.pipeline.traces)

    @property
    def backend(self) -> str:
        import keras

        return keras.backend.backend()

    def build(self, dtype=np.float32) -> None:
        """Build the device function for frames of ``dtype`` (done by the first :meth:`process`)."""
        import keras

        from ..model.pipeline import DevicePipeline, background_head

        upload, sentinel = upload_dtype(dtype)
        fm = self.fold_map
        self._support = window_support(self.device_window_shape, self.sector_deg)
        static = not bool(fm.mask.all())
        jit = self.jit_compile
        if jit == "auto":
            jit = keras.backend.backend() in ("tensorflow", "jax")
        if self.validity_check == "auto":
            self.validity_check = "device" if accelerator_present() else "host"
        host_validity = self.validity_check == "host"
        # Everything the compiled function's structure depends on; a later run with the
        # same key reuses it (new constants assigned below, no recompilation).
        key = (
            self.shape, self.device_fold_shape, id(self.model), self.precision, self.model.downsample,
            self.model.depth, self.device_window_shape, self.sector_deg, fm.edge, sentinel, static,
            self.with_background, np.dtype(upload).str, bool(jit), host_validity,
        )  # fmt: skip
        pipeline = self.cache.get(key) if self.cache is not None else None
        if pipeline is None:
            pipeline = DevicePipeline(
                self.shape,
                self.device_fold_shape,
                background_head(self.model.model, self.precision),
                downsample=self.model.downsample,
                depth=self.model.depth,
                window_shape=self.device_window_shape,
                window_support=len(self._support),
                edge=fm.edge,
                sentinel=sentinel,
                static_mask=static,
                with_background=self.with_background,
                host_validity=host_validity,
                normalization=self.model.normalization,
            )
            pipeline.build((None, *self.shape))
            pipeline.compile(jit_compile=bool(jit))  # records jit_compile; calls go through pipeline.run
            pipeline.run = compiled_function(pipeline, bool(jit))
            pipeline.warm_sizes = set()  # batch sizes run (compiled) so far
            if self.cache is not None:
                self.cache[key] = pipeline
        else:
            # Reused: forget the previous run's reference state before this run sets its own.
            for variable in (pipeline.reference, pipeline.fold_layer.reference_valid,
                             pipeline.fold_layer.tap_weight_reference, pipeline.fold_layer.reference_count):
                variable.assign(np.zeros(variable.shape, variable.dtype))
        index, self._tap_weight = fold_taps(fm)
        # Padded fold pixels: off the detector (index 0, NaN weight), never valid.
        pipeline.fold_layer.tap_index.assign(self._pad(index, self.fold_shape, self.device_fold_shape, 0))
        pipeline.fold_layer.tap_weight.assign(self._pad(self._tap_weight, self.fold_shape, self.device_fold_shape, np.nan))
        if static:
            pipeline.fold_layer.static_valid.assign(fm.mask)
        ii, jj = np.indices(self.window_shape)
        radial = self._pad((np.hypot(ii, jj) <= self.rmax).ravel(), self.window_shape, self.device_window_shape, False)
        pipeline.radial_window.assign(radial.reshape(self.device_window_shape))
        pipeline.window_index.assign(self._support)
        pipeline.window_weights.assign(np.zeros(pipeline.window_weights.shape, np.float32))
        self.pipeline = pipeline
        self.upload_dtype = upload
        self.frame_dtype = np.dtype(dtype)
        self._staging = {}
        self._validity_test = validity_test(upload, sentinel, fm.mask if static else None) if host_validity else None
        if self.windows is not None:
            self.set_windows(self.windows)

    @staticmethod
    def _pad(values, shape, device_shape, fill):
        """``(..., h * w)`` values of a ``shape`` fold -> ``(..., H * W)`` of ``device_shape``, padded with ``fill``."""
        (h, w), (hd, wd) = shape, device_shape
        lead = values.shape[:-1]
        grid = values.reshape(*lead, h, w)
        pad = [(0, 0)] * len(lead) + [(0, hd - h), (0, wd - w)]
        return np.pad(grid, pad, constant_values=fill).reshape(*lead, hd * wd)

    def set_windows(self, fit: WindowFit) -> None:
        """Load a window fit's weights onto the device (the metrics of every later batch).

        The first frames with an equator set them (:func:`fit_windows`); a caller
        holding a fit of the run may give one. Sets :attr:`windows`. Raises
        ``ProcessingError`` when ``fit`` weights pixels outside the sectors the device's
        window support holds (:func:`window_support`): a bug, not bad data.
        """
        if tuple(fit.shape) != tuple(self.window_shape) or fit.matrix.shape[0] != fit.shape[0] * fit.shape[1]:
            raise ProcessingError(
                f"window fit of shape {tuple(fit.shape)} ({fit.matrix.shape[0]} rows), expected this path's "
                f"window shape {tuple(self.window_shape)}"
            )
        weights = self._pad(fit.matrix.T, self.window_shape, self.device_window_shape, 0)
        stray = np.any(np.delete(weights, self._support, axis=1), axis=0)
        if stray.any():
            # fit_windows and window_support disagree on the sectors: a bug, not bad data.
            raise ProcessingError(
                f"the window fit weights {np.count_nonzero(stray)} pixels outside "
                f"the {self.sector_deg} degree sectors that the device gathers"
            )
        self.pipeline.window_weights.assign(weights[:, self._support])
        self.pipeline.reference.assign(self._reference_vector(fit))
        self.windows = fit

    def _reference_vector(self, fit: WindowFit) -> np.ndarray:
        """S10 and M3 of the fit, ``wavelength * distance / pixel`` (NaN unknown), found flags."""
        geometry = math.nan
        if all(self.roi[k] is not None for k in self.roi):
            geometry = self.roi["wavelength_nm"] * self.roi["distance_mm"] / self.roi["pixel_size_mm"]
        return np.array(
            [fit.s10_px, fit.m3_px if fit.m3_found else 0.0, geometry, float(fit.equator_found), float(fit.m3_found)],
            np.float32,
        )

    def warmup(self, dtype=np.float32, batch_sizes=None) -> int:
        """Compile for every batch size (default :attr:`batch_sizes`) before the first real frame.

        A batch size already run by this device function (also by another run's device
        path sharing it through ``cache``) is skipped, so calling this per run costs
        nothing once the function is warm (on TensorFlow the second trace is
        shape-relaxed and covers the other sizes). Returns how many sizes were run.
        """
        if self.pipeline is None:
            self.build(dtype)
        elif np.dtype(dtype) != self.frame_dtype:
            raise ProcessingError(f"warmup({np.dtype(dtype)}): this device path was built for {self.frame_dtype} frames")
        if self.compute_metrics:
            from .. import reflections  # noqa: F401 - the first frame's reference fit imports scipy.optimize (~0.25 s)
        cold = [int(b) for b in (batch_sizes or self.batch_sizes) if int(b) not in self.pipeline.warm_sizes]
        for b in cold:
            self._call(self._buffer(b), False)
        return len(cold)

    def measure_batch_times(self, batch_sizes=None, repeats: int = 5, frames=None, dtype=np.float32) -> dict:
        """Median seconds of one device call per batch size, for :func:`~live_bgsub.device.batching.choose_batch_size`.

        ``frames`` (default: zero frames with the run's reference invalid pixels, so
        that the fold takes its usual path) are tiled to each batch size.
        """
        import statistics

        if self.pipeline is None:
            self.build(dtype if frames is None else np.asarray(frames[0]).dtype)
        self.settle()
        if frames is None:
            frame = np.zeros(self.shape, self.upload_dtype)
            if self._reference_valid is not None:
                bad = np.iinfo(frame.dtype).max if frame.dtype.kind == "u" else -1
                frame[~self._reference_valid] = bad
            frames = [frame]
        frames = [np.asarray(f) for f in frames]
        out = {}
        for b in batch_sizes or self.batch_sizes:
            buf = self._buffer(b)
            for i in range(b):
                buf[i] = frames[i % len(frames)]
            same = self._same(buf)
            self._call(buf, same)  # compile
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                self._call(buf, same)
                times.append(time.perf_counter() - t)
            out[int(b)] = statistics.median(times)
        return out

    def upload_buffer(self, n: int) -> np.ndarray:
        """The aligned upload buffer for a batch of ``n`` frames (``n`` one of :attr:`batch_sizes`).

        Reading frames straight into it (``h5py.Dataset.read_direct``) and passing it to
        :meth:`process` saves the staging copy. Only after the first :meth:`process`
        (the run's frame dtype is known then); the next :meth:`process` may overwrite it.
        """
        if self.pipeline is None:
            raise ProcessingError("upload_buffer() needs the run's first process() call (its frame dtype)")
        if n not in self.batch_sizes:
            raise ProcessingError(f"upload_buffer({n!r}): n must be one of the compiled batch sizes {self.batch_sizes}")
        return self._buffer(n)

    def device_inputs(self, buf):
        """The compiled function's input for a filled upload buffer: ``buf``, or with the
        host validity check ``(buf, same)``, ``same`` float32 ``(n,)`` (1 where the batch's
        frames all have the reference validity). For calling ``pipeline.run`` directly
        (benchmarks); :meth:`process` does this itself. Settles the run first (:meth:`settle`)."""
        self.settle()
        return self._inputs(buf, self._same(buf))

    def _buffer(self, size: int) -> np.ndarray:
        """The upload buffer for ``size`` frames, 64-byte aligned: TensorFlow wraps an aligned
        array without copying it (0.2 against 0.6 ms per Pilatus 1M frame here)."""
        buf = self._staging.get(size)
        if buf is None:
            buf = self._staging[size] = aligned_zeros((size, *self.shape), self.upload_dtype)
        return buf

    def _same(self, frames) -> bool:
        """Whether every frame has the reference validity (host test; False before a
        reference, and where the device tests the validity: there is no host test then).

        In blocks of rows (~256 k pixels) that stay in the cache, stopping at the first
        difference: 6.8 against 10.7 ms for a whole EIGER2 9M frame at once (measured).
        """
        if self._reference_valid is None or self._validity_test is None:
            return False
        ref = self._reference_valid
        step = max(1, _VALIDITY_BLOCK // self.shape[1])
        for f in frames:
            for r in range(0, self.shape[0], step):
                rows = slice(r, r + step)
                if not np.array_equal(self._validity_test(f[rows], rows), ref[rows]):
                    return False
        return True

    def _inputs(self, buf, same: bool):
        """The compiled function's input; ``same`` is used when the host tests the validity."""
        if self._validity_test is None:
            return buf
        return (buf, np.full(len(buf), float(same), np.float32))

    def _call(self, buf, same: bool):
        """One device call; ``same`` is used when the host tests the validity."""
        out = self.pipeline.run(self._inputs(buf, same))
        self.pipeline.warm_sizes.add(len(buf))
        return out

    def _bucket(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    # ------------------------------------------------------------------ processing

    def process(self, frames):
        """Fold, subtract the background and measure a batch of raw frames of the run.

        Parameters
        ----------
        frames : ndarray ``(n, rows, cols)`` or sequence of 2-D arrays
            Raw frames as the detector wrote them, all of the run's shape and dtype
            (negative, non-finite and integer-maximum pixels are invalid).

        Returns
        -------
        corrected : ndarray of float32, ``(n, fh, fw)``
            Corrected folds, 0 at invalid fold pixels.
        metrics : dict
            ``{name: ndarray (n,)}`` for the names of :data:`METRIC_NAMES` (float64;
            NaN where not measured), ``equator_found`` (bool: the run's reference fit
            found an equator and this frame's I10 and I11 are positive), ``count``
            (uint8 ``(n, fh, fw)``: valid quadrant samples per fold pixel) and, with
            ``with_background``, ``background`` (float32 ``(n, fh, fw)``).

        Raises
        ------
        ProcessingError
            A frame of another shape or dtype than the run's.
        """
        frames = frames if isinstance(frames, np.ndarray) and frames.ndim == 3 else [np.asarray(f) for f in frames]
        n = len(frames)
        if n == 0:
            raise ProcessingError("process() needs at least one frame")
        dtype = frames.dtype if isinstance(frames, np.ndarray) else frames[0].dtype
        for f in frames:
            if f.shape != self.shape:
                raise ProcessingError(f"frame has shape {f.shape}, expected {self.shape} like the run's first frame")
            if f.dtype != dtype:
                raise ProcessingError(f"frames of one batch must share a dtype, got {dtype} and {f.dtype}")
        if self.pipeline is None:
            self.build(dtype)
        elif dtype != self.frame_dtype:
            raise ProcessingError(f"frames have dtype {dtype}; this run's device path was built for {self.frame_dtype} frames")
        if self._domain_doubts is None:  # on the host, once per run: a percentile of one frame
            first = np.asarray(frames[0])
            self._domain_doubts = self.model.domain_doubts(first, self._frame_validity(first))
        if self._pending_valid is not None:  # no settle() between the first batch and this one
            self.settle()
        deferred = self._reference_valid is None  # the run's first batch (also after warmup())
        if deferred:
            # Its invalid pixels become the run's reference ones; the fold tables for them
            # are built by settle(), after this batch: it takes the general path (exact).
            self._pending_valid = self._frame_validity(frames[0])
        fh, fw = self.fold_shape
        corrected = np.empty((n, fh, fw), np.float32)
        count = np.empty((n, fh, fw), np.uint8)
        background = np.empty((n, fh, fw), np.float32) if self.with_background else None
        values = np.empty((n, len(METRIC_NAMES)), np.float64)
        timings = {"stage": 0.0, "device": 0.0, "reference": 0.0}
        for start in range(0, n, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            m = len(chunk)
            t0 = time.perf_counter()
            buf = self._buffer(self._bucket(m))
            if not (isinstance(chunk, np.ndarray) and m == len(buf) and chunk.ctypes.data == buf.ctypes.data):
                for i in range(m):  # (frames read into upload_buffer() are there already)
                    buf[i] = chunk[i]
                buf[m:] = chunk[m - 1]  # padding: a copy of a real frame keeps the fold on its usual path
            same = self._same(buf[:m])
            t1 = time.perf_counter()
            out = self._call(buf, same)
            corrected[start : start + m] = out[0][:m, :fh, :fw]
            count[start : start + m] = out[1][:m, :fh, :fw]
            values[start : start + m] = out[2][:m]
            if background is not None:
                background[start : start + m] = out[4][:m, :fh, :fw]
            t2 = time.perf_counter()
            if deferred:
                self.fold_paths["general"] += 1
            else:
                self._track_fold_path(bool(out[3][0] > 0.5), chunk[m - 1])
            timings["stage"] += t1 - t0
            timings["device"] += t2 - t1
        metrics = {name: values[:, i] for i, name in enumerate(METRIC_NAMES)}
        if self.compute_metrics and self.windows is None and self._attempts < self.reference_attempts:
            t = time.perf_counter()
            if self._fit_reference(corrected, count, values):
                metrics = self._host_window_metrics(corrected, values)
            timings["reference"] = time.perf_counter() - t
        metrics["equator_found"] = np.isfinite(metrics["i10"]) & (metrics["i10"] > 0) & (metrics["i11"] > 0)
        metrics["count"] = count
        if background is not None:
            metrics["background"] = background
        self.last_timings_s = timings
        return corrected, metrics

    def set_reference_validity(self, frame) -> None:
        """Take ``frame``'s invalid pixels as the run's usual ones (the fold's fast path).

        Done for the first frame of the run (by :meth:`settle`), and again when
        ``validity_refit`` consecutive batches had other invalid pixels (a new dead or
        saturated pixel).
        """
        self._set_reference_valid(self._frame_validity(frame))

    def settle(self) -> bool:
        """Finish the run's set-up that its first batch left for later; True when there was some.

        The first :meth:`process` of a run takes its first frame's invalid pixels as the
        run's usual ones but folds that batch on the general path; the fold tables of
        the fast path for those pixels (``set_reference_validity``: 50-290 ms for a
        Pilatus 1M, measured) are built here. A live caller calls this once the first
        batch's results are out and no frame waits, so that the first frame does not
        wait for it; otherwise the next :meth:`process` calls it.
        """
        if self._pending_valid is None:
            return False
        valid, self._pending_valid = self._pending_valid, None
        self._set_reference_valid(valid)
        self._misses = 0
        return True

    def _frame_validity(self, frame) -> np.ndarray:
        layer = self.pipeline.fold_layer
        static = self.fold_map.mask if layer.static_valid is not None else None
        return frame_validity(frame, layer.sentinel, static)

    def _set_reference_valid(self, valid) -> None:
        layer = self.pipeline.fold_layer
        weight, count = reference_taps(self.fold_map, valid, self._tap_weight)
        layer.reference_valid.assign(valid)
        self._reference_valid = valid
        layer.tap_weight_reference.assign(self._pad(weight, self.fold_shape, self.device_fold_shape, 0))
        layer.reference_count.assign(self._pad(count.ravel(), self.fold_shape, self.device_fold_shape, 0).reshape(self.device_fold_shape))
        self.fold_paths["validity_refits"] += 1

    def _track_fold_path(self, reference: bool, last_frame) -> None:
        if reference:
            self.fold_paths["reference"] += 1
            self._misses = 0
            return
        self.fold_paths["general"] += 1
        self._misses += 1
        if self.validity_refit and self._misses >= self.validity_refit:
            self.set_reference_validity(last_frame)
            self._misses = 0

    def _fit_reference(self, corrected, count, values) -> bool:
        """Fit the window metrics on the first frames with data; True once found."""
        for i in range(len(corrected)):
            if self._attempts >= self.reference_attempts:
                return False
            valid = count[i] > 0
            if not valid.any() or not np.isfinite(corrected[i]).all():
                continue
            self._attempts += 1
            fit = fit_windows(corrected[i], valid, sector_deg=self.sector_deg, rmax=self.rmax, shape=self.window_shape, **self.roi)
            if fit.equator_found:
                self.set_windows(fit)
                return True
        return False

    def _host_window_metrics(self, corrected, values):
        """The window metrics of frames processed before the reference existed (numpy)."""
        hm, wm = self.window_shape
        coef = corrected[:, :hm, :wm].reshape(len(corrected), -1).astype(np.float64) @ self.windows.matrix.astype(np.float64)
        tdi = values[:, METRIC_NAMES.index("tdi")]
        bg = values[:, METRIC_NAMES.index("background_sum")]
        return metrics_from_coef(coef, tdi, bg, self._reference_vector(self.windows))

    def results(self, frames, seq_nums=None) -> list:
        """Like :meth:`live_bgsub.engine.Engine.process`: one FrameResult per frame, never raising for a bad frame.

        A frame of the wrong shape or dtype, a fold without a valid pixel or non-finite
        output fails alone (``error`` set); the others are processed in one batch.
        ``metrics`` holds the :data:`METRIC_NAMES`, ``equator_found`` and ``reason``;
        ``background`` is set with ``with_background``.
        """
        frames, results = new_results(frames, seq_nums)
        good, arrays = [], []
        dtype = self.frame_dtype
        for result, raw in zip(results, frames):
            raw = np.asarray(raw)
            if raw.shape != self.shape:
                result.error = f"ProcessingError: frame has shape {raw.shape}, expected {self.shape} like the run's first frame"
                continue
            if dtype is None:
                dtype = raw.dtype
            if raw.dtype != dtype:
                result.error = f"ProcessingError: frame has dtype {raw.dtype}, expected {dtype} like the run's first frame"
                continue
            good.append(result)
            arrays.append(raw)
        if not good:
            return results
        t = time.perf_counter()
        try:
            corrected, metrics = self.process(arrays)  # each frame is copied once, into the upload buffer
        except Exception as exc:  # noqa: BLE001 - recorded per frame, never raised
            for result in good:
                result.error = f"device path failed: {type(exc).__name__}: {exc}"
            return results
        share = (time.perf_counter() - t) / len(good)
        reason = None
        if self.compute_metrics and self.windows is None:
            reason = "window metrics not fitted yet: no reference frame with a fiber equator"
        for i, result in enumerate(good):
            count = metrics["count"][i]
            if not count.any():
                result.error = "ProcessingError: the fold holds no valid pixel"
                continue
            if not np.isfinite(corrected[i]).all():
                result.error = "device path returned non-finite values"
                continue
            result.corrected = corrected[i]
            result.count = count.astype(np.int8)
            if self.with_background:
                result.background = metrics["background"][i]
            result.metrics = {name: float(metrics[name][i]) for name in METRIC_NAMES}
            result.metrics["equator_found"] = bool(metrics["equator_found"][i])
            result.metrics["reason"] = reason
            result.metrics["quality"] = self._frame_quality(result.metrics["equator_found"], reason)
            result.timings_s["device"] = share
        return results

    def _frame_quality(self, equator_found: bool, reason) -> dict:
        """A frame's metrics verdict: the reference fit's (its windows are that fit, frozen), the geometry's
        and the model's doubts about its input (:meth:`BackgroundModel.domain_doubts` on the run's first frame).

        The window integrals carry no per-frame fit evidence; the reference frame's
        verdict (:func:`live_bgsub.metrics.roi_metrics` on it) stands for the run, and a
        frame whose 1,0 or 1,1 integral is not positive has no equator.
        """
        reasons = []
        if self.geometry_quality is not None and self.geometry_quality.verdict != "good":
            reasons += [f"geometry: {r}" for r in self.geometry_quality.reasons] or ["geometry: doubtful"]
        reasons += self._domain_doubts or []  # the model's, on the run's first frame
        if not equator_found or self.windows is None:
            if reason:
                reasons.append(reason)
            return {"verdict": "no equator", "reasons": reasons, "evidence": {}}
        ref = self.windows.params["roi_metrics"]["quality"]
        reasons = [f"reference frame: {r}" for r in ref["reasons"] if not r.startswith("geometry: ")] + reasons
        return {"verdict": "doubtful" if reasons else "good", "reasons": reasons, "evidence": dict(ref["evidence"])}

    def describe(self) -> dict:
        """Provenance, as :meth:`live_bgsub.engine.Engine.describe` plus ``"device"`` (goes into the derived run's start)."""
        from ..engine import make_step

        device = {
            "backend": self.backend,
            "precision": self.precision,
            "jit_compile": self.jit_compile if self.pipeline is None else bool(self.pipeline.jit_compile),
            "batch_sizes": list(self.batch_sizes),
            "fold_shape": list(self.device_fold_shape),
            "metrics": "windows" if self.compute_metrics else "totals",
            "metrics_reference": None
            if self.windows is None
            else {"s10_px": self.windows.s10_px, "m3_px": self.windows.m3_px if self.windows.m3_found else None},
            "fold_paths": dict(self.fold_paths),
        }
        return {
            **make_step(self.model).describe(),
            "center": [float(self.geometry.center[0]), float(self.geometry.center[1])],
            "rotation_deg": float(self.geometry.rotation_deg),
            "shape": list(self.shape),
            "fold_shape": list(self.fold_shape),
            "device": device,
        }
