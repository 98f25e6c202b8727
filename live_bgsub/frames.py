"""Where a run's frames are: references from Bluesky documents, and reading them.

A detector frame reaches live_bgsub in one of three ways, all turned into a
:class:`FrameRef` (the raw ``seq_num`` plus where the frame is):

- inline: the event's data holds the array (small frames, simulated detectors);
- StreamResource/StreamDatum (event-model 1.19+): an HDF5 file and dataset, and the
  frame's index in it (:func:`hdf5_location`);
- area-detector Resource/Datum (:data:`AD_HDF5_SPECS`): an HDF5 file, dataset
  ``/entry/data/data``, index from the datum's ``point_number`` (:func:`datum_ref`).

:class:`FrameReader` reads a reference: through this process's own writer when it
writes the file (the simulated detector), else with h5py in SWMR mode, keeping files
open across frames. The live callback, the bus's RunEngine side and the bus's workers
(:mod:`live_bgsub.bus`) share these pieces, so a frame means the same thing on every path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .errors import ProcessingError
from .sinks.hdf5 import read_in_process

__all__ = [
    "AD_DATASET",
    "AD_HDF5_SPECS",
    "FrameReader",
    "FrameRef",
    "datum_ref",
    "frame_shape",
    "hdf5_location",
    "pick_data_key",
    "unpack_datum_kwargs",
]

logger = logging.getLogger("live_bgsub.frames")

#: Area-detector Resource specs whose frames are read from :data:`AD_DATASET`.
AD_HDF5_SPECS = ("AD_HDF5", "AD_HDF5_SWMR", "AD_EIGER", "AD_HDF5_GERM")
#: The dataset of an area-detector HDF5 file (and the default of a StreamResource).
AD_DATASET = "/entry/data/data"


@dataclass
class FrameRef:
    """One raw frame: its ``seq_num``, when it became available, and where it is.

    Exactly one of ``array`` (inline), ``path``/``dataset``/``index`` (HDF5) or
    ``error`` (known unreadable, e.g. an unsupported resource spec) says where.
    ``received`` is ``time.monotonic()`` of the process that made the reference.
    """

    seq_num: int
    received: float
    array: np.ndarray | None = None
    path: str | None = None
    dataset: str | None = None
    index: int | None = None
    error: str | None = None


def pick_data_key(keys: dict, wanted: str | None, stream: str) -> str:
    """The data key of a descriptor's ``data_keys`` holding the frames.

    ``wanted`` when given (ProcessingError if absent), else the one key with two
    dimensions beyond 1 (a key ending in ``_image`` wins among several).
    """
    if wanted is not None:
        if wanted not in keys:
            raise ProcessingError(f"data key {wanted!r} is not in stream {stream!r} (keys: {sorted(keys)})")
        return wanted
    images = [k for k, v in keys.items() if len([d for d in (v.get("shape") or []) if d not in (None, 1)]) == 2]
    if len(images) > 1:
        named = [k for k in images if k.endswith("_image")]
        images = named if len(named) == 1 else images
    if len(images) != 1:
        raise ProcessingError(
            f"cannot tell which data key of stream {stream!r} holds the frames: 2-D keys {sorted(images)} "
            f"among {sorted(keys)}; pass data_key="
        )
    return images[0]


def frame_shape(data_key: dict) -> tuple[int, int] | None:
    """A frame's (rows, cols) from a descriptor's data key: its ``shape`` without the
    leading 1s of a one-frame-per-event detector; None when that is not two dims."""
    try:
        shape = [int(d) for d in data_key.get("shape") or []]
    except (TypeError, ValueError):
        return None
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or min(shape) < 2:
        return None
    return shape[0], shape[1]


def hdf5_location(sres: dict) -> tuple[str | None, str | None, str | None]:
    """``(path, dataset, error)`` of a StreamResource document; ``error`` says why its
    frames cannot be read (not HDF5, not a local file), the others are then None."""
    mimetype = sres.get("mimetype", "")
    if mimetype not in ("application/x-hdf5", "application/x-hdf5; swmr"):
        return None, None, f"stream_resource mimetype {mimetype!r} is not supported (expected 'application/x-hdf5')"
    uri = urlparse(sres["uri"])
    if uri.scheme not in ("file", ""):
        return None, None, f"stream_resource uri {sres['uri']!r} is not a file:// uri"
    dataset = (sres.get("parameters") or {}).get("dataset", AD_DATASET)
    return uri.path, dataset, None


def datum_ref(resource: dict | None, seq_num: int, received: float, datum_kwargs: dict, resource_uid: str = "") -> FrameRef:
    """The :class:`FrameRef` of an area-detector datum (``resource`` None: unknown)."""
    if resource is None:
        return FrameRef(seq_num, received, error=f"datum refers to unknown resource {resource_uid!r}")
    spec = resource.get("spec")
    if spec not in AD_HDF5_SPECS:
        return FrameRef(seq_num, received, error=f"resource spec {spec!r} is not supported (expected one of {AD_HDF5_SPECS})")
    root = resource.get("root") or ""
    path = str(Path(root) / resource["resource_path"]) if root else resource["resource_path"]
    per_point = int((resource.get("resource_kwargs") or {}).get("frame_per_point", 1))
    index = int(datum_kwargs.get("point_number", 0)) * per_point
    return FrameRef(seq_num, received, path=path, dataset=AD_DATASET, index=index)


def unpack_datum_kwargs(columns: dict, n: int) -> list[dict]:
    """A datum_page's column-wise ``datum_kwargs`` as one dict per datum."""
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


class FrameReader:
    """Read :class:`FrameRef` s, keeping HDF5 files open between frames.

    Not thread-safe: one reader per thread. Call :meth:`close` when a run ends (files
    of a finished acquisition are then reopened fresh).
    """

    def __init__(self) -> None:
        self._files: dict[str, object] = {}

    def read(self, ref: FrameRef) -> np.ndarray:
        """The frame's array; ProcessingError (or OSError) when it cannot be read."""
        if ref.error:
            raise ProcessingError(ref.error)
        if ref.array is not None:
            return ref.array
        if ref.path is None or ref.index is None:
            raise ProcessingError(f"frame {ref.seq_num} has neither an array nor a file location")
        if ref.index < 0:  # Python would read a frame counted from the end: another frame
            raise ProcessingError(f"{ref.path}: frame index {ref.index} is negative")
        try:  # a file this process writes (the simulated detector): through the writer's handle
            frame = read_in_process(ref.path, ref.dataset, ref.index)
        except IndexError as exc:
            raise ProcessingError(str(exc)) from None
        if frame is not None:
            return frame
        dataset = self._dataset(ref.path, ref.dataset)
        if ref.index >= dataset.shape[0]:
            dataset.refresh()
        if ref.index >= dataset.shape[0]:
            raise ProcessingError(f"{ref.path}: frame index {ref.index} not written yet ({dataset.shape[0]} frames)")
        return dataset[ref.index]

    def _dataset(self, path: str, name: str):
        import h5py

        key = f"{path}::{name}"
        ds = self._files.get(key)
        if ds is None:
            if not Path(path).exists():
                raise FileNotFoundError(f"HDF5 file {path} does not exist")
            try:
                f = h5py.File(path, "r", libver="latest", swmr=True)
            except OSError:
                f = h5py.File(path, "r")  # a finished file written without SWMR
            if name not in f:
                f.close()
                raise ProcessingError(f"{path}: no dataset {name!r}")
            ds = self._files[key] = f[name]
        return ds

    def close(self) -> None:
        """Close the files opened so far."""
        for ds in self._files.values():
            try:
                ds.file.close()
            except Exception:
                logger.debug("live_bgsub: closing %s failed", ds, exc_info=True)
        self._files.clear()
