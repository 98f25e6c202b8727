"""Build the live background-subtraction session: RunEngine, detector, Tiled, live callback.

IPython runs this file in the user namespace when started with
``ipython --profile-dir=profiles/profile_live_bgsub``. It reads the configuration with
:func:`live_bgsub.beamline.load_config` ($LIVE_BGSUB_CONFIG and the environment, see
profiles/README.md), starts a :class:`live_bgsub.beamline.Beamline` and puts the
conventional names in the namespace: ``RE``, ``det``, ``callback``, ``catalog``,
``publisher``, ``bl``, ``bp``, ``bps``, ``count`` and ``derived(uid)``.

If the beamline cannot start (bad configuration, an EPICS detector whose PVs do not
connect, a Tiled server that does not answer) the error is printed and IPython
exits with status 1: no shell without a RunEngine. ``Beamline.start`` has already
stopped whatever it had started (the embedded Tiled server) by then.

At exit, ``bl.close()`` finishes the frames still queued, drains the Tiled writer and
stops the embedded server. It is registered with ``atexit`` after ``Beamline.start``,
so it runs before the embedded server's own exit hook (atexit is last in, first out)
and keeps ``bl`` alive through IPython's namespace reset at the end of the session.
"""


def _start_session() -> dict:
    """Start the beamline; return the names the session exposes (exit 1 on failure)."""
    import atexit
    import traceback

    import bluesky.plan_stubs as bps
    import bluesky.plans as bp
    from bluesky.plans import count

    from live_bgsub.beamline import Beamline, load_config
    from live_bgsub.errors import LiveBgsubError

    config = None
    try:
        config = load_config()
        bl = Beamline(config).start()
    except Exception as exc:  # noqa: BLE001 - reported, then the session is not started
        if not isinstance(exc, (ValueError, LiveBgsubError)):
            traceback.print_exc()
        _report_failure(exc, config)
        raise SystemExit(1) from None

    atexit.register(_close_at_exit, bl)
    print(_banner(bl), flush=True)
    return {
        "bl": bl,
        "RE": bl.RE,
        "det": bl.detector,
        "callback": bl.callback,
        "catalog": bl.catalog,
        "publisher": bl.publisher,
        "bp": bp,
        "bps": bps,
        "count": count,
        "derived": _make_derived(bl),
    }


def _report_failure(exc: BaseException, config) -> None:
    import os
    import sys

    lines = [f"live_bgsub profile: the beamline did not start: {type(exc).__name__}: {exc}"]
    source = os.environ.get("LIVE_BGSUB_CONFIG")
    lines.append(f"  configuration file: {source or '(none; defaults and environment only)'}")
    if config is not None and config.detector == "epics":
        lines.append(
            f"  detector: EPICS prefix {config.epics_prefix!r}: is the IOC running, and does "
            "EPICS_CA_ADDR_LIST reach it? For the simulated detector unset LIVE_BGSUB_EPICS_PREFIX "
            "and drop epics_prefix/detector from the configuration file."
        )
    lines.append("  Nothing was left running. Exiting (status 1); see profiles/README.md.")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _describe_detector(bl) -> str:
    cfg = bl.config
    if cfg.detector == "epics":
        return f"EPICS, prefix {cfg.epics_prefix!r}"
    return f"simulated {cfg.preset} (period {cfg.period_s:g} s, seed {cfg.seed})"


def _banner(bl) -> str:
    cfg = bl.config
    if bl.server is not None:
        tiled = f"{bl.server.uri} (embedded; API key in {bl.server.directory / 'api_key'})"
    else:
        tiled = cfg.tiled_uri
    method = cfg.method + (f" {cfg.params}" if cfg.params else "")
    method += f", downsample {bl.callback.step.describe()['downsample']}"
    return "\n".join(
        [
            "live_bgsub beamline session",
            f"  Tiled:     {tiled}, catalog {cfg.catalog!r}",
            f"  detector:  det = {_describe_detector(bl)}",
            f"  method:    {method}",
            f"  data:      {bl.directory}",
            "  names:     RE det callback catalog publisher bl bp bps count derived",
            "  try:       uid, = RE(count([det], 10)); callback.summary(uid); derived(uid); catalog[uid]",
        ]
    )


def _make_derived(bl):
    def derived(uid=None, timeout=120.0):
        """Return the derived run (Tiled client) of raw run ``uid``; default the latest.

        Waits up to ``timeout`` seconds for the live callback to stop the derived run
        and for its documents to reach Tiled.
        """
        callback = bl.callback
        if uid is None:
            if not callback.runs:
                raise LookupError("no raw run has been seen by the live callback in this session yet")
            uid = next(reversed(callback.runs))
        if uid not in callback.runs:
            raise KeyError(
                f"raw run {uid!r} was not seen by the live callback in this session; "
                "runs of earlier sessions are in `catalog` (find the derived run by its 'raw_uid')"
            )
        if not callback.wait(uid, timeout=timeout):
            raise TimeoutError(f"the derived run of {uid!r} did not finish within {timeout} s")
        summary = callback.summary(uid)
        if summary.derived_uid is None:
            raise LookupError(f"raw run {uid!r} has no derived run: {summary.disabled or summary.reason}")
        if not bl.publisher.flush(timeout):
            raise TimeoutError(f"the documents of derived run {summary.derived_uid!r} did not reach Tiled within {timeout} s")
        return bl.catalog[summary.derived_uid]

    return derived


def _close_at_exit(bl) -> None:
    # Self-contained: IPython may have cleared the user namespace (its globals) by now.
    import sys

    print("live_bgsub: finishing pending frames and stopping Tiled ...", file=sys.stderr, flush=True)
    bl.close()
    print("live_bgsub: closed", file=sys.stderr, flush=True)


globals().update(_start_session())
del _start_session
