"""What a synthetic frame costs: ``live_bgsub.synth.make_pattern`` per detector preset.

The tests render many patterns (the simulated detector renders its bank with it too);
this measures how long one takes, per preset, as the median of ``--repeats`` seeded
calls after a warm-up (new seeds each call: nothing is cached between patterns).

Run::

    python -m benchmarks.synth [--presets pilatus-1m eiger2-9m] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def time_presets(presets, repeats: int) -> dict:
    """``{preset: {shape, median_s, times_s}}``: make_pattern timed on fresh seeds."""
    from live_bgsub.synth import make_pattern

    out = {}
    for preset in presets:
        make_pattern(preset, seed=0)  # warm-up: imports, the preset's masks
        times = []
        for seed in range(1, repeats + 1):
            start = time.perf_counter()
            pattern = make_pattern(preset, seed=seed)
            times.append(time.perf_counter() - start)
        out[preset] = {"shape": list(pattern.frame.shape), "median_s": statistics.median(times), "times_s": times}
    return out


def main(argv=None) -> int:
    from live_bgsub.synth import PRESETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["pilatus-1m", "eiger2-9m"], choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT", help="write the report here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "repeats": args.repeats,
        "presets": time_presets(args.presets, args.repeats),
    }
    print("preset | shape | make_pattern median (s)")
    print("--- | --- | ---")
    for preset, row in report["presets"].items():
        print(f"{preset} | {row['shape'][0]} x {row['shape'][1]} | {row['median_s']:.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
