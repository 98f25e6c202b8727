"""Tests of the U-Net background model (live_bgsub.model): graph, loss, metrics, saving,
training and the shared preprocessing. Tiny configs: the file runs in well under a minute."""

import ast
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

# Keras 3.15 + TensorFlow 2.21 + numpy 2.4: saving converts variables with np.array(x), which
# numpy deprecates for tf variables' __array__; upstream noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

from conftest import REPO

from live_bgsub.metrics import center_roi, psnr, ssim
from live_bgsub.model import (
    MAE,
    PSNR,
    ROBUST_OFFSET_PERCENTILE,
    SSIM,
    BackgroundLoss,
    BackgroundUNet,
    build_unet,
    cap_isolated,
    prepare,
    restore,
    unet_flops,
    unet_traffic_bytes,
    with_background,
)

MODEL_DIR = REPO / "live_bgsub" / "model"


# --------------------------------------------------------------------------- hand formulas


def conv_params(c_in, c_out, k=3):
    return k * k * c_in * c_out + c_out


def expected_params(depth, f):
    """Parameters of the U-Net of docs/model.md, level by level."""
    total, c_in = 0, 1
    for level in range(depth):
        c = f * 2**level
        total += conv_params(c_in, c) + conv_params(c, c)
        c_in = c
    c = f * 2**depth
    total += conv_params(c_in, c) + conv_params(c, c)
    c_in = c
    for level in reversed(range(depth)):
        c = f * 2**level
        total += conv_params(c_in, c) + conv_params(2 * c, c) + conv_params(c, c)  # up-conv, after concat, second
        c_in = c
    return total + conv_params(c_in, 1, k=1)


def expected_flops(depth, f, rows, cols):
    """2 x multiply-adds of every convolution at its resolution."""
    macs, c_in = 0, 1
    for level in range(depth):
        c, px = f * 2**level, (rows >> level) * (cols >> level)
        macs += 9 * (c_in * c + c * c) * px
        c_in = c
    c, px = f * 2**depth, (rows >> depth) * (cols >> depth)
    macs += 9 * (c_in * c + c * c) * px
    c_in = c
    for level in reversed(range(depth)):
        c, px = f * 2**level, (rows >> level) * (cols >> level)
        macs += 9 * (c_in * c + 2 * c * c + c * c) * px
        c_in = c
    macs += c_in * rows * cols
    return 2 * macs


def expected_traffic(depth, f, rows, cols, itemsize):
    """The input, each convolution's output written and read once, the kernels (no biases)."""
    values, weights, c_in = rows * cols, 0, 1
    for level in range(depth):
        c, px = f * 2**level, (rows >> level) * (cols >> level)
        values += 2 * 2 * c * px  # two convolutions
        weights += 9 * (c_in * c + c * c)
        c_in = c
    c, px = f * 2**depth, (rows >> depth) * (cols >> depth)
    values += 2 * 2 * c * px
    weights += 9 * (c_in * c + c * c)
    c_in = c
    for level in reversed(range(depth)):
        c, px = f * 2**level, (rows >> level) * (cols >> level)
        values += 3 * 2 * c * px  # up-conv, after the concatenation, second
        weights += 9 * (c_in * c + 2 * c * c + c * c)
        c_in = c
    values += 2 * rows * cols  # the 1x1 background convolution
    weights += c_in
    return itemsize * (values + weights)


def numpy_loss(y_true, y_pred, alpha, theta=1.2, eps=1e-4, smooth_on="background"):
    """docs/model.md's loss, per fold then averaged over the batch, in float64; a third
    channel of ``y_true`` is the validity mask (sums over valid pixels / valid pairs)."""
    y_true = y_true.astype(np.float64)
    y_pred = y_pred.astype(np.float64)[..., 0]
    target, image = y_true[..., 0], y_true[..., 1]
    valid = y_true[..., 2] if y_true.shape[-1] > 2 else np.ones_like(target)
    out = []
    for t, i, p, v in zip(target, image, y_pred, valid):
        mae = np.sum(v * np.abs(t - p)) / max(np.sum(v), 1.0)
        s = i - p if smooth_on == "background" else p
        log_i = np.log(eps + np.maximum(i, 0))
        l_s = 0.0
        for axis in (1, 0):  # columns (dx), rows (dy) of a 2-D fold
            w = 1.0 / (np.abs(np.diff(log_i, axis=axis)) ** theta + eps)
            both = np.minimum(np.delete(v, 0, axis=axis), np.delete(v, -1, axis=axis))
            l_s += np.sum(both * w * np.diff(s, axis=axis) ** 2) / max(np.sum(both), 1.0)
        out.append((1 - alpha) * mae + alpha * l_s)
    return float(np.mean(out))


def synthetic_folds(n, size=32, seed=0):
    """Smooth decaying backgrounds plus sparse Gaussian peaks (the target)."""
    rng = np.random.default_rng(seed)
    ii, jj = np.indices((size, size), dtype=np.float64)
    r = np.hypot(ii, jj)
    folds, peaks = [], []
    for _ in range(n):
        bg = rng.uniform(0.5, 1.0) * np.exp(-r / rng.uniform(8, 20)) + rng.uniform(0.05, 0.2) + 0.002 * jj
        sig = np.zeros_like(r)
        for _ in range(rng.integers(2, 5)):
            ci, cj = rng.uniform(2, size - 2, 2)
            sig += rng.uniform(0.2, 1.0) * np.exp(-((ii - ci) ** 2 + (jj - cj) ** 2) / (2 * 1.2**2))
        folds.append(bg + sig)
        peaks.append(sig)
    return np.array(folds, np.float32), np.array(peaks, np.float32)


def layers_of(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


# --------------------------------------------------------------------------- graph


def test_tiny_unet_structure():
    depth, f = 2, 4
    model = build_unet(depth=depth, base_filters=f, dilation_rate=2, upsampling="bilinear")
    assert isinstance(model, keras.Model) and isinstance(model, BackgroundUNet)
    convs = layers_of(model, keras.layers.Conv2D)
    assert len(convs) == 5 * depth + 3  # 2 per encoder level, 2 bottleneck, 3 per decoder level, 1x1
    three = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(three) == 5 * depth + 2
    assert all(c.dilation_rate == (2, 2) and c.padding == "same" for c in three)
    background = model.get_layer("background")
    assert background in convs and background.kernel_size == (1, 1) and background.filters == 1
    assert background.activation is keras.activations.linear
    acts = layers_of(model, keras.layers.LeakyReLU)
    assert len(acts) == 5 * depth + 2
    assert all(a.negative_slope == pytest.approx(0.2) for a in acts)
    assert len(layers_of(model, keras.layers.MaxPooling2D)) == depth
    ups = layers_of(model, keras.layers.UpSampling2D)
    assert len(ups) == depth and all(u.interpolation == "bilinear" for u in ups)
    assert len(layers_of(model, keras.layers.Concatenate)) == depth
    assert isinstance(model.get_layer("corrected"), keras.layers.Subtract)
    assert model.output.name.startswith("corrected") or model.layers[-1].name == "corrected"
    # Filters double per level; the bottleneck has f * 2**depth.
    assert [c.filters for c in three[:2 * depth + 2]] == [4, 4, 8, 8, 16, 16]
    x = np.random.default_rng(0).random((2, 16, 24, 1)).astype(np.float32)
    assert model.predict(x, verbose=0).shape == x.shape
    assert model.count_params() == expected_params(depth, f) == 8197


def test_output_is_input_minus_background():
    model = build_unet(depth=2, base_filters=4)
    x = np.random.default_rng(1).random((1, 32, 32, 1)).astype(np.float32)
    background, corrected = with_background(model).predict(x, verbose=0)
    np.testing.assert_allclose(corrected, model.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(x - background, corrected, atol=1e-6)


def test_paper_size_parameters_and_flops():
    model = build_unet(depth=4, base_filters=8)
    assert model.count_params() == expected_params(4, 8) == 540_073  # ~0.54 M
    assert build_unet(depth=4, base_filters=16).count_params() == expected_params(4, 16) == 2_158_417
    flops = unet_flops(model, (512, 512))
    assert flops == expected_flops(4, 8, 512, 512)
    assert flops == pytest.approx(8.2e9, rel=0.01)
    # The bandwidth floor: 1.65e8 bytes at 512 x 512 in float32 (~50 FLOP per byte).
    assert unet_traffic_bytes(model, (512, 512)) == expected_traffic(4, 8, 512, 512, 4)
    assert unet_traffic_bytes(model, (512, 256), itemsize=2) == expected_traffic(4, 8, 512, 256, 2)


@pytest.mark.parametrize(
    "kwargs",
    [{"depth": 0}, {"base_filters": 2.5}, {"dilation_rate": 0}, {"upsampling": "cubic"}],
)
def test_build_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_unet(**kwargs)


def test_model_config_round_trip():
    model = build_unet(depth=3, base_filters=2, dilation_rate=4, upsampling="bilinear", name="m")
    config = model.get_config()
    assert config == {
        "name": "m", "trainable": True, "depth": 3, "base_filters": 2, "dilation_rate": 4, "upsampling": "bilinear",
    }  # fmt: skip
    clone = BackgroundUNet.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params() == expected_params(3, 2)


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("smooth_on", ["background", "output"])
def test_loss_matches_hand_computation(alpha, smooth_on):
    rng = np.random.default_rng(2)
    y_true = rng.random((2, 4, 5, 2)).astype(np.float32)
    y_true[0, 1, 2, 1] = 0.0  # a masked input pixel: log(eps)
    y_pred = (y_true[..., 1:2] - 0.1 * rng.random((2, 4, 5, 1))).astype(np.float32)
    loss = BackgroundLoss(alpha=alpha, smooth_on=smooth_on)
    got = float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))
    want = numpy_loss(y_true, y_pred, alpha, smooth_on=smooth_on)
    assert got == pytest.approx(want, rel=1e-5)
    if alpha == 0.0:
        assert got == pytest.approx(float(np.mean(np.abs(y_true[..., 0:1] - y_pred))), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_masked_loss_matches_hand_computation_and_ignores_invalid_pixels(alpha):
    rng = np.random.default_rng(4)
    y_true = rng.random((2, 6, 7, 3)).astype(np.float32)
    valid = np.ones((2, 6, 7), bool)
    valid[0, 2:4, 3] = False  # a gap
    valid[1, :, 5:] = False  # padding at the far edge
    y_true[..., 2] = valid
    y_true[..., 0] = np.where(valid, y_true[..., 0], 0)
    y_true[..., 1] = np.where(valid, y_true[..., 1], 0)
    y_pred = (y_true[..., 1:2] - 0.1 * rng.random((2, 6, 7, 1))).astype(np.float32)
    loss = BackgroundLoss(alpha=alpha)
    got = float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))
    assert got == pytest.approx(numpy_loss(y_true, y_pred, alpha), rel=1e-5)
    # whatever the network says at an invalid pixel costs nothing ...
    wild = y_pred.copy()
    wild[~valid] = 50.0
    assert float(keras.ops.convert_to_numpy(loss(y_true, wild))) == pytest.approx(got, rel=1e-6)
    # ... where without the mask channel it is pulled to the 0 of the target there
    unmasked = float(keras.ops.convert_to_numpy(loss(y_true[..., :2], wild)))
    assert unmasked > 5 * float(keras.ops.convert_to_numpy(loss(y_true[..., :2], y_pred)))


def test_prepare_appends_the_validity_mask_for_the_loss():
    folds = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6) + 1
    masks = np.ones(folds.shape, bool)
    masks[1, 0, 0] = False
    _, y2, _ = prepare(folds, masks, depth=2, targets=folds)
    x, y3, info = prepare(folds, masks, depth=2, targets=folds, mask_channel=True)
    assert y2.shape == (2, 8, 8, 2) and y3.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(y3[..., :2], y2)
    want = np.zeros((2, 8, 8), np.float32)
    want[:, :5, :6] = masks
    np.testing.assert_array_equal(y3[..., 2], want)


def test_loss_smoothness_targets_differ_and_are_documented():
    rng = np.random.default_rng(3)
    y_true = rng.random((1, 8, 8, 2)).astype(np.float32)
    y_pred = rng.random((1, 8, 8, 1)).astype(np.float32)
    a = float(BackgroundLoss(alpha=1.0, smooth_on="background")(y_true, y_pred))
    b = float(BackgroundLoss(alpha=1.0, smooth_on="output")(y_true, y_pred))
    assert a != pytest.approx(b)
    doc = BackgroundLoss.__doc__
    assert "predicted background" in doc and "mean" in doc


def test_loss_config_round_trip_and_validation():
    loss = BackgroundLoss(alpha=0.25, theta=1.5, eps=1e-3, smooth_on="output", name="l")
    config = loss.get_config()
    for key, value in {"alpha": 0.25, "theta": 1.5, "eps": 1e-3, "smooth_on": "output", "name": "l"}.items():
        assert config[key] == value
    assert BackgroundLoss.from_config(config).get_config() == config
    for bad in ({"alpha": 1.5}, {"theta": 0}, {"eps": -1}, {"smooth_on": "target"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BackgroundLoss(**bad)


# --------------------------------------------------------------------------- metrics


def _metric_value(metric, target, pred):
    metric.reset_state()
    y_true = np.stack([target, np.full_like(target, 7.0)], axis=-1)[None]  # channel 1 must be ignored
    metric.update_state(y_true, pred[None, ..., None])
    return float(metric.result())


@pytest.mark.parametrize("shape", [(40, 52), (96, 128), (300, 280)])
def test_metrics_match_numpy_reference(shape):
    rng = np.random.default_rng(4)
    target = rng.random(shape).astype(np.float32)
    pred = np.clip(target + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    other = rng.random(shape).astype(np.float32)
    for p in (pred, other):
        roi_t, roi_p = center_roi(target), center_roi(p)  # top-left max(64, min/4) square
        assert _metric_value(MAE(), target, p) == pytest.approx(float(np.mean(np.abs(target - p))), abs=1e-6)
        assert _metric_value(MAE(roi=True), target, p) == pytest.approx(float(np.mean(np.abs(roi_t - roi_p))), abs=1e-6)
        assert _metric_value(PSNR(), target, p) == pytest.approx(psnr(p, target), abs=1e-4)
        assert _metric_value(PSNR(roi=True), target, p) == pytest.approx(psnr(roi_p, roi_t), abs=1e-4)
        assert _metric_value(SSIM(), target, p) == pytest.approx(ssim(p, target), abs=1e-4)
        assert _metric_value(SSIM(roi=True), target, p) == pytest.approx(ssim(roi_p, roi_t), abs=1e-4)


def test_metrics_average_over_folds_and_round_trip():
    rng = np.random.default_rng(5)
    target = rng.random((3, 24, 24)).astype(np.float32)
    pred = (target + 0.02 * rng.standard_normal(target.shape) * np.arange(1, 4)[:, None, None]).astype(np.float32)
    y_true = np.stack([target, target], axis=-1)
    metric = PSNR(data_range=2.0)
    metric.update_state(y_true, pred[..., None])
    want = np.mean([psnr(p, t, data_range=2.0) for p, t in zip(pred, target)])
    assert float(metric.result()) == pytest.approx(want, abs=1e-4)
    assert float(PSNR()(y_true[:1], target[:1, ..., None])) == pytest.approx(120.0)  # identical: capped
    for cls in (MAE, PSNR, SSIM):
        m = cls(roi=True, data_range=2.0)
        assert m.name == f"{cls.__name__.lower()}_roi"
        config = m.get_config()
        assert config["roi"] is True and config["data_range"] == 2.0
        assert cls.from_config(config).get_config() == config


# --------------------------------------------------------------------------- saving, training


@pytest.mark.slow  # about 6 s
def test_save_load_round_trip_with_compiled_loss_and_metrics(tmp_path):
    keras.utils.set_random_seed(6)
    model = build_unet(depth=2, base_filters=4, dilation_rate=2)
    loss = BackgroundLoss(alpha=0.3, smooth_on="output")
    metrics = [MAE(), PSNR(), SSIM(), MAE(roi=True), PSNR(roi=True), SSIM(roi=True)]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics)
    folds, peaks = synthetic_folds(4)
    x, y, _ = prepare(folds, targets=peaks, depth=2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "x.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is BackgroundUNet
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    background, corrected = with_background(loaded).predict(x, verbose=0)  # the engine's sub-model
    np.testing.assert_allclose(x - background, corrected, atol=1e-6)
    assert isinstance(loaded.loss, BackgroundLoss) and loaded.loss.get_config() == loss.get_config()
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    after = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(after) == {"loss", "mae", "psnr", "ssim", "mae_roi", "psnr_roi", "ssim_roi"}
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.slow  # about 5 s
def test_twenty_training_steps_lower_the_loss():
    keras.utils.set_random_seed(7)
    folds, peaks = synthetic_folds(8, seed=7)
    x, y, _ = prepare(folds, targets=peaks, depth=2)
    model = build_unet(depth=2, base_filters=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=BackgroundLoss(alpha=0.1))
    losses = [float(model.train_on_batch(x, y)) for _ in range(20)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


# --------------------------------------------------------------------------- preprocessing


def test_prepare_restore_round_trip_unified():
    rng = np.random.default_rng(8)
    folds = (rng.random((3, 37, 50)) * 1000).astype(np.float32)
    masks = rng.random(folds.shape) > 0.1
    x, y, info = prepare(folds, masks)  # depth 4: multiples of 16
    assert y is None
    assert x.shape == (3, 48, 64, 1) and x.dtype == np.float32
    restored = restore(x, info)  # the model replaced by the identity
    assert restored.shape == folds.shape and restored.dtype == np.float32
    np.testing.assert_allclose(restored, np.where(masks, folds, 0), rtol=1e-6)
    # One 2-D fold in, one 2-D fold out; float64 stays float64, integers become float32.
    x1, _, info1 = prepare(folds[0].astype(np.float64), masks[0])
    out1 = restore(x1, info1)
    assert out1.shape == (37, 50) and out1.dtype == np.float64
    np.testing.assert_allclose(out1, np.where(masks[0], folds[0], 0), rtol=1e-6)
    assert restore(*prepare(np.arange(12, dtype=np.int32).reshape(3, 4), depth=2)[::2]).dtype == np.float32


def test_prepare_pads_at_the_far_edges_and_zeroes_masked_pixels():
    rng = np.random.default_rng(9)
    fold = rng.random((37, 50)) + 0.5
    fold[3, 4] = np.nan
    mask = np.ones(fold.shape, bool)
    mask[10:12, :] = False
    x, _, info = prepare(fold, mask, depth=4)
    img = x[0, ..., 0]
    assert img.shape == (48, 64)
    assert not img[37:].any() and not img[:, 50:].any()  # padding: rows/cols away from [0, 0]
    assert not img[10:12].any() and img[3, 4] == 0  # masked and non-finite pixels are 0
    assert not info["masks"][0, 3, 4]
    valid = info["masks"][0]
    np.testing.assert_allclose(img[:37, :50][valid] * info["input_scale"][0], fold[valid], rtol=1e-6)
    assert img.max() == pytest.approx(1.0)
    assert prepare(np.ones((33, 16)), depth=2)[0].shape == (1, 36, 16, 1)


def test_prepare_normalizations():
    rng = np.random.default_rng(10)
    folds = rng.random((2, 20, 20)) * 50 + 10
    targets = folds - 10 - rng.random(folds.shape)
    x, y, info = prepare(folds, targets=targets, normalization="unified", depth=2)
    assert y.shape == (2, 20, 20, 2)
    np.testing.assert_array_equal(y[..., 1:2], x)
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), 1.0)
    np.testing.assert_allclose(y[..., 0] * info["input_scale"][:, None, None], targets, rtol=1e-6)
    x, y, info = prepare(folds, targets=targets, normalization="independent", depth=2)
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), 1.0)
    np.testing.assert_allclose(y[..., 0].max(axis=(1, 2)), 1.0)  # each scaled to its own max
    np.testing.assert_allclose(restore(y[..., :1], info), targets, rtol=1e-6)  # exact with known targets
    _, _, info = prepare(folds, normalization="independent", depth=2)
    with pytest.raises(ValueError, match="unified"):
        restore(x, info)  # the target's maximum is unknown at inference


def test_robust_normalisation_ignores_a_bias_and_a_hot_pixel():
    """The network's input of a photon-counting fold is the same with a CCD's bias of 100
    added and, but for its 3 x 3 neighbourhood, with a hot pixel (where "unified", the
    paper's divide-by-max, changes by far more); the background (fold minus the restored target) is the same but for
    the bias, and the hot pixel stays in the corrected fold."""
    rng = np.random.default_rng(11)
    ii, jj = np.indices((40, 48))
    expected = 30.0 * np.exp(-np.hypot(ii, jj) / 15.0) + 2.0 + 40.0 * np.exp(-0.5 * ((np.hypot(ii, jj) - 20.0) / 1.5) ** 2)
    fold = rng.poisson(expected).astype(np.float64)
    mask = np.ones(fold.shape, bool)
    mask[:3, :3] = False  # the beam stop
    target = fold - (30.0 * np.exp(-np.hypot(ii, jj) / 15.0) + 2.0)
    biased = fold + 100.0
    hot = fold.copy()
    hot[30, 40] = 1e6
    x, y, info = prepare(fold, mask, normalization="robust", targets=target, depth=2)
    for other, shift, where in ((biased, 100.0, None), (hot, 0.0, (30, 40))):
        other_target = target + (other - fold - shift)  # a corrected fold keeps a hot pixel, not a bias
        x2, y2, info2 = prepare(other, mask, normalization="robust", targets=other_target, depth=2)
        keep = np.ones(x.shape, bool)
        if where is not None:  # the hot pixel, and its neighbours' caps (it is their highest neighbour now)
            keep[0, where[0] - 1 : where[0] + 2, where[1] - 1 : where[1] + 2, 0] = False
        np.testing.assert_allclose(x2[keep], x[keep], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(y2[..., :1][keep], y[..., :1][keep], rtol=1e-6, atol=1e-7)
        assert info2["input_offset"][0] == pytest.approx(info["input_offset"][0] + shift)
        assert info2["input_scale"][0] == pytest.approx(info["input_scale"][0])
        # The model replaced by one that returns its target: detector units back, the
        # floor and the cap in their places.
        np.testing.assert_allclose(restore(y2[..., :1], info2)[mask], other_target[mask], rtol=1e-5, atol=1e-3)
        ux, _, _ = prepare(other, mask, normalization="unified", depth=2)
        ux0, _, _ = prepare(fold, mask, normalization="unified", depth=2)
        assert ux[keep].mean() < 0.7 * ux0[keep].mean() or ux[keep].mean() > 1.4 * ux0[keep].mean()
    assert info["input_offset"][0] == np.percentile(fold[mask], ROBUST_OFFSET_PERCENTILE)
    assert x.max() == pytest.approx(1.0)


def test_cap_isolated_brings_a_pixel_down_to_its_highest_neighbour_only():
    img = np.array([[[1.0, 2.0, 1.0, 0.0], [2.0, 90.0, 3.0, 0.0], [1.0, 2.0, 1.0, 7.0]]])
    valid = np.ones(img.shape, bool)
    valid[0, 2, 3] = False
    out = cap_isolated(img, valid)
    assert out[0, 1, 1] == 3.0 and out[0, 2, 3] == 0.0  # capped; invalid is 0
    np.testing.assert_array_equal(np.delete(out.ravel(), [5, 11]), np.delete(img.ravel(), [5, 11]))
    lone = np.zeros((1, 3, 3))
    lone[0, 1, 1] = 5.0
    assert cap_isolated(lone, lone > 0)[0, 1, 1] == 5.0  # no valid neighbour: kept


def test_prepare_rejects_bad_input():
    with pytest.raises(ValueError, match="normalization"):
        prepare(np.ones((4, 4)), normalization="global")
    with pytest.raises(ValueError, match="masks"):
        prepare(np.ones((4, 4)), np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="targets"):
        prepare(np.ones((4, 4)), targets=np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="2-D fold"):
        prepare(np.ones(4))
    x, _, info = prepare(np.ones((5, 5)), depth=2)
    with pytest.raises(ValueError, match="outputs"):
        restore(x[:, :4, :4], info)


def test_all_zero_fold_keeps_scale_one():
    x, _, info = prepare(np.zeros((8, 8)), depth=2)
    assert info["input_scale"][0] == 1.0 and not x.any()


# --------------------------------------------------------------------------- purity


def test_package_import_does_not_import_the_model():
    code = "import sys, live_bgsub, live_bgsub.metrics\nprint('live_bgsub.model' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


@pytest.mark.parametrize("module", ["unet.py", "losses.py", "keras_metrics.py"])
def test_keras_modules_import_only_keras(module):
    tree = ast.parse((MODEL_DIR / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "keras", "math"}, imported
