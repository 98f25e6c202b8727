"""The ``live-bgsub`` command line: ``process``, ``demo``, ``replay``, ``serve``, ...

``process`` folds each image, subtracts the chosen background and writes, per image,
``DIR/<stem>.json`` (geometry, method, parameters, ROI metrics, timings) and
``DIR/<stem>.h5`` (float32 datasets ``folded``, ``background``, ``corrected``, and
``count``, uint8: the detector pixels behind each fold pixel). A file that cannot be
read or processed is reported on one line and the batch goes on; the exit status is 1
when any image failed.

Every command reports a usage or connection error (an unknown option, method or
parameter, a count below 1, a missing file, a server that cannot be reached or refuses
the key) as one line, ``live-bgsub: error: WHAT``, and exits with status 2, before it
starts anything (:mod:`live_bgsub.errors`).

``demo`` runs the live job on embedded defaults (:mod:`live_bgsub.demo`; ``--workers N``
through the bus, :mod:`live_bgsub.bus`), ``replay`` sends archived runs from Tiled
through the live callback (:mod:`live_bgsub.replay`; ``--nats URL``: to the bus's workers),
``recover`` writes runs from a TiledPublisher backup into Tiled, only what Tiled lacks
(:mod:`live_bgsub.recover`), ``tiled-server`` serves a demo directory's catalog again,
and ``sim-ioc`` runs the simulated areaDetector IOC (:mod:`live_bgsub.sim.ioc`), and ``serve`` the live
callback in its own process behind bluesky's 0MQ proxy (:mod:`live_bgsub.serve`). Heavy libraries are
imported only inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from . import __version__
from .demo import DEMO_METHOD
from .errors import ArgumentParser, UsageError, at_least, print_error
from .logs import quiet_libraries, verbose_requested
from .options import ProcessingOptions, add_tiled_arguments, processing_arguments

__all__ = ["SAMPLE_FRAME", "main", "process_image"]

#: A real Pilatus 1M frame shipped with the package (MuscleX test image P40_1_3_00000).
SAMPLE_FRAME = "P40_1_3_00000.h5"


def sample_frame_path() -> Path:
    """Path of the shipped sample frame (an HDF5 copy of a real Pilatus 1M frame)."""
    return Path(str(resources.files("live_bgsub") / "data" / SAMPLE_FRAME))


def _finite_or_none(value):
    """JSON has no NaN: write null for NaN/inf, plain Python numbers otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def process_image(
    path,
    *,
    method: str = "white-top-hat",
    params: dict | None = None,
    center=None,
    rotation_deg=None,
    downsample: int | None = None,
    frame: int = 0,
    wavelength_nm=None,
    distance_mm=None,
    pixel_size_mm=None,
    model=None,
    run_geometry=None,
    fold_maps: dict | None = None,
) -> tuple[dict, dict]:
    """Read, fold, subtract the background and measure one image.

    ``model`` (a loaded :class:`live_bgsub.inference.BackgroundModel`) replaces the
    classical ``method`` when given; ``method`` is then recorded as ``model:NAME``.
    ``downsample`` defaults to the working resolution of what runs: the model's own
    (another value is an error), :data:`live_bgsub.background.WORKING_DOWNSAMPLE`
    for a classical method; the record states the one used.
    ``run_geometry`` (a :class:`live_bgsub.geometry.RunGeometry` of the run the image
    belongs to) is used instead of estimating the geometry on this image (``center``
    and ``rotation_deg`` still win when given); ``fold_maps``, a dict kept across calls,
    caches the fold maps of images of one shape, geometry and mask.

    Returns
    -------
    record : dict
        What ``DIR/<stem>.json`` holds.
    arrays : dict of ndarray
        ``folded``, ``background``, ``corrected`` (float32), ``count`` (uint8: the
        detector pixels averaged into each fold pixel, 0 to 4).
    """
    from .background import WORKING_DOWNSAMPLE, subtract_background, validate_params
    from .errors import ProcessingError
    from .fold import FoldMap
    from .geometry import Geometry, find_rotation, find_run_geometry
    from .io import read_image
    from .metrics import roi_metrics

    params = dict(params or {})
    if model is not None:
        downsample = model.working_downsample(downsample)
    elif downsample is None:
        downsample = WORKING_DOWNSAMPLE
    timings = {}
    t0 = t = time.perf_counter()
    image = read_image(path, frame=frame)
    timings["read"] = time.perf_counter() - t
    if not image.mask.any():
        raise ProcessingError(f"{str(path)!r}: every pixel is masked (no valid data)")

    t = time.perf_counter()
    static = image.mask
    geometry_record = {"source": "given"}
    quality = None
    if center is None:
        if run_geometry is not None and run_geometry.shape != image.shape:
            raise ProcessingError(
                f"{str(path)!r}: image of shape {image.shape}, but the run geometry was found on frames of shape "
                f"{run_geometry.shape}"
            )
        found = find_run_geometry([image.data], [image.mask]) if run_geometry is None else run_geometry
        source = "estimated" if run_geometry is None else "estimated once for the run"
        center = found.geometry.center
        quality = found.quality
        if found.beam_stop is not None:  # the shadow is no data: it stays out of the fold
            static = image.mask & ~found.beam_stop.mask
        if rotation_deg is None:
            rotation_deg = found.geometry.rotation_deg
            geometry_record = {"source": source, **found.to_dict()}
        else:
            geometry_record = {"source": f"centre {source}, rotation given", **found.to_dict()}
    elif rotation_deg is None:
        rotation_deg = find_rotation(image.data, image.mask, center)
        geometry_record = {"source": "centre given, rotation estimated"}
    geometry = Geometry(center, rotation_deg)
    geometry_record.update(geometry.to_dict())
    timings["geometry"] = time.perf_counter() - t

    t = time.perf_counter()
    key = (image.shape, geometry.center, geometry.rotation_deg, hash(static.tobytes()))
    fold_map = None if fold_maps is None else fold_maps.get(key)
    if fold_map is None:
        fold_map = FoldMap(image.shape, geometry, static)
        if fold_maps is not None:
            fold_maps.clear()  # one run's map at a time
            fold_maps[key] = fold_map
    folded, count = fold_map.fold(image.data, static)
    timings["fold"] = time.perf_counter() - t
    valid = count > 0
    if not valid.any():
        raise ProcessingError(f"{str(path)!r}: the fold holds no valid pixel (center {geometry.center} off the detector?)")

    t = time.perf_counter()
    if model is not None:
        background, corrected = model.subtract(folded, valid)
        parameters = {"model": model.name, "model_path": model.path, "card_sha256": model.card_sha256()}
    else:
        background, corrected = subtract_background(folded, method, valid, downsample=downsample, **params)
        # Every parameter the method ran with (defaults filled in, full-resolution px).
        parameters = validate_params(method, params)
    timings["background"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = roi_metrics(
        corrected,
        mask=valid,
        background=background,
        wavelength_nm=wavelength_nm,
        distance_mm=distance_mm,
        pixel_size_mm=pixel_size_mm if pixel_size_mm is not None else image.pixel_size_mm,
        geometry_quality=quality,
    )
    timings["metrics"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    record = {
        "image": str(path),
        "frame": image.frame,
        "shape": list(image.shape),
        "center": [geometry.center[0], geometry.center[1]],
        "rotation_deg": geometry.rotation_deg,
        "geometry": geometry_record,
        "method": method,
        "parameters": parameters,
        "downsample": downsample,
        "fold_shape": list(folded.shape),
        "pixel_size_mm": image.pixel_size_mm,
        "exposure_s": image.exposure_s,
        "metrics": metrics,
        "timings_s": timings,
        "live_bgsub_version": __version__,
    }
    arrays = {
        "folded": folded.astype(np.float32, copy=False),
        "background": np.asarray(background, dtype=np.float32),
        "corrected": np.asarray(corrected, dtype=np.float32),
        "count": count.astype(np.uint8),
    }
    return record, arrays


#: gzip level of the HDF5 outputs (with the shuffle filter). ``corrected``, which is
#: mostly noise, is stored uncompressed: gzip saves it 20 % for 39 ms. Measured on a
#: Pilatus 1M fold (four 562 x 584 arrays, 2-core VM, 2026-12-02): ``folded``,
#: ``background`` and the uint8 ``count`` take 11, 13 and 4 ms at level 1 (102, 120 and
#: 11 KiB) against 16, 18 and 5 ms at level 4 (88, 106 and 9 KiB).
H5_GZIP_LEVEL = 1
H5_UNCOMPRESSED = ("corrected",)


def _write_outputs(out_dir: Path, stem: str, record: dict, arrays: dict) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.h5`` atomically (temporary file, then rename)."""
    import h5py

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    h5_path = out_dir / f"{stem}.h5"
    tmp_h5 = h5_path.with_name(h5_path.name + ".part")
    with h5py.File(tmp_h5, "w") as h5:
        for name, arr in arrays.items():
            if name in H5_UNCOMPRESSED:
                h5.create_dataset(name, data=arr)
            else:
                h5.create_dataset(name, data=arr, compression="gzip", compression_opts=H5_GZIP_LEVEL, shuffle=True)
        h5.attrs["record"] = json.dumps(_finite_or_none(record))
    os.replace(tmp_h5, h5_path)
    tmp_json = json_path.with_name(json_path.name + ".part")
    tmp_json.write_text(json.dumps(_finite_or_none(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp_json, json_path)
    return json_path, h5_path


#: Stated in the help of every ``--tiled URI``: a server that does not answer within this
#: is an error (``live_bgsub.tiled_server.connect``'s first request).
TILED_CONNECT_TIMEOUT_S = 10

_TILED_HELP = f"Tiled server URI (default: $TILED_URI); one that does not answer within {TILED_CONNECT_TIMEOUT_S} s is an error"


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="live-bgsub",
        description="Live background subtraction for muscle fiber X-ray diffraction frames: process images, "
        "run the live demo, replay archived runs from Tiled, or serve the live callback.",
        epilog="Usage and connection errors print one line and exit 2. -v before the command "
        "(or LIVE_BGSUB_VERBOSE=1) also shows the libraries' start-up logs (TensorFlow's).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="the libraries' start-up logs too (give it before COMMAND)")
    parser.add_argument("--version", action="version", version=f"live-bgsub {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "process",
        help="fold images, subtract a background, write JSON metrics and HDF5 arrays",
        description="Fold each image, subtract the background with one method, and write "
        "DIR/<stem>.json and DIR/<stem>.h5 per image.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="detector images (TIFF, CBF, EDF, HDF5/NeXus, ...); each must exist")
    p.add_argument("--sample", action="store_true", help="also process the shipped sample frame (a real Pilatus 1M frame)")
    p.add_argument(
        "--method",
        default="white-top-hat",
        help="background method (default: white-top-hat), or model:NAME (a shipped U-Net) / model:PATH (a .keras file); see --list-methods",
    )
    p.add_argument("--list-methods", action="store_true", help="list the methods with their parameters and defaults, then exit")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable); lengths in full-resolution pixels")
    p.add_argument("--center", nargs=2, type=float, metavar=("X", "Y"), help="beam centre in pixels (x = column); found automatically when omitted")
    p.add_argument("--rotation", type=float, metavar="DEG", help="equator rotation in degrees; found automatically when omitted")
    p.add_argument("--downsample", type=int, default=None, metavar="N",
                   help="work at 1/N resolution (default: a model's own, 2 for a classical method, MuscleX's default)")
    p.add_argument(
        "--geometry",
        choices=("per-frame", "per-run"),
        default="per-frame",
        help=f"estimate centre, rotation and beam stop on every image (default), or once from the first {RUN_GEOMETRY_FRAMES} "
        "images for all of them (images of one run; faster; recorded in each JSON)",
    )
    p.add_argument("--frame", type=at_least(0), default=0, help="frame index in multi-frame files (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"images processed at once, in threads (default {PROCESS_WORKERS} for a classical method; 1 for a model, "
        "which uses every core itself)",
    )
    p.add_argument("--wavelength-nm", type=float, help="X-ray wavelength (nm), for d10")
    p.add_argument("--distance-mm", type=float, help="sample-detector distance (mm), for d10")
    p.add_argument("--pixel-size-mm", type=float, help="pixel size (mm), for d10; default: from the image header")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (required unless --list-methods)")

    p = sub.add_parser(
        "demo",
        help="the live job on embedded defaults: simulated detector -> RunEngine -> live callback -> Tiled",
        description="Start the embedded Tiled server, a simulated Pilatus writing HDF5 and a RunEngine "
        "running a count with the live callback subscribed; print run uids, rates and lag, and write a PNG summary.",
    )
    p.add_argument("--dir", type=Path, default=Path("live_bgsub_demo"), help="where data, catalog and PNG go (default: ./live_bgsub_demo)")
    p.add_argument("--frames", type=int, default=30, help="frames to acquire (default 30)")
    p.add_argument("--rate", type=float, default=5.0, metavar="HZ", help="detector frame rate (default 5 Hz: what 2 CPU cores process live)")
    p.add_argument("--method", default=DEMO_METHOD, help=f"model:NAME, model:PATH or a classical method such as white-top-hat (default {DEMO_METHOD}: the shipped U-Net closest to its method, BENCHMARKS.md section 5)")
    p.add_argument("--preset", default="pilatus-1m", help="simulated detector: pilatus-1m (default), eiger2-9m, mar")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated frames (default 0)")
    p.add_argument("--keep-serving", action="store_true", help="keep the Tiled server up after the run (Ctrl-C stops it)")
    p.add_argument("--epics", action="store_true", help="acquire through a simulated areaDetector IOC over Channel Access (ophyd EpicsPilatus)")
    p.add_argument("--remote", action="store_true", help="process in a `live-bgsub serve` subprocess fed through bluesky's 0MQ proxy")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="scale-out on embedded defaults: a local NATS JetStream server, N `live-bgsub worker` and one "
        "`live-bgsub compose` subprocesses; the RunEngine only publishes to JetStream (not with --epics or --remote)",
    )

    p = sub.add_parser(
        "replay",
        help="replay archived runs from Tiled through the live callback, producing derived runs",
        description="Send archived raw runs' documents through the live callback; the derived runs go "
        "to the same catalog. Select runs by uid, by metadata (--query KEY=VALUE) or --last N; --query and "
        "--last select raw runs only (a derived run, made by live_bgsub, is replayed only when named by uid). With --nats "
        "the documents go to NATS JetStream instead, for running `live-bgsub worker`s and `live-bgsub compose`.",
        parents=[processing_arguments()],
    )
    p.add_argument("uids", nargs="*", metavar="UID", help="run uids (or unique prefixes); a derived run is replayed only when named here")
    add_tiled_arguments(p, tiled_help=_TILED_HELP)
    p.add_argument("--query", action="append", default=[], metavar="KEY=VALUE", help="select raw runs whose start metadata KEY equals VALUE (repeatable)")
    p.add_argument("--last", type=at_least(1), metavar="N", help="the N most recent selected raw runs (N >= 1)")
    p.add_argument("--fill", metavar="DERIVED_UID", help="replay only the raw frames this derived run skipped, left unprocessed or failed")
    p.add_argument("--data-key", help="data key of the frames (default: the stream's one 2-D key)")
    p.add_argument("--directory", type=Path, default=Path("derived"), help="where derived HDF5 files go (default ./derived); the server must be able to read it")
    p.add_argument("--backup", type=Path, metavar="DIR", help="JSON-lines backup of the derived runs' documents (default: backup/ beside --directory)")
    p.add_argument("--no-backup", action="store_true", help="keep no backup of the derived runs")
    p.add_argument("--timeout", type=float, default=REPLAY_TIMEOUT_S, metavar="S", help=f"seconds to wait for a derived run after its raw run's last document (default {REPLAY_TIMEOUT_S:g})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nats",
        metavar="URL",
        help="publish the runs to NATS JetStream (nats://host:4222) instead of processing them here: running "
        "`live-bgsub worker`s process the frames and `live-bgsub compose` writes the derived runs (its --directory "
        "and --backup apply, not these); waits --timeout for the composer to record each run as done. Frames in "
        "HDF5 files travel as references: the workers must read the raw files at the paths the runs recorded. "
        "Not with --fill or --data-key",
    )

    p = sub.add_parser(
        "recover",
        help="write runs from a TiledPublisher backup into Tiled, only what Tiled lacks",
        description="Re-send the runs of a JSON-lines backup (a TiledPublisher backup_directory, or one "
        "<run uid>.jsonl file) to Tiled: a run Tiled lacks is written whole, a run Tiled holds in part "
        "(no stop) is completed, a complete run is skipped. Safe to run again: it then writes nothing. "
        "Exit status 0 when every run is complete in Tiled, 1 when some could not be, 2 when the server "
        "cannot be used.",
    )
    p.add_argument("backup", type=Path, metavar="BACKUP", help="backup directory, or one <run uid>.jsonl file")
    add_tiled_arguments(p, tiled_help=_TILED_HELP)
    p.add_argument("--batch-size", type=at_least(1), default=500, metavar="N", help="events per request (default 500)")
    p.add_argument(
        "--close-open",
        action="store_true",
        help="give a run whose backup has no stop (its writer was killed, e.g. a live-bgsub serve) a stop with "
        "exit_status 'fail' saying so; only for runs nothing is writing any more",
    )

    p = sub.add_parser(
        "serve",
        add_help=False,
        help="run the live callback in its own process, fed by bluesky's 0MQ proxy; see `live-bgsub serve --help`",
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "worker",
        add_help=False,
        help="process frame tasks from NATS JetStream (run any number, on any hosts); see `live-bgsub worker --help`",
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "compose",
        add_help=False,
        help="compose the derived runs from the workers' results on NATS JetStream (one per deployment); see `live-bgsub compose --help`",
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "sim-ioc",
        add_help=False,
        help="run the simulated areaDetector IOC (caproto) for a prefix; see `live-bgsub sim-ioc --help`",
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "tiled-server",
        help="serve a demo directory's embedded Tiled catalog again (to read results after the demo)",
    )
    p.add_argument("dir", type=Path, help="the demo's --dir")
    p.add_argument("--port", type=at_least(0), default=0, help="port (default: any free port)")
    return parser


def _fail(message: str) -> None:
    print_error("live-bgsub", message)


def _cmd_process(args) -> int:
    from .background import METHODS, get_method, parse_params
    from .inference import MODEL_PREFIX, SHIPPED_MODELS

    if args.list_methods:
        for name, m in METHODS.items():
            defaults = ", ".join(f"{k}={v!r}" for k, v in m.defaults.items())
            print(f"{name}: {defaults}")
        for name in SHIPPED_MODELS:
            print(f"{MODEL_PREFIX}{name}: shipped U-Net model (no parameters)")
        print(f"{MODEL_PREFIX}PATH: a .keras model file with its .json card beside it")
        return 0
    model = None
    try:
        if args.method.startswith(MODEL_PREFIX):
            if args.param:
                raise ValueError(f"a model takes no --param, got {', '.join(args.param)}")
            from .inference import BackgroundModel

            model = BackgroundModel.load(args.method)
            params = {}
            model.working_downsample(args.downsample)  # ModelError (a ValueError): one line, exit 2
        else:
            get_method(args.method)
            params = parse_params(args.method, args.param)
    except ValueError as exc:
        _fail(str(exc))
        return 2
    from .background import MAX_DOWNSAMPLE

    if args.downsample is not None and not 1 <= args.downsample <= MAX_DOWNSAMPLE:
        _fail(f"--downsample must be an integer from 1 to {MAX_DOWNSAMPLE}, got {args.downsample}")
        return 2
    if args.out is None:
        _fail("--out DIR is required")
        return 2
    if args.workers is not None and not 1 <= args.workers <= 64:
        _fail(f"--workers must be an integer from 1 to 64, got {args.workers}")
        return 2
    images = list(args.images)
    if args.sample:
        images.append(str(sample_frame_path()))
    if not images:
        _fail("no IMAGE given (pass image paths, or --sample for the shipped frame)")
        return 2
    missing = [path for path in images if not Path(path).exists()]
    if missing:  # a path that names nothing is a usage error: nothing is processed
        named = ", ".join(repr(str(path)) for path in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        _fail(f"no such image file: {named} ({len(missing)} of {len(images)} IMAGE paths; nothing processed)")
        return 2
    center = tuple(args.center) if args.center else None
    run_geometry, fold_maps = None, {}
    if args.geometry == "per-run" and center is None:
        try:
            run_geometry = _run_geometry(images[:RUN_GEOMETRY_FRAMES], args.frame)
        except (OSError, ValueError) as exc:
            _fail(f"--geometry per-run: {exc}")
            return 1
        q = run_geometry.quality
        print(
            f"run geometry from {len(run_geometry.per_frame)} image(s): center=({run_geometry.geometry.center[0]:.2f}, "
            f"{run_geometry.geometry.center[1]:.2f}) rotation={run_geometry.geometry.rotation_deg:.2f} deg, {q.verdict}"
            + (f" ({'; '.join(q.reasons)})" if q.reasons else "")
        )
    # Images are processed by a few threads at once (the numerical work, FFTs, filters
    # and matrix products, runs outside the GIL) and their outputs compressed and
    # written by one more while the next images are processed; results are taken in
    # image order, so the lines print in that order, and at most ``workers`` images are
    # ahead of the one being reported.
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = args.workers if args.workers is not None else (1 if model is not None else PROCESS_WORKERS)

    def work(path):
        return process_image(
            path,
            method=args.method,
            params=params,
            center=center,
            rotation_deg=args.rotation,
            downsample=args.downsample,
            frame=args.frame,
            wavelength_nm=args.wavelength_nm,
            distance_mm=args.distance_mm,
            pixel_size_mm=args.pixel_size_mm,
            model=model,
            run_geometry=run_geometry,
            fold_maps=fold_maps,
        )

    def finish(pending) -> int:
        """Wait for one image's outputs; print its line. Returns 1 if it failed."""
        if pending is None:
            return 0
        path, record, future = pending
        try:
            json_path, _ = future.result()
        except (OSError, ValueError) as exc:
            _fail_image(path, exc)
            return 1
        print(_summary_line(path, record, json_path))
        return 0

    failed = 0
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="live-bgsub-process") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-bgsub-write") as writer,
    ):

        def take(path, future, pending):
            """The next image in order: queue its outputs, report the image before it."""
            nonlocal failed
            try:
                record, arrays = future.result()
            except (OSError, ValueError) as exc:
                failed += finish(pending) + 1
                _fail_image(path, exc)
                return None
            written = writer.submit(_write_outputs, args.out, Path(path).stem, record, arrays)
            failed += finish(pending)
            return path, record, written

        running, pending = deque(), None
        for path in images:
            running.append((path, pool.submit(work, path)))
            if len(running) > workers:
                pending = take(*running.popleft(), pending)
        while running:
            pending = take(*running.popleft(), pending)
        failed += finish(pending)
    if failed:
        _fail(f"{failed} of {len(images)} image(s) failed")
        return 1
    return 0


def _fail_image(path, exc) -> None:
    _fail(f"{path}: {exc}" if str(path) not in str(exc) else str(exc))


def _summary_line(path, record: dict, json_path: Path) -> str:
    """The line ``process`` prints for one image: geometry, metrics and their verdict."""
    m = record["metrics"]
    ratio = m.get("i11_i10")
    q = m["quality"]
    if m.get("equator_found"):
        summary = f"I11/I10={ratio:.3f} S10={m['s10_px']:.2f}px {q['verdict']}"
        if q["reasons"]:
            summary += f" ({'; '.join(q['reasons'])})"
    else:
        summary = f"no equator: {m.get('reason')}"
    return (
        f"{path}: center=({record['center'][0]:.2f}, {record['center'][1]:.2f}) "
        f"rotation={record['rotation_deg']:.2f} deg {summary} "
        f"[{1e3 * record['timings_s']['total']:.0f} ms] -> {json_path}"
    )


#: Images ``process`` works on at once (threads) with a classical method. Measured over
#: the six P40 frames at downsample 2 on 2 cores (2026-12-02): white top hat 144 ms per
#: frame with one, 110 with two, 122 with three; smoothed Gaussian 260, 172, 160.
PROCESS_WORKERS = 2

#: Images ``process --geometry per-run`` estimates the run's geometry from (the first ones).
RUN_GEOMETRY_FRAMES = 8


def _run_geometry(paths, frame):
    """:func:`live_bgsub.geometry.find_run_geometry` on those of the given images shaped like the first."""
    from .geometry import find_run_geometry
    from .io import read_image

    images = [read_image(p, frame=frame) for p in paths]
    # The run is the first image's shape; an image of another shape fails on its own later.
    images = [im for im in images if im.shape == images[0].shape]
    return find_run_geometry([im.data for im in images], [im.mask for im in images])


def _check_method(method: str) -> None:
    """Raise UsageError unless ``method`` names a classical method, a shipped model or an
    existing ``.keras`` file; loads nothing (the command checks before it starts)."""
    from .background import get_method
    from .inference import MODEL_PREFIX, SHIPPED_MODELS, shipped_model_path

    if not method.startswith(MODEL_PREFIX):
        try:
            get_method(method)
        except ValueError as exc:
            raise UsageError(f"--method: {exc}") from None
        return
    name = method[len(MODEL_PREFIX) :]
    path = shipped_model_path(name) if name in SHIPPED_MODELS else Path(name)
    if name not in SHIPPED_MODELS and path.suffix != ".keras":
        raise UsageError(f"--method: unknown model {name!r}; expected {MODEL_PREFIX}NAME with NAME one of "
                         f"{', '.join(SHIPPED_MODELS)}, or {MODEL_PREFIX}PATH of a .keras file")
    if not path.is_file():
        raise UsageError(f"--method: model file not found: {str(path)!r}")


def _cmd_demo(args) -> int:
    try:  # before anything starts (the Tiled server takes seconds)
        _check_method(args.method)
    except UsageError as exc:
        _fail(str(exc))
        return 2
    from .demo import run_demo

    try:
        figures = run_demo(
            args.dir,
            frames=args.frames,
            rate_hz=args.rate,
            method=args.method,
            preset=args.preset,
            seed=args.seed,
            keep_serving=args.keep_serving,
            epics=args.epics,
            remote=args.remote,
            workers=args.workers,
        )
    except ValueError as exc:
        _fail(str(exc))
        return 2
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM with --workers): what the demo started is stopped
        _fail("interrupted")
        return 130
    return 0 if figures["exit_status"] == "success" else 1


def _split_query(items) -> dict:
    query = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--query expects KEY=VALUE, got {item!r}")
        try:
            query[key] = json.loads(value)
        except json.JSONDecodeError:
            query[key] = value
    return query


_NO_MATCH = "no raw run matched the selection (a derived run is replayed only when named by its uid)"

#: Default of ``replay --timeout``: seconds to wait for a derived run after its raw run's
#: last document (with on_full="block" only a queue of frames is left by then).
REPLAY_TIMEOUT_S = 600.0


def _replay_backup(args) -> Path | None:
    """Where replay's publisher keeps its backup: --backup, else backup/ beside --directory."""
    if args.no_backup:
        return None
    return args.backup if args.backup is not None else args.directory.parent / "backup"


def _cmd_replay(args) -> int:
    uri = args.tiled or os.environ.get("TILED_URI")
    if not uri:
        _fail("no Tiled server: pass --tiled URI or set TILED_URI")
        return 2
    if args.nats and args.fill:
        _fail("--fill replays single frames in this process; --nats publishes whole runs: give one of them")
        return 2
    if args.nats and args.data_key:
        _fail("--data-key is not taken with --nats: the composer picks the frames' data key (the stream's one 2-D key)")
        return 2
    if not (args.uids or args.query or args.last or args.fill):
        _fail("no runs selected: pass UIDs, --query KEY=VALUE, --last N or --fill DERIVED_UID")
        return 2
    if args.fill and (args.uids or args.query or args.last):
        _fail("--fill DERIVED_UID replays that run's raw run: give no other selection")
        return 2
    if not args.timeout > 0:
        _fail(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
        return 2
    if args.nats:
        return _replay_bus(args, uri)
    try:
        from .callback import LiveBackgroundSubtraction
        from .sinks.tiled import TiledPublisher
        from .tiled_server import connect

        query = _split_query(args.query)
        options = ProcessingOptions.from_args(args)
        catalog = connect(uri, api_key=args.api_key, catalog=args.catalog, create=False)
        seq_nums = None
        if args.fill:
            from .replay import fill_plan

            plan = fill_plan(catalog, args.fill)
            for note in plan.notes:
                print(note)
            seq_nums, raw_uid = plan.seq_nums, plan.raw_uid
            if not seq_nums:
                if plan.derived_stopped and plan.raw_stopped:
                    print(f"derived run {args.fill} processed every frame of {raw_uid}: nothing to fill")
                    return 0
                print(f"derived run {args.fill} recorded every frame of {raw_uid} that Tiled holds: nothing to fill yet")
                return 1  # incomplete runs: recover them first
            args.uids = [raw_uid]
            print(f"filling {len(seq_nums)} frame(s) of raw run {raw_uid}: {seq_nums}")
        publisher = TiledPublisher(catalog, backup_directory=_replay_backup(args))
        callback = LiveBackgroundSubtraction(
            publisher,
            **options.callback_kwargs(),
            data_key=args.data_key,
            directory=args.directory,
            on_full="block",
            seq_nums=seq_nums,
        )
    except (ValueError, KeyError, OSError) as exc:  # OSError: ConnectionError (no server, a refused key)
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
        return 2
    from .replay import replay_runs

    try:
        summaries = replay_runs(
            catalog, args.uids, callback, query=query, last=args.last, progress=not args.no_progress, timeout=args.timeout
        )
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
        return 2
    except TimeoutError as exc:
        _fail(str(exc))
        return 1
    finally:
        callback.close(timeout=args.timeout)
        publisher.close(timeout=120)
    if not summaries:
        _fail(_NO_MATCH)
        return 1
    for s in summaries:
        print(f"{s.raw_uid} -> {s.derived_uid}: {s.reason} ({s.exit_status})")
    if publisher.error_count:
        where = f"; all of them are in {publisher.backup_directory} (live-bgsub recover)" if publisher.backup_directory else ""
        _fail(f"{publisher.error_count} document(s) could not be written to Tiled{where}; first: {publisher.errors[0]}")
        return 1
    return 0 if all(s.exit_status == "success" for s in summaries) else 1


class _BusFeed:
    """What :func:`~live_bgsub.replay.replay_run` feeds and waits on, for ``replay --nats``:
    the documents go to a BusPublisher, and a run's wait ends once JetStream has
    acknowledged all of them (the derived run is the composer's: see
    :func:`~live_bgsub.replay.bus_done`)."""

    def __init__(self, publisher):
        self.publisher = publisher

    def __call__(self, name, doc):
        self.publisher(name, doc)

    def wait(self, raw_uid, timeout=None) -> bool:
        return self.publisher.flush(timeout)

    def summary(self, raw_uid):
        return raw_uid


def _replay_bus(args, uri) -> int:
    """``replay --nats``: publish the selected runs' documents for the bus's workers and
    composer, then wait until the composer has recorded each run as done."""
    try:
        from .replay import select_runs
        from .tiled_server import connect

        query = _split_query(args.query)
        options = ProcessingOptions.from_args(args)
        if not options.is_model:  # a model is found on the workers' hosts
            options.step()
        catalog = connect(uri, api_key=args.api_key, catalog=args.catalog, create=False)
        runs = select_runs(catalog, args.uids, query=query, last=args.last)
    except (ValueError, KeyError, OSError) as exc:  # OSError: ConnectionError (no server, a refused key)
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
        return 2
    by_uid = {}
    for run in runs:
        by_uid.setdefault(run.metadata["start"]["uid"], run)
    if not by_uid:
        _fail(_NO_MATCH)
        return 1
    from .bus.jetstream import derived_uid, job_key
    from .bus.publisher import BusPublisher
    from .replay import bus_done, replay_run

    processing = options.callback_kwargs()
    expected = {uid: derived_uid(job_key(uid, processing), processing) for uid in by_uid}
    try:
        before = bus_done(args.nats, list(by_uid), processing=processing)
        publisher = BusPublisher(args.nats, processing=processing)
    except ConnectionError as exc:
        _fail(str(exc))
        return 2
    lines, good = {}, set()  # a line per run; the runs done with a successful derived run
    try:
        feed = _BusFeed(publisher)
        for uid, run in by_uid.items():
            if before[uid] is not None:
                continue
            try:
                replay_run(run, feed, progress=not args.no_progress, timeout=args.timeout)
            except TimeoutError:
                lines[uid] = f"{uid} -> {expected[uid]}: not published: NATS did not acknowledge its documents within {args.timeout:g} s"
            except ValueError as exc:  # no start document
                lines[uid] = f"{uid} -> {expected[uid]}: not published: {exc}"
    finally:
        publisher.close(timeout=args.timeout)
    for error in publisher.errors:
        _fail(f"publishing: {error}")
    waiting = [uid for uid in by_uid if uid not in lines]
    if waiting and not args.no_progress:
        print(f"waiting up to {args.timeout:g} s for the composer to record {len(waiting)} run(s) as done", file=sys.stderr, flush=True)
    done = bus_done(args.nats, waiting, processing=processing, timeout=args.timeout) if waiting else {}
    for uid in waiting:
        derived = done[uid]
        if derived is None:
            lines[uid] = (f"{uid} -> {expected[uid]}: not done within {args.timeout:g} s (are `live-bgsub compose` and "
                          f"`live-bgsub worker`s running on {args.nats}?)")
            continue
        line = f"{uid} -> {derived or 'no derived run'}: done" + (" (composed before)" if before[uid] is not None else "")
        stop = None
        if derived:
            try:
                stop = catalog[derived].metadata.get("stop") or {}
            except KeyError:
                line += f" (not in the catalog {args.catalog!r} at {uri}: the composer writes elsewhere)"
        if stop is not None:
            line += f", {stop.get('reason', 'no stop document')} ({stop.get('exit_status')})"
        if stop is None or stop.get("exit_status") == "success":
            good.add(uid)
        lines[uid] = line
    for uid in by_uid:
        print(lines[uid])
    return 0 if len(good) == len(by_uid) else 1


def _cmd_recover(args) -> int:
    uri = args.tiled or os.environ.get("TILED_URI")
    if not uri:
        _fail("no Tiled server: pass --tiled URI or set TILED_URI")
        return 2
    from .recover import backup_files, recover
    from .sinks.tiled import UNASSIGNED_BACKUP

    try:
        files = backup_files(args.backup)
    except FileNotFoundError as exc:
        _fail(str(exc))
        return 2
    unassigned = args.backup / UNASSIGNED_BACKUP if args.backup.is_dir() else None
    if unassigned is not None and unassigned.exists():
        print(f"{unassigned}: documents of unknown runs, not sent")
    if not files:
        print(f"{args.backup}: no run backups (<run uid>.jsonl): nothing to recover")
        return 0
    try:
        from .tiled_server import connect

        catalog = connect(uri, api_key=args.api_key, catalog=args.catalog)
    except Exception as exc:  # noqa: BLE001 - unreachable, bad key, not a catalog: one line, no traceback
        _fail(f"cannot use the Tiled server at {uri} (catalog {args.catalog!r}): {type(exc).__name__}: {exc}")
        return 2
    results = recover(
        catalog, args.backup, batch_size=args.batch_size, close_open=args.close_open, on_run=lambda r: print(r.line(), flush=True)
    )
    bad = [r for r in results if not r.ok]
    if bad:
        _fail(f"{len(bad)} of {len(results)} run(s) are not complete in Tiled")
        return 1
    return 0


def _cmd_tiled_server(args) -> int:
    from .tiled_server import EmbeddedTiledServer

    directory = args.dir.resolve()
    key_file = directory / "tiled" / "api_key"
    if not key_file.exists():
        _fail(f"{directory} holds no demo catalog (no {key_file})")
        return 2
    server = EmbeddedTiledServer(
        directory / "tiled",
        readable_storage=[directory / "raw", directory / "derived"],
        api_key=key_file.read_text().strip(),
        port=args.port,
    ).start()
    print(f"Tiled server: {server.uri} (API key in {key_file}); Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv=None) -> int:
    verbose, argv = verbose_requested(sys.argv[1:] if argv is None else argv)
    quiet_libraries(verbose)  # -v: every library log line (TensorFlow's start-up among them)
    if argv[:1] == ["sim-ioc"]:  # its options belong to live_bgsub.sim.ioc (imports caproto)
        from .sim.ioc import main as sim_ioc_main

        return sim_ioc_main(argv[1:])
    if argv[:1] == ["serve"]:  # its options belong to live_bgsub.serve (imports bluesky, 0MQ)
        from .serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["worker"]:  # the bus's commands parse their own options
        from .bus.cli import worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["compose"]:
        from .bus.cli import compose_main

        return compose_main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "process":
        return _cmd_process(args)
    if args.command == "demo":
        return _cmd_demo(args)
    if args.command == "replay":
        return _cmd_replay(args)
    if args.command == "recover":
        return _cmd_recover(args)
    if args.command == "tiled-server":
        return _cmd_tiled_server(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
