"""The bus on a real NATS JetStream server: a real RunEngine publishing, ``live-bgsub
worker`` and ``live-bgsub compose`` as subprocesses, a real Tiled server. Faults are
injected by PID (SIGKILL a worker or the composer, stop and restart the server) and
the derived run in Tiled is checked frame by frame.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from conftest import MINI, CliProcess, Collector, until

from live_bgsub import wire
from live_bgsub.bus.jetstream import (
    DONE_BUCKET,
    RESULTS_STREAM,
    TASKS_STREAM,
    WORKERS_CONSUMER,
    RunPlan,
    derived_uid,
    job_key,
    run_token,
    subject,
)
from live_bgsub.bus.publisher import BusPublisher
from live_bgsub.catalog import derived_runs, frames, metrics_table
from live_bgsub.sim import SimDetector
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

pytestmark = [pytest.mark.service, pytest.mark.slow]  # a NATS server, workers and a composer per test: 10-40 s each

REPO = Path(__file__).resolve().parents[1]
# Frames of the MINI detector whose centre keeps the equator off the module gap.
CENTER = (97.0, 70.0)
DEADLINE_S = 180.0
PROCESSING = {"method": "white-top-hat", "params": {}, "downsample": 2}  # the composer's default


# ---------------------------------------------------------------------- plumbing


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bus")
    for name in ("raw", "derived", "backup", "tiled", "logs"):
        (root / name).mkdir()
    return root


@pytest.fixture(scope="module")
def tiled(dirs):
    with EmbeddedTiledServer(dirs / "tiled", readable_storage=[dirs / "raw", dirs / "derived"]) as server:
        yield server, connect(server.uri, api_key=server.api_key)


def worker(dirs, url, name, *extra):
    return CliProcess(dirs / "logs", name, "worker", "--nats", url, "--name", name, "--ack-wait", "2", *extra)


def composer(dirs, url, tiled):
    server, _ = tiled
    return CliProcess(
        dirs / "logs", "composer", "compose", "--nats", url, "--tiled", server.uri, "--directory", str(dirs / "derived"),
        "--backup", str(dirs / "backup"), "--result-timeout", "120", env={"TILED_API_KEY": server.api_key},
    )  # fmt: skip


def _js(url, coro_fn):
    """Run ``coro_fn(js)`` against the server and return its value."""

    async def main():
        import nats

        nc = await nats.connect(url, max_reconnect_attempts=1)
        try:
            return await coro_fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def _until(condition, what: str, *processes, deadline_s: float = DEADLINE_S):
    until(condition, what, *processes, deadline_s=deadline_s)


def done(url, raw_uid, processing=None) -> bool:
    async def get(js):
        kv = await js.key_value(DONE_BUCKET)
        try:
            entry = await kv.get(job_key(raw_uid, processing))
        except Exception:  # noqa: BLE001 - KeyNotFoundError
            return False
        return entry is not None

    try:
        return _js(url, get)
    except Exception:  # noqa: BLE001 - the bucket does not exist yet
        return False


def results_of(url, raw_uid) -> list[dict]:
    """Every result message of a run still in the results stream (in stream order)."""

    async def read(js):
        info = await js.stream_info(RESULTS_STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(RESULTS_STREAM, seq)
            except Exception:  # noqa: BLE001 - a deleted message
                continue
            if msg.subject == subject("results", job_key(raw_uid)):
                out.append(wire.decode(msg.data, name="result")[1])
        return out

    return _js(url, read)


def consumer(url):
    return _js(url, lambda js: js.consumer_info(TASKS_STREAM, WORKERS_CONSUMER))


def acquire(url, dirs, num: int, *, seed: int = 5, extra_subscriber=None, publisher=None) -> str:
    det = SimDetector(name="det", directory=dirs / "raw", preset=MINI, n_patterns=4, seed=seed, center=CENTER)
    publisher = publisher or BusPublisher(url)
    RE = RunEngine({})
    RE.subscribe(publisher)
    if extra_subscriber is not None:
        RE.subscribe(extra_subscriber)
    (uid,) = RE(count([det], num=num))
    assert publisher.close(timeout=120), f"documents not acknowledged: {publisher.errors}"
    assert not publisher.errors
    return uid


def derived_run(tiled, raw_uid):
    _, catalog = tiled
    return catalog[derived_uid(job_key(raw_uid), PROCESSING)]


def assert_every_frame_once(run, n: int) -> dict:
    table = metrics_table(run)
    seqs = sorted(int(s) for s in table["raw_seq_num"])
    assert seqs == list(range(1, n + 1)), f"raw frames in the derived run: {seqs}"
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "success", stop["reason"]
    assert stop["reason"].startswith(f"received {n}, processed {n}, failed 0, skipped 0, unprocessed 0")
    return table


# ---------------------------------------------------------------------- pieces


def test_a_plan_survives_the_wire_mask_and_quality_included():
    mask = np.ones(MINI.shape, bool)
    mask[100:120, :] = False
    mask[5, 7] = False
    quality = {"symmetry": 0.1, "mirror": 0.2, "axis_contrast": 3.0, "beam_stop_radius_px": 8.0, "center_spread_px": None,
               "rotation_spread_deg": None, "center_sigma_px": 0.2, "verdict": "doubtful", "reasons": ["why"]}  # fmt: skip
    plan = RunPlan(PROCESSING, (97.5, 70.25), 1.5, MINI.shape, mask, True, quality, {"pixel_size_mm": 0.172, "wavelength_nm": None})
    back = RunPlan.from_bytes(plan.to_bytes())
    assert back.center == plan.center and back.rotation_deg == 1.5 and back.shape == MINI.shape
    np.testing.assert_array_equal(back.mask, mask)
    assert back.quality().verdict == "doubtful" and back.quality().reasons == ("why",)
    assert back.roi == {"pixel_size_mm": 0.172, "wavelength_nm": None}


def test_derived_uids_follow_the_raw_run_and_the_processing():
    job = job_key("raw-1")
    a = derived_uid(job, PROCESSING)
    assert a == derived_uid(job_key("raw-1", None), dict(PROCESSING))
    assert a != derived_uid(job_key("raw-2"), PROCESSING)
    assert a != derived_uid(job, {**PROCESSING, "downsample": 1})
    # The composer's default asked for by name is another job than the default left to it.
    assert job_key("raw-1", PROCESSING) != job and derived_uid(job_key("raw-1", PROCESSING), PROCESSING) != a
    assert run_token("a.b c") != "a.b c" and run_token(a) == a
    assert "." not in job_key("a.b c") and job_key("a.b c") != job_key("a.b d")


def test_a_worker_or_composer_without_a_server_is_one_line_and_exit_2(dirs, tiled):
    server, _ = tiled
    env = dict(os.environ, TILED_API_KEY=server.api_key)
    nowhere = "nats://127.0.0.1:1"
    cases = (
        (["worker", "--nats", nowhere], f"cannot connect to NATS at {nowhere}"),
        (["compose", "--nats", nowhere, "--tiled", server.uri, "--directory", str(dirs / "derived")], f"cannot connect to NATS at {nowhere}"),
        (["compose", "--nats", nowhere, "--tiled", "not-a-uri"], "not-a-uri"),
    )
    for args, said in cases:
        out = subprocess.run([sys.executable, "-m", "live_bgsub.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("live-bgsub ") and said in lines[0], out.stderr


# ---------------------------------------------------------------------- the path and its faults


def test_two_workers_one_killed_mid_run_every_frame_once(jetstream, dirs, tiled):
    url = jetstream.url
    n = 40
    a = worker(dirs, url, "a", "--batch", "4")
    b = worker(dirs, url, "b", "--batch", "4")
    c = composer(dirs, url, tiled)
    try:
        raw_uid = acquire(url, dirs, n)

        def a_mid_run():
            by_a = [r for r in results_of(url, raw_uid) if r["worker"] == "a"]
            return by_a and consumer(url).num_ack_pending > 0

        _until(a_mid_run, "worker a published a result while tasks were in flight", a, b, c)
        a.kill()
        _until(lambda: done(url, raw_uid), "the derived run is complete", b, c)
        info = consumer(url)
    finally:
        for p in (a, b, c):
            p.stop()
    run = derived_run(tiled, raw_uid)
    assert_every_frame_once(run, n)
    # The kill cost something: b got a's unacknowledged tasks again.
    assert info.num_ack_pending == 0 and info.num_pending == 0
    said = [line for line in b.text().splitlines() if "came redelivered" in line]
    assert said and int(said[-1].split("; ")[-1].split()[0]) >= 1, b.text()


def test_composer_killed_and_restarted_writes_the_run_a_fault_free_composer_writes(jetstream, dirs, tiled):
    url = jetstream.url
    n = 80
    w = worker(dirs, url, "w")
    c = composer(dirs, url, tiled)
    try:
        clean = acquire(url, dirs, n, seed=11)
        _until(lambda: done(url, clean), "the fault-free run is complete", w, c)
        c.stop()
        # The same frames again; the composer dies once it has written part of the derived run.
        c = composer(dirs, url, tiled)
        faulty = acquire(url, dirs, n, seed=11)
        _, catalog = tiled
        partial = derived_uid(job_key(faulty), PROCESSING)

        backup = dirs / "backup" / f"{partial}.jsonl"

        def written_in_part():  # the publisher backs each document up just before Tiled gets it
            return backup.exists() and backup.read_text().count('"name": "event"') >= 5

        _until(written_in_part, "part of the derived run is written", w, c)
        c.kill()
        assert not done(url, faulty)
        assert partial in catalog  # Tiled holds the run in part
        c = composer(dirs, url, tiled)
        _until(lambda: done(url, faulty), "the restarted composer completes the run", w, c)
    finally:
        for p in (w, c):
            p.stop()
    ref_run, run = derived_run(tiled, clean), derived_run(tiled, faulty)
    ref, got = assert_every_frame_once(ref_run, n), assert_every_frame_once(run, n)
    order_ref, order = np.argsort(ref["raw_seq_num"]), np.argsort(got["raw_seq_num"])
    for key in ("i10", "i11", "i11_i10", "s10_px", "background_sum"):
        np.testing.assert_array_equal(np.asarray(got[key], float)[order], np.asarray(ref[key], float)[order_ref], err_msg=key)
    assert list(np.asarray(got["metrics_verdict"])[order]) == list(np.asarray(ref["metrics_verdict"])[order_ref])
    np.testing.assert_array_equal(frames(run, "corrected")[order], frames(ref_run, "corrected")[order_ref])
    # One derived run for the raw run, no second partial one.
    assert [k for k in catalog if catalog[k].metadata["start"].get("raw_uid") == faulty] == [partial]


def test_the_server_stopped_and_restarted_mid_run_loses_nothing(jetstream, dirs, tiled):
    url = jetstream.url
    n = 40
    w = worker(dirs, url, "w")
    c = composer(dirs, url, tiled)

    class Outage:
        """On the RunEngine's thread: stop the server at frame 10, start it at frame 25."""

        def __init__(self):
            self.seen = 0

        def __call__(self, name, doc):
            if name == "event":
                self.seen += 1
                if self.seen == 10:
                    jetstream.stop()
                elif self.seen == 25:
                    jetstream.restart()

    try:
        raw_uid = acquire(url, dirs, n, extra_subscriber=Outage())
        _until(lambda: done(url, raw_uid), "the derived run is complete after the outage", w, c)
    finally:
        for p in (w, c):
            p.stop()
    assert_every_frame_once(derived_run(tiled, raw_uid), n)


def test_a_frame_that_cannot_be_read_fails_after_the_bounded_deliveries(jetstream, dirs, tiled):
    """Frames 7 and 8 point past the end of the detector's file: tried, retried, failed."""
    url = jetstream.url
    det = SimDetector(name="det", directory=dirs / "raw", preset=MINI, n_patterns=4, seed=3, center=CENTER)
    RE = RunEngine({})
    docs = Collector()
    RE.subscribe(docs)
    RE(count([det], num=6))
    publisher = BusPublisher(url)
    raw_uid = None
    for name, doc in docs.docs:
        if name == "start":
            raw_uid = doc["uid"]
        if name == "stream_datum" and doc["indices"]["stop"] == 6:
            # The last datum claims two frames more than the file holds.
            doc = dict(doc, indices={"start": doc["indices"]["start"], "stop": 8}, seq_nums={"start": doc["seq_nums"]["start"], "stop": 9})
        if name == "stop":
            doc = dict(doc, num_events={"primary": 8})
        publisher(name, doc)
    assert publisher.close(timeout=60)
    w = worker(dirs, url, "w", "--max-deliver", "3")
    c = composer(dirs, url, tiled)
    try:
        _until(lambda: done(url, raw_uid), "the derived run is complete", w, c)
        info = consumer(url)
    finally:
        for p in (w, c):
            p.stop()
    run = derived_run(tiled, raw_uid)
    assert sorted(metrics_table(run)["raw_seq_num"]) == [1, 2, 3, 4, 5, 6]
    failures = metrics_table(run, "failures")
    assert sorted(failures["raw_seq_num"]) == [7, 8]
    assert all("not written yet" in e and "after 3 deliveries" in e for e in failures["error"]), failures["error"]
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert "received 8, processed 6, failed 2" in run.metadata["stop"]["reason"]
    assert info.num_ack_pending == 0 and info.num_pending == 0
    said = [line for line in w.text().splitlines() if "came redelivered" in line]
    assert said and int(said[-1].split("; ")[-1].split()[0]) == 4, w.text()  # frames 7 and 8, twice each


def test_processing_that_cannot_be_set_up_fails_every_frame_with_its_reason(jetstream, dirs, tiled):
    """A run asks for a model at another working resolution than its card's: the worker
    cannot make the step; every frame ends in the derived run's failures with the one
    line that says why, and the accounting adds up."""
    url = jetstream.url
    processing = {"method": "model:white-top-hat", "params": {}, "downsample": 1}
    w = worker(dirs, url, "w", "--max-deliver", "3")
    c = composer(dirs, url, tiled)
    try:
        raw_uid = acquire(url, dirs, 4, seed=9, publisher=BusPublisher(url, processing=processing))
        _until(lambda: done(url, raw_uid, processing), "the derived run is complete", w, c)
    finally:
        for p in (w, c):
            p.stop()
    _, catalog = tiled
    runs = derived_runs(catalog, raw_uid)
    assert len(runs) == 1, (len(runs), c.text()[-3000:])
    run = runs[0]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert stop["reason"].startswith("received 4, processed 0, failed 4, skipped 0, unprocessed 0"), stop["reason"]
    failures = metrics_table(run, "failures")
    assert sorted(failures["raw_seq_num"]) == [1, 2, 3, 4]
    said = "downsample 1 given, but model:white-top-hat works at downsample 2 (its card)"
    assert all(said in e for e in failures["error"]), list(failures["error"])


def test_the_publishing_process_killed_mid_run_is_replaced_and_loses_nothing(jetstream, dirs, tiled):
    url = jetstream.url
    n = 40
    publisher = BusPublisher(url)
    first = publisher.child_pid
    w = worker(dirs, url, "w")
    c = composer(dirs, url, tiled)

    def kill_at_frame_10(name, doc, seen=[]):  # noqa: B006 - a counter for this one run
        if name == "event":
            seen.append(1)
            if len(seen) == 10:
                os.kill(publisher.child_pid, signal.SIGKILL)

    try:
        raw_uid = acquire(url, dirs, n, extra_subscriber=kill_at_frame_10, publisher=publisher)
        _until(lambda: done(url, raw_uid), "the derived run is complete", w, c)
    finally:
        for p in (w, c):
            p.stop()
    assert publisher.restarts == 1 and first is not None
    assert_every_frame_once(derived_run(tiled, raw_uid), n)


def test_a_publishing_process_killed_after_the_last_document_is_replaced_and_each_message_is_kept_once(jetstream, dirs):
    url = jetstream.url
    docs = Collector()
    RE = RunEngine({})
    RE.subscribe(docs)
    det = SimDetector(name="det", directory=dirs / "raw", preset=MINI, n_patterns=4, seed=7, center=CENTER)
    (raw_uid,) = RE(count([det], num=12))
    publisher = BusPublisher(url)
    for name, doc in docs.docs:
        publisher(name, doc)
    os.kill(publisher.child_pid, signal.SIGKILL)  # whatever it had published: the rest comes from its successor
    assert publisher.close(timeout=120)
    assert publisher.restarts == 1

    async def counts(js):
        from live_bgsub.bus.jetstream import DOCS_STREAM

        out = {}
        for stream, kind in ((DOCS_STREAM, "docs"), (TASKS_STREAM, "tasks")):
            info = await js.stream_info(stream, subjects_filter=subject(kind, job_key(raw_uid)))
            out[kind] = (info.state.subjects or {}).get(subject(kind, job_key(raw_uid)), 0)
        return out

    assert _js(url, counts) == {"docs": len(docs.docs), "tasks": 12}


def test_tasks_of_a_job_without_a_plan_wait_aside_and_other_runs_go_on(jetstream, dirs, tiled):
    """A task whose job never gets a plan (its composer is elsewhere, or gone) must not
    hold up a worker: it waits aside, kept in progress, while other runs are processed."""
    url = jetstream.url
    orphan = "orphan-run_000000000000"

    async def publish_orphan(js):
        from live_bgsub.bus.jetstream import ensure_layout

        await ensure_layout(js)
        task = {"run": "orphan-run", "job": orphan, "seq_num": 1, "path": "/nowhere.h5", "dataset": "/d", "index": 0}
        await js.publish(subject("tasks", orphan), wire.encode("task", task))

    _js(url, publish_orphan)
    w = worker(dirs, url, "w", "--batch", "1")
    c = composer(dirs, url, tiled)
    try:
        raw_uid = acquire(url, dirs, 12)
        _until(lambda: done(url, raw_uid), "the run is complete while the orphan task waits", w, c)
        info = consumer(url)
    finally:
        for p in (w, c):
            p.stop()
    assert_every_frame_once(derived_run(tiled, raw_uid), 12)
    assert info.num_ack_pending == 1  # the orphan, still held in progress by the worker
