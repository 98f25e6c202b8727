"""A simulated area detector (ophyd Device) writing synthetic fiber frames to SWMR HDF5.

:class:`SimDetector` behaves towards a bluesky RunEngine like a BioCAT Pilatus 1M (or
an EIGER2 9M) driven by an HDF5 file writer: ``stage`` opens a new file, every
``trigger`` appends one frame to ``/entry/data/data`` and flushes it (the file is in
SWMR mode, so a reader in another thread or process sees the frame at once), and
``collect_asset_docs`` announces the frames with StreamResource/StreamDatum documents
(``asset_docs="stream"``, the ophyd-async style that TiledWriter registers without
copying) or with the legacy area-detector Resource/Datum documents
(``asset_docs="resource"``, spec ``AD_HDF5``). ``unstage`` closes the file.

Frames: a twitch in slow motion
-------------------------------
The frames come from :func:`live_bgsub.synth.make_pattern`. Rendering one costs about
0.1 s on a Pilatus 1M and 1-2 s on an EIGER2 9M, far slower than a detector running
at tens to hundreds of Hz, so the detector renders a *bank* of ``n_patterns`` raw
frames once (at the first stage, or on first use of :attr:`SimDetector.geometry`) and
trigger ``i`` writes bank frame ``i % n_patterns``.

The bank is one muscle twitch: bank frame ``k`` is the pattern at activation
``a_k = twitch_activation(k, n_patterns)`` (0 at rest, 1 at the peak; an alpha
function that starts a tenth of the way into the bank, peaks at a quarter and has
relaxed to about 5 % by its end). As a contracting muscle's, its equator changes:
I11/I10 rises from :data:`TWITCH_REST_I11_I10` (0.4) to :data:`TWITCH_PEAK_I11_I10`
(1.2) with ``I10 + I11`` held (mass moves from the thick to the thin filaments), and
S10 changes by :data:`TWITCH_S10_CHANGE` (-3 %: the lattice swells as the sarcomeres
shorten), then both relax. A run longer than the bank repeats the twitch (a train of
twitches, one every ``n_patterns`` frames).

Time runs at the bank's pace: the default 25 frames take 5 s at the demo's 5 Hz, where
a real twitch lasts 0.1-0.2 s. Everything else is the rest pattern's: one seed draws
the fiber (reflection widths, the other equatorial and the meridional reflections'
intensities, background, dead pixels, beam-stop radius; the layer lines, which
:func:`make_pattern` draws in proportion to I10, follow I10) and the beam centre and
equator rotation, and the camera length is fixed (``d10`` follows
S10, so ``distance_mm`` is the same for every frame). Each bank frame's counts are an
independent Poisson draw (:func:`poisson_raw`, seed ``(seed, k)``) around its
noise-free pattern ``make_pattern(**det.bank_kwargs[k])``; so
``poisson_raw(make_pattern(**det.bank_kwargs[k]), det.bank_noise_seeds[k])``
re-creates ``det.bank[k]``, and :attr:`SimDetector.bank_params` holds each frame's
truth.

The truth of every frame is recorded in the run: the events carry
``{name}_sim_true_i11_i10`` and ``{name}_sim_true_s10_px`` (pixels), the values the
written frame was built from (leave them out with ``read_attrs``).

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

import dataclasses
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
from ..synth import PRESETS, DetectorPreset, SyntheticPattern, make_pattern

__all__ = [
    "DATASET",
    "HDF5_MIMETYPE",
    "TWITCH_PEAK_I11_I10",
    "TWITCH_REST_I11_I10",
    "TWITCH_S10_CHANGE",
    "SimDetector",
    "poisson_raw",
    "twitch_activation",
]

#: Path of the frame stack inside every file the detector writes.
DATASET = "/entry/data/data"
#: MIME type of the StreamResource documents (what TiledWriter's HDF5 consolidator reads).
HDF5_MIMETYPE = "application/x-hdf5"

_ASSET_DOCS = ("stream", "resource")
_FRAME_DTYPE = np.dtype("<i4")  # Pilatus/EIGER int32 counts, -1 gaps, -2 dead pixels

#: I11/I10 of the simulated muscle at rest and at the peak of its twitch.
TWITCH_REST_I11_I10 = 0.4
TWITCH_PEAK_I11_I10 = 1.2
#: Relative change of S10 at the peak of the twitch (the lattice swells: S10 falls).
TWITCH_S10_CHANGE = -0.03
_TWITCH_ONSET = 0.1  # stimulus, as a fraction of the bank
_TWITCH_TIME_TO_PEAK = 0.15  # onset to peak, as a fraction of the bank
#: Bank size by default: one twitch in 25 frames (5 s at the demo's 5 Hz) ...
DEFAULT_N_PATTERNS = 25
#: ... or fewer, so that the bank stays within this many bytes (6 frames on an EIGER2 9M).
BANK_BYTES = 256 * 2**20
# Reflection intensities held at their rest values through the twitch.
_HELD_INTENSITIES = ("iz", "i20", "i21", "m3_intensity", "m6_intensity")


def _key(dtype: str, dtype_numpy: str | None = None, units: str | None = None) -> dict:
    key: dict[str, Any] = {"dtype": dtype, "shape": []}
    if dtype_numpy is not None:
        key["dtype_numpy"] = dtype_numpy
    if units is not None:
        key["units"] = units
    return key


_FLOAT = np.dtype("<f8").str
_INT = np.dtype("<i8").str


def twitch_activation(k: int, n: int) -> float:
    """Activation (0 at rest, 1 at the peak) of bank frame ``k`` of ``n``: one twitch per bank.

    An alpha function of the phase ``t = k / n``: 0 before the stimulus at
    ``t0 = 0.1``, then ``x * exp(1 - x)`` with ``x = (t - t0) / 0.15``, which peaks at
    ``t = 0.25`` and has fallen to about 5 % by the bank's end.

    Examples
    --------
    >>> [round(twitch_activation(k, 20), 2) for k in range(0, 20, 3)]
    [0.0, 0.65, 0.96, 0.62, 0.32, 0.15, 0.07]
    """
    x = (k / n - _TWITCH_ONSET) / _TWITCH_TIME_TO_PEAK
    return x * math.exp(1.0 - x) if x > 0 else 0.0


def poisson_raw(pattern: SyntheticPattern, noise_seed) -> np.ndarray:
    """The frame a detector writes for a noise-free pattern: Poisson counts, then its response.

    Parameters
    ----------
    pattern : SyntheticPattern
        A pattern drawn with ``noise=False`` (its ``frame`` is the expected counts).
    noise_seed : int or sequence of int
        Seed of the ``numpy.random.Generator`` that draws the counts.

    Returns
    -------
    ndarray
        ``pattern.raw()`` with the frame replaced by Poisson draws at its valid pixels
        (int32 with -1 gaps and -2 dead pixels on a photon-counting detector).
    """
    expected = pattern.frame
    counts = np.zeros(expected.shape, np.float32)
    counts[pattern.mask] = np.random.default_rng(noise_seed).poisson(expected[pattern.mask])
    return dataclasses.replace(pattern, frame=counts).raw()


class SimDetector(FrameStreamMixin, Device):
    """Simulated Pilatus 1M / EIGER2 9M writing synthetic fiber frames to HDF5.

    A synchronous ophyd Device for a bluesky RunEngine: ``stage`` opens
    ``directory/{name}_{uuid}.h5`` (SWMR), each ``trigger`` appends one int32 frame to
    ``/entry/data/data`` and flushes it, ``read`` + ``collect_asset_docs`` announce it,
    ``unstage`` closes the file. See the module docstring for the pattern bank (one
    muscle twitch), the truth each event records and the timing model.

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
        Seed of the fiber (every bank frame's :func:`make_pattern` seed); bank frame
        ``k``'s counting noise uses ``(seed, k)``. None draws a fresh seed (recorded in
        :attr:`bank_kwargs`).
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels; default: drawn by :func:`make_pattern`.
    rotation_deg : float, optional
        Equator rotation (degrees); default: drawn by :func:`make_pattern`.
    counts : float, optional
        Count scale passed to :func:`make_pattern` (1 = photon-starved BioCAT frames).
    n_patterns : int or None, optional
        Number of distinct frames in the bank (>= 1), cycled through per trigger: the
        frames of one twitch. Default :data:`DEFAULT_N_PATTERNS` (25), fewer where
        the bank would pass :data:`BANK_BYTES` (256 MB; 6 on an EIGER2 9M).
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
    Readings: ``{name}_image`` (see ``asset_docs``), ``{name}_frame_number`` (index
    of the frame in the file) and the truth the frame was built from,
    ``{name}_sim_true_i11_i10`` and ``{name}_sim_true_s10_px`` (px). Configuration (lands in the event descriptor):
    ``{name}_preset``, ``{name}_center_x``, ``{name}_center_y`` (px),
    ``{name}_rotation_deg``, ``{name}_pixel_size_mm``, ``{name}_wavelength_nm``,
    ``{name}_distance_mm`` and ``{name}_acquire_period`` (s); reading the
    configuration renders the bank if needed.

    Cost: the bank is rendered once per detector object (``n_patterns + 1`` noise-free
    :func:`make_pattern` calls and ``n_patterns`` Poisson draws, ~0.1 s a frame on a
    Pilatus 1M, 1-2 s on an EIGER2 9M) and kept as int32 frames (4 MB each on a
    Pilatus 1M, 40 MB on an EIGER2 9M). A trigger only copies a bank frame into the
    file, on the writer thread.

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
    sim_true_i11_i10 = Cpt(KeyedSignal, key=_key("number", _FLOAT), value=math.nan, kind=Kind.normal)
    sim_true_s10_px = Cpt(KeyedSignal, key=_key("number", _FLOAT, "px"), value=math.nan, kind=Kind.normal)

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
        n_patterns: int | None = None,
        asset_docs: str = "stream",
        **kwargs,
    ):
        det_preset = _check_preset(preset)
        period_s = _check_period(period_s)
        if asset_docs not in _ASSET_DOCS:
            raise ValueError(f"asset_docs must be one of {list(_ASSET_DOCS)}, got {asset_docs!r}")
        if n_patterns is None:
            rows, cols = det_preset.shape
            n_patterns = max(1, min(DEFAULT_N_PATTERNS, BANK_BYTES // (rows * cols * _FRAME_DTYPE.itemsize)))
        if isinstance(n_patterns, bool) or not isinstance(n_patterns, numbers.Integral) or n_patterns < 1:
            raise ValueError(f"n_patterns must be an integer >= 1 or None, got {n_patterns!r}")
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
        self._bank_noise_seeds: list[tuple[int, int]] = []
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
        """:func:`make_pattern` keyword arguments of each bank frame's noise-free pattern (rendered on first use)."""
        self._ensure_bank()
        return [dict(kw) for kw in self._bank_kwargs]

    @property
    def bank_noise_seeds(self) -> list[tuple[int, int]]:
        """Seed of each bank frame's counting noise (:func:`poisson_raw`): ``(seed, k)``."""
        self._ensure_bank()
        return list(self._bank_noise_seeds)

    @property
    def bank_params(self) -> list[dict]:
        """The truth (``SyntheticPattern.params``) of each bank frame; frame ``i`` is ``i % n_patterns``."""
        self._ensure_bank()
        return self._bank_params

    @property
    def bank_truth(self) -> dict:
        """Per bank frame: ``activation``, ``i11_i10`` and ``s10_px`` (arrays of ``n_patterns``)."""
        self._ensure_bank()
        n = self.n_patterns
        return {
            "activation": np.array([twitch_activation(k, n) for k in range(n)]),
            "i11_i10": np.array([p["i11_i10"] for p in self._bank_params]),
            "s10_px": np.array([p["s10_px"] for p in self._bank_params]),
        }

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
        """Render the pattern bank once: one twitch in ``n_patterns`` frames of one fiber."""
        if self._bank is not None:
            return
        with self._bank_lock:
            if self._bank is not None:
                return
            kwargs = _twitch_kwargs(
                self.detector_preset, self.n_patterns, seed=self._seed, center=self._center,
                rotation_deg=self._rotation, counts=self._counts,
            )
            frames, params, noise_seeds = [], [], []
            for k, kw in enumerate(kwargs):
                pattern = make_pattern(**kw)
                noise_seeds.append((self._seed, k))
                raw = np.ascontiguousarray(poisson_raw(pattern, noise_seeds[-1]), dtype=_FRAME_DTYPE)
                raw.flags.writeable = False
                frames.append(raw)
                params.append(pattern.params)
            self._bank_kwargs, self._bank_params, self._bank_noise_seeds = kwargs, params, noise_seeds
            p0 = params[0]
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
        ds.attrs["sim_noise_seeds"] = np.asarray(self._bank_noise_seeds, np.int64)
        ds.attrs["sim_true_i11_i10"] = [p["i11_i10"] for p in self._bank_params]
        ds.attrs["sim_true_s10_px"] = [p["s10_px"] for p in self._bank_params]
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
        truth = self._bank_params[index % self.n_patterns]
        self.sim_true_i11_i10.put(float(truth["i11_i10"]))
        self.sim_true_s10_px.put(float(truth["s10_px"]))
        self.frame_number.put(index)
        if self._datum_factory is not None:
            datum = self._datum_factory({"point_number": index})
            self._asset_docs_cache.append(("datum", datum))
            self.image.put(datum["datum_id"])
        self._frames_done = index + 1


# --------------------------------------------------------------------------- the twitch


def _twitch_kwargs(preset: DetectorPreset, n: int, *, seed: int, center, rotation_deg, counts: float) -> list[dict]:
    """:func:`make_pattern` arguments (noise-free) of the ``n`` frames of one twitch.

    The rest pattern of ``seed`` gives what the twitch does not change; I10 and I11
    share ``I10 + I11`` of the rest pattern at :data:`TWITCH_REST_I11_I10`, the other
    reflections keep their rest intensities, and ``d10`` follows S10 at a fixed camera
    length. Intensities go in at ``counts = 1`` (make_pattern multiplies them).
    """
    rest = make_pattern(preset, seed=seed, center=center, rotation_deg=rotation_deg, counts=counts, noise=False).params
    s10, d10 = rest["s10_px"], rest["d10_nm"]
    total = rest["i10"] / counts * (1.0 + TWITCH_REST_I11_I10)
    shared = {
        "preset": preset, "seed": seed, "counts": counts, "noise": False,
        "center": tuple(rest["center"]), "rotation_deg": rest["rotation_deg"],
        **{key: rest[key] / counts for key in _HELD_INTENSITIES},
    }  # fmt: skip
    kwargs = []
    for k in range(n):
        a = twitch_activation(k, n)
        ratio = TWITCH_REST_I11_I10 + (TWITCH_PEAK_I11_I10 - TWITCH_REST_I11_I10) * a
        s10_k = s10 * (1.0 + TWITCH_S10_CHANGE * a)
        kwargs.append({**shared, "i10": total / (1.0 + ratio), "i11_i10": ratio, "s10_px": s10_k, "d10_nm": d10 * s10 / s10_k})
    return kwargs


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
