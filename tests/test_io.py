"""Reading detector images: formats, sentinels, header facts and clear errors."""

import h5py
import numpy as np
import pytest
from fabio.cbfimage import CbfImage
from fabio.edfimage import EdfImage
from fabio.tifimage import TifImage

from live_bgsub.errors import ImageReadError
from live_bgsub.io import mask_invalid, read_image

PILATUS_HEADER = (
    "# Detector: PILATUS 1M\n# Pixel_size 172e-6 m x 172e-6 m\n# Exposure_time 0.0100000 s\n"
    "# Exposure_period 0.0500000 s\n# Wavelength 1.0332 A\n# Detector_distance 3.40000 m\n"
)


def _pilatus_like(rng, shape=(40, 30)):
    raw = rng.poisson(3.0, size=shape).astype(np.int32)
    raw[10, :] = -1  # a gap row
    raw[5, 7] = -2  # a dead pixel
    return raw


def test_tiff_sentinels_become_mask(tmp_path):
    raw = _pilatus_like(np.random.default_rng(0))
    path = tmp_path / "frame.tif"
    TifImage(data=raw).write(str(path))
    img = read_image(path)
    assert img.data.dtype == np.float32 and img.mask.dtype == bool
    assert img.shape == raw.shape
    np.testing.assert_array_equal(img.mask, raw >= 0)
    np.testing.assert_array_equal(img.data, np.where(raw >= 0, raw, 0))
    assert (~img.mask).sum() == raw.shape[1] + 1


def test_cbf_pilatus_header_facts(tmp_path):
    raw = _pilatus_like(np.random.default_rng(1))
    path = tmp_path / "frame.cbf"
    CbfImage(data=raw, header={"_array_data.header_contents": PILATUS_HEADER}).write(str(path))
    img = read_image(path)
    np.testing.assert_array_equal(img.data, np.where(raw >= 0, raw, 0))
    assert img.pixel_size_mm == pytest.approx(0.172)
    assert img.exposure_s == pytest.approx(0.01)
    assert img.period_s == pytest.approx(0.05)
    assert img.wavelength_nm == pytest.approx(0.10332)
    assert img.distance_mm == pytest.approx(3400.0)


def test_edf_float_nan_and_negative_masked(tmp_path):
    raw = np.random.default_rng(2).random((20, 25)).astype(np.float32) * 10
    raw[3, 4] = np.nan
    raw[6, 6] = -5.0
    raw[7, 7] = np.inf
    path = tmp_path / "frame.edf"
    EdfImage(data=raw, header={"PSize_1": "7.5e-05", "ExposureTime": "0.002"}).write(str(path))
    img = read_image(path)
    assert not img.mask[3, 4] and not img.mask[6, 6] and not img.mask[7, 7]
    assert img.mask.sum() == raw.size - 3
    assert np.all(np.isfinite(img.data)) and img.data[3, 4] == 0
    assert img.pixel_size_mm == pytest.approx(0.075)
    assert img.exposure_s == pytest.approx(0.002)


def _write_eiger(path, frames, pixel_mask=None):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=frames, compression="gzip")
        det = h5.create_group("entry/instrument/detector")
        det["x_pixel_size"] = 75e-6
        det["count_time"] = 0.001
        det["frame_time"] = 0.0018
        det["detector_distance"] = 3.0
        h5["entry/instrument/beam/incident_wavelength"] = 1.0332
        if pixel_mask is not None:
            det.create_dataset("detectorSpecific/pixel_mask", data=pixel_mask)


def test_eiger_hdf5_frames_sentinel_and_pixel_mask(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.poisson(2.0, size=(3, 16, 12)).astype(np.uint32)
    frames[:, :, 5] = np.iinfo(np.uint32).max  # a gap column, EIGER style
    pixel_mask = np.zeros((16, 12), np.uint32)
    pixel_mask[2, 2] = 1
    path = tmp_path / "scan_master.h5"
    _write_eiger(path, frames, pixel_mask)
    img = read_image(path, frame=2)
    assert img.n_frames == 3 and img.frame == 2
    expected = (frames[2] != np.iinfo(np.uint32).max) & (pixel_mask == 0)
    np.testing.assert_array_equal(img.mask, expected)
    np.testing.assert_array_equal(img.data, np.where(expected, frames[2], 0).astype(np.float32))
    assert img.pixel_size_mm == pytest.approx(0.075)
    assert img.exposure_s == pytest.approx(0.001)
    assert img.period_s == pytest.approx(0.0018)
    assert img.distance_mm == pytest.approx(3000.0)
    assert img.wavelength_nm == pytest.approx(0.10332)
    with pytest.raises(ImageReadError, match="frame 3 requested, the file holds 3"):
        read_image(path, frame=3)


def test_uint16_max_is_invalid():
    raw = np.array([[0, 65535], [12, 3]], dtype=np.uint16)
    data, mask = mask_invalid(raw)
    assert mask.tolist() == [[True, False], [True, True]]
    assert data.dtype == np.float32 and data[0, 1] == 0


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_image(missing)


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.tif"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageReadError, match="junk.tif"):
        read_image(path)


def test_one_dimensional_data_is_rejected(tmp_path):
    path = tmp_path / "line.h5"
    with h5py.File(path, "w") as h5:
        h5["entry/data/data"] = np.arange(10)
    with pytest.raises(ImageReadError, match=r"expected a 2-D image, got data of shape \(10,\)"):
        read_image(path)


def test_hdf5_without_image_dataset(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as h5:
        h5["something/else"] = 1
    with pytest.raises(ImageReadError, match="no image dataset"):
        read_image(path)


def test_real_pilatus_frame(real_data):
    img = read_image(real_data / "P40_1_3_00000.tif")
    assert img.shape == (1043, 981)
    assert (~img.mask).sum() == 73568  # the data README's count of gap/dead pixels
    assert img.pixel_size_mm == pytest.approx(0.172)
    assert img.exposure_s == pytest.approx(0.010)
    assert img.period_s == pytest.approx(0.050)


def test_shipped_sample_equals_real_frame(real_data):
    from live_bgsub.cli import sample_frame_path

    shipped = read_image(sample_frame_path())
    original = read_image(real_data / "P40_1_3_00000.tif")
    np.testing.assert_array_equal(shipped.data, original.data)
    np.testing.assert_array_equal(shipped.mask, original.mask)
    assert shipped.pixel_size_mm == pytest.approx(0.172)
