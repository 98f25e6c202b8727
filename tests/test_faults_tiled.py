"""Tiled killed in the middle of a live run, restarted, and the runs recovered with our own tools.

Real parts: an embedded Tiled server (subprocess, SQLite) on a fixed port, a RunEngine
counting frames of the simulated detector (HDF5 on disk), the live callback and one
TiledPublisher with a backup. A RunEngine subscriber kills the server (SIGKILL, by
PID) right after raw event KILL_AT, once the derived run has events in Tiled and the
publisher has written everything handed over so far; no sleeps. The run goes on to its
end without Tiled; the server then starts again on the same database and port.

One scenario (the module fixture) plays the whole story once, ``live-bgsub`` commands
included (through ``live_bgsub.cli.main``), and records what happened; each test checks
one part of it:

1. the publisher says what it could not deliver (``undelivered``), and so does the
   derived run's stop;
2. ``replay RAW`` of the raw run, which has no stop in Tiled, finishes with a made-up
   stop and says so;
3. ``recover RAW.jsonl`` completes the raw run; ``replay --fill DERIVED`` then lists the
   frames the derived run (no stop in Tiled) never recorded;
4. ``recover BACKUP_DIR`` completes the derived run (the raw one is skipped): both runs
   hold every row the RunEngine made and their stops, exactly as the same backup
   written into an empty catalog (a fault-free write);
5. ``recover`` again writes nothing; a bad key or no server is one line and exit 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from conftest import MINI

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.cli import main
from live_bgsub.procutil import free_port
from live_bgsub.replay import NO_STOP_REASON
from live_bgsub.sim import SimDetector
from live_bgsub.sinks.tiled import TiledPublisher, read_backup
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

pytestmark = [
    pytest.mark.slow,
    # event-model's RunRouter blames "factory functions" when the writer's first document fails.
    pytest.mark.filterwarnings("ignore:The callback .* when RunRouter passed it:UserWarning"),
]

N_FRAMES = 20
KILL_AT = 5  # raw event after which the server is killed
DERIVED_BEFORE_KILL = 2  # derived events written to Tiled before the kill (at least)
WAIT_S = 120  # bound on waits that only a broken build would reach


def _cli(*argv) -> SimpleNamespace:
    """Run ``live-bgsub ARGV`` in this process; its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def _rows(run, stream="primary") -> dict:
    """Rows Tiled holds per part of a stream: the table's seq_nums and each array's length."""
    node = run[stream].base
    held = {}
    for key in node:
        client = node[key]
        held[key] = sorted(client.read(["seq_num"])["seq_num"].tolist()) if key == "internal" else int(client.shape[0])
    return held


class _Killer:
    """RunEngine subscriber: after raw event ``at``, let the publisher write what it holds, then SIGKILL Tiled."""

    def __init__(self, server, publisher, derived_written: threading.Event, at: int):
        self.server, self.publisher, self.derived_written, self.at = server, publisher, derived_written, at
        self.events = 0
        self.killed = False

    def __call__(self, name, doc):
        if name != "event" or self.killed:
            return
        self.events += 1
        if self.events < self.at:
            return
        assert self.derived_written.wait(WAIT_S), "the derived run never got its first events"
        assert self.publisher.flush(WAIT_S)
        pid = self.server.pid
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: Popen still reaps it
        self.killed = True


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    import tiled.client.utils

    root = tmp_path_factory.mktemp("tiled-kill")
    raw_dir, derived_dir, backup = root / "raw", root / "derived", root / "backup"
    s = SimpleNamespace(root=root, backup=backup)
    server = EmbeddedTiledServer(
        root / "tiled",
        readable_storage=[raw_dir, derived_dir, root / "replay", root / "fill"],
        port=free_port(),
    )
    with pytest.MonkeyPatch.context() as mp, server:
        # One attempt per request: the client's default (10 attempts within 45 s) only makes failing slow.
        mp.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
        catalog = connect(server.uri, api_key=server.api_key)
        s.uri, s.key = server.uri, server.api_key
        tiled_args = ("--tiled", server.uri, "--api-key", server.api_key)

        # -- the live run, Tiled killed after raw event KILL_AT ------------------------
        publisher = TiledPublisher(catalog, backup_directory=backup)
        derived_written = threading.Event()
        derived_events = []

        def watch(name, doc):
            if name == "event":
                derived_events.append(doc["seq_num"])
                if len(derived_events) >= DERIVED_BEFORE_KILL:
                    derived_written.set()

        callback = LiveBackgroundSubtraction([publisher, watch], method="white-top-hat", directory=derived_dir, on_full="block")
        detector = SimDetector(name="det", directory=raw_dir, preset=MINI, n_patterns=2, seed=3)
        killer = _Killer(server, publisher, derived_written, KILL_AT)
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE.subscribe(callback)
        RE.subscribe(killer)
        (s.raw_uid,) = RE(count([detector], num=N_FRAMES))
        assert killer.killed
        assert callback.wait(s.raw_uid, timeout=WAIT_S)
        assert publisher.flush(timeout=WAIT_S)
        s.summary = callback.summary(s.raw_uid)
        s.derived_uid = s.summary.derived_uid
        s.undelivered = {"raw": publisher.undelivered(s.raw_uid), "derived": publisher.undelivered(s.derived_uid)}
        s.errors, s.skipped = list(publisher.errors), dict(publisher.skipped)
        callback.close()
        publisher.close()
        s.backup_docs = {uid: list(read_backup(backup / f"{uid}.jsonl")) for uid in (s.raw_uid, s.derived_uid)}

        # -- Tiled back on the same database and port ----------------------------------
        server.start()
        assert server.uri == s.uri
        catalog = connect(server.uri, api_key=server.api_key)
        s.before = {
            which: (catalog[uid].metadata.get("stop"), _rows(catalog[uid]))
            for which, uid in (("raw", s.raw_uid), ("derived", s.derived_uid))
        }

        # -- replay of the raw run, which has no stop in Tiled ---------------------------
        s.replay = _cli("replay", s.raw_uid, *tiled_args, "--directory", root / "replay" / "derived", "--timeout", WAIT_S, "--no-progress")

        # -- recover the raw run only; fill the derived run, which has no stop -----------
        s.recover_raw = _cli("recover", backup / f"{s.raw_uid}.jsonl", *tiled_args)
        s.fill = _cli("replay", "--fill", s.derived_uid, *tiled_args, "--directory", root / "fill" / "derived", "--timeout", WAIT_S, "--no-progress")

        # -- recover the whole backup, then again; bad key; no server --------------------
        s.recover_all = _cli("recover", backup, *tiled_args)
        s.recover_again = _cli("recover", backup, *tiled_args)
        s.bad_key = _cli("recover", backup, "--tiled", server.uri, "--api-key", "wrongkey")
        s.no_server = _cli("recover", backup, "--tiled", f"http://127.0.0.1:{free_port()}/api/v1", "--api-key", "x")
        # The same backup written into an empty catalog: what a fault-free write gives.
        s.reference = _cli("recover", backup, *tiled_args, "--catalog", "reference")

        s.catalog = catalog
        s.reference_catalog = connect(server.uri, api_key=server.api_key, catalog="reference")
        s.after = {which: catalog[uid] for which, uid in (("raw", s.raw_uid), ("derived", s.derived_uid))}
        yield s


def _line_of(output: str, uid: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith(uid)]
    return line


def test_the_run_went_on_and_the_publisher_says_what_it_did_not_deliver(story):
    assert story.summary.received == N_FRAMES and story.summary.processed == N_FRAMES
    for which, uid in (("raw", story.raw_uid), ("derived", story.derived_uid)):
        # Every document is in the backup; what Tiled missed is counted: the document
        # that failed plus those held back after it (the stop among them).
        failed = sum(e["stage"] == "write" and e["run_uid"] == uid for e in story.errors)
        assert failed == 1
        assert story.undelivered[which] == failed + story.skipped[uid]
        assert 0 < story.undelivered[which] < len(story.backup_docs[uid])
        stop, rows = story.before[which]
        assert stop is None  # a run cut off never got its stop
    # The derived run's stop (composed after asking the publisher) tells the truth.
    name, stop = story.backup_docs[story.derived_uid][-1]
    assert name == "stop" and stop["exit_status"] == "fail" == story.summary.exit_status
    assert "not delivered" in stop["reason"] and str(story.backup) in stop["reason"]
    assert f"raw run {story.undelivered['raw']} document(s)" in stop["reason"]
    assert f"derived run {story.undelivered['derived'] - 1} document(s)" in stop["reason"]  # all but this stop
    raw_rows = story.before["raw"][1]
    assert raw_rows["internal"] == list(range(1, KILL_AT + 1)) and raw_rows["det_image"] == KILL_AT
    assert len(story.before["derived"][1]["internal"]) >= DERIVED_BEFORE_KILL
    # recover writes what was not delivered. The raw run is exact (the RunEngine waits in
    # the killer); a derived document in flight at the kill may have landed before the
    # connection broke: Tiled then holds it, although the publisher counts it as failed.
    assert f"written {story.undelivered['raw']} document(s)" in _line_of(story.recover_raw.out, story.raw_uid)
    written = int(_line_of(story.recover_all.out, story.derived_uid).split("written ")[1].split(" ")[0])
    assert story.undelivered["derived"] - 1 <= written <= story.undelivered["derived"]


def test_replay_of_a_raw_run_without_stop_finishes_and_says_so(story):
    # The derived run of the replay ends "fail", saying the raw run had no stop.
    assert story.replay.rc == 1, story.replay.err
    line = _line_of(story.replay.out, story.raw_uid)
    assert NO_STOP_REASON in line and line.endswith("(fail)")
    replayed_uid = line.split(" -> ")[1].split(":")[0]
    stop = story.catalog[replayed_uid].metadata["stop"]
    assert stop["exit_status"] == "fail" and NO_STOP_REASON in stop["reason"]
    assert f"processed {KILL_AT}" in stop["reason"]  # the frames Tiled held


def test_fill_lists_the_frames_a_derived_run_without_stop_never_recorded(story):
    assert story.recover_raw.rc == 0, story.recover_raw.err
    recorded = set(story.before["derived"][1]["internal"])  # derived rows are one per raw frame, in order
    expected = sorted(set(range(1, N_FRAMES + 1)) - recorded)
    assert expected  # the derived run was cut off before its last frame
    assert f"derived run {story.derived_uid} has no stop document" in story.fill.out
    assert f"filling {len(expected)} frame(s) of raw run {story.raw_uid}: {expected}" in story.fill.out
    assert story.fill.rc == 0, story.fill.err


def test_recover_completes_both_runs_as_a_fault_free_write(story):
    assert story.recover_all.rc == 0, story.recover_all.err
    assert "written 0 document(s)" in _line_of(story.recover_all.out, story.raw_uid)  # recovered before
    assert "(run completed)" in _line_of(story.recover_all.out, story.derived_uid)
    raw, derived = story.after["raw"], story.after["derived"]
    assert _rows(raw) == {"internal": list(range(1, N_FRAMES + 1)), "det_image": N_FRAMES}
    assert _rows(derived) == {"internal": list(range(1, N_FRAMES + 1)), "corrected": story.summary.processed}
    raw_seq_nums = derived["primary"].base["internal"].read(["seq_num", "raw_seq_num"]).sort_values("seq_num")["raw_seq_num"]
    assert raw_seq_nums.tolist() == list(range(1, N_FRAMES + 1))
    assert dict(derived["primary"].read().sizes)["time"] == N_FRAMES  # reads as one dataset again
    for which, uid in (("raw", story.raw_uid), ("derived", story.derived_uid)):
        stop = story.after[which].metadata["stop"]
        assert stop == story.backup_docs[uid][-1][1]  # the backup's own stop
        assert "completed by live-bgsub recover" in story.after[which].metadata["notes"][-1]

    # Equal to the same backup written into an empty catalog.
    assert story.reference.rc == 0 and story.reference.out.count("(new in Tiled)") == 2
    for which, uid in (("raw", story.raw_uid), ("derived", story.derived_uid)):
        mine, ref = story.after[which], story.reference_catalog[uid]
        assert dict(mine.metadata["start"]) == dict(ref.metadata["start"])
        assert dict(mine.metadata["stop"]) == dict(ref.metadata["stop"])
        assert sorted(mine) == sorted(ref)
        for stream in ref:
            a, b = mine[stream].base, ref[stream].base
            assert sorted(a) == sorted(b) and dict(a.metadata) == dict(b.metadata)
            for key in b:
                if key == "internal":
                    assert a[key].read().equals(b[key].read())
                else:  # the same files, frames and chunks registered; the last frame reads the same
                    sources = [c.include_data_sources().data_sources()[0] for c in (a[key], b[key])]
                    assert sources[0].structure == sources[1].structure
                    assert sources[0].parameters == sources[1].parameters
                    assert [x.data_uri for x in sources[0].assets] == [x.data_uri for x in sources[1].assets]
                    np.testing.assert_array_equal(a[key][-1], b[key][-1])


def test_recover_again_writes_nothing(story):
    assert story.recover_again.rc == 0, story.recover_again.err
    lines = story.recover_again.out.splitlines()
    assert len(lines) == 2 and all("written 0 document(s)" in line for line in lines)


def test_recover_without_a_usable_server_is_one_line_and_exit_2(story):
    for result, why in ((story.bad_key, "401"), (story.no_server, "ConnectError")):
        assert result.rc == 2 and result.out == ""
        assert result.err.count("\n") == 1 and why in result.err and "Traceback" not in result.err
    assert story.key not in story.bad_key.err
