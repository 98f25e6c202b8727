"""The RunEngine side of the bus: documents and frame tasks onto JetStream.

:class:`BusPublisher` is a document callback (``RE.subscribe(BusPublisher(url))``).
On the RunEngine's thread it only puts the document on a queue and returns: it never
blocks, never raises. A thread of this process encodes the documents (msgpack) and
pipes them to a child process, which holds the NATS connection: the publishing takes
no time from the RunEngine's interpreter. The child publishes each document to the
run's subject of :data:`~live_bgsub.bus.jetstream.DOCS_STREAM` and, for each frame of
the frames' stream, one task to :data:`~live_bgsub.bus.jetstream.TASKS_STREAM`:

- a frame in an HDF5 file (StreamResource/StreamDatum, area-detector Resource/Datum):
  the file, dataset and index (shared storage, as at beamlines);
- a frame inline in its event: the stream sequence of that event in the documents'
  stream (the worker reads it from there; the frame is not copied twice);
- a frame that cannot be read (unsupported resource, a datum never seen, an inline
  frame larger than the server's ``max_payload``): a task with the error, so that the
  frame still ends in the derived run's ``failures``.

Every publish waits for JetStream's acknowledgement (the message is on the server's
disk) and is repeated until it is acknowledged: while the server is down or
restarting the documents wait in memory, in order, and go out when it is back. A
repeated publish carries the same ``Nats-Msg-Id``, so the server keeps it once; so a
child that dies is replaced and given the documents of the runs not yet finished
again. :meth:`BusPublisher.flush` waits until everything handed over is acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import subprocess
import sys
import threading
import time
from queue import SimpleQueue

from event_model import unpack_datum_page, unpack_event_page

from .. import wire
from ..errors import ProcessingError
from ..frames import FrameRef, RunFrames
from ..routing import RunIndex
from .jetstream import PROCESSING_HEADER, connect, ensure_layout, job_key, subject

__all__ = ["BusPublisher"]

logger = logging.getLogger("live_bgsub.bus.publisher")

#: The child acknowledges a burst of documents with one line, at least every this many.
ACK_EVERY = 64

#: The parent writes at most this many queued documents to the child's pipe at once.
WRITE_BATCH = 64

_CLOSE = object()
_RECOVER = object()  # the reader saw the child's output end: replace the child if it died


class _RunState:
    def __init__(self, start: dict, processing: dict | None, frames: RunFrames):
        self.uid = start["uid"]
        self.processing = processing
        self.job = job_key(self.uid, processing)
        self.frames = frames
        self.docs = 0  # documents published (message ids)


class BusPublisher:
    """Publish a RunEngine's documents and one frame task per frame to NATS JetStream.

    The publishing runs in a child process (``python -m live_bgsub.bus.publisher``), so
    that it takes nothing from the RunEngine's interpreter: on the RunEngine's thread a
    document is put on a queue; a thread of this process encodes it (msgpack) and writes
    it to the child's pipe. The child publishes and reports what JetStream has
    acknowledged. The documents of every run not yet finished are kept here until its
    stop is acknowledged: if the child dies, a new one is started and they are sent
    again (the server keeps each message once, by its Nats-Msg-Id).

    Parameters
    ----------
    url : str
        The NATS server (``nats://host:4222``; several, comma-separated, for a cluster).
    stream_name : str, optional
        The raw stream carrying the frames (default ``"primary"``).
    data_key : str, optional
        The data key of the frames (default: the one 2-D key, as the callback picks it).
    processing : dict, optional
        ``{"method": ..., "params": ..., "downsample": ...}`` for this publisher's runs,
        overriding the composer's default (sent with each run's start document).
    connect_timeout : float, optional
        Seconds to wait for the first connection (default 5); ConnectionError (one
        line) when the server cannot be reached. After that the child reconnects for ever.
    """

    def __init__(self, url: str, *, stream_name: str = "primary", data_key: str | None = None,
                 processing: dict | None = None, connect_timeout: float = 5.0):
        self.url = url
        self._argv = [sys.executable, "-m", "live_bgsub.bus.publisher", "--url", url, "--stream-name", stream_name,
                      "--connect-timeout", str(float(connect_timeout))]
        if data_key is not None:
            self._argv += ["--data-key", data_key]
        if processing:
            self._argv += ["--processing", json.dumps(processing)]
        self.published = 0  # documents acknowledged by JetStream
        self.tasks = 0  # frame tasks acknowledged
        self.retries = 0  # publishes repeated after an error or a timeout
        self.restarts = 0  # child processes started again after one died
        self.errors: list[str] = []
        self._queue: SimpleQueue = SimpleQueue()
        self._cond = threading.Condition()
        self._handed = 0  # documents handed over (RunEngine thread)
        self._acked = 0  # documents acknowledged (global count)
        self._kept: collections.deque = collections.deque()  # (index, payload, start uid or None, stop's run or None)
        self._open: dict[str, int] = {}  # run uid -> index of its start, for runs whose stop is not acknowledged
        self._stops: dict[int, str] = {}  # index of a stop -> its run
        self._closing = False
        self._child = None
        self._base = 0  # global count of documents acknowledged before the current child started
        self._spawn()
        self._writer = threading.Thread(target=self._write, name="live_bgsub-bus-writer", daemon=True)
        self._writer.start()

    @property
    def child_pid(self) -> int | None:
        """PID of the process publishing now (None once closed)."""
        child = self._child
        return None if child is None or child.poll() is not None else child.pid

    # ------------------------------------------------------------------ RunEngine side

    def __call__(self, name: str, doc: dict) -> None:
        """Hand a document over; returns at once and never raises."""
        self._handed += 1
        self._queue.put((name, doc))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document handed over so far is acknowledged (True) or the
        timeout passes (False)."""
        target = self._handed
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._acked < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> bool:
        """Publish what is queued (up to ``timeout``), then stop the child."""
        flushed = self.flush(timeout)
        self._closing = True
        self._queue.put(_CLOSE)
        self._writer.join(timeout)
        child = self._child
        if child is not None:
            try:
                child.stdin.close()
            except OSError:
                pass
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return flushed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ this process's threads

    def _spawn(self) -> None:
        """Start a child and wait for its first line (ready, or why not)."""
        child = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        try:
            first = child.stdout.readline().decode(errors="replace").strip()
        except BaseException:  # Ctrl-C while waiting: no orphan
            child.kill()
            child.wait()
            raise
        if not first.startswith("ready"):
            child.kill()
            child.wait()
            why = first[len("error "):] if first.startswith("error ") else f"the publisher process exited ({child.returncode}) without a word"
            raise ConnectionError(why)
        with self._cond:
            self._base = self._acked
        self._child = child
        threading.Thread(target=self._read, args=(child,), name="live_bgsub-bus-reader", daemon=True).start()

    def _read(self, child) -> None:
        for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            kind, _, rest = line.partition(" ")
            if kind == "ack":
                k, published, tasks, retries = (int(v) for v in rest.split())
                with self._cond:
                    if child is not self._child:
                        return
                    self._acked = max(self._acked, self._base + k)
                    self.published, self.tasks, self.retries = published, tasks, retries
                    self._release()
                    self._cond.notify_all()
            elif kind == "warn":
                self.errors.append(rest)
        if not self._closing and child is self._child:  # it died with documents not acknowledged, maybe
            self._queue.put(_RECOVER)

    def _release(self) -> None:
        """Drop the kept documents no run needs any more (under the lock)."""
        for index in [i for i in self._stops if i <= self._acked]:
            self._open.pop(self._stops.pop(index), None)
        keep_from = min(self._open.values(), default=self._acked + 1)
        keep_from = min(keep_from, self._acked + 1)
        while self._kept and self._kept[0][0] < keep_from:
            self._kept.popleft()

    def _write(self) -> None:
        index = 0
        while True:
            item = self._queue.get()
            batch = []  # what the queue holds now goes to the child in one write
            while True:
                if item is _CLOSE or item is _RECOVER:
                    break
                name, doc = item
                index += 1
                try:
                    payload = wire.encode(name, doc)
                except Exception as exc:  # noqa: BLE001 - a document msgpack cannot carry
                    self.errors.append(f"{name} document {doc.get('uid', '')!r} not published: {type(exc).__name__}: {exc}")
                    payload = wire.encode("bad_document", {"name": name})
                with self._cond:
                    if name == "start":
                        self._open[doc["uid"]] = index
                    elif name == "stop":
                        self._stops[index] = doc.get("run_start")
                    self._kept.append((index, payload))
                batch.append(len(payload).to_bytes(4, "big") + payload)
                if len(batch) >= WRITE_BATCH or self._queue.empty():
                    item = None
                    break
                item = self._queue.get()
            if batch:
                self._send(b"".join(batch))
            if item is _CLOSE:
                return
            if item is _RECOVER:
                self._recover()

    def _send(self, data: bytes) -> None:
        """Write (kept) length-prefixed documents to the child; a dead child is replaced."""
        try:
            self._child.stdin.write(data)
        except (BrokenPipeError, OSError, ValueError):
            self._recover()

    def _recover(self) -> None:
        """Writer thread: start a new child and send it every kept document, in order
        (the server drops those it already holds, by message id)."""
        if self._closing or self._child_alive():
            return
        logger.warning("live_bgsub bus: the publisher process died (exit %s); starting another and sending again "
                       "the documents of the runs not finished", self._child.poll())
        while not self._closing:
            self.restarts += 1
            with self._cond:
                kept = [payload for _, payload in self._kept]
                first = self._kept[0][0] if self._kept else self._acked + 1
            try:
                self._spawn()
            except ConnectionError as exc:
                logger.warning("live_bgsub bus: %s; trying again", exc)
                time.sleep(1.0)  # the server is down: try again shortly (writer thread only)
                continue
            with self._cond:
                self._base = first - 1  # the new child's "ack K" is document first - 1 + K
            try:
                for payload in kept:
                    self._child.stdin.write(len(payload).to_bytes(4, "big") + payload)
                return
            except (BrokenPipeError, OSError, ValueError):
                continue  # died again: once more

    def _child_alive(self) -> bool:
        try:
            self._child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return True
        return False


class _Sender:
    """The child process's side: documents from stdin, publishes to JetStream, acks to
    stdout (``ack K``: the first K documents are published with their tasks).

    Documents reach their run through a :class:`~live_bgsub.routing.RunIndex` (not
    event-model's RunRouter, whose callbacks get event pages and cannot await a publish).
    """

    def __init__(self, url: str, *, stream_name: str, data_key: str | None, processing: dict | None, connect_timeout: float):
        self.url = url
        self.stream_name = stream_name
        self.data_key = data_key
        self.processing = processing
        self.connect_timeout = connect_timeout
        self.published = 0
        self.tasks = 0
        self.retries = 0
        self._runs: dict[str, _RunState] = {}  # runs started and not stopped
        self._index = RunIndex()  # which run each document belongs to; a run is forgotten at its stop
        self._max_payload = 1024 * 1024

    @staticmethod
    def _say(line: str) -> None:
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()

    async def serve(self) -> int:
        try:
            nc, js = await connect(self.url, name="live_bgsub-publisher", connect_timeout=self.connect_timeout)
            await ensure_layout(js)
        except Exception as exc:  # noqa: BLE001 - one line for the parent's constructor
            text = str(exc) if isinstance(exc, ConnectionError) else f"NATS at {self.url}: {type(exc).__name__}: {exc}"
            self._say(f"error {text}")
            return 2
        self._max_payload = int(nc.max_payload or self._max_payload)
        self._say(f"ready {self._max_payload}")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**31 - 1)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        pending: asyncio.Queue = asyncio.Queue()  # documents read, not yet published; None: the pipe ended
        pump = asyncio.create_task(self._pump(reader, pending))
        handled = said = 0
        try:
            while (payload := await pending.get()) is not None:
                try:
                    name, doc = wire.decode(payload)
                    await self._handle(js, name, doc, payload)
                except Exception as exc:  # noqa: BLE001 - one bad document must not stop the others
                    logger.exception("live_bgsub bus: publishing a document failed")
                    self._say(f"warn {type(exc).__name__}: {exc}")
                handled += 1
                # One line per burst (when nothing more waits, at least every ACK_EVERY
                # documents): each line costs the RunEngine's process a wake-up.
                if pending.empty() or handled - said >= ACK_EVERY:
                    self._say(f"ack {handled} {self.published} {self.tasks} {self.retries}")
                    said = handled
            if handled > said:
                self._say(f"ack {handled} {self.published} {self.tasks} {self.retries}")
            await pump
        finally:
            await nc.close()
        return 0

    @staticmethod
    async def _pump(reader, pending: asyncio.Queue) -> None:
        """Length-prefixed documents from the parent's pipe onto ``pending``; None at its end."""
        try:
            while True:
                head = await reader.readexactly(4)
                pending.put_nowait(await reader.readexactly(int.from_bytes(head, "big")))
        except asyncio.IncompleteReadError:
            pass  # the parent closed the pipe (or died): done
        finally:
            pending.put_nowait(None)

    async def _publish(self, js, subj: str, payload: bytes, headers: dict):
        """Publish until JetStream acknowledges (the server may be restarting)."""
        delay = 0.05
        while True:
            try:
                return await js.publish(subj, payload, timeout=5.0, headers=headers)
            except Exception as exc:  # noqa: BLE001 - timeouts, no responders, reconnects
                self.retries += 1
                if self.retries == 1 or self.retries % 100 == 0:
                    logger.warning("live_bgsub bus: publish to %s not acknowledged (%s: %s); retrying", subj, type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _handle(self, js, name: str, doc: dict, payload: bytes | None = None) -> None:
        """Publish one document (``payload``: its encoding, when it is already encoded)."""
        if name == "event_page":
            for event in unpack_event_page(doc):
                await self._handle(js, "event", event)
            return
        if name == "datum_page":
            for datum in unpack_datum_page(doc):
                await self._handle(js, "datum", datum)
            return
        run = self._run_of(name, doc)
        if run is None:
            logger.debug("live_bgsub bus: %s document of no known run, not published", name)
            return
        run.docs += 1
        headers = {"Nats-Msg-Id": f"{run.job}:doc:{run.docs}"}
        if name == "start" and run.processing:
            headers[PROCESSING_HEADER] = json.dumps(run.processing)
        payload = payload if payload is not None else wire.encode(name, doc)
        inline_too_big = None
        if len(payload) > self._max_payload - 4096:
            inline_too_big = len(payload)
            key = run.frames.data_key if name == "event" else None
            if key is None or key not in doc.get("data", {}):
                raise ProcessingError(f"{name} document of {len(payload)} bytes is larger than the server's max_payload {self._max_payload}")
            light = dict(doc, data={k: v for k, v in doc["data"].items() if k != key})
            payload = wire.encode(name, light)
        ack = await self._publish(js, subject("docs", run.job), payload, headers)
        self.published += 1
        for ref in self._frame_refs(run, name, doc, ack.seq, inline_too_big):
            await self._task(js, run, ref)

    async def _task(self, js, run: _RunState, ref) -> None:
        seq, where = ref
        task = {"run": run.uid, "job": run.job, "seq_num": int(seq), **where}
        await self._publish(js, subject("tasks", run.job), wire.encode("task", task), {"Nats-Msg-Id": f"{run.job}:task:{seq}"})
        self.tasks += 1

    def _run_of(self, name: str, doc: dict) -> _RunState | None:
        uid = self._index.add(name, doc)
        if name == "start":
            frames = RunFrames(doc, data_key=self.data_key, stream_name=self.stream_name)
            self._runs[uid] = _RunState(doc, self.processing, frames)
        return self._runs.get(uid)

    def _frame_refs(self, run: _RunState, name: str, doc: dict, doc_seq: int, inline_too_big):
        """``(seq_num, where)`` of the frames this document brings (:class:`RunFrames`,
        as in the live callback)."""
        refs = []
        frames = run.frames
        if name == "descriptor":
            try:
                frames.descriptor(doc)
            except ProcessingError as exc:
                logger.warning("live_bgsub bus: run %s: %s", run.uid, exc)
        elif name == "event" and frames.ready(doc.get("descriptor")):
            refs = frames.event(doc, 0.0, self._index.resource)
        elif name == "stream_datum" and frames.ready(doc.get("descriptor")):
            sres = self._index.resource(doc["stream_resource"])
            if sres is not None and sres.get("run_start") != run.uid:
                sres = None  # not published with this run (none without run_start): the composer lacks it too
            refs = frames.stream_datum(doc, sres, 0.0)  # ProcessingError: said
        elif name == "datum":
            refs = frames.datum(doc["datum_id"], doc["resource"], self._index.resource(doc["resource"]), doc.get("datum_kwargs") or {})
        elif name == "stop":
            refs = [FrameRef(seq, 0.0, error="its datum document never arrived") for seq in frames.never_arrived()]
            self._forget(run)
        out = []
        for ref in refs:
            if ref.error:
                where = {"error": ref.error}
            elif ref.array is not None and inline_too_big:
                where = {"error": f"inline frame of {inline_too_big} bytes is larger than the broker's max_payload "
                                  f"({self._max_payload}); write frames to a file (StreamResource) or raise max_payload"}
            elif ref.array is not None:
                where = {"doc_seq": int(doc_seq), "data_key": frames.data_key}
            else:
                where = {"path": ref.path, "dataset": ref.dataset, "index": int(ref.index)}
            out.append((ref.seq_num, where))
        return out

    def _forget(self, run: _RunState) -> None:
        self._runs.pop(run.uid, None)
        self._index.forget(run.uid)


def main(argv=None) -> int:
    """The publisher's child process (started by :class:`BusPublisher`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m live_bgsub.bus.publisher")
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream-name", default="primary")
    parser.add_argument("--data-key")
    parser.add_argument("--processing")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sender = _Sender(args.url, stream_name=args.stream_name, data_key=args.data_key,
                     processing=json.loads(args.processing) if args.processing else None, connect_timeout=args.connect_timeout)
    return asyncio.run(sender.serve())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
