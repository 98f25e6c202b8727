"""A bus worker: frame tasks in, results out, on any host, as many as needed.

``live-bgsub worker --nats URL`` runs one :class:`Worker`. All workers pull from one
durable consumer (:data:`~live_bgsub.bus.jetstream.WORKERS_CONSUMER`), so each task
goes to one of them. For a batch of tasks of one run a worker

1. needs the job's :class:`~live_bgsub.bus.jetstream.RunPlan` (written by the
   composer once it knows the geometry); until it is written the tasks wait aside,
   kept in progress on the server, while the worker goes on with other jobs' tasks;
2. builds the run's :class:`~live_bgsub.engine.Engine` once (fold map, step; a model
   is loaded once per worker and method) and keeps it for the run's later tasks;
3. reads the frames (HDF5 on shared storage, or the event in the documents' stream)
   and processes them on a thread, telling the server the tasks are in progress;
4. publishes one result per frame and waits for JetStream's acknowledgement, and only
   then acknowledges the task.

A worker that dies (``kill -9``) acknowledges nothing more: the server redelivers its
unacknowledged tasks to the other workers after the consumer's ``ack_wait``; a result
already published for such a task is dropped by the server (same Nats-Msg-Id) or by
the composer (same ``seq_num``). A frame that cannot be read is tried again on a later
delivery (a file on shared storage may lag) and, at the consumer's ``max_deliver``-th
delivery, becomes a failed result with the error; a frame that is read but cannot be
processed (wrong shape, every pixel invalid) fails at once, as in the live callback.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time

import numpy as np

from .. import wire
from ..engine import Engine, FrameResult, make_step
from ..errors import ProcessingError
from ..frames import FrameReader, FrameRef
from ..inference import ModelError
from .jetstream import (
    DOCS_STREAM,
    PLANS_BUCKET,
    TASKS_STREAM,
    WORKERS_CONSUMER,
    RunPlan,
    connect,
    ensure_layout,
    ensure_workers_consumer,
    subject,
)

__all__ = ["KEEP_ENGINES", "MAX_PARKED", "Worker"]

logger = logging.getLogger("live_bgsub.bus.worker")

#: Runs whose engines (fold map, step) a worker keeps.
KEEP_ENGINES = 4
#: Tasks a worker holds aside while their job's plan is not written yet.
MAX_PARKED = 10000


class Worker:
    """Process frame tasks from NATS JetStream until stopped.

    Parameters
    ----------
    url : str
        The NATS server.
    batch_size : int, optional
        Most tasks fetched and processed at once (default 8).
    name : str, optional
        Shown in results and logs (default ``host:pid``).
    plan_timeout_s : float, optional
        How long a task waits for its run's plan before it is handed back (default 300 s).
    ack_wait_s, max_deliver : optional
        The shared consumer's settings: redelivery after ``ack_wait_s`` without an
        acknowledgement, at most ``max_deliver`` deliveries of a task. None (default):
        the consumer's current ones (30 s and 5 when this worker creates it); given,
        they replace the consumer's for every worker.
    """

    def __init__(self, url: str, *, batch_size: int = 8, name: str | None = None, plan_timeout_s: float = 300.0,
                 ack_wait_s: float | None = None, max_deliver: int | None = None):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.url = url
        self.batch_size = int(batch_size)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.plan_timeout_s = float(plan_timeout_s)
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.processed = 0  # results published (failed frames included)
        self.failed = 0
        self.redelivered = 0  # tasks this worker got after another delivery (a worker died, a retry)
        self._engines: collections.OrderedDict = collections.OrderedDict()
        self._steps: dict = {}
        self._reader = FrameReader()
        self._stop = None
        self._plans: collections.OrderedDict = collections.OrderedDict()  # job -> RunPlan (the last KEEP_ENGINES)
        self._parked: dict = collections.defaultdict(list)  # job -> [(msg, task)] waiting for the job's plan
        self._cpu = asyncio.Lock()
        self._done_tasks = 0

    def run(self, *, stop=None, max_tasks: int | None = None) -> None:
        """Work until ``stop`` (a threading.Event) is set or ``max_tasks`` tasks are done."""
        asyncio.run(self.serve(stop=stop, max_tasks=max_tasks))

    async def serve(self, *, stop=None, max_tasks: int | None = None) -> None:
        self._stop = stop
        nc, js = await connect(self.url, name=f"live_bgsub-worker {self.name}")
        waiters: dict[str, asyncio.Task] = {}
        try:
            await ensure_layout(js)
            info = await ensure_workers_consumer(js, ack_wait_s=self.ack_wait_s, max_deliver=self.max_deliver)
            self.ack_wait_s = float(info.config.ack_wait)
            self.max_deliver = int(info.config.max_deliver)
            plans = await js.key_value(PLANS_BUCKET)
            sub = await js.pull_subscribe("lbs.tasks.>", durable=WORKERS_CONSUMER, stream=TASKS_STREAM)
            logger.info("live_bgsub worker %s: pulling tasks from %s", self.name, self.url)
            while not self._stopping() and (max_tasks is None or self._done_tasks < max_tasks):
                if sum(len(v) for v in self._parked.values()) >= MAX_PARKED:
                    await asyncio.sleep(0.1)  # every slot holds a task waiting for its plan: let them move
                    continue
                try:
                    msgs = await sub.fetch(self.batch_size, timeout=1.0)
                except Exception as exc:  # noqa: BLE001 - nats.errors.TimeoutError when idle; reconnects
                    if type(exc).__name__ not in ("TimeoutError", "FetchTimeoutError"):
                        logger.debug("live_bgsub worker: fetch: %s: %s", type(exc).__name__, exc)
                    continue
                by_job = collections.defaultdict(list)
                for msg in msgs:
                    try:
                        _, task = wire.decode(msg.data, name="task")
                    except wire.WireError as exc:
                        logger.error("live_bgsub worker: a task that is not a task (%s): dropped", exc)
                        await msg.term()
                        continue
                    by_job[task["job"]].append((msg, task))
                for job, items in by_job.items():
                    if job in self._plans:
                        await self._run_batch(js, job, self._plans[job], items)
                        continue
                    # No plan yet (the composer has not found the geometry, or is down):
                    # the tasks wait aside, kept in progress, while other jobs go on.
                    self._parked[job].extend(items)
                    if job not in waiters or waiters[job].done():
                        waiters[job] = asyncio.create_task(self._await_plan(js, plans, job))
        finally:
            for task in waiters.values():
                task.cancel()
            for job, items in self._parked.items():  # stopping: the others take them at once
                for msg, _ in items:
                    try:
                        await msg.nak()
                    except Exception:  # noqa: BLE001 - redelivered after ack_wait anyway
                        pass
            self._parked.clear()
            self._reader.close()
            await nc.close()

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    # ------------------------------------------------------------------ one batch

    async def _heartbeat(self, items, every: float):
        """Tell the server, every ``every`` s, that ``items`` (a list that may grow) are in progress."""
        while True:
            await asyncio.sleep(every)
            for msg, _ in list(items):
                try:
                    await msg.in_progress()
                except Exception:  # noqa: BLE001 - the server is away; redelivery covers it
                    pass

    async def _await_plan(self, js, plans, job: str) -> None:
        """Wait for a job's plan while its tasks are parked; then process them."""
        parked = self._parked[job]
        beat = asyncio.create_task(self._heartbeat(parked, max(0.2, self.ack_wait_s / 3)))
        try:
            plan = await self._plan(plans, job)
        finally:
            beat.cancel()
        items = self._parked.pop(job, [])
        if plan is None:
            for msg, _ in items:
                await msg.nak(delay=0.0 if self._stopping() else 5.0)
            return
        self._plans[job] = plan
        while len(self._plans) > KEEP_ENGINES:
            self._plans.popitem(last=False)
        for i in range(0, len(items), self.batch_size):
            await self._run_batch(js, job, plan, items[i : i + self.batch_size])

    async def _run_batch(self, js, job: str, plan: RunPlan, items) -> None:
        async with self._cpu:  # one batch at a time: the cores are the engine's
            beat = asyncio.create_task(self._heartbeat(items, max(0.2, self.ack_wait_s / 3)))
            try:
                frames = []
                for msg, task in items:
                    frames.append(await self._frame(js, msg, task))
                engine = await asyncio.to_thread(self._engine, job, plan)
                results = await asyncio.to_thread(self._process, engine, frames)
            finally:
                beat.cancel()
            for (msg, task), (array, error), result in zip(items, frames, results):
                if msg.metadata.num_delivered > 1:
                    self.redelivered += 1
                if result is None:  # not readable this time: again later, or failed at the last try
                    deliveries = msg.metadata.num_delivered
                    if deliveries < self.max_deliver:
                        await msg.nak(delay=min(5.0, 0.2 * 2 ** deliveries))
                        continue
                    result = FrameResult(int(task["seq_num"]), error=f"{error} (after {deliveries} deliveries)")
                result.seq_num = int(task["seq_num"])
                await self._publish_result(js, job, task["run"], result, engine, msg.metadata.num_delivered)
                await msg.ack()
            self._done_tasks += len(items)

    async def _plan(self, plans, job: str) -> RunPlan | None:
        """The job's plan: read, or watched for until the composer writes it."""
        watcher = await plans.watch(job)  # the current value (if any), then every update
        try:
            deadline = time.monotonic() + self.plan_timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                if self._stop is not None and self._stop.is_set():
                    return None  # stopping: the tasks go back to the others
                try:
                    entry = await watcher.updates(timeout=min(remaining, 1.0))
                except Exception:  # noqa: BLE001 - nats.errors.TimeoutError: nothing yet
                    continue
                if entry is not None and entry.value:
                    return RunPlan.from_bytes(entry.value)
        finally:
            await watcher.stop()
        logger.warning("live_bgsub worker %s: no plan for job %s within %s s; tasks handed back", self.name, job, self.plan_timeout_s)
        return None

    async def _frame(self, js, msg, task) -> tuple[np.ndarray | None, str | None]:
        """``(array, None)`` or ``(None, why it cannot be read now)``."""
        try:
            if "doc_seq" in task:
                raw = await js.get_msg(DOCS_STREAM, int(task["doc_seq"]))
                _, event = wire.decode(raw.data, name="event")
                value = event["data"].get(task["data_key"])
                if value is None:
                    return None, f"event of frame {task['seq_num']} holds no {task['data_key']!r}"
                return np.asarray(value), None
            if task.get("error"):
                return None, task["error"]
            ref = FrameRef(int(task["seq_num"]), time.monotonic(), path=task.get("path"), dataset=task.get("dataset"),
                           index=task.get("index"), error=task.get("error"))
            return await asyncio.to_thread(self._reader.read, ref), None
        except Exception as exc:  # noqa: BLE001 - a frame that cannot be read is that frame's failure
            return None, f"{type(exc).__name__}: {exc}"

    def _engine(self, job: str, plan: RunPlan):
        engine = self._engines.get(job)
        if engine is None:
            key = repr(sorted(plan.processing.items()))
            try:
                step = self._steps.get(key)
                if step is None:
                    p = plan.processing
                    step = self._steps[key] = make_step(p["method"], p.get("params") or {}, downsample=p.get("downsample"))
                engine = Engine(step, plan.geometry, plan.shape, plan.mask, metrics=plan.metrics,
                                geometry_quality=plan.quality(), **plan.roi)
            except (ProcessingError, ModelError) as exc:  # a step that cannot be made (a model not found,
                engine = exc  # another working resolution than its own) or run: every frame of the run fails with this
            self._engines[job] = engine
            while len(self._engines) > KEEP_ENGINES:
                self._engines.popitem(last=False)
        self._engines.move_to_end(job)
        return engine

    def _process(self, engine, frames) -> list:
        """One result per frame; None for a frame that could not be read."""
        readable = [i for i, (array, _) in enumerate(frames) if array is not None]
        out: list = [None] * len(frames)
        if not readable:
            return out
        if isinstance(engine, Exception):
            for i in readable:
                out[i] = FrameResult(-1, error=f"cannot set up processing: {engine}")
            return out
        results = engine.process([frames[i][0] for i in readable], list(range(len(readable))))
        for i, r in zip(readable, results):
            out[i] = r
        return out

    async def _publish_result(self, js, job: str, run_uid: str, result: FrameResult, engine, deliveries: int) -> None:
        seq = int(result.seq_num)
        body = {
            "run": run_uid,
            "job": job,
            "seq_num": seq,
            "error": result.error,
            "metrics": result.metrics,
            "timings_s": result.timings_s,
            "worker": self.name,
            "deliveries": int(deliveries),
            "corrected": None if result.corrected is None else np.ascontiguousarray(result.corrected, dtype=np.float32),
            "describe": engine.describe() if isinstance(engine, Engine) else None,
        }
        payload = wire.encode("result", body)
        delay = 0.05
        while True:
            try:
                await js.publish(subject("results", job), payload, timeout=5.0, headers={"Nats-Msg-Id": f"{job}:result:{seq}"})
                break
            except Exception as exc:  # noqa: BLE001 - the server may be restarting: the task waits
                if type(exc).__name__ == "MaxPayloadError":
                    body.update(corrected=None, error=f"result of {len(payload)} bytes exceeds the server's max_payload; raise max_payload")
                    payload = wire.encode("result", body)
                    continue
                logger.warning("live_bgsub worker %s: result %s of %s not acknowledged (%s); retrying", self.name, seq, job, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        self.processed += 1
        if result.error:
            self.failed += 1
