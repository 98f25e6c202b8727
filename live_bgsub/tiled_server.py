"""Run a local Tiled server in a subprocess and connect to its catalog of Bluesky runs.

:class:`EmbeddedTiledServer` writes a Tiled configuration file into a directory and
serves it with ``python -m tiled serve config`` in a child process, so the server's
work never competes for the GIL with the RunEngine. :func:`connect` returns the
client of a container with the ``CatalogOfBlueskyRuns`` spec (version 3.0), the node
that ``bluesky_tiled_plugins.TiledWriter`` writes runs into and from which
``client[uid]`` reads them back as ``BlueskyRun`` clients.

The default storage is SQLite (catalog and event tables). SQLite and DuckDB table
stores fail when two writers append at once (HTTP 500 "database is locked", or a
crashed server with DuckDB), so feed one such server through a single writer
(:class:`live_bgsub.sinks.tiled.TiledPublisher`). A PostgreSQL-backed server
(``catalog_uri="postgresql+asyncpg://..."``, ``table_uri="postgresql://..."``)
accepts concurrent writers.

Nothing here imports tiled at module import; the client is imported by
:func:`connect`, and the server only ever runs in the child process.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from live_bgsub.errors import LiveBgsubError
from live_bgsub.procutil import DeadlinePassed, free_port, wait_until

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CATALOG_SPEC",
    "CATALOG_SPEC_VERSION",
    "EmbeddedTiledServer",
    "TiledServerError",
    "catalog_segments",
    "connect",
    "render_config",
    "temporary_postgres_database",
]

#: Spec (name, version) of the container that holds Bluesky runs written by TiledWriter.
CATALOG_SPEC = "CatalogOfBlueskyRuns"
CATALOG_SPEC_VERSION = "3.0"

#: Server-side exporter behind ``BlueskyRun.documents()`` (media type application/json-seq).
JSON_SEQ_EXPORTER = "bluesky_tiled_plugins.exporters:json_seq_exporter"

#: URI schemes tiled 0.2.20 accepts for the catalog database and for the SQL table store.
_CATALOG_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg"})
_TABLE_SCHEMES = frozenset({"sqlite", "duckdb", "postgresql"})

#: What to install for a PostgreSQL-backed server (asyncpg, psycopg).
POSTGRES_EXTRA = "pip install 'live_bgsub[postgres]'"

_LOG_TAIL_CHARS = 4000
_PORT_ATTEMPTS = 3

# Code run by the child interpreter: a watchdog thread reads stdin, a pipe whose write
# end only the parent holds; end-of-file means the parent died (even by SIGKILL), and
# the server is asked to stop (SIGTERM), then forced out. Then tiled's own CLI runs.
_BOOTSTRAP = """\
import os, signal, sys
from live_bgsub.procutil import watch_parent

watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
from tiled.commandline.main import main
# The key travels in the environment (not in the visible command line); passing it
# as --api-key here also keeps tiled from printing a key in its startup banner.
sys.argv = ["tiled", *sys.argv[1:], "--api-key", os.environ["TILED_SINGLE_USER_API_KEY"]]
main()
"""


class TiledServerError(LiveBgsubError, RuntimeError):
    """The embedded Tiled server could not be started or reached."""


def _import_postgres_driver(module: str, needed_by: str):
    """Import a PostgreSQL driver of the ``[postgres]`` extra, or fail in one line naming it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        raise ModuleNotFoundError(f"{needed_by} needs {module}, which is not installed: {POSTGRES_EXTRA}", name=module) from None


def _quote(value: str) -> str:
    """Quote a string for YAML (a JSON string is a valid YAML scalar)."""
    import json

    return json.dumps(str(value))


def render_config(
    *,
    catalog_uri: str,
    writable_storage: Iterable[str],
    readable_storage: Iterable[str],
    api_key: str,
) -> str:
    """Return the text of a Tiled server configuration (YAML) for a run catalog.

    Parameters
    ----------
    catalog_uri : str
        SQLAlchemy URI of the catalog database (``sqlite:///...`` or
        ``postgresql+asyncpg://...``); it is created if missing.
    writable_storage : iterable of str
        Where new data goes: a directory (arrays) and a SQL table store URI
        (``sqlite:///FILE``, ``duckdb:///FILE`` or ``postgresql://...``).
    readable_storage : iterable of str
        Directories the server may read registered external files from.
    api_key : str
        The single-user API key (alphanumeric).

    Returns
    -------
    str
        The configuration; keys follow ``tiled/config_schemas/service_configuration.yml``.
    """
    lines = [
        "# Written by live_bgsub.tiled_server.EmbeddedTiledServer.",
        "trees:",
        '  - path: "/"',
        "    tree: catalog",
        "    args:",
        f"      uri: {_quote(catalog_uri)}",
        "      init_if_not_exists: true",
        "      writable_storage:",
        *(f"        - {_quote(item)}" for item in writable_storage),
    ]
    readable = list(readable_storage)
    if readable:
        lines += ["      readable_storage:", *(f"        - {_quote(item)}" for item in readable)]
    lines += [
        "authentication:",
        f"  single_user_api_key: {_quote(api_key)}",
        "  allow_anonymous_access: false",
        "media_types:",
        "  BlueskyRun:",
        f"    application/json-seq: {_quote(JSON_SEQ_EXPORTER)}",
        "",
    ]
    return "\n".join(lines)


def _tail(path: Path, n_chars: int = _LOG_TAIL_CHARS, *, start: int = 0) -> str:
    """Return the last ``n_chars`` characters of a text file after byte ``start``."""
    try:
        with open(path, "rb") as file:
            file.seek(start)
            text = file.read().decode(errors="replace")
    except OSError:
        return ""
    return text[-n_chars:]


def _redact(text: str, secret: str) -> str:
    """Hide a secret (API key, password) inside a text meant for an error message."""
    return text.replace(secret, "<redacted>") if secret else text


def _redact_uri(uri: str) -> str:
    """Hide the password of a database URI (``scheme://user:password@host``)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", uri)


def _child_env() -> dict[str, str]:
    """Environment for the server: without TILED_* variables, which override its config."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TILED_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class EmbeddedTiledServer:
    """A local Tiled server, run as a subprocess, serving a catalog of Bluesky runs.

    The server is configured by a YAML file written into ``directory``: a catalog
    database (SQLite ``directory/catalog.db`` unless ``catalog_uri`` is given),
    writable storage ``directory/data`` (arrays) plus a SQL table store for event
    columns (SQLite ``directory/tables.sqlite`` unless ``table_uri`` is given),
    read access to ``readable_storage`` (directories of external HDF5 files that runs
    reference through StreamResource documents), the json-seq exporter that
    ``BlueskyRun.documents()`` needs, and single-user API-key authentication.

    Parameters
    ----------
    directory : str or path-like
        Folder for the configuration, the SQLite files, array data and the log;
        created if missing. Data written there persist after :meth:`stop`.
    readable_storage : iterable of path-like, optional
        Directories whose files the server may serve (external frames).
    api_key : str, optional
        Alphanumeric single-user API key; a random one (``secrets.token_hex(32)``) by
        default.
    port : int, optional
        TCP port; 0 (default) picks a free one.
    host : str, optional
        Interface to bind, ``"127.0.0.1"`` by default (local only).
    catalog_uri : str, optional
        Catalog database URI, e.g. ``"postgresql+asyncpg://user@host:5432/db"``
        (PostgreSQL needs asyncpg: the ``[postgres]`` extra).
    table_uri : str, optional
        SQL table store URI, e.g. ``"postgresql://user@host:5432/db"`` (the ADBC
        driver takes the plain ``postgresql://`` scheme), or ``"duckdb:///FILE"``.
    startup_timeout : float, optional
        Seconds :meth:`start` waits for the server to answer ``/healthz``.

    Attributes
    ----------
    uri : str
        ``http://HOST:PORT/api/v1`` (without the key); set by :meth:`start`.
    api_key, directory, config_path, log_path, port, host
        As configured; ``log_path`` is ``directory/server.log`` (server stdout and
        stderr).

    Notes
    -----
    Starting costs about 2-4 s (a child interpreter imports the server stack and
    initialises the catalog). :meth:`start` after :meth:`stop`, or after the process
    died (a crash, SIGKILL), serves the same directory (catalog, tables, data) again,
    on the same port when it is still free, so clients keep their URI. The child stops when :meth:`stop` is called, when the
    object is used as a context manager and the block ends, at interpreter exit
    (``atexit``), and also when the parent process dies without cleaning up: the
    child watches a pipe only the parent holds and stops itself on end-of-file.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp, EmbeddedTiledServer(tmp) as server:
    ...     runs = connect(server.uri, api_key=server.api_key)
    ...     print(len(runs))
    0
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        readable_storage: Iterable[str | os.PathLike] = (),
        api_key: str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        catalog_uri: str | None = None,
        table_uri: str | None = None,
        startup_timeout: float = 60,
    ):
        if api_key is not None and not (isinstance(api_key, str) and api_key.isalnum()):
            raise ValueError(
                f"api_key must be a non-empty alphanumeric string (Tiled's rule), got {api_key!r}"
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535 (0 picks a free one), got {port!r}")
        if not startup_timeout > 0:
            raise ValueError(f"startup_timeout must be a positive number of seconds, got {startup_timeout!r}")
        for label, uri, schemes in (
            ("catalog_uri", catalog_uri, _CATALOG_SCHEMES),
            ("table_uri", table_uri, _TABLE_SCHEMES),
        ):
            if uri is not None and urllib.parse.urlsplit(str(uri)).scheme not in schemes:
                raise ValueError(
                    f"{label} must be a URI with a scheme in {sorted(schemes)}, got {_redact_uri(str(uri))!r}"
                )
        if catalog_uri is not None and str(catalog_uri).startswith("postgresql"):
            # The server (a child process) reaches a PostgreSQL catalog through asyncpg.
            _import_postgres_driver("asyncpg", "a PostgreSQL catalog_uri")
        if isinstance(readable_storage, (str, os.PathLike)):
            raise TypeError(
                f"readable_storage must be a list of directories, got the single value {readable_storage!r}"
            )
        self.directory = Path(directory).resolve()
        self.readable_storage = [Path(item).resolve() for item in readable_storage]
        self.api_key = api_key or secrets.token_hex(32)
        self.host = host
        self.port = port
        self._requested_port = port
        self.catalog_uri = catalog_uri or f"sqlite:///{self.directory / 'catalog.db'}"
        self.table_uri = table_uri or f"sqlite:///{self.directory / 'tables.sqlite'}"
        self.startup_timeout = float(startup_timeout)
        self.config_path = self.directory / "config.yml"
        self.log_path = self.directory / "server.log"
        self.uri: str | None = None
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._log_offset = 0
        self._atexit_ref: Any = None

    def __repr__(self) -> str:
        state = f"running at {self.uri}" if self.running else "stopped"
        return f"<{type(self).__name__} {state}, directory={str(self.directory)!r}>"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when it is not running."""
        return self._process.pid if self.running else None

    def write_config(self) -> Path:
        """Create ``directory`` (and ``directory/data``) and write the configuration file.

        Returns
        -------
        pathlib.Path
            ``config_path``; the file is readable by its owner only (it holds the key).
        """
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        text = render_config(
            catalog_uri=self.catalog_uri,
            writable_storage=[str(data), self.table_uri],
            readable_storage=[str(path) for path in self.readable_storage],
            api_key=self.api_key,
        )
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        return self.config_path

    def start(self) -> Self:
        """Start the server and wait until it answers ``/healthz``.

        Returns
        -------
        EmbeddedTiledServer
            ``self``, so that ``server = EmbeddedTiledServer(...).start()`` works.

        Raises
        ------
        TiledServerError
            When the process exits or does not become healthy within
            ``startup_timeout`` seconds; the message ends with the tail of
            ``log_path``. The process is killed first.
        """
        if self.running:
            return self
        if self._process is not None:  # It died on its own (crash, SIGKILL): clean up, start again.
            self._close_pipes(self._process)
            self._process = None
        if self._atexit_ref is not None:
            atexit.unregister(self._atexit_ref)
            self._atexit_ref = None
        self.write_config()
        # Started before (then stopped, or died): keep the port, so that the URI that
        # clients hold stays valid; a free one only if it is taken meanwhile.
        previous_port = self.port if self.uri is not None else 0
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = self._requested_port or previous_port or free_port(self.host)
            try:
                self._launch()
                self._wait_healthy()
            except BaseException as error:  # Also KeyboardInterrupt: never leave it running.
                self._kill()
                # A port picked with port=0 can be taken by someone else between our
                # probe and the server's bind: pick another one and try again.
                port_taken = "address already in use" in str(error).lower()
                if (
                    isinstance(error, TiledServerError)
                    and port_taken
                    and self._requested_port == 0
                    and attempt < _PORT_ATTEMPTS
                ):
                    previous_port = 0
                    continue
                raise
            break
        self._atexit_ref = _register_atexit(self)
        return self

    def _launch(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.uri = f"http://{host}:{self.port}/api/v1"
        env = _child_env()
        # Read by the bootstrap (see _BOOTSTRAP), which hands it to tiled's CLI.
        env["TILED_SINGLE_USER_API_KEY"] = self.api_key
        command = [
            sys.executable, "-c", _BOOTSTRAP,
            "serve", "config", str(self.config_path),
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        # Kept open while the server runs; closed by stop() or _kill().
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        self._log_offset = self._log_file.tell()
        self._log_file.write(f"\n==== live_bgsub: starting tiled on {self.uri} ====\n".encode())
        self._log_file.flush()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=env,
        )

    def _wait_healthy(self) -> None:
        url = self.uri.removesuffix("/api/v1") + "/healthz"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last_error: Exception | None = None

        def healthy() -> bool:
            nonlocal last_error
            try:
                with opener.open(url, timeout=1.0) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError) as error:
                last_error = error
            code = self._process.poll()
            if code is not None:
                self._fail(f"the Tiled server process exited with code {code} before becoming ready")
            return False

        try:
            wait_until(healthy, self.startup_timeout, interval=0.1, what=f"the Tiled server answering {url}")
        except DeadlinePassed:
            self._fail(
                f"the Tiled server did not answer {url} within {self.startup_timeout:g} s "
                f"(last error: {last_error!r})"
            )

    def _fail(self, reason: str) -> None:
        self._kill()
        log = _redact(_tail(self.log_path, start=self._log_offset), self.api_key)
        raise TiledServerError(
            f"{reason}; config {self.config_path}, catalog {_redact_uri(self.catalog_uri)}, "
            f"table store {_redact_uri(self.table_uri)}. Tail of {self.log_path}:\n{log}"
        )

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._close_pipes(process)

    def _close_pipes(self, process: subprocess.Popen | None) -> None:
        if process is not None and process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout: float = 10) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.

        Safe to call more than once. The directory and its data are kept.
        """
        process, self._process = self._process, None
        if self._atexit_ref is not None:
            atexit.unregister(self._atexit_ref)
            self._atexit_ref = None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_pipes(process)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self):
        # Last resort; stop() (or the context manager) is the supported way.
        with contextlib.suppress(Exception):
            if self._process is not None and self._process.poll() is None:
                self._process.kill()


def _register_atexit(server: EmbeddedTiledServer):
    """Stop ``server`` at interpreter exit without keeping it alive (weak reference)."""
    ref = weakref.ref(server)

    def stop_at_exit() -> None:
        live = ref()
        if live is not None:
            live.stop(timeout=5)

    atexit.register(stop_at_exit)
    return stop_at_exit


def connect(
    uri: str,
    *,
    api_key: str | None = None,
    catalog: str = "runs",
    create: bool = True,
):
    """Return the client of the run catalog at path ``catalog`` on a Tiled server.

    Parameters
    ----------
    uri : str
        Server URI, e.g. ``EmbeddedTiledServer.uri`` (``http://HOST:PORT/api/v1``).
    api_key : str, optional
        API key; defaults to the environment variable ``TILED_API_KEY``.
    catalog : str, optional
        Path of the container, ``"runs"`` by default; ``"a/b"`` nests.
    create : bool, optional
        Create the container (spec ``CatalogOfBlueskyRuns`` version 3.0, and plain
        parent containers) when it is missing. With False a missing path raises
        KeyError.

    Returns
    -------
    bluesky_tiled_plugins.CatalogOfBlueskyRuns
        ``TiledWriter(client)`` writes runs into it, ``client[uid]`` reads one back
        as a ``BlueskyRun`` client (the plugin registers these client classes for
        their specs through the ``tiled.special_client`` entry point).

    Raises
    ------
    ValueError
        When ``uri`` is not an ``http(s)://`` URI, when ``catalog`` is not a path of
        names (letters, digits, ``_ . -``; no ``.`` or ``..``), or when the node at
        ``catalog`` exists but lacks the ``CatalogOfBlueskyRuns`` spec (a plain
        container does not behave as a run catalog).
    ConnectionError
        When the server cannot be reached or refuses the API key (one line; the
        tiled client's own retries, up to ``TILED_RETRY_TIMEOUT``, are not waited for
        when nothing listens).
    KeyError
        When it is missing and ``create`` is False.
    """
    import httpx
    from tiled.client import from_uri
    from tiled.structures.core import Spec

    if api_key is None:
        api_key = os.environ.get("TILED_API_KEY") or None
    segments = catalog_segments(catalog)
    parts = urllib.parse.urlsplit(str(uri))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the Tiled URI must look like http://HOST:PORT/api/v1, got {uri!r}")
    try:  # one quick request: a refused connection fails now, not after the client's retries
        httpx.get(uri, timeout=10).close()
        node = from_uri(uri, api_key=api_key)
    except httpx.TransportError as exc:
        raise ConnectionError(f"the Tiled server at {uri} cannot be reached: {type(exc).__name__}: {exc}") from None
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        why = "refused the API key" if code in (401, 403) else "answered with an error"
        raise ConnectionError(f"the Tiled server at {uri} {why} (HTTP {code} {exc.response.reason_phrase})") from None
    for depth, segment in enumerate(segments):
        try:
            node = node[segment]
            continue
        except KeyError:
            if not create:
                path = "/".join(segments[: depth + 1])
                raise KeyError(f"no container at {path!r} on {uri} (connect(..., create=False))") from None
        last = depth == len(segments) - 1
        specs = [Spec(CATALOG_SPEC, version=CATALOG_SPEC_VERSION)] if last else []
        node.create_container(key=segment, specs=specs)
        node = node[segment]  # Fetch again: the spec chooses the client class.
    specs = [(spec.name, spec.version) for spec in getattr(node, "specs", [])]
    if not any(name == CATALOG_SPEC and str(version or "").startswith("3.") for name, version in specs):
        found = ", ".join(f"{name} {version or ''}".strip() for name, version in specs) or "none"
        raise ValueError(
            f"the Tiled node at {'/'.join(segments) or '/'!r} on {uri} is not a run catalog: "
            f"expected spec {CATALOG_SPEC} version {CATALOG_SPEC_VERSION}, found specs: {found}"
        )
    return node


_CATALOG_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")


def catalog_segments(catalog) -> list[str]:
    """The names along a catalog path (``"runs"``, ``"beamline/runs"``).

    Raises
    ------
    ValueError
        A path that is empty, holds ``.`` or ``..`` or a character other than letters,
        digits, ``_``, ``.`` and ``-`` (``"../runs"`` once made a plain container named
        ``runs`` beside the catalog, which broke every later default replay).
    """
    segments = [segment for segment in str(catalog).split("/") if segment]
    bad = [segment for segment in segments if segment in (".", "..") or not _CATALOG_SEGMENT.fullmatch(segment)]
    if not segments or bad:
        raise ValueError(
            f"catalog path {catalog!r} is not a path of names (letters, digits, '_', '.', '-', "
            f"separated by '/', no '.' or '..'): e.g. 'runs' or 'beamline/runs'"
        )
    return segments


@contextlib.contextmanager
def temporary_postgres_database(
    dsn_admin: str = "postgresql://postgres@127.0.0.1:5432/postgres",
    *,
    name: str | None = None,
    connect_timeout: float = 3,
) -> Iterator[dict[str, str]]:
    """Create a fresh PostgreSQL database and drop it afterwards (tests, demos).

    Parameters
    ----------
    dsn_admin : str, optional
        libpq URI (``postgresql://user[:password]@host:port/db``) of an existing
        database, as a role allowed to CREATE DATABASE. The URIs yielded reuse its
        user, password and host with the new database name.
    name : str, optional
        Name of the new database; ``live_bgsub_<random hex>`` by default.
    connect_timeout : float, optional
        Seconds to wait for the PostgreSQL server.

    Yields
    ------
    dict
        ``{"name": ..., "catalog_uri": "postgresql+asyncpg://...", "table_uri":
        "postgresql://..."}``, ready for ``EmbeddedTiledServer(catalog_uri=...,
        table_uri=...)``. Stop the server before the block ends: the database is
        dropped with ``WITH (FORCE)``, closing whatever still uses it.

    Raises
    ------
    ConnectionError
        When PostgreSQL is not reachable at ``dsn_admin`` (message names it, without
        the password).
    ModuleNotFoundError
        When psycopg is not installed (the ``[postgres]`` extra).
    """
    psycopg = _import_postgres_driver("psycopg", "temporary_postgres_database")
    from psycopg import sql

    name = name or f"live_bgsub_{secrets.token_hex(6)}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"database name must be a lower-case SQL identifier, got {name!r}")
    try:
        admin = psycopg.connect(dsn_admin, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
    except psycopg.OperationalError as error:
        raise ConnectionError(f"PostgreSQL is not reachable at {_redact_uri(dsn_admin)}: {error}") from error
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        parts = urllib.parse.urlsplit(dsn_admin)
        table_uri = urllib.parse.urlunsplit(("postgresql", parts.netloc, f"/{name}", parts.query, ""))
        catalog_uri = urllib.parse.urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))
        try:
            yield {"name": name, "catalog_uri": catalog_uri, "table_uri": table_uri}
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
