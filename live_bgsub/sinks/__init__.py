"""Sinks: where live documents go (Tiled through one writer thread, with a backup).

``from live_bgsub.sinks import TiledPublisher`` imports tiled and bluesky only when
the name is first used, so that ``import live_bgsub.sinks`` stays light.
"""

from __future__ import annotations

__all__ = ["TiledPublisher"]


def __getattr__(name: str):
    if name == "TiledPublisher":
        from live_bgsub.sinks.tiled import TiledPublisher

        return TiledPublisher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
