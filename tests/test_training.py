"""training/: the dataset steps, ``python -m training.fit`` end to end (and resumed), evaluate."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import data as D

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--synthetic", "6", "--downsample", "4", "--input-size", "64", "--base-filters", "4", "--depth", "2",
    "--batch-size", "2", "--learning-rate", "1e-3", "--verbose", "0",
]  # fmt: skip


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def synthetic_folds():
    """Six synthetic folds at downsample 4 (seeds 0..5)."""
    folds, report = D.collect_synthetic_folds(6, seed0=0, downsample=4, log=_quiet)
    return folds, report


def _fake(i, source="a", shape=(8, 8)):
    z = np.full(shape, float(i), np.float32)
    return D.SourceFold(f"{source}:{i}", source, z, np.ones(shape, bool), np.ones(shape, np.float32))


# --------------------------------------------------------------------------- data


def test_group_runs_by_shape_and_counter_prefix():
    runs = D.group_runs([("P40_1_3_00000", (4, 5)), ("P40_1_3_00001", (4, 5)), ("venus32int", (4, 5)), ("P40_1_3_00002", (6, 5))])
    assert list(runs.values()) == [[0, 1], [2], [3]]
    assert [k[1] for k in runs] == ["P40_1_3", "venus32int", "P40_1_3"]


def test_discard_removes_the_planted_outlier(synthetic_folds):
    folds, _ = synthetic_folds
    good = list(folds)
    # A failed fold: the rotation off by 90 degrees puts the equator on the meridian.
    bad = D.SourceFold("synthetic:rotated", folds[3].source, folds[3].fold.T.copy(), folds[3].mask.T.copy(), folds[3].samples.T.copy())
    planted = good[:3] + [bad] + good[3:] + [folds[0]]  # 8 folds: round(0.1 * 8) = 1 goes
    planted[-1] = D.SourceFold("synthetic:copy", folds[0].source, folds[0].fold, folds[0].mask, folds[0].samples)
    kept, discarded = D.discard_outliers(planted, 0.10)
    assert [d["id"] for d in discarded] == ["synthetic:rotated"]
    assert len(kept) == 7 and all(f.id != "synthetic:rotated" for f in kept)
    scores = D.deviation_scores(planted)
    assert int(np.argmax(scores)) == 3
    # Nothing goes with fraction 0; a fraction of 0.3 drops round(2.4) = 2.
    assert D.discard_outliers(planted, 0.0)[1] == []
    assert len(D.discard_outliers(planted, 0.3)[1]) == 2


def test_similarity_report_has_every_pair_and_the_input(synthetic_folds):
    folds, _ = synthetic_folds
    methods = ("white-top-hat", "circularly-symmetric", "smoothed-gaussian")
    report = D.method_similarity(folds[:2], methods, downsample=4)
    assert report["names"] == ["input", *methods] and report["n_folds"] == 2
    pairs = {(p["a"], p["b"]) for p in report["pairs"]}
    assert len(pairs) == 6 and all(("input", m) in pairs for m in methods)
    # input ~ method: the mean over folds of the mean |background| / input max.
    expected = []
    for f in folds[:2]:
        top = f.fold[f.mask].max()
        corrected = D.method_target(f.fold, f.mask, "white-top-hat", 4)
        expected.append(np.mean(np.abs(f.fold - corrected)[f.mask]) / top)
    got = next(p for p in report["pairs"] if p["b"] == "white-top-hat" and p["a"] == "input")
    assert got["mae"] == pytest.approx(np.mean(expected), rel=1e-6)
    assert all(math.isfinite(p["psnr"]) and p["mae"] > 0 for p in report["pairs"])
    table = D.similarity_table(report)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "~" in line]
    assert len(rows) == 6
    psnrs = [float(r.split("|")[3]) for r in rows]
    assert psnrs == sorted(psnrs, reverse=True)


def test_split_sizes_are_seeded_disjoint_and_per_source():
    folds = [_fake(i, "a") for i in range(10)] + [_fake(i, "b") for i in range(5)]
    s = D.split_folds(folds, (0.8, 0.1, 0.1), seed=3)
    ids = {k: [f.id for f in v] for k, v in s.items()}
    assert [sum(i.startswith("a:") for i in ids[k]) for k in ("train", "val", "test")] == [8, 1, 1]
    assert [sum(i.startswith("b:") for i in ids[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    every = ids["train"] + ids["val"] + ids["test"]
    assert sorted(every) == sorted(f.id for f in folds)
    assert ids == {k: [f.id for f in v] for k, v in D.split_folds(folds, (0.8, 0.1, 0.1), seed=3).items()}
    assert ids != {k: [f.id for f in v] for k, v in D.split_folds(folds, (0.8, 0.1, 0.1), seed=4).items()}
    s = D.split_folds([_fake(i) for i in range(20)], (0.5, 0.25, 0.25))
    assert [len(s[k]) for k in ("train", "val", "test")] == [10, 5, 5]
    # Two folds: the training split keeps them.
    s = D.split_folds([_fake(i) for i in range(2)], (0.8, 0.1, 0.1))
    assert [len(s[k]) for k in ("train", "val", "test")] == [2, 0, 0]


def test_synthetic_truth_target_is_the_folded_true_signal():
    from live_bgsub.fold import FoldMap
    from live_bgsub.geometry import Geometry
    from live_bgsub.resample import block_mean
    from live_bgsub.synth import make_pattern

    folds, _ = D.collect_synthetic_folds(1, seed0=11, downsample=4, log=_quiet)
    pairs = D.make_pairs(folds, ["synthetic-truth"], downsample=4, input_size=(64, 96))
    p = make_pattern("pilatus-1m", seed=11)
    fm = FoldMap(p.frame.shape, Geometry(p.params["center"], p.params["rotation_deg"]), p.mask)
    fold, count = fm.fold(p.frame, p.mask)
    signal, _ = fm.fold(p.signal, p.mask)
    small_signal, valid = block_mean(signal, count > 0, 4)
    small_fold, _ = block_mean(fold, count > 0, 4)
    np.testing.assert_allclose(pairs.targets[0], D.fit_to_size(small_signal, (64, 96)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pairs.inputs[0], D.fit_to_size(small_fold, (64, 96)), rtol=1e-5, atol=1e-6)
    assert np.array_equal(pairs.masks[0], D.fit_to_size(valid, (64, 96)))
    assert pairs.methods == ["synthetic-truth"] and pairs.ids == ["synthetic:pilatus-1m:11"]
    assert pairs.targets[0].max() > 1  # reflections, not an empty crop
    assert folds[0].info["truth"]["i11_i10"] == p.params["i11_i10"]


def test_classical_targets_run_at_the_working_resolution(synthetic_folds):
    folds, _ = synthetic_folds
    assert D.working_params("white-top-hat", 2)["tophat"] == 50.0
    nested = D.working_params("transition", 2, {"transition_radius": 400.0})
    assert nested["transition_radius"] == 200.0 and nested["outer_params"]["tophat"] == 50.0
    pairs = D.make_pairs(folds[:2], ["white-top-hat", "smoothed-gaussian"], downsample=4, input_size=(64, 64))
    assert pairs.methods == ["white-top-hat", "smoothed-gaussian"] * 2
    assert pairs.ids[0] == pairs.ids[1] and np.array_equal(pairs.inputs[0], pairs.inputs[1])
    # Corrected folds: at most the input (background >= 0 here), 0 at invalid pixels.
    assert np.all(pairs.targets[~pairs.masks] == 0) and np.all(pairs.inputs[~pairs.masks] == 0)
    assert np.all(pairs.targets <= pairs.inputs + 1e-4)


def test_augmentation_redoses_counts_and_scales_the_truth(synthetic_folds):
    folds, _ = synthetic_folds
    copies = D.augment_folds(folds[:2], 2, scale=(0.5, 2.0), seed=1)
    assert [c.id for c in copies] == [f"{f.id}#aug{j}" for f in folds[:2] for j in (1, 2)]
    for c in copies:
        f = next(f for f in folds if f.id == c.info["augmented_from"])
        s = c.info["dose_scale"]
        assert 0.5 <= s <= 2.0
        np.testing.assert_allclose(c.truth, s * f.truth, rtol=1e-6)
        assert np.array_equal(c.mask, f.mask)
        # Poisson re-sampling keeps the mean dose: total counts within 2 %.
        n = f.samples[f.mask]
        assert np.sum(c.fold[f.mask] * n) == pytest.approx(s * np.sum(f.expected[f.mask] * n), rel=0.02)
    assert D.augment_folds(folds[:2], 2, seed=1)[0].fold.tobytes() == copies[0].fold.tobytes()


def _ring_fold(radius=20.0, shape=(64, 64)):
    """A synthetic-like fold: a thin ring of signal at ``radius`` over a flat 50 counts."""
    r = np.hypot(*np.indices(shape, dtype=np.float64))
    truth = (400.0 * np.exp(-0.5 * ((r - radius) / 1.5) ** 2)).astype(np.float32)
    expected = truth + 50.0
    return D.SourceFold("synthetic:ring:0", "synthetic:ring", expected.copy(), np.ones(shape, bool),
                        np.ones(shape, np.float32), truth=truth, expected=expected, info={"kind": "synthetic"})


def test_detector_augmentation_varies_the_setup_and_keeps_truth_and_input_together():
    f = _ring_fold()
    copies = D.augment_folds([f], 16, scale=(0.5, 2.0), seed=3, detector=True)
    plain = D.augment_folds([f], 16, scale=(0.5, 2.0), seed=3)
    a = D.DETECTOR_AUGMENTATION
    depths, gaps = set(), 0
    for c, p in zip(copies, plain):
        d = c.info["detector"]
        assert c.info["dose_scale"] == p.info["dose_scale"]  # the dose draw is the plain copy's
        assert a["zoom"][0] <= d["zoom"] <= a["zoom"][1] and abs(d["rotation_residue_deg"]) <= a["rotation_deg"]
        # S10 scale: the ring moves to zoom x its radius, in the truth and in the input alike.
        for image in (c.truth, c.expected):
            row = np.where(c.mask[0], image[0], -np.inf)
            assert int(np.argmax(row)) == pytest.approx(20.0 * d["zoom"], abs=1.0)
        assert np.all(c.truth[~c.mask] == 0) and np.all(c.fold[~c.mask] == 0) and np.all(c.samples[~c.mask] == 0)
        # The beam stop and the gap band are masked.
        r = np.hypot(*np.indices(f.fold.shape))
        assert not c.mask[r < d["beam_stop_px"]].any()
        if d["gap"] is not None:
            axis, start, width = d["gap"]
            band = c.mask[start : start + width] if axis == 0 else c.mask[:, start : start + width]
            assert band.size and not band.any()
            gaps += 1
        depths.add(d["bit_depth"])
        if d["bit_depth"] == 8:  # 255 steps of one size
            steps = np.unique(c.fold[c.mask])
            assert len(steps) <= 256
            q = steps.max() / 255  # the brightest pixels saturate at 255 steps
            np.testing.assert_allclose(steps / q, np.round(steps / q), atol=1e-3)
        if d["bit_depth"] != 8:  # re-dosed photons: the mean dose kept (2 %)
            assert np.sum(c.fold[c.mask]) == pytest.approx(np.sum(c.expected[c.mask]), rel=0.02)
    assert depths == set(a["bit_depths"]) and 0 < gaps < len(copies)
    # Off by default, and the data key of a configuration without it is unchanged.
    assert "detector" not in plain[0].info
    assert "augment_detector" not in D.DataConfig(synthetic=2).to_dict()
    assert D.DataConfig(synthetic=2, augment_detector=True).key() != D.DataConfig(synthetic=2).key()


def test_a_ccd_family_is_folded_as_the_detector_writes_it():
    """A MAR 165 fold carries the CCD's bias (100) and read noise, as its uint16 file does;
    the truth stays the signal and ``expected`` the reading's mean, so the oracle (fold
    minus expected plus truth) is the signal plus noise. Re-dosed copies keep the bias
    (it is not photons) and scale only what is."""
    folds, _ = D.collect_synthetic_folds(1, preset="mar165", seed0=3, downsample=4, log=_quiet)
    f = folds[0]
    bias = f.info["response"]["bias"]
    assert bias == 100.0 and f.info["response"]["read_noise"] > 0
    m = f.mask
    assert np.percentile(f.fold[m], 1) > 0.9 * bias  # no pixel reads far below the bias
    residual = (f.fold - f.expected)[m]
    assert abs(np.mean(residual)) < 0.02 * np.mean(f.expected[m] - bias)  # expected is the reading's mean
    [copy] = D.augment_folds([f], 1, scale=(0.5, 0.5), seed=2)
    s = copy.info["dose_scale"]
    assert s == pytest.approx(0.5)
    np.testing.assert_allclose(copy.expected[m], s * (f.expected[m] - bias) + bias, rtol=1e-5)
    n = f.samples[m]
    assert np.sum((copy.fold[m] - bias) * n) == pytest.approx(s * np.sum((f.expected[m] - bias) * n), rel=0.02)
    np.testing.assert_allclose(copy.truth, s * f.truth, rtol=1e-6)
    # A photon-counting family reads its counts as they are: no response to take off.
    [pil], _ = D.collect_synthetic_folds(1, seed0=3, downsample=4, log=_quiet)
    assert pil.info["response"] == {"gain": 1.0, "bias": 0.0, "read_noise": 0.0}


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="unknown background method 'tophat'"):
        D.DataConfig(synthetic=2, targets=["tophat"])
    with pytest.raises(ValueError, match="synthetic sources only"):
        D.DataConfig(images=["x"], synthetic=2, targets=["synthetic-truth"])
    with pytest.raises(ValueError, match=r"split must be .* got \[0.5, 0.1, 0.1\]"):
        D.DataConfig(synthetic=2, split=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="no data source"):
        D.DataConfig()


def test_tiled_source_without_the_client_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tiled(name, *args, **kwargs):
        if name.startswith("tiled"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tiled)
    with pytest.raises(ImportError, match=r"tiled\[client\]"):
        D.collect_tiled_folds("http://localhost:8000/api", ["uid"])


@pytest.mark.slow  # a Tiled server
def test_tiled_runs_from_an_in_process_server():
    """Runs served by a real in-process Tiled server (skipped without ``tiled[server]``)."""
    import hashlib

    pytest.importorskip("tiled.server")
    from tiled.adapters.array import ArrayAdapter
    from tiled.adapters.mapping import MapAdapter
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    from live_bgsub.synth import make_pattern

    center, rotation = (420.3, 500.7), 3.0
    raw = np.stack([make_pattern(seed=k, center=center, rotation_deg=rotation).raw() for k in range(2)])

    def run(frames, plan):
        primary = MapAdapter({"data": MapAdapter({"pilatus_image": ArrayAdapter.from_array(frames), "I0": ArrayAdapter.from_array(np.ones(len(frames)))})})
        return MapAdapter({"primary": primary}, metadata={"start": {"plan_name": plan}})

    tree = MapAdapter({"uid-a": run(raw, "count"), "uid-b": run(raw[:1], "muscle_scan")})
    with Context.from_app(build_app(tree)) as context:
        client = from_context(context)
        folds, report = D.collect_tiled_folds("in-process", ["uid-a"], downsample=4, client=client, log=_quiet)
        assert [f.id for f in folds] == ["tiled:uid-a[0]", "tiled:uid-a[1]"]
        r = report["runs"][0]
        assert (r["key"], r["frames"], r["shape"]) == ("pilatus_image", 2, [1043, 981])
        assert r["sha256"] == hashlib.sha256(raw.tobytes()).hexdigest()
        assert abs(r["geometry"]["center"][0] - center[0]) < 1 and abs(r["geometry"]["center"][1] - center[1]) < 1
        assert abs(r["geometry"]["rotation_deg"] - rotation) < 0.5
        assert folds[0].fold.shape == folds[0].mask.shape and folds[0].fold.max() > 0
        folds, report = D.collect_tiled_folds("in-process", query="muscle_scan", downsample=4, client=client, log=_quiet)
        assert [f.id for f in folds] == ["tiled:uid-b[0]"]
        folds, report = D.collect_tiled_folds("in-process", ["uid-b"], key="nope", downsample=4, client=client, log=_quiet)
        assert folds == [] and "no data key 'nope'" in report["skipped"][0]["reason"]


def test_image_folder_runs_hashes_and_skips(tmp_path):
    src = REPO / "live_bgsub" / "data" / "P40_1_3_00000.h5"
    for k in (1, 2):
        shutil.copy(src, tmp_path / f"scan_{k:05d}.h5")
    (tmp_path / "notes.dat").write_text("not an image")
    folds, report = D.collect_image_folds(tmp_path, downsample=4, log=_quiet)
    assert [f.id for f in folds] == ["image:scan_00001.h5", "image:scan_00002.h5"]
    assert len(report["runs"]) == 1 and report["runs"][0]["files"] == ["scan_00001.h5", "scan_00002.h5"]
    assert [s["file"] for s in report["skipped"]] == ["notes.dat"]
    assert report["files"][0]["sha256"] == D.file_sha256(src)
    # Two copies of one frame, one geometry: the same fold (up to the FoldMap path's
    # rounding), the centre near MuscleX's.
    np.testing.assert_allclose(folds[0].fold, folds[1].fold, rtol=1e-5, atol=1e-6)
    cx, cy = report["runs"][0]["geometry"]["center"]
    assert abs(cx - 409.76) < 3 and abs(cy - 490.97) < 3


@pytest.mark.realdata
def test_real_folder_discards_the_powder_frame(real_data):
    folds, report = D.collect_image_folds(real_data, downsample=2, log=_quiet)
    # Six P40 frames (one run), venus32int, the powder frame and the MarCCD cardiac frame.
    assert len(folds) == 9
    assert sorted(len(r["files"]) for r in report["runs"]) == [1, 1, 1, 6]
    _, discarded = D.discard_outliers(folds, 0.10)
    assert [d["id"] for d in discarded] == ["image:powder_Mn23-1_diffScan_0167.tif"]


def test_dataset_cache_round_trip(tmp_path):
    config = D.DataConfig(synthetic=3, downsample=4, input_size=(32, 48), discard=0.0, targets=["white-top-hat"])
    built = D.build_dataset(config, cache_dir=tmp_path, log=_quiet)
    assert (tmp_path / f"dataset-{config.key()}.npz").exists()
    loaded = D.build_dataset(config, cache_dir=tmp_path, log=_quiet)
    for s in ("train", "val", "test"):
        a, b = getattr(built, s), getattr(loaded, s)
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets) and a.ids == b.ids
    assert [len(built.train), len(built.val), len(built.test)] == [1, 1, 1]
    assert D.DataConfig(synthetic=3, downsample=4, input_size=(32, 48), discard=0.0, seed=1).key() != config.key()


def test_synthetic_presets_families_and_leave_out():
    from live_bgsub.synth import FAMILIES

    c = D.DataConfig(synthetic=2, synthetic_preset="families", leave_out=["eiger2-9m", "ccd-1k"])
    assert c.presets() == tuple(f for f in FAMILIES if f not in ("eiger2-9m", "ccd-1k"))
    assert D.DataConfig(synthetic=1, synthetic_preset=["ccd-1k", "pilatus-1m", "ccd-1k"]).presets() == ("ccd-1k", "pilatus-1m")
    assert D.DataConfig(synthetic=1, synthetic_preset=["ccd-1k"]).synthetic_preset == "ccd-1k"  # one preset is the old form
    with pytest.raises(ValueError, match="unknown synthetic preset 'pilatus-9m'; expected 'families' or one of"):
        D.DataConfig(synthetic=1, synthetic_preset=["pilatus-1m", "pilatus-9m"])
    with pytest.raises(ValueError, match="unknown synthetic preset 'families'"):
        D.DataConfig(synthetic=1, leave_out=["families"])
    with pytest.raises(ValueError, match=r"leave_out \['ccd-1k'\] leaves no synthetic preset of \['ccd-1k'\]"):
        D.DataConfig(synthetic=1, synthetic_preset="ccd-1k", leave_out="ccd-1k")
    # Each preset is its own source with its own seeds; split per source.
    c = D.DataConfig(synthetic=3, synthetic_preset=["pilatus-1m", "ccd-1k"], downsample=4, input_size=(32, 32), discard=0.0, split=(0.4, 0.3, 0.3))
    folds, reports = D.collect_folds(c, log=_quiet)
    assert [f.id for f in folds] == [f"synthetic:pilatus-1m:{i}" for i in range(3)] + [f"synthetic:ccd-1k:{i}" for i in range(3, 6)]
    assert [r["preset"] for r in reports] == ["pilatus-1m", "ccd-1k"] and reports[1]["seeds"] == [3, 5]
    assert {f.source for f in folds} == {"synthetic:pilatus-1m", "synthetic:ccd-1k"}
    split = D.split_folds(folds, c.split, seed=0)
    assert [sorted({f.source for f in split[k]}) for k in ("train", "val", "test")] == [["synthetic:ccd-1k", "synthetic:pilatus-1m"]] * 3
    assert folds[3].fold.shape != folds[0].fold.shape  # two detectors, two fold shapes, one input size
    ds = D.build_dataset(c, log=_quiet)
    assert ds.train.inputs.shape[1:] == (32, 32) and len(ds.train) + len(ds.val) + len(ds.test) == 6


@pytest.mark.slow  # spawns two worker processes (a few seconds each to import)
def test_worker_processes_build_the_same_dataset(tmp_path):
    c = D.DataConfig(synthetic=2, synthetic_preset=["pilatus-1m", "ccd-1k"], downsample=4, input_size=(32, 32), discard=0.0,
                     targets=["white-top-hat", "smoothed-gaussian"], augment=1, split=(0.5, 0.5, 0.0))  # fmt: skip
    serial = D.build_dataset(c, log=_quiet)
    memo = {}
    parallel = D.build_dataset(c, workers=2, memo=memo, log=_quiet)
    for s in ("train", "val", "test"):
        a, b = getattr(serial, s), getattr(parallel, s)
        assert a.ids == b.ids and a.methods == b.methods
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets) and np.array_equal(a.masks, b.masks)
    kept = len(memo)
    copies = {i for i in parallel.train.ids if "#aug" in i}
    assert len(copies) == 2 and kept == 4 + len(copies)  # the four patterns and the two copies, kept for the next configuration
    truth = D.DataConfig(synthetic=2, synthetic_preset=["pilatus-1m", "ccd-1k"], downsample=4, input_size=(32, 32), discard=0.0,
                         targets=["synthetic-truth"], split=(0.5, 0.5, 0.0))  # fmt: skip
    D.build_dataset(truth, workers=2, memo=memo, log=_quiet)
    assert len(memo) == kept  # same patterns: none made again


def test_data_command_builds_the_caches_that_fit_loads(tmp_path, capsys):
    recipe = {"_comment": "x", "synthetic": 2, "synthetic_preset": ["ccd-1k"], "downsample": 4, "input_size": [32, 32],
              "discard": 0.0, "split": [0.5, 0.5, 0.0], "epochs": 3}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert D.main(["--config", str(tmp_path / "r.json"), "--cache", str(tmp_path / "cache"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    key = D.DataConfig.from_mapping(recipe).key()
    assert out.splitlines()[-1] == f"{tmp_path / 'r.json'}: {key}: 1 train / 1 val / 0 test pairs of ['white-top-hat']"
    lines = []
    D.build_dataset(D.DataConfig.from_mapping(recipe), cache_dir=tmp_path / "cache", log=lines.append)
    assert lines == [f"dataset {key}: loaded from {tmp_path / 'cache' / f'dataset-{key}.npz'}"]
    assert D.main(["--config", str(tmp_path / "missing.json"), "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json" in err[0] and "No such file" in err[0]


# --------------------------------------------------------------------------- fit


def test_fit_help_lists_every_configuration_key(capsys):
    from training import fit

    with pytest.raises(SystemExit) as exc:
        fit.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flags = {"targets": "--target", "runs": "--run"}
    for key in fit.DEFAULTS:
        assert flags.get(key, "--" + key.replace("_", "-")) in text, key
    assert "--config" in text and "--fresh" in text


def test_fit_config_file_then_flags(tmp_path):
    from training import fit

    cfg = tmp_path / "r.json"
    cfg.write_text(json.dumps({"_comment": "x", "synthetic": 5, "targets": ["white-top-hat", "smoothed-gaussian"], "epochs": 3}))
    config, fresh = fit.resolve_config(["--config", str(cfg), "--epochs", "7", "--out", str(tmp_path / "o"), "--input-size", "32"])
    assert config["epochs"] == 7 and config["synthetic"] == 5 and config["input_size"] == [32, 32]
    assert config["name"] == "mixed" and config["learning_rate"] == 1e-5 and not fresh
    cfg.write_text(json.dumps({"synthetc": 5}))
    with pytest.raises(SystemExit, match="unknown key"):
        fit.resolve_config(["--config", str(cfg), "--out", "x"])


def test_fit_refuses_a_bad_time_limit_or_worker_count(tmp_path):
    from training import fit

    for flags, message in (
        (["--time-limit", "0"], "time_limit must be a positive number of seconds, got 0"),
        (["--leave-out", "pilatus-1m"], r"leave_out \['pilatus-1m'\] leaves no synthetic preset"),
    ):
        with pytest.raises(SystemExit, match=message):
            fit.main([*TINY, *flags, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        fit.main([*TINY, "--workers", "0", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2


@pytest.mark.slow  # trains a tiny model for one epoch
def test_fit_stops_at_its_time_limit(tmp_path):
    pytest.importorskip("keras")
    from training import fit

    out = tmp_path / "run"
    fit.main([*TINY, "--synthetic", "3", "--epochs", "4", "--time-limit", "1e-6", "--loss-masked", "--out", str(out)])
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0]  # stopped after the first epoch, of four
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["epochs"] == 1
    assert card["loss"]["masked"] is True and np.isfinite(history["epochs"][0]["loss"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model trained for 1 epoch, then the same command with --epochs 2."""
    pytest.importorskip("keras")
    from training import fit

    out = tmp_path_factory.mktemp("tiny")
    fit.main([*TINY, "--epochs", "1", "--out", str(out)])
    first = json.loads((out / "history.json").read_text())
    first_card = json.loads((out / "model.json").read_text())
    fit.main([*TINY, "--epochs", "2", "--out", str(out)])
    return {"out": out, "first_history": first, "first_card": first_card}


@pytest.mark.slow  # trains a tiny model (about 20 s, once per module)
def test_fit_end_to_end_writes_a_loadable_model_and_card(tiny_run):
    import keras

    import live_bgsub.model  # noqa: F401

    out = tiny_run["out"]
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    card = json.loads((out / "model.json").read_text())
    assert set(card) >= {"name", "architecture", "target", "methods", "normalization", "input_size", "downsample", "loss", "training", "data", "validation", "versions"}
    assert card["architecture"] | {} == card["architecture"] and {"depth", "base_filters", "dilation_rate", "upsampling"} <= set(card["architecture"])
    assert card["architecture"]["depth"] == 2 and card["architecture"]["base_filters"] == 4
    assert (card["name"], card["target"], card["methods"]) == ("white-top-hat", "white-top-hat", ["white-top-hat"])
    assert card["input_size"] == [64, 64] and card["downsample"] == 4 and card["normalization"] == "unified"
    assert {"epochs", "steps", "batch_size", "learning_rate", "seconds", "hardware", "seed"} <= set(card["training"])
    assert {"cpu", "cores", "backend"} <= set(card["training"]["hardware"])
    assert {"sources", "n_train", "n_val", "n_test", "discarded"} <= set(card["data"])
    assert card["data"]["sources"][0]["seeds"] == [0, 5]
    assert [card["data"]["n_train"], card["data"]["n_val"], card["data"]["n_test"]] == [3, 1, 1]
    assert card["data"]["discarded"][0]["id"].startswith("synthetic:")
    assert {"mae", "psnr", "ssim", "mae_roi", "psnr_roi", "ssim_roi"} <= set(card["validation"])
    assert {"live_bgsub", "keras", "backend", "numpy"} <= set(card["versions"])
    assert card["loss"]["alpha"] == 0.1 and card["loss"]["masked"] is False and card["training"]["learning_rate"] == 1e-3
    # The card's validation metrics are live_bgsub.metrics on the validation pair.
    from live_bgsub.metrics import image_metrics
    from live_bgsub.model import prepare

    ds = D.Dataset.load(next((out / "cache").glob("dataset-*.npz")))
    x, y, info = prepare(ds.val.inputs, ds.val.masks, depth=2, normalization="unified", targets=ds.val.targets)
    pred = np.where(info["masks"], np.asarray(model.predict(x, verbose=0))[..., 0], 0)
    expected = image_metrics(pred[0], y[0, ..., 0], data_range=1.0)
    for k in ("mae", "psnr", "ssim", "psnr_roi"):
        assert card["validation"][k] == pytest.approx(expected[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow  # trains a tiny model (about 20 s, once per module)
def test_fit_resumes_instead_of_restarting(tiny_run):
    out = tiny_run["out"]
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]
    # Epoch 0 was not trained again: the second run started at epoch 1 and ran one epoch.
    assert history["epochs"][0] == tiny_run["first_history"]["epochs"][0]
    assert [(r["initial_epoch"], r["epochs_run"]) for r in history["runs"]] == [(0, 1), (1, 1)]
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["epochs"] == 2 and card["training"]["steps"] == 2 * card["training"]["steps_per_epoch"]
    assert (out / "logs" / "training.csv").read_text().count("\n") == 3  # header + 2 epochs


@pytest.mark.slow  # trains a tiny model (about 20 s, once per module)
def test_fit_refuses_to_resume_another_configuration(tiny_run):
    from training import fit

    args = [a if a != "4" else "8" for a in TINY]  # base filters 4 -> 8 (and downsample 4 -> 8)
    with pytest.raises(SystemExit, match="another configuration"):
        fit.main([*args, "--epochs", "2", "--out", str(tiny_run["out"])])


# --------------------------------------------------------------------------- evaluate


def test_metric_agreement_reads_both_outputs_and_counts_what_only_one_gives():
    """I11/I10 and S10 from a model's output against its method's: noiseless corrected
    folds with I11/I10 0.50 (the target) and 0.55 (a "model" 10 % off), the target
    itself, three times it (the metrics are scale-free) and an empty output."""
    from types import SimpleNamespace

    from live_bgsub.fold import fold
    from live_bgsub.geometry import Geometry
    from live_bgsub.synth import make_pattern
    from training.evaluate import metric_agreement, summarise_agreement

    def corrected(ratio):
        pat = make_pattern("pilatus-1m", seed=5, noise=False, counts=4.0, s10_px=60.0, i11_i10=ratio)
        f, count = fold(pat.frame - pat.background, Geometry(pat.params["center"], pat.params["rotation_deg"]), pat.mask)
        return np.where(count > 0, f, 0).astype(np.float32), count > 0

    target, mask = corrected(0.50)
    off, _ = corrected(0.55)
    p = {"pred": np.stack([target, 3 * target, off, np.zeros_like(target)]), "target": np.stack([target] * 4), "masks": np.stack([mask] * 4)}
    pairs = SimpleNamespace(ids=["same", "scaled", "off", "empty"], methods=["white-top-hat"] * 4)
    folds = [SimpleNamespace(id=i, source="synthetic:pilatus-1m") for i in pairs.ids]
    rows = metric_agreement(p, pairs, folds, downsample=2)
    assert rows[0]["i11_i10_rel_diff"] == 0 and rows[0]["s10_diff_px"] == 0
    assert rows[1]["i11_i10_rel_diff"] < 1e-6 and rows[1]["s10_diff_px"] < 1e-6
    assert rows[2]["i11_i10_rel_diff"] == pytest.approx(0.10, abs=0.005) and rows[2]["s10_diff_px"] < 0.01
    assert rows[0]["target"]["s10_px"] == pytest.approx(60.0, abs=0.1)  # in the fold's px; differences in full-resolution px
    assert math.isnan(rows[3]["i11_i10_rel_diff"]) and rows[3]["target"]["verdict"] == "good"
    good = summarise_agreement(rows[:2])
    assert good["both"] == 2 and good["goals_met"]
    every = summarise_agreement(rows)
    assert (every["n"], every["both"], every["model_only"], every["target_only"]) == (4, 3, 0, 1)
    assert every["i11_i10_rel_diff"]["worst"] == rows[2]["i11_i10_rel_diff"] and not every["goals_met"]


@pytest.mark.slow  # trains a tiny model (about 20 s, once per module)
def test_evaluate_prints_the_tables_and_writes_the_figure(tiny_run, tmp_path, capsys):
    from training import evaluate

    capsys.readouterr()
    evaluate.main([str(tiny_run["out"] / "model.keras"), "--synthetic", "2", "--out", str(tmp_path), "--methods", "white-top-hat", "circularly-symmetric"])
    text = capsys.readouterr().out
    for title in ("Table 1: unified", "Table 2: independent", "Table 3: independent normalisation, centre"):
        assert title in text
    assert "68.54" in text and "62.96" in text and "51.31" in text  # the paper's white top-hat rows
    assert "| oracle |" in text and "| model:white-top-hat |" in text and "| circularly-symmetric |" in text
    png = tmp_path / "white-top-hat-evaluation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads((tmp_path / "white-top-hat-evaluation.json").read_text())
    t = report["tables"]["white-top-hat"]
    assert t["n"] == 2
    # Dividing by the target's maximum (<= the input's) can only enlarge the errors.
    assert t["independent_full"]["psnr"] <= t["unified_full"]["psnr"] + 1e-9
    assert t["independent_full"]["mae"] >= t["unified_full"]["mae"] - 1e-12
    s = report["truth"]["summary"]
    assert s["oracle"]["psnr"] > s["white-top-hat"]["psnr"]  # the truth's own floor is best
    assert report["truth"]["n"] == 2
    # Per source (one here): the same medians, and the gain over the best method there.
    [(source, e)] = report["truth"]["per_source"].items()
    assert source == "synthetic:pilatus-1m" and e["n"] == 2 and "| synthetic:pilatus-1m | 2 |" in text
    assert e["model_psnr_roi"] == pytest.approx(s["model:white-top-hat"]["psnr_roi"])
    assert e["best"] in ("white-top-hat", "circularly-symmetric")
    assert e["gain_db"] == pytest.approx(e["model_psnr_roi"] - s[e["best"]]["psnr_roi"])
    agreement = report["metrics_agreement"]["groups"]["white-top-hat"]
    assert agreement["n"] == 2 and agreement["both"] + agreement["model_only"] + agreement["target_only"] <= 2
    assert "Metrics from the model's output against its method's" in text


@pytest.mark.slow  # trains a tiny model (about 20 s, once per module)
def test_evaluate_refuses_real_frames_for_a_truth_model(tiny_run, tmp_path):
    from training import evaluate

    card_path = tiny_run["out"] / "model.json"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(tiny_run["out"] / "model.keras", model_dir / "truth.keras")
    card = json.loads(card_path.read_text()) | {"name": "truth", "target": "synthetic-truth", "methods": ["synthetic-truth"]}
    (model_dir / "truth.json").write_text(json.dumps(card))
    with pytest.raises(SystemExit, match="real frames have none"):
        evaluate.main([str(model_dir / "truth.keras"), "--images", str(tmp_path)])


@pytest.mark.slow  # trains a tiny model (about 20 s, once per module)
def test_evaluate_tests_on_the_family_left_out_with_a_row_per_source(tiny_run, tmp_path, capsys):
    from training import evaluate

    with pytest.raises(SystemExit, match=r"--leave-out ccd-1k: model 'white-top-hat' was trained on it \(its card's leave_out is \[\]\)"):
        evaluate.main([str(tiny_run["out"] / "model.keras"), "--synthetic", "1", "--leave-out", "ccd-1k"])
    with pytest.raises(SystemExit, match="left no family out of its training"):
        evaluate.main([str(tiny_run["out"] / "model.keras"), "--synthetic", "1", "--leave-out"])
    # The same model, its card saying that it was trained without two families.
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(tiny_run["out"] / "model.keras", model_dir / "wth.keras")
    card = json.loads((tiny_run["out"] / "model.json").read_text())
    card["config"]["leave_out"] = ["ccd-1k", "pilatus-2m"]
    (model_dir / "wth.json").write_text(json.dumps(card))
    capsys.readouterr()
    report = evaluate.evaluate(
        evaluate.build_parser().parse_args([str(model_dir / "wth.keras"), "--synthetic", "1", "--leave-out", "--examples", "0", "--out", str(tmp_path)])
    )
    assert [s["preset"] for s in report["sources"]] == ["ccd-1k", "pilatus-2m"] and report["n_folds"] == 2
    assert set(report["per_source"]) == {"synthetic:ccd-1k", "synthetic:pilatus-2m"}
    for m in report["per_source"].values():
        assert m["n"] == 1 and math.isfinite(m["unified_full"]["psnr"])
    assert "| synthetic:ccd-1k | 1 |" in capsys.readouterr().out
    # One named family of the card's leave_out: that one only.
    report = evaluate.evaluate(
        evaluate.build_parser().parse_args([str(model_dir / "wth.keras"), "--synthetic", "1", "--leave-out", "pilatus-2m", "--examples", "0", "--out", str(tmp_path)])
    )
    assert [s["preset"] for s in report["sources"]] == ["pilatus-2m"] and report["per_source"] is None
