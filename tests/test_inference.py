"""The model engine: loading by name or path, detector units, downsample, CLI model:PATH."""

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from live_bgsub.cli import main  # noqa: E402
from live_bgsub.inference import BackgroundModel, ModelError  # noqa: E402
from live_bgsub.model import build_unet  # noqa: E402


def _constant_background_model(tmp_path, bias, *, downsample=1, normalization="unified", name="const"):
    """A U-Net whose background head outputs ``bias`` (normalised units) everywhere."""
    model = build_unet(depth=2, base_filters=4)
    head = model.get_layer("background")
    kernel, b = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.full_like(b, bias)])
    path = tmp_path / f"{name}.keras"
    model.save(path)
    card = {
        "name": name,
        "architecture": {"depth": 2, "base_filters": 4, "dilation_rate": 2, "upsampling": "nearest"},
        "target": "white-top-hat",
        "normalization": normalization,
        "downsample": downsample,
    }
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def test_background_is_in_detector_units(tmp_path):
    path = _constant_background_model(tmp_path, 0.25)
    engine = BackgroundModel.load(path)
    rng = np.random.default_rng(0)
    folds = rng.poisson(5.0, size=(3, 40, 50)).astype(np.float32)
    folds[1] *= 10  # a brighter fold: unified normalisation divides by each fold's max
    masks = np.ones(folds.shape, bool)
    masks[:, 30:, 45:] = False
    background, corrected = engine.subtract(folds, masks)
    assert background.shape == folds.shape and background.dtype == np.float32
    for k in range(3):
        scale = folds[k][masks[k]].max()
        np.testing.assert_allclose(background[k][masks[k]], 0.25 * scale, rtol=1e-5)
    np.testing.assert_allclose(corrected[masks], (folds - background)[masks], atol=1e-4)
    assert np.all(background[~masks] == 0) and np.all(corrected[~masks] == 0)
    single_bg, _ = engine.subtract(folds[0], masks[0])
    np.testing.assert_allclose(single_bg, background[0], rtol=1e-6)


def test_working_downsample_upsamples_the_background(tmp_path):
    path = _constant_background_model(tmp_path, 0.1, downsample=2)
    engine = BackgroundModel.load(path)
    fold = np.full((37, 45), 8.0, np.float32)
    background, corrected = engine.subtract(fold)
    np.testing.assert_allclose(background, 0.8, rtol=1e-5)  # 0.1 x the block-mean max
    np.testing.assert_allclose(corrected, 7.2, rtol=1e-5)


def test_bad_models_are_named(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        BackgroundModel.load("model:no-such-model")
    with pytest.raises(ModelError, match="model file not found"):
        BackgroundModel.load(tmp_path / "missing.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a loadable Keras model"):
        BackgroundModel.load(broken)
    path = _constant_background_model(tmp_path, 0.0, normalization="independent", name="indep")
    with pytest.raises(ModelError, match="'independent' normalisation"):
        BackgroundModel.load(path)


def test_cli_model_path(tmp_path):
    from fabio.tifimage import TifImage

    from live_bgsub.synth import make_pattern

    path = _constant_background_model(tmp_path, 0.0)
    p = make_pattern("pilatus-1m", seed=3)
    image = tmp_path / "frame.tif"
    TifImage(data=p.raw()).write(str(image))
    out = tmp_path / "out"
    assert main(["process", str(image), "--method", f"model:{path}", "--out", str(out)]) == 0
    record = json.loads((out / "frame.json").read_text())
    assert record["method"] == f"model:{path}"
    assert record["parameters"]["model"] == "const" and len(record["parameters"]["card_sha256"]) == 64
    import h5py

    with h5py.File(out / "frame.h5") as h5:
        np.testing.assert_allclose(h5["background"][()], 0, atol=1e-4)  # zero head: no background (float rounding)
    assert main(["process", str(image), "--method", f"model:{path}", "--param", "x=1", "--out", str(out)]) == 2
    assert main(["process", str(image), "--method", "model:nope", "--out", str(out)]) == 2


def test_a_model_that_divides_by_the_maximum_doubts_a_fold_with_a_floor(tmp_path):
    """A 'unified' model on a fold with a bias (a CCD's) says so in the frame's verdict;
    the same fold without the bias, or a 'robust' model, raises no such doubt."""
    from live_bgsub.engine import Engine, make_step
    from live_bgsub.geometry import Geometry
    from live_bgsub.inference import MAX_FLOOR_FRACTION
    from live_bgsub.synth import make_pattern

    p = make_pattern("mar165", seed=11)
    biased = p.raw().astype(np.float32)  # bias 100: the floor is ~half the maximum
    unbiased = np.where(p.mask, p.frame, 0).astype(np.float32)
    unified = BackgroundModel.load(_constant_background_model(tmp_path, 0.0, downsample=2, name="flat"))
    robust = BackgroundModel.load(_constant_background_model(tmp_path, 0.0, downsample=2, normalization="robust", name="flatr"))
    geometry = Geometry(p.params["center"], p.params["rotation_deg"])

    def verdict(model, frame):
        [result] = Engine(make_step(model), geometry, frame.shape, p.mask).process([frame])
        assert result.ok, result.error
        return result.metrics["quality"]

    q = verdict(unified, biased)
    assert q["verdict"] in ("doubtful", "no equator")
    [doubt] = [r for r in q["reasons"] if r.startswith("model:flat divides by the fold's maximum")]
    assert "unified normalisation" in doubt and "% of its maximum" in doubt
    fraction = float(doubt.split("counts, ")[1].split(" %")[0]) / 100
    assert fraction >= MAX_FLOOR_FRACTION
    assert not any("divides by the fold's maximum" in r for r in verdict(unified, unbiased)["reasons"])
    assert not any("divides by the fold's maximum" in r for r in verdict(robust, biased)["reasons"])
