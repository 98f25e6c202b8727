"""Score a trained model as the paper did: ``python -m training.evaluate MODEL --images DIR | --synthetic N``.

``MODEL`` is a shipped model name (``mixed``, ``model:mixed``) or a ``.keras`` file with
its card (``.json`` of the same stem) beside it. Evaluation pairs are built exactly as
for training (:mod:`training.data`: the card's targets, downsample and input size), the
model runs on them, and the script prints:

- MAE / PSNR / SSIM in the layout of the paper's Tables 1-3 (unified normalisation on
  the whole fold; independent normalisation on the whole fold; independent on the
  centre ROI), next to the paper's numbers. "Unified" divides prediction and target
  by the input fold's maximum; "independent" divides both by the target's own maximum
  (the scale an independent model predicts in). The same scale is applied to the
  prediction and the target, so each model is scored in both layouts whatever it was
  trained with. Invalid pixels are 0 in both.
- I11/I10 and S10 read by :func:`live_bgsub.metrics.roi_metrics` from the model's output
  against the same read from its method's (the target), per method and per source:
  how often an equator is read from both, the differences' medians, 90th percentiles
  and worst, and whether issue 14's goals (:data:`METRIC_GOALS`) are met.
- On synthetic data, the error of the recovered signal against the *true* signal for
  the model, every classical method and the oracle (fold minus the true background):
  MAE (counts), PSNR (unified), both on the whole fold and the centre ROI, and the
  relative error of I11/I10 read by :func:`live_bgsub.metrics.roi_metrics`. All at the
  model's working resolution and input crop, so every row sees the same pixels.

It writes ``OUT/NAME-evaluation.png`` (for a few folds: input, classical target or
truth, prediction and difference, in the spirit of the paper's Figure 5, plus the
training curves when ``history.json`` lies beside the model) and
``OUT/NAME-evaluation.json``.

A usage error (a model that is not found or does not load, a missing images folder, no
evaluation data) is one line, ``python -m training.evaluate: error: WHAT``, and exit
status 2 (:mod:`live_bgsub.errors`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from live_bgsub.errors import ArgumentParser, at_least, usage_exit
from live_bgsub.logs import quiet_libraries, verbose_requested
from training.data import (
    PAPER_METHODS,
    SYNTHETIC_TRUTH,
    DataConfig,
    collect_folds,
    discard_outliers,
    fit_to_size,
    make_pairs,
    method_target,
)

#: The paper's Tables 1-3: ``layout -> model -> (MAE, PSNR dB, SSIM)``.
PAPER = {
    "unified_full": {
        "white-top-hat": (0.9e-4, 68.54, 0.9998),
        "circularly-symmetric": (0.7e-4, 61.01, 0.9997),
        "smoothed-gaussian": (0.7e-4, 64.77, 0.9998),
        "mixed": (2.6e-4, 51.63, 0.9973),
    },
    "independent_full": {
        "white-top-hat": (3.7e-4, 62.96, 0.9979),
        "circularly-symmetric": (2.8e-4, 56.97, 0.9985),
        "smoothed-gaussian": (2.7e-4, 57.17, 0.9989),
    },
    "independent_centre": {
        "white-top-hat": (10.1e-4, 51.31, 0.9951),
        "circularly-symmetric": (8.7e-4, 48.60, 0.9956),
        "smoothed-gaussian": (7.3e-4, 47.94, 0.9973),
        "mixed": (38.3e-4, 36.85, 0.9504),
    },
}

LAYOUTS = (
    ("unified_full", "Table 1: unified normalisation, whole fold"),
    ("independent_full", "Table 2: independent normalisation, whole fold"),
    ("independent_centre", "Table 3: independent normalisation, centre ROI"),
)


# --------------------------------------------------------------------------- model


def load_model(spec):
    """``(keras_model, card, path)`` of a shipped name or a ``.keras`` path.

    Goes through :meth:`live_bgsub.inference.BackgroundModel.load`, allowing
    ``independent``-normalisation models, since evaluation knows the targets' scale.
    """
    from live_bgsub.inference import BackgroundModel

    bm = BackgroundModel.load(spec, allow_independent=True)
    return bm.model, bm.card, Path(bm.path)


def _history_path(model_path: Path) -> Path | None:
    for p in (model_path.with_name(model_path.stem + ".history.json"), model_path.parent / "history.json"):
        if p.exists():
            return p
    return None


# --------------------------------------------------------------------------- predictions


def predict(model, card, pairs, *, batch_size=8) -> dict:
    """The model's prediction of every pair in detector units and the scales of both layouts.

    Returns
    -------
    dict
        ``pred`` and ``target`` (counts, ``(n, rows, cols)``, 0 at invalid pixels),
        ``masks``, ``input_max`` and ``target_max`` (per pair).
    """
    from live_bgsub.model import prepare, restore

    depth = int(card.get("architecture", {}).get("depth", 4))
    norm = card.get("normalization", "unified")
    x, _, info = prepare(pairs.inputs, pairs.masks, depth=depth, normalization=norm, targets=pairs.targets)
    out = model.predict(x, batch_size=batch_size, verbose=0)
    masks = info["masks"]
    target = np.where(masks, pairs.targets, 0).astype(np.float64)
    # restore(): detector units; an independent model's output is in units of the
    # target's maximum (known here: this is evaluation).
    pred = np.where(masks, restore(out, info).reshape(target.shape), 0).astype(np.float64)
    tmax = target.reshape(len(target), -1).max(axis=1) if len(target) else np.zeros(0)
    # The paper's unified scale is the input's maximum whatever the model's normalisation.
    inputs = np.where(masks, pairs.inputs, 0).astype(np.float64)
    imax = inputs.reshape(len(inputs), -1).max(axis=1) if len(inputs) else np.zeros(0)
    return {
        "pred": pred,
        "target": target,
        "masks": masks,
        "input_max": np.where(imax > 0, imax, 1.0),
        "target_max": np.where(tmax > 0, tmax, 1.0),
    }


def layout_metrics(p: dict, select=None) -> dict:
    """Mean metrics of the selected pairs in the three layouts of Tables 1-3."""
    from live_bgsub.metrics import image_metrics

    idx = range(len(p["pred"])) if select is None else select
    rows = {"unified": [], "independent": []}
    for i in idx:
        for layout, s in (("unified", p["input_max"][i]), ("independent", p["target_max"][i])):
            rows[layout].append(image_metrics(p["pred"][i] / s, p["target"][i] / s, data_range=1.0))

    def mean(layout, key):
        v = np.array([r[key] for r in rows[layout]], np.float64)
        return float(np.mean(np.minimum(v, 200.0))) if len(v) else math.nan

    return {
        "unified_full": {k: mean("unified", k) for k in ("mae", "psnr", "ssim")},
        "independent_full": {k: mean("independent", k) for k in ("mae", "psnr", "ssim")},
        "independent_centre": {k: mean("independent", k + "_roi") for k in ("mae", "psnr", "ssim")},
        "n": len(rows["unified"]),
    }


def paper_tables(results: dict, model_target: str) -> str:
    """Markdown tables 1-3: our rows (one per target, plus the mixed row) beside the paper's."""
    lines = []
    for layout, title in LAYOUTS:
        lines += [f"{title}", "", "| model | n | MAE | paper MAE | PSNR (dB) | paper PSNR | SSIM | paper SSIM |", "|---|---|---|---|---|---|---|---|"]
        for row, m in results.items():
            # A mixed model's per-target rows are not the paper's single-method models.
            key = row if (model_target != "mixed" or row == "mixed") else None
            paper = PAPER[layout].get(key) if key else None
            label = f"mixed, {row} targets" if model_target == "mixed" and row != "mixed" else row
            if row == SYNTHETIC_TRUTH:
                paper_cells = ["n/a (not in the paper)"] + ["n/a"] * 2
            elif paper:
                paper_cells = [f"{paper[0]:.1e}", f"{paper[1]:.2f}", f"{paper[2]:.4f}"]
            else:
                paper_cells = ["-", "-", "-"]
            v = m[layout]
            lines.append(
                f"| {label} | {m['n']} | {v['mae']:.1e} | {paper_cells[0]} | {v['psnr']:.2f} | {paper_cells[1]} | {v['ssim']:.4f} | {paper_cells[2]} |"
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- metrics


#: Issue 14's goals for the metrics read from a model's output against those read from
#: its method's: I11/I10 within 2 % (median over frames), S10 within 0.2 px.
METRIC_GOALS = {"i11_i10_rel": 0.02, "s10_px": 0.2}


def _equator_reading(corrected, mask) -> tuple[float, float, str]:
    """``(I11/I10, S10 px, verdict)`` of one corrected fold; NaN and the reason when no
    equator is read."""
    from live_bgsub.metrics import roi_metrics

    try:
        m = roi_metrics(corrected, mask=mask)
    except Exception as exc:  # noqa: BLE001  (a failed read counts as "no equator")
        return math.nan, math.nan, f"{type(exc).__name__}: {exc}"
    if not m.get("equator_found"):
        return math.nan, math.nan, str(m.get("reason") or "no equator")
    return float(m["i11_i10"]), float(m["s10_px"]), str(m["quality"]["verdict"])


def metric_agreement(p: dict, pairs, folds, *, downsample: int) -> list[dict]:
    """I11/I10 and S10 read (:func:`live_bgsub.metrics.roi_metrics`) from the model's
    corrected fold against the same read from its target (its method's corrected fold),
    one row per pair: both at the model's working resolution and input crop, S10
    differences in full-resolution pixels (``downsample`` times the working ones)."""
    source_of = {f.id: f.source for f in folds}
    rows = []
    for i, fid in enumerate(pairs.ids):
        mask = p["masks"][i]
        r_model, s_model, v_model = _equator_reading(p["pred"][i], mask)
        r_method, s_method, v_method = _equator_reading(p["target"][i], mask)
        rows.append({
            "id": fid, "method": pairs.methods[i], "source": source_of[fid],
            "model": {"i11_i10": r_model, "s10_px": s_model, "verdict": v_model},
            "target": {"i11_i10": r_method, "s10_px": s_method, "verdict": v_method},
            "i11_i10_rel_diff": abs(r_model / r_method - 1.0) if r_method > 0 else math.nan,
            "s10_diff_px": abs(s_model - s_method) * downsample,
        })  # fmt: skip
    return rows


def summarise_agreement(rows: list[dict]) -> dict:
    """Per group of rows: how often an equator is read from both, and the medians, 90th
    percentiles and worst of the two differences where it is (None without any)."""
    found_model = np.array([math.isfinite(r["model"]["s10_px"]) for r in rows], bool)
    found_target = np.array([math.isfinite(r["target"]["s10_px"]) for r in rows], bool)
    out = {"n": len(rows), "both": int((found_model & found_target).sum()),
           "model_only": int((found_model & ~found_target).sum()), "target_only": int((~found_model & found_target).sum())}  # fmt: skip
    for key in ("i11_i10_rel_diff", "s10_diff_px"):
        v = np.array([r[key] for r in rows], np.float64)
        v = v[np.isfinite(v)]
        out[key] = {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "worst": float(v.max())} if v.size else None
    ratio, s10 = out["i11_i10_rel_diff"], out["s10_diff_px"]
    out["goals_met"] = bool(
        ratio is not None and s10 is not None and out["model_only"] == out["target_only"] == 0
        and ratio["median"] <= METRIC_GOALS["i11_i10_rel"] and s10["median"] <= METRIC_GOALS["s10_px"]
    )  # fmt: skip
    return out


def agreement_table(groups: dict) -> str:
    """Markdown: one row per group (a method, a source) of :func:`summarise_agreement`."""
    lines = [
        f"Metrics from the model's output against its method's (roi_metrics on both; goals: I11/I10 within "
        f"{100 * METRIC_GOALS['i11_i10_rel']:g} % and S10 within {METRIC_GOALS['s10_px']:g} px, medians)",
        "",
        "| rows | n | equator in both | model only | method only | I11/I10 diff median / p90 / worst | S10 diff px median / p90 / worst | goals |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in groups.items():
        ratio = s["i11_i10_rel_diff"]
        s10 = s["s10_diff_px"]
        r_txt = f"{100 * ratio['median']:.2f}% / {100 * ratio['p90']:.2f}% / {100 * ratio['worst']:.2f}%" if ratio else "n/a"
        s_txt = f"{s10['median']:.3f} / {s10['p90']:.3f} / {s10['worst']:.3f}" if s10 else "n/a"
        lines.append(f"| {name} | {s['n']} | {s['both']} | {s['model_only']} | {s['target_only']} | {r_txt} | {s_txt} | "
                     f"{'met' if s['goals_met'] else 'not met'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- truth


def truth_scores(corrected, truth, mask, *, input_max, truth_params=None, downsample=1) -> dict:
    """Error of one recovered signal against the true signal (one fold).

    Parameters
    ----------
    corrected, truth : ndarray, 2-D
        Recovered and true signal in counts (same fold, same resolution).
    mask : ndarray of bool
        Valid fold pixels.
    input_max : float
        The input fold's maximum: the "unified" scale of the PSNR.
    truth_params : dict, optional
        ``i11_i10`` and ``s10_px`` (full-resolution pixels) of the generator.
    downsample : int, optional
        Working resolution of the fold, to convert S10 back to full-resolution pixels.

    Returns
    -------
    dict
        ``mae``, ``psnr``, ``mae_roi``, ``psnr_roi``, and with ``truth_params``
        ``i11_i10_rel_err`` and ``s10_err_px`` (NaN when no equator was found).
    """
    from live_bgsub.metrics import center_roi, mae, psnr

    s = float(input_max) if input_max > 0 else 1.0
    roi_mask = center_roi(mask)
    out = {
        "mae": mae(corrected, truth, mask=mask),
        "psnr": min(psnr(corrected / s, truth / s, mask=mask), 200.0),
        "mae_roi": mae(center_roi(corrected), center_roi(truth), mask=roi_mask),
        "psnr_roi": min(psnr(center_roi(corrected) / s, center_roi(truth) / s, mask=roi_mask), 200.0),
    }
    if truth_params and "i11_i10" in truth_params:
        ratio, s10, _ = _equator_reading(corrected, mask)
        t = truth_params["i11_i10"]
        out["i11_i10_rel_err"] = abs(ratio - t) / t if np.isfinite(ratio) else math.nan
        s10_full = s10 * downsample + (downsample - 1) / 2.0
        out["s10_err_px"] = abs(s10_full - truth_params["s10_px"]) if np.isfinite(s10) else math.nan
    return out


def summarise_truth(rows: dict) -> dict:
    """Medians over folds of :func:`truth_scores` per method (and worst I11/I10 error)."""
    summary = {}
    for name, scores in rows.items():
        s = {}
        for key in ("mae", "psnr", "mae_roi", "psnr_roi"):
            s[key] = float(np.median([r[key] for r in scores]))
        err = np.array([r.get("i11_i10_rel_err", math.nan) for r in scores], np.float64)
        s["i11_i10_rel_err_median"] = float(np.nanmedian(err)) if np.isfinite(err).any() else None
        s["i11_i10_rel_err_worst"] = float(np.nanmax(err)) if np.isfinite(err).any() else None
        s["i11_i10_not_found"] = int(np.isnan(err).sum())
        s10 = np.array([r.get("s10_err_px", math.nan) for r in scores], np.float64)
        s["s10_err_worst_px"] = float(np.nanmax(s10)) if np.isfinite(s10).any() else None
        summary[name] = s
    return summary


def truth_table(summary: dict, n: int, downsample: int, input_size) -> str:
    lines = [
        (
            f"Recovered signal vs the true signal: {n} synthetic folds, true geometry, downsample {downsample}, "
            f"input {list(input_size)}; medians over folds (PSNR in the unified normalisation)."
        ),
        "",
        "| method | MAE (counts) | PSNR (dB) | MAE centre ROI | PSNR centre ROI (dB) | I11/I10 rel. error median / worst | S10 error worst (px) | no equator |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        err = (
            f"{100 * s['i11_i10_rel_err_median']:.1f}% / {100 * s['i11_i10_rel_err_worst']:.1f}%"
            if s["i11_i10_rel_err_median"] is not None
            else "n/a"
        )
        s10 = f"{s['s10_err_worst_px']:.2f}" if s["s10_err_worst_px"] is not None else "n/a"
        lines.append(
            f"| {name} | {s['mae']:.3f} | {s['psnr']:.2f} | {s['mae_roi']:.3f} | {s['psnr_roi']:.2f} | {err} | {s10} | {s['i11_i10_not_found']} |"
        )
    return "\n".join(lines)


def compare_with_truth(folds, model_pred, *, model_label, methods, downsample, input_size) -> dict:
    """Rows of :func:`truth_scores` for the model, the oracle and every classical method.

    ``model_pred`` maps a fold id to the model's corrected fold (counts, input size).
    """
    rows = {model_label: [], "oracle": [], **{m: [] for m in methods}}
    for f in folds:
        if f.truth is None:
            continue
        mask = fit_to_size(f.mask, input_size)
        truth = fit_to_size(np.where(f.mask, f.truth, 0), input_size)
        fold = fit_to_size(f.fold, input_size)
        kw = {"input_max": float(fold[mask].max()) if mask.any() else 1.0, "truth_params": f.info.get("truth"), "downsample": downsample}
        rows[model_label].append(truth_scores(model_pred[f.id], truth, mask, **kw))
        oracle = np.where(f.mask, f.fold - (f.expected - f.truth), 0)
        rows["oracle"].append(truth_scores(fit_to_size(oracle, input_size), truth, mask, **kw))
        for m in methods:
            corrected = fit_to_size(method_target(f.fold, f.mask, m, downsample), input_size)
            rows[m].append(truth_scores(corrected, truth, mask, **kw))
    return rows


def truth_by_source(sources, rows: dict, *, model_label: str, methods) -> dict:
    """Per source (``sources[i]`` is the source of row ``i`` of every list in ``rows``):
    the centre-ROI PSNR medians of the model, the oracle and the best classical method
    there, and the model's gain over that method (dB)."""
    out = {}
    for source in dict.fromkeys(sources):
        keep = [i for i, s in enumerate(sources) if s == source]
        summary = summarise_truth({k: [v[i] for i in keep] for k, v in rows.items()})
        best = max(methods, key=lambda m: summary[m]["psnr_roi"]) if methods else None
        entry = {"n": len(keep), "model_psnr_roi": summary[model_label]["psnr_roi"], "oracle_psnr_roi": summary["oracle"]["psnr_roi"]}
        if best:
            entry.update(best=best, best_psnr_roi=summary[best]["psnr_roi"], gain_db=summary[model_label]["psnr_roi"] - summary[best]["psnr_roi"])
        out[source] = entry
    return out


def truth_source_table(per_source: dict) -> str:
    lines = [
        "Centre ROI against the true signal, per source (medians; PSNR unified, dB)",
        "",
        "| source | n | model | oracle | best classical | its PSNR | model - best |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, e in per_source.items():
        best = (f"{e['best']} | {e['best_psnr_roi']:.2f} | {e['gain_db']:+.2f}") if "best" in e else "n/a | | "
        lines.append(f"| {source} | {e['n']} | {e['model_psnr_roi']:.2f} | {e['oracle_psnr_roi']:.2f} | {best} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figure


def draw_figure(path, p: dict, pairs, *, examples=3, history=None, title=""):
    """Figure-5-like panels (input, target, prediction, difference) and training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    # One example per target method first, then the next pairs.
    order, seen = [], set()
    for i, m in enumerate(pairs.methods):
        if m not in seen:
            order.append(i)
            seen.add(m)
    order += [i for i in range(len(pairs)) if i not in order]
    chosen = order[: max(0, examples)]
    n_rows = len(chosen) + (1 if history else 0)
    if n_rows == 0:
        return None
    fig, axes = plt.subplots(n_rows, 4, figsize=(13, 3.2 * n_rows), squeeze=False)
    for r, i in enumerate(chosen):
        s = p["input_max"][i]
        x = pairs.inputs[i] / s
        t = p["target"][i] / s
        y = p["pred"][i] / s
        d = y - t
        top = max(float(np.max(x)), 1e-6)
        norm = PowerNorm(0.3, vmin=0, vmax=top)
        target_label = "true signal" if pairs.methods[i] == SYNTHETIC_TRUTH else f"target: {pairs.methods[i]}"
        for ax, img, label in ((axes[r, 0], x, f"input {pairs.ids[i]}"), (axes[r, 1], np.clip(t, 0, None), target_label), (axes[r, 2], np.clip(y, 0, None), "predicted")):
            im = ax.imshow(img, cmap="magma", norm=norm, origin="upper")
            ax.set_title(label, fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        lim = max(float(np.max(np.abs(d))), 1e-9)
        im = axes[r, 3].imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="upper")
        axes[r, 3].set_title(f"predicted - target (MAE {np.mean(np.abs(d)):.1e})", fontsize=8)
        fig.colorbar(im, ax=axes[r, 3], fraction=0.046)
        for ax in axes[r]:
            ax.set_xlabel("equator (px)", fontsize=7)
            ax.set_ylabel("meridian (px)", fontsize=7)
    if history:
        ep = history.get("epochs", [])
        e = [row["epoch"] + 1 for row in ep]
        ax = axes[-1]
        for k, (a, keys) in enumerate(((ax[0], ("loss", "val_loss")), (ax[1], ("psnr", "val_psnr")), (ax[2], ("ssim", "val_ssim")), (ax[3], ("psnr_roi", "val_psnr_roi")))):
            for key in keys:
                vals = [row.get(key, np.nan) for row in ep]
                if np.isfinite(vals).any():
                    a.plot(e, vals, marker=".", label=key)
            if k == 0:
                a.set_yscale("log")
            a.set_xlabel("epoch")
            a.legend(fontsize=7)
            a.set_title("training curves" if k == 0 else "", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


PROG = "python -m training.evaluate"


def _fail(message) -> None:
    usage_exit(PROG, message)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog=PROG,
        description="Score a background U-Net in the layout of the paper's Tables 1-3 (and against the synthetic "
        "truth), and draw a Figure-5-like PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("model", metavar="MODEL", help="shipped model name (e.g. mixed) or path to a .keras file with its card beside it")
    src = ap.add_argument_group("evaluation data (at least one)")
    src.add_argument("--images", action="append", default=[], metavar="DIR", help="folder of real frames; repeatable")
    src.add_argument("--synthetic", type=at_least(0), default=0, metavar="N", help="number of synthetic patterns")
    src.add_argument("--synthetic-seed", type=int, default=100_000, help="seed of the first synthetic pattern (training recipes use 0..)")
    src.add_argument("--synthetic-preset", nargs="+", default=["pilatus-1m"], metavar="PRESET",
                     help="detector(s) of the synthetic patterns, or 'families' (every family of live_bgsub.synth.FAMILIES); N patterns each")
    src.add_argument("--leave-out", nargs="?", const="", default=None, metavar="PRESET",
                     help="test on the family the model was trained without (its card's leave_out; naming one checks it is there); "
                     "replaces --synthetic-preset")
    src.add_argument("--synthetic-counts", type=float, default=1.0, help="dose of the synthetic patterns")
    ap.add_argument("--discard", type=float, default=0.0, help="fraction of folds per source discarded as outliers first")
    ap.add_argument("--held-out", action="store_true", help="drop the folds the model was trained or validated on (ids in its card)")
    ap.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), help="classical methods of the truth comparison")
    ap.add_argument("--examples", type=at_least(0), default=3, help="folds drawn in the figure")
    ap.add_argument("--batch-size", type=at_least(1), default=8, help="pairs per model call")
    ap.add_argument("--out", default=".", metavar="DIR", help="folder of NAME-evaluation.png and NAME-evaluation.json")
    return ap


def _data_config(args, presets, targets, card) -> DataConfig:
    return DataConfig(
        images=tuple(args.images),
        synthetic=args.synthetic,
        synthetic_seed=args.synthetic_seed,
        synthetic_preset=tuple(presets),
        synthetic_counts=args.synthetic_counts,
        targets=targets,
        downsample=int(card.get("downsample", 2)),
        input_size=tuple(card.get("input_size", (288, 288))),
        discard=args.discard,
        split=(1.0, 0.0, 0.0),
    )


def source_table(p: dict, pairs, folds) -> tuple[str, dict]:
    """Per source (a detector family, a folder's runs): PSNR and SSIM in the three layouts."""
    source_of = {f.id: f.source for f in folds}
    groups: dict = {}
    for i, fid in enumerate(pairs.ids):
        groups.setdefault(source_of[fid], []).append(i)
    per = {src: layout_metrics(p, idx) for src, idx in groups.items()}
    lines = [
        "Per source (mean over pairs)",
        "",
        "| source | n | PSNR unified, whole (dB) | SSIM | PSNR independent, whole | PSNR independent, centre |",
        "|---|---|---|---|---|---|",
    ]
    for src, m in per.items():
        lines.append(
            f"| {src} | {m['n']} | {m['unified_full']['psnr']:.2f} | {m['unified_full']['ssim']:.4f} | "
            f"{m['independent_full']['psnr']:.2f} | {m['independent_centre']['psnr']:.2f} |"
        )
    return "\n".join(lines) + "\n", per


def evaluate(args, *, log=print) -> dict:
    """Score ``args.model`` (the parsed :func:`build_parser` arguments); returns the report.

    A usage error (see the module) prints one line and raises SystemExit with status 2
    before the model is loaded where it can be."""
    if not (args.images or args.synthetic):
        _fail("give --images DIR and/or --synthetic N")
    for folder in args.images:
        if not Path(folder).is_dir():
            _fail(f"--images: no such folder: {str(folder)!r}")
    try:
        model, card, model_path = load_model(args.model)
    except ValueError as exc:  # ModelError: not found, not a model, not loadable
        _fail(f"MODEL: {exc}")
    name = card.get("name") or model_path.stem
    targets = tuple(card.get("methods") or [card.get("target", "white-top-hat")])
    presets = args.synthetic_preset
    if args.leave_out is not None:
        left = list(card.get("config", {}).get("leave_out") or [])
        if args.leave_out and args.leave_out not in left:
            _fail(f"--leave-out {args.leave_out}: model {name!r} was trained on it (its card's leave_out is {left})")
        if not left:
            _fail(f"--leave-out: model {name!r} left no family out of its training (its card's leave_out is [])")
        presets = [args.leave_out] if args.leave_out else left
        if not args.synthetic:
            _fail("--leave-out needs --synthetic N (patterns per left-out family)")
    if SYNTHETIC_TRUTH in targets and args.images:
        _fail(f"model {name!r} predicts the synthetic truth: real frames have none; use --synthetic N")
    try:
        config = _data_config(args, presets, targets, card)
    except ValueError as exc:
        _fail(str(exc))
    t0 = time.perf_counter()
    folds, sources = collect_folds(config, log=log)
    folds, discarded = discard_outliers(folds, config.discard)
    if args.held_out:
        seen = set(card.get("data", {}).get("split_ids", {}).get("train", [])) | set(card.get("data", {}).get("split_ids", {}).get("val", []))
        dropped = [f.id for f in folds if f.id in seen]
        folds = [f for f in folds if f.id not in seen]
        log(f"  held out: dropped {len(dropped)} folds the model trained or validated on")
    if not folds:
        _fail("no evaluation folds left")
    pairs = make_pairs(folds, targets, downsample=config.downsample, input_size=config.input_size, target_params=card.get("config", {}).get("target_params"))
    t1 = time.perf_counter()
    p = predict(model, card, pairs, batch_size=args.batch_size)
    seconds_model = time.perf_counter() - t1
    results = {}
    rows = sorted(set(pairs.methods), key=list(targets).index)
    for m in rows:
        results[m] = layout_metrics(p, [i for i, mm in enumerate(pairs.methods) if mm == m])
    if len(rows) > 1:
        results["mixed"] = layout_metrics(p)
    model_target = card.get("target", targets[0])
    log(f"\nModel {name!r} (target {model_target}, {card.get('normalization', 'unified')} normalisation) on {len(folds)} folds, {len(pairs)} pairs:\n")
    log(paper_tables(results, model_target))
    per_source = None
    if len({f.source for f in folds}) > 1:
        text, per_source = source_table(p, pairs, folds)
        log(text)
    agreement = None
    if SYNTHETIC_TRUTH not in targets:  # the truth's own readings are in the truth table below
        rows_metrics = metric_agreement(p, pairs, folds, downsample=config.downsample)
        groups = {m: summarise_agreement([r for r in rows_metrics if r["method"] == m]) for m in rows}
        sources_seen = sorted({r["source"] for r in rows_metrics})
        if len(sources_seen) > 1:
            groups.update({src: summarise_agreement([r for r in rows_metrics if r["source"] == src]) for src in sources_seen})
        log(agreement_table(groups))
        agreement = {"goals": METRIC_GOALS, "groups": groups, "rows": rows_metrics}
    report = {
        "model": str(args.model),
        "name": name,
        "card_target": model_target,
        "sources": sources,
        "discarded": discarded,
        "n_folds": len(folds),
        "n_pairs": len(pairs),
        "tables": results,
        "per_source": per_source,
        "metrics_agreement": agreement,
        "paper": {k: {m: list(v) for m, v in t.items()} for k, t in PAPER.items()},
        "seconds": {"data": t1 - t0, "model": seconds_model},
    }
    if any(f.truth is not None for f in folds):
        # The model's corrected fold of each synthetic fold (first pair of the fold).
        model_pred = {}
        for i, fid in enumerate(pairs.ids):
            model_pred.setdefault(fid, p["pred"][i])
        label = f"model:{name}"
        truth_rows = compare_with_truth(
            [f for f in folds if f.truth is not None],
            model_pred,
            model_label=label,
            methods=args.methods,
            downsample=config.downsample,
            input_size=config.input_size,
        )
        summary = summarise_truth(truth_rows)
        n_truth = len(truth_rows[label])
        log(truth_table(summary, n_truth, config.downsample, config.input_size))
        best = max((m for m in args.methods), key=lambda m: summary[m]["psnr_roi"]) if args.methods else None
        if best:
            gain = summary[label]["psnr_roi"] - summary[best]["psnr_roi"]
            log(f"\ncentre-ROI PSNR of the model vs the best classical method ({best}): {gain:+.2f} dB")
        with_truth = [f for f in folds if f.truth is not None]
        per_source = truth_by_source([f.source for f in with_truth], truth_rows, model_label=label, methods=list(args.methods))
        log("\n" + truth_source_table(per_source))
        report["truth"] = {"n": n_truth, "summary": summary, "best_classical": best, "per_source": per_source}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hist_path = _history_path(model_path)
    history = json.loads(hist_path.read_text()) if hist_path else None
    png = draw_figure(out / f"{name}-evaluation.png", p, pairs, examples=args.examples, history=history, title=f"{name}: {model_target}, {len(folds)} folds")
    report["figure"] = str(png) if png else None
    (out / f"{name}-evaluation.json").write_text(json.dumps(report, indent=1, default=float))
    log(f"\nwrote {png} and {out / (name + '-evaluation.json')}")
    return report


def main(argv=None) -> int:
    verbose, argv = verbose_requested(sys.argv[1:] if argv is None else argv)
    quiet_libraries(verbose)  # -v: TensorFlow's start-up lines too
    args = build_parser().parse_args(argv)
    evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
