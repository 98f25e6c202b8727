"""Tiled as the store: embedded server, run catalog, and the single-writer publisher.

Real servers only: an EmbeddedTiledServer on SQLite for the module, and one backed by
a fresh PostgreSQL database for the ``service`` tests. Runs are composed with
event_model (no RunEngine needed).
"""

from __future__ import annotations

import os
import threading
import time

import h5py
import numpy as np
import pytest
from event_model import compose_run

from live_bgsub.sinks.tiled import TiledPublisher, read_backup
from live_bgsub.tiled_server import (
    EmbeddedTiledServer,
    TiledServerError,
    connect,
    temporary_postgres_database,
)

ROWS, COLS = 64, 80
N_FRAMES = 200  # Frames in the shared HDF5 file.
N_CONCURRENT = 100  # Events per run in the concurrency tests (~27 ms per request on 2 cores).
DATASET = "/entry/data/data"
FLUSH_TIMEOUT = 120
#: Admin connection used to create (and drop) a fresh database for the PostgreSQL tests.
POSTGRES_ADMIN_DSN = os.environ.get("LIVE_BGSUB_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hdf5_frames(tmp_path_factory):
    """A real HDF5 file of int32 frames, (N_FRAMES, ROWS, COLS), under its own directory."""
    directory = tmp_path_factory.mktemp("frames")
    path = directory / "frames.h5"
    frames = (np.arange(N_FRAMES * ROWS * COLS, dtype=np.int64) * 7919 % 65521).astype(np.int32)
    frames = frames.reshape(N_FRAMES, ROWS, COLS)
    with h5py.File(path, "w") as file:
        file.create_dataset(DATASET, data=frames, chunks=(1, ROWS, COLS))
    return path, frames


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory, hdf5_frames):
    path, _ = hdf5_frames
    with EmbeddedTiledServer(tmp_path_factory.mktemp("tiled-sqlite"), readable_storage=[path.parent]) as server:
        yield server


@pytest.fixture(scope="module")
def sqlite_catalog(sqlite_server):
    return connect(sqlite_server.uri, api_key=sqlite_server.api_key)


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory, hdf5_frames):
    """An EmbeddedTiledServer whose catalog and table store live in a fresh PostgreSQL database."""
    path, _ = hdf5_frames
    try:
        database = temporary_postgres_database(POSTGRES_ADMIN_DSN)
        uris = database.__enter__()
    except (ConnectionError, ImportError) as error:
        pytest.skip(f"PostgreSQL-backed Tiled needs a reachable PostgreSQL (LIVE_BGSUB_POSTGRES_DSN): {error}")
    server = EmbeddedTiledServer(
        tmp_path_factory.mktemp("tiled-postgres"),
        readable_storage=[path.parent],
        catalog_uri=uris["catalog_uri"],
        table_uri=uris["table_uri"],
    )
    try:
        with server:
            yield server
    finally:
        database.__exit__(None, None, None)


@pytest.fixture(scope="module")
def postgres_catalog(postgres_server):
    return connect(postgres_server.uri, api_key=postgres_server.api_key)


# -- document factories -------------------------------------------------------------


def compose_scalar_run(n_events, *, label, with_array=True):
    """Documents of a run with scalars (and a small inline array per event)."""
    bundle = compose_run(metadata={"purpose": label, "plan_name": "count"})
    data_keys = {
        "intensity": {"source": "test", "dtype": "number", "shape": [], "dtype_numpy": "<f8"},
        "frame_index": {"source": "test", "dtype": "integer", "shape": [], "dtype_numpy": "<i8"},
    }
    if with_array:
        data_keys["profile"] = {"source": "test", "dtype": "array", "shape": [4], "dtype_numpy": "<f8"}
    descriptor = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    docs = [("start", bundle.start_doc), ("descriptor", descriptor.descriptor_doc)]
    for i in range(n_events):
        data = {"intensity": 0.5 * i + 1.0, "frame_index": i}
        if with_array:
            data["profile"] = [float(i), i + 0.25, i + 0.5, i + 0.75]
        docs.append(("event", descriptor.compose_event(data=data, timestamps={k: time.time() for k in data})))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def compose_hdf5_run(h5_path, n_events, *, label):
    """Documents of a run whose (ROWS, COLS) frames live in ``h5_path`` (StreamResource/StreamDatum)."""
    bundle = compose_run(metadata={"purpose": label, "plan_name": "count"})
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "det_image": {
                "source": "test",
                "dtype": "array",
                "shape": [ROWS, COLS],
                "dtype_numpy": "<i4",
                "external": "STREAM:",
            },
            "det_sum": {"source": "test", "dtype": "number", "shape": [], "dtype_numpy": "<f8"},
        },
    )
    resource = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=h5_path.as_uri(),
        data_key="det_image",
        parameters={"dataset": DATASET, "chunk_shape": [1, ROWS, COLS]},
    )
    docs = [
        ("start", bundle.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("stream_resource", resource.stream_resource_doc),
    ]
    for i in range(n_events):
        # As a live run sends it: the datum before the event that it completes.
        datum = resource.compose_stream_datum(
            indices={"start": i, "stop": i + 1},
            seq_nums={"start": i + 1, "stop": i + 2},
            descriptor=descriptor.descriptor_doc,
        )
        docs.append(("stream_datum", datum))
        event = descriptor.compose_event(data={"det_sum": float(i)}, timestamps={"det_sum": time.time()})
        docs.append(("event", event))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def uid_of(docs):
    return docs[0][1]["uid"]


def feed(publisher, docs):
    for name, doc in docs:
        publisher(name, doc)


def event_order(stream, n_events):
    """Row order that sorts a stream's table columns by seq_num.

    Tiled 0.2.20 reads a PostgreSQL table store without ORDER BY (SQLite and DuckDB
    get ``ORDER BY rowid``): after concurrent appends rows come back out of order.
    Readers must sort by seq_num.
    """
    seq_num = stream["seq_num"].read()
    assert sorted(seq_num.tolist()) == list(range(1, n_events + 1))
    return np.argsort(seq_num, kind="stable")


def assert_scalar_run(catalog, docs, *, with_array=True):
    n_events = sum(name == "event" for name, _ in docs)
    run = catalog[uid_of(docs)]
    assert run.metadata["start"]["purpose"] == docs[0][1]["purpose"]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata["stop"]["num_events"] == {"primary": n_events}
    stream = run["primary"]
    order = event_order(stream, n_events)
    np.testing.assert_array_equal(stream["intensity"].read()[order], 0.5 * np.arange(n_events) + 1.0)
    np.testing.assert_array_equal(stream["frame_index"].read()[order], np.arange(n_events))
    if with_array:
        expected = np.arange(n_events)[:, None] + np.array([0.0, 0.25, 0.5, 0.75])
        np.testing.assert_array_equal(stream["profile"].read(), expected)  # Array nodes are in seq_num order.


def assert_hdf5_run(catalog, docs, frames):
    n_events = sum(name == "event" for name, _ in docs)
    run = catalog[uid_of(docs)]
    assert run.metadata["stop"]["exit_status"] == "success"
    stream = run["primary"]
    order = event_order(stream, n_events)
    np.testing.assert_array_equal(stream["det_sum"].read()[order], np.arange(n_events, dtype=float))
    images = stream["det_image"].read()
    assert images.dtype == np.int32 and images.shape == (n_events, ROWS, COLS)
    np.testing.assert_array_equal(images, frames[:n_events])


# -- embedded server and catalog ----------------------------------------------------


@pytest.mark.slow  # a Tiled server
def test_server_attributes_and_config(sqlite_server, hdf5_frames):
    server = sqlite_server
    assert server.running and server.uri.startswith("http://127.0.0.1:") and server.uri.endswith("/api/v1")
    assert server.api_key not in server.uri
    config = server.config_path.read_text()
    assert "CatalogOfBlueskyRuns" not in config  # The catalog node is made by connect().
    assert "application/json-seq" in config and "json_seq_exporter" in config
    assert str(hdf5_frames[0].parent) in config and "tables.sqlite" in config
    assert oct(server.config_path.stat().st_mode & 0o777) == "0o600"
    assert server.api_key not in server.log_path.read_text()  # No key in the banner.


def test_startup_timeout_kills_the_server_and_reports_the_log(tmp_path):
    server = EmbeddedTiledServer(tmp_path, startup_timeout=0.3)  # Far too short to import tiled.
    with pytest.raises(TiledServerError, match=r"did not answer .*/healthz within 0.3 s") as info:
        server.start()
    assert f"Tail of {server.log_path}" in str(info.value)
    assert not server.running and server.pid is None


def test_server_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alphanumeric.*'not a key!'"):
        EmbeddedTiledServer("unused", api_key="not a key!")
    with pytest.raises(ValueError, match=r"table_uri must be a URI with a scheme in .*'mysql://u:\*\*\*@db/x'"):
        EmbeddedTiledServer("unused", table_uri="mysql://u:secret@db/x")
    with pytest.raises(TypeError, match="list of directories"):
        EmbeddedTiledServer("unused", readable_storage="/data")


def test_unreachable_postgres_is_a_clear_connection_error():
    dsn = "postgresql://postgres:hunter2@127.0.0.1:1/postgres"
    expected = r"not reachable at postgresql://postgres:\*\*\*@127.0.0.1:1"
    with pytest.raises(ConnectionError, match=expected), temporary_postgres_database(dsn):
        pass


@pytest.mark.slow  # a Tiled server
def test_connect_refuses_a_container_without_the_catalog_spec(sqlite_server):
    from tiled.client import from_uri

    root = from_uri(sqlite_server.uri, api_key=sqlite_server.api_key)
    root.create_container(key="plain", metadata={"note": "not a run catalog"})
    with pytest.raises(ValueError, match=r"'plain'.*CatalogOfBlueskyRuns.*found specs: none"):
        connect(sqlite_server.uri, api_key=sqlite_server.api_key, catalog="plain")
    with pytest.raises(KeyError, match="missing"):
        connect(sqlite_server.uri, api_key=sqlite_server.api_key, catalog="missing", create=False)


@pytest.mark.slow  # a Tiled server
def test_connect_takes_the_key_from_the_environment(sqlite_server, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", sqlite_server.api_key)
    catalog = connect(sqlite_server.uri, catalog="from-env")
    assert [(s.name, s.version) for s in catalog.specs] == [("CatalogOfBlueskyRuns", "3.0")]
    assert type(catalog).__name__ == "CatalogOfBlueskyRuns"


# -- writing and reading back -------------------------------------------------------


@pytest.mark.slow  # a Tiled server
def test_publisher_writes_inline_and_hdf5_runs(sqlite_catalog, hdf5_frames, tmp_path):
    h5_path, frames = hdf5_frames
    scalar_docs = compose_scalar_run(6, label="inline")
    hdf5_docs = compose_hdf5_run(h5_path, 5, label="hdf5")
    with TiledPublisher(sqlite_catalog, backup_directory=tmp_path) as publisher:
        feed(publisher, scalar_docs)
        feed(publisher, hdf5_docs)
        assert publisher.flush(timeout=FLUSH_TIMEOUT)
        assert publisher.pending == 0
        assert publisher.errors == []
    assert_scalar_run(sqlite_catalog, scalar_docs)
    assert_hdf5_run(sqlite_catalog, hdf5_docs, frames)
    run = sqlite_catalog[uid_of(scalar_docs)]
    assert type(run).__name__ == "BlueskyRunV3"
    assert run.metadata["start"]["uid"] == uid_of(scalar_docs)
    # Every document is also in the run's JSON-lines backup, in order.
    backup = list(read_backup(tmp_path / f"{uid_of(hdf5_docs)}.jsonl"))
    assert [name for name, _ in backup] == [name for name, _ in hdf5_docs]


@pytest.mark.slow  # a Tiled server
def test_documents_replay_order(sqlite_server, sqlite_catalog, hdf5_frames):
    """What ``run.documents()`` (the json-seq exporter) gives back.

    Observed with tiled 0.2.20 / bluesky-tiled-plugins 2.0.12: start, descriptor, all
    events, then ONE stream_resource and ONE stream_datum covering every frame (new
    uids), then stop. A live run sends a datum before each event, so a consumer of
    replayed runs must hold events until their datum arrives.
    """
    h5_path, _ = hdf5_frames
    docs = compose_hdf5_run(h5_path, 4, label="replay")
    with TiledPublisher.from_uri(sqlite_server.uri, api_key=sqlite_server.api_key) as publisher:
        feed(publisher, docs)
    replay = list(sqlite_catalog[uid_of(docs)].documents())
    names = [name for name, _ in replay]
    assert names == ["start", "descriptor", *["event"] * 4, "stream_resource", "stream_datum", "stop"]
    by_name = dict(replay)
    assert by_name["start"]["uid"] == uid_of(docs)
    assert by_name["stream_datum"]["indices"] == {"start": 0, "stop": 4}
    assert by_name["stream_datum"]["seq_nums"] == {"start": 1, "stop": 5}
    assert by_name["stream_resource"]["uri"] == h5_path.as_uri()
    assert by_name["stream_resource"]["parameters"]["dataset"] == DATASET
    assert [doc["data"]["det_sum"] for name, doc in replay if name == "event"] == [0.0, 1.0, 2.0, 3.0]


# -- concurrency --------------------------------------------------------------------


def feed_concurrently(targets_and_docs):
    """Feed each document list from its own thread, all starting together, as fast as possible."""
    barrier = threading.Barrier(len(targets_and_docs))
    failures = []

    def work(target, docs):
        try:
            barrier.wait(timeout=30)
            feed(target, docs)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=pair) for pair in targets_and_docs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=FLUSH_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def check_raw_and_derived_through_one_publisher(catalog, server, hdf5_frames):
    h5_path, frames = hdf5_frames
    raw = compose_hdf5_run(h5_path, N_CONCURRENT, label="raw")
    derived = compose_scalar_run(N_CONCURRENT, label="derived", with_array=False)
    with TiledPublisher(catalog) as publisher:
        feed_concurrently([(publisher, raw), (publisher, derived)])
        assert publisher.flush(timeout=FLUSH_TIMEOUT)
        assert publisher.errors == []
    assert_hdf5_run(catalog, raw, frames)
    assert_scalar_run(catalog, derived, with_array=False)
    assert "database is locked" not in server.log_path.read_text()


@pytest.mark.slow  # a Tiled server
def test_raw_and_derived_runs_at_once_sqlite(sqlite_catalog, sqlite_server, hdf5_frames):
    check_raw_and_derived_through_one_publisher(sqlite_catalog, sqlite_server, hdf5_frames)


@pytest.mark.service
@pytest.mark.slow  # a Tiled server
def test_raw_and_derived_runs_at_once_postgres(postgres_catalog, postgres_server, hdf5_frames):
    check_raw_and_derived_through_one_publisher(postgres_catalog, postgres_server, hdf5_frames)


@pytest.mark.service
@pytest.mark.slow  # a Tiled server
def test_two_independent_writers_at_once_postgres(postgres_server, hdf5_frames):
    """The production configuration with PostgreSQL: each writer its own TiledWriter."""
    from bluesky_tiled_plugins import TiledWriter

    h5_path, frames = hdf5_frames
    raw = compose_hdf5_run(h5_path, N_CONCURRENT, label="raw-independent")
    derived = compose_scalar_run(N_CONCURRENT, label="derived-independent", with_array=False)
    writers = [
        TiledWriter(connect(postgres_server.uri, api_key=postgres_server.api_key), batch_size=1, max_array_size=0)
        for _ in range(2)
    ]
    feed_concurrently([(writers[0], raw), (writers[1], derived)])
    catalog = connect(postgres_server.uri, api_key=postgres_server.api_key)
    assert_hdf5_run(catalog, raw, frames)
    assert_scalar_run(catalog, derived, with_array=False)


# -- failures -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The callback .* when RunRouter passed it:UserWarning")
@pytest.mark.slow  # a Tiled server
def test_stopped_server_records_errors_and_backup_keeps_everything(
    tmp_path, hdf5_frames, sqlite_catalog, monkeypatch
):
    import tiled.client.utils

    # One attempt per request: the client's default (10 attempts within 45 s)
    # would only make the test slow.
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    h5_path, frames = hdf5_frames
    server = EmbeddedTiledServer(tmp_path / "doomed", readable_storage=[h5_path.parent]).start()
    publisher = TiledPublisher(connect(server.uri, api_key=server.api_key), backup_directory=tmp_path / "backup")
    server.stop()
    runs = [compose_scalar_run(5, label="lost-1"), compose_hdf5_run(h5_path, 3, label="lost-2")]
    for docs in runs:
        feed(publisher, docs)  # Must not raise.
    publisher("event", {"descriptor": "no-such-descriptor"})  # Garbage must not raise either.
    assert publisher.close(timeout=FLUSH_TIMEOUT)
    publisher("start", {"uid": "after-close"})  # Nor after close.

    failed = {(error["run_uid"], error["name"], error["stage"]) for error in publisher.errors}
    assert (uid_of(runs[0]), "start", "write") in failed
    assert (uid_of(runs[1]), "start", "write") in failed
    assert (None, "start", "enqueue") in failed
    assert publisher.skipped == {uid_of(docs): len(docs) - 1 for docs in runs}
    assert all(error["error"] for error in publisher.errors)
    for docs in runs:
        backup = list(read_backup(tmp_path / "backup" / f"{uid_of(docs)}.jsonl"))
        assert backup == [(name, doc) for name, doc in docs]
    assert (tmp_path / "backup" / "unassigned.jsonl").exists()

    # Recovery: replay the backup into a live server.
    monkeypatch.undo()
    with TiledPublisher(sqlite_catalog) as replay:
        for docs in runs:
            feed(replay, read_backup(tmp_path / "backup" / f"{uid_of(docs)}.jsonl"))
        assert replay.flush(timeout=FLUSH_TIMEOUT) and replay.errors == []
    assert_scalar_run(sqlite_catalog, runs[0])
    assert_hdf5_run(sqlite_catalog, runs[1], frames)


@pytest.mark.slow  # a Tiled server
def test_publisher_rejects_bad_arguments(sqlite_catalog):
    with pytest.raises(ValueError, match="batch_size must be a positive integer.*got 0"):
        TiledPublisher(sqlite_catalog, batch_size=0)


class _RefusingCatalog:
    """Stands in for the catalog of a server that refuses every connection."""

    def include_data_sources(self):
        return self

    def create_container(self, *args, **kwargs):
        import httpx

        raise httpx.ConnectError("[Errno 111] Connection refused")


@pytest.mark.filterwarnings("ignore:The callback .* when RunRouter passed it:UserWarning")
def test_undelivered_counts_per_run_and_the_records_stay_bounded(monkeypatch):
    import live_bgsub.sinks.tiled as sink

    monkeypatch.setattr(sink, "KEEP_ERRORS", 3)
    monkeypatch.setattr(sink, "KEEP_RUNS", 2)
    runs = [compose_scalar_run(2, label=f"refused-{i}", with_array=False) for i in range(4)]
    publisher = TiledPublisher(_RefusingCatalog())
    for docs in runs:
        feed(publisher, docs)
    assert publisher.flush(timeout=FLUSH_TIMEOUT)
    # Each run: the start fails, the other 4 documents are held back; 5 undelivered.
    # Only the 2 most recent runs are remembered; an unknown run has lost nothing.
    assert [publisher.undelivered(uid_of(docs)) for docs in runs] == [0, 0, 5, 5]
    assert publisher.undelivered("never-seen") == 0
    assert publisher.skipped == {uid_of(runs[2]): 4, uid_of(runs[3]): 4}
    assert publisher.error_count == 4 and len(publisher.errors) == 3
    assert [e["run_uid"] for e in publisher.errors] == [uid_of(docs) for docs in runs[1:]]
    assert "errors=4" in repr(publisher)

    # Asked from another thread while the writer works: the counts only grow.
    more = compose_scalar_run(50, label="refused-more", with_array=False)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(publisher.undelivered(uid_of(more)) for _ in range(200)))
    reader.start()
    feed(publisher, more)
    reader.join(timeout=FLUSH_TIMEOUT)
    assert publisher.flush(timeout=FLUSH_TIMEOUT)
    assert seen == sorted(seen) and publisher.undelivered(uid_of(more)) == len(more)

    # After close, a document that names its run is refused and counted for that run.
    assert publisher.close(timeout=FLUSH_TIMEOUT)
    publisher("stop", {"uid": "late-stop", "run_start": uid_of(more), "time": 0.0, "exit_status": "success"})
    assert publisher.undelivered(uid_of(more)) == len(more) + 1
    assert publisher.errors[-1]["stage"] == "enqueue" and publisher.error_count == 6


def write_backup(path, docs):
    """A JSON-lines backup as TiledPublisher writes it."""
    import json

    with open(path, "w") as file:
        for name, doc in docs:
            file.write(json.dumps({"name": name, "doc": doc}) + "\n")
    return path


@pytest.mark.slow  # a Tiled server
def test_recover_completes_runs_written_in_part(sqlite_catalog, hdf5_frames, tmp_path):
    """Runs cut off mid-way (no stop in Tiled) are completed from their backup, once."""
    from live_bgsub.recover import recover, recover_run

    h5_path, frames = hdf5_frames
    inline = compose_scalar_run(7, label="cut-inline")  # table rows + an inline array node
    hdf5 = compose_hdf5_run(h5_path, 6, label="cut-hdf5")  # table rows + external frames
    whole = compose_scalar_run(3, label="never-written", with_array=False)
    with TiledPublisher(sqlite_catalog) as publisher:
        feed(publisher, inline[:5])  # start, descriptor, 3 events
        feed(publisher, hdf5[:8])  # ..., the 3rd datum but not its event: more frames than rows
        assert publisher.flush(timeout=FLUSH_TIMEOUT) and publisher.errors == []
    assert "stop" not in sqlite_catalog[uid_of(inline)].metadata
    backup = tmp_path / "backup"
    backup.mkdir()
    for docs in (inline, hdf5, whole):
        write_backup(backup / f"{uid_of(docs)}.jsonl", docs)

    results = {r.uid: r for r in recover(sqlite_catalog, backup)}
    assert (results[uid_of(inline)].state, results[uid_of(inline)].written, results[uid_of(inline)].held) == ("completed", 5, 5)
    assert (results[uid_of(hdf5)].state, results[uid_of(hdf5)].written, results[uid_of(hdf5)].held) == ("completed", 8, 8)
    assert (results[uid_of(whole)].state, results[uid_of(whole)].written) == ("written", len(whole))
    assert_scalar_run(sqlite_catalog, inline)
    assert_hdf5_run(sqlite_catalog, hdf5, frames)
    assert_scalar_run(sqlite_catalog, whole, with_array=False)
    assert "completed by live-bgsub recover" in sqlite_catalog[uid_of(hdf5)].metadata["notes"][-1]

    again = recover_run(sqlite_catalog, backup / f"{uid_of(hdf5)}.jsonl")
    assert (again.state, again.written, again.held) == ("complete", 0, len(hdf5))
    assert "written 0 document(s), skipped 16 already held" in again.line()


@pytest.mark.slow  # a Tiled server
def test_recover_close_open_gives_a_run_cut_off_in_its_backup_a_failing_stop(sqlite_server, sqlite_catalog, tmp_path):
    """A writer killed mid-run (a serve) leaves a backup without a stop: `recover
    --close-open` completes the run and closes it with a stop that says so; again: nothing."""
    from live_bgsub.cli import main
    from live_bgsub.recover import CLOSED_REASON

    docs = compose_scalar_run(6, label="writer-killed")
    cut = [d for d in docs if d[0] != "stop"]
    backup = tmp_path / "backup"
    backup.mkdir()
    write_backup(backup / f"{uid_of(docs)}.jsonl", cut)
    argv = ["recover", str(backup), "--tiled", sqlite_server.uri, "--api-key", sqlite_server.api_key]
    assert main(argv) == 1  # without --close-open the run stays open: not complete
    assert "stop" not in sqlite_catalog[uid_of(docs)].metadata
    assert main([*argv, "--close-open"]) == 0
    stop = sqlite_catalog[uid_of(docs)].metadata["stop"]
    assert (stop["exit_status"], stop["reason"]) == ("fail", CLOSED_REASON)
    assert stop["num_events"] == {"primary": 6}
    assert sqlite_catalog[uid_of(docs)]["primary"].read()["frame_index"].values.tolist() == list(range(6))
    assert main([*argv, "--close-open"]) == 0
    assert sqlite_catalog[uid_of(docs)].metadata["stop"]["uid"] == stop["uid"]


@pytest.mark.parametrize("command", ["replay", "serve", "recover"])
@pytest.mark.slow  # a Tiled server
def test_a_bad_server_key_uri_or_catalog_is_one_line_and_exit_2(sqlite_server, tmp_path, capsys, command):
    """No server, not a URI, a refused API key, a catalog path with '..': one line
    naming the value, exit 2, no traceback (and no container made for '../runs')."""
    from live_bgsub.cli import main

    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "0000aaaa.jsonl").write_text('{"name": "start", "doc": {"uid": "0000aaaa", "time": 0}}\n')
    cases = [
        (["--tiled", "http://127.0.0.1:9"], "cannot be reached"),
        (["--tiled", "not-a-uri"], "got 'not-a-uri'"),
        (["--tiled", sqlite_server.uri, "--api-key", "wrongkey"], "refused the API key (HTTP 401"),
        (["--tiled", sqlite_server.uri, "--api-key", sqlite_server.api_key, "--catalog", "../runs"], "catalog path '../runs'"),
    ]
    head = {
        "replay": ["replay", "abcd", "--directory", str(tmp_path / "derived")],
        "serve": ["serve", "--zmq", "127.0.0.1:9", "--directory", str(tmp_path / "derived")],
        "recover": ["recover", str(tmp_path / "backup")],
    }[command]
    from tiled.client import from_uri

    root = from_uri(sqlite_server.uri, api_key=sqlite_server.api_key)
    before = sorted(root)
    for extra, said in cases:
        assert main([*head, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(root) == before  # nothing was created for the bad catalog path
