"""The bus's layout on NATS JetStream: streams, subjects, buckets, and the run plan.

Three streams, file storage, one subject per *job*, one processing of one raw run
(``<job>`` is :func:`job_key`: the run's uid and a digest of the processing its
publisher asked for, so reprocessing a run another way never mixes with the first):

- :data:`DOCS_STREAM` (``lbs.docs.<job>``): the raw run's documents, in order, as the
  RunEngine side published them (limits retention: the composer purges a job's
  subject once its derived run is stopped and delivered);
- :data:`TASKS_STREAM` (``lbs.tasks.<job>``): one frame task per frame, a work queue
  read by one durable pull consumer (:data:`WORKERS_CONSUMER`) shared by every worker;
  a task names where the frame is (HDF5 file, dataset, index) or, for a frame that came
  inline in its event, the stream sequence of that event in :data:`DOCS_STREAM`, so a
  frame is never copied through the broker twice;
- :data:`RESULTS_STREAM` (``lbs.results.<job>``): one result per frame (corrected
  fold, metrics, or the error), read by the composer.

Two key-value buckets, keyed by job: :data:`PLANS_BUCKET` holds each job's :class:`RunPlan` (the
processing step, the geometry and what the engine needs), written once by the composer
with ``create`` (the first plan wins, so a restarted composer reuses it) and read by
the workers; :data:`DONE_BUCKET` holds the jobs whose derived run is complete (the
derived run's uid).

Messages use :mod:`live_bgsub.wire`'s msgpack codec (never pickle); a document's
message is the document as :func:`live_bgsub.wire.encode` writes it (name and
document), with the processing a start asks for in header :data:`PROCESSING_HEADER`. Every publish
carries a ``Nats-Msg-Id`` (per document, per ``job/seq_num``), so a publish repeated
after a lost acknowledgement is dropped by the server within :data:`DUPLICATE_WINDOW_S`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np

from .. import wire
from ..geometry import Geometry, GeometryQuality

__all__ = [
    "ACK_WAIT_S",
    "MAX_DELIVER",
    "DOCS_STREAM",
    "DONE_BUCKET",
    "DUPLICATE_WINDOW_S",
    "PLANS_BUCKET",
    "PROCESSING_HEADER",
    "RESULTS_STREAM",
    "TASKS_STREAM",
    "WORKERS_CONSUMER",
    "RunPlan",
    "connect",
    "derived_uid",
    "ensure_layout",
    "ensure_workers_consumer",
    "quality_dict",
    "job_key",
    "run_token",
    "subject",
]

logger = logging.getLogger("live_bgsub.bus")

DOCS_STREAM = "LBS_DOCS"
TASKS_STREAM = "LBS_TASKS"
RESULTS_STREAM = "LBS_RESULTS"
WORKERS_CONSUMER = "workers"
PLANS_BUCKET = "lbs_plans"
DONE_BUCKET = "lbs_done"
#: Default seconds before a task not acknowledged by its worker is delivered again.
ACK_WAIT_S = 30.0
#: Default deliveries of a task before a frame that cannot be read fails.
MAX_DELIVER = 5
#: Seconds within which a message published twice with the same Nats-Msg-Id is kept once.
DUPLICATE_WINDOW_S = 600.0
#: Header of a start document's message carrying the processing its publisher asked for (JSON).
PROCESSING_HEADER = "Lbs-Processing"
#: Namespace of the derived runs' uids (:func:`derived_uid`).
_DERIVED_NAMESPACE = uuid.UUID("5b1f3c1e-9a57-4b1e-8f0e-6c0a3d7e2b41")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def run_token(uid: str) -> str:
    """A run uid as a subject token: the uid when it is a valid token, else a hash."""
    uid = str(uid)
    return uid if _TOKEN.fullmatch(uid) else "h" + hashlib.sha256(uid.encode()).hexdigest()[:40]


def job_key(raw_uid: str, processing: dict | None = None) -> str:
    """The key of one processing of one raw run (a *job*): its subjects' token, its plan
    and its entry in :data:`DONE_BUCKET`. ``processing`` is what the run's publisher
    asked for (None: the composer's default), so the same raw run processed two ways is
    two jobs that never mix."""
    digest = hashlib.sha256(json.dumps(processing, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{run_token(raw_uid)}_{digest}"


def subject(kind: str, job: str) -> str:
    """``lbs.<kind>.<job>`` for kind ``docs``, ``tasks`` or ``results`` (``job``: :func:`job_key`)."""
    return f"lbs.{kind}.{job}"


def derived_uid(job: str, processing: dict) -> str:
    """The derived run's uid of a job (:func:`job_key`) done with ``processing`` (the
    composer's default filled in): the same job gives the same uid, so a restarted
    composer replaces the derived run it wrote in part rather than adding one, and two
    jobs of one raw run never share one."""
    text = json.dumps({"job": job, "processing": processing}, sort_keys=True, default=str)
    return str(uuid.uuid5(_DERIVED_NAMESPACE, text))


async def connect(url: str, *, name: str = "live_bgsub", connect_timeout: float = 5.0):
    """Connect to NATS (reconnecting for ever after a first success) and return
    ``(nc, js)``; ConnectionError with one line when nothing answers at ``url``."""
    import nats

    connected = False

    async def on_error(exc):  # the client's default logs a traceback per attempt
        # Before the first connection the caller gets one ConnectionError instead.
        logger.log(logging.WARNING if connected else logging.DEBUG, "NATS %s: %s: %s", url, type(exc).__name__, exc)

    held = []

    async def on_disconnect():
        if held and (held[0].is_closed or held[0].is_draining):  # our own close()
            return
        logger.warning("NATS %s: disconnected; reconnecting", url)

    async def on_reconnect():
        logger.warning("NATS %s: reconnected", url)

    try:
        nc = await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=1,  # the first connection: fail fast, in one line
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
    except Exception as exc:  # noqa: BLE001 - nats raises several types; one line for all
        raise ConnectionError(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}") from None
    held.append(nc)
    nc.options["max_reconnect_attempts"] = -1  # once connected: reconnect for ever
    connected = True
    return nc, nc.jetstream()


async def ensure_layout(js) -> None:
    """Create the streams and the buckets where missing (existing ones are kept)."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import BucketNotFoundError, NotFoundError

    streams = (
        (DOCS_STREAM, "lbs.docs.>", RetentionPolicy.LIMITS),
        (TASKS_STREAM, "lbs.tasks.>", RetentionPolicy.WORK_QUEUE),
        (RESULTS_STREAM, "lbs.results.>", RetentionPolicy.LIMITS),
    )
    for name, subjects, retention in streams:
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[subjects],
                    retention=retention,
                    storage=StorageType.FILE,
                    duplicate_window=DUPLICATE_WINDOW_S,
                )
            )
    for bucket in (PLANS_BUCKET, DONE_BUCKET):
        try:
            await js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            await js.create_key_value(bucket=bucket, storage=StorageType.FILE)


async def ensure_workers_consumer(js, *, ack_wait_s: float | None = None, max_deliver: int | None = None):
    """The workers' shared durable consumer: created with the given settings (defaults
    :data:`ACK_WAIT_S`, :data:`MAX_DELIVER`) when missing; an existing one keeps its
    settings unless others are given, which then replace them (for every worker).
    Returns its ConsumerInfo."""
    from nats.js.api import AckPolicy, ConsumerConfig
    from nats.js.errors import NotFoundError

    try:
        info = await js.consumer_info(TASKS_STREAM, WORKERS_CONSUMER)
    except NotFoundError:
        info = None
    wanted = {
        "ack_wait": float(ack_wait_s if ack_wait_s is not None else (info.config.ack_wait if info else ACK_WAIT_S)),
        "max_deliver": int(max_deliver if max_deliver is not None else (info.config.max_deliver if info else MAX_DELIVER)),
    }
    if info is not None and info.config.ack_wait == wanted["ack_wait"] and info.config.max_deliver == wanted["max_deliver"]:
        return info
    if info is not None:
        logger.warning("live_bgsub bus: the workers' consumer changes from ack_wait %s s, max_deliver %s to %s s, %s",
                       info.config.ack_wait, info.config.max_deliver, wanted["ack_wait"], wanted["max_deliver"])
    return await js.add_consumer(
        TASKS_STREAM,
        ConsumerConfig(durable_name=WORKERS_CONSUMER, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1, **wanted),
    )


@dataclass
class RunPlan:
    """What every worker needs to process a run's frames the same way.

    Written once per run by the composer (:data:`PLANS_BUCKET`), from the run's start
    document, its descriptor and, when the geometry is estimated, its first frames.
    """

    processing: dict  # method, params, downsample (the composer's or the run's choice)
    center: tuple[float, float]
    rotation_deg: float
    shape: tuple[int, int]
    mask: np.ndarray | None = field(default=None, repr=False)  # frame-shaped, True = valid
    metrics: bool = True
    geometry_quality: dict | None = None
    roi: dict = field(default_factory=dict)  # pixel_size_mm, wavelength_nm, distance_mm

    @property
    def geometry(self) -> Geometry:
        return Geometry(tuple(self.center), self.rotation_deg)

    def quality(self) -> GeometryQuality | None:
        if self.geometry_quality is None:
            return None
        q = dict(self.geometry_quality)
        q["reasons"] = tuple(q.get("reasons") or ())
        return GeometryQuality(**q)

    def to_bytes(self) -> bytes:
        doc = {
            "processing": self.processing,
            "center": [float(c) for c in self.center],
            "rotation_deg": float(self.rotation_deg),
            "shape": [int(s) for s in self.shape],
            "metrics": bool(self.metrics),
            "geometry_quality": self.geometry_quality,
            "roi": {k: (None if v is None else float(v)) for k, v in self.roi.items()},
            "mask": None,
        }
        if self.mask is not None:
            bits = np.packbits(np.asarray(self.mask, dtype=bool).ravel())
            doc["mask"] = zlib.compress(bits.tobytes(), 6)
        return wire.encode("plan", doc)

    @classmethod
    def from_bytes(cls, payload: bytes) -> RunPlan:
        _, doc = wire.decode(payload, name="plan")
        shape = tuple(int(s) for s in doc["shape"])
        mask = None
        if doc.get("mask") is not None:
            bits = np.frombuffer(zlib.decompress(doc["mask"]), dtype=np.uint8)
            mask = np.unpackbits(bits)[: shape[0] * shape[1]].reshape(shape).astype(bool)
        return cls(
            processing=doc["processing"],
            center=tuple(float(c) for c in doc["center"]),
            rotation_deg=float(doc["rotation_deg"]),
            shape=shape,
            mask=mask,
            metrics=bool(doc["metrics"]),
            geometry_quality=doc.get("geometry_quality"),
            roi=dict(doc.get("roi") or {}),
        )


def quality_dict(quality: GeometryQuality | None) -> dict | None:
    """A :class:`~live_bgsub.geometry.GeometryQuality` as plain values for a plan."""
    if quality is None:
        return None
    out = dataclasses.asdict(quality)
    out["reasons"] = list(out.get("reasons") or ())
    return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in out.items()}
