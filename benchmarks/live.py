"""Live acquisition with and without the callback: RunEngine rate, derived rate, lag.

One embedded Tiled server (SQLite) for the whole benchmark. For each processing step it
runs the same plan, ``count([det], num=N)`` of a simulated Pilatus 1M writing HDF5 at
``--period`` seconds per frame, alternately

- *baseline*: the RunEngine with the raw run going to Tiled (TiledPublisher) only;
- *live*: the same plus the live callback subscribed (derived run to the same publisher);

``--repeats`` times each, interleaved, and reports medians:

- RunEngine frames/s (frames / (raw stop time - raw start time)) with and without the
  callback, and their ratio (target >= 0.95);
- the derived run's lag per frame (raw event time -> derived event), p50 and p99;
- derived frames/s (processed frames / (last derived event - first raw event));
- nothing lost: raw events in Tiled == N, and processed == N with nothing failed or
  skipped (live runs use ``on_full="skip"``, so a frame the worker could not take
  would show up as skipped rather than slow the RunEngine).

``--path`` picks where the frames come from and where the callback runs:

- ``inprocess`` (default, the above): the in-process ``SimDetector`` and the callback
  in the RunEngine's process.
- ``epics``: the simulated areaDetector IOC (``live_bgsub.sim.ioc``, a child process,
  ``AcquireTime`` = ``AcquirePeriod`` = ``--period``) driven over Channel Access by
  ``EpicsPilatus`` (pyepics); the HDF5 files are the IOC's. Baseline and live as above
  (raw run to Tiled in both, the callback in the RunEngine's process in *live*). Also
  reported: the trigger -> captured time per frame (``trigger()`` until
  ``HDF1:NumCaptured_RBV`` reached the frame, i.e. the status completed) and the RE's
  cycle per frame (raw event time deltas).
- ``zmq``: the in-process ``SimDetector``; *baseline* is the RunEngine publishing
  nothing, *live* the RunEngine with ``live_bgsub.wire.make_publisher`` (msgpack) into a
  ``bluesky-0MQ-proxy`` subprocess, read by a ``python -m live_bgsub.serve``
  subprocess that runs the callback and writes the derived runs to the embedded Tiled
  server. The raw runs stay out of Tiled (the embedded SQLite server takes one writer
  at a time; ``serve`` is that writer). Reported: RE frames/s with and without
  publishing, the Publisher's cost per event on the RunEngine thread, and the derived
  run as read back from Tiled (``derived_runs``/``metrics_table``): lag, processing,
  derived frames/s, missing frames (lost by 0MQ, from the derived run's ``failures``
  stream). One ``serve`` process per method; ``wait_for_subscriber`` before the first
  run (slow joiner).

Every child process (IOC, proxy, serve, Tiled) is stopped on the way out, also on an
error or SIGTERM.

Run::

    python -m benchmarks.live [--path {inprocess,epics,zmq}] [--frames 40] [--period 0.2]
        [--repeats 3] [--methods white-top-hat model:white-top-hat] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from live_bgsub.procutil import free_port, wait_until

PATHS = ("inprocess", "epics", "zmq")


class _Collect:
    def __init__(self):
        self.docs = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))


def _one_run(RE, det, publisher, callback, frames):
    raw = _Collect()
    tokens = [RE.subscribe(raw)]
    if publisher is not None:
        tokens.append(RE.subscribe(publisher))
    if callback is not None:
        tokens.append(RE.subscribe(callback))
    trigger_s = getattr(det, "trigger_s", None)
    if trigger_s is not None:
        trigger_s.clear()
    try:
        (uid,) = RE(_count(det, frames))
    finally:
        for t in tokens:
            RE.unsubscribe(t)
    start = next(d for n, d in raw.docs if n == "start")
    stop = next(d for n, d in raw.docs if n == "stop")
    event_times = sorted(d["time"] for n, d in raw.docs if n == "event")
    result = {
        "uid": uid,
        "re_fps": frames / (stop["time"] - start["time"]),
        "first_event_time": event_times[0] if event_times else float("nan"),
    }
    if trigger_s is not None:
        result["trigger_s"] = list(trigger_s)
        result["cycle_s"] = list(np.diff(event_times))
        result["stop_doc"] = stop
    return result


def _count(det, frames):
    from bluesky.plans import count

    return count([det], num=frames)


def _ms(values, q=50) -> float:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return 1e3 * float(np.percentile(values, q)) if values.size else float("nan")


def run(methods, *, frames: int, period: float, repeats: int, batch_size: int, directory: Path, path: str = "inprocess") -> dict:
    if path == "epics":
        return run_epics(methods, frames=frames, period=period, repeats=repeats, batch_size=batch_size, directory=directory)
    if path == "zmq":
        return run_zmq(methods, frames=frames, period=period, repeats=repeats, directory=directory)
    if path != "inprocess":
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    from bluesky import RunEngine

    from live_bgsub.provenance import machine_facts
    from live_bgsub.sim import SimDetector
    from live_bgsub.sinks.tiled import TiledPublisher
    from live_bgsub.tiled_server import EmbeddedTiledServer, connect

    raw_dir, derived_dir = directory / "raw", directory / "derived"
    raw_dir.mkdir(parents=True, exist_ok=True)
    derived_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_facts(),
        "frames": frames,
        "period_s": period,
        "repeats": repeats,
        "detector": "simulated pilatus-1m (1043x981 int32, HDF5 + StreamResource/StreamDatum)",
        "store": "embedded Tiled (SQLite), raw and derived through one TiledPublisher",
        "methods": {},
    }
    with EmbeddedTiledServer(directory / "tiled", readable_storage=[raw_dir, derived_dir]) as server:
        catalog = connect(server.uri, api_key=server.api_key)
        publisher = TiledPublisher(catalog)
        det = SimDetector(name="det", directory=raw_dir, period_s=period, n_patterns=4, seed=0)
        _ = det.geometry  # render the frame bank before timing
        RE = RunEngine({})
        _alternate(report, RE, det, publisher, catalog, methods, frames=frames, repeats=repeats, batch_size=batch_size, derived_dir=derived_dir)
        publisher.close(timeout=600)
    return report


def _alternate(report, RE, det, publisher, catalog, methods, *, frames, repeats, batch_size, derived_dir) -> None:
    """Baseline and live runs, interleaved, per method: the in-process and EPICS paths."""
    from live_bgsub.callback import LiveBackgroundSubtraction

    timed = hasattr(det, "trigger_s")
    for method in methods:
        derived = _Collect()
        callback = LiveBackgroundSubtraction(
            [publisher, derived],
            method=method,
            directory=derived_dir,
            on_full="skip",
            queue_size=max(256, 2 * frames),
            batch_size=batch_size,
            stop_timeout_s=600,
        )
        try:
            # Warm-up run (model graph tracing, file cache) not counted.
            warm = _one_run(RE, det, publisher, callback, 4)
            callback.wait(warm["uid"], timeout=600)
            rows = []
            for _ in range(repeats):
                base = _one_run(RE, det, publisher, None, frames)
                live = _one_run(RE, det, publisher, callback, frames)
                assert callback.wait(live["uid"], timeout=900), "derived run did not finish"
                assert publisher.flush(timeout=900), "Tiled writes did not finish"
                summary = callback.summary(live["uid"])
                events = [
                    d
                    for n, d in derived.docs
                    if n == "event" and "lag_s" in d["data"] and _run_of(derived, d) == summary.derived_uid
                ]
                lag = np.array([e["data"]["lag_s"] for e in events])
                processing = np.array([e["data"]["processing_s"] for e in events])
                last = max(e["time"] for e in events) if events else float("nan")
                raw_in_tiled = catalog[live["uid"]].metadata["stop"]["num_events"].get("primary", 0)
                row = {
                    "re_fps_baseline": base["re_fps"],
                    "re_fps_live": live["re_fps"],
                    "ratio": live["re_fps"] / base["re_fps"],
                    "lag_p50_ms": 1e3 * float(np.median(lag)) if lag.size else float("nan"),
                    "lag_p99_ms": 1e3 * float(np.percentile(lag, 99)) if lag.size else float("nan"),
                    "processing_p50_ms": 1e3 * float(np.median(processing)) if events else float("nan"),
                    "derived_fps": summary.processed / (last - live["first_event_time"]) if events else float("nan"),
                    "processed": summary.processed,
                    "failed": len(summary.failed),
                    "skipped": len(summary.skipped),
                    "raw_events_in_tiled": raw_in_tiled,
                }
                if timed:
                    row.update(
                        {
                            "trigger_captured_p50_ms_baseline": _ms(base["trigger_s"]),
                            "trigger_captured_p50_ms_live": _ms(live["trigger_s"]),
                            "trigger_captured_p99_ms_live": _ms(live["trigger_s"], 99),
                            "cycle_p50_ms_baseline": _ms(base["cycle_s"]),
                            "cycle_p50_ms_live": _ms(live["cycle_s"]),
                            "raw_success": int(
                                base["stop_doc"].get("exit_status") == "success" and live["stop_doc"].get("exit_status") == "success"
                            ),
                        }
                    )
                rows.append(row)
                print(f"  {method}: {rows[-1]}", flush=True)
        finally:
            callback.close()
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["nothing_lost"] = all(
            r["processed"] == frames and r["failed"] == 0 and r["skipped"] == 0 and r["raw_events_in_tiled"] == frames
            for r in rows
        )
        report["methods"][method] = {"median": med, "runs": rows}


def _run_of(collector, event) -> str:
    # descriptor uid -> run start uid, from the collected derived documents
    cache = collector.__dict__.setdefault("_desc", {})
    if event["descriptor"] not in cache:
        for n, d in collector.docs:
            if n == "descriptor":
                cache[d["uid"]] = d["run_start"]
    return cache.get(event["descriptor"])


# ---------------------------------------------------------------------- --path epics


def _timed_pilatus(*args, **kwargs):
    """An ``EpicsPilatus`` that records, per trigger, the seconds until its status completed."""
    from live_bgsub.devices import EpicsPilatus

    class TimedPilatus(EpicsPilatus):
        def trigger(self):
            t0 = time.perf_counter()
            status = super().trigger()

            def done(st):
                if st.success:
                    self.trigger_s.append(time.perf_counter() - t0)

            status.add_callback(done)
            return status

    det = TimedPilatus(*args, **kwargs)
    det.trigger_s = []
    return det


def run_epics(methods, *, frames: int, period: float, repeats: int, batch_size: int, directory: Path) -> dict:
    """``--path epics``: the simulated IOC over Channel Access, the callback in this process."""
    import secrets

    from live_bgsub.sim.ioc import use_loopback_ca

    use_loopback_ca()  # before pyepics starts its CA context
    from bluesky import RunEngine

    from live_bgsub.provenance import machine_facts
    from live_bgsub.sim.ioc import run_ioc_subprocess
    from live_bgsub.sinks.tiled import TiledPublisher
    from live_bgsub.tiled_server import EmbeddedTiledServer, connect

    raw_dir, derived_dir = (directory / "raw").resolve(), (directory / "derived").resolve()
    raw_dir.mkdir(parents=True, exist_ok=True)
    derived_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"LBBENCH{secrets.token_hex(3).upper()}:"
    report = {
        "path": "epics",
        "machine": machine_facts(),
        "frames": frames,
        "period_s": period,
        "repeats": repeats,
        "detector": (
            f"simulated areaDetector Pilatus 1M IOC (caproto child process, prefix {prefix}, AcquireTime = "
            f"AcquirePeriod = {period} s, ImageMode Single per trigger, HDF5 file plugin in Stream mode) "
            "driven by EpicsPilatus over Channel Access (pyepics, loopback)"
        ),
        "store": "embedded Tiled (SQLite), raw and derived through one TiledPublisher",
        "methods": {},
    }
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(EmbeddedTiledServer(directory / "tiled", readable_storage=[raw_dir, derived_dir]))
        ioc = stack.enter_context(
            run_ioc_subprocess(prefix, directory=raw_dir, acquire_time=period, acquire_period=period, n_patterns=4, seed=0)
        )
        report["ioc_pid"] = ioc.pid
        catalog = connect(server.uri, api_key=server.api_key)
        publisher = TiledPublisher(catalog)
        stack.callback(publisher.close, timeout=600)
        det = _timed_pilatus(prefix, name="det", write_path=raw_dir, acquire_time=period)
        det.wait_for_connection(timeout=30)
        RE = RunEngine({})
        _alternate(report, RE, det, publisher, catalog, methods, frames=frames, repeats=repeats, batch_size=batch_size, derived_dir=derived_dir)
        for m in report["methods"].values():
            m["median"]["nothing_lost"] = m["median"]["nothing_lost"] and all(r["raw_success"] for r in m["runs"])
    return report


# ---------------------------------------------------------------------- --path zmq


class _Children:
    """Child processes stopped (SIGTERM, then SIGKILL) in reverse order on exit, errors included."""

    def __init__(self):
        self.processes = []

    def start(self, command, *, log=None, env=None, stop_timeout: float = 60.0) -> subprocess.Popen:
        out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child keeps its copy
        try:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        finally:
            if log is not None:
                out.close()
        self.processes.append((process, stop_timeout))
        return process

    def stop(self, process: subprocess.Popen) -> int:
        timeout = next((t for p, t in self.processes if p is process), 60.0)
        self.processes = [(p, t) for p, t in self.processes if p is not process]
        if process.poll() is None:
            process.terminate()
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                return process.wait(10)
        return process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for process, _ in reversed(list(self.processes)):
            self.stop(process)


class _TimedPublisher:
    """Forward documents to a 0MQ Publisher, timing each call on the RunEngine thread."""

    def __init__(self, publisher):
        self.publisher = publisher
        self.costs: dict[str, list[float]] = {}

    def __call__(self, name, doc):
        t0 = time.perf_counter()
        self.publisher(name, doc)
        self.costs.setdefault(name, []).append(time.perf_counter() - t0)


def _wait_derived(status_path, serve, catalog, raw_uid, *, timeout: float, log: Path) -> dict:
    """Wait until serve reports the derived run of ``raw_uid`` finished and its stop is in Tiled."""
    from live_bgsub.serve import read_status

    deadline = time.monotonic() + timeout

    def finished():
        if serve.poll() is not None:
            raise RuntimeError(f"serve exited with {serve.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            status = read_status(status_path)
        except (OSError, ValueError):
            status = {}
        entry = next((r for r in status.get("runs", []) if r.get("raw_uid") == raw_uid), {})
        return {**entry, "status": status} if "exit_status" in entry else None

    def stored():
        try:
            return bool(catalog[entry["derived_uid"]].metadata.get("stop"))
        except KeyError:
            return False

    entry = wait_until(finished, timeout, 0.1, what=f"serve finishing the derived run of {raw_uid} (see {log})")
    remaining = max(0.0, deadline - time.monotonic())
    wait_until(stored, remaining, 0.2, what=f"the stop of derived run {entry['derived_uid']} in Tiled")
    return entry


def _derived_figures(catalog, raw_uid: str, first_raw_event_time: float) -> dict:
    from live_bgsub.catalog import derived_runs, metrics_table

    runs = derived_runs(catalog, raw_uid)
    if len(runs) != 1:
        raise RuntimeError(f"expected one derived run of {raw_uid} in Tiled, found {len(runs)}")
    (run,) = runs
    table = metrics_table(run)
    statuses = list(metrics_table(run, "failures").get("status", [])) if "failures" in run else []
    lag = np.asarray(table.get("lag_s", []), float)
    processing = np.asarray(table.get("processing_s", []), float)
    times = np.asarray(table.get("time", []), float)
    processed = len(table.get("raw_seq_num", []))
    stop = run.metadata.get("stop") or {}
    return {
        "derived_uid": run.metadata["start"]["uid"],
        "processed": processed,
        "failed": statuses.count("failed"),
        "skipped": statuses.count("skipped"),
        "missing": statuses.count("missing"),
        "unprocessed": statuses.count("unprocessed"),
        "exit_status": stop.get("exit_status"),
        "lag_p50_ms": _ms(lag),
        "lag_p99_ms": _ms(lag, 99),
        "processing_p50_ms": _ms(processing),
        "derived_fps": processed / float(times.max() - first_raw_event_time) if times.size else float("nan"),
    }


def run_zmq(methods, *, frames: int, period: float, repeats: int, directory: Path) -> dict:
    """``--path zmq``: RE -> Publisher -> bluesky-0MQ-proxy -> live_bgsub.serve -> Tiled."""
    from bluesky import RunEngine

    from live_bgsub.provenance import machine_facts
    from live_bgsub.serve import read_status, wait_for_subscriber
    from live_bgsub.sim import SimDetector
    from live_bgsub.tiled_server import EmbeddedTiledServer, connect
    from live_bgsub.wire import make_publisher

    raw_dir, derived_dir = (directory / "raw").resolve(), (directory / "derived").resolve()
    raw_dir.mkdir(parents=True, exist_ok=True)
    derived_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "path": "zmq",
        "machine": machine_facts(),
        "frames": frames,
        "period_s": period,
        "repeats": repeats,
        "detector": "simulated pilatus-1m (1043x981 int32, HDF5 + StreamResource/StreamDatum), in the RunEngine's process",
        "transport": "live_bgsub.wire.make_publisher (msgpack) -> bluesky-0MQ-proxy (child) -> python -m live_bgsub.serve (child, on_full=skip)",
        "store": "embedded Tiled (SQLite): derived runs only, written by serve; raw runs not stored",
        "methods": {},
    }
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(EmbeddedTiledServer(directory / "tiled", readable_storage=[raw_dir, derived_dir]))
        children = stack.enter_context(_Children())
        catalog = connect(server.uri, api_key=server.api_key)
        in_port, out_port = free_port(), free_port()
        proxy = Path(sys.executable).with_name("bluesky-0MQ-proxy")
        children.start([str(proxy), "--in-address", f"127.0.0.1:{in_port}", "--out-address", f"127.0.0.1:{out_port}"])
        publisher = make_publisher(f"127.0.0.1:{in_port}")  # unsigned msgpack: serve never unpickles
        stack.callback(publisher.close)
        det = SimDetector(name="det", directory=raw_dir, period_s=period, n_patterns=4, seed=0)
        _ = det.geometry  # render the frame bank before timing
        RE = RunEngine({})
        env = dict(os.environ, TILED_API_KEY=server.api_key, PYTHONUNBUFFERED="1")
        drain_timeout = 120 + 5 * frames  # serve processes >= ~0.2 frames/s even when starved
        for index, method in enumerate(methods):
            status_path, log = directory / f"serve-{index}.json", directory / f"serve-{index}.log"
            serve = children.start(
                [
                    sys.executable, "-m", "live_bgsub.serve", "--zmq", f"127.0.0.1:{out_port}", "--tiled", server.uri,
                    "--directory", str(derived_dir), "--method", method, "--status-file", str(status_path),
                    "--queue-size", str(max(256, 2 * frames)), "--run-timeout", "120",
                ],
                log=log,
                env=env,
                stop_timeout=drain_timeout,
            )
            t0 = time.perf_counter()
            wait_for_subscriber(
                publisher,
                lambda token, serve=serve, path=status_path: (
                    serve.poll() is None and token in read_status(path).get("probes", [])
                ),
                timeout=120,
            )
            joined_s = time.perf_counter() - t0
            timed = _TimedPublisher(publisher)
            # Warm-up run (serve's imports and first processing, file cache) not counted.
            warm = _one_run(RE, det, timed, None, 4)
            _wait_derived(status_path, serve, catalog, warm["uid"], timeout=drain_timeout, log=log)
            rows = []
            for _ in range(repeats):
                base = _one_run(RE, det, None, None, frames)
                timed = _TimedPublisher(publisher)
                t_run = time.perf_counter()
                live = _one_run(RE, det, timed, None, frames)
                run_s = time.perf_counter() - t_run
                entry = _wait_derived(status_path, serve, catalog, live["uid"], timeout=drain_timeout, log=log)
                figures = _derived_figures(catalog, live["uid"], live["first_event_time"])
                transport = entry.get("transport") or {}
                status = entry["status"]
                all_costs = [c for costs in timed.costs.values() for c in costs]
                row = {
                    "re_fps_baseline": base["re_fps"],
                    "re_fps_live": live["re_fps"],
                    "ratio": live["re_fps"] / base["re_fps"],
                    "publish_event_p50_ms": _ms(timed.costs.get("event", [])),
                    "publish_event_p99_ms": _ms(timed.costs.get("event", []), 99),
                    "publish_datum_p50_ms": _ms(timed.costs.get("stream_datum", [])),
                    "publish_share_of_run": sum(all_costs) / run_s,
                    "lag_p50_ms": figures["lag_p50_ms"],
                    "lag_p99_ms": figures["lag_p99_ms"],
                    "processing_p50_ms": figures["processing_p50_ms"],
                    "derived_fps": figures["derived_fps"],
                    "processed": figures["processed"],
                    "failed": figures["failed"],
                    "skipped": figures["skipped"],
                    "missing": figures["missing"],
                    "missing_transport": len(transport.get("missing", [])),
                    "late": status.get("late", 0),
                    "orphans": sum((status.get("orphans") or {}).values()),
                    "derived_success": int(figures["exit_status"] == "success"),
                }
                rows.append(row)
                print(f"  {method}: {rows[-1]}", flush=True)
            rc = children.stop(serve)
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            med["nothing_lost"] = all(
                r["processed"] == frames and r["failed"] == 0 and r["skipped"] == 0 and r["missing"] == 0
                and r["missing_transport"] == 0 and r["derived_success"]
                for r in rows
            )  # fmt: skip
            med["subscriber_joined_s"] = joined_s
            report["methods"][method] = {"median": med, "runs": rows, "serve_exit": rc, "serve_log": str(log)}
    return report


# ---------------------------------------------------------------------- output


def _table(report) -> str:
    path = report.get("path", "inprocess")
    if path == "epics":
        return _table_epics(report)
    if path == "zmq":
        return _table_zmq(report)
    lines = [
        "| method | RE frames/s without | with callback | ratio | derived frames/s | processing p50 (ms) | lag p50 (ms) | lag p99 (ms) | nothing lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["methods"].items():
        m = r["median"]
        lines.append(
            f"| {method} | {m['re_fps_baseline']:.2f} | {m['re_fps_live']:.2f} | {m['ratio']:.3f} | "
            f"{m['derived_fps']:.2f} | {m['processing_p50_ms']:.0f} | {m['lag_p50_ms']:.0f} | {m['lag_p99_ms']:.0f} | {'yes' if m['nothing_lost'] else 'NO'} |"
        )
    return "\n".join(lines)


def _table_epics(report) -> str:
    lines = [
        (
            "| method | RE frames/s without | with callback | ratio | trigger->captured p50 without / with (ms) "
            "| RE cycle p50 without / with (ms) | derived frames/s | processing p50 (ms) | lag p50 (ms) | lag p99 (ms) | nothing lost |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["methods"].items():
        m = r["median"]
        lines.append(
            f"| {method} | {m['re_fps_baseline']:.2f} | {m['re_fps_live']:.2f} | {m['ratio']:.3f} | "
            f"{m['trigger_captured_p50_ms_baseline']:.0f} / {m['trigger_captured_p50_ms_live']:.0f} | "
            f"{m['cycle_p50_ms_baseline']:.0f} / {m['cycle_p50_ms_live']:.0f} | {m['derived_fps']:.2f} | "
            f"{m['processing_p50_ms']:.0f} | {m['lag_p50_ms']:.0f} | {m['lag_p99_ms']:.0f} | {'yes' if m['nothing_lost'] else 'NO'} |"
        )
    return "\n".join(lines)


def _table_zmq(report) -> str:
    lines = [
        (
            "| method | RE frames/s without publishing | with | ratio | publish per event p50 / p99 (ms) | derived frames/s "
            "| processing p50 (ms) | lag p50 (ms) | lag p99 (ms) | missing | nothing lost |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["methods"].items():
        m = r["median"]
        missing = max(x["missing"] for x in r["runs"])
        lines.append(
            f"| {method} | {m['re_fps_baseline']:.2f} | {m['re_fps_live']:.2f} | {m['ratio']:.3f} | "
            f"{m['publish_event_p50_ms']:.2f} / {m['publish_event_p99_ms']:.2f} | {m['derived_fps']:.2f} | "
            f"{m['processing_p50_ms']:.0f} | {m['lag_p50_ms']:.0f} | {m['lag_p99_ms']:.0f} | {missing} | {'yes' if m['nothing_lost'] else 'NO'} |"
        )
    return "\n".join(lines)


def _terminate(signum, frame):
    # SIGTERM unwinds like an error: every context (IOC, proxy, serve, Tiled) is left.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n")[0])
    parser.add_argument("--path", choices=PATHS, default="inprocess",
                        help="inprocess (SimDetector, callback in the RE process; default), epics (simulated IOC over "
                             "Channel Access) or zmq (RE -> 0MQ proxy -> live_bgsub.serve)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=["white-top-hat", "model:white-top-hat"])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--period", type=float, default=0.2, help="detector frame period, s (default 0.2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="callback batch size (inprocess, epics; serve uses its default)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = args.dir or Path(tmp)
            t0 = time.perf_counter()
            report = run(
                args.methods, frames=args.frames, period=args.period, repeats=args.repeats, batch_size=args.batch_size,
                directory=directory, path=args.path,
            )  # fmt: skip
            report["wall_s"] = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
