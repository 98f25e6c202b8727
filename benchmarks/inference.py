"""U-Net inference speed: latency, frames/s and achieved GFLOP/s against a matmul roofline.

For each model (shipped names, ``.keras`` paths, or untrained architectures ``f8`` /
``f16`` when no file is given: speed does not depend on the weights), each input size
(the Pilatus 1M fold at the models' working downsample 2, 288 x 304 padded, and
512 x 512) and each batch size (1, 8), it times the model call and reports:

- per-frame latency (median batch time / batch) and frames/s,
- GFLOP per frame (2 x multiply-adds of the convolutions, ``unet_flops``) and achieved
  GFLOP/s,
- that as a fraction of the machine's float32 matmul GFLOP/s measured in the same run
  (``keras.ops.matmul`` on 2048 x 2048, the same backend).

Run::

    python -m benchmarks.inference [--models f8 f16 mixed] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from benchmarks._timing import time_call

SIZES = {"pilatus-fold-ds2": (288, 304), "512x512": (512, 512)}


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    return float(time_call(fn, repeats, warmup)[0])


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """float32 matmul GFLOP/s of this machine through keras.ops (same backend)."""
    import keras

    a = keras.ops.convert_to_tensor(np.random.default_rng(0).random((n, n), dtype=np.float32))
    b = keras.ops.convert_to_tensor(np.random.default_rng(1).random((n, n), dtype=np.float32))

    def run():
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b))

    return 2 * n**3 / _median_seconds(run, repeats) / 1e9


def _load(spec: str):
    from live_bgsub.inference import BackgroundModel
    from live_bgsub.model import build_unet

    if spec in ("f8", "f16"):
        return spec, build_unet(depth=4, base_filters=int(spec[1:]))
    engine = BackgroundModel.load(spec)
    return engine.name, engine.model


def run(models, repeats: int) -> dict:
    import keras

    from live_bgsub.model import unet_flops

    peak = matmul_gflops()
    rows = []
    for spec in models:
        name, model = _load(spec)
        predict = model.predict_on_batch  # Keras's traced predict function, any backend
        eager = lambda x, m=model: keras.ops.convert_to_numpy(m(x, training=False))  # noqa: E731
        for size_name, shape in SIZES.items():
            gflop = unet_flops(model, shape) / 1e9
            for batch in (1, 8):
                x = np.random.default_rng(2).random((batch, *shape, 1), dtype=np.float32)
                t = _median_seconds(lambda: predict(x), repeats)
                t_eager = _median_seconds(lambda: eager(x), max(3, repeats // 3))
                rows.append({
                    "model": name,
                    "params": int(model.count_params()),
                    "size": size_name,
                    "shape": list(shape),
                    "batch": batch,
                    "ms_per_frame": 1e3 * t / batch,
                    "ms_per_frame_eager": 1e3 * t_eager / batch,
                    "frames_per_s": batch / t,
                    "gflop_per_frame": gflop,
                    "gflops": gflop * batch / t,
                    "fraction_of_matmul": gflop * batch / t / peak,
                })
    return {
        "backend": keras.backend.backend(),
        "precision": "float32",
        "matmul_gflops": peak,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "rows": rows,
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"backend {report['backend']}, {report['precision']}; matmul roofline {report['matmul_gflops']:.0f} GFLOP/s",
        "",
        "| model | params | input | batch | ms/frame | ms/frame (eager call) | frames/s | GFLOP/frame | GFLOP/s | of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | "
            f"{r['ms_per_frame']:.1f} | {r['ms_per_frame_eager']:.1f} | {r['frames_per_s']:.1f} | "
            f"{r['gflop_per_frame']:.2f} | {r['gflops']:.0f} | {100 * r['fraction_of_matmul']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="shipped names, .keras paths, or f8/f16 (untrained)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.models is None:
        from live_bgsub.inference import SHIPPED_MODELS, shipped_model_path

        args.models = [m for m in SHIPPED_MODELS if shipped_model_path(m).exists()] or ["f8", "f16"]
    report = run(args.models, args.repeats)
    print(to_markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
