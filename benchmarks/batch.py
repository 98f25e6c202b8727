"""`live-bgsub process` over a batch of frames against MuscleX's QuadrantFolder, per frame.

Usage::

    python -m benchmarks.batch IMAGE [IMAGE ...] [--methods M ...] [--downsample N]
        [--repeats R] [--cycles K] [--musclex-python /opt/musclex-venv/bin/python] [--json OUT]

What a user meets: ``live-bgsub process IMAGES --method M --out DIR`` run in this
process through :func:`live_bgsub.cli.main` (argument parsing, reading, geometry, fold,
background, ROI metrics, the JSON and HDF5 outputs, the printed line), with start-up
(imports, the first call's warm-up) excluded. Both geometry modes are timed:
``per-frame`` (the default: centre, rotation and beam stop found on every image) and
``per-run`` (found once from the batch, its cost spread over the frames). Seconds per
frame are the batch's wall time over its frames, median of ``--repeats`` batches after
one untimed batch.

MuscleX (with ``--musclex-python``): ``benchmarks/musclex_reference.py`` under MuscleX's
own interpreter on the same images, methods and downsample factor; per frame is the
mean over the images of its median ``full`` time (centre, rotation, fold, rmin/rmax,
method; its self-evaluation extras are left out, which favours MuscleX) and of its whole
``process()`` (``process_total``). MuscleX computes no equator metrics; we do (about
100 ms of ours per Pilatus frame).

"ratio" = MuscleX full per frame / ours per frame: above 1 means we are faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.classical import DEFAULT_MUSCLEX_PYTHON, METHODS, bench_musclex, machine_facts

MODES = ("per-frame", "per-run")


def time_batch(images, method: str, downsample: int, mode: str, repeats: int) -> dict:
    """Median seconds per frame of ``live-bgsub process`` over ``images`` (one untimed batch first)."""
    from live_bgsub.cli import main

    out = Path(tempfile.mkdtemp(prefix="lbgs_batch_"))
    args = ["process", *map(str, images), "--method", method, "--downsample", str(downsample), "--geometry", mode]
    times = []
    try:
        for i in range(repeats + 1):
            target = out / str(i)
            sink = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(sink):
                rc = main([*args, "--out", str(target)])
            elapsed = time.perf_counter() - t
            if rc != 0:
                raise RuntimeError(f"live-bgsub process exited {rc}")
            if i:
                times.append(elapsed / len(images))
            shutil.rmtree(target)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"per_frame_s": statistics.median(times), "all_s": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="+", help="frames of one run (same shape)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--downsample", type=int, default=2, choices=(1, 2, 4))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cycles", type=int, default=1,
        help="process the image list this many times in one batch (a longer run of the same frames: the "
        "per-run geometry, found once, is spread over more frames; outputs of a repeated name overwrite)",
    )
    ap.add_argument("--musclex-python", nargs="?", const=DEFAULT_MUSCLEX_PYTHON, help="MuscleX's interpreter")
    ap.add_argument("--json", metavar="OUT", help="write the full report here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        print(f"--repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"no such image: {missing[0]}", file=sys.stderr)
        return 2

    report = {
        "machine": machine_facts(), "images": args.images, "cycles": args.cycles, "downsample": args.downsample,
        "ours": {}, "musclex": None,
    }
    batch = list(args.images) * max(1, args.cycles)
    for method in args.methods:
        report["ours"][method] = {mode: time_batch(batch, method, args.downsample, mode, args.repeats) for mode in MODES}
    mx = {}
    if args.musclex_python:
        # One MuscleX process per image (each with its untimed warm-up run), repeats median.
        runs = [bench_musclex(args.musclex_python, image, args.methods, args.downsample, args.repeats, 1) for image in args.images]
        report["musclex"] = {**runs[0], "results": [r for run in runs for r in run["results"]]}
        for r in report["musclex"]["results"]:
            mx.setdefault(r["method"], []).append(r)

    lines = [
        f"live-bgsub process per frame over {len(batch)} frames, downsample {args.downsample} (ms; ratio = MuscleX full / ours)",
        "| method | ours per-frame geometry | ours per-run geometry | MuscleX full | MuscleX process() | ratio per-frame | ratio per-run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        o = report["ours"][method]
        a, b = 1e3 * o["per-frame"]["per_frame_s"], 1e3 * o["per-run"]["per_frame_s"]
        rows = mx.get(method, [])
        full = 1e3 * statistics.mean(r["full_s"] for r in rows) if rows else None
        total = 1e3 * statistics.mean(r["process_total_s"] for r in rows) if rows else None
        cells = [f"{a:.1f}", f"{b:.1f}"]
        cells += [f"{full:.1f}", f"{total:.1f}", f"{full / a:.1f}x", f"{full / b:.1f}x"] if rows else ["n/a"] * 4
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
