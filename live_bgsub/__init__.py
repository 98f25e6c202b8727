"""live_bgsub: live background subtraction for muscle fiber X-ray diffraction frames.

Importing the package stays light: the science core (``io``, ``geometry``, ``fold``,
``background``, ``synth``, ``metrics``) is imported on demand, and nothing here imports
bluesky, tiled or keras; it only sets ``KERAS_BACKEND`` where TensorFlow is absent and
no backend was chosen (:mod:`live_bgsub.backends`).
"""

__version__ = "0.1.0"

from . import backends  # noqa: E402

backends.choose_keras_backend()  # Keras' backend: the installed one when none is chosen

__all__ = ["__version__"]
