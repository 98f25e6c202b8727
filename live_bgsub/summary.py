"""``summary.png``: one raw run and its derived run, as a scientist reads them.

:func:`summary_figure` draws, from a Tiled catalog of Bluesky runs:

- top row, one frame of the run in the fold's geometry (beam centre at the origin,
  equator along x, meridian along y, pixels): the **raw fold** (the raw frame folded
  with the run's geometry, recomputed here from the raw frame), the **background** the
  run subtracted (raw fold minus corrected fold: exactly what the method removed) and
  the **corrected fold** (read from the derived run), each with its colour bar. Raw
  fold and background share one asinh colour scale; invalid fold pixels are grey.
- bottom row, over the run (frame = raw ``seq_num`` on x): **I11/I10** and **S10**
  (px) as measured, +- 1 standard error, frames whose ``metrics_verdict`` is not
  ``"good"`` drawn apart, frames without metrics (failed, skipped, no equator)
  marked along the bottom, and the simulator's truth (the raw run's
  ``*_sim_true_i11_i10`` / ``*_sim_true_s10_px`` event data, recorded by
  :class:`live_bgsub.sim.detector.SimDetector`) as a line when the raw run has it.

The frame shown is the good frame whose I11/I10 is the median of the good frames (a
typical frame), unless ``frame`` names one; its title says which. :func:`plot_summary`
writes the figure to a PNG (``live-bgsub demo`` does, see ``docs/summary.md``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["plot_summary", "summary_figure"]

#: Gids of the figure's panels (``Axes.get_gid()``), for finding them in a figure.
PANELS = ("raw_fold", "background", "corrected", "i11_i10", "s10")
TRUTH_LABEL = "simulator truth"
_SQRT3 = math.sqrt(3.0)
#: The derived run's columns the figure reads (one request: :func:`_columns`).
_METRIC_COLUMNS = ("seq_num", "raw_seq_num", "i11_i10", "i11_i10_err", "s10_px", "s10_err_px", "m3_px", "metrics_verdict")
_VERDICT_STYLE = {  # verdict -> marker style of the frames drawn apart
    "doubtful": dict(marker="^", mfc="none", mec="tab:orange", ms=8, mew=1.6, ls="none"),
}
_OTHER_STYLE = dict(marker="s", mfc="none", mec="tab:purple", ms=7, mew=1.5, ls="none")


def plot_summary(catalog, raw_uid: str, derived_uid: str, path, *, frame: int | None = None) -> Path:
    """Write ``summary.png`` (:func:`summary_figure`) to ``path``; return the path.

    Parameters
    ----------
    catalog : tiled client node
        The catalog holding both runs.
    raw_uid, derived_uid : str
        The raw run and its derived run (:mod:`live_bgsub.callback`).
    path : path-like
        The PNG to write.
    frame : int, optional
        Raw ``seq_num`` of the frame whose folds are drawn; default the typical frame.
    """
    import matplotlib.pyplot as plt

    fig = summary_figure(catalog, raw_uid, derived_uid, frame=frame)
    path = Path(path)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def summary_figure(catalog, raw_uid: str, derived_uid: str, *, frame: int | None = None):
    """The summary as a matplotlib Figure (Agg; close it with ``plt.close(fig)``).

    Parameters are those of :func:`plot_summary`. Panels carry gids (:data:`PANELS`);
    each image has its colour bar (``AxesImage.colorbar``). Never raises for a run
    without processed frames or geometry: the panels then say what is missing.
    """
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = catalog[raw_uid]
    derived = catalog[derived_uid]
    start = derived.metadata.get("start") or {}
    table = _columns(derived, "primary", _METRIC_COLUMNS)
    truth = _truth(raw)
    shown = _choose_frame(table, frame)

    fig = plt.figure(figsize=(16, 10.5), layout="constrained")
    grid = fig.add_gridspec(2, 6, height_ratios=(1.25, 1.0))
    image_axes = [fig.add_subplot(grid[0, 2 * i : 2 * i + 2]) for i in range(3)]
    ratio_ax = fig.add_subplot(grid[1, :3])
    s10_ax = fig.add_subplot(grid[1, 3:])
    for ax, gid in zip([*image_axes, ratio_ax, s10_ax], PANELS):
        ax.set_gid(gid)

    images = _images(raw, derived, start, table, shown)
    _draw_images(fig, image_axes, images, table, truth, shown)
    failures = _failures(derived)
    _draw_series(ratio_ax, table, truth, failures, shown, "i11_i10", "I11 / I10", rel_err="i11_i10_err")
    _draw_series(s10_ax, table, truth, failures, shown, "s10_px", "S10 (px)", abs_err="s10_err_px")
    ratio_ax.set_title("I11/I10 over the run (equatorial intensity ratio)")
    s10_ax.set_title("S10 over the run (1,0 spacing, px from the beam centre)")

    method = (start.get("processing") or {}).get("method", "?")
    verdicts = list(table.get("metrics_verdict", []))
    n_raw = int(((raw.metadata.get("stop") or {}).get("num_events") or {}).get("primary", 0))
    title = (
        f"live_bgsub: raw run {raw_uid[:8]} -> derived run {derived_uid[:8]}, method {method}; "
        f"{len(verdicts)} of {n_raw} frames processed, {sum(v == 'good' for v in verdicts)} with good metrics"
    )
    if shown is not None and "missing" not in images:
        side = image_axes[0].get_images()[0].get_array().shape
        fold_shape = images["raw_fold"].shape
        title += (
            f"\nfolds of frame {shown[1]} ({shown[2]}): the inner {side[1]} x {side[0]} px of the "
            f"{fold_shape[1]} x {fold_shape[0]} px fold, beam centre at (0, 0)"
        )
    fig.suptitle(title, fontsize=13)
    return fig


# --------------------------------------------------------------------------- data


def _columns(run, stream: str, wanted) -> dict:
    """Scalar columns ``wanted`` (those present) of a run's stream, sorted by ``seq_num``.

    One request for all of them (:func:`live_bgsub.catalog.metrics_table` makes one per
    column: ~6 s for a derived run over HTTP); {} when the stream is absent.
    """
    if stream not in run:
        return {}
    node = run[stream]
    present = set(node)
    keys = [k for k in dict.fromkeys(wanted) if k in present]
    if not keys:
        return {}
    data = node.read(variables=keys)
    columns = {k: np.asarray(data[k].values) for k in keys}
    if "seq_num" in columns:
        order = np.argsort(columns["seq_num"], kind="stable")
        columns = {k: v[order] for k, v in columns.items()}
    return columns


def _truth(raw) -> dict:
    """The simulator's per-frame truth in the raw run (name -> (seq_nums, values)), {} if none."""
    if "primary" not in raw:
        return {}
    keys = [k for k in raw["primary"] if not k.startswith("ts_")]  # ts_*: the timestamps
    names = {name: [k for k in keys if k.endswith(f"_sim_true_{name}")] for name in ("i11_i10", "s10_px")}
    names = {name: keys[0] for name, keys in names.items() if len(keys) == 1}
    table = _columns(raw, "primary", ["seq_num", *names.values()])
    if "seq_num" not in table:
        return {}
    return {name: (np.asarray(table["seq_num"], int), np.asarray(table[key], float)) for name, key in names.items()}


def _failures(derived) -> dict:
    """Raw seq_num -> status of the frames without metrics in the derived run."""
    table = _columns(derived, "failures", ["seq_num", "raw_seq_num", "status"])
    return {int(s): str(st) for s, st in zip(table.get("raw_seq_num", []), table.get("status", []))}


def _choose_frame(table: dict, frame: int | None):
    """(row of the derived table, raw seq_num, why) of the frame to draw, or None."""
    seqs = np.asarray(table.get("raw_seq_num", []), int)
    if not seqs.size:
        return None
    if frame is not None:
        rows = np.flatnonzero(seqs == int(frame))
        if not rows.size:
            raise ValueError(f"frame {frame} has no corrected fold in the derived run (processed: {seqs.tolist()})")
        return int(rows[0]), int(frame), "as asked"
    ratio = np.asarray(table.get("i11_i10", np.full(seqs.size, np.nan)), float)
    verdict = np.asarray(table.get("metrics_verdict", [""] * seqs.size)).astype(str)
    good = np.flatnonzero((verdict == "good") & np.isfinite(ratio))
    if good.size:
        median = np.median(ratio[good])
        row = int(good[np.argmin(np.abs(ratio[good] - median))])
        return row, int(seqs[row]), "the good frame with the median I11/I10"
    row = seqs.size // 2
    return row, int(seqs[row]), "the middle processed frame: none has good metrics"


def _images(raw, derived, start: dict, table: dict, shown) -> dict:
    """Raw fold, background and corrected fold of the frame shown, or ``{"missing": why}``."""
    from .fold import FoldMap
    from .geometry import Geometry, find_beam_stop
    from .io import mask_invalid

    if shown is None:
        return {"missing": "no processed frame in the derived run"}
    geometry = start.get("geometry") or {}
    if "center" not in geometry or "fold_shape" not in start:
        return {"missing": "the derived run records no geometry"}
    row, seq, _ = shown
    image_key = next((k for k in raw["primary"] if k.endswith("_image")), None)
    if image_key is None:
        return {"missing": "no *_image frames in the raw run"}
    raw_frame = np.asarray(raw["primary"][image_key][seq - 1])
    fold_row = int(table["seq_num"][row]) - 1 if "seq_num" in table else row
    corrected = np.asarray(derived["primary"]["corrected"][fold_row], np.float32)

    geo = Geometry(tuple(geometry["center"]), float(geometry["rotation_deg"]))
    data, mask = mask_invalid(raw_frame)
    static = None
    if geometry.get("beam_stop"):  # the run masked the beam-stop shadow it found: so do we
        stop = find_beam_stop(data, mask, geo.center)
        static = None if stop is None else ~stop.mask
    folded, count = FoldMap(raw_frame.shape, geo, static, fold_shape=tuple(start["fold_shape"])).fold(data, mask)
    valid = count > 0
    if folded.shape != corrected.shape:
        return {"missing": f"the raw fold {folded.shape} does not match the corrected fold {corrected.shape}"}
    nan = np.float32(np.nan)
    return {
        "raw_fold": np.where(valid, folded, nan),
        "background": np.where(valid, folded - corrected, nan),
        "corrected": np.where(valid, corrected, nan),
    }


# --------------------------------------------------------------------------- drawing


def _draw_images(fig, axes, images: dict, table: dict, truth: dict, shown) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import AsinhNorm
    from matplotlib.ticker import FixedLocator, FormatStrFormatter

    titles = ("raw fold", "background (raw fold - corrected)", "corrected fold (the derived run's)")
    if "missing" in images:
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.text(0.5, 0.5, images["missing"], ha="center", va="center", transform=ax.transAxes, wrap=True)
            _fold_labels(ax)
        return
    row, seq, _ = shown
    extent = _zoom(images["raw_fold"].shape, table, row)
    inner = {key: image[:extent, :extent] for key, image in images.items()}
    raw_fold = inner["raw_fold"][np.isfinite(inner["raw_fold"])]
    top = float(np.percentile(raw_fold, 99.9)) if raw_fold.size else 1.0
    width = max(1.0, float(np.median(raw_fold))) if raw_fold.size else 1.0  # linear up to the typical level
    shared = AsinhNorm(linear_width=width, vmin=0.0, vmax=max(top, 3 * width))
    corr = inner["corrected"][np.isfinite(inner["corrected"])]
    c_top = float(np.percentile(corr, 99.9)) if corr.size else 1.0
    c_low = float(np.percentile(corr, 0.5)) if corr.size else 0.0
    c_width = max(1.0, float(np.median(np.abs(corr)))) if corr.size else 1.0
    c_top = max(c_top, 3 * c_width)
    if c_low < -0.05 * c_top:  # real negative values (over-subtraction): a diverging scale shows them
        c_lim = max(c_top, -c_low)
        c_norm, c_cmap, c_label = AsinhNorm(linear_width=c_width, vmin=-c_lim, vmax=c_lim), "RdBu_r", "red above 0, blue below"
    else:
        c_norm, c_cmap, c_label = AsinhNorm(linear_width=c_width, vmin=0.0, vmax=c_top), "magma", "any values < 0 darkest"
    norms = (shared, shared, c_norm)
    cmaps = ("magma", "magma", c_cmap)
    labels = (
        "counts / px (mean over the 4 quadrants), asinh scale",
        "counts / px, asinh scale (the raw fold's)",
        f"counts / px, asinh scale ({c_label})",
    )
    for ax, key, title, norm, cmap_name, label in zip(axes, ("raw_fold", "background", "corrected"), titles, norms, cmaps, labels):
        cmap = plt.get_cmap(cmap_name).with_extremes(bad="0.75")  # invalid fold pixels: grey
        image = ax.imshow(inner[key], origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
        bar.ax.yaxis.set_major_locator(FixedLocator(_asinh_ticks(norm.vmin, norm.vmax, norm.linear_width)))
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        bar.ax.yaxis.set_minor_locator(FixedLocator([]))
        bar.set_label(label)
        ax.set_title(f"{title}, frame {seq}", fontsize=11)
        _fold_labels(ax)
    bg = inner["background"][np.isfinite(inner["background"])]
    if bg.size:
        lo, hi = np.percentile(bg, [1, 99])
        axes[1].set_title(f"{titles[1]}, frame {seq}\n1st-99th percentile {lo:.3g} to {hi:.3g} counts / px", fontsize=11)
    _mark_reflections(axes[2], table, truth, row, seq)


def _zoom(shape, table: dict, row: int) -> int:
    """Side (px) of the fold's inner square drawn: out to the 2,1 reflection and past M3."""
    s10 = float(np.asarray(table.get("s10_px", [np.nan]), float)[row])
    if not math.isfinite(s10):
        s10 = float(np.nanmedian(np.asarray(table.get("s10_px", [np.nan]), float))) if len(table.get("s10_px", [])) else math.nan
    m3 = np.asarray(table.get("m3_px", [np.nan]), float)
    m3 = float(np.nanmedian(m3)) if np.isfinite(m3).any() else 0.0
    if not math.isfinite(s10):
        return max(shape)
    return int(min(max(shape), math.ceil(max(4.5 * s10, 1.3 * m3))))


def _asinh_ticks(vmin: float, vmax: float, width: float) -> list[float]:
    """0 and +-1, 3, 10, 30, ... from ``width`` on inside [vmin, vmax] (readable ticks on an asinh colour bar)."""
    steps = [m * 10.0**e for e in range(-1, 8) for m in (1, 3) if m * 10.0**e >= width]
    ticks = [0.0] if vmin <= 0 <= vmax else []
    ticks += [t for t in steps if t <= vmax and t >= vmin]
    ticks += [-t for t in steps if -t >= vmin and -t <= vmax]
    ticks = sorted(ticks)
    if len(ticks) > 9:  # then the decades only
        ticks = [t for t in ticks if t == 0 or math.log10(abs(t)).is_integer()]
    return ticks


def _fold_labels(ax) -> None:
    ax.set_xlabel("along the equator (px from the beam centre)")
    ax.set_ylabel("along the meridian (px)")


def _mark_reflections(ax, table: dict, truth: dict, row: int, seq: int) -> None:
    """Ticks where the frame's measured 1,0 and 1,1 are, and the measured values in the title."""
    s10 = float(np.asarray(table.get("s10_px", [np.nan]), float)[row])
    ratio = float(np.asarray(table.get("i11_i10", [np.nan]), float)[row])
    said = f"measured I11/I10 {ratio:.3g}, S10 {s10:.1f} px"
    t = {name: vals[seqs == seq] for name, (seqs, vals) in truth.items()}
    if t.keys() == {"i11_i10", "s10_px"} and all(v.size for v in t.values()):
        said = f"I11/I10 {ratio:.3g} (truth {float(t['i11_i10'][0]):.3g}), S10 {s10:.1f} px (truth {float(t['s10_px'][0]):.1f})"
    ax.set_title(f"corrected fold (the derived run's), frame {seq}\n{said}", fontsize=11)
    if not math.isfinite(s10):
        return
    height = ax.get_ylim()[1]
    for x, name in ((s10, "1,0"), (_SQRT3 * s10, "1,1")):
        ax.annotate(
            name, xy=(x, 0.03 * height), xytext=(x, 0.16 * height), ha="center", color="k", fontsize=9,
            arrowprops=dict(arrowstyle="-|>", color="k", lw=0.8),
        )  # fmt: skip


def _draw_series(ax, table, truth, failures, shown, key, ylabel, *, rel_err=None, abs_err=None) -> None:
    seqs = np.asarray(table.get("raw_seq_num", []), int)
    values = np.asarray(table.get(key, np.full(seqs.size, np.nan)), float)
    verdict = np.asarray(table.get("metrics_verdict", [""] * seqs.size)).astype(str)
    if rel_err is not None:
        err = values * np.asarray(table.get(rel_err, np.full(seqs.size, np.nan)), float)
    else:
        err = np.asarray(table.get(abs_err, np.full(seqs.size, np.nan)), float)
    err = np.where(np.isfinite(err), np.abs(err), 0.0)
    if key in truth:
        t_seq, t_val = truth[key]
        order = np.argsort(t_seq)
        ax.plot(t_seq[order], t_val[order], "-", color="0.15", lw=1.4, alpha=0.8, label=TRUTH_LABEL, zorder=2, gid="truth")
    finite = np.isfinite(values)
    if finite.any():
        ax.plot(seqs[finite], values[finite], "-", color="tab:blue", lw=0.8, alpha=0.45, zorder=1)
    good = (verdict == "good") & finite
    if good.any():
        drawn = ax.errorbar(
            seqs[good], values[good], yerr=err[good], fmt="o", color="tab:blue", ms=5, capsize=2, zorder=3,
            label="measured, good (+- 1 s.e.)",
        )  # fmt: skip
        drawn.lines[0].set_gid("good")  # the markers (not the caps)
    apart = ~good & finite
    for name in sorted(set(verdict[apart])):
        which = apart & (verdict == name)
        style = dict(_VERDICT_STYLE.get(name, _OTHER_STYLE))
        drawn = ax.errorbar(
            seqs[which], values[which], yerr=err[which], fmt=style.pop("marker"), ecolor=style["mec"], elinewidth=0.8,
            capsize=2, zorder=4, label=f"measured, {name or 'no verdict'} (+- 1 s.e.)",
            **{k: v for k, v in style.items() if k != "ls"},
        )  # fmt: skip
        drawn.lines[0].set_gid(f"verdict:{name}")
    # Frames without a value: processed without one (no equator), failed or skipped.
    blank = {int(s): (v or "no value") for s, v in zip(seqs[~finite], verdict[~finite])}
    blank.update(failures)
    if blank:
        where = ax.get_xaxis_transform()
        ax.plot(list(blank), [0.03] * len(blank), "x", color="tab:red", ms=8, mew=1.8, transform=where, zorder=4,
                label="no value: " + ", ".join(sorted(set(blank.values()))), gid="no_value")  # fmt: skip
    if shown is not None:
        ax.axvline(shown[1], color="0.5", ls=":", lw=1.2, label=f"frame {shown[1]} (folds above)", zorder=0)
    if not seqs.size and key not in truth:
        ax.text(0.5, 0.5, "no processed frame", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("frame (raw seq_num)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9, framealpha=0.85)
