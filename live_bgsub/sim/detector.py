"""A simulated area detector (ophyd Device) writing synthetic fiber frames to SWMR HDF5.

:class:`SimDetector` behaves towards a bluesky RunEngine like a BioCAT Pilatus 1M (or
an EIGER2 9M) driven by an HDF5 file writer: ``stage`` opens a new file, every
``trigger`` appends one frame to ``/entry/data/data`` and flushes it (the file is in
SWMR mode, so a reader in another thread or process sees the frame at once), and
``collect_asset_docs`` announces the frames with StreamResource/StreamDatum documents
(``asset_docs="stream"``, the ophyd-async style that TiledWriter registers without
copying) or with the legacy area-detector Resource/Datum documents
(``asset_docs="resource"``, spec ``AD_HDF5``). ``unstage`` closes the file.

Frames
------
The frames come from :func:`live_bgsub.synth.make_pattern`. Rendering one costs about
0.1 s on a Pilatus 1M and 1-2 s on an EIGER2 9M, far slower than a detector running
at tens to hundreds of Hz, so the detector renders a *bank* of ``n_patterns`` raw
frames once (at the first stage, or on first use of :attr:`SimDetector.geometry`) and
trigger ``i`` writes bank frame ``i % n_patterns``. The bank frames share what a real
fiber on a fixed beamline shares: the beam centre, the equator rotation, the lattice
(``s10_px``, ``d10_nm``, hence the camera length ``distance_mm``) and the beam-stop
radius; they differ by seed (``seed, seed + 1, ...``) in reflection intensities and
widths, background, dead pixels and counting noise.
:attr:`SimDetector.bank_kwargs` holds the exact :func:`make_pattern` arguments of
each bank frame, so ``make_pattern(**det.bank_kwargs[k]).raw()`` re-creates
``det.bank[k]``.

Timing
------
Frames are written by a worker thread, never on the RunEngine thread. Each frame
occupies one acquire period: frame ``i`` starts when it is triggered, or when frame
``i - 1``'s period ends if that is later, and its status completes at the end of its
period (or when the write finishes, if that takes longer), so ``N`` frames take about
``N * period_s``. The bank frame is already known, so it is written while the
simulated exposure runs.
"""

from __future__ import annotations

import math
import numbers
import os
import queue
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from event_model import compose_resource, compose_stream_resource
from ophyd import Component as Cpt
from ophyd import Device, Kind
from ophyd.status import DeviceStatus

from ..frame_stream import FrameStreamMixin, ImageSignal, KeyedSignal
from ..sinks.hdf5 import append_frame, register_in_process_writer, unregister_in_process_writer
from ..synth import PRESETS, DetectorPreset, make_pattern

__all__ = ["DATASET", "HDF5_MIMETYPE", "SimDetector"]

#: Path of the frame stack inside every file the detector writes.
DATASET = "/entry/data/data"
#: MIME type of the StreamResource documents (what TiledWriter's HDF5 consolidator reads).
HDF5_MIMETYPE = "application/x-hdf5"

_ASSET_DOCS = ("stream", "resource")
_FRAME_DTYPE = np.dtype("<i4")  # Pilatus/EIGER int32 counts, -1 gaps, -2 dead pixels
# Truth shared by all frames of the bank besides centre and rotation (see module doc).
_SHARED_PARAMS = ("s10_px", "d10_nm", "beam_stop_radius_px")


def _key(dtype: str, dtype_numpy: str | None = None, units: str | None = None) -> dict:
    key: dict[str, Any] = {"dtype": dtype, "shape": []}
    if dtype_numpy is not None:
        key["dtype_numpy"] = dtype_numpy
    if units is not None:
        key["units"] = units
    return key


_FLOAT = np.dtype("<f8").str
_INT = np.dtype("<i8").str


class SimDetector(FrameStreamMixin, Device):
    """Simulated Pilatus 1M / EIGER2 9M writing synthetic fiber frames to HDF5.

    A synchronous ophyd Device for a bluesky RunEngine: ``stage`` opens
    ``directory/{name}_{uuid}.h5`` (SWMR), each ``trigger`` appends one int32 frame to
    ``/entry/data/data`` and flushes it, ``read`` + ``collect_asset_docs`` announce it,
    ``unstage`` closes the file. See the module docstring for the pattern bank and
    the timing model.

    Parameters
    ----------
    name : str
        Device name; the frame's data key is ``f"{name}_image"``.
    directory : str or os.PathLike
        Folder of the HDF5 files (created at stage if missing).
    preset : str or DetectorPreset, optional
        Detector layout: a key of :data:`live_bgsub.synth.PRESETS` (``"pilatus-1m"``,
        ``"eiger2-9m"``, ``"mar"``) or a :class:`~live_bgsub.synth.DetectorPreset`.
    period_s : float, optional
        Acquire period (s), >= 0. Each frame takes ``max(period_s, write time)``.
        Also the ``{name}_acquire_period`` configuration signal, which a plan may set
        between frames.
    seed : int or None, optional
        Seed of the first bank frame; bank frame ``k`` uses ``seed + k``. None draws a
        fresh seed (recorded in :attr:`bank_kwargs`).
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels; default: drawn by :func:`make_pattern`.
    rotation_deg : float, optional
        Equator rotation (degrees); default: drawn by :func:`make_pattern`.
    counts : float, optional
        Count scale passed to :func:`make_pattern` (1 = photon-starved BioCAT frames).
    n_patterns : int, optional
        Number of distinct frames in the bank (>= 1), cycled through per trigger.
    asset_docs : {"stream", "resource"}, optional
        ``"stream"``: one StreamResource per stage and one StreamDatum per frame, the
        data key marked ``external="STREAM:"`` and absent from the events.
        ``"resource"``: a Resource (spec ``AD_HDF5``) per stage and a Datum
        (``{"point_number": i}``) per frame, the event holding the datum id
        (``external="FILESTORE:"``).
    **kwargs
        Passed to :class:`ophyd.Device` (``read_attrs``, ``configuration_attrs``, ...).

    Raises
    ------
    ValueError
        For an unknown preset, a negative or non-finite ``period_s``, an unknown
        ``asset_docs``, ``n_patterns < 1``, a non-positive ``counts``, a negative seed
        or a malformed ``center``/``rotation_deg``.

    Notes
    -----
    Readings: ``{name}_image`` (see ``asset_docs``) and ``{name}_frame_number`` (index
    of the frame in the file). Configuration (lands in the event descriptor):
    ``{name}_preset``, ``{name}_center_x``, ``{name}_center_y`` (px),
    ``{name}_rotation_deg``, ``{name}_pixel_size_mm``, ``{name}_wavelength_nm``,
    ``{name}_distance_mm`` and ``{name}_acquire_period`` (s); reading the
    configuration renders the bank if needed.

    Cost: the bank is rendered once per detector object (``n_patterns`` calls of
    :func:`make_pattern`, ~0.1 s each on a Pilatus 1M, 1-2 s on an EIGER2 9M) and
    kept as int32 frames (4 MB each on a Pilatus 1M, 40 MB on an EIGER2 9M).

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> from bluesky.plans import count
    >>> det = SimDetector(name="pilatus", directory="/tmp/frames", n_patterns=2)
    >>> RE = RunEngine()
    >>> RE(count([det], num=5))  # doctest: +SKIP
    """

    SOURCE_PREFIX = "SIM"

    image = Cpt(ImageSignal, value="", kind=Kind.normal)
    frame_number = Cpt(KeyedSignal, key=_key("integer", _INT), value=-1, kind=Kind.normal)

    preset = Cpt(KeyedSignal, key=_key("string"), value="", kind=Kind.config)
    center_x = Cpt(KeyedSignal, key=_key("number", _FLOAT, "px"), value=math.nan, kind=Kind.config)
    center_y = Cpt(KeyedSignal, key=_key("number", _FLOAT, "px"), value=math.nan, kind=Kind.config)
    rotation_deg = Cpt(KeyedSignal, key=_key("number", _FLOAT, "deg"), value=math.nan, kind=Kind.config)
    pixel_size_mm = Cpt(KeyedSignal, key=_key("number", _FLOAT, "mm"), value=math.nan, kind=Kind.config)
    wavelength_nm = Cpt(KeyedSignal, key=_key("number", _FLOAT, "nm"), value=math.nan, kind=Kind.config)
    distance_mm = Cpt(KeyedSignal, key=_key("number", _FLOAT, "mm"), value=math.nan, kind=Kind.config)
    acquire_period = Cpt(KeyedSignal, key=_key("number", _FLOAT, "s"), value=0.0, kind=Kind.config)

    def __init__(
        self,
        *,
        name: str,
        directory: str | os.PathLike,
        preset: str | DetectorPreset = "pilatus-1m",
        period_s: float = 0.0,
        seed: int | None = 0,
        center: tuple[float, float] | None = None,
        rotation_deg: float | None = None,
        counts: float = 1.0,
        n_patterns: int = 4,
        asset_docs: str = "stream",
        **kwargs,
    ):
        det_preset = _check_preset(preset)
        period_s = _check_period(period_s)
        if asset_docs not in _ASSET_DOCS:
            raise ValueError(f"asset_docs must be one of {list(_ASSET_DOCS)}, got {asset_docs!r}")
        if isinstance(n_patterns, bool) or not isinstance(n_patterns, numbers.Integral) or n_patterns < 1:
            raise ValueError(f"n_patterns must be an integer >= 1, got {n_patterns!r}")
        counts = _check_counts(counts)
        seed = _check_seed(seed)
        center = _check_center(center)
        if rotation_deg is not None:
            rotation_deg = _finite(rotation_deg, "rotation_deg", "a finite angle in degrees or None")

        super().__init__(name=name, **kwargs)
        self.directory = Path(directory)
        self.detector_preset: DetectorPreset = det_preset
        self.asset_docs: str = asset_docs
        self.n_patterns = int(n_patterns)
        self._seed, self._center, self._rotation, self._counts = seed, center, rotation_deg, counts
        self.preset.put(det_preset.name)
        self.pixel_size_mm.put(float(det_preset.pixel_size_mm))
        self.acquire_period.put(period_s)

        self._bank: tuple[np.ndarray, ...] | None = None
        self._bank_kwargs: list[dict] = []
        self._bank_params: list[dict] = []
        self._bank_lock = threading.Lock()

        # Per-stage state.
        self._file: h5py.File | None = None
        self._write_lock = threading.Lock()  # replaced by the in-process registry's at each open
        self._dataset: h5py.Dataset | None = None
        self._file_path: Path | None = None
        self._jobs: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._halt = threading.Event()
        self._asset_docs_cache: deque = deque()
        self._stream_datum_factory = None
        self._datum_factory = None
        self._frames_requested = 0
        self._frames_done = 0
        self._frames_announced = 0
        self._period_end = -math.inf

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(rows, columns)``."""
        return tuple(self.detector_preset.shape)

    @property
    def period_s(self) -> float:
        """Acquire period (s): the value of the ``acquire_period`` signal."""
        return float(self.acquire_period.get())

    @property
    def bank(self) -> tuple[np.ndarray, ...]:
        """The raw int32 frames cycled through per trigger (read-only; rendered on first use)."""
        self._ensure_bank()
        return self._bank

    @property
    def bank_kwargs(self) -> list[dict]:
        """:func:`make_pattern` keyword arguments of each bank frame (rendered on first use)."""
        self._ensure_bank()
        return [dict(kw) for kw in self._bank_kwargs]

    @property
    def bank_params(self) -> list[dict]:
        """The truth (``SyntheticPattern.params``) of each bank frame; frame ``i`` is ``i % n_patterns``."""
        self._ensure_bank()
        return self._bank_params

    @property
    def geometry(self) -> dict:
        """Geometry truth shared by every frame (renders the bank on first use).

        Returns
        -------
        dict
            ``preset``, ``shape`` (rows, columns), ``center`` (x, y) px,
            ``rotation_deg``, ``pixel_size_mm``, ``wavelength_nm``, ``distance_mm``.
        """
        self._ensure_bank()
        p = self._bank_params[0]
        return {
            "preset": p["preset"],
            "shape": tuple(p["shape"]),
            "center": tuple(p["center"]),
            "rotation_deg": p["rotation_deg"],
            "pixel_size_mm": p["pixel_size_mm"],
            "wavelength_nm": p["wavelength_nm"],
            "distance_mm": p["distance_mm"],
        }

    @property
    def file_path(self) -> Path | None:
        """Absolute path of the file of the current (or latest) stage; None before the first."""
        return self._file_path

    # ------------------------------------------------------------------ bank

    def _ensure_bank(self) -> None:
        """Render the pattern bank once (``n_patterns`` frames of one geometry)."""
        if self._bank is not None:
            return
        with self._bank_lock:
            if self._bank is not None:
                return
            preset = self.detector_preset
            first = make_pattern(
                preset, seed=self._seed, center=self._center, rotation_deg=self._rotation, counts=self._counts
            )
            p0 = first.params
            shared = {"center": tuple(p0["center"]), "rotation_deg": p0["rotation_deg"]}
            shared.update({k: p0[k] for k in _SHARED_PARAMS})
            kwargs = [
                {"preset": preset, "seed": self._seed + k, "counts": self._counts, **shared}
                for k in range(self.n_patterns)
            ]
            patterns = [first] + [make_pattern(**kw) for kw in kwargs[1:]]
            frames = []
            for pat in patterns:
                raw = np.ascontiguousarray(pat.raw(), dtype=_FRAME_DTYPE)
                raw.flags.writeable = False
                frames.append(raw)
            self._bank_kwargs = kwargs
            self._bank_params = [pat.params for pat in patterns]
            self.center_x.put(float(p0["center"][0]))
            self.center_y.put(float(p0["center"][1]))
            self.rotation_deg.put(float(p0["rotation_deg"]))
            self.wavelength_nm.put(float(p0["wavelength_nm"]))
            self.distance_mm.put(float(p0["distance_mm"]))
            self._bank = tuple(frames)

    # ------------------------------------------------------------------ bluesky interface

    def _image_data_key(self) -> dict:
        rows, cols = self.shape
        return {
            "source": f"SIM:{self.name}:{DATASET}",
            "dtype": "array",
            "shape": [rows, cols],
            "dtype_numpy": _FRAME_DTYPE.str,
            "external": "STREAM:" if self.asset_docs == "stream" else "FILESTORE:",
        }

    def read_configuration(self):
        self._ensure_bank()
        return super().read_configuration()

    def trigger(self) -> DeviceStatus:
        """Acquire the next frame; the status completes when it is written and its period is over.

        Returns
        -------
        DeviceStatus
            Finished by the writer thread when the frame is written and its period is
            over; failed if the write raises. Stopping or unstaging the detector
            finishes it at once, as an areaDetector's acquire status finishes when
            Acquire returns to 0: a frame already written is kept (and announced), one
            not yet begun is not acquired. A RunEngine's ``abort()``/``stop()`` (which
            stop every device) therefore end cleanly instead of raising ``FailedStatus``.

        Raises
        ------
        RuntimeError
            If the detector is not staged.
        """
        if self._jobs is None:
            raise RuntimeError(f"{self.name} is not staged: stage it (no file is open) before triggering")
        status = DeviceStatus(self)
        start = max(time.monotonic(), self._period_end)
        self._period_end = start + self.period_s
        index = self._frames_requested
        self._frames_requested += 1
        self._jobs.put((status, index, self._period_end))
        return status

    def stop(self, *, success: bool = False) -> None:
        """Stop acquiring: pending frames' statuses finish at once without a frame (until
        the next stage); a frame being waited on for its period is kept."""
        self._halt.set()
        super().stop(success=success)

    # ------------------------------------------------------------------ file and writer

    def _open(self) -> None:
        self._ensure_bank()
        rows, cols = self.shape
        directory = self.directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}_{uuid.uuid4()}.h5"
        f = h5py.File(path, "w", libver="latest")
        self._file, self._file_path = f, path
        ds = f.create_dataset(
            DATASET,
            shape=(0, rows, cols),
            maxshape=(None, rows, cols),
            chunks=(1, rows, cols),
            dtype=_FRAME_DTYPE,
        )
        f["/entry"].attrs["NX_class"] = "NXentry"
        f["/entry/data"].attrs["NX_class"] = "NXdata"
        g = self.geometry
        for key in ("preset", "center", "rotation_deg", "pixel_size_mm", "wavelength_nm", "distance_mm"):
            ds.attrs[f"sim_{key}"] = g[key]
        ds.attrs["sim_seeds"] = [kw["seed"] for kw in self._bank_kwargs]
        f.swmr_mode = True  # after every object is created: readers may open it now
        self._dataset = ds
        # Readers in this process (the callback) read through this handle, not a second one.
        self._write_lock = register_in_process_writer(path, {DATASET: ds})

        self._asset_docs_cache.clear()
        self._frames_requested = self._frames_done = self._frames_announced = 0
        self._period_end = -math.inf
        self.frame_number.put(-1)
        self.image.put("")
        if self.asset_docs == "stream":
            bundle = compose_stream_resource(
                mimetype=HDF5_MIMETYPE,
                uri="file://localhost" + path.as_posix(),
                data_key=self.image.name,
                parameters={"dataset": DATASET, "chunk_shape": [1, rows, cols], "swmr": True},
            )
            self._stream_datum_factory = bundle.compose_stream_datum
            self._asset_docs_cache.append(("stream_resource", bundle.stream_resource_doc))
        else:
            # ophyd's area-detector convention: root "/" and the path relative to it,
            # so that root + resource_path is the absolute path without a double slash.
            bundle = compose_resource(
                spec="AD_HDF5",
                root="/",
                resource_path=path.relative_to(path.anchor).as_posix(),
                resource_kwargs={"frame_per_point": 1},
            )
            self._datum_factory = bundle.compose_datum
            self._asset_docs_cache.append(("resource", bundle.resource_doc))

        self._halt.clear()
        self._jobs = queue.Queue()
        self._worker = threading.Thread(
            target=self._acquire_loop, args=(self._jobs,), name=f"{self.name}-writer", daemon=True
        )
        self._worker.start()

    def _close(self) -> None:
        if self._worker is not None:
            self._halt.set()  # pending frames end rather than wait out their period
            self._jobs.put(None)
            self._worker.join()
        self._worker = self._jobs = None
        if self._file is not None:
            with self._write_lock:
                unregister_in_process_writer(self._file_path)
                self._file.close()
        self._file = self._dataset = None
        self._stream_datum_factory = self._datum_factory = None
        self._asset_docs_cache.clear()

    def _acquire_loop(self, jobs: queue.Queue) -> None:
        """Writer thread: write each requested frame, wait out its period, finish its status."""
        while True:
            job = jobs.get()
            if job is None:
                return
            status, index, period_end = job
            try:
                if not self._halt.is_set():  # stopped: the frame is not acquired
                    self._write_frame(index)
                    remaining = period_end - time.monotonic()
                    if remaining > 0:
                        self._halt.wait(remaining)  # a stop ends the period early; the frame is written
                    self._frame_ready(index)
            except Exception as exc:  # noqa: BLE001 - any failure must reach the status, or it hangs
                status.set_exception(exc)
            else:
                status.set_finished()

    def _write_frame(self, index: int) -> None:
        frame = self._bank[index % self.n_patterns]
        ds = self._dataset
        with self._write_lock:
            try:
                append_frame(ds, index, frame)
            except (OSError, RuntimeError) as exc:
                raise OSError(f"{self._file_path}: writing frame {index} failed: {exc}") from exc

    def _frame_ready(self, index: int) -> None:
        self.frame_number.put(index)
        if self._datum_factory is not None:
            datum = self._datum_factory({"point_number": index})
            self._asset_docs_cache.append(("datum", datum))
            self.image.put(datum["datum_id"])
        self._frames_done = index + 1


# --------------------------------------------------------------------------- validation


def _finite(value, name: str, expected: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return out


def _check_preset(preset) -> DetectorPreset:
    if isinstance(preset, DetectorPreset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(
        f"unknown detector preset {preset!r}; expected one of {sorted(PRESETS)} or a live_bgsub.synth.DetectorPreset"
    )


def _check_period(period_s) -> float:
    period = _finite(period_s, "period_s", "a finite number of seconds >= 0")
    if period < 0:
        raise ValueError(f"period_s must be a finite number of seconds >= 0, got {period_s!r}")
    return period


def _check_counts(counts) -> float:
    value = _finite(counts, "counts", "a finite number > 0")
    if value <= 0:
        raise ValueError(f"counts must be a finite number > 0, got {counts!r}")
    return value


def _check_seed(seed) -> int:
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    return int(seed)


def _check_center(center) -> tuple[float, float] | None:
    if center is None:
        return None
    try:
        x, y = center
    except (TypeError, ValueError):
        raise ValueError(f"center must be a pair (x, y) of finite pixel coordinates or None, got {center!r}") from None
    expected = "a pair (x, y) of finite pixel coordinates or None"
    return (_finite(x, "center x", expected), _finite(y, "center y", expected))
