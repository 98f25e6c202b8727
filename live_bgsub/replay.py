"""Replay archived runs from Tiled through the live callback.

An archived raw run's documents (``run.documents()``, served by the json-seq exporter)
go through the same :class:`~live_bgsub.callback.LiveBackgroundSubtraction` as a live
run, so a replay produces a derived run exactly as acquisition would have, for inline
frames and for frames in external HDF5 files (which must be readable from here at the
path the run recorded). Replays use ``on_full="block"``: nothing is skipped.

Examples
--------
>>> from live_bgsub.replay import replay_runs
>>> summaries = replay_runs(catalog, ["9f1c..."], callback)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

__all__ = ["frames_to_fill", "replay_run", "replay_runs", "select_runs"]

logger = logging.getLogger("live_bgsub.replay")


def replay_run(run, callback, *, progress: bool = False, timeout: float | None = None):
    """Send one archived run's documents through ``callback`` and wait for its derived run.

    Parameters
    ----------
    run : BlueskyRun client
        A run from a Tiled catalog of Bluesky runs (anything with ``documents()``).
    callback : LiveBackgroundSubtraction
    progress : bool, optional
        Show a progress bar over the run's documents.
    timeout : float, optional
        Seconds to wait for the derived run after the last document (None: no limit).

    Returns
    -------
    RunSummary
        Counts and failures of the derived run (``derived_uid`` names it).

    Raises
    ------
    TimeoutError
        When the derived run did not finish within ``timeout``.
    ValueError
        When the run's documents hold no start document.
    """
    raw_uid = None
    total = _document_count(run)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="doc", desc=f"replay {_short(run)}", leave=True)
    stream_names: dict[str, str] = {}
    data_keys: dict[str, str] = {}
    try:
        for name, doc in run.documents():
            if name == "start":
                raw_uid = doc["uid"]
            elif name == "descriptor":
                stream_names[doc["uid"]] = doc["name"]
            elif name == "stream_resource":
                data_keys[doc["uid"]] = doc["data_key"]
            elif name == "stream_datum" and _empty(doc):
                doc = _repair_stream_datum(run, doc, stream_names.get(doc.get("descriptor")), data_keys.get(doc["stream_resource"]))
            callback(name, doc)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if raw_uid is None:
        raise ValueError(f"run {_short(run)} has no start document to replay")
    if not callback.wait(raw_uid, timeout=timeout):
        raise TimeoutError(f"the derived run of {raw_uid} did not finish within {timeout} s")
    return callback.summary(raw_uid)


def select_runs(catalog, uids=(), *, query: dict | None = None, last: int | None = None) -> list:
    """Pick runs from a catalog: by uid (or a unique uid prefix), by metadata, or the last N.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns client
    uids : iterable of str
        Run start uids (full, or a prefix of at least 4 characters that is unique).
    query : dict, optional
        ``{metadata key: value}`` pairs the start document must equal (e.g.
        ``{"plan_name": "count"}``); dotted keys reach nested metadata.
    last : int, optional
        The ``last`` most recent matching runs.

    Raises
    ------
    KeyError
        A uid not in the catalog (the message names it).
    """
    from tiled.queries import Eq

    runs = []
    for uid in uids:
        try:
            runs.append(catalog[uid])
        except KeyError:
            raise KeyError(f"run {uid!r} is not in the catalog {catalog.uri}") from None
    if query or last is not None or not uids:
        results = catalog
        for key, value in (query or {}).items():
            results = results.search(Eq(f"start.{key}" if not key.startswith("start.") else key, value))
        keys = list(results.keys())
        if last is not None:
            keys = keys[-int(last) :]
        runs.extend(results[k] for k in keys)
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


def frames_to_fill(catalog, derived_uid: str) -> tuple[str, list[int]]:
    """The raw run and the raw seq_nums a derived run did not process.

    Reads the derived run's ``failures`` stream (frames ``skipped`` on a full queue,
    ``unprocessed`` at a stop timeout, ``missing`` in transport, and ``failed``) and,
    when the raw run is in the catalog, adds every raw event the derived run never
    processed (frames after a lost stop). Replaying the raw run with ``seq_nums=`` set
    to these makes a derived run that fills the gaps.

    Returns
    -------
    raw_uid : str
    seq_nums : list of int
        Sorted; empty when the derived run processed everything.
    """
    from .catalog import metrics_table

    derived = catalog[derived_uid]
    start = derived.metadata["start"]
    if "raw_uid" not in start:
        raise ValueError(f"run {derived_uid!r} is not a derived run (its start has no raw_uid)")
    raw_uid = start["raw_uid"]
    missing = set()
    if "failures" in derived:
        missing |= {int(s) for s in metrics_table(derived, "failures")["raw_seq_num"]}
    # Frames the derived run never heard of (a stop lost in transport: "frames after
    # seq_num K unknown"): every raw event the archived raw run holds but the derived
    # run did not process.
    try:
        raw_stop = catalog[raw_uid].metadata.get("stop") or {}
    except KeyError:
        raw_stop = {}
    n_raw = int((raw_stop.get("num_events") or {}).get("primary", 0))
    if n_raw:
        processed = set()
        if "primary" in derived:
            processed = {int(s) for s in metrics_table(derived).get("raw_seq_num", [])}
        missing |= set(range(1, n_raw + 1)) - processed
    return raw_uid, sorted(missing)


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


def _document_count(run) -> int | None:
    try:
        stop = run.metadata.get("stop") or {}
        return 2 + sum(stop.get("num_events", {}).values()) + len(stop.get("num_events", {}))
    except Exception:  # noqa: BLE001 - a progress total is only a nicety
        return None


def _short(run) -> str:
    try:
        return run.metadata["start"]["uid"][:8]
    except Exception:  # noqa: BLE001
        return repr(run)
