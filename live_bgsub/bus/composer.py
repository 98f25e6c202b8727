"""The bus's composer: results in frame order, one derived run per raw run, exactly once.

``live-bgsub compose --nats URL`` runs one :class:`Composer` per deployment. It is the
live callback (:class:`~live_bgsub.callback.LiveBackgroundSubtraction`) with its
processing done elsewhere:

- the raw documents come from :data:`~live_bgsub.bus.jetstream.DOCS_STREAM`; the
  callback works out the run's frames and geometry from them exactly as in process
  (start metadata, detector configuration, or the first usable frames);
- once the geometry is known, the engine the callback asks for is a
  :class:`RemoteEngine`: it writes the run's :class:`~live_bgsub.bus.jetstream.
  RunPlan` for the workers (``create``: the first plan of a run wins) and, for each
  micro-batch, waits for the workers' results of those frames, in frame order;
- the derived run (HDF5 corrected folds, Tiled, PVs: any publisher) is composed by the
  callback: the same documents, accounting and verdicts as in process.

A result that comes twice (a task redelivered after its worker died) is taken once, by
``seq_num``. When the derived run is stopped and its publishers have flushed, the run
is recorded in :data:`~live_bgsub.bus.jetstream.DONE_BUCKET` and its messages are
purged from the documents' and results' streams.

Restart: the composer keeps no state of its own. Started again after a crash, it
reads every run still in the streams from the beginning: a run recorded as done is
skipped; any other run is composed again from its documents and results, under the
same derived uid (:func:`~live_bgsub.bus.jetstream.derived_uid` of the job), after asking each
publisher that can (``discard(uid)``, as :class:`~live_bgsub.sinks.tiled.
TiledPublisher`) to drop what it holds of that derived run, and removing its partial
HDF5 file. The derived run is then the one a fault-free composer would have written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from pathlib import Path

from .. import wire
from ..callback import LiveBackgroundSubtraction
from ..engine import FrameResult, ProcessingStep, make_step
from ..fold import fold_extent
from .jetstream import (
    DOCS_STREAM,
    DONE_BUCKET,
    PLANS_BUCKET,
    PROCESSING_HEADER,
    RESULTS_STREAM,
    RunPlan,
    connect,
    derived_uid,
    ensure_layout,
    quality_dict,
    subject,
)

__all__ = ["Composer", "RemoteEngine", "ResultBoard"]

logger = logging.getLogger("live_bgsub.bus.composer")


class ResultBoard:
    """Results by run and ``seq_num``, filled by the results subscription and taken by
    the run's :class:`RemoteEngine`; a second result for a frame is dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._results: dict[str, dict[int, dict]] = {}
        self._taken: dict[str, set[int]] = {}
        self.duplicates = 0

    def put(self, run_uid: str, seq: int, result: dict) -> None:
        with self._cond:
            waiting = self._results.setdefault(run_uid, {})
            if seq in waiting or seq in self._taken.get(run_uid, ()):
                self.duplicates += 1
                return
            waiting[seq] = result
            self._cond.notify_all()

    def take(self, run_uid: str, seqs: list[int], timeout: float) -> dict[int, dict]:
        """The results of ``seqs`` (those in by ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                waiting = self._results.get(run_uid, {})
                if all(s in waiting for s in seqs):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken = self._taken.setdefault(run_uid, set())
            out = {}
            for s in seqs:
                if s in waiting:
                    out[s] = waiting.pop(s)
                    taken.add(s)
            return out

    def forget(self, run_uid: str) -> None:
        with self._cond:
            self._results.pop(run_uid, None)
            self._taken.pop(run_uid, None)


class _PlannedStep(ProcessingStep):
    """The processing a composer asks of its workers: described, never run here (a
    model is not loaded by the composer)."""

    batched = False

    def __init__(self, processing: dict):
        self.processing = dict(processing)
        self.method = processing["method"]

    def describe(self) -> dict:
        from ..background import WORKING_DOWNSAMPLE
        from ..inference import MODEL_PREFIX

        downsample = self.processing.get("downsample")
        if downsample is None and not self.method.startswith(MODEL_PREFIX):
            downsample = WORKING_DOWNSAMPLE  # a model's own is known to the workers that load it
        return {"method": self.method, "parameters": dict(self.processing.get("params") or {}),
                "downsample": downsample}

    def subtract(self, folds, masks):  # pragma: no cover - never called: workers process
        raise RuntimeError("the composer does not process frames")


class RemoteEngine:
    """The engine of one run in the composer: publishes the plan, waits for results."""

    reads_frames = False

    def __init__(self, composer: Composer, job: str, plan: RunPlan):
        self.composer = composer
        self.job = job
        self.plan = plan
        self.shape = tuple(plan.shape)
        # The workers' fold shape, known from the plan: a run whose every frame fails
        # still gets its derived run (it was None until a result brought a fold).
        self.fold_shape = fold_extent(self.shape, plan.geometry)
        self._described: dict | None = None
        composer._write_plan(job, plan)

    def describe(self) -> dict:
        if self._described is not None:
            return dict(self._described)
        return {**_PlannedStep(self.plan.processing).describe(), "center": list(self.plan.center),
                "rotation_deg": self.plan.rotation_deg, "shape": list(self.shape)}

    def process(self, frames, seq_nums) -> list[FrameResult]:
        seqs = [int(s) for s in seq_nums]
        got = self.composer.board.take(self.job, seqs, self.composer.result_timeout_s)
        out = []
        for s in seqs:
            r = got.get(s)
            if r is None:
                out.append(FrameResult(s, error=f"no worker returned a result within {self.composer.result_timeout_s} s"))
                continue
            if r.get("describe") and self._described is None:
                self._described = dict(r["describe"])
            out.append(FrameResult(s, corrected=r.get("corrected"), metrics=r.get("metrics") or {},
                                   error=r.get("error"), timings_s=r.get("timings_s") or {}))
        return out


class Composer:
    """Compose derived runs from the bus: see the module docstring.

    Parameters
    ----------
    url : str
        The NATS server.
    publish : callable or list of callables
        Receivers of the derived documents (a TiledPublisher, ...).
    method, params, downsample : optional
        The default processing (a run may bring its own from its publisher).
    directory : path-like
        Where the derived HDF5 files go (shared with whoever reads them).
    result_timeout_s : float, optional
        How long the composer waits for a frame's result before it counts the frame
        as failed (default 600 s; workers that are all down stall a run this long).
    callback_kwargs : optional
        Further options of the callback (``geometry``, ``geometry_frames``,
        ``batch_size``, ``pixel_size_mm``, ...).
    """

    def __init__(self, url: str, publish=None, *, method: str = "white-top-hat", params: dict | None = None,
                 downsample: int | None = None, directory="derived", result_timeout_s: float = 600.0, **callback_kwargs):
        self.url = url
        self.default_processing = {"method": method, "params": dict(params or {}),
                                   "downsample": None if downsample is None else int(downsample)}
        if not str(method).startswith("model:"):  # a bad classical method fails here, in one line
            make_step(method, params, downsample=downsample)
        self.directory = Path(directory)
        self.result_timeout_s = float(result_timeout_s)
        self.board = ResultBoard()
        self._publishers = list(publish) if isinstance(publish, (list, tuple)) else ([publish] if publish else [])
        # The raw stop comes long before the workers' last results: frames are given up
        # by result_timeout_s per batch, not by a time after the stop.
        callback_kwargs.setdefault("stop_timeout_s", math.inf)
        self._callback_kwargs = callback_kwargs
        self._callbacks: dict[str, LiveBackgroundSubtraction] = {}
        self._jobs: dict[tuple, str] = {}  # (processing key, raw uid) -> job
        self._loop: asyncio.AbstractEventLoop | None = None
        self._js = None
        self._done_kv = None
        self._plans_kv = None
        self.composed: list[str] = []  # raw uids whose derived run this composer finished
        self.skipped_done = 0  # documents of runs already done, skipped after a restart
        self._finished = threading.Condition()

    # ------------------------------------------------------------------ running

    def run(self, *, stop=None) -> None:
        """Compose until ``stop`` (a threading.Event) is set."""
        asyncio.run(self.serve(stop=stop))

    async def serve(self, *, stop=None, ready=None) -> None:
        self._loop = asyncio.get_running_loop()
        nc, js = await connect(self.url, name="live_bgsub-composer")
        self._js = js
        feeder = _Feeder(self)
        try:
            await ensure_layout(js)
            self._done_kv = await js.key_value(DONE_BUCKET)
            self._plans_kv = await js.key_value(PLANS_BUCKET)
            results = await js.subscribe("lbs.results.>", stream=RESULTS_STREAM, ordered_consumer=True, cb=self._on_result)
            docs = await js.subscribe("lbs.docs.>", stream=DOCS_STREAM, ordered_consumer=True, cb=feeder.on_message)
            if ready is not None:
                ready.set()
            if stop is None:
                await asyncio.Event().wait()  # the subscriptions do the work, for ever
            else:
                await asyncio.to_thread(stop.wait)
            await docs.unsubscribe()
            await results.unsubscribe()
        finally:
            feeder.close()
            for cb in self._callbacks.values():
                cb.close(timeout=5)
            await nc.close()

    async def _on_result(self, msg) -> None:
        try:
            _, r = wire.decode(msg.data, name="result")
        except wire.WireError as exc:
            logger.error("live_bgsub composer: a result that is not a result (%s): dropped", exc)
            return
        self.board.put(r["job"], int(r["seq_num"]), r)

    # ------------------------------------------------------------------ per run

    def callback_for(self, raw_uid: str, processing: dict, job: str) -> LiveBackgroundSubtraction:
        """The callback composing job ``job`` of ``raw_uid`` (one per processing; made on first use)."""
        key = repr(sorted(processing.items()))
        self._jobs[key, raw_uid] = job
        cb = self._callbacks.get(key)
        if cb is None:
            def factory(step, geometry, shape, mask, *, run_start, metrics, geometry_quality, **roi):
                plan = RunPlan(processing=processing, center=geometry.center, rotation_deg=geometry.rotation_deg,
                               shape=tuple(shape), mask=mask, metrics=metrics,
                               geometry_quality=quality_dict(geometry_quality), roi=roi)
                return RemoteEngine(self, self._jobs[key, run_start["uid"]], plan)

            factory.reads_frames = False  # workers read the frames; the callback only for the geometry

            cb = LiveBackgroundSubtraction(
                self._publishers, method=_PlannedStep(processing), directory=self.directory, on_full="block",
                engine_factory=factory, derived_uid=lambda start: derived_uid(self._jobs[key, start["uid"]], processing),
                accelerate=False, **self._callback_kwargs,
            )
            self._callbacks[key] = cb
        return cb

    def _write_plan(self, job: str, plan: RunPlan) -> None:
        """Write the plan unless the job has one (a restarted composer reuses it)."""
        fut = asyncio.run_coroutine_threadsafe(self._create_plan(job, plan), self._loop)
        stored = fut.result()
        if stored is not None:
            plan.__dict__.update(stored.__dict__)

    async def _create_plan(self, job: str, plan: RunPlan) -> RunPlan | None:
        try:
            await self._plans_kv.create(job, plan.to_bytes())
            return None
        except Exception as exc:  # noqa: BLE001 - KeyWrongLastSequenceError: it exists
            entry = await self._plans_kv.get(job)
            logger.info("live_bgsub composer: job %s already has a plan (%s); using it", job, type(exc).__name__)
            return RunPlan.from_bytes(entry.value)

    async def is_done(self, job: str) -> bool:
        try:
            entry = await self._done_kv.get(job)
            return entry is not None and entry.value is not None
        except Exception:  # noqa: BLE001 - KeyNotFoundError
            return False

    async def finished(self, job: str, raw_uid: str, derived: str | None) -> None:
        """The derived run is stopped and flushed: record the job, purge its messages."""
        await self._done_kv.put(job, (derived or "").encode())
        for stream, kind in ((DOCS_STREAM, "docs"), (RESULTS_STREAM, "results")):
            try:
                await self._js.purge_stream(stream, subject=subject(kind, job))
            except Exception as exc:  # noqa: BLE001 - kept messages cost disk, not correctness
                logger.warning("live_bgsub composer: purging %s of job %s failed: %s", kind, job, exc)
        self.board.forget(job)
        with self._finished:
            self.composed.append(raw_uid)
            self._finished.notify_all()

    def discard(self, derived: str) -> None:
        """Before composing a run again: drop what publishers and the directory hold of it."""
        for publish in self._publishers:
            if hasattr(publish, "discard"):
                try:
                    publish.discard(derived)
                except Exception:  # noqa: BLE001 - a publisher that cannot discard keeps its partial run
                    logger.exception("live_bgsub composer: %r could not discard derived run %s", publish, derived)
        partial = self.directory / f"{derived}_corrected.h5"
        if partial.exists():
            partial.unlink()

    def wait_composed(self, raw_uid: str, timeout: float | None = None) -> bool:
        """Wait until this composer has finished ``raw_uid`` (True) or the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._finished:
            while raw_uid not in self.composed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._finished.wait(remaining)
        return True


class _Feeder:
    """Hands documents to the callbacks on a thread of its own (a callback may block on
    its queue or on results; the subscriptions' loop must not)."""

    #: Documents waiting for the feeder thread before the subscription waits too.
    QUEUE = 256

    def __init__(self, composer: Composer):
        self.composer = composer
        self._queue: list = []
        self._cond = threading.Condition()
        self._tokens: dict[str, str] = {}  # job -> raw uid (loop thread only)
        self._runs: dict[str, tuple] = {}  # job -> (callback or None, processing or None) (feeder thread only)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="live_bgsub-composer-feed", daemon=True)
        self._thread.start()

    async def on_message(self, msg) -> None:
        try:
            name, doc = wire.decode(msg.data)
        except wire.WireError as exc:
            logger.error("live_bgsub composer: a document that is not one (%s): dropped", exc)
            return
        job = msg.subject.split(".", 2)[-1]
        processing = None
        if name == "start":
            self._tokens[job] = doc["uid"]
            if not await self.composer.is_done(job):
                asked = (msg.headers or {}).get(PROCESSING_HEADER)
                processing = json.loads(asked) if asked else self.composer.default_processing
        run_uid = self._tokens.get(job)
        await asyncio.to_thread(self._put, (name, doc, run_uid, job, processing))

    def _put(self, item) -> None:
        with self._cond:
            while len(self._queue) >= self.QUEUE and not self._closed:
                self._cond.wait()
            self._queue.append(item)
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                item = self._queue.pop(0)
                self._cond.notify_all()
            try:
                self._feed(*item)
            except Exception:  # noqa: BLE001 - the feeder must survive anything
                logger.exception("live_bgsub composer: feeding a %s document failed", item[0])

    def _feed(self, name: str, doc: dict, run_uid: str | None, job: str, processing: dict | None) -> None:
        if name == "start":
            self._runs[job] = (None, processing)
        if run_uid is None or job not in self._runs:
            return
        cb, processing = self._runs[job]
        if processing is None:  # composed before a restart
            self.composer.skipped_done += 1
            return
        if cb is None:
            self.composer.discard(derived_uid(job, processing))
            cb = self.composer.callback_for(run_uid, processing, job)
            self._runs[job] = (cb, processing)
        cb(name, doc)
        if name == "stop":
            self._runs.pop(job, None)
            threading.Thread(target=self._when_done, args=(cb, run_uid, job), name="live_bgsub-composer-done", daemon=True).start()

    def _when_done(self, cb: LiveBackgroundSubtraction, run_uid: str, job: str) -> None:
        cb.wait(run_uid)
        summary = cb.summary(run_uid)
        for publish in self.composer._publishers:
            if hasattr(publish, "flush"):
                publish.flush(60)
        try:
            asyncio.run_coroutine_threadsafe(self.composer.finished(job, run_uid, summary.derived_uid), self.composer._loop).result()
        except RuntimeError:  # the composer stopped meanwhile: the job is composed again at its next start
            logger.warning("live_bgsub composer: stopped before recording job %s as done; it is composed again when the composer starts", job)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
