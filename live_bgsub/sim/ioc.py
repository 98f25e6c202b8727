"""A simulated areaDetector Pilatus IOC (caproto, pure Python) writing synthetic frames to HDF5.

``live-bgsub sim-ioc --prefix PREFIX`` (or ``python -m live_bgsub.sim.ioc``) serves, over
Channel Access, a documented subset of the records of an areaDetector camera
(``PREFIX cam1:``), an image plugin (``PREFIX image1:``) and an HDF5 file plugin
(``PREFIX HDF1:``); ``docs/epics.md`` lists every PV. The frames are the simulated
detector's (:class:`live_bgsub.sim.detector.SimDetector`): a bank of ``n_patterns``
synthetic fiber frames from :func:`live_bgsub.synth.make_pattern`, rendered once at
start-up and cycled through, frame ``k`` of the camera (``ArrayCounter`` before the
frame) being bank frame ``k % n_patterns``.

Behaviour (the simulated hardware)
----------------------------------
- ``cam1:Acquire`` = 1 starts an acquisition: ``Single`` takes one frame after
  ``AcquireTime``; ``Multiple`` takes ``NumImages`` frames, one per
  ``max(AcquirePeriod, AcquireTime)``; ``Continuous`` runs until ``Acquire`` = 0. The
  exposure is an asyncio sleep. ``DetectorState_RBV`` is ``Acquire`` meanwhile and
  goes back to ``Idle``, and ``Acquire`` to 0, when the last frame is read out, before
  the plugins have handled it (as on a real areaDetector, where plugins run in their
  own threads). ``Acquire`` is not a busy record: a put-with-callback returns at once.
- Each frame increments ``cam1:ArrayCounter_RBV``, is posted to ``image1:ArrayData``
  when ``image1:EnableCallbacks`` is ``Enable`` and, while the HDF5 plugin captures,
  appended to its file.
- ``HDF1:Capture`` = 1 (``FileWriteMode`` ``Stream``, the only mode simulated) opens
  ``FileTemplate % (FilePath, FileName, FileNumber)`` (default template
  ``"%s%s_%6.6d.h5"``, Python ``%`` formatting of the areaDetector C template), an
  HDF5 file in SWMR mode holding ``/entry/data/data`` (``N x rows x columns`` int32,
  one chunk per frame); every captured frame is appended and flushed, then
  ``NumCaptured_RBV`` incremented. ``Capture`` = 0, or ``NumCaptured_RBV`` reaching a
  non-zero ``NumCapture``, closes the file. ``FileNumber_RBV`` advances after each
  file opened when ``AutoIncrement`` is ``Yes`` (the default here). Unlike
  areaDetector, an existing file is never overwritten: the capture fails instead.
  A failed capture leaves ``Capture`` at 0 and says why in ``WriteStatus`` /
  ``WriteMessage``.

File work runs on one writer thread, so Channel Access keeps answering while a frame
is written. :func:`run_ioc_subprocess` starts the IOC in a child process for tests and
demos and waits until it answers over Channel Access.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from caproto import AccessRights, ChannelInteger, ChannelType
from caproto.server import PVGroup, SubGroup, pvproperty
from caproto.server.server import get_pv_pair_wrapper

from ..errors import ArgumentParser
from ..procutil import watch_parent
from ..sinks.hdf5 import append_frame
from ..synth import PRESETS

__all__ = [
    "DEFAULT_FILE_TEMPLATE",
    "DETECTOR_STATES",
    "FrameBank",
    "IocProcess",
    "PilatusIOC",
    "SimIocError",
    "add_arguments",
    "format_file_template",
    "main",
    "pv_table",
    "render_bank",
    "run_ioc_subprocess",
    "use_loopback_ca",
]

logger = logging.getLogger("live_bgsub.sim.ioc")

#: areaDetector's default-style template: FilePath, FileName, FileNumber.
DEFAULT_FILE_TEMPLATE = "%s%s_%6.6d.h5"
#: Printed (stdout) once the server listens; :func:`run_ioc_subprocess` waits for it.
READY_LINE = "live-bgsub sim-ioc ready"

_STRING_LENGTH = 256  # areaDetector's NELM of FilePath, FileName, FullFileName_RBV...
_FRAME_DTYPE = np.dtype("<i4")
#: States of ``cam1:DetectorState_RBV`` (areaDetector's ADStatus), by index.
DETECTOR_STATES = (
    "Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting",
    "Error", "Waiting", "Initializing", "Disconnected", "Aborted",
)  # fmt: skip
_IMAGE_MODES = ("Single", "Multiple", "Continuous")
_WRITE_MODES = ("Single", "Capture", "Stream")
_DATA_TYPES = ("Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float32", "Float64")
_DONE_ACQUIRE = ("Done", "Acquire")
_DONE_CAPTURE = ("Done", "Capture")
_ENABLE = ("Disable", "Enable")
_NO_YES = ("No", "Yes")
_WRITE_STATUS = ("Write OK", "Write error")
_CONVERSION_RE = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_:.\-{}\[\]<>;]+$")

pvproperty_with_rbv = get_pv_pair_wrapper(setpoint_suffix="", readback_suffix="_RBV")


class SimIocError(RuntimeError):
    """The simulated IOC could not be started or did not answer."""


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameBank:
    """The raw frames an IOC cycles through, and the geometry truth they share.

    ``frames[k]`` is :meth:`SimDetector.bank <live_bgsub.sim.detector.SimDetector.bank>`
    frame ``k`` for the same preset, seed, count scale and number of patterns;
    ``geometry`` is its :attr:`~live_bgsub.sim.detector.SimDetector.geometry`.
    """

    frames: tuple[np.ndarray, ...]
    geometry: dict
    kwargs: tuple[dict, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(rows, columns)``."""
        return tuple(self.frames[0].shape)


def render_bank(preset: str = "pilatus-1m", *, seed: int = 0, n_patterns: int = 4, counts: float = 1.0) -> FrameBank:
    """Render the frames the IOC serves (the simulated detector's bank; ~0.2 s per Pilatus frame).

    Parameters
    ----------
    preset : str, optional
        A key of :data:`live_bgsub.synth.PRESETS`.
    seed : int, optional
        Seed of the simulated fiber (one fiber and geometry for the whole bank).
    n_patterns : int, optional
        Frames of the bank: one muscle twitch (:class:`~live_bgsub.sim.detector.SimDetector`), >= 1.
    counts : float, optional
        Count scale of :func:`~live_bgsub.synth.make_pattern`.

    Returns
    -------
    FrameBank
    """
    from .detector import SimDetector

    det = SimDetector(name="ioc_bank", directory=".", preset=preset, seed=seed, n_patterns=n_patterns, counts=counts)
    return FrameBank(tuple(det.bank), dict(det.geometry), tuple(det.bank_kwargs))


class _FrameFile:
    """One SWMR HDF5 file of frames: ``/entry/data/data`` grows by one chunk per frame.

    Used on the IOC's writer thread only.
    """

    def __init__(self, path: Path, shape: tuple[int, int], attrs: dict):
        import h5py

        from .detector import DATASET

        rows, cols = shape
        self.path = path
        self._file = h5py.File(path, "w-", libver="latest")  # never overwrite a file
        try:
            ds = self._file.create_dataset(
                DATASET, shape=(0, rows, cols), maxshape=(None, rows, cols), chunks=(1, rows, cols), dtype=_FRAME_DTYPE
            )
            self._file["/entry"].attrs["NX_class"] = "NXentry"
            self._file["/entry/data"].attrs["NX_class"] = "NXdata"
            for key, value in attrs.items():
                ds.attrs[key] = value
            self._file.swmr_mode = True  # readers may open the file from now on
        except BaseException:
            self._file.close()
            raise
        self._dataset = ds
        self.count = 0

    def append(self, frame: np.ndarray) -> int:
        """Append one frame, flush it, return the number of frames in the file."""
        ds, index = self._dataset, self.count
        append_frame(ds, index, np.asarray(frame, dtype=_FRAME_DTYPE))
        self.count = index + 1
        return self.count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- PV groups


def _string(name: str, value: str = "", **kwargs):
    """A long string as areaDetector serves it: a char waveform (clients read it as text)."""
    return dict(name=name, value=value, dtype=ChannelType.CHAR, max_length=_STRING_LENGTH, **kwargs)


def _enum(name: str, strings: tuple[str, ...], value: str, **kwargs):
    return dict(name=name, value=value, dtype=ChannelType.ENUM, enum_strings=strings, **kwargs)


async def _put_acquire(group, instance, value):
    ioc: PilatusIOC = group.parent
    if value == "Acquire":
        await ioc.start_acquisition()
    else:
        await ioc.stop_acquisition("Acquisition aborted")
    return value


async def _put_capture(pair, instance, value):
    ioc: PilatusIOC = pair.parent.parent
    if value == "Capture":
        opened = await ioc.start_capture()
        value = "Capture" if opened else "Done"
    else:
        await ioc.stop_capture()
    await pair.readback.write(value)
    return value


async def _put_file_path(pair, instance, value):
    # areaDetector keeps the path with a trailing separator and reports whether it exists.
    path = value if not value or value.endswith("/") else value + "/"
    await pair.readback.write(path)
    await pair.parent.file_path_exists.write("Yes" if path and os.path.isdir(path) else "No")
    return value


async def _put_non_negative(pair, instance, value):
    if value < 0:
        raise ValueError(f"{instance.pvname} must be >= 0, got {value!r}")
    await pair.readback.write(value)
    return value


class CameraPVs(PVGroup):
    """``cam1:``: the areaDetector driver records (ADBase and ADPilatus subset)."""

    acquire = pvproperty(**_enum("Acquire", _DONE_ACQUIRE, "Done"), doc="1 starts, 0 stops an acquisition")
    acquire_rbv = pvproperty(**_enum("Acquire_RBV", _DONE_ACQUIRE, "Done"), read_only=True)
    acquire_time = pvproperty_with_rbv(name="AcquireTime", dtype=float, value=0.1, put=_put_non_negative, precision=4, units="s")
    acquire_period = pvproperty_with_rbv(name="AcquirePeriod", dtype=float, value=0.1, put=_put_non_negative, precision=4, units="s")
    num_images = pvproperty_with_rbv(name="NumImages", dtype=int, value=1, put=_put_non_negative)
    num_images_counter = pvproperty(name="NumImagesCounter_RBV", dtype=int, value=0, read_only=True)
    image_mode = pvproperty_with_rbv(**_enum("ImageMode", _IMAGE_MODES, "Single"))
    detector_state = pvproperty(**_enum("DetectorState_RBV", DETECTOR_STATES, "Idle"), read_only=True)
    status_message = pvproperty(**_string("StatusMessage_RBV", "Idle"), read_only=True)
    array_counter = pvproperty_with_rbv(name="ArrayCounter", dtype=int, value=0, put=_put_non_negative)
    array_callbacks = pvproperty_with_rbv(**_enum("ArrayCallbacks", _ENABLE, "Enable"))
    array_size0 = pvproperty(name="ArraySize0_RBV", dtype=int, value=0, read_only=True, doc="columns")
    array_size1 = pvproperty(name="ArraySize1_RBV", dtype=int, value=0, read_only=True, doc="rows")
    array_size_x = pvproperty(name="ArraySizeX_RBV", dtype=int, value=0, read_only=True)
    array_size_y = pvproperty(name="ArraySizeY_RBV", dtype=int, value=0, read_only=True)
    max_size_x = pvproperty(name="MaxSizeX_RBV", dtype=int, value=0, read_only=True)
    max_size_y = pvproperty(name="MaxSizeY_RBV", dtype=int, value=0, read_only=True)
    data_type = pvproperty(**_enum("DataType_RBV", _DATA_TYPES, "Int32"), read_only=True)
    manufacturer = pvproperty(name="Manufacturer_RBV", dtype=ChannelType.STRING, value="live_bgsub", read_only=True)
    model = pvproperty(name="Model_RBV", dtype=ChannelType.STRING, value="", read_only=True)
    # Geometry truth of the synthetic frames (ADPilatus header records; rotation is simulator-only).
    beam_x = pvproperty_with_rbv(name="BeamX", dtype=float, value=0.0, precision=3, units="px")
    beam_y = pvproperty_with_rbv(name="BeamY", dtype=float, value=0.0, precision=3, units="px")
    wavelength = pvproperty_with_rbv(name="Wavelength", dtype=float, value=0.0, precision=5, units="A")
    det_dist = pvproperty_with_rbv(name="DetDist", dtype=float, value=0.0, precision=3, units="mm")
    equator_rotation = pvproperty(name="EquatorRotation_RBV", dtype=float, value=0.0, read_only=True, precision=4, units="deg")

    acquire.putter(_put_acquire)


class ImagePluginPVs(PVGroup):
    """``image1:``: the NDPluginStdArrays records (``ArrayData`` is added per frame shape)."""

    enable_callbacks = pvproperty_with_rbv(**_enum("EnableCallbacks", _ENABLE, "Enable"))
    array_counter = pvproperty(name="ArrayCounter_RBV", dtype=int, value=0, read_only=True)
    unique_id = pvproperty(name="UniqueId_RBV", dtype=int, value=0, read_only=True)
    array_size0 = pvproperty(name="ArraySize0_RBV", dtype=int, value=0, read_only=True)
    array_size1 = pvproperty(name="ArraySize1_RBV", dtype=int, value=0, read_only=True)


class HDF5PluginPVs(PVGroup):
    """``HDF1:``: the NDFileHDF5 records (Stream mode)."""

    enable_callbacks = pvproperty_with_rbv(**_enum("EnableCallbacks", _ENABLE, "Enable"))
    file_path = pvproperty_with_rbv(**_string("FilePath"), put=_put_file_path)
    file_path_exists = pvproperty(**_enum("FilePathExists_RBV", _NO_YES, "No"), read_only=True)
    file_name = pvproperty_with_rbv(**_string("FileName", "frames"))
    file_number = pvproperty_with_rbv(name="FileNumber", dtype=int, value=0, put=_put_non_negative)
    file_template = pvproperty_with_rbv(**_string("FileTemplate", DEFAULT_FILE_TEMPLATE))
    auto_increment = pvproperty_with_rbv(**_enum("AutoIncrement", _NO_YES, "Yes"))
    file_write_mode = pvproperty_with_rbv(**_enum("FileWriteMode", _WRITE_MODES, "Stream"))
    full_file_name = pvproperty(**_string("FullFileName_RBV"), read_only=True)
    num_capture = pvproperty_with_rbv(name="NumCapture", dtype=int, value=0, put=_put_non_negative)
    capture = pvproperty_with_rbv(**_enum("Capture", _DONE_CAPTURE, "Done"), put=_put_capture)
    num_captured = pvproperty(name="NumCaptured_RBV", dtype=int, value=0, read_only=True)
    write_status = pvproperty(**_enum("WriteStatus", _WRITE_STATUS, "Write OK"), read_only=True)
    write_message = pvproperty(**_string("WriteMessage"), read_only=True)
    array_counter = pvproperty(name="ArrayCounter_RBV", dtype=int, value=0, read_only=True)


class _ReadOnlyIntegerArray(ChannelInteger):
    def check_access(self, hostname, username):
        return AccessRights.READ


class PilatusIOC(PVGroup):
    """The simulated Pilatus: camera, image plugin and HDF5 file plugin PVs under one prefix.

    Parameters
    ----------
    prefix : str
        PV prefix, e.g. ``"SIM:PIL1:"``.
    bank : FrameBank
        The frames to serve (:func:`render_bank`).
    directory : str or path-like, optional
        Initial ``HDF1:FilePath``.
    acquire_time, acquire_period : float, optional
        Initial ``cam1:AcquireTime`` / ``cam1:AcquirePeriod`` (s).
    image_callbacks : bool, optional
        Initial ``image1:EnableCallbacks`` (posting each frame to ``image1:ArrayData``).
    **kwargs
        Passed to :class:`caproto.server.PVGroup`.
    """

    cam = SubGroup(CameraPVs, prefix="cam1:")
    image = SubGroup(ImagePluginPVs, prefix="image1:")
    hdf = SubGroup(HDF5PluginPVs, prefix="HDF1:")

    def __init__(
        self,
        prefix: str,
        *,
        bank: FrameBank,
        directory=None,
        acquire_time: float = 0.1,
        acquire_period: float = 0.1,
        image_callbacks: bool = True,
        **kwargs,
    ):
        super().__init__(prefix, **kwargs)
        self.bank = bank
        rows, cols = bank.shape
        self.array_data = _ReadOnlyIntegerArray(value=np.zeros(rows * cols, np.int32), max_length=rows * cols)
        self.pvdb[self.prefix + "image1:ArrayData"] = self.array_data
        self._initial = {
            "directory": str(Path(directory).resolve()) if directory is not None else "",
            "acquire_time": float(acquire_time),
            "acquire_period": float(acquire_period),
            "image_callbacks": bool(image_callbacks),
        }
        self._acquisition: asyncio.Task | None = None
        self._stream: _FrameFile | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-ioc-hdf5")

    # ------------------------------------------------------------------ start-up

    async def initialise(self) -> None:
        """Publish the initial values that depend on the bank and the options."""
        rows, cols = self.bank.shape
        g, cam, init = self.bank.geometry, self.cam, self._initial
        for pv, value in (
            (cam.array_size0, cols), (cam.array_size1, rows), (cam.array_size_x, cols), (cam.array_size_y, rows),
            (cam.max_size_x, cols), (cam.max_size_y, rows), (self.image.array_size0, cols),
            (self.image.array_size1, rows), (cam.model, f"Simulated {g['preset']}"[:39]),
            (cam.equator_rotation, float(g["rotation_deg"])),
        ):  # fmt: skip
            await pv.write(value)
        for pair, value in (
            (cam.beam_x, float(g["center"][0])), (cam.beam_y, float(g["center"][1])),
            (cam.wavelength, 10.0 * float(g["wavelength_nm"])), (cam.det_dist, float(g["distance_mm"])),
            (cam.acquire_time, init["acquire_time"]), (cam.acquire_period, init["acquire_period"]),
            (self.image.enable_callbacks, "Enable" if init["image_callbacks"] else "Disable"),
        ):  # fmt: skip
            await pair.setpoint.write(value)
        if init["directory"]:
            await self.hdf.file_path.setpoint.write(init["directory"])

    async def shutdown(self) -> None:
        """Stop acquiring and close the capture file (the IOC is exiting)."""
        if self._acquisition is not None:
            self._acquisition.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._acquisition
        await self.stop_capture()
        self._writer.shutdown(wait=True)

    # ------------------------------------------------------------------ acquisition

    async def start_acquisition(self) -> None:
        if self._acquisition is not None and not self._acquisition.done():
            return  # already acquiring: like areaDetector, a second Acquire=1 does nothing
        cam = self.cam
        await cam.acquire_rbv.write("Acquire")
        await cam.detector_state.write("Acquire")
        await cam.status_message.write("Acquiring")
        await cam.num_images_counter.write(0)
        self._acquisition = asyncio.get_running_loop().create_task(self._acquire())

    async def stop_acquisition(self, message: str) -> None:
        task, self._acquisition = self._acquisition, None
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self._acquisition_done(message)

    async def _acquisition_done(self, message: str) -> None:
        cam = self.cam
        await cam.acquire.write("Done", verify_value=False)  # no putter: this is the IOC's own update
        await cam.acquire_rbv.write("Done")
        await cam.detector_state.write("Idle")
        await cam.status_message.write(message)

    async def _acquire(self) -> None:
        cam, loop = self.cam, asyncio.get_running_loop()
        mode = cam.image_mode.readback.value
        total = {"Single": 1, "Multiple": max(1, int(cam.num_images.readback.value))}.get(mode, None)
        done = 0
        next_start = loop.time()
        try:
            while total is None or done < total:
                start = max(loop.time(), next_start)
                exposure = float(cam.acquire_time.readback.value)
                period = max(float(cam.acquire_period.readback.value), exposure)
                await asyncio.sleep(max(0.0, start + exposure - loop.time()))
                frame, unique_id = await self._read_out()
                done += 1
                last = total is not None and done >= total
                if last:
                    self._acquisition = None
                    await self._acquisition_done("Acquisition completed")
                # The plugins finish even if the acquisition is stopped meanwhile.
                await asyncio.shield(self._plugins(frame, unique_id))
                next_start = start + period
                if not last:
                    await asyncio.sleep(max(0.0, next_start - loop.time()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the simulated detector reports errors, it never dies
            logger.exception("acquisition failed")
            self._acquisition = None
            await cam.detector_state.write("Error")
            await cam.status_message.write(f"Error: {exc}"[: _STRING_LENGTH - 1])
            await cam.acquire.write("Done", verify_value=False)
            await cam.acquire_rbv.write("Done")

    async def _read_out(self) -> tuple[np.ndarray, int]:
        cam = self.cam
        counter = int(cam.array_counter.readback.value)
        frame = self.bank.frames[counter % len(self.bank.frames)]
        await cam.array_counter.readback.write(counter + 1)
        await cam.num_images_counter.write(cam.num_images_counter.value + 1)
        return frame, counter + 1

    async def _plugins(self, frame: np.ndarray, unique_id: int) -> None:
        if self.cam.array_callbacks.readback.value != "Enable":
            return
        image = self.image
        if image.enable_callbacks.readback.value == "Enable":
            await self.array_data.write(frame.ravel())
            await image.array_counter.write(image.array_counter.value + 1)
            await image.unique_id.write(unique_id)
        hdf = self.hdf
        if hdf.enable_callbacks.readback.value != "Enable" or self._stream is None:
            return
        stream = self._stream
        try:
            count = await self._on_writer(stream.append, frame)
        except Exception as exc:  # reported like areaDetector: WriteStatus, WriteMessage
            logger.exception("writing frame %d to %s failed", unique_id, stream.path)
            await self._write_error(f"frame {unique_id} not written to {stream.path}: {exc}")
            return
        await hdf.array_counter.write(hdf.array_counter.value + 1)
        await hdf.num_captured.write(count)
        num_capture = int(hdf.num_capture.readback.value)
        if num_capture > 0 and count >= num_capture and self._stream is stream:
            await self.stop_capture()

    # ------------------------------------------------------------------ HDF5 plugin

    async def _on_writer(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self._writer, func, *args)

    async def _write_error(self, message: str) -> None:
        await self.hdf.write_message.write(message[: _STRING_LENGTH - 1])
        await self.hdf.write_status.write("Write error")

    async def start_capture(self) -> bool:
        """Open the capture file; False (and WriteStatus/WriteMessage set) if it cannot be."""
        hdf = self.hdf
        if self._stream is not None:
            return True
        try:
            path = self._next_file_path()
            self._stream = await self._on_writer(_FrameFile, path, self.bank.shape, self._file_attrs())
        except Exception as exc:  # noqa: BLE001 - any failure is the client's to read
            await self._write_error(f"capture not started: {exc}")
            return False
        await hdf.full_file_name.write(str(path))
        await hdf.num_captured.write(0)
        await hdf.write_message.write("")
        await hdf.write_status.write("Write OK")
        if hdf.auto_increment.readback.value == "Yes":
            await hdf.file_number.readback.write(int(hdf.file_number.readback.value) + 1)
        return True

    async def stop_capture(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await self._on_writer(stream.close)
            except Exception as exc:  # noqa: BLE001
                await self._write_error(f"closing {stream.path} failed: {exc}")
        hdf = self.hdf
        if hdf.capture.readback.value != "Done":
            await hdf.capture.setpoint.write("Done", verify_value=False)
            await hdf.capture.readback.write("Done")

    def _next_file_path(self) -> Path:
        hdf = self.hdf
        mode = hdf.file_write_mode.readback.value
        if mode != "Stream":
            raise ValueError(f"FileWriteMode {mode!r} is not simulated; use 'Stream'")
        directory = hdf.file_path.readback.value
        if not directory:
            raise ValueError("FilePath is empty")
        if not os.path.isabs(directory):
            raise ValueError(f"FilePath {directory!r} is not an absolute path")
        if not os.path.isdir(directory):
            raise ValueError(f"FilePath {directory!r} does not exist")
        template = hdf.file_template.readback.value
        name, number = hdf.file_name.readback.value, int(hdf.file_number.readback.value)
        path = format_file_template(template, directory, name, number)
        if len(path) >= _STRING_LENGTH:
            raise ValueError(f"the full file name has {len(path)} characters; at most {_STRING_LENGTH - 1} fit")
        return Path(path)

    def _file_attrs(self) -> dict:
        g = self.bank.geometry
        attrs = {f"sim_{key}": g[key] for key in ("preset", "center", "rotation_deg", "pixel_size_mm", "wavelength_nm", "distance_mm")}
        attrs["sim_seeds"] = [kw["seed"] for kw in self.bank.kwargs]
        return attrs


def format_file_template(template: str, path: str, name: str, number: int) -> str:
    """Fill an areaDetector FileTemplate: its conversions take FilePath, FileName, FileNumber in turn.

    As with areaDetector's C ``sprintf``, a template may use fewer conversions than
    three (``"%s%s.h5"`` ignores the number).

    Raises
    ------
    ValueError
        For a template with more than three conversions or one that does not fit.
    """
    conversions = _CONVERSION_RE.findall(template.replace("%%", ""))
    if len(conversions) > 3:
        raise ValueError(f"FileTemplate {template!r} has {len(conversions)} conversions; at most 3 (FilePath, FileName, FileNumber)")
    try:
        return template % (path, name, number)[: len(conversions)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"FileTemplate {template!r} must format (FilePath, FileName, FileNumber), e.g. '%s%s_%6.6d.h5': {exc}") from None


# --------------------------------------------------------------------------- PV list


def pv_table(prefix: str, preset: str = "pilatus-1m") -> list[tuple[str, str, bool]]:
    """The PVs an IOC serves: ``(name, CA type, writable)`` in definition order.

    Needs no bank (nothing is rendered) and no network.
    """
    rows, cols = PRESETS[preset].shape
    bank = FrameBank((np.zeros((rows, cols), _FRAME_DTYPE),), {}, ())
    ioc = PilatusIOC(prefix, bank=bank)
    try:
        table = []
        for name, channel in ioc.pvdb.items():
            kind = channel.data_type.name
            if channel.max_length > 1:
                kind = "string (char waveform)" if kind == "CHAR" else f"{kind}[{channel.max_length}]"
            table.append((name, kind, AccessRights.WRITE in channel.check_access("localhost", "")))
        return table
    finally:
        ioc._writer.shutdown(wait=False)


# --------------------------------------------------------------------------- serving


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix must be a non-empty PV prefix without spaces or quotes (e.g. 'SIM:PIL1:'), got {prefix!r}")
    return prefix


async def _serve(ioc: PilatusIOC, interfaces: list[str] | None, watch_stdin: bool) -> None:
    from caproto.asyncio.server import Context

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main_task.cancel)
    if watch_stdin:
        watch_parent(lambda: loop.call_soon_threadsafe(main_task.cancel))  # stdin closed: the parent has gone
    await ioc.initialise()
    context = Context(ioc.pvdb, interfaces)

    async def announce(async_lib):
        print(f"{READY_LINE}: {len(ioc.pvdb)} PVs with prefix {ioc.prefix!r} on port {context.port}", flush=True)

    try:
        await context.run(startup_hook=announce)
    finally:
        await ioc.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``sim-ioc`` options to ``parser`` (``live-bgsub sim-ioc`` and this module's main)."""
    parser.add_argument("--prefix", required=True, help="PV prefix, e.g. SIM:PIL1: (PVs are PREFIX cam1:Acquire, ...)")
    parser.add_argument("--preset", default="pilatus-1m", choices=sorted(PRESETS), help="detector layout (default pilatus-1m)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated fiber (default 0)")
    parser.add_argument("--n-patterns", type=int, default=4, help="frames of the bank, one muscle twitch, cycled (default 4)")
    parser.add_argument("--counts", type=float, default=1.0, help="count scale of the synthetic frames (default 1)")
    parser.add_argument("--directory", default=None, help="initial HDF1:FilePath (default: unset; clients set it)")
    parser.add_argument("--acquire-time", type=float, default=0.1, help="initial cam1:AcquireTime in s (default 0.1)")
    parser.add_argument("--acquire-period", type=float, default=0.1, help="initial cam1:AcquirePeriod in s (default 0.1)")
    parser.add_argument(
        "--no-image-callbacks", action="store_true",
        help="start with image1:EnableCallbacks=Disable (no frame posted to image1:ArrayData)",
    )  # fmt: skip
    parser.add_argument(
        "--interfaces", nargs="+", default=None,
        help="addresses to serve on (default: EPICS_CAS_INTF_ADDR_LIST, else all)",
    )  # fmt: skip
    parser.add_argument("--list-pvs", action="store_true", help="print the PVs served (name, type, access) and exit")
    parser.add_argument("--stdin-watchdog", action="store_true", help="exit when stdin closes (for a parent process)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def main(argv=None) -> int:
    """Run the simulated IOC until SIGINT/SIGTERM; ``--list-pvs`` prints the PVs and returns.

    Returns
    -------
    int
        0 on a clean exit, 2 for bad arguments.
    """
    parser = add_arguments(ArgumentParser(prog="live-bgsub sim-ioc", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        prefix = _check_prefix(args.prefix)
        if args.n_patterns < 1:
            raise ValueError(f"--n-patterns must be >= 1, got {args.n_patterns}")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        for option, value in (("--acquire-time", args.acquire_time), ("--acquire-period", args.acquire_period)):
            if not value >= 0:
                raise ValueError(f"{option} must be >= 0 s, got {value}")
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"live-bgsub sim-ioc: error: {exc}", file=sys.stderr)
        return 2
    if args.list_pvs:
        for name, kind, writable in pv_table(prefix, args.preset):
            print(f"{name}\t{kind}\t{'rw' if writable else 'ro'}")
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    t0 = time.perf_counter()
    bank = render_bank(args.preset, seed=args.seed, n_patterns=args.n_patterns, counts=args.counts)
    logger.info("rendered %d %s frames in %.1f s", len(bank.frames), args.preset, time.perf_counter() - t0)
    ioc = PilatusIOC(
        prefix,
        bank=bank,
        directory=args.directory,
        acquire_time=args.acquire_time,
        acquire_period=args.acquire_period,
        image_callbacks=not args.no_image_callbacks,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(ioc, args.interfaces, args.stdin_watchdog))
    return 0


# --------------------------------------------------------------------------- child process


def use_loopback_ca(environ=None) -> dict:
    """Point Channel Access clients at IOCs on this host (call before pyepics starts).

    Sets, unless already set: ``EPICS_CA_AUTO_ADDR_LIST=NO``,
    ``EPICS_CA_ADDR_LIST=127.255.255.255`` (the loopback broadcast reaches every IOC
    on the host; a unicast ``127.0.0.1`` reaches only one of several) and
    ``EPICS_CA_MAX_ARRAY_BYTES=20000000`` (a Pilatus 1M frame is 4.1 MB).

    Returns
    -------
    dict
        The CA variables as they now are.
    """
    env = os.environ if environ is None else environ
    env.setdefault("EPICS_CA_AUTO_ADDR_LIST", "NO")
    env.setdefault("EPICS_CA_ADDR_LIST", "127.255.255.255")
    env.setdefault("EPICS_CA_MAX_ARRAY_BYTES", "20000000")
    return {k: env[k] for k in ("EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_ADDR_LIST", "EPICS_CA_MAX_ARRAY_BYTES")}


class IocProcess:
    """A simulated IOC running in a child process (see :func:`run_ioc_subprocess`)."""

    def __init__(self, prefix: str, process: subprocess.Popen, output: collections.deque):
        self.prefix = prefix
        self.process = process
        self._output = output

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def pv(self, suffix: str) -> str:
        """Full PV name: ``pv("cam1:Acquire")`` -> ``PREFIX cam1:Acquire``."""
        return self.prefix + suffix

    def output(self) -> str:
        """The latest lines the IOC printed (stdout and stderr)."""
        return "".join(self._output)

    def kill(self) -> None:
        """SIGKILL the IOC (a crash: nothing is closed) and reap it."""
        if self.alive:
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the IOC closes its file), SIGKILL after ``timeout`` seconds."""
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdin.close()

    def __repr__(self) -> str:
        return f"<IocProcess prefix={self.prefix!r} pid={self.pid} {'running' if self.alive else 'exited'}>"


@contextlib.contextmanager
def run_ioc_subprocess(
    prefix: str,
    *,
    directory=None,
    preset: str = "pilatus-1m",
    seed: int = 0,
    n_patterns: int = 4,
    acquire_time: float = 0.1,
    acquire_period: float = 0.1,
    image_callbacks: bool = True,
    timeout: float = 60.0,
    env: dict | None = None,
) -> Iterator[IocProcess]:
    """Start the simulated IOC in a child process; yield once it answers over Channel Access.

    The child runs ``python -m live_bgsub.sim.ioc`` with these options; it renders its
    bank (~0.2 s per Pilatus 1M frame), prints a ready line, and this function then
    connects to ``PREFIX cam1:DetectorState_RBV`` with pyepics. On leaving the block the
    IOC is stopped (SIGTERM, then SIGKILL); it also exits on its own if this process
    dies (it watches its stdin).

    Parameters
    ----------
    prefix : str
        PV prefix; make it unique per test (several IOCs may share the host).
    directory, preset, seed, n_patterns, acquire_time, acquire_period, image_callbacks
        IOC options (see ``live-bgsub sim-ioc --help``).
    timeout : float, optional
        Seconds to wait for the ready line and then for the PV to answer.
    env : dict, optional
        Environment of the child (default: this process's).

    Yields
    ------
    IocProcess

    Raises
    ------
    SimIocError
        The IOC exited, or did not answer within ``timeout`` (the message has the IOC's
        output and this process's Channel Access address list).
    """
    import epics

    prefix = _check_prefix(prefix)
    command = [
        sys.executable, "-m", "live_bgsub.sim.ioc", "--prefix", prefix, "--preset", preset,
        "--seed", str(seed), "--n-patterns", str(n_patterns), "--acquire-time", repr(float(acquire_time)),
        "--acquire-period", repr(float(acquire_period)), "--stdin-watchdog",
    ]  # fmt: skip
    if directory is not None:
        command += ["--directory", str(Path(directory).resolve())]
    if not image_callbacks:
        command.append("--no-image-callbacks")
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True
    )
    output: collections.deque = collections.deque(maxlen=200)
    ready = threading.Event()

    def read_output():
        for line in process.stdout:
            output.append(line)
            if line.startswith(READY_LINE):
                ready.set()
        ready.set()  # end of output: the process is gone; the waiter finds out

    threading.Thread(target=read_output, name=f"sim-ioc-{prefix}-output", daemon=True).start()
    ioc = IocProcess(prefix, process, output)
    try:
        _wait_until_answering(ioc, ready, timeout, epics)
        yield ioc
    finally:
        ioc.stop()


def _wait_until_answering(ioc: IocProcess, ready: threading.Event, timeout: float, epics) -> None:
    deadline = time.monotonic() + timeout

    def fail(reason: str):
        ioc.kill()
        ca = {k: os.environ.get(k) for k in ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST")}
        raise SimIocError(f"simulated IOC {ioc.prefix!r} (pid {ioc.pid}): {reason}; CA client settings {ca}. Output:\n{ioc.output()}")

    if not ready.wait(timeout) or not ioc.alive:
        fail("exited before it was ready" if not ioc.alive else f"not ready within {timeout:g} s")
    name = ioc.pv("cam1:DetectorState_RBV")
    pv = epics.PV(name, auto_monitor=False)
    try:
        while not pv.wait_for_connection(timeout=0.5):
            if not ioc.alive:
                fail("exited before answering")
            if time.monotonic() > deadline:
                fail(f"{name} did not answer over Channel Access within {timeout:g} s")
        if pv.get(timeout=max(1.0, deadline - time.monotonic())) is None:
            fail(f"{name} connected but a read timed out")
    finally:
        pv.disconnect()


if __name__ == "__main__":
    sys.exit(main())
