"""``live-bgsub worker`` and ``live-bgsub compose``: the bus's two long-running commands.

A beamline runs three things (README, "Scale-out"): the RunEngine with a
:class:`~live_bgsub.bus.publisher.BusPublisher` subscribed, one composer, and any
number of workers on any hosts, all pointed at the same NATS server or cluster. Both
commands stop cleanly on SIGTERM or Ctrl-C; a usage or connection error is one line
and exit status 2 (:mod:`live_bgsub.errors`). A NATS server that does not answer within
:data:`NATS_CONNECT_TIMEOUT_S` is such an error.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from ..errors import ArgumentParser, at_least, print_error
from ..options import DEFAULT_METHOD, ProcessingOptions, add_processing_arguments, add_tiled_arguments

__all__ = ["compose_main", "worker_main"]

DEFAULT_URL = "nats://127.0.0.1:4222"

#: Seconds a first connection to NATS may take (``live_bgsub.bus.jetstream.connect``'s
#: default), stated in the help.
NATS_CONNECT_TIMEOUT_S = 5

_NATS_HELP = f"NATS server (default {DEFAULT_URL}); one that does not answer within {NATS_CONNECT_TIMEOUT_S} s is an error"


def _fail(prog: str, message: str) -> int:
    return print_error(prog, message)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def worker_main(argv=None) -> int:
    """``live-bgsub worker``: process frame tasks from the bus until stopped."""
    prog = "live-bgsub worker"
    parser = ArgumentParser(prog=prog, description="Pull frame tasks from NATS JetStream, process them, publish the results.")
    parser.add_argument("--nats", default=DEFAULT_URL, metavar="URL", help=_NATS_HELP)
    parser.add_argument("--batch", type=at_least(1), default=8, metavar="N", help="tasks fetched and processed at once (default 8)")
    parser.add_argument("--name", help="this worker's name in results and logs (default host:pid)")
    parser.add_argument("--ack-wait", type=float, metavar="S", help="redelivery after S seconds without an acknowledgement; sets it for every worker (default: as the shared consumer has it; 30 when new)")
    parser.add_argument("--max-deliver", type=at_least(1), metavar="N", help="deliveries of a task before its frame fails; sets it for every worker (default: as the consumer has it; 5 when new)")
    parser.add_argument("--max-tasks", type=at_least(1), metavar="N", help="stop after N tasks (default: run until stopped)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each run and retry")
    args = parser.parse_args(argv)
    if args.ack_wait is not None and not args.ack_wait > 0:
        return _fail(prog, f"--ack-wait must be a positive number of seconds, got {args.ack_wait:g}")
    _logging(args.verbose)
    from .worker import Worker

    worker = Worker(args.nats, batch_size=args.batch, name=args.name, ack_wait_s=args.ack_wait, max_deliver=args.max_deliver)
    stop = _stop_on_signals()
    try:
        worker.run(stop=stop, max_tasks=args.max_tasks)
    except ConnectionError as exc:
        return _fail(prog, str(exc))
    print(f"{prog} {worker.name}: {worker.processed} result(s) published, {worker.failed} of them failed frames; "
          f"{worker.redelivered} task(s) came redelivered", flush=True)
    return 0


def compose_main(argv=None) -> int:
    """``live-bgsub compose``: compose the derived runs from the bus until stopped."""
    prog = "live-bgsub compose"
    parser = ArgumentParser(prog=prog, description="Order the workers' results by frame and write each raw run's derived run (HDF5 and Tiled), exactly once per frame.")
    parser.add_argument("--nats", default=DEFAULT_URL, metavar="URL", help=_NATS_HELP)
    add_tiled_arguments(parser, tiled_help="Tiled server for the derived runs (default: $TILED_URI); one that does not answer within 10 s is an error")
    parser.add_argument("--directory", type=Path, default=Path("derived"), help="where derived HDF5 files go (default ./derived; shared with Tiled)")
    parser.add_argument("--backup", type=Path, metavar="DIR", help="JSON-lines backup of the derived runs (default: backup/ beside --directory)")
    add_processing_arguments(parser, method_help="default processing: classical method, model:NAME or model:PATH "
                             f"(default {DEFAULT_METHOD}; a run's publisher may choose its own)")
    parser.add_argument("--geometry-frames", type=at_least(1), default=3, metavar="N", help="frames a run's geometry is estimated from (default 3)")
    parser.add_argument("--result-timeout", type=float, default=600.0, metavar="S", help="seconds to wait for a frame's result before it fails (default 600)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each run")
    args = parser.parse_args(argv)
    if not args.result_timeout > 0:
        return _fail(prog, f"--result-timeout must be a positive number of seconds, got {args.result_timeout:g}")
    _logging(args.verbose)
    import os

    from .composer import Composer

    uri = args.tiled or os.environ.get("TILED_URI")
    if not uri:
        return _fail(prog, "no Tiled server: pass --tiled URI or set TILED_URI")
    backup = args.backup or args.directory.parent / "backup"
    try:
        from ..sinks.tiled import TiledPublisher

        options = ProcessingOptions.from_args(args)
        publishers = [TiledPublisher.from_uri(uri, api_key=args.api_key, catalog=args.catalog, backup_directory=backup)]
        composer = Composer(args.nats, publishers, **options.callback_kwargs(), directory=args.directory, result_timeout_s=args.result_timeout, geometry_frames=args.geometry_frames)
    except (ValueError, OSError) as exc:
        return _fail(prog, str(exc))
    stop = _stop_on_signals()
    try:
        composer.run(stop=stop)
    except ConnectionError as exc:
        return _fail(prog, str(exc))
    finally:
        for p in publishers:
            p.close(timeout=60)
    print(f"{prog}: {len(composer.composed)} derived run(s) composed", flush=True)
    return 0
