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

Run::

    python -m benchmarks.live [--frames 40] [--period 0.2] [--repeats 3]
        [--methods white-top-hat model:white-top-hat] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class _Collect:
    def __init__(self):
        self.docs = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))


def _one_run(RE, det, publisher, callback, frames):
    raw = _Collect()
    tokens = [RE.subscribe(raw), RE.subscribe(publisher)]
    if callback is not None:
        tokens.append(RE.subscribe(callback))
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
    return result


def _count(det, frames):
    from bluesky.plans import count

    return count([det], num=frames)


def run(methods, *, frames: int, period: float, repeats: int, batch_size: int, directory: Path) -> dict:
    from bluesky import RunEngine

    from live_bgsub.callback import LiveBackgroundSubtraction
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
        det.geometry  # render the frame bank before timing
        RE = RunEngine({})
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
                rows.append(
                    {
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
                )
                print(f"  {method}: {rows[-1]}", flush=True)
            callback.close()
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            med["nothing_lost"] = all(
                r["processed"] == frames and r["failed"] == 0 and r["skipped"] == 0 and r["raw_events_in_tiled"] == frames
                for r in rows
            )
            report["methods"][method] = {"median": med, "runs": rows}
        publisher.close(timeout=600)
    return report


def _run_of(collector, event) -> str:
    # descriptor uid -> run start uid, from the collected derived documents
    cache = collector.__dict__.setdefault("_desc", {})
    if event["descriptor"] not in cache:
        for n, d in collector.docs:
            if n == "descriptor":
                cache[d["uid"]] = d["run_start"]
    return cache.get(event["descriptor"])


def _table(report) -> str:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["white-top-hat", "model:white-top-hat"])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--period", type=float, default=0.2, help="detector frame period, s (default 0.2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        t0 = time.perf_counter()
        report = run(args.methods, frames=args.frames, period=args.period, repeats=args.repeats, batch_size=args.batch_size, directory=directory)
        report["wall_s"] = time.perf_counter() - t0
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
