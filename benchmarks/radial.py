"""Radial (azimuthal) integration: live_bgsub.geometry.radial_profile against pyFAI.

On a noise-free synthetic powder frame (Pilatus 1M, 1-px bins to r = 500 px) it
reports the largest relative difference of the mean per bin between our histogram and
pyFAI's ``integrate1d`` with no pixel splitting (the same estimator) and with pixel
splitting (``bbox``/``full``, a different estimator), and the median time of:

- ours (the geometry may change every frame: nothing cached),
- pyFAI with a new integrator per frame (what a per-frame geometry costs it),
- pyFAI with one integrator reused (its look-up tables cached).

Run::

    python -m benchmarks.radial [--repeats 9]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._timing import time_call
from live_bgsub.geometry import radial_profile
from live_bgsub.synth import make_powder


def _median_ms(fn, repeats):
    return 1e3 * time_call(fn, repeats)[0]


def main(argv=None) -> int:
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    p = make_powder("pilatus-1m", seed=3, noise=False)
    img, mask = p.frame, p.mask
    cx, cy = p.params["center"]
    rmax = 500
    px = 1e-3  # 1 mm pixels at 1 m: pyFAI's "r_mm" is then the radius in pixels

    def integrator():
        # pyFAI puts pixel centres at (i + 0.5) * pixel from the detector corner.
        return AzimuthalIntegrator(dist=1.0, poni1=(cy + 0.5) * px, poni2=(cx + 0.5) * px, pixel1=px, pixel2=px)

    def pyfai(ai, method):
        return ai.integrate1d(
            img, rmax, unit="r_mm", radial_range=(0, rmax), mask=(~mask).astype(np.int8),
            method=method, correctSolidAngle=False, polarization_factor=None,
        )

    radius, mean, count = radial_profile(img, mask, (cx, cy), bin_width=1.0, rmax=rmax)
    rows = []
    for name, method in [("no split (histogram)", ("no", "histogram", "cython")), ("bbox split (csr)", ("bbox", "csr", "cython")), ("full split (csr)", ("full", "csr", "cython"))]:
        ai = integrator()
        res = pyfai(ai, method)
        ok = (count > 20) & np.isfinite(res.intensity) & (np.abs(res.intensity) > 0)
        rel = np.abs(res.intensity[ok] / mean[ok] - 1)
        rows.append(
            (name, float(np.abs(res.radial - radius).max()), float(np.median(rel)), float(rel.max()),
             _median_ms(lambda: pyfai(integrator(), method), args.repeats),
             _median_ms(lambda: pyfai(ai, method), args.repeats))
        )
    ours = _median_ms(lambda: radial_profile(img, mask, (cx, cy), bin_width=1.0, rmax=rmax), args.repeats)
    print(f"Pilatus 1M synthetic powder frame, 1-px bins to r={rmax}; median of {args.repeats}")
    print(f"ours (nothing cached): {ours:.1f} ms")
    print("| pyFAI method | bin centre diff (px) | rel. diff median | rel. diff max | pyFAI new integrator (ms) | pyFAI cached (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1e} | {r[2]:.1e} | {r[3]:.1e} | {r[4]:.1f} | {r[5]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
