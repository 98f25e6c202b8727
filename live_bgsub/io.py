"""Read detector images (TIFF, CBF, EDF, MarCCD/Rayonix, EIGER/NeXus HDF5) as float32 data plus a validity mask.

Every reader returns a :class:`DetectorImage`: the counts as float32 (0 at invalid
pixels), a boolean ``mask`` that is True where the pixel is valid, and the header facts
the frame carries (pixel size, exposure, frame period, wavelength, distance, beam centre)
when present, in our units: mm, nm, s and pixels.

Invalid pixels are the detectors' sentinels, never intensity:

- negative values (Pilatus gaps read -1, dead pixels -2),
- the integer dtype's maximum (EIGER marks gaps and dead pixels with ``2**16-1`` or
  ``2**32-1``; saturated pixels read the same),
- NaN and infinities in floating-point data,
- pixels flagged in an EIGER ``pixel_mask`` when the HDF5 file carries one,
- pixels that read exactly 0 in an unsigned-integer frame whose corners read 0 and
  whose readout floor shows a bias (a CCD such as a MarCCD: there 0 is outside the
  circular active area or a dead pixel, never a count); see :func:`shows_bias_floor`. A
  photon-counting frame's zeros stay valid.

Header facts, per format. Each key is read in the unit its format documents; a value
written with an explicit unit token ("3.4 m", a NeXus ``units`` attribute) is converted
by that token, and one with an unknown unit is left out rather than guessed.

- Pilatus TIFF and miniCBF ("# Key value unit" lines, DECTRIS' PILATUS header spec):
  ``Pixel_size`` (m x m), ``Detector_distance`` (m), ``Wavelength`` (angstrom),
  ``Exposure_time`` and ``Exposure_period`` (s), ``Beam_xy`` ((x, y) pixels).
- MarCCD / Rayonix (a TIFF whose binary frame header sits at byte 1024, laid out as
  ``fabio.marccdimage`` reads it): ``pixelsize_x`` (nm), ``xtal_to_detector``, else
  ``start_xtal_to_detector`` (1000 * mm, i.e. um), ``source_wavelength`` (fm),
  ``exposure_time`` (ms), ``beam_x``/``beam_y`` (1000 * pixels).
- EDF, the ESRF SAXS keywords: ``PSize_1`` (m), ``SampleDistance`` (m), ``WaveLength``
  (m), ``Center_1``/``Center_2`` (pixels, along dimension 1 = x and 2 = y); exposure
  from ``ExposureTime``, ``count_time`` or LImA's ``acq_expo_time`` (s); frame period
  from ``Exposure_period`` or LImA's ``acq_expo_time + acq_latency_time`` (s).
- EIGER / NeXus HDF5: ``entry/instrument/detector/`` ``x_pixel_size`` (m),
  ``detector_distance`` (else NXdetector ``distance``, m), ``count_time`` and
  ``frame_time`` (s), ``beam_center_x``/``beam_center_y`` (pixels), and
  ``entry/instrument/beam/incident_wavelength`` (angstrom), each in its ``units``
  attribute when the dataset carries one.

A fact that reads 0 (or a beam centre that reads (0, 0)) is "not set" and comes out as
None, and so does one that, in its documented unit, lies outside the physical range of
its quantity (``PLAUSIBLE``: a wavelength of 0.001-10 nm, a distance of 1 mm-100 m, a
pixel of 1 um-10 mm): it is left out, never rescaled by a guess. The cardiac MarCCD
frame in ``shared/data/real`` writes ``source_wavelength = 103317500``, which in the
documented femtometres is 103 nm (it would be 1.033175 angstrom in units of 1e-18 m,
1000 times the documented unit; that is not assumed): its wavelength is None, the raw
value stays in ``header["marccd.source_wavelength"]``.

Otherwise values are taken as the header writes them: a detector server's placeholder
cannot be told from a real setting. The BioCAT Pilatus frames in ``shared/data/real``,
for example, write ``Wavelength 1.54000 A``, ``Detector_distance 1.00000 m`` and
``Beam_xy (0.00, 0.00) pixels``, which look like camserver's unset values: the flat
field named in the same header (``..._E12000_T6000...``, threshold 6000 eV) says 12 keV,
i.e. 1.033 angstrom. Their wavelength and distance are reported as written.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageReadError

__all__ = ["DetectorImage", "read_image", "mask_invalid", "shows_bias_floor", "header_facts", "HDF5_SUFFIXES"]

#: File name suffixes read with h5py (EIGER master/data files, NeXus).
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nexus")

#: Readout floor of a biased (CCD) frame: an unsigned-integer frame with zero corners
#: whose non-zero pixels read at least ``BIAS_FLOOR_COUNTS`` in all but
#: ``BIAS_FLOOR_FRACTION`` of them (its 1st percentile of non-zero readings is >= 8
#: counts) has a bias, and its zeros are not counts. See :func:`shows_bias_floor`.
BIAS_FLOOR_COUNTS = 8
BIAS_FLOOR_FRACTION = 0.01

#: Physical range of each header fact in our unit (inclusive); a header value outside it
#: (in the unit its format documents) is left out as None.
PLAUSIBLE = {
    "pixel_size_mm": (1e-3, 10.0),
    "distance_mm": (1.0, 1e5),
    "wavelength_nm": (1e-3, 10.0),
    "exposure_s": (1e-9, 1e6),
    "period_s": (1e-9, 1e6),
}

# Dataset paths tried, in order, in HDF5 files (NeXus NXdata default, EIGER layouts).
_HDF5_DATA_PATHS = ("entry/data/data", "entry/data/data_000001", "entry/instrument/detector/data")
_HDF5_FACTS = {
    # name: (paths tried in order, kind of quantity, unit when the dataset has no ``units``)
    "pixel_size_mm": (("entry/instrument/detector/x_pixel_size",), "length", "m"),
    "exposure_s": (("entry/instrument/detector/count_time",), "time", "s"),
    "period_s": (("entry/instrument/detector/frame_time",), "time", "s"),
    "distance_mm": (
        ("entry/instrument/detector/detector_distance", "entry/instrument/detector/distance"), "length", "m"
    ),
    "wavelength_nm": (("entry/instrument/beam/incident_wavelength",), "wavelength", "angstrom"),
}
_HDF5_BEAM_CENTER = ("entry/instrument/detector/beam_center_x", "entry/instrument/detector/beam_center_y")
_HDF5_PIXEL_MASK = "entry/instrument/detector/detectorSpecific/pixel_mask"


@dataclass(frozen=True)
class DetectorImage:
    """One detector frame with its validity mask and header facts.

    Attributes
    ----------
    data : ndarray of float32, shape (rows, columns)
        Counts; 0 at invalid pixels.
    mask : ndarray of bool, same shape
        True where the pixel is valid.
    path : str
        The file the frame came from.
    format : str
        Reader that decoded it (``"fabio:PilatusImage"``, ``"hdf5:/entry/data/data"``,
        ``"fabio:TifImage+marccd"`` for a TIFF with a MarCCD/Rayonix header, ...).
    frame : int
        Index of this frame in a multi-frame file.
    n_frames : int
        Number of frames the file holds.
    pixel_size_mm, exposure_s, period_s, wavelength_nm, distance_mm : float or None
        Header facts, None when the file does not carry them.
    beam_center_px : tuple of float (x, y) or None
        The beam centre the header records (x = column, y = row, pixels), None when it
        carries none or (0, 0). A hint only: it is whatever the acquisition software was
        told (often a nominal value), in that software's pixel convention.
    header : dict
        The raw header (keys and values as strings); for a MarCCD/Rayonix frame its
        binary header's scalar fields and texts, as ``marccd.<name>``.
    """

    data: np.ndarray
    mask: np.ndarray
    path: str = ""
    format: str = ""
    frame: int = 0
    n_frames: int = 1
    pixel_size_mm: float | None = None
    exposure_s: float | None = None
    period_s: float | None = None
    wavelength_nm: float | None = None
    distance_mm: float | None = None
    beam_center_px: tuple[float, float] | None = None
    header: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape


def shows_bias_floor(raw: np.ndarray) -> bool:
    """Whether the zeros of a frame are off the detector's active area rather than counts.

    True when all of these hold:

    1. ``raw`` is unsigned-integer data (a CCD's ADUs; signed and floating-point frames
       are never tested: a Pilatus int32 frame can have a high floor and genuine zeros,
       and processed floating-point data may read 0 legitimately);
    2. the frame's four corner pixels read exactly 0 (the corners outside a MarCCD's
       circular active area, or a distortion-corrected CCD's unexposed corners; a beam
       stop's shadow or a dead pixel in a bright photon-counting frame is not there);
    3. at least half of the pixels that are not the dtype's maximum read non-zero (a
       mostly-zero frame is a sparse photon-counting frame, not a CCD);
    4. fewer than 1 % (``BIAS_FLOOR_FRACTION``) of the non-zero pixels (dtype maximum
       excluded) read below 8 counts (``BIAS_FLOOR_COUNTS``): the 1st percentile of the
       non-zero readings is at least 8, a readout floor (bias).

    A MarCCD or Rayonix frame reads a bias of ~10-100 ADU everywhere on its active area
    and exactly 0 outside it: on the cardiac MarCCD frame in ``shared/data/real`` the 1st
    percentile of the non-zero pixels is 54 (0.0 % of them below 8) and 21 % of the
    frame, the four corners outside the inscribed circle, reads 0. A photon-counting
    frame (Pilatus, EIGER; median 1-2 counts) has most of its non-zero pixels at 1-7
    counts (95 % on the BioCAT frames), so its zeros stay counts even where a corner
    reads 0. A bright photon-counting frame (99 % of its non-zero pixels >= 8, such as
    the BioCAT powder frame) keeps its zeros unless all four corners read 0.

    Cost: nothing beyond reading four pixels unless the corners read 0; then three
    comparisons over the frame (a few ms for 4 Mpixels).
    """
    raw = np.asarray(raw)
    if raw.dtype.kind != "u" or raw.ndim != 2 or raw.size == 0:
        return False
    if raw[0, 0] or raw[0, -1] or raw[-1, 0] or raw[-1, -1]:
        return False
    n_zero = int(np.count_nonzero(raw == 0))
    n_top = int(np.count_nonzero(raw == np.iinfo(raw.dtype).max))
    n_nonzero = raw.size - n_zero - n_top
    if n_nonzero < n_zero:
        return False
    n_low = int(np.count_nonzero(raw < BIAS_FLOOR_COUNTS)) - n_zero
    return n_low < BIAS_FLOOR_FRACTION * n_nonzero


def mask_invalid(
    raw: np.ndarray, pixel_mask: np.ndarray | None = None, *, zeros_invalid: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a raw frame into float32 counts and a validity mask.

    Parameters
    ----------
    raw : ndarray, 2-D
        Frame as the detector wrote it (any integer or floating dtype).
    pixel_mask : ndarray, optional
        Detector pixel mask of the same shape, nonzero where a pixel is bad (EIGER).
    zeros_invalid : bool, optional
        Whether pixels reading exactly 0 are invalid. By default (None) they are when
        :func:`shows_bias_floor` says the frame is a biased (CCD) unsigned-integer frame;
        True or False forces the choice (False: the zeros are counts, as before).

    Returns
    -------
    data : ndarray of float32
        Counts, 0 at invalid pixels.
    mask : ndarray of bool
        True where the pixel is valid (not negative, not the dtype's maximum, finite,
        not flagged in ``pixel_mask``, not a zero of a biased frame).

    Examples
    --------
    >>> data, mask = mask_invalid(np.array([[1, -1], [2**31 - 1, 5]], dtype=np.int32))
    >>> mask.tolist()
    [[True, False], [False, True]]
    >>> ccd = np.array([[0, 90, 0], [88, 95, 102], [0, 91, 0]], dtype=np.uint16)  # bias ~90, zero corners
    >>> mask_invalid(ccd)[1].tolist()
    [[False, True, False], [True, True, True], [False, True, False]]
    """
    raw = np.asarray(raw)
    if raw.dtype.kind in "iu":
        mask = raw != np.iinfo(raw.dtype).max
        if raw.dtype.kind == "i":
            mask &= raw >= 0
    elif raw.dtype.kind == "f":
        mask = np.isfinite(raw) & (raw >= 0)
    elif raw.dtype.kind == "b":
        mask = np.ones(raw.shape, dtype=bool)
    else:
        raise ImageReadError(f"expected numeric detector data, got dtype {raw.dtype}")
    if zeros_invalid is None:
        zeros_invalid = shows_bias_floor(raw)
    if zeros_invalid:
        mask &= raw != 0
    if pixel_mask is not None:
        pixel_mask = np.asarray(pixel_mask)
        if pixel_mask.shape != raw.shape:
            raise ImageReadError(
                f"pixel_mask has shape {pixel_mask.shape}, expected the frame's shape {raw.shape}"
            )
        mask &= pixel_mask == 0
    data = np.where(mask, raw, 0).astype(np.float32, copy=False)
    return data, mask


def read_image(path: str | os.PathLike, *, frame: int = 0, dataset: str | None = None) -> DetectorImage:
    """Read one frame of a detector image file.

    Parameters
    ----------
    path : str or path-like
        TIFF (Pilatus, MarCCD/Rayonix), CBF, EDF or any other format fabio reads;
        HDF5/NeXus (``.h5``, ``.nxs``, ...) is read with h5py, including EIGER master
        files whose data sit in linked files.
    frame : int, optional
        Frame index in a multi-frame file (default 0).
    dataset : str, optional
        HDF5 dataset path; by default the first of ``entry/data/data``,
        ``entry/data/data_000001``, ``entry/instrument/detector/data`` that exists.

    Returns
    -------
    DetectorImage

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ImageReadError
        When the file cannot be decoded, holds no 2-D frame (for example 1-D data), or
        ``frame`` is out of range.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image file: {str(path)!r}")
    if path.is_dir():
        raise ImageReadError(f"{str(path)!r} is a directory, expected an image file")
    if not isinstance(frame, (int, np.integer)) or frame < 0:
        raise ImageReadError(f"frame must be a non-negative integer, got {frame!r}")
    if path.suffix.lower() in HDF5_SUFFIXES:
        return _read_hdf5(path, int(frame), dataset)
    return _read_fabio(path, int(frame))


def _check_2d(raw: np.ndarray, path: Path) -> None:
    if raw.ndim != 2:
        raise ImageReadError(f"{str(path)!r}: expected a 2-D image, got data of shape {raw.shape}")
    if min(raw.shape) < 2:
        raise ImageReadError(f"{str(path)!r}: expected a 2-D image, got data of shape {raw.shape}")


def _read_fabio(path: Path, frame: int) -> DetectorImage:
    import fabio

    try:
        img = fabio.open(str(path))
    except Exception as exc:  # fabio raises many types for unknown formats
        raise ImageReadError(f"{str(path)!r}: not a readable detector image ({type(exc).__name__}: {exc})") from exc
    with img:
        n_frames = int(getattr(img, "nframes", 1) or 1)
        if frame >= n_frames:
            raise ImageReadError(f"{str(path)!r}: frame {frame} requested, the file holds {n_frames} frame(s)")
        if frame:
            img = img.getframe(frame)
        raw = img.data
        if raw is None:
            raise ImageReadError(f"{str(path)!r}: the file holds no image data")
        raw = np.asarray(raw)
        _check_2d(raw, path)
        header = {str(k): str(v) for k, v in dict(img.header).items()}
        reader = type(img).__name__
    fmt = f"fabio:{reader}"
    marccd = _read_marccd_header(path, raw.shape)
    if marccd is not None:
        # fabio opens a MarCCD/Rayonix TIFF as a plain TifImage unless it is named
        # *.mccd, and its MarccdImage keeps the TIFF tags as the header, not this block.
        fmt += "+marccd" if reader != "MarccdImage" else ""
        header.update({f"marccd.{k}": str(v) for k, v in marccd.items()})
        facts = _marccd_facts(marccd)
    else:
        facts = header_facts(header, reader)
    facts = _plausible(facts)
    data, mask = mask_invalid(raw)
    return DetectorImage(data, mask, str(path), fmt, frame, n_frames, header=header, **facts)


def _read_hdf5(path: Path, frame: int, dataset: str | None) -> DetectorImage:
    import h5py

    try:
        h5 = h5py.File(path, "r", swmr=False)
    except OSError as exc:
        try:
            # A file still open for writing in SWMR mode (a live detector), or left
            # marked so by a writer that died, opens only as a SWMR reader.
            h5 = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            raise ImageReadError(f"{str(path)!r}: not a readable HDF5 file ({exc})") from exc
    with h5:
        candidates = (dataset,) if dataset else _HDF5_DATA_PATHS
        name = next((p for p in candidates if p in h5 and isinstance(h5[p], h5py.Dataset)), None)
        if name is None:
            raise ImageReadError(
                f"{str(path)!r}: no image dataset at {', '.join(map(repr, candidates))}"
            )
        ds = h5[name]
        if ds.ndim == 2:
            n_frames = 1
            sel = ()
        elif ds.ndim == 3:
            n_frames = ds.shape[0]
            sel = (frame,)
        else:
            raise ImageReadError(
                f"{str(path)!r}: expected a 2-D image, got data of shape {ds.shape} in dataset "
                f"{name!r} (expected (rows, columns) or (frames, rows, columns))"
            )
        if frame >= n_frames:
            raise ImageReadError(f"{str(path)!r}: frame {frame} requested, the file holds {n_frames} frame(s)")
        raw = np.asarray(ds[sel] if sel else ds[()])
        _check_2d(raw, path)
        facts = {}
        for key, (fact_paths, kind, default_unit) in _HDF5_FACTS.items():
            for fact_path in fact_paths:
                value = _hdf5_quantity(h5, fact_path, kind, default_unit)
                if value is not None:
                    facts[key] = value
                    break
        beam = [_hdf5_quantity(h5, p, "pixels", "pixel", allow_zero=True) for p in _HDF5_BEAM_CENTER]
        facts["beam_center_px"] = _beam_center(*beam)
        pixel_mask = None
        if _HDF5_PIXEL_MASK in h5:
            pm = np.asarray(h5[_HDF5_PIXEL_MASK][()])
            if pm.shape == raw.shape:
                pixel_mask = pm
        header = {k: str(v) for k, v in ds.attrs.items()}
    facts = _plausible(facts)
    data, mask = mask_invalid(raw, pixel_mask)
    return DetectorImage(data, mask, str(path), f"hdf5:/{name}", frame, n_frames, header=header, **facts)


# ---------------------------------------------------------------------------------------
# Units

#: Length units to mm; "a" is the angstrom as Pilatus headers write it ("1.0332 A").
_LENGTH_MM = {
    "m": 1e3, "meter": 1e3, "meters": 1e3, "metre": 1e3, "metres": 1e3,
    "mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "millimetre": 1.0, "millimetres": 1.0,
    "um": 1e-3, "µm": 1e-3, "μm": 1e-3, "micron": 1e-3, "microns": 1e-3, "micrometer": 1e-3, "micrometre": 1e-3,
    "nm": 1e-6, "nanometer": 1e-6, "nanometre": 1e-6,
    "a": 1e-7, "å": 1e-7, "angstrom": 1e-7, "angstroms": 1e-7, "ångström": 1e-7,
    "pm": 1e-9, "fm": 1e-12,
}  # fmt: skip
_TIME_S = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "ns": 1e-9,
}  # fmt: skip
_PIXELS = {"pixel": 1.0, "pixels": 1.0, "px": 1.0}
#: Wavelengths come out in nm, other lengths in mm.
_UNITS = {"length": _LENGTH_MM, "wavelength": {k: v * 1e6 for k, v in _LENGTH_MM.items()}, "time": _TIME_S,
          "pixels": _PIXELS}  # fmt: skip


def _in_our_unit(value: float | None, unit: str | None, kind: str, default_unit: str) -> float | None:
    """``value`` written in ``unit`` (or, when None/empty, ``default_unit``) converted to
    mm (lengths), nm (wavelengths), s (times) or pixels; None when the unit is not one
    of ``kind``."""
    if value is None or not math.isfinite(value):
        return None
    table = _UNITS[kind]
    unit = (unit or default_unit).strip().lower()
    factor = table.get(unit)
    return None if factor is None else value * factor


def _set(value: float | None) -> float | None:
    """A header fact that is set: positive and finite (0 means "not set")."""
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _plausible(facts: dict) -> dict:
    """``facts`` without the values outside their quantity's physical range (``PLAUSIBLE``)."""
    out = {}
    for key, value in facts.items():
        if value is None:
            continue
        if key in PLAUSIBLE:
            lo, hi = PLAUSIBLE[key]
            if not lo <= value <= hi:
                continue
        out[key] = value
    return out


def _beam_center(x: float | None, y: float | None) -> tuple[float, float] | None:
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)) or (x == 0 and y == 0):
        return None
    return (float(x), float(y))


def _hdf5_quantity(h5, path: str, kind: str, default_unit: str, allow_zero: bool = False) -> float | None:
    if path not in h5:
        return None
    try:
        obj = h5[path]
        value = float(np.asarray(obj[()]).ravel()[0])
        unit = obj.attrs.get("units")
    except (TypeError, ValueError, IndexError, AttributeError, KeyError):
        return None
    if isinstance(unit, np.ndarray):  # a units attribute stored as an array
        unit = unit.ravel()[0] if unit.size else None
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    unit = str(unit) if unit is not None else None
    value = _in_our_unit(value, unit if unit else None, kind, default_unit)
    return value if allow_zero else _set(value)


# ---------------------------------------------------------------------------------------
# Text headers: Pilatus (TIFF, miniCBF) and EDF

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_NUMBER_RE = re.compile(_NUMBER + r"$")

# Pilatus header keywords (DECTRIS "PILATUS CBF header" spec, as fabio.cbfimage's
# PilatusHeader reads them): value positions, unit positions, documented unit, kind.
# Positions count the words of the line once "#:=,()" are spaces.
_PILATUS_KEYS = {
    "Pixel_size": ((1, 4), (2, 5), "m", "length"),
    "Exposure_time": ((1,), (2,), "s", "time"),
    "Exposure_period": ((1,), (2,), "s", "time"),
    "Wavelength": ((1,), (2,), "a", "wavelength"),
    "Detector_distance": ((1,), (2,), "m", "length"),
    "Beam_xy": ((1, 2), (3,), "pixels", "pixels"),
}
_PILATUS_SPACE_LIKE = str.maketrans({c: " " for c in "#:=,()"})


def _float(word: str) -> float | None:
    return float(word) if _NUMBER_RE.match(word) else None


def _pilatus_values(lines) -> dict:
    """``{keyword: [values in our unit]}`` from Pilatus header lines."""
    found: dict = {}
    for line in lines:
        words = str(line).translate(_PILATUS_SPACE_LIKE).split()
        if not words or words[0] not in _PILATUS_KEYS or words[0] in found:
            continue
        value_at, unit_at, default_unit, kind = _PILATUS_KEYS[words[0]]
        values = [_float(words[i]) if i < len(words) else None for i in value_at]
        if any(v is None for v in values):
            continue
        units = [words[i] if i < len(words) else None for i in unit_at]
        if len(units) < len(values):
            units = units * len(values)
        converted = [_in_our_unit(v, u, kind, default_unit) for v, u in zip(values, units)]
        if any(v is None for v in converted):
            continue
        found[words[0]] = converted
    return found


def _pilatus_facts(lines) -> dict:
    values = _pilatus_values(lines)
    facts: dict = {}
    if "Pixel_size" in values:
        facts["pixel_size_mm"] = _set(values["Pixel_size"][0])
    if "Exposure_time" in values:
        facts["exposure_s"] = _set(values["Exposure_time"][0])
    if "Exposure_period" in values:
        facts["period_s"] = _set(values["Exposure_period"][0])
    if "Wavelength" in values:
        facts["wavelength_nm"] = _set(values["Wavelength"][0])
    if "Detector_distance" in values:
        facts["distance_mm"] = _set(values["Detector_distance"][0])
    if "Beam_xy" in values:
        facts["beam_center_px"] = _beam_center(*values["Beam_xy"])
    return {k: v for k, v in facts.items() if v is not None}


def _value_and_unit(text: str) -> tuple[float | None, str | None]:
    """``"7.5e-05 m"`` -> (7.5e-05, "m"); ``"2.5"`` -> (2.5, None); else (None, None)."""
    words = str(text).split()
    if not words or len(words) > 2:
        return None, None
    value = _float(words[0])
    return value, (words[1] if len(words) == 2 else None)


def _edf_facts(header: dict) -> dict:
    """ESRF SAXS keywords (PSize_1, SampleDistance, WaveLength in m; Center_1/2 in
    pixels) and the exposure keys of ESRF writers (ExposureTime, BLISS count_time, LImA
    acq_expo_time in s)."""

    def quantity(keys, kind, default_unit, allow_zero=False):
        for key in keys:
            if key in header:
                value, unit = _value_and_unit(header[key])
                value = _in_our_unit(value, unit, kind, default_unit)
                if not allow_zero:
                    value = _set(value)
                if value is not None:
                    return value
        return None

    facts = {
        "pixel_size_mm": quantity(("PSize_1",), "length", "m"),
        "distance_mm": quantity(("SampleDistance",), "length", "m"),
        "wavelength_nm": quantity(("WaveLength",), "wavelength", "m"),
        "exposure_s": quantity(("ExposureTime", "Exposure_time", "count_time", "acq_expo_time"), "time", "s"),
        "period_s": quantity(("Exposure_period", "frame_time"), "time", "s"),
    }
    if facts["period_s"] is None and "acq_expo_time" in header and "acq_latency_time" in header:
        # LImA: the frame period is the exposure plus the latency between frames.
        expo = quantity(("acq_expo_time",), "time", "s")
        latency = quantity(("acq_latency_time",), "time", "s", allow_zero=True)
        if expo is not None and latency is not None:
            facts["period_s"] = expo + latency
    facts["beam_center_px"] = _beam_center(
        quantity(("Center_1",), "pixels", "pixel", allow_zero=True),
        quantity(("Center_2",), "pixels", "pixel", allow_zero=True),
    )
    return {k: v for k, v in facts.items() if v is not None}


def header_facts(header: dict, reader: str = "") -> dict:
    """Pixel size, exposure, period, wavelength, distance and beam centre from a fabio
    header, in our units, read by the format's documented keys and units.

    Returns only the facts the header states plausibly (:data:`PLAUSIBLE`): a missing,
    unitless-where-a-unit-is-needed or out-of-range value is left out, never guessed.

    ``reader`` is the fabio class that decoded the frame: ``EdfImage`` headers are read
    by the ESRF SAXS keywords; any other header by the Pilatus keywords, found as keys
    (fabio's ``PilatusImage`` splits the TIFF description into ``{key: "value unit"}``)
    or as "# Key value unit" lines in a text field (miniCBF
    ``_array_data.header_contents``, a TIFF ``imageDescription``).
    """
    if reader.startswith("Edf"):
        return _edf_facts(header)
    lines = [f"{key} {value}" for key, value in header.items() if key in _PILATUS_KEYS]
    for text in header.values():
        if "\n" in text and "#" in text:
            lines.extend(text.splitlines())
    return _pilatus_facts(lines)


# ---------------------------------------------------------------------------------------
# MarCCD / Rayonix binary header

_MARCCD_OFFSET = 1024
_MARCCD_SIZE = 3072
_MARCCD_TEXTS = ("filetitle", "filepath", "filename", "acquire_timestamp", "header_timestamp", "save_timestamp",
                 "file_comments", "dataset_comments")  # fmt: skip


def _read_marccd_header(path: Path, shape: tuple[int, int]) -> dict | None:
    """The MarCCD/Rayonix frame header of a TIFF file, or None when it has none.

    The header is the 3072-byte ``frame_header`` at byte 1024 of the TIFF, laid out as
    ``fabio.marccdimage.HEADER_FORMAT`` (from MarCCD's C definition). It is taken as one
    when its ``header_byte_order`` field reads 1234 (little-endian) or 4321
    (big-endian) in that byte order and its ``nfast`` x ``nslow`` are the image's
    columns x rows. Returns the scalar fields as ints and the text fields as str.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_MARCCD_OFFSET + _MARCCD_SIZE)
    except OSError:
        return None
    if len(head) < _MARCCD_OFFSET + _MARCCD_SIZE or head[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    block = head[_MARCCD_OFFSET:]
    # header_byte_order: 4 (header_type) + 16 (header_name) + 4 + 4 bytes in.
    if struct.unpack_from("<I", block, 28)[0] == 1234:
        order = "<"
    elif struct.unpack_from(">I", block, 28)[0] == 4321:
        order = ">"
    else:
        return None
    try:
        from fabio.marccdimage import HEADER_FORMAT, HEADER_NAMES
    except ImportError:  # pragma: no cover - fabio is a dependency
        return None
    fmt = order + HEADER_FORMAT.lstrip("@=<>!")
    if struct.calcsize(fmt) != _MARCCD_SIZE:
        return None
    values = struct.unpack(fmt, block[:_MARCCD_SIZE])
    fields: dict = {}
    texts: dict = {}
    for name, value in zip(HEADER_NAMES, values):
        if isinstance(value, bytes):
            base = name.split("[", 1)[0]
            if base in _MARCCD_TEXTS:
                texts[base] = texts.get(base, b"") + value
        elif "[" not in name:
            fields[name] = int(value)
    if (fields.get("nfast"), fields.get("nslow")) != (shape[1], shape[0]):
        return None
    for name, raw in texts.items():
        text = raw.split(b"\x00", 1)[0].decode("latin-1").strip()
        if text:
            fields[name] = text
    return fields


def _marccd_facts(h: dict) -> dict:
    """MarCCD/Rayonix header fields in our units: pixelsize_x (nm), xtal_to_detector or
    start_xtal_to_detector (1000 * mm), source_wavelength (fm), exposure_time (ms),
    beam_x / beam_y (1000 * pixels). Zeros are "not set"."""

    def scaled(name, factor):
        value = h.get(name)
        return _set(value * factor) if isinstance(value, int) else None

    facts = {
        "pixel_size_mm": scaled("pixelsize_x", 1e-6),  # nm -> mm
        "distance_mm": scaled("xtal_to_detector", 1e-3) or scaled("start_xtal_to_detector", 1e-3),  # um -> mm
        "wavelength_nm": scaled("source_wavelength", 1e-6),  # fm -> nm
        "exposure_s": scaled("exposure_time", 1e-3),  # ms -> s
    }
    if isinstance(h.get("beam_x"), int) and isinstance(h.get("beam_y"), int):
        facts["beam_center_px"] = _beam_center(h["beam_x"] / 1000.0, h["beam_y"] / 1000.0)
    return {k: v for k, v in facts.items() if v is not None}
