"""Which classical method is right? Every method against the synthetic truth.

For seeded synthetic Pilatus patterns (``live_bgsub.synth``) the true background and
the true signal are known. Each frame is folded with its true geometry; each method's
corrected fold (the recovered signal) is compared with the folded true signal:

- MAE (counts per pixel) and PSNR (dB, "unified" normalisation as in the paper's
  Table 1: both images divided by the input fold's maximum, data range 1), on the
  whole fold and on the centre region of interest (``metrics.center_roi``);
- the relative error of I11/I10 measured on the corrected fold (``roi_metrics``)
  against the generator's true ratio.

The row ``oracle`` subtracts the folded *true* background: what is left is photon
noise, the floor any method can reach.

Run::

    python -m benchmarks.method_truth --n 20 --downsample 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from live_bgsub.background import METHODS, subtract_background
from live_bgsub.fold import FoldMap
from live_bgsub.geometry import Geometry
from live_bgsub.metrics import center_roi, mae, psnr, roi_metrics
from live_bgsub.synth import make_pattern

DEFAULT_METHODS = [m for m in METHODS if m not in ("none", "transition")]


def evaluate(n: int, methods, downsample: int, preset: str = "pilatus-1m", seed0: int = 0) -> dict:
    rows = {name: {"mae": [], "psnr": [], "mae_roi": [], "psnr_roi": [], "i11_i10_err": [], "s10_err": [], "seconds": []} for name in ["oracle", *methods]}
    for k in range(n):
        p = make_pattern(preset, seed=seed0 + k)
        g = Geometry(p.params["center"], p.params["rotation_deg"])
        fm = FoldMap(p.frame.shape, g, p.mask)
        folded, count = fm.fold(p.frame, p.mask)
        true_signal, _ = fm.fold(p.signal, p.mask)
        true_background, _ = fm.fold(p.background, p.mask)
        valid = count > 0
        scale = float(folded[valid].max())
        roi_valid = center_roi(valid)
        truth_ratio = p.params["i11_i10"]
        for name in rows:
            t = time.perf_counter()
            if name == "oracle":
                corrected = np.where(valid, folded - true_background, 0)
            else:
                _, corrected = subtract_background(folded, name, valid, downsample=downsample)
            seconds = time.perf_counter() - t
            r = rows[name]
            r["mae"].append(mae(corrected, true_signal, mask=valid))
            r["psnr"].append(psnr(corrected / scale, true_signal / scale, mask=valid))
            r["mae_roi"].append(mae(center_roi(corrected), center_roi(true_signal), mask=roi_valid))
            r["psnr_roi"].append(psnr(center_roi(corrected) / scale, center_roi(true_signal) / scale, mask=roi_valid))
            measured = roi_metrics(corrected, mask=valid)
            ratio = measured["i11_i10"]
            r["s10_err"].append(abs(measured["s10_px"] - p.params["s10_px"]))
            r["i11_i10_err"].append(abs(ratio - truth_ratio) / truth_ratio if np.isfinite(ratio) else np.nan)
            r["seconds"].append(seconds)
    summary = {}
    for name, r in rows.items():
        err = np.array(r["i11_i10_err"])
        summary[name] = {
            "mae": float(np.median(r["mae"])),
            "psnr_db": float(np.median(r["psnr"])),
            "mae_roi": float(np.median(r["mae_roi"])),
            "psnr_roi_db": float(np.median(r["psnr_roi"])),
            "i11_i10_rel_err_median": float(np.nanmedian(err)) if np.isfinite(err).any() else None,
            "i11_i10_rel_err_worst": float(np.nanmax(err)) if np.isfinite(err).any() else None,
            "i11_i10_not_found": int(np.isnan(err).sum()),
            "s10_err_worst_px": float(np.nanmax(r["s10_err"])) if np.isfinite(r["s10_err"]).any() else None,
            "method_ms": 1e3 * float(np.median(r["seconds"])),
        }
    return summary


def to_markdown(summary: dict, n: int, downsample: int) -> str:
    lines = [
        f"Synthetic Pilatus 1M, {n} seeded patterns, true geometry, downsample={downsample}; medians over patterns.",
        "",
        "| method | MAE (counts) | PSNR (dB) | MAE centre ROI | PSNR centre ROI (dB) | I11/I10 rel. error median / worst | S10 error worst (px) | no equator | method ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        err = (
            f"{100 * s['i11_i10_rel_err_median']:.1f}% / {100 * s['i11_i10_rel_err_worst']:.1f}%"
            if s["i11_i10_rel_err_median"] is not None
            else "n/a"
        )
        lines.append(
            f"| {name} | {s['mae']:.3f} | {s['psnr_db']:.1f} | {s['mae_roi']:.3f} | {s['psnr_roi_db']:.1f} | {err} | {s['s10_err_worst_px']:.2f} | {s['i11_i10_not_found']} | {s['method_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="number of synthetic patterns (default 20)")
    ap.add_argument("--downsample", type=int, default=2, help="working resolution of the methods (default 2, MuscleX's)")
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    ap.add_argument("--json", help="write the summary as JSON here")
    args = ap.parse_args(argv)
    summary = evaluate(args.n, args.methods, args.downsample)
    print(to_markdown(summary, args.n, args.downsample))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "downsample": args.downsample, "machine": platform.processor() or platform.machine(), "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
