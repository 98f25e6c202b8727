"""Keras backends side by side: install size and time, ``import keras``, and the device path's first frame.

For each backend (``tensorflow``, ``jax``, ``torch``), in its own virtual environment
holding the project with that backend only, it measures:

- **install** (with ``--create``): ``python3 -m venv`` then the wall time of
  ``pip install SOURCE[EXTRA]`` (non-editable; pip uses whatever its cache holds: the
  cache's size before and after is printed), in ``--install-rounds`` rounds, the
  backends' order rotated each round, a fresh venv each time (the last round's stays);
- **size**: ``du -sb`` of the venv; the bytes of the backend's own distributions
  (``tensorflow*``, ``jax*``/``jaxlib``, ``torch``, and ``nvidia-*``/``triton`` when pip
  brought them; from each distribution's RECORD); and the bytes of every distribution
  that is not in all of the measured venvs (what choosing that backend brings along);
- **import keras**: seconds of ``import keras`` with ``KERAS_BACKEND`` set, in a fresh
  interpreter (one untimed warm-up each, then ``--import-repeats`` rounds interleaved
  across backends; median);
- **first frame**: a fresh process (one per backend per round, ``--rounds`` rounds, the
  backends interleaved) builds ``DevicePath(MODEL, geometry, shape, batch_size=8)`` for a
  synthetic ``synth.make_pattern(PRESET, seed=0).raw()`` frame and its true centre and
  rotation, and times construction (Keras and the backend imported, the model loaded)
  plus the first ``process([frame])`` (the fold map, the compilation of the batch-1
  function, the metrics' reference fit, the call): the first-frame latency of a newly
  started worker. The frame is made before the clock starts;
- **steady**: in the same processes, kept alive side by side, ``--steady-calls``
  ``process([frame])`` calls and then (after one untimed call that compiles the batch-8
  function; its seconds are reported) ``--batch-calls`` ``process(8 copies of the
  frame)`` calls, each call made in turn in every backend's process (interleaved);
  medians per frame over all rounds.

The driver uses only the standard library; everything else runs in the venvs through
subprocesses (from an empty scratch directory, so the installed package is what runs, not a
checkout or a stray module). ``--default-venv`` adds the size of another environment (the development
venv with all three backends) for comparison.

Run::

    python -m benchmarks.backends --create --root /tmp/bk --source /path/to/tree
        [--backends tensorflow jax torch] [--install-rounds 1] [--rounds 3]
        [--default-venv .venv] [--json out.json]
    python -m benchmarks.backends --venv tensorflow=/tmp/bk/tensorflow jax=/tmp/bk/jax torch=/tmp/bk/torch

``--source`` must declare the extras ``[tensorflow]``, ``[jax]`` and ``[torch]``
(``--extra BACKEND=NAME`` names them otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")

#: The distributions that are the backend itself (lower-case, ``-`` for ``_``).
BACKEND_DISTS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-io-gcs-filesystem", "tensorflow-estimator"),
    "jax": ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt"),
    "torch": ("torch", "triton", "pytorch-triton"),
}
#: Prefixes of distributions counted with every backend when present (CUDA libraries).
BACKEND_PREFIXES = ("nvidia-",)

_MARK = "@@backends "

# Run inside each venv: the sizes of its installed distributions (from their RECORDs).
_SIZES = r"""
import json, os
from importlib import metadata
out = {}
for d in metadata.distributions():
    name = (d.metadata["Name"] or "?").lower().replace("_", "-")
    total = 0
    for f in d.files or ():
        try:
            total += os.path.getsize(d.locate_file(f))
        except OSError:
            pass
    out[name] = {"version": d.version, "bytes": total}
print(json.dumps(out))
"""

_IMPORT = r"""
import time
t = time.perf_counter()
import keras
dt = time.perf_counter() - t
print(dt, keras.backend.backend())
"""

# A long-lived worker: one JSON command a line on stdin, one marked JSON answer a line
# on stdout (libraries may print other lines).
_WORKER = r"""
import json, sys, time, traceback
MARK = "@@backends "
def answer(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n"); sys.stdout.flush()
state = {}
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["cmd"] == "first":
            import numpy as np
            from live_bgsub import synth
            from live_bgsub.geometry import Geometry
            pat = synth.make_pattern(cmd["preset"], seed=0)
            frame = pat.raw()
            geometry = Geometry(tuple(pat.params["center"]), float(pat.params["rotation_deg"]))
            batch = np.stack([frame] * cmd["batch_size"])
            t0 = time.perf_counter()
            try:
                from live_bgsub.device import DevicePath  # the package (issue 17)
            except ImportError:
                from live_bgsub.device_path import DevicePath  # before it
            dp = DevicePath(cmd["model"], geometry, frame.shape, batch_size=cmd["batch_size"])
            t1 = time.perf_counter()
            dp.process([frame])
            t2 = time.perf_counter()
            import keras
            backend = keras.backend.backend()
            device = dp.describe().get("device", {})
            mod = __import__({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend))
            state.update(dp=dp, frame=frame, batch=batch)
            answer({"ok": True, "construct_s": t1 - t0, "first_call_s": t2 - t1, "first_frame_s": t2 - t0,
                    "stages_s": dict(dp.last_timings_s), "backend": backend,
                    "keras": keras.__version__, "backend_version": getattr(mod, "__version__", "?"),
                    "jit_compile": str(device.get("jit_compile", dp.jit_compile)),
                    "validity_check": str(device.get("validity_check", getattr(dp, "validity_check", "?"))),
                    "shape": list(frame.shape), "dtype": str(frame.dtype),
                    "center": list(geometry.center), "rotation_deg": geometry.rotation_deg})
        elif cmd["cmd"] == "call":
            dp = state["dp"]
            frames = [state["frame"]] if cmd["batch"] == 1 else state["batch"][: cmd["batch"]]
            times = []
            for _ in range(cmd["n"]):
                t = time.perf_counter()
                dp.process(frames)
                times.append(time.perf_counter() - t)
            answer({"ok": True, "times": times, "compilations": dp.compilations})
        elif cmd["cmd"] == "quit":
            answer({"ok": True})
            break
    except BaseException as e:
        answer({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
"""


def _env(backend: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


_SCRATCH: list[str] = []


def _scratch() -> str:
    """An empty directory to run the venvs' interpreters in (``-c`` puts the working directory first on sys.path)."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="backends-cwd-"))
    return _SCRATCH[0]


def _python(venv) -> str:
    return str(Path(venv) / "bin" / "python")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def _pip_cache_bytes() -> int | None:
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    return _du(cache) if cache.exists() else None


def create(root: Path, source: str, backends, extras: dict, rounds: int, log) -> dict:
    """Fresh venvs under ``root``: ``{backend: {"venv", "install_s": [...], "venv_s": [...]}}``."""
    root.mkdir(parents=True, exist_ok=True)
    out = {b: {"venv": str(root / b), "install_s": [], "venv_s": [], "order": []} for b in backends}
    for r in range(rounds):
        order = list(backends[r % len(backends):]) + list(backends[: r % len(backends)])
        for pos, b in enumerate(order):
            venv = root / b
            if venv.exists():
                shutil.rmtree(venv)
            t = time.perf_counter()
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
            out[b]["venv_s"].append(time.perf_counter() - t)
            cache = _pip_cache_bytes()
            log(f"install round {r + 1} #{pos + 1}: {b} (pip cache {_mb(cache)}, load {_load()})")
            spec = f"{source}[{extras[b]}]"
            t = time.perf_counter()
            proc = subprocess.run([_python(venv), "-m", "pip", "install", "-q", spec], capture_output=True,
                                  text=True, cwd=_scratch(), env=_env(b))
            dt = time.perf_counter() - t
            if proc.returncode:
                raise SystemExit(f"pip install {spec} into {venv} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            out[b]["install_s"].append(dt)
            out[b]["order"].append(pos + 1)
            log(f"  {dt:.1f} s")
    return out


def sizes(venvs: dict) -> dict:
    """Per venv: ``du -sb``, the backend's own distributions and those not common to all venvs."""
    dists = {}
    for b, venv in venvs.items():
        proc = subprocess.run([_python(venv), "-c", _SIZES], capture_output=True, text=True, check=True,
                              cwd=_scratch())
        dists[b] = json.loads(proc.stdout)
    common = set.intersection(*(set(d) for d in dists.values())) if dists else set()
    out = {}
    for b, venv in venvs.items():
        d = dists[b]
        own = {n: v for n, v in d.items() if n in BACKEND_DISTS.get(b, ()) or n.startswith(BACKEND_PREFIXES)}
        extra = {n: v for n, v in d.items() if n not in common}
        out[b] = {
            "venv_bytes": _du(Path(venv)),
            "backend_bytes": sum(v["bytes"] for v in own.values()),
            "backend_dists": {n: v["version"] for n, v in sorted(own.items())},
            "brought_bytes": sum(v["bytes"] for v in extra.values()),
            "brought_dists": sorted(extra),
            "keras": d.get("keras", {}).get("version"),
            "pip": d.get("pip", {}).get("version"),
            "n_dists": len(d),
        }
    return out


def import_times(venvs: dict, repeats: int) -> dict:
    """Seconds of ``import keras`` per backend: one warm-up, then ``repeats`` interleaved rounds."""
    out = {b: [] for b in venvs}
    for r in range(repeats + 1):
        for b, venv in venvs.items():
            proc = subprocess.run([_python(venv), "-c", _IMPORT], capture_output=True, text=True,
                                  cwd=_scratch(), env=_env(b))
            if proc.returncode:
                raise SystemExit(f"import keras failed in {venv}:\n{proc.stderr[-3000:]}")
            dt, got = proc.stdout.split()[-2:]
            if got != b:
                raise SystemExit(f"{venv}: KERAS_BACKEND={b} gave backend {got}")
            if r:
                out[b].append(float(dt))
    return out


class Worker:
    """A device-path process in one venv (see ``_WORKER``)."""

    def __init__(self, backend: str, venv: Path, log_dir: Path):
        self.backend = backend
        self.stderr_path = log_dir / f"{backend}.{time.time_ns()}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([_python(venv), "-u", "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     cwd=_scratch(), env=_env(backend))

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
        self._stderr.flush()
        tail = self.stderr_path.read_text()[-3000:]
        return {"ok": False, "error": f"worker exited (rc {self.proc.wait()})", "traceback": tail}

    def close(self):
        if self.proc.poll() is None:
            try:
                self.ask(cmd="quit")
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def device_path(venvs: dict, *, model: str, preset: str, batch_size: int, rounds: int, steady_calls: int,
                batch_calls: int, log) -> dict:
    """First frame and steady per-frame times per backend (rounds of interleaved processes)."""
    out = {b: {"first": [], "steady1_s": [], "steadyN_s": [], "compileN_s": [], "error": None} for b in venvs}
    log_dir = Path(tempfile.mkdtemp(prefix="backends-"))
    for r in range(rounds):
        workers = {}
        try:
            for b, venv in venvs.items():
                if out[b]["error"]:
                    continue
                w = Worker(b, Path(venv), log_dir)
                res = w.ask(cmd="first", model=model, preset=preset, batch_size=batch_size)
                if not res["ok"]:
                    out[b]["error"] = res["error"]
                    out[b]["traceback"] = res.get("traceback")
                    log(f"{b}: device path failed: {res['error']}")
                    w.close()
                    continue
                workers[b] = w
                out[b]["first"].append(res)
                log(f"round {r + 1} {b}: first frame {res['first_frame_s']:.2f} s (load {_load()})")
            for _ in range(steady_calls):
                for b, w in workers.items():
                    res = w.ask(cmd="call", batch=1, n=1)
                    if not res["ok"]:
                        raise SystemExit(f"{b}: {res['error']}\n{res.get('traceback')}")
                    out[b]["steady1_s"].extend(res["times"])
            for b, w in workers.items():  # compiles the batch function: timed apart
                res = w.ask(cmd="call", batch=batch_size, n=1)
                if not res["ok"]:
                    raise SystemExit(f"{b}: {res['error']}\n{res.get('traceback')}")
                out[b]["compileN_s"].extend(res["times"])
            for _ in range(batch_calls):
                for b, w in workers.items():
                    res = w.ask(cmd="call", batch=batch_size, n=1)
                    if not res["ok"]:
                        raise SystemExit(f"{b}: {res['error']}\n{res.get('traceback')}")
                    out[b]["steadyN_s"].extend(res["times"])
                    out[b]["compilations"] = res["compilations"]
            log(f"round {r + 1}: steady calls done (load {_load()})")
        finally:
            for w in workers.values():
                w.close()
    return out


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def _med(xs, scale=1.0, fmt="{:.2f}") -> str:
    return fmt.format(statistics.median(xs) * scale) if xs else "-"


def to_markdown(report: dict) -> str:
    batch = report["config"]["batch_size"]
    lines = [
        f"backends on {report['machine']}; load (1/5/15 min) {report['load_before']} before, "
        f"{report['load_after']} after; {report['date']}",
        "",
        f"| backend | venv size | backend packages | brought by the backend | install s | import keras s "
        f"| first frame s | steady ms/frame batch 1 | ms/frame batch {batch} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in report["backends"]:
        s = report.get("sizes", {}).get(b, {})
        ins = report.get("install", {}).get(b, {}).get("install_s", [])
        imp = report.get("import_keras_s", {}).get(b, [])
        dev = report.get("device_path", {}).get(b, {})
        if dev.get("error"):
            first = steady1 = steady_n = f"failed: {dev['error'][:120]}"
        else:
            first = _med([f["first_frame_s"] for f in dev.get("first", [])])
            steady1 = _med(dev.get("steady1_s", []), 1e3, "{:.1f}")
            steady_n = _med(dev.get("steadyN_s", []), 1e3 / batch, "{:.1f}")
        lines.append(f"| {b} | {_mb(s.get('venv_bytes'))} | {_mb(s.get('backend_bytes'))} "
                     f"| {_mb(s.get('brought_bytes'))} | {_med(ins, fmt='{:.0f}')} | {_med(imp)} "
                     f"| {first} | {steady1} | {steady_n} |")
    lines.append("")
    for b in report["backends"]:
        s = report.get("sizes", {}).get(b, {})
        dev = report.get("device_path", {}).get(b, {})
        ins = report.get("install", {}).get(b, {})
        parts = []
        if s:
            parts.append("backend distributions " + ", ".join(f"{n} {v}" for n, v in s["backend_dists"].items())
                         + f"; keras {s['keras']}; pip {s['pip']}; {s['n_dists']} distributions")
            parts.append("not in every venv: " + ", ".join(s["brought_dists"]))
        if ins.get("install_s"):
            parts.append("install s per round " + ", ".join(
                f"{t:.0f} (#{o})" for t, o in zip(ins["install_s"], ins["order"])))
        if report.get("import_keras_s", {}).get(b):
            parts.append("import keras s " + ", ".join(f"{t:.2f}" for t in report["import_keras_s"][b]))
        if dev.get("first"):
            f = dev["first"]
            parts.append("first frame s " + ", ".join(f"{x['first_frame_s']:.2f}" for x in f)
                         + f" (construct {_med([x['construct_s'] for x in f])}, first call "
                         f"{_med([x['first_call_s'] for x in f])}; jit {f[0]['jit_compile']}; "
                         f"validity check {f[0].get('validity_check')}; {f[0]['backend']} {f[0]['backend_version']})")
            parts.append(f"batch-{batch} compile + first call s " + ", ".join(f"{t:.2f}" for t in dev["compileN_s"])
                         + f"; calls timed: {len(dev['steady1_s'])} x batch 1, {len(dev['steadyN_s'])} x batch {batch}"
                         + f"; compilations {dev.get('compilations')}")
        if dev.get("error"):
            parts.append("device path error: " + dev["error"])
        lines.append(f"- **{b}**: " + "; ".join(parts))
    if report.get("default_venv"):
        d = report["default_venv"]
        lines.append(f"- default environment {d['path']}: {_mb(d['bytes'])} (`du -sb`)")
    if "pip_cache_before" in report:
        before, after = (report.get(k) for k in ("pip_cache_before", "pip_cache_after"))
        lines.append(f"- pip cache (~/.cache/pip or PIP_CACHE_DIR): {'absent' if before is None else _mb(before)} "
                     f"before the installs, {'absent' if after is None else _mb(after)} after")
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", nargs="+", default=[], metavar="BACKEND=PATH", help="existing venvs to measure")
    ap.add_argument("--create", action="store_true", help="create fresh venvs under --root first (timed installs)")
    ap.add_argument("--root", default="/tmp/bk", help="where --create puts ROOT/BACKEND (default /tmp/bk)")
    ap.add_argument("--source", default=".", help="the project to install with --create (default .)")
    ap.add_argument("--extra", nargs="+", default=[], metavar="BACKEND=EXTRA", help="extra name per backend")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--install-rounds", type=int, default=1)
    ap.add_argument("--import-repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="fresh device-path processes per backend")
    ap.add_argument("--steady-calls", type=int, default=20, help="batch-1 calls per round")
    ap.add_argument("--batch-calls", type=int, default=10, help="full-batch calls per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="model:smoothed-gaussian")
    ap.add_argument("--preset", default="pilatus-1m")
    ap.add_argument("--default-venv", help="also report this environment's size (du -sb)")
    ap.add_argument("--json", help="write the full report here")
    args = ap.parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    report = {
        "machine": _machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": _load(), "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "config": {k: v for k, v in vars(args).items()}, "backends": list(args.backends),
    }
    log(f"start: {report['uptime_before']}")
    extras = {b: b for b in args.backends} | dict(e.split("=", 1) for e in args.extra)
    venvs = dict(v.split("=", 1) for v in args.venv)
    if args.create:
        report["pip_cache_before"] = _pip_cache_bytes()
        report["install"] = create(Path(args.root), args.source, args.backends, extras, args.install_rounds, log)
        report["pip_cache_after"] = _pip_cache_bytes()
        venvs = {b: report["install"][b]["venv"] for b in args.backends} | venvs
    missing = [b for b in args.backends if b not in venvs]
    if missing:
        ap.error(f"no venv for {missing}: give --venv BACKEND=PATH or --create")
    venvs = {b: str(Path(venvs[b]).absolute()) for b in args.backends}
    log("sizes")
    report["sizes"] = sizes(venvs)
    if args.default_venv:
        report["default_venv"] = {"path": args.default_venv, "bytes": _du(Path(args.default_venv))}
    log(f"import keras x {args.import_repeats} (load {_load()})")
    report["import_keras_s"] = import_times(venvs, args.import_repeats)
    log(f"device path (load {_load()})")
    report["device_path"] = device_path(venvs, model=args.model, preset=args.preset, batch_size=args.batch_size,
                                        rounds=args.rounds, steady_calls=args.steady_calls,
                                        batch_calls=args.batch_calls, log=log)
    report["load_after"] = _load()
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    log(f"end: {report['uptime_after']}")
    print(to_markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
