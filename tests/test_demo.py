"""`live-bgsub demo` and `live-bgsub replay` as a user runs them (subprocesses, real servers)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from live_bgsub.catalog import derived_runs, metrics_table
from live_bgsub.logs import NOISE
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

pytestmark = pytest.mark.slow  # each demo starts Tiled, a detector and the U-Net: 35-100 s

CLI = [sys.executable, "-m", "live_bgsub.cli"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [*CLI, "demo", "--dir", str(directory), "--frames", "6", "--rate", "20"],
        capture_output=True, text=True, check=False, timeout=600,
    )
    return directory, proc


def test_demo_runs_end_to_end(demo):
    directory, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    raw_uid = re.search(r"raw run:\s+(\S+)\s+\(6 events in Tiled\)", out).group(1)
    derived_uid = re.search(r"derived run:\s+(\S+)\s+\(received 6, processed 6, failed 0, skipped 0", out).group(1)
    assert re.search(r"acquisition: [0-9.]+ frames/s", out)
    assert re.search(r"lag per frame: first [0-9]+ ms, p50 [0-9]+ ms, p99 [0-9]+ ms", out)
    # The U-Net by default, compiled before the first frame.
    assert "method model:smoothed-gaussian" in out
    assert re.search(r"model:smoothed-gaussian: loaded and compiled in [0-9.]+ s, before the first frame", out)
    assert not [line for line in proc.stderr.splitlines() if any(p.search(line) for p in NOISE)]  # no TensorFlow start-up
    png = directory / "summary.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((directory / "raw").glob("*.h5"))) == 1 and len(list((directory / "derived").glob("*.h5"))) == 1
    # The data stay: serve the directory again, on the port the read-back snippet names, and read both runs back.
    uri = re.search(r"from_uri\('(http://127\.0\.0\.1:([0-9]+)/api/v1)'", out)
    assert f"`live-bgsub tiled-server {directory} --port {uri.group(2)}`" in out
    key = (directory / "tiled" / "api_key").read_text().strip()
    with EmbeddedTiledServer(directory / "tiled", readable_storage=[directory / "raw", directory / "derived"], api_key=key,
                             port=int(uri.group(2))) as server:
        assert server.uri == uri.group(1)
        catalog = connect(server.uri, api_key=key, create=False)
        assert catalog[raw_uid].metadata["stop"]["num_events"]["primary"] == 6
        [derived] = derived_runs(catalog, raw_uid)
        assert derived.metadata["start"]["uid"] == derived_uid
        assert metrics_table(derived)["raw_seq_num"].tolist() == [1, 2, 3, 4, 5, 6]

        # `live-bgsub replay` of the demo's run gives a second derived run with the same metrics.
        proc = subprocess.run(
            [*CLI, "replay", "--tiled", server.uri, "--api-key", key, "--last", "1", "--query", "plan_name=count",
             "--method", "model:smoothed-gaussian", "--directory", str(directory / "derived"), "--no-progress"],
            capture_output=True, text=True, check=False, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{raw_uid} -> " in proc.stdout and "received 6, processed 6" in proc.stdout
        proc = subprocess.run(
            [*CLI, "replay", "--tiled", server.uri, "--api-key", key, "--fill", derived_uid, "--no-progress"],
            capture_output=True, text=True, check=False, timeout=600,
        )
        assert proc.returncode == 0 and "processed every frame" in proc.stdout, proc.stderr[-3000:]
        live, replayed = derived_runs(catalog, raw_uid)
        a, b = metrics_table(live), metrics_table(replayed)
        assert a["raw_seq_num"].tolist() == b["raw_seq_num"].tolist()
        for k in ("i10", "i11", "i11_i10", "s10_px"):
            # The device path: which frames share a batch depends on the live worker's
            # timing, so float32 rounding may differ (tests/test_tiled_e2e.py).
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_replay_usage_errors():
    proc = subprocess.run([*CLI, "replay", "--tiled", "http://127.0.0.1:9/api/v1"], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and "no runs selected" in proc.stderr
    proc = subprocess.run([*CLI, "demo", "--frames", "0"], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and "frames must be >= 1, got 0" in proc.stderr


def test_demo_through_the_epics_ioc(tmp_path):
    proc = subprocess.run(
        [*CLI, "demo", "--epics", "--dir", str(tmp_path), "--frames", "4", "--rate", "20"],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"from a simulated pilatus-1m IOC \(prefix LBDEMO[0-9A-F]{6}:\) over Channel Access", proc.stdout)
    assert re.search(r"raw run:\s+\S+\s+\(4 events in Tiled\)", proc.stdout)
    assert "received 4, processed 4, failed 0, skipped 0" in proc.stdout
    # The U-Net compiled from the IOC's description and configuration, before the first frame.
    assert re.search(r"model:smoothed-gaussian: loaded and compiled in [0-9.]+ s, before the first frame", proc.stdout)
    assert "caRepeater" not in proc.stderr  # a CA repeater was found or started: libca says nothing
    assert "CA.Client.Exception" not in proc.stderr  # the detector closed its channels before its IOC stopped


def test_sim_ioc_lists_its_pvs():
    proc = subprocess.run([*CLI, "sim-ioc", "--prefix", "XX:", "--list-pvs"], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    for pv in ("XX:cam1:Acquire", "XX:cam1:DetectorState_RBV", "XX:image1:ArrayData", "XX:HDF1:NumCaptured_RBV", "XX:HDF1:FullFileName_RBV"):
        assert pv in names


def test_demo_through_the_0mq_proxy_and_serve(tmp_path):
    proc = subprocess.run(
        [*CLI, "demo", "--remote", "--dir", str(tmp_path), "--frames", "5", "--rate", "20", "--method", "white-top-hat"],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
    assert "RunEngine -> bluesky-0MQ-proxy" in proc.stdout
    assert re.search(r"raw run:\s+\S+\s+\(5 events in Tiled\)", proc.stdout)
    assert "received 5, processed 5, failed 0, skipped 0" in proc.stdout and "exit_status success" in proc.stdout
