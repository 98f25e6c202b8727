"""Training pairs (fold -> target) for the background U-Net, with the paper's dataset steps.

:func:`build_dataset` runs the whole pipeline for a :class:`DataConfig`:

1. **Collect folds** (:func:`collect_folds`) from every source:

   - a folder of real frames (any format :func:`live_bgsub.io.read_image` reads);
     frames are grouped into runs by shape and by the file-name prefix before a
     trailing ``_NNNNN`` counter (a multi-frame file is one run); each run gets one
     geometry (:func:`live_bgsub.geometry.find_run_geometry`) and one
     :class:`~live_bgsub.fold.FoldMap`;
   - ``synthetic`` seeded patterns per detector of ``synthetic_preset`` (one preset, a
     list, or ``"families"``: every family of :data:`live_bgsub.synth.FAMILIES`, less
     those in ``leave_out``; :func:`live_bgsub.synth.make_pattern`), folded with their
     *true* geometry, so that the folded true signal (the ``synthetic-truth`` target)
     aligns exactly with the folded frame; each preset is its own source;
   - runs of a Tiled catalog (:func:`collect_tiled_folds`; needs ``tiled[client]``): the
     2-D frames of the primary stream's detector key, one geometry per run.

   Each fold is reduced to the working resolution: the mean of the valid pixels of
   ``downsample x downsample`` blocks (:func:`live_bgsub.resample.block_mean`; 2 is
   MuscleX's working resolution). It keeps its full extent until the pairs are made.
2. **Discard** (:func:`discard_outliers`) the ``discard`` fraction of folds of each
   source that deviate most from that source's average fold (mean squared difference
   of the max-normalised ``log(1 + counts)``): failed folds, foreign patterns.
3. **Split** (:func:`split_folds`) the folds of each source into train / validation /
   test by the ``split`` fractions (seeded), so that the pairs of one fold (several
   targets, augmented copies) never straddle two splits.
4. **Augment** (:func:`augment_folds`) the training folds: ``augment`` copies each, at
   a random dose ``s`` (log-uniform in ``augment_scale``), with the counts Poisson
   re-sampled (``Poisson(s * fold * n) / n``, ``n`` the detector samples averaged into
   each pixel; synthetic folds re-sample their noise-free expectation, so their truth
   is exactly ``s * truth``). Flips are not valid augmentations: the beam centre sits
   at ``[0, 0]``.
5. **Targets** (:func:`make_pairs`): one pair per fold and target. A classical method
   runs on the full working-resolution fold with its length parameters divided by
   ``downsample`` (exactly what MuscleX does at its working resolution); the
   ``synthetic-truth`` target is the folded true signal. Input, mask and target are
   then cropped or zero-padded to ``input_size`` from the top-left corner, so the beam
   centre stays at ``[0, 0]``. Invalid pixels are 0 in input and target.

The method-similarity report (:func:`method_similarity`, :func:`similarity_table`)
compares the corrected folds of every pair of methods and the input, as the paper did
to choose its three methods. Built datasets are cached in an ``.npz`` keyed by a hash of
the configuration and the real files' contents (:meth:`DataConfig.key`).

The synthetic patterns and the classical targets are computed in ``workers`` processes
(:func:`build_dataset`); :func:`build_datasets` (and ``python -m training.data``) builds
several configurations' datasets and computes each source fold once for all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from live_bgsub.background import (
    get_method,
    subtract_background,
    validate_params,
)
from live_bgsub.errors import GeometryError
from live_bgsub.fold import FoldMap
from live_bgsub.geometry import Geometry, find_run_geometry
from live_bgsub.io import read_image
from live_bgsub.metrics import mae, psnr
from live_bgsub.resample import block_mean

__all__ = [
    "PAPER_METHODS",
    "SYNTHETIC_TRUTH",
    "DataConfig",
    "Dataset",
    "Pairs",
    "SourceFold",
    "augment_folds",
    "build_dataset",
    "build_datasets",
    "collect_folds",
    "collect_image_folds",
    "collect_synthetic_folds",
    "collect_tiled_folds",
    "deviation_scores",
    "discard_outliers",
    "file_sha256",
    "fit_to_size",
    "group_runs",
    "make_pairs",
    "method_similarity",
    "method_target",
    "parallel_map",
    "similarity_table",
    "split_folds",
    "working_params",
]

#: Target name of the synthetic true signal (synthetic sources only).
SYNTHETIC_TRUTH = "synthetic-truth"

#: The six classical methods the paper compared before keeping three.
PAPER_METHODS = (
    "white-top-hat",
    "circularly-symmetric",
    "smoothed-gaussian",
    "smoothed-boxcar",
    "roving-window",
    "convex-hull",
)

#: ``synthetic_preset`` value meaning every detector family of ``live_bgsub.synth.FAMILIES``.
FAMILIES = "families"

#: Bump when the content of a built dataset changes for the same configuration.
_FORMAT_VERSION = 3  # 3: synthetic folds as the detector writes them (a CCD's bias and read noise)

_COUNTER = re.compile(r"^(?P<prefix>.*?)[_-](?P<counter>\d+)$")
_SKIP_SUFFIXES = {".md", ".txt", ".json", ".py", ".csv", ".yaml", ".yml", ".npz", ".npy", ".log", ".png", ".jpg", ".pdf"}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DataConfig:
    """What goes into a dataset. Field names are the JSON keys of a fit config.

    Attributes
    ----------
    images : tuple of str
        Folders of real frames (every readable image file in each, not recursive).
    synthetic : int
        Number of synthetic patterns per detector preset.
    synthetic_preset : str or tuple of str
        Detector(s) of the synthetic patterns (keys of ``live_bgsub.synth.PRESETS``), or
        ``"families"``: every preset of ``live_bgsub.synth.FAMILIES``.
    leave_out : tuple of str
        Presets left out of ``synthetic_preset`` (a family held out for evaluation).
    synthetic_seed : int
        Seed of the first synthetic pattern: pattern ``k`` of the ``i``-th preset uses
        ``synthetic_seed + i * synthetic + k`` (every pattern of a dataset has its own seed).
    synthetic_counts : float
        Dose of the synthetic patterns (``make_pattern(counts=...)``; 1 is BioCAT-like).
    tiled : str or None
        URI of a Tiled catalog; ``runs`` (uids) or ``tiled_query`` select its runs.
    runs : tuple of str
        Run uids in the Tiled catalog.
    tiled_query : str or None
        A full-text query selecting runs in the Tiled catalog.
    tiled_key : str or None
        Detector data key of the primary stream (default: the first 2-D image key).
    targets : tuple of str
        Classical method names (``live_bgsub.background.METHODS``) and/or
        ``"synthetic-truth"``; several targets give one pair per target and fold (the
        paper's "mixed" model).
    target_params : dict
        Optional parameters per method (full-resolution pixels), e.g.
        ``{"white-top-hat": {"tophat": 80}}``; defaults are MuscleX's.
    downsample : int
        Working resolution: block size of the block mean of the fold (2: MuscleX's).
    input_size : (int, int)
        Rows and columns of the model input: top-left crop or zero pad of the fold.
    discard : float
        Fraction of the folds of each source discarded as outliers (paper: 0.10).
    split : (float, float, float)
        Train, validation and test fractions (sum 1).
    augment : int
        Augmented copies per training fold (0: none).
    augment_scale : (float, float)
        Range of the dose factor of augmented copies (log-uniform).
    augment_detector : bool
        Augmented copies also vary what a detector and its set-up change
        (:func:`augment_folds`): S10 scale, a rotation residue, beam-stop and gap masks,
        bit depth.
    max_frames_per_file : int
        Frames read from one multi-frame file at most.
    seed : int
        Seed of the split and of the augmentation.
    """

    images: tuple = ()
    synthetic: int = 0
    synthetic_preset: str | tuple = "pilatus-1m"
    leave_out: tuple = ()
    synthetic_seed: int = 0
    synthetic_counts: float = 1.0
    tiled: str | None = None
    runs: tuple = ()
    tiled_query: str | None = None
    tiled_key: str | None = None
    targets: tuple = ("white-top-hat",)
    target_params: dict = field(default_factory=dict)
    downsample: int = 2
    input_size: tuple = (288, 288)
    discard: float = 0.10
    split: tuple = (0.8, 0.1, 0.1)
    augment: int = 0
    augment_scale: tuple = (0.5, 2.0)
    augment_detector: bool = False
    max_frames_per_file: int = 100
    seed: int = 0

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if isinstance(self.images, (str, Path)):
            fix("images", (str(self.images),))
        fix("images", tuple(str(p) for p in self.images))
        if not isinstance(self.synthetic_preset, str):
            presets = tuple(str(p) for p in self.synthetic_preset)
            fix("synthetic_preset", presets[0] if len(presets) == 1 else presets)
        if isinstance(self.leave_out, str):
            fix("leave_out", (self.leave_out,))
        fix("leave_out", tuple(str(p) for p in self.leave_out))
        if isinstance(self.runs, str):
            fix("runs", (self.runs,))
        fix("runs", tuple(str(r) for r in self.runs))
        if isinstance(self.targets, str):
            fix("targets", (self.targets,))
        fix("targets", tuple(self.targets))
        fix("target_params", {str(k): dict(v) for k, v in dict(self.target_params or {}).items()})
        fix("input_size", _pair_of("input_size", self.input_size, int))
        fix("split", tuple(float(f) for f in self.split))
        fix("augment_scale", _pair_of("augment_scale", self.augment_scale, float))
        self.validate()

    def validate(self):
        """Check every value; raise ValueError naming what was received and expected."""
        if not self.targets:
            raise ValueError("targets must name at least one method or 'synthetic-truth', got none")
        for t in self.targets:
            if t != SYNTHETIC_TRUTH:
                get_method(t)  # raises ValueError listing the valid names
                if t in ("none",):
                    raise ValueError(f"target {t!r} is not a background method to learn")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must not repeat, got {list(self.targets)}")
        for m, params in self.target_params.items():
            validate_params(m, params)
        if SYNTHETIC_TRUTH in self.targets and (self.images or self.tiled):
            raise ValueError(
                "the 'synthetic-truth' target needs synthetic sources only (real frames have "
                f"no true signal), got images={list(self.images)} tiled={self.tiled!r}"
            )
        _check_int("synthetic", self.synthetic, 0)
        _check_int("downsample", self.downsample, 1)
        _check_int("augment", self.augment, 0)
        _check_int("max_frames_per_file", self.max_frames_per_file, 1)
        if min(self.input_size) < 16:
            raise ValueError(f"input_size must be at least 16 x 16, got {list(self.input_size)}")
        if not 0.0 <= float(self.discard) < 1.0:
            raise ValueError(f"discard must be a fraction in [0, 1), got {self.discard!r}")
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0:
            raise ValueError(
                f"split must be three non-negative fractions (train, val, test) summing to 1 "
                f"with train > 0, got {list(self.split)}"
            )
        lo, hi = self.augment_scale
        if not 0 < lo <= hi:
            raise ValueError(f"augment_scale must be (low, high) with 0 < low <= high, got {[lo, hi]}")
        if not isinstance(self.augment_detector, bool):
            raise ValueError(f"augment_detector must be true or false, got {self.augment_detector!r}")
        if not self.synthetic_counts > 0:
            raise ValueError(f"synthetic_counts must be positive, got {self.synthetic_counts!r}")
        from live_bgsub.synth import PRESETS

        named = (self.synthetic_preset,) if isinstance(self.synthetic_preset, str) else self.synthetic_preset
        for p in named + self.leave_out:
            if p not in PRESETS and not (p == FAMILIES and p in named):
                raise ValueError(f"unknown synthetic preset {p!r}; expected '{FAMILIES}' or one of {sorted(PRESETS)}")
        if self.synthetic and not self.presets():
            raise ValueError(f"leave_out {list(self.leave_out)} leaves no synthetic preset of {list(named)}")
        if not (self.images or self.synthetic or self.tiled):
            raise ValueError("no data source: give images folders, a number of synthetic patterns, or a Tiled URI")

    def presets(self) -> tuple:
        """The synthetic presets, in order: ``synthetic_preset`` expanded, less ``leave_out``."""
        from live_bgsub.synth import FAMILIES as families

        named = (self.synthetic_preset,) if isinstance(self.synthetic_preset, str) else self.synthetic_preset
        out = []
        for p in named:
            for q in families if p == FAMILIES else (p,):
                if q not in out and q not in self.leave_out:
                    out.append(q)
        return tuple(out)

    @classmethod
    def from_mapping(cls, mapping) -> DataConfig:
        """The data fields of a (fit) configuration mapping; other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(mapping).items() if k in names and v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        if not d["augment_detector"]:
            del d["augment_detector"]  # the key of a dataset built before it existed stays
        return d

    def key(self) -> str:
        """Hash of everything that determines the dataset: this configuration, the bytes
        of the real files, the format version and the live_bgsub version."""
        import live_bgsub

        h = hashlib.sha256()
        h.update(json.dumps(self.to_dict(), sort_keys=True).encode())
        h.update(f"format={_FORMAT_VERSION} live_bgsub={live_bgsub.__version__}".encode())
        for folder in self.images:
            for path in _candidate_files(Path(folder)):
                h.update(path.name.encode())
                h.update(file_sha256(path).encode())
        return h.hexdigest()[:16]


def _pair_of(name, value, kind):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = value
        return kind(a), kind(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (or one number), got {value!r}") from None


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------- folds


@dataclass
class SourceFold:
    """One fold at working resolution, full extent, with what is known about it.

    Attributes
    ----------
    id : str
        Unique name (``"image:P40_1_3_00000.tif"``, ``"synthetic:pilatus-1m:7"``;
        augmented copies append ``"#aug1"``).
    source : str
        The source it came from (``"images:DIR"``, ``"synthetic"``, ``"tiled:URI"``);
        outliers are discarded and splits drawn per source.
    fold : ndarray of float32
        Fold in counts (block mean at the working resolution), 0 where ``mask`` is False.
    mask : ndarray of bool
        True where the fold pixel holds valid data.
    samples : ndarray of float32
        Number of detector samples averaged into each pixel (quadrants x block pixels).
    truth : ndarray of float32 or None
        Folded true signal (synthetic sources), same resolution.
    expected : ndarray of float32 or None
        Folded noise-free expected reading ``gain * (background + signal) + bias``
        (synthetic sources; ``info["response"]`` holds the gain, bias and read noise).
    info : dict
        Provenance (file and sha256, frame, run and geometry; or preset and seed) and,
        for synthetic folds, the truth the metrics read (``i11_i10``, ``s10_px``).
    """

    id: str
    source: str
    fold: np.ndarray
    mask: np.ndarray
    samples: np.ndarray
    truth: np.ndarray | None = None
    expected: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _block_sum(a: np.ndarray, factor: int) -> np.ndarray:
    """Sum of ``factor x factor`` blocks (edges zero-padded), float32."""
    if factor == 1:
        return a.astype(np.float32)
    h, w = a.shape
    hb, wb = -(-h // factor), -(-w // factor)
    padded = np.zeros((hb * factor, wb * factor), np.float32)
    padded[:h, :w] = a
    return padded.reshape(hb, factor, wb, factor).sum(axis=(1, 3))


def _reduce(fold, count, downsample, *extra):
    """Working-resolution fold, mask, samples and the same block mean of ``extra`` folds."""
    valid = count > 0
    fold = np.where(valid, fold, 0).astype(np.float32)
    if downsample == 1:
        small, small_valid = fold, valid
        others = [np.where(valid, e, 0).astype(np.float32) for e in extra]
    else:
        small, small_valid = block_mean(fold, valid, downsample)
        others = [block_mean(np.asarray(e, np.float32), valid, downsample)[0] for e in extra]
    samples = _block_sum(np.where(valid, count, 0), downsample)
    return (small.astype(np.float32), small_valid, samples, *[o.astype(np.float32) for o in others])


def _candidate_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {str(folder)!r}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in _SKIP_SUFFIXES and not p.name.startswith("."))


def group_runs(names_and_shapes) -> OrderedDict[tuple, list]:
    """Group frames into runs by shape and by the name prefix before a trailing counter.

    Parameters
    ----------
    names_and_shapes : iterable of (str, tuple)
        File stems (``"P40_1_3_00004"``) and frame shapes.

    Returns
    -------
    OrderedDict
        ``(shape, prefix) -> [indices]`` in input order; a stem without a trailing
        ``_NNNNN`` counter is its own prefix.

    Examples
    --------
    >>> runs = group_runs([("a_00001", (4, 4)), ("a_00002", (4, 4)), ("b", (4, 4))])
    >>> [(k[1], v) for k, v in runs.items()]
    [('a', [0, 1]), ('b', [2])]
    """
    runs: OrderedDict = OrderedDict()
    for i, (stem, shape) in enumerate(names_and_shapes):
        m = _COUNTER.match(stem)
        prefix = m.group("prefix") if m else stem
        runs.setdefault((tuple(shape), prefix), []).append(i)
    return runs


def collect_image_folds(folder, *, downsample: int = 2, max_frames_per_file: int = 100, log=print) -> tuple[list, dict]:
    """Folds of every readable frame in a folder, with per-run geometry.

    Returns
    -------
    folds : list of SourceFold
    report : dict
        ``files`` (name, sha256, frames read), ``runs`` (prefix, files, geometry and the
        per-frame spread), ``skipped`` (files or runs left out, with the reason).
    """
    from live_bgsub.errors import ImageReadError

    folder = Path(folder)
    source = f"images:{folder}"
    frames, stems, files, skipped = [], [], [], []
    for path in _candidate_files(folder):
        try:
            first = read_image(path)
        except (ImageReadError, OSError, ValueError) as exc:
            skipped.append({"file": path.name, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        n = min(first.n_frames, max_frames_per_file)
        images = [first] + [read_image(path, frame=k) for k in range(1, n)]
        files.append({"file": path.name, "sha256": file_sha256(path), "frames": n, "of": first.n_frames})
        for k, im in enumerate(images):
            # A multi-frame file is one run of its own: its stem without a counter.
            stem = path.stem if first.n_frames == 1 else path.name
            frames.append((path.name, k, im))
            stems.append((stem, im.shape))
    folds, runs = [], []
    for (shape, prefix), idx in group_runs(stems).items():
        members = [frames[i] for i in idx]
        data = [m[2].data for m in members]
        masks = [m[2].mask for m in members]
        names = sorted({m[0] for m in members})
        try:
            rg = find_run_geometry(data, masks)
        except GeometryError as exc:
            skipped.append({"run": prefix, "files": names, "reason": f"GeometryError: {exc}"})
            log(f"  skipped run {prefix!r} ({len(idx)} frames): no geometry ({exc})")
            continue
        static = np.logical_and.reduce(masks)
        fm = FoldMap(shape, rg.geometry, static)
        runs.append(
            {
                "run": prefix,
                "files": names,
                "shape": list(shape),
                "geometry": rg.geometry.to_dict(),
                "center_spread_px": list(rg.center_spread_px),
                "rotation_spread_deg": rg.rotation_spread_deg,
            }
        )
        for name, k, im in members:
            fold, count = fm.fold(im.data, im.mask & static)
            small, valid, samples = _reduce(fold, count, downsample)
            fid = f"image:{name}" if im.n_frames == 1 else f"image:{name}[{k}]"
            folds.append(
                SourceFold(
                    fid,
                    source,
                    small,
                    valid,
                    samples,
                    info={"kind": "image", "file": name, "frame": k, "run": prefix, "geometry": rg.geometry.to_dict(),
                          "shape": list(shape)},
                )
            )
    log(f"  {folder}: {len(folds)} frames in {len(runs)} runs from {len(files)} files ({len(skipped)} skipped)")
    return folds, {"kind": "images", "folder": str(folder), "files": files, "runs": runs, "skipped": skipped}


def _synthetic_fold(preset: str, seed: int, counts: float, downsample: int) -> SourceFold:
    """One seeded synthetic pattern, folded with its true geometry and reduced."""
    from live_bgsub.synth import make_pattern

    p = make_pattern(preset, seed=seed, counts=counts)
    g = Geometry(p.params["center"], p.params["rotation_deg"])
    fm = FoldMap(p.frame.shape, g, p.mask)
    # What the detector writes (raw(): a CCD's bias, gain and read noise, its rounding and
    # clipping; a photon-counting frame's counts as they are); the truth in its units.
    gain, bias = float(p.params.get("gain", 1.0)), float(p.params.get("bias", 0.0))
    response = np.where(p.mask, p.raw().astype(np.float32), 0.0)
    stack, count = fm.fold(np.stack([response, gain * p.signal, gain * p.background + bias]), p.mask)
    frame_f, signal_f, floor_f = stack
    small, valid, samples, truth, expected = _reduce(frame_f, count[0], downsample, signal_f, signal_f + floor_f)
    truth_params = {k: p.params[k] for k in ("i10", "i11", "i11_i10", "s10_px") if k in p.params}
    return SourceFold(
        f"synthetic:{preset}:{seed}",
        f"synthetic:{preset}",
        small,
        valid,
        samples,
        truth=truth,
        expected=expected,
        info={"kind": "synthetic", "preset": preset, "seed": seed, "counts": counts, "truth": truth_params,
              "response": {"gain": gain, "bias": bias, "read_noise": float(p.params.get("read_noise", 0.0))}},
    )


#: Thread-pool variables of numerical libraries, set to 1 in the worker processes.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parallel_map(fn, args: Sequence[tuple], workers: int = 1) -> list:
    """``[fn(*a) for a in args]``, in ``workers`` spawned processes when above 1.

    ``fn`` must be a module-level function (it is pickled by name). Spawned, not forked:
    the caller may already hold threads (a Keras backend) that a fork would break."""
    args = list(args)
    workers = max(1, min(int(workers), len(args)))
    if workers == 1:
        return [fn(*a) for a in args]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # One thread per worker: the pool is the parallelism. The variables must be in the
    # environment the workers start with (they import numpy before any initializer runs);
    # without them each worker's BLAS starts a thread per core.
    saved = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
    os.environ.update({k: "1" for k in _THREAD_VARIABLES})
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return list(pool.map(fn, *zip(*args), chunksize=1))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _synthetic_key(preset, seed, counts, downsample) -> tuple:
    return ("synthetic", str(preset), int(seed), float(counts), int(downsample))


def _make_synthetic(keys, memo: dict, workers: int) -> None:
    """The folds of the keys (:func:`_synthetic_key`) that ``memo`` lacks, into ``memo``."""
    todo = [k for k in keys if k not in memo]
    for k, fold in zip(todo, parallel_map(_synthetic_fold, [k[1:] for k in todo], workers)):
        memo[k] = fold


def collect_synthetic_folds(
    n: int, *, preset="pilatus-1m", seed0: int = 0, counts: float = 1.0, downsample: int = 2, workers: int = 1, memo=None, log=print
):
    """Folds of ``n`` seeded synthetic patterns of one detector, folded with their true geometry.

    Pattern ``k`` is ``make_pattern(preset, seed=seed0 + k, counts=counts)``. Its frame,
    true signal and true background are folded by one :class:`FoldMap` (the true centre
    and rotation, the pattern's mask), so ``truth`` (the folded signal) and
    ``expected`` (folded background + signal) align pixel for pixel with ``fold``.
    The source of every fold is ``"synthetic:<preset>"``. ``workers`` processes make the
    patterns; ``memo`` (a dict) keeps folds across calls (:func:`build_datasets`).
    """
    memo = {} if memo is None else memo
    keys = [_synthetic_key(preset, int(seed0) + k, counts, downsample) for k in range(n)]
    _make_synthetic(keys, memo, workers)
    folds = [memo[k] for k in keys]
    log(f"  synthetic: {n} {preset} patterns, seeds {seed0}..{seed0 + n - 1}")
    report = {
        "kind": "synthetic",
        "generator": "live_bgsub.synth.make_pattern",
        "preset": preset,
        "seeds": [int(seed0), int(seed0) + n - 1] if n else [],
        "counts": counts,
        "n": n,
    }
    return folds, report


def collect_tiled_folds(uri, runs=(), *, query=None, key=None, downsample=2, max_frames_per_file=100, client=None, log=print):
    """Folds of the 2-D frames of Bluesky runs in a Tiled catalog.

    Parameters
    ----------
    uri : str
        Catalog URI (``http://host:8000/api/v1/metadata/raw`` ...), opened with
        ``tiled.client.from_uri`` (needs the ``tiled[client]`` package) unless
        ``client`` is given.
    runs : sequence of str
        Run uids (keys of the catalog).
    query : str, optional
        Full-text query (``tiled.queries.FullText``) selecting runs, when no uids.
    key : str, optional
        Detector data key in the primary stream; default the first key whose array
        holds 2-D frames (``(n, rows, cols)``, or ``(n, 1, rows, cols)``).
    downsample, max_frames_per_file : int
        As for :func:`collect_image_folds` (at most that many frames per run).
    client : mapping-like, optional
        An open catalog node (tests pass one built on an in-process server).

    Returns
    -------
    folds, report
        One fold per frame (ids ``"tiled:<uid>[k]"``); each run has one geometry
        (:func:`~live_bgsub.geometry.find_run_geometry`) and one FoldMap. The report
        records the URI and, per run, the uid, key, frames read and the sha256 of the
        frames' bytes (the data's provenance hash).

    Notes
    -----
    The primary stream is read as ``run["primary"]["data"][key]`` (databroker-style
    layout) or ``run["primary"][key]`` (bluesky-tiled-plugins' TiledWriter).
    Detector sentinels (negative values, the dtype's maximum) are masked as for files
    (:func:`live_bgsub.io.mask_invalid`).
    """
    from live_bgsub.io import mask_invalid

    if client is None:
        try:
            from tiled.client import from_uri
        except ImportError as exc:
            raise ImportError(
                f"reading runs from the Tiled catalog {uri!r} needs the 'tiled[client]' package "
                f"(pip install 'tiled[client]'): {exc}"
            ) from exc
        client = from_uri(uri)
    if runs:
        selected = [(str(uid), client[uid]) for uid in runs]
    elif query:
        from tiled.queries import FullText

        selected = [(str(k), v) for k, v in client.search(FullText(query)).items()]
    else:
        raise ValueError(f"select runs of the Tiled catalog {uri!r} by uid (runs) or by a full-text query, got neither")
    source = f"tiled:{uri}"
    folds, report_runs, skipped = [], [], []
    for uid, run in selected:
        try:
            array, used_key = _tiled_frames(run, key)
        except KeyError as exc:
            skipped.append({"run": uid, "reason": str(exc)})
            log(f"  skipped run {uid}: {exc}")
            continue
        n = min(int(array.shape[0]), int(max_frames_per_file))
        raw = np.asarray(array[:n] if hasattr(array, "__getitem__") else array.read()[:n])
        if raw.ndim == 4 and raw.shape[1] == 1:
            raw = raw[:, 0]
        digest = hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest()
        split = [mask_invalid(frame) for frame in raw]
        data = [d for d, _ in split]
        masks = [m for _, m in split]
        try:
            rg = find_run_geometry(data, masks)
        except GeometryError as exc:
            skipped.append({"run": uid, "reason": f"GeometryError: {exc}"})
            log(f"  skipped run {uid}: no geometry ({exc})")
            continue
        static = np.logical_and.reduce(masks)
        fm = FoldMap(raw.shape[1:], rg.geometry, static)
        for k, (d, m) in enumerate(zip(data, masks)):
            fold, count = fm.fold(d, m & static)
            small, valid, samples = _reduce(fold, count, downsample)
            info = {"kind": "tiled", "uri": uri, "uid": uid, "key": used_key, "frame": k, "geometry": rg.geometry.to_dict()}
            folds.append(SourceFold(f"tiled:{uid}[{k}]", source, small, valid, samples, info=info))
        report_runs.append(
            {
                "uid": uid,
                "key": used_key,
                "frames": n,
                "of": int(array.shape[0]),
                "shape": list(raw.shape[1:]),
                "sha256": digest,
                "geometry": rg.geometry.to_dict(),
                "center_spread_px": list(rg.center_spread_px),
                "rotation_spread_deg": rg.rotation_spread_deg,
            }
        )
    log(f"  {uri}: {len(folds)} frames from {len(report_runs)} runs ({len(skipped)} skipped)")
    return folds, {"kind": "tiled", "uri": uri, "query": query, "runs": report_runs, "skipped": skipped}


def _tiled_frames(run, key):
    """The array node of the detector frames of a run's primary stream, and its key."""
    stream = run["primary"]
    node = stream.get("data", stream)
    if key is not None:
        if key not in node:
            raise KeyError(f"no data key {key!r} in the primary stream (keys: {sorted(node)})")
        return node[key], key
    for k in node:
        shape = getattr(node[k], "shape", None)
        if shape is not None and (len(shape) == 3 or (len(shape) == 4 and shape[1] == 1)) and min(shape[-2:]) >= 16:
            return node[k], k
    raise KeyError(f"no 2-D detector frames in the primary stream (keys: {sorted(node)})")


def collect_folds(config: DataConfig, *, workers: int = 1, memo=None, log=print) -> tuple[list, list]:
    """Every source fold of ``config`` and the provenance of each source.

    ``workers``: processes making the synthetic patterns; ``memo``: a dict that keeps
    folds across calls (several configurations sharing sources)."""
    memo = {} if memo is None else memo
    folds, reports = [], []
    for folder in config.images:
        key = ("images", str(folder), int(config.downsample), int(config.max_frames_per_file))
        if key not in memo:
            memo[key] = collect_image_folds(folder, downsample=config.downsample, max_frames_per_file=config.max_frames_per_file, log=log)
        f, r = memo[key]
        folds += f
        reports.append(r)
    n = int(config.synthetic)
    presets = config.presets() if n else ()
    # every missing pattern of every preset in one pool
    wanted = [
        _synthetic_key(p, config.synthetic_seed + i * n + k, config.synthetic_counts, config.downsample)
        for i, p in enumerate(presets)
        for k in range(n)
    ]
    _make_synthetic(wanted, memo, workers)
    for i, preset in enumerate(presets):
        f, r = collect_synthetic_folds(
            n,
            preset=preset,
            seed0=config.synthetic_seed + i * n,
            counts=config.synthetic_counts,
            downsample=config.downsample,
            workers=workers,
            memo=memo,
            log=log,
        )
        folds += f
        reports.append(r)
    if config.tiled:
        f, r = collect_tiled_folds(
            config.tiled, config.runs, query=config.tiled_query, key=config.tiled_key, downsample=config.downsample, log=log
        )
        folds += f
        reports.append(r)
    ids = [f.id for f in folds]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"two sources give folds with the same name: {dup[:5]}")
    return folds, reports


# --------------------------------------------------------------------------- crop / pad


def fit_to_size(a: np.ndarray, size) -> np.ndarray:
    """Top-left crop and/or zero pad of a 2-D array to ``size = (rows, cols)``.

    The beam centre of a fold stays at ``[0, 0]``; what is cut is the far edge.

    Examples
    --------
    >>> fit_to_size(np.ones((3, 5)), (4, 2)).tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """
    a = np.asarray(a)
    rows, cols = size
    out = np.zeros((rows, cols), a.dtype)
    r, c = min(rows, a.shape[0]), min(cols, a.shape[1])
    out[:r, :c] = a[:r, :c]
    return out


# --------------------------------------------------------------------------- discard


def _log_normalised(fold, mask):
    z = np.log1p(np.clip(np.where(mask, fold, 0), 0, None)).astype(np.float64)
    top = z[mask].max() if mask.any() else 0.0
    return z / top if top > 0 else z


def deviation_scores(folds: Sequence[SourceFold], size=None) -> np.ndarray:
    """How far each fold is from the average fold of the set.

    Each fold is cropped/padded to a common ``size`` (default: the smallest extent),
    transformed to ``z = log(1 + counts) / max`` (so photon dose and brightness do not
    count, shape does), and scored by the mean over its valid pixels of
    ``(z - zbar)^2``, ``zbar`` the mean of the valid ``z`` of all folds per pixel.
    """
    if not folds:
        return np.zeros(0)
    if size is None:
        size = (min(f.fold.shape[0] for f in folds), min(f.fold.shape[1] for f in folds))
    z = np.stack([fit_to_size(_log_normalised(f.fold, f.mask), size) for f in folds])
    m = np.stack([fit_to_size(f.mask, size) for f in folds])
    n = m.sum(axis=0)
    zbar = np.where(n > 0, (z * m).sum(axis=0) / np.maximum(n, 1), 0.0)
    sq = ((z - zbar) ** 2) * m
    return sq.sum(axis=(1, 2)) / np.maximum(m.sum(axis=(1, 2)), 1)


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def discard_outliers(folds: Sequence[SourceFold], fraction: float, *, per_source: bool = True):
    """Drop the ``fraction`` of folds that deviate most from their source's average fold.

    The paper removed failed folds by discarding the 10 % of folded images that deviate
    most from the average folded image. Here the average is taken per source and
    detector (real frames are not judged against an average of synthetic patterns, nor
    a MarCCD frame against Pilatus frames: its fold, cropped to theirs, shows another
    part of the pattern); in each group ``round(fraction * n)`` folds go (none when the
    group holds fewer than 3).

    Returns
    -------
    kept : list of SourceFold
        In input order.
    discarded : list of dict
        ``id``, ``source`` and ``score`` (:func:`deviation_scores`) of each dropped fold,
        worst first.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    groups: OrderedDict = OrderedDict()
    for i, f in enumerate(folds):
        shape = tuple((f.info or {}).get("shape") or ())
        groups.setdefault((f.source, shape) if per_source else "all", []).append(i)
    drop, discarded = set(), []
    for idx in groups.values():
        n_drop = _round(fraction * len(idx)) if len(idx) >= 3 else 0
        if n_drop == 0:
            continue
        scores = deviation_scores([folds[i] for i in idx])
        worst = np.argsort(-scores, kind="stable")[:n_drop]
        for w in worst:
            i = idx[int(w)]
            drop.add(i)
            discarded.append({"id": folds[i].id, "source": folds[i].source, "score": float(scores[w])})
    kept = [f for i, f in enumerate(folds) if i not in drop]
    discarded.sort(key=lambda d: -d["score"])
    return kept, discarded


# --------------------------------------------------------------------------- split


def _split_counts(n: int, fractions) -> tuple[int, int, int]:
    _, f_val, f_test = fractions
    n_val, n_test = _round(f_val * n), _round(f_test * n)
    # Every requested split gets a fold when there are enough to go round.
    if f_val > 0 and n_val == 0 and n >= 3:
        n_val = 1
    if f_test > 0 and n_test == 0 and n >= 3:
        n_test = 1
    while n_val + n_test >= n and (n_val or n_test):  # keep at least one training fold
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def split_folds(folds: Sequence[SourceFold], fractions=(0.8, 0.1, 0.1), *, seed: int = 0) -> dict:
    """Seeded train / val / test split of folds, drawn separately in each source.

    Per source of ``n`` folds: ``round(f * n)`` validation and test folds (at least one
    each when its fraction is positive and ``n >= 3``), the rest for training.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` lists of SourceFold, each in
        input order.
    """
    groups: OrderedDict = OrderedDict()
    for i, f in enumerate(folds):
        groups.setdefault(f.source, []).append(i)
    which = {}
    for g, (source, idx) in enumerate(groups.items()):
        _, n_val, n_test = _split_counts(len(idx), fractions)
        rng = np.random.default_rng([int(seed), g])
        order = [idx[int(k)] for k in rng.permutation(len(idx))]
        for i in order[:n_val]:
            which[i] = "val"
        for i in order[n_val : n_val + n_test]:
            which[i] = "test"
        for i in order[n_val + n_test :]:
            which[i] = "train"
    return {s: [f for i, f in enumerate(folds) if which[i] == s] for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- augmentation


#: Ranges of the detector augmentation (``augment_detector``): the S10 scale (zoom of the
#: fold about the beam centre, log-uniform), the rotation residue (degrees either way of
#: the equator: a fold of a pattern rotated by ``delta`` averages it at ``+delta`` and
#: ``-delta``), the beam-stop radius (fraction of the fold's shorter side), the chance of
#: a gap band and its width (working pixels), and the bit depths drawn from.
DETECTOR_AUGMENTATION = {
    "zoom": (0.8, 1.25),
    "rotation_deg": 1.0,
    "beam_stop": (0.0, 0.08),
    "gap_probability": 0.5,
    "gap_width_px": (1, 6),
    "bit_depths": (32, 16, 8),
}


def _warp(image, coords, order):
    """``image`` read at fold coordinates ``coords`` (2, rows, cols): a fold is mirror
    symmetric about both axes, so a negative coordinate reads its mirror."""
    from scipy import ndimage

    return ndimage.map_coordinates(image, np.abs(coords), order=order, mode="nearest")


def _vary_detector(f: SourceFold, base: np.ndarray, rng):
    """The fold as another set-up would have seen it (:data:`DETECTOR_AUGMENTATION`):
    ``(base, truth, expected, mask, samples, info)`` zoomed about the beam centre,
    averaged over a rotation residue either way, with a beam stop and maybe a gap band
    added to its mask."""
    a = DETECTOR_AUGMENTATION
    zoom = float(math.exp(rng.uniform(*np.log(a["zoom"]))))
    delta = math.radians(float(rng.uniform(-a["rotation_deg"], a["rotation_deg"])))
    rows, cols = f.fold.shape
    ii, jj = np.indices((rows, cols), dtype=np.float64)
    fields = {"base": base, "truth": f.truth, "expected": f.expected}
    out = {k: 0.0 for k, v in fields.items() if v is not None}
    mask = np.ones((rows, cols), bool)
    samples = None
    for sign in (1.0, -1.0):
        c, sn = math.cos(sign * delta), math.sin(sign * delta)
        coords = np.stack([(c * ii - sn * jj) / zoom, (sn * ii + c * jj) / zoom])
        inside = (np.abs(coords[0]) <= rows - 1) & (np.abs(coords[1]) <= cols - 1)
        # valid only where every pixel the interpolation reads is valid
        mask &= inside & (_warp(f.mask.astype(np.float64), coords, 1) > 1 - 1e-9)
        for k in out:
            out[k] = out[k] + 0.5 * _warp(np.asarray(fields[k], np.float64), coords, 1)
        n = _warp(np.asarray(f.samples, np.float64), coords, 0)
        samples = n if samples is None else np.minimum(samples, n)
    r_stop = float(rng.uniform(*a["beam_stop"])) * min(rows, cols)
    mask &= np.hypot(ii, jj) >= r_stop
    gap = None
    if rng.uniform() < a["gap_probability"]:
        axis = int(rng.integers(2))
        width = int(rng.integers(a["gap_width_px"][0], a["gap_width_px"][1] + 1))
        start = int(rng.integers(max(1, int(0.1 * f.fold.shape[axis])), max(2, int(0.9 * f.fold.shape[axis]))))
        band = (slice(start, start + width), slice(None)) if axis == 0 else (slice(None), slice(start, start + width))
        mask[band] = False
        gap = [axis, start, width]
    samples = np.where(mask, samples, 0).astype(f.samples.dtype)
    info = {"zoom": zoom, "rotation_residue_deg": math.degrees(delta), "beam_stop_px": r_stop, "gap": gap}
    truth = out.get("truth")
    truth = None if truth is None else np.where(mask, truth, 0)  # 0 where the copy is invalid
    return out["base"], truth, out.get("expected"), mask, samples, info


def _bit_depth(fold, mask, depth: int):
    """A fold as an image of ``depth`` bits would hold it: 16 bits saturate at 65535; 8
    bits hold the counts rescaled so that the brightest 0.1 % of pixels saturate, rounded
    (the scale is undone: the fold stays in counts, with 8-bit steps)."""
    if depth == 16:
        return np.minimum(fold, 65535.0)
    if depth == 8:
        top = float(np.quantile(fold[mask], 0.999)) if mask.any() else 0.0
        if top <= 0:
            return fold
        k = 255.0 / top
        return np.clip(np.round(fold * k), 0, 255) / k
    return fold


def _augmented(f: SourceFold, j: int, scale, seed: int, detector: bool = False) -> SourceFold:
    # seeded by the fold's id and the copy, not by its place in a list: a fold gets the
    # same copies in every dataset that holds it (build_datasets makes them once)
    lo, hi = scale
    rng = np.random.default_rng([int(seed), 7919, zlib.crc32(f.id.encode()), int(j)])
    s = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    base = f.expected if f.expected is not None else f.fold
    truth, expected, mask, samples, varied = f.truth, f.expected, f.mask, f.samples, {}
    if detector:
        # its own stream: the dose and noise draws below are those of the plain copy
        vary = np.random.default_rng([int(seed), 104729, zlib.crc32(f.id.encode()), int(j)])
        base, truth, expected, mask, samples, varied = _vary_detector(f, base, vary)
        varied["bit_depth"] = int(vary.choice(DETECTOR_AUGMENTATION["bit_depths"]))
    # The photons are re-dosed; a synthetic CCD's bias and read noise are the detector's,
    # not photons: taken off, and drawn again for the mean of ``n`` samples.
    response = f.info.get("response") or {}
    gain, bias, read_noise = (float(response.get(k, d)) for k, d in (("gain", 1.0), ("bias", 0.0), ("read_noise", 0.0)))
    n = np.where(mask, samples, 0).astype(np.float64)
    lam = np.clip(s * (base.astype(np.float64) - bias) / gain * n, 0, None)
    counts = rng.poisson(lam).astype(np.float64)
    total = gain * counts + bias * n
    if read_noise > 0:
        total += read_noise * np.sqrt(n) * rng.standard_normal(n.shape)
    fold = np.where(n > 0, total / np.maximum(n, 1), 0)
    if detector:
        fold = np.where(n > 0, _bit_depth(fold, n > 0, varied["bit_depth"]), 0)
    return SourceFold(
        f"{f.id}#aug{j}",
        f.source,
        fold.astype(np.float32),
        mask.copy(),
        samples,
        truth=None if truth is None else (s * truth).astype(np.float32),
        expected=None if expected is None else (s * (expected - bias) + bias).astype(np.float32),
        info={**f.info, "augmented_from": f.id, "dose_scale": s, **({"detector": varied} if detector else {})},
    )


def augment_folds(folds: Sequence[SourceFold], copies: int, *, scale=(0.5, 2.0), seed: int = 0, memo=None,
                  detector: bool = False) -> list:
    """``copies`` re-dosed copies of each fold (Poisson re-sampling of the counts).

    Copy ``j`` of a fold draws a dose factor ``s`` log-uniformly in ``scale`` and new
    counts ``Poisson(s * base * n) / n`` per pixel, with ``n`` the detector samples
    averaged into the pixel and ``base`` the noise-free expectation (synthetic folds)
    or the fold itself (real folds: the new noise comes on top of the old). The truth
    of a synthetic fold becomes ``s * truth``. Classical targets are recomputed on the
    new fold by :func:`make_pairs`. No flips: the beam centre must stay at ``[0, 0]``.
    A copy depends on ``seed``, the fold's id and ``j`` only; ``memo`` (a dict) keeps
    copies across calls.

    With ``detector``, before the dose each copy is also seen by another set-up
    (:data:`DETECTOR_AUGMENTATION`, drawn from a stream of its own): zoomed about the
    beam centre (S10 scale), averaged over a rotation residue ``+-delta`` (what a fold of
    a pattern rotated by ``delta`` holds), with a beam stop of random radius at the
    centre and, one time in two, a gap band across it; and after the dose written at a
    bit depth of 32 (as is), 16 (saturating at 65535) or 8 (255 steps). What was drawn
    is in the copy's ``info["detector"]``.

    Returns
    -------
    list of SourceFold
        The copies only (ids ``"<id>#aug<j>"``), in order.
    """
    memo = {} if memo is None else memo
    scale = (float(scale[0]), float(scale[1]))
    out = []
    for f in folds:
        for j in range(1, copies + 1):
            key = ("augment", f.id, j, scale, int(seed), bool(detector))
            if key not in memo:
                memo[key] = _augmented(f, j, scale, seed, bool(detector))
            out.append(memo[key])
    return out


# --------------------------------------------------------------------------- targets


def working_params(method, downsample: int, params=None) -> dict:
    """A method's full parameters for a fold already reduced by ``downsample``.

    Length parameters (full-resolution pixels) are divided by ``downsample``, nested
    methods' too, so that ``subtract_background(reduced_fold, method, **working_params)``
    is what ``subtract_background(fold, method, downsample=N)`` computes on its reduced
    fold (MuscleX's working resolution).
    """
    m = get_method(method)
    full = validate_params(m, dict(params or {}))
    out = dict(full)
    for name in m.length_params:
        if out[name] is not None:
            out[name] = out[name] / downsample
    for method_param, params_param in m.nested:
        out[params_param] = working_params(out[method_param], downsample, out[params_param])
    return out


def method_target(fold, mask, method: str, downsample: int, params=None) -> np.ndarray:
    """The corrected fold (``fold - background``) of a classical method at working resolution."""
    _, corrected = subtract_background(fold, method, mask, downsample=1, **working_params(method, downsample, params))
    return corrected.astype(np.float32)


@dataclass
class Pairs:
    """Model-ready pairs of one split, cropped/padded to ``input_size``, in counts.

    Attributes
    ----------
    inputs, targets : ndarray of float32, shape (n, rows, cols)
        Fold (working resolution) and target corrected fold, 0 at invalid pixels.
    masks : ndarray of bool, same shape
        True where the fold pixel is valid.
    methods : list of str
        Target of each pair (a method name or ``"synthetic-truth"``).
    ids : list of str
        Fold id of each pair (``SourceFold.id``).
    """

    inputs: np.ndarray
    masks: np.ndarray
    targets: np.ndarray
    methods: list
    ids: list

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @classmethod
    def empty(cls, size) -> Pairs:
        z = np.zeros((0, *size), np.float32)
        return cls(z, z.astype(bool), z.copy(), [], [])

    def select(self, method: str) -> Pairs:
        """The pairs whose target is ``method``."""
        k = [i for i, m in enumerate(self.methods) if m == method]
        return Pairs(self.inputs[k], self.masks[k], self.targets[k], [self.methods[i] for i in k], [self.ids[i] for i in k])


def _fold_pairs(f: SourceFold, targets, downsample: int, input_size, target_params: dict):
    x = fit_to_size(f.fold, input_size)
    m = fit_to_size(f.mask, input_size)
    ys = []
    for t in targets:
        if t == SYNTHETIC_TRUTH:
            if f.truth is None:
                raise ValueError(f"fold {f.id!r} has no true signal: the 'synthetic-truth' target needs synthetic sources")
            y = np.where(f.mask, f.truth, 0).astype(np.float32)
        else:
            y = method_target(f.fold, f.mask, t, downsample, target_params.get(t))
        ys.append(fit_to_size(y, input_size))
    return x, m, ys


def make_pairs(
    folds: Sequence[SourceFold], targets: Sequence[str], *, downsample: int, input_size, target_params=None, workers: int = 1
) -> Pairs:
    """One pair per fold and target: (cropped fold, cropped target), pair order fold-major.

    ``workers`` processes compute the classical targets (same result, in order)."""
    target_params = target_params or {}
    targets = tuple(targets)
    per_fold = parallel_map(_fold_pairs, [(f, targets, downsample, tuple(input_size), target_params) for f in folds], workers)
    ins, masks, outs, methods, ids = [], [], [], [], []
    for f, (x, m, ys) in zip(folds, per_fold):
        for t, y in zip(targets, ys):
            ins.append(x)
            masks.append(m)
            outs.append(y)
            methods.append(t)
            ids.append(f.id)
    if not ins:
        return Pairs.empty(tuple(input_size))
    return Pairs(np.stack(ins), np.stack(masks), np.stack(outs), methods, ids)


# --------------------------------------------------------------------------- similarity


def method_similarity(folds: Sequence[SourceFold], methods=PAPER_METHODS, *, downsample: int = 2, target_params=None) -> dict:
    """Mean MAE and PSNR between the corrected folds of every pair of methods and the input.

    The paper ran every method on 500 folds and dropped the methods most similar to
    another. Images are compared in the "unified" normalisation (divided by the input
    fold's maximum, data range 1) over the valid pixels of the full working-resolution
    fold; ``"input"`` is the uncorrected fold.

    Returns
    -------
    dict
        ``names`` (``["input", *methods]``), ``n_folds`` and ``pairs``: a list of
        ``{"a", "b", "mae", "psnr"}`` for every unordered pair, means over folds.
    """
    target_params = target_params or {}
    names = ["input", *methods]
    sums = {(a, b): [0.0, 0.0] for i, a in enumerate(names) for b in names[i + 1 :]}
    for f in folds:
        top = float(f.fold[f.mask].max()) if f.mask.any() else 0.0
        if top <= 0:
            continue
        images = {"input": f.fold / top}
        for m in methods:
            images[m] = method_target(f.fold, f.mask, m, downsample, target_params.get(m)) / top
        for (a, b), acc in sums.items():
            acc[0] += mae(images[a], images[b], mask=f.mask)
            p = psnr(images[a], images[b], mask=f.mask)
            acc[1] += min(p, 200.0)  # identical images: cap inf so that the mean stays finite
    n = len(folds)
    pairs = [{"a": a, "b": b, "mae": acc[0] / max(n, 1), "psnr": acc[1] / max(n, 1)} for (a, b), acc in sums.items()]
    return {"names": names, "n_folds": n, "pairs": pairs}


def similarity_table(report: dict) -> str:
    """The similarity report as a Markdown table, most similar pair first."""
    lines = [
        f"Method similarity over {report['n_folds']} folds (unified normalisation; higher PSNR = more alike):",
        "",
        "| pair | MAE | PSNR (dB) |",
        "|---|---|---|",
    ]
    for p in sorted(report["pairs"], key=lambda p: -p["psnr"]):
        lines.append(f"| {p['a']} ~ {p['b']} | {p['mae']:.2e} | {p['psnr']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """A built dataset: pairs per split and everything a model card records about it."""

    config: DataConfig
    key: str
    train: Pairs
    val: Pairs
    test: Pairs
    sources: list
    discarded: list
    split_ids: dict
    similarity: dict | None = None

    def summary(self) -> dict:
        """The card's ``data`` entry."""
        return {
            "key": self.key,
            "sources": self.sources,
            "targets": list(self.config.targets),
            "downsample": self.config.downsample,
            "input_size": list(self.config.input_size),
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "n_folds": {k: len(v) for k, v in self.split_ids.items()},
            "augment": self.config.augment,
            "discard_fraction": self.config.discard,
            "discarded": self.discarded,
            "split": list(self.config.split),
            "split_ids": self.split_ids,
            "seed": self.config.seed,
        }

    # -- cache
    def save(self, path) -> None:
        arrays = {}
        for s in ("train", "val", "test"):
            p = getattr(self, s)
            arrays[f"{s}_inputs"] = p.inputs
            arrays[f"{s}_masks"] = p.masks
            arrays[f"{s}_targets"] = p.targets
        meta = {
            "key": self.key,
            "config": self.config.to_dict(),
            "sources": self.sources,
            "discarded": self.discarded,
            "split_ids": self.split_ids,
            "similarity": self.similarity,
            "methods": {s: getattr(self, s).methods for s in ("train", "val", "test")},
            "ids": {s: getattr(self, s).ids for s in ("train", "val", "test")},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        # uncompressed: zlib was a fifth of a build, single-threaded (pairs compress poorly)
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> Dataset:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            splits = {
                s: Pairs(z[f"{s}_inputs"], z[f"{s}_masks"], z[f"{s}_targets"], meta["methods"][s], meta["ids"][s])
                for s in ("train", "val", "test")
            }
        return cls(
            DataConfig.from_mapping(meta["config"]),
            meta["key"],
            splits["train"],
            splits["val"],
            splits["test"],
            meta["sources"],
            meta["discarded"],
            meta["split_ids"],
            meta["similarity"],
        )


def build_dataset(
    config: DataConfig, *, cache_dir=None, similarity_n: int = 0, similarity_methods=PAPER_METHODS, workers: int = 1, memo=None, log=print
) -> Dataset:
    """Run the whole pipeline (module docstring) for ``config``.

    Parameters
    ----------
    config : DataConfig
    cache_dir : path, optional
        Folder of the cache: ``dataset-<key>.npz`` is loaded when present (and the
        similarity report is not asked for more folds than it holds), else written.
    similarity_n : int, optional
        Run the method-similarity report on this many kept folds (0: skip); printed.
    similarity_methods : sequence of str, optional
        Methods of the report (default: the paper's six).
    workers : int, optional
        Processes making the synthetic patterns and the classical targets (default 1:
        none spawned); the dataset does not depend on it.
    memo : dict, optional
        Source folds kept across calls (:func:`build_datasets`).
    log : callable, optional
        Progress messages (default ``print``; ``lambda *a: None`` for silence).
    """
    key = config.key()
    cache = Path(cache_dir) / f"dataset-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        ds = Dataset.load(cache)
        if similarity_n <= 0 or (ds.similarity and ds.similarity["names"][1:] == list(similarity_methods)):
            log(f"dataset {key}: loaded from {cache}")
            if ds.similarity and similarity_n > 0:
                log(similarity_table(ds.similarity))
            return ds
    log(f"dataset {key}: building")
    folds, sources = collect_folds(config, workers=workers, memo=memo, log=log)
    kept, discarded = discard_outliers(folds, config.discard)
    for d in discarded:
        log(f"  discarded {d['id']} (deviation {d['score']:.4f})")
    similarity = None
    if similarity_n > 0 and kept:
        rng = np.random.default_rng(config.seed)
        chosen = [kept[int(i)] for i in sorted(rng.permutation(len(kept))[:similarity_n])]
        similarity = method_similarity(chosen, tuple(similarity_methods), downsample=config.downsample, target_params=config.target_params)
        log(similarity_table(similarity))
    splits = split_folds(kept, config.split, seed=config.seed)
    train_folds = list(splits["train"])
    if config.augment:
        train_folds += augment_folds(
            splits["train"], config.augment, scale=config.augment_scale, seed=config.seed, memo=memo,
            detector=config.augment_detector,
        )
    mk = {
        "targets": config.targets,
        "downsample": config.downsample,
        "input_size": config.input_size,
        "target_params": config.target_params,
        "workers": workers,
    }
    ds = Dataset(
        config,
        key,
        make_pairs(train_folds, **mk),
        make_pairs(splits["val"], **mk),
        make_pairs(splits["test"], **mk),
        sources,
        discarded,
        {s: [f.id for f in v] for s, v in splits.items()},
        similarity,
    )
    log(f"  pairs: {len(ds.train)} train, {len(ds.val)} val, {len(ds.test)} test ({len(config.targets)} target(s) per fold)")
    if cache is not None:
        ds.save(cache)
    return ds


def build_datasets(configs: Sequence[DataConfig], *, cache_dir, workers: int = 1, built=None, log=print) -> list:
    """Build (or load) the dataset of each configuration into ``cache_dir``, computing a
    source fold shared by several configurations (same folder, same synthetic pattern)
    once; returns the datasets in order. ``built(i, dataset)`` is called as soon as the
    ``i``-th is cached."""
    memo, out = {}, []
    for i, c in enumerate(configs):
        out.append(build_dataset(c, cache_dir=cache_dir, workers=workers, memo=memo, log=log))
        if built is not None:
            built(i, out[-1])
    return out


def main(argv=None) -> int:
    """``python -m training.data --config A.json [--config B.json ...] --cache DIR``:
    build and cache the datasets of fit configurations (``training.fit`` then loads them
    with the same ``--cache``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.data", description=main.__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("--config", action="append", required=True, metavar="JSON", help="fit configuration (a recipe); repeatable")
    ap.add_argument("--cache", required=True, metavar="DIR", help="folder of the dataset caches")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: the CPU count)")
    args = ap.parse_args(argv)
    configs = []
    for path in args.config:
        try:
            configs.append(DataConfig.from_mapping(json.loads(Path(path).read_text())))
        except (OSError, ValueError) as exc:
            print(f"python -m training.data: error: {path}: {exc}", file=sys.stderr)
            return 2
    def report(i, ds):  # one line per dataset as soon as it is cached
        print(f"{args.config[i]}: {ds.key}: {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test pairs of {list(ds.config.targets)}", flush=True)

    build_datasets(configs, cache_dir=args.cache, workers=max(1, args.workers), built=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
