"""Classical background methods of the science core (MuscleX's Quadrant Folding set).

Every method is a pure function of a quadrant-folded image (beam centre at index
``[0, 0]``, axis 1 along the equator, axis 0 along the meridian)::

    background = method(fold, mask=None, **params)

returning the background with the fold's shape and floating dtype (float32 for
integer input) and 0 at invalid pixels (``mask`` False); invalid pixels never
influence the result at valid pixels. Length parameters are in full-resolution
pixels; the defaults reproduce MuscleX's (stated by MuscleX in 2x-downsampled
pixels). ``subtract_background(fold, method, mask, downsample=N, **params)`` runs a
method by registry name, optionally at MuscleX's reduced working resolution, and
returns ``(background, fold - background)``.

Registry names: ``white-top-hat``, ``circularly-symmetric``, ``roving-window``,
``smoothed-gaussian``, ``smoothed-boxcar``, ``convex-hull``, ``transition``, ``none``.
Only numpy and scipy are imported.
"""

from ._circular import circularly_symmetric
from ._convex_hull import convex_hull
from ._registry import (
    MAX_DOWNSAMPLE,
    METHODS,
    MIN_WORKING_SIDE,
    WORKING_DOWNSAMPLE,
    Method,
    ParamRange,
    check_fold_params,
    get_method,
    no_background,
    parse_params,
    subtract_background,
    validate_params,
)
from ._roving_window import roving_window
from ._smoothed import smoothed_boxcar, smoothed_gaussian
from ._tophat import white_top_hat
from ._transition import transition

__all__ = [
    "METHODS",
    "MAX_DOWNSAMPLE",
    "MIN_WORKING_SIDE",
    "WORKING_DOWNSAMPLE",
    "Method",
    "ParamRange",
    "get_method",
    "validate_params",
    "check_fold_params",
    "parse_params",
    "subtract_background",
    "white_top_hat",
    "circularly_symmetric",
    "roving_window",
    "smoothed_gaussian",
    "smoothed_boxcar",
    "convex_hull",
    "transition",
    "no_background",
]
