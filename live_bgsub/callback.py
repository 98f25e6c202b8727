"""The live callback: a RunEngine's frames in, a derived run of corrected folds out.

:class:`LiveBackgroundSubtraction` is an :class:`event_model.DocumentRouter`. Subscribe
it to a RunEngine (``RE.subscribe(callback)``) or feed it an archived run's documents
(:mod:`live_bgsub.replay`). For each raw run it composes a *derived run*:

- start: ``raw_uid``, ``raw_scan_id``, the processing step (method, parameters, model
  name and card hash), the geometry, the package version;
- stream ``primary``: one event per processed frame with the ROI metrics (``i10``,
  ``i11``, ``i11_i10``, ``s10_px``, ``m3_px``, ``m3_intensity``, ``tdi``,
  ``background_sum``, ``d10_nm``, ``equator_found``), their verdict
  ``metrics_verdict`` (``good``, ``doubtful`` or ``no equator``) with ``metrics_doubts``
  (why; empty when good) and the evidence ``s10_err_px`` and ``i11_i10_err`` (standard
  errors), the raw ``raw_seq_num``, the
  per-frame ``latency_s`` (frame available to the callback -> derived event),
  ``lag_s`` (raw event time -> derived event) and ``processing_s`` (fold, background
  and metrics of this frame, its share of a batched step included); the corrected fold ``corrected`` lives in
  an HDF5 file referenced by StreamResource/StreamDatum;
- stream ``failures``: one event per raw frame that did not make it, with
  ``raw_seq_num``, ``status`` (``failed``, ``skipped``, ``unprocessed`` or ``missing``)
  and ``error``;
- stream ``metrics_only`` (only when corrected folds could not be written, e.g. a full
  disk): the metrics of frames whose corrected fold was lost, keys as in ``primary``
  without ``corrected``; those frames count as failed and say so in ``failures``;
- stop: ``exit_status`` ``success`` only when every received frame was processed and
  the raw run succeeded (an aborted or failed raw run gives its own exit status);
  ``reason`` gives the counts (received, processed, failed, skipped, unprocessed,
  missing) and the raw run's exit status when it was not a success. Every received
  frame is in exactly one of processed, failed, skipped and unprocessed, whatever
  broke: a frame that some fault left in none of them is listed unprocessed at the stop.
  Before the stop, publishers that count what they could not deliver (``flush`` and
  ``undelivered``, as :class:`~live_bgsub.sinks.tiled.TiledPublisher`) are asked about
  the raw and the derived run; a loss makes the stop ``fail`` and ``reason`` says what
  was lost and which backup holds it.

A bad frame is one bad frame: the run's frame shape comes from the descriptor (the
data key's ``shape``; the first frame's only when the descriptor gives none), a frame of
another shape fails alone, and a geometry estimated from the frames uses the first
``geometry_frames`` frames that are usable (the right shape, at least
:data:`MIN_VALID_FRACTION` valid pixels, not constant); the others fail alone.

Threads: the document handlers run on the caller's thread (the RunEngine's) and only
record the document and put a frame reference on a bounded queue. Documents reach
their run through a :class:`~live_bgsub.routing.RunIndex` (not event-model's RunRouter,
which raises for a StreamDatum of an unknown StreamResource instead of letting its run
list it, and for an event that comes before its datum). One worker thread
reads frames (inline arrays, or HDF5 with SWMR for StreamResource/StreamDatum and
area-detector Resource/Datum), micro-batches them, runs the :class:`~live_bgsub.engine.
Engine` and emits the derived documents in frame order. No handler ever raises into the
RunEngine: errors are logged (logger ``live_bgsub.callback``) and recorded.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from event_model import DocumentRouter, compose_run

from . import __version__
from .engine import METRIC_KEYS, Engine, FrameResult, make_step
from .errors import ProcessingError
from .frames import FrameReader, FrameRef, RunFrames, unpack_datum_kwargs
from .geometry import Geometry, find_run_geometry
from .io import mask_invalid
from .routing import RunIndex
from .sinks.hdf5 import DATASET, FoldWriter

__all__ = ["LiveBackgroundSubtraction", "RunSummary", "geometry_from_configuration"]

logger = logging.getLogger("live_bgsub.callback")

ON_FULL = ("block", "skip")
#: Summaries of finished runs kept for ``summary()`` (older ones are dropped).
KEEP_RUNS = 100

#: Least fraction of valid pixels (:func:`live_bgsub.io.mask_invalid`) of a frame used to
#: estimate a run's geometry; a circular CCD active area is ~0.78 of its square.
MIN_VALID_FRACTION = 0.1
#: Document-handling errors kept by the callback (the oldest are dropped; all are counted).
KEEP_ERRORS = 1000
#: Documents not understood kept per run summary (the first ones; all are counted).
KEEP_BAD_DOCUMENTS = 100

#: Evidence behind each frame's metrics verdict carried in its derived event (NaN when
#: there is no equator): standard errors of S10 (pixels) and, relative, of I11/I10.
EVIDENCE_KEYS = ("s10_err_px", "i11_i10_err")


@dataclass
class RunSummary:
    """What happened to one raw run's frames (also in the derived stop's ``reason``).

    ``failed`` maps raw seq_num -> error; ``skipped`` lists frames dropped because the
    queue was full (``on_full="skip"``); ``unprocessed`` maps seq_num -> why (stop
    timeout, datum never arrived); ``missing`` maps seq_num -> why for frames whose
    documents never reached the callback (a transport reported them lost:
    :meth:`LiveBackgroundSubtraction.mark_missing`).
    """

    raw_uid: str
    derived_uid: str | None = None
    received: int = 0
    processed: int = 0
    failed: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    unprocessed: dict = field(default_factory=dict)
    missing: dict = field(default_factory=dict)
    disabled: str | None = None
    timed_out: bool = False
    exit_status: str | None = None
    reason: str = ""
    geometry: dict | None = None
    doubtful: int = 0  # processed frames whose metrics verdict is "doubtful"
    bad_documents: list = field(default_factory=list)  # this run's documents that could not be understood (the first ones)
    bad_document_count: int = 0
    last_bad_document: str = ""
    undelivered: str = ""  # what a publisher could not deliver (e.g. to Tiled), said at the stop
    metrics_only: int = 0  # failed frames whose corrected fold was lost but metrics kept
    compilations: int = 0  # device-function compilations this run waited for (0: prepared or reused)

    def note_bad_document(self, what: str) -> None:
        """Record a document of this run that could not be understood (the first
        :data:`KEEP_BAD_DOCUMENTS` are kept, all are counted)."""
        self.bad_document_count += 1
        self.last_bad_document = what
        if len(self.bad_documents) < KEEP_BAD_DOCUMENTS:
            self.bad_documents.append(what)

    @property
    def complete(self) -> bool:
        return (
            self.received == self.processed
            and not self.disabled
            and not self.missing
            and not self.bad_documents
            and not self.undelivered
        )


class _Run:
    """Per raw run state. Fields set on the document thread are read by the worker
    only after the matching queue item, so no lock is needed beyond the queue's."""

    def __init__(self, start: dict, frames: RunFrames):
        self.start = start
        self.uid = start["uid"]
        self.frames = frames  # which frames the documents announce, and where
        self.summary = RunSummary(self.uid)
        self.stop_doc: dict | None = None
        self.stop_at: float | None = None
        self.done = threading.Event()
        self.frame_shape: tuple[int, int] | None = None  # from the descriptor, else the first frame
        self.received_seqs: set[int] = set()
        # worker-side state
        self.geometry: Geometry | None = None
        self.geometry_source: str | None = None
        self.geometry_estimate = None  # the RunGeometry when estimated from frames
        self.buffer: list[FrameRef] = []
        self.engine: Engine | None = None
        self.bundle = None
        self.descriptors: dict = {}
        self.writer: FoldWriter | None = None
        self.sres_bundle = None
        self.pending_failures: list[tuple[int, str, str]] = []
        self.done_seqs: set[int] = set()  # raw frames whose derived event was emitted
        self.write_error: str | None = None  # why corrected folds can no longer be written
        self.internal_errors = 0


class LiveBackgroundSubtraction(DocumentRouter):
    """Background-subtract a run's detector frames as they arrive; publish a derived run.

    Parameters
    ----------
    publish : callable or list of callables, optional
        Receive the derived run's ``(name, doc)`` pairs (e.g. a
        :class:`live_bgsub.sinks.tiled.TiledPublisher`). Called on the worker thread.
    method : str, BackgroundModel or ProcessingStep, optional
        The processing step: a classical method name (default ``"white-top-hat"``),
        ``"model:NAME"`` / ``"model:PATH"``, or a loaded model (see
        :func:`live_bgsub.engine.make_step`).
    params : dict, optional
        Parameters of a classical method.
    downsample : int, optional
        Working resolution (default: a model's own, 2 for a classical method; see
        :func:`live_bgsub.engine.make_step`).
    data_key : str, optional
        The data key holding the frames. Default: the one 2-D data key of the stream
        (a key ending in ``_image`` wins if there are several).
    stream_name : str, optional
        The raw stream carrying the frames (default ``"primary"``).
    geometry : Geometry or dict, optional
        Fixed beam centre and rotation ``{"center": (x, y), "rotation_deg": a}``.
        Default: the start document's ``center``/``rotation_deg`` (top level or under
        ``"geometry"``), else the detector configuration's ``*_center`` /
        ``*_rotation_deg``, else estimated from the run's first ``geometry_frames``
        frames and then fixed for the run.
    geometry_frames : int, optional
        Frames used to estimate the geometry (default 3).
    directory : path-like, optional
        Where derived HDF5 files go (default ``"derived"``); one file per derived run.
    batch_size : int, optional
        Most frames per micro-batch (default 8).
    batch_timeout_s : float, optional
        A model step waits at most this long for a batch to fill (default 0.02 s);
        a classical step takes what is queued.
    queue_size : int, optional
        Frames the queue holds (default 64).
    on_full : {"block", "skip"}, optional
        What the document thread does when the queue is full: wait for room
        (``"block"``, default, right for replay) or drop the frame and list it as
        skipped (``"skip"``, opt-in for live acquisition that must never wait).
    stop_timeout_s : float, optional
        After the raw stop, frames still pending this long are given up, listed as
        unprocessed, and the derived stop says so (default 60 s; ``math.inf``: never).
    pixel_size_mm, wavelength_nm, distance_mm : float, optional
        For d10; default from the start document or the detector configuration.
    metrics : bool, optional
        Compute ROI metrics (default True).
    seq_nums : iterable of int, optional
        Process only these raw frames (a replay filling in skipped frames).
    accelerate : bool or None, optional
        Run a model step on the device path (:class:`live_bgsub.device.DevicePath`:
        fold, U-Net and metrics compiled as one function per batch shape; the metrics
        are window integrals frozen from ``roi_metrics`` on the run's first frame with
        an equator, see docs/device.md). None (default): on for a model step, off for
        a classical method (which has no device path).
    engine_factory : callable, optional
        Builds a run's engine once its geometry is known: called as
        ``engine_factory(step, geometry, shape, mask, run_start=..., metrics=...,
        geometry_quality=..., pixel_size_mm=..., wavelength_nm=..., distance_mm=...)``
        and returning an object with ``process(frames, seq_nums)``, ``describe()``,
        ``shape`` and ``fold_shape``, like :class:`~live_bgsub.engine.Engine` (the
        default). A factory whose ``reads_frames`` attribute is False makes engines
        that read no frames (the bus's composer: workers elsewhere read them): they are
        handed ``None`` for each frame, and a frame the callback cannot read while it
        estimates the geometry is left to them rather than failed.
    derived_uid : callable, optional
        ``derived_uid(raw_start) -> str``: the derived run's uid (default: a new uuid4).
        A deterministic uid lets a restarted composer replace a derived run it wrote
        in part.
    """

    def __init__(
        self,
        publish=None,
        *,
        method="white-top-hat",
        params: dict | None = None,
        downsample: int | None = None,
        data_key: str | None = None,
        stream_name: str = "primary",
        geometry=None,
        geometry_frames: int = 3,
        directory="derived",
        batch_size: int = 8,
        batch_timeout_s: float = 0.02,
        queue_size: int = 64,
        on_full: str = "block",
        stop_timeout_s: float = 60.0,
        pixel_size_mm: float | None = None,
        wavelength_nm: float | None = None,
        distance_mm: float | None = None,
        metrics: bool = True,
        seq_nums=None,
        accelerate: bool | None = None,
        engine_factory=None,
        derived_uid=None,
    ):
        super().__init__()
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        for name, value in (("batch_size", batch_size), ("queue_size", queue_size), ("geometry_frames", geometry_frames)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("batch_timeout_s", batch_timeout_s), ("stop_timeout_s", stop_timeout_s)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        self.step = make_step(method, params, downsample=downsample)
        self._fixed_geometry = _as_geometry(geometry, "geometry") if geometry is not None else None
        self._publishers = list(publish) if isinstance(publish, (list, tuple)) else ([publish] if publish else [])
        self.data_key = data_key
        self.stream_name = stream_name
        self.geometry_frames = int(geometry_frames)
        self.directory = Path(directory)
        self.batch_size = int(batch_size)
        self.batch_timeout_s = float(batch_timeout_s)
        self.queue_size = int(queue_size)
        self.on_full = on_full
        self.stop_timeout_s = float(stop_timeout_s)
        self._roi = {"pixel_size_mm": pixel_size_mm, "wavelength_nm": wavelength_nm, "distance_mm": distance_mm}
        self.compute_metrics = bool(metrics)
        self.select = None if seq_nums is None else {int(s) for s in seq_nums}
        self.accelerate = self.step.batched if accelerate is None else bool(accelerate)
        self._device_cache: dict = {}  # compiled device functions, reused across runs
        self._prepared: dict = {}  # device paths built by prepare(), each for one run
        self._engine_factory = engine_factory
        self._remote = engine_factory is not None and getattr(engine_factory, "reads_frames", True) is False
        self._derived_uid = derived_uid
        if self.accelerate and not self.step.batched:
            raise ValueError(f"accelerate=True needs a model step, got the classical method {self.step.method!r}")

        self.runs: dict[str, _Run] = {}
        self._index = RunIndex()  # which run each document belongs to; a run is forgotten when finished
        self._errors: collections.deque = collections.deque(maxlen=KEEP_ERRORS)
        self.error_count = 0
        self._items: collections.deque = collections.deque()
        self._frames_queued = 0
        self._cond = threading.Condition()
        self._reader = FrameReader()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="live_bgsub-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public API

    def subscribe(self, func) -> None:
        """Add a receiver of the derived documents."""
        self._publishers.append(func)

    def summary(self, raw_uid: str) -> RunSummary:
        """The :class:`RunSummary` of a raw run (KeyError if never seen)."""
        return self.runs[raw_uid].summary

    def wait(self, raw_uid: str | None = None, timeout: float | None = None) -> bool:
        """Wait until the derived run of ``raw_uid`` (default: every run seen) is stopped.

        Returns False if ``timeout`` (seconds) passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        runs = [self.runs[raw_uid]] if raw_uid is not None else list(self.runs.values())
        for run in runs:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not run.done.wait(remaining):
                return False
        return True

    def mark_missing(self, raw_uid: str, seq_nums, reason: str) -> None:
        """Record raw frames whose documents never arrived (call before the run's stop).

        A transport that detects gaps (0MQ drops) reports them here; they are listed in
        the derived run's ``failures`` stream with status ``missing`` and counted in its
        stop, so a replay from Tiled can fill them (:func:`live_bgsub.replay.frames_to_fill`).
        """
        run = self.runs.get(raw_uid)
        if run is None:
            raise KeyError(f"run {raw_uid!r} was never started on this callback")
        for seq in seq_nums:
            run.summary.missing[int(seq)] = str(reason)

    def prepare(self, frame_shape, geometry=None, dtype="int32", timeout: float | None = None) -> float:
        """Load and compile a model step for runs of ``frame_shape`` before their first frame.

        Call it at subscription, when the detector's frame shape (and, ideally, the beam
        centre) are known: the device function for every batch size is compiled on the
        worker thread now (seconds on a CPU), so a run's first frame is processed as
        fast as its others. A run whose geometry is within a few pixels of ``geometry``
        (its fold padded to the same device shape) and whose frames have ``dtype``
        reuses that compilation; any other run compiles when its first frames arrive,
        as without this call. The first run with exactly ``geometry`` and ``dtype`` also
        takes the fold tables built here; the first run to start drops what it did not
        take. Does nothing for a classical method (there is nothing to compile).

        Parameters
        ----------
        frame_shape : (int, int)
            Raw frame shape (rows, columns).
        geometry : Geometry or dict, optional
            The expected beam centre and rotation (default: this callback's fixed
            ``geometry``). Required for a model step.
        dtype : numpy dtype, optional
            The detector's frame dtype (default int32, a Pilatus/EIGER).
        timeout : float, optional
            Seconds to wait for the worker (default: as long as it takes).

        Returns
        -------
        float
            Seconds the compilation took on the worker (0 when there was nothing to do).

        Raises
        ------
        ValueError
            A frame shape that is not two positive integers, or no geometry for a model.
        TimeoutError
            The worker did not finish within ``timeout`` (it carries on).
        """
        shape = tuple(frame_shape) if np.ndim(frame_shape) == 1 else ()
        if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
            raise ValueError(f"frame_shape must be (rows, columns) of positive integers, got {frame_shape!r}")
        dtype = np.dtype(dtype)
        if not self.accelerate:
            return 0.0
        if geometry is None and self._fixed_geometry is None:
            raise ValueError("prepare() needs the expected geometry {'center': (x, y), 'rotation_deg': a} for a model step")
        geometry = self._fixed_geometry if geometry is None else _as_geometry(geometry, "geometry")
        job = {"shape": tuple(int(n) for n in shape), "geometry": geometry, "dtype": dtype, "done": threading.Event(), "seconds": 0.0, "error": None}
        with self._cond:
            if self._closed:
                raise ValueError("prepare() on a closed callback")
            self._items.append(("prepare", None, job))
            self._cond.notify_all()
        if not job["done"].wait(timeout):
            raise TimeoutError(f"prepare({shape}) still compiling after {timeout} s (it carries on on the worker)")
        if job["error"] is not None:
            raise job["error"]
        return job["seconds"]

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work and stop the worker thread."""
        with self._cond:
            self._closed = True
            self._items.append(("close", None, None))
            self._cond.notify_all()
        self._worker.join(timeout)

    @property
    def errors(self) -> list[str]:
        """The last :data:`KEEP_ERRORS` document-handling and worker errors
        (:attr:`error_count` counts them all)."""
        return list(self._errors)

    def _error(self, message: str) -> None:
        self._errors.append(message)
        self.error_count += 1

    # ------------------------------------------------------------------ documents (caller's thread)

    def __call__(self, name, doc, validate=False):
        try:
            return super().__call__(name, doc, validate=validate)
        except Exception as exc:  # never raise into the RunEngine
            message = f"{name} document {doc.get('uid', '')!r}: {type(exc).__name__}: {exc}"
            logger.exception("live_bgsub callback failed on %s", message)
            self._error(message)
            return name, doc

    def start(self, doc):
        self._index.add("start", doc)
        run = _Run(doc, RunFrames(doc, data_key=self.data_key, stream_name=self.stream_name))
        self.runs[run.uid] = run
        return doc

    def descriptor(self, doc):
        doc["run_start"]  # a descriptor without its run is an error (recorded)
        run = self.runs.get(self._index.add("descriptor", doc))
        if run is None:
            return doc
        try:
            if run.frames.descriptor(doc):
                run.frame_shape = run.frame_shape or run.frames.frame_shape
        except ProcessingError as exc:
            run.summary.disabled = str(exc)
            logger.warning("live_bgsub: run %s: %s", run.uid, exc)
        return doc

    def event(self, doc):
        descriptor = doc["descriptor"]
        run = self.runs.get(self._index.add("event", doc))
        if run is None or not run.frames.ready(descriptor):
            return doc
        for ref in run.frames.event(doc, time.monotonic(), self._index.resource):
            self._take(run, ref)
        return doc

    def stream_resource(self, doc):
        self._index.add("stream_resource", doc)
        return doc

    def stream_datum(self, doc):
        run = self.runs.get(self._index.add("stream_datum", doc))
        if run is None or not run.frames.ready(doc.get("descriptor")):
            return doc
        try:
            refs = run.frames.stream_datum(doc, self._index.resource(doc["stream_resource"]), time.monotonic())
        except ProcessingError as exc:
            run.summary.note_bad_document(str(exc))
            raise
        for ref in refs:
            self._take(run, ref)
        return doc

    def resource(self, doc):
        self._index.add("resource", doc)
        return doc

    def datum(self, doc):
        self._take_datums(self._index.add("datum", doc), [doc["datum_id"]], doc["resource"], [doc.get("datum_kwargs") or {}])
        return doc

    def datum_page(self, doc):
        ids = doc["datum_id"]
        kwargs = unpack_datum_kwargs(doc.get("datum_kwargs") or {}, len(ids))
        self._take_datums(self._index.add("datum_page", doc), ids, doc["resource"], kwargs)
        return doc

    def _take_datums(self, run_uid: str | None, ids, resource_uid: str, kwargs: list[dict]) -> None:
        """Datums of a resource: to its run, or, when its resource names no run (or is
        unknown), to every run not yet finished (the events naming them say which)."""
        run = self.runs.get(run_uid)
        runs = [run] if run is not None else [r for uid, r in list(self.runs.items()) if uid in self._index]
        resource = self._index.resource(resource_uid)
        for run in runs:
            for datum_id, datum_kwargs in zip(ids, kwargs):
                for ref in run.frames.datum(datum_id, resource_uid, resource, datum_kwargs):
                    self._take(run, ref)

    def stop(self, doc):
        doc["run_start"]  # a stop without its run is an error (recorded)
        run = self.runs.get(self._index.add("stop", doc))
        if run is None:
            return doc
        run.stop_doc = doc
        run.stop_at = time.monotonic()
        for seq in run.frames.never_arrived():
            run.summary.unprocessed[seq] = "its datum document never arrived"
        with self._cond:
            self._items.append(("stop", run, None))
            self._cond.notify_all()
        return doc

    def _take(self, run: _Run, ref: FrameRef) -> None:
        """A frame the documents announced: queued, unless replaying other frames."""
        if self.select is None or ref.seq_num in self.select:
            self._enqueue(run, ref)

    def _enqueue(self, run: _Run, ref: FrameRef) -> None:
        run.summary.received += 1
        run.received_seqs.add(ref.seq_num)
        with self._cond:
            if self._frames_queued >= self.queue_size:
                if self.on_full == "skip":
                    run.summary.skipped.append(ref.seq_num)
                    return
                while self._frames_queued >= self.queue_size and not self._closed:
                    self._cond.wait()
            self._items.append(("frame", run, ref))
            self._frames_queued += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ worker thread

    def _next_items(self) -> list:
        with self._cond:
            while not self._items:
                self._cond.wait()
            first = self._items.popleft()
            if first[0] != "frame":
                return [first]
            items = [first]
            wait_for_batch = self.step.batched and self.batch_timeout_s > 0
            deadline = time.monotonic() + self.batch_timeout_s
            while len(items) < self.batch_size:
                if self._items:
                    kind, run, _ = self._items[0]
                    if kind != "frame" or run is not first[1]:
                        break
                    items.append(self._items.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if not wait_for_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._frames_queued -= len(items)
            self._cond.notify_all()
            return items

    def _work(self) -> None:
        while True:
            items = self._next_items()
            kind, run, _ = items[0]
            try:
                if kind == "close":
                    return
                if kind == "prepare":
                    self._prepare(items[0][2])
                elif kind == "stop":
                    self._finish(run)
                else:
                    self._frames(run, [ref for _, _, ref in items])
                    self._settle(run)
            except Exception as exc:  # the worker must survive anything
                text = f"{type(exc).__name__}: {exc}"
                self._error(f"worker: {text}")
                if kind == "stop":
                    logger.exception("live_bgsub worker failed finishing run %s", run.uid)
                    run.done.set()
                else:
                    self._internal_failure(run, [ref for _, _, ref in items], text)

    def _settle(self, run: _Run) -> None:
        """Between frames: the set-up the run's engine left after its first batch
        (:meth:`live_bgsub.device.DevicePath.settle`), now that its events are out."""
        settle = getattr(run.engine, "settle", None)
        if settle is not None and not self._frames_queued:
            settle()

    def _prepare(self, job: dict) -> None:
        """The worker's side of :meth:`prepare`: build a device path and compile it."""
        from .device import DevicePath

        t = time.perf_counter()
        try:
            engine = Engine(self.step, job["geometry"], job["shape"], metrics=self.compute_metrics)
            path = DevicePath.from_engine(engine, batch_size=self.batch_size, cache=self._device_cache)
            path.warmup(job["dtype"])
            self._prepared[_prepared_key(job["shape"], job["geometry"], job["dtype"])] = path
        except Exception as exc:  # noqa: BLE001 - handed to prepare()'s caller
            job["error"] = exc
        finally:
            job["seconds"] = time.perf_counter() - t
            job["done"].set()

    def _internal_failure(self, run: _Run, refs: list[FrameRef], text: str) -> None:
        """A batch raised where nothing should: its frames not yet accounted for fail
        (the traceback is logged for the run's first such batch only)."""
        run.internal_errors += 1
        if run.internal_errors == 1:
            logger.exception("live_bgsub worker failed on run %s (later failures of this run: one line)", run.uid)
        else:
            logger.error("live_bgsub worker failed on run %s: %s", run.uid, text)
        pending = {ref.seq_num for ref, _ in run.buffer}
        lost = [ref.seq_num for ref in refs if not _accounted(run, ref.seq_num) and ref.seq_num not in pending]
        try:
            self._fail(run, [FrameResult(seq, error=f"internal error: {text}") for seq in lost])
        except Exception:  # noqa: BLE001 - the stop's sweep lists them as unprocessed
            logger.exception("live_bgsub: recording failed frames of run %s failed", run.uid)

    def _frames(self, run: _Run, refs: list[FrameRef]) -> None:
        if run.summary.disabled:
            for ref in refs:
                run.summary.unprocessed[ref.seq_num] = run.summary.disabled
            return
        if run.stop_at is not None and time.monotonic() - run.stop_at > self.stop_timeout_s:
            run.summary.timed_out = True
            for ref in refs:
                run.summary.unprocessed[ref.seq_num] = f"not processed within stop_timeout_s={self.stop_timeout_s} s of the stop"
            return
        if run.engine is not None and not getattr(run.engine, "reads_frames", True):
            self._process(run, [(ref, None) for ref in refs])
            return
        frames = []
        for ref in refs:
            try:
                frames.append((ref, self._reader.read(ref)))
            except Exception as exc:  # noqa: BLE001 - a missing or bad file fails its frames only
                if self._remote:  # read only for the geometry here: the engine's readers decide
                    frames.append((ref, None))
                    continue
                self._fail(run, [FrameResult(ref.seq_num, error=f"{type(exc).__name__}: {exc}")])
        if run.engine is None:
            frames = self._usable(run, frames)
        if not frames:
            return
        if run.engine is None:
            run.buffer.extend(frames)
            read = sum(a is not None for _, a in run.buffer)
            if run.geometry is None and self._geometry_known(run) is None and read < self.geometry_frames:
                return  # keep collecting frames for the geometry estimate
            frames, run.buffer = run.buffer, []
            self._build_engine(run, frames)
            if run.engine is None:
                return
        self._process(run, frames)

    def _usable(self, run: _Run, frames: list) -> list:
        """Before the run's engine exists: fail the frames that must not set it up (wrong
        shape; for an estimated geometry also too few valid pixels or no contrast) and
        return the others. The first usable frame fixes the shape when the descriptor
        gave none."""
        estimating = run.geometry is None and self._geometry_known(run) is None
        kept, bad = [], []
        for ref, array in frames:
            if array is None:  # not read here (see engine_factory): left to the engine
                kept.append((ref, array))
                continue
            shape = np.shape(array)
            expected = run.frame_shape
            if len(shape) != 2:
                why = f"frame has shape {shape}, expected a 2-D frame" + (f" of shape {expected}" if expected else "")
            elif expected is not None and shape != expected:
                why = f"frame has shape {shape}, expected {expected} (the descriptor's shape of {run.frames.data_key!r})"
            else:
                why = _unusable_for_geometry(array) if estimating else None
            if why is None:
                if run.frame_shape is None:
                    run.frame_shape = shape
                kept.append((ref, array))
            else:
                bad.append(FrameResult(ref.seq_num, error=why))
        self._fail(run, bad)
        return kept

    def _geometry_known(self, run: _Run):
        if run.geometry is not None:
            return run.geometry
        if self._fixed_geometry is not None:
            run.geometry, run.geometry_source = self._fixed_geometry, "config"
        else:
            found = _geometry_from(run.start, "start")
            if found is None:
                found = _geometry_from_config(run.frames.config)
            if found is not None:
                run.geometry, run.geometry_source = found
        return run.geometry

    def _build_engine(self, run: _Run, frames) -> None:
        try:
            shape = run.frame_shape or next((np.shape(a) for _, a in frames if a is not None), ())
            if len(shape) != 2:
                raise ProcessingError(f"frames must be 2-D, got shape {shape} for data key {run.frames.data_key!r}")
            if self._geometry_known(run) is None:
                usable = [mask_invalid(np.asarray(a)) for _, a in frames if a is not None and np.shape(a) == shape][: self.geometry_frames]
                estimate = find_run_geometry([d for d, _ in usable], [m for _, m in usable])
                run.geometry, run.geometry_source = estimate.geometry, f"estimated from {len(usable)} frame(s)"
                run.geometry_estimate = estimate
            roi = {k: self._roi[k] if self._roi[k] is not None else _lookup(run, k) for k in self._roi}
            estimate = run.geometry_estimate
            # The beam-stop shadow found with the geometry is no data: it stays out of the fold.
            static = None if estimate is None or estimate.beam_stop is None else ~estimate.beam_stop.mask
            quality = None if estimate is None else estimate.quality
            dtype = next((np.asarray(a).dtype for _, a in frames if a is not None), None)
            prepared = None
            if self.accelerate and static is None and self._engine_factory is None and dtype is not None:
                prepared = self._prepared.pop(_prepared_key(shape, run.geometry, dtype), None)
                # The next runs reuse the compilation through the cache; a prepared path
                # this run did not take (another geometry) would only hold its memory.
                self._prepared.clear()
            if prepared is not None:  # built and compiled by prepare() for this shape and geometry
                prepared.roi.update(roi)
                prepared.geometry_quality = quality
                run.engine = prepared
            elif self._engine_factory is not None:
                run.engine = self._engine_factory(
                    self.step, run.geometry, shape, static, run_start=run.start,
                    metrics=self.compute_metrics, geometry_quality=quality, **roi,
                )
            else:
                run.engine = Engine(self.step, run.geometry, shape, static, metrics=self.compute_metrics, geometry_quality=quality, **roi)
            if self.accelerate and prepared is None:
                from .device import DevicePath

                run.engine = DevicePath.from_engine(run.engine, batch_size=self.batch_size, cache=self._device_cache)
                # Every batch size compiled now, not when a backlog first makes a bigger
                # batch in mid-run (nothing to do when prepare() or an earlier run did it).
                if dtype is not None:
                    run.engine.build(dtype)  # a function from the cache counts its earlier compilations
                    before = run.engine.compilations
                    run.engine.warmup(dtype)
                    run.summary.compilations += run.engine.compilations - before
        except Exception as exc:  # noqa: BLE001 - the run cannot be processed: say why
            run.summary.disabled = f"cannot set up processing: {type(exc).__name__}: {exc}"
            logger.error("live_bgsub: run %s: %s", run.uid, run.summary.disabled)
            for ref, _ in frames:
                run.summary.unprocessed[ref.seq_num] = run.summary.disabled
            return
        run.summary.geometry = {
            "center": list(run.geometry.center),
            "rotation_deg": run.geometry.rotation_deg,
            "source": run.geometry_source,
        }
        if run.geometry_estimate is not None:
            est = run.geometry_estimate.to_dict()
            run.summary.geometry.update(
                quality=est["quality"],
                beam_stop=est["beam_stop"],
                center_spread_px=est["center_spread_px"],
                rotation_spread_deg=est["rotation_spread_deg"],
            )
            if not run.geometry_estimate.quality.good:
                logger.warning("live_bgsub: run %s: doubtful geometry: %s", run.uid, "; ".join(run.geometry_estimate.quality.reasons))

    def _process(self, run: _Run, frames) -> None:
        arrays, seqs = [a for _, a in frames], [ref.seq_num for ref, _ in frames]
        if self.accelerate:
            before = run.engine.compilations
            results = run.engine.results(arrays, seqs)
            run.summary.compilations += run.engine.compilations - before
        else:
            results = run.engine.process(arrays, seqs)
        received = {ref.seq_num: ref.received for ref, _ in frames}
        self._ensure_started(run)
        good = [r for r in results if r.ok]
        self._fail(run, [r for r in results if not r.ok])
        if not good:
            return
        rows = self._store(run, good)
        if rows is None:
            self._metrics_only(run, good, received)
            return
        start, stop = rows
        desc = run.descriptors["primary"]
        first_seq = start + 1
        datum = run.sres_bundle.compose_stream_datum(
            indices={"start": start, "stop": stop},
            seq_nums={"start": first_seq, "stop": first_seq + len(good)},
            descriptor=desc.descriptor_doc,
        )
        self._emit("stream_datum", datum)
        now_mono, now = time.monotonic(), time.time()
        for i, r in enumerate(good):
            data = self._event_data(run, r, now_mono - received[r.seq_num], now)
            event = desc.compose_event(
                data=data, timestamps={k: now for k in data}, seq_num=first_seq + i, time=now
            )
            self._emit("event", event)
            run.done_seqs.add(r.seq_num)
        run.summary.processed += len(good)

    def _event_data(self, run: _Run, r: FrameResult, latency_s: float, now: float) -> dict:
        raw_time = run.frames.event_times.get(r.seq_num)
        data = {k: _number(r.metrics.get(k)) for k in METRIC_KEYS}
        data["equator_found"] = bool(r.metrics.get("equator_found", False))
        quality = r.metrics.get("quality") or {"verdict": "no equator", "reasons": [], "evidence": {}}
        data["metrics_verdict"] = quality["verdict"]
        data["metrics_doubts"] = "; ".join(quality["reasons"])
        for k in EVIDENCE_KEYS:
            data[k] = _number(quality["evidence"].get(k))
        if quality["verdict"] == "doubtful":
            run.summary.doubtful += 1
        data["raw_seq_num"] = r.seq_num
        data["latency_s"] = latency_s
        data["processing_s"] = float(sum(r.timings_s.values()))
        data["lag_s"] = now - raw_time if raw_time is not None else math.nan
        return data

    def _store(self, run: _Run, good: list[FrameResult]):
        """Append the corrected folds to the run's file: their ``(start, stop)`` rows, or
        None when they cannot be written (the run's first such error is logged, once)."""
        if run.write_error is None:
            try:
                return run.writer.append(np.stack([r.corrected for r in good]))
            except Exception as exc:  # noqa: BLE001 - a full disk or a bad file loses folds, not frames
                run.write_error = f"{type(exc).__name__}: {exc}"
                logger.error(
                    "live_bgsub: run %s: corrected folds can no longer be written (%s); from frame %s on, "
                    "frames fail and keep their metrics in stream 'metrics_only'",
                    run.uid, run.write_error, good[0].seq_num,
                )
        return None

    def _metrics_only(self, run: _Run, good: list[FrameResult], received: dict) -> None:
        """Frames whose corrected fold was lost: failed, with their metrics kept."""
        desc = run.descriptors.get("metrics_only")
        if desc is None:
            data_keys = {k: v for k, v in _primary_data_keys(run.engine.fold_shape).items() if k != "corrected"}
            desc = run.descriptors["metrics_only"] = run.bundle.compose_descriptor(name="metrics_only", data_keys=data_keys)
            self._emit("descriptor", desc.descriptor_doc)
        now_mono, now = time.monotonic(), time.time()
        for r in good:
            data = self._event_data(run, r, now_mono - received[r.seq_num], now)
            self._emit("event", desc.compose_event(data=data, timestamps={k: now for k in data}, time=now))
        run.summary.metrics_only += len(good)
        why = f"corrected fold not written ({run.write_error}); its metrics are in stream 'metrics_only'"
        self._fail(run, [FrameResult(r.seq_num, error=why) for r in good], log=False)

    def _fail(self, run: _Run, results: list[FrameResult], *, log: bool = True) -> None:
        for r in results:
            run.done_seqs.add(r.seq_num)
            run.summary.failed[r.seq_num] = r.error
            run.pending_failures.append((r.seq_num, "failed", r.error))
            if log:
                logger.warning("live_bgsub: run %s frame %s failed: %s", run.uid, r.seq_num, r.error)
        if run.engine is not None:
            self._ensure_started(run)

    def _emit_failure(self, run: _Run, seq: int, status: str, error: str) -> None:
        desc = run.descriptors.get("failures")
        if desc is None:
            desc = run.descriptors["failures"] = run.bundle.compose_descriptor(
                name="failures",
                data_keys={
                    "raw_seq_num": {"source": "live_bgsub", "dtype": "integer", "shape": []},
                    "status": {"source": "live_bgsub", "dtype": "string", "shape": []},
                    "error": {"source": "live_bgsub", "dtype": "string", "shape": []},
                },
            )
            self._emit("descriptor", desc.descriptor_doc)
        now = time.time()
        data = {"raw_seq_num": int(seq), "status": status, "error": str(error)}
        self._emit("event", desc.compose_event(data=data, timestamps={k: now for k in data}, time=now))

    def _start_derived(self, run: _Run) -> None:
        raw = run.start
        metadata = {
            "plan_name": "live_bgsub",
            "raw_uid": raw["uid"],
            "live_bgsub_version": __version__,
            "processing": run.engine.describe() if run.engine is not None else self.step.describe(),
            "data_key": run.frames.data_key,
        }
        if raw.get("scan_id") is not None:
            metadata["raw_scan_id"] = raw["scan_id"]
        if run.engine is not None:
            metadata["geometry"] = run.summary.geometry
            metadata["fold_shape"] = list(run.engine.fold_shape)
            metadata["shape"] = list(run.engine.shape)
        if run.summary.disabled:
            metadata["disabled"] = run.summary.disabled
        uid = self._derived_uid(raw) if self._derived_uid is not None else None
        run.bundle = compose_run(uid=uid, metadata=metadata)
        run.summary.derived_uid = run.bundle.start_doc["uid"]
        self._emit("start", run.bundle.start_doc)

    def _ensure_started(self, run: _Run) -> None:
        """Emit the derived start (once), the primary stream's descriptor and stream
        resource (once the engine exists), then any failures recorded so far."""
        if run.bundle is None:
            self._start_derived(run)
        if run.engine is not None and "primary" not in run.descriptors:
            self._start_primary(run)
        pending, run.pending_failures = run.pending_failures, []
        for seq, status, error in pending:
            self._emit_failure(run, seq, status, error)

    def _start_primary(self, run: _Run) -> None:
        fold_shape = list(run.engine.fold_shape)
        desc = run.descriptors["primary"] = run.bundle.compose_descriptor(name="primary", data_keys=_primary_data_keys(fold_shape))
        self._emit("descriptor", desc.descriptor_doc)
        derived_uid = run.summary.derived_uid
        try:
            run.writer = FoldWriter(self.directory / f"{derived_uid}_corrected.h5", fold_shape)
        except Exception as exc:  # noqa: BLE001 - no file, no folds: the metrics still go out
            run.write_error = f"{type(exc).__name__}: {exc}"
            logger.error("live_bgsub: run %s: cannot create the corrected folds' file (%s); frames keep their metrics in stream 'metrics_only'", run.uid, run.write_error)
            return
        run.sres_bundle = run.bundle.compose_stream_resource(
            mimetype="application/x-hdf5",
            uri=run.writer.uri,
            data_key="corrected",
            parameters={"dataset": DATASET, "chunk_shape": [1, *fold_shape]},
        )
        self._emit("stream_resource", run.sres_bundle.stream_resource_doc)

    def _finish(self, run: _Run) -> None:
        try:
            if run.buffer:  # fewer frames than geometry_frames: estimate from what came
                frames, run.buffer = run.buffer, []
                self._build_engine(run, frames)
                if run.engine is not None:
                    self._process(run, frames)
            self._ensure_started(run)
            s = run.summary
            # Every received frame ends in exactly one count: one that a fault left in
            # none of them is unprocessed, with why.
            settled = run.done_seqs | set(s.skipped) | set(s.unprocessed)
            for seq in sorted(run.received_seqs - settled):
                s.unprocessed[seq] = "lost inside live_bgsub after an internal error (see the log)"
            for seq in s.skipped:
                self._emit_failure(run, seq, "skipped", "the queue was full (on_full='skip')")
            for seq, why in sorted(s.unprocessed.items()):
                self._emit_failure(run, seq, "unprocessed", why)
            for seq, why in sorted(s.missing.items()):
                self._emit_failure(run, seq, "missing", why)
            s.reason = (
                f"received {s.received}, processed {s.processed}, failed {len(s.failed)}, "
                f"skipped {len(s.skipped)}, unprocessed {len(s.unprocessed)}"
            )
            if s.missing:
                s.reason += f", missing {len(s.missing)}"
            if s.bad_documents:
                s.reason += f"; {s.bad_document_count} document(s) not understood, frames unknown: " + "; ".join(s.bad_documents[:3])
            if s.timed_out:
                s.reason += f"; stop timeout of {self.stop_timeout_s} s reached"
            if s.disabled:
                s.reason += f"; {s.disabled}"
            if run.write_error:
                s.reason += f"; corrected folds not written ({run.write_error})"
                if s.metrics_only:
                    s.reason += f", metrics of {s.metrics_only} of those frames in stream 'metrics_only'"
            if run.geometry_estimate is not None and not run.geometry_estimate.quality.good:
                s.reason += "; doubtful geometry: " + "; ".join(run.geometry_estimate.quality.reasons)
            if s.doubtful:
                s.reason += f"; metrics doubtful in {s.doubtful} of {s.processed} processed frames (events' metrics_doubts)"
            s.undelivered = self._undelivered(run)
            if s.undelivered:
                s.reason += "; " + s.undelivered
            raw_exit = (run.stop_doc or {}).get("exit_status")
            s.exit_status = "success" if s.complete else "fail"
            if raw_exit and raw_exit != "success":
                # The raw run itself is incomplete: so is the derived run.
                s.reason += f"; raw run exit_status {raw_exit!r}"
                raw_reason = (run.stop_doc or {}).get("reason")
                if raw_reason:
                    s.reason += f" ({raw_reason})"
                s.exit_status = raw_exit if raw_exit in ("abort", "fail") else "fail"
            stop = run.bundle.compose_stop(exit_status=s.exit_status, reason=s.reason)
            if run.writer is not None:
                run.writer.close()
            self._emit("stop", stop)
            logger.info("live_bgsub: run %s -> derived %s: %s", run.uid, s.derived_uid, s.reason)
        finally:
            self._reader.close()
            self._forget(run)
            run.done.set()

    def _undelivered(self, run: _Run) -> str:
        """What the publishers that keep such counts (``flush(timeout)`` and
        ``undelivered(uid)``, as :class:`~live_bgsub.sinks.tiled.TiledPublisher`) could
        not deliver of the raw and the derived run so far ("" when everything went)."""
        said = []
        for publish in self._publishers:
            if not (hasattr(publish, "undelivered") and hasattr(publish, "flush")):
                continue
            try:
                flushed = publish.flush(None if math.isinf(self.stop_timeout_s) else self.stop_timeout_s)
                counts = {"raw": publish.undelivered(run.uid), "derived": publish.undelivered(run.summary.derived_uid)}
            except Exception as exc:  # noqa: BLE001 - a sink's own failure is still news
                said.append(f"{type(publish).__name__} could not say what it delivered ({type(exc).__name__}: {exc})")
                continue
            lost = [f"{which} run {n} document(s)" for which, n in counts.items() if n]
            where = getattr(publish, "backup_directory", None)
            keep = f" (kept in the backup {where}: live-bgsub recover {where})" if where else " (no backup kept)"
            if lost:
                said.append(f"not delivered by {type(publish).__name__}: " + ", ".join(lost) + keep)
            if not flushed:
                said.append(f"{type(publish).__name__} had not delivered everything within {self.stop_timeout_s} s of the stop")
        return "; ".join(said)

    def _forget(self, run: _Run) -> None:
        """Drop a finished run's heavy state (fold map, buffers, event times, datums, its
        documents' routes); keep its summary (the last ``KEEP_RUNS`` runs)."""
        run.engine = None
        run.buffer = []
        run.frames.release()
        run.descriptors = {}
        run.writer = None
        run.sres_bundle = None
        self._index.forget(run.uid)
        finished = [uid for uid, r in list(self.runs.items()) if r.done.is_set()]
        for uid in finished[: max(0, len(finished) - KEEP_RUNS)]:
            self.runs.pop(uid, None)

    def _emit(self, name: str, doc: dict) -> None:
        for publish in self._publishers:
            try:
                publish(name, doc)
            except Exception:  # one sink failing must not stop the others
                logger.exception("live_bgsub: publishing %s failed", name)
                self._errors.append(f"publish {name}: failed (see log)")

# ---------------------------------------------------------------------- helpers


def _prepared_key(shape, geometry: Geometry, dtype) -> tuple:
    return (tuple(shape), tuple(geometry.center), geometry.rotation_deg, np.dtype(dtype).str)


def _primary_data_keys(fold_shape) -> dict:
    data_keys = {
        "corrected": {
            "source": "live_bgsub",
            "dtype": "array",
            "dtype_numpy": "<f4",
            "shape": list(fold_shape),
            "external": "STREAM:",
        },
        "raw_seq_num": {"source": "live_bgsub", "dtype": "integer", "shape": []},
        "latency_s": {"source": "live_bgsub", "dtype": "number", "shape": [], "units": "s"},
        "lag_s": {"source": "live_bgsub", "dtype": "number", "shape": [], "units": "s"},
        "processing_s": {"source": "live_bgsub", "dtype": "number", "shape": [], "units": "s"},
        "equator_found": {"source": "live_bgsub", "dtype": "boolean", "shape": []},
        "metrics_verdict": {"source": "live_bgsub", "dtype": "string", "shape": []},
        "metrics_doubts": {"source": "live_bgsub", "dtype": "string", "shape": []},
    }
    for k in METRIC_KEYS + EVIDENCE_KEYS:
        data_keys[k] = {"source": "live_bgsub", "dtype": "number", "shape": []}
    return data_keys




def _unusable_for_geometry(array) -> str | None:
    """Why a frame must not be used to estimate the geometry (None: it may)."""
    data, valid = mask_invalid(np.asarray(array))
    fraction = float(valid.mean()) if valid.size else 0.0
    if fraction < MIN_VALID_FRACTION:
        return f"only {fraction:.1%} of the frame's pixels are valid, at least {MIN_VALID_FRACTION:.0%} expected"
    values = data[valid]
    if values.min() == values.max():
        return f"every valid pixel reads {values.min():g}: no pattern"
    return None


def _accounted(run: _Run, seq: int) -> bool:
    s = run.summary
    return seq in run.done_seqs or seq in s.unprocessed or seq in s.skipped






def _as_geometry(value, what: str) -> Geometry:
    if isinstance(value, Geometry):
        return value
    if isinstance(value, dict) and "center" in value and "rotation_deg" in value:
        center = value["center"]
        if len(center) != 2:
            raise ValueError(f"{what}: center must be (x, y), got {center!r}")
        return Geometry((float(center[0]), float(center[1])), float(value["rotation_deg"]))
    raise ValueError(f"{what} must be a Geometry or a dict with 'center' (x, y) and 'rotation_deg', got {value!r}")


def _geometry_from(md: dict, where: str):
    for candidate in (md.get("geometry"), md):
        if isinstance(candidate, dict) and "center" in candidate and "rotation_deg" in candidate:
            try:
                return _as_geometry(candidate, f"{where} metadata"), where
            except (ValueError, TypeError) as exc:
                logger.warning("live_bgsub: ignoring geometry in %s: %s", where, exc)
    return None


def geometry_from_configuration(config: dict) -> Geometry | None:
    """The geometry a detector's configuration gives, or None.

    ``config`` maps configuration keys to values (a descriptor's ``configuration``
    data, or ``{k: v["value"] for k, v in device.read_configuration().items()}``): the
    geometry is ``*_center`` (x, y), or ``*_center_x`` and ``*_center_y``, with
    ``*_rotation_deg``, exactly one key of each; a malformed one is logged and ignored.

    Examples
    --------
    >>> geometry_from_configuration({"det_center_x": 410.0, "det_center_y": 520.0, "det_rotation_deg": 3.0})
    Geometry(center=(410.0, 520.0), rotation_deg=3.0)
    >>> geometry_from_configuration({"det_center_x": 410.0}) is None
    True
    """
    found = _geometry_from_config(config)
    return None if found is None else found[0]


def _geometry_from_config(config: dict):
    """``(geometry, "configuration")`` from a detector's configuration, or None
    (:func:`geometry_from_configuration`)."""

    def one(suffix):
        found = [v for k, v in config.items() if k.endswith(suffix)]
        return found[0] if len(found) == 1 else None

    center = one("center")
    if center is None and one("center_x") is not None and one("center_y") is not None:
        center = (one("center_x"), one("center_y"))
    rotation = one("rotation_deg")
    if center is not None and rotation is not None:
        try:
            return _as_geometry({"center": center, "rotation_deg": rotation}, "detector configuration"), "configuration"
        except (ValueError, TypeError) as exc:
            logger.warning("live_bgsub: ignoring geometry in the detector configuration: %s", exc)
    return None


def _lookup(run: _Run, key: str):
    value = run.start.get(key)
    if value is None:
        found = [v for k, v in run.frames.config.items() if k.endswith(key)]
        value = found[0] if len(found) == 1 else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan

