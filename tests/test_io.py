"""Reading detector images: formats, sentinels, header facts and clear errors."""

import struct

import fabio
import h5py
import numpy as np
import pytest
from fabio.cbfimage import CbfImage
from fabio.edfimage import EdfImage
from fabio.tifimage import TifImage

from live_bgsub.errors import ImageReadError
from live_bgsub.io import BIAS_FLOOR_COUNTS, header_facts, mask_invalid, read_image, shows_bias_floor

PILATUS_HEADER = (
    "# Detector: PILATUS 1M\n# Pixel_size 172e-6 m x 172e-6 m\n# Exposure_time 0.0100000 s\n"
    "# Exposure_period 0.0500000 s\n# Wavelength 1.0332 A\n# Detector_distance 3.40000 m\n"
    "# Beam_xy (409.76, 490.97) pixels\n"
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


def test_cbf_pilatusheader_facts(tmp_path):
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
    assert img.beam_center_px == pytest.approx((409.76, 490.97))
    assert img.format == "fabio:CbfImage"


def test_cbf_real_pilatus_layout_with_convention(tmp_path):
    """A miniCBF as camserver writes it (PILATUS_1.2 convention, CRLF lines, unset Beam_xy)."""
    raw = _pilatus_like(np.random.default_rng(4))
    text = PILATUS_HEADER.replace("(409.76, 490.97)", "(0.00, 0.00)").replace("\n", "\r\n")
    path = tmp_path / "frame.cbf"
    header = {"_array_data.header_convention": "PILATUS_1.2", "_array_data.header_contents": text}
    CbfImage(data=raw, header=header).write(str(path))
    with fabio.open(str(path)) as check:
        assert check.header["_array_data.header_convention"] == "PILATUS_1.2"
    img = read_image(path)
    assert img.pixel_size_mm == pytest.approx(0.172)
    assert img.distance_mm == pytest.approx(3400.0)
    assert img.wavelength_nm == pytest.approx(0.10332)
    assert img.beam_center_px is None  # (0, 0) is "not set"


def test_pilatus_lines_follow_their_unit_tokens():
    """Pilatus keys are read in their documented unit (m, angstrom, s) unless the line
    writes another; an unknown unit leaves the fact out rather than guessing."""
    documented = header_facts({"Pixel_size": "172e-6 m x 172e-6 m", "Detector_distance": "0.5 m",
                                "Wavelength": "1.0332 A", "Exposure_time": "0.001 s"})  # fmt: skip
    assert documented == pytest.approx(
        {"pixel_size_mm": 0.172, "distance_mm": 500.0, "wavelength_nm": 0.10332, "exposure_s": 0.001}
    )
    # No unit token: the documented unit, whatever the magnitude (a 0.015 m distance stays 15 mm).
    bare = header_facts({"Detector_distance": "0.015", "Wavelength": "0.9"})
    assert bare == pytest.approx({"distance_mm": 15.0, "wavelength_nm": 0.09})
    written = header_facts({"Detector_distance": "3400 mm", "Exposure_time": "10 ms"})
    assert written == pytest.approx({"distance_mm": 3400.0, "exposure_s": 0.01})
    assert header_facts({"Detector_distance": "3 furlongs"}) == {}


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
    assert img.beam_center_px is None and img.distance_mm is None and img.wavelength_nm is None


def test_edf_saxs_keywords(tmp_path):
    """ESRF SAXS keywords in metres, Center_1/Center_2 in pixels; LImA's period is
    exposure + latency."""
    raw = np.random.default_rng(5).poisson(2.0, size=(20, 25)).astype(np.int32)
    header = {"PSize_1": "1.72e-04", "PSize_2": "1.72e-04", "SampleDistance": "3.4", "WaveLength": "1.0332e-10",
              "Center_1": "12.5", "Center_2": "8.25", "acq_expo_time": "0.01", "acq_latency_time": "0.04"}  # fmt: skip
    path = tmp_path / "saxs.edf"
    EdfImage(data=raw, header=header).write(str(path))
    img = read_image(path)
    assert img.format == "fabio:EdfImage"
    assert img.pixel_size_mm == pytest.approx(0.172)
    assert img.distance_mm == pytest.approx(3400.0)
    assert img.wavelength_nm == pytest.approx(0.10332)
    assert img.beam_center_px == pytest.approx((12.5, 8.25))
    assert img.exposure_s == pytest.approx(0.01)
    assert img.period_s == pytest.approx(0.05)
    np.testing.assert_array_equal(img.mask, np.ones(raw.shape, bool))  # int32 counts: zeros are counts


def _write_eiger(path, frames, pixel_mask=None, units=True):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=frames, compression="gzip")
        det = h5.create_group("entry/instrument/detector")
        det["x_pixel_size"] = 75e-6
        det["count_time"] = 0.001
        det["frame_time"] = 0.0018
        det["detector_distance"] = 3.0
        det["beam_center_x"] = 5.5
        det["beam_center_y"] = 7.25
        h5["entry/instrument/beam/incident_wavelength"] = 1.0332
        if units:  # as a DECTRIS master file writes them
            for name, unit in (("x_pixel_size", "m"), ("count_time", "s"), ("frame_time", "s"),
                               ("detector_distance", "m"), ("beam_center_x", "pixel"), ("beam_center_y", "pixel")):  # fmt: skip
                det[name].attrs["units"] = np.bytes_(unit)
            h5["entry/instrument/beam/incident_wavelength"].attrs["units"] = np.bytes_("angstrom")
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
    assert img.beam_center_px == pytest.approx((5.5, 7.25))
    with pytest.raises(ImageReadError, match="frame 3 requested, the file holds 3"):
        read_image(path, frame=3)


def test_nexus_units_attributes_are_honoured(tmp_path):
    """A NeXus writer's ``units`` attribute wins over the EIGER default; without one the
    EIGER units apply; NXdetector ``distance`` stands in for ``detector_distance``."""
    frames = np.random.default_rng(6).poisson(2.0, size=(1, 8, 9)).astype(np.uint32)
    path = tmp_path / "nexus.nxs"
    _write_eiger(path, frames, units=False)
    bare = read_image(path)
    assert bare.pixel_size_mm == pytest.approx(0.075) and bare.distance_mm == pytest.approx(3000.0)
    assert bare.wavelength_nm == pytest.approx(0.10332)
    with h5py.File(path, "a") as h5:
        det = h5["entry/instrument/detector"]
        del det["detector_distance"], det["x_pixel_size"]
        det["distance"] = 2500.0
        det["distance"].attrs["units"] = "mm"
        det["x_pixel_size"] = 172.0
        det["x_pixel_size"].attrs["units"] = "um"
        h5["entry/instrument/beam/incident_wavelength"].attrs["units"] = "nm"
        h5["entry/instrument/beam/incident_wavelength"][()] = 0.1
        det["count_time"].attrs["units"] = "parsecs"  # unknown: left out, not guessed
    img = read_image(path)
    assert img.distance_mm == pytest.approx(2500.0)
    assert img.pixel_size_mm == pytest.approx(0.172)
    assert img.wavelength_nm == pytest.approx(0.1)
    assert img.exposure_s is None


# ---- MarCCD / Rayonix: a TIFF whose 3072-byte frame header sits at byte 1024 -----------

MARCCD_FIELDS = {
    # field: byte offset in the frame header (fabio.marccdimage's layout, MarCCD's C struct)
    "header_type": 0, "header_byte_order": 28, "data_byte_order": 32, "header_size": 36,
    "nfast": 80, "nslow": 84, "depth": 88, "saturated_value": 104,
    "xtal_to_detector": 640, "beam_x": 644, "beam_y": 648, "integration_time": 652, "exposure_time": 656,
    "start_xtal_to_detector": 696, "pixelsize_x": 772, "pixelsize_y": 776, "mean_bias": 780,
    "source_wavelength": 908,
}  # fmt: skip


def _write_marccd(path, raw, big_endian=False, **fields):
    """A minimal MarCCD/Rayonix TIFF as marccd writes one: little-endian TIFF magic with
    its first IFD at byte 8, the frame header at 1024 (pointed to by tag 34710), the
    uint16 pixels from byte 4096."""
    o = ">" if big_endian else "<"
    rows, cols = raw.shape
    tags = [  # (tag, type, value): type 3 SHORT, 4 LONG
        (256, 4, cols), (257, 4, rows), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 4096),
        (277, 3, 1), (278, 4, rows), (279, 4, raw.size * 2), (339, 3, 1), (34710, 4, 1024),
    ]  # fmt: skip
    ifd = struct.pack(o + "H", len(tags))
    for tag, typ, value in tags:
        packed = struct.pack(o + "H", value) + b"\0\0" if typ == 3 else struct.pack(o + "I", value)
        ifd += struct.pack(o + "HHI", tag, typ, 1) + packed
    ifd += struct.pack(o + "I", 0)
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(o + "I", 8) + ifd
    header = bytearray(3072)
    header[4:8] = b"MMX\0"
    values = {"header_type": 2, "header_byte_order": 4321 if big_endian else 1234, "header_size": 3072,
              "nfast": cols, "nslow": rows, "depth": 2, "saturated_value": 65535, **fields}  # fmt: skip
    values["data_byte_order"] = values["header_byte_order"]
    for name, value in values.items():
        struct.pack_into(o + "i", header, MARCCD_FIELDS[name], value)
    header[1280 : 1280 + 14] = b"frame_001.tif\0"  # filename[64]
    header[1440 : 1440 + 28] = b"Detector Serial Number = 56\n"  # file_comments[512]
    blob = tiff.ljust(1024, b"\0") + bytes(header) + raw.astype(o + "u2").tobytes()
    path.write_bytes(blob)


def _ccd_frame(shape=(64, 64), bias=100, seed=7):
    """uint16 CCD frame: bias + signal inside a circular active area, exact 0 outside."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    inside = np.hypot(rows - (shape[0] - 1) / 2, cols - (shape[1] - 1) / 2) <= min(shape) / 2
    raw = (bias + rng.normal(0, 3, shape) + rng.poisson(5.0, shape)).astype(np.uint16)
    raw[~inside] = 0
    return raw, inside


MARCCD_GEOMETRY = {"pixelsize_x": 79000, "pixelsize_y": 79000, "xtal_to_detector": 2500000, "beam_x": 31500,
                   "beam_y": 33250, "exposure_time": 1000, "integration_time": 3027, "source_wavelength": 103320}  # fmt: skip


@pytest.mark.parametrize("name,big_endian,fabio_class", [
    ("frame.tif", False, "TifImage"), ("frame.mccd", False, "MarccdImage"), ("frame_be.tif", True, "TifImage"),
])  # fmt: skip
def test_marccdheader_facts(tmp_path, name, big_endian, fabio_class):
    """MarCCD units: pixel size in nm, distance in 1000 * mm, wavelength in fm, exposure
    in ms, beam centre in 1000 * pixels. fabio reads the pixels (as a TifImage unless the
    file is named *.mccd) but not this header: it is read from byte 1024."""
    raw, inside = _ccd_frame()
    path = tmp_path / name
    _write_marccd(path, raw, big_endian=big_endian, **MARCCD_GEOMETRY)
    with fabio.open(str(path)) as check:
        assert type(check).__name__ == fabio_class
        np.testing.assert_array_equal(check.data, raw)
    img = read_image(path)
    assert img.format.startswith(f"fabio:{fabio_class}")
    assert img.format.endswith("+marccd") == (fabio_class == "TifImage")
    assert img.pixel_size_mm == pytest.approx(0.079)
    assert img.distance_mm == pytest.approx(2500.0)
    assert img.wavelength_nm == pytest.approx(0.10332)
    assert img.exposure_s == pytest.approx(1.0)
    assert img.period_s is None
    assert img.beam_center_px == pytest.approx((31.5, 33.25))
    assert img.header["marccd.integration_time"] == "3027"
    assert img.header["marccd.filename"] == "frame_001.tif"
    assert img.header["marccd.file_comments"] == "Detector Serial Number = 56"
    # The zeros outside the circular active area are not counts.
    np.testing.assert_array_equal(img.mask, inside)
    np.testing.assert_array_equal(img.data, np.where(inside, raw, 0).astype(np.float32))


def test_marccd_unset_and_implausible_fields(tmp_path):
    """Zeros are "not set"; start_xtal_to_detector stands in for xtal_to_detector; a value
    that is not physical in its documented unit (103317500 fm = 103 nm) is left out."""
    raw, _ = _ccd_frame(seed=8)
    path = tmp_path / "frame.tif"
    _write_marccd(path, raw, pixelsize_x=79000, start_xtal_to_detector=1800000, source_wavelength=103317500)
    img = read_image(path)
    assert img.pixel_size_mm == pytest.approx(0.079)
    assert img.distance_mm == pytest.approx(1800.0)
    assert img.wavelength_nm is None and img.header["marccd.source_wavelength"] == "103317500"
    assert img.exposure_s is None and img.beam_center_px is None


def test_tiff_without_marccd_header_is_plain(tmp_path):
    """A little-endian TIFF with nothing at byte 1024 gets no MarCCD facts."""
    raw = np.random.default_rng(9).poisson(3.0, size=(40, 30)).astype(np.uint16)
    path = tmp_path / "plain.tif"
    TifImage(data=raw).write(str(path))
    img = read_image(path)
    assert not img.format.endswith("+marccd")
    assert img.pixel_size_mm is None and img.beam_center_px is None
    assert img.mask.all()  # photon-counting-like uint16: zeros are counts


def test_uint16_max_is_invalid():
    raw = np.array([[0, 65535], [12, 3]], dtype=np.uint16)
    data, mask = mask_invalid(raw)
    assert mask.tolist() == [[True, False], [True, True]]
    assert data.dtype == np.float32 and data[0, 1] == 0


# ---- zeros of biased (CCD) frames -----------------------------------------------------


def test_uint16_bias_zeros_outside_circle_are_invalid():
    raw, inside = _ccd_frame(shape=(80, 96), bias=100)
    assert shows_bias_floor(raw)
    data, mask = mask_invalid(raw)
    np.testing.assert_array_equal(mask, inside)
    assert data[~inside].max() == 0 and data[inside].min() >= 80
    # A dead pixel inside the active area that reads 0 is invalid too; saturation still is.
    raw[40, 48] = 0
    raw[41, 48] = 65535
    _, mask = mask_invalid(raw)
    assert not mask[40, 48] and not mask[41, 48]
    # The choice can be forced either way.
    assert mask_invalid(raw, zeros_invalid=False)[1][~inside].all()
    assert not mask_invalid(np.array([[0, 1], [2, 3]], np.uint16), zeros_invalid=True)[1][0, 0]


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16])
def test_photon_counting_zeros_stay_valid(dtype):
    """EIGER-like frames: median 1-2 counts, many genuine zeros, gaps at the dtype max."""
    raw = np.random.default_rng(10).poisson(1.5, size=(60, 50)).astype(dtype)
    raw[:, 20] = np.iinfo(dtype).max
    assert (raw == 0).sum() > 300
    assert not shows_bias_floor(raw)
    _, mask = mask_invalid(raw)
    np.testing.assert_array_equal(mask, raw != np.iinfo(dtype).max)


def test_sparse_photon_counting_frame_keeps_its_zeros():
    """A nearly dark photon-counting frame whose few hits are all >= 8 counts: the zeros
    are the majority, so they are counts, not an inactive area."""
    raw = np.zeros((50, 50), np.uint32)
    raw[tuple(np.random.default_rng(11).integers(0, 50, (2, 40)))] = 50
    assert not shows_bias_floor(raw)
    assert mask_invalid(raw)[1].all()


def test_signed_and_float_frames_never_drop_zeros():
    """The rule tests unsigned-integer data only: an int32 Pilatus frame with a high floor
    (a powder frame) or float data keep their zeros."""
    raw, inside = _ccd_frame(bias=100)
    for frame in (raw.astype(np.int32), raw.astype(np.float32), raw.astype(np.float64)):
        assert not shows_bias_floor(frame)
        np.testing.assert_array_equal(mask_invalid(frame)[1], np.ones(raw.shape, bool))


def test_eight_bit_frames():
    """uint8 follows the same rule: an 8-bit export of a CCD frame (floor 20, zeros outside
    the active area) loses its zeros; an 8-bit photon-counting frame (EIGER 8-bit mode)
    keeps them; 255 is the dtype maximum, invalid."""
    raw, inside = _ccd_frame(bias=20)
    ccd8 = raw.astype(np.uint8)
    assert shows_bias_floor(ccd8)
    np.testing.assert_array_equal(mask_invalid(ccd8)[1], inside)
    pc8 = np.random.default_rng(12).poisson(1.0, size=(40, 40)).astype(np.uint8)
    pc8[0, 0] = 255
    assert not shows_bias_floor(pc8)
    np.testing.assert_array_equal(mask_invalid(pc8)[1], pc8 != 255)


def test_bias_floor_threshold_is_the_first_percentile():
    """The floor: fewer than 1 % of the non-zero pixels below 8 counts."""
    raw, inside = _ccd_frame(shape=(40, 50), bias=100)
    n_nonzero = int(inside.sum())
    n_allowed = -(-n_nonzero // 100) - 1  # the most pixels below 8 that are fewer than 1 %
    low = np.flatnonzero(inside)[: n_allowed + 1]
    raw.flat[low[:n_allowed]] = BIAS_FLOOR_COUNTS - 1
    assert shows_bias_floor(raw)
    raw.flat[low[n_allowed]] = 1  # one more: not fewer than 1 %
    assert not shows_bias_floor(raw)
    raw.flat[low] = BIAS_FLOOR_COUNTS  # exactly 8 counts is on the floor
    assert shows_bias_floor(raw)
    assert not shows_bias_floor(np.full((4, 4), 100, np.uint16))  # no zero at all
    assert not shows_bias_floor(np.zeros((4, 4), np.uint16))


def test_bright_photon_counting_frame_keeps_its_beam_stop_zeros():
    """A bright EIGER-like frame (every count >= 8) with a beam stop's shadow reading 0 in
    its middle: the corners read counts, so the zeros stay valid."""
    rows, cols = np.indices((60, 70))
    raw = np.random.default_rng(13).poisson(40.0, size=rows.shape).astype(np.uint32)
    raw[np.hypot(rows - 30, cols - 35) < 6] = 0
    assert not shows_bias_floor(raw)
    assert mask_invalid(raw)[1].all()
    # With zero corners too (a circular active area) it is a biased frame.
    raw[np.hypot(rows - 29.5, cols - 34.5) > 30] = 0
    assert shows_bias_floor(raw)


def test_low_count_frame_with_zero_corners_keeps_its_zeros():
    """Median 1-2 counts and zeros in the corners by chance: no floor, zeros are counts."""
    raw = np.random.default_rng(14).poisson(1.5, size=(50, 40)).astype(np.uint16)
    raw[0, 0] = raw[0, -1] = raw[-1, 0] = raw[-1, -1] = 0
    assert not shows_bias_floor(raw)
    assert mask_invalid(raw)[1].all()


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


P40_FRAMES = [f"P40_1_3_0000{i}" for i in range(6)] + ["venus32int", "powder_Mn23-1_diffScan_0167"]


@pytest.mark.realdata
@pytest.mark.parametrize("name", P40_FRAMES)
def test_real_pilatus_masks_unchanged(real_data, name):
    """The BioCAT Pilatus frames (int32, median 1-2, many zeros) keep every zero: only
    the 73,568 gap/dead pixels are invalid."""
    img = read_image(real_data / f"{name}.tif")
    assert (~img.mask).sum() == 73568
    assert img.format == "fabio:PilatusImage"
    assert img.pixel_size_mm == pytest.approx(0.172)
    assert img.beam_center_px is None  # "Beam_xy (0.00, 0.00) pixels": not set


CARDIAC = "CD_PIGLV_PIG3_FB_SHORT_PRE_BUFFER_00001.tif"


@pytest.mark.realdata
def test_real_cardiac_marccd_frame(real_data):
    """The MarCCD frame: its zeros outside the circular active area are invalid; its
    MarCCD header gives a 79 um pixel, 1 s exposure and the nominal beam centre (no
    distance; a wavelength not physical in its documented unit)."""
    path = real_data / CARDIAC
    if not path.exists():
        pytest.skip(f"{CARDIAC} not found in {real_data}")
    img = read_image(path)
    assert img.format == "fabio:TifImage+marccd"
    assert img.shape == (2048, 2048)
    assert int(img.mask.sum()) == 3294171 and int((~img.mask).sum()) == 900133
    rows, cols = np.nonzero(~img.mask)
    assert np.hypot(rows - 1023.5, cols - 1023.5).min() > 1023  # all outside the active circle
    assert img.pixel_size_mm == pytest.approx(0.079)
    assert img.exposure_s == pytest.approx(1.0)
    assert img.beam_center_px == pytest.approx((1025.316, 1025.316))
    assert img.distance_mm is None and img.wavelength_nm is None
