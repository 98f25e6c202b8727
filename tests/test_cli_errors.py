"""Usage and connection errors of every command: one line on stderr, exit status 2.

Each case runs the real command in its own process (``python -m live_bgsub.cli``,
``python -m training.fit`` ...), so an import-time message or a traceback would show;
the cases that need a server get a real embedded Tiled server. The last test makes a
raw run and its derived run as the demo does (RunEngine, simulated detector, live
callback, Tiled) and checks that ``replay --last 1`` takes the raw run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bluesky import RunEngine
from bluesky.plans import count
from conftest import MINI

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.catalog import derived_runs
from live_bgsub.replay import DERIVED_PLAN_NAME, select_runs
from live_bgsub.sim import SimDetector
from live_bgsub.sinks.tiled import TiledPublisher
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

REPO = Path(__file__).resolve().parents[1]
LIVE = ("live-bgsub", [sys.executable, "-m", "live_bgsub.cli"])
FIT = ("python -m training.fit", [sys.executable, "-m", "training.fit"])
EVALUATE = ("python -m training.evaluate", [sys.executable, "-m", "training.evaluate"])
SHIP = ("python -m training.ship", [sys.executable, "-m", "training.ship"])
NO_TILED = "http://127.0.0.1:9/api/v1"  # nothing listens on the discard port
NO_NATS = "nats://127.0.0.1:1"
# Frames of the MINI detector whose centre keeps the equator off the module gap.
CENTER = (97.0, 70.0)
FRAMES = 3


def one_line_exit_2(command, args, *, env=None, prog=None) -> str:
    """Run ``command`` with ``args``; assert exit status 2 and exactly one non-empty
    stderr line ``PROG: error: ...`` (PROG the command's, or ``prog``); return that line."""
    name, argv = command
    proc = subprocess.run(
        [*argv, *map(str, args)], cwd=REPO, capture_output=True, text=True, check=False, timeout=300,
        env=dict(os.environ, **(env or {})),
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (args, proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(f"{prog or name}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---------------------------------------------------------------------- no server needed

# (command, arguments, the subcommand's prog where argparse reports, what the line says)
CASES = {
    "replay-unreachable": (LIVE, ["replay", "--tiled", NO_TILED, "--last", "1"], None, f"the Tiled server at {NO_TILED} cannot be reached"),
    "replay-not-a-uri": (LIVE, ["replay", "--tiled", "not-a-uri", "--last", "1"], None, "got 'not-a-uri'"),
    "replay-last-negative": (LIVE, ["replay", "--tiled", NO_TILED, "--last", "-1"], "live-bgsub replay", "--last: expected an integer >= 1, got -1"),
    "replay-last-zero": (LIVE, ["replay", "--tiled", NO_TILED, "--last", "0"], "live-bgsub replay", "--last: expected an integer >= 1, got 0"),
    "replay-nothing-selected": (LIVE, ["replay", "--tiled", NO_TILED], None, "no runs selected"),
    "replay-unknown-option": (LIVE, ["replay", "--lats", "1"], None, "unrecognized arguments: --lats"),
    "serve-unreachable": (LIVE, ["serve", "--tiled", NO_TILED, "--zmq", "127.0.0.1:9"], "live-bgsub serve", "cannot be reached"),
    "recover-batch-size": (LIVE, ["recover", "backup", "--batch-size", "0"], "live-bgsub recover", "--batch-size: expected an integer >= 1, got 0"),
    "process-missing-file": (LIVE, ["process", "/no/such/frame.tif", "--out", "{tmp}/out"], None, "no such image file: '/no/such/frame.tif'"),
    "process-frame": (LIVE, ["process", "--sample", "--frame", "-1", "--out", "{tmp}/out"], "live-bgsub process", "--frame: expected an integer >= 0, got -1"),
    "demo-method": (LIVE, ["demo", "--method", "foo", "--dir", "{tmp}/demo"], None, "--method: unknown background method 'foo'"),
    "demo-model": (LIVE, ["demo", "--method", "model:nope", "--dir", "{tmp}/demo"], None, "--method: unknown model 'nope'"),
    "demo-model-file": (LIVE, ["demo", "--method", "model:{tmp}/m.keras", "--dir", "{tmp}/demo"], None, "--method: model file not found"),
    "worker-unreachable": (LIVE, ["worker", "--nats", NO_NATS, "--max-tasks", "1"], "live-bgsub worker", f"cannot connect to NATS at {NO_NATS}"),
    "worker-batch": (LIVE, ["worker", "--batch", "0"], "live-bgsub worker", "--batch: expected an integer >= 1, got 0"),
    "serve-unknown-option": (LIVE, ["serve", "--zmq", "127.0.0.1:9", "--bogus"], "live-bgsub serve", "unrecognized arguments: --bogus"),
    "serve-param-for-a-model": (LIVE, ["serve", "--zmq", "127.0.0.1:9", "--method", "model:white-top-hat", "--param", "tophat=3"],
                                "live-bgsub serve", "a model takes no parameters"),
    "sim-ioc-unknown-option": (LIVE, ["sim-ioc", "--prefix", "X:", "--bogus"], "live-bgsub sim-ioc", "unrecognized arguments: --bogus"),
    "compose-geometry-frames": (LIVE, ["compose", "--geometry-frames", "0"], "live-bgsub compose", "--geometry-frames: expected an integer >= 1, got 0"),
    "compose-unreachable-tiled": (LIVE, ["compose", "--nats", NO_NATS, "--tiled", NO_TILED, "--directory", "{tmp}/d"], "live-bgsub compose", "cannot be reached"),
    "tiled-server-no-demo": (LIVE, ["tiled-server", "{tmp}/nodemo"], None, "holds no demo catalog"),
    "unknown-command": (LIVE, ["nosuch"], None, "invalid choice: 'nosuch'"),
    "fit-config-missing": (FIT, ["--config", "{tmp}/missing.json", "--out", "{tmp}/out"], None, "--config: no such file"),
    "fit-config-not-json": (FIT, ["--config", "{tmp}/bad.json", "--out", "{tmp}/out"], None, "is not JSON"),
    "fit-images-missing": (FIT, ["--images", "/no/such/folder", "--out", "{tmp}/out"], None, "--images: no such folder: '/no/such/folder'"),
    "fit-epochs": (FIT, ["--synthetic", "2", "--epochs", "0", "--out", "{tmp}/out"], None, "--epochs: expected an integer >= 1, got 0"),
    "fit-no-out": (FIT, ["--synthetic", "2"], None, "no output folder"),
    "fit-tiled-unreachable": (FIT, ["--tiled", NO_TILED + "/metadata/runs", "--run", "abc", "--out", "{tmp}/out"], None, "cannot be reached (connect timeout 10 s)"),
    "fit-tiled-not-a-uri": (FIT, ["--tiled", "not-a-uri", "--run", "abc", "--out", "{tmp}/out"], None, "got 'not-a-uri'"),
    "evaluate-model-missing": (EVALUATE, ["{tmp}/missing.keras", "--synthetic", "2", "--out", "{tmp}/out"], None, "MODEL: model file not found"),
    "evaluate-images-missing": (EVALUATE, ["mixed", "--images", "/no/such/folder", "--out", "{tmp}/out"], None, "--images: no such folder"),
    "evaluate-no-data": (EVALUATE, ["mixed", "--out", "{tmp}/out"], None, "give --images DIR and/or --synthetic N"),
    "ship-not-a-run": (SHIP, ["{tmp}/run", "mixed"], None, "model.keras is missing"),
    "ship-name": (SHIP, ["{tmp}/run", "foo"], None, "name: invalid choice: 'foo'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_usage_or_connection_error_is_one_line_and_exit_2(case, tmp_path):
    command, args, prog, said = CASES[case]
    (tmp_path / "bad.json").write_text("{not json")
    line = one_line_exit_2(command, [a.replace("{tmp}", str(tmp_path)) for a in args], prog=prog)
    assert said.replace("{tmp}", str(tmp_path)) in line
    # Nothing was started or written: no output folder, no demo directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


# ---------------------------------------------------------------------- a real Tiled server


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """An embedded Tiled server with one demo-like raw run and its derived run."""
    root = tmp_path_factory.mktemp("cli-errors")
    for name in ("raw", "derived", "replayed"):
        (root / name).mkdir()
    with EmbeddedTiledServer(root / "tiled", readable_storage=[root / "raw", root / "derived", root / "replayed"]) as server:
        catalog = connect(server.uri, api_key=server.api_key)
        publisher = TiledPublisher(catalog)
        det = SimDetector(name="det", directory=root / "raw", preset=MINI, n_patterns=FRAMES, seed=5, center=CENTER)
        callback = LiveBackgroundSubtraction(publisher, method="white-top-hat", directory=root / "derived", on_full="block")
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE.subscribe(callback)
        (raw_uid,) = RE(count([det], num=FRAMES))
        assert callback.wait(raw_uid, timeout=180)
        derived_uid = callback.summary(raw_uid).derived_uid
        callback.close()
        assert publisher.close(timeout=180) and publisher.errors == []
        yield server, catalog, root, raw_uid, derived_uid


@pytest.mark.slow  # a Tiled server
def test_a_refused_key_and_a_bad_catalog_are_one_line_and_exit_2(tiled):
    server, _, root, _, _ = tiled
    wrong = ["--tiled", server.uri, "--api-key", "wrongkey"]
    assert "refused the API key (HTTP 401" in one_line_exit_2(LIVE, ["replay", *wrong, "--last", "1"])
    assert "refused the API key (HTTP 401" in one_line_exit_2(LIVE, ["compose", "--nats", NO_NATS, *wrong, "--directory", root / "d"], prog="live-bgsub compose")
    line = one_line_exit_2(LIVE, ["replay", "--tiled", server.uri, "--api-key", server.api_key, "--catalog", "nosuch", "--last", "1"])
    assert "no container at 'nosuch'" in line
    catalog = f"{server.uri}/metadata/runs"
    line = one_line_exit_2(FIT, ["--tiled", catalog, "--run", "abc", "--out", root / "fit"], env={"TILED_API_KEY": "wrongkey"})
    assert "refused the API key ($TILED_API_KEY) (HTTP 401" in line
    line = one_line_exit_2(FIT, ["--tiled", catalog, "--run", "no-such-run", "--out", root / "fit"], env={"TILED_API_KEY": server.api_key})
    assert line.endswith(f"--run: not in the Tiled catalog {catalog}: no-such-run")
    assert not (root / "fit").exists() and not (root / "d").exists()


@pytest.mark.slow  # a Tiled server
def test_compose_with_no_nats_server_is_one_line_and_exit_2(tiled):
    server, _, root, _, _ = tiled
    args = ["compose", "--nats", NO_NATS, "--tiled", server.uri, "--api-key", server.api_key, "--directory", root / "composed" / "derived"]
    assert f"cannot connect to NATS at {NO_NATS}" in one_line_exit_2(LIVE, args, prog="live-bgsub compose")


@pytest.mark.slow  # a Tiled server
def test_replay_last_takes_the_raw_run_not_its_derived_run(tiled):
    server, catalog, root, raw_uid, derived_uid = tiled
    derived = catalog[derived_uid].metadata["start"]
    assert derived["plan_name"] == DERIVED_PLAN_NAME and derived["raw_uid"] == raw_uid  # the newest run is the derived one
    assert [r.metadata["start"]["uid"] for r in select_runs(catalog, last=5)] == [raw_uid]
    assert [r.metadata["start"]["uid"] for r in select_runs(catalog, [derived_uid])] == [derived_uid]  # named: taken

    proc = subprocess.run(
        [*LIVE[1], "replay", "--tiled", server.uri, "--api-key", server.api_key, "--last", "1",
         "--directory", str(root / "replayed" / "derived"), "--no-backup"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.splitlines()
    replayed_uid = re.fullmatch(rf"{raw_uid} -> (\S+): received {FRAMES}, processed {FRAMES}, .*\(success\)", line).group(1)
    # The progress bar counted the raw run's frames (not its documents).
    assert re.search(rf"replay {raw_uid[:8]}: 100%.*\| {FRAMES}/{FRAMES} \[", proc.stderr), proc.stderr[-2000:]
    assert [r.metadata["start"]["uid"] for r in derived_runs(catalog, raw_uid)] == [derived_uid, replayed_uid]
    assert derived_runs(catalog, derived_uid) == []  # no derived-of-derived run
    assert [r.metadata["start"]["uid"] for r in select_runs(catalog, last=1)] == [raw_uid]
    # Derived runs are not selected by metadata either: nothing matches (exit 1, no usage error).
    proc = subprocess.run(
        [*LIVE[1], "replay", "--tiled", server.uri, "--api-key", server.api_key, "--query", f"plan_name={DERIVED_PLAN_NAME}"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "live-bgsub: error: no raw run matched the selection (a derived run is replayed only when named by its uid)"
    ), proc.stderr
