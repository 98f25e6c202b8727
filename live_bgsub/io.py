"""Read detector images (TIFF, CBF, EDF, EIGER/NeXus HDF5) as float32 data plus a validity mask.

Every reader returns a :class:`DetectorImage`: the counts as float32 (0 at invalid
pixels), a boolean ``mask`` that is True where the pixel is valid, and the header facts
the frame carries (pixel size, exposure, wavelength, distance) when present.

Invalid pixels are the detectors' sentinels, never intensity:

- negative values (Pilatus gaps read -1, dead pixels -2),
- the integer dtype's maximum (EIGER marks gaps and dead pixels with ``2**16-1`` or
  ``2**32-1``; saturated pixels read the same),
- NaN and infinities in floating-point data,
- pixels flagged in an EIGER ``pixel_mask`` when the HDF5 file carries one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageReadError

__all__ = ["DetectorImage", "read_image", "mask_invalid", "HDF5_SUFFIXES"]

#: File name suffixes read with h5py (EIGER master/data files, NeXus).
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nexus")

# Dataset paths tried, in order, in HDF5 files (NeXus NXdata default, EIGER layouts).
_HDF5_DATA_PATHS = ("entry/data/data", "entry/data/data_000001", "entry/instrument/detector/data")
_HDF5_FACTS = {
    # name: (path, unit factor to our unit)
    "pixel_size_mm": ("entry/instrument/detector/x_pixel_size", 1e3),  # m -> mm
    "exposure_s": ("entry/instrument/detector/count_time", 1.0),
    "period_s": ("entry/instrument/detector/frame_time", 1.0),
    "distance_mm": ("entry/instrument/detector/detector_distance", 1e3),  # m -> mm
    "wavelength_nm": ("entry/instrument/beam/incident_wavelength", 0.1),  # A -> nm
}
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
        Reader that decoded it (``"fabio:PilatusImage"``, ``"hdf5:/entry/data/data"``, ...).
    frame : int
        Index of this frame in a multi-frame file.
    n_frames : int
        Number of frames the file holds.
    pixel_size_mm, exposure_s, period_s, wavelength_nm, distance_mm : float or None
        Header facts, None when the file does not carry them.
    header : dict
        The raw header (keys and values as strings).
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
    header: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape


def mask_invalid(raw: np.ndarray, pixel_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split a raw frame into float32 counts and a validity mask.

    Parameters
    ----------
    raw : ndarray, 2-D
        Frame as the detector wrote it (any integer or floating dtype).
    pixel_mask : ndarray, optional
        Detector pixel mask of the same shape, nonzero where a pixel is bad (EIGER).

    Returns
    -------
    data : ndarray of float32
        Counts, 0 at invalid pixels.
    mask : ndarray of bool
        True where the pixel is valid (not negative, not the dtype's maximum, finite,
        not flagged in ``pixel_mask``).

    Examples
    --------
    >>> data, mask = mask_invalid(np.array([[1, -1], [2**31 - 1, 5]], dtype=np.int32))
    >>> mask.tolist()
    [[True, False], [False, True]]
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
        TIFF, CBF, EDF or any other format fabio reads; HDF5/NeXus (``.h5``, ``.nxs``,
        ...) is read with h5py, including EIGER master files whose data sit in linked
        files.
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
        fmt = f"fabio:{type(img).__name__}"
    data, mask = mask_invalid(raw)
    facts = _header_facts(header)
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
        for key, (fact_path, factor) in _HDF5_FACTS.items():
            if fact_path in h5:
                try:
                    facts[key] = float(np.asarray(h5[fact_path][()]).ravel()[0]) * factor
                except (TypeError, ValueError, IndexError):
                    pass
        pixel_mask = None
        if _HDF5_PIXEL_MASK in h5:
            pm = np.asarray(h5[_HDF5_PIXEL_MASK][()])
            if pm.shape == raw.shape:
                pixel_mask = pm
        header = {k: str(v) for k, v in ds.attrs.items()}
    data, mask = mask_invalid(raw, pixel_mask)
    return DetectorImage(data, mask, str(path), f"hdf5:/{name}", frame, n_frames, header=header, **facts)


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def _first_number(text: str) -> float | None:
    m = re.search(_NUMBER, text)
    return float(m.group(1)) if m else None


def _header_facts(header: dict) -> dict:
    """Pixel size, exposure, period, wavelength and distance from a fabio header."""
    # Pilatus miniCBF keeps its "# Key value" lines in one text field: split them out.
    merged = dict(header)
    for text in list(header.values()):
        if "\n" in text and "#" in text:
            for line in text.splitlines():
                line = line.strip().lstrip("#").strip()
                if not line:
                    continue
                key, _, value = line.partition(" ")
                merged.setdefault(key.strip(":"), value.strip())
    lower = {k.lower(): v for k, v in merged.items()}

    def number(*keys):
        for key in keys:
            if key.lower() in lower:
                value = _first_number(lower[key.lower()])
                if value is not None:
                    return value, lower[key.lower()]
        return None, ""

    facts: dict = {}
    px, text = number("Pixel_size", "PSize_1", "x_pixel_size")
    if px is not None:
        # Pilatus writes metres ("172e-6 m x 172e-6 m"); EDF PSize_1 is metres too.
        facts["pixel_size_mm"] = px * 1e3 if (px < 0.01 or " m" in text) else px
    t, _ = number("Exposure_time", "ExposureTime", "count_time", "acq_expo_time")
    if t is not None:
        facts["exposure_s"] = t
    t, _ = number("Exposure_period", "frame_time", "acq_latency_time")
    if t is not None:
        facts["period_s"] = t
    wl, _ = number("Wavelength", "WaveLength")
    if wl is not None:
        # EDF writes metres; Pilatus and EIGER headers write angstrom.
        facts["wavelength_nm"] = wl * 1e9 if wl < 1e-6 else wl * 0.1
    d, text = number("Detector_distance", "SampleDistance", "detector_distance")
    if d is not None:
        # Metres when the header says so or the value is too small to be millimetres.
        facts["distance_mm"] = d * 1e3 if (text.rstrip().endswith(" m") or d < 20) else d
    return facts
