"""Run a trained U-Net background model on folds: the engine the CLI, callback and replay call.

:class:`BackgroundModel` loads a ``.keras`` file (``safe_mode=True``) and its model card
(``NAME.json`` beside it, see ``docs/model.md``), and turns folds into
``(background, corrected)`` in detector units, like
:func:`live_bgsub.background.subtract_background` does for the classical methods.

The backend is Keras's: ``KERAS_BACKEND`` (``tensorflow`` by default; ``jax`` or
``torch`` on GPU hosts). The same file loads on every backend. Keras is imported when a
model is loaded, never by ``import live_bgsub``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import LiveBgsubError
from .resample import block_mean, upsample_linear

__all__ = [
    "BackgroundModel", "DETECTOR_UNITS", "MAX_FLOOR_FRACTION", "ModelError", "SHIPPED_MODELS", "model_card",
    "shipped_model_path", "MODEL_PREFIX",
]  # fmt: skip

#: Names of the models shipped in ``live_bgsub/weights/`` (their weights, cards and training histories).
SHIPPED_MODELS = ("white-top-hat", "circularly-symmetric", "smoothed-gaussian", "mixed", "synthetic-truth")

#: Method names of the form ``model:NAME`` or ``model:PATH`` select a model.
MODEL_PREFIX = "model:"

#: Floor of a fold (its 1st percentile over its maximum) from which a model that divides
#: by the maximum doubts its output (:meth:`BackgroundModel.domain_doubts`).
MAX_FLOOR_FRACTION = 0.05

#: Normalisations whose outputs go back to detector units at inference
#: (``live_bgsub.model.NORMALIZATIONS``; "independent" needs the target's own maximum).
DETECTOR_UNITS = ("unified", "robust")


class ModelError(LiveBgsubError, ValueError):
    """A model could not be found, loaded or applied."""


def shipped_model_path(name: str) -> Path:
    """Path of a shipped model's ``.keras`` file."""
    return Path(str(resources.files("live_bgsub") / "weights" / f"{name}.keras"))


def model_card(name_or_path) -> dict:
    """A model's card (``docs/model.md``), read without loading the model or Keras.

    ``name_or_path`` as :meth:`BackgroundModel.load`; ``{}`` when the model has no card.

    Raises
    ------
    ModelError
        When the name is unknown or the file is missing.
    """
    card_path = _resolve(name_or_path).with_suffix(".json")
    return json.loads(card_path.read_text()) if card_path.exists() else {}


def _resolve(name_or_path) -> Path:
    text = str(name_or_path)
    if text.startswith(MODEL_PREFIX):
        text = text[len(MODEL_PREFIX) :]
    if text in SHIPPED_MODELS:
        path = shipped_model_path(text)
        if not path.exists():
            raise ModelError(f"shipped model {text!r} is not installed (expected {path})")
        return path
    path = Path(text)
    if path.suffix != ".keras":
        raise ModelError(
            f"unknown model {text!r}: expected one of {', '.join(SHIPPED_MODELS)} or a path to a .keras file"
        )
    if not path.exists():
        raise ModelError(f"model file not found: {str(path)!r}")
    return path


class BackgroundModel:
    """A loaded U-Net background model and its card.

    Parameters
    ----------
    model : keras.Model
        Maps ``(batch, rows, cols, 1)`` normalised folds to corrected folds.
    card : dict
        The model card (``docs/model.md``); ``{}`` when the file has none.
    path : str, optional
        Where the model came from.

    Use :meth:`load` to build one from a shipped name or a ``.keras`` path.
    """

    def __init__(self, model, card: dict | None = None, path: str = "", *, allow_independent: bool = False):
        self.model = model
        self.card = dict(card or {})
        self.path = str(path)
        arch = self.card.get("architecture", {})
        self.depth = int(arch.get("depth", 4))
        self.downsample = int(self.card.get("downsample", 1))
        self.normalization = self.card.get("normalization", "unified")
        if self.normalization not in DETECTOR_UNITS and not allow_independent:
            raise ModelError(
                f"model {self.name!r} uses {self.normalization!r} normalisation: only {' or '.join(map(repr, DETECTOR_UNITS))} "
                "models give a background in detector units"
            )
        self._warm: set = set()

    @property
    def name(self) -> str:
        return self.card.get("name") or Path(self.path).stem or "model"

    @classmethod
    def load(cls, name_or_path, *, mixed_precision: bool = False, allow_independent: bool = False) -> BackgroundModel:
        """Load a shipped model (``"mixed"``, ``"model:mixed"``) or a ``.keras`` file.

        Parameters
        ----------
        name_or_path : str or path-like
            A name in :data:`SHIPPED_MODELS`, optionally prefixed ``model:``, or the path
            of a ``.keras`` file (its card is the ``.json`` file of the same stem).
        mixed_precision : bool, optional
            Run in ``mixed_float16`` (GPU hosts); the weights stay float32.
        allow_independent : bool, optional
            Load an ``independent``-normalisation model (evaluation, which knows the
            targets' scale); :meth:`subtract` still refuses it.

        Raises
        ------
        ModelError
            When the name is unknown, the file is missing or does not load.
        """
        path = _resolve(name_or_path)
        try:
            import keras
        except ModuleNotFoundError as exc:  # keras, or the backend it was told to use
            from .backends import NO_BACKEND

            raise ModelError(f"{NO_BACKEND} ({exc})") from None

        from . import model as _registered  # noqa: F401  (registers the custom objects)

        if mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as exc:  # keras raises many types for a bad file
            raise ModelError(f"{str(path)!r} is not a loadable Keras model ({type(exc).__name__}: {exc})") from exc
        return cls(model, model_card(path), str(path), allow_independent=allow_independent)

    def card_sha256(self) -> str:
        """SHA-256 of the model card file (identifies the model in derived runs)."""
        import hashlib

        card_path = Path(self.path).with_suffix(".json")
        data = card_path.read_bytes() if card_path.exists() else json.dumps(self.card, sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()

    def working_downsample(self, requested=None) -> int:
        """The working resolution this model runs at: its card's ``downsample``.

        ``requested`` (None, or what a caller asked for) must be that value: a model runs
        at the resolution it was trained at and no other.

        Raises
        ------
        ModelError
            ``requested`` is another value (one line naming both).
        """
        if requested is not None and requested != self.downsample:
            raise ModelError(
                f"downsample {requested!r} given, but model:{self.name} works at downsample {self.downsample} "
                f"(its card): leave the option out or give {self.downsample}"
            )
        return self.downsample

    def domain_doubts(self, fold, mask=None) -> list:
        """Why this model's output on ``fold`` is outside what it was trained on (empty: no doubt).

        A model that divides by the fold's maximum ("unified", "independent": the paper's
        normalisation) learned folds whose floor is near 0, as photon-counting detectors
        write them (the development frames: at most 1.7 % of the maximum). A fold whose
        floor (1st percentile of its valid pixels, as :func:`live_bgsub.model.robust_levels`
        takes it) is :data:`MAX_FLOOR_FRACTION` of its maximum or more (a CCD's bias:
        35-55 % on the synthetic CCD families) is not that; a "robust" model takes the
        floor off first and has no such doubt.
        """
        if self.normalization == "robust":
            return []
        from .model.preprocessing import robust_levels

        fold = np.asarray(fold, np.float64)
        valid = np.isfinite(fold) if mask is None else (np.asarray(mask, bool) & np.isfinite(fold))
        if not valid.any():
            return []
        offset, _, scale = robust_levels(np.where(valid, fold, 0)[None], valid[None])
        top = float(offset[0] + scale[0])
        fraction = float(offset[0]) / top if top > 0 else 0.0
        if fraction < MAX_FLOOR_FRACTION:
            return []
        return [
            f"model:{self.name} divides by the fold's maximum ({self.normalization} normalisation, its card) and this "
            f"fold's floor is {offset[0]:.4g} counts, {100 * fraction:.0f} % of its maximum (a detector's bias?): "
            "outside what the model was trained on"
        ]

    def warmup(self, fold_shape, batch_size: int = 1) -> None:
        """Run the model once on zeros of ``fold_shape`` (first-call graph tracing)."""
        folds = np.zeros((batch_size,) + tuple(fold_shape), np.float32)
        self.subtract(folds, np.ones(folds.shape, bool))

    def subtract(self, folds, masks=None, *, batch_size: int = 8):
        """Background and corrected fold(s) in detector units.

        Parameters
        ----------
        folds : ndarray, (rows, cols) or (n, rows, cols)
            Folds in counts (beam centre at ``[0, 0]``).
        masks : ndarray of bool, optional
            Validity (``count > 0``), same shape; default: finite pixels.
        batch_size : int, optional
            Folds per model call.

        Returns
        -------
        background, corrected : ndarray of float32
            Same shape as ``folds``; ``corrected = fold - background``; 0 at invalid
            pixels. At the model's working downsample the background is computed on the
            block-mean fold and upsampled bilinearly, like the classical methods.
        """
        from .model.preprocessing import prepare, restore

        if self.normalization not in DETECTOR_UNITS:
            raise ModelError(f"model {self.name!r} uses {self.normalization!r} normalisation: no detector units")
        folds = np.asarray(folds, dtype=np.float32)
        single = folds.ndim == 2
        if single:
            folds = folds[None]
        if folds.ndim != 3:
            raise ModelError(f"expected a fold (rows, cols) or folds (n, rows, cols), got shape {folds.shape}")
        if masks is None:
            masks = np.isfinite(folds)
        else:
            masks = np.broadcast_to(np.asarray(masks, bool), folds.shape)
        folds = np.where(masks, folds, 0).astype(np.float32)
        f = self.downsample
        if f > 1:
            pairs = [block_mean(fold, mask, f) for fold, mask in zip(folds, masks)]
            work = np.stack([p[0] for p in pairs])
            work_masks = np.stack([p[1] for p in pairs])
        else:
            work, work_masks = folds, masks
        x, _, info = prepare(work, work_masks, depth=self.depth, normalization=self.normalization)
        # predict_on_batch runs Keras's traced predict function (3-4x faster than an
        # eager call for one fold on TensorFlow), on every backend.
        out = np.concatenate(
            [np.asarray(self.model.predict_on_batch(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        )
        corrected_small = restore(out, info)
        background_small = np.where(work_masks, work - corrected_small, 0).astype(np.float32)
        if f > 1:
            background = np.stack(
                [upsample_linear(b, m, f, folds.shape[1:]) for b, m in zip(background_small, work_masks)]
            )
        else:
            background = background_small
        background = np.where(masks, background, 0).astype(np.float32)
        corrected = np.where(masks, folds - background, 0).astype(np.float32)
        if single:
            return background[0], corrected[0]
        return background, corrected
