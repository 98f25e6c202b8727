"""The live callback fed documents composed with event_model (no RunEngine).

Covers inline frames, event_page, StreamResource/StreamDatum in live and replay order,
area-detector Resource/Datum, the geometry sources, and the faults the issue lists: a
failing step, a frame of the wrong shape, a NaN frame, a missing HDF5 file, a stop that
arrives while frames are queued, and a full queue in ``skip`` mode.
"""

from __future__ import annotations

import math
import threading
import time

import h5py
import numpy as np
import pytest
from conftest import Collector as BaseCollector
from event_model import compose_run

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.cli import process_image
from live_bgsub.engine import Engine, ProcessingStep, make_step
from live_bgsub.geometry import Geometry
from live_bgsub.synth import make_pattern

CENTER = (410.0, 520.0)
ROTATION = 3.0
KEY = "det_image"


@pytest.fixture(scope="module")
def frames():
    """Five raw Pilatus 1M frames of one run (one geometry, different seeds)."""
    return [make_pattern("pilatus-1m", seed=s, center=CENTER, rotation_deg=ROTATION).raw() for s in range(5)]


@pytest.fixture(scope="module")
def raw_file(frames, tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "raw.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack(frames), chunks=(1, *frames[0].shape))
    return path


class Collector(BaseCollector):
    """Keeps the derived documents, as a publisher would receive them."""

    def names(self):
        return [n for n, _ in self.docs]

    def start(self):
        return next(d for n, d in self.docs if n == "start")

    def stop(self):
        return next(d for n, d in self.docs if n == "stop")

    def events(self, stream="primary"):
        uids = {d["uid"] for n, d in self.docs if n == "descriptor" and d["name"] == stream}
        return [d for n, d in self.docs if n == "event" and d["descriptor"] in uids]

    def corrected(self):
        sres = next(d for n, d in self.docs if n == "stream_resource")
        path = sres["uri"][len("file://localhost") :]
        with h5py.File(path, "r") as f:
            return f[sres["parameters"]["dataset"]][()]


def _descriptor(bundle, shape, *, external=None, key=KEY, configuration=None):
    data_key = {"source": "sim", "dtype": "array", "shape": list(shape), "dtype_numpy": "<i4"}
    if external:
        data_key["external"] = external
    kwargs = {"configuration": configuration} if configuration else {}
    return bundle.compose_descriptor(
        name="primary", data_keys={key: data_key, "det_frame_number": {"source": "sim", "dtype": "integer", "shape": []}}, **kwargs
    )


def _run_inline(cb, frames, *, md=None, page=False):
    bundle = compose_run(metadata={"scan_id": 42, **(md or {})})
    cb("start", bundle.start_doc)
    desc = _descriptor(bundle, frames[0].shape)
    cb("descriptor", desc.descriptor_doc)
    now = time.time()
    if page:
        page_doc = desc.compose_event_page(
            data={KEY: list(frames), "det_frame_number": list(range(len(frames)))},
            timestamps={KEY: [now] * len(frames), "det_frame_number": [now] * len(frames)},
            seq_num=list(range(1, len(frames) + 1)),
            time=[now] * len(frames),
            validate=False,
        )
        cb("event_page", page_doc)
    else:
        for i, frame in enumerate(frames):
            cb("event", desc.compose_event(data={KEY: frame, "det_frame_number": i}, timestamps={KEY: now, "det_frame_number": now}))
    cb("stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


def _run_stream(cb, raw_file, n, *, replay_order=False, path=None):
    """A run whose frames live in ``raw_file`` (StreamResource/StreamDatum)."""
    bundle = compose_run(metadata={"scan_id": 43})
    shape = h5py.File(raw_file, "r")["/entry/data/data"].shape[1:]
    desc = _descriptor(bundle, shape, external="STREAM:")
    sres = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri="file://localhost" + str(path or raw_file),
        data_key=KEY,
        parameters={"dataset": "/entry/data/data", "chunk_shape": [1, *shape]},
    )
    now = time.time()
    events = [desc.compose_event(data={"det_frame_number": i}, timestamps={"det_frame_number": now}) for i in range(n)]
    if replay_order:
        # What a replay from Tiled sends: every event, then one combined datum.
        docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
        docs += [("event", e) for e in events]
        docs += [("stream_resource", sres.stream_resource_doc)]
        docs += [("stream_datum", sres.compose_stream_datum(indices={"start": 0, "stop": n}, seq_nums={"start": 1, "stop": n + 1}, descriptor=desc.descriptor_doc))]
    else:
        docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc), ("stream_resource", sres.stream_resource_doc)]
        for i, e in enumerate(events):
            datum = sres.compose_stream_datum(
                indices={"start": i, "stop": i + 1}, seq_nums={"start": i + 1, "stop": i + 2}, descriptor=desc.descriptor_doc
            )
            docs += [("stream_datum", datum), ("event", e)]
    docs.append(("stop", bundle.compose_stop()))
    for name, doc in docs:
        cb(name, doc)
    return bundle.start_doc["uid"]


def _callback(tmp_path, **kw):
    out = Collector()
    kw.setdefault("geometry", {"center": CENTER, "rotation_deg": ROTATION})
    cb = LiveBackgroundSubtraction(out, directory=tmp_path / "derived", **kw)
    return cb, out


def _metrics(event):
    return {k: v for k, v in event["data"].items() if k not in ("latency_s", "lag_s", "processing_s")}


def test_inline_frames_match_process_image(tmp_path, frames, raw_file):
    cb, out = _callback(tmp_path)
    uid = _run_inline(cb, frames)
    assert cb.wait(uid, timeout=120)
    summary = cb.summary(uid)
    assert (summary.received, summary.processed, summary.failed, summary.skipped) == (5, 5, {}, [])
    assert out.names()[:3] == ["start", "descriptor", "stream_resource"] and out.names()[-1] == "stop"
    start, stop = out.start(), out.stop()
    assert start["raw_uid"] == uid and start["raw_scan_id"] == 42
    assert start["processing"]["method"] == "white-top-hat" and start["processing"]["parameters"] == {"tophat": 100.0}
    assert start["geometry"] == {"center": list(CENTER), "rotation_deg": ROTATION, "source": "config"}
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": 5}
    assert "received 5, processed 5, failed 0" in stop["reason"]
    events = out.events()
    assert [e["data"]["raw_seq_num"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["data"]["latency_s"] >= 0 and e["data"]["lag_s"] >= 0 for e in events)
    assert all(0 < e["data"]["processing_s"] <= e["data"]["latency_s"] for e in events)
    corrected = out.corrected()
    assert corrected.shape == (5, *start["fold_shape"]) and corrected.dtype == np.float32
    # Derived frames equal `live-bgsub process` on the same frames with the same geometry.
    for i, event in enumerate(events):
        record, arrays = process_image(raw_file, frame=i, center=CENTER, rotation_deg=ROTATION)
        np.testing.assert_allclose(corrected[i], arrays["corrected"], rtol=1e-6, atol=1e-4)
        for key in ("i10", "i11", "i11_i10", "s10_px", "tdi", "background_sum"):
            assert event["data"][key] == pytest.approx(record["metrics"][key], rel=1e-6, nan_ok=True), key
        # The verdict and its evidence travel with the numbers (given geometry: no geometry doubt).
        quality = record["metrics"]["quality"]
        assert event["data"]["metrics_verdict"] == quality["verdict"]
        assert event["data"]["metrics_doubts"] == "; ".join(quality["reasons"])
        assert event["data"]["i11_i10_err"] == pytest.approx(quality["evidence"].get("i11_i10_err", math.nan), rel=1e-6, nan_ok=True)


def test_event_page_gives_the_same_run(tmp_path, frames):
    cb, out = _callback(tmp_path / "a")
    cb_page, out_page = _callback(tmp_path / "b")
    uid = _run_inline(cb, frames[:3])
    uid_page = _run_inline(cb_page, frames[:3], page=True)
    assert cb.wait(uid, timeout=120) and cb_page.wait(uid_page, timeout=120)
    np.testing.assert_equal([_metrics(e) for e in out.events()], [_metrics(e) for e in out_page.events()])  # NaN == NaN here
    np.testing.assert_array_equal(out.corrected(), out_page.corrected())


@pytest.mark.parametrize("replay_order", [False, True], ids=["live-order", "replay-order"])
def test_stream_resource_frames(tmp_path, frames, raw_file, replay_order):
    cb, out = _callback(tmp_path)
    uid = _run_stream(cb, raw_file, 5, replay_order=replay_order)
    assert cb.wait(uid, timeout=120)
    assert cb.summary(uid).processed == 5 and out.stop()["exit_status"] == "success"
    inline_cb, inline_out = _callback(tmp_path / "inline")
    inline_uid = _run_inline(inline_cb, frames)
    assert inline_cb.wait(inline_uid, timeout=120)
    np.testing.assert_equal([_metrics(e) for e in out.events()], [_metrics(e) for e in inline_out.events()])  # NaN == NaN here
    np.testing.assert_array_equal(out.corrected(), inline_out.corrected())


@pytest.mark.parametrize("datum_first", [True, False], ids=["live-order", "events-before-datum"])
def test_area_detector_resource_datum(tmp_path, frames, raw_file, datum_first):
    cb, out = _callback(tmp_path)
    bundle = compose_run()
    desc = _descriptor(bundle, frames[0].shape, external="FILESTORE:")
    resource = bundle.compose_resource(
        spec="AD_HDF5", root="/", resource_path=str(raw_file).lstrip("/"), resource_kwargs={"frame_per_point": 1}
    )
    datums = [resource.compose_datum(datum_kwargs={"point_number": i}) for i in range(3)]
    now = time.time()
    events = [
        desc.compose_event(data={KEY: d["datum_id"], "det_frame_number": i}, timestamps={KEY: now, "det_frame_number": now})
        for i, d in enumerate(datums)
    ]
    cb("start", bundle.start_doc)
    cb("descriptor", desc.descriptor_doc)
    cb("resource", resource.resource_doc)
    if datum_first:
        for d, e in zip(datums, events):
            cb("datum", d)
            cb("event", e)
    else:
        for e in events:
            cb("event", e)
        for d in datums:
            cb("datum", d)
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=120)
    assert cb.summary(bundle.start_doc["uid"]).processed == 3
    inline_cb, inline_out = _callback(tmp_path / "inline")
    assert inline_cb.wait(_run_inline(inline_cb, frames[:3]), timeout=120)
    np.testing.assert_array_equal(out.corrected(), inline_out.corrected())


@pytest.mark.parametrize("kind", ["resource", "stream_resource"])
def test_resources_without_run_start_still_give_their_frames(tmp_path, frames, raw_file, kind):
    """``run_start`` is optional in (stream) resources: their frames come through the
    descriptor (StreamDatum) or the events naming the datums (a datum page here), while
    another run is open."""
    cb, out = _callback(tmp_path)
    other = compose_run()
    cb("start", other.start_doc)
    bundle = compose_run()
    desc = _descriptor(bundle, frames[0].shape, external="STREAM:" if kind == "stream_resource" else "FILESTORE:")
    now = time.time()
    cb("start", bundle.start_doc)
    cb("descriptor", desc.descriptor_doc)
    if kind == "stream_resource":
        sres = bundle.compose_stream_resource(
            mimetype="application/x-hdf5", uri="file://localhost" + str(raw_file), data_key=KEY,
            parameters={"dataset": "/entry/data/data", "chunk_shape": [1, *frames[0].shape]},
        ).stream_resource_doc
        cb("stream_resource", {k: v for k, v in sres.items() if k != "run_start"})
        cb("stream_datum", {"uid": "sd-1", "stream_resource": sres["uid"], "descriptor": desc.descriptor_doc["uid"],
                            "indices": {"start": 0, "stop": 3}, "seq_nums": {"start": 1, "stop": 4}})
        for i in range(3):
            cb("event", desc.compose_event(data={"det_frame_number": i}, timestamps={"det_frame_number": now}))
    else:
        resource = bundle.compose_resource(spec="AD_HDF5", root="/", resource_path=str(raw_file).lstrip("/"), resource_kwargs={})
        cb("resource", {k: v for k, v in resource.resource_doc.items() if k != "run_start"})
        datums = [resource.compose_datum(datum_kwargs={"point_number": i}) for i in range(3)]
        for i, d in enumerate(datums):
            cb("event", desc.compose_event(data={KEY: d["datum_id"], "det_frame_number": i}, timestamps={KEY: now, "det_frame_number": now}))
        cb("datum_page", {"resource": resource.resource_doc["uid"], "datum_id": [d["datum_id"] for d in datums],
                          "datum_kwargs": {"point_number": [0, 1, 2]}})
    cb("stop", bundle.compose_stop())
    assert cb.wait(bundle.start_doc["uid"], timeout=120)
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.processed == 3 and summary.exit_status == "success", summary.reason
    assert cb.errors == []
    cb("stop", other.compose_stop())
    assert cb.wait(timeout=60) and cb.summary(other.start_doc["uid"]).received == 0


def test_geometry_sources(tmp_path, frames):
    # From the start document.
    cb, out = _callback(tmp_path / "md", geometry=None)
    uid = _run_inline(cb, frames[:1], md={"geometry": {"center": [411.0, 519.0], "rotation_deg": 2.5}})
    assert cb.wait(uid, timeout=60)
    assert out.start()["geometry"] == {"center": [411.0, 519.0], "rotation_deg": 2.5, "source": "start"}
    # Estimated from the first frames, then fixed: close to the truth.
    cb, out = _callback(tmp_path / "est", geometry=None, geometry_frames=3)
    uid = _run_inline(cb, frames)
    assert cb.wait(uid, timeout=120)
    geometry = out.start()["geometry"]
    assert geometry["source"] == "estimated from 3 frame(s)"
    assert np.hypot(geometry["center"][0] - CENTER[0], geometry["center"][1] - CENTER[1]) < 0.5
    assert abs(geometry["rotation_deg"] - ROTATION) < 0.2
    assert cb.summary(uid).processed == 5


def test_bad_geometry_and_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="on_full must be one of"):
        LiveBackgroundSubtraction(on_full="drop")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        LiveBackgroundSubtraction(batch_size=0)
    with pytest.raises(ValueError, match="geometry must be a Geometry or a dict"):
        LiveBackgroundSubtraction(geometry=(1, 2))
    with pytest.raises(ValueError, match="unknown"):
        LiveBackgroundSubtraction(method="white-top-hat", params={"bogus": 1})


def test_data_key_detection(tmp_path, frames):
    # Two 2-D keys, neither ending in _image: the run is not processed, and says why.
    cb, out = _callback(tmp_path)
    bundle = compose_run()
    shape = list(frames[0].shape)
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={k: {"source": "sim", "dtype": "array", "shape": shape} for k in ("a", "b")},
    )
    cb("start", bundle.start_doc)
    cb("descriptor", desc.descriptor_doc)
    cb("event", desc.compose_event(data={"a": frames[0], "b": frames[1]}, timestamps={"a": 0, "b": 0}))
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=60)
    summary = cb.summary(bundle.start_doc["uid"])
    assert "cannot tell which data key" in summary.disabled and "['a', 'b']" in summary.disabled
    assert out.stop()["exit_status"] == "fail" and "cannot tell which data key" in out.stop()["reason"]
    # Naming the key works.
    cb, out = _callback(tmp_path / "named", data_key="b")
    uid = _run_inline(cb, frames[:1])  # the key of _run_inline is det_image: not "b"
    assert cb.wait(uid, timeout=60)
    assert "data key 'b' is not in stream 'primary'" in cb.summary(uid).disabled


class _HotPixelFails(ProcessingStep):
    """A real step (white top-hat) that fails on folds holding a hot region."""

    method = "white-top-hat"

    def __init__(self):
        self.inner = make_step("white-top-hat")

    def subtract(self, folds, masks):
        if (folds > 1e6).any():
            raise RuntimeError("detector glitch")
        return self.inner.subtract(folds, masks)

    def describe(self):
        return self.inner.describe()


def test_faults_are_recorded_per_frame(tmp_path, frames, raw_file):
    hot = frames[1].copy()
    hot[500:520, 500:520] = 5_000_000
    wrong_shape = frames[2][:100, :100]
    nan_frame = np.full(frames[0].shape, np.nan, np.float32)
    batch = [frames[0], hot, wrong_shape, nan_frame, frames[4]]
    cb, out = _callback(tmp_path, method=_HotPixelFails(), batch_size=8)
    uid = _run_inline(cb, batch)
    assert cb.wait(uid, timeout=120)
    summary = cb.summary(uid)
    assert summary.processed == 2 and sorted(summary.failed) == [2, 3, 4]
    assert "detector glitch" in summary.failed[2]
    assert "shape (100, 100), expected (1043, 981)" in summary.failed[3]
    assert "every pixel of the frame is invalid" in summary.failed[4]
    assert [e["data"]["raw_seq_num"] for e in out.events()] == [1, 5]
    failures = out.events("failures")
    # In the order the faults were found (the wrong shape before the engine existed).
    assert sorted((e["data"]["raw_seq_num"], e["data"]["status"]) for e in failures) == [(2, "failed"), (3, "failed"), (4, "failed")]
    stop = out.stop()
    assert stop["exit_status"] == "fail" and "received 5, processed 2, failed 3" in stop["reason"]
    assert stop["num_events"] == {"primary": 2, "failures": 3}


def test_missing_hdf5_file_fails_its_frames(tmp_path, raw_file):
    cb, out = _callback(tmp_path)
    uid = _run_stream(cb, raw_file, 3, path=tmp_path / "gone.h5")
    assert cb.wait(uid, timeout=60)
    summary = cb.summary(uid)
    assert summary.processed == 0 and sorted(summary.failed) == [1, 2, 3]
    assert all("gone.h5 does not exist" in e for e in summary.failed.values())
    assert out.stop()["exit_status"] == "fail"


class _Gate(ProcessingStep):
    """White top-hat that waits for the test to open a gate (signals when it waits)."""

    method = "white-top-hat"

    def __init__(self):
        self.inner = make_step("white-top-hat")
        self.entered = threading.Event()
        self.gate = threading.Event()

    def subtract(self, folds, masks):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.subtract(folds, masks)

    def describe(self):
        return self.inner.describe()


def _stream_of(cb, frames, n):
    bundle = compose_run()
    desc = _descriptor(bundle, frames[0].shape)
    cb("start", bundle.start_doc)
    cb("descriptor", desc.descriptor_doc)
    return bundle, desc


def test_skip_when_full_lists_the_skipped_frames(tmp_path, frames):
    step = _Gate()
    cb, out = _callback(tmp_path, method=step, queue_size=2, batch_size=1, on_full="skip")
    bundle, desc = _stream_of(cb, frames, 6)
    t0 = time.time()
    cb("event", desc.compose_event(data={KEY: frames[0], "det_frame_number": 0}, timestamps={KEY: t0, "det_frame_number": t0}))
    assert step.entered.wait(60)  # the worker holds frame 1; the queue is empty
    for i in range(1, 6):  # 2 fit in the queue, 3 are skipped, and the caller never waits
        cb("event", desc.compose_event(data={KEY: frames[i % 5], "det_frame_number": i}, timestamps={KEY: t0, "det_frame_number": t0}))
    cb("stop", bundle.compose_stop())
    step.gate.set()
    assert cb.wait(timeout=120)
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.skipped == [4, 5, 6] and summary.processed == 3
    skipped = [(e["data"]["raw_seq_num"], e["data"]["status"]) for e in out.events("failures")]
    assert skipped == [(4, "skipped"), (5, "skipped"), (6, "skipped")]
    assert "skipped 3" in out.stop()["reason"]


def test_stop_while_frames_are_queued(tmp_path, frames):
    # A stop timeout of 0 s: the frame in the worker finishes, the queued ones are given
    # up, listed as unprocessed, and the derived stop says the timeout was reached.
    step = _Gate()
    cb, out = _callback(tmp_path, method=step, batch_size=1, stop_timeout_s=0.0)
    bundle, desc = _stream_of(cb, frames, 4)
    t0 = time.time()
    for i in range(4):
        cb("event", desc.compose_event(data={KEY: frames[i], "det_frame_number": i}, timestamps={KEY: t0, "det_frame_number": t0}))
    assert step.entered.wait(60)
    cb("stop", bundle.compose_stop())
    step.gate.set()
    assert cb.wait(timeout=120)
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.processed == 1 and sorted(summary.unprocessed) == [2, 3, 4] and summary.timed_out
    stop = out.stop()
    assert stop["exit_status"] == "fail" and "stop timeout of 0.0 s reached" in stop["reason"]
    assert [e["data"]["status"] for e in out.events("failures")] == ["unprocessed"] * 3


def test_stop_waits_for_queued_frames(tmp_path, frames):
    step = _Gate()
    cb, out = _callback(tmp_path, method=step, batch_size=1)
    bundle, desc = _stream_of(cb, frames, 4)
    t0 = time.time()
    for i in range(4):
        cb("event", desc.compose_event(data={KEY: frames[i], "det_frame_number": i}, timestamps={KEY: t0, "det_frame_number": t0}))
    cb("stop", bundle.compose_stop())
    assert not cb.wait(timeout=0)  # still working: the derived stop is not out yet
    assert "stop" not in out.names()
    step.gate.set()
    assert cb.wait(timeout=120)
    assert cb.summary(bundle.start_doc["uid"]).processed == 4 and out.stop()["exit_status"] == "success"


def test_bad_documents_never_raise(tmp_path, frames):
    cb, _ = _callback(tmp_path)
    bundle, desc = _stream_of(cb, frames, 1)
    bad = {"uid": "x", "stream_resource": "nope", "descriptor": desc.descriptor_doc["uid"], "indices": {"start": 0, "stop": 1}, "seq_nums": {"start": 1, "stop": 2}}
    cb("stream_datum", bad)  # unknown stream resource: recorded, not raised
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=60)
    assert any("unknown stream_resource 'nope'" in e for e in cb.errors)
    # The frames that datum named are unknown: the derived run cannot pass for complete.
    assert cb.summary(bundle.start_doc["uid"]).exit_status == "fail"
    assert "1 document(s) not understood" in cb.summary(bundle.start_doc["uid"]).reason


@pytest.mark.parametrize("indices, seq_nums, why", [
    ({"start": -2, "stop": 0}, {"start": 1, "stop": 3}, "frame index -2 is negative"),
    ({"start": 0, "stop": 2}, {"start": -1, "stop": 1}, "is not a range of sequence numbers from 1"),
])
def test_a_stream_datum_with_negative_numbers_reads_no_other_frame(tmp_path, frames, raw_file, indices, seq_nums, why):
    """Python would read index -2 as the second frame from the end: a frame of another
    seq_num published as this one's, with a success stop."""
    cb, out = _callback(tmp_path)
    bundle = compose_run(metadata={"scan_id": 44})
    desc = _descriptor(bundle, frames[0].shape, external="STREAM:")
    sres = bundle.compose_stream_resource(
        mimetype="application/x-hdf5", uri="file://localhost" + str(raw_file), data_key=KEY,
        parameters={"dataset": "/entry/data/data", "chunk_shape": [1, *frames[0].shape]},
    )
    for name, doc in [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc), ("stream_resource", sres.stream_resource_doc)]:
        cb(name, doc)
    datum = {"uid": "d-1", "stream_resource": sres.stream_resource_doc["uid"], "descriptor": desc.descriptor_doc["uid"], "indices": indices, "seq_nums": seq_nums}
    cb("stream_datum", datum)
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=60)
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.processed == 0 and summary.exit_status == "fail"
    assert out.events() == []
    assert why in (" ".join(summary.failed.values()) + summary.reason)


def test_engine_batches_match_single_frames(frames):
    engine = Engine(make_step("white-top-hat"), Geometry(CENTER, ROTATION), frames[0].shape)
    batch = engine.process(frames[:3])
    for i in range(3):
        [single] = engine.process([frames[i]], [i + 1])
        np.testing.assert_array_equal(single.corrected, batch[i].corrected)
        assert single.metrics["i11_i10"] == batch[i].metrics["i11_i10"]


@pytest.mark.slow  # compiles the device path: about 15 s
def test_model_step_micro_batches(tmp_path, frames, raw_file):
    from live_bgsub.inference import BackgroundModel

    model = BackgroundModel.load("model:white-top-hat")
    cb, out = _callback(tmp_path, method=model, batch_size=4, batch_timeout_s=5.0)
    uid = _run_inline(cb, frames)
    assert cb.wait(uid, timeout=300)
    assert cb.summary(uid).processed == 5
    # Two micro-batches: 4 frames (full batch), then 1 (the stop ends the wait).
    datums = [d for n, d in out.docs if n == "stream_datum"]
    assert [(d["indices"]["start"], d["indices"]["stop"]) for d in datums] == [(0, 4), (4, 5)]
    start = out.start()
    assert start["processing"]["method"] == "model:white-top-hat"
    assert start["processing"]["card_sha256"] == model.card_sha256()
    corrected = out.corrected()
    for i in (0, 4):
        _, arrays = process_image(raw_file, frame=i, center=CENTER, rotation_deg=ROTATION, model=model)
        np.testing.assert_allclose(corrected[i], arrays["corrected"], rtol=1e-4, atol=1e-3)


def test_replay_fills_in_only_the_selected_frames(tmp_path, frames):
    # A live run skipped frames 4-6; a replay restricted to them processes just those.
    cb, out = _callback(tmp_path, seq_nums=[4, 5, 6])
    uid = _run_inline(cb, frames + frames[:1])
    assert cb.wait(uid, timeout=120)
    summary = cb.summary(uid)
    assert (summary.received, summary.processed) == (3, 3)
    assert [e["data"]["raw_seq_num"] for e in out.events()] == [4, 5, 6]
    assert out.stop()["exit_status"] == "success"


def test_missing_frames_and_an_aborted_raw_run_mark_the_derived_run(tmp_path, frames):
    cb, out = _callback(tmp_path)
    bundle, desc = _stream_of(cb, frames, 2)
    t0 = time.time()
    cb("event", desc.compose_event(data={KEY: frames[0], "det_frame_number": 0}, timestamps={KEY: t0, "det_frame_number": t0}, seq_num=1))
    cb("event", desc.compose_event(data={KEY: frames[2], "det_frame_number": 2}, timestamps={KEY: t0, "det_frame_number": t0}, seq_num=3))
    cb.mark_missing(bundle.start_doc["uid"], [2], "lost in transport")
    cb("stop", bundle.compose_stop(exit_status="abort", reason="detector stopped answering"))
    assert cb.wait(timeout=120)
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.processed == 2 and summary.missing == {2: "lost in transport"}
    stop = out.stop()
    assert stop["exit_status"] == "abort"
    assert "missing 1" in stop["reason"] and "raw run exit_status 'abort' (detector stopped answering)" in stop["reason"]
    assert [(e["data"]["raw_seq_num"], e["data"]["status"]) for e in out.events("failures")] == [(2, "missing")]
    with pytest.raises(KeyError, match="never started"):
        cb.mark_missing("nope", [1], "x")


class _LossyPublisher(Collector):
    """A publisher that keeps the documents but reports, as TiledPublisher does, that
    ``lost[uid]`` documents of a run did not reach its store."""

    backup_directory = "/data/backup"

    def __init__(self):
        super().__init__()
        self.lost = {}
        self.flushed = 0

    def flush(self, timeout=None):
        self.flushed += 1
        return True

    def undelivered(self, run_uid):
        return self.lost.get(run_uid, 0)


def test_a_publisher_that_lost_documents_fails_the_derived_stop(tmp_path, frames):
    lossy = _LossyPublisher()
    cb, out = _callback(tmp_path)
    cb.subscribe(lossy)
    bundle = compose_run()
    lossy.lost[bundle.start_doc["uid"]] = 37  # e.g. the raw run's events while Tiled was down
    cb("start", bundle.start_doc)
    desc = _descriptor(bundle, frames[0].shape)
    cb("descriptor", desc.descriptor_doc)
    cb("event", desc.compose_event(data={KEY: frames[0], "det_frame_number": 0}, timestamps={KEY: 0.0, "det_frame_number": 0.0}))
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=60)
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.processed == 1 and lossy.flushed == 1
    stop = out.stop()
    assert stop["exit_status"] == "fail"
    assert "not delivered by _LossyPublisher: raw run 37 document(s) (kept in the backup /data/backup: live-bgsub recover /data/backup)" in stop["reason"]
    # Without losses the same run is a success.
    lossy.lost.clear()
    uid = _run_inline(cb, frames[:1])
    assert cb.wait(uid, timeout=60) and cb.summary(uid).exit_status == "success"


def test_the_error_list_keeps_the_last_errors_and_counts_them_all(tmp_path, frames):
    from live_bgsub.callback import KEEP_ERRORS

    cb, _ = _callback(tmp_path)
    bundle, desc = _stream_of(cb, frames, 1)
    for i in range(KEEP_ERRORS + 5):
        cb("stream_datum", {"uid": f"x{i}", "stream_resource": f"nope{i}", "descriptor": desc.descriptor_doc["uid"],
                            "indices": {"start": 0, "stop": 1}, "seq_nums": {"start": 1, "stop": 2}})
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=60)
    assert cb.error_count == KEEP_ERRORS + 5 and len(cb.errors) == KEEP_ERRORS
    assert "nope5" in cb.errors[0] and f"nope{KEEP_ERRORS + 4}" in cb.errors[-1]
    summary = cb.summary(bundle.start_doc["uid"])
    assert summary.bad_document_count == KEEP_ERRORS + 5 and len(summary.bad_documents) == 100
    assert f"{KEEP_ERRORS + 5} document(s) not understood" in summary.reason


@pytest.mark.slow
def test_prepare_compiles_before_the_first_frame_and_changes_no_number(tmp_path, frames):
    """A model step prepared at subscription compiles nothing while its runs wait, and
    gives the numbers a run that compiled at its first frame gives."""
    cold, cold_out = _callback(tmp_path / "cold", method="model:white-top-hat", batch_size=4)
    uid = _run_inline(cold, frames)
    assert cold.wait(uid, timeout=300)
    assert cold.summary(uid).compilations >= 1  # it waited for its compilation

    warm, warm_out = _callback(tmp_path / "warm", method="model:white-top-hat", batch_size=4)
    assert warm.prepare(frames[0].shape, dtype=frames[0].dtype) > 0
    uids = [_run_inline(warm, frames) for _ in range(2)]  # the prepared path, then one from the cache
    assert all(warm.wait(u, timeout=300) for u in uids)
    for u in uids:
        assert warm.summary(u).processed == len(frames)
        assert warm.summary(u).compilations == 0
    first_run = [e for e in warm_out.events() if e["descriptor"] in {d["uid"] for n, d in warm_out.docs if n == "descriptor" and d["run_start"] == warm_out.start()["uid"]}]
    cold_metrics = [_metrics(e) for e in cold_out.events()]
    assert len(first_run) == len(cold_metrics) == len(frames)
    for got, want in zip(first_run, cold_metrics):
        for key, value in want.items():
            if isinstance(value, float):
                np.testing.assert_allclose(_metrics(got)[key], value, rtol=1e-5, err_msg=key)
            else:
                assert _metrics(got)[key] == value, key
    assert warm.errors == [] and cold.errors == []


def test_prepare_refuses_what_it_cannot_compile(tmp_path):
    classical, _ = _callback(tmp_path / "c")
    assert classical.prepare((1043, 981)) == 0.0  # nothing to compile for a classical method
    with pytest.raises(ValueError, match=r"frame_shape must be \(rows, columns\) of positive integers, got \(0, 5\)"):
        classical.prepare((0, 5))
    with pytest.raises(ValueError, match=r"got \(1043\.0, 981\)"):
        classical.prepare((1043.0, 981))
    model = LiveBackgroundSubtraction(None, method="model:white-top-hat", directory=tmp_path / "m")
    with pytest.raises(ValueError, match="needs the expected geometry"):
        model.prepare((1043, 981))
    classical.close()
    model.close()
