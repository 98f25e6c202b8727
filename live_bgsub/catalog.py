"""Reading raw and derived runs back from a Tiled catalog of Bluesky runs.

A derived run's start carries ``raw_uid``; :func:`derived_runs` finds the derived runs
of a raw run. :func:`metrics_table` reads a derived run's per-frame scalars (not the
corrected folds) as numpy columns sorted by ``seq_num``: Tiled 0.2.20 reads a
PostgreSQL table store without ``ORDER BY``, so rows may come back in any order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derived_runs", "frames", "metrics_table"]


def derived_runs(catalog, raw_uid: str) -> list:
    """The derived runs (Tiled clients) made from the raw run ``raw_uid``, oldest first."""
    from tiled.queries import Eq

    results = catalog.search(Eq("start.raw_uid", raw_uid))
    return [results[k] for k in results.keys()]


def metrics_table(run, stream: str = "primary") -> dict:
    """Scalar columns of a run's stream (``seq_num``, ``time``, metrics...) sorted by seq_num.

    Array columns (the corrected folds, raw frames) are left out: read them with
    :func:`frames`.
    """
    node = run[stream]
    columns = {}
    for key in node:
        if key.startswith("ts_"):
            continue
        client = node[key]
        shape = getattr(client, "shape", None)
        if shape is not None and len(shape) > 1:
            continue
        columns[key] = np.asarray(client.read())
    if "seq_num" in columns:
        order = np.argsort(columns["seq_num"], kind="stable")
        columns = {k: v[order] for k, v in columns.items()}
    return columns


def frames(run, key: str, stream: str = "primary", index=slice(None)) -> np.ndarray:
    """Frames of an array column (``corrected``, ``det_image``), by event row (``index``)."""
    return np.asarray(run[stream][key][index])
