"""Exceptions raised by live_bgsub; each also subclasses the matching builtin."""

__all__ = ["LiveBgsubError", "ImageReadError", "GeometryError", "ProcessingError"]


class LiveBgsubError(Exception):
    """Base class of every error raised on purpose by live_bgsub."""


class ImageReadError(LiveBgsubError, ValueError):
    """A detector image could not be read or is not a usable 2-D frame."""


class GeometryError(LiveBgsubError, ValueError):
    """The beam centre or equator rotation could not be found or is invalid."""


class ProcessingError(LiveBgsubError, ValueError):
    """A frame could not be processed (for example every pixel is masked)."""
