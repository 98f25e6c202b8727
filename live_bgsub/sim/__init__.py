"""Simulated beamline hardware for exercising the live pipeline without a beamline.

:class:`SimDetector` (module :mod:`live_bgsub.sim.detector`) is a synchronous ophyd
Device that a bluesky RunEngine stages, triggers and reads like a BioCAT Pilatus 1M
(or an EIGER2 9M): it writes synthetic fiber-diffraction frames from
:func:`live_bgsub.synth.make_pattern` to an HDF5 file (SWMR) and announces them with
StreamResource/StreamDatum or legacy Resource/Datum documents.

:mod:`live_bgsub.sim.ioc` serves the same frames from a simulated areaDetector IOC
(caproto) over Channel Access; :func:`run_ioc_subprocess` runs one in a child process.

Importing this package stays light: ophyd, bluesky, caproto and h5py are imported only
when :class:`SimDetector` or an IOC helper is first looked up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from .detector import SimDetector
    from .ioc import render_bank, run_ioc_subprocess

__all__ = ["SimDetector", "render_bank", "run_ioc_subprocess"]

_LAZY = {"SimDetector": ".detector", "render_bank": ".ioc", "run_ioc_subprocess": ".ioc"}


def __getattr__(name: str) -> Any:
    """Import :class:`SimDetector` (ophyd) or the IOC helpers (caproto) on first access."""
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
