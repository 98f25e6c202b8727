"""Replay archived runs from Tiled through the live callback.

An archived raw run's documents (``run.documents()``, served by the json-seq exporter)
go through the same :class:`~live_bgsub.callback.LiveBackgroundSubtraction` as a live
run, so a replay produces a derived run exactly as acquisition would have, for inline
frames and for frames in external HDF5 files (which must be readable from here at the
path the run recorded). Replays use ``on_full="block"``: nothing is skipped.

A raw run without a stop document (its acquisition, or its writing to Tiled, was cut
off) is replayed with a stop made up here: ``exit_status`` ``"fail"`` and a
``reason`` saying the raw run had none (:data:`NO_STOP_REASON`), so its derived run
finishes (with ``exit_status`` ``"fail"``) instead of waiting for a stop that never
comes. :func:`replay_run` waits at most ``timeout`` seconds for the derived run.

:func:`select_runs` picks raw runs: a derived run (one live_bgsub made: its start has
``plan_name`` ``"live_bgsub"`` and a ``raw_uid``, :func:`is_derived`) is taken only
when named by its uid, so ``--last N`` never replays a replay's output.
:func:`fill_plan` tells which raw frames a derived run lacks, also when the derived
run itself never got its stop.

``live-bgsub replay --nats URL`` sends the same documents to a
:class:`~live_bgsub.bus.publisher.BusPublisher` instead, so that the bus's workers and
composer make the derived runs; :func:`bus_done` tells (and waits until) the composer
has recorded them as done.

Examples
--------
>>> from live_bgsub.replay import replay_runs
>>> summaries = replay_runs(catalog, ["9f1c..."], callback)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

__all__ = [
    "DERIVED_PLAN_NAME",
    "NO_STOP_REASON",
    "FillPlan",
    "bus_done",
    "fill_plan",
    "frames_to_fill",
    "has_stop",
    "is_derived",
    "replay_run",
    "replay_runs",
    "select_runs",
]

logger = logging.getLogger("live_bgsub.replay")

#: ``reason`` of the stop that a replay makes up for a raw run archived without one.
NO_STOP_REASON = (
    "the archived raw run has no stop document (its acquisition or its writing to Tiled was cut off); "
    "stop made up by live-bgsub replay"
)


#: ``plan_name`` of the derived runs' start documents (written by the live callback).
DERIVED_PLAN_NAME = "live_bgsub"


def is_derived(start: dict) -> bool:
    """True for the start document of a run live_bgsub derived from a raw run.

    Examples
    --------
    >>> is_derived({"uid": "b", "plan_name": "live_bgsub", "raw_uid": "a"})
    True
    >>> is_derived({"uid": "a", "plan_name": "count"})
    False
    """
    return start.get("plan_name") == DERIVED_PLAN_NAME or "raw_uid" in start


def has_stop(run) -> bool:
    """True when an archived run (a Tiled BlueskyRun client) holds its stop document."""
    return bool(run.metadata.get("stop"))


def replay_run(run, callback, *, progress: bool = False, timeout: float | None = None):
    """Send one archived run's documents through ``callback`` and wait for its derived run.

    Parameters
    ----------
    run : BlueskyRun client
        A run from a Tiled catalog of Bluesky runs (anything with ``documents()``).
    callback : LiveBackgroundSubtraction
    progress : bool, optional
        Show a progress bar over the run's frames (the events of the callback's
        ``stream_name``, ``"primary"`` by default).
    timeout : float, optional
        Seconds to wait for the derived run after the last document (None: no limit).

    Returns
    -------
    RunSummary
        Counts and failures of the derived run (``derived_uid`` names it). For a raw
        run archived without a stop, its ``reason`` quotes :data:`NO_STOP_REASON`
        and its ``exit_status`` is ``"fail"``.

    Raises
    ------
    TimeoutError
        When the derived run did not finish within ``timeout``.
    ValueError
        When the run's documents hold no start document.
    """
    raw_uid = None
    frame_stream = getattr(callback, "stream_name", "primary")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_frame_count(run, frame_stream), unit="frame", desc=f"replay {_short(run)}", leave=True)
    stream_names: dict[str, str] = {}
    data_keys: dict[str, str] = {}
    events: dict[str, int] = {}  # stream name -> events sent
    stopped = False
    try:
        for name, doc in run.documents():
            if name == "start":
                raw_uid = doc["uid"]
            elif name == "descriptor":
                stream_names[doc["uid"]] = doc["name"]
            elif name == "event":
                stream = stream_names.get(doc.get("descriptor"), "?")
                events[stream] = events.get(stream, 0) + 1
                if bar is not None and stream == frame_stream:
                    bar.update(1)
            elif name == "event_page":
                stream = stream_names.get(doc.get("descriptor"), "?")
                n = len(doc.get("seq_num", ()))
                events[stream] = events.get(stream, 0) + n
                if bar is not None and stream == frame_stream:
                    bar.update(n)
            elif name == "stream_resource":
                data_keys[doc["uid"]] = doc["data_key"]
            elif name == "stream_datum" and _empty(doc):
                doc = _repair_stream_datum(run, doc, stream_names.get(doc.get("descriptor")), data_keys.get(doc["stream_resource"]))
            elif name == "stop":
                if raw_uid is not None and not (doc or {}).get("run_start"):
                    # The json-seq exporter sends an empty stop for a run without one.
                    doc = _made_up_stop(raw_uid, events)
                stopped = True
            callback(name, doc)
    finally:
        if bar is not None:
            bar.close()
    if raw_uid is None:
        raise ValueError(f"run {_short(run)} has no start document to replay")
    if not stopped:  # the documents ended without a stop at all
        callback("stop", _made_up_stop(raw_uid, events))
    if not callback.wait(raw_uid, timeout=timeout):
        raise TimeoutError(
            f"the derived run of {raw_uid} did not finish within {timeout:g} s after the raw run's last document "
            "(frames still queued or being processed; a longer timeout may be needed)"
        )
    return callback.summary(raw_uid)


def _made_up_stop(raw_uid: str, events: dict[str, int]) -> dict:
    """A stop for a raw run archived without one (see :data:`NO_STOP_REASON`)."""
    logger.warning("replay: raw run %s has no stop document; replaying it with a made-up one", raw_uid)
    return {
        "uid": str(uuid.uuid4()),
        "time": time.time(),
        "run_start": raw_uid,
        "exit_status": "fail",
        "reason": NO_STOP_REASON,
        "num_events": dict(events),
    }


def select_runs(catalog, uids=(), *, query: dict | None = None, last: int | None = None) -> list:
    """Pick runs from a catalog: by uid (or a unique uid prefix), by metadata, or the last N.

    ``query`` and ``last`` (and no selection at all: every run) pick raw runs only; a
    derived run (:func:`is_derived`) is picked only when ``uids`` names it.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns client
    uids : iterable of str
        Run start uids (full, or a prefix of at least 4 characters that is unique).
    query : dict, optional
        ``{metadata key: value}`` pairs the start document must equal (e.g.
        ``{"plan_name": "count"}``); dotted keys reach nested metadata.
    last : int, optional
        The ``last`` most recent matching raw runs (at least 1).

    Raises
    ------
    KeyError
        A uid not in the catalog (the message names it).
    ValueError
        ``last`` below 1.
    """
    from tiled.queries import Eq, KeyPresent

    if last is not None and int(last) < 1:
        raise ValueError(f"last must be an integer >= 1, got {last!r}")

    runs = []
    for uid in uids:
        try:
            runs.append(catalog[uid])
        except KeyError:
            raise KeyError(f"run {uid!r} is not in the catalog {catalog.uri}") from None
    if query or last is not None or not uids:
        results = catalog.search(KeyPresent("start.raw_uid", exists=False))  # no derived run
        for key, value in (query or {}).items():
            results = results.search(Eq(f"start.{key}" if not key.startswith("start.") else key, value))
        picked = []
        for key in reversed(list(results.keys())):  # newest first, until `last` are found
            run = results[key]
            if is_derived(run.metadata.get("start") or {}):  # the plan name, should a raw_uid be missing
                continue
            picked.append(run)
            if last is not None and len(picked) == int(last):
                break
        runs.extend(reversed(picked))
    return runs


def replay_runs(catalog, uids=(), callback=None, *, query=None, last=None, progress=False, timeout=None, **callback_kwargs):
    """Replay several runs; return one :class:`~live_bgsub.callback.RunSummary` per run.

    ``callback`` defaults to a new :class:`LiveBackgroundSubtraction` built from
    ``callback_kwargs`` (with ``on_full="block"``). Derived runs that never started
    (a run without the frames' stream) still get a summary saying why.
    """
    from .callback import LiveBackgroundSubtraction

    if callback is None:
        callback_kwargs.setdefault("on_full", "block")
        callback = LiveBackgroundSubtraction(**callback_kwargs)
    summaries = []
    for run in select_runs(catalog, uids, query=query, last=last):
        summary = replay_run(run, callback, progress=progress, timeout=timeout)
        logger.info("replayed %s -> %s: %s", summary.raw_uid, summary.derived_uid, summary.reason)
        summaries.append(summary)
    return summaries


@dataclass
class FillPlan:
    """What a derived run lacks of its raw run (:func:`fill_plan`).

    Attributes
    ----------
    derived_uid, raw_uid : str
    seq_nums : list of int
        Raw seq_nums to replay (sorted): listed in the derived run's ``failures``
        stream, or never recorded by it.
    derived_stopped, raw_stopped : bool
        Whether Tiled holds each run's stop document.
    raw_frames : int
        Raw frames known: the raw stop's event count, else (no stop) the frames Tiled
        holds of the raw run; 0 when the raw run is not in the catalog.
    notes : list of str
        What a reader should know (a run without its stop, a raw run missing).
    """

    derived_uid: str
    raw_uid: str
    seq_nums: list = field(default_factory=list)
    derived_stopped: bool = True
    raw_stopped: bool = True
    raw_frames: int = 0
    notes: list = field(default_factory=list)


def fill_plan(catalog, derived_uid: str, stream: str = "primary") -> FillPlan:
    """The raw run and the raw seq_nums a derived run did not process, and why.

    Reads the derived run's ``failures`` stream (frames ``skipped`` on a full queue,
    ``unprocessed`` at a stop timeout, ``missing`` in transport, and ``failed``) and,
    when the raw run is in the catalog, adds every raw frame the derived run never
    recorded: frames after a lost stop, and, for a derived run that never got its stop
    (its process or its Tiled writes were cut off), every frame it did not record.
    The raw frames are counted from the raw run's stop, or, when the raw run has no
    stop either, from what Tiled holds of it (``live-bgsub recover`` completes it from
    its backup). Replaying the raw run with ``seq_nums=`` set to these makes a derived
    run that fills the gaps.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns client
    derived_uid : str
    stream : str, optional
        The raw run's stream of frames.

    Raises
    ------
    ValueError
        When ``derived_uid`` is not a derived run (no ``raw_uid`` in its start).
    """
    derived = catalog[derived_uid]
    start = derived.metadata["start"]
    if "raw_uid" not in start:
        raise ValueError(f"run {derived_uid!r} is not a derived run (its start has no raw_uid)")
    plan = FillPlan(derived_uid, start["raw_uid"], derived_stopped=has_stop(derived))
    missing = set(_raw_seq_nums(derived, "failures"))
    if not plan.derived_stopped:
        plan.notes.append(
            f"derived run {derived_uid} has no stop document (cut off, or still being written): "
            "the raw frames it never recorded are to fill"
        )
    try:
        raw = catalog[plan.raw_uid]
    except KeyError:
        raw = None
        plan.raw_stopped = False
        plan.notes.append(f"raw run {plan.raw_uid} is not in the catalog: only the frames the derived run lists can be filled")
    if raw is not None:
        raw_stop = raw.metadata.get("stop") or {}
        plan.raw_stopped = bool(raw_stop)
        if plan.raw_stopped:
            plan.raw_frames = int((raw_stop.get("num_events") or {}).get(stream, 0))
        else:
            plan.raw_frames = _frames_held(raw, stream)
            plan.notes.append(
                f"raw run {plan.raw_uid} has no stop document either; Tiled holds {plan.raw_frames} of its frames "
                "(live-bgsub recover BACKUP completes it from its backup; fill again afterwards)"
            )
    if plan.raw_frames:
        # Frames the derived run never heard of (a stop lost in transport: "frames after
        # seq_num K unknown", or a derived run cut off): every raw frame the derived
        # run did not record.
        missing |= set(range(1, plan.raw_frames + 1)) - set(_raw_seq_nums(derived, "primary"))
    plan.seq_nums = sorted(missing)
    return plan


def frames_to_fill(catalog, derived_uid: str) -> tuple[str, list[int]]:
    """The raw run and the raw seq_nums a derived run did not process (:func:`fill_plan`).

    Returns
    -------
    raw_uid : str
    seq_nums : list of int
        Sorted; empty when the derived run processed everything.
    """
    plan = fill_plan(catalog, derived_uid)
    return plan.raw_uid, plan.seq_nums


def _raw_seq_nums(derived, stream: str) -> list[int]:
    """The ``raw_seq_num`` column of a derived run's stream (one column read, not the table)."""
    if stream not in derived:
        return []
    node = derived[stream]
    if "raw_seq_num" not in node:
        return []
    return [int(s) for s in node["raw_seq_num"].read()]


def _frames_held(raw, stream: str) -> int:
    """Frames of a raw run's stream that Tiled holds: its rows, or its registered frames if more."""
    try:
        node = raw[stream]
    except KeyError:
        return 0
    held = 0
    for key in node:
        if key.startswith("ts_") or key == "time":
            continue
        client = node[key]
        shape = getattr(client, "shape", None)
        if key == "seq_num":
            values = client.read()
            held = max(held, int(max(values)) if len(values) else 0)
        elif shape:
            held = max(held, int(shape[0]))
    return held


def _empty(doc) -> bool:
    return doc["indices"]["stop"] <= doc["indices"]["start"] and doc["seq_nums"]["stop"] <= doc["seq_nums"]["start"]


def _repair_stream_datum(run, doc, stream, data_key):
    """Fill in an empty StreamDatum from the array Tiled registered for it.

    bluesky-tiled-plugins 2.0.12's json-seq exporter gives runs written from
    area-detector Resource/Datum documents one StreamDatum with empty ``indices`` and
    ``seq_nums`` ({0, 0} and {1, 1}), although Tiled holds the frames: its array has one
    row per event, in seq_num order. Rebuild the ranges from that array's length.
    """
    try:
        rows = int(run[stream][data_key].shape[0])
    except Exception as exc:  # noqa: BLE001 - leave the document as it came
        logger.warning("replay: stream_datum %s is empty and could not be repaired: %s", doc["uid"], exc)
        return doc
    logger.warning(
        "replay: stream_datum %s of %r is empty (exporter defect); using the %d rows Tiled holds", doc["uid"], data_key, rows
    )
    return {**doc, "indices": {"start": 0, "stop": rows}, "seq_nums": {"start": 1, "stop": rows + 1}}


def _frame_count(run, stream: str) -> int | None:
    """The frames of a run's ``stream`` for a progress bar's total: its stop's event
    count, else what Tiled holds; None when unknown."""
    try:
        stop = run.metadata.get("stop") or {}
        if stop:
            return int((stop.get("num_events") or {}).get(stream, 0))
        return _frames_held(run, stream) or None
    except Exception:  # noqa: BLE001 - a progress total is only a nicety
        return None


def _short(run) -> str:
    try:
        return run.metadata["start"]["uid"][:8]
    except Exception:  # noqa: BLE001
        return repr(run)


def bus_done(url: str, raw_uids, *, processing: dict | None = None, timeout: float = 0.0, check=None) -> dict:
    """The raw runs the bus's composer has recorded as done, waiting up to ``timeout``.

    Polls the :data:`~live_bgsub.bus.jetstream.DONE_BUCKET` of the NATS server at
    ``url`` until every run of ``raw_uids``, processed as ``processing`` asked (None:
    the composer's default; :func:`~live_bgsub.bus.jetstream.job_key`), is in it or
    ``timeout`` seconds have passed.
    ``check()``, when given, is called between polls (it may raise to stop waiting, for
    example when a process the caller started has died).

    Returns
    -------
    dict
        ``{raw_uid: derived uid}`` in the order of ``raw_uids``: the derived run the
        composer wrote (``""`` when the run made none), or None for a run not done yet.

    Raises
    ------
    ConnectionError
        When no NATS server answers at ``url`` (one line).
    """
    import asyncio

    from nats.js.errors import KeyDeletedError, KeyNotFoundError

    from .bus.jetstream import DONE_BUCKET, connect, ensure_layout, job_key

    found = {str(uid): None for uid in raw_uids}

    async def poll():
        nc, js = await connect(url, name="live_bgsub-replay")
        try:
            await ensure_layout(js)
            kv = await js.key_value(DONE_BUCKET)
            deadline = time.monotonic() + timeout
            while True:
                for uid in [u for u, d in found.items() if d is None]:
                    try:
                        entry = await kv.get(job_key(uid, processing))
                    except (KeyNotFoundError, KeyDeletedError):
                        continue
                    found[uid] = (entry.value or b"").decode()
                if all(d is not None for d in found.values()) or time.monotonic() >= deadline:
                    return found
                if check is not None:
                    check()
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    return asyncio.run(poll())
