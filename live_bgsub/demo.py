"""``live-bgsub demo``: the whole live job on embedded defaults, in one command.

It starts the embedded Tiled server, a simulated Pilatus 1M that writes synthetic muscle
frames to HDF5 at a chosen rate (StreamResource/StreamDatum), and a RunEngine running a
``count`` with the live callback subscribed. Raw and derived runs go to Tiled; the
demo reads both back, prints the run uids, the acquisition and processing rates, the
per-frame lag, and how to read the results with the Tiled client, and writes a PNG
summary (:mod:`live_bgsub.summary`: raw fold, background and corrected fold of one
frame; I11/I10 and S10 over the run beside the simulator's truth). It runs the U-Net
:data:`DEMO_METHOD` by default, compiled before the first frame. Everything stays under
the chosen directory.

``--workers N`` runs the scale-out path on embedded defaults instead: a NATS JetStream
server (:class:`~live_bgsub.bus.server.EmbeddedJetStream`), N ``live-bgsub worker`` and
one ``live-bgsub compose`` subprocesses, and the RunEngine with a
:class:`~live_bgsub.bus.publisher.BusPublisher` subscribed.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from pathlib import Path

import numpy as np

from .summary import plot_summary  # the figure: live_bgsub/summary.py

__all__ = ["DEMO_METHOD", "plot_summary", "rate_that_keeps_up", "run_demo"]

#: The demo's processing step: the U-Net this project exists for, the shipped model that
#: reproduces its method best (BENCHMARKS.md section 5). ``--method white-top-hat`` runs a
#: classical method instead.
DEMO_METHOD = "model:smoothed-gaussian"


def run_demo(
    directory="live_bgsub_demo",
    *,
    frames: int = 30,
    rate_hz: float = 5.0,
    method: str = DEMO_METHOD,
    preset: str = "pilatus-1m",
    seed: int = 0,
    keep_serving: bool = False,
    epics: bool = False,
    remote: bool = False,
    workers: int | None = None,
    print=print,
) -> dict:
    """Run the demo; return its figures (also printed).

    Parameters
    ----------
    directory : path-like
        Where raw HDF5, derived HDF5, the Tiled catalog and the PNG go.
    frames : int
        Frames to acquire.
    rate_hz : float
        Detector frame rate (the simulated detector's period is ``1 / rate_hz``).
    method : str
        Processing step (classical method, ``model:NAME`` or ``model:PATH``).
    preset : str
        Simulated detector (``pilatus-1m``, ``eiger2-9m``, ``mar``).
    keep_serving : bool
        Keep the Tiled server up after the run until Ctrl-C.
    epics : bool
        Acquire through the simulated areaDetector IOC (a caproto subprocess) and the
        ophyd ``EpicsPilatus`` over Channel Access, instead of the in-process detector.
    remote : bool
        Process in another process: the RunEngine only publishes to a
        ``bluesky-0MQ-proxy``, and ``live-bgsub serve`` (a subprocess) runs the callback
        and writes the derived run to Tiled. The embedded SQLite catalog takes one
        writer at a time, so this demo writes the raw run to it after the derived run
        has finished (a PostgreSQL-backed server takes both at once).
    workers : int, optional
        Process on the bus: start a NATS JetStream server (its store in a temporary
        directory under ``directory``), this many ``live-bgsub worker`` and one
        ``live-bgsub compose`` subprocesses; the RunEngine only publishes to JetStream
        (a :class:`~live_bgsub.bus.publisher.BusPublisher`). As with ``remote``, the raw
        run is written to the SQLite catalog once the derived run is done. Everything
        started is stopped at the end, also on an error or Ctrl-C.
    """
    from .beamline import BeamlineConfig

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not rate_hz > 0:
        raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
    directory = Path(directory).resolve()
    if epics and remote:
        raise ValueError("choose one of --epics and --remote")
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if epics or remote:
            raise ValueError(f"choose one of --epics, --remote and --workers, got --workers with {'--epics' if epics else '--remote'}")
        return _run_bus(directory, frames=frames, rate_hz=rate_hz, method=method, preset=preset, seed=seed, workers=workers, print=print)
    if remote:
        return _run_remote(directory, frames=frames, rate_hz=rate_hz, method=method, preset=preset, seed=seed, print=print)
    if epics:
        return _run_epics(directory, frames=frames, rate_hz=rate_hz, method=method, preset=preset, seed=seed,
                          keep_serving=keep_serving, print=print)
    config = BeamlineConfig(
        directory=str(directory),
        method=method,
        preset=preset,
        period_s=1.0 / rate_hz,
        seed=seed,
        on_full="skip",
        queue_size=max(256, 2 * frames),
    )
    print(f"live-bgsub demo: {frames} frames at {rate_hz:g} Hz from a simulated {preset}, method {method}")
    return _acquire(config, frames, keep_serving, print)


def _run_epics(directory, *, frames, rate_hz, method, preset, seed, keep_serving, print):
    import secrets

    from .beamline import BeamlineConfig
    from .devices import ca_repeater
    from .sim.ioc import run_ioc_subprocess, use_loopback_ca

    use_loopback_ca()
    prefix = f"LBDEMO{secrets.token_hex(3).upper()}:"
    raw_dir = directory / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    config = BeamlineConfig(
        directory=str(directory),
        method=method,
        detector="epics",
        epics_prefix=prefix,
        on_full="skip",
        queue_size=max(256, 2 * frames),
    )
    print(f"live-bgsub demo --epics: {frames} frames at {rate_hz:g} Hz from a simulated {preset} IOC "
          f"(prefix {prefix}) over Channel Access, method {method}")
    period = 1.0 / rate_hz
    # A CA repeater before pyepics starts (libca warns when it cannot spawn caRepeater).
    with ca_repeater(), run_ioc_subprocess(prefix, directory=raw_dir, preset=preset, seed=seed,
                                           acquire_time=period, acquire_period=period):
        return _acquire(config, frames, keep_serving, print)


def _run_remote(directory, *, frames, rate_hz, method, preset, seed, print):
    import secrets
    import subprocess
    import sys

    from bluesky import RunEngine
    from bluesky.plans import count

    from .beamline import persistent_key
    from .catalog import derived_runs
    from .procutil import free_port
    from .serve import read_status, wait_for_subscriber
    from .sim.detector import SimDetector
    from .sinks.tiled import TiledPublisher
    from .tiled_server import EmbeddedTiledServer, connect
    from .wire import KEY_ENV, make_publisher

    raw_dir, derived_dir = directory / "raw", directory / "derived"
    for d in (raw_dir, derived_dir):
        d.mkdir(parents=True, exist_ok=True)
    in_port, out_port = free_port(), free_port()
    status_path = directory / "serve-status.json"
    print(f"live-bgsub demo --remote: {frames} frames at {rate_hz:g} Hz from a simulated {preset}; "
          f"RunEngine -> bluesky-0MQ-proxy (127.0.0.1:{in_port} -> {out_port}) -> live-bgsub serve, method {method}")
    processes = []
    key = persistent_key(directory / "tiled")
    zmq_key = secrets.token_hex(32)  # signs every 0MQ message (docs/remote.md); never pickle
    with EmbeddedTiledServer(directory / "tiled", readable_storage=[raw_dir, derived_dir], api_key=key) as server:
        try:
            proxy = Path(sys.executable).with_name("bluesky-0MQ-proxy")
            processes.append(subprocess.Popen(
                [str(proxy), "--in-address", f"127.0.0.1:{in_port}", "--out-address", f"127.0.0.1:{out_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            log = open(directory / "serve.log", "w")  # noqa: SIM115 - the child keeps it
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "live_bgsub.serve", "--zmq", f"127.0.0.1:{out_port}", "--tiled", server.uri,
                 "--directory", str(derived_dir), "--method", method, "--status-file", str(status_path),
                 "--queue-size", str(max(256, 2 * frames)), "--run-timeout", "120"],
                env={**__import__("os").environ, "TILED_API_KEY": key, KEY_ENV: zmq_key}, stdout=log, stderr=subprocess.STDOUT,
            ))
            log.close()
            publisher = make_publisher(f"127.0.0.1:{in_port}", key=zmq_key)
            wait_for_subscriber(publisher, lambda t: t in _status(read_status, status_path).get("probes", []), timeout=60)
            raw_docs = []
            RE = RunEngine({})
            RE.subscribe(publisher)
            RE.subscribe(lambda name, doc: raw_docs.append((name, doc)))
            det = SimDetector(name="det", directory=raw_dir, preset=preset, period_s=1.0 / rate_hz, seed=seed)
            _ = det.geometry
            t0 = time.perf_counter()
            (raw_uid,) = RE(count([det], num=frames), sample="synthetic muscle fiber (demo)")
            acquisition_s = time.perf_counter() - t0
            deadline = time.monotonic() + 300
            entry = {}
            while time.monotonic() < deadline:  # the serve process reports through its status file
                entry = next((r for r in _status(read_status, status_path).get("runs", []) if r.get("raw_uid") == raw_uid), {})
                if "exit_status" in entry:
                    break
                time.sleep(0.2)
            else:
                print("warning: serve did not finish the derived run in 300 s; see serve.log")
            catalog = connect(server.uri, api_key=key)
            raw_publisher = TiledPublisher(catalog, backup_directory=str(directory / "backup"))
            for name, doc in raw_docs:
                raw_publisher(name, doc)
            raw_publisher.flush(timeout=300)
            raw_publisher.close()
            [derived] = derived_runs(catalog, raw_uid) or [None]
            if derived is None:
                raise RuntimeError(f"no derived run of {raw_uid} in Tiled; see {directory / 'serve.log'}")
            summary = _RemoteSummary(raw_uid, derived)
            figures = _figures(catalog, raw_uid, summary, frames, acquisition_s)
            figures["png"] = str(plot_summary(catalog, raw_uid, summary.derived_uid, directory / "summary.png"))
            print(f"raw run:     {raw_uid}  ({figures['raw_events_in_tiled']} events in Tiled)")
            print(f"derived run: {summary.derived_uid}  ({summary.reason}; exit_status {summary.exit_status})")
            print(f"acquisition: {figures['acquisition_fps']:.1f} frames/s (the RunEngine only publishes to 0MQ)")
            print(f"derived:     {figures['derived_fps']:.1f} frames/s in the serve process; lag per frame "
                  f"p50 {figures['lag_p50_ms']:.0f} ms, p99 {figures['lag_p99_ms']:.0f} ms")
            print(f"summary PNG: {figures['png']}; serve log: {directory / 'serve.log'}")
            return figures
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()


def _run_bus(directory, *, frames, rate_hz, method, preset, seed, workers, print):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky.utils import RunEngineInterrupted

    from .beamline import persistent_key
    from .bus.publisher import BusPublisher
    from .bus.server import EmbeddedJetStream
    from .replay import bus_done
    from .sim.detector import SimDetector
    from .sinks.tiled import TiledPublisher
    from .tiled_server import EmbeddedTiledServer, connect

    raw_dir, derived_dir = directory / "raw", directory / "derived"
    for d in (raw_dir, derived_dir):
        d.mkdir(parents=True, exist_ok=True)
    print(f"live-bgsub demo --workers {workers}: {frames} frames at {rate_hz:g} Hz from a simulated {preset}; "
          f"RunEngine -> NATS JetStream -> {workers} live-bgsub worker(s) -> live-bgsub compose, method {method}")
    processes = {}  # log name -> Popen
    key = persistent_key(directory / "tiled")
    publisher = None
    previous = signal.getsignal(signal.SIGTERM)
    store = Path(tempfile.mkdtemp(prefix="jetstream-", dir=directory))
    try:
        if _main_thread():  # SIGTERM too ends in the finally clauses below: nothing is left running
            signal.signal(signal.SIGTERM, _interrupt)
        with EmbeddedTiledServer(directory / "tiled", readable_storage=[raw_dir, derived_dir], api_key=key) as server, \
                EmbeddedJetStream(store) as bus:
            try:

                def start(name, *args, env=None):
                    with open(directory / f"{name}.log", "w") as log:
                        processes[name] = subprocess.Popen([sys.executable, "-m", "live_bgsub.cli", *args],
                                                           env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)

                def alive():
                    for name, process in processes.items():
                        if process.poll() is not None:
                            raise RuntimeError(f"{name} exited with status {process.returncode}; see {directory / (name + '.log')}")

                for i in range(1, workers + 1):
                    start(f"worker-{i}", "worker", "--nats", bus.url, "--name", f"worker-{i}", "--batch", "2")
                start("compose", "compose", "--nats", bus.url, "--tiled", server.uri, "--directory", str(derived_dir),
                      "--backup", str(directory / "backup"), "--method", method, env={"TILED_API_KEY": key})
                publisher = BusPublisher(bus.url)
                raw_docs = []
                RE = RunEngine({})
                RE.subscribe(publisher)
                RE.subscribe(lambda name, doc: raw_docs.append((name, doc)))
                det = SimDetector(name="det", directory=raw_dir, preset=preset, period_s=1.0 / rate_hz, seed=seed)
                _ = det.geometry
                t0 = time.perf_counter()
                try:
                    (raw_uid,) = RE(count([det], num=frames), sample="synthetic muscle fiber (demo)")
                except RunEngineInterrupted:  # Ctrl-C pauses the RunEngine: end the run, then stop everything
                    RE.abort("demo interrupted")
                    raise KeyboardInterrupt from None
                acquisition_s = time.perf_counter() - t0
                if not publisher.close(timeout=120):
                    print("warning: NATS JetStream did not acknowledge every document in 120 s")
                derived_uid = bus_done(bus.url, [raw_uid], timeout=300, check=alive)[raw_uid]
                if derived_uid is None:
                    print(f"warning: the composer did not finish the derived run in 300 s; see {directory / 'compose.log'}")
                said = _stop(processes, directory)  # idle now; the SQLite catalog then takes the raw run alone
                catalog = connect(server.uri, api_key=key)
                raw_publisher = TiledPublisher(catalog, backup_directory=str(directory / "backup"))
                for name, doc in raw_docs:
                    raw_publisher(name, doc)
                raw_publisher.flush(timeout=300)
                raw_publisher.close()
                if not derived_uid or derived_uid not in catalog:
                    raise RuntimeError(f"no derived run of {raw_uid} in Tiled; see {directory / 'compose.log'}")
                summary = _RemoteSummary(raw_uid, catalog[derived_uid])
                figures = _figures(catalog, raw_uid, summary, frames, acquisition_s)
                figures["png"] = str(plot_summary(catalog, raw_uid, summary.derived_uid, directory / "summary.png"))
                figures["workers"] = {name: line for name, line in said.items() if name.startswith("worker-")}
                print(f"raw run:     {raw_uid}  ({figures['raw_events_in_tiled']} events in Tiled)")
                print(f"derived run: {summary.derived_uid}  ({summary.reason}; exit_status {summary.exit_status})")
                print(f"acquisition: {figures['acquisition_fps']:.1f} frames/s (the RunEngine only publishes to NATS JetStream)")
                print(f"derived:     {figures['derived_fps']:.1f} frames/s from {workers} worker(s); lag per frame "
                      f"p50 {figures['lag_p50_ms']:.0f} ms, p99 {figures['lag_p99_ms']:.0f} ms")
                for line in figures["workers"].values():
                    print(f"  {line}")
                print(f"summary PNG: {figures['png']}; logs: {directory}/compose.log, worker-*.log")
                return figures
            finally:  # before the servers go: workers and composer stop cleanly
                if publisher is not None:
                    publisher.close(timeout=5)
                _stop(processes, directory)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        if _main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(processes: dict, directory: Path, timeout: float = 20.0) -> dict:
    """SIGTERM each process still running (a worker or the composer stops cleanly), SIGKILL
    those still running ``timeout`` seconds later (the bus redelivers what a killed
    worker held); return each one's
    last line of output (``directory/<name>.log``)."""
    import subprocess

    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    said = {}
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        try:
            lines = (directory / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        said[name] = lines[-1] if lines else ""
    return said


def _status(read_status, path) -> dict:
    try:
        return read_status(path)
    except (OSError, ValueError):
        return {}


class _RemoteSummary:
    """The counts of a derived run made in another process, read back from Tiled."""

    def __init__(self, raw_uid, derived):
        stop = derived.metadata.get("stop") or {}
        self.raw_uid = raw_uid
        self.derived_uid = derived.metadata["start"]["uid"]
        self.reason = stop.get("reason", "not finished")
        self.exit_status = stop.get("exit_status")
        from .catalog import metrics_table

        self.processed = len(metrics_table(derived).get("raw_seq_num", []))
        statuses = list(metrics_table(derived, "failures").get("status", [])) if "failures" in derived else []
        self.failed = [s for s in statuses if s == "failed"]
        self.skipped = [s for s in statuses if s == "skipped"]


def _acquire(config, frames, keep_serving, print) -> dict:
    from bluesky.plans import count

    from .beamline import Beamline

    directory = Path(config.directory)
    with Beamline(config) as bl:
        print(f"Tiled server: {bl.server.uri if bl.server else config.tiled_uri} (catalog {config.catalog!r})")
        if bl.prepare_s is not None:
            print(f"{config.method}: loaded and compiled in {bl.prepare_s:.1f} s, before the first frame")
        # Before timing: render the simulated frame bank, or connect to the IOC.
        if config.detector == "sim":
            _ = bl.detector.geometry
        else:
            bl.detector.wait_for_connection(timeout=30)
        t0 = time.perf_counter()
        (raw_uid,) = bl.RE(count([bl.detector], num=frames), sample="synthetic muscle fiber (demo)")
        acquisition_s = time.perf_counter() - t0
        if not bl.finish(raw_uid, timeout=config.stop_timeout_s + 60):
            print("warning: the derived run or the Tiled writes did not finish in time")
        summary = bl.callback.summary(raw_uid)
        figures = _figures(bl.catalog, raw_uid, summary, frames, acquisition_s)
        png = plot_summary(bl.catalog, raw_uid, summary.derived_uid, directory / "summary.png")
        figures["png"] = str(png)
        _report(print, bl, raw_uid, summary, figures)
        if keep_serving and bl.server is not None:
            print("Serving until Ctrl-C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return figures


def _figures(catalog, raw_uid, summary, frames, acquisition_s) -> dict:
    derived = catalog[summary.derived_uid]
    table = _table(derived)
    lag = np.asarray(table.get("lag_s", []), float)
    lag = lag[np.isfinite(lag)]
    t = np.asarray(table.get("time", []), float)
    raw = catalog[raw_uid]
    raw_stop = raw.metadata.get("stop") or {}
    return {
        "raw_uid": raw_uid,
        "derived_uid": summary.derived_uid,
        "frames": frames,
        "raw_events_in_tiled": int((raw_stop.get("num_events") or {}).get("primary", 0)),
        "processed": summary.processed,
        "failed": len(summary.failed),
        "skipped": len(summary.skipped),
        "acquisition_fps": frames / acquisition_s,
        "derived_fps": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan"),
        "lag_first_ms": 1e3 * float(lag[0]) if lag.size else float("nan"),
        "lag_p50_ms": 1e3 * float(np.median(lag)) if lag.size else float("nan"),
        "lag_p99_ms": 1e3 * float(np.percentile(lag, 99)) if lag.size else float("nan"),
        "i11_i10_median": float(np.nanmedian(table["i11_i10"])) if len(table.get("i11_i10", [])) else float("nan"),
        "exit_status": summary.exit_status,
        "reason": summary.reason,
    }


def rate_that_keeps_up(derived: float, acquired: float) -> float | None:
    """A detector rate (Hz, one decimal) that a demo's processing keeps up with, or None
    when it kept up with ``acquired`` (derived rate >= 0.95 x acquisition): 0.9 x the
    ``derived`` rate (frames/s) it reached, at least 0.1 Hz.

    >>> rate_that_keeps_up(3.1, 4.5), rate_that_keeps_up(4.4, 4.5)
    (2.7, None)
    """
    if not (np.isfinite(derived) and derived > 0) or derived >= 0.95 * acquired:
        return None
    return max(0.1, math.floor(9.0 * derived) / 10.0)


def _table(run) -> dict:
    from .catalog import metrics_table

    return metrics_table(run)


def _report(print, bl, raw_uid, summary, f) -> None:
    uri = bl.server.uri if bl.server else bl.config.tiled_uri
    print(f"raw run:     {raw_uid}  ({f['raw_events_in_tiled']} events in Tiled)")
    print(f"derived run: {summary.derived_uid}  ({summary.reason}; exit_status {summary.exit_status})")
    print(f"acquisition: {f['acquisition_fps']:.1f} frames/s with the callback subscribed")
    print(f"derived:     {f['derived_fps']:.1f} frames/s ({f['derived_fps'] / f['acquisition_fps']:.2f} x acquisition); "
          f"lag per frame: first {f['lag_first_ms']:.0f} ms, p50 {f['lag_p50_ms']:.0f} ms, p99 {f['lag_p99_ms']:.0f} ms")
    keeps_up = rate_that_keeps_up(f["derived_fps"], f["acquisition_fps"])
    if keeps_up is not None:
        print(f"             the processing fell behind the detector on this machine (the lag grew over the run); "
              f"--rate {keeps_up:g} is what it keeps up with")
    print(f"I11/I10 median over the run: {f['i11_i10_median']:.3f}")
    print(f"summary PNG: {f['png']}")
    print(f"data: raw HDF5 in {bl.directory / 'raw'}, corrected folds in {bl.directory / 'derived'}, catalog in {bl.directory / 'tiled'}")
    port = urllib.parse.urlsplit(uri).port
    again = f"live-bgsub tiled-server {bl.directory}" + (f" --port {port}" if port else "")
    print(f"Read the results back (after the demo exits, serve them again on the same port: `{again}`):")
    print("    from tiled.client import from_uri")
    print(f"    catalog = from_uri({uri!r}, api_key=open({str(bl.directory / 'tiled' / 'api_key')!r}).read().strip())[{bl.config.catalog!r}]")
    print(f"    derived = catalog[{summary.derived_uid!r}]")
    print("    from live_bgsub.catalog import metrics_table")
    print("    metrics_table(derived)                    # metrics per frame, sorted by seq_num")
    print("    derived['primary']['corrected'][0]        # first corrected fold (numpy)")
    print(f"    catalog[{raw_uid!r}]['primary']['det_image'][0]   # first raw frame")
