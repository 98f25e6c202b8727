"""Ophyd devices for EPICS hardware: an areaDetector Pilatus writing HDF5 through its file plugin.

:class:`EpicsPilatus` drives, over Channel Access (pyepics, ophyd's default control
layer), an areaDetector camera ``PREFIX cam1:`` and HDF5 file plugin ``PREFIX HDF1:``
such as the simulated IOC of :mod:`live_bgsub.sim.ioc` (``live-bgsub sim-ioc``). To a
bluesky RunEngine it looks like :class:`live_bgsub.sim.detector.SimDetector`: the
frames stay in the HDF5 file the IOC writes and are announced with
StreamResource/StreamDatum documents (data key ``{name}_image``, ``external="STREAM:"``),
which the live callback, TiledWriter and replay read the same way.

Errors
------
:class:`EpicsConnectionError` (a :class:`ConnectionError`) when the IOC's PVs do not
connect within ``connection_timeout``: it names the prefix and the PVs missing.
:class:`AcquisitionError` (a :class:`RuntimeError`) when the file plugin cannot start
a capture, or a frame is not captured in time or the IOC disconnects while it is
being taken: the trigger's status fails and with it the run (exit status ``fail``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path, PurePosixPath

from event_model import compose_stream_resource
from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, Kind
from ophyd.areadetector.base import EpicsSignalWithRBV
from ophyd.status import DeviceStatus

from .errors import LiveBgsubError
from .frame_stream import FrameStreamMixin, ImageSignal, KeyedSignal
from .sim.detector import DATASET, HDF5_MIMETYPE

__all__ = ["CA_REPEATER_PORT", "AcquisitionError", "EpicsConnectionError", "EpicsPilatus", "ca_repeater", "start_ca_repeater"]

logger = logging.getLogger("live_bgsub.devices")

_FRAME_DTYPE = "<i4"  # Pilatus counts: int32
_FILE_TEMPLATE = "%s%s.h5"  # FilePath + FileName: the device names every file uniquely
_MAX_STRING = 255  # areaDetector's long-string waveforms hold 256 chars with the NUL
# How long a put waits for a channel that dropped to come back. ophyd turns a put's
# timeout of None into ten years, and pyepics waits that long for a disconnected channel
# to reconnect: an IOC killed just before a trigger hung the RunEngine thread in
# PV.put (seen once in three CI rehearsals of test_an_ioc_killed_mid_run...).
_PUT_TIMEOUT_S = 2.0


class EpicsConnectionError(LiveBgsubError, ConnectionError):
    """The detector's PVs did not connect (wrong prefix, IOC down, CA address list)."""


class AcquisitionError(LiveBgsubError, RuntimeError):
    """The detector did not capture a frame, or could not start capturing to a file."""


class EpicsPilatus(FrameStreamMixin, Device):
    """An areaDetector Pilatus with an HDF5 file plugin, for a bluesky RunEngine.

    ``stage`` connects (or raises :class:`EpicsConnectionError`), sets ``ImageMode``
    Single, ``NumImages`` 1, ``ArrayCounter`` 0 and the file plugin's ``FilePath``
    (``write_path``), ``FileName`` (``{name}_{uuid}``), ``FileTemplate``
    (``"%s%s.h5"``), ``FileWriteMode`` Stream, ``NumCapture`` 0, then ``Capture`` 1.
    Each ``trigger`` puts ``Acquire`` = 1 and completes when ``HDF1:NumCaptured_RBV``
    reaches the frame's number (a Channel Access monitor; nothing polls), or fails
    after ``acquire_timeout_s`` or as soon as the IOC disconnects. ``read`` +
    ``collect_asset_docs`` announce the frame (StreamResource once per file,
    StreamDatum per frame); ``unstage`` puts ``Capture`` = 0, which closes the file.

    Parameters
    ----------
    prefix : str
        PV prefix of the IOC, e.g. ``"13PIL1:"`` (PVs ``PREFIX cam1:Acquire``, ...).
    name : str
        Device name; the frame's data key is ``f"{name}_image"``.
    write_path : str or path-like
        Folder the IOC writes into, as the IOC sees it (absolute).
    read_path : str or path-like, optional
        The same folder as this process sees it (default ``write_path``); the
        StreamResource ``uri`` points there. Created if missing.
    connection_timeout : float, optional
        Seconds :meth:`wait_for_connection` (and ``stage``) waits for every PV, and
        the bound on each setting ``stage``/``unstage`` writes.
    acquire_time : float, optional
        ``cam1:AcquireTime`` (s) set at stage; default: leave the IOC's value.
    acquire_timeout_s : float, optional
        How long a trigger may take; default ``AcquireTime + timeout_margin_s``.
    timeout_margin_s : float, optional
        Margin over the exposure of the default ``acquire_timeout_s`` (default 10 s).
    geometry : bool, optional
        Read the beam centre (``cam1:BeamX_RBV``, ``cam1:BeamY_RBV``), the sample
        distance (``cam1:DetDist_RBV``, mm), the wavelength (``cam1:Wavelength_RBV``, Å)
        and the simulator's equator rotation (``cam1:EquatorRotation_RBV``) into the
        configuration as ``{name}_center_x``, ``{name}_center_y``,
        ``{name}_distance_mm``, ``{name}_wavelength_nm`` and ``{name}_rotation_deg``:
        the live callback then takes the geometry from there. False (a real Pilatus,
        whose IOC has no rotation record): those keys are left out and the callback
        estimates the geometry from the first frames.
    pixel_size_mm : float, optional
        Pixel pitch recorded as ``{name}_pixel_size_mm`` (default 0.172, Pilatus).
    **kwargs
        Passed to :class:`ophyd.Device`.

    Raises
    ------
    ValueError
        For a relative ``write_path``, a path too long for the file plugin, or a
        non-positive timeout.

    Notes
    -----
    The device assumes it is the only client acquiring: frame ``i`` of a stage is
    frame ``i`` of its file. Readings: ``{name}_image`` (external) and
    ``{name}_frame_number`` (index in the file). Configuration: ``{name}_acquire_time``,
    ``{name}_acquire_period``, ``{name}_pixel_size_mm`` and the geometry keys.

    Examples
    --------
    >>> det = EpicsPilatus("SIM:PIL1:", name="det", write_path="/data/raw")  # doctest: +SKIP
    >>> RE(count([det], num=10))  # doctest: +SKIP
    """

    # camera
    acquire = Cpt(EpicsSignal, "cam1:Acquire", kind=Kind.omitted)
    acquire_time = Cpt(EpicsSignalWithRBV, "cam1:AcquireTime", kind=Kind.config, put_complete=True)
    acquire_period = Cpt(EpicsSignalWithRBV, "cam1:AcquirePeriod", kind=Kind.config)
    num_images = Cpt(EpicsSignalWithRBV, "cam1:NumImages", kind=Kind.omitted, put_complete=True)
    image_mode = Cpt(EpicsSignalWithRBV, "cam1:ImageMode", string=True, kind=Kind.omitted, put_complete=True)
    array_counter = Cpt(EpicsSignalWithRBV, "cam1:ArrayCounter", kind=Kind.omitted, put_complete=True)
    detector_state = Cpt(EpicsSignalRO, "cam1:DetectorState_RBV", string=True, kind=Kind.omitted)
    array_size_x = Cpt(EpicsSignalRO, "cam1:ArraySize0_RBV", kind=Kind.omitted)
    array_size_y = Cpt(EpicsSignalRO, "cam1:ArraySize1_RBV", kind=Kind.omitted)
    # geometry (see the `geometry` parameter); the rotation record exists on the simulator only
    center_x = Cpt(EpicsSignalRO, "cam1:BeamX_RBV", kind=Kind.config)
    center_y = Cpt(EpicsSignalRO, "cam1:BeamY_RBV", kind=Kind.config)
    distance_mm = Cpt(EpicsSignalRO, "cam1:DetDist_RBV", kind=Kind.config)
    wavelength_a = Cpt(EpicsSignalRO, "cam1:Wavelength_RBV", kind=Kind.omitted)
    rotation_deg = Cpt(EpicsSignalRO, "cam1:EquatorRotation_RBV", kind=Kind.config, lazy=True)
    wavelength_nm = Cpt(KeyedSignal, key={"dtype": "number", "shape": [], "dtype_numpy": "<f8", "units": "nm"}, value=math.nan, kind=Kind.config)
    pixel_size_mm = Cpt(KeyedSignal, key={"dtype": "number", "shape": [], "dtype_numpy": "<f8", "units": "mm"}, value=0.172, kind=Kind.config)
    # HDF5 file plugin
    hdf_enable = Cpt(EpicsSignalWithRBV, "HDF1:EnableCallbacks", string=True, kind=Kind.omitted, put_complete=True)
    hdf_file_path = Cpt(EpicsSignalWithRBV, "HDF1:FilePath", string=True, kind=Kind.omitted, put_complete=True)
    hdf_file_name = Cpt(EpicsSignalWithRBV, "HDF1:FileName", string=True, kind=Kind.omitted, put_complete=True)
    hdf_file_template = Cpt(EpicsSignalWithRBV, "HDF1:FileTemplate", string=True, kind=Kind.omitted, put_complete=True)
    hdf_write_mode = Cpt(EpicsSignalWithRBV, "HDF1:FileWriteMode", string=True, kind=Kind.omitted, put_complete=True)
    hdf_num_capture = Cpt(EpicsSignalWithRBV, "HDF1:NumCapture", kind=Kind.omitted, put_complete=True)
    hdf_capture = Cpt(EpicsSignalWithRBV, "HDF1:Capture", string=True, kind=Kind.omitted, put_complete=True)
    hdf_num_captured = Cpt(EpicsSignalRO, "HDF1:NumCaptured_RBV", kind=Kind.omitted)
    hdf_full_file_name = Cpt(EpicsSignalRO, "HDF1:FullFileName_RBV", string=True, kind=Kind.omitted)
    hdf_write_message = Cpt(EpicsSignalRO, "HDF1:WriteMessage", string=True, kind=Kind.omitted)
    # bluesky
    image = Cpt(ImageSignal, value="", kind=Kind.normal)
    frame_number = Cpt(KeyedSignal, key={"dtype": "integer", "shape": [], "dtype_numpy": "<i8"}, value=-1, kind=Kind.normal)

    _GEOMETRY = ("center_x", "center_y", "distance_mm", "wavelength_nm", "rotation_deg")
    lazy_wait_for_connection = False  # wait_for_connection bounds the wait for the lazy rotation PV

    def __init__(
        self,
        prefix: str,
        *,
        name: str,
        write_path,
        read_path=None,
        connection_timeout: float = 5.0,
        acquire_time: float | None = None,
        acquire_timeout_s: float | None = None,
        timeout_margin_s: float = 10.0,
        geometry: bool = True,
        pixel_size_mm: float = 0.172,
        **kwargs,
    ):
        write_path = str(write_path)
        if not PurePosixPath(write_path).is_absolute():
            raise ValueError(f"write_path must be an absolute path (as the IOC sees it), got {write_path!r}")
        if len(write_path) + 1 > _MAX_STRING - 60:
            raise ValueError(f"write_path {write_path!r} is too long for the file plugin's FilePath ({_MAX_STRING} chars with the file name)")
        for label, value in (("connection_timeout", connection_timeout), ("timeout_margin_s", timeout_margin_s)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        if acquire_timeout_s is not None and not acquire_timeout_s > 0:
            raise ValueError(f"acquire_timeout_s must be a positive number of seconds or None, got {acquire_timeout_s!r}")
        if acquire_time is not None and not acquire_time >= 0:
            raise ValueError(f"acquire_time must be >= 0 s or None, got {acquire_time!r}")
        super().__init__(prefix, name=name, connection_timeout=float(connection_timeout), **kwargs)
        self.write_path = write_path.rstrip("/") or "/"
        self.read_path = Path(read_path if read_path is not None else write_path)
        self.acquire_time_s = acquire_time
        self.acquire_timeout_s = acquire_timeout_s
        self.timeout_margin_s = float(timeout_margin_s)
        self.geometry = bool(geometry)
        self.pixel_size_mm.put(float(pixel_size_mm))
        if not self.geometry:
            self.configuration_attrs = [a for a in self.configuration_attrs if a not in self._GEOMETRY]

        # Per-stage state.
        self._file_path: Path | None = None
        self._ioc_file_path: str | None = None
        self._asset_docs_cache: deque = deque()
        self._stream_datum_factory = None
        self._frames_requested = 0
        self._frames_done = 0
        self._frames_announced = 0
        self._pending: _FrameWait | None = None

    # ------------------------------------------------------------------ connection

    def _connection_signals(self) -> list:
        signals = [walk.item for walk in self.walk_signals(include_lazy=False)]
        if self.geometry:
            signals.append(self.rotation_deg)
        return [s for s in signals if hasattr(s, "pvname")]

    def wait_for_connection(self, all_signals: bool = False, timeout: float | None = None) -> None:
        """Wait until every PV the device uses is connected.

        Parameters
        ----------
        all_signals : bool, optional
            Ignored (the device always waits for the PVs it needs).
        timeout : float, optional
            Seconds; default ``connection_timeout``.

        Raises
        ------
        EpicsConnectionError
            Naming the prefix and the PVs that did not connect in time.
        """
        timeout = self.connection_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        signals = self._connection_signals()
        for signal in signals:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                signal.wait_for_connection(timeout=remaining)
            except TimeoutError:
                if remaining <= 0:
                    break
        missing = [pv for s in signals if not s.connected for pv in _pvnames(s)]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            ca = {k: os.environ.get(k) for k in ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST")}
            if self.geometry and missing == [self.rotation_deg.pvname]:
                raise EpicsConnectionError(
                    f"EPICS detector {self.name!r}: only {missing[0]} did not connect within {timeout:g} s: "
                    "that record exists on the simulated IOC only; pass geometry=False for a real Pilatus"
                )
            raise EpicsConnectionError(
                f"EPICS detector {self.name!r}: {len(missing)} of the PVs with prefix {self.prefix!r} did not "
                f"connect within {timeout:g} s ({shown}). Is the IOC running and the prefix right "
                f"(e.g. `live-bgsub sim-ioc --prefix {self.prefix}`)? Channel Access settings: {ca}"
            )

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(rows, columns)`` from ``cam1:ArraySize1_RBV`` / ``ArraySize0_RBV``."""
        return int(self.array_size_y.get()), int(self.array_size_x.get())

    @property
    def file_path(self) -> Path | None:
        """The file of the current (or latest) stage, as this process sees it."""
        return self._file_path

    @property
    def ioc_file_path(self) -> str | None:
        """The same file as the IOC named it (``HDF1:FullFileName_RBV``)."""
        return self._ioc_file_path if self._file_path is not None else None

    # ------------------------------------------------------------------ bluesky interface

    def _image_data_key(self) -> dict:
        return {
            "source": f"PV:{self.prefix}HDF1:{DATASET}",
            "dtype": "array",
            "shape": list(self.shape),
            "dtype_numpy": _FRAME_DTYPE,
            "external": "STREAM:",
        }

    def read_configuration(self):
        if self.geometry:
            wavelength_a = self.wavelength_a.get()
            self.wavelength_nm.put(float(wavelength_a) / 10.0 if wavelength_a else math.nan)
        return super().read_configuration()

    def stage(self):
        """Connect, configure the camera and the file plugin, and start capturing to a new file.

        Raises
        ------
        EpicsConnectionError
            The PVs did not connect within ``connection_timeout``.
        AcquisitionError
            The file plugin did not start capturing (its ``WriteMessage`` says why).
        """
        self.wait_for_connection()
        return super().stage()

    def trigger(self) -> DeviceStatus:
        """Acquire one frame; the status completes when the file plugin has captured it.

        Returns
        -------
        DeviceStatus
            Fails with :class:`AcquisitionError` after ``acquire_timeout_s`` or when the
            IOC disconnects first.

        Raises
        ------
        RuntimeError
            If the device is not staged.
        """
        if self._stream_datum_factory is None:
            raise RuntimeError(f"{self.name} is not staged: stage it (no file is capturing) before triggering")
        if self._pending is not None and not self._pending.status.done:
            raise RuntimeError(f"{self.name}: trigger called while frame {self._pending.target} is still being taken")
        self._frames_requested += 1
        status = DeviceStatus(self)
        wait = _FrameWait(self, status, self._frames_requested, self._trigger_timeout())
        self._pending = wait
        wait.start()
        if not status.done:
            try:
                self.acquire.put(1, timeout=_PUT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure fails this frame's status
                wait.fail(f"putting {self.acquire.pvname} = 1 failed: {type(exc).__name__}: {exc}")
        return status

    def stop(self, *, success: bool = False) -> None:
        """Abort: put ``Acquire`` = 0 and fail the frame being taken."""
        if self._pending is not None:
            self._pending.fail("the detector was stopped")
        if self.acquire.connected:
            try:
                self.acquire.put(0, timeout=_PUT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - stopping must not raise
                logger.warning("%s: could not stop the acquisition: %s", self.name, exc)
        super().stop(success=success)

    # ------------------------------------------------------------------ staging

    def _trigger_timeout(self) -> float:
        if self.acquire_timeout_s is not None:
            return float(self.acquire_timeout_s)
        exposure = self.acquire_time.get()
        return float(exposure or 0.0) + self.timeout_margin_s

    def _set(self, signal, value) -> None:
        """Write a setting and wait for the IOC to have processed it (put-callback)."""
        try:
            signal.set(value, timeout=self.connection_timeout).wait(self.connection_timeout)
        except Exception as exc:
            raise AcquisitionError(
                f"{self.name}: setting {getattr(signal, 'setpoint_pvname', signal.name)} = {value!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _open(self) -> None:
        self.read_path.mkdir(parents=True, exist_ok=True)
        if self.hdf_capture.get(use_monitor=False) != "Done":  # left capturing (e.g. by a crashed session)
            self._set(self.hdf_capture, "Done")
        if self.detector_state.get(use_monitor=False) != "Idle":  # e.g. left in Continuous mode
            self._set(self.acquire, 0)
        name = f"{self.name}_{uuid.uuid4()}"
        settings = [
            (self.image_mode, "Single"), (self.num_images, 1), (self.array_counter, 0),
            (self.hdf_enable, "Enable"), (self.hdf_file_path, self.write_path.rstrip("/") + "/"), (self.hdf_file_name, name),
            (self.hdf_file_template, _FILE_TEMPLATE), (self.hdf_write_mode, "Stream"), (self.hdf_num_capture, 0),
        ]  # fmt: skip
        if self.acquire_time_s is not None:
            settings.insert(0, (self.acquire_time, float(self.acquire_time_s)))
        for signal, value in settings:
            self._set(signal, value)
        self._set(self.hdf_capture, "Capture")
        if self.hdf_capture.get(use_monitor=False) != "Capture":
            message = self.hdf_write_message.get(use_monitor=False)
            raise AcquisitionError(
                f"{self.name}: the file plugin {self.prefix}HDF1: did not start capturing to "
                f"{self.write_path}/{name}.h5: {message or 'no WriteMessage'}"
            )
        ioc_path = self.hdf_full_file_name.get(use_monitor=False)
        captured = int(self.hdf_num_captured.get(use_monitor=False))
        if captured != 0:
            raise AcquisitionError(f"{self.name}: {self.prefix}HDF1:NumCaptured_RBV is {captured} after a new capture, expected 0")
        self._ioc_file_path = ioc_path
        self._file_path = self._local_path(ioc_path)
        rows, cols = self.shape
        bundle = compose_stream_resource(
            mimetype=HDF5_MIMETYPE,
            uri="file://localhost" + self._file_path.as_posix(),
            data_key=self.image.name,
            parameters={"dataset": DATASET, "chunk_shape": [1, rows, cols], "swmr": True},
        )
        self._asset_docs_cache.clear()
        self._asset_docs_cache.append(("stream_resource", bundle.stream_resource_doc))
        self._stream_datum_factory = bundle.compose_stream_datum
        self._frames_requested = self._frames_done = self._frames_announced = 0
        self.frame_number.put(-1)

    def _local_path(self, ioc_path: str) -> Path:
        try:
            relative = PurePosixPath(ioc_path).relative_to(self.write_path)
        except ValueError:
            raise AcquisitionError(
                f"{self.name}: the IOC writes {ioc_path!r}, outside write_path {self.write_path!r}"
            ) from None
        return (self.read_path / relative).resolve()

    def _close(self) -> None:
        if self._pending is not None:
            self._pending.fail("the detector was unstaged")
            self._pending = None
        self._stream_datum_factory = None
        self._asset_docs_cache.clear()
        if not self.hdf_capture.connected:
            logger.warning("%s: the IOC %s is not connected; its file was not closed by Capture=0", self.name, self.prefix)
            return
        try:
            self._set(self.hdf_capture, "Done")
        except AcquisitionError as exc:
            logger.warning("%s: %s", self.name, exc)

    def _frame_captured(self, target: int) -> None:
        self._frames_done = max(self._frames_done, target)
        self.frame_number.put(target - 1)


class _FrameWait:
    """Completes ``status`` when ``NumCaptured_RBV >= target``; fails it on timeout or disconnect."""

    def __init__(self, det: EpicsPilatus, status: DeviceStatus, target: int, timeout: float):
        self.det, self.status, self.target, self.timeout = det, status, target, timeout
        self._lock = threading.Lock()
        self._finished = False
        self._tokens: list = []
        self._timer = threading.Timer(timeout, self._timed_out)
        self._timer.daemon = True

    def start(self) -> None:
        signal = self.det.hdf_num_captured
        self._tokens = [
            (signal, signal.subscribe(self._on_value, event_type=signal.SUB_VALUE, run=True)),
            (signal, signal.subscribe(self._on_meta, event_type=signal.SUB_META, run=False)),
        ]
        self._timer.start()
        if not signal.connected:
            self.fail(f"the IOC is not connected ({signal.pvname})")

    def _on_value(self, *, value, **kwargs) -> None:
        if value is not None and int(value) >= self.target:
            self._finish(None)

    def _on_meta(self, *, connected=True, **kwargs) -> None:
        if not connected:
            self.fail(f"the IOC disconnected ({self.det.hdf_num_captured.pvname})")

    def _timed_out(self) -> None:
        det = self.det
        try:
            state = (det.hdf_num_captured.get(), det.detector_state.get(), det.hdf_write_message.get())
            detail = f"NumCaptured_RBV={state[0]}, DetectorState_RBV={state[1]!r}, WriteMessage={state[2]!r}"
        except Exception as exc:  # noqa: BLE001 - the IOC may be gone: say so
            detail = f"state unreadable: {type(exc).__name__}: {exc}"
        self.fail(f"not captured within {self.timeout:g} s ({detail}); is the IOC alive?")

    def fail(self, reason: str) -> None:
        det = self.det
        self._finish(
            AcquisitionError(f"{det.name}: frame {self.target} of {det.file_path or 'the capture file'} (IOC {det.prefix!r}): {reason}")
        )

    def _finish(self, error: Exception | None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._timer.cancel()
        for signal, token in self._tokens:
            signal.unsubscribe(token)
        if error is None:
            self.det._frame_captured(self.target)
            self.status.set_finished()
        else:
            self.status.set_exception(error)


def _pvnames(signal) -> list[str]:
    names = [signal.pvname]
    setpoint = getattr(signal, "setpoint_pvname", None)
    if setpoint and setpoint != signal.pvname:
        names.append(setpoint)
    return names


#: Where Channel Access clients find the CA repeater (EPICS' default port).
CA_REPEATER_PORT = 5065


def start_ca_repeater(timeout: float = 5.0):
    """Make sure a Channel Access repeater answers before libca starts; return what was started.

    libca (pyepics, ophyd's control layer) spawns the ``caRepeater`` executable when no
    repeater holds its UDP port, and prints a four-line warning when that executable
    is not on ``PATH`` (the pip-installed libca ships none). CA works without a
    repeater (it relays beacons), so the warning is noise: when the port is free and
    ``caRepeater`` is missing, caproto's repeater is started instead, as a child process
    that the caller stops (``terminate()``) when done. Nothing is started when a
    repeater already runs or ``caRepeater`` is on ``PATH``; a repeater that does not
    come up within ``timeout`` is stopped and libca's warning is let through.

    Returns
    -------
    subprocess.Popen or None
    """
    import shutil
    import socket
    import subprocess
    import sys

    from .procutil import DeadlinePassed, wait_until

    port = int(os.environ.get("EPICS_CA_REPEATER_PORT", CA_REPEATER_PORT))

    def taken() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return True
            return False

    if taken() or shutil.which("caRepeater"):
        return None
    proc = subprocess.Popen(
        [sys.executable, "-c", "from caproto.commandline.repeater import main; main()", "-q"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "EPICS_CA_REPEATER_PORT": str(port)},
    )
    try:
        wait_until(lambda: proc.poll() is not None or taken(), timeout, what=f"caproto's CA repeater on UDP port {port}")
    except DeadlinePassed:
        pass
    if proc.poll() is None and taken():
        return proc
    proc.kill()
    proc.wait()
    logger.info("live_bgsub: no CA repeater could be started on UDP port %d", port)
    return None


@contextlib.contextmanager
def ca_repeater():
    """:func:`start_ca_repeater` for the block: what it started is stopped on leaving."""
    proc = start_ca_repeater()
    try:
        yield proc
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
