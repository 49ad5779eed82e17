"""``v4l2:/dev/video0`` (or ``v4l2:0``): a USB video grabber or camera through OpenCV's V4L2 backend.

Pixel format (MJPG or YUYV), size and fps come from the board config's [source]. An absent or unplugged
device raises SourceUnavailable (the screen shows NO SIGNAL) and every later read() tries to reconnect,
at most once per ``reconnect_s``: the daemon never crashes for a loose cable.

Without a board ``crop``, the imaging region is found in the stream (``region_detect``): frames are full
frame until it is, then cut to it ("detected").

The device sits behind a tiny capture interface (``open() -> bool``, ``read() -> (ok, frame)``,
``release()``), the shape of ``cv2.VideoCapture``; ``MockCapture`` and ``ReplayCapture`` are its test
doubles. A capture with a ``fourcc`` of MJPG or YUYV may hand over the grabber's buffer as it came (JPEG
bytes, packed YUYV; the real one asks OpenCV for it with CAP_PROP_CONVERT_RGB = 0): the source then
decodes only what is needed (``set_decode_target``; ``firmware_app.sources.grab``) and keeps the buffer
in ``meta["original"]`` so a capture can be stored at full resolution. A capture may also say when its
frame arrived (``t_arrival_ns``, monotonic): that is the frame's capture time.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadSource, SourceUnavailable
from firmware_app.sources import register
from firmware_app.sources.base import Source
from firmware_app.sources.grab import (
    DecodeTarget,
    JpegDecoder,
    Original,
    bgr_to_yuyv,
    jpeg_part,
    jpeg_size,
    neutral_bgr,
    part_rect,
    scaled_size,
    yuyv_frame,
    yuyv_luma,
    yuyv_part,
)
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region_detect import RegionDetector
from firmware_app.types import Frame

log = logging.getLogger(__name__)

RAW_FOURCCS = ("MJPG", "YUYV")
DETECT_LONG_SIDE = 400  # px: the region detector works on about this much (region_detect.work_size)


class OpenCvCapture:
    """The real device."""

    def __init__(
        self, device: str | int, fourcc: str, width: int, height: int, fps: float, raw: bool = True
    ) -> None:
        self.device, self.fourcc, self.width, self.height, self.fps = device, fourcc, width, height, fps
        self.raw = raw and fourcc in RAW_FOURCCS  # hand over the grabber's buffer undecoded
        self.t_arrival_ns: int | None = None
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> bool:
        cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            return False
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
        if self.raw:  # the buffer as the grabber sent it: the source decodes only what it needs
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
            cap.set(cv2.CAP_PROP_FORMAT, -1)
        self._cap = cap
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self.width, self.height = got
        if got != (self.width, self.height):
            log.warning(
                "%s delivers %dx%d, board config asks %dx%d", self.device, *got, self.width, self.height
            )
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self._cap is None:
            return False, None
        ok, img = self._cap.read()
        # the driver's buffer timestamp (CLOCK_MONOTONIC, as V4L2 stamps it): the frame's arrival
        self.t_arrival_ns = arrival_ns(self._cap.get(cv2.CAP_PROP_POS_MSEC), time.monotonic_ns())
        return ok, img

    def release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def arrival_ns(pos_msec: float, now_ns: int, max_age_s: float = 2.0) -> int | None:
    """A V4L2 buffer's timestamp (``CAP_PROP_POS_MSEC`` of OpenCV's V4L2 backend, ms on the monotonic
    clock) as the frame's arrival time, or None when it is not one: absent (0), in the future, or older
    than ``max_age_s`` (a driver stamping another clock); the read time is used then."""
    t = int(pos_msec * 1e6) if pos_msec == pos_msec and pos_msec > 0 else 0
    if t <= 0 or t > now_ns or now_ns - t > max_age_s * 1e9:
        return None
    return t


class MockCapture:
    """Test double: serves generated frames; ``plugged`` can be flipped to simulate a loose cable."""

    def __init__(self, width: int = 640, height: int = 480, plugged: bool = True) -> None:
        self.width, self.height, self.plugged = width, height, plugged
        self.opened = False
        self.opens = 0
        self.n = 0

    def open(self) -> bool:
        self.opens += 1
        self.opened = self.plugged
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not (self.opened and self.plugged):
            self.opened = False
            return False, None
        self.n += 1
        img = np.full((self.height, self.width, 3), self.n % 256, np.uint8)
        return True, img

    def release(self) -> None:
        self.opened = False


class ReplayCapture:
    """Test double: replays recorded frames (a scanner's screen), in order; then reads fail (unplugged).

    ``fourcc`` None serves the BGR frames as they are; "MJPG" serves each as JPEG bytes (encoded once, at
    ``quality``) and "YUYV" as packed YUYV, as a grabber's raw buffer. ``fps`` > 0 paces it like a
    grabber: frame i arrives at start + i / fps, ``read`` waits for the next one, and a reader that falls
    behind gets the newest frame (a one-buffer queue; the ones it missed are counted in ``missed``).
    ``count`` frames are served in all (default one pass), looping over ``frames``; ``t_arrival_ns`` is
    the arrival time of the frame last read (``clock`` in seconds).
    """

    def __init__(
        self,
        frames: Sequence[np.ndarray],
        device: str = "replay",
        fourcc: str | None = None,
        fps: float = 0.0,
        count: int | None = None,
        quality: int = 90,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.device, self.fourcc, self.fps = device, fourcc, float(fps)
        self.count = len(frames) if count is None else int(count)
        self.clock, self.sleep = clock, sleep
        first = frames[0] if len(frames) else np.zeros((2, 2, 3), np.uint8)
        self.height, self.width = int(first.shape[0]), int(first.shape[1])
        self.raw = fourcc in RAW_FOURCCS
        if fourcc == "MJPG":
            params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
            self.frames: Sequence[np.ndarray] = [
                cv2.imencode(".jpg", f, params)[1].reshape(1, -1) for f in frames
            ]
        elif fourcc == "YUYV":
            self.frames = [
                bgr_to_yuyv(f if f.ndim == 3 else cv2.cvtColor(f, cv2.COLOR_GRAY2BGR)) for f in frames
            ]
        elif fourcc is None:
            self.frames = frames
        else:
            raise ValueError(f"replay fourcc {fourcc!r}: expected MJPG, YUYV or None")
        self.opened = False
        self.n = 0
        self.missed = 0
        self.t_arrival_ns: int | None = None
        self.screen: Any = None
        self._t0: float | None = None

    @classmethod
    def scanner(
        cls,
        fourcc: str | None = "MJPG",
        width: int = 1920,
        height: int = 1080,
        fps: float = 60.0,
        count: int | None = None,
        distinct: int = 60,
        seed: int = 3,
        quality: int = 90,
    ) -> ReplayCapture:
        """A portable scanner's video out as a grabber delivers it: the ultrasound phantom scan-converted
        into a fan on a ``width`` x ``height`` screen with the scanner's chrome around it
        (``scanner_screen``; black around the fan, as a scanner's image area is), ``distinct`` frames
        rendered and encoded once, then ``count`` frames replayed at ``fps`` in ``fourcc`` (MJPG bytes,
        packed YUYV or BGR for None). ``screen`` is the ScannerScreen
        (``screen.truth(0)``: where the image is)."""
        from firmware_app.sources.scanner_screen import Layout, ScannerScreen, frames

        f = min(width / 1920, height / 1080)
        rect = (int(360 * f), int(90 * f), int(1200 * f) // 2 * 2, int(900 * f) // 2 * 2)
        lay = Layout("phantom", rect, seed=seed, black=True)
        screen = ScannerScreen(width, height, (0, lay), fps=max(int(fps), 1))
        name = f"replay:{fourcc or 'BGR'}:{width}x{height}@{fps:g}"
        cap = cls(frames(screen, distinct), name, fourcc, fps, count, quality)
        cap.screen = screen
        return cap

    def again(self, fps: float | None = None, count: int | None = None) -> ReplayCapture:
        """Another replay of the same (already encoded) frames, from the start."""
        twin = copy.copy(self)
        twin.fps = self.fps if fps is None else float(fps)
        twin.count = self.count if count is None else int(count)
        twin.opened, twin.n, twin.missed, twin.t_arrival_ns, twin._t0 = False, 0, 0, None, None
        return twin

    def open(self) -> bool:
        self.opened = self.n < self.count and len(self.frames) > 0
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.opened or self.n >= self.count:
            return False, None
        if self.fps > 0:
            now = self.clock()
            if self._t0 is None:
                self._t0 = now - self.n / self.fps
            due = self._t0 + self.n / self.fps
            if now < due:
                self.sleep(due - now)
            else:  # late: the grabber has overwritten its buffer with the newest frame since
                newest = min(int((now - self._t0) * self.fps), self.count - 1)
                self.missed += newest - self.n
                self.n = newest
                due = self._t0 + self.n / self.fps
            self.t_arrival_ns = int(due * 1e9)
        self.n += 1
        return True, self.frames[(self.n - 1) % len(self.frames)]

    def release(self) -> None:
        self.opened = False


@register("v4l2")
class V4l2Source(Source):
    live = True

    def __init__(
        self,
        uri: str,
        capture: Any,
        reconnect_s: float = 1.0,
        profile: SourceProfile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(uri, profile)
        self.capture = capture
        self.reconnect_s = reconnect_s
        self.clock = clock
        self._connected = False
        self._last_attempt: float | None = None
        if self.profile.crop_rect is None:
            self.region_detector = RegionDetector()
        self.decode_target = DecodeTarget()
        self._decoder: JpegDecoder | None = None

    def set_decode_target(
        self,
        size: tuple[int, int] | None = None,
        *,
        fit: tuple[int, int] | None = None,
        gray: bool = False,
        gray_if_neutral: bool = False,
    ) -> None:
        """What the consumers need of the imaging region (``grab.DecodeTarget``): ``size`` (w, h) the
        region is stretched to (the model's input), ``fit`` (w, h) it is shown inside with its aspect kept
        (the screen's image area), ``gray`` when colour is not needed, ``gray_if_neutral`` when a region
        without colour may come gray (a gray model). A grabber's MJPG or YUYV frame is then decoded at the
        smallest scale (1/2, 1/4, 1/8) that covers both sizes; None (the default): full size. Takes effect
        from the next frame."""
        self.decode_target = DecodeTarget(
            tuple(int(v) for v in size) if size is not None else None,  # type: ignore[arg-type]
            tuple(int(v) for v in fit) if fit is not None else None,  # type: ignore[arg-type]
            bool(gray),
            gray_if_neutral=bool(gray_if_neutral),
        )

    @property
    def decoder(self) -> JpegDecoder:
        if self._decoder is None:
            self._decoder = JpegDecoder()
        return self._decoder

    def decode_scale(self, width: int, height: int) -> int:
        """The scale (k of 1/k) a ``width`` x ``height`` grabber frame is decoded at now: the smallest
        that covers the decode target for the imaging region in force."""
        rect = self.imaging_region(width, height).rect
        return self.decode_target.scale_for(rect[2], rect[3])

    def _detect_scale(self, width: int, height: int) -> int:
        """The fixed scale the region detector sees a grabber frame at: about DETECT_LONG_SIDE px."""
        for k in (8, 4, 2):
            if max(width, height) // k >= DETECT_LONG_SIDE:
                return k
        return 1

    def _decode(self, buf: np.ndarray, t: int, meta: dict[str, Any]) -> Frame:
        """A grabber's raw buffer -> the frame, decoded at the scale needed (gray when that is enough)."""
        fourcc = str(self.capture.fourcc)
        target = self.decode_target
        gray = target.gray
        if fourcc == "MJPG":
            size = jpeg_size(buf)
            k = self.decode_scale(*size)
            if self.raw_tap is None and target.gray_if_neutral and not gray:
                if self.decoder.has_planes:
                    return self._jpeg_part(buf, size, k, t, meta)
                return self._bgr_part(self.decoder.decode(buf, k), fourcc, buf, size, k, t, meta)
            img = self.decoder.decode(buf, k, gray)
        else:
            size = (int(self.capture.width), int(self.capture.height))
            if self.raw_tap is None:  # (source-check shows the whole picture)
                return self._yuyv_part(buf, size, gray, t, meta)
            k = self.decode_scale(*size)
            img = yuyv_frame(buf, *size, k, gray)
        self._check_size(img, fourcc, size, k)
        frame = self.make_frame(
            img, meta, t_capture_ns=t, decode_scale=k, full_size=size, detect_scale=self._detect_scale(*size)
        )
        return self._keep_original(frame, fourcc, buf, size)

    def _check_size(self, img: np.ndarray, fourcc: str, size: tuple[int, int], k: int) -> None:
        if (img.shape[1], img.shape[0]) != scaled_size(*size, k):
            raise BadFrame(f"{self.uri}: frame skipped: {fourcc} decoded to {img.shape[1]}x{img.shape[0]}")

    def _keep_original(self, frame: Frame, fourcc: str, buf: np.ndarray, size: tuple[int, int]) -> Frame:
        """``frame`` with its grabber buffer (``meta["original"]``): a capture decodes it at full size."""
        region = tuple(int(v) for v in frame.meta["imaging_region"])
        decoder = self.decoder if fourcc == "MJPG" else None
        original = Original(fourcc, buf, size, region, self.profile, decoder)  # type: ignore[arg-type]
        frame.meta["original"] = original  # type: ignore[index]
        return frame

    def _part_frame(self, img, origin, fourcc, buf, size, k, t, meta) -> Frame:
        frame = self.make_frame(
            img, meta, t_capture_ns=t, decode_scale=k, full_size=size, origin=origin, watched=True
        )
        return self._keep_original(frame, fourcc, buf, size)

    def _jpeg_part(
        self, buf: np.ndarray, size: tuple[int, int], k: int, t: int, meta: dict[str, Any]
    ) -> Frame:
        """An MJPG frame for a gray model, decoded to its planes: the region detector watches the luma,
        and the imaging region comes as its luma unless its chroma has colour (``grab.jpeg_part``)."""
        planes = self.decoder.planes(buf, k)
        w, h = scaled_size(*size, k)
        if planes[0].shape[0] < h or planes[0].shape[1] < w:
            raise BadFrame(
                f"{self.uri}: frame skipped: MJPG decoded to {planes[0].shape[1]}x{planes[0].shape[0]}"
            )
        self.watch_region(planes[0][:h, :w], k, self._detect_scale(*size))
        img, origin = jpeg_part(planes, (w, h), self.imaging_region(*size).rect, k)
        return self._part_frame(img, origin, "MJPG", buf, size, k, t, meta)

    def _bgr_part(self, img, fourcc, buf, size, k, t, meta) -> Frame:
        """A frame decoded to B, G, R for a gray model (OpenCV's decoder): the region detector watches the
        whole picture, and the imaging region is passed on gray when none of its pixels is coloured."""
        self._check_size(img, fourcc, size, k)
        self.watch_region(img, k, self._detect_scale(*size))
        x0, y0, x1, y1 = part_rect(self.imaging_region(*size).rect, k, scaled_size(*size, k))
        part = img[y0:y1, x0:x1]
        if neutral_bgr(part):
            part = cv2.cvtColor(part, cv2.COLOR_BGR2GRAY)
        return self._part_frame(part, (x0 * k, y0 * k), fourcc, buf, size, k, t, meta)

    def _yuyv_part(
        self, buf: np.ndarray, size: tuple[int, int], gray: bool, t: int, meta: dict[str, Any]
    ) -> Frame:
        """A YUYV frame: the region detector watches its luma as it lies in the buffer (no conversion),
        then only the imaging region's rows and pixel pairs are converted, at the scale needed (its luma
        alone when that is enough)."""
        self.watch_region(yuyv_luma(buf, *size), 1, self._detect_scale(*size))
        k = self.decode_scale(*size)
        rect = self.imaging_region(*size).rect
        img, origin = yuyv_part(buf, *size, rect, k, gray, self.decode_target.gray_if_neutral)
        return self._part_frame(img, origin, "YUYV", buf, size, k, t, meta)

    @classmethod
    def from_uri(cls, uri, target, params, *, profile, options: dict[str, Any]) -> V4l2Source:
        if not target:
            raise BadSource(f"source {uri!r}: name the device, e.g. v4l2:/dev/video0 or v4l2:0")
        device: str | int = int(target) if target.isdigit() else target
        # options["capture"]: a capture object in place of the device (a test double, the capture bench)
        capture = options.get("capture") or OpenCvCapture(
            device,
            str(options.get("fourcc", "MJPG")),
            int(options.get("width", 640)),
            int(options.get("height", 480)),
            float(options.get("fps", 30.0)),
        )
        return cls(uri, capture, float(options.get("reconnect_s", 1.0)), profile)

    def open(self) -> None:
        self._try_connect()  # an absent device is not an error here: read() reports NO SIGNAL and retries

    def _try_connect(self) -> bool:
        self._last_attempt = self.clock()
        self._connected = bool(self.capture.open())
        if self._connected:
            log.info("%s: capture connected", self.uri)
        return self._connected

    def read(self) -> Frame | None:
        if self.stopping.is_set():
            return None
        if not self._connected:
            wait = self.reconnect_s - (self.clock() - (self._last_attempt or 0.0))
            if wait > 0 and self.stopping.wait(min(wait, self.reconnect_s)):
                return None
            if not self._try_connect():
                raise SourceUnavailable(
                    f"{self.uri}: no capture device (reconnecting every {self.reconnect_s:g} s)"
                )
        ok, img = self.capture.read()
        t = getattr(self.capture, "t_arrival_ns", None) or time.monotonic_ns()
        if not ok or img is None:
            self.capture.release()
            self._connected = False
            log.warning("%s: capture lost, reconnecting", self.uri)
            raise SourceUnavailable(f"{self.uri}: capture lost (unplugged?), reconnecting")
        meta = {"device": str(self.capture.device) if hasattr(self.capture, "device") else ""}
        if getattr(self.capture, "raw", False) and not (img.ndim == 3 and img.shape[2] == 3):
            return self._decode(img, t, meta)
        return self.make_frame(img, meta, t_capture_ns=t)

    def close(self) -> None:
        super().close()
        self.capture.release()
        self._connected = False
