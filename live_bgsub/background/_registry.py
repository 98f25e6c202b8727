"""Registry of the background methods: names, defaults, parameter checks, downsampling."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from ._circular import check_circular_params, circularly_symmetric
from ._common import block_mean, prepare_fold, upsample_linear
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
    "check_fold_params",
    "no_background",
    "ParamRange",
    "MAX_DOWNSAMPLE",
    "MIN_WORKING_SIDE",
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
class ParamRange:
    """The accepted values ``low <= value <= high`` of one method parameter.

    Attributes
    ----------
    low, high : float
        Inclusive bounds, in the parameter's unit (lengths in full-resolution pixels).
    unit : str
        What the value is, for error messages (``"px, disk radius"``).
    fold : str or None
        Which extent of the fold being processed also bounds the value (checked by
        :func:`check_fold_params` when a fold is processed): ``"radius"`` (the fold's
        corner radius ``hypot(rows - 1, cols - 1)``, the largest radius in it),
        ``"side"`` (its longer side), ``"rows"`` or ``"cols"``; None for no bound.
    """

    low: float
    high: float
    unit: str = ""
    fold: str | None = None

    def describe(self):
        """``"from LOW to HIGH (UNIT)"``."""
        return f"from {self.low:g} to {self.high:g}" + (f" ({self.unit})" if self.unit else "")


#: Largest ``downsample``: MuscleX works at 1 to 4; 16 reduces the largest fold
#: (about 2200 px a side) to about 140 px, and the default top-hat radius (100 px) to
#: 6 working pixels: coarser working resolutions resolve no background.
MAX_DOWNSAMPLE = 16

#: Smallest working fold side (px) a ``downsample > 1`` may leave: the methods' default
#: scales (windows of 61 px, a 100 px disk) need a few tens of working pixels.
MIN_WORKING_SIDE = 32

#: The working resolution of a classical method wherever an entry point (``process``,
#: the live callback, ``replay``, the bus) names none: MuscleX's default, and the
#: resolution the shipped U-Nets were trained at (their card's ``downsample``), so
#: ``--method M`` and ``--method model:M`` compare like with like at the defaults.
#: :func:`subtract_background` itself defaults to full resolution (1).
WORKING_DOWNSAMPLE = 2

# Static ranges. Lengths are in full-resolution pixels. The largest real detector is
# the EIGER2 16M (4150 x 4371): with the beam near its centre its folds are at most
# about 2200 px a side, so no radius in a fold exceeds hypot(2200, 2200) = 3111 px.
_MAX_RADIUS = 3200.0
# Lengths below 1 px are below the pixel sampling: the structuring element, window,
# bin or kernel is a single pixel and the method returns the fold (or nothing).
_MIN_LENGTH = 1.0
_PERCENT = ParamRange(0.0, 100.0, "percent")


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
    ranges : mapping of str to ParamRange
        The accepted range of every numeric parameter (full-resolution values),
        checked by :func:`validate_params`; a range's ``fold`` names the fold extent
        that also bounds it when a fold is processed (:func:`check_fold_params`).
    """

    name: str
    function: Callable[..., np.ndarray]
    defaults: Mapping[str, Any]
    length_params: tuple[str, ...] = ()
    optional_types: Mapping[str, type] = field(default_factory=dict)
    check: Callable[..., dict] = _check_no_params
    nested: tuple[tuple[str, str], ...] = ()
    ranges: Mapping[str, ParamRange] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "optional_types",
                           MappingProxyType(dict(self.optional_types)))
        object.__setattr__(self, "ranges", MappingProxyType(dict(self.ranges)))

    def param_type(self, name):
        """The type (bool, int, float, str, dict) a value of parameter ``name`` has."""
        default = self.defaults[name]
        if default is None:
            return self.optional_types[name]
        return type(default)


def _registry():
    R = ParamRange
    methods = [
        Method("white-top-hat", white_top_hat, {"tophat": 100.0}, ("tophat",),
               check=check_tophat_params,
               ranges={
                   # Disk radius: below 1 px the disk is one pixel (background = fold);
                   # at 2000 px it is wider than the largest fold, and beyond the fold's
                   # corner radius the opening is the fold's minimum whatever the radius.
                   "tophat": R(_MIN_LENGTH, 2000.0, "px, disk radius", "radius"),
               }),
        Method("circularly-symmetric", circularly_symmetric,
               {"rmin": 0.0, "radial_bin": 20.0, "cirmin": 0.0, "cirmax": 25.0,
                "smooth": 0.1},
               ("rmin", "radial_bin"), check=check_circular_params,
               ranges={
                   # A radius inside the fold; beyond its corner no pixel is left.
                   "rmin": R(0.0, _MAX_RADIUS, "px, radius", "radius"),
                   # Bins narrower than a pixel hold no pixel near the centre (and their
                   # number explodes); at 1000 px the largest fold has 3 bins, and one
                   # bin past the corner radius is a flat background.
                   "radial_bin": R(_MIN_LENGTH, 1000.0, "px, bin width", "radius"),
                   "cirmin": _PERCENT,
                   "cirmax": _PERCENT,
                   # Residual sum of squares per bin, in counts**2: (1e6 counts, a
                   # 20-bit counter's range)**2; past the bin means' own variance every
                   # value gives the same least-squares spline.
                   "smooth": R(0.0, 1e12, "counts**2 per bin"),
               }),
        Method("roving-window", roving_window,
               {"win_size_x": 30, "win_size_y": 30, "win_sep_x": 20, "win_sep_y": 20,
                "cirmin": 0.0, "cirmax": 25.0},
               ("win_size_x", "win_size_y", "win_sep_x", "win_sep_y"),
               check=check_roving_params,
               ranges={
                   # Half-sizes: 0 is a one-pixel window (no percentile to take); 1000
                   # is a window (2001 px) as wide as the largest fold; past the fold's
                   # side every window holds the whole axis.
                   "win_size_x": R(_MIN_LENGTH, 1000.0, "px, window half-width", "cols"),
                   "win_size_y": R(_MIN_LENGTH, 1000.0, "px, window half-height", "rows"),
                   # Node spacing: past the fold's side only the two end nodes remain.
                   "win_sep_x": R(_MIN_LENGTH, 1000.0, "px, node spacing along x", "cols"),
                   "win_sep_y": R(_MIN_LENGTH, 1000.0, "px, node spacing along y", "rows"),
                   "cirmin": _PERCENT,
                   "cirmax": _PERCENT,
               }),
        Method("smoothed-gaussian", smoothed_gaussian, {"fwhm": 12.25, "cycles": 250},
               ("fwhm",), check=check_gaussian_params,
               ranges={
                   # Below 1 px the kernel barely smooths; at 1000 px (4 sigma = 1700
                   # px each side) it spans the largest fold, past the fold's longer
                   # side the smoothing is the fold's mean.
                   "fwhm": R(_MIN_LENGTH, 1000.0, "px, full width at half maximum", "side"),
                   # 0 cycles is background = fold; 5000 is 20x MuscleX's 250 (the
                   # iteration stops by itself once nothing changes).
                   "cycles": R(1, 5000, "iterations"),
               }),
        Method("smoothed-boxcar", smoothed_boxcar,
               {"boxcar_x": 30, "boxcar_y": 30, "cycles": 250},
               ("boxcar_x", "boxcar_y"), check=check_boxcar_params,
               ranges={
                   # Full widths: a 1 px box is one tap (no smoothing); 2000 px is as
                   # wide as the largest fold; past the fold's side it is the mean.
                   "boxcar_x": R(2.0, 2000.0, "px, box width along x", "cols"),
                   "boxcar_y": R(2.0, 2000.0, "px, box height along y", "rows"),
                   "cycles": R(1, 5000, "iterations"),
               }),
        Method("convex-hull", convex_hull, {"rmin": 0.0, "rmax": None, "degree": 1.0},
               ("rmin", "rmax"), optional_types={"rmax": float},
               check=check_convex_hull_params,
               ranges={
                   "rmin": R(0.0, _MAX_RADIUS, "px, radius", "radius"),
                   # No fold bound: an rmax past the fold's corner is rmax=None.
                   "rmax": R(0.0, _MAX_RADIUS, "px, radius"),
                   # Azimuthal step: MuscleX uses 1 degree; at 0.1 degree a cell is
                   # still 5 px wide at the largest fold's corner (finer cells are empty
                   # and the profiles number 900+); 90 degrees is one profile.
                   "degree": R(0.1, 90.0, "degrees, azimuthal step"),
               }),
        Method("transition", transition,
               {"inner": "circularly-symmetric", "outer": "white-top-hat",
                "transition_radius": None, "transition_delta": 60.0,
                "inner_params": None, "outer_params": None},
               ("transition_radius", "transition_delta"),
               optional_types={"transition_radius": float, "inner_params": dict,
                               "outer_params": dict},
               check=check_transition_params,
               nested=(("inner", "inner_params"), ("outer", "outer_params")),
               ranges={
                   # Past the fold's corner radius only the inner method is left.
                   "transition_radius": R(0.0, _MAX_RADIUS, "px, radius", "radius"),
                   # Ramp width: 0 is a hard switch; 2000 px spans the largest fold.
                   "transition_delta": R(0.0, 2000.0, "px, ramp width"),
               }),
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


def _show(value):
    """A number as one would type it (``1e+09``, ``12.25``, ``30``); repr otherwise."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        v = float(value)
        short = f"{v:.6g}"
        return short if math.isfinite(v) and float(short) == v else repr(v)
    return repr(value)


def _check_range(method, name, value):
    """Raise ValueError when a numeric value lies outside its parameter's range."""
    rng = method.ranges.get(name)
    if rng is None or value is None:
        return
    if not rng.low <= float(value) <= rng.high:  # NaN fails too
        raise ValueError(
            f"parameter {name!r} of method {method.name!r} must be {rng.describe()}, "
            f"got {_show(value)}"
        )


def _check_downsample(downsample):
    """``downsample`` as an int, or ValueError stating the accepted range."""
    if (isinstance(downsample, (bool, np.bool_)) or not isinstance(downsample, numbers.Integral)
            or not 1 <= downsample <= MAX_DOWNSAMPLE):
        raise ValueError(
            f"downsample must be an integer from 1 to {MAX_DOWNSAMPLE} (working "
            f"resolution: blocks of N x N px), got {_show(downsample)}"
        )
    return int(downsample)


def validate_params(method, params, *, downsample=1):
    """Check parameter names, types and values; return the full parameter set.

    Every numeric parameter must lie in its static range (``method.ranges``, in
    full-resolution units); :func:`check_fold_params` further bounds the lengths by
    the fold being processed.

    Parameters
    ----------
    method : str or Method
        Registry name or method.
    params : mapping
        Parameters to set; the others take their defaults.
    downsample : int, optional
        Working resolution to check along (an integer from 1 to ``MAX_DOWNSAMPLE``);
        it is not part of the returned parameters. Default 1.

    Returns
    -------
    dict
        Every parameter of the method, validated and normalised.

    Raises
    ------
    ValueError
        Naming an unknown parameter (and listing the accepted ones), or a value of
        the wrong type or out of range (with the value given and the accepted range).
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
    for name, value in full.items():
        _check_range(method, name, value)
    _check_downsample(downsample)
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


#: What each ``ParamRange.fold`` bounds a value by: (words, extent of a (rows, cols) fold).
_FOLD_EXTENTS = {
    "radius": ("corner radius", lambda rows, cols: math.hypot(rows - 1, cols - 1)),
    "side": ("longer side", lambda rows, cols: float(max(rows, cols))),
    "rows": ("number of rows", lambda rows, cols: float(rows)),
    "cols": ("number of columns", lambda rows, cols: float(cols)),
}


def _check_lengths_on_fold(method, full, shape):
    rows, cols = shape
    for name, rng in method.ranges.items():
        value = full.get(name)
        if rng.fold is None or value is None:
            continue
        words, extent = _FOLD_EXTENTS[rng.fold]
        size = extent(rows, cols)
        limit = min(rng.high, size)
        if value <= limit:
            continue
        if limit < rng.low:
            accepted = f"none for this fold (the range is {rng.describe()})"
        else:
            accepted = f"from {rng.low:g} to {limit:g}" + (f" ({rng.unit})" if rng.unit else "")
        raise ValueError(
            f"parameter {name!r} of method {method.name!r} is {_show(value)}, more than "
            f"the {words} ({size:g} px) of the fold of shape ({rows}, {cols}); "
            f"accepted range: {accepted}"
        )
    for method_param, params_param in method.nested:
        try:
            _check_lengths_on_fold(get_method(full[method_param]), full[params_param], shape)
        except ValueError as err:
            raise ValueError(f"{params_param}: {err}") from None


def _largest_downsample(side):
    """Largest factor whose working fold keeps ``side`` at ``MIN_WORKING_SIDE`` px."""
    fits = [f for f in range(2, MAX_DOWNSAMPLE + 1) if -(-side // f) >= MIN_WORKING_SIDE]
    return max(fits, default=1)


def _check_working_fold(factor, shape):
    rows, cols = shape
    working = (-(-rows // factor), -(-cols // factor))
    if factor == 1 or min(working) >= MIN_WORKING_SIDE:
        return
    raise ValueError(
        f"downsample {factor} leaves a working fold of shape {working} from the fold of "
        f"shape ({rows}, {cols}), less than {MIN_WORKING_SIDE} px a side; accepted "
        f"range for this fold: from 1 to {_largest_downsample(min(rows, cols))}"
    )


def check_fold_params(method, params, fold_shape, *, downsample=1):
    """Check a method's parameters and ``downsample`` against the fold to process.

    On top of :func:`validate_params` (names, types, static ranges): a length
    parameter may not exceed the fold extent its range names (the corner radius
    ``hypot(rows - 1, cols - 1)`` for radii, disk radii and radial bins, the rows or
    columns for window and box sizes along y or x, the longer side for the Gaussian
    width; the transition's inner and outer parameters too), since past it the
    method no longer depends on the value (or has no pixel left); and a
    ``downsample > 1`` must leave a working fold of at least ``MIN_WORKING_SIDE`` px
    a side. :func:`subtract_background` runs this on every fold.

    Parameters
    ----------
    method : str or Method
        Registry name or method.
    params : mapping
        The method's parameters (full-resolution pixels); missing ones take defaults.
    fold_shape : (int, int)
        ``(rows, cols)`` of the full-resolution fold.
    downsample : int, optional
        Working resolution. Default 1.

    Returns
    -------
    dict
        Every parameter of the method, validated and normalised.

    Raises
    ------
    ValueError
        One line naming the parameter (or ``downsample``), the value given, the fold
        shape and the accepted range.

    Examples
    --------
    >>> from live_bgsub.background import check_fold_params
    >>> check_fold_params("white-top-hat", {"tophat": 50}, (570, 550))
    {'tophat': 50.0}
    >>> check_fold_params("white-top-hat", {"tophat": 900}, (570, 550))
    Traceback (most recent call last):
    ...
    ValueError: parameter 'tophat' of method 'white-top-hat' is 900, more than the corner radius (790.672 px) of the fold of shape (570, 550); accepted range: from 1 to 790.672 (px, disk radius)
    """
    m = get_method(method)
    full = validate_params(m, params, downsample=downsample)
    shape = tuple(int(n) for n in fold_shape)
    if len(shape) != 2:
        raise ValueError(f"fold_shape must be (rows, cols), got {fold_shape!r}")
    _check_lengths_on_fold(m, full, shape)
    _check_working_fold(int(downsample), shape)
    return full


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
        size. ``downsample=2`` reproduces MuscleX's working resolution. An integer
        from 1 to ``MAX_DOWNSAMPLE`` (16) that leaves a working fold of at least
        ``MIN_WORKING_SIDE`` (32) px a side. Default 1.
    **params
        The method's parameters (lengths in full-resolution pixels); see
        ``METHODS[method].defaults`` and, for the accepted values,
        ``METHODS[method].ranges`` and :func:`check_fold_params`.

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
        For an unknown method or parameter, a value of the wrong type or out of its
        range, or a length or ``downsample`` too large for this fold
        (:func:`check_fold_params`); one line with the value and the accepted range.

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
    full = validate_params(m, params, downsample=downsample)
    factor = int(downsample)
    data, valid, out_dtype = prepare_fold(fold, mask)
    _check_lengths_on_fold(m, full, data.shape)
    _check_working_fold(factor, data.shape)
    if factor == 1 or m.name == "none":
        background = m.function(data, valid, **full)
    else:
        small, small_valid = block_mean(data, valid, factor)
        small_background = m.function(small, small_valid, **_scaled(m, full, factor))
        background = upsample_linear(small_background, small_valid, factor, data.shape)
    background = np.where(valid, background, 0).astype(out_dtype, copy=False)
    corrected = np.where(valid, data - background, 0).astype(out_dtype, copy=False)
    return background, corrected
