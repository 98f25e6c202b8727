"""The callback subscribed to a real RunEngine, with the simulated detector writing HDF5."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from conftest import Collector

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.cli import process_image
from live_bgsub.engine import ProcessingStep, make_step
from live_bgsub.sim import SimDetector


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("raw")


@pytest.mark.parametrize("asset_docs", ["stream", "resource"])
def test_count_with_callback(tmp_path, detector_dir, asset_docs):
    det = SimDetector(name="det", directory=detector_dir, n_patterns=3, seed=11, asset_docs=asset_docs)
    raw, derived = Collector(), Collector()
    cb = LiveBackgroundSubtraction(derived, directory=tmp_path, on_full="block")
    RE = RunEngine({})
    RE.subscribe(raw)
    RE.subscribe(cb)
    (uid,) = RE(count([det], num=4))
    assert cb.wait(uid, timeout=120)
    summary = cb.summary(uid)
    assert (summary.received, summary.processed, summary.failed) == (4, 4, {})
    # The geometry came from the detector's configuration in the descriptor.
    start = derived.of("start")[0]
    assert start["geometry"]["source"] == "configuration"
    assert start["geometry"]["center"] == pytest.approx(det.geometry["center"])
    assert derived.of("stop")[0]["exit_status"] == "success"
    # The raw run is intact: all frames in the detector's file.
    assert raw.of("stop")[0]["exit_status"] == "success"
    with h5py.File(det.file_path, "r") as f:
        assert f["/entry/data/data"].shape[0] == 4
    # Derived frames equal `live-bgsub process` on the same frames.
    sres = derived.of("stream_resource")[0]
    with h5py.File(sres["uri"][len("file://localhost") :], "r") as f:
        corrected = f[sres["parameters"]["dataset"]][()]
    events = [e for e in derived.of("event") if "raw_seq_num" in e["data"] and "status" not in e["data"]]
    for i in (0, 3):
        record, arrays = process_image(det.file_path, frame=i, center=start["geometry"]["center"], rotation_deg=start["geometry"]["rotation_deg"])
        np.testing.assert_allclose(corrected[i], arrays["corrected"], rtol=1e-6, atol=1e-4)
        assert events[i]["data"]["i11_i10"] == pytest.approx(record["metrics"]["i11_i10"], rel=1e-6)


class _Explodes(ProcessingStep):
    method = "explodes"

    def subtract(self, folds, masks):
        raise RuntimeError("GPU fell off the bus")

    def describe(self):
        return {"method": self.method}


def test_a_failing_step_never_reaches_the_run_engine(tmp_path, detector_dir):
    det = SimDetector(name="det", directory=detector_dir, n_patterns=2, seed=3)
    raw, derived = Collector(), Collector()
    cb = LiveBackgroundSubtraction(derived, method=_Explodes(), directory=tmp_path)
    RE = RunEngine({})
    RE.subscribe(raw)
    RE.subscribe(cb)
    (uid,) = RE(count([det], num=3))
    assert cb.wait(uid, timeout=120)
    assert raw.of("stop")[0]["exit_status"] == "success"
    with h5py.File(det.file_path, "r") as f:
        assert f["/entry/data/data"].shape[0] == 3
    summary = cb.summary(uid)
    assert summary.processed == 0 and sorted(summary.failed) == [1, 2, 3]
    assert all("GPU fell off the bus" in e for e in summary.failed.values())
    stop = derived.of("stop")[0]
    assert stop["exit_status"] == "fail" and "failed 3" in stop["reason"]


def test_two_runs_in_a_row_get_two_derived_runs(tmp_path, detector_dir):
    det = SimDetector(name="det", directory=detector_dir, n_patterns=2, seed=5)
    derived = Collector()
    cb = LiveBackgroundSubtraction(derived, method=make_step("smoothed-gaussian", downsample=2), directory=tmp_path)
    RE = RunEngine({})
    RE.subscribe(cb)
    uids = RE(count([det], num=2)) + RE(count([det], num=3))
    assert cb.wait(timeout=120)
    starts = derived.of("start")
    assert [s["raw_uid"] for s in starts] == list(uids)
    assert [cb.summary(u).processed for u in uids] == [2, 3]
    assert starts[0]["processing"]["downsample"] == 2
    assert {s["run_start"] for s in derived.of("stop")} == {s["uid"] for s in starts}
