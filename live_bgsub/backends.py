"""Which Keras backend runs the U-Net models: the installed one, when nobody chose.

The backends are extras (``pip install 'live_bgsub[tensorflow]'``, the default the
README installs; ``[jax]``; ``[torch]``). Keras takes ``KERAS_BACKEND``, else the
``backend`` of ``~/.keras/keras.json``, else TensorFlow, and fails on its first import
when that is not installed. :func:`choose_keras_backend` (applied when ``live_bgsub`` is
imported, before anything imports Keras) sets ``KERAS_BACKEND`` to JAX or PyTorch only
where neither was chosen and TensorFlow is absent; :data:`NO_BACKEND` is the one line a
model command prints when no backend is installed at all.

>>> from live_bgsub.backends import choose_keras_backend
>>> choose_keras_backend({}, installed=lambda name: name == "jax", config=None)
'jax'
>>> choose_keras_backend({"KERAS_BACKEND": "torch"}, installed=lambda name: True, config=None) is None
True
>>> choose_keras_backend({}, installed=lambda name: name == "tensorflow", config=None) is None
True
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, MutableMapping

__all__ = ["BACKENDS", "NO_BACKEND", "choose_keras_backend", "keras_config_backend"]

#: Keras backends that run the device path, in the order they are preferred.
BACKENDS = ("tensorflow", "jax", "torch")

#: What a model command says when no Keras backend is installed.
NO_BACKEND = (
    "no Keras backend is installed: pip install 'live_bgsub[tensorflow]' (the default), "
    "'live_bgsub[jax]' or 'live_bgsub[torch]'"
)


def keras_config_backend(environ: MutableMapping = os.environ) -> str | None:
    """The ``backend`` of Keras' own configuration file (``$KERAS_HOME/keras.json``), or None."""
    home = environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def choose_keras_backend(
    environ: MutableMapping = os.environ,
    *,
    installed: Callable[[str], bool] | None = None,
    config: str | None | bool = True,
) -> str | None:
    """Set ``environ["KERAS_BACKEND"]`` where Keras' own choice would fail; return what was set.

    Nothing is set when ``KERAS_BACKEND`` is set, Keras' configuration file names a
    backend (``config``: that backend, None for none, True to read the file), or
    TensorFlow is installed; else the first installed of JAX and PyTorch.
    """
    if installed is None:
        installed = _installed
    if environ.get("KERAS_BACKEND"):
        return None
    if config is True:
        config = keras_config_backend(environ)
    if config or installed("tensorflow"):
        return None
    for name in BACKENDS[1:]:
        if installed(name):
            environ["KERAS_BACKEND"] = name
            return name
    return None


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
