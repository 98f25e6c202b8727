"""Exceptions raised by live_bgsub (each also subclasses the matching builtin), and the
one error convention of its command lines.

Every command (``live-bgsub COMMAND``, ``python -m training.fit``, ``training.evaluate``,
``training.ship``) reports a usage or connection error (an unknown option or method, a
count below 1, a missing file, a server that cannot be reached or refuses the key) as
one line on stderr, ``PROG: error: WHAT``, naming the value and what was expected, and
exits with status 2 (:data:`EXIT_USAGE`), without a traceback. :class:`ArgumentParser`
makes argparse's own errors follow it; :func:`print_error` prints the line, and
:func:`usage_exit` prints it and exits.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = [
    "EXIT_USAGE",
    "ArgumentParser",
    "GeometryError",
    "ImageReadError",
    "LiveBgsubError",
    "ProcessingError",
    "UsageError",
    "at_least",
    "print_error",
    "usage_exit",
]

#: Exit status of a usage or connection error, in every command (argparse's own).
EXIT_USAGE = 2


class LiveBgsubError(Exception):
    """Base class of every error raised on purpose by live_bgsub."""


class ImageReadError(LiveBgsubError, ValueError):
    """A detector image could not be read or is not a usable 2-D frame."""


class GeometryError(LiveBgsubError, ValueError):
    """The beam centre or equator rotation could not be found or is invalid."""


class ProcessingError(LiveBgsubError, ValueError):
    """A frame could not be processed (for example every pixel is masked)."""


class UsageError(LiveBgsubError, ValueError):
    """A command was given a value it cannot use (a missing file, a wrong setting); the
    message names the value and what was expected."""


def print_error(prog: str, message) -> int:
    """Print ``PROG: error: MESSAGE`` on stderr as one line; return :data:`EXIT_USAGE`.

    A message of several lines is joined with ``"; "``.

    Examples
    --------
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     status = print_error("live-bgsub", "no such image file: 'a.tif'\\n")
    >>> err.getvalue(), status
    ("live-bgsub: error: no such image file: 'a.tif'\\n", 2)
    """
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{prog}: error: {text or 'unknown error'}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def usage_exit(prog: str, message) -> NoReturn:
    """:func:`print_error`, then raise SystemExit with status 2 whose ``str()`` is the
    message (so a caller in Python that catches it still reads what was wrong)."""
    print_error(prog, message)
    exc = SystemExit(str(message))
    exc.code = EXIT_USAGE
    raise exc


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, ``PROG: error: WHAT``, and exit 2
    (no usage block: ``PROG --help`` shows it). Subcommand parsers made with
    ``add_subparsers().add_parser`` are of this class too."""

    def error(self, message):
        if message.startswith("argument "):  # "argument --last: ..." -> "--last: ..."
            message = message[len("argument ") :]
        print_error(self.prog, message)
        sys.exit(EXIT_USAGE)


def at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``.

    Examples
    --------
    >>> at_least(1)("3")
    3
    >>> at_least(1)("-1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an integer >= 1, got -1
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse
