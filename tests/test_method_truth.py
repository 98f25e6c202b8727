"""The "which method is right" table: its numbers behave as the truth says they must."""

import math

from benchmarks.method_truth import evaluate, to_markdown


def test_truth_table_orders_oracle_none_and_a_method():
    summary = evaluate(2, ["none", "convex-hull"], downsample=2, seed0=40)
    oracle, none, hull = summary["oracle"], summary["none"], summary["convex-hull"]
    # Subtracting the true background leaves only photon noise: S10 and I11/I10 exact.
    assert oracle["s10_err_worst_px"] < 0.5
    assert oracle["i11_i10_rel_err_worst"] < 0.05
    # Leaving the background in is far from the truth; a real method is in between.
    assert none["mae"] > 3 * hull["mae"]
    assert hull["mae"] > oracle["mae"]
    assert none["psnr_db"] < hull["psnr_db"] < oracle["psnr_db"]
    table = to_markdown(summary, 2, 2)
    assert table.count("\n| ") == 4 and "convex-hull" in table
    assert all(math.isfinite(v["mae"]) for v in summary.values())
