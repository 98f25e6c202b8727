"""Write runs kept in TiledPublisher's JSON-lines backups into Tiled: only what Tiled lacks.

When Tiled fails during a run (server killed, network gone), :class:`~live_bgsub.sinks.
tiled.TiledPublisher` stops sending that run and keeps every document in
``<backup_directory>/<run uid>.jsonl``. :func:`recover` re-sends such backups
idempotently. For each run in the backup:

- Tiled does not hold it: the whole run is written with ``TiledWriter``, as the live
  publisher would have (``max_array_size=0``).
- Tiled holds it with its stop: complete; nothing is written.
- Tiled holds it without a stop (written partly, then cut off): the run is completed.
  Documents go through TiledWriter's ``RunNormalizer`` (so area-detector
  Resource/Datum documents become the same StreamResource/StreamDatum documents the
  live writer produced), then each one is compared with what Tiled holds: a stream
  (descriptor) that exists is kept; an event whose ``seq_num`` is in the stream's
  table is kept, the others are appended (internal array columns, stored as array
  nodes, by position: rows beyond the node's length are appended); a StreamDatum whose
  frames lie within the external array's registered length is kept, the others extend
  that array's data source; the stop is written last, with a note in the run's
  ``notes`` saying what was recovered.

Running it again writes nothing: every run then holds its stop. A backup without a
stop (the process died before the run ended, e.g. a killed ``live-bgsub serve``) is
written as far as it goes and the run is left without a stop, unless ``close_open``
(``recover --close-open``) is given: the run then gets a made-up stop, ``exit_status``
``"fail"``, whose ``reason`` says the writer stopped before the run ended, and
``num_events`` counted from the backup. Do not recover a run that a live publisher is still writing:
both would append its missing rows. The counts reported are documents of the backup; for a
completed run they are counted after normalisation (for StreamResource/StreamDatum
runs the same documents).

Examples
--------
>>> from live_bgsub.recover import recover
>>> for result in recover(catalog, "/data/backup"):  # doctest: +SKIP
...     print(result.line())
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .sinks.tiled import UNASSIGNED_BACKUP

__all__ = ["BATCH_SIZE", "RecoveredRun", "backup_files", "recover", "recover_run"]

logger = logging.getLogger("live_bgsub.recover")

#: Events (and frames) written per request when a run is written or completed.
BATCH_SIZE = 500
#: Arrays of more elements than this in events become array nodes (TiledPublisher's setting).
MAX_ARRAY_SIZE = 0


@dataclass
class RecoveredRun:
    """What :func:`recover_run` did with one run's backup.

    Attributes
    ----------
    uid : str or None
        The run's start uid (None when the backup holds no start document).
    path : pathlib.Path
        The backup file.
    state : str
        ``"written"`` (Tiled did not hold the run), ``"completed"`` (Tiled held part of
        it), ``"complete"`` (Tiled held all of it), ``"open"`` (written as far as the
        backup goes, which has no stop), ``"failed"`` or ``"not tried"``.
    written, held : int
        Documents written now, and documents Tiled already held (skipped).
    plan_name : str or None
        From the start document (``live_bgsub`` for a derived run).
    error : str or None
        Why it failed.
    """

    uid: str | None
    path: Path
    state: str = "failed"
    written: int = 0
    held: int = 0
    plan_name: str | None = None
    error: str | None = None
    closed: bool = False  # the backup had no stop; a made-up one was written

    @property
    def ok(self) -> bool:
        """True when the run is complete in Tiled now."""
        return self.state in ("written", "completed", "complete")

    def line(self) -> str:
        """One line for the run: uid, plan, what was written and what was skipped."""
        who = f"{self.uid or '?'} ({self.plan_name or 'no plan_name'}, {self.path.name})"
        counts = f"written {self.written} document(s), skipped {self.held} already held"
        if self.state == "failed":
            return f"{who}: FAILED after {counts}: {self.error}"
        if self.state == "not tried":
            return f"{who}: not tried: {self.error}"
        if self.state == "open":
            return f"{who}: {counts}; the backup has no stop document, so the run stays without one"
        closed = "; the backup had no stop: closed with exit_status 'fail'" if self.closed else ""
        return f"{who}: {counts}" + {"written": " (new in Tiled)", "completed": " (run completed)"}.get(self.state, "") + closed


#: The ``reason`` of a stop made up by ``recover --close-open``.
CLOSED_REASON = (
    "the process writing this run stopped before the run's stop document (killed or crashed); "
    "closed from its backup by live-bgsub recover --close-open"
)


def closing_stop(docs: list[tuple[str, dict]]) -> dict:
    """A stop for a run whose backup ``docs`` (``(name, doc)``, start first) has none:
    ``exit_status`` ``"fail"``, :data:`CLOSED_REASON`, and ``num_events`` per stream
    counted from the backup's events and event pages."""
    import uuid

    start = docs[0][1]
    stream_of = {doc["uid"]: doc.get("name") for name, doc in docs if name == "descriptor"}
    counts: dict[str, int] = {}
    last = start.get("time", time.time())
    for name, doc in docs:
        last = max(last, _latest(doc.get("time"), last))
        if name == "event":
            stream = stream_of.get(doc.get("descriptor"))
            counts[stream] = counts.get(stream, 0) + 1
        elif name == "event_page":
            stream = stream_of.get(doc.get("descriptor"))
            counts[stream] = counts.get(stream, 0) + len(doc.get("seq_num") or [])
    return {
        "run_start": start["uid"],
        "uid": str(uuid.uuid4()),
        "time": last,
        "exit_status": "fail",
        "reason": CLOSED_REASON,
        "num_events": {k: v for k, v in counts.items() if k is not None},
    }


def _latest(value, default: float) -> float:
    """The largest time in ``value`` (a number or, for an event page, a list of them)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return float(max(value))
    return default


def backup_files(source: str | Path) -> list[Path]:
    """The run backups at ``source`` (a ``.jsonl`` file, or a backup directory), oldest run first.

    In a directory every ``*.jsonl`` file except ``unassigned.jsonl`` (documents whose
    run was unknown) is a run; runs are ordered by their start time, so a raw run comes
    before the derived run made from it.

    Raises
    ------
    FileNotFoundError
        When ``source`` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no backup at {source}")
    if source.is_file():
        return [source]
    paths = [p for p in source.glob("*.jsonl") if p.name != UNASSIGNED_BACKUP]
    return sorted(paths, key=lambda p: (_start_time(p), p.name))


def recover(
    catalog,
    source: str | Path,
    *,
    batch_size: int = BATCH_SIZE,
    max_array_size: int = MAX_ARRAY_SIZE,
    patches: dict | None = None,
    spec_to_mimetype: dict | None = None,
    on_run: Callable[[RecoveredRun], None] | None = None,
    close_open: bool = False,
) -> list[RecoveredRun]:
    """Write the runs of a backup (file or directory) into ``catalog``: only what it lacks.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns client
        Where the runs go (:func:`live_bgsub.tiled_server.connect`).
    source : str or path-like
        A ``<run uid>.jsonl`` backup file or a TiledPublisher ``backup_directory``.
    batch_size : int, optional
        Events per request.
    max_array_size, patches, spec_to_mimetype
        As given to the ``TiledWriter`` that wrote the runs (TiledPublisher's defaults).
    on_run : callable, optional
        Called with each :class:`RecoveredRun` as soon as its run is done.
    close_open : bool, optional
        Give a run whose backup has no stop a made-up one (:func:`closing_stop`).
        Only for runs whose writer is gone: a live run would be closed under it.

    Returns
    -------
    list of RecoveredRun
        One per backup file. A run that fails does not stop the others, except when
        the server cannot be reached: the remaining runs are then ``"not tried"``.
    """
    import httpx

    results = []
    unreachable = None
    for path in backup_files(source):
        if unreachable is not None:
            result = RecoveredRun(None, path, state="not tried", error=unreachable)
            result.uid, result.plan_name = _start_fields(path)
        else:
            try:
                result = recover_run(
                    catalog,
                    path,
                    batch_size=batch_size,
                    max_array_size=max_array_size,
                    patches=patches,
                    spec_to_mimetype=spec_to_mimetype,
                    close_open=close_open,
                )
            except Exception as error:  # noqa: BLE001 - one bad run must not stop the others
                logger.debug("recovering %s failed", path, exc_info=True)
                result = getattr(error, "partial_result", None) or RecoveredRun(None, path)
                result.state, result.error = "failed", f"{type(error).__name__}: {error}"
                if result.uid is None:
                    result.uid, result.plan_name = _start_fields(path)
                if isinstance(error, httpx.TransportError):
                    unreachable = f"the Tiled server became unreachable while recovering {path.name} ({error})"
        results.append(result)
        if on_run is not None:
            on_run(result)
    return results


def recover_run(
    catalog,
    path: str | Path,
    *,
    batch_size: int = BATCH_SIZE,
    max_array_size: int = MAX_ARRAY_SIZE,
    patches: dict | None = None,
    spec_to_mimetype: dict | None = None,
    close_open: bool = False,
) -> RecoveredRun:
    """Write one run's backup into ``catalog``, skipping what Tiled already holds.

    See the module docstring for how a partly written run is completed. Parameters
    as in :func:`recover`.

    Raises
    ------
    ValueError
        When the file is not a run backup (no start document first, a corrupt line
        other than a cut-off last one).
    Exception
        Whatever the Tiled client raises (the partial counts ride on the exception as
        ``partial_result``).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = Path(path)
    docs = list(_read_backup_tolerant(path))
    if not docs or docs[0][0] != "start":
        first = docs[0][0] if docs else "nothing"
        raise ValueError(f"{path} is not a run backup: it begins with {first}, not a start document")
    start = docs[0][1]
    result = RecoveredRun(start["uid"], path, plan_name=start.get("plan_name"))
    has_stop = any(name == "stop" for name, _ in docs)
    if not has_stop and close_open:
        docs.append(("stop", closing_stop(docs)))
        has_stop = result.closed = True
    client = catalog.include_data_sources()  # the data source ids are needed to extend arrays
    try:
        node = client[start["uid"]]
    except KeyError:
        node = None
    try:
        if node is not None and (node.metadata.get("stop") is not None):
            result.state, result.held = "complete", len(docs)
        elif node is None and has_stop:
            _write_whole_run(client, docs, batch_size, max_array_size, patches, spec_to_mimetype, result)
            result.state = "written"
        else:
            completer = _RunCompleter(
                client, node, start, batch_size=batch_size, max_array_size=max_array_size, source=path.name
            )
            _complete_run(completer, docs, patches, spec_to_mimetype, result)
            if not completer.stopped:
                result.state = "open"
            else:
                result.state = "completed" if node is not None else "written"
    except Exception as error:
        error.partial_result = result
        raise
    return result


# -- writing -------------------------------------------------------------------------


def _write_whole_run(client, docs, batch_size, max_array_size, patches, spec_to_mimetype, result) -> None:
    """A run Tiled does not hold: write it all, exactly as the live TiledWriter does."""
    from bluesky_tiled_plugins import TiledWriter

    writer = TiledWriter(
        client, batch_size=batch_size, max_array_size=max_array_size, patches=patches, spec_to_mimetype=spec_to_mimetype
    )
    for name, doc in docs:
        writer(name, doc)
        result.written += 1


def _complete_run(completer, docs, patches, spec_to_mimetype, result) -> None:
    from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer

    normalizer = RunNormalizer(patches=patches, spec_to_mimetype=spec_to_mimetype)
    normalizer.subscribe(completer)
    try:
        for name, doc in docs:
            normalizer(name, doc)
        completer.finish()
    finally:
        result.written, result.held = completer.written, completer.held


class _RunCompleter:
    """Receives a run's normalised documents and writes only what Tiled does not hold.

    Mirrors what ``bluesky_tiled_plugins``' ``_RunWriter`` writes for each document
    (containers, specs, metadata, tables, array nodes, external data sources), so a
    completed run reads like one written without a fault.
    """

    def __init__(self, client, node, start: dict, *, batch_size: int, max_array_size: int, source: str):
        self.client = client
        self.root = _container(node) if node is not None else None
        self.access_tags = start.get("tiled_access_tags")
        self.batch_size = batch_size
        self.max_array_size = max_array_size
        self.source = source
        self.streams: dict[str, _Stream] = {}  # by stream name
        self.stream_of: dict[str, _Stream] = {}  # by descriptor uid
        self.data_keys: dict[str, dict] = {}
        self.sres_docs: dict[str, dict] = {}
        self.externals: dict[str, _External] = {}  # by stream resource uid and by "stream/data_key"
        self.unused_sres: set[str] = set()
        self.written = 0
        self.held = 0
        self.stopped = False

    def __call__(self, name: str, doc: dict) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:
            raise ValueError(f"cannot complete a run from a {name!r} document (after normalisation)")
        handler(doc)

    def _count(self, wrote: bool) -> None:
        if wrote:
            self.written += 1
        else:
            self.held += 1

    # -- documents -------------------------------------------------------------------

    def _on_start(self, doc: dict) -> None:
        if self.root is not None:
            self._count(False)
            return
        from bluesky_tiled_plugins.utils import truncate_json_overflow
        from tiled.structures.core import Spec

        doc = dict(doc)
        doc.pop("tiled_access_tags", None)
        extra_specs = doc.pop("tiled_specs", None) or []
        node = self.client.create_container(
            key=doc["uid"],
            metadata={"start": truncate_json_overflow(doc)},
            specs=[*(Spec(s) if isinstance(s, str) else Spec(**s) for s in extra_specs), Spec("BlueskyRun", version="3.0")],
            access_tags=self.access_tags,
        )
        self.root = _container(node)
        self._count(True)

    def _on_descriptor(self, doc: dict) -> None:
        from bluesky_tiled_plugins.utils import truncate_json_overflow
        from tiled.structures.core import Spec

        name = doc["name"]
        self.data_keys.update(doc.get("data_keys", {}))
        stream = self.streams.get(name)
        if stream is None and name in self.root:
            stream = self.streams[name] = _Stream(self, name, _container(self.root[name]), doc)
        if stream is None:
            metadata = {k: v for k, v in doc.items() if k not in {"name", "object_keys", "run_start"}}
            node = self.root.create_container(
                key=name,
                metadata=truncate_json_overflow(metadata),
                specs=[Spec("BlueskyEventStream", version="3.0"), Spec("composite")],
                access_tags=self.access_tags,
            )
            stream = self.streams[name] = _Stream(self, name, _container(node), doc)
            self._count(True)
        else:
            # Known stream: the same descriptor again, or one updating its configuration.
            metadata = stream.node.metadata
            updates = list(metadata.get("_config_updates", []))
            known = {metadata.get("uid"), *(u.get("uid") for u in updates)}
            if doc["uid"] in known:
                self._count(False)
            else:
                update = {"uid": doc["uid"], "time": doc["time"]}
                if doc.get("configuration"):
                    update["configuration"] = doc["configuration"]
                stream.node.update_metadata(
                    metadata={"_config_updates": truncate_json_overflow([*updates, update])}, drop_revision=True
                )
                self._count(True)
        self.stream_of[doc["uid"]] = stream

    def _on_event(self, doc: dict) -> None:
        stream = self.stream_of[doc["descriptor"]]
        self._count(stream.add_event(doc))
        if len(stream.rows) >= self.batch_size or any(len(v) >= self.batch_size for v in stream.array_values.values()):
            stream.flush()

    def _on_stream_resource(self, doc: dict) -> None:
        self.sres_docs[doc["uid"]] = doc
        self.unused_sres.add(doc["uid"])

    def _on_stream_datum(self, doc: dict) -> None:
        from bluesky_tiled_plugins.writing.consolidators import consolidator_factory

        sres_uid = doc["stream_resource"]
        external = self.externals.get(sres_uid)
        if external is None:
            if sres_uid not in self.sres_docs:
                raise ValueError(f"stream_datum {doc.get('uid')!r} refers to stream resource {sres_uid!r}, not in the backup before it")
            stream = self.stream_of[doc["descriptor"]]
            sres = self.sres_docs[sres_uid]
            full_key = f"{stream.name}/{sres['data_key']}"
            external = self.externals.get(full_key)
            if external is not None:  # another file for the same data key: its frames follow
                external.consolidator.update_from_stream_resource(sres)
                self._count(external.node is None)
            else:
                consolidator = consolidator_factory(sres, stream.node.metadata)
                key = consolidator.data_key
                external = _External(self, stream, consolidator, stream.node[key] if key in stream.node else None)
                self.externals[full_key] = external
                self._count(external.node is None)  # the stream resource document
            self.externals[sres_uid] = external
            self.unused_sres.discard(sres_uid)
        self._count(external.add_stream_datum(doc))

    def _on_stop(self, doc: dict) -> None:
        doc = dict(doc)
        notes = list(doc.pop("_run_normalizer_notes", []) or [])
        self._flush()
        for external in {id(e): e for e in self.externals.values()}.values():
            if external.consolidator.metadata:
                external.node.update_metadata(metadata=external.consolidator.metadata, drop_revision=True)
        self.held += len(self.unused_sres)  # never referenced: the live writer ignored them too
        self.unused_sres.clear()
        self.written += 1
        notes.append(
            f"completed by live-bgsub recover {__version__} from the backup {self.source} on "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}: {self.written} document(s) written that Tiled did not hold, "
            f"{self.held} already held"
        )
        self.root.update_metadata(metadata={"stop": doc, "notes": list(dict.fromkeys(notes))}, drop_revision=True)
        self.stopped = True
        self._close_streams()

    def finish(self) -> None:
        """After the last document: write what is still pending (a backup without a stop)."""
        if not self.stopped:
            self._flush()
            self.held += len(self.unused_sres)
            self.unused_sres.clear()

    # -- helpers ---------------------------------------------------------------------

    def _flush(self) -> None:
        for stream in self.streams.values():
            stream.flush()
        for external in {id(e): e for e in self.externals.values()}.values():
            external.flush()

    def _close_streams(self) -> None:
        """Declare the end of writes, as TiledWriter does at a stop (for streaming readers)."""
        nodes = [self.root]
        for stream in self.streams.values():
            nodes += [stream.node, *stream.arrays.values()] + ([stream.table] if stream.table is not None else [])
        nodes += [e.node for e in self.externals.values() if e.node is not None]
        seen = set()
        for node in nodes:
            if node.uri not in seen:
                seen.add(node.uri)
                node.close_stream()


class _Stream:
    """One stream (descriptor) of a run being completed: which rows Tiled holds, what to add."""

    def __init__(self, run: _RunCompleter, name: str, node, descriptor: dict):
        self.run = run
        self.name = name
        self.node = node
        self.array_keys = set()
        for key, spec in descriptor.get("data_keys", {}).items():
            if "external" in spec or spec.get("dtype") != "array":
                continue
            shape = spec.get("shape") or ()
            if None in shape:
                raise NotImplementedError(f"stream {name!r}: ragged array {key!r} cannot be completed (write the run anew)")
            dtype = spec.get("dtype_numpy")
            if 0 <= run.max_array_size < math.prod(shape) or (dtype and _numpy_kind(dtype) in "USO"):
                self.array_keys.add(key)
        parts = set(node) if node is not None else set()
        self.table = node["internal"] if "internal" in parts else None
        self.held_seq: set[int] = set()
        if self.table is not None:
            self.held_seq = {int(s) for s in self.table.read(["seq_num"])["seq_num"]}
        self.arrays = {key: node[key] for key in self.array_keys if key in parts}
        self.array_rows = {key: int(client.shape[0]) for key, client in self.arrays.items()}
        self.n_events = 0
        self.rows: list[dict] = []
        self.array_values: dict[str, list] = defaultdict(list)
        self.dims_names: dict[int, str] = {}

    def add_event(self, doc: dict) -> bool:
        """Queue what Tiled lacks of one event; True when something was lacking."""
        index = self.n_events
        self.n_events += 1
        row = {"seq_num": doc["seq_num"], "time": doc["time"], **doc["data"]}
        row.update({f"ts_{k}": v for k, v in doc["timestamps"].items()})
        wrote = False
        for key in self.array_keys:
            if key in row:
                value = row.pop(key)
                if index >= self.array_rows.get(key, 0):  # array rows follow the events' order
                    self.array_values[key].append(value)
                    wrote = True
        if int(doc["seq_num"]) not in self.held_seq:
            self.rows.append(row)
            self.held_seq.add(int(doc["seq_num"]))
            wrote = True
        return wrote

    def flush(self) -> None:
        """Write the queued array values (first, as TiledWriter does) and table rows."""
        for key, values in self.array_values.items():
            if values:
                self._write_array(key, values)
                values.clear()
        if self.rows:
            self._append_rows(self.rows)
            self.rows = []

    def _write_array(self, key: str, values: list) -> None:
        import numpy
        from bluesky_tiled_plugins.utils import truncate_json_overflow

        client = self.arrays.get(key)
        metadata = truncate_json_overflow(dict(self.run.data_keys.get(key, {})))
        dtype = client.dtype if client is not None else (metadata.get("dtype_numpy") or None)
        if dtype is not None and numpy.dtype(dtype).kind == "O":
            dtype = None
        try:
            array = numpy.array(values, dtype=dtype)
        except ValueError:
            array = numpy.array(values)
        if client is None:
            metadata["dtype_numpy"] = str(array.dtype)
            client = self.node.write_array(
                array, key=key, metadata=metadata, dims=self._dims(array.shape), access_tags=self.run.access_tags
            )
            self.arrays[key] = client
        else:
            client.patch(array, offset=(self.array_rows[key],), extend=True)
        self.array_rows[key] = self.array_rows.get(key, 0) + len(values)

    def _dims(self, shape) -> tuple[str, ...]:
        """Dimension names as TiledWriter gives internal arrays (``time``, then one per size)."""
        dims = ["time"]
        for size in shape[1:]:
            if size not in self.dims_names:
                self.dims_names[size] = f"dim_int_{len(self.dims_names) + 1}"
            dims.append(self.dims_names[size])
        return tuple(dims)

    def _append_rows(self, rows: list[dict]) -> None:
        import pyarrow
        from bluesky_tiled_plugins.utils import truncate_json_overflow

        table = pyarrow.Table.from_pylist(rows)
        if table.num_columns > 1024:
            raise NotImplementedError(f"stream {self.name!r} has {table.num_columns} columns; TiledWriter splits such tables")
        if self.table is None:
            schema = table.schema
            for i, column in enumerate(schema):
                if pyarrow.types.is_null(column.type):
                    schema = schema.set(i, column.with_type(pyarrow.string()))
                elif pyarrow.types.is_list(column.type) and pyarrow.types.is_null(column.type.value_type):
                    schema = schema.set(i, column.with_type(pyarrow.list_(pyarrow.string())))
            metadata = truncate_json_overflow({k: v for k, v in self.run.data_keys.items() if k in table.column_names})
            self.table = self.node.create_appendable_table(
                schema=schema, key="internal", metadata=metadata, access_tags=self.run.access_tags
            )
        else:
            table = _conform(table, self.table.structure().arrow_schema_decoded, self.name)
        self.table.append_partition(0, table)


class _External:
    """One external array (a data key in files) of a stream: frames Tiled holds, frames to register."""

    def __init__(self, run: _RunCompleter, stream: _Stream, consolidator, node):
        self.run = run
        self.stream = stream
        self.consolidator = consolidator
        self.node = node
        self.held_rows = int(node.shape[0]) if node is not None and getattr(node, "shape", None) else 0
        self.patches: list = []

    def add_stream_datum(self, doc: dict) -> bool:
        patch = self.consolidator.consume_stream_datum(doc)
        if self.consolidator.shape[0] <= self.held_rows:
            return False
        self.patches.append(patch)
        return True

    def flush(self) -> None:
        if not self.patches:
            return
        from bluesky_tiled_plugins.writing.consolidators import Patch
        from tiled.client.utils import handle_error, retry_context
        from tiled.utils import safe_json_dump

        data_source = self.consolidator.get_data_source()
        if self.node is None:
            self.node = self.stream.node.new(
                key=self.consolidator.data_key,
                structure_family=data_source.structure_family,
                data_sources=[data_source],
                metadata={},
                specs=[],
                access_tags=self.run.access_tags,
            )
        else:
            data_source.id = self.node.data_sources()[0].id
            patch = Patch.combine_patches(self.patches)
            for attempt in retry_context():
                with attempt:
                    handle_error(
                        self.node.context.http_client.put(
                            self.node.uri.replace("/metadata/", "/data_source/", 1),
                            content=safe_json_dump({"data_source": data_source}),
                            params={
                                "patch_shape": ",".join(map(str, patch.shape)),
                                "patch_offset": ",".join(map(str, patch.offset)),
                            },
                        )
                    )
        self.held_rows = int(self.consolidator.shape[0])
        self.patches.clear()


# -- small helpers -------------------------------------------------------------------


def _container(node):
    """The plain Container client under a BlueskyRun or composite (stream) client."""
    from tiled.client.container import Container

    base = getattr(type(node), "base", None)
    if isinstance(base, property):
        return node.base
    if isinstance(node, Container):
        return node
    raise TypeError(f"expected a Tiled container, got {type(node).__name__}")


def _numpy_kind(dtype) -> str:
    import numpy

    try:
        return numpy.dtype(dtype if not isinstance(dtype, list) else [tuple(x) for x in dtype]).kind
    except TypeError:
        return ""


def _conform(table, schema, stream: str):
    """``table`` with exactly the columns (order, types) of an existing Tiled table."""
    import pyarrow

    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"stream {stream!r}: the backup has columns Tiled's table lacks: {sorted(extra)}")
    columns = []
    for column in schema:
        if column.name in table.column_names:
            values = table[column.name]
            columns.append(values if values.type == column.type else values.cast(column.type))
        else:
            columns.append(pyarrow.nulls(table.num_rows, column.type))
    return pyarrow.Table.from_arrays(columns, schema=schema)


def _read_backup_tolerant(path: Path) -> Iterator[tuple[str, dict]]:
    """Documents of a backup file; a cut-off last line (the process died mid-write) is dropped."""
    with open(path) as file:
        lines = [line for line in file if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            item = json.loads(line)
            yield item["name"], item["doc"]
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines) and not line.endswith("\n"):
                logger.warning("%s: the last line is cut short; ignored", path)
                return
            raise ValueError(f"{path}:{number} is not a backed-up document ({error}): {line[:200]!r}") from None


def _first_start(path: Path) -> dict:
    try:
        with open(path) as file:
            item = json.loads(file.readline())
        return item["doc"] if item.get("name") == "start" else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _start_time(path: Path) -> float:
    time_ = _first_start(path).get("time")
    return float(time_) if isinstance(time_, (int, float)) else math.inf


def _start_fields(path: Path) -> tuple[str | None, str | None]:
    start = _first_start(path)
    return start.get("uid"), start.get("plan_name")
