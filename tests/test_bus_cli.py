"""`live-bgsub demo --workers N` and `live-bgsub replay --nats` as a user runs them:
real subprocesses, a real NATS JetStream server, a real Tiled server.

The demo runs once (6 frames, 2 workers); the replay test serves the demo's catalog
again and replays its raw run through the ``jetstream`` fixture's server to a worker and
a composer started here. Conditions are polled with a stated deadline, never slept on.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CliProcess, until

from live_bgsub.bus.jetstream import derived_uid, job_key
from live_bgsub.catalog import derived_runs, metrics_table
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

pytestmark = [pytest.mark.service, pytest.mark.slow]  # the demo on the bus and replay through it: 35-80 s each

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "live_bgsub.cli"]
DEADLINE_S = 300.0
FRAMES = 6
# The accounting line names how many frames' metrics were doubtful, where any were (the
# simulated frames' white-top-hat residual makes some doubtful); the counts come first.
DOUBTS = rf"metrics doubtful in \d+ of {FRAMES} processed frames \(events' metrics_doubts\)"


def _needs_nats_server(tmp_path) -> None:
    from live_bgsub.bus.server import EmbeddedJetStream

    try:
        EmbeddedJetStream(tmp_path / "probe").close()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def _until(condition, what: str, *processes, deadline_s: float = DEADLINE_S):
    until(condition, what, *processes, deadline_s=deadline_s)


def _one_line_exit_2(args) -> str:
    proc = subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("live-bgsub: error: "), (args, proc.returncode, proc.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo-workers")
    _needs_nats_server(directory)
    proc = subprocess.run(
        # The classical method: this tests the bus, and each worker would compile the U-Net.
        [*CLI, "demo", "--workers", "2", "--dir", str(directory), "--frames", str(FRAMES), "--rate", "20", "--method", "white-top-hat"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    return directory, proc


@pytest.fixture(scope="module")
def served(demo):
    """The demo's catalog served again (the demo stopped its server)."""
    directory, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = (directory / "tiled" / "api_key").read_text().strip()
    with EmbeddedTiledServer(directory / "tiled", readable_storage=[directory / "raw", directory / "derived"], api_key=key) as server:
        yield directory, server, key, connect(server.uri, api_key=key, create=False)


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(directory.glob("*.log")))


def test_demo_with_two_workers_processes_every_frame(demo, served):
    directory, proc = demo
    out = proc.stdout
    assert "RunEngine -> NATS JetStream -> 2 live-bgsub worker(s) -> live-bgsub compose" in out
    raw_uid = re.search(rf"raw run:\s+(\S+)\s+\({FRAMES} events in Tiled\)", out).group(1)
    derived = re.search(rf"derived run:\s+(\S+)\s+\(received {FRAMES}, processed {FRAMES}, failed 0, skipped 0, unprocessed 0; "
                        rf"({DOUBTS}; )?exit_status success\)", out)  # fmt: skip
    assert derived, out + _logs(directory)
    # Each worker says what it published; together, every frame once.
    published = [int(n) for n in re.findall(r"live-bgsub worker worker-[12]: (\d+) result\(s\) published", out)]
    assert len(published) == 2 and sum(published) == FRAMES, out
    assert (directory / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(directory.glob("jetstream-*")), "the embedded JetStream store is left behind"
    _, _, _, catalog = served
    [run] = derived_runs(catalog, raw_uid)
    assert run.metadata["start"]["uid"] == derived.group(1)
    assert metrics_table(run)["raw_seq_num"].tolist() == list(range(1, FRAMES + 1))
    assert run.metadata["stop"]["exit_status"] == "success"


def test_replay_on_the_bus_gives_a_derived_run_with_every_frame_once(served, jetstream):
    directory, server, key, catalog = served
    url = jetstream.url
    [raw_uid] = [uid for uid in catalog if catalog[uid].metadata["start"].get("plan_name") == "count"]
    select = ["--tiled", server.uri, "--api-key", key, "--query", "plan_name=count", "--last", "1", "--no-progress"]
    replay = [*CLI, "replay", "--nats", url, *select, "--timeout", str(DEADLINE_S)]
    # Nothing answers at the URL: one line, exit 2.
    line = _one_line_exit_2(["replay", "--nats", "nats://127.0.0.1:1", *select])
    assert "cannot connect to NATS at nats://127.0.0.1:1" in line

    logs = directory / "bus-test-logs"
    worker = CliProcess(logs, "worker", "worker", "--nats", url, "--name", "w")
    composer = CliProcess(logs, "compose", "compose", "--nats", url, "--tiled", server.uri, "--directory", str(directory / "derived"),
                       "--backup", str(directory / "backup"), env={"TILED_API_KEY": key})  # fmt: skip
    try:
        # Another processing than the demo's (the composer's default): it travels with the run.
        processing = {"method": "white-top-hat", "params": {}, "downsample": 1}
        expected = derived_uid(job_key(raw_uid, processing), processing)
        proc = subprocess.Popen([*replay, "--downsample", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _until(lambda: proc.poll() is not None, "replay --nats returns", worker, composer)
        out, err = proc.communicate()
        assert proc.returncode == 0, out + err + worker.text() + composer.text()
        line = (rf"{raw_uid} -> {expected}: done, received {FRAMES}, processed {FRAMES}, failed 0, skipped 0, unprocessed 0"
                rf"(; {DOUBTS})? \(success\)")  # fmt: skip
        assert len(out.splitlines()) == 1 and re.fullmatch(line, out.splitlines()[0]), out + err
        run = catalog[expected]
        assert run.metadata["start"]["raw_uid"] == raw_uid and run.metadata["start"]["processing"]["downsample"] == 1
        assert metrics_table(run)["raw_seq_num"].tolist() == list(range(1, FRAMES + 1))
        assert run.metadata["stop"]["exit_status"] == "success"

        # Replayed again with the same processing: done already, nothing published.
        again = subprocess.run([*replay, "--downsample", "1"], cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
        assert again.returncode == 0 and f"{raw_uid} -> {expected}: done (composed before)" in again.stdout, again.stdout + again.stderr
        # With other processing (the composer's default, asked for by name): another job, another derived run.
        default = {"method": "white-top-hat", "params": {}, "downsample": 2}  # WORKING_DOWNSAMPLE
        other = subprocess.run(replay, cwd=REPO, capture_output=True, text=True, check=False, timeout=DEADLINE_S)
        second = derived_uid(job_key(raw_uid, default), default)
        assert other.returncode == 0 and other.stdout.startswith(f"{raw_uid} -> {second}: done, received {FRAMES}, processed {FRAMES}"), other.stdout + other.stderr
    finally:
        for p in (worker, composer):
            p.stop()
    uids = [r.metadata["start"]["uid"] for r in derived_runs(catalog, raw_uid)]
    assert uids.count(expected) == 1 and uids.count(second) == 1 and len(uids) == 3  # the demo's own, and these two


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    tiled = ["--tiled", "http://127.0.0.1:9/api/v1"]
    assert "--nats publishes whole runs" in _one_line_exit_2(["replay", "--nats", "nats://127.0.0.1:1", *tiled, "--fill", "abc"])
    assert "--data-key" in _one_line_exit_2(["replay", "--nats", "nats://127.0.0.1:1", *tiled, "--data-key", "k", "--last", "1"])
    assert "workers must be >= 1, got 0" in _one_line_exit_2(["demo", "--dir", str(tmp_path), "--workers", "0"])
    for other in ("--remote", "--epics"):
        assert "choose one of" in _one_line_exit_2(["demo", "--dir", str(tmp_path), "--workers", "2", other])
    assert not list(tmp_path.iterdir()), "a usage error started something"


def _processes_below(pid: int) -> dict:
    """``{pid: (start time, command line)}`` of every process below ``pid`` (Linux /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry.name), (fields[19], cmdline)))
    found, todo = {}, [pid]
    while todo:
        for child, what in children.get(todo.pop(), []):
            found[child] = what
            todo.append(child)
    return found


def _still_running(pid: int, what) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == what[0] and fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the demo's processes")
def test_ctrl_c_stops_everything_the_demo_started(tmp_path):
    _needs_nats_server(tmp_path)
    directory = tmp_path / "demo"
    with open(tmp_path / "demo.out", "w") as out, open(tmp_path / "demo.err", "w") as err:
        demo = subprocess.Popen([*CLI, "demo", "--workers", "1", "--dir", str(directory), "--frames", "1000", "--rate", "5",
                                 "--method", "white-top-hat"],
                                cwd=REPO, stdout=out, stderr=err)  # fmt: skip
    seen = {}

    def acquiring():  # workers, composer, server and the publisher's process up; the detector writing
        assert demo.poll() is None, (tmp_path / "demo.err").read_text()[-3000:]
        seen.update(_processes_below(demo.pid))
        commands = [cmd for _, cmd in seen.values()]
        up = all(any(part in c for c in commands) for part in (" worker ", " compose ", "nats-server", "live_bgsub.bus.publisher"))
        return up and any((directory / "raw").glob("*.h5"))

    try:
        _until(acquiring, "the demo is acquiring")
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        _until(lambda: demo.poll() is not None, "the demo exits after Ctrl-C")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    err = (tmp_path / "demo.err").read_text()
    assert demo.returncode == 130 and err.strip().splitlines()[-1] == "live-bgsub: error: interrupted", err[-3000:]
    _until(lambda: not any(_still_running(pid, what) for pid, what in seen.items()),
           f"every process the demo started is gone: {seen}", deadline_s=60)  # fmt: skip
    assert not list(directory.glob("jetstream-*")), "the embedded JetStream store is left behind"
