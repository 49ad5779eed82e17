"""A grabber's frame decoded at the size that is needed, not at full size.

A USB HDMI grabber delivers the scanner's 1920x1080 picture as MJPG (or YUYV at lower sizes); the model
reads 128-320 px of it and the 7" screen shows 800x480. Decoding every frame at full size costs most of a
core, so the V4L2 source reads the grabber's buffer as it came (JPEG bytes, packed YUYV) and decodes it at
the smallest DCT scale 1/k (k in ``SCALES``) that still covers what the consumers asked for
(``DecodeTarget``, set by whoever composes the source: ``V4l2Source.set_decode_target``):

- MJPG: libjpeg-turbo's DCT scaling through PyTurboJPEG when installed (``pip install
  firmware-app[turbojpeg]``), else OpenCV's reduced decode (``IMREAD_REDUCED_COLOR_k`` /
  ``IMREAD_REDUCED_GRAYSCALE_k``); gray output for gray models;
- YUYV: every k-th row and every k-th pixel pair, converted alone (the luma alone for gray).

For a gray model (``DecodeTarget.gray_if_neutral``) a picture whose imaging region holds no coloured
pixel is passed on gray: the input gate and the pre-processing then read one channel, not three, and the
screen shows the picture without the faint tint, if any, that a dark background may have. A pixel is
coloured as the input gate counts colour (max - min of its B, G, R above ``CHROMA_MIN``); the test is made
where it is cheapest: on a JPEG's chroma planes (libjpeg-turbo decodes straight to Y, Cb, Cr;
``COLOURED_JPEG``), on YUYV's U and V bytes (``COLOURED_YUYV``), or on the decoded B, G, R (OpenCV's
decoder). A region with colour in it (colour Doppler, a coloured mark) comes in colour, converted for the
region alone (from the planes: its chroma at the JPEG's own resolution, as 4:2:0 video shows it).

A frame decoded at 1/k says so: ``meta["decode_scale"] = k``; ``meta["full_size"]`` stays the grabber's
size and ``meta["imaging_region"]`` stays in the grabber's (source) pixels: a source pixel (x, y) is at
(x / k, y / k) in the frame. ``meta["original"]`` is the grabber's buffer of that frame (``Original``: the
JPEG bytes in ``.jpeg`` for MJPG) with what is needed to rebuild the frame at full resolution
(``Original.full_pixels``: decoded, blacked out and cut like the frame); ``full_resolution`` gives a
frame's pixels and result at full resolution (what a capture stores).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadFrame
from firmware_app.gate.descriptor import CHROMA_MIN
from firmware_app.sources.profile import Rect, SourceProfile
from firmware_app.types import Box, Frame, Result

log = logging.getLogger(__name__)

SCALES = (8, 4, 2, 1)  # the DCT scales libjpeg decodes at (1/k), largest reduction first
CV_REDUCED = {  # (k, gray) -> cv2.imdecode flag: decode at 1/k
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (1, False): cv2.IMREAD_COLOR,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
    (1, True): cv2.IMREAD_GRAYSCALE,
}
# Whether chroma (u, v) makes a pixel coloured (max - min of its B, G, R above CHROMA_MIN) depends on
# (u, v) alone: B, G, R are the luma plus a linear function of u - 128 and v - 128 (clipping at black or
# white only makes the spread smaller, so a table that ignores it never passes colour as gray). A table per
# conversion, indexed by (u << 8) | v: a JPEG's full-range chroma (JFIF: R = Y + 1.402 dCr, G = Y - 0.344
# dCb - 0.714 dCr, B = Y + 1.772 dCb), YUYV's studio-range U, V as OpenCV converts them (R = Y' + 1.596 dV,
# G = Y' - 0.391 dU - 0.813 dV, B = Y' + 2.018 dU). Every (u, v) within +-NEUTRAL of 128 is below it (the
# spread is largest at a corner of that square: 3.17 * 5 and 3.61 * 4 < 16) and every one with u or v
# SURE or more from 128 above it (the spread is smallest with the other at 128: 2.12 * 9 and 2.41 * 8,
# 19 levels, more than 16 after the conversions' rounding): two minMaxLoc calls decide most pictures, and
# the table is looked up for the pixels in between alone.
# tests/test_grab.py checks the tables and both bounds against the conversions.


def _coloured_table(r_v: float, g_u: float, g_v: float, b_u: float) -> np.ndarray:
    d = np.arange(256, dtype=np.float64) - 128.0
    du, dv = np.meshgrid(d, d, indexing="ij")
    r, g, b = r_v * dv, -(g_u * du + g_v * dv), b_u * du
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return (spread > CHROMA_MIN).ravel()


COLOURED_JPEG = _coloured_table(1.402, 0.344136, 0.714136, 1.772)
COLOURED_YUYV = _coloured_table(1.596, 0.391, 0.813, 2.018)
NEUTRAL_JPEG, SURE_JPEG = 5, 9
NEUTRAL_YUYV, SURE_YUYV = 4, 8
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class DecodeTarget:
    """What the consumers of the imaging region need of it.

    ``size`` (w, h): the region is stretched to it (the model's input): the decoded region must be at
    least that on both sides. ``fit`` (w, h): the region is shown inside it with its aspect kept (the
    screen's image area): the decoded region must not be smaller than the picture shown, give or take
    ``slack`` (0.1: the screen may stretch it by up to 1.1x, which a 7" screen does not show; the model's
    input is never stretched). ``gray``: only gray pixels are needed (no colour on screen either).
    ``gray_if_neutral``: a picture is passed on gray when its imaging region has no coloured pixel (a
    gray model; the screen keeps any colour there is). None for both sizes: full size.
    """

    size: tuple[int, int] | None = None
    fit: tuple[int, int] | None = None
    gray: bool = False
    slack: float = 0.1
    gray_if_neutral: bool = False

    def scale_for(self, region_w: int, region_h: int) -> int:
        """The largest k in SCALES at which a ``region_w`` x ``region_h`` region still covers the target."""
        for k in SCALES:
            w, h = region_w / k, region_h / k
            if self.size is not None and (w < self.size[0] or h < self.size[1]):
                continue
            if self.fit is not None and (1 + self.slack) / k < min(
                self.fit[0] / region_w, self.fit[1] / region_h
            ):
                continue
            if self.size is None and self.fit is None and k != 1:
                continue
            return k
        return 1


def scaled_size(width: int, height: int, k: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` picture decoded at 1/k (libjpeg rounds up)."""
    return (-(-width // k), -(-height // k))


def scale_rect_in(rect: Rect, k: int, size: tuple[int, int]) -> Rect:
    """A source-pixel rect at 1/k, rounded inwards (a crop takes no pixel outside the region)."""
    if k == 1:
        return rect
    x, y, w, h = rect
    x0, y0 = -(-x // k), -(-y // k)
    x1, y1 = min((x + w) // k, size[0]), min((y + h) // k, size[1])
    return (x0, y0, max(x1 - x0, 1), max(y1 - y0, 1))


def scale_rect_out(rect: Rect, k: int) -> Rect:
    """A source-pixel rect at 1/k, rounded outwards (a blackout covers every pixel it touches)."""
    x, y, w, h = rect
    x0, y0 = x // k, y // k
    return (x0, y0, -(-(x + w) // k) - x0, -(-(y + h) // k) - y0)


def part_rect(rect: Rect, k: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) at 1/k of a ``size`` picture: the part that covers the source-pixel ``rect``
    (rounded outwards, within the picture): what a frame converted only where needed holds."""
    x0, y0, w, h = scale_rect_out(rect, k)
    x0, y0 = max(0, x0), max(0, y0)
    return x0, y0, min(size[0], x0 + w), min(size[1], y0 + h)


def scaled_profile(profile: SourceProfile, k: int, size: tuple[int, int]) -> SourceProfile:
    """``profile`` for the picture decoded at 1/k (``size``): crop inwards, blackout outwards."""
    if k == 1:
        return profile
    crop = scale_rect_in(profile.crop_rect, k, size) if profile.crop_rect is not None else None
    return SourceProfile(crop, tuple(scale_rect_out(r, k) for r in profile.blackout))


def jpeg_size(data: Any) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding; BadFrame when there is none."""
    buf = memoryview(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)).cast("B")
    n, i = len(buf), 2
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise BadFrame("MJPG frame skipped: not a JPEG (no start-of-image marker)")
    while i + 9 < n:
        if buf[i] != 0xFF:
            break
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return (buf[i + 7] << 8 | buf[i + 8], buf[i + 5] << 8 | buf[i + 6])
        i += 2 + (buf[i + 2] << 8 | buf[i + 3])
    raise BadFrame("MJPG frame skipped: no frame header (truncated JPEG?)")


class JpegDecoder:
    """JPEG bytes -> pixels at 1/k: libjpeg-turbo (PyTurboJPEG) when installed, else OpenCV.

    ``backend``: "auto" (turbojpeg, falling back to OpenCV with a warning), "turbojpeg" or "opencv".
    """

    def __init__(self, backend: str = "auto") -> None:
        self._tj: Any = None
        self._tj_gray = 0
        if backend in ("auto", "turbojpeg"):
            try:
                import turbojpeg

                self._tj = turbojpeg.TurboJPEG()
                self._tj_gray = turbojpeg.TJPF_GRAY
            except Exception as exc:  # noqa: BLE001 - not installed, or the C library is missing
                if backend == "turbojpeg":
                    raise
                log.info("MJPG: PyTurboJPEG not usable (%s); OpenCV's reduced decode is used", exc)
        self.name = "turbojpeg" if self._tj is not None else "opencv"

    @property
    def has_planes(self) -> bool:
        """Whether ``planes`` works (libjpeg-turbo's decode to Y, Cb, Cr)."""
        return self._tj is not None

    def planes(self, data: Any, k: int = 1) -> list[np.ndarray]:
        """``data`` decoded at 1/k to its planes as libjpeg-turbo keeps them: [Y] for a gray JPEG, else
        [Y, Cb, Cr], the chroma at the JPEG's own subsampling; a plane may be a few pixels wider or taller
        than the picture (padded to the subsampling)."""
        buf = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        try:
            planes = self._tj.decode_to_yuv_planes(buf, scaling_factor=(1, k) if k != 1 else None)
        except (OSError, ValueError) as exc:
            raise BadFrame(f"MJPG frame skipped: {exc}") from None
        if not planes:
            raise BadFrame("MJPG frame skipped: the JPEG does not decode")
        return planes

    def decode(self, data: Any, k: int = 1, gray: bool = False) -> np.ndarray:
        """``data`` (JPEG bytes or a uint8 buffer) decoded at 1/k: BGR HxWx3, or HxW when ``gray``."""
        buf = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        img: np.ndarray | None
        try:
            if self._tj is not None:
                kw: dict[str, Any] = {"scaling_factor": (1, k)} if k != 1 else {}
                if gray:
                    kw["pixel_format"] = self._tj_gray
                img = self._tj.decode(buf, **kw)
                if gray and img is not None and img.ndim == 3:
                    img = img[:, :, 0]
            else:
                img = cv2.imdecode(buf, CV_REDUCED[(k, gray)])
        except (OSError, ValueError, cv2.error) as exc:
            raise BadFrame(f"MJPG frame skipped: {exc}") from None
        if img is None:
            raise BadFrame("MJPG frame skipped: the JPEG does not decode")
        return img


def neutral_bgr(pixels: np.ndarray) -> bool:
    """No pixel of BGR ``pixels`` is coloured (max - min of B, G, R above CHROMA_MIN)."""
    b, g, r = cv2.split(pixels)
    spread = cv2.subtract(cv2.max(cv2.max(b, g), r), cv2.min(cv2.min(b, g), r))
    return cv2.minMaxLoc(spread)[1] <= CHROMA_MIN


def _deviation(plane: np.ndarray) -> float:
    lo, hi = cv2.minMaxLoc(plane)[:2]
    return max(128 - lo, hi - 128)


def coloured(u: np.ndarray, v: np.ndarray, table: np.ndarray, neutral: int, sure: int) -> bool:
    """Whether any chroma pair (u, v) of two same-shaped uint8 planes makes a coloured pixel (``table``:
    COLOURED_JPEG or COLOURED_YUYV with its NEUTRAL and SURE bounds, see above)."""
    dev = max(_deviation(u), _deviation(v))
    if dev <= neutral:
        return False
    if dev >= sure:
        return True
    between = cv2.bitwise_or(
        cv2.compare(cv2.absdiff(u, 128), neutral, cv2.CMP_GT),
        cv2.compare(cv2.absdiff(v, 128), neutral, cv2.CMP_GT),
    )
    at = cv2.findNonZero(between)  # (x, y) of each pixel in between
    if at is None:
        return False
    xs, ys = at.reshape(-1, 2).T
    index = u[ys, xs].astype(np.uint16) << 8
    index |= v[ys, xs]
    return bool(table[index].any())


def jpeg_part(planes: list[np.ndarray], size: tuple[int, int], rect: Rect, k: int):
    """The imaging region ``rect`` (source pixels) of a JPEG decoded at 1/k to its ``planes`` (a
    ``size`` picture at 1/k): its luma when none of its chroma pairs makes a coloured pixel
    (COLOURED_JPEG; or the JPEG is gray), else its B, G, R converted from the planes for the region
    alone -> (pixels, origin), as ``yuyv_part``: ``origin`` the part's corner in source pixels, or (0, 0)
    with the whole luma."""
    w, h = size
    luma = planes[0][:h, :w]
    if len(planes) == 1:
        return luma, (0, 0)
    x0, y0, x1, y1 = part_rect(rect, k, size)
    cb, cr = planes[1], planes[2]
    fy, fx = planes[0].shape[0] // cb.shape[0], planes[0].shape[1] // cb.shape[1]
    cy0, cx0, cy1, cx1 = y0 // fy, x0 // fx, -(-y1 // fy), -(-x1 // fx)
    if not coloured(cb[cy0:cy1, cx0:cx1], cr[cy0:cy1, cx0:cx1], COLOURED_JPEG, NEUTRAL_JPEG, SURE_JPEG):
        return luma, (0, 0)
    # colour: the chroma of the region and one sample around it, brought to the luma's grid (libjpeg's
    # centred siting: a bilinear 2x is its "fancy" upsampling), cut to the region, converted
    my0, mx0 = max(cy0 - 1, 0), max(cx0 - 1, 0)
    my1, mx1 = min(cy1 + 1, cb.shape[0]), min(cx1 + 1, cb.shape[1])

    def grid(c: np.ndarray) -> np.ndarray:
        block = c[my0:my1, mx0:mx1]
        if fx != 1 or fy != 1:
            block = cv2.resize(
                block, (block.shape[1] * fx, block.shape[0] * fy), interpolation=cv2.INTER_LINEAR
            )
        oy, ox = y0 - my0 * fy, x0 - mx0 * fx
        return block[oy : oy + y1 - y0, ox : ox + x1 - x0]

    ycrcb = cv2.merge([np.ascontiguousarray(luma[y0:y1, x0:x1]), grid(cr), grid(cb)])
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR), (x0 * k, y0 * k)


def yuyv_frame(data: Any, width: int, height: int, k: int = 1, gray: bool = False) -> np.ndarray:
    """Packed YUYV (Y0 U Y1 V per pixel pair) of a ``width`` x ``height`` picture at 1/k: every k-th row
    and every k-th pixel pair converted alone (BGR), or every k-th luma sample (``gray``, brought from
    the grabber's studio range to full range as the BGR conversion does it)."""
    return yuyv_part(data, width, height, (0, 0, width, height), k, gray)[0]


def _studio_luma() -> np.ndarray:
    """The gray level OpenCV's YUYV -> BGR conversion gives each luma byte of a pixel without colour."""
    y = np.arange(256, dtype=np.uint8)
    pairs = np.stack([y, np.full(256, 128, np.uint8)], axis=1).reshape(1, 256, 2)
    return np.ascontiguousarray(cv2.cvtColor(pairs, cv2.COLOR_YUV2BGR_YUYV)[0, :, 1])


STUDIO_LUMA = _studio_luma()


def yuyv_part(
    data: Any,
    width: int,
    height: int,
    rect: Rect,
    k: int = 1,
    gray: bool = False,
    gray_if_neutral: bool = False,
):
    """Only the part of a ``width`` x ``height`` YUYV picture that covers ``rect`` (source pixels),
    converted at 1/k as ``yuyv_frame`` converts the whole picture: -> (pixels, origin), ``origin`` the
    part's top-left corner in source pixels (a multiple of 2k across, of k down), so that the part is
    exactly the whole picture's conversion cut at (origin / k). ``gray_if_neutral``: the part's luma
    (as ``gray``) when none of its U, V pairs makes a coloured pixel (COLOURED_YUYV)."""
    buf = _yuyv_buffer(data, width, height)
    x, y, w, h = rect
    step = 2 * k
    x0, y0 = max(0, x) // step * step, max(0, y) // k * k
    x1 = min(width, -(-(x + w) // step) * step)
    y1 = min(height, -(-(y + h) // k) * k)
    sub = buf.reshape(height, width // 2, 4)[y0:y1:k, x0 // 2 : x1 // 2 : k]
    if not gray and gray_if_neutral:
        gray = not coloured(sub[..., 1], sub[..., 3], COLOURED_YUYV, NEUTRAL_YUYV, SURE_YUYV)
    if gray:
        luma = buf.reshape(height, width, 2)[y0:y1:k, x0:x1:k, 0]
        # (np.take, not cv2.LUT: OpenCV spreads a large LUT over its worker threads, and the picture is
        # then read by the pre-processing from another core's cache: 1.3 instead of 0.7 ms a frame)
        return np.take(STUDIO_LUMA, luma), (x0, y0)
    sub = np.ascontiguousarray(sub)
    h2, n = sub.shape[:2]
    return cv2.cvtColor(sub.reshape(h2, n * 2, 2), cv2.COLOR_YUV2BGR_YUYV), (x0, y0)


def yuyv_luma(data: Any, width: int, height: int) -> np.ndarray:
    """The luma plane of a packed YUYV picture as a strided view (no copy): what the region detector
    watches."""
    return _yuyv_buffer(data, width, height).reshape(height, width, 2)[:, :, 0]


def _yuyv_buffer(data: Any, width: int, height: int) -> np.ndarray:
    """``data`` as flat bytes; BadFrame when it is not a ``width`` x ``height`` YUYV picture."""
    buf = np.asarray(data, dtype=np.uint8).reshape(-1)
    if buf.size != width * height * 2 or width % 2:
        raise BadFrame(f"YUYV frame skipped: {buf.size} bytes is not {width}x{height} YUYV")
    return buf


def bgr_to_yuyv(bgr: np.ndarray) -> np.ndarray:
    """BGR HxWx3 (even W) -> packed YUYV HxWx2, as a grabber delivers it (BT.601 studio range)."""
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)  # studio-range Y, U, V at half size
    h, w = bgr.shape[:2]
    y = yuv[:h]
    u = yuv[h : h + h // 4].reshape(h // 2, w // 2)
    v = yuv[h + h // 4 :].reshape(h // 2, w // 2)
    out = np.empty((h, w // 2, 4), np.uint8)
    out[:, :, 0], out[:, :, 2] = y[:, 0::2], y[:, 1::2]
    out[:, :, 1], out[:, :, 3] = np.repeat(u, 2, axis=0), np.repeat(v, 2, axis=0)
    return out.reshape(h, w, 2)


@dataclass(frozen=True, eq=False)
class Original:
    """The grabber's buffer of one frame, as it came, and how the frame was cut from it.

    ``data``: JPEG bytes (MJPG) or packed YUYV; ``size``: the grabber's (width, height); ``rect``: the
    imaging region in source pixels; ``profile``: the source's blackout.
    """

    fourcc: str
    data: Any
    size: tuple[int, int]
    rect: Rect
    profile: SourceProfile
    decoder: JpegDecoder | None = None

    @property
    def jpeg(self) -> bytes | None:
        """The frame's JPEG bytes (MJPG), or None."""
        return np.asarray(self.data, np.uint8).tobytes() if self.fourcc == "MJPG" else None

    def full_pixels(self, gray: bool = False) -> np.ndarray:
        """The frame at full resolution: decoded at 1/1, blacked out and cut to the imaging region."""
        if self.fourcc == "MJPG":
            img = (self.decoder or JpegDecoder("opencv")).decode(self.data, 1, gray)
        else:
            img = yuyv_frame(self.data, *self.size, 1, gray)
        return self.profile.apply(img, self.rect)


def full_resolution(frame: Frame, result: Result | None = None) -> tuple[np.ndarray, Result | None]:
    """``frame``'s pixels and ``result`` at the grabber's full resolution: a frame decoded at 1/k with its
    ``meta["original"]`` is decoded again at 1/1 and the result's geometry (contours, boxes, centroid) is
    scaled by k to match; any other frame is returned as it is."""
    k = int(frame.meta.get("decode_scale", 1) or 1)
    original = frame.meta.get("original")
    if k == 1 or not isinstance(original, Original):
        return frame.pixels, result
    try:
        pixels = original.full_pixels(gray=frame.pixels.ndim == 2)
    except BadFrame as exc:  # cannot happen for a buffer that decoded once; keep the reduced frame then
        log.warning("full-resolution decode failed (%s); the frame is kept at 1/%d", exc, k)
        return frame.pixels, result
    if result is None:
        return pixels, None
    sx, sy = pixels.shape[1] / frame.width, pixels.shape[0] / frame.height
    contours = tuple(
        np.round(np.asarray(c, np.float64).reshape(-1, 2) * (sx, sy)).astype(np.int32)
        for c in result.contours
    )
    boxes = tuple(Box(b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy, b.score, b.label) for b in result.boxes)
    centroid = (result.centroid[0] * sx, result.centroid[1] * sy) if result.centroid is not None else None
    return pixels, dataclasses.replace(result, contours=contours, boxes=boxes, centroid=centroid)
