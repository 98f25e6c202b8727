"""The device path, stage by stage and end to end, for the Pilatus 1M and EIGER2 9M presets.

For each preset (synthetic frames of one "run": fixed geometry and lattice, varying
intensities and noise; int32 with the detector's sentinels) it writes the frames to an
HDF5 file, builds a :class:`live_bgsub.device.DevicePath` for the shipped model
(``white-top-hat``, f=8, downsample 2; ``--model f16`` for an untrained f=16) and
measures, per batch of ``--batch`` frames (medians over ``--repeats`` after warm-up):

- ``read``: the batch from the HDF5 file (h5py slice, decode included);
- ``stage``: the host copy into the upload buffer and, with ``validity_check="host"``
  (the default on a CPU), the host's test of each frame's invalid pixels against the
  run's reference (:meth:`DevicePath.process` does both);
- ``upload``: host -> device (on TensorFlow a DLPack view of the aligned buffer, what
  :func:`live_bgsub.device.compiled_function` passes: no copy on the CPU; elsewhere
  ``keras.ops.convert_to_tensor``);
- ``fold``: the device fold alone (the pixel-major table, the 16-tap gather with the
  quadrant mean; the device's validity test where it makes it);
- ``resample``: block mean, normalisation, padding, restore, upsampling, subtraction
  (the pipeline's non-model steps, U-Net skipped);
- ``model``: the U-Net background head alone on a padded normalised batch: the
  *model-only* rate (input on the device, output left there: neither the host link
  nor a download is counted in it);
- ``metrics``: radial totals and the window weights' product with the sector pixels;
- ``download``: device -> host of the corrected folds and counts (``fold``, ``resample``
  and ``metrics`` are timed like ``model``: inputs on the device, outputs left there,
  a one-value read to wait for them);
- ``device``: the whole compiled function (:meth:`DevicePath.process`);
- ``write``: :class:`live_bgsub.sinks.hdf5.FoldWriter.append` of the corrected folds;
- ``emit``: ``event_model`` ``compose_event`` of each frame's metrics (the derived
  event the callback sends);
- ``end_to_end``: read -> process -> write -> emit for every frame of the file, batch
  after batch (full batches are read straight into the upload buffer,
  :meth:`DevicePath.upload_buffer`): frames/s and per-batch latency p50/p99 (a batch's frames are all
  available when it starts). After each full batch one model-only batch is timed: the
  model-only frames/s and the ratio come from these neighbours in time (the machine's
  load drifts; the stage rows are interleaved rounds for the same reason).

Reported with them: backend, precision, jit, batch size, model parameters and GFLOP per
frame (``unet_flops`` at the padded working shape), achieved GFLOP/s (model-only and
end to end) against the matmul rate of the row's precision measured on the same device
in the same run (:func:`device_peaks`: ``keras.ops.matmul``, 2048 x 2048 on a CPU, 8192
x 8192 on an accelerator, no download), the fold's modelled memory traffic per second
(frame, the batch's share of the 16-tap tables, fold written) against the device's copy bandwidth (the host's
numpy memcpy is reported beside it), the model's floor on the device (``unet_flops``
over the matmul rate or ``unet_traffic_bytes`` over the copy bandwidth, whichever is
longer) and how far the model-only time is above it (target on a GPU: within 2x), the
end-to-end / model-only frames/s ratio (target >= 0.8), the compile (first call) time, the
compilation count, and the reference numpy path (``Engine.process`` with
``roi_metrics``) on the same frames for comparison.

Run::

    python -m benchmarks.pipeline [--presets pilatus-1m eiger2-9m] [--frames 48]
        [--eiger-frames 4] [--batch 8] [--eiger-batch 2] [--precision float32 bfloat16]
        [--jit auto] [--validity-check auto] [--model white-top-hat] [--out-dir DIR] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._timing import time_call

# A "run": fixed geometry and lattice, intensities and noise vary from frame to frame.
RUN = {
    "pilatus-1m": {"center": (412.3, 489.7), "rotation_deg": 3.0, "s10_px": 55.0},
    "eiger2-9m": {"center": (1560.4, 1378.2), "rotation_deg": -2.0, "s10_px": 126.0},
}
_FIXED = {"d10_nm": 37.5, "z_ratio": 1.46, "sigma_k": 0.015, "sigma_phi_deg": 3.0}


def make_frames(preset: str, n: int, distinct: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` raw int32 frames of one synthetic run (``distinct`` patterns, cycled; one
    detector: the same gaps and dead pixels in every frame)."""
    from live_bgsub.synth import make_pattern

    rng = np.random.default_rng(seed)
    run = RUN[preset]
    patterns = []
    for i in range(min(n, distinct)):
        s10 = run["s10_px"] * (1 + rng.uniform(-0.01, 0.01))
        p = make_pattern(
            preset, seed=seed + i, center=run["center"], rotation_deg=run["rotation_deg"], s10_px=s10,
            i11_i10=rng.uniform(0.4, 2.0), **_FIXED,
        )
        patterns.append(p.raw())
    # One detector: the first pattern's gaps and dead pixels in every frame.
    invalid = patterns[0] < 0
    patterns = [np.where(invalid, patterns[0], np.maximum(p, 0)) for p in patterns]
    return [patterns[i % len(patterns)] for i in range(n)]


def device_peaks(precisions, repeats: int = 5) -> dict:
    """The device's own ceilings, measured in this run through ``keras.ops`` on the backend's
    device: matmul GFLOP/s per precision (``n x n`` products, n = 8192 on an accelerator,
    2048 on a CPU) and copy GB/s (``x + 1`` over 256 MB, bytes read + written). Each call
    ends with a one-value read (:func:`_sync`), never a download of the result, so that an
    accelerator's figure is its own and not the host link's."""
    import keras

    from live_bgsub.device import accelerator_present

    n = 8192 if accelerator_present() else 2048
    rng = np.random.default_rng(0)
    a32 = keras.ops.convert_to_tensor(rng.random((n, n), dtype=np.float32))
    b32 = keras.ops.convert_to_tensor(rng.random((n, n), dtype=np.float32))
    out = {}
    for precision in dict.fromkeys(["float32", *precisions]):
        a, b = keras.ops.cast(a32, precision), keras.ops.cast(b32, precision)
        t = time_call(lambda: _sync(keras.ops.matmul(a, b)), repeats, 1)[0]  # noqa: B023
        out[f"matmul_gflops_{precision}"] = 2 * n**3 / t / 1e9
    x = keras.ops.ones((64 * 2**20,), "float32")
    t = time_call(lambda: _sync(keras.ops.add(x, 1.0)), repeats, 1)[0]
    out["copy_gbps"] = 2 * 4 * 64 * 2**20 / t / 1e9
    out["matmul_n"] = n
    return out


def memcpy_gbps(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """numpy copy bandwidth, GB/s of bytes read + written."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    t = time_call(lambda: np.copyto(dst, src), repeats, 1)[0]
    return 2 * nbytes / t / 1e9


def _stage_models(path):
    """Compiled functions running one part of the pipeline each (share its variables), called
    like the pipeline itself (:func:`live_bgsub.device.compiled_function`)."""
    import keras

    from live_bgsub.device import compiled_function

    class Fold(keras.Model):
        def __init__(self, pipeline):
            super().__init__(name="stage_fold")
            self.pipeline = pipeline

        def call(self, inputs):
            return self.pipeline.fold_layer(*self.pipeline._split(inputs))

    class Resample(Fold):
        def call(self, inputs):
            fold, count = inputs
            return self.pipeline.subtract(fold, count, head=False)

    class Metrics(Fold):
        def call(self, inputs):
            corrected, background = inputs
            return self.pipeline.window_metrics(corrected, background)

    models = {"fold": Fold(path.pipeline), "resample": Resample(path.pipeline), "metrics": Metrics(path.pipeline)}
    for m in models.values():
        m.built = True
    # Outputs stay on the device: a stage is timed without downloading what it made.
    return {k: compiled_function(m, path.pipeline.jit_compile, to_numpy=False) for k, m in models.items()}


def _sync(x):
    """Wait for an asynchronous device result (a scalar read)."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.reshape(x, (-1,))[0], "float32"))  # (bfloat16: no numpy scalar)


def bench_preset(preset, args, model_spec, precision, peak) -> dict:
    import h5py
    import keras
    from event_model import compose_run

    from live_bgsub.device import (
        METRIC_NAMES,
        DevicePath,
        compiled_function,
        tf_view,
    )
    from live_bgsub.engine import Engine, make_step
    from live_bgsub.geometry import Geometry
    from live_bgsub.inference import BackgroundModel
    from live_bgsub.model import build_unet, unet_flops, unet_traffic_bytes
    from live_bgsub.sinks.hdf5 import FoldWriter

    eiger = preset == "eiger2-9m"
    n = args.eiger_frames if eiger else args.frames
    batch = args.eiger_batch if eiger else args.batch
    frames = make_frames(preset, n, 2 if eiger else 8)
    shape = frames[0].shape
    geometry = Geometry(RUN[preset]["center"], RUN[preset]["rotation_deg"])
    if model_spec in ("f8", "f16"):
        bm = BackgroundModel.load("white-top-hat")
        untrained = build_unet(depth=4, base_filters=int(model_spec[1:]))
        bm = BackgroundModel(untrained, {**bm.card, "name": model_spec}, bm.path)
    else:
        bm = BackgroundModel.load(model_spec)
    jit = {"auto": "auto", "on": True, "off": False}[args.jit]

    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_", dir=args.out_dir))
    raw_path = tmp / "raw.h5"
    with h5py.File(raw_path, "w") as f:
        f.create_dataset("/entry/data/data", data=np.stack(frames), chunks=(1, *shape))
    raw_file = h5py.File(raw_path, "r")
    ds = raw_file["/entry/data/data"]

    t = time.perf_counter()
    path = DevicePath(
        bm, geometry, shape, batch_size=batch, precision=precision, jit_compile=jit, with_background=False,
        validity_check=args.validity_check,
    )
    build_s = time.perf_counter() - t
    first = np.stack(frames[:batch])
    t = time.perf_counter()
    path.process(first)  # compile + the run's reference fit
    first_call_s = time.perf_counter() - t
    reference_s = path.last_timings_s.get("reference", 0.0)
    pipe = path.pipeline
    stages = _stage_models(path)
    buf = path.upload_buffer(batch)
    buf[:] = first
    inputs = path.device_inputs(buf)

    # Every stage's inputs are on the device already, as inside the pipeline's function (a
    # numpy input would be uploaded on every call: on a GPU, the host link's time).
    inputs = keras.tree.map_structure(keras.ops.convert_to_tensor, inputs)
    fold, count, _ = stages["fold"](inputs)
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).random((batch, *pipe.padded_shape, 1), dtype=np.float32))
    # The model-only call, made like the pipeline's, its output left on the device.
    head = compiled_function(pipe.head, pipe.jit_compile, to_numpy=False)
    corrected, metrics = path.process(first)
    fh, fw = path.fold_shape
    padded = np.zeros((batch, *path.device_fold_shape), np.float32)  # as the device holds it
    padded[:, :fh, :fw] = corrected
    padded = keras.ops.convert_to_tensor(padded)
    background = keras.ops.zeros(padded.shape, "float32")
    dev_out = [padded, keras.ops.zeros(padded.shape, "uint8")]
    writer = FoldWriter(tmp / "bench_write.h5", path.fold_shape)
    bundle = compose_run(metadata={"plan_name": "bench"})
    keys = {k: {"source": "bench", "dtype": "number", "shape": []} for k in (*METRIC_NAMES, "raw_seq_num", "latency_s")}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)

    def stage():
        b = path.upload_buffer(batch)
        for i in range(batch):
            b[i] = frames[i]
        path.device_inputs(b)

    def emit(metrics, seq0, t0):
        now = time.time()
        for i in range(len(metrics["tdi"])):
            data = {k: float(metrics[k][i]) for k in METRIC_NAMES}
            data.update(raw_seq_num=seq0 + i + 1, latency_s=time.perf_counter() - t0)
            desc.compose_event(data=data, timestamps={k: now for k in data}, time=now)

    # What the compiled function does with the upload buffer: a DLPack view on TensorFlow
    # (compiled_function), the backend's conversion elsewhere.
    upload = tf_view if keras.backend.backend() == "tensorflow" else keras.ops.convert_to_tensor
    stage_fns = {
        "read": lambda: ds[0:batch],
        "stage": stage,
        "upload": lambda: _sync(upload(buf)),
        "fold": lambda: _sync(stages["fold"](inputs)[0]),
        "resample": lambda: _sync(stages["resample"]((fold, count))[0]),
        "model": lambda: _sync(head(x)[0]),
        "metrics": lambda: _sync(stages["metrics"]((padded, background))[0]),
        "download": lambda: [keras.ops.convert_to_numpy(t) for t in dev_out],
        "device": lambda: path.process(first),
        "write": lambda: writer.append(corrected),
        "emit": lambda: emit(metrics, 0, time.perf_counter()),
    }
    # Interleaved rounds (every stage once per round): the machine's load drifts.
    samples = {k: [] for k in stage_fns}
    for fn in stage_fns.values():
        fn()
    for _ in range(args.repeats):
        for k, fn in stage_fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    writer.close()
    timings = {k: statistics.median(v) for k, v in samples.items()}

    # End to end over the whole file, batch after batch; a model-only batch after each
    # full batch (the ratio compares neighbours in time).
    compiles_before = path.compilations
    writer = FoldWriter(tmp / "end_to_end.h5", path.fold_shape)
    latencies, full_batches, model_times = [], [], []
    seq = 0
    total = 0.0
    for start in range(0, n, batch):
        t0 = time.perf_counter()
        if start + batch <= n:  # a full batch: read straight into the upload buffer
            raw = path.upload_buffer(batch)
            ds.read_direct(raw, np.s_[start : start + batch])
        else:
            raw = ds[start : start + batch]
        corrected, metrics = path.process(raw)
        writer.append(corrected)
        emit(metrics, seq, t0)
        seq += len(raw)
        latencies.append(time.perf_counter() - t0)
        total += latencies[-1]
        if len(raw) == batch:
            full_batches.append(latencies[-1])
            t = time.perf_counter()
            _sync(head(x)[0])
            model_times.append(time.perf_counter() - t)
    writer.close()

    # The numpy reference path on the same frames (fold map, model step, roi_metrics).
    engine = Engine(make_step(bm), geometry, shape)
    engine.process(frames[:1])
    n_ref = min(n, 2 * batch if not eiger else 2)
    t_ref = time.perf_counter()
    for start in range(0, n_ref, batch):
        engine.process(frames[start : min(start + batch, n_ref)])
    ref_fps = n_ref / (time.perf_counter() - t_ref)

    raw_file.close()
    fh, fw = path.fold_shape
    gflop = unet_flops(bm.model, pipe.padded_shape) / 1e9
    # The model's floor on this device: its arithmetic over the matmul rate, or the bytes it
    # must move over the copy bandwidth, whichever is longer.
    itemsize = 4 if precision == "float32" else 2
    model_gb = unet_traffic_bytes(bm.model, pipe.padded_shape, itemsize) / 1e9
    floor_ms = 1e3 * max(gflop / peak[f"matmul_gflops_{precision}"], model_gb / peak["copy_gbps"])
    model_fps = batch / statistics.median(model_times) if model_times else batch / timings["model"]
    e2e_fps = n / total
    frame_bytes = int(np.prod(shape)) * path.upload_dtype.itemsize
    # Per frame: the frame, its share of the 16 (index, weight) taps read once per batch, fold + count out.
    fold_bytes = frame_bytes + fh * fw * (16 * 8 / batch + 8)
    return {
        "preset": preset,
        "frame_shape": list(shape),
        "fold_shape": [fh, fw],
        "working_shape": list(pipe.work_shape),
        "padded_shape": list(pipe.padded_shape),
        "frames": n,
        "batch": batch,
        "backend": keras.backend.backend(),
        "precision": precision,
        "jit_compile": bool(pipe.jit_compile),
        "validity_check": path.validity_check,
        "out_dir": str(tmp.parent),
        "model": bm.name if model_spec not in ("f8", "f16") else f"{model_spec} (untrained)",
        "params": int(bm.model.count_params()),
        "gflop_per_frame": gflop,
        "build_s": build_s,
        "first_call_s": first_call_s,
        "reference_fit_s": reference_s,
        "compilations": path.compilations,
        "compilations_end_to_end": path.compilations - compiles_before,
        "fold_paths": dict(path.fold_paths),
        "ms_per_frame": {k: 1e3 * v / batch for k, v in timings.items()},
        "end_to_end": {
            "frames_per_s": e2e_fps,
            "latency_p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "latency_p99_ms": 1e3 * float(np.percentile(latencies, 99)),
            "batches": len(latencies),
        },
        "model_only_frames_per_s": model_fps,
        "ratio_end_to_end_to_model": e2e_fps / model_fps,
        "ratio_per_batch_medians": statistics.median(model_times) / statistics.median(full_batches) if full_batches else None,
        "model_gb_per_frame": model_gb,
        "model_floor_ms_per_frame": floor_ms,
        "model_over_floor": 1e3 / model_fps / floor_ms,
        "gflops_model": gflop * model_fps,
        "gflops_end_to_end": gflop * e2e_fps,
        "fraction_of_matmul_model": gflop * model_fps / peak[f"matmul_gflops_{precision}"],
        "fraction_of_matmul_end_to_end": gflop * e2e_fps / peak[f"matmul_gflops_{precision}"],
        "fold_bytes_per_frame": fold_bytes,
        "fold_gbps": fold_bytes / (timings["fold"] / batch) / 1e9,
        "fraction_of_copy_fold": fold_bytes / (timings["fold"] / batch) / 1e9 / peak["copy_gbps"],
        "reference_numpy_frames_per_s": ref_fps,
        "reference_numpy_frames": n_ref,
    }


def run(args) -> dict:
    import keras

    peak = {**device_peaks(args.precision), "memcpy_gbps": memcpy_gbps()}
    rows = []
    for preset in args.presets:
        for precision in args.precision:
            rows.append(bench_preset(preset, args, args.model, precision, peak))
            print(to_markdown({"rows": rows[-1:], **_header(peak, keras)}), flush=True)
            if args.json:  # after every row: a run cut short by a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({**_header(peak, keras), "rows": rows}, f, indent=2)
    return {**_header(peak, keras), "rows": rows}


def _header(peak, keras):
    return {
        "backend": keras.backend.backend(),
        "device": _device_name(),
        "peak": peak,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }


def _device_name() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0])
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"cpu ({os.cpu_count()} cores)"


STAGES = ("read", "stage", "upload", "fold", "resample", "model", "metrics", "download", "device", "write", "emit")


def to_markdown(report: dict) -> str:
    p = report["peak"]
    lines = [
        (
            f"backend {report['backend']} on {report['device']}; matmul ({p['matmul_n']}^3) "
            + ", ".join(f"{k[len('matmul_gflops_'):]} {v:.0f}" for k, v in p.items() if k.startswith("matmul_gflops_"))
            + f" GFLOP/s; device copy {p['copy_gbps']:.1f} GB/s; host memcpy {p['memcpy_gbps']:.1f} GB/s"
        ),
        "",
        "| preset | precision | batch | " + " | ".join(STAGES) + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    for r in report["rows"]:
        ms = r["ms_per_frame"]
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['batch']} | " + " | ".join(f"{ms[s]:.1f}" for s in STAGES) + " |"
        )
    lines += [
        "",
        (
            "| preset | precision | jit | batch | frames/s end to end | p50 / p99 batch latency (ms) | model-only frames/s "
            "| ratio | GFLOP/frame | GFLOP/s model (of matmul) | model ms/frame (floor, x floor) | GFLOP/s end to end "
            "| fold GB/s (of device copy) "
            "| compilations | first call (s) | numpy path frames/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        e = r["end_to_end"]
        lines.append(
            f"| {r['preset']} | {r['precision']} | {'on' if r['jit_compile'] else 'off'} | {r['batch']} | "
            f"{e['frames_per_s']:.2f} | {e['latency_p50_ms']:.0f} / {e['latency_p99_ms']:.0f} | "
            f"{r['model_only_frames_per_s']:.2f} | {r['ratio_end_to_end_to_model']:.2f} | {r['gflop_per_frame']:.2f} | "
            f"{r['gflops_model']:.0f} ({100 * r['fraction_of_matmul_model']:.0f}%) | "
            f"{1e3 / r['model_only_frames_per_s']:.3g} ({r['model_floor_ms_per_frame']:.3g}, {r['model_over_floor']:.1f}x) | "
            f"{r['gflops_end_to_end']:.0f} | "
            f"{r['fold_gbps']:.1f} ({100 * r['fraction_of_copy_fold']:.0f}%) | {r['compilations']} | "
            f"{r['first_call_s']:.1f} | {r['reference_numpy_frames_per_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["pilatus-1m", "eiger2-9m"], choices=sorted(RUN))
    ap.add_argument("--frames", type=int, default=48, help="Pilatus 1M frames end to end")
    ap.add_argument("--eiger-frames", type=int, default=4, help="EIGER2 9M frames end to end")
    ap.add_argument("--batch", type=int, default=8, help="Pilatus batch size")
    ap.add_argument("--eiger-batch", type=int, default=2, help="EIGER2 9M batch size")
    ap.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--jit", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--validity-check", default="auto", choices=["auto", "host", "device"])
    ap.add_argument("--model", default="white-top-hat", help="shipped name, .keras path, or f8/f16 (untrained)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", help="where the raw and corrected HDF5 files go (default: the system temp dir)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    report = run(args)
    print()
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
