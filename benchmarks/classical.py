"""Benchmark live_bgsub's classical pipeline on one frame, optionally against MuscleX.

Usage::

    python -m benchmarks.classical [--image PATH] [--repeats N] [--downsample 2]
        [--methods white-top-hat ...] [--musclex-python /opt/musclex-venv/bin/python]
        [--json OUT]

Without ``--image`` the frame is synthetic (``live_bgsub.synth.make_pattern(seed=0)``);
``/work/shared/data/real/P40_1_3_00000.tif`` (a Pilatus 1M frame) is the usual choice.

Stages timed (medians over ``--repeats`` after ``--warmup`` untimed runs, seconds):

    read            live_bgsub.io.read_image(path)            (real frames only)
    geometry        live_bgsub.geometry.find_geometry(data, mask)
    fold_map        FoldMap(shape, geometry, mask)             (once per run when live)
    fold            fold_map.fold(data, mask)
    method[m]       subtract_background(fold, m, count > 0, downsample=...)
    metrics         live_bgsub.metrics.roi_metrics on a corrected fold
    end_to_end[m]   geometry + fold_map + fold + method, timed as one call: what MuscleX
                    does for every frame (its "full": centre + rotation + fold + method)
    live[m]         fold + method with the geometry and map built beforehand: the
                    per-frame cost of a run whose geometry is found once

With ``--musclex-python`` the same frame, methods and downsample factor are run through
MuscleX 2.1.1's QuadrantFolder (``benchmarks/musclex_reference.py``, in a subprocess
under MuscleX's own interpreter; MuscleX is never imported here) and a table compares
them. "ratio" is MuscleX full / ours end to end: above 1 means we are faster.

Caveats that matter when reading the numbers:

- MuscleX's "full" is centre + rotation + fold + rmin/rmax + downsample + method out of
  its own ``process()`` (its self-evaluation extras are excluded; ``process_total`` in
  the JSON includes them). Its "method only" includes the cubic upsampling and the
  subtraction, like ours.
- Parameters: both sides use their defaults. MuscleX's length parameters are in
  working-resolution pixels (tophat 50 at ``downsample=2`` is ~100 full-resolution
  pixels; at ``downsample=1`` it stays 50 px), ours are in full-resolution pixels with
  defaults equal to MuscleX's at ``downsample=2``. At ``downsample=1`` the two
  therefore run different physical sizes; at ``downsample=2`` they match.
- MuscleX compiles numba code on first use; the warm-up run absorbs it on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._timing import time_call

#: Our method names (MuscleX's names live in benchmarks/musclex_reference.py).
METHODS = (
    "white-top-hat",
    "circularly-symmetric",
    "convex-hull",
    "roving-window",
    "smoothed-gaussian",
    "smoothed-boxcar",
)
DEFAULT_MUSCLEX_PYTHON = "/opt/musclex-venv/bin/python"
MUSCLEX_SCRIPT = Path(__file__).resolve().with_name("musclex_reference.py")


# --------------------------------------------------------------------------- helpers


def machine_facts() -> dict:
    """CPU model, cores and library versions of the machine the numbers come from."""
    from live_bgsub.provenance import machine_facts as common_facts

    facts = common_facts()
    facts["thread_env"] = {
        k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    }
    try:
        import live_bgsub

        facts["live_bgsub"] = live_bgsub.__version__
    except ImportError:  # pragma: no cover - the benchmark runs in the project venv
        pass
    return facts


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _synthetic_frame(seed: int = 0):
    """(data, mask, raw int32 frame, true geometry) of ``synth.make_pattern(seed=seed)``."""
    from live_bgsub import synth

    pattern = synth.make_pattern(seed=seed)
    truth = {
        "center": [float(c) for c in pattern.params["center"]],
        "rotation_deg": float(pattern.params["rotation_deg"]),
    }
    return pattern.frame, pattern.mask, pattern.raw(), truth


def _write_tiff_for_musclex(raw: np.ndarray, path: str) -> None:
    """Write a frame as a Pilatus would (int32, -1 / -2 sentinels) for MuscleX to read.

    The sentinels matter: MuscleX's centre and rotation searches scale the frame to 8 bit
    from its minimum, so on P40_1_3_00001 turning its 35 dead pixels from -2 into -1
    moves MuscleX's centre from (408.93, 490.45) to (410.29, 491.10) and its rotation
    from 1.7 to 1.2 degrees.
    """
    import fabio.tifimage

    fabio.tifimage.tifimage(data=np.asarray(raw, dtype=np.int32)).write(path)


# --------------------------------------------------------------------------- ours


def bench_ours(data, mask, path, methods, downsample, repeats, warmup) -> dict:
    """Time every stage of live_bgsub's classical pipeline on one frame."""
    from live_bgsub import geometry as geo
    from live_bgsub.fold import FoldMap

    out: dict = {"stages_s": {}, "stages_all_s": {}, "methods": {}, "errors": {}}

    def record(name, fn):
        median, times, result = time_call(fn, repeats, warmup)
        out["stages_s"][name] = median
        out["stages_all_s"][name] = times
        return result

    if path is not None:
        from live_bgsub.io import read_image

        record("read", lambda: read_image(path))

    geometry = record("geometry", lambda: geo.find_geometry(data, mask))
    out["geometry"] = {"center": list(geometry.center), "rotation_deg": geometry.rotation_deg}
    fold_map = record("fold_map", lambda: FoldMap(data.shape, geometry, mask))
    folded, count = record("fold", lambda: fold_map.fold(data, mask))
    fold_mask = count > 0
    out["fold_shape"] = list(folded.shape)

    corrected_any = None
    try:
        from live_bgsub.background import subtract_background
    except ImportError as exc:
        out["errors"]["background"] = _error(exc)
        methods = ()
    for method in methods:
        entry: dict = {}
        out["methods"][method] = entry
        try:
            median, times, (background, corrected) = time_call(
                lambda: subtract_background(folded, method, fold_mask, downsample=downsample),
                repeats,
                warmup,
            )
        except Exception as exc:  # noqa: BLE001 - a method still being written must not stop the others
            entry["error"] = _error(exc)
            continue
        corrected_any = corrected if corrected_any is None else corrected_any
        entry["method_s"], entry["method_all_s"] = median, times

        def end_to_end(method=method):
            g = geo.find_geometry(data, mask)
            fm = FoldMap(data.shape, g, mask)
            f, c = fm.fold(data, mask)
            return subtract_background(f, method, c > 0, downsample=downsample)

        def live(method=method):
            f, c = fold_map.fold(data, mask)
            return subtract_background(f, method, c > 0, downsample=downsample)

        entry["end_to_end_s"], entry["end_to_end_all_s"], _ = time_call(end_to_end, repeats, 0)
        entry["live_s"], entry["live_all_s"], _ = time_call(live, repeats, 0)

    # Metrics cost does not depend on the values: without a corrected fold, time them
    # on the fold itself.
    target = folded if corrected_any is None else corrected_any
    try:
        from live_bgsub.metrics import roi_metrics

        record("metrics", lambda: roi_metrics(target, mask=fold_mask))
    except Exception as exc:  # noqa: BLE001 - reported in the table, like a method's error
        out["errors"]["metrics"] = _error(exc)
    return out


# --------------------------------------------------------------------------- MuscleX


def bench_musclex(python, image_path, methods, downsample, repeats, warmup) -> dict:
    """Run benchmarks/musclex_reference.py under MuscleX's interpreter; its JSON report."""
    cmd = [
        str(python), str(MUSCLEX_SCRIPT), str(image_path),
        "--method", *methods,
        "--downsample", str(downsample),
        "--repeats", str(repeats),
        "--warmup", str(warmup),
    ]
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    env.pop("PYTHONPATH", None)  # MuscleX's venv must not see the project's packages
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"MuscleX reference run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- report


def build_table(ours: dict, musclex: dict | None, methods) -> list[dict]:
    mx = {r["method"]: r for r in (musclex or {}).get("results", [])}
    rows = []
    for method in methods:
        o = ours.get("methods", {}).get(method, {})
        m = mx.get(method, {})
        ours_e2e = o.get("end_to_end_s")
        mx_full = m.get("full_s")
        rows.append(
            {
                "method": method,
                "ours_end_to_end_ms": None if ours_e2e is None else 1e3 * ours_e2e,
                "musclex_full_ms": None if mx_full is None else 1e3 * mx_full,
                "ratio": (mx_full / ours_e2e) if (ours_e2e and mx_full) else None,
                "ours_method_ms": None if "method_s" not in o else 1e3 * o["method_s"],
                "musclex_method_ms": None if "method_only_s" not in m else 1e3 * m["method_only_s"],
                "ours_live_ms": None if "live_s" not in o else 1e3 * o["live_s"],
                "musclex_process_total_ms": None
                if "process_total_s" not in m
                else 1e3 * m["process_total_s"],
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "method", "ours end-to-end (ms)", "MuscleX full (ms)", "ratio",
        "ours method-only (ms)", "MuscleX method-only (ms)", "ours live fold+method (ms)",
    )
    keys = (
        "method", "ours_end_to_end_ms", "musclex_full_ms", "ratio",
        "ours_method_ms", "musclex_method_ms", "ours_live_ms",
    )

    def cell(value, key):
        if value is None:
            return "n/a"
        if key == "method":
            return value
        return f"{value:.2f}x" if key == "ratio" else f"{value:.1f}"

    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        lines.append(" | ".join(cell(row[k], k) for k in keys))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.classical", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--image", help="frame file (default: synthetic, make_pattern(seed=0))")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--downsample", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--musclex-python",
        nargs="?",
        const=DEFAULT_MUSCLEX_PYTHON,
        help=f"MuscleX's interpreter (bare flag: {DEFAULT_MUSCLEX_PYTHON}); omit to skip MuscleX",
    )
    parser.add_argument("--json", metavar="OUT", help="write the full report here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    tmpdir = tempfile.TemporaryDirectory(prefix="bench_classical_")
    try:
        if args.image:
            from live_bgsub.io import read_image

            frame = read_image(args.image)
            data, mask = frame.data, frame.mask
            truth = None
            image_path, source = args.image, os.path.abspath(args.image)
        else:
            data, mask, raw, truth = _synthetic_frame(seed=0)
            image_path, source = None, "live_bgsub.synth.make_pattern(seed=0)"

        report: dict = {
            "image": source,
            "frame_shape": list(data.shape),
            "true_geometry": truth,
            "downsample": args.downsample,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "machine": machine_facts(),
        }
        print(f"frame: {source} {data.shape}, downsample {args.downsample}, "
              f"median of {args.repeats}", file=sys.stderr)
        report["ours"] = bench_ours(
            data, mask, image_path, args.methods, args.downsample, args.repeats, args.warmup
        )

        musclex = None
        if args.musclex_python:
            mx_image = image_path
            if mx_image is None:
                mx_image = os.path.join(tmpdir.name, "synthetic.tif")
                _write_tiff_for_musclex(raw, mx_image)
            try:
                musclex = bench_musclex(
                    args.musclex_python, mx_image, args.methods, args.downsample,
                    args.repeats, args.warmup,
                )
            except (OSError, RuntimeError, json.JSONDecodeError) as exc:
                report["musclex_error"] = _error(exc)
                print(f"MuscleX: {report['musclex_error']}", file=sys.stderr)
        report["musclex"] = musclex

        rows = build_table(report["ours"], musclex, args.methods)
        report["table"] = rows
        stages = report["ours"]["stages_s"]
        print("ours, shared stages (ms): " + ", ".join(
            f"{k} {1e3 * v:.1f}" for k, v in stages.items()))
        for key, err in report["ours"]["errors"].items():
            print(f"ours: {key} unavailable ({err})")
        for method, entry in report["ours"]["methods"].items():
            if "error" in entry:
                print(f"ours: {method} failed ({entry['error']})")
        if truth:
            print(f"truth: center ({truth['center'][0]:.2f}, {truth['center'][1]:.2f}), "
                  f"rotation {truth['rotation_deg']:.2f} deg")
        g = report["ours"]["geometry"]
        print(f"ours: center ({g['center'][0]:.2f}, {g['center'][1]:.2f}), "
              f"rotation {g['rotation_deg']:.2f} deg")
        if musclex:
            r0 = musclex["results"][0]
            print(f"MuscleX {musclex['musclex_version']}: center "
                  f"({r0['center'][0]:.2f}, {r0['center'][1]:.2f}), rotation {r0['rotation_deg']:.1f} deg")
        print(format_table(rows))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)
    finally:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
