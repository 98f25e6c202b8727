"""Publish Bluesky documents to Tiled through one writer thread, with a JSON-lines backup.

A :class:`TiledPublisher` is a document callback, ``publisher(name, doc)``, that only
puts the document on an unbounded queue and returns: it never blocks on the network
and never raises, so it can be subscribed on the RunEngine thread. One daemon thread
owns one :class:`bluesky_tiled_plugins.TiledWriter` and writes the queued documents in
arrival order. Feed every run bound for one server (the raw run from the RunEngine and
the derived, background-subtracted run from its own thread) through the same
publisher: the server then sees a single writer, which SQLite and DuckDB table stores
need (two concurrent writers give HTTP 500 "database is locked" on SQLite and crashed
a DuckDB-backed server). A PostgreSQL-backed server also accepts several writers.

Backup
------
With ``backup_directory``, each document is appended to ``<run uid>.jsonl`` in that
directory (one ``{"name": ..., "doc": ...}`` object per line, numpy values as lists)
by the writer thread *before* it is sent to Tiled, and the line is flushed to the
operating system. If Tiled is down or rejects a run, the complete run is still on
disk; :func:`read_backup` yields its documents for a replay into any callback. A
document's run comes from a :class:`~live_bgsub.routing.RunIndex` (not event-model's
RunRouter, which raises for the documents of a run whose start it did not see, where
they are still backed up under their run here). To put runs back into Tiled use
``live-bgsub recover BACKUP_DIR`` (:mod:`live_bgsub.recover`): a plain ``TiledWriter``
fails with 409 Conflict on a run Tiled holds in part, recover writes only what Tiled
lacks. Documents still in the queue when the process dies are not in the backup yet:
call :meth:`TiledPublisher.flush` or :meth:`TiledPublisher.close` at the end of
acquisition.

Failures
--------
An exception while writing a document is caught, logged on the
``live_bgsub.sinks.tiled`` logger, and recorded in :attr:`TiledPublisher.errors` (the
last :data:`KEEP_ERRORS`; :attr:`TiledPublisher.error_count` counts them all).
The rest of that run is then *not* sent to Tiled (it is still backed up), so that a
half-written run never receives its stop document and cannot pass for a complete
one, and a server that is down costs one client timeout per run rather than one per
document; other runs go on. The number of documents held back this way is in
:attr:`TiledPublisher.skipped`. :meth:`TiledPublisher.undelivered` answers, from any
thread, how many documents of a run did not reach Tiled (failed or held back), for the
last :data:`KEEP_RUNS` runs that lost any: call :meth:`TiledPublisher.flush` first, so
that the documents handed over so far have been handled. ``live-bgsub recover``
(:mod:`live_bgsub.recover`) later writes from the backup what Tiled lacks. How long
one failing request takes is the tiled client's retry policy: environment variables
``TILED_RETRY_ATTEMPTS`` (default 10) and ``TILED_RETRY_TIMEOUT`` (default 45 s), read
when ``tiled.client`` is first imported.
When the writer's first document of a run fails, event-model's RunRouter also emits a
UserWarning that blames "factory functions"; it is noise, the error is the one
recorded here.

Reading back
------------
Event columns of a run written here are read with ``catalog[uid]["primary"]``. On a
PostgreSQL table store tiled 0.2.20 returns rows without ``ORDER BY`` (SQLite and
DuckDB order by rowid), so after concurrent writes rows can come back out of order:
sort by the ``seq_num`` column. Array nodes (in-event arrays, external HDF5 frames)
are indexed by position, which follows the run's event order.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from ..routing import RunIndex, named_run

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["KEEP_ERRORS", "KEEP_RUNS", "TiledPublisher", "read_backup"]

logger = logging.getLogger("live_bgsub.sinks.tiled")

#: Backup file for documents whose run could not be determined.
UNASSIGNED_BACKUP = "unassigned.jsonl"

#: Failures kept in :attr:`TiledPublisher.errors` (the oldest are dropped; all are counted).
KEEP_ERRORS = 1000
#: Runs whose undelivered and held-back counts are kept (the least recently updated are dropped).
KEEP_RUNS = 1000


class _Flush:
    """Queue marker: the writer thread sets ``event`` when it reaches it."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()


_CLOSE = object()  # Queue marker: the writer thread stops after it.


class _Discard:
    """Queue marker: the writer thread drops what it holds of run ``uid``."""

    __slots__ = ("uid",)

    def __init__(self, uid: str) -> None:
        self.uid = uid


def _json_default(value: Any) -> Any:
    """JSON fallback for numpy arrays and scalars (anything with ``tolist``)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a document holds a value that is not JSON serializable: {type(value).__name__}")


def read_backup(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(name, doc)`` pairs from a JSON-lines backup written by TiledPublisher.

    Parameters
    ----------
    path : str or path-like
        A ``<run uid>.jsonl`` file from the publisher's ``backup_directory``.
    """
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                yield item["name"], item["doc"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number} is not a backed-up document ({error}): {line[:200]!r}") from None


class TiledPublisher:
    """Document callback that writes runs to Tiled from one background thread.

    Parameters
    ----------
    client : tiled client node
        The run catalog, e.g. from :func:`live_bgsub.tiled_server.connect`.
    batch_size : int, optional
        Events (and StreamDatums) per write, passed to ``TiledWriter``. The default,
        1, streams: each event is visible in Tiled as soon as it is written. Larger
        values write faster but make rows visible only per batch (or at the stop).
    backup_directory : str or path-like, optional
        Where every document is appended to ``<run uid>.jsonl`` before it is
        written (see the module docstring). None (default) keeps no backup.
    name : str, optional
        Name of the writer thread.
    **writer_kwargs
        Further ``TiledWriter`` options (``patches``, ...). ``max_array_size``
        defaults to 0 here (every array in an event is stored as an array node, none
        in the SQL table), because a SQLite table store cannot hold list columns.

    Attributes
    ----------
    errors : list of dict
        The last :data:`KEEP_ERRORS` failures, oldest first:
        ``{"name", "run_uid", "doc_uid", "stage", "error"}``; ``stage`` is ``"write"``
        (Tiled), ``"backup"`` (disk) or ``"enqueue"`` (called after :meth:`close`).
    error_count : int
        Every failure recorded since the publisher was made (also those dropped from
        ``errors``).
    skipped : dict
        Run uid -> number of its documents not sent to Tiled after a failure (the last
        :data:`KEEP_RUNS` runs with any).
    client, writer, batch_size, backup_directory
        As configured; ``writer`` is the ``TiledWriter`` (used by the thread only).

    Notes
    -----
    ``publisher(name, doc)`` costs a queue put. The queue is unbounded: if the writer
    cannot keep up, memory grows, and documents are held (not copied), so callers
    must not mutate a document after handing it over. Documents from several threads
    are written in the order they were enqueued; each run's own order is kept.

    Examples
    --------
    With ``server`` an :class:`~live_bgsub.tiled_server.EmbeddedTiledServer`, ``RE`` a
    RunEngine and ``det`` a detector:

    >>> with TiledPublisher.from_uri(server.uri, api_key=server.api_key,
    ...                              backup_directory="backup") as publisher:  # doctest: +SKIP
    ...     RE.subscribe(publisher)
    ...     RE(count([det], 10))
    ...     publisher.flush()
    """

    def __init__(
        self,
        client,
        *,
        batch_size: int = 1,
        backup_directory: str | Path | None = None,
        name: str = "tiled-publisher",
        **writer_kwargs,
    ):
        from bluesky_tiled_plugins import TiledWriter

        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (1 streams every event), got {batch_size!r}")
        if "backup_directory" in writer_kwargs or "backup_dictionary" in writer_kwargs:
            raise TypeError("TiledPublisher keeps its own backup: pass backup_directory to TiledPublisher only")
        self.client = client
        self.batch_size = batch_size
        self.backup_directory = Path(backup_directory) if backup_directory is not None else None
        if self.backup_directory is not None:
            self.backup_directory.mkdir(parents=True, exist_ok=True)
        # Internal arrays go to array storage by default, whatever their size:
        # TiledWriter's own default keeps arrays of <= 16 elements in the SQL table,
        # which a SQLite table store rejects (HTTP 500 "Unsupported PyArrow type:
        # list<item: double>", retried for ~25 s before failing).
        writer_kwargs.setdefault("max_array_size", 0)
        self.writer = TiledWriter(client, batch_size=batch_size, **writer_kwargs)
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.skipped: dict[str, int] = OrderedDict()
        # Run uid -> documents that failed or were held back; guarded by _stats_lock,
        # like errors, error_count and skipped (written by the thread, read by anyone).
        self._undelivered: OrderedDict[str, int] = OrderedDict()
        self._stats_lock = threading.Lock()

        self._queue: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()  # Guards _closed and _enqueued together with the put.
        self._closed = False
        self._enqueued = 0
        self._done = 0
        self._runs = RunIndex()  # which run each document belongs to (writer thread); forgotten at the stop
        self._failed_runs: set[str] = set()
        self._backup_files: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def from_uri(cls, uri: str, api_key: str | None = None, catalog: str = "runs", **kwargs) -> TiledPublisher:
        """Connect to the run catalog at ``uri`` (see :func:`~live_bgsub.tiled_server.connect`).

        Parameters
        ----------
        uri : str
            Tiled server URI, e.g. ``http://127.0.0.1:8000/api/v1``.
        api_key : str, optional
            API key (default: environment variable ``TILED_API_KEY``).
        catalog : str, optional
            Path of the ``CatalogOfBlueskyRuns`` container, created if missing.
        **kwargs
            Passed to :class:`TiledPublisher`.
        """
        from live_bgsub.tiled_server import connect

        return cls(connect(uri, api_key=api_key, catalog=catalog), **kwargs)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state}, pending={self.pending}, errors={self.error_count}>"

    # -- caller side -------------------------------------------------------------

    def __call__(self, name: str, doc: dict) -> None:
        """Enqueue one document; returns at once and never raises."""
        try:
            with self._lock:
                if not self._closed:
                    self._queue.put((name, doc))
                    self._enqueued += 1
                    return
            self._record(name, doc, None, "enqueue", "the publisher is closed; document not written")
        except Exception as error:  # noqa: BLE001 - a sink must never break the RunEngine
            logger.error("TiledPublisher: could not enqueue a %r document: %r", name, error)
            self._record(name, doc, None, "enqueue", f"{type(error).__name__}: {error}")

    def discard(self, run_uid: str) -> None:
        """Drop run ``run_uid`` before it is written again from its start (the bus's
        restarted composer): the writer thread deletes the run from the catalog if it
        is there, removes its backup file and forgets its counts. Queued in order with
        the documents; returns at once."""
        with self._lock:
            if not self._closed:
                self._queue.put(_Discard(str(run_uid)))
                self._enqueued += 1

    @property
    def pending(self) -> int:
        """Number of documents enqueued but not yet handled by the writer thread."""
        with self._lock:
            return self._enqueued - self._done

    def undelivered(self, run_uid: str) -> int:
        """Number of documents of run ``run_uid`` that did not reach Tiled, so far.

        Counts the run's documents handled by the writer thread that failed to write
        plus those held back after its first failure (see the module docstring), and
        its documents handed over after :meth:`close` when their run is known (start,
        descriptor, resources, stop). Documents still queued are not counted yet:
        call :meth:`flush` first. Safe to call from any thread.

        Parameters
        ----------
        run_uid : str
            The run's start uid (raw or derived).

        Returns
        -------
        int
            0 when every handled document of the run was written, or when the run is
            unknown. Counts are kept for the last :data:`KEEP_RUNS` runs that lost any.

        Examples
        --------
        >>> publisher.flush(timeout=30)  # doctest: +SKIP
        >>> if publisher.undelivered(raw_uid):  # doctest: +SKIP
        ...     print("the raw run is incomplete in Tiled; its backup holds it all")
        """
        with self._stats_lock:
            return self._undelivered.get(run_uid, 0)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document enqueued before this call has been handled.

        Handled means written to Tiled, or failed and recorded in :attr:`errors`.
        With ``batch_size > 1`` rows may still sit in the writer's batch.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait; None waits as long as it takes.

        Returns
        -------
        bool
            True when everything was handled, False on timeout.
        """
        marker = _Flush()
        with self._lock:
            if self._closed:
                marker = None
            else:
                self._queue.put(marker)
        if marker is None:  # Closed: the thread ends after the last document.
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return marker.event.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting documents, write those queued, and end the writer thread.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait for the queue to drain; None waits as long as it takes.

        Returns
        -------
        bool
            True when the thread has finished (everything handled), False on timeout;
            the thread then goes on writing in the background.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_CLOSE)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- writer thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    break
                if isinstance(item, _Flush):
                    item.event.set()
                    continue
                if isinstance(item, _Discard):
                    try:
                        self._drop(item.uid)
                    except Exception as error:  # noqa: BLE001 - then the rewrite fails with 409, recorded
                        logger.exception("TiledPublisher: could not drop run %s", item.uid)
                        self._record("start", {"uid": item.uid}, item.uid, "discard", f"{type(error).__name__}: {error}")
                    finally:
                        with self._lock:
                            self._done += 1
                    continue
                name, doc = item
                try:
                    self._handle(name, doc)
                except Exception as error:
                    logger.exception("TiledPublisher: unexpected failure on a %r document", name)
                    self._record(name, doc, None, "write", f"{type(error).__name__}: {error}")
                finally:
                    with self._lock:
                        self._done += 1
        finally:
            for file in self._backup_files.values():
                file.close()
            self._backup_files.clear()

    def _handle(self, name: str, doc: dict) -> None:
        run_uid = self._runs.add(name, doc)
        if self.backup_directory is not None:
            self._backup(run_uid, name, doc)
        if run_uid is not None and run_uid in self._failed_runs:
            self._count(run_uid, held_back=True)
        else:
            try:
                self.writer(name, doc)
            except Exception as error:
                text = f"{type(error).__name__}: {error}"
                logger.error(
                    "TiledPublisher: writing a %r document of run %s failed (%s); the rest of this run "
                    "is not sent to Tiled%s",
                    name,
                    run_uid,
                    text,
                    f" but is kept in {self.backup_directory}" if self.backup_directory else "",
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
                self._record(name, doc, run_uid, "write", text)
                if run_uid is not None:
                    self._count(run_uid, held_back=False)
                    self._failed_runs.add(run_uid)
        if name == "stop" and run_uid is not None:
            self._runs.forget(run_uid)
            self._failed_runs.discard(run_uid)
            file = self._backup_files.pop(run_uid, None)
            if file is not None:
                file.close()

    def _drop(self, run_uid: str) -> None:
        """Writer thread: delete run ``run_uid`` from the catalog and the backup."""
        if run_uid in self.client:
            self.client[run_uid].delete(recursive=True, external_only=False)
            logger.info("TiledPublisher: dropped the partial run %s (it is written again)", run_uid)
        self._runs.forget(run_uid)
        self._failed_runs.discard(run_uid)
        file = self._backup_files.pop(run_uid, None)
        if file is not None:
            file.close()
        if self.backup_directory is not None:
            (self.backup_directory / f"{run_uid}.jsonl").unlink(missing_ok=True)
        with self._stats_lock:
            self._undelivered.pop(run_uid, None)
            self.skipped.pop(run_uid, None)

    def _backup(self, run_uid: str | None, name: str, doc: dict) -> None:
        try:
            key = run_uid or ""
            file = self._backup_files.get(key)
            if file is None:
                filename = f"{run_uid}.jsonl" if run_uid else UNASSIGNED_BACKUP
                # Kept open for the run; closed at its stop or when the thread ends.
                file = open(self.backup_directory / filename, "a")  # noqa: SIM115
                self._backup_files[key] = file
            file.write(json.dumps({"name": name, "doc": doc}, default=_json_default) + "\n")
            file.flush()
        except Exception as error:  # noqa: BLE001 - a full disk must not stop the writes
            text = f"{type(error).__name__}: {error}"
            logger.error("TiledPublisher: backing up a %r document of run %s failed: %s", name, run_uid, text)
            self._record(name, doc, run_uid, "backup", text)

    def _count(self, run_uid: str, *, held_back: bool) -> None:
        """Count one undelivered document of a run (held back after a failure, or failed)."""
        with self._stats_lock:
            _bump(self._undelivered, run_uid)
            if held_back:
                _bump(self.skipped, run_uid)

    def _record(self, name: str, doc: Any, run_uid: str | None, stage: str, text: str) -> None:
        doc_uid = doc.get("uid") if isinstance(doc, dict) else None
        entry = {"name": name, "run_uid": run_uid, "doc_uid": doc_uid, "stage": stage, "error": text}
        # A document refused at the door never reaches the writer: undelivered, when
        # it names its run (the run index belongs to the writer thread).
        refused_run = named_run(name, doc) if stage == "enqueue" else None
        with self._stats_lock:
            self.errors.append(entry)
            self.error_count += 1
            if len(self.errors) > KEEP_ERRORS:
                del self.errors[: len(self.errors) - KEEP_ERRORS]
            if refused_run is not None:
                _bump(self._undelivered, refused_run)


def _bump(counts: OrderedDict, run_uid: str) -> None:
    """Add one to ``counts[run_uid]``, keeping the :data:`KEEP_RUNS` most recently counted runs."""
    counts[run_uid] = counts.get(run_uid, 0) + 1
    counts.move_to_end(run_uid)
    while len(counts) > KEEP_RUNS:
        counts.popitem(last=False)

