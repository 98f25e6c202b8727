"""The processing engine: raw frames in, corrected folds and ROI metrics out.

One :class:`Engine` serves one run: it holds the run's fixed geometry, the fold map
built once for it, and a :class:`ProcessingStep` (a classical method with its
parameters, or a U-Net model). :meth:`Engine.process` takes a micro-batch of raw frames
and returns one :class:`FrameResult` per frame; a frame that cannot be processed (wrong
shape, no valid pixel, a failing step) gets a result with ``error`` set, and the other
frames of the batch are processed as usual.

This module sits between the science core and the live floor: it imports numpy and the
science core only (Keras is imported when a model step is made).

Examples
--------
>>> from live_bgsub.engine import Engine, make_step
>>> from live_bgsub.geometry import Geometry
>>> from live_bgsub.synth import make_pattern
>>> pattern = make_pattern("pilatus-1m", seed=1)
>>> geometry = Geometry(pattern.params["center"], pattern.params["rotation_deg"])
>>> engine = Engine(make_step("white-top-hat"), geometry, pattern.frame.shape)
>>> [result] = engine.process([pattern.raw()])
>>> result.corrected.shape == engine.fold_shape and result.error is None
True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ProcessingError
from .fold import FoldMap
from .geometry import Geometry
from .io import mask_invalid

__all__ = ["Engine", "FrameResult", "ProcessingStep", "make_step"]

#: Metric keys every derived event carries (NaN when the equator was not found).
METRIC_KEYS = (
    "i10",
    "i11",
    "i11_i10",
    "s10_px",
    "m3_px",
    "m3_intensity",
    "tdi",
    "background_sum",
    "d10_nm",
)


class ProcessingStep:
    """A background subtraction applied to a batch of folds.

    Use :func:`make_step` to build one. ``subtract(folds, masks)`` takes float32 folds
    ``(n, rows, cols)`` with their validity masks and returns ``(background,
    corrected)`` of the same shape, in detector units, 0 at invalid pixels.

    Attributes
    ----------
    method : str
        The registry name (``"white-top-hat"``) or ``"model:NAME"``.
    batched : bool
        True when one call on ``n`` folds is cheaper than ``n`` calls (a model).
    """

    method: str = ""
    batched: bool = False

    def subtract(self, folds: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a derived run records about the step (method, parameters, model card)."""
        raise NotImplementedError

    def warmup(self, fold_shape, batch_size: int = 1) -> None:
        """Pay one-time costs (graph tracing) before the first real frame."""

    def check_fold(self, fold_shape) -> None:
        """Raise ValueError when the step cannot run on folds of ``fold_shape`` (a
        length parameter past the fold, a working resolution that leaves too little)."""

    def doubts(self, corrected, background, mask) -> list:
        """Why the step's output (``corrected``, ``background``, valid where ``mask``) is
        not to be trusted (empty: none); the frame's metrics verdict carries them."""
        return []


class _ClassicalStep(ProcessingStep):
    def __init__(self, method: str, params: dict, downsample: int):
        from .background import validate_params

        self.method = method
        self.downsample = int(downsample)
        self.params = dict(params)
        # Fills in the defaults and rejects unknown names or bad values up front.
        self.parameters = validate_params(method, self.params)

    def check_fold(self, fold_shape):
        from .background import check_fold_params

        check_fold_params(self.method, self.params, fold_shape, downsample=self.downsample)

    def subtract(self, folds, masks):
        from .background import subtract_background

        background = np.empty_like(folds)
        corrected = np.empty_like(folds)
        for i in range(len(folds)):
            b, c = subtract_background(folds[i], self.method, masks[i], downsample=self.downsample, **self.params)
            background[i], corrected[i] = b, c
        return background, corrected

    def describe(self):
        return {"method": self.method, "parameters": self.parameters, "downsample": self.downsample}

    def __repr__(self):
        return f"<classical step {self.method!r} downsample={self.downsample} {self.params}>"


class _ModelStep(ProcessingStep):
    batched = True

    def __init__(self, model):
        self.model = model
        self.method = f"model:{model.name}"

    def subtract(self, folds, masks):
        return self.model.subtract(folds, masks, batch_size=max(1, len(folds)))

    def doubts(self, corrected, background, mask):
        return self.model.domain_doubts(np.where(mask, corrected + background, 0), mask)

    def describe(self):
        return {
            "method": self.method,
            "parameters": {},
            "downsample": int(self.model.downsample),
            "model": self.model.name,
            "model_path": str(self.model.path),
            "card_sha256": self.model.card_sha256(),
        }

    def warmup(self, fold_shape, batch_size: int = 1):
        self.model.warmup(fold_shape, batch_size)

    def __repr__(self):
        return f"<model step {self.model.name!r}>"


def make_step(method="white-top-hat", params: dict | None = None, *, downsample: int | None = None) -> ProcessingStep:
    """Build the processing step for a method name, a model or a loaded model.

    Parameters
    ----------
    method : str or BackgroundModel or ProcessingStep
        A classical method's registry name (``"white-top-hat"``, ...), ``"model:NAME"``
        for a shipped U-Net, ``"model:PATH"`` for a ``.keras`` file, a loaded
        :class:`live_bgsub.inference.BackgroundModel`, or a step (returned as is).
    params : dict, optional
        Parameters of a classical method (validated here); a model takes none.
    downsample : int, optional
        Working resolution: an integer from 1 to 16 (``live_bgsub.background`` also
        requires a working fold of at least 32 px a side when a fold is processed).
        Default: a model's own (its card's ``downsample``), and
        :data:`live_bgsub.background.WORKING_DOWNSAMPLE` (2, MuscleX's) for a classical
        method. A model runs only at its own: another value is an error.

    Raises
    ------
    ValueError
        Unknown method or parameter, a parameter or ``downsample`` out of its range,
        parameters given to a model, or a model that cannot be loaded; the message
        names the value and what is accepted.
    """
    from .inference import MODEL_PREFIX, BackgroundModel

    if isinstance(method, ProcessingStep):
        return method
    if isinstance(method, BackgroundModel) or (isinstance(method, str) and method.startswith(MODEL_PREFIX)):
        if params:
            raise ProcessingError(f"a model takes no parameters, got {sorted(params)}")
        model = method if isinstance(method, BackgroundModel) else BackgroundModel.load(method)
        model.working_downsample(downsample)  # raises for another resolution than its own
        return _ModelStep(model)
    if not isinstance(method, str):
        raise ProcessingError(f"method must be a method name, 'model:NAME' or a loaded model, got {method!r}")
    from .background import WORKING_DOWNSAMPLE, validate_params

    factor = WORKING_DOWNSAMPLE if downsample is None else downsample
    if isinstance(downsample, float) and downsample.is_integer():
        factor = int(downsample)  # 2.0 is 2
    try:
        # The method name and downsample (an integer from 1 to 16); the parameters are
        # checked by the step, and against each fold when it is processed.
        validate_params(method, {}, downsample=factor)
    except ValueError as exc:
        raise ProcessingError(str(exc)) from None
    return _ClassicalStep(method, params or {}, int(factor))


@dataclass
class FrameResult:
    """What the engine made of one raw frame.

    Attributes
    ----------
    seq_num : int
        The raw frame's sequence number (as given to :meth:`Engine.process`).
    corrected, background : ndarray of float32 or None
        The corrected fold and its background (None when the frame failed).
    count : ndarray of int8 or None
        Quadrants that contributed to each fold pixel.
    metrics : dict
        ROI metrics (:func:`live_bgsub.metrics.roi_metrics`); empty when failed or when
        the engine computes none.
    error : str or None
        Why the frame failed (None on success).
    timings_s : dict
        Seconds spent per stage for this frame (batch stages divided evenly).
    """

    seq_num: int
    corrected: np.ndarray | None = None
    background: np.ndarray | None = None
    count: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    timings_s: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def new_results(frames, seq_nums=None) -> tuple[list, list[FrameResult]]:
    """The frames as a list and one empty :class:`FrameResult` per frame (seq_nums 1, 2, ... by default)."""
    frames = list(frames)
    if seq_nums is None:
        seq_nums = range(1, len(frames) + 1)
    results = [FrameResult(int(s)) for s in seq_nums]
    if len(results) != len(frames):
        raise ProcessingError(f"got {len(frames)} frames but {len(results)} seq_nums")
    return frames, results


class Engine:
    """Turn micro-batches of raw frames of one run into corrected folds and metrics.

    Parameters
    ----------
    step : ProcessingStep or str
        The background subtraction (see :func:`make_step`).
    geometry : Geometry
        The run's fixed beam centre and rotation.
    shape : (int, int)
        Raw frame shape; frames of another shape fail individually.
    mask : ndarray of bool, optional
        The detector's static validity mask (True = valid). Each frame's own invalid
        pixels (negative sentinels, NaN, saturated) are masked in addition.
    pixel_size_mm, wavelength_nm, distance_mm : float, optional
        For the ROI metrics' d10 (nm); without them d10 is NaN.
    metrics : bool, optional
        Compute the ROI metrics (default True; about 50 ms per Pilatus fold).
    geometry_quality : live_bgsub.geometry.GeometryQuality, optional
        The verdict on ``geometry``; a doubtful one makes every frame's metrics doubtful
        (``metrics["quality"]``, :func:`live_bgsub.metrics.roi_metrics`).
    """

    def __init__(
        self,
        step,
        geometry: Geometry,
        shape,
        mask=None,
        *,
        pixel_size_mm: float | None = None,
        wavelength_nm: float | None = None,
        distance_mm: float | None = None,
        metrics: bool = True,
        geometry_quality=None,
    ):
        self.step = make_step(step)
        if not isinstance(geometry, Geometry):
            raise ProcessingError(f"geometry must be a live_bgsub.geometry.Geometry, got {geometry!r}")
        self.geometry = geometry
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2:
            raise ProcessingError(f"frame shape must be (rows, cols), got {shape!r}")
        self.fold_map = FoldMap(self.shape, geometry, mask)
        self.fold_shape = tuple(self.fold_map.fold_shape)
        try:  # parameters that cannot work on this fold fail the set-up, not every frame
            self.step.check_fold(self.fold_shape)
        except ValueError as exc:
            raise ProcessingError(str(exc)) from None
        self.pixel_size_mm = pixel_size_mm
        self.wavelength_nm = wavelength_nm
        self.distance_mm = distance_mm
        self.compute_metrics = bool(metrics)
        self.geometry_quality = geometry_quality

    def describe(self) -> dict:
        """Provenance of the engine: step, geometry, shapes."""
        return {
            **self.step.describe(),
            "center": [float(self.geometry.center[0]), float(self.geometry.center[1])],
            "rotation_deg": float(self.geometry.rotation_deg),
            "shape": list(self.shape),
            "fold_shape": list(self.fold_shape),
        }

    def _prepare(self, raw) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(raw)
        if raw.shape != self.shape:
            raise ProcessingError(f"frame has shape {raw.shape}, expected {self.shape} (the run's frame shape)")
        data, mask = mask_invalid(raw)
        if not mask.any():
            raise ProcessingError("every pixel of the frame is invalid (negative, NaN or saturated)")
        return data, mask

    def process(self, frames, seq_nums=None) -> list[FrameResult]:
        """Process a micro-batch of raw frames.

        Parameters
        ----------
        frames : sequence of 2-D arrays
            Raw frames (any numeric dtype; negative, NaN and dtype-maximum pixels are
            invalid).
        seq_nums : sequence of int, optional
            Sequence numbers to carry into the results (default 1, 2, ...).

        Returns
        -------
        list of FrameResult
            One per frame, in the order given. Never raises for a bad frame.
        """
        frames, results = new_results(frames, seq_nums)
        good, folds, masks = [], [], []
        for result, raw in zip(results, frames):
            t = time.perf_counter()
            try:
                data, mask = self._prepare(raw)
                fold, count = self.fold_map.fold(data, mask)
                valid = count > 0
                if not valid.any():
                    raise ProcessingError("the fold holds no valid pixel")
            except Exception as exc:  # noqa: BLE001 - recorded per frame, never raised
                result.error = _describe(exc)
                continue
            result.count = count
            result.timings_s["fold"] = time.perf_counter() - t
            good.append(result)
            folds.append(fold.astype(np.float32, copy=False))
            masks.append(valid)
        if not good:
            return results
        self._subtract(good, np.stack(folds), np.stack(masks))
        for result in good:
            if result.ok and self.compute_metrics:
                self._measure(result)
        return results

    def _subtract(self, good, folds, masks):
        t = time.perf_counter()
        try:
            background, corrected = self.step.subtract(folds, masks)
        except Exception as exc:  # noqa: BLE001 - recorded per frame, never raised
            if len(good) == 1:
                good[0].error = f"background step {self.step.method!r} failed: {_describe(exc)}"
                return
            # Isolate the failing frame(s): the others of the batch still get processed.
            for i, result in enumerate(good):
                self._subtract([result], folds[i : i + 1], masks[i : i + 1])
            return
        share = (time.perf_counter() - t) / len(good)
        for i, result in enumerate(good):
            result.background = np.asarray(background[i], np.float32)
            result.corrected = np.asarray(corrected[i], np.float32)
            if not np.isfinite(result.corrected).all():
                result.error = f"background step {self.step.method!r} returned non-finite values"
                result.corrected = result.background = None
                continue
            result.timings_s["background"] = share

    def _measure(self, result: FrameResult):
        from .metrics import roi_metrics

        t = time.perf_counter()
        try:
            m = roi_metrics(
                result.corrected,
                mask=result.count > 0,
                background=result.background,
                wavelength_nm=self.wavelength_nm,
                distance_mm=self.distance_mm,
                pixel_size_mm=self.pixel_size_mm,
                geometry_quality=self.geometry_quality,
            )
        except Exception as exc:  # noqa: BLE001 - metrics failing is not the frame failing
            m = {k: float("nan") for k in METRIC_KEYS}
            reason = f"metrics failed: {_describe(exc)}"
            m.update(equator_found=False, reason=reason, quality={"verdict": "no equator", "reasons": [reason], "evidence": {}})
        doubts = self.step.doubts(result.corrected, result.background, result.count > 0)
        if doubts:  # roi_metrics and the failure above both give a verdict
            quality = m["quality"]
            quality["reasons"] = [*quality["reasons"], *doubts]
            if quality["verdict"] == "good":
                quality["verdict"] = "doubtful"
        result.metrics = m
        result.timings_s["metrics"] = time.perf_counter() - t


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
