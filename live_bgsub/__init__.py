"""live_bgsub: live background subtraction for muscle fiber X-ray diffraction frames.

Importing the package stays light: the science core (``io``, ``geometry``, ``fold``,
``background``, ``synth``, ``metrics``) is imported on demand, and nothing here imports
bluesky, tiled or keras.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
