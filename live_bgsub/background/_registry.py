"""Registry of the background methods: names, defaults, parameter checks, downsampling."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from ._common import block_mean, check_int, prepare_fold, upsample_linear
from ._circular import check_circular_params, circularly_symmetric
from ._convex_hull import check_convex_hull_params, convex_hull
from ._roving_window import check_roving_params, roving_window
from ._smoothed import (
    check_boxcar_params,
    check_gaussian_params,
    smoothed_boxcar,
    smoothed_gaussian,
)
from ._tophat import check_tophat_params, white_top_hat
from ._transition import check_transition_params, transition

__all__ = [
    "Method",
    "METHODS",
    "get_method",
    "validate_params",
    "parse_params",
    "subtract_background",
    "no_background",
]


def no_background(fold, mask=None):
    """Zero background: subtraction leaves the fold unchanged.

    Parameters
    ----------
    fold : (M, N) array_like
        Quadrant-folded image.
    mask : (M, N) array_like of bool, optional
        True where the pixel is valid; accepted for a uniform signature.

    Returns
    -------
    background : (M, N) ndarray
        Zeros of the fold's floating dtype (float32 for integer input).

    Notes
    -----
    Cost: one allocation. MuscleX's method 'None'.

    References
    ----------
    .. [1] J. Jiratrakanvong et al., "MuscleX: data analysis software for fiber
       diffraction patterns from muscle", J. Synchrotron Rad. 31 (2024),
       doi:10.1107/S1600577524006167.

    Examples
    --------
    >>> import numpy as np
    >>> from live_bgsub.background import no_background
    >>> no_background(np.ones((2, 3), dtype=np.int16)).dtype
    dtype('float32')
    """
    data, _, out_dtype = prepare_fold(fold, mask)
    return np.zeros(data.shape, dtype=out_dtype)


def _check_no_params():
    return {}


@dataclass(frozen=True)
class Method:
    """One background method of the registry.

    Attributes
    ----------
    name : str
        Registry and CLI name (e.g. ``'white-top-hat'``).
    function : callable
        ``function(fold, mask=None, **params) -> background``.
    defaults : mapping
        Every parameter with its default (lengths in full-resolution pixels). The
        default's type is the parameter's type, except where ``optional_types`` says
        what a ``None`` default stands for.
    length_params : tuple of str
        Parameters that are lengths in pixels (divided by the downsampling factor).
    optional_types : mapping
        For parameters whose default is None: the type of a non-None value
        (``float`` or ``dict``).
    check : callable
        ``check(**params) -> params``: validates values (raises ValueError) and
        returns them normalised.
    nested : tuple of (str, str)
        Pairs ``(method_param, params_param)`` naming another method and its
        parameters (the transition's inner and outer methods).
    """

    name: str
    function: Callable[..., np.ndarray]
    defaults: Mapping[str, Any]
    length_params: tuple[str, ...] = ()
    optional_types: Mapping[str, type] = field(default_factory=dict)
    check: Callable[..., dict] = _check_no_params
    nested: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "optional_types",
                           MappingProxyType(dict(self.optional_types)))

    def param_type(self, name):
        """The type (bool, int, float, str, dict) a value of parameter ``name`` has."""
        default = self.defaults[name]
        if default is None:
            return self.optional_types[name]
        return type(default)


def _registry():
    methods = [
        Method("white-top-hat", white_top_hat, {"tophat": 100.0}, ("tophat",),
               check=check_tophat_params),
        Method("circularly-symmetric", circularly_symmetric,
               {"rmin": 0.0, "radial_bin": 20.0, "cirmin": 0.0, "cirmax": 25.0,
                "smooth": 0.1},
               ("rmin", "radial_bin"), check=check_circular_params),
        Method("roving-window", roving_window,
               {"win_size_x": 30, "win_size_y": 30, "win_sep_x": 20, "win_sep_y": 20,
                "cirmin": 0.0, "cirmax": 25.0},
               ("win_size_x", "win_size_y", "win_sep_x", "win_sep_y"),
               check=check_roving_params),
        Method("smoothed-gaussian", smoothed_gaussian, {"fwhm": 12.25, "cycles": 250},
               ("fwhm",), check=check_gaussian_params),
        Method("smoothed-boxcar", smoothed_boxcar,
               {"boxcar_x": 30, "boxcar_y": 30, "cycles": 250},
               ("boxcar_x", "boxcar_y"), check=check_boxcar_params),
        Method("convex-hull", convex_hull, {"rmin": 0.0, "rmax": None, "degree": 1.0},
               ("rmin", "rmax"), optional_types={"rmax": float},
               check=check_convex_hull_params),
        Method("transition", transition,
               {"inner": "circularly-symmetric", "outer": "white-top-hat",
                "transition_radius": None, "transition_delta": 60.0,
                "inner_params": None, "outer_params": None},
               ("transition_radius", "transition_delta"),
               optional_types={"transition_radius": float, "inner_params": dict,
                               "outer_params": dict},
               check=check_transition_params,
               nested=(("inner", "inner_params"), ("outer", "outer_params"))),
        Method("none", no_background, {}),
    ]
    return MappingProxyType({m.name: m for m in methods})


#: Every background method by registry name.
METHODS: Mapping[str, Method] = _registry()


def get_method(name):
    """Return the :class:`Method` registered as ``name``.

    ``name`` is a registry name (case and ``_``/``-`` are forgiven) or a
    :class:`Method`, returned as is.

    Raises
    ------
    ValueError
        If no method has that name; the message lists the valid names.
    """
    if isinstance(name, Method):
        return name
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    if isinstance(name, str):
        key = name.strip().lower().replace("_", "-")
        if key in METHODS:
            return METHODS[key]
    raise ValueError(
        f"unknown background method {name!r}; valid methods: {', '.join(METHODS)}"
    )


_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a real number",
               str: "a string", dict: "a dict"}


def _check_type(method, name, value):
    kind = method.param_type(name)
    if value is None and method.defaults[name] is None:
        return None
    if kind is bool:
        ok = isinstance(value, (bool, np.bool_))
    elif kind is int and name not in method.length_params:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    elif kind is int:
        # Integer lengths (window sizes, box widths) also take reals, which the method
        # rounds; a downsampled call divides them anyway.
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = _TYPE_WORDS.get(kind, kind.__name__)
        if method.defaults[name] is None:
            expected += " or None"
        raise ValueError(
            f"parameter {name!r} of method {method.name!r} must be {expected}, "
            f"got {value!r}"
        )
    return value


def validate_params(method, params):
    """Check parameter names, types and values; return the full parameter set.

    Parameters
    ----------
    method : str or Method
        Registry name or method.
    params : mapping
        Parameters to set; the others take their defaults.

    Returns
    -------
    dict
        Every parameter of the method, validated and normalised.

    Raises
    ------
    ValueError
        Naming an unknown parameter (and listing the accepted ones), or a value of
        the wrong type or range (and what was expected).
    """
    method = get_method(method)
    for name in params:
        if name not in method.defaults:
            accepted = ", ".join(method.defaults) or "none"
            raise ValueError(
                f"unknown parameter {name!r} for background method {method.name!r}; "
                f"accepted parameters: {accepted}"
            )
    full = dict(method.defaults)
    for name, value in params.items():
        full[name] = _check_type(method, name, value)
    return method.check(**full)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", ""}


def _parse_value(method, name, text):
    kind = method.param_type(name)
    nullable = method.defaults[name] is None
    stripped = text.strip()
    if nullable and stripped.lower() in _NONE:
        return None
    try:
        if kind is bool:
            low = stripped.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(stripped)
        if kind is float:
            return float(stripped)
        if kind is dict:
            value = json.loads(stripped)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return stripped
    except ValueError:
        expected = {
            bool: "a boolean (true/false)", int: "an integer", float: "a real number",
            dict: 'a JSON object such as {"tophat": 80}',
        }.get(kind, kind.__name__)
        if nullable:
            expected += " or none"
        raise ValueError(
            f"parameter {name!r} of method {method.name!r} must be {expected}, "
            f"got {text!r}"
        ) from None


def parse_params(method, items):
    """Convert ``["key=value", ...]`` strings (CLI ``--param``) to typed parameters.

    Each value is converted to the type of the parameter's default (int, float,
    str or bool; a JSON object for the transition's ``inner_params`` /
    ``outer_params``; ``none`` for parameters whose default is None), then the
    whole set is validated.

    Parameters
    ----------
    method : str or Method
        Registry name or method.
    items : iterable of str
        ``"key=value"`` strings.

    Returns
    -------
    dict
        The given parameters only (not the defaults), typed.

    Raises
    ------
    ValueError
        For a malformed item, a repeated or unknown name, or a value that does not
        convert or is out of range; the message names the parameter and what was
        expected.

    Examples
    --------
    >>> from live_bgsub.background import parse_params
    >>> parse_params("roving-window", ["win_size_x=20", "cirmax=30"])
    {'win_size_x': 20, 'cirmax': 30.0}
    """
    method = get_method(method)
    if isinstance(items, str):
        items = [items]
    parsed = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"parameter must be written KEY=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        name = name.strip()
        if name not in method.defaults:
            accepted = ", ".join(method.defaults) or "none"
            raise ValueError(
                f"unknown parameter {name!r} for background method {method.name!r}; "
                f"accepted parameters: {accepted}"
            )
        if name in parsed:
            raise ValueError(f"parameter {name!r} is given more than once")
        parsed[name] = _parse_value(method, name, text)
    validate_params(method, parsed)
    return parsed


def _scaled(method, params, factor):
    """Divide the length parameters (nested methods' too) by ``factor``."""
    out = dict(params)
    for name in method.length_params:
        if out[name] is not None:
            out[name] = out[name] / factor
    for method_param, params_param in method.nested:
        nested = get_method(out[method_param])
        out[params_param] = _scaled(nested, out[params_param], factor)
    return out


def subtract_background(fold, method="white-top-hat", mask=None, *, downsample=1, **params):
    """Estimate the background of a fold with a registered method and subtract it.

    Parameters
    ----------
    fold : (M, N) array_like
        Quadrant-folded image, beam centre at index ``[0, 0]``.
    method : str, optional
        Registry name (see ``METHODS``). Default ``'white-top-hat'``.
    mask : (M, N) array_like of bool, optional
        True where the pixel is valid (None: every finite pixel).
    downsample : int, optional
        Working resolution: with ``N > 1`` the fold is reduced by the mean of the
        valid pixels of each ``N x N`` block (edges padded), the length parameters
        are divided by ``N``, the method runs on the reduced fold and its background
        is interpolated back (bilinear, weighted by the reduced validity) to full
        size. ``downsample=2`` reproduces MuscleX's working resolution. Default 1.
    **params
        The method's parameters (lengths in full-resolution pixels); see
        ``METHODS[method].defaults``.

    Returns
    -------
    background : (M, N) ndarray
        The background, fold's floating dtype (float32 for integer input), 0 at
        invalid pixels.
    corrected : (M, N) ndarray
        ``fold - background``, same dtype, 0 at invalid pixels.

    Raises
    ------
    ValueError
        For an unknown method or parameter, or a value of the wrong type or range.

    Notes
    -----
    Cost: the method's cost on the reduced fold (roughly ``N**2`` to ``N**3``
    times less) plus ``O(M N)`` for the block mean and the interpolation.
    The reduced grid's pixel centres sit at ``N k + (N - 1) / 2`` full-resolution
    pixels, so radii measured on it are off by at most ``(N - 1) / sqrt(2)`` pixels
    (0.7 px for N = 2), as in MuscleX.

    Examples
    --------
    >>> import numpy as np
    >>> from live_bgsub.background import subtract_background
    >>> fold = np.full((120, 100), 10.0, dtype=np.float32)
    >>> fold[40, 50] = 90.0
    >>> background, corrected = subtract_background(fold, "white-top-hat", tophat=20,
    ...                                             downsample=2)
    >>> background.dtype, float(corrected.max()) > 70.0
    (dtype('float32'), True)
    """
    m = get_method(method)
    full = validate_params(m, params)
    factor = check_int("downsample", downsample, minimum=1, unit="(block size, px)")
    data, valid, out_dtype = prepare_fold(fold, mask)
    if factor == 1 or m.name == "none":
        background = m.function(data, valid, **full)
    else:
        small, small_valid = block_mean(data, valid, factor)
        small_background = m.function(small, small_valid, **_scaled(m, full, factor))
        background = upsample_linear(small_background, small_valid, factor, data.shape)
    background = np.where(valid, background, 0).astype(out_dtype, copy=False)
    corrected = np.where(valid, data - background, 0).astype(out_dtype, copy=False)
    return background, corrected
