"""Helpers for the servers and child processes that live_bgsub starts and waits on.

- :func:`free_port`: a TCP port free right now, for a server started next.
- :func:`wait_until`: poll a condition until it holds or a stated deadline passes.
- :func:`watch_parent`: in a child process, stop when the parent dies (even by SIGKILL).

Only the standard library is used, so a child interpreter imports this cheaply.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DeadlinePassed", "free_port", "wait_until", "watch_parent"]

T = TypeVar("T")


class DeadlinePassed(TimeoutError):
    """:func:`wait_until` gave up: the condition did not hold in time.

    A TimeoutError of its own, so that callers tell it from one the predicate raised.
    """


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (bind to port 0, then close).

    Another process can take the port before the caller binds it; servers started on
    it retry with a new one when their bind fails.

    Parameters
    ----------
    host : str, optional
        Interface address; IPv6 when it contains ``:``.

    Returns
    -------
    int

    Examples
    --------
    >>> 0 < free_port() < 65536
    True
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, *, what: str = "a condition") -> T:
    """Call ``predicate()`` until it returns something true, and return that value.

    The predicate is called at once, then every ``interval`` seconds; an exception it
    raises (a child process that exited, say) ends the wait.

    Parameters
    ----------
    predicate : callable
        Called without arguments.
    timeout : float
        Seconds; the predicate is called once more when they have passed.
    interval : float, optional
        Seconds between calls.
    what : str, optional
        What is waited for, named by the error.

    Returns
    -------
    object
        The predicate's first true value.

    Raises
    ------
    DeadlinePassed
        A TimeoutError, ``not within TIMEOUT s: WHAT``, when the predicate stayed false.

    Examples
    --------
    >>> calls = []
    >>> wait_until(lambda: calls.append(1) or len(calls) >= 3, timeout=10, interval=0)
    True
    >>> wait_until(lambda: False, timeout=0, what="the impossible")
    Traceback (most recent call last):
    ...
    live_bgsub.procutil.DeadlinePassed: not within 0 s: the impossible
    """
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed(f"not within {timeout:g} s: {what}")
        time.sleep(min(interval, remaining))


def watch_parent(on_parent_exit: Callable[[], object], *, grace_s: float = 10.0) -> threading.Thread:
    """Stop this (child) process when its parent dies; start the watch in a daemon thread.

    The parent starts the child with ``stdin=subprocess.PIPE`` and keeps the write end
    open, without writing. End-of-file on stdin then means the parent closed it or died
    (even by SIGKILL): the thread calls ``on_parent_exit()`` (ask the process to stop:
    a signal to itself, a task to cancel), waits ``grace_s`` seconds for it to end and
    then ends it with ``os._exit(1)``.

    Parameters
    ----------
    on_parent_exit : callable
        Called once, from the watchdog thread.
    grace_s : float, optional
        Seconds left to a graceful stop.

    Returns
    -------
    threading.Thread
        The started watchdog thread (``parent-watchdog``).
    """

    def watch() -> None:
        try:
            while os.read(0, 65536):  # Unbuffered: no lock held at interpreter exit.
                pass
        except OSError:
            pass
        on_parent_exit()
        time.sleep(grace_s)  # A grace period, then the process ends whatever it is doing.
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread
