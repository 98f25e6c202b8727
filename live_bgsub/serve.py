"""``live-bgsub serve``: the live callback in its own process, fed by bluesky's 0MQ proxy.

The RunEngine process only publishes its documents (``bluesky.callbacks.zmq.
Publisher``) to a ``bluesky-0MQ-proxy``; this process subscribes to the proxy's out
port (``RemoteDispatcher``), runs :class:`~live_bgsub.callback.
LiveBackgroundSubtraction` behind a :class:`~live_bgsub.transport.GapDetector` (0MQ
drops documents under bursts: the detector lists exactly which frames never arrived,
and finishes a run whose stop was lost after ``run_timeout`` seconds of silence),
and publishes the derived runs to Tiled (:class:`~live_bgsub.sinks.tiled.
TiledPublisher`) and, optionally, the live metrics as EPICS PVs
(:class:`~live_bgsub.sinks.pvs.MetricsPVs`). See ``docs/remote.md``.

The 0MQ PUB/SUB pair loses whatever is published before the subscription has
propagated ("slow joiner"). :func:`wait_for_subscriber` sends *probe* documents
(start documents carrying ``live_bgsub_probe``, never passed to the callback) until
the server reports one, through its status file (``--status-file``, read with
:func:`read_status`).

Documents cross the process boundary as msgpack (:mod:`live_bgsub.wire`), never as
pickle: the RunEngine side publishes with :func:`live_bgsub.wire.make_publisher`, and
with a shared key (``--key-file`` or ``$LIVE_BGSUB_ZMQ_KEY``) every message is signed
(HMAC-SHA256) and checked here. A message that is not ours (a pickle, garbage, unsigned
or badly signed where a key is set) is dropped, counted (``rejected`` in the status)
and logged in one line; the server keeps running.

Python API: :class:`RemoteServer` (``from_options(...)``, then ``run()`` in this
thread or ``start()`` in a background thread, and ``stop()``); command line:
:func:`main` (``python -m live_bgsub.serve --zmq HOST:PORT ...``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ArgumentParser
from .options import ProcessingOptions, add_processing_arguments, add_tiled_arguments
from .transport import GapDetector
from .wire import KEY_ENV, WireError, as_key, decode, load_key

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "PROBE_KEY",
    "RemoteServer",
    "add_arguments",
    "main",
    "probe_document",
    "read_status",
    "run_from_args",
    "wait_for_subscriber",
]

logger = logging.getLogger("live_bgsub.serve")

#: Start-document key marking a connectivity probe (see :func:`wait_for_subscriber`).
PROBE_KEY = "live_bgsub_probe"
_KEEP_STATUS_RUNS = 50
_KEEP_PROBES = 20
_LOG_FIRST_REJECTS = 10  # then one line per _LOG_EVERY_REJECT rejected messages
_LOG_EVERY_REJECT = 1000


# ---------------------------------------------------------------------- probes (RE side)


def probe_document(token: str) -> dict:
    """A start document that ``live-bgsub serve`` records as a probe and drops."""
    return {"uid": f"live-bgsub-probe-{token}", "time": time.time(), PROBE_KEY: token}


def wait_for_subscriber(publish, seen, *, timeout: float = 30.0, interval: float = 0.25) -> str:
    """Send probes through ``publish`` until ``seen(token)`` says one arrived.

    0MQ drops what is published before a subscriber's subscription reached the
    publisher; call this before a run whose every document matters.

    Parameters
    ----------
    publish : callable
        ``publish(name, doc)``, e.g. a ``bluesky.callbacks.zmq.Publisher``.
    seen : callable
        ``seen(token) -> bool``, e.g. ``lambda t: t in read_status(path).get("probes", [])``.
    timeout : float, optional
        Seconds before giving up.
    interval : float, optional
        Seconds between probes.

    Returns
    -------
    str
        The token that arrived.

    Raises
    ------
    TimeoutError
        When no probe arrived within ``timeout`` seconds.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while True:
        publish("start", probe_document(token))
        resend = min(deadline, time.monotonic() + interval)
        while time.monotonic() < resend:
            if seen(token):
                return token
            time.sleep(0.01)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no probe reached the subscriber within {timeout} s (is live-bgsub serve running?)")


def read_status(path) -> dict:
    """The status file of a running server (``{}`` while it does not exist yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------- the 0MQ subscriber

_dispatcher_class = None


def _wire_dispatcher_class():
    """bluesky's ``RemoteDispatcher`` reading :mod:`live_bgsub.wire` messages only.

    Its own receive loop prints every message it cannot read (payload included) and
    dies on an unknown document name; this one hands each bad message to
    ``on_reject(reason, detail)`` and carries on. The deserializer given to the base
    class is the wire decoder too, so nothing here ever unpickles.
    """
    global _dispatcher_class
    if _dispatcher_class is not None:
        return _dispatcher_class
    from bluesky.callbacks.zmq import RemoteDispatcher
    from bluesky.run_engine import DocumentNames

    if not hasattr(RemoteDispatcher, "_poll"):  # pragma: no cover - a future bluesky
        logger.warning("serve: bluesky's RemoteDispatcher has no _poll; rejected messages are printed by bluesky, not counted")

    class WireDispatcher(RemoteDispatcher):
        def __init__(self, address, *, prefix: bytes = b"", key=None, on_reject=None):
            self._key = as_key(key)
            self._on_reject = on_reject or (lambda reason, detail: None)
            super().__init__(address, prefix=prefix, deserializer=self._document_only)

        def _document_only(self, payload: bytes) -> dict:
            return decode(payload, self._key)[1]

        async def _poll(self):
            while True:
                message = await self._socket.recv()
                try:
                    self._receive(message)
                except Exception as exc:  # noqa: BLE001 - one bad message never ends the loop
                    self._on_reject("malformed", f"{type(exc).__name__}: {exc}")

        def _receive(self, message: bytes) -> None:
            parts = message.split(b" ", 2)
            if len(parts) != 3:
                self._on_reject("foreign", f"not 'prefix name payload' ({len(message)} bytes starting {message[:8]!r})")
                return
            prefix, name, payload = parts
            if self._prefix and prefix != self._prefix:
                return
            try:
                name, doc = decode(payload, self._key, name=name)
            except WireError as exc:
                self._on_reject(exc.reason, str(exc))
                return
            if name not in DocumentNames.__members__:
                self._on_reject("malformed", f"unknown document name {name[:40]!r}")
                return
            self.loop.call_soon(self.process, DocumentNames[name], doc)

    _dispatcher_class = WireDispatcher
    return WireDispatcher


# ---------------------------------------------------------------------- the server


class RemoteServer:
    """Run a live callback on documents arriving from a bluesky 0MQ proxy.

    Parameters
    ----------
    address : str
        The proxy's out port, ``"HOST:PORT"`` (or any address ``RemoteDispatcher``
        takes).
    callback : LiveBackgroundSubtraction
        The live callback; :class:`RemoteServer` closes it in :meth:`close`.
    run_timeout : float, optional
        Seconds of silence after which a run without its stop is finished (default
        300); see :class:`~live_bgsub.transport.GapDetector`.
    prefix : bytes, optional
        0MQ prefix of the publisher to listen to (default: all).
    status_path : path-like, optional
        JSON file rewritten (atomically) at every state change: ``state``
        (``listening``/``stopped``), recent ``probes``, per raw run the transport
        report and the derived run (uid, exit status, reason), ``orphans``, ``late``.
    publisher : TiledPublisher, optional
        Flushed and closed by :meth:`close` (already subscribed to ``callback``).
    pvs : MetricsPVs, optional
        Stopped by :meth:`close` (already subscribed to ``callback``).
    key : bytes or str, optional
        Shared secret (>= 16 bytes): only messages signed with it are accepted (see
        :mod:`live_bgsub.wire`). None: unsigned msgpack messages are accepted too
        (never pickle).

    Attributes
    ----------
    rejected : int
        Messages dropped because they were not valid live-bgsub wire messages (a
        pickle, garbage, unsigned or badly signed with a key set, an unknown name);
        ``rejected_reasons`` counts them per reason.

    Examples
    --------
    >>> server = RemoteServer.from_options("127.0.0.1:5578", tiled=uri, api_key=key,
    ...                                    pv_prefix="BL18:BGSUB:")   # doctest: +SKIP
    >>> server.run()  # until SIGTERM / stop()                          # doctest: +SKIP
    """

    def __init__(
        self,
        address,
        callback,
        *,
        run_timeout: float = 300.0,
        prefix: bytes = b"",
        status_path=None,
        publisher=None,
        pvs=None,
        key=None,
    ):
        self.address = address
        self.key = as_key(key)
        self.callback = callback
        self.prefix = prefix
        self.publisher = publisher
        self.pvs = pvs
        self.status_path = Path(status_path) if status_path is not None else None
        self.detector = GapDetector(callback, run_timeout=run_timeout, on_finished=self._transport_finished, derive_missed_starts=True)
        self.tick_s = min(1.0, self.detector.run_timeout / 4)
        self.documents = 0
        self.rejected = 0
        self.rejected_reasons: collections.Counter = collections.Counter()
        self._probes: collections.deque = collections.deque(maxlen=_KEEP_PROBES)
        self._runs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._derived_of: dict[str, str] = {}  # derived uid -> raw uid
        self._state = "starting"
        self._status_dirty = False
        self._status_lock = threading.Lock()
        self._dispatcher = None
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._stop_requested = threading.Event()
        self._closed = False
        self._failure: BaseException | None = None
        callback.subscribe(self._derived_document)

    @classmethod
    def from_options(
        cls,
        address,
        *,
        tiled: str | None = None,
        api_key: str | None = None,
        catalog: str = "runs",
        backup_directory=None,
        pv_prefix: str | None = None,
        run_timeout: float = 300.0,
        prefix: bytes = b"",
        status_path=None,
        on_full: str = "skip",
        queue_size: int = 256,
        key=None,
        **callback_kwargs,
    ) -> RemoteServer:
        """Build the usual server: callback -> TiledPublisher (+ MetricsPVs).

        ``callback_kwargs`` go to :class:`~live_bgsub.callback.
        LiveBackgroundSubtraction` (``method``, ``params``, ``downsample``,
        ``directory``, ``data_key``...). ``on_full`` defaults to ``"skip"`` here: a
        callback that blocks stops reading the 0MQ socket, whose buffer then drops
        documents (the stop too); skipped frames are listed and can be filled.
        ``backup_directory`` (with ``tiled``): where the TiledPublisher appends every
        derived document as JSON lines; None (default) is ``backup`` in the callback's
        ``directory``, False keeps no backup. ``key``: see :class:`RemoteServer`.
        """
        from .callback import LiveBackgroundSubtraction

        key = as_key(key)  # a bad key fails before anything is started
        if backup_directory is None:
            backup_directory = Path(callback_kwargs.get("directory") or "derived") / "backup"
        elif backup_directory is False:
            backup_directory = None
        publish, publisher, pvs = [], None, None
        try:
            if tiled:
                from .sinks.tiled import TiledPublisher

                publisher = TiledPublisher.from_uri(tiled, api_key=api_key, catalog=catalog, backup_directory=backup_directory)
                publish.append(publisher)
            if pv_prefix:
                from .sinks.pvs import MetricsPVs

                pvs = MetricsPVs(pv_prefix)
                publish.append(pvs)
            callback = LiveBackgroundSubtraction(publish, on_full=on_full, queue_size=queue_size, **callback_kwargs)
        except BaseException:
            if pvs is not None:
                pvs.stop()
            if publisher is not None:
                publisher.close(timeout=5)
            raise
        return cls(
            address, callback, run_timeout=run_timeout, prefix=prefix, status_path=status_path, publisher=publisher, pvs=pvs, key=key
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} {self._state}, open runs={len(self.detector.open_runs)}>"

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Receive and process documents in this thread until :meth:`stop` (or a signal)."""
        import asyncio

        dispatcher = _wire_dispatcher_class()(self.address, prefix=self.prefix, key=self.key, on_reject=self._reject)
        dispatcher.subscribe(self._document)
        self._dispatcher = dispatcher
        loop = dispatcher.loop

        def tick():
            try:
                self.detector.expire()
                if self._status_dirty:
                    self._status_dirty = False
                    self._write_status()
            finally:
                if not self._stop_requested.is_set():
                    loop.call_later(self.tick_s, tick)

        # Run once the loop turns, i.e. after the dispatcher connected and subscribed.
        loop.call_soon(self._on_listening)
        loop.call_later(self.tick_s, tick)
        if self._stop_requested.is_set():
            loop.call_soon(self._cancel)
        try:
            dispatcher.start()
        except asyncio.CancelledError:
            pass
        finally:
            self._dispatcher = None
            self._listening.clear()

    def start(self, timeout: float = 30.0) -> Self:
        """Run :meth:`run` in a background thread; wait until it listens."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._failure = None

        def run():
            try:
                self.run()
            except BaseException as exc:  # reported by start(), logged otherwise
                self._failure = exc
                logger.exception("serve: the 0MQ subscriber to %s failed", self.address)

        self._thread = threading.Thread(target=run, name="live-bgsub-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError(f"the 0MQ subscriber to {self.address} failed: {self._failure!r}") from self._failure
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 0MQ subscriber to {self.address} did not start within {timeout} s")
        return self

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe, signal-safe)."""
        self._stop_requested.set()
        dispatcher = self._dispatcher
        if dispatcher is not None:
            try:
                dispatcher.loop.call_soon_threadsafe(self._cancel)
            except RuntimeError:  # the loop is already closed
                pass

    def _cancel(self) -> None:
        task = getattr(self._dispatcher, "_task", None)
        if task is not None:
            task.cancel()
        elif self._dispatcher is not None:
            self._dispatcher.loop.stop()

    def stop(self, timeout: float = 120.0) -> None:
        """Stop receiving, finish open runs, flush the sinks (see :meth:`close`)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.close(timeout=timeout)

    def close(self, timeout: float = 120.0) -> None:
        """Finish the runs still open (made-up stops), wait for the derived runs, close
        the callback, flush and close the Tiled publisher, stop the PVs."""
        if self._closed:
            return
        self._closed = True
        self.detector.finish_all()
        if not self.callback.wait(timeout=timeout):
            logger.warning("serve: derived runs still unfinished after %s s at shutdown", timeout)
        self.callback.close(timeout=timeout)
        if self.publisher is not None and not self.publisher.close(timeout=timeout):
            logger.warning("serve: the Tiled publisher did not drain within %s s", timeout)
        if self.pvs is not None:
            self.pvs.set_status("stopped", "live-bgsub serve stopped")
            self.pvs.stop()
        self._state = "stopped"
        self._write_status()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ documents (0MQ loop thread)

    def _on_listening(self) -> None:
        self._state = "listening"
        logger.info("serve: subscribed to the 0MQ proxy at %s", self.address)
        self._write_status()
        self._listening.set()

    def _document(self, name: str, doc: dict) -> None:
        if name == "start" and PROBE_KEY in doc:
            self._probes.append(str(doc[PROBE_KEY]))
            logger.info("serve: probe %s arrived", doc[PROBE_KEY])
            self._write_status()
            return
        self.documents += 1
        dropped = self.detector.late + sum(self.detector.orphans.values())
        self.detector(name, doc)
        if self.detector.late + sum(self.detector.orphans.values()) != dropped:
            self._status_dirty = True  # written by the next tick, not per document
        if name == "start" and doc.get("uid") in self.detector.open_runs:
            with self._status_lock:
                self._run_entry(doc["uid"])["scan_id"] = doc.get("scan_id")
            self._write_status()

    def _reject(self, reason: str, detail: str) -> None:
        """A message that is not a valid live-bgsub wire message (0MQ loop thread)."""
        with self._status_lock:
            self.rejected += 1
            self.rejected_reasons[reason] += 1
            n = self.rejected
        if n <= _LOG_FIRST_REJECTS or n % _LOG_EVERY_REJECT == 0:
            logger.warning("serve: rejected a message from %s (%s): %s [%d rejected so far]", self.address, reason, detail, n)
        self._status_dirty = True  # written by the next tick, not per message

    def _transport_finished(self, report) -> None:
        with self._status_lock:
            self._run_entry(report.raw_uid)["transport"] = dataclasses.asdict(report)
        self._write_status()

    def _derived_document(self, name: str, doc: dict) -> None:
        """Receives the derived run (worker thread): noted in the status file."""
        if name == "start" and "raw_uid" in doc:
            with self._status_lock:
                self._derived_of[doc["uid"]] = doc["raw_uid"]
                self._run_entry(doc["raw_uid"])["derived_uid"] = doc["uid"]
            self._write_status()
        elif name == "stop":
            with self._status_lock:
                raw_uid = self._derived_of.pop(doc["run_start"], None)
                if raw_uid is None:
                    return
                entry = self._run_entry(raw_uid)
                entry.update(exit_status=doc.get("exit_status"), reason=doc.get("reason"))
            self._write_status()

    def _run_entry(self, raw_uid: str) -> dict:
        entry = self._runs.get(raw_uid)
        if entry is None:
            entry = self._runs[raw_uid] = {"raw_uid": raw_uid}
            while len(self._runs) > _KEEP_STATUS_RUNS:
                self._runs.popitem(last=False)
        return entry

    def status(self) -> dict:
        """What the status file holds."""
        with self._status_lock:
            return {
                "state": self._state,
                "pid": os.getpid(),
                "zmq": str(self.address),
                "pv_prefix": getattr(self.pvs, "prefix", None),
                "run_timeout_s": self.detector.run_timeout,
                "documents": self.documents,
                "probes": list(self._probes),
                "open_runs": self.detector.open_runs,
                "orphans": dict(self.detector.orphans),
                "late": self.detector.late,
                "signed": self.key is not None,
                "rejected": self.rejected,
                "rejected_reasons": dict(self.rejected_reasons),
                "tiled_errors": len(self.publisher.errors) if self.publisher is not None else 0,
                "runs": json.loads(json.dumps(list(self._runs.values()), default=str)),
                "updated": time.time(),
            }

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            status = self.status()
            with self._status_lock:
                tmp = self.status_path.with_name(f".{self.status_path.name}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(status, indent=1))
                os.replace(tmp, self.status_path)
        except Exception:  # the status file is a convenience
            logger.exception("serve: could not write the status file %s", self.status_path)


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser`` (also used by ``live-bgsub serve``)."""
    parser.add_argument("--zmq", required=True, metavar="HOST:PORT", help="the 0MQ proxy's OUT port (bluesky-0MQ-proxy IN OUT)")
    parser.add_argument("--zmq-prefix", default="", help="listen only to the publisher with this 0MQ prefix")
    add_tiled_arguments(parser, tiled_help="Tiled server for the derived runs (default: $TILED_URI; none: no Tiled)")
    backup = parser.add_mutually_exclusive_group()
    backup.add_argument("--backup", type=Path, metavar="DIR", help="with --tiled, also append every derived document to DIR/<uid>.jsonl (default: DIRECTORY/backup)")
    backup.add_argument("--no-backup", action="store_true", help="keep no JSON-lines backup of the derived documents")
    parser.add_argument(
        "--key-file", type=Path, metavar="PATH",
        help=f"shared key: accept only messages signed with it (default: ${KEY_ENV}; neither: unsigned msgpack, never pickle)",
    )  # fmt: skip
    add_processing_arguments(parser)
    parser.add_argument("--data-key", help="data key of the frames (default: the stream's one 2-D key)")
    parser.add_argument("--directory", type=Path, default=Path("derived"), help="where derived HDF5 files go (default ./derived); the Tiled server must be able to read it")
    parser.add_argument("--pv-prefix", metavar="PREFIX", help="serve the live metrics as EPICS PVs PREFIX* (docs/pvs.md)")
    parser.add_argument("--run-timeout", type=float, default=300.0, metavar="S", help="finish a run whose stop never came after S seconds without its documents (default 300)")
    parser.add_argument("--on-full", choices=("skip", "block"), default="skip", help="a full frame queue skips frames (default; listed for a replay) or blocks (0MQ then drops)")
    parser.add_argument("--queue-size", type=int, default=256, help="frames the callback queue holds (default 256)")
    parser.add_argument("--status-file", type=Path, metavar="PATH", help="JSON status rewritten at every change (probes, runs, gaps)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    return parser


def run_from_args(args) -> int:
    """Run ``serve`` with parsed :func:`add_arguments` options until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(2, args.verbose), format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    if args.run_timeout <= 0:
        print(f"live-bgsub serve: error: --run-timeout must be > 0 seconds, got {args.run_timeout}", file=sys.stderr)
        return 2
    tiled = args.tiled or os.environ.get("TILED_URI")
    try:
        key = load_key(args.key_file)
    except (ValueError, TypeError, OSError) as exc:
        print(f"live-bgsub serve: error: the 0MQ key: {exc}", file=sys.stderr)
        return 2
    try:
        options = ProcessingOptions.from_args(args)
        server = RemoteServer.from_options(
            args.zmq,
            tiled=tiled,
            api_key=args.api_key,
            catalog=args.catalog,
            backup_directory=False if args.no_backup else args.backup,
            key=key,
            pv_prefix=args.pv_prefix,
            run_timeout=args.run_timeout,
            prefix=args.zmq_prefix.encode(),
            status_path=args.status_file,
            on_full=args.on_full,
            queue_size=args.queue_size,
            **options.callback_kwargs(),
            data_key=args.data_key,
            directory=args.directory,
        )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        print(f"live-bgsub serve: error: {exc}", file=sys.stderr)
        return 2
    if not tiled:
        logger.warning("serve: no --tiled: derived runs are not stored (only HDF5 files, PVs and logs)")
    if key is None:
        logger.warning("serve: no key (--key-file, $%s): messages are not authenticated (unsigned msgpack accepted)", KEY_ENV)

    def on_signal(signum, frame):
        logger.info("serve: signal %d: stopping", signum)
        server.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    print(
        f"live-bgsub serve: listening to {args.zmq}"
        + (", signed messages only" if key is not None else ", unsigned messages accepted")
        + (f", PVs {args.pv_prefix}*" if args.pv_prefix else ""),
        flush=True,
    )
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.close()
    errors = len(server.publisher.errors) if server.publisher is not None else 0
    if errors:
        print(f"live-bgsub serve: {errors} derived document(s) could not be written to Tiled", file=sys.stderr)
    return 1 if errors else 0


def main(argv=None) -> int:
    """``python -m live_bgsub.serve`` (the ``live-bgsub serve`` subcommand)."""
    parser = ArgumentParser(
        prog="live-bgsub serve",
        description="Run the live background subtraction on documents from a bluesky 0MQ proxy.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
