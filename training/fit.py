"""Train the background U-Net: ``python -m training.fit [--config FILE.json] [flags]``.

Builds the pairs (:mod:`training.data`), trains ``live_bgsub.model.build_unet`` with
``BackgroundLoss`` and Adam, and writes to ``--out``:

- ``model.keras`` and its card ``model.json`` (``docs/model.md``: architecture, target,
  normalisation, input size, downsample, loss, training budget/time/hardware, data
  provenance with file hashes, validation and test metrics computed after training with
  :mod:`live_bgsub.metrics`, library versions);
- ``history.json`` (per-epoch losses and metrics, and every (re)start of the run);
- ``logs/`` (``training.csv`` always; TensorBoard event files when TensorBoard's
  summary writer is available), ``checkpoints/best.weights.h5`` (best validation loss),
  ``backup/`` (``keras.callbacks.BackupAndRestore``): re-running the same command
  after an interruption resumes at the last finished epoch, and re-running it with a
  larger ``--epochs`` continues training (``--fresh`` starts over);
- ``dataset.json`` (sources, discarded folds, split, similarity report) and the cached
  pairs ``cache/dataset-<key>.npz``.

Configuration: defaults, then the ``--config`` JSON file (keys are the flag names with
``_`` for ``-``, e.g. ``"base_filters": 8``, ``"targets": ["white-top-hat"]``,
``"images": ["../shared/data/real"]``), then the flags given on the command line.
Relative paths are relative to the current directory.

A usage or connection error (a missing config file or images folder, a bad value, a
Tiled server that does not answer within :data:`TILED_CONNECT_TIMEOUT_S` or refuses the
key, a run it lacks) is one line, ``python -m training.fit: error: WHAT``, and exit
status 2, checked before TensorFlow is imported or OUT is made (:mod:`live_bgsub.errors`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from live_bgsub.errors import ArgumentParser, at_least, usage_exit
from live_bgsub.logs import quiet_libraries, verbose_requested
from training.data import PAPER_METHODS, SYNTHETIC_TRUTH, DataConfig, build_dataset

PROG = "python -m training.fit"

#: Seconds the first request to ``--tiled URI`` may take before it is an error.
TILED_CONNECT_TIMEOUT_S = 10

#: Every configuration key and its default (the CLI's defaults).
DEFAULTS = {
    # data
    "images": [],
    "synthetic": 0,
    "synthetic_preset": "pilatus-1m",
    "leave_out": [],
    "synthetic_seed": 0,
    "synthetic_counts": 1.0,
    "tiled": None,
    "runs": [],
    "tiled_query": None,
    "tiled_key": None,
    "targets": ["white-top-hat"],
    "target_params": {},
    "downsample": 2,
    "input_size": [288, 288],
    "discard": 0.10,
    "split": [0.8, 0.1, 0.1],
    "augment": 0,
    "augment_scale": [0.5, 2.0],
    "augment_detector": False,
    "max_frames_per_file": 100,
    "similarity_n": 0,
    "similarity_methods": list(PAPER_METHODS),
    # model
    "depth": 4,
    "base_filters": 8,
    "dilation_rate": 2,
    "upsampling": "nearest",
    "normalization": "unified",
    "loss_alpha": 0.1,
    "loss_theta": 1.2,
    "loss_eps": 1e-4,
    "loss_smooth_on": "background",
    "loss_masked": False,
    # training
    "epochs": 100,
    "batch_size": 4,
    "learning_rate": 1e-5,
    "patience": 10,
    "lr_plateau_factor": 0.5,
    "seed": 0,
    "time_limit": None,
    "workers": 1,
    # output
    "out": None,
    "name": None,
    "cache": None,
    "verbose": 1,
}

#: Keys that may change between a run and its resumption (they do not change the model
#: being trained nor its data).
_RESUMABLE_KEYS = {"epochs", "patience", "out", "cache", "verbose", "similarity_n", "similarity_methods", "name", "time_limit", "workers"}

_DATA_KEYS = {
    "images", "synthetic", "synthetic_preset", "leave_out", "synthetic_seed", "synthetic_counts", "tiled", "runs",
    "tiled_query", "tiled_key", "targets", "target_params", "downsample", "input_size", "discard", "split",
    "augment", "augment_scale", "augment_detector", "max_frames_per_file", "seed",
}  # fmt: skip


# --------------------------------------------------------------------------- configuration


def _fail(message) -> None:
    usage_exit(PROG, message)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog=PROG,
        description="Train the background-subtraction U-Net on folds (real frames, synthetic patterns, Tiled runs) "
        "and write OUT/model.keras, OUT/model.json (model card), OUT/history.json.",
        epilog="Keys of a --config JSON file are the long flag names with '_' for '-' (targets, images and runs "
        "are lists). Flags given on the command line override the file. Re-running the same command resumes an "
        "interrupted run from OUT/backup; a larger --epochs continues a finished one; --fresh starts over.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    d = DEFAULTS
    ap.add_argument("--config", help="JSON configuration file (e.g. training/recipes/white-top-hat.json)")
    g = ap.add_argument_group("data sources")
    g.add_argument("--images", action="append", metavar="DIR", help=f"folder of real frames, any format fabio/h5py reads; repeatable (default {d['images']})")
    g.add_argument("--synthetic", type=at_least(0), metavar="N", help=f"seeded synthetic patterns per detector preset (default {d['synthetic']})")
    g.add_argument("--synthetic-preset", nargs="+", metavar="PRESET",
                   help=f"detector(s) of the synthetic patterns, or 'families' for every family of live_bgsub.synth.FAMILIES (default {d['synthetic_preset']})")
    g.add_argument("--leave-out", action="append", metavar="PRESET", help="a synthetic preset left out of training (held out for training.evaluate); repeatable")
    g.add_argument("--synthetic-seed", type=int, help=f"seed of the first synthetic pattern (default {d['synthetic_seed']})")
    g.add_argument("--synthetic-counts", type=float, help=f"dose of the synthetic patterns, 1 = BioCAT-like (default {d['synthetic_counts']})")
    g.add_argument("--tiled", metavar="URI", help="Tiled catalog URI (needs the tiled[client] package; API key from $TILED_API_KEY); select runs "
                   f"with --run or --tiled-query; one that does not answer within {TILED_CONNECT_TIMEOUT_S} s is an error")
    g.add_argument("--run", dest="runs", action="append", metavar="UID", help="run uid in the Tiled catalog; repeatable")
    g.add_argument("--tiled-query", help="full-text query selecting runs in the Tiled catalog")
    g.add_argument("--tiled-key", help="detector data key of the primary stream (default: the first 2-D image key)")
    g.add_argument("--max-frames-per-file", type=at_least(1), help=f"frames read from one multi-frame file at most (default {d['max_frames_per_file']})")
    g = ap.add_argument_group("targets and dataset steps")
    g.add_argument("--target", dest="targets", action="append", metavar="METHOD",
                   help="target: a classical method name (white-top-hat, circularly-symmetric, smoothed-gaussian, ...) or "
                   f"'{SYNTHETIC_TRUTH}' (synthetic sources only); repeat for a mixed model (default {d['targets']})")
    g.add_argument("--target-params", type=json.loads, metavar="JSON", help='method parameters, e.g. \'{"white-top-hat": {"tophat": 80}}\' (default: MuscleX defaults)')
    g.add_argument("--downsample", type=at_least(1), help=f"working resolution: block mean of the fold (default {d['downsample']}, MuscleX's)")
    g.add_argument("--input-size", type=at_least(16), nargs="+", metavar="N", help=f"model input rows [cols]: top-left crop/pad of the fold (default {d['input_size']})")
    g.add_argument("--discard", type=float, help=f"fraction of folds per source discarded as outliers (default {d['discard']}, the paper's)")
    g.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help=f"split fractions (default {d['split']})")
    g.add_argument("--augment", type=at_least(0), metavar="K", help=f"Poisson re-dosed copies per training fold (default {d['augment']})")
    g.add_argument("--augment-scale", type=float, nargs=2, metavar=("LOW", "HIGH"), help=f"dose factor range of the copies (default {d['augment_scale']})")
    g.add_argument("--augment-detector", action=argparse.BooleanOptionalAction,
                   help="the copies also vary S10 scale, rotation residue, beam-stop and gap masks and bit depth "
                   f"(training.data.DETECTOR_AUGMENTATION; default {'on' if d['augment_detector'] else 'off'})")
    g.add_argument("--similarity-n", type=at_least(0), metavar="N", help=f"print the method-similarity report on N folds, 0 = skip (default {d['similarity_n']})")
    g.add_argument("--similarity-methods", nargs="+", metavar="METHOD", help="methods of the similarity report (default: the paper's six)")
    g = ap.add_argument_group("model and loss")
    g.add_argument("--depth", type=at_least(1), help=f"U-Net levels (default {d['depth']})")
    g.add_argument("--base-filters", type=at_least(1), help=f"filters of the first level (default {d['base_filters']})")
    g.add_argument("--dilation-rate", type=at_least(1), help=f"dilation of the 3x3 convolutions (default {d['dilation_rate']})")
    g.add_argument("--upsampling", choices=["nearest", "bilinear"], help=f"decoder upsampling (default {d['upsampling']})")
    g.add_argument("--normalization", choices=["unified", "independent", "robust"],
                   help="unified: input and target / input max; independent: each / own max; robust: unified after the input's "
                   f"floor is taken off and isolated pixels are capped (a CCD bias, a hot pixel) (default {d['normalization']})")
    g.add_argument("--loss-alpha", type=float, help=f"weight of the smoothness term (default {d['loss_alpha']})")
    g.add_argument("--loss-theta", type=float, help=f"exponent of the smoothness weights (default {d['loss_theta']})")
    g.add_argument("--loss-eps", type=float, help=f"epsilon of the smoothness weights (default {d['loss_eps']})")
    g.add_argument("--loss-smooth-on", choices=["background", "output"], help=f"image the smoothness acts on (default {d['loss_smooth_on']})")
    g.add_argument("--loss-masked", action=argparse.BooleanOptionalAction,
                   help="confine the loss to valid pixels (no target at gaps, beam stop, padding; default "
                   f"{'on' if d['loss_masked'] else 'off'})")
    g = ap.add_argument_group("training")
    g.add_argument("--epochs", type=at_least(1), help=f"maximum number of epochs (default {d['epochs']})")
    g.add_argument("--batch-size", type=at_least(1), help=f"pairs per step (default {d['batch_size']})")
    g.add_argument("--learning-rate", type=float, help=f"Adam learning rate (default {d['learning_rate']}, the paper's)")
    g.add_argument("--patience", type=at_least(0), help=f"early stopping: epochs without a better validation loss (default {d['patience']})")
    g.add_argument(
        "--lr-plateau-factor",
        type=float,
        help="multiply the learning rate by this after patience/2 epochs without a better "
        f"validation loss (ReduceLROnPlateau; 1 disables; default {d['lr_plateau_factor']})",
    )
    g.add_argument("--seed", type=int, help=f"seed of the split, augmentation, weights and shuffling (default {d['seed']})")
    g.add_argument("--time-limit", type=float, metavar="S", help="stop after the epoch that ends past S seconds of training in this run (default: none)")
    g.add_argument("--workers", type=at_least(1), metavar="N", help=f"processes building the dataset (default {d['workers']})")
    g = ap.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="output folder (required, here or in the config)")
    g.add_argument("--name", help="model name in the card (default: the target, or 'mixed')")
    g.add_argument("--cache", metavar="DIR", help="folder of the dataset cache (default OUT/cache)")
    g.add_argument("--fresh", action="store_true", help="delete OUT's backup, checkpoints and history and start over")
    g.add_argument("--verbose", type=int, choices=[0, 1, 2], help=f"keras verbosity: 1 progress bar, 2 one line per epoch (default {d['verbose']})")
    return ap


def resolve_config(argv=None) -> tuple[dict, bool]:
    """Defaults <- config file <- command-line flags; returns (config, fresh)."""
    args = vars(build_parser().parse_args(argv))
    config = json.loads(json.dumps(DEFAULTS))
    path = args.pop("config", None)
    fresh = bool(args.pop("fresh", False))
    if path:
        try:
            with open(path) as f:
                loaded = json.load(f)
        except FileNotFoundError:
            _fail(f"--config: no such file: {path!r}")
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"--config: cannot read {path!r}: {exc}")
        except json.JSONDecodeError as exc:
            _fail(f"--config: {path!r} is not JSON ({exc})")
        if not isinstance(loaded, dict):
            _fail(f"--config: {path!r} must hold a JSON object of configuration keys, got {type(loaded).__name__}")
        loaded = {k: v for k, v in loaded.items() if not k.startswith("_")}  # "_comment" keys
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            _fail(f"unknown key(s) {unknown} in {path}; valid keys: {sorted(DEFAULTS)}")
        config.update(loaded)
    config.update(args)
    if isinstance(config["images"], str):
        config["images"] = [config["images"]]
    if isinstance(config["input_size"], int):
        config["input_size"] = [config["input_size"]]
    if len(config["input_size"]) == 1:
        config["input_size"] = [config["input_size"][0]] * 2
    if not config.get("out"):
        _fail("no output folder: give --out DIR (or \"out\" in the config)")
    if not config.get("name"):
        t = config["targets"]
        config["name"] = t[0] if len(t) == 1 else "mixed"
    return config, fresh


def check_config(config: dict) -> DataConfig:
    """The data configuration of ``config``, after checking every value a run needs
    before it starts: the counts, the images folders, the Tiled server and its runs.
    A wrong one is a usage error (one line, exit status 2)."""
    for key in ("epochs", "batch_size", "depth", "base_filters", "dilation_rate"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"{key} must be an integer >= 1, got {value!r}")
    if config.get("time_limit") is not None and not (isinstance(config["time_limit"], (int, float)) and config["time_limit"] > 0):
        _fail(f"time_limit must be a positive number of seconds, got {config['time_limit']!r}")
    if isinstance(config.get("workers"), bool) or not isinstance(config.get("workers"), int) or config["workers"] < 1:
        _fail(f"workers must be an integer >= 1, got {config.get('workers')!r}")
    try:
        data_config = DataConfig.from_mapping({k: config[k] for k in _DATA_KEYS})
    except ValueError as exc:
        _fail(str(exc))
    if len(data_config.targets) > 1 and SYNTHETIC_TRUTH in data_config.targets:
        _fail("'synthetic-truth' cannot be mixed with classical targets (their inputs differ in meaning)")
    for folder in data_config.images:
        if not Path(folder).is_dir():
            _fail(f"--images: no such folder: {str(folder)!r}")
    if data_config.tiled:
        _check_tiled(data_config.tiled, data_config.runs)
    return data_config


def _check_tiled(uri: str, runs) -> None:
    """A usage error unless the Tiled catalog at ``uri`` answers within
    :data:`TILED_CONNECT_TIMEOUT_S`, takes the key in ``$TILED_API_KEY`` and holds ``runs``."""
    import urllib.parse

    parts = urllib.parse.urlsplit(str(uri))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        _fail(f"--tiled: expected a catalog URI like http://HOST:PORT/api/v1/metadata/CATALOG, got {uri!r}")
    try:
        import httpx
        from tiled.client import from_uri
    except ImportError as exc:
        _fail(f"--tiled needs the 'tiled[client]' package (pip install 'tiled[client]'): {exc}")
    try:  # one quick request: no answer is an error now, not after the client's retries
        httpx.get(uri, timeout=TILED_CONNECT_TIMEOUT_S).close()
        client = from_uri(uri)
    except httpx.TransportError as exc:
        _fail(f"--tiled: the Tiled server at {uri} cannot be reached (connect timeout {TILED_CONNECT_TIMEOUT_S} s): {type(exc).__name__}: {exc}")
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        why = "refused the API key ($TILED_API_KEY)" if code in (401, 403) else "answered with an error"
        _fail(f"--tiled: the Tiled server at {uri} {why} (HTTP {code} {exc.response.reason_phrase})")
    missing = [str(uid) for uid in runs if str(uid) not in client]
    if missing:
        _fail(f"--run: not in the Tiled catalog {uri}: {', '.join(missing)}")


def target_name(targets) -> str:
    """The card's ``target``: the method, ``synthetic-truth``, or ``mixed`` for several."""
    return targets[0] if len(targets) == 1 else "mixed"


# --------------------------------------------------------------------------- environment


def hardware() -> dict:
    """CPU model, cores, Keras backend and accelerators of this machine."""
    import keras

    from live_bgsub.provenance import machine_facts

    facts = machine_facts()
    backend = keras.backend.backend()
    accelerators = []
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            accelerators = [d.name for d in tf.config.list_physical_devices("GPU")]
        elif backend == "jax":
            import jax

            accelerators = [str(d) for d in jax.devices() if d.platform != "cpu"]
        elif backend == "torch":
            import torch

            accelerators = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001  (an accelerator query must never break training)
        accelerators = [f"unknown ({type(exc).__name__})"]
    return {
        "cpu": facts["cpu_model"],
        "cores": facts["cpu_count"],
        "usable_cores": facts["cpu_usable"],
        "backend": backend,
        "accelerators": accelerators,
        "platform": facts["platform"],
    }


def versions() -> dict:
    import keras

    import live_bgsub

    backend = keras.backend.backend()
    try:
        backend_version = __import__(backend).__version__
    except (ImportError, AttributeError):
        backend_version = None
    return {
        "live_bgsub": live_bgsub.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "backend_version": backend_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- metrics


def normalised_metrics(pred, target, masks) -> dict:
    """Mean over pairs of :func:`live_bgsub.metrics.image_metrics` (data range 1).

    ``pred`` and ``target`` are ``(n, rows, cols)`` in the model's normalisation; the
    prediction is set to 0 at invalid pixels first, as the inference engine does.
    """
    from live_bgsub.metrics import image_metrics

    if len(pred) == 0:
        return {}
    rows = []
    for p, t, m in zip(pred, target, masks):
        rows.append(image_metrics(np.where(m, p, 0), np.where(m, t, 0), data_range=1.0))
    out = {}
    for k in rows[0]:
        v = np.array([r[k] for r in rows], np.float64)
        out[k] = float(np.mean(np.minimum(v, 200.0))) if k.startswith("psnr") else float(np.mean(v))
    out["n"] = len(rows)
    return out


def predict_normalised(model, pairs, *, depth, normalization, batch_size=8):
    """Model outputs and targets of ``pairs`` in the model's normalisation, (n, rows, cols)."""
    from live_bgsub.model import prepare

    x, y, info = prepare(pairs.inputs, pairs.masks, depth=depth, normalization=normalization, targets=pairs.targets)
    out = model.predict(x, batch_size=batch_size, verbose=0)
    r, c = info["shape"]
    return out[:, :r, :c, 0], y[:, :r, :c, 0], info


def split_metrics(model, pairs, *, depth, normalization) -> dict:
    """Whole/centre-ROI metrics of one split, overall and per target method."""
    if len(pairs) == 0:
        return {}
    pred, target, info = predict_normalised(model, pairs, depth=depth, normalization=normalization)
    masks = info["masks"]
    result = normalised_metrics(pred, target, masks)
    methods = sorted(set(pairs.methods))
    if len(methods) > 1:
        result["per_method"] = {}
        for m in methods:
            k = [i for i, mm in enumerate(pairs.methods) if mm == m]
            result["per_method"][m] = normalised_metrics(pred[k], target[k], masks[k])
    return result


# --------------------------------------------------------------------------- history


class HistoryWriter:
    """Keras callback that appends each finished epoch to ``history.json`` at once."""

    def __init__(self, path: Path, history: dict):
        import keras

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):
                cb._t = time.perf_counter()

            def on_epoch_end(cb, epoch, logs=None):
                row = {"epoch": int(epoch)}
                row.update({k: float(v) for k, v in (logs or {}).items()})
                row["seconds"] = time.perf_counter() - cb._t
                self.history["epochs"].append(row)
                self.write()

        self.path = Path(path)
        self.history = history
        self.callback = _Callback()

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.history, indent=1))
        tmp.replace(self.path)


def _load_history(path: Path, initial_epoch: int) -> dict:
    if path.exists():
        history = json.loads(path.read_text())
        # Epochs the backup does not hold (interrupted after the history was written)
        # are run again: drop them.
        history["epochs"] = [e for e in history.get("epochs", []) if e["epoch"] < initial_epoch]
        history.setdefault("runs", [])
        return history
    return {"epochs": [], "runs": []}


def _backup_epoch(backup: Path) -> int:
    meta = backup / "training_metadata.json"
    if meta.exists():
        return int(json.loads(meta.read_text()).get("epoch", 0))
    return 0


def _tensorboard_callback(log_dir: Path):
    """A TensorBoard callback if its summary writer works here, else None."""
    import keras

    try:  # the summary writer needs tensorflow and the tensorboard package
        import tensorboard  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError:
        return None
    return keras.callbacks.TensorBoard(log_dir=str(log_dir), histogram_freq=0, write_graph=False, profile_batch=0)


# --------------------------------------------------------------------------- fit


def _time_limit_callback(seconds: float, log):
    """Stop training after the first epoch that ends ``seconds`` after training began."""
    import keras

    class TimeLimit(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if time.perf_counter() - self.t0 > seconds:
                log(f"time limit: {seconds:g} s of training reached after epoch {epoch + 1}; stopping")
                self.model.stop_training = True

    return TimeLimit()


def fit(config: dict, *, fresh: bool = False, log=print) -> dict:
    """Train a model as ``config`` says (keys of :data:`DEFAULTS`); returns the card.

    A wrong value (:func:`check_config`) is a usage error, found before anything is
    imported or written: one line on stderr and SystemExit with status 2."""
    import shutil

    data_config = check_config(config)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    backup = out / "backup"
    checkpoints = out / "checkpoints"
    logs = out / "logs"
    history_path = out / "history.json"
    if fresh:
        for p in (backup, checkpoints, logs):
            shutil.rmtree(p, ignore_errors=True)
        history_path.unlink(missing_ok=True)

    # A backup made with another configuration must not be resumed.
    fingerprint = {k: v for k, v in config.items() if k not in _RESUMABLE_KEYS}
    fp_path = backup / "config.json"
    if fp_path.exists() and (backup / "training_metadata.json").exists():
        old = json.loads(fp_path.read_text())
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            _fail(f"{backup} holds a run with another configuration (differs in {diff}); use --fresh to start over or another --out")

    import keras

    from live_bgsub.model import MAE, PSNR, SSIM, BackgroundLoss, build_unet

    t_start = time.perf_counter()
    ds = build_dataset(
        data_config,
        cache_dir=config.get("cache") or out / "cache",
        similarity_n=int(config["similarity_n"]),
        similarity_methods=config["similarity_methods"],
        workers=int(config.get("workers") or 1),
        log=log,
    )
    if len(ds.train) == 0:
        _fail("no training pairs (too few folds for the split?)")
    (out / "dataset.json").write_text(json.dumps({**ds.summary(), "similarity": ds.similarity}, indent=1))
    data_seconds = time.perf_counter() - t_start

    from live_bgsub.model import prepare

    depth = int(config["depth"])
    norm = config["normalization"]
    masked = bool(config["loss_masked"])
    x_train, y_train, _ = prepare(
        ds.train.inputs, ds.train.masks, depth=depth, normalization=norm, targets=ds.train.targets, mask_channel=masked
    )
    validation = None
    monitor = "loss"
    if len(ds.val):
        x_val, y_val, _ = prepare(
            ds.val.inputs, ds.val.masks, depth=depth, normalization=norm, targets=ds.val.targets, mask_channel=masked
        )
        validation = (x_val, y_val)
        monitor = "val_loss"

    keras.utils.set_random_seed(int(config["seed"]))
    model = build_unet(
        depth=depth,
        base_filters=int(config["base_filters"]),
        dilation_rate=int(config["dilation_rate"]),
        upsampling=config["upsampling"],
        name=_keras_name(config["name"]),
    )
    loss = BackgroundLoss(alpha=config["loss_alpha"], theta=config["loss_theta"], eps=config["loss_eps"], smooth_on=config["loss_smooth_on"])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(config["learning_rate"])),
        loss=loss,
        metrics=[MAE(), PSNR(), SSIM(), PSNR(roi=True)],
    )

    initial_epoch = _backup_epoch(backup)
    history = _load_history(history_path, initial_epoch)
    prior = [e[monitor] for e in history["epochs"] if monitor in e]
    best_so_far = min(prior) if prior else None
    if initial_epoch:
        log(f"resuming from {backup} at epoch {initial_epoch} (best {monitor} so far: {best_so_far})")
    writer = HistoryWriter(history_path, history)
    logs.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    backup.mkdir(parents=True, exist_ok=True)
    fp_path.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    best_path = checkpoints / "best.weights.h5"
    callbacks = [
        writer.callback,  # first: an epoch in the history but not in the backup is re-run
        keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False),
        keras.callbacks.ModelCheckpoint(
            str(best_path), monitor=monitor, save_best_only=True, save_weights_only=True, initial_value_threshold=best_so_far
        ),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=int(config["patience"]), restore_best_weights=True),
    ]
    if float(config["lr_plateau_factor"]) < 1:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor, factor=float(config["lr_plateau_factor"]), patience=max(1, int(config["patience"]) // 2)
            )
        )
    callbacks += [
        keras.callbacks.CSVLogger(str(logs / "training.csv"), append=initial_epoch > 0),
    ]
    if config.get("time_limit") is not None:
        callbacks.append(_time_limit_callback(float(config["time_limit"]), log))
    tensorboard = _tensorboard_callback(logs)
    if tensorboard is not None:
        callbacks.append(tensorboard)
    else:
        log("TensorBoard is not installed: logging to logs/training.csv (CSVLogger) only")

    epochs = int(config["epochs"])
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "initial_epoch": initial_epoch, "epochs": epochs}
    steps_per_epoch = math.ceil(len(ds.train) / int(config["batch_size"]))
    log(
        f"training {config['name']}: {len(ds.train)} train / {len(ds.val)} val pairs of {list(data_config.input_size)}, "
        f"{steps_per_epoch} steps per epoch, epochs {initial_epoch}..{epochs}"
    )
    t_fit = time.perf_counter()
    if initial_epoch < epochs:
        model.fit(
            x_train,
            y_train,
            batch_size=int(config["batch_size"]),
            epochs=epochs,
            validation_data=validation,
            callbacks=callbacks,
            shuffle=True,
            verbose=int(config["verbose"]),
        )
    else:
        log(f"nothing to train: the backup is at epoch {initial_epoch} >= --epochs {epochs}")
        if not best_path.exists():
            _load_weights(model, backup / "latest.weights.h5")
    fit_seconds = time.perf_counter() - t_fit
    run["seconds"] = fit_seconds
    run["epochs_run"] = len([e for e in history["epochs"] if e["epoch"] >= initial_epoch])
    history["runs"].append(run)
    writer.write()
    # The final model holds the best weights seen by any run (the checkpoint).
    if best_path.exists():
        _load_weights(model, best_path)

    model_path = out / "model.keras"
    _save_lean(model, model_path)
    val_metrics = split_metrics(model, ds.val, depth=depth, normalization=norm)
    test_metrics = split_metrics(model, ds.test, depth=depth, normalization=norm)
    epochs_done = [e for e in history["epochs"]]
    best_epoch = None
    if prior or epochs_done:
        scored = [e for e in epochs_done if monitor in e]
        if scored:
            best_epoch = int(min(scored, key=lambda e: e[monitor])["epoch"]) + 1  # 1-based, as keras prints
    card = {
        "name": config["name"],
        "architecture": {
            "depth": depth,
            "base_filters": int(config["base_filters"]),
            "dilation_rate": int(config["dilation_rate"]),
            "upsampling": config["upsampling"],
            "parameters": int(model.count_params()),
        },
        "target": target_name(data_config.targets),
        "methods": list(data_config.targets),
        "normalization": norm,
        "input_size": list(data_config.input_size),
        "downsample": data_config.downsample,
        "loss": loss.get_config() | {"name": "BackgroundLoss", "masked": masked},
        "training": {
            "epochs": len(epochs_done),
            "max_epochs": epochs,
            "best_epoch": best_epoch,
            "steps": int(sum(steps_per_epoch for _ in epochs_done)),
            "steps_per_epoch": steps_per_epoch,
            "batch_size": int(config["batch_size"]),
            "learning_rate": float(config["learning_rate"]),
            "optimizer": "Adam",
            "patience": int(config["patience"]),
            "lr_plateau_factor": float(config["lr_plateau_factor"]),
            "monitor": monitor,
            "seconds": float(sum(r.get("seconds", 0.0) for r in history["runs"])),
            "data_seconds": data_seconds,
            "runs": len(history["runs"]),
            "hardware": hardware(),
            "seed": int(config["seed"]),
        },
        "data": ds.summary(),
        "validation": {"normalization": norm, **val_metrics},
        "test": {"normalization": norm, **test_metrics},
        "versions": versions(),
        "config": {k: v for k, v in config.items() if k not in ("out", "cache", "verbose")},
    }
    (out / "model.json").write_text(json.dumps(card, indent=1))
    log(
        f"wrote {model_path} and model.json: validation MAE {val_metrics.get('mae', float('nan')):.3e}, "
        f"PSNR {val_metrics.get('psnr', float('nan')):.2f} dB, SSIM {val_metrics.get('ssim', float('nan')):.4f}, "
        f"centre PSNR {val_metrics.get('psnr_roi', float('nan')):.2f} dB; training {fit_seconds:.0f} s"
    )
    return card


def _save_lean(model, path: Path) -> None:
    """Save an uncompiled copy of the trained model: no optimizer state (Adam's moments
    would triple the file; the loss and optimizer settings are in the card)."""
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    clone.save(str(path))


def _load_weights(model, path: Path) -> None:
    """Load weights saved by ``save_weights`` (they may carry the optimizer's state)."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(str(path))


def _keras_name(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "bgsub_unet"


def main(argv=None) -> int:
    verbose, argv = verbose_requested(sys.argv[1:] if argv is None else argv)
    quiet_libraries(verbose)  # -v: TensorFlow's start-up lines too
    config, fresh = resolve_config(argv)
    fit(config, fresh=fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
