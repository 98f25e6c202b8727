"""Synthetic fiber-diffraction frames with a known true background (the project's ground truth).

:func:`make_pattern` draws a muscle fiber pattern on a detector layout (Pilatus 1M / 2M,
EIGER2 4M / 9M, MAR CCDs, a Rayonix and an older 1k CCD; :data:`PRESETS`): hexagonal
equatorial reflections, meridional and layer-line reflections, a diffuse background, a
beam-stop shadow (with its arm where the detector has one), detector gaps, dead pixels and
Poisson counting noise. Because the background and the reflections are generated
separately, every classical or learned background method can be scored against the
truth, and every number a scientist reads from a corrected pattern (S10, I10, I11,
I11/I10, M3) is known exactly (``SyntheticPattern.params``).
:func:`make_powder` draws an isotropic powder-ring pattern (no equator), the negative
control for equator detection. :data:`FAMILIES` names the presets of the detector
robustness benchmark.

Photons and detector response
-----------------------------
``frame``, ``background`` and ``signal`` are always photon counts, whatever the
detector. :meth:`SyntheticPattern.raw` applies the detector's response and writes what
that detector writes: a photon-counting detector (Pilatus, EIGER) int32 counts with -1 in
gaps and -2 at dead pixels; a CCD (MAR, Rayonix) ``bias + gain * photons + read noise``
as uint16 clipped to [0, 65535], 0 where nothing is sensitive and about the bias level
under the beam stop. The response parameters (``bias``, ``gain``, ``read_noise``,
``bit_depth``) are :func:`make_pattern` arguments with per-preset defaults
(:class:`DetectorPreset`), recorded in ``params``.

Geometry conventions (``docs/conventions.md``)
----------------------------------------------
- Points are ``(x, y)`` with ``x`` the column and ``y`` the row; pixel centres sit at
  integer coordinates.
- A pattern generated with ``rotation_deg = theta`` has its equator along the unit
  vector ``e = (cos(a), sin(a))`` in ``(x, y)`` image coordinates, with
  ``a = EQUATOR_SIGN * theta``, and its meridian along ``m = (-sin(a), cos(a))``.
  With ``EQUATOR_SIGN = +1`` (the value used here) a positive rotation makes the
  equator's right-hand side dip toward larger row numbers, which is the convention of
  :mod:`live_bgsub.geometry` (``Geometry.equator_vector``) and of the MuscleX
  rotations quoted for the real P40 frames (their equator dips ~1.5 degrees to the
  right and MuscleX reports +1.1..+2.7). Flip the single constant ``EQUATOR_SIGN``
  if that convention ever changes.
- A point at equator coordinate ``u`` and meridian coordinate ``v`` (pixels) lies at
  ``center + u * e + v * m``; its radius is ``hypot(u, v)`` and its azimuth is
  ``atan2(v, u)`` (0 on the equator's ``+e`` side, +-90 degrees on the meridian).

Units
-----
Lengths are detector pixels of the chosen preset; intensities are expected photon
counts. The physical model is written for a Pilatus (172 um pixels) and scaled to
other pixel sizes at the same camera length: lengths by ``k = 0.172 mm / pixel``,
per-pixel background levels by ``1 / k**2`` (the same photons spread over more,
smaller pixels). Integrated reflection intensities do not depend on the pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import normalize_rotation

__all__ = [
    "BEAM_STOP",
    "DEAD",
    "EQUATOR_SIGN",
    "GAP",
    "VALID",
    "DetectorPreset",
    "FAMILIES",
    "PRESETS",
    "SyntheticPattern",
    "curved_residual",
    "make_pattern",
    "make_powder",
]

#: Sign of the equator angle: the equator of a pattern generated with
#: ``rotation_deg = theta`` runs along ``(cos(a), sin(a))`` in (x, y) image coordinates,
#: with ``a = EQUATOR_SIGN * theta``. +1 matches ``live_bgsub.geometry``.
EQUATOR_SIGN = 1.0

_REF_PIXEL_MM = 0.172  # the physical model's reference pixel (Pilatus)
_PEAK_EXTENT = 5.0  # reflections are evaluated out to this many sigmas
_SQRT3 = math.sqrt(3.0)
_SQRT7 = math.sqrt(7.0)
_MYOSIN_REPEAT_NM = 43.0
_M3_NM = 14.3

_BEAM_STOP_MM = 2.4  # beam-stop shadow radius of the presets (14 px on a Pilatus)

#: Codes of :attr:`SyntheticPattern.invalid` (why a pixel is invalid).
VALID, GAP, DEAD, BEAM_STOP = 0, 1, 2, 3

#: Detector kinds (``DetectorPreset.kind``) and the bit depths :meth:`SyntheticPattern.raw`
#: can write for each (the first is the default).
_KINDS = {"photon-counting": (32, 8), "ccd": (16, 8)}

# Independent random streams of a pattern's seed (``_stream``); the main stream
# (``np.random.default_rng(seed)``) draws the truth, the dead pixels and the photon noise.
_READ_NOISE_STREAM = 1


# --------------------------------------------------------------------------- detectors


def _check_response(bias, read_noise, gain):
    """Raise ValueError unless the detector response parameters are usable."""
    if not math.isfinite(bias):
        raise ValueError(f"bias must be a finite number of counts, got {bias!r}")
    if not (read_noise >= 0 and math.isfinite(read_noise)):
        raise ValueError(f"read_noise must be a finite number of counts >= 0, got {read_noise!r}")
    if not (gain > 0 and math.isfinite(gain)):
        raise ValueError(f"gain must be a finite number of counts per photon > 0, got {gain!r}")


@dataclass(frozen=True)
class DetectorPreset:
    """Layout of a detector for :func:`make_pattern`.

    Parameters
    ----------
    name : str
        Preset name (a key of :data:`PRESETS`).
    shape : (int, int)
        Frame shape ``(rows, columns)`` = (height, width) in pixels.
    pixel_size_mm : float
        Pixel pitch (mm).
    module_shape : (int, int) or None
        Shape ``(rows, columns)`` of one sensor module; None for a detector without
        modules.
    module_gap : (int, int)
        Insensitive pixels ``(rows, columns)`` between neighbouring modules.
    chip_gap_columns : tuple of int
        Module-local columns that are insensitive (chip boundaries).
    active_radius_px : float or None
        Radius (pixels) of a circular active area centred on the frame (MAR CCD);
        None for a rectangular active area.
    nominal_center : (float, float)
        Typical beam centre ``(x, y)`` (pixels); random centres scatter around it.
    beam_stop_radius_px : float
        Typical radius of the beam-stop shadow (pixels).
    n_dead : int
        Number of randomly placed dead pixels.
    kind : {"photon-counting", "ccd"}
        What :meth:`SyntheticPattern.raw` writes: ``"photon-counting"`` (Pilatus, EIGER)
        int32 counts with -1 in gaps and -2 at dead pixels; ``"ccd"`` (MAR, Rayonix)
        uint16 ``bias + gain * photons + read noise`` with 0 where nothing is sensitive.
    bias : float
        Default constant offset (counts) the detector adds to every sensitive pixel,
        the beam-stop shadow included.
    read_noise : float
        Default Gaussian read noise (standard deviation in counts).
    gain : float
        Default counts per photon.
    beam_stop_arm_width_px : float
        Width (pixels) of the beam-stop arm, a bar from the beam stop to the frame edge;
        0 for a beam stop without an arm.
    beam_stop_arm_angle_deg : float
        Direction of the arm from the beam centre: the angle of ``(cos, sin)`` in
        ``(x, y)`` image coordinates (0 points to the right, 90 down to larger rows).
    """

    name: str
    shape: tuple[int, int]
    pixel_size_mm: float
    module_shape: tuple[int, int] | None = None
    module_gap: tuple[int, int] = (0, 0)
    chip_gap_columns: tuple[int, ...] = ()
    active_radius_px: float | None = None
    nominal_center: tuple[float, float] = (0.0, 0.0)
    beam_stop_radius_px: float = 15.0
    n_dead: int = 35
    kind: str = "photon-counting"
    bias: float = 0.0
    read_noise: float = 0.0
    gain: float = 1.0
    beam_stop_arm_width_px: float = 0.0
    beam_stop_arm_angle_deg: float = 0.0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"DetectorPreset kind must be one of {sorted(_KINDS)}, got {self.kind!r}")
        _check_response(self.bias, self.read_noise, self.gain)

    @property
    def scale(self) -> float:
        """Length scale ``k = 0.172 mm / pixel_size_mm`` relative to a Pilatus pixel."""
        return _REF_PIXEL_MM / self.pixel_size_mm

    def valid_mask(self) -> np.ndarray:
        """Sensitive area of the detector: False in module/chip gaps and off the active area.

        Returns
        -------
        mask : ndarray of bool, shape ``self.shape``
            True where the detector has a sensitive pixel (dead pixels and the beam
            stop are not included: they depend on the pattern).
        """
        h, w = self.shape
        if self.module_shape is None:
            valid = np.ones((h, w), bool)
        else:
            mh, mw = self.module_shape
            gh, gw = self.module_gap
            rows = (np.arange(h) % (mh + gh)) < mh
            cols_local = np.arange(w) % (mw + gw)
            cols = cols_local < mw
            for c in self.chip_gap_columns:
                cols &= cols_local != c
            valid = rows[:, None] & cols[None, :]
        if self.active_radius_px is not None:
            yy, xx = np.ogrid[:h, :w]
            r2 = (xx - (w - 1) / 2.0) ** 2 + (yy - (h - 1) / 2.0) ** 2
            valid &= r2 <= self.active_radius_px**2
        return valid


#: Detector presets of :func:`make_pattern`, by name.
PRESETS: dict[str, DetectorPreset] = {
    # Pilatus3 X 1M: 2 x 5 modules of 487 x 195 px (w x h), 7 px gaps between module
    # columns and 17 px between module rows -> 981 x 1043 px; 35 dead pixels like the
    # BioCAT frames; nominal centre and beam stop as in the P40 frames.
    "pilatus-1m": DetectorPreset(
        name="pilatus-1m",
        shape=(1043, 981),
        pixel_size_mm=0.172,
        module_shape=(195, 487),
        module_gap=(17, 7),
        nominal_center=(410.0, 491.0),
        beam_stop_radius_px=14.0,
        n_dead=35,
    ),
    # EIGER2 XE 9M: 3 x 6 modules of 1028 x 512 px (w x h), 12 px gaps between module
    # columns and 38 px between module rows -> 3108 x 3262 px. The chip boundary in the
    # middle of each module is modelled as a 2 px insensitive line (module-local
    # columns 513, 514), an approximation of the real chip seams.
    "eiger2-9m": DetectorPreset(
        name="eiger2-9m",
        shape=(3262, 3108),
        pixel_size_mm=0.075,
        module_shape=(512, 1028),
        module_gap=(38, 12),
        chip_gap_columns=(513, 514),
        nominal_center=(1554.0, 1380.0),
        beam_stop_radius_px=32.0,
        n_dead=300,
    ),
    # MAR165 CCD: 2048 x 2048 px of 80 um, no gaps, circular active area. The original
    # layout-only preset, kept bit for bit for seeded tests and benchmarks: its raw()
    # is the Pilatus-style int32 one. "mar165" is the CCD-faithful MAR165.
    "mar": DetectorPreset(
        name="mar",
        shape=(2048, 2048),
        pixel_size_mm=0.080,
        active_radius_px=1023.5,
        nominal_center=(1024.0, 1024.0),
        beam_stop_radius_px=30.0,
        n_dead=20,
    ),
    # Pilatus3 2M: 3 x 8 modules of 487 x 195 px (w x h) with the 1M's gaps (7 px
    # between module columns, 17 px between module rows) -> 1475 x 1679 px. The beam
    # sits inside the middle module column, off the frame's middle like the 1M's.
    "pilatus-2m": DetectorPreset(
        name="pilatus-2m",
        shape=(1679, 1475),
        pixel_size_mm=0.172,
        module_shape=(195, 487),
        module_gap=(17, 7),
        nominal_center=(720.0, 760.0),
        beam_stop_radius_px=14.0,
        n_dead=70,
    ),
    # EIGER2 4M: 2 x 4 modules of 1028 x 512 px with the 9M's gaps (12 px between module
    # columns, 38 px between module rows) and chip seam -> 2068 x 2162 px. The frame's
    # middle is a gap crossing; the beam sits in a module just off it.
    "eiger2-4m": DetectorPreset(
        name="eiger2-4m",
        shape=(2162, 2068),
        pixel_size_mm=0.075,
        module_shape=(512, 1028),
        module_gap=(38, 12),
        chip_gap_columns=(513, 514),
        nominal_center=(1000.0, 1000.0),
        beam_stop_radius_px=32.0,
        n_dead=130,
    ),
    # MarCCD 165: 2048 x 2048 px of 79 um, circular active area (165 mm), the beam
    # ~20 px off the middle as in real beamline frames; CCD response.
    "mar165": DetectorPreset(
        name="mar165",
        shape=(2048, 2048),
        pixel_size_mm=0.079,
        active_radius_px=1023.5,
        nominal_center=(1043.0, 1008.0),
        beam_stop_radius_px=round(_BEAM_STOP_MM / 0.079, 1),
        n_dead=20,
        kind="ccd",
        bias=100.0,
        read_noise=3.0,
    ),
    # MarCCD 225: 3072 x 3072 px of 73 um, treated as a circular active area like the
    # 165 (the real MX225 sensor is square); CCD response.
    "mar225": DetectorPreset(
        name="mar225",
        shape=(3072, 3072),
        pixel_size_mm=0.073,
        active_radius_px=1535.5,
        nominal_center=(1556.0, 1517.0),
        beam_stop_radius_px=round(_BEAM_STOP_MM / 0.073, 1),
        n_dead=40,
        kind="ccd",
        bias=100.0,
        read_noise=3.0,
    ),
    # Rayonix MX225HS binned 2 x 2: 2880 x 2880 px of 78 um, square, no gaps; CCD
    # response.
    "rayonix": DetectorPreset(
        name="rayonix",
        shape=(2880, 2880),
        pixel_size_mm=0.078,
        nominal_center=(1458.0, 1425.0),
        beam_stop_radius_px=round(_BEAM_STOP_MM / 0.078, 1),
        n_dead=30,
        kind="ccd",
        bias=100.0,
        read_noise=2.0,
    ),
    # An older 1024 x 1024 CCD of 0.1 mm pixels, square, no gaps, whose round beam stop
    # hangs on an arm: a 1.2 mm bar from the beam stop to the top-right frame edge
    # (clear of the equator and the meridian of an unrotated pattern).
    "ccd-1k": DetectorPreset(
        name="ccd-1k",
        shape=(1024, 1024),
        pixel_size_mm=0.100,
        nominal_center=(522.0, 497.0),
        beam_stop_radius_px=round(_BEAM_STOP_MM / 0.100, 1),
        n_dead=10,
        kind="ccd",
        bias=100.0,
        read_noise=5.0,
        beam_stop_arm_width_px=12.0,
        beam_stop_arm_angle_deg=-60.0,
    ),
}

#: Presets of the detector robustness benchmark (centre, rotation, S10 and I11/I10
#: errors per detector family): every detector family a beamline runs, photon counting
#: and CCD. ``"mar"``, the original MAR layout, is left out in favour of ``"mar165"``.
FAMILIES: tuple[str, ...] = (
    "pilatus-1m",
    "pilatus-2m",
    "eiger2-4m",
    "eiger2-9m",
    "mar165",
    "mar225",
    "rayonix",
    "ccd-1k",
)


def _get_preset(preset) -> DetectorPreset:
    if isinstance(preset, DetectorPreset):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise ValueError(f"unknown detector preset {preset!r}; expected one of {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class SyntheticPattern:
    """A synthetic frame and its ground truth.

    Attributes
    ----------
    frame : ndarray of float32, shape (rows, columns)
        Detector frame in photon counts (Poisson draws of ``background + signal``);
        0 at invalid pixels.
    background : ndarray of float32
        Noise-free expected counts of the true background; 0 at invalid pixels.
    signal : ndarray of float32
        Noise-free expected counts of the reflections only; 0 at invalid pixels.
    mask : ndarray of bool
        True where the pixel is valid; False in detector gaps, off the active area,
        in the beam-stop shadow and at dead pixels.
    params : dict
        The truth (see :func:`make_pattern` for the keys).
    invalid : ndarray of int8, optional
        Why each pixel is invalid: :data:`VALID` (0), :data:`GAP` (detector gap or off
        the active area), :data:`DEAD` or :data:`BEAM_STOP`; None: every pixel outside
        ``mask`` is a gap.
    """

    frame: np.ndarray
    background: np.ndarray
    signal: np.ndarray
    mask: np.ndarray
    params: dict
    invalid: np.ndarray = field(repr=False, default=None)

    def raw(self, *, bit_depth: int | None = None) -> np.ndarray:
        """The frame as the detector would write it: its response, dtype and sentinels.

        Parameters
        ----------
        bit_depth : {None, 32, 16, 8}, optional
            Bit depth of the image; default ``params["bit_depth"]`` (the
            :func:`make_pattern` argument: 32 for a photon-counting detector, 16 for a
            CCD). 8 writes an 8-bit image for either kind (see Returns).

        Returns
        -------
        raw : ndarray of int32, uint16 or uint8, shape ``frame.shape``
            With ``response = bias + gain * frame + read noise`` (``params``; the read
            noise is a seeded draw, the same at every call):

            - photon-counting, 32 bits (Pilatus, EIGER): int32 ``rint(response)``,
              clipped at 0, at valid pixels and ``rint(bias + read noise)`` in the
              beam-stop shadow (0 with the default response: the detector sees almost no
              photons there), -1 in module gaps and off the active area, -2 at dead
              pixels (the values a Pilatus 1M TIFF holds). With the default response
              (bias 0, gain 1, no read noise) this is ``rint(frame)``.
            - ccd, 16 bits (MAR, Rayonix): uint16 ``rint(response)`` clipped to
              [0, 65535] at valid pixels and in the beam-stop shadow (which reads about
              the bias: no photons, but the offset and the read noise), 0 in gaps, off
              the circular active area and at dead pixels.
            - 8 bits (either kind): uint8 ``rint(255 * v / max(v))``, ``v`` the image of
              the kind's default bit depth above with 0 in place of the negative
              sentinels (gaps, off the active area, dead pixels: 0). A linear rescale,
              so the order of pixel values is kept; the scale ``255 / max(v)`` is not
              recorded.

        Raises
        ------
        ValueError
            For a bit depth the detector kind cannot write.
        """
        p = self.params
        kind = p.get("detector_kind", "photon-counting")
        bits = p.get("bit_depth", _KINDS[kind][0]) if bit_depth is None else bit_depth
        if bits not in _KINDS[kind]:
            raise ValueError(f"a {kind} detector writes bit_depth {' or '.join(map(str, _KINDS[kind]))}, got {bits!r}")
        invalid = self.invalid if self.invalid is not None else np.where(self.mask, VALID, GAP).astype(np.int8)
        bias, gain, read_noise = float(p.get("bias", 0.0)), float(p.get("gain", 1.0)), float(p.get("read_noise", 0.0))
        if kind == "photon-counting" and bits == 32 and bias == 0.0 and gain == 1.0 and read_noise == 0.0:
            out = np.rint(self.frame).astype(np.int32)  # today's Pilatus frame, bit for bit
            out[invalid == GAP] = -1
            out[invalid == DEAD] = -2
            out[invalid == BEAM_STOP] = 0
            return out
        sensitive = (invalid == VALID) | (invalid == BEAM_STOP)
        response = self.frame.astype(np.float64) * gain  # frame is 0 in the beam-stop shadow
        response += bias
        if read_noise > 0:
            response += read_noise * _stream(p["seed"], _READ_NOISE_STREAM).standard_normal(response.shape)
        top = 65535.0 if kind == "ccd" else float(np.iinfo(np.int32).max)
        np.clip(np.rint(response, out=response), 0.0, top, out=response)
        response[~sensitive] = 0.0
        if bits == 8:
            vmax = float(response.max())
            scaled = response * (255.0 / vmax) if vmax > 0 else response
            return np.rint(scaled).astype(np.uint8)
        if kind == "ccd":
            return response.astype(np.uint16)
        out = response.astype(np.int32)
        out[invalid == GAP] = -1
        out[invalid == DEAD] = -2
        return out

    def reflection(self, name: str) -> np.ndarray:
        """Noise-free expected counts of one reflection and its symmetry mates.

        Parameters
        ----------
        name : str
            A reflection of ``params["reflections"]`` (``"1,0"``, ``"Z"``, ``"1,1"``,
            ``"2,0"``, ``"2,1"``, ``"M3"``, ``"M6"``) or a layer line of
            ``params["layer_lines"]`` (``"ML1"``, ...).

        Returns
        -------
        ndarray of float64, shape ``frame.shape``
            0 at invalid pixels; ``signal`` is the sum of every reflection's image.

        Raises
        ------
        KeyError
            For a name the pattern does not hold.
        """
        p = self.params
        found = [rf for rf in p["reflections"] if rf["name"] == name]
        if not found:
            raise KeyError(f"no reflection {name!r}; expected one of {[rf['name'] for rf in p['reflections']]}")
        img = _render_signal(_Frame(self.frame.shape, p["center"], p["rotation_deg"]), found)
        img[~self.mask] = 0.0
        return img


# --------------------------------------------------------------------------- rendering


class _Frame:
    """Pixel coordinates of a frame in the pattern's (equator, meridian) system."""

    def __init__(self, shape, center, rotation_deg):
        self.shape = shape
        self.cx, self.cy = float(center[0]), float(center[1])
        a = math.radians(EQUATOR_SIGN * rotation_deg)
        self.e = (math.cos(a), math.sin(a))
        self.m = (-math.sin(a), math.cos(a))

    def to_image(self, u, v):
        """Image coordinates ``(x, y)`` of equator/meridian coordinates ``(u, v)``."""
        return self.cx + u * self.e[0] + v * self.m[0], self.cy + u * self.e[1] + v * self.m[1]

    def box(self, u, v, margin=1):
        """Slices of the pixel box covering the points ``(u, v)``, or None if off-frame."""
        x, y = self.to_image(np.asarray(u, float), np.asarray(v, float))
        h, w = self.shape
        x0, x1 = max(math.floor(x.min()) - margin, 0), min(math.ceil(x.max()) + margin, w - 1)
        y0, y1 = max(math.floor(y.min()) - margin, 0), min(math.ceil(y.max()) + margin, h - 1)
        if x0 > x1 or y0 > y1:
            return None
        return slice(y0, y1 + 1), slice(x0, x1 + 1)

    def uv(self, box):
        """Equator and meridian coordinates ``(u, v)`` of the pixels of ``box``."""
        ys = np.arange(box[0].start, box[0].stop, dtype=np.float64)[:, None] - self.cy
        xs = np.arange(box[1].start, box[1].stop, dtype=np.float64)[None, :] - self.cx
        return xs * self.e[0] + ys * self.e[1], xs * self.m[0] + ys * self.m[1]

    def full_uv(self):
        return self.uv((slice(0, self.shape[0]), slice(0, self.shape[1])))


def _add_polar_peak(out, fr: _Frame, radius, azimuth, sigma_r, sigma_phi, intensity):
    """Add a 2-D Gaussian in (radius, azimuth) holding ``intensity`` counts in total.

    The peak is ``A exp(-(r - radius)^2 / 2 sigma_r^2 - dphi^2 / 2 sigma_phi^2)`` with
    ``A = intensity / (2 pi sigma_r sigma_phi radius)`` (the integral over the plane,
    ``int int f r dr dphi``, is then ``intensity``), evaluated only in its bounding box
    out to ``_PEAK_EXTENT`` sigmas. Angles in radians.
    """
    half = min(_PEAK_EXTENT * sigma_phi, math.pi)
    r_lo, r_hi = max(radius - _PEAK_EXTENT * sigma_r, 0.0), radius + _PEAK_EXTENT * sigma_r
    t = azimuth + np.linspace(-half, half, 65)
    rr = np.linspace(r_lo, r_hi, 9)
    us = np.concatenate([r_lo * np.cos(t), r_hi * np.cos(t), rr * math.cos(t[0]), rr * math.cos(t[-1])])
    vs = np.concatenate([r_lo * np.sin(t), r_hi * np.sin(t), rr * math.sin(t[0]), rr * math.sin(t[-1])])
    box = fr.box(us, vs, margin=2)
    if box is None:
        return
    u, v = fr.uv(box)
    r = np.hypot(u, v)
    dphi = (np.arctan2(v, u) - azimuth + math.pi) % (2 * math.pi) - math.pi
    amp = intensity / (2 * math.pi * sigma_r * sigma_phi * radius)
    out[box] += amp * np.exp(-0.5 * ((r - radius) / sigma_r) ** 2 - 0.5 * (dphi / sigma_phi) ** 2)


def _add_axis_peak(out, fr: _Frame, u0, v0, sigma_u, sigma_v, intensity):
    """Add a 2-D Gaussian in (u, v) centred at ``(u0, v0)`` holding ``intensity`` counts."""
    cu = np.array([u0 - _PEAK_EXTENT * sigma_u, u0 + _PEAK_EXTENT * sigma_u])
    cv = np.array([v0 - _PEAK_EXTENT * sigma_v, v0 + _PEAK_EXTENT * sigma_v])
    box = fr.box(np.repeat(cu, 2), np.tile(cv, 2), margin=2)
    if box is None:
        return
    u, v = fr.uv(box)
    amp = intensity / (2 * math.pi * sigma_u * sigma_v)
    out[box] += amp * np.exp(-0.5 * ((u - u0) / sigma_u) ** 2 - 0.5 * ((v - v0) / sigma_v) ** 2)


def _background(fr: _Frame, p: dict) -> np.ndarray:
    """True background (float64, counts per pixel) over the whole frame."""
    u, v = fr.full_uv()
    r = np.hypot(u, v)
    bg = p["bg_a"] + p["bg_b"] * np.exp(-p["bg_c"] * r) + p["bg_d"] * np.exp(-p["bg_e"] * r)
    bg += p["bg_f"] * (1.0 + (r / p["bg_r0_px"]) ** 2) ** (-0.5 * p["bg_g"])
    au = np.abs(u)
    width = p["streak_width_px"] * (1.0 + au / p["streak_widening_px"])
    bg += p["streak_amp"] * np.exp(-((au / p["streak_length_px"]) ** p["streak_shape"])) / (1.0 + (v / width) ** 2)
    return bg


def _reflections(p: dict) -> list[dict]:
    """The reflections of a fiber pattern (one entry per symmetry-equivalent set)."""
    s10 = p["s10_px"]

    def width(s):
        return math.hypot(p["sigma_c_px"], p["sigma_k"] * s)

    out = []
    for name, ratio, inten in (
        ("1,0", 1.0, p["i10"]),
        ("Z", p["z_ratio"], p["iz"]),
        ("1,1", _SQRT3, p["i11"]),
        ("2,0", 2.0, p["i20"]),
        ("2,1", _SQRT7, p["i21"]),
    ):
        s = ratio * s10
        sig = p["sigma_z_px"] if name == "Z" else width(s)
        out.append(
            dict(name=name, kind="equatorial", radius_px=s, sigma_r_px=sig, sigma_phi_deg=p["sigma_phi_deg"], intensity=inten)
        )
    for name, s, inten in (("M3", p["m3_px"], p["m3_intensity"]), ("M6", p["m6_px"], p["m6_intensity"])):
        out.append(
            dict(
                name=name,
                kind="meridional",
                radius_px=s,
                sigma_r_px=p["meridional_sigma_px"],
                sigma_phi_deg=math.degrees(p["meridional_width_px"] / s),
                intensity=inten,
            )
        )
    for ll in p["layer_lines"]:
        out.append(dict(ll, kind="layer-line"))
    return out


def _render_signal(fr: _Frame, refl: list[dict]) -> np.ndarray:
    sig = np.zeros(fr.shape, np.float64)
    for rf in refl:
        if rf["intensity"] <= 0:
            continue
        if rf["kind"] == "layer-line":
            for su in (1, -1):
                for sv in (1, -1):
                    _add_axis_peak(sig, fr, su * rf["u_px"], sv * rf["v_px"], rf["sigma_u_px"], rf["sigma_v_px"], rf["intensity"])
            continue
        azimuths = (0.0, math.pi) if rf["kind"] == "equatorial" else (0.5 * math.pi, -0.5 * math.pi)
        for az in azimuths:
            _add_polar_peak(sig, fr, rf["radius_px"], az, rf["sigma_r_px"], math.radians(rf["sigma_phi_deg"]), rf["intensity"])
    return sig


# --------------------------------------------------------------------------- drawing


def _resolve_seed(seed):
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    return seed


def _stream(seed, key: int) -> np.random.Generator:
    """Independent random stream ``key`` of a pattern's seed.

    New random quantities are drawn here, never from the main stream
    ``np.random.default_rng(seed)``, so that adding one does not shift the seeded
    outputs of existing presets.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


def _draw_fiber_params(rng: np.random.Generator, det: DetectorPreset) -> dict:
    """Random truth of a fiber pattern, drawn in a fixed order (overrides do not shift it)."""
    k = det.scale
    area = 1.0 / k**2  # per-pixel level factor
    u = rng.uniform
    p: dict[str, Any] = {}
    p["_center_jitter"] = (u(-1, 1), u(-1, 1))
    p["_rotation_jitter"] = u(-1, 1)
    p["s10_px"] = u(40.0, 70.0) * k
    p["d10_nm"] = u(36.5, 39.0)
    p["i10"] = u(8000.0, 16000.0)
    p["i11_i10"] = u(0.3, 2.2)
    p["z_ratio"] = u(1.43, 1.49)
    p["iz_i10"] = u(0.08, 0.25)
    p["i20_i10"] = u(0.03, 0.15)
    p["i21_i10"] = u(0.03, 0.12)
    p["sigma_c_px"] = u(1.8, 2.8) * k
    p["sigma_k"] = u(0.010, 0.025)
    p["sigma_z_px"] = u(1.8, 3.0) * k
    p["sigma_phi_deg"] = u(1.5, 5.0)
    p["m3_i10"] = u(0.04, 0.12)
    p["m6_m3"] = u(0.3, 0.8)
    p["meridional_sigma_px"] = u(1.2, 2.0) * k
    p["meridional_width_px"] = u(4.0, 10.0) * k
    p["_ml"] = (u(0.45, 0.75), u(0.05, 0.15), u(0.3, 0.6), u(1.5, 2.5), u(0.03, 0.08), u(0.02, 0.05))
    p["bg_a"] = u(0.8, 1.3) * area
    p["bg_b"] = u(200.0, 400.0) * area
    p["bg_c"] = 1.0 / (u(10.0, 14.0) * k)
    p["bg_d"] = u(7.0, 13.0) * area
    p["bg_e"] = 1.0 / (u(60.0, 100.0) * k)
    p["bg_f"] = u(50.0, 85.0) * area
    p["bg_g"] = u(1.3, 1.7)
    p["bg_r0_px"] = 10.0 * k
    p["streak_amp"] = u(120.0, 220.0) * area
    p["streak_length_px"] = u(70.0, 100.0) * k
    p["streak_shape"] = u(1.5, 2.0)
    p["streak_width_px"] = u(2.0, 3.5) * k
    p["streak_widening_px"] = u(150.0, 250.0) * k
    p["beam_stop_radius_px"] = det.beam_stop_radius_px * u(0.9, 1.15)
    return p


_FIBER_OVERRIDES = frozenset(
    {
        "s10_px", "d10_nm", "i10", "i11", "i11_i10", "z_ratio", "iz", "i20", "i21",
        "sigma_c_px", "sigma_k", "sigma_z_px", "sigma_phi_deg", "m3_intensity", "m6_intensity",
        "meridional_sigma_px", "meridional_width_px", "bg_a", "bg_b", "bg_c", "bg_d", "bg_e",
        "bg_f", "bg_g", "bg_r0_px", "streak_amp", "streak_length_px", "streak_shape",
        "streak_width_px", "streak_widening_px", "beam_stop_radius_px", "n_dead",
        "beam_stop_arm_width_px", "beam_stop_arm_angle_deg", "center_jitter_px",
        "rotation_jitter_deg", "wavelength_nm",
    }
)  # fmt: skip

# Lengths and per-pixel levels of the background model (``_background``), for
# ``make_pattern(scale_background=True)``.
_BACKGROUND_LENGTHS = ("bg_r0_px", "streak_length_px", "streak_width_px", "streak_widening_px")
_BACKGROUND_RATES = ("bg_c", "bg_e")  # inverse lengths
_BACKGROUND_LEVELS = ("bg_a", "bg_b", "bg_d", "bg_f", "streak_amp")

_INTENSITY_KEYS = (
    "i10", "i11", "iz", "i20", "i21", "m3_intensity", "m6_intensity", "bg_a", "bg_b", "bg_d",
    "bg_f", "streak_amp",
)  # fmt: skip


def _response(det: DetectorPreset, bias, read_noise, gain, bit_depth) -> dict:
    """Detector response parameters of ``params`` (None = the preset's default), checked."""
    bias = det.bias if bias is None else float(bias)
    read_noise = det.read_noise if read_noise is None else float(read_noise)
    gain = det.gain if gain is None else float(gain)
    _check_response(bias, read_noise, gain)
    depths = _KINDS[det.kind]
    bit_depth = depths[0] if bit_depth is None else bit_depth
    if bit_depth not in depths:
        raise ValueError(f"a {det.kind} detector writes bit_depth {' or '.join(map(str, depths))}, got {bit_depth!r}")
    return dict(detector_kind=det.kind, bias=bias, read_noise=read_noise, gain=gain, bit_depth=int(bit_depth))


def _beam_stop(shape, fr: _Frame, p: dict) -> np.ndarray:
    """Pixels in the beam-stop shadow: the round stop and, if any, its arm to the frame edge."""
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    dx, dy = xx - fr.cx, yy - fr.cy
    stop = dx**2 + dy**2 <= p["beam_stop_radius_px"] ** 2
    width = p.get("beam_stop_arm_width_px", 0.0)
    if width > 0:
        a = math.radians(p["beam_stop_arm_angle_deg"])
        along = dx * math.cos(a) + dy * math.sin(a)
        across = dy * math.cos(a) - dx * math.sin(a)
        stop |= (along >= 0) & (np.abs(across) <= 0.5 * width)
    return stop


def _finish(det, fr, p, bg, sig, rng, *, noise, seed):
    """Masks, dead pixels, beam stop and noise; build the SyntheticPattern."""
    h, w = det.shape
    invalid = np.where(det.valid_mask(), VALID, GAP).astype(np.int8)
    n_dead = int(p["n_dead"])
    dy, dx = rng.integers(0, h, n_dead), rng.integers(0, w, n_dead)
    dead = invalid[dy, dx] == VALID
    invalid[dy[dead], dx[dead]] = DEAD
    stop = _beam_stop(det.shape, fr, p) & (invalid == VALID)
    invalid[stop] = BEAM_STOP
    mask = invalid == VALID
    bg32 = np.where(mask, bg, 0).astype(np.float32)
    sig32 = np.where(mask, sig, 0).astype(np.float32)
    lam = bg + sig
    if noise:
        frame = np.zeros(det.shape, np.float32)
        frame[mask] = rng.poisson(lam[mask])
    else:
        frame = np.where(mask, lam, 0).astype(np.float32)
    p["seed"] = seed
    p["n_dead"] = int(dead.sum())
    p["noise"] = bool(noise)
    return SyntheticPattern(frame=frame, background=bg32, signal=sig32, mask=mask, params=p, invalid=invalid)


def make_pattern(
    preset="pilatus-1m",
    *,
    seed=None,
    center=None,
    rotation_deg=None,
    vertical: bool = False,
    counts: float = 1.0,
    noise: bool = True,
    bias: float | None = None,
    read_noise: float | None = None,
    gain: float | None = None,
    bit_depth: int | None = None,
    scale_background: bool = False,
    **overrides,
) -> SyntheticPattern:
    """Draw a synthetic muscle fiber-diffraction frame with a known true background.

    Parameters
    ----------
    preset : str or DetectorPreset, optional
        Detector layout, a key of :data:`PRESETS` (w x h px, pixel):
        ``"pilatus-1m"`` (default, 981 x 1043, 172 um), ``"pilatus-2m"`` (1475 x 1679,
        172 um), ``"eiger2-4m"`` (2068 x 2162, 75 um), ``"eiger2-9m"`` (3108 x 3262,
        75 um), ``"mar165"`` (2048 x 2048, 79 um, circular), ``"mar225"`` (3072 x 3072,
        73 um, circular), ``"rayonix"`` (2880 x 2880, 78 um), ``"ccd-1k"`` (1024 x 1024,
        100 um, beam stop with an arm) and ``"mar"`` (the original MAR layout, 2048 x
        2048, 80 um, circular, Pilatus-style ``raw()``); or a :class:`DetectorPreset`.
    seed : int or None, optional
        Seed of the ``numpy.random.Generator`` that draws every random quantity (the
        truth, the dead pixels and the noise). The same seed and arguments give the
        same arrays. None draws a fresh seed, recorded in ``params["seed"]``.
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels. Default: the preset's nominal centre plus a
        uniform offset of up to ``center_jitter_px`` (40 px on a Pilatus, scaled with
        the pixel size) in x and y.
    rotation_deg : float, optional
        Angle (degrees) that brings the equator horizontal, normalised into (-90, 90];
        the equator runs along ``(cos(a), sin(a))`` in (x, y) image coordinates with
        ``a = EQUATOR_SIGN * rotation_deg`` (module docstring). Default: uniform in
        +-``rotation_jitter_deg`` (10 degrees), around 90 degrees when ``vertical``.
    vertical : bool, optional
        Draw a vertical equator (random rotation near +-90 degrees) when
        ``rotation_deg`` is not given.
    counts : float, optional
        Scale of the expected counts (background and reflections alike). 1 gives
        photon-starved frames like BioCAT's Pilatus muscle frames: median ~1-2 counts,
        99th percentile ~20, maximum a few hundred to ~1000.
    noise : bool, optional
        Draw Poisson counts (default). False makes ``frame`` the noise-free expected
        counts ``background + signal``.
    bias : float, optional
        Constant offset (counts) :meth:`SyntheticPattern.raw` adds to every sensitive
        pixel, beam-stop shadow included. Default the preset's: 0 for a photon-counting
        detector, 100 for the CCD presets.
    read_noise : float, optional
        Standard deviation (counts) of the Gaussian read noise of ``raw()``, a seeded
        draw independent of the photon noise. Default the preset's: 0 for a
        photon-counting detector, 2-5 for the CCD presets.
    gain : float, optional
        Counts per photon in ``raw()``; default the preset's (1 for every preset).
    bit_depth : {None, 32, 16, 8}, optional
        Default bit depth of ``raw()``: 32 (int32, photon-counting detectors) or 16
        (uint16, CCDs), the default for the preset's kind; 8 for an 8-bit image
        scaled into 0..255.
    scale_background : bool, optional
        Treat an overridden ``s10_px`` as a camera-length change: the background's
        lengths are multiplied by ``m = s10_px / drawn s10`` and its per-pixel levels
        divided by ``m**2`` (the same photons over more pixels; overridden background
        values are kept as given). Reflection widths, intensities and the beam stop are
        unchanged. Default False: the background does not depend on ``s10_px``.
    **overrides
        Replace a drawn value of the truth. Lengths in pixels of the preset,
        intensities in counts at ``counts=1`` (they are multiplied by ``counts``).
        Accepted keys: ``s10_px``, ``d10_nm``, ``i10``, ``i11`` or ``i11_i10``,
        ``z_ratio``, ``iz``, ``i20``, ``i21``, ``sigma_c_px``, ``sigma_k``, ``sigma_z_px``,
        ``sigma_phi_deg``, ``m3_intensity``, ``m6_intensity``, ``meridional_sigma_px``,
        ``meridional_width_px``, the background parameters ``bg_*`` and ``streak_*``
        (see Returns), ``beam_stop_radius_px``, ``beam_stop_arm_width_px``,
        ``beam_stop_arm_angle_deg``, ``n_dead``, ``center_jitter_px``,
        ``rotation_jitter_deg`` and ``wavelength_nm``. Every random quantity is drawn
        whatever the overrides, so overriding one value leaves the others unchanged.

    Returns
    -------
    SyntheticPattern
        ``frame``, ``background``, ``signal`` (float32 photon counts, 0 at invalid
        pixels, whatever the detector response), ``mask`` (bool, True = valid),
        :meth:`~SyntheticPattern.raw` (what the detector writes) and ``params``, a dict
        with:

        - ``preset``, ``seed``, ``shape`` (rows, columns), ``pixel_size_mm``, ``counts``,
          ``noise``;
        - ``center`` (x, y) px, ``rotation_deg``, ``equator_angle_deg`` (the angle ``a``
          of the equator direction), ``vertical``;
        - ``s10_px`` (radius of the 1,0 reflection), ``d10_nm``, ``wavelength_nm``,
          ``distance_mm`` (with ``d10 = wavelength * distance / (s10 * pixel)``);
        - ``i10``, ``i11``: integrated noise-free counts of ONE 1,0 (1,1) spot, i.e. of
          the whole reflection on one side of the beam centre, both halves across the
          equator, before masking (``int int f r dr dphi``; the pixel sum agrees within
          0.1 %); ``i11_i10`` their ratio; ``z_ratio``, ``iz`` (Z line at
          ``z_ratio * s10``), ``i20``, ``i21``;
        - ``sigma_c_px``, ``sigma_k`` (radial widths
          ``sigma^2 = sigma_c^2 + (sigma_k * S)^2``, ``sigma_k^2 = sigma_d^2 + sigma_s^2``),
          ``sigma_z_px``, ``sigma_phi_deg`` (azimuthal arc of the equatorial spots);
        - ``m3_px``, ``m3_intensity`` (one M3 spot, both halves across the meridian),
          ``m6_px``, ``m6_intensity``, ``meridional_sigma_px``, ``meridional_width_px``;
        - ``layer_lines``: list of dicts (``name``, ``u_px``, ``v_px``, ``sigma_u_px``,
          ``sigma_v_px``, ``intensity`` of one of the four mirror blobs);
        - ``reflections``: every reflection as a dict (``name``, ``kind``,
          ``radius_px``, ``sigma_r_px``, ``sigma_phi_deg``, ``intensity``);
        - background ``bg_a + bg_b exp(-bg_c r) + bg_d exp(-bg_e r)
          + bg_f (1 + (r / bg_r0_px)^2)^(-bg_g / 2)`` plus the equatorial streak
          ``streak_amp exp(-(|u| / streak_length_px)^streak_shape) / (1 + (v / w)^2)``
          with ``w = streak_width_px (1 + |u| / streak_widening_px)`` (counts per pixel,
          ``r``, ``u``, ``v`` in pixels);
        - ``background_scale`` (``m`` of ``scale_background``; 1 without it);
        - ``beam_stop_radius_px``, ``beam_stop_arm_width_px`` (0 without an arm),
          ``beam_stop_arm_angle_deg`` (direction of the arm from the centre, the angle
          of ``(cos, sin)`` in (x, y) image coordinates), ``n_dead`` (dead pixels placed
          on sensitive pixels);
        - the detector response of ``raw()``: ``detector_kind`` (``"photon-counting"``
          or ``"ccd"``), ``bias``, ``read_noise``, ``gain``, ``bit_depth``.

    Raises
    ------
    ValueError
        For an unknown preset, a non-positive ``counts`` or ``s10_px``, a negative
        ``read_noise``, a non-positive ``gain`` or a bit depth the detector kind cannot
        write.
    TypeError
        For an unknown override.

    Notes
    -----
    Content (``/work/shared/docs/science.md`` section 4): equatorial 1,0, Z line, 1,1,
    2,0 and 2,1 reflections at ``S_hk = sqrt(h^2 + k^2 + hk) * s10``; meridional M3
    (``s10 * d10 / 14.3 nm``) and M6 (twice that); off-meridional myosin layer lines
    1 and 2 (orders of 1/43 nm) and the actin layer lines at 5.9 and 5.1 nm. Equatorial
    and meridional reflections are 2-D Gaussians in (radius, azimuth); layer-line
    blobs are 2-D Gaussians along (equator, meridian). Every reflection is drawn at its
    four mirror positions, so the noise-free signal is mirror-symmetric about the
    equator and the meridian. Any ``s10_px`` from ~20 px (inside the beam-stop shadow's
    edge) to a few hundred px renders; reflections that fall off the frame or on
    invalid pixels are cut, the truth in ``params`` is unchanged.

    Cost: the background and the noise are evaluated over the full frame, the
    reflections only in their bounding boxes (out to 5 sigma): about 0.1 s for a
    Pilatus 1M frame, 0.3 s for a MAR165 or an EIGER2 4M, 0.5-1 s for a Rayonix, 1-2 s
    for a MAR225 and 1-2.5 s for an EIGER2 9M frame (2-core machine). ``noise=False``
    roughly halves the large ones. ``raw()`` with read noise adds ~0.1 s per 10 Mpx.

    Examples
    --------
    >>> pat = make_pattern(seed=1)
    >>> pat.frame.shape, pat.frame.dtype
    ((1043, 981), dtype('float32'))
    >>> bool(0.3 <= pat.params["i11_i10"] <= 2.2)
    True
    """
    det = _get_preset(preset)
    unknown = set(overrides) - _FIBER_OVERRIDES
    if unknown:
        raise TypeError(f"make_pattern() got unknown override(s) {sorted(unknown)}; expected some of {sorted(_FIBER_OVERRIDES)}")
    if "i11" in overrides and "i11_i10" in overrides:
        raise TypeError("give either i11 or i11_i10, not both")
    counts = float(counts)
    if not (counts > 0 and math.isfinite(counts)):
        raise ValueError(f"counts must be a positive number, got {counts!r}")
    if "s10_px" in overrides and not (float(overrides["s10_px"]) > 0 and math.isfinite(float(overrides["s10_px"]))):
        raise ValueError(f"s10_px must be a positive number of pixels, got {overrides['s10_px']!r}")
    response = _response(det, bias, read_noise, gain, bit_depth)
    seed = _resolve_seed(seed)
    rng = np.random.default_rng(seed)
    k = det.scale
    p = _draw_fiber_params(rng, det)
    jitter_c = float(overrides.pop("center_jitter_px", 40.0 * k))
    jitter_r = float(overrides.pop("rotation_jitter_deg", 10.0))
    wavelength = float(overrides.pop("wavelength_nm", 0.1033))  # 12 keV
    p["n_dead"] = det.n_dead
    p["beam_stop_arm_width_px"] = det.beam_stop_arm_width_px
    p["beam_stop_arm_angle_deg"] = det.beam_stop_arm_angle_deg
    s10_drawn = p["s10_px"]
    # Derived intensities, then the overrides (intensities at counts = 1).
    p["i11"] = p["i11_i10"] * p["i10"]
    p["iz"] = p.pop("iz_i10") * p["i10"]
    p["i20"] = p.pop("i20_i10") * p["i10"]
    p["i21"] = p.pop("i21_i10") * p["i10"]
    p["m3_intensity"] = p.pop("m3_i10") * p["i10"]
    p["m6_intensity"] = p.pop("m6_m3") * p["m3_intensity"]
    i10_drawn = p["i10"]
    for key, value in overrides.items():
        p[key] = float(value)
    if "i11" in overrides:
        p["i11_i10"] = p["i11"] / p["i10"]
    else:
        p["i11"] = p["i11_i10"] * p["i10"]
    if "i10" in overrides:  # keep the other reflections in proportion to I10
        f = p["i10"] / i10_drawn
        for key in ("iz", "i20", "i21", "m3_intensity", "m6_intensity"):
            if key not in overrides:
                p[key] *= f
    # A camera-length change: the background magnifies with S10 (drawn values only).
    mag = p["s10_px"] / s10_drawn if scale_background else 1.0
    if mag != 1.0:
        for keys, factor in ((_BACKGROUND_LENGTHS, mag), (_BACKGROUND_RATES, 1.0 / mag), (_BACKGROUND_LEVELS, mag**-2)):
            for key in keys:
                if key not in overrides:
                    p[key] *= factor
    for key in _INTENSITY_KEYS:
        p[key] *= counts

    # Geometry.
    jx, jy = p.pop("_center_jitter")
    jr = p.pop("_rotation_jitter")
    if center is None:
        center = (det.nominal_center[0] + jitter_c * jx, det.nominal_center[1] + jitter_c * jy)
    center = (float(center[0]), float(center[1]))
    if rotation_deg is None:
        rotation_deg = (90.0 if vertical else 0.0) + jitter_r * jr
    rotation_deg = normalize_rotation(rotation_deg)
    fr = _Frame(det.shape, center, rotation_deg)

    # Meridional and layer-line positions follow from S10 and d10.
    s10, d10 = p["s10_px"], p["d10_nm"]
    p["m3_px"] = s10 * d10 / _M3_NM
    p["m6_px"] = 2.0 * p["m3_px"]
    x_ml, f_ml1, f_ml2, sv_ml, f_a59, f_a51 = p.pop("_ml")
    i10 = p["i10"]
    ml_height = s10 * d10 / _MYOSIN_REPEAT_NM  # first myosin layer line (43 nm)

    def layer_line(name, u, v, sigma_u, sigma_v, intensity):
        return dict(name=name, u_px=u, v_px=v, sigma_u_px=sigma_u, sigma_v_px=sigma_v, intensity=intensity)

    p["layer_lines"] = [
        layer_line("ML1", x_ml * s10, ml_height, 0.25 * s10, sv_ml * k, f_ml1 * i10),
        layer_line("ML2", x_ml * s10, 2 * ml_height, 0.25 * s10, sv_ml * k, f_ml1 * f_ml2 * i10),
        layer_line("A5.9", 1.2 * s10, s10 * d10 / 5.9, 0.5 * s10, 3.0 * k, f_a59 * i10),
        layer_line("A5.1", 0.35 * s10, s10 * d10 / 5.1, 0.2 * s10, 3.0 * k, f_a51 * i10),
    ]
    refl = _reflections(p)
    bg = _background(fr, p)
    sig = _render_signal(fr, refl)

    p.update(
        preset=det.name,
        shape=det.shape,
        pixel_size_mm=det.pixel_size_mm,
        counts=counts,
        center=center,
        rotation_deg=rotation_deg,
        equator_angle_deg=EQUATOR_SIGN * rotation_deg,
        vertical=abs(rotation_deg) > 45.0,
        wavelength_nm=wavelength,
        distance_mm=d10 * s10 * det.pixel_size_mm / wavelength,
        reflections=refl,
        center_jitter_px=jitter_c,
        rotation_jitter_deg=jitter_r,
        background_scale=mag,
        **response,
    )
    return _finish(det, fr, p, bg, sig, rng, noise=noise, seed=seed)


def make_powder(
    preset="pilatus-1m",
    *,
    seed=None,
    center=None,
    ring_radii_px=None,
    ring_intensities=None,
    ring_sigma_px=None,
    texture: float = 0.0,
    counts: float = 1.0,
    noise: bool = True,
    bias: float | None = None,
    read_noise: float | None = None,
    gain: float | None = None,
    bit_depth: int | None = None,
) -> SyntheticPattern:
    """Draw an isotropic powder-ring pattern: no equator, the negative control.

    Parameters
    ----------
    preset : str or DetectorPreset, optional
        Detector layout (see :func:`make_pattern`).
    seed : int or None, optional
        Seed of the random generator (None draws one, recorded in ``params``).
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels; default the nominal centre plus up to 40 px
        (scaled with the pixel size).
    ring_radii_px : sequence of float, optional
        Ring radii (pixels). Default: a hexagonal-lattice powder ``R * (1, sqrt(3), 2,
        sqrt(7), 3)`` with ``R`` drawn like a fiber pattern's S10 -- the worst case for
        an equator detector, since its rings sit exactly where 1,0, 1,1 and 2,0 would.
    ring_intensities : sequence of float, optional
        Integrated counts of each whole ring (at ``counts=1``); default ~2-6e4 each.
    ring_sigma_px : float, optional
        Radial Gaussian width of the rings (pixels); default ~2.5 px (scaled).
    texture : float, optional
        Amplitude ``t`` of an azimuthal modulation ``1 + t cos(2 phi)`` (phi from the
        x axis); 0 (default) makes the rings isotropic.
    counts : float, optional
        Scale of the expected counts.
    noise : bool, optional
        Draw Poisson counts (default).
    bias, read_noise, gain, bit_depth : optional
        Detector response of :meth:`SyntheticPattern.raw` (see :func:`make_pattern`);
        default the preset's.

    Returns
    -------
    SyntheticPattern
        ``signal`` holds the rings, ``background`` a smooth isotropic background;
        ``params`` has ``preset``, ``seed``, ``center``, ``rotation_deg`` (0),
        ``ring_radii_px``, ``ring_intensities``, ``ring_sigma_px``, ``texture``,
        ``counts``, ``beam_stop_radius_px``, ``beam_stop_arm_width_px``,
        ``beam_stop_arm_angle_deg``, ``n_dead``, the background parameters, the detector
        response (``detector_kind``, ``bias``, ``read_noise``, ``gain``, ``bit_depth``)
        and NaN for the fiber quantities (``s10_px``, ``i10``, ``i11``, ``i11_i10``,
        ``m3_px``, ``m3_intensity``, ``d10_nm``).
    """
    det = _get_preset(preset)
    response = _response(det, bias, read_noise, gain, bit_depth)
    seed = _resolve_seed(seed)
    rng = np.random.default_rng(seed)
    k = det.scale
    area = 1.0 / k**2
    u = rng.uniform
    jx, jy = u(-1, 1), u(-1, 1)
    r0 = u(40.0, 70.0) * k
    drawn_int = [u(20000.0, 60000.0) for _ in range(5)]
    drawn_sigma = u(2.0, 3.0) * k
    p: dict[str, Any] = dict(
        bg_a=u(15.0, 25.0) * area,
        bg_b=u(100.0, 200.0) * area,
        bg_c=1.0 / (u(10.0, 14.0) * k),
        bg_d=u(10.0, 20.0) * area,
        bg_e=1.0 / (u(60.0, 100.0) * k),
        bg_f=u(60.0, 100.0) * area,
        bg_g=u(1.3, 1.7),
        bg_r0_px=10.0 * k,
        streak_amp=0.0,
        streak_length_px=1.0,
        streak_shape=1.0,
        streak_width_px=1.0,
        streak_widening_px=1.0,
        beam_stop_radius_px=det.beam_stop_radius_px * u(0.9, 1.15),
        beam_stop_arm_width_px=det.beam_stop_arm_width_px,
        beam_stop_arm_angle_deg=det.beam_stop_arm_angle_deg,
        n_dead=det.n_dead,
    )
    radii = [r0 * f for f in (1.0, _SQRT3, 2.0, _SQRT7, 3.0)] if ring_radii_px is None else [float(r) for r in ring_radii_px]
    if ring_intensities is None:
        ints = (drawn_int * (len(radii) // len(drawn_int) + 1))[: len(radii)]
    else:
        ints = [float(v) for v in ring_intensities]
        if len(ints) != len(radii):
            raise ValueError(f"ring_intensities has {len(ints)} values, expected one per ring ({len(radii)})")
    sigma = drawn_sigma if ring_sigma_px is None else float(ring_sigma_px)
    counts = float(counts)
    for key in ("bg_a", "bg_b", "bg_d", "bg_f"):
        p[key] *= counts
    ints = [v * counts for v in ints]
    if center is None:
        c = 40.0 * k
        center = (det.nominal_center[0] + c * jx, det.nominal_center[1] + c * jy)
    center = (float(center[0]), float(center[1]))
    fr = _Frame(det.shape, center, 0.0)
    bg = _background(fr, p)
    u_, v_ = fr.full_uv()
    r = np.hypot(u_, v_)
    sig = np.zeros(det.shape, np.float64)
    mod = 1.0 + texture * np.cos(2.0 * np.arctan2(v_, u_)) if texture else 1.0
    for rad, inten in zip(radii, ints):
        lo, hi = rad - _PEAK_EXTENT * sigma, rad + _PEAK_EXTENT * sigma
        sel = (r >= lo) & (r <= hi)
        amp = inten / (2 * math.pi * rad * sigma * math.sqrt(2 * math.pi))
        ring = amp * np.exp(-0.5 * ((r[sel] - rad) / sigma) ** 2)
        sig[sel] += ring * (mod[sel] if texture else 1.0)
    nan = float("nan")
    p.update(
        preset=det.name,
        shape=det.shape,
        pixel_size_mm=det.pixel_size_mm,
        counts=counts,
        center=center,
        rotation_deg=0.0,
        ring_radii_px=radii,
        ring_intensities=ints,
        ring_sigma_px=sigma,
        texture=float(texture),
        s10_px=nan,
        i10=nan,
        i11=nan,
        i11_i10=nan,
        m3_px=nan,
        m3_intensity=nan,
        d10_nm=nan,
        **response,
    )
    return _finish(det, fr, p, bg, sig, rng, noise=noise, seed=seed)


def curved_residual(background, s10_px, amplitude, centre=1.4) -> np.ndarray:
    """What a background method can leave on a fold: ``amplitude`` times the folded
    background times ``(r / S10 - centre)^2``.

    A residual that falls with the background (steeply, away from the beam) and curves
    about ``centre`` S10: under the equator's peaks it is no low-order polynomial, so a
    fitted baseline follows it only in part and biases I11/I10.

    Parameters
    ----------
    background : ndarray, 2-D
        A fold of the background (its ``[0, 0]`` is the beam centre).
    s10_px : float
        Radius of the 1,0 reflection on the fold (pixels).
    amplitude, centre : float
        Size relative to the background, and the radius of no residual in S10.

    Returns
    -------
    ndarray of float64, the fold's shape
    """
    r = np.hypot(*np.indices(np.shape(background)))
    return amplitude * np.asarray(background, float) * (r / s10_px - centre) ** 2
