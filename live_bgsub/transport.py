"""Find what a lossy transport (0MQ) dropped from a run's documents, and say so.

:class:`GapDetector` sits in front of a :class:`~live_bgsub.callback.
LiveBackgroundSubtraction` and passes every document on unchanged. On the way it
keeps, per raw run, which frames of the frame stream the callback can receive, and
it repairs what the transport broke:

- **a run's stop arrives**: the frames ``1..num_events[stream]`` that the callback
  never received are reported with :meth:`~live_bgsub.callback.
  LiveBackgroundSubtraction.mark_missing` (reason ``"lost in transport (0MQ)"``)
  before the stop is passed on, so the derived run lists them (``failures`` stream,
  status ``missing``) and its stop is not a success;
- **a run's stop never arrives**: once the run has been silent for ``run_timeout``
  seconds (:meth:`expire`, called periodically by the owner), the frames below the
  highest frame seen (``K``) that never arrived are marked missing and a raw stop is
  made up (``exit_status="fail"``, reason ``"stop document never arrived: 0MQ drop
  suspected; frames after seq_num K unknown"``) and fed to the callback, which
  finishes the derived run and marks it incomplete. Documents of that run arriving
  later are dropped and counted (:attr:`late`): the derived run is closed;
- **a run's start never arrives** (0MQ dropped it, or the server was not running when
  the run began: a restart): its documents cannot be routed; they are dropped,
  counted per run (:attr:`orphans`; events and StreamDatums, which do not name their
  run, under ``"?"``) and logged once per run. With ``derive_missed_starts`` (what
  ``live-bgsub serve`` uses), the run's stop, which names it, still yields a derived
  run: a start is made up (marked ``live_bgsub_start_missed``), all frames
  ``1..num_events[stream]`` are marked missing (reason :data:`START_MISSED`: without
  the start and descriptor none of them can be read) and the stop is passed on as a
  failure whose reason says the start was missed. The raw run, if it is archived, can
  be replayed as a whole (``frames_to_fill`` lists every frame).

A new run's start does *not* finish an earlier run that is still open: several
RunEngines may publish into one proxy, and a plan may hold several runs open.

What "received" means follows what the callback needs to process a frame: for a
frame data key announced by StreamResource/StreamDatum (``external="STREAM:"``) it
is a StreamDatum covering the frame's seq_num (its event alone does not carry the
frame; an event lost while its StreamDatum arrived is processed, with a NaN lag);
for inline frames and area-detector Resource/Datum it is the event (a Datum lost
behind a received event is reported by the callback as ``unprocessed``).

Documents reach their run through a :class:`~live_bgsub.routing.RunIndex` (not
event-model's RunRouter, which raises for the documents of a run whose start never
came, where this detector counts them per run).

The detector is not thread-safe by itself; it takes a lock, so documents may come
from one thread (the 0MQ loop) and :meth:`expire` / :meth:`finish_all` from another.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from .routing import RunIndex

__all__ = ["LOST_IN_TRANSPORT", "START_MISSED", "START_MISSED_KEY", "GapDetector", "TransportReport"]

logger = logging.getLogger("live_bgsub.transport")

#: Reason given to :meth:`LiveBackgroundSubtraction.mark_missing` for dropped frames.
LOST_IN_TRANSPORT = "lost in transport (0MQ)"
#: Reason given for the frames of a run whose start never arrived.
START_MISSED = "start document never arrived (the server was not listening when the run began, or 0MQ dropped it)"
#: Key of a made-up start document (see ``derive_missed_starts``).
START_MISSED_KEY = "live_bgsub_start_missed"
_KEEP_FINISHED = 1000  # finished runs remembered (late documents, reports)


@dataclass
class TransportReport:
    """What the transport delivered of one raw run.

    ``missing`` are the raw seq_nums reported missing; ``finished_by`` is ``"stop"``
    (its stop arrived), ``"timeout"`` (silent for ``run_timeout`` s, stop made up)
    or ``"shutdown"`` (:meth:`GapDetector.finish_all`), or ``"start missed"`` (only
    its stop arrived; ``derive_missed_starts``), None while the run is open.
    ``highest_seq_num`` is the highest frame seen; ``expected`` is the stop's
    ``num_events`` for the frame stream (None without a stop).
    """

    raw_uid: str
    documents: int = 0
    events: int = 0
    frames_received: int = 0
    highest_seq_num: int = 0
    expected: int | None = None
    missing: list = field(default_factory=list)
    finished_by: str | None = None
    late_documents: int = 0


class _OpenRun:
    def __init__(self, uid: str, now: float):
        self.uid = uid
        self.last_seen = now
        self.report = TransportReport(uid)
        self.frame_descriptors: set[str] = set()
        self.frame_key: str | None = None
        self.frame_key_external: str | None = None
        self.event_seqs: set[int] = set()
        self.datum_seqs: set[int] = set()

    def snapshot(self) -> TransportReport:
        """The report with the counts filled in from what was seen so far."""
        self.report.events = len(self.event_seqs)
        self.report.frames_received = len(self.received())
        self.report.highest_seq_num = self.highest()
        return self.report

    def received(self) -> set[int]:
        """The frames the callback could receive (see the module docstring)."""
        if self.frame_key_external and self.frame_key_external.startswith("STREAM:"):
            return self.datum_seqs
        return self.event_seqs

    def highest(self) -> int:
        return max(max(self.event_seqs, default=0), max(self.datum_seqs, default=0))


class GapDetector:
    """Pass documents to ``callback``, reporting frames a lossy transport dropped.

    Parameters
    ----------
    callback : LiveBackgroundSubtraction
        Receives every document (and made-up stops); needs ``mark_missing``.
    run_timeout : float, optional
        Seconds without any document of an open run after which :meth:`expire`
        finishes it (default 300). Must exceed the longest quiet spell of a healthy
        run (a paused RunEngine, a slow step between frames).
    stream_name : str, optional
        The raw stream carrying the frames (default: ``callback.stream_name``, else
        ``"primary"``).
    data_key : str, optional
        The frames' data key (default: ``callback.data_key``, else the one 2-D key
        of the stream, as the callback picks it).
    clock : callable, optional
        Monotonic seconds (default :func:`time.monotonic`).
    on_finished : callable, optional
        Called as ``on_finished(report)`` after a run's stop (real or made up) was
        passed on; exceptions are logged.
    derive_missed_starts : bool, optional
        When the stop of a run whose start never arrived comes (a server restarted
        mid-run), make up its start so that the callback produces a derived run
        listing all its frames as missing (default False: only count; see the module
        docstring).

    Attributes
    ----------
    orphans : dict
        Run uid (or ``"?"`` when not even that is known) -> documents dropped because
        the run's start never arrived.
    late : int
        Documents dropped because their run had already been finished by timeout.
    """

    def __init__(
        self,
        callback,
        *,
        run_timeout: float = 300.0,
        stream_name: str | None = None,
        data_key: str | None = None,
        clock=time.monotonic,
        on_finished=None,
        derive_missed_starts: bool = False,
    ):
        if not hasattr(callback, "mark_missing"):
            raise TypeError(f"callback must offer mark_missing(raw_uid, seq_nums, reason), got {type(callback).__name__}")
        if not (isinstance(run_timeout, (int, float)) and run_timeout > 0):
            raise ValueError(f"run_timeout must be a positive number of seconds, got {run_timeout!r}")
        self.callback = callback
        self.run_timeout = float(run_timeout)
        self.stream_name = stream_name or getattr(callback, "stream_name", None) or "primary"
        self.data_key = data_key if data_key is not None else getattr(callback, "data_key", None)
        self.clock = clock
        self.on_finished = on_finished
        self.derive_missed_starts = bool(derive_missed_starts)
        self.orphans: dict[str, int] = {}
        self.late = 0
        self._lock = threading.RLock()
        self._open: dict[str, _OpenRun] = {}
        self._finished: collections.OrderedDict[str, TransportReport] = collections.OrderedDict()
        # Routes of the open runs and of the last finished ones (forgotten with their report).
        self._index = RunIndex(keep=None)

    # ------------------------------------------------------------------ queries

    @property
    def open_runs(self) -> list[str]:
        """Uids of runs started and not finished yet."""
        with self._lock:
            return list(self._open)

    def report(self, raw_uid: str) -> TransportReport:
        """The :class:`TransportReport` of a run (open, or among the last finished)."""
        with self._lock:
            if raw_uid in self._open:
                return self._open[raw_uid].snapshot()
            return self._finished[raw_uid]

    # ------------------------------------------------------------------ documents

    def __call__(self, name: str, doc: dict):
        """Inspect one document, pass it on (or drop it: see the module docstring)."""
        try:
            with self._lock:
                forward, finished = self._inspect(name, doc)
                if forward:
                    self.callback(name, doc)
        except Exception:
            logger.exception("transport: could not handle a %s document", name)
            return
        if finished is not None:
            self._notify(finished)

    def _inspect(self, name: str, doc: dict) -> tuple[bool, TransportReport | None]:
        now = self.clock()
        if name == "start":
            uid = doc["uid"]
            if uid in self._open or uid in self._finished:
                logger.warning("transport: start %s seen twice; the second is dropped", uid)
                return False, None
            self._open[uid] = _OpenRun(uid, now)
            self._open[uid].report.documents = 1
            self._index.add(name, doc)
            return True, None
        if name in ("stream_resource", "resource", "datum", "datum_page") and self._index.unattributed(name, doc):
            # run_start is optional in (stream) resources: pass on, attribute nothing.
            self._index.add(name, doc)
            return True, None
        run_uid = self._index.run_of(name, doc)
        run = self._open.get(run_uid) if run_uid else None
        if run is None:
            missed_start = name == "stop" and run_uid is not None and run_uid not in self._finished
            self._count_lost(name, run_uid)
            if missed_start and self.derive_missed_starts:
                return False, self._derive_missed_start(run_uid, doc, now)
            return False, None
        run.last_seen = now
        run.report.documents += 1
        self._index.add(name, doc)  # an open run's descriptors and resources route its later documents
        if name == "descriptor":
            if doc.get("name") == self.stream_name:
                self._learn_frame_key(run, doc)
        elif name == "event":
            if doc["descriptor"] in run.frame_descriptors:
                run.event_seqs.add(int(doc["seq_num"]))
        elif name == "event_page":
            if doc["descriptor"] in run.frame_descriptors:
                run.event_seqs.update(int(s) for s in doc["seq_num"])
        elif name == "stream_datum":
            sres = self._index.resource(doc["stream_resource"]) or {}
            key = sres.get("data_key") if sres.get("run_start") == run.uid else None
            if key is None and self._index.unattributed(name, doc):
                key = run.frame_key  # a StreamResource without run_start: trust the descriptor
            if doc.get("descriptor") in run.frame_descriptors and key is not None and key == run.frame_key:
                run.datum_seqs.update(range(int(doc["seq_nums"]["start"]), int(doc["seq_nums"]["stop"])))
        elif name == "stop":
            self._finish_with_stop(run, doc)
            return True, run.report
        return True, None

    def _count_lost(self, name: str, run_uid: str | None) -> None:
        if run_uid is not None and run_uid in self._finished:
            report = self._finished[run_uid]
            report.late_documents += 1
            self.late += 1
            if report.late_documents == 1:
                logger.warning(
                    "transport: run %s got a %s document after it was finished (%s); late documents are dropped",
                    run_uid, name, report.finished_by,
                )
            return
        key = run_uid or "?"
        self.orphans[key] = self.orphans.get(key, 0) + 1
        if self.orphans[key] == 1:
            logger.warning(
                "transport: a %s document of %s whose start never arrived (0MQ drop suspected); "
                "its documents are dropped and counted",
                name, f"run {run_uid}" if run_uid else "an unknown run",
            )
        if len(self.orphans) > _KEEP_FINISHED:
            self.orphans.pop(next(iter(self.orphans)))

    def _learn_frame_key(self, run: _OpenRun, doc: dict) -> None:
        run.frame_descriptors.add(doc["uid"])
        if run.frame_key is not None:
            return
        keys = doc.get("data_keys") or {}
        try:
            from .frames import pick_data_key

            run.frame_key = pick_data_key(keys, self.data_key, self.stream_name)
        except Exception as exc:  # noqa: BLE001 - the callback will say the same and disable the run
            logger.info("transport: run %s: no frame key (%s); counting events", run.uid, exc)
            return
        run.frame_key_external = (keys.get(run.frame_key) or {}).get("external")

    # ------------------------------------------------------------------ finishing runs

    def _finish_with_stop(self, run: _OpenRun, stop: dict) -> None:
        expected = (stop.get("num_events") or {}).get(self.stream_name)
        run.report.expected = None if expected is None else int(expected)
        missing = sorted(set(range(1, int(expected or 0) + 1)) - run.received())
        self._close(run, missing, "stop")

    def _derive_missed_start(self, uid: str, stop: dict, now: float) -> TransportReport | None:
        """The stop of a run never started: a derived run saying so (all frames missing)."""
        expected = (stop.get("num_events") or {}).get(self.stream_name)
        if not expected:
            return None  # no frames to account for: counting is enough
        run = _OpenRun(uid, now)
        self._open[uid] = run
        self.callback("start", {"uid": uid, "time": stop.get("time", time.time()), START_MISSED_KEY: START_MISSED})
        run.report.documents = self.orphans.get(uid, 0)
        run.report.expected = int(expected)
        self._close(run, list(range(1, int(expected) + 1)), "start missed", START_MISSED)
        raw = f"the raw stop says exit_status {stop.get('exit_status')!r}" + (f" ({stop['reason']})" if stop.get("reason") else "")
        self.callback("stop", {**stop, "exit_status": "fail", "reason": f"{START_MISSED}; {raw}"})
        logger.warning("transport: run %s: its start never arrived; derived run made with its %s frame(s) missing", uid, expected)
        return run.report

    def _close(self, run: _OpenRun, missing: list[int], finished_by: str, reason: str = LOST_IN_TRANSPORT) -> None:
        report = run.snapshot()
        report.missing = missing
        report.finished_by = finished_by
        if missing:
            try:
                self.callback.mark_missing(run.uid, missing, reason)
            except Exception:
                logger.exception("transport: could not mark %d frame(s) of run %s missing", len(missing), run.uid)
            logger.warning("transport: run %s: %d frame(s) missing (%s): %s", run.uid, len(missing), reason, _ranges(missing))
        del self._open[run.uid]
        self._finished[run.uid] = report
        while len(self._finished) > _KEEP_FINISHED:
            old, _ = self._finished.popitem(last=False)
            self._index.forget(old)

    def _make_up_stop(self, run: _OpenRun, finished_by: str, why: str) -> dict:
        highest = run.highest()
        missing = sorted(set(range(1, highest + 1)) - run.received())
        reason = f"{why}; frames after seq_num {highest} unknown"
        self._close(run, missing, finished_by)
        logger.warning("transport: run %s finished without its stop: %s", run.uid, reason)
        return {
            "uid": str(uuid.uuid4()),
            "time": time.time(),
            "run_start": run.uid,
            "exit_status": "fail",
            "reason": reason,
            "num_events": {self.stream_name: len(run.event_seqs)} if run.frame_descriptors else {},
        }

    def expire(self, now: float | None = None) -> list[str]:
        """Finish every open run silent for more than ``run_timeout`` seconds.

        Returns the uids of the runs finished. Call it periodically (the 0MQ server
        does, every ``min(1, run_timeout / 4)`` s).
        """
        now = self.clock() if now is None else now
        why = f"stop document never arrived: 0MQ drop suspected (no document for {self.run_timeout:g} s)"
        return self._finish(lambda run: now - run.last_seen > self.run_timeout, "timeout", why)

    def finish_all(self, why: str = "the server stopped before the run's stop document arrived") -> list[str]:
        """Finish every open run now (at shutdown), as :meth:`expire` does."""
        return self._finish(lambda run: True, "shutdown", why)

    def _finish(self, due, finished_by: str, why: str) -> list[str]:
        done = []
        with self._lock:
            for run in [r for r in self._open.values() if due(r)]:
                stop = self._make_up_stop(run, finished_by, why)
                try:
                    self.callback("stop", stop)
                except Exception:
                    logger.exception("transport: the callback failed on the made-up stop of run %s", run.uid)
                done.append(run.report)
        for report in done:
            self._notify(report)
        return [r.raw_uid for r in done]

    def _notify(self, report: TransportReport) -> None:
        if self.on_finished is None:
            return
        try:
            self.on_finished(report)
        except Exception:
            logger.exception("transport: on_finished failed for run %s", report.raw_uid)


def _ranges(seqs: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts, start, prev = [], None, None
    for s in seqs:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = s
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(parts)
