"""The IPython profile (profiles/profile_live_bgsub) started headless in a subprocess.

Each test runs ``python -m IPython --profile-dir=... -c CODE`` with stdin closed, a
temporary data directory and configuration, and no Tiled or live_bgsub variables from
the calling environment, so the profile starts its embedded Tiled server. The profile
is copied into ``tmp_path`` first: IPython writes ``history.sqlite``, ``log/``, ``pid/``
and ``security/`` into the profile directory it is given, and the repository's copy
must stay clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "profile_live_bgsub"
TIMEOUT_S = 240
RESULT_PREFIX = "PROFILE_RESULT "

# Runs in the profile's namespace; every name but json comes from the startup file.
SESSION_CODE = f"""
import json
uid, = RE(count([det], 3))
assert callback.wait(uid, timeout=120), "the derived run did not finish"
assert publisher.flush(60), "the Tiled writer did not drain"
summary = callback.summary(uid)
derived_run = catalog[summary.derived_uid]
print({RESULT_PREFIX!r} + json.dumps({{
    "processed": summary.processed,
    "derived_uid": summary.derived_uid,
    "helper_uid": derived(uid).metadata["start"]["uid"],
    "raw_events": catalog[uid].metadata["stop"]["num_events"]["primary"],
    "derived_events": derived_run.metadata["stop"]["num_events"]["primary"],
    "derived_rows": len(derived_run["primary"]["raw_seq_num"].read()),
    "derived_exit_status": derived_run.metadata["stop"]["exit_status"],
    "server_pid": bl.server.pid,
    "tiled_uri": bl.server.uri,
}}), flush=True)
"""


def _run_profile(tmp_path: Path, code: str, **env_overrides: str) -> subprocess.CompletedProcess:
    """Start IPython with a copy of the profile, run ``code``, return the finished process."""
    profile = tmp_path / "profile"
    shutil.copytree(PROFILE, profile, ignore=shutil.ignore_patterns("__pycache__", "history.sqlite*", "log", "pid", "security", "db"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"period_s": 0.0, "preset": "pilatus-1m"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILED_", "LIVE_BGSUB_"))}
    env.update(
        IPYTHONDIR=str(tmp_path / "ipython"),
        LIVE_BGSUB_CONFIG=str(config),
        LIVE_BGSUB_DIRECTORY=str(tmp_path / "data"),
        MPLBACKEND="Agg",
        **env_overrides,
    )
    command = [
        sys.executable, "-m", "IPython",
        f"--profile-dir={profile}",
        "--no-banner", "--simple-prompt", "--colors=NoColor",
        "--HistoryManager.enabled=False",
        "-c", code,
    ]  # fmt: skip
    try:
        return subprocess.run(
            command,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"IPython did not exit within {TIMEOUT_S} s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


def _accepts_connections(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return True
    except OSError:
        return False


def _live_processes_mentioning(text: str) -> list[int]:
    """Pids of non-zombie processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _server_uris(log: Path) -> list[str]:
    """URIs the embedded server was started on, from the banner lines of its log."""
    return re.findall(r"starting tiled on (\S+) ====", log.read_text())


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.mark.slow
def test_profile_runs_count_and_publishes_raw_and_derived_runs(tmp_path):
    proc = _run_profile(tmp_path, SESSION_CODE)
    assert proc.returncode == 0, _output(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, _output(proc)
    result = json.loads(lines[0][len(RESULT_PREFIX) :])

    assert result["processed"] == 3
    assert result["raw_events"] == 3
    assert result["derived_events"] == result["derived_rows"] == 3
    assert result["derived_exit_status"] == "success"
    assert result["helper_uid"] == result["derived_uid"]
    # The banner names the server and the detector; the exit hook ran to the end.
    assert result["tiled_uri"] in proc.stdout
    assert "simulated pilatus-1m" in proc.stdout
    assert "live_bgsub: closed" in proc.stderr, _output(proc)
    # The embedded server went with the session (stopped and reaped by bl.close()).
    assert not _accepts_connections(result["tiled_uri"])
    if Path("/proc").is_dir():
        assert result["server_pid"] not in _live_processes_mentioning(str(tmp_path / "data" / "tiled"))
        assert not (Path("/proc") / str(result["server_pid"])).exists()


@pytest.mark.slow
def test_an_unreachable_epics_prefix_reports_and_exits(tmp_path):
    proc = _run_profile(tmp_path, "print('SESSION CODE RAN')", LIVE_BGSUB_EPICS_PREFIX="LBNOIOC:")
    assert proc.returncode == 1, _output(proc)
    assert "SESSION CODE RAN" not in proc.stdout, "the session started without a beamline"
    assert "the beamline did not start" in proc.stderr
    assert "EpicsConnectionError" in proc.stderr and "'LBNOIOC:'" in proc.stderr, _output(proc)
    # The embedded server had started before the detector failed, and was stopped.
    uris = _server_uris(tmp_path / "data" / "tiled" / "server.log")
    assert uris, "the embedded server never started, so this test proves nothing about stopping it"
    assert not any(_accepts_connections(uri) for uri in uris)
    if Path("/proc").is_dir():
        assert _live_processes_mentioning(str(tmp_path / "data" / "tiled")) == []


@pytest.mark.slow
def test_profile_with_an_epics_prefix_counts_through_the_ioc(tmp_path):
    from live_bgsub.sim.ioc import run_ioc_subprocess

    prefix = f"LBPROF{os.getpid()}:"
    code = (
        "uid, = RE(count([det], 3))\n"
        "assert callback.wait(uid, timeout=120)\n"
        "print('RESULT', type(det).__name__, callback.summary(uid).processed)\n"
    )
    with run_ioc_subprocess(prefix, acquire_time=0.0, acquire_period=0.0):
        proc = _run_profile(tmp_path, code, LIVE_BGSUB_EPICS_PREFIX=prefix)
    assert proc.returncode == 0, _output(proc)
    assert "RESULT EpicsPilatus 3" in proc.stdout, _output(proc)
    assert f"EPICS, prefix {prefix!r}" in proc.stdout
