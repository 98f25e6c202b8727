"""Run MuscleX's Quadrant Folder on diffraction frames: reference geometry, folds and timings.

This script runs under MuscleX's own interpreter (``/opt/musclex-venv/bin/python``),
never under the project venv: it imports only the standard library, numpy, fabio and
musclex (with musclex's own dependencies). MuscleX is an outside reference for
comparisons and benchmarks; live_bgsub never imports it and copies none of its code.

Usage::

    QT_QPA_PLATFORM=offscreen /opt/musclex-venv/bin/python benchmarks/musclex_reference.py \\
        /work/shared/data/real/P40_1_3_00000.tif --method white-top-hat --downsample 2 \\
        --repeats 3 [--save-npz out.npz] [--center X Y --rotation DEG] [--param tophat=50]

It prints exactly ONE JSON object on stdout (everything MuscleX prints goes to stderr)::

    {"musclex_version": ..., "downsample": 2, "repeats": 3, "warmup": 1,
     "params": {...}, "machine": {...},
     "results": [{"image": ..., "method": "white-top-hat", "musclex_method": "White-top-hats",
                  "center": [x, y], "rotation_deg": r, "fold_shape": [h, w], "rmin": ..,
                  "rmax": .., "times_s": {stage: median}, "times_all_s": {stage: [...]},
                  "full_s": median, "method_only_s": median, "process_total_s": median}]}

How MuscleX is driven (MuscleX 2.1.1, read from musclex/modules/QuadrantFolder.py,
musclex/headless/QuadrantFoldingh.py and musclex/utils/image_data.py):

- ``ImageData(img, img_dir, img_name, center=None, rotation=None)`` holds the frame; its
  ``center`` / ``rotation`` properties run the automatic centre (``getCenter``) and
  rotation (``getRotationAngle``, pyFAI) search lazily. Without a ``settings_manager``
  it caches nothing on disk.
- ``QuadrantFolder(image_data, parent=None, output_dir=DIR).process(flags)`` runs
  centre -> rotation -> transformImage (one affine warp) -> calculateAvgFold ->
  getRminmax (pyFAI) -> masks + synthetic test peaks (MuscleX's own loss) -> downsample
  -> searchBackground -> applyBackgroundSubtraction -> synthetic copy ->
  generateResultImage -> evaluateResult.
- ``flags`` start from ``musclex.utils.qf_defaults.build_default_flags()`` (the GUI
  defaults: tophat 50, radial_bin 10, smooth 0.1, cirmin 0, cirmax 25, fwhm 15,
  boxcar 15x15, cycles 250, windows 15x15 every 10x10, degree 1, downsample 2) plus
  what headless sets: ``orientation_model=None, ignore_folds=set(), rotate=False,
  fold_image=True, bg_options=0``; ``bgsub`` names the method ('White-top-hats',
  'Circularly-symmetric', '2D Convexhull', 'Roving Window', 'Smoothed-Gaussian',
  'Smoothed-BoxCar'); ``downsample`` is 1, 2 or 4.
- Caching is defeated three ways so every repeat recomputes: a fresh ImageData and
  QuadrantFolder per repeat (both memoise in memory), ``no_cache`` (do not pickle
  ``qf_cache/<name>.info``) and ``no_fast_path`` (do not reload a ``_folded.tif``)
  flags, and a throw-away temporary directory as ``img_path``/``output_dir`` (MuscleX
  creates ``<img_path>/qf_cache`` even with ``no_cache``, so the real image directory is
  never handed to it).
- Stage times are taken by wrapping the instance methods that ``process()`` calls, so
  the stages are MuscleX's own run, not a re-implementation. numba-compiled code
  (smoothed / roving window / circularly symmetric) JIT-compiles on first use:
  ``--warmup`` runs (default 1 per method) are done first and not timed.

Stages reported in ``times_s`` (seconds, medians over repeats):

    read           fabio.open(path).data
    center         ImageData.ensure_center (automatic centre)
    rotation       ImageData.ensure_rotation (automatic rotation, pyFAI 360 azimuth bins)
    fold           transformImage + calculateAvgFold (warp + 4-quadrant average)
    rmin_rmax      getRminmax (pyFAI 1D integration of the fold)
    masks_synth    fitBackgroundPerImage + subtractFittedBackground + createMask +
                   createArtificialData + smoothFold (MuscleX 2.x's self-evaluation aids)
    downsample     downsampleImage (cv2.INTER_AREA)
    search         searchBackground (no-op choice unless optimisation is requested)
    method         applyBackgroundSubtraction = the method on the (downsampled) fold,
                   cubic upsampling, subtraction
    method_synth   applyBackgroundSubtractionSynthetic (the method again, on fold+synthetic)
    result_image   generateResultImage
    evaluate       evaluateResult (MuscleX's loss + fold symmetry score)
    process_total  the whole QuadrantFolder.process(flags) call

    full        = center + rotation + fold + rmin_rmax + downsample + method
                  (what a "geometry + fold + method" pipeline needs; excludes MuscleX's
                  self-evaluation work, which process_total includes)
    method_only = method

Conventions, established by experiment on this machine (numbers reproducible with the
synthetic tests described; evidence in the project's benchmark notes):

- Coordinates: centre (x, y) = (column, row) in the raw frame, pixel-centre convention
  (integer = centre of that pixel; OpenCV's, which MuscleX uses throughout).
  P40_1_3_00000: centre (409.757, 490.967), rotation 1.2 deg (= the data README).
- Rotation sign: rotation r > 0 means the equator, in the raw frame, runs along the
  direction (cos r, sin r) in (column, row) coordinates: its right-hand side is LOWER
  (larger row) when the frame is displayed with row 0 at the top, i.e. the equator is
  turned clockwise by r on screen (angle -r in a y-up frame). MuscleX undoes it with
  ``cv2.getRotationMatrix2D(centre, r, 1)``: a counter-clockwise turn by r on screen.
  Evidence: (1) a synthetic frame with an equator drawn along (cos 5deg, sin 5deg)
  gives automatic rotation +5.0, and warping with +5 puts both equatorial spots on the
  same row (522, 522) while -5 doubles the tilt (rows 495 / 548); (2) on the six summed
  P40 frames the equator's row rises with column by +1.1 deg (row 484 at dx=-300,
  495-497 at dx=+250..300) where MuscleX says +1.2.
- Fold orientation: MuscleX's fold (``imgCache['avg_fold']``, shape (fh, fw) =
  (ceil(H/2), ceil(W/2)), (522, 491) for a 1043 x 981 Pilatus frame) is the TOP-LEFT
  quadrant of the centred, rotated frame; the other three quadrants are mirrored onto
  it. The beam centre sits at the BOTTOM-RIGHT corner: nominally at fold (col, row) =
  (fw - 0.5, fh - 0.5), the outer corner of pixel [-1, -1]. The quadrants are not
  registered exactly: the warp puts the centre at (W/2, H/2) while the quadrants are cut
  at the integer (W//2, H//2), so for ODD frame sizes (Pilatus 1M: both) the top-left
  quadrant sees the centre at (fw + 0.5, fh + 0.5) and the mirrored right / bottom
  quadrants at (fw - 1.5, fh - 1.5): a 2 px mismatch per axis (1 px, at fw / fw - 1,
  for even sizes). Measured with four mirror-symmetric spots around a known sub-pixel
  centre, folding one quadrant at a time (``ignore_folds``): top-left (491.48, 522.52),
  top-right (489.52, 522.52), bottom-left (491.48, 520.49), bottom-right
  (489.52, 520.49) in (col, row). To compare with a fold that has the centre at [0, 0],
  flip both axes (``fold[::-1, ::-1]``): MuscleX's centre is then at (-0.5, -0.5) and
  pixel k along an axis is about k + 0.5 px from the centre.
- MuscleX's automatic geometry is fragile: getCenter / getRotationAngle scale the frame
  to 8 bit between its minimum and half its maximum, so the sentinel values alone move
  it. P40_1_3_00001 as written (35 dead pixels at -2): centre (408.93, 490.45),
  rotation 1.7; the same frame with those 35 pixels at -1: (410.29, 491.10), 1.2.
  Feed MuscleX frames exactly as the detector wrote them (int32 or float32 does not
  matter; the values do).
- Downsampling keeps the bottom-right (centre) corner aligned: it drops ``w % f``
  columns on the LEFT and ``h % f`` rows at the TOP, then ``cv2.resize(INTER_AREA)``;
  the method's background is upsampled with ``INTER_CUBIC`` and edge-padded at the
  top / left back to the fold's shape. Methods work on ``makeFullImage(fold)``, the
  fold mirrored into a full (2 fh, 2 fw) picture with the centre in the middle.
- ``--save-npz`` writes, per image: ``fold`` (avg_fold, full resolution, MuscleX
  orientation), ``background`` (BgFold) and ``corrected`` (BgSubFold = fold -
  background) at full resolution, ``fold_ds`` (the downsampled fold the method saw),
  ``center``, ``rotation_deg``, ``transform`` (the 2x3 raw -> centred affine), ``rmin``,
  ``rmax``, ``method``, ``downsample``. With several images or methods, PATH gets
  ``_<image stem>_<method>`` before ``.npz``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

#: Our method names -> MuscleX's ``bgsub`` names.
METHODS = {
    "white-top-hat": "White-top-hats",
    "circularly-symmetric": "Circularly-symmetric",
    "convex-hull": "2D Convexhull",
    "roving-window": "Roving Window",
    "smoothed-gaussian": "Smoothed-Gaussian",
    "smoothed-boxcar": "Smoothed-BoxCar",
    "none": "None",
}

#: QuadrantFolder methods timed, and the stage each one counts toward.
QF_STAGES = {
    "transformImage": "fold",
    "calculateAvgFold": "fold",
    "getRminmax": "rmin_rmax",
    "fitBackgroundPerImage": "masks_synth",
    "subtractFittedBackground": "masks_synth",
    "createMask": "masks_synth",
    "createArtificialData": "masks_synth",
    "smoothFold": "masks_synth",
    "downsampleImage": "downsample",
    "searchBackground": "search",
    "applyBackgroundSubtraction": "method",
    "applyBackgroundSubtractionSynthetic": "method_synth",
    "generateResultImage": "result_image",
    "evaluateResult": "evaluate",
}
IMAGE_DATA_STAGES = {"ensure_center": "center", "ensure_rotation": "rotation"}
FULL_STAGES = ("center", "rotation", "fold", "rmin_rmax", "downsample", "method")


class StageClock:
    """Accumulate wall time per stage by wrapping bound methods of one object."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._depth = 0

    def wrap(self, obj, attr: str, stage: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            # Only the outermost timed call counts, so a nested call (ensure_rotation
            # calling ensure_center, createMask inside fitBackgroundPerImage) is not
            # counted twice.
            self._depth += 1
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    elapsed = time.perf_counter() - start
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed

        setattr(obj, attr, timed)


def _parse_param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants key=value, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def build_flags(musclex_method: str, downsample: int, params: dict) -> dict:
    """MuscleX's headless flags for one single-method run, caches off."""
    from musclex.utils.qf_defaults import build_default_flags

    flags = build_default_flags()
    flags.update(
        orientation_model=None,
        ignore_folds=set(),
        rotate=False,
        fold_image=True,
        bg_options=0,
        bgsub=musclex_method,
        downsample=int(downsample),
        optimize=False,
        no_cache=True,
        no_fast_path=True,
    )
    flags.update(params)
    return flags


def run_once(raw, name, musclex_method, downsample, params, center=None, rotation=None):
    """One full QuadrantFolder.process() on a fresh ImageData/QuadrantFolder.

    Returns (stage seconds, the QuadrantFolder, the ImageData).
    """
    import numpy as np
    from musclex.modules.QuadrantFolder import QuadrantFolder
    from musclex.utils.image_data import ImageData

    with tempfile.TemporaryDirectory(prefix="musclex_ref_") as work:
        clock = StageClock()
        image_data = ImageData(
            np.asarray(raw), work, name, center=center, rotation=rotation
        )
        for attr, stage in IMAGE_DATA_STAGES.items():
            clock.wrap(image_data, attr, stage)
        folder = QuadrantFolder(image_data, parent=None, output_dir=work)
        for attr, stage in QF_STAGES.items():
            clock.wrap(folder, attr, stage)
        flags = build_flags(musclex_method, downsample, params)
        start = time.perf_counter()
        folder.process(flags)
        clock.seconds["process_total"] = time.perf_counter() - start
    for stage in (*IMAGE_DATA_STAGES.values(), *QF_STAGES.values()):
        clock.seconds.setdefault(stage, 0.0)
    clock.seconds["full"] = sum(clock.seconds[s] for s in FULL_STAGES)
    clock.seconds["method_only"] = clock.seconds["method"]
    return clock.seconds, folder, image_data


def machine_facts() -> dict:
    import numpy as np
    import scipy

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def _npz_path(base: str, image: str, method: str, several: bool) -> str:
    if not several:
        return base
    root = base[:-4] if base.endswith(".npz") else base
    stem = os.path.splitext(os.path.basename(image))[0]
    return f"{root}_{stem}_{method}.npz"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="frame files fabio can read")
    parser.add_argument(
        "--method",
        nargs="+",
        default=["white-top-hat"],
        choices=sorted(METHODS),
        help="one or more methods (our names)",
    )
    parser.add_argument("--downsample", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per method first (numba JIT)"
    )
    parser.add_argument(
        "--center", type=float, nargs=2, metavar=("X", "Y"),
        help="manual centre (column, row); skips MuscleX's centre search",
    )
    parser.add_argument(
        "--rotation", type=float, help="manual rotation (deg); skips the rotation search"
    )
    parser.add_argument(
        "--param", type=_parse_param, action="append", default=[],
        help="override a MuscleX flag, e.g. tophat=50 (repeatable)",
    )
    parser.add_argument("--save-npz", metavar="PATH", help="save MuscleX's arrays")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    params = dict(args.param)

    # Everything MuscleX prints (Python and C level) goes to stderr; stdout carries
    # only the final JSON object.
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)

    with contextlib.redirect_stdout(sys.stderr):
        import fabio
        import musclex
        import numpy as np

        center = tuple(args.center) if args.center else None
        results = []
        warmed = set()
        several = len(args.images) * len(args.method) > 1
        for image in args.images:
            for method in args.method:
                mx_method = METHODS[method]
                name = os.path.basename(image)
                read_times = []
                raw = None
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    raw = fabio.open(image).data
                    read_times.append(time.perf_counter() - start)
                if method not in warmed:
                    for _ in range(args.warmup):
                        run_once(raw, name, mx_method, args.downsample, params,
                                 center, args.rotation)
                    warmed.add(method)
                runs = []
                for t_read in read_times:
                    seconds, folder, image_data = run_once(
                        raw, name, mx_method, args.downsample, params,
                        center, args.rotation,
                    )
                    seconds["read"] = t_read
                    runs.append(seconds)
                stages = sorted(runs[0])
                times_all = {s: [r[s] for r in runs] for s in stages}
                times = {s: statistics.median(v) for s, v in times_all.items()}
                cache = folder.imgCache
                record = {
                    "image": os.path.abspath(image),
                    "method": method,
                    "musclex_method": mx_method,
                    "center": [float(c) for c in image_data.center],
                    "rotation_deg": float(image_data.rotation),
                    "geometry_source": (
                        "manual" if center or args.rotation is not None else "auto"
                    ),
                    "frame_shape": list(np.asarray(raw).shape),
                    "fold_shape": list(cache["avg_fold"].shape),
                    "rmin": int(folder.info["rmin"]),
                    "rmax": int(folder.info["rmax"]),
                    "times_s": times,
                    "times_all_s": times_all,
                    "full_s": times["full"],
                    "method_only_s": times["method_only"],
                    "process_total_s": times["process_total"],
                }
                results.append(record)
                if args.save_npz:
                    path = _npz_path(args.save_npz, image, method, several)
                    np.savez_compressed(
                        path,
                        fold=np.asarray(cache["avg_fold"], dtype=np.float32),
                        background=np.asarray(cache["BgFold"], dtype=np.float32),
                        corrected=np.asarray(cache["BgSubFold"], dtype=np.float32),
                        fold_ds=np.asarray(cache["_avg_fold"], dtype=np.float32),
                        center=np.asarray(image_data.center, dtype=np.float64),
                        rotation_deg=np.float64(image_data.rotation),
                        transform=np.asarray(folder.info["transform"], dtype=np.float64),
                        rmin=np.int64(folder.info["rmin"]),
                        rmax=np.int64(folder.info["rmax"]),
                        method=np.str_(method),
                        downsample=np.int64(args.downsample),
                    )
                    record["npz"] = os.path.abspath(path)

        report = {
            "musclex_version": musclex.__version__,
            "downsample": args.downsample,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "params": params,
            "stage_definitions": {
                "full": "+".join(FULL_STAGES),
                "method_only": "method",
            },
            "machine": machine_facts(),
            "results": results,
        }
    json.dump(report, json_out)
    json_out.write("\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
