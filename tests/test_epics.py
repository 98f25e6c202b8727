"""The simulated Pilatus IOC and EpicsPilatus over real Channel Access (loopback, no mocks).

Each IOC runs in a child process (``run_ioc_subprocess``) under a prefix unique to this
module; the client side is pyepics, ophyd's default control layer. Nothing waits by
sleeping: CA monitors, statuses and the callback's ``wait`` synchronise the tests.

The devices are not ``destroy()``-ed: with ophyd 1.11 and pyepics 3.5.10, destroying
an ophyd signal clears the CA channel that every pyepics PV object of that name in the
process shares (caget's cached PVs, the monitors here); a monitored PV object of the
same name then segfaulted when garbage-collected.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

import epics
import h5py
import numpy as np
import ophyd
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from bluesky.utils import FailedStatus
from conftest import Collector

from live_bgsub.beamline import Beamline, BeamlineConfig
from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.catalog import derived_runs, frames, metrics_table
from live_bgsub.cli import process_image
from live_bgsub.devices import AcquisitionError, EpicsConnectionError, EpicsPilatus
from live_bgsub.sim.detector import DATASET
from live_bgsub.sim.ioc import DETECTOR_STATES, render_bank, run_ioc_subprocess
from live_bgsub.sim.ioc import main as ioc_main
from live_bgsub.sinks.tiled import TiledPublisher
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

pytestmark = pytest.mark.slow  # IOC subprocesses and Channel Access timeouts

N = 5
SEED, PATTERNS = 7, 3
_TOKEN = secrets.token_hex(3).upper()
PREFIX = f"LBT{_TOKEN}:"  # the shared IOC
KILL_PREFIX = f"LBK{_TOKEN}:"  # the IOC killed mid-run


class Monitor:
    """Every value a CA monitor delivers for one PV; ``wait_for`` blocks on a condition.

    An enum PV's monitor carries the index: ``enum`` maps it to the state names (known
    from the IOC; a ``form="ctrl"`` PV would fetch them, but see the module docstring).
    """

    def __init__(self, name: str, *, enum: tuple[str, ...] | None = None):
        self.values: list = []
        self._cond = threading.Condition()
        self._strings = enum
        self.pv = epics.PV(name, auto_monitor=True, callback=self._changed)
        assert self.pv.wait_for_connection(timeout=10), f"{name} did not connect"

    def _changed(self, value=None, **kwargs):
        with self._cond:
            self.values.append(self._strings[value] if self._strings else value)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self.values)), timeout)

    def close(self):
        self.pv.clear_callbacks()
        self.pv.disconnect()


def _get(name: str, **kwargs):
    value = epics.caget(name, use_monitor=False, timeout=5, **kwargs)
    assert value is not None, f"caget {name} timed out"
    return value


@pytest.fixture(scope="module")
def bank():
    return render_bank("pilatus-1m", seed=SEED, n_patterns=PATTERNS)


@pytest.fixture(scope="module")
def ioc():
    with run_ioc_subprocess(PREFIX, seed=SEED, n_patterns=PATTERNS, acquire_time=0.0, acquire_period=0.0) as process:
        yield process


def _assert_frames_are_the_bank(path, bank, n, first=0):
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        data = f[DATASET][()]
    assert data.shape == (n, *bank.shape) and data.dtype == np.int32
    for i in range(n):
        np.testing.assert_array_equal(data[i], bank.frames[(first + i) % PATTERNS], err_msg=f"frame {i}")
    return data


def test_pyepics_is_the_control_layer():
    assert ophyd.cl.name == "pyepics"


def test_list_pvs_needs_no_network(capsys):
    assert ioc_main(["--prefix", "X:", "--list-pvs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split("\t")[0] for line in lines}
    for suffix in ("cam1:Acquire", "cam1:DetectorState_RBV", "cam1:ArraySize0_RBV", "image1:ArrayData",
                   "HDF1:FullFileName_RBV", "HDF1:Capture", "HDF1:NumCaptured_RBV"):  # fmt: skip
        assert "X:" + suffix in names
    assert "X:image1:ArrayData\tLONG[1023183]\tro" in lines  # a full Pilatus 1M frame
    assert ioc_main(["--prefix", "has space", "--list-pvs"]) == 2


def test_records_and_detector_states_over_channel_access(ioc, bank):
    rows, cols = bank.shape
    assert (_get(ioc.pv("cam1:ArraySize0_RBV")), _get(ioc.pv("cam1:ArraySize1_RBV"))) == (cols, rows)
    assert _get(ioc.pv("cam1:BeamX_RBV")) == pytest.approx(bank.geometry["center"][0])
    assert _get(ioc.pv("cam1:EquatorRotation_RBV")) == pytest.approx(bank.geometry["rotation_deg"])
    assert _get(ioc.pv("cam1:DetectorState_RBV"), as_string=True) == "Idle"

    # Single: Idle -> Acquire -> Idle, one more array, the bank frame in image1:ArrayData.
    counter = _get(ioc.pv("cam1:ArrayCounter_RBV"))
    assert epics.caput(ioc.pv("cam1:AcquireTime"), 0.2, wait=True) == 1
    assert epics.caput(ioc.pv("cam1:ImageMode"), "Single", wait=True) == 1
    state = Monitor(ioc.pv("cam1:DetectorState_RBV"), enum=DETECTOR_STATES)
    try:
        assert state.wait_for(lambda v: v == ["Idle"])
        t0 = time.monotonic()
        epics.caput(ioc.pv("cam1:Acquire"), 1)
        assert state.wait_for(lambda v: v == ["Idle", "Acquire", "Idle"]), state.values
        assert time.monotonic() - t0 >= 0.2  # the exposure
        assert _get(ioc.pv("cam1:ArrayCounter_RBV")) == counter + 1
        assert _get(ioc.pv("cam1:Acquire")) == 0
        image = _get(ioc.pv("image1:ArrayData"))  # 4 MB: needs EPICS_CA_MAX_ARRAY_BYTES (conftest)
        np.testing.assert_array_equal(image.reshape(rows, cols), bank.frames[counter % PATTERNS])

        # Multiple: NumImages frames at AcquirePeriod, then Idle again.
        for suffix, value in (("cam1:AcquireTime", 0.0), ("cam1:AcquirePeriod", 0.05), ("cam1:NumImages", 3), ("cam1:ImageMode", "Multiple")):
            assert epics.caput(ioc.pv(suffix), value, wait=True) == 1
        t0 = time.monotonic()
        epics.caput(ioc.pv("cam1:Acquire"), 1)
        assert state.wait_for(lambda v: v[-2:] == ["Acquire", "Idle"] and len(v) == 5), state.values
        assert time.monotonic() - t0 >= 2 * 0.05
        assert _get(ioc.pv("cam1:ArrayCounter_RBV")) == counter + 4
        assert _get(ioc.pv("cam1:NumImagesCounter_RBV")) == 3
    finally:
        state.close()
        for suffix, value in (("cam1:ImageMode", "Single"), ("cam1:AcquirePeriod", 0.0), ("cam1:NumImages", 1)):
            epics.caput(ioc.pv(suffix), value, wait=True)


def test_a_capture_that_cannot_start_says_why(ioc, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    assert epics.caput(ioc.pv("HDF1:FilePath"), str(missing), wait=True) == 1
    assert _get(ioc.pv("HDF1:FilePath_RBV"), as_string=True) == f"{missing}/"
    assert _get(ioc.pv("HDF1:FilePathExists_RBV"), as_string=True) == "No"
    assert epics.caput(ioc.pv("HDF1:Capture"), 1, wait=True) == 1
    assert _get(ioc.pv("HDF1:Capture_RBV"), as_string=True) == "Done"
    assert _get(ioc.pv("HDF1:WriteStatus"), as_string=True) == "Write error"
    assert "does not exist" in _get(ioc.pv("HDF1:WriteMessage"), as_string=True)


def test_count_with_the_live_callback(ioc, bank, tmp_path):
    det = EpicsPilatus(ioc.prefix, name="det", write_path=tmp_path / "raw", acquire_time=0.0)
    raw, derived = Collector(), Collector()
    cb = LiveBackgroundSubtraction(derived, directory=tmp_path / "derived", on_full="block")
    RE = RunEngine({})
    RE.subscribe(raw)
    RE.subscribe(cb)
    try:
        (uid,) = RE(count([det], num=N))
        assert cb.wait(uid, timeout=120)
    finally:
        cb.close()
    summary = cb.summary(uid)
    assert (summary.received, summary.processed, summary.failed) == (N, N, {})
    assert raw.of("stop")[0]["exit_status"] == "success"
    assert derived.of("stop")[0]["exit_status"] == "success"
    # The descriptor carries the IOC's geometry truth; the callback used it.
    config = raw.of("descriptor")[0]["configuration"]["det"]["data"]
    assert (config["det_center_x"], config["det_center_y"]) == pytest.approx(bank.geometry["center"])
    assert config["det_wavelength_nm"] == pytest.approx(bank.geometry["wavelength_nm"])
    start = derived.of("start")[0]
    assert start["geometry"]["source"] == "configuration"
    assert start["geometry"]["center"] == pytest.approx(bank.geometry["center"])
    # One StreamResource for the IOC's file, one StreamDatum per frame.
    [sres] = raw.of("stream_resource")
    assert sres["uri"] == f"file://localhost{det.file_path}" and sres["data_key"] == "det_image"
    assert [d["indices"] for d in raw.of("stream_datum")] == [{"start": i, "stop": i + 1} for i in range(N)]
    # The file the IOC wrote holds the bank, in order; the derived frames equal `process`.
    _assert_frames_are_the_bank(det.file_path, bank, N)
    dres = derived.of("stream_resource")[0]
    with h5py.File(dres["uri"][len("file://localhost") :], "r") as f:
        corrected = f[dres["parameters"]["dataset"]][()]
    center, rotation = start["geometry"]["center"], start["geometry"]["rotation_deg"]
    for i in (0, N - 1):
        _, arrays = process_image(det.file_path, frame=i, center=center, rotation_deg=rotation)
        np.testing.assert_allclose(corrected[i], arrays["corrected"], rtol=1e-6, atol=1e-4)



def test_a_frame_that_never_reaches_the_file_times_out(ioc, tmp_path):
    # The camera produces frames but none reaches the file plugin: the trigger must
    # fail after acquire_timeout_s, saying what the IOC reports.
    det = EpicsPilatus(ioc.prefix, name="det", write_path=tmp_path, acquire_time=0.0, acquire_timeout_s=1.0, geometry=False)
    assert epics.caput(ioc.pv("cam1:ArrayCallbacks"), "Disable", wait=True) == 1
    raw = Collector()
    RE = RunEngine({})
    RE.subscribe(raw)
    try:
        t0 = time.monotonic()
        with pytest.raises(FailedStatus) as failure:
            RE(count([det], num=2))
        assert 1.0 <= time.monotonic() - t0 < 1.0 + 3.0
    finally:
        epics.caput(ioc.pv("cam1:ArrayCallbacks"), "Enable", wait=True)
    error = failure.value.args[0].exception()
    assert isinstance(error, AcquisitionError)
    assert "frame 1" in str(error) and "not captured within 1 s" in str(error) and "NumCaptured_RBV=0" in str(error)
    [stop] = raw.of("stop")
    assert stop["exit_status"] == "fail"
    assert raw.of("descriptor") == []  # no frame was ever read
    # geometry=False: no geometry keys in the configuration (the callback estimates it).
    assert not any(k.endswith(("center_x", "center_y", "rotation_deg")) for k in det.read_configuration())

def test_count_into_tiled(ioc, bank, tmp_path):
    raw_dir, derived_dir = tmp_path / "raw", tmp_path / "derived"
    raw_dir.mkdir()
    derived_dir.mkdir()
    with EmbeddedTiledServer(tmp_path / "tiled", readable_storage=[raw_dir, derived_dir]) as server:
        catalog = connect(server.uri, api_key=server.api_key)
        publisher = TiledPublisher(catalog)
        det = EpicsPilatus(ioc.prefix, name="det", write_path=raw_dir, acquire_time=0.0)
        cb = LiveBackgroundSubtraction(publisher, directory=derived_dir, on_full="block")
        RE = RunEngine({})
        RE.subscribe(publisher)  # raw and derived runs through one writer path
        RE.subscribe(cb)
        try:
            (uid,) = RE(count([det], num=N), purpose="epics")
            assert cb.wait(uid, timeout=180)
            assert publisher.flush(timeout=180)
            assert publisher.errors == []
        finally:
            cb.close()
            publisher.close()
        raw = catalog[uid]
        assert raw.metadata["stop"]["exit_status"] == "success"
        assert raw.metadata["stop"]["num_events"]["primary"] == N
        data = _assert_frames_are_the_bank(det.file_path, bank, N)
        np.testing.assert_array_equal(frames(raw, "det_image"), data)  # registered, read through Tiled
        [derived] = derived_runs(catalog, uid)
        assert derived.metadata["stop"]["exit_status"] == "success"
        table = metrics_table(derived)
        assert table["raw_seq_num"].tolist() == list(range(1, N + 1))
        assert frames(derived, "corrected").shape[0] == N


def test_a_wrong_prefix_is_a_clear_connection_error(tmp_path):
    prefix = f"NOIOC{_TOKEN}:"
    det = EpicsPilatus(prefix, name="det", write_path=tmp_path, connection_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(EpicsConnectionError, match=re.escape(f"prefix {prefix!r}")) as error:
        det.wait_for_connection()
    assert time.monotonic() - t0 < 2.0 + 3.0
    assert f"{prefix}cam1:Acquire" in str(error.value) and "EPICS_CA_ADDR_LIST" in str(error.value)
    assert isinstance(error.value, ConnectionError)
    # Through a RunEngine: staging fails before any run is opened.
    docs = Collector()
    RE = RunEngine({})
    RE.subscribe(docs)
    t0 = time.monotonic()
    with pytest.raises(EpicsConnectionError, match=re.escape(prefix)):
        RE(count([det], num=1))
    assert time.monotonic() - t0 < 2.0 + 3.0
    assert docs.of("start") == []


def test_an_ioc_killed_mid_run_fails_the_run_and_keeps_its_frames(bank, tmp_path):
    k = 3
    with run_ioc_subprocess(KILL_PREFIX, seed=SEED, n_patterns=PATTERNS, acquire_time=0.0, acquire_period=0.0) as ioc:
        det = EpicsPilatus(ioc.prefix, name="det", write_path=tmp_path / "raw", acquire_time=0.0, acquire_timeout_s=10.0)
        raw, derived = Collector(), Collector()
        cb = LiveBackgroundSubtraction(derived, directory=tmp_path / "derived", on_full="block")
        RE = RunEngine({})
        RE.subscribe(raw)
        RE.subscribe(cb)

        def crash_after_k_frames(name, doc):
            if name == "event" and doc["seq_num"] == k:
                ioc.kill()  # SIGKILL: the IOC closes nothing

        RE.subscribe(crash_after_k_frames)
        t0 = time.monotonic()
        try:
            with pytest.raises(FailedStatus) as failure:
                RE(count([det], num=N))
            elapsed = time.monotonic() - t0
            [start] = raw.of("start")
            assert cb.wait(start["uid"], timeout=120)
        finally:
            cb.close()
    assert elapsed < 10.0  # the disconnect fails the frame at once, not after the timeout
    error = failure.value.args[0].exception()
    assert isinstance(error, AcquisitionError) and f"frame {k + 1}" in str(error)
    assert "disconnected" in str(error) or "not connected" in str(error) or "failed" in str(error)
    [stop] = raw.of("stop")
    assert stop["exit_status"] == "fail" and stop["num_events"]["primary"] == k
    # Every frame written before the crash is in the file (SWMR: flushed per frame).
    _assert_frames_are_the_bank(det.file_path, bank, k)
    # The file the killed IOC left behind is still marked open for SWMR writing:
    # read_image (and so `live-bgsub process`) opens it as a SWMR reader.
    from live_bgsub.io import read_image

    image = read_image(det.file_path, frame=k - 1)
    assert image.n_frames == k and np.array_equal(image.data[image.mask], bank.frames[(k - 1) % len(bank.frames)][image.mask])
    summary = cb.summary(start["uid"])
    assert summary.processed == k
    [derived_stop] = derived.of("stop")
    assert derived_stop["exit_status"] == "fail"
    assert "raw run exit_status 'fail'" in derived_stop["reason"]


def test_the_beamline_builds_an_epics_pilatus_for_a_prefix(ioc, tmp_path):
    beamline = Beamline(BeamlineConfig(directory=str(tmp_path), detector="epics", epics_prefix=ioc.prefix))
    det = beamline.make_detector(tmp_path / "raw")  # connects at once
    assert isinstance(det, EpicsPilatus) and det.prefix == ioc.prefix and det.name == "det"
    assert det.write_path == str(tmp_path / "raw") and det.connected
    # An IOC that is not there stops the beamline at start, naming the prefix.
    absent = Beamline(BeamlineConfig(directory=str(tmp_path), detector="epics", epics_prefix=f"NOIOC{_TOKEN}:", connection_timeout_s=2.0))
    with pytest.raises(EpicsConnectionError, match=f"NOIOC{_TOKEN}:"):
        absent.make_detector(tmp_path / "raw")
