"""Remote processing: RunEngine -> bluesky-0MQ-proxy -> ``live-bgsub serve`` -> Tiled + PVs.

The first tests drive :class:`live_bgsub.transport.GapDetector` in process with
composed documents (exact gaps, a clock the test advances). The rest run real peers on
loopback: the proxy and the server are subprocesses, the RunEngine publishes from this
process through a ``bluesky.callbacks.zmq.Publisher`` (msgpack, ``live_bgsub.wire.
make_publisher``), the derived runs land in an
embedded Tiled server and the metrics on Channel Access PVs. Gaps are forced
deterministically by withholding chosen documents before they reach the real
Publisher, which is what a 0MQ drop looks like to the subscriber.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import secrets
import subprocess
import sys
import time
from pathlib import Path

import epics
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from conftest import MINI
from event_model import compose_run

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.catalog import metrics_table
from live_bgsub.procutil import DeadlinePassed, free_port, wait_until
from live_bgsub.replay import frames_to_fill, replay_runs
from live_bgsub.serve import RemoteServer, read_status, wait_for_subscriber
from live_bgsub.sim import SimDetector
from live_bgsub.sinks.tiled import TiledPublisher
from live_bgsub.synth import make_pattern
from live_bgsub.tiled_server import EmbeddedTiledServer, connect
from live_bgsub.transport import LOST_IN_TRANSPORT, GapDetector
from live_bgsub.wire import KEY_ENV, encode, make_publisher

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 2.0


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` s with the log."""
    try:
        return wait_until(predicate, timeout, what=what)
    except DeadlinePassed as error:
        tail = f"\n--- serve log ---\n{log.read_text()[-4000:]}" if log is not None and log.exists() else ""
        raise AssertionError(f"{error}{tail}") from None


# ---------------------------------------------------------------------- GapDetector in process


class Collector:
    def __init__(self):
        self.docs = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))

    def stop(self):
        return next(d for n, d in self.docs if n == "stop")

    def rows(self, stream):
        uids = {d["uid"] for n, d in self.docs if n == "descriptor" and d["name"] == stream}
        return [d["data"] for n, d in self.docs if n == "event" and d["descriptor"] in uids]


class Clock:
    """Monotonic time the test moves forward."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def mini_frames():
    first = make_pattern(MINI, seed=0)
    center, rotation = tuple(first.params["center"]), first.params["rotation_deg"]
    frames = [first.raw()] + [make_pattern(MINI, seed=s, center=center, rotation_deg=rotation).raw() for s in range(1, 6)]
    return frames, {"center": list(center), "rotation_deg": rotation}


def _inline_run(frames, geometry):
    bundle = compose_run(metadata=dict(geometry))
    desc = bundle.compose_descriptor(
        name="primary", data_keys={"det_image": {"source": "sim", "dtype": "array", "dtype_numpy": "<i4", "shape": list(MINI.shape)}}
    )
    now = time.time()
    events = [desc.compose_event(data={"det_image": f}, timestamps={"det_image": now}) for f in frames]
    return bundle, desc, events


def test_gaps_at_the_stop_are_marked_missing(tmp_path, mini_frames):
    frames, geometry = mini_frames
    out = Collector()
    cb = LiveBackgroundSubtraction(out, directory=tmp_path)
    gaps = GapDetector(cb, run_timeout=60)
    bundle, desc, events = _inline_run(frames[:5], geometry)
    gaps("start", bundle.start_doc)
    gaps("descriptor", desc.descriptor_doc)
    for event in events:
        if event["seq_num"] not in (2, 4):  # what 0MQ dropped
            gaps("event", event)
    gaps("stop", bundle.compose_stop())
    uid = bundle.start_doc["uid"]
    assert cb.wait(uid, timeout=60)
    cb.close()
    report = gaps.report(uid)
    assert (report.missing, report.finished_by, report.expected, report.frames_received) == ([2, 4], "stop", 5, 3)
    assert cb.summary(uid).missing == {2: LOST_IN_TRANSPORT, 4: LOST_IN_TRANSPORT}
    assert [r["raw_seq_num"] for r in out.rows("primary")] == [1, 3, 5]
    assert [(r["raw_seq_num"], r["status"], r["error"]) for r in out.rows("failures")] == [
        (2, "missing", LOST_IN_TRANSPORT),
        (4, "missing", LOST_IN_TRANSPORT),
    ]
    assert out.stop()["exit_status"] == "fail" and "missing 2" in out.stop()["reason"]


def test_a_run_without_its_stop_is_finished_after_the_timeout(tmp_path, mini_frames):
    frames, geometry = mini_frames
    out, clock = Collector(), Clock()
    cb = LiveBackgroundSubtraction(out, directory=tmp_path)
    finished = []
    gaps = GapDetector(cb, run_timeout=5, clock=clock, on_finished=finished.append)
    bundle, desc, events = _inline_run(frames[:4], geometry)
    uid = bundle.start_doc["uid"]
    for name, doc in [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc), ("event", events[0]), ("event", events[2])]:
        gaps(name, doc)
    clock.now += 5.0
    assert gaps.expire() == []  # not silent for *more* than run_timeout yet
    clock.now += 0.1
    assert gaps.expire() == [uid]
    assert cb.wait(uid, timeout=60)
    report = gaps.report(uid)
    assert (report.missing, report.finished_by, report.highest_seq_num) == ([2], "timeout", 3)
    assert finished == [report]
    stop = out.stop()
    assert stop["exit_status"] == "fail"
    assert "stop document never arrived: 0MQ drop suspected" in stop["reason"]
    assert "frames after seq_num 3 unknown" in stop["reason"]
    assert [r["raw_seq_num"] for r in out.rows("failures")] == [2]
    # The real stop (and a frame) arriving afterwards are dropped and counted.
    gaps("event", events[3])
    gaps("stop", bundle.compose_stop())
    assert gaps.late == 2 and gaps.report(uid).late_documents == 2
    assert [n for n, _ in out.docs].count("stop") == 1
    cb.close()


def test_documents_of_a_run_whose_start_was_lost_are_counted(tmp_path, mini_frames):
    frames, geometry = mini_frames
    out = Collector()
    cb = LiveBackgroundSubtraction(out, directory=tmp_path)
    gaps = GapDetector(cb, run_timeout=60)
    bundle, desc, events = _inline_run(frames[:2], geometry)
    uid = bundle.start_doc["uid"]
    gaps("descriptor", desc.descriptor_doc)
    for event in events:
        gaps("event", event)
    gaps("stop", bundle.compose_stop())
    assert gaps.orphans == {uid: 2, "?": 2}
    assert gaps.open_runs == [] and cb.errors == [] and out.docs == []
    # A good run afterwards is untouched.
    bundle, desc, events = _inline_run(frames[:2], geometry)
    for name, doc in [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc), *[("event", e) for e in events]]:
        gaps(name, doc)
    gaps("stop", bundle.compose_stop())
    assert cb.wait(bundle.start_doc["uid"], timeout=60)
    cb.close()
    assert out.stop()["exit_status"] == "success"


def test_stream_datum_frames_count_by_their_datum(tmp_path):
    # STREAM: frames reach the callback through their StreamDatum: a lost event alone
    # loses nothing, a lost StreamDatum loses the frame.
    det = SimDetector(name="det", directory=tmp_path / "raw", preset=MINI, n_patterns=2)
    docs = []
    RunEngine({})(count([det], num=4), lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    out = Collector()
    cb = LiveBackgroundSubtraction(out, directory=tmp_path / "derived")
    gaps = GapDetector(cb, run_timeout=60)
    for name, doc in docs:
        lost_event = name == "event" and doc["seq_num"] == 2
        lost_datum = name == "stream_datum" and doc["seq_nums"]["start"] == 3
        if not (lost_event or lost_datum):
            gaps(name, doc)
    uid = docs[0][1]["uid"]
    assert cb.wait(uid, timeout=60)
    cb.close()
    assert gaps.report(uid).missing == [3]
    assert [r["raw_seq_num"] for r in out.rows("primary")] == [1, 2, 4]
    assert math.isnan(out.rows("primary")[1]["lag_s"])  # its event never came


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="run_timeout must be a positive number of seconds, got 0"):
        GapDetector(LiveBackgroundSubtraction(directory=tmp_path), run_timeout=0)
    with pytest.raises(TypeError, match="mark_missing"):
        GapDetector(print)


def test_in_process_server_lifecycle(tmp_path):
    # RemoteServer in a thread, on a port where no proxy runs: it listens, stops, and
    # finishes what is open. (The real 0MQ path is tested below.)
    cb = LiveBackgroundSubtraction(directory=tmp_path)
    server = RemoteServer(f"127.0.0.1:{free_port()}", cb, run_timeout=30, status_path=tmp_path / "status.json")
    server.start(timeout=30)
    assert read_status(tmp_path / "status.json")["state"] == "listening"
    server.stop(timeout=30)
    assert read_status(tmp_path / "status.json")["state"] == "stopped"


# ---------------------------------------------------------------------- real peers


def _stop(process: subprocess.Popen, timeout: float = 60) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)
    return process.returncode


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    for name in ("raw", "derived", "replayed", "tiled"):
        (root / name).mkdir()
    return root


@pytest.fixture(scope="module")
def tiled(dirs):
    server = EmbeddedTiledServer(dirs / "tiled", readable_storage=[dirs / "raw", dirs / "derived", dirs / "replayed"])
    with server:
        yield server, connect(server.uri, api_key=server.api_key)


@pytest.fixture(scope="module")
def proxy():
    in_port, out_port = free_port(), free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("bluesky-0MQ-proxy")), "--in-address", f"127.0.0.1:{in_port}", "--out-address", f"127.0.0.1:{out_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield in_port, out_port
    _stop(process)


class Serve:
    """The ``live-bgsub serve`` subprocess, its status file and PVs."""

    def __init__(self, dirs, tiled, out_port):
        server, _ = tiled
        self.status_path = dirs / "serve-status.json"
        self.log = dirs / "serve.log"
        self.prefix = f"LBGS{secrets.token_hex(4)}:"
        env = dict(os.environ, TILED_API_KEY=server.api_key, PYTHONUNBUFFERED="1")
        command = [
            sys.executable, "-m", "live_bgsub.serve",
            "--zmq", f"127.0.0.1:{out_port}",
            "--tiled", server.uri,
            "--directory", str(dirs / "derived"),
            "--pv-prefix", self.prefix,
            "--run-timeout", str(RUN_TIMEOUT),
            "--status-file", str(self.status_path),
            "-v",
        ]  # fmt: skip
        with open(self.log, "w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def status(self) -> dict:
        assert self.process.poll() is None, f"serve exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}"
        return read_status(self.status_path)

    def run(self, raw_uid: str) -> dict:
        return next((r for r in self.status().get("runs", []) if r["raw_uid"] == raw_uid), {})

    def wait_derived(self, raw_uid: str, catalog, timeout: float = 60) -> dict:
        """Wait until the derived run of ``raw_uid`` is finished and its stop is in Tiled."""
        entry = wait_for(lambda: self.run(raw_uid).get("exit_status") and self.run(raw_uid), timeout, f"the derived run of {raw_uid}", self.log)

        def stored():
            try:
                return catalog[entry["derived_uid"]].metadata.get("stop")
            except KeyError:
                return None

        wait_for(stored, timeout, f"the stop of derived run {entry['derived_uid']} in Tiled", self.log)
        return entry

    def caget_until(self, expected: dict, timeout: float = 15) -> None:
        """caget the PVs (suffix -> value) until they hold ``expected``."""
        last = {}

        def matches():
            last.update({s: epics.caget(self.prefix + s, timeout=2) for s in expected})
            return all(_same(last[s], v) for s, v in expected.items())

        try:
            wait_for(matches, timeout, f"PVs {expected}", self.log)
        except AssertionError as error:
            raise AssertionError(f"{error}\nlast read: {last}") from None


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.fixture(scope="module")
def serve(dirs, tiled, proxy):
    process = Serve(dirs, tiled, proxy[1])
    yield process
    rc = _stop(process.process)
    assert rc == 0, f"serve exited with {rc}:\n{process.log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def publish(proxy, serve):
    """A Publisher into the proxy, connected end to end (probes answered by serve)."""
    publisher = make_publisher(f"127.0.0.1:{proxy[0]}")  # msgpack: serve never unpickles
    wait_for_subscriber(publisher, lambda token: token in serve.status().get("probes", []), timeout=60)
    yield publisher
    publisher.close()


class Withholding:
    """Pass documents to the real Publisher, except those ``drop(name, doc)`` selects."""

    def __init__(self, publisher, drop=lambda name, doc: False):
        self.publisher, self.drop, self.dropped, self.sent = publisher, drop, [], 0

    def __call__(self, name, doc):
        if self.drop(name, doc):
            self.dropped.append((name, doc))
            return
        self.publisher(name, doc)
        self.sent += 1
        self.last_sent = time.monotonic()


def _frame_of(name, doc):
    """Raw seq_num a document announces (events and one-frame StreamDatums), else None."""
    if name == "event":
        return doc["seq_num"]
    if name == "stream_datum":
        return doc["seq_nums"]["start"]
    return None


def _acquire(dirs, sink, num, *, preset=MINI, seed=0):
    docs = []
    det = SimDetector(name="det", directory=dirs / "raw", preset=preset, n_patterns=2, seed=seed)
    (uid,) = RunEngine({})(count([det], num=num), [sink, lambda name, doc: docs.append((name, copy.deepcopy(doc)))])
    return uid, docs


def _archive(catalog, docs):
    """Write the raw run to Tiled (after the derived one: one writer at a time on SQLite)."""
    with TiledPublisher(catalog) as publisher:
        for name, doc in docs:
            publisher(name, doc)
        assert publisher.flush(timeout=60) and publisher.errors == []


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_a_run_through_the_proxy_lands_in_tiled_and_on_the_pvs(dirs, tiled, serve, publish):
    _, catalog = tiled
    sink = Withholding(publish)
    uid, _ = _acquire(dirs, sink, 6, preset="pilatus-1m", seed=5)
    entry = serve.wait_derived(uid, catalog)
    assert entry["exit_status"] == "success", entry
    assert entry["transport"]["missing"] == [] and entry["transport"]["expected"] == 6
    derived = catalog[entry["derived_uid"]]
    table = metrics_table(derived)
    assert table["raw_seq_num"].tolist() == [1, 2, 3, 4, 5, 6]
    assert derived.metadata["start"]["raw_uid"] == uid
    last = {k: float(v[-1]) for k, v in table.items() if k in ("i11_i10", "s10_px", "i10", "i11", "m3_intensity", "lag_s")}
    assert math.isfinite(last["i11_i10"])
    serve.caget_until(
        {
            "STATUS": f"finished {uid[:8]} success",
            "I11_I10": last["i11_i10"],
            "S10_PX": last["s10_px"],
            "I10": last["i10"],
            "I11": last["i11"],
            "M3_INTENSITY": last["m3_intensity"],
            "LAG_MS": 1e3 * last["lag_s"],
            "RAW_SEQ_NUM": 6,
            "PROCESSED": 6,
            "FAILED": 0,
            "MISSING": 0,
            "RAW_UID": uid,
            "DERIVED_UID": entry["derived_uid"],
        }
    )
    assert epics.caget(serve.prefix + "FPS", timeout=2) >= 0.0


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_dropped_frames_are_listed_exactly_and_a_replay_fills_them(dirs, tiled, serve, publish):
    _, catalog = tiled

    def drop(name, doc):
        frame = _frame_of(name, doc)
        return (name == "event" and frame == 2) or (name == "stream_datum" and frame == 4) or frame == 6

    sink = Withholding(publish, drop)
    uid, docs = _acquire(dirs, sink, 8, seed=11)
    assert len(sink.dropped) == 4
    entry = serve.wait_derived(uid, catalog)
    # Frame 2 lost only its event: its StreamDatum carried the frame, so it was processed.
    assert entry["transport"]["missing"] == [4, 6]
    assert entry["exit_status"] == "fail" and "missing 2" in entry["reason"]
    derived = catalog[entry["derived_uid"]]
    assert metrics_table(derived)["raw_seq_num"].tolist() == [1, 2, 3, 5, 7, 8]
    failures = metrics_table(derived, "failures")
    assert failures["raw_seq_num"].tolist() == [4, 6]
    assert set(failures["status"].tolist()) == {"missing"}
    assert set(failures["error"].tolist()) == {LOST_IN_TRANSPORT}
    serve.caget_until({"STATUS": f"finished {uid[:8]} fail", "PROCESSED": 6, "FAILED": 2, "MISSING": 2})

    raw_uid, missing = frames_to_fill(catalog, entry["derived_uid"])
    assert (raw_uid, missing) == (uid, [4, 6])
    _archive(catalog, docs)
    with TiledPublisher(catalog) as publisher:
        [filled] = replay_runs(catalog, [uid], publish=publisher, directory=dirs / "replayed", seq_nums=missing, timeout=60)
        assert publisher.flush(timeout=60) and publisher.errors == []
    assert (filled.processed, filled.exit_status) == (2, "success")
    assert metrics_table(catalog[filled.derived_uid])["raw_seq_num"].tolist() == [4, 6]


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_a_lost_stop_finishes_the_run_after_the_timeout(dirs, tiled, serve, publish):
    _, catalog = tiled

    def drop(name, doc):
        return name == "stop" or _frame_of(name, doc) in (2, 5)

    sink = Withholding(publish, drop)
    uid, docs = _acquire(dirs, sink, 5, seed=21)
    entry = serve.wait_derived(uid, catalog, timeout=RUN_TIMEOUT + 60)
    assert time.monotonic() - sink.last_sent >= RUN_TIMEOUT
    assert entry["transport"]["finished_by"] == "timeout"
    assert entry["transport"]["missing"] == [2]  # 5 was the last frame: unknown, not listed
    derived = catalog[entry["derived_uid"]]
    stop = derived.metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert "stop document never arrived: 0MQ drop suspected" in stop["reason"]
    assert "frames after seq_num 4 unknown" in stop["reason"]
    assert metrics_table(derived)["raw_seq_num"].tolist() == [1, 3, 4]
    assert metrics_table(derived, "failures")["raw_seq_num"].tolist() == [2]
    assert frames_to_fill(catalog, entry["derived_uid"]) == (uid, [2])
    serve.caget_until({"STATUS": f"finished {uid[:8]} fail", "MISSING": 1})
    # The stop turning up after all is dropped and counted as late.
    late_before = serve.status()["late"]
    publish("stop", next(doc for name, doc in docs if name == "stop"))
    wait_for(lambda: serve.status()["late"] == late_before + 1, 30, "the late stop to be counted", serve.log)


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_a_run_whose_start_was_lost_is_counted_and_the_next_run_is_fine(dirs, tiled, serve, publish):
    _, catalog = tiled
    lost_uid, _ = _acquire(dirs, Withholding(publish, lambda name, doc: name == "start"), 3, seed=31)
    # descriptor, stream_resource and stop name the run; events and datums cannot.
    wait_for(lambda: serve.status()["orphans"].get(lost_uid) == 3, 30, "the orphans to be counted", serve.log)
    # Its stop named it: a derived run says the start was missed and lists every frame.
    entry = serve.wait_derived(lost_uid, catalog)
    assert entry["exit_status"] == "fail" and "start document never arrived" in entry["reason"]
    assert (entry["transport"]["finished_by"], entry["transport"]["missing"]) == ("start missed", [1, 2, 3])
    uid, _ = _acquire(dirs, Withholding(publish), 3, seed=41)
    assert serve.wait_derived(uid, catalog)["exit_status"] == "success"


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_twenty_frames_published_back_to_back_all_arrive(dirs, tiled, serve, publish):
    # The Publisher on the RunEngine thread, frames as fast as the simulated detector
    # makes them: every document is handed on and the derived run misses nothing. What
    # a document costs the RunEngine is measured by python -m benchmarks.live --path zmq
    # (publish_event_p50_ms, BENCHMARKS.md section 9).
    _, catalog = tiled
    sink = Withholding(publish)
    uid, docs = _acquire(dirs, sink, 20, seed=51)
    entry = serve.wait_derived(uid, catalog)
    assert sink.sent == len(docs) and sink.dropped == []
    assert entry["exit_status"] == "success", entry
    assert entry["transport"]["missing"] == [] and entry["transport"]["expected"] == 20
    assert metrics_table(catalog[entry["derived_uid"]])["raw_seq_num"].tolist() == list(range(1, 21))


def test_command_line_errors_exit_2(capsys):
    from live_bgsub.serve import main

    assert main(["--zmq", "127.0.0.1:1", "--run-timeout", "0"]) == 2
    assert "--run-timeout must be > 0 seconds, got 0.0" in capsys.readouterr().err
    assert main(["--zmq", "127.0.0.1:1", "--method", "no-such-method"]) == 2
    assert "no-such-method" in capsys.readouterr().err


# ---------------------------------------------------------------------- no pickle, keys, restart


class _Exploit:
    """Unpickling this creates ``path``: what a hostile publisher could run in serve."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_a_pickle_published_to_the_proxy_is_rejected_and_serve_carries_on(dirs, tiled, serve, publish, tmp_path):
    _, catalog = tiled
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    pickle.loads(pickle.dumps(_Exploit(proof))).close()
    assert proof.exists()  # the payload is live: unpickling it runs open(path, "w")
    before = serve.status()
    # Exactly what bluesky's default Publisher puts on the wire, through a socket that
    # is connected end to end (so that it cannot be lost to the slow joiner).
    publish._socket.send(b" ".join([b"", b"start", pickle.dumps(_Exploit(marker))]))
    wait_for(lambda: serve.status()["rejected"] == before["rejected"] + 1, 30, "the pickle to be rejected", serve.log)
    status = serve.status()
    assert status["rejected_reasons"].get("pickle", 0) == before["rejected_reasons"].get("pickle", 0) + 1
    assert status["documents"] == before["documents"] and status["signed"] is False
    assert not marker.exists()
    # Garbage and an unknown document name (which ends bluesky's own receive loop).
    publish._socket.send(b"no-spaces-at-all")
    publish._socket.send(b" bogus " + encode("bogus", {}))  # a valid payload, an unknown name
    wait_for(lambda: serve.status()["rejected"] == before["rejected"] + 3, 30, "the garbage to be rejected", serve.log)
    # One log line per rejected message, no traceback.
    log = serve.log.read_text()
    assert log.count("serve: rejected a message") >= 3 and "Traceback" not in log
    # A genuine run afterwards is processed as usual.
    uid, _ = _acquire(dirs, Withholding(publish), 3, seed=61)
    entry = serve.wait_derived(uid, catalog)
    assert entry["exit_status"] == "success", entry
    assert not marker.exists()
    # The derived documents are also backed up by default, beside the derived files.
    assert (dirs / "derived" / "backup" / f"{entry['derived_uid']}.jsonl").exists()


@pytest.fixture(scope="module")
def own_proxy():
    """A proxy of its own: the module's serve (no key) must not see these messages."""
    in_port, out_port = free_port(), free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("bluesky-0MQ-proxy")), "--in-address", f"127.0.0.1:{in_port}", "--out-address", f"127.0.0.1:{out_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield in_port, out_port
    _stop(process)


def _connect_rejected(publisher, server, reason):
    """Probe through a publisher whose messages ``server`` rejects until one was counted."""
    wait_for_subscriber(publisher, lambda token: server.status()["rejected_reasons"].get(reason, 0) > 0, timeout=60)


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_with_a_key_only_messages_signed_with_it_are_accepted(dirs, own_proxy, tmp_path):
    key, wrong = secrets.token_bytes(32), secrets.token_bytes(32)
    cb = LiveBackgroundSubtraction(directory=tmp_path / "derived")
    server = RemoteServer(f"127.0.0.1:{own_proxy[1]}", cb, run_timeout=60, status_path=tmp_path / "status.json", key=key)
    publishers = []
    server.start(timeout=30)
    try:
        right = make_publisher(f"127.0.0.1:{own_proxy[0]}", key=key)
        bad = make_publisher(f"127.0.0.1:{own_proxy[0]}", key=wrong)
        unsigned = make_publisher(f"127.0.0.1:{own_proxy[0]}")
        publishers += [right, bad, unsigned]
        wait_for_subscriber(right, lambda token: token in server.status()["probes"], timeout=60)
        _connect_rejected(bad, server, "bad signature")
        _connect_rejected(unsigned, server, "unsigned")
        documents, rejected = server.documents, server.status()["rejected_reasons"]
        # A whole run signed with the wrong key: every document rejected, nothing processed.
        bad_uid, bad_docs = _acquire(dirs, bad, 3, seed=71)
        wait_for(
            lambda: server.status()["rejected_reasons"]["bad signature"] >= rejected["bad signature"] + len(bad_docs),
            30, "the wrongly signed run to be rejected",
        )  # fmt: skip
        unsigned_uid, unsigned_docs = _acquire(dirs, unsigned, 2, seed=72)
        wait_for(
            lambda: server.status()["rejected_reasons"]["unsigned"] >= rejected["unsigned"] + len(unsigned_docs),
            30, "the unsigned run to be rejected",
        )  # fmt: skip
        assert server.documents == documents
        # The right key works.
        uid, docs = _acquire(dirs, right, 3, seed=73)
        assert cb.wait(uid, timeout=60)
        entry = wait_for(lambda: next((r for r in server.status()["runs"] if r["raw_uid"] == uid and "exit_status" in r), None), 30, "the derived run")
        assert entry["exit_status"] == "success" and entry["transport"]["missing"] == []
        assert server.documents == documents + len(docs)
        status = server.status()
        assert status["signed"] is True
        assert {bad_uid, unsigned_uid}.isdisjoint(r["raw_uid"] for r in status["runs"])
        wait_for(lambda: read_status(tmp_path / "status.json").get("rejected") == status["rejected"], 30, "the status file")
    finally:
        for publisher in publishers:
            publisher.close()
        server.stop(timeout=60)


def test_key_options(tmp_path, monkeypatch, capsys):
    from live_bgsub.serve import main
    from live_bgsub.wire import load_key

    monkeypatch.delenv(KEY_ENV, raising=False)
    assert load_key() is None
    (tmp_path / "key").write_text("0123456789abcdef0123456789abcdef\n")
    assert load_key(tmp_path / "key") == b"0123456789abcdef0123456789abcdef"
    monkeypatch.setenv(KEY_ENV, "an environment key of enough bytes")
    assert load_key() == b"an environment key of enough bytes"
    assert load_key(tmp_path / "key") == b"0123456789abcdef0123456789abcdef"  # the file wins
    (tmp_path / "short").write_text("short")
    assert main(["--zmq", "127.0.0.1:1", "--key-file", str(tmp_path / "short")]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
    assert main(["--zmq", "127.0.0.1:1", "--key-file", str(tmp_path / "absent")]) == 2
    assert "the 0MQ key" in capsys.readouterr().err


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_the_derived_documents_are_backed_up_by_default(tiled, tmp_path):
    server, _ = tiled
    address = f"127.0.0.1:{free_port()}"
    remote = RemoteServer.from_options(address, tiled=server.uri, api_key=server.api_key, directory=tmp_path / "derived")
    assert remote.publisher.backup_directory == tmp_path / "derived" / "backup"
    remote.close(timeout=30)
    remote = RemoteServer.from_options(address, tiled=server.uri, api_key=server.api_key, directory=tmp_path, backup_directory=tmp_path / "elsewhere")
    assert remote.publisher.backup_directory == tmp_path / "elsewhere"
    remote.close(timeout=30)
    remote = RemoteServer.from_options(address, tiled=server.uri, api_key=server.api_key, directory=tmp_path, backup_directory=False)
    assert remote.publisher.backup_directory is None
    remote.close(timeout=30)


def _serve_process(port, directory, status_path, log):
    command = [
        sys.executable, "-m", "live_bgsub.serve", "--zmq", f"127.0.0.1:{port}", "--directory", str(directory),
        "--run-timeout", "60", "--status-file", str(status_path), "-v",
    ]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow  # serve, a 0MQ proxy and Tiled as subprocesses
def test_serve_killed_mid_run_and_restarted_accounts_for_the_run(dirs, own_proxy, tmp_path):
    # The run is recorded first, then published in two halves around a SIGKILL.
    uid, docs = _acquire(dirs, lambda name, doc: None, 6, seed=81)
    cut = next(i for i, (name, doc) in enumerate(docs) if name == "event" and doc["seq_num"] == 3) + 1
    publisher = make_publisher(f"127.0.0.1:{own_proxy[0]}")
    first = _serve_process(own_proxy[1], tmp_path / "derived", tmp_path / "first.json", tmp_path / "first.log")
    second = None
    try:
        wait_for_subscriber(publisher, lambda token: token in read_status(tmp_path / "first.json").get("probes", []), timeout=120)
        for name, doc in docs[:cut]:
            publisher(name, doc)
        # 0MQ keeps one publisher's order: once a later probe is in, so is the first half.
        wait_for_subscriber(publisher, lambda token: token in read_status(tmp_path / "first.json").get("probes", []), timeout=60)
        assert read_status(tmp_path / "first.json")["open_runs"] == [uid]
        first.kill()
        first.wait(30)
        second = _serve_process(own_proxy[1], tmp_path / "derived", tmp_path / "second.json", tmp_path / "second.log")
        wait_for_subscriber(publisher, lambda token: token in read_status(tmp_path / "second.json").get("probes", []), timeout=120)
        for name, doc in docs[cut:]:
            publisher(name, doc)

        def finished():
            assert second.poll() is None, (tmp_path / "second.log").read_text()[-4000:]
            status = read_status(tmp_path / "second.json")
            return next((r for r in status.get("runs", []) if r["raw_uid"] == uid and "exit_status" in r), None)

        entry = wait_for(finished, 60, "the derived run of the restarted server", tmp_path / "second.log")
        assert entry["exit_status"] == "fail"
        assert "start document never arrived" in entry["reason"] and "missing 6" in entry["reason"]
        assert (entry["transport"]["finished_by"], entry["transport"]["missing"]) == ("start missed", [1, 2, 3, 4, 5, 6])
        # What it saw of the run: frames 4-6 (events and StreamDatums, which do not name
        # their run) and the stop, counted.
        seen = [name for name, _ in docs[cut:]]
        orphans = wait_for(lambda: read_status(tmp_path / "second.json")["orphans"], 30, "the orphans in the status file")
        assert orphans == {"?": seen.count("event") + seen.count("stream_datum"), uid: 1}
    finally:
        publisher.close()
        first.kill()
        if second is not None:
            assert _stop(second) == 0, (tmp_path / "second.log").read_text()[-4000:]
    # Every derived run the restarted server opened has its stop.
    assert read_status(tmp_path / "second.json")["open_runs"] == []
