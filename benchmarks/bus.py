"""The bus on NATS JetStream (issue 16): RunEngine rate, worker scaling, latency.

An embedded JetStream server (``EmbeddedJetStream``, file storage in a temporary
directory) for the whole benchmark, and three measurements, each in one run of this
script on one machine:

1. **RunEngine rate** at the simulated detector's top rate (``--period 0``, small
   220x200 frames as in the issue): ``count([det], num=--re-frames)`` with nothing
   subscribed (*baseline*) and with a ``BusPublisher`` subscribed (*bus*), interleaved
   ``--repeats`` times; frames/s from the raw run's start and stop times; medians and
   their ratio. Two *bus* variants: the publisher alone (the tasks wait in JetStream)
   and the whole path running beside it (one ``live-bgsub worker`` and the composer,
   subprocesses, on the same cores).
2. **Worker throughput**: a run of ``--frames`` Pilatus 1M frames (HDF5 on disk) is
   published, then its plan (geometry at the detector's known centre) is written by
   this script (no composer takes CPU here), and 1, 2 and 4 ``live-bgsub worker``
   processes (started and warmed on a first run beforehand) process it; frames/s =
   frames / (JetStream's time of the last result - the time the plan was written). For a classical
   method and a model; scaling efficiency = (throughput with 2) / (2 x with 1).
3. **Latency**: the whole path (publisher, ``--latency-workers`` workers, the composer
   writing to an embedded Tiled server) at 20 Hz and at 0.9x the throughput of (2);
   ``lag_s`` of the derived events (raw event time -> derived event, both on this
   machine's clock) read back from Tiled, p50 and p99.

Run::

    python -m benchmarks.bus [--re-frames 1000] [--repeats 3] [--frames 48] [--batch 4]
        [--methods white-top-hat model:white-top-hat] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from live_bgsub.procutil import wait_until

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 1800.0  # bound on each wait for results or a composed run


def _small_preset():
    from live_bgsub.synth import DetectorPreset

    return DetectorPreset(name="small", shape=(220, 200), pixel_size_mm=0.172, module_shape=(100, 95), module_gap=(20, 10),
                          nominal_center=(97.0, 70.0), beam_stop_radius_px=8.0, n_dead=10)  # fmt: skip


class _Children:
    """Subprocesses, stopped on the way out (also on errors and SIGTERM)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *args: str, env=None) -> subprocess.Popen:
        log = open(self.logs / f"{name}-{len(self.processes)}.log", "w")  # noqa: SIM115 - the child keeps it
        p = subprocess.Popen([sys.executable, "-m", "live_bgsub.cli", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))  # fmt: skip
        self.processes.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        for p in self.processes:
            self.stop(p)


def _js(url, fn):
    async def main():
        import nats

        nc = await nats.connect(url)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def _rate(docs) -> float:
    start = next(d for n, d in docs if n == "start")
    stop = next(d for n, d in docs if n == "stop")
    return stop["num_events"].get("primary", 0) / (stop["time"] - start["time"])


def _acquire(RE, det, num: int, *subscribers):
    from bluesky.plans import count

    docs = []
    tokens = [RE.subscribe(lambda n, d: docs.append((n, d)))] + [RE.subscribe(s) for s in subscribers]
    try:
        (uid,) = RE(count([det], num=num))
    finally:
        for t in tokens:
            RE.unsubscribe(t)
    return uid, docs


# ---------------------------------------------------------------------- 1. RunEngine rate


def re_rate(url, work: Path, children: _Children, tiled, *, frames: int, repeats: int) -> dict:
    from bluesky import RunEngine

    from live_bgsub.bus.jetstream import DOCS_STREAM, RESULTS_STREAM, TASKS_STREAM
    from live_bgsub.bus.publisher import BusPublisher
    from live_bgsub.sim import SimDetector

    det = SimDetector(name="det", directory=work / "raw-small", preset=_small_preset(), n_patterns=4, seed=5)
    RE = RunEngine({})
    publisher = BusPublisher(url)
    rates = {"baseline": [], "publisher alone": [], "whole path": []}
    catch_up = {"publisher alone": [], "whole path": []}

    def interleaved(variant: str) -> None:
        """``repeats`` x (a run with nothing subscribed, a run with the publisher)."""
        for _ in range(repeats):
            for name in ("baseline", variant):
                _, docs = _acquire(RE, det, frames, *([publisher] if name != "baseline" else []))
                rates[name].append(_rate(docs))
                if name != "baseline":
                    t0 = time.monotonic()
                    publisher.flush(600)
                    catch_up[name].append(time.monotonic() - t0)

    interleaved("publisher alone")
    # The whole path beside the RunEngine: a worker and the composer on the same cores,
    # starting from empty streams (the runs above had nobody to process them).
    async def purge(js):
        for stream in (DOCS_STREAM, TASKS_STREAM, RESULTS_STREAM):
            await js.purge_stream(stream)

    _js(url, purge)
    server, _ = tiled
    worker = children.start("re-worker", "worker", "--nats", url)
    composer = children.start("re-composer", "compose", "--nats", url, "--tiled", server.uri, "--directory", str(work / "derived"),
                              env={"TILED_API_KEY": server.api_key})  # fmt: skip
    interleaved("whole path")
    children.stop(worker)
    children.stop(composer)
    publisher.close(600)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "frames": frames,
        "repeats": repeats,
        "frames_per_s": med,
        "all_frames_per_s": rates,
        "ratio_publisher_alone": med["publisher alone"] / statistics.median(rates["baseline"][:repeats]),
        "ratio_whole_path": med["whole path"] / statistics.median(rates["baseline"][repeats:]),
        "publisher_catch_up_s": {k: statistics.median(v) for k, v in catch_up.items()},
    }


# ---------------------------------------------------------------------- 2. throughput


def _publish_run(url, det, RE, method: str, frames: int) -> tuple[str, float]:
    """Acquire ``frames`` frames, publish them, then write the run's plan (no composer);
    returns the job (:func:`~live_bgsub.bus.jetstream.job_key`) and the time the plan
    was written (workers start then)."""
    from live_bgsub.bus.jetstream import PLANS_BUCKET, RunPlan, job_key
    from live_bgsub.bus.publisher import BusPublisher

    processing = {"method": method, "params": {}, "downsample": 1}
    with BusPublisher(url, processing=processing) as publisher:
        uid, _ = _acquire(RE, det, frames, publisher)
        assert publisher.flush(600)
    plan = RunPlan(processing, tuple(det.detector_preset.nominal_center), 0.0, tuple(det.detector_preset.shape))

    async def put(js):
        kv = await js.key_value(PLANS_BUCKET)
        t = time.time()
        await kv.put(job_key(uid, processing), plan.to_bytes())
        return t

    return job_key(uid, processing), _js(url, put)


def _last_result(url, job: str):
    from live_bgsub.bus.jetstream import RESULTS_STREAM, subject

    return _js(url, lambda js: js.get_last_msg(RESULTS_STREAM, subject("results", job)))


def _results(url, job: str) -> int:
    from live_bgsub.bus.jetstream import RESULTS_STREAM, subject

    async def count(js):
        info = await js.stream_info(RESULTS_STREAM, subjects_filter=subject("results", job))
        return (info.state.subjects or {}).get(subject("results", job), 0)

    return _js(url, count)


def _timestamp(msg) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(msg.time).replace("Z", "+00:00")).timestamp() if isinstance(msg.time, str) else msg.time.timestamp()


def throughput(url, work: Path, children: _Children, *, methods, frames: int, batch: int, counts=(1, 2, 4)) -> dict:
    from bluesky import RunEngine

    from live_bgsub.sim import SimDetector

    det = SimDetector(name="pil", directory=work / "raw-pilatus", preset="pilatus-1m", n_patterns=4, seed=2)
    RE = RunEngine({})
    out = {}
    for method in methods:
        per = {}
        for k in counts:
            workers = [children.start(f"tp-{k}", "worker", "--nats", url, "--name", f"w{i}", "--batch", str(batch)) for i in range(k)]
            warm, _ = _publish_run(url, det, RE, method, 2 * k)  # every worker loads its step once
            wait_until(lambda: _results(url, warm) == 2 * k, WAIT_S, 0.02, what="warm-up results")
            uid, t_plan = _publish_run(url, det, RE, method, frames)
            wait_until(lambda: _results(url, uid) >= frames, WAIT_S, 0.02, what=f"{frames} results with {k} worker(s)")
            span = _timestamp(_last_result(url, uid)) - t_plan
            for w in workers:
                children.stop(w)
            per[k] = {"frames": frames, "span_s": span, "frames_per_s": frames / span}
        one, two = per[counts[0]]["frames_per_s"], per[counts[1]]["frames_per_s"]
        out[method] = {"workers": per, "efficiency_1_to_2": two / (2 * one)}
    return out


# ---------------------------------------------------------------------- 3. latency


def latency(url, work: Path, children: _Children, tiled, *, rates_hz, frames: int, workers: int, method: str) -> dict:
    from bluesky import RunEngine

    from live_bgsub.bus.jetstream import DONE_BUCKET, derived_uid, job_key
    from live_bgsub.bus.publisher import BusPublisher
    from live_bgsub.catalog import metrics_table
    from live_bgsub.sim import SimDetector

    server, catalog = tiled
    procs = [children.start("lat-worker", "worker", "--nats", url, "--name", f"l{i}") for i in range(workers)]
    composer = children.start("lat-composer", "compose", "--nats", url, "--tiled", server.uri, "--directory", str(work / "derived"),
                              "--method", method, env={"TILED_API_KEY": server.api_key})  # fmt: skip
    RE = RunEngine({})
    processing = {"method": method, "params": {}, "downsample": 1}
    out = {}

    async def is_done(js, uid):
        kv = await js.key_value(DONE_BUCKET)
        try:
            return (await kv.get(job_key(uid, processing))) is not None
        except Exception:  # noqa: BLE001 - KeyNotFoundError
            return False

    try:
        with BusPublisher(url, processing=processing) as publisher:
            warm_det = SimDetector(name="pil", directory=work / "raw-lat", preset="pilatus-1m", n_patterns=4, seed=3)
            uid, _ = _acquire(RE, warm_det, 3 * workers, publisher)
            wait_until(lambda: _js(url, lambda js: is_done(js, uid)), WAIT_S, 0.02, what="warm-up run composed")
            for hz in rates_hz:
                det = SimDetector(name="pil", directory=work / "raw-lat", preset="pilatus-1m", n_patterns=4, seed=3, period_s=1.0 / hz)
                uid, docs = _acquire(RE, det, frames, publisher)
                wait_until(lambda: _js(url, lambda js: is_done(js, uid)), WAIT_S, 0.02, what=f"run at {hz:.1f} Hz composed")
                table = metrics_table(catalog[derived_uid(job_key(uid, processing), processing)])
                lag = np.asarray(table["lag_s"], float)
                out[f"{hz:.1f}"] = {
                    "rate_hz": hz, "frames": frames, "processed": int(len(lag)), "re_frames_per_s": _rate(docs),
                    "lag_p50_ms": float(np.percentile(lag, 50) * 1e3), "lag_p99_ms": float(np.percentile(lag, 99) * 1e3),
                    "lag_max_ms": float(lag.max() * 1e3),
                }  # fmt: skip
    finally:
        for p in [*procs, composer]:
            children.stop(p)
    return out


# ---------------------------------------------------------------------- report


def _tables(report) -> str:
    r = report["re_rate"]
    n = r["repeats"]
    lines = [
        f"RunEngine, small frames at the top rate, {r['frames']} frames x {r['repeats']} (medians):",
        "| variant | frames/s | ratio | publisher catch-up after the stop (s) |",
        "|---|---|---|---|",
        f"| baseline (nothing subscribed), first phase | {statistics.median(r['all_frames_per_s']['baseline'][:n]):.0f} | | |",
        f"| BusPublisher alone | {r['frames_per_s']['publisher alone']:.0f} | {r['ratio_publisher_alone']:.3f} | {r['publisher_catch_up_s']['publisher alone']:.2f} |",
        f"| baseline, second phase (the worker and composer still busy with the previous run) | {statistics.median(r['all_frames_per_s']['baseline'][n:]):.0f} | | |",
        f"| BusPublisher, a worker and the composer running | {r['frames_per_s']['whole path']:.0f} | {r['ratio_whole_path']:.3f} | {r['publisher_catch_up_s']['whole path']:.2f} |",
        "",
        "Workers, Pilatus 1M frames (frames/s, first result -> last result on the server's clock):",
        "| method | 1 worker | 2 workers | 4 workers | efficiency 1 -> 2 |",
        "|---|---|---|---|---|",
    ]
    for method, t in report["throughput"].items():
        w = t["workers"]
        lines.append(f"| {method} | " + " | ".join(f"{w[k]['frames_per_s']:.2f}" for k in sorted(w)) + f" | {t['efficiency_1_to_2']:.2f} |")
    lines += ["", f"Latency, whole path, {report['latency_method']} ({report['latency_workers']} workers):",
              "| rate | frames | processed | RE frames/s | lag p50 (ms) | lag p99 (ms) | max (ms) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["latency"].values():
        lines.append(f"| {row['rate_hz']:.1f} Hz | {row['frames']} | {row['processed']} | {row['re_frames_per_s']:.1f} | "
                     f"{row['lag_p50_ms']:.0f} | {row['lag_p99_ms']:.0f} | {row['lag_max_ms']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bus", description=__doc__.split("\n")[0])
    parser.add_argument("--re-frames", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=48, help="frames per throughput run (default 48)")
    parser.add_argument("--batch", type=int, default=4, help="tasks a worker takes at once in the throughput runs (default 4)")
    parser.add_argument("--methods", nargs="+", default=["white-top-hat", "model:white-top-hat"])
    parser.add_argument("--latency-frames", type=int, default=60)
    parser.add_argument("--latency-workers", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=("re", "throughput", "latency"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from live_bgsub.bus.server import EmbeddedJetStream
    from live_bgsub.tiled_server import EmbeddedTiledServer, connect

    report = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "latency_method": args.methods[0], "latency_workers": args.latency_workers}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        children = _Children(work / "logs")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            # One JetStream server per measurement: nothing one leaves queued weighs on the next.
            with EmbeddedTiledServer(work / "tiled", readable_storage=[work]) as server:
                tiled = (server, connect(server.uri, api_key=server.api_key))
                if "re" not in args.skip:
                    with EmbeddedJetStream(work / "js-re") as js:
                        report["re_rate"] = re_rate(js.url, work, children, tiled, frames=args.re_frames, repeats=args.repeats)
                    print(json.dumps(report["re_rate"]["frames_per_s"]), flush=True)
                if "throughput" not in args.skip:
                    with EmbeddedJetStream(work / "js-tp") as js:
                        report["throughput"] = throughput(js.url, work, children, methods=args.methods, frames=args.frames, batch=args.batch)
                    print(json.dumps({m: t["efficiency_1_to_2"] for m, t in report["throughput"].items()}), flush=True)
                if "latency" not in args.skip:
                    top = report.get("throughput", {}).get(args.methods[0], {}).get("workers", {}).get(args.latency_workers, {}).get("frames_per_s")
                    rates = [20.0] + ([0.9 * top] if top and top * 0.9 > 1 else [])
                    with EmbeddedJetStream(work / "js-lat") as js:
                        report["latency"] = latency(js.url, work, children, tiled, rates_hz=rates, frames=args.latency_frames,
                                                    workers=args.latency_workers, method=args.methods[0])  # fmt: skip
        finally:
            children.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if {"re_rate", "throughput", "latency"} <= set(report):
        print(_tables(report))
    else:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
