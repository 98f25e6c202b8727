"""Batch sizing: which batch sizes a device path compiles for, and which one fits a latency budget.

Frames go to the device in micro-batches padded to a few fixed sizes
(:func:`compiled_batch_sizes`: one compilation each); :func:`choose_batch_size` picks the
largest whose worst frame latency fits a budget, from measured batch times
(:meth:`live_bgsub.device.DevicePath.measure_batch_times`).
"""

from __future__ import annotations

__all__ = ["choose_batch_size", "compiled_batch_sizes"]


def choose_batch_size(batch_times_s: dict, latency_budget_s: float, frame_period_s: float = 0.0) -> int:
    """The largest batch size whose worst frame latency fits a budget.

    Parameters
    ----------
    batch_times_s : dict
        Measured seconds per batch, by batch size (:meth:`live_bgsub.device.DevicePath.measure_batch_times`).
    latency_budget_s : float
        Most seconds from a frame's arrival to its result.
    frame_period_s : float, optional
        Seconds between frames. The first frame of a batch of ``b`` waits ``(b - 1)``
        periods for the batch to fill, then the batch time: worst latency
        ``(b - 1) * period + t(b)``. Default 0 (frames already queued: latency ``t(b)``).

    Returns
    -------
    int
        The largest ``b`` meeting the budget (larger batches have more frames/s on every
        backend measured); the smallest measured size when none does.

    Examples
    --------
    >>> choose_batch_size({1: 0.04, 4: 0.12, 8: 0.22}, 0.15)
    4
    >>> choose_batch_size({1: 0.04, 4: 0.12, 8: 0.22}, 0.15, frame_period_s=0.02)
    1
    """
    if not batch_times_s:
        raise ValueError("batch_times_s is empty: measure at least one batch size")
    if not latency_budget_s > 0:
        raise ValueError(f"latency_budget_s must be positive, got {latency_budget_s!r}")
    fits = [b for b, t in batch_times_s.items() if (b - 1) * frame_period_s + t <= latency_budget_s]
    return int(max(fits)) if fits else int(min(batch_times_s))


def compiled_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """Batch sizes the pipeline is compiled for: powers of two below ``batch_size``, and it.

    A batch of ``n <= batch_size`` frames is padded to the smallest of them that holds it.

    Examples
    --------
    >>> compiled_batch_sizes(8)
    (1, 2, 4, 8)
    >>> compiled_batch_sizes(6)
    (1, 2, 4, 6)
    """
    sizes = {batch_size}
    b = 1
    while b < batch_size:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))
