"""Which run a Bluesky document belongs to, for the documents of many runs at once.

Documents name their run in different ways. A start *is* the run; a stop, a descriptor,
a resource and a stream resource name it (``run_start``, optional in the two resource
kinds); an event or an event page names its descriptor; a datum or a datum page names
its resource; a stream datum names its descriptor and its stream resource.
:class:`RunIndex` remembers the uids that documents introduce (descriptors, resources,
stream resources) with their run, says which run any document belongs to, keeps the
resource documents for the datums and stream datums that refer to them, and forgets a
run's uids when told (at its stop) or when more than ``keep`` runs are known.

Every module that takes the documents of several runs routes them here: the live
callback (:mod:`live_bgsub.callback`), the gap detector of ``serve``
(:mod:`live_bgsub.transport`), the Tiled and PV sinks (:mod:`live_bgsub.sinks.tiled`,
:mod:`live_bgsub.sinks.pvs`) and the bus's publisher (:mod:`live_bgsub.bus.publisher`).

Why not :class:`event_model.RunRouter` (event-model 1.24), in one line each:

- it raises (KeyError) for a descriptor, event, stream datum or datum of a run or
  resource it has not seen, where the gap detector must count such documents per run,
  the Tiled sink must back them up under their run, and the callback, the PV sink and
  the publisher ignore them;
- it routes a stream datum by its stream resource only, and raises for a stream resource
  without ``run_start``, where the callback reads such frames through the stream datum's
  descriptor and lists a stream datum of an unknown stream resource in its run;
- its default Filler raises for an event that comes before its datum (replay order);
- it never drops a resource's or a stream resource's run at the stop (unbounded
  memory in a long-lived ``serve`` or composer);
- its callbacks receive event and datum pages only, and the publisher must publish
  each document as it came, one message each, from a coroutine.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["KEEP_RUNS", "KEEP_UNATTRIBUTED", "RunIndex", "named_run"]

#: Runs whose uids a :class:`RunIndex` keeps by default (the first seen are dropped first).
KEEP_RUNS = 1000
#: Resources without ``run_start`` kept by default (the oldest are dropped first).
KEEP_UNATTRIBUTED = 10000

_NAMES_RUN = ("stop", "descriptor", "resource", "stream_resource")  # documents with ``run_start``
_RESOURCES = ("resource", "stream_resource")


def named_run(name: str, doc) -> str | None:
    """The run uid a document names itself: a start's ``uid``, the ``run_start`` of a
    stop, a descriptor, a resource or a stream resource; None for other documents, for
    a resource without ``run_start`` and for anything that is not a dict."""
    if not isinstance(doc, dict):
        return None
    if name == "start":
        return doc.get("uid")
    if name in _NAMES_RUN:
        return doc.get("run_start") or None
    return None


class RunIndex:
    """Map any document to its run, for documents of any number of runs at once.

    Feed it each document with :meth:`add`, which returns the document's run uid (None
    when it cannot be told); :meth:`run_of` answers the same without recording anything.
    Thread-safe: one lock around each call.

    Parameters
    ----------
    keep : int or None, optional
        Most runs whose uids are kept (default :data:`KEEP_RUNS`): when a document
        brings one more, the run seen first is forgotten. None keeps every run until
        :meth:`forget`.
    keep_unattributed : int, optional
        Most resources and stream resources without ``run_start`` kept for
        :meth:`resource` (default :data:`KEEP_UNATTRIBUTED`; the oldest are dropped).

    Notes
    -----
    A run is known from its start, and also from a descriptor, resource or stream
    resource that names it, so that the events of a run whose start never came (a
    restarted server) still route to it. A stop names its run but records nothing:
    call :meth:`forget` when the run is done with. Documents that name no run (a
    resource without ``run_start``, a datum of such a resource, an event of an unknown
    descriptor) belong to None; :meth:`unattributed` tells the first two apart.

    Examples
    --------
    >>> from event_model import compose_run
    >>> run = compose_run()
    >>> desc = run.compose_descriptor(name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}})
    >>> index = RunIndex()
    >>> index.add("start", run.start_doc) == index.add("descriptor", desc.descriptor_doc) == run.start_doc["uid"]
    True
    >>> index.run_of("event", desc.compose_event(data={"x": 1}, timestamps={"x": 0})) == run.start_doc["uid"]
    True
    >>> index.forget(run.start_doc["uid"])
    >>> index.run_of("event", desc.compose_event(data={"x": 2}, timestamps={"x": 0})) is None
    True
    """

    def __init__(self, keep: int | None = KEEP_RUNS, *, keep_unattributed: int = KEEP_UNATTRIBUTED):
        if keep is not None and not _positive(keep):
            raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
        if not _positive(keep_unattributed):
            raise ValueError(f"keep_unattributed must be a positive integer, got {keep_unattributed!r}")
        self.keep = keep
        self.keep_unattributed = keep_unattributed
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, list[tuple[dict, str]]] = OrderedDict()  # run uid -> (map, key) it added
        self._descriptor_run: dict[str, str] = {}  # descriptor uid -> run uid
        self._resource_run: dict[str, str] = {}  # (stream) resource uid -> run uid
        self._resource_docs: dict[str, dict] = {}  # (stream) resource uid -> its document
        self._unattributed: OrderedDict[str, dict] = OrderedDict()  # uid -> (stream) resource without run_start

    def __contains__(self, run_uid) -> bool:
        with self._lock:
            return run_uid in self._runs

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    @property
    def runs(self) -> list[str]:
        """The uids of the runs known, first seen first."""
        with self._lock:
            return list(self._runs)

    def add(self, name: str, doc: dict) -> str | None:
        """Record what ``doc`` introduces (a run, descriptor, resource, stream resource)
        and return the uid of the run it belongs to (None when unknown)."""
        with self._lock:
            if name == "start":
                uid = doc.get("uid")
                if uid is not None:
                    self._track(uid)
                return uid
            if name == "descriptor":
                run, uid = doc.get("run_start"), doc.get("uid")
                if run and uid is not None:
                    self._remember(run, self._descriptor_run, uid, run)
                return run or None
            if name in _RESOURCES:
                run, uid = doc.get("run_start"), doc.get("uid")
                if uid is not None and run:
                    self._remember(run, self._resource_run, uid, run)
                    self._remember(run, self._resource_docs, uid, doc)
                elif uid is not None:
                    self._unattributed[uid] = doc
                    self._unattributed.move_to_end(uid)
                    while len(self._unattributed) > self.keep_unattributed:
                        self._unattributed.popitem(last=False)
                return run or None
            return self._lookup(name, doc)

    def run_of(self, name: str, doc: dict) -> str | None:
        """The uid of the run ``doc`` belongs to, from what was added so far (None when
        it cannot be told); records nothing. The run a document names itself
        (:func:`named_run`) is returned even when no document of it was added."""
        with self._lock:
            return self._lookup(name, doc)

    def resource(self, uid: str) -> dict | None:
        """The resource or stream resource document of ``uid`` (with or without
        ``run_start``) added and not forgotten; None otherwise."""
        with self._lock:
            doc = self._resource_docs.get(uid)
            return doc if doc is not None else self._unattributed.get(uid)

    def unattributed(self, name: str, doc: dict) -> bool:
        """Whether ``doc`` is a resource or stream resource without ``run_start``, or a
        datum, datum page or stream datum of such a resource (as added so far)."""
        if name in _RESOURCES:
            return not doc.get("run_start")
        with self._lock:
            if name in ("datum", "datum_page"):
                return doc.get("resource") in self._unattributed
            if name == "stream_datum":
                return doc.get("stream_resource") in self._unattributed
        return False

    def forget(self, run_uid: str) -> None:
        """Drop what is known about run ``run_uid`` (its later documents belong to no
        run, except those that name it)."""
        with self._lock:
            self._drop(run_uid)

    # -- with the lock held

    def _lookup(self, name: str, doc: dict) -> str | None:
        if name == "start" or name in _NAMES_RUN:
            return named_run(name, doc)
        if name in ("event", "event_page"):
            return self._descriptor_run.get(doc.get("descriptor"))
        if name == "stream_datum":
            return self._descriptor_run.get(doc.get("descriptor")) or self._resource_run.get(doc.get("stream_resource"))
        if name in ("datum", "datum_page"):
            return self._resource_run.get(doc.get("resource"))
        return None

    def _track(self, run_uid: str) -> list:
        added = self._runs.get(run_uid)
        if added is None:
            added = self._runs[run_uid] = []
            while self.keep is not None and len(self._runs) > self.keep:
                self._drop(next(iter(self._runs)))
        return added

    def _remember(self, run_uid: str, mapping: dict, key: str, value) -> None:
        mapping[key] = value
        self._track(run_uid).append((mapping, key))

    def _drop(self, run_uid: str) -> None:
        for mapping, key in self._runs.pop(run_uid, ()):
            mapping.pop(key, None)


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
