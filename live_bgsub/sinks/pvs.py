"""Live ROI metrics and health of the analysis as EPICS PVs (Channel Access, caproto).

:class:`MetricsPVs` serves a small set of read-only PVs from the analysis process: a
caproto asyncio server runs in a background thread with its own event loop. Called
as a document callback, ``pvs(name, doc)``, it receives the *derived* run that
:class:`~live_bgsub.callback.LiveBackgroundSubtraction` publishes and updates the PVs
from it: the ROI metrics of the last processed frame, per-run counters, the lag, a
frame rate and a status string. Any Channel Access client reads them (pyepics
``caget``/``camonitor``, ``caproto-get``, CS-Studio/Phoebus, an IOC's CA links).

PVs (``PREFIX`` + suffix, see :data:`PV_SUFFIXES` and ``docs/pvs.md``): ``I11_I10``,
``S10_PX``, ``I10``, ``I11``, ``M3_INTENSITY``, ``LAG_MS``, ``FPS``, ``PROCESSED``,
``FAILED``, ``MISSING``, ``RAW_SEQ_NUM``, ``RAW_UID``, ``DERIVED_UID``, ``STATUS`` and
``MESSAGE``.

Threads: ``pvs(name, doc)`` runs on the caller's thread (the callback's worker). It
only updates a dictionary under a lock and, when nothing is pending yet, wakes the
server loop (``call_soon_threadsafe``); the loop writes the changed channels. So a
burst of events costs the caller microseconds per document and the PVs see the
latest values (intermediate values of a burst may be skipped, as with any monitor).
Nothing ever raises into the caller: errors are logged (logger
``live_bgsub.sinks.pvs``) and shown in ``STATUS``/``MESSAGE``. Documents reach their run
through a :class:`~live_bgsub.routing.RunIndex` (not event-model's RunRouter, which
raises for the documents of a run whose start these PVs did not see, e.g. when
subscribed in mid-run; they are ignored here).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from ..errors import LiveBgsubError
from ..routing import RunIndex

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["PV_SUFFIXES", "MetricsPVs", "PVServerError"]

logger = logging.getLogger("live_bgsub.sinks.pvs")

#: PV suffix -> (kind, units, what it holds). Kinds: ``double``, ``long``, ``string``
#: (DBR_STRING, at most 40 characters) and ``text`` (a CHAR waveform holding a long
#: string: ``caget -S``, pyepics ``caget(..., as_string=True)``).
PV_SUFFIXES = {
    "I11_I10": ("double", "", "I11/I10 of the last processed frame (NaN: no equator found)"),
    "S10_PX": ("double", "px", "d10 spacing on the detector (S10) of the last processed frame"),
    "I10": ("double", "", "integrated intensity of the 1,0 equatorial reflections, last frame"),
    "I11": ("double", "", "integrated intensity of the 1,1 equatorial reflections, last frame"),
    "M3_INTENSITY": ("double", "", "intensity of the M3 meridional reflection, last frame"),
    "LAG_MS": ("double", "ms", "raw event time -> derived event, last frame"),
    "FPS": ("double", "1/s", "derived frames per second over the last fps_window_s seconds"),
    "PROCESSED": ("long", "", "frames processed in the current derived run"),
    "FAILED": ("long", "", "frames of the current run that did not make it (failures stream, any status)"),
    "MISSING": ("long", "", "of FAILED, frames lost in transport (status 'missing')"),
    "RAW_SEQ_NUM": ("long", "", "raw seq_num of the last processed frame"),
    "RAW_UID": ("string", "", "uid of the raw run being processed"),
    "DERIVED_UID": ("string", "", "uid of the derived run being published"),
    "STATUS": ("string", "", "idle | running <raw uid[:8]> | finished <raw uid[:8]> <exit status> | error <what>"),
    "MESSAGE": ("text", "", "the full story: derived stop reason, or the error"),
}

#: Metrics copied from a derived ``primary`` event: data key -> PV suffix.
_METRIC_PVS = {"i11_i10": "I11_I10", "s10_px": "S10_PX", "i10": "I10", "i11": "I11", "m3_intensity": "M3_INTENSITY"}
_PRECISION = {"I11_I10": 4, "S10_PX": 3, "I10": 4, "I11": 4, "M3_INTENSITY": 4, "LAG_MS": 1, "FPS": 2}
#: Written last in a flush, so that a client that sees STATUS change sees the rest too.
_WRITE_LAST = ("MESSAGE", "STATUS")
_STRING_MAX = 40  # DBR_STRING
_TEXT_MAX = 1024
_KEEP_RUNS = 16


class PVServerError(LiveBgsubError, RuntimeError):
    """The metrics PV server could not be started."""


def _fit(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class _RunCounts:
    """What the PVs show about one derived run."""

    def __init__(self, raw_uid: str, derived_uid: str):
        self.raw_uid = raw_uid
        self.derived_uid = derived_uid
        self.processed = 0
        self.failed = 0
        self.missing = 0
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name
        self.event_times: deque = deque()  # derived event times (primary), for FPS


class MetricsPVs:
    """Serve the live callback's ROI metrics and health as read-only Channel Access PVs.

    Subscribe it to the derived run: ``LiveBackgroundSubtraction(publish=[pvs, ...])``
    or ``callback.subscribe(pvs)``.

    Parameters
    ----------
    prefix : str
        Prepended to every suffix of :data:`PV_SUFFIXES`, e.g. ``"BL18:BGSUB:"``.
    interfaces : list of str, optional
        Interfaces the server listens on; default: caproto's
        (``EPICS_CAS_INTF_ADDR_LIST``, else all interfaces).
    fps_window_s : float, optional
        ``FPS`` counts the derived frames of the last this many seconds (default 5).
    fps_refresh_s : float, optional
        How often ``FPS`` is recomputed without new frames (default 1 s), so that
        it falls to 0 within ``fps_window_s`` after frames stop coming.
    startup_timeout : float, optional
        Seconds :meth:`start` waits for the server to listen (default 10).
    start : bool, optional
        Start the server now (default True); otherwise call :meth:`start`.

    Attributes
    ----------
    pvnames : dict
        Suffix -> full PV name.
    errors : list of str
        Documents that could not be understood (also logged).

    Notes
    -----
    Counters (``PROCESSED``, ``FAILED``, ``MISSING``) and the metrics belong to the
    derived run started last: its start resets them (metrics to NaN). ``FPS`` is
    ``(n - k) / (t_last - t_first)`` over the derived ``primary`` events whose
    ``time`` lies in the last ``fps_window_s`` seconds, where ``k`` is the number of
    events sharing the oldest time (the callback stamps one micro-batch with one
    time, so a batch counts as one step); 0 with fewer than two distinct times.

    Examples
    --------
    >>> pvs = MetricsPVs("BL18:BGSUB:")                                # doctest: +SKIP
    >>> callback = LiveBackgroundSubtraction(publish=[publisher, pvs])  # doctest: +SKIP
    >>> # elsewhere: camonitor BL18:BGSUB:I11_I10 BL18:BGSUB:STATUS
    """

    def __init__(
        self,
        prefix: str,
        *,
        interfaces=None,
        fps_window_s: float = 5.0,
        fps_refresh_s: float = 1.0,
        startup_timeout: float = 10.0,
        start: bool = True,
    ):
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty string without whitespace, got {prefix!r}")
        for name, value in (("fps_window_s", fps_window_s), ("fps_refresh_s", fps_refresh_s), ("startup_timeout", startup_timeout)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self.prefix = prefix
        self.pvnames = {suffix: prefix + suffix for suffix in PV_SUFFIXES}
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.fps_window_s = float(fps_window_s)
        self.fps_refresh_s = float(fps_refresh_s)
        self.startup_timeout = float(startup_timeout)
        self.errors: list[str] = []

        self._lock = threading.Lock()
        now = time.time()
        self._values: dict[str, tuple] = {}  # suffix -> (value, timestamp, severity)
        self._dirty: set[str] = set()
        for suffix, (kind, _, _) in PV_SUFFIXES.items():
            initial = {"double": math.nan, "long": 0, "string": "", "text": ""}[kind]
            self._values[suffix] = (initial, now, 0)
        self._values["STATUS"] = ("idle", now, 0)
        self._values["MESSAGE"] = ("waiting for a derived run", now, 0)
        self._runs: dict[str, _RunCounts] = {}  # derived uid -> counts (the last few runs)
        self._current: str | None = None  # derived uid shown by the PVs
        self._index = RunIndex(keep=None)  # routes of the runs in _runs, forgotten with them

        self._channels: dict = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._flush_scheduled = False
        if start:
            self.start()

    def __repr__(self) -> str:
        state = "serving" if self.running else "stopped"
        return f"<{type(self).__name__} {self.prefix!r} {state}, status={self.value('STATUS')!r}>"

    # ------------------------------------------------------------------ server lifecycle

    @property
    def running(self) -> bool:
        """True while the server thread is serving."""
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def start(self) -> Self:
        """Start the server thread and wait until it listens.

        Raises
        ------
        PVServerError
            When the server failed (e.g. no free port) or did not listen within
            ``startup_timeout`` seconds.
        """
        if self._thread is not None and self._thread.is_alive():
            return self
        self._ready.clear()
        self._failure = None
        self._channels = self._make_channels()
        self._thread = threading.Thread(target=self._serve, name=f"metrics-pvs {self.prefix}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop()
                if failure is not None:
                    raise PVServerError(f"the metrics PV server {self.prefix!r} failed to start: {failure!r}") from failure
                raise PVServerError(f"the metrics PV server {self.prefix!r} did not listen within {self.startup_timeout} s")
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving; returns True when the server thread has ended."""
        thread, loop, task = self._thread, self._loop, self._main_task
        if thread is None:
            return True
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is already closed
                pass
        thread.join(timeout)
        alive = thread.is_alive()
        if not alive:
            self._thread = None
        return not alive

    close = stop

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _make_channels(self) -> dict:
        import caproto

        class _ReadOnly:
            def check_access(self, hostname, username):
                return caproto.AccessRights.READ

        class Double(_ReadOnly, caproto.ChannelDouble):
            pass

        class Long(_ReadOnly, caproto.ChannelInteger):
            pass

        class String(_ReadOnly, caproto.ChannelString):
            pass

        class Text(_ReadOnly, caproto.ChannelChar):
            pass

        channels = {}
        with self._lock:
            values = dict(self._values)
        for suffix, (kind, units, _) in PV_SUFFIXES.items():
            value, stamp, _ = values[suffix]
            name = self.pvnames[suffix]
            if kind == "double":
                channels[name] = Double(value=float(value), timestamp=stamp, units=units, precision=_PRECISION.get(suffix, 3))
            elif kind == "long":
                channels[name] = Long(value=int(value), timestamp=stamp, units=units)
            elif kind == "string":
                channels[name] = String(value=_fit(value, _STRING_MAX), timestamp=stamp)
            else:
                channels[name] = Text(value=_fit(value, _TEXT_MAX), timestamp=stamp, max_length=_TEXT_MAX)
        return channels

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._main_task = loop.create_task(self._run_server())
            loop.run_until_complete(self._main_task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self._failure = exc
            logger.exception("metrics PV server %r stopped on an error", self.prefix)
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                self._ready.clear()
                with self._lock:
                    self._loop = None
                    self._flush_scheduled = False
                loop.close()

    async def _run_server(self) -> None:
        # The asyncio Context must be created inside its running loop.
        context = _context_class()(self._channels, self.interfaces)

        async def started(async_lib):
            self._ready.set()
            logger.info("metrics PVs %s* served on CA port %s", self.prefix, context.port)
            with self._lock:  # values set before the loop ran
                if self._dirty and not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().create_task(self._flush())
            while True:
                await asyncio.sleep(self.fps_refresh_s)
                self._refresh_fps()

        await context.run(startup_hook=started)

    # ------------------------------------------------------------------ values (any thread)

    def value(self, suffix: str):
        """The value a PV holds (or is about to hold), by suffix, e.g. ``value("STATUS")``."""
        with self._lock:
            return self._values[suffix][0]

    def set_status(self, status: str, message: str | None = None, *, severity: int = 0) -> None:
        """Set ``STATUS`` (and ``MESSAGE``): for the owner, e.g. ``set_status("error ...")``.

        ``severity`` is the EPICS alarm severity of ``STATUS`` (0 none, 1 minor,
        2 major).
        """
        updates = {"STATUS": _fit(status, _STRING_MAX)}
        if message is not None:
            updates["MESSAGE"] = _fit(message, _TEXT_MAX)
        self._set(updates, time.time(), severity={"STATUS": int(severity)})

    def _set(self, updates: dict, stamp: float, severity: dict | None = None) -> None:
        severity = severity or {}
        with self._lock:
            for suffix, value in updates.items():
                self._values[suffix] = (value, stamp, severity.get(suffix, 0))
                self._dirty.add(suffix)
            if self._flush_scheduled or self._loop is None or not self._ready.is_set():
                return
            self._flush_scheduled = True
            loop = self._loop
        try:
            loop.call_soon_threadsafe(self._schedule_flush)
        except RuntimeError:  # loop closing: the values stay in _values
            with self._lock:
                self._flush_scheduled = False

    def _schedule_flush(self) -> None:
        asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        import caproto

        while True:
            with self._lock:
                dirty = sorted(self._dirty, key=lambda s: s in _WRITE_LAST and _WRITE_LAST.index(s) + 1)
                self._dirty = set()
                values = {s: self._values[s] for s in dirty}
                if not dirty:
                    self._flush_scheduled = False
                    return
            for suffix in dirty:
                value, stamp, severity = values[suffix]
                channel = self._channels[self.pvnames[suffix]]
                try:
                    if severity or channel.alarm.severity:
                        status = caproto.AlarmStatus.STATE if severity else caproto.AlarmStatus.NO_ALARM
                        await channel.write(value, timestamp=stamp, status=status, severity=severity)
                    else:
                        await channel.write(value, timestamp=stamp)
                except Exception as exc:  # noqa: BLE001 - one bad value must not stop the others
                    logger.error("metrics PVs: writing %s = %r failed: %r", self.pvnames[suffix], value, exc)

    # ------------------------------------------------------------------ documents (caller's thread)

    def __call__(self, name: str, doc: dict) -> None:
        """Update the PVs from one derived-run document; never raises."""
        try:
            handler = getattr(self, f"_on_{name}", None)
            if handler is not None:
                handler(doc)
        except Exception as exc:
            text = f"{name} document {doc.get('uid', '') if isinstance(doc, dict) else ''!r}: {type(exc).__name__}: {exc}"
            logger.exception("metrics PVs: could not handle %s", text)
            self.errors.append(text)
            del self.errors[:-100]
            self.set_status(f"error {type(exc).__name__}", f"metrics PVs could not handle a {text}", severity=2)

    def _on_start(self, doc: dict) -> None:
        raw_uid = str(doc.get("raw_uid", ""))
        uid = doc["uid"]
        with self._lock:
            self._runs[uid] = _RunCounts(raw_uid, uid)
            self._index.add("start", doc)
            for old in list(self._runs)[:-_KEEP_RUNS]:
                self._runs.pop(old, None)
                self._index.forget(old)
            self._current = uid
        updates = {suffix: math.nan for suffix in (*_METRIC_PVS.values(), "LAG_MS")}
        updates.update(
            FPS=0.0,
            PROCESSED=0,
            FAILED=0,
            MISSING=0,
            RAW_SEQ_NUM=0,
            RAW_UID=_fit(raw_uid, _STRING_MAX),
            DERIVED_UID=_fit(uid, _STRING_MAX),
            STATUS=f"running {raw_uid[:8]}",
            MESSAGE=_fit(f"derived run {uid} of raw run {raw_uid}", _TEXT_MAX),
        )
        self._set(updates, _as_float(doc.get("time")) if doc.get("time") else time.time())

    def _on_descriptor(self, doc: dict) -> None:
        with self._lock:
            run = self._runs.get(doc["run_start"])
            if run is None:
                return
            run.streams[doc["uid"]] = doc.get("name", "")
            self._index.add("descriptor", doc)

    def _on_event(self, doc: dict) -> None:
        self._on_rows(doc["descriptor"], self._index.run_of("event", doc), [(doc["data"], doc.get("time"))])

    def _on_event_page(self, doc: dict) -> None:
        data = doc["data"]
        times = doc.get("time") or []
        rows = [({k: v[i] for k, v in data.items()}, times[i] if i < len(times) else None) for i in range(len(times))]
        self._on_rows(doc["descriptor"], self._index.run_of("event_page", doc), rows)

    def _on_rows(self, descriptor: str, run_uid: str | None, rows: list) -> None:
        with self._lock:
            run = self._runs.get(run_uid)
            if run is None or not rows:
                return
            stream = run.streams.get(descriptor)
            shown = run.derived_uid == self._current
            updates: dict = {}
            stamp = time.time()
            if stream == "primary":
                run.processed += len(rows)
                for data, event_time in rows:
                    stamp = _as_float(event_time) if event_time is not None else time.time()
                    run.event_times.append(stamp)
                data = rows[-1][0]
                updates = {suffix: _as_float(data.get(key)) for key, suffix in _METRIC_PVS.items()}
                updates["LAG_MS"] = 1e3 * _as_float(data.get("lag_s"))
                seq = data.get("raw_seq_num")
                updates["RAW_SEQ_NUM"] = int(seq) if seq is not None else 0
                updates["PROCESSED"] = run.processed
                updates["FPS"] = self._fps(run, stamp)
            elif stream == "failures":
                run.failed += len(rows)
                run.missing += sum(1 for data, _ in rows if data.get("status") == "missing")
                updates = {"FAILED": run.failed, "MISSING": run.missing}
        if shown and updates:
            self._set(updates, stamp)

    def _on_stop(self, doc: dict) -> None:
        with self._lock:
            run = self._runs.get(doc["run_start"])
            shown = run is not None and run.derived_uid == self._current
        if run is None or not shown:
            return
        exit_status = doc.get("exit_status", "")
        reason = doc.get("reason", "")
        severity = 0 if exit_status == "success" else 1
        self._set(
            {
                "STATUS": _fit(f"finished {run.raw_uid[:8]} {exit_status}", _STRING_MAX),
                "MESSAGE": _fit(f"derived run {run.derived_uid} of raw run {run.raw_uid}: {exit_status}: {reason}", _TEXT_MAX),
            },
            _as_float(doc.get("time")) if doc.get("time") else time.time(),
            severity={"STATUS": severity},
        )

    # ------------------------------------------------------------------ frame rate

    def _fps(self, run: _RunCounts, now: float) -> float:
        """Frames per second over the window ending at ``now`` (call with the lock held)."""
        times = run.event_times
        while times and times[0] < now - self.fps_window_s:
            times.popleft()
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        first = times[0]
        same = 0
        for t in times:
            if t != first:
                break
            same += 1
        return (len(times) - same) / (times[-1] - first)

    def _refresh_fps(self) -> None:
        with self._lock:
            run = self._runs.get(self._current or "")
            if run is None:
                return
            fps = self._fps(run, time.time())
            if fps == self._values["FPS"][0]:
                return
        self._set({"FPS": fps}, time.time())


def _context_class():
    """caproto's asyncio server Context, listening on a random TCP port.

    caproto tries TCP port 5064 first. A client that held a circuit to an earlier
    server on this host and port (this process restarted, or another caproto server
    that stopped) then reuses that dead circuit and fails to connect for a while
    ("Connection reset by peer"). A fresh random port gives every server its own
    address; clients learn it from the UDP search reply as always (UDP stays on
    ``EPICS_CA_SERVER_PORT``).
    """
    import random

    from caproto import CaprotoRuntimeError
    from caproto.asyncio.server import Context

    class RandomPortContext(Context):
        async def _bind_tcp_sockets_with_consistent_port_number(self, make_socket):
            stashed = None
            for _ in range(100):
                port = random.randint(49152, 65535)
                sockets = {}
                try:
                    for interface in self.interfaces:
                        sockets[interface] = await make_socket(interface, port)
                except OSError as exc:
                    stashed = exc
                    for sock in sockets.values():
                        sock.close()
                    continue
                return port, sockets
            raise CaprotoRuntimeError("no free TCP port for the metrics PV server") from stashed

    return RandomPortContext
