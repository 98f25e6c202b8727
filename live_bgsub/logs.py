"""Quiet libraries: the commands print what they did, not their libraries' start-up logs.

TensorFlow (Keras' default backend here) writes a dozen lines to the process's standard
error when it loads and when XLA compiles: absl's "All log messages before
absl::InitializeLog()", oneDNN's notice (twice), the CPU-instruction notice and XLA's
service and cluster lines. Some are written by C++ at library load, before
``TF_CPP_MIN_LOG_LEVEL`` is read, so only the file descriptor can hold them back.
:func:`quiet_libraries` (called first by every command line of ``live-bgsub`` and
``training``) sets the levels, and captures file descriptor 2 while ``tensorflow`` is
imported: the known notices are dropped, anything else captured is written back to
standard error afterwards, and all of it when the import fails. ``-v`` on a command line
(or ``LIVE_BGSUB_VERBOSE=1``, which child processes inherit) leaves everything as is.

>>> from live_bgsub.logs import NOISE
>>> any(p.search("I0000 00:00:1796380487.998133   18292 port.cc:153] oneDNN custom operations are on.") for p in NOISE)
True
>>> any(p.search("live-bgsub: error: --last: expected an integer >= 1, got -1") for p in NOISE)
False
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

__all__ = ["NOISE", "VERBOSE_ENV", "captured_stderr", "quiet_libraries", "verbose_requested"]

#: Set to 1 for every library log line (the commands' ``-v``); child processes inherit it.
VERBOSE_ENV = "LIVE_BGSUB_VERBOSE"

#: Lines of TensorFlow's start-up that say nothing about the user's work.
NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^[IW]\d{4} [\d:. ]+\s+\d+ \S+\.(cc|h):\d+\] "),  # absl-formatted INFO/WARNING lines
    re.compile(r"^To enable the following instructions: .* in other operations, rebuild TensorFlow"),
)


def verbose_requested(argv) -> tuple[bool, list]:
    """``(verbose, argv without a leading -v/--verbose)``; also true when ``LIVE_BGSUB_VERBOSE=1``."""
    argv = list(argv)
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    while argv[:1] and argv[0] in ("-v", "--verbose"):
        argv.pop(0)
        verbose = True
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    return verbose, argv


def quiet_libraries(verbose: bool = False) -> None:
    """Silence the libraries' start-up logs for this process and its children (see the module)."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING lines (XLA's among them)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices and the like
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport("tensorflow"))


@contextlib.contextmanager
def captured_stderr():
    """Capture file descriptor 2 (C++ and Python alike) into a list of lines (yielded).

    The list is filled when the block ends; the descriptor is restored whatever happens.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first import of one top-level package with standard error captured."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the real finders find the spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)

    def exec_module(self, module):
        lines: list[str] = []
        try:
            with captured_stderr() as lines:
                self.loader.exec_module(module)
        except BaseException:
            if lines:  # the import failed: everything it said
                print("\n".join(lines), file=sys.stderr)
            raise
        kept = [line for line in lines if not any(p.search(line) for p in NOISE)]
        if kept:
            print("\n".join(kept), file=sys.stderr)
