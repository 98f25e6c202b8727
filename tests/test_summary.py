"""summary.png from real runs: RunEngine + simulated detector + live callback -> embedded Tiled.

The figure is checked through matplotlib's artists: the three fold panels (pixel axes,
colour bars, the background being raw fold minus corrected fold), the I11/I10 and S10
panels over the run with the simulator's truth when the raw run records it (and not
when it does not), and the frames whose metrics are not good drawn apart.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count

from live_bgsub.callback import LiveBackgroundSubtraction
from live_bgsub.catalog import frames, metrics_table
from live_bgsub.sim import SimDetector
from live_bgsub.sinks.tiled import TiledPublisher
from live_bgsub.summary import PANELS, TRUTH_LABEL, plot_summary, summary_figure
from live_bgsub.tiled_server import EmbeddedTiledServer, connect

pytestmark = pytest.mark.slow  # one Tiled server and two live runs for the module: about 30 s

TWITCH = 8  # frames of the run with truth: one whole twitch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One Tiled server, two raw runs and their derived runs: ``truth`` (the simulator
    records its truth) and ``plain`` (the same detector with the truth left out of its
    readings, as any other detector's run)."""
    root = tmp_path_factory.mktemp("summary")
    raw_dir, derived_dir = root / "raw", root / "derived"
    raw_dir.mkdir()
    derived_dir.mkdir()
    with EmbeddedTiledServer(root / "tiled", readable_storage=[raw_dir, derived_dir]) as server:
        catalog = connect(server.uri, api_key=server.api_key)
        publisher = TiledPublisher(catalog)
        cb = LiveBackgroundSubtraction(publisher, method="white-top-hat", directory=derived_dir, on_full="block")
        RE = RunEngine({})
        RE.subscribe(publisher)
        RE.subscribe(cb)
        truth_det = SimDetector(name="det", directory=raw_dir, n_patterns=TWITCH, seed=4)
        plain_det = SimDetector(name="cam", directory=raw_dir, n_patterns=2, seed=6, read_attrs=["image", "frame_number"])
        out = {}
        for name, det, num in (("truth", truth_det, TWITCH), ("plain", plain_det, 3)):
            (uid,) = RE(count([det], num=num))
            assert cb.wait(uid, timeout=300)
            out[name] = (uid, cb.summary(uid).derived_uid, det)
        assert publisher.flush(timeout=300) and publisher.errors == []
        cb.close()
        publisher.close()
        yield catalog, out


@pytest.fixture(scope="module")
def truth_figure(runs):
    catalog, out = runs
    raw_uid, derived_uid, _ = out["truth"]
    fig = summary_figure(catalog, raw_uid, derived_uid)
    yield fig
    plt.close(fig)


def _panels(fig) -> dict:
    found = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert sorted(found) == sorted(PANELS)
    return found


def _lines(ax, gid_prefix: str) -> list:
    return [line for line in ax.get_lines() if (line.get_gid() or "").startswith(gid_prefix)]


def test_the_folds_are_drawn_side_by_side_with_pixel_axes_and_colour_bars(truth_figure):
    panels = _panels(truth_figure)
    shapes = set()
    for gid in ("raw_fold", "background", "corrected"):
        ax = panels[gid]
        (image,) = ax.get_images()
        shapes.add(image.get_array().shape)
        assert "(px" in ax.get_xlabel() and "(px" in ax.get_ylabel()
        assert "equator" in ax.get_xlabel() and "meridian" in ax.get_ylabel()
        assert image.colorbar is not None and image.colorbar.ax in truth_figure.axes
        assert "counts / px" in image.colorbar.ax.get_ylabel() and "asinh" in image.colorbar.ax.get_ylabel()
        assert image.origin == "lower"  # beam centre at (0, 0), meridian up
    assert len(shapes) == 1  # one geometry: the fold's
    # Raw fold and background share one colour scale; the background is raw fold - corrected.
    raw, background, corrected = (panels[g].get_images()[0] for g in ("raw_fold", "background", "corrected"))
    assert raw.norm is background.norm
    r, b, c = (np.ma.filled(im.get_array().astype(float), np.nan) for im in (raw, background, corrected))
    valid = np.isfinite(r)
    assert valid.mean() > 0.5 and np.array_equal(valid, np.isfinite(b)) and np.array_equal(valid, np.isfinite(c))
    np.testing.assert_allclose(b[valid] + c[valid], r[valid], rtol=1e-5, atol=1e-3)


def test_the_corrected_panel_is_the_derived_runs_fold_of_the_frame_named_in_the_title(runs, truth_figure):
    catalog, out = runs
    _, derived_uid, _ = out["truth"]
    derived = catalog[derived_uid]
    table = metrics_table(derived)
    panels = _panels(truth_figure)
    title = panels["corrected"].get_title()
    seq = int(title.split("frame ")[1].split()[0].rstrip(","))
    row = int(np.flatnonzero(table["raw_seq_num"] == seq)[0])
    stored = frames(derived, "corrected", index=int(table["seq_num"][row]) - 1)
    drawn = np.ma.filled(panels["corrected"].get_images()[0].get_array().astype(float), np.nan)
    inner = stored[: drawn.shape[0], : drawn.shape[1]]
    valid = np.isfinite(drawn)
    np.testing.assert_array_equal(drawn[valid], inner[valid])
    assert f"frame {seq}" in truth_figure.get_suptitle() and f"frame {seq}" in panels["raw_fold"].get_title()
    for gid in ("i11_i10", "s10"):  # the frame shown is marked on the time series
        assert any(line.get_xdata()[0] == seq and "folds above" in line.get_label() for line in panels[gid].get_lines())


def test_metrics_over_the_run_with_the_simulators_truth_and_the_doubtful_frames_apart(runs, truth_figure):
    catalog, out = runs
    raw_uid, derived_uid, det = out["truth"]
    table = metrics_table(catalog[derived_uid])
    panels = _panels(truth_figure)
    for gid, key, ylabel in (("i11_i10", "i11_i10", "I11 / I10"), ("s10", "s10_px", "S10 (px)")):
        ax = panels[gid]
        assert ax.get_ylabel() == ylabel and "frame" in ax.get_xlabel()
        (truth,) = _lines(ax, "truth")
        np.testing.assert_array_equal(truth.get_xdata(), np.arange(1, TWITCH + 1))
        np.testing.assert_array_equal(truth.get_ydata(), det.bank_truth[key])  # what the frames were built from
        assert TRUTH_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
        # Every measured value is drawn once, as good or apart by its verdict.
        values, verdict = table[key], table["metrics_verdict"]
        finite = np.isfinite(values)
        good = _lines(ax, "good")
        apart = _lines(ax, "verdict:")
        assert sum(len(line.get_xdata()) for line in good) == int(np.sum(finite & (verdict == "good")))
        assert sum(len(line.get_xdata()) for line in apart) == int(np.sum(finite & (verdict != "good")))
        for line in apart:
            name = line.get_gid().split(":", 1)[1]
            np.testing.assert_array_equal(line.get_xdata(), table["raw_seq_num"][finite & (verdict == name)])
            assert f"measured, {name}" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
            if good:
                assert line.get_marker() != good[0].get_marker()
    # The run drifts as a twitch does, and S10 is measured close to its truth on every frame.
    s10 = table["s10_px"]
    np.testing.assert_allclose(s10[np.isfinite(s10)], det.bank_truth["s10_px"][np.isfinite(s10)], atol=0.5)
    assert np.ptp(det.bank_truth["i11_i10"]) > 0.5


def test_a_run_without_truth_draws_no_truth_line(runs):
    catalog, out = runs
    raw_uid, derived_uid, _ = out["plain"]
    assert not any("sim_true" in key for key in catalog[raw_uid]["primary"])
    fig = summary_figure(catalog, raw_uid, derived_uid, frame=2)
    try:
        panels = _panels(fig)
        for gid in ("i11_i10", "s10"):
            ax = panels[gid]
            assert _lines(ax, "truth") == []
            assert TRUTH_LABEL not in [t.get_text() for t in ax.get_legend().get_texts()]
        assert "frame 2" in panels["corrected"].get_title() and "truth" not in panels["corrected"].get_title()
        assert all(panels[g].get_images()[0].colorbar is not None for g in ("raw_fold", "background", "corrected"))
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="frame 9 has no corrected fold"):
        summary_figure(catalog, raw_uid, derived_uid, frame=9)


def test_plot_summary_writes_the_png_and_the_demo_uses_it(runs, tmp_path):
    import live_bgsub.demo

    catalog, out = runs
    raw_uid, derived_uid, _ = out["truth"]
    path = plot_summary(catalog, raw_uid, derived_uid, tmp_path / "summary.png")
    assert path == tmp_path / "summary.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert live_bgsub.demo.plot_summary is plot_summary
