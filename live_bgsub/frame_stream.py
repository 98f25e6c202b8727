"""What the simulated and the EPICS detector share: frames in an HDF5 file, announced
with StreamResource/StreamDatum documents.

:class:`FrameStreamMixin` goes before ``ophyd.Device`` in a detector's bases. The
detector provides ``_open()`` (start a new file; queue its StreamResource in
``_asset_docs_cache`` and set ``_stream_datum_factory``), ``_close()`` (idempotent),
``_image_data_key()`` and the counters ``_frames_done`` / ``_frames_announced``; the
mixin provides staging, ``read()`` without the STREAM: image key, and the bluesky
external-asset protocol (``get_index``, ``collect_asset_docs``).
"""

from __future__ import annotations

from event_model.documents.stream_datum import StreamRange
from ophyd import Signal

__all__ = ["FrameStreamMixin", "ImageSignal", "KeyedSignal"]


class KeyedSignal(Signal):
    """Soft signal with an explicit data key.

    ophyd's ``Signal(dtype=...)`` describes itself with ``dtype_numpy`` such as
    ``"int64"``, which the event-model schema rejects; this one states a valid key
    (``"<i8"``, ``"<f8"``) and units. The source is the parent's ``SOURCE_PREFIX``.
    """

    def __init__(self, *, key: dict, **kwargs):
        super().__init__(**kwargs)
        self._data_key = dict(key)

    def describe(self):
        prefix = getattr(self.parent, "SOURCE_PREFIX", "SOFT")
        return {self.name: {"source": f"{prefix}:{self.name}", **self._data_key}}


class ImageSignal(Signal):
    """The frame: its data key comes from the parent detector (shape, external).

    With STREAM: data the detector leaves this key out of ``read()``; with legacy
    Resource/Datum its value is the Datum id of the latest frame.
    """

    def describe(self):
        return {self.name: self.parent._image_data_key()}


class FrameStreamMixin:
    """Staging and asset documents of a detector writing frames to one HDF5 file per stage."""

    SOURCE_PREFIX = "SOFT"

    def stage(self):
        """Stage, then open a new file; a failed open is cleaned up and re-raised."""
        staged = super().stage()
        try:
            self._open()
        except BaseException:
            self._close()
            super().unstage()
            raise
        return staged

    def unstage(self):
        """Close the file (idempotent), then unstage."""
        self._close()
        return super().unstage()

    def read(self):
        readings = super().read()
        if self._image_data_key().get("external") == "STREAM:":
            readings.pop(self.image.name, None)  # STREAM: data lives in StreamDatum documents
        return readings

    def get_index(self) -> int:
        """Frames written (and flushed) in the current file."""
        return self._frames_done

    def collect_asset_docs(self, index: int | None = None):
        """Yield the pending asset documents.

        Parameters
        ----------
        index : int, optional
            With StreamResource: announce frames up to (excluding) this index; default
            all frames written so far.

        Returns
        -------
        iterator of (str, dict)
            Queued documents (a ``stream_resource`` once per file, or ``resource`` and
            ``datum`` documents), then one ``stream_datum`` for the frames not yet
            announced.
        """
        items = []
        while self._asset_docs_cache:
            items.append(self._asset_docs_cache.popleft())
        if self._stream_datum_factory is not None:
            stop = self._frames_done if index is None else min(int(index), self._frames_done)
            if stop > self._frames_announced:
                indices = StreamRange(start=self._frames_announced, stop=stop)
                items.append(("stream_datum", self._stream_datum_factory(indices)))
                self._frames_announced = stop
        return iter(items)
