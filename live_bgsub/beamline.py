"""Put the pieces together the way a beamline runs them.

:class:`Beamline` builds, from a :class:`BeamlineConfig`, a RunEngine with the raw run
and the derived run both going to Tiled through one :class:`~live_bgsub.sinks.tiled.
TiledPublisher` (one writer path per server: see ../shared/docs/ecosystem.md on the
concurrent-writer crash), a detector (the simulated Pilatus by default), and the live
callback subscribed to the RunEngine. Without a Tiled URI it starts the embedded
server (SQLite catalog, data under ``directory/tiled``) and stops it on close.

``live-bgsub demo`` and the IPython profile in ``profiles/`` both use it.

Configuration
-------------
:func:`load_config` reads, in order (later wins): the defaults, a YAML or JSON file
(``path``, else ``$LIVE_BGSUB_CONFIG``), then the environment: ``TILED_URI`` /
``LIVE_BGSUB_TILED_URI``, ``TILED_API_KEY``, ``LIVE_BGSUB_DIRECTORY``,
``LIVE_BGSUB_METHOD``, ``LIVE_BGSUB_EPICS_PREFIX``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .options import DEFAULT_METHOD, ProcessingOptions

__all__ = ["Beamline", "BeamlineConfig", "load_config", "persistent_key"]

logger = logging.getLogger("live_bgsub.beamline")


@dataclass
class BeamlineConfig:
    """Everything :class:`Beamline` needs (see the module docstring for the sources).

    Attributes
    ----------
    directory : str
        Root of local data: ``raw/`` (detector HDF5), ``derived/`` (corrected folds),
        ``tiled/`` (the embedded server), ``backup/`` (JSON-lines copies of documents).
    tiled_uri, tiled_api_key : str or None
        A Tiled server (production: PostgreSQL behind it). None starts the embedded one.
    catalog : str
        Path of the CatalogOfBlueskyRuns container holding raw and derived runs.
    method : str
        Processing step: a classical method, ``model:NAME`` or ``model:PATH``.
    params : dict
        Parameters of a classical method.
    downsample : int or None
        Working resolution; None (default): the method's own (a model's card, 2 for a
        classical method, as :class:`~live_bgsub.options.ProcessingOptions`).
    detector : str
        ``"sim"`` (simulated Pilatus writing HDF5) or ``"epics"`` (an areaDetector IOC
        over Channel Access, :class:`live_bgsub.devices.EpicsPilatus`; needs
        ``epics_prefix``; connected within ``connection_timeout_s`` at start).
    epics_prefix : str or None
    preset : str
        Simulated detector layout (``pilatus-1m``, ``eiger2-9m``, ``mar``).
    period_s : float
        Simulated detector frame period.
    on_full : str
        Callback queue policy (``skip`` live default: acquisition never waits).
    queue_size, batch_size : int
    """

    directory: str = "live_bgsub_data"
    tiled_uri: str | None = None
    tiled_api_key: str | None = None
    catalog: str = "runs"
    method: str = DEFAULT_METHOD
    params: dict = field(default_factory=dict)
    downsample: int | None = None
    detector: str = "sim"
    epics_prefix: str | None = None
    preset: str = "pilatus-1m"
    period_s: float = 0.1
    seed: int = 0
    on_full: str = "skip"
    queue_size: int = 256
    batch_size: int = 8
    stop_timeout_s: float = 120.0
    connection_timeout_s: float = 5.0

    def __post_init__(self):
        ProcessingOptions(self.method, dict(self.params), self.downsample)  # raises on a bad one, in one line
        if self.detector not in ("sim", "epics"):
            raise ValueError(f"detector must be 'sim' or 'epics', got {self.detector!r}")
        if self.detector == "epics" and not self.epics_prefix:
            raise ValueError("detector 'epics' needs epics_prefix (e.g. '13PIL1:')")
        if not self.period_s >= 0:
            raise ValueError(f"period_s must be >= 0, got {self.period_s!r}")


    @property
    def processing(self) -> ProcessingOptions:
        """``method``, ``params`` and ``downsample`` as the one options type of every entry point."""
        return ProcessingOptions(self.method, dict(self.params), self.downsample)


def load_config(path=None, **overrides) -> BeamlineConfig:
    """Build a :class:`BeamlineConfig` from a file, the environment and ``overrides``."""
    values: dict = {}
    path = path or os.environ.get("LIVE_BGSUB_CONFIG")
    if path:
        text = Path(path).read_text()
        if str(path).endswith((".yml", ".yaml")):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    env = {
        "tiled_uri": os.environ.get("LIVE_BGSUB_TILED_URI") or os.environ.get("TILED_URI"),
        "tiled_api_key": os.environ.get("TILED_API_KEY"),
        "directory": os.environ.get("LIVE_BGSUB_DIRECTORY"),
        "method": os.environ.get("LIVE_BGSUB_METHOD"),
        "epics_prefix": os.environ.get("LIVE_BGSUB_EPICS_PREFIX"),
    }
    values.update({k: v for k, v in env.items() if v})
    if values.get("epics_prefix") and "detector" not in values:
        values["detector"] = "epics"
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(BeamlineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; expected some of {sorted(known)}")
    return BeamlineConfig(**values)


class Beamline:
    """RunEngine + detector + Tiled + live callback, built from a :class:`BeamlineConfig`.

    Attributes (after :meth:`start`)
    --------------------------------
    RE : bluesky.RunEngine
    detector : ophyd Device
    callback : LiveBackgroundSubtraction
    publisher : TiledPublisher
    catalog : the Tiled catalog of raw and derived runs
    server : EmbeddedTiledServer or None
    """

    def __init__(self, config: BeamlineConfig | None = None, *, detector=None):
        self.config = config or load_config()
        self._detector = detector
        self.server = None
        self.RE = self.detector = self.callback = self.publisher = self.catalog = None
        self.prepare_s = None  # seconds the model step's compilation took at start, if done then
        self._repeater = None  # caproto's CA repeater, when this beamline started one

    @property
    def directory(self) -> Path:
        return Path(self.config.directory).resolve()

    def start(self) -> Beamline:
        from bluesky import RunEngine

        from .callback import LiveBackgroundSubtraction
        from .sinks.tiled import TiledPublisher
        from .tiled_server import EmbeddedTiledServer, connect

        cfg = self.config
        raw_dir, derived_dir = self.directory / "raw", self.directory / "derived"
        raw_dir.mkdir(parents=True, exist_ok=True)
        derived_dir.mkdir(parents=True, exist_ok=True)
        try:
            uri, api_key = cfg.tiled_uri, cfg.tiled_api_key
            if uri is None:
                self.server = EmbeddedTiledServer(
                    self.directory / "tiled",
                    readable_storage=[raw_dir, derived_dir],
                    api_key=persistent_key(self.directory / "tiled"),
                ).start()
                uri, api_key = self.server.uri, self.server.api_key
            self.catalog = connect(uri, api_key=api_key, catalog=cfg.catalog)
            self.publisher = TiledPublisher(self.catalog, backup_directory=str(self.directory / "backup"))
            self.detector = self._detector or self.make_detector(raw_dir)
            self.callback = LiveBackgroundSubtraction(
                self.publisher,
                **cfg.processing.callback_kwargs(),
                directory=derived_dir,
                on_full=cfg.on_full,
                queue_size=cfg.queue_size,
                batch_size=cfg.batch_size,
                stop_timeout_s=cfg.stop_timeout_s,
            )
            self.prepare_s = self._prepare()
            self.RE = RunEngine({})
            self.RE.subscribe(self.publisher)
            self.RE.subscribe(self.callback)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self) -> float | None:
        """Compile a model step for the detector's frames before the first run, when its
        description gives the frame shape and dtype and its configuration the beam
        centre and rotation (the simulated detector; an IOC that publishes them);
        seconds, or None when not done (the runs then compile at their first frames)."""
        from .callback import geometry_from_configuration

        if not self.callback.accelerate:
            return None
        images = [key for key in self.detector.describe().values() if len(key.get("shape") or ()) == 2]
        config = {k: v.get("value") for k, v in self.detector.read_configuration().items()}
        geometry = geometry_from_configuration(config)
        if len(images) != 1 or "dtype_numpy" not in images[0] or geometry is None:
            logger.info("live_bgsub: %s not compiled ahead: the detector gives no frame shape, dtype or geometry", self.config.method)
            return None
        shape = tuple(int(n) for n in images[0]["shape"])
        seconds = self.callback.prepare(shape, geometry, dtype=images[0]["dtype_numpy"])
        logger.info("live_bgsub: %s compiled for %s frames in %.1f s", self.config.method, shape, seconds)
        return seconds

    def make_detector(self, raw_dir: Path):
        """The detector the configuration names, writing to ``raw_dir``: an
        ``EpicsPilatus`` on ``epics_prefix``, connected (an IOC that does not answer
        within ``connection_timeout_s`` raises, naming the prefix), or the simulated one."""
        cfg = self.config
        if cfg.detector == "epics":
            from .devices import EpicsPilatus, start_ca_repeater

            self._repeater = start_ca_repeater()  # before libca starts: no caRepeater warning
            detector = EpicsPilatus(cfg.epics_prefix, name="det", write_path=str(raw_dir))
            # Fail here, with the prefix and the PVs named, rather than at the first plan.
            detector.wait_for_connection(timeout=cfg.connection_timeout_s)
            return detector
        from .sim.detector import SimDetector

        return SimDetector(name="det", directory=raw_dir, preset=cfg.preset, period_s=cfg.period_s, seed=cfg.seed)

    def finish(self, raw_uid: str | None = None, timeout: float | None = None) -> bool:
        """Wait for the derived run(s) and for every document to reach Tiled."""
        ok = self.callback.wait(raw_uid, timeout=timeout)
        return self.publisher.flush(timeout=timeout) and ok

    def close(self) -> None:
        """Finish pending work, then stop the embedded server (data stay on disk)."""
        if self.callback is not None:
            self.callback.close(timeout=self.config.stop_timeout_s)
        if self.publisher is not None:
            self.publisher.close(timeout=60)
        if self.server is not None:
            self.server.stop()
        if self.detector is not None and self._detector is None and self.config.detector == "epics":
            self.detector.destroy()  # its channels closed before its IOC goes: no "Virtual circuit disconnect"
        if self._repeater is not None:
            self._repeater.terminate()
            self._repeater.wait()
            self._repeater = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def persistent_key(directory: Path) -> str:
    """The embedded server's API key, kept in ``directory/api_key`` across restarts."""
    import secrets

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "api_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_hex(16)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key
