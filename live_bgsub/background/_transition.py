"""Transition background: an inner and an outer method blended linearly around a radius."""

from __future__ import annotations

import numpy as np

from ._common import check_optional_real, check_real, finish_background, prepare_fold, radius_grid

__all__ = ["transition", "check_transition_params", "default_transition_radius"]


def default_transition_radius(shape):
    """MuscleX's default transition radius for a fold of ``shape``.

    MuscleX uses ``image_height // 5`` on the centred full image, whose height is
    twice the fold's number of rows: ``(2 * rows) // 5``.
    """
    return float((2 * int(shape[0])) // 5)


def check_transition_params(*, inner, outer, transition_radius, transition_delta,
                            inner_params, outer_params):
    """Validate the transition parameters; return them with nested parameters completed.

    ``inner_params`` / ``outer_params`` come back as full parameter dictionaries of
    their methods (defaults filled in, names, types and values checked).
    """
    from ._registry import get_method, validate_params  # lazy: the registry imports us

    checked = {}
    for side, name, params in (("inner", inner, inner_params), ("outer", outer, outer_params)):
        if not isinstance(name, str):
            raise ValueError(f"{side} must be a background method name (str), got {name!r}")
        method = get_method(name)
        if method.name == "transition":
            raise ValueError(f"{side} must be a method other than 'transition', got {name!r}")
        if params is not None and not isinstance(params, dict):
            raise ValueError(
                f"{side}_params must be a dict of {method.name!r} parameters or None, "
                f"got {params!r}"
            )
        checked[side] = method.name
        try:
            checked[f"{side}_params"] = validate_params(method, params or {})
        except ValueError as err:
            raise ValueError(f"{side}_params: {err}") from None
    checked["transition_radius"] = check_optional_real(
        "transition_radius", transition_radius, minimum=0.0, unit="(px)")
    checked["transition_delta"] = check_real(
        "transition_delta", transition_delta, minimum=0.0, unit="(px)")
    return checked


def transition(fold, mask=None, *, inner="circularly-symmetric", outer="white-top-hat",
               transition_radius=None, transition_delta=60.0, inner_params=None,
               outer_params=None):
    """Blend of two background methods: ``inner`` near the centre, ``outer`` beyond.

    ``background = (1 - w) inner + w outer`` with the weight toward the outer method
    ``w = clip((r - R + delta / 2) / delta, 0, 1)``, ``r = hypot(i, j)``: a linear ramp
    of width ``delta`` centred on the transition radius ``R``.

    Parameters
    ----------
    fold : (M, N) array_like
        Quadrant-folded image, beam centre at index ``[0, 0]``; integer input is
        processed as float32.
    mask : (M, N) array_like of bool, optional
        True where the pixel is valid (None: every finite pixel); passed to both
        methods.
    inner, outer : str, optional
        Registry names of the methods used inside and outside the transition (any
        method but ``'transition'``). Defaults ``'circularly-symmetric'`` and
        ``'white-top-hat'`` (MuscleX's own defaults are 'None' for both, which makes
        the blend a no-op).
    transition_radius : float or None, optional
        Centre ``R`` of the ramp in full-resolution pixels (>= 0). None (default)
        uses MuscleX's rule ``image_height // 5`` with the image height taken as
        twice the fold's rows: ``(2 * M) // 5``.
    transition_delta : float, optional
        Width ``delta`` of the ramp in full-resolution pixels (>= 0; 0 is a hard
        switch at ``R``). Default 60, MuscleX's default.
    inner_params, outer_params : dict or None, optional
        Parameters of the inner and outer methods (names as in their functions,
        lengths in full-resolution pixels); missing ones take their defaults.

    Returns
    -------
    background : (M, N) ndarray
        Same shape and floating dtype as ``fold``; 0 at invalid pixels.

    Notes
    -----
    MuscleX blends its two backgrounds after upsampling them to full resolution, so
    its transition radius and width are full-resolution pixels already (no factor
    2, unlike the methods' own lengths). When a whole fold lies on one side of the
    ramp only that side's method is run.

    Cost: the sum of the two methods' costs, plus one radius and one blend per pixel.

    References
    ----------
    .. [1] J. Jiratrakanvong et al., "MuscleX: data analysis software for fiber
       diffraction patterns from muscle", J. Synchrotron Rad. 31 (2024),
       doi:10.1107/S1600577524006167 (Quadrant Folding, merging settings).

    Examples
    --------
    >>> import numpy as np
    >>> from live_bgsub.background import transition
    >>> fold = np.full((50, 60), 2.0, dtype=np.float32)
    >>> background = transition(fold, inner="none", outer="white-top-hat",
    ...                         transition_radius=30, transition_delta=10,
    ...                         outer_params={"tophat": 5})
    >>> float(background[0, 0]), float(background[0, 30]), float(background[49, 59])
    (0.0, 1.0, 2.0)
    """
    params = check_transition_params(
        inner=inner, outer=outer, transition_radius=transition_radius,
        transition_delta=transition_delta, inner_params=inner_params,
        outer_params=outer_params,
    )
    return _blend(fold, mask, **params)


def _blend(fold, mask, *, inner, outer, transition_radius, transition_delta,
           inner_params, outer_params):
    from ._registry import get_method  # lazy: the registry imports us

    data, valid, out_dtype = prepare_fold(fold, mask)
    centre = (default_transition_radius(data.shape) if transition_radius is None
              else transition_radius)
    radii = radius_grid(data.shape, dtype=data.dtype)
    if transition_delta > 0:
        weight = (radii - (centre - transition_delta / 2.0)) / transition_delta
        np.clip(weight, 0.0, 1.0, out=weight)
    else:
        weight = (radii >= centre).astype(data.dtype)
    weight[~valid] = 0.0
    outer_needed = bool((weight > 0).any())
    inner_needed = bool((weight[valid] < 1).any())
    background = np.zeros(data.shape, dtype=data.dtype)
    if inner_needed:
        inner_bg = get_method(inner).function(data, valid, **inner_params)
        background += (1.0 - weight) * inner_bg
    if outer_needed:
        outer_bg = get_method(outer).function(data, valid, **outer_params)
        background += weight * outer_bg
    return finish_background(background, valid, out_dtype)
