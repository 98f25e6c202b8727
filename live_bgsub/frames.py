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
open across frames. :class:`RunFrames` follows one run's documents and says which frames they announce
and where each one is. The live callback, the bus's RunEngine side and the bus's
workers (:mod:`live_bgsub.bus`) share these pieces, so a frame means the same thing on
every path.
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
    "RunFrames",
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


class RunFrames:
    """One raw run's frames, as its documents announce them.

    Feed it the run's documents (the caller routes them to the run, e.g. with
    :class:`live_bgsub.routing.RunIndex`, which also keeps the resource documents);
    each method returns the :class:`FrameRef` s the document completes. The frames are
    those of data key ``data_key`` (default: :func:`pick_data_key`) in stream
    ``stream_name``. The run's datums are kept here until :meth:`release`.

    Attributes
    ----------
    data_key, external : str or None
        The frames' key and its ``external`` (``"STREAM:"``, a legacy ``"FILESTORE:"``,
        or None for inline arrays), once the stream's descriptor is seen.
    frame_shape : (int, int) or None
        From the descriptor (:func:`frame_shape`).
    config : dict
        The descriptor's configuration values, merged across devices.
    event_times : dict
        Raw seq_num -> the event's time.
    """

    def __init__(self, start: dict, *, data_key: str | None = None, stream_name: str = "primary"):
        self.start = start
        self.uid = start["uid"]
        self.stream_name = stream_name
        self.wanted_key = data_key
        self.descriptor_uids: set[str] = set()
        self.data_key: str | None = None
        self.external: str | None = None
        self.frame_shape: tuple[int, int] | None = None
        self.config: dict = {}
        self.event_times: dict[int, float] = {}
        self._datums: dict[str, tuple[str, dict]] = {}  # datum id -> (resource uid, datum_kwargs)
        self._waiting: dict[str, list[tuple[int, float]]] = {}  # datum id -> events waiting for it

    def descriptor(self, doc: dict) -> bool:
        """Take a descriptor; True when it is of the frames' stream. ProcessingError
        when the stream holds no key that can be taken for the frames."""
        if doc.get("name") != self.stream_name:
            return False
        self.descriptor_uids.add(doc["uid"])
        if self.data_key is not None:  # a second descriptor (configuration changed): same key
            return True
        keys = doc["data_keys"]
        self.data_key = pick_data_key(keys, self.wanted_key, self.stream_name)
        self.external = keys[self.data_key].get("external")
        self.frame_shape = frame_shape(keys[self.data_key])
        for device in (doc.get("configuration") or {}).values():
            self.config.update(device.get("data") or {})
        return True

    def ready(self, descriptor_uid: str | None) -> bool:
        """Whether documents of this descriptor can bring frames."""
        return self.data_key is not None and descriptor_uid in self.descriptor_uids

    def event(self, doc: dict, now: float, resource_of) -> list[FrameRef]:
        """The frame of an event: inline, through its datum (one given to :meth:`datum`;
        ``resource_of(uid)``: the Resource document or None, e.g.
        :meth:`live_bgsub.routing.RunIndex.resource`), or none yet (the datum has not
        come, or a StreamDatum brings it)."""
        seq = int(doc["seq_num"])
        self.event_times[seq] = doc["time"]
        if self.external and self.external.startswith("STREAM:"):
            return []
        value = doc["data"].get(self.data_key)
        if self.external:  # legacy Resource/Datum: the event holds a datum id
            datum = self._datums.get(value)
            if datum is None:
                self._waiting.setdefault(value, []).append((seq, now))
                return []
            return [datum_ref(resource_of(datum[0]), seq, now, datum[1], datum[0])]
        return [FrameRef(seq, now, array=None if value is None else np.asarray(value),
                         error=None if value is not None else f"event {seq} holds no {self.data_key!r}")]

    def stream_datum(self, doc: dict, sres: dict | None, now: float) -> list[FrameRef]:
        """The frames of a StreamDatum (``sres``: its StreamResource, None if unknown);
        ProcessingError for a document that cannot be understood."""
        if sres is None:
            raise ProcessingError(f"stream_datum {doc['uid']!r} refers to unknown stream_resource {doc['stream_resource']!r}")
        if sres.get("data_key") != self.data_key:
            return []
        seqs = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
        indices = range(doc["indices"]["start"], doc["indices"]["stop"])
        if seqs.start < 1 or seqs.stop < seqs.start:
            raise ProcessingError(f"stream_datum {doc['uid']!r}: seq_nums {doc['seq_nums']} is not a range of sequence numbers from 1")
        if len(seqs) != len(indices):
            raise ProcessingError(f"stream_datum {doc['uid']!r} has {len(indices)} indices but seq_nums {doc['seq_nums']}")
        path, dataset, error = hdf5_location(sres)
        return [FrameRef(seq, now, path=path, dataset=dataset, index=index, error=error) for seq, index in zip(seqs, indices)]

    def datum(self, datum_id: str, resource_uid: str, resource: dict | None, kwargs: dict) -> list[FrameRef]:
        """Keep a datum for the events that will name it; return the frames of the
        events that were waiting for it."""
        self._datums[datum_id] = (resource_uid, kwargs)
        return [datum_ref(resource, seq, received, kwargs, resource_uid) for seq, received in self._waiting.pop(datum_id, ())]

    def never_arrived(self) -> list[int]:
        """At the stop: the frames whose datum never came (forgotten here)."""
        seqs = sorted(seq for waiting in self._waiting.values() for seq, _ in waiting)
        self._waiting.clear()
        return seqs

    def release(self) -> None:
        """Drop what a finished run's frames no longer need (event times, datums)."""
        self.event_times = {}
        self._datums = {}
        self._waiting = {}


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
