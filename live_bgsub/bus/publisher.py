"""The RunEngine side of the bus: documents and frame tasks onto JetStream.

:class:`BusPublisher` is a document callback (``RE.subscribe(BusPublisher(url))``).
On the RunEngine's thread it only hands the document to its own thread (one
``call_soon_threadsafe``) and returns: it never blocks, never raises, never encodes.
Its thread, running an asyncio loop with one NATS connection, publishes each document
to the run's subject of :data:`~live_bgsub.bus.jetstream.DOCS_STREAM` and, for each
frame of the frames' stream, one task to :data:`~live_bgsub.bus.jetstream.TASKS_STREAM`:

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
repeated publish carries the same ``Nats-Msg-Id``, so the server keeps it once.
:meth:`BusPublisher.flush` waits until everything handed over is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
from event_model import unpack_datum_page, unpack_event_page

from .. import wire
from ..errors import ProcessingError
from ..frames import FrameRef, datum_ref, frame_shape, hdf5_location, pick_data_key
from .jetstream import connect, ensure_layout, subject

__all__ = ["BusPublisher"]

logger = logging.getLogger("live_bgsub.bus.publisher")

_CLOSE = object()


class _RunState:
    def __init__(self, start: dict, processing: dict | None):
        self.uid = start["uid"]
        self.processing = processing
        self.descriptors: set[str] = set()
        self.data_key: str | None = None
        self.external: str | None = None
        self.shape = None
        self.waiting_datum: dict[str, list[int]] = {}
        self.docs = 0  # documents published (message ids)


class BusPublisher:
    """Publish a RunEngine's documents and one frame task per frame to NATS JetStream.

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
        Seconds to wait for the first connection (default 5); after that the client
        reconnects for ever.
    """

    def __init__(self, url: str, *, stream_name: str = "primary", data_key: str | None = None,
                 processing: dict | None = None, connect_timeout: float = 5.0):
        self.url = url
        self.stream_name = stream_name
        self.data_key = data_key
        self.processing = dict(processing) if processing else None
        self.published = 0  # documents acknowledged by JetStream
        self.tasks = 0  # frame tasks acknowledged
        self.retries = 0  # publishes repeated after an error or a timeout
        self.errors: list[str] = []
        self._handed = 0
        self._done = 0
        self._cond = threading.Condition()
        self._runs: dict[str, _RunState] = {}
        self._by_descriptor: dict[str, _RunState] = {}
        self._stream_resources: dict[str, dict] = {}
        self._resources: dict[str, dict] = {}
        self._datums: dict[str, tuple[str, dict]] = {}
        self._max_payload = 1024 * 1024
        self._ready = threading.Event()
        self._connect_error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue | None = None
        self._thread = threading.Thread(target=self._main, args=(connect_timeout,), name="live_bgsub-bus-publisher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._connect_error is not None:
            raise self._connect_error

    # ------------------------------------------------------------------ RunEngine side

    def __call__(self, name: str, doc: dict) -> None:
        with self._cond:
            self._handed += 1
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (name, doc))
        except RuntimeError:  # the loop is closed: say so, never raise into the RunEngine
            with self._cond:
                self._done += 1
                self.errors.append(f"{name} document after close(): not published")
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document handed over so far is acknowledged (True) or the
        timeout passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._handed
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> bool:
        """Publish what is queued (up to ``timeout``), then disconnect."""
        flushed = self.flush(timeout)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _CLOSE)
            self._thread.join(timeout)
        return flushed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ own thread

    def _main(self, connect_timeout: float) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(connect_timeout))
        finally:
            self._loop.close()

    async def _serve(self, connect_timeout: float) -> None:
        self._queue = asyncio.Queue()
        try:
            nc, js = await connect(self.url, name="live_bgsub-publisher", connect_timeout=connect_timeout)
            await ensure_layout(js)
        except Exception as exc:  # noqa: BLE001 - reported to the constructor's caller
            self._connect_error = exc if isinstance(exc, ConnectionError) else ConnectionError(f"NATS at {self.url}: {type(exc).__name__}: {exc}")
            self._ready.set()
            return
        self._max_payload = int(nc.max_payload or self._max_payload)
        self._ready.set()
        try:
            while True:
                item = await self._queue.get()
                if item is _CLOSE:
                    break
                name, doc = item
                try:
                    await self._handle(js, name, doc)
                except Exception as exc:  # noqa: BLE001 - one bad document must not stop the others
                    logger.exception("live_bgsub bus: publishing a %s document failed", name)
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                finally:
                    with self._cond:
                        self._done += 1
                        self._cond.notify_all()
        finally:
            await nc.close()

    async def _publish(self, js, subj: str, payload: bytes, msg_id: str):
        """Publish until JetStream acknowledges (the server may be restarting)."""
        delay = 0.05
        while True:
            try:
                return await js.publish(subj, payload, timeout=5.0, headers={"Nats-Msg-Id": msg_id})
            except Exception as exc:  # noqa: BLE001 - timeouts, no responders, reconnects
                self.retries += 1
                if self.retries == 1 or self.retries % 100 == 0:
                    logger.warning("live_bgsub bus: publish to %s not acknowledged (%s: %s); retrying", subj, type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _handle(self, js, name: str, doc: dict) -> None:
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
        envelope = {"name": name, "doc": doc}
        if name == "start" and run.processing:
            envelope["processing"] = run.processing
        payload = wire.encode("doc", envelope)
        inline_too_big = None
        if len(payload) > self._max_payload - 4096:
            inline_too_big = len(payload)
            key = run.data_key if name == "event" else None
            if key is None or key not in doc.get("data", {}):
                raise ProcessingError(f"{name} document of {len(payload)} bytes is larger than the server's max_payload {self._max_payload}")
            light = dict(doc, data={k: v for k, v in doc["data"].items() if k != key})
            payload = wire.encode("doc", {"name": name, "doc": light})
        ack = await self._publish(js, subject("docs", run.uid), payload, f"{run.uid}:doc:{run.docs}")
        self.published += 1
        for ref in self._frame_refs(run, name, doc, ack.seq, inline_too_big):
            await self._task(js, run, ref)

    async def _task(self, js, run: _RunState, ref) -> None:
        seq, where = ref
        task = {"run": run.uid, "seq_num": int(seq), **where}
        await self._publish(js, subject("tasks", run.uid), wire.encode("task", task), f"{run.uid}:task:{seq}")
        self.tasks += 1

    def _run_of(self, name: str, doc: dict) -> _RunState | None:
        if name == "start":
            run = self._runs[doc["uid"]] = _RunState(doc, self.processing)
            return run
        if name == "descriptor":
            run = self._runs.get(doc.get("run_start"))
            if run is not None:
                self._by_descriptor[doc["uid"]] = run
            return run
        if name in ("event", "stream_datum"):
            return self._by_descriptor.get(doc.get("descriptor"))
        if name in ("stop", "resource", "stream_resource"):
            return self._runs.get(doc.get("run_start"))
        if name == "datum":
            resource = self._resources.get(doc.get("resource"))
            return None if resource is None else self._runs.get(resource.get("run_start"))
        return None

    def _frame_refs(self, run: _RunState, name: str, doc: dict, doc_seq: int, inline_too_big):
        """``(seq_num, where)`` of the frames this document brings (the callback's rules)."""
        out = []
        if name == "descriptor" and doc.get("name") == self.stream_name and run.data_key is None:
            try:
                run.data_key = pick_data_key(doc["data_keys"], self.data_key, self.stream_name)
            except ProcessingError as exc:
                logger.warning("live_bgsub bus: run %s: %s", run.uid, exc)
                return out
            run.external = doc["data_keys"][run.data_key].get("external")
            run.shape = frame_shape(doc["data_keys"][run.data_key])
            run.descriptors.add(doc["uid"])
        elif name == "descriptor" and doc.get("name") == self.stream_name:
            run.descriptors.add(doc["uid"])
        elif name == "event" and doc.get("descriptor") in run.descriptors and run.data_key:
            seq = int(doc["seq_num"])
            if run.external and run.external.startswith("STREAM:"):
                return out
            value = doc["data"].get(run.data_key)
            if run.external:
                datum = self._datums.get(value)
                if datum is None:
                    run.waiting_datum.setdefault(value, []).append(seq)
                else:
                    out.append((seq, _where(datum_ref(self._resources.get(datum[0]), seq, 0.0, datum[1], datum[0]))))
            elif inline_too_big:
                out.append((seq, {"error": f"inline frame of {inline_too_big} bytes is larger than the broker's max_payload "
                                           f"({self._max_payload}); write frames to a file (StreamResource) or raise max_payload"}))
            else:
                out.append((seq, {"doc_seq": int(doc_seq), "data_key": run.data_key}))
        elif name == "stream_resource":
            self._stream_resources[doc["uid"]] = doc
        elif name == "stream_datum" and doc.get("descriptor") in run.descriptors and run.data_key:
            sres = self._stream_resources.get(doc["stream_resource"])
            if sres is None or sres.get("data_key") != run.data_key:
                return out
            path, dataset, error = hdf5_location(sres)
            seqs = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
            indices = range(doc["indices"]["start"], doc["indices"]["stop"])
            if seqs.start < 1 or len(seqs) != len(indices):
                error = f"stream_datum {doc['uid']!r}: seq_nums {doc['seq_nums']} do not match indices {doc['indices']}"
                indices = [None] * len(seqs)
            for seq, index in zip(seqs, indices):
                where = {"error": error} if error else {"path": path, "dataset": dataset, "index": int(index)}
                out.append((seq, where))
        elif name == "resource":
            self._resources[doc["uid"]] = doc
        elif name == "datum":
            self._datums[doc["datum_id"]] = (doc["resource"], doc.get("datum_kwargs") or {})
            for seq in run.waiting_datum.pop(doc["datum_id"], ()):
                out.append((seq, _where(datum_ref(self._resources.get(doc["resource"]), seq, 0.0, doc.get("datum_kwargs") or {}, doc["resource"]))))
        elif name == "stop":
            for seqs in run.waiting_datum.values():
                for seq in seqs:
                    out.append((seq, {"error": "its datum document never arrived"}))
            self._forget(run)
        return out

    def _forget(self, run: _RunState) -> None:
        self._runs.pop(run.uid, None)
        for key in [k for k, v in self._by_descriptor.items() if v is run]:
            del self._by_descriptor[key]
        for mapping in (self._stream_resources, self._resources):
            for key in [k for k, v in mapping.items() if v.get("run_start") == run.uid]:
                del mapping[key]
        for key in [k for k, (res, _) in self._datums.items() if res not in self._resources]:
            del self._datums[key]


def _where(ref: FrameRef) -> dict:
    if ref.error:
        return {"error": ref.error}
    return {"path": ref.path, "dataset": ref.dataset, "index": int(ref.index)}


def task_ref(task: dict, array: np.ndarray | None = None) -> FrameRef:
    """The :class:`~live_bgsub.frames.FrameRef` of a task (``array``: an inline frame
    already fetched from the documents' stream)."""
    return FrameRef(
        int(task["seq_num"]), time.monotonic(), array=array, path=task.get("path"),
        dataset=task.get("dataset"), index=task.get("index"), error=task.get("error"),
    )
