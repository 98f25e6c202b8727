"""Metrics PVs (live_bgsub.sinks.pvs): a caproto server in this process, read with pyepics.

The derived documents come from event_model's ``compose_run`` (exact values) and from
a real LiveBackgroundSubtraction on synthetic frames. PV updates travel through the
server's event loop and Channel Access, so every check waits (bounded) for the value.
"""

from __future__ import annotations

import math
import secrets
import threading
import time

import epics
import pytest
from conftest import MINI
from event_model import compose_run

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.procutil import DeadlinePassed, wait_until
from live_bgsub.sinks.pvs import PV_SUFFIXES, MetricsPVs
from live_bgsub.synth import make_pattern

METRIC_KEYS = ("i11_i10", "s10_px", "i10", "i11", "m3_intensity", "lag_s", "raw_seq_num")


def _prefix() -> str:
    return f"LBGT{secrets.token_hex(4)}:"


@pytest.fixture
def pvs():
    server = MetricsPVs(_prefix(), fps_window_s=5.0)
    yield server
    assert server.stop()


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def caget(name):
    kind = PV_SUFFIXES[name.rsplit(":", 1)[-1]][0]
    return epics.caget(name, as_string=kind == "text", timeout=5)


def wait_values(pvs, expected: dict, timeout: float = 10.0) -> dict:
    """caget the PVs until they hold ``expected`` (suffix -> value); return what was read."""
    got = {}

    def reached():
        got.update((suffix, caget(pvs.pvnames[suffix])) for suffix in expected)
        return all(_same(got[s], v) for s, v in expected.items())

    try:
        wait_until(reached, timeout, 0.02, what=f"PVs holding {expected}")
    except DeadlinePassed as error:
        raise AssertionError(f"{error}; last read {got}") from None
    return got


def _derived_run(raw_uid="0123456789abcdef-raw"):
    bundle = compose_run(metadata={"raw_uid": raw_uid, "plan_name": "live_bgsub"})
    keys = {k: {"source": "live_bgsub", "dtype": "number", "shape": []} for k in METRIC_KEYS}
    primary = bundle.compose_descriptor(name="primary", data_keys=keys)
    failures = bundle.compose_descriptor(
        name="failures",
        data_keys={
            "raw_seq_num": {"source": "live_bgsub", "dtype": "integer", "shape": []},
            "status": {"source": "live_bgsub", "dtype": "string", "shape": []},
            "error": {"source": "live_bgsub", "dtype": "string", "shape": []},
        },
    )
    return bundle, primary, failures


def _event(desc, data, t):
    return desc.compose_event(data=data, timestamps={k: t for k in data}, time=t)


def test_pvs_hold_the_last_derived_event_and_the_run_counters(pvs):
    bundle, primary, failures = _derived_run()
    pvs("start", bundle.start_doc)
    pvs("descriptor", primary.descriptor_doc)
    pvs("descriptor", failures.descriptor_doc)
    t0 = time.time()
    rows = [
        {"i11_i10": 0.41, "s10_px": 57.25, "i10": 1000.0, "i11": 410.0, "m3_intensity": 12.5, "lag_s": 0.120, "raw_seq_num": 1},
        {"i11_i10": 0.52, "s10_px": 57.5, "i10": 1100.0, "i11": 572.0, "m3_intensity": math.nan, "lag_s": 0.080, "raw_seq_num": 2},
        {"i11_i10": 0.63, "s10_px": 57.75, "i10": 1200.0, "i11": 756.0, "m3_intensity": 14.0, "lag_s": 0.0625, "raw_seq_num": 4},
    ]
    for i, row in enumerate(rows):
        pvs("event", _event(primary, row, t0 + 0.1 * i))
    pvs("event", _event(failures, {"raw_seq_num": 3, "status": "missing", "error": "lost in transport (0MQ)"}, t0))
    pvs("event", _event(failures, {"raw_seq_num": 5, "status": "failed", "error": "boom"}, t0))
    pvs("stop", bundle.compose_stop(exit_status="fail", reason="received 4, processed 3, failed 1, missing 1"))

    last = rows[-1]
    derived_uid = bundle.start_doc["uid"]
    got = wait_values(
        pvs,
        {
            "STATUS": "finished 01234567 fail",
            "I11_I10": last["i11_i10"],
            "S10_PX": last["s10_px"],
            "I10": last["i10"],
            "I11": last["i11"],
            "M3_INTENSITY": last["m3_intensity"],
            "LAG_MS": 1e3 * last["lag_s"],
            "RAW_SEQ_NUM": 4,
            "PROCESSED": 3,
            "FAILED": 2,
            "MISSING": 1,
            "RAW_UID": "0123456789abcdef-raw",
            "DERIVED_UID": derived_uid,
        },
    )
    # Three events 0.1 s apart: 2 steps in 0.2 s.
    assert caget(pvs.pvnames["FPS"]) == pytest.approx(10.0, rel=1e-6)
    message = wait_values(pvs, {"MESSAGE": pvs.value("MESSAGE")})["MESSAGE"]
    assert derived_uid in message and "missing 1" in message and ": fail:" in message
    assert got["STATUS"] == pvs.value("STATUS")
    assert set(pvs.pvnames) == set(PV_SUFFIXES)


def test_camonitor_sees_the_status_transitions(pvs):
    seen, changed = [], threading.Condition()

    def on_change(value=None, char_value=None, **kw):
        with changed:
            seen.append(char_value if char_value is not None else value)
            changed.notify_all()

    def wait_for(text):
        with changed:
            assert changed.wait_for(lambda: text in seen, timeout=10), f"STATUS monitor saw {seen}, not {text!r}"

    monitor = epics.PV(pvs.pvnames["STATUS"], callback=on_change, auto_monitor=True)
    try:
        assert monitor.wait_for_connection(timeout=5)
        wait_for("idle")
        bundle, primary, _ = _derived_run("feedc0de-0000")
        pvs("start", bundle.start_doc)
        wait_for("running feedc0de")
        pvs("descriptor", primary.descriptor_doc)
        pvs("event", _event(primary, dict.fromkeys(METRIC_KEYS, 1.0), time.time()))
        pvs("stop", bundle.compose_stop())
        wait_for("finished feedc0de success")
        pvs.set_status("error tiled unreachable", "HTTP 503", severity=2)
        wait_for("error tiled unreachable")
        assert seen.index("idle") < seen.index("running feedc0de") < seen.index("finished feedc0de success")
        assert monitor.severity == 2
    finally:
        monitor.disconnect()


def test_a_live_callback_publishes_its_metrics(pvs, tmp_path):
    docs = []
    cb = LiveBackgroundSubtraction(publish=[pvs, lambda name, doc: docs.append((name, doc))], directory=tmp_path)
    first = make_pattern(MINI, seed=0)
    center, rotation = tuple(first.params["center"]), first.params["rotation_deg"]
    frames = [first.raw()] + [make_pattern(MINI, seed=s, center=center, rotation_deg=rotation).raw() for s in (1, 2)]
    raw = compose_run(metadata={"center": list(center), "rotation_deg": rotation})
    desc = raw.compose_descriptor(
        name="primary", data_keys={"det_image": {"source": "sim", "dtype": "array", "dtype_numpy": "<i4", "shape": list(MINI.shape)}}
    )
    cb("start", raw.start_doc)
    cb("descriptor", desc.descriptor_doc)
    for frame in frames:
        cb("event", desc.compose_event(data={"det_image": frame}, timestamps={"det_image": time.time()}))
    cb("stop", raw.compose_stop())
    assert cb.wait(raw.start_doc["uid"], timeout=60)
    cb.close()
    derived = next(d for n, d in docs if n == "start")
    primary = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary"}
    last = [d for n, d in docs if n == "event" and d["descriptor"] in primary][-1]["data"]
    assert last["raw_seq_num"] == 3 and math.isfinite(last["i11_i10"])
    wait_values(
        pvs,
        {
            "STATUS": f"finished {raw.start_doc['uid'][:8]} success",
            "I11_I10": last["i11_i10"],
            "S10_PX": last["s10_px"],
            "I10": last["i10"],
            "I11": last["i11"],
            "M3_INTENSITY": last["m3_intensity"],
            "LAG_MS": 1e3 * last["lag_s"],
            "RAW_SEQ_NUM": 3,
            "PROCESSED": 3,
            "FAILED": 0,
            "MISSING": 0,
            "RAW_UID": raw.start_doc["uid"],
            "DERIVED_UID": derived["uid"],
        },
    )


def test_fps_falls_to_zero_when_frames_stop():
    with MetricsPVs(_prefix(), fps_window_s=0.5, fps_refresh_s=0.05) as pvs:
        bundle, primary, _ = _derived_run()
        pvs("start", bundle.start_doc)
        pvs("descriptor", primary.descriptor_doc)
        now = time.time()
        for i in range(5):  # two batches of events stamped 0.2 s apart
            pvs("event", _event(primary, dict.fromkeys(METRIC_KEYS, 1.0), now - 0.2 if i < 3 else now))
        assert pvs.value("FPS") == pytest.approx(2 / 0.2)  # the older batch is one step
        wait_values(pvs, {"FPS": 0.0}, timeout=5)


def test_bad_documents_never_raise_and_show_an_error(pvs):
    for name, doc in (("event", {}), ("start", {"raw_uid": "x"}), ("stop", None), ("descriptor", {"uid": "d"}), ("bogus", {})):
        pvs(name, doc)  # must not raise
    assert pvs.errors and pvs.value("STATUS").startswith("error ")
    wait_values(pvs, {"STATUS": pvs.value("STATUS")})
    bundle, _, _ = _derived_run("abcdef99")
    pvs("start", bundle.start_doc)  # a good run recovers
    wait_values(pvs, {"STATUS": "running abcdef99"})


def test_pvs_are_read_only_and_the_server_restarts(pvs):
    name = pvs.pvnames["I11_I10"]
    assert caget(name) is not None
    with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
        epics.caput(name, 1.0, wait=True, timeout=5)
    assert pvs.stop()
    assert not pvs.running
    pvs.start()
    assert pvs.running
    pvs.set_status("running again")
    wait_values(pvs, {"STATUS": "running again"})


def test_prefix_and_options_are_checked():
    with pytest.raises(ValueError, match="prefix must be a non-empty string without whitespace, got 'A B:'"):
        MetricsPVs("A B:", start=False)
    with pytest.raises(ValueError, match="fps_window_s must be a positive number of seconds, got 0"):
        MetricsPVs("OK:", fps_window_s=0, start=False)
