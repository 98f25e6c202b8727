"""What to do with each frame: the processing options every entry point shares.

One :class:`ProcessingOptions` (method, its parameters, working resolution) is what the
command lines (``replay``, ``serve``, ``compose``), the :class:`~live_bgsub.beamline.BeamlineConfig`
and the live callback's keywords are made of; :func:`processing_arguments` is the
argparse parent that declares ``--method``, ``--param`` and ``--downsample`` once, and
:func:`add_tiled_arguments` declares where the runs are (``--tiled``, ``--api-key``,
``--catalog``) for every command that talks to Tiled.

>>> from live_bgsub.options import ProcessingOptions
>>> ProcessingOptions.parse("white-top-hat", ["tophat=12"]).callback_kwargs()
{'method': 'white-top-hat', 'params': {'tophat': 12.0}, 'downsample': 2}
>>> ProcessingOptions("model:white-top-hat").callback_kwargs()
{'method': 'model:white-top-hat', 'params': {}, 'downsample': None}
>>> ProcessingOptions.parse("model:white-top-hat", ["tophat=12"])
Traceback (most recent call last):
...
ValueError: --param: a model takes no parameters, got ['tophat=12'] for model:white-top-hat
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

__all__ = ["DEFAULT_METHOD", "ProcessingOptions", "add_processing_arguments", "add_tiled_arguments", "processing_arguments"]

#: The processing of every entry point that names none (the demo runs a U-Net instead).
DEFAULT_METHOD = "white-top-hat"


@dataclass(frozen=True)
class ProcessingOptions:
    """A processing step as a user names it.

    Parameters
    ----------
    method : str
        A classical method (``live-bgsub process --list-methods``), ``model:NAME`` (a
        shipped U-Net) or ``model:PATH`` (a ``.keras`` file).
    params : dict
        Parameters of a classical method (none for a model).
    downsample : int or None
        Working resolution (1: full resolution). Default: the method's own,
        :data:`live_bgsub.background.WORKING_DOWNSAMPLE` (2, MuscleX's) for a classical
        method; for a model None, its card's (a model accepts only its own: its own
        value given is stored as None, so that both spellings are one processing).
    """

    method: str = DEFAULT_METHOD
    params: dict = field(default_factory=dict)
    downsample: int | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a method name or model:NAME, got {self.method!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a mapping of parameter names to values, got {self.params!r}")
        if self.downsample is not None and (
            isinstance(self.downsample, bool) or int(self.downsample) != self.downsample or self.downsample < 1
        ):
            raise ValueError(f"downsample must be an integer >= 1, got {self.downsample!r}")
        if self.is_model and self.params:
            raise ValueError(f"a model takes no parameters, got {self.params!r} for {self.method}")
        # One spelling of one processing (a bus job's key is its processing): a classical
        # method's default resolution is written out; a model's own is left out.
        if self.downsample is None and not self.is_model:
            from .background import WORKING_DOWNSAMPLE

            object.__setattr__(self, "downsample", WORKING_DOWNSAMPLE)
        elif self.downsample is not None and self.is_model:
            from .inference import ModelError, model_card

            try:
                own = int(model_card(self.method).get("downsample", 1))
            except (ModelError, OSError, ValueError):
                own = None  # not here (another host's path) or not a model: step() says so
            if own == self.downsample:
                object.__setattr__(self, "downsample", None)

    @property
    def is_model(self) -> bool:
        from .inference import MODEL_PREFIX

        return self.method.startswith(MODEL_PREFIX)

    @classmethod
    def parse(cls, method: str = DEFAULT_METHOD, param_args=(), downsample: int | None = None) -> ProcessingOptions:
        """From command-line values: ``KEY=VALUE`` strings checked against the method's parameters.

        Raises
        ------
        ValueError
            An unknown method, an unknown or malformed parameter, or parameters for a model.
        """
        param_args = list(param_args or [])
        if cls(method, {}, downsample).is_model:
            if param_args:
                raise ValueError(f"--param: a model takes no parameters, got {param_args} for {method}")
            return cls(method, {}, downsample)
        from .background import parse_params

        return cls(method, parse_params(method, param_args), downsample)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProcessingOptions:
        """From the namespace of a parser that has :func:`processing_arguments` as a parent."""
        return cls.parse(args.method, args.param, args.downsample)

    def step(self):
        """The :class:`~live_bgsub.engine.ProcessingStep` (loads a model; checks the parameters)."""
        from .engine import make_step

        return make_step(self.method, self.params, downsample=self.downsample)

    def callback_kwargs(self) -> dict:
        """Keywords of :class:`~live_bgsub.callback.LiveBackgroundSubtraction` and the bus's
        composer; also the plain ``processing`` values a bus message carries."""
        return {"method": self.method, "params": dict(self.params), "downsample": self.downsample}



def add_processing_arguments(parser: argparse.ArgumentParser, default_method: str = DEFAULT_METHOD,
                             *, method_help: str | None = None) -> argparse.ArgumentParser:
    """Declare ``--method``, ``--param`` (repeatable) and ``--downsample`` on ``parser``
    (a group "processing"); read them back with :meth:`ProcessingOptions.from_args`."""
    from .errors import at_least

    group = parser.add_argument_group("processing")
    group.add_argument(
        "--method", default=default_method,
        help=method_help or f"classical method, model:NAME or model:PATH (default {default_method})",
    )  # fmt: skip
    group.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="classical method parameter (repeatable; lengths in full-resolution pixels)")
    group.add_argument("--downsample", type=at_least(1), default=None, metavar="N",
                       help="working resolution 1/N (default: a model's own, 2 for a classical method as in MuscleX)")
    return parser


def processing_arguments(default_method: str = DEFAULT_METHOD, *, method_help: str | None = None) -> argparse.ArgumentParser:
    """An argparse parent with :func:`add_processing_arguments`'s options:
    ``ArgumentParser(parents=[processing_arguments()])``."""
    return add_processing_arguments(argparse.ArgumentParser(add_help=False), default_method, method_help=method_help)


def add_tiled_arguments(parser: argparse.ArgumentParser, *, tiled_help: str) -> argparse.ArgumentParser:
    """Declare ``--tiled URI`` (``tiled_help`` says what it is for and its default),
    ``--api-key`` (default ``$TILED_API_KEY``) and ``--catalog`` (default ``runs``)."""
    group = parser.add_argument_group("Tiled")
    group.add_argument("--tiled", metavar="URI", help=tiled_help)
    group.add_argument("--api-key", help="Tiled API key (default: $TILED_API_KEY)")
    group.add_argument("--catalog", default="runs", help="catalog path on the Tiled server (default: runs)")
    return parser
