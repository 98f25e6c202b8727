"""Simulated beamline hardware for exercising the live pipeline without a beamline.

:class:`SimDetector` (module :mod:`live_bgsub.sim.detector`) is a synchronous ophyd
Device that a bluesky RunEngine stages, triggers and reads like a BioCAT Pilatus 1M
(or an EIGER2 9M): it writes synthetic fiber-diffraction frames from
:func:`live_bgsub.synth.make_pattern` to an HDF5 file (SWMR) and announces them with
StreamResource/StreamDatum or legacy Resource/Datum documents.

Importing this package stays light: ophyd, bluesky and h5py are imported only when
:class:`SimDetector` is first looked up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from .detector import SimDetector

__all__ = ["SimDetector"]

_LAZY = {"SimDetector": ".detector"}


def __getattr__(name: str) -> Any:
    """Import :class:`SimDetector` (and with it ophyd) on first access."""
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
