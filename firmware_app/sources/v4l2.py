"""``v4l2:/dev/video0`` (or ``v4l2:0``): a USB video grabber or camera through OpenCV's V4L2 backend.

Pixel format (MJPG or YUYV), size and fps come from the board config's [source]. An absent or unplugged
device raises SourceUnavailable (the screen shows NO SIGNAL) and every later read() tries to reconnect,
at most once per ``reconnect_s``: the daemon never crashes for a loose cable.

Without a board ``crop``, the imaging region is found in the stream (``region_detect``): frames are full
frame until it is, then cut to it ("detected").

The device sits behind a tiny capture interface (``open() -> bool``, ``read() -> (ok, frame)``,
``release()``), the shape of ``cv2.VideoCapture``; ``MockCapture`` and ``ReplayCapture`` are its test
doubles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadSource, SourceUnavailable
from firmware_app.sources import register
from firmware_app.sources.base import Source
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region_detect import RegionDetector
from firmware_app.types import Frame

log = logging.getLogger(__name__)


class OpenCvCapture:
    """The real device."""

    def __init__(self, device: str | int, fourcc: str, width: int, height: int, fps: float) -> None:
        self.device, self.fourcc, self.width, self.height, self.fps = device, fourcc, width, height, fps
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
        self._cap = cap
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if got != (self.width, self.height):
            log.warning(
                "%s delivers %dx%d, board config asks %dx%d", self.device, *got, self.width, self.height
            )
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self._cap is None:
            return False, None
        return self._cap.read()

    def release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


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
    """Test double: replays recorded frames (a scanner's screen), in order; then reads fail (unplugged)."""

    def __init__(self, frames: Sequence[np.ndarray], device: str = "replay") -> None:
        self.frames, self.device = frames, device
        self.opened = False
        self.n = 0

    def open(self) -> bool:
        self.opened = self.n < len(self.frames)
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.opened or self.n >= len(self.frames):
            return False, None
        self.n += 1
        return True, self.frames[self.n - 1]

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

    @classmethod
    def from_uri(cls, uri, target, params, *, profile, options: dict[str, Any]) -> V4l2Source:
        if not target:
            raise BadSource(f"source {uri!r}: name the device, e.g. v4l2:/dev/video0 or v4l2:0")
        device: str | int = int(target) if target.isdigit() else target
        capture = OpenCvCapture(
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
        if not ok or img is None:
            self.capture.release()
            self._connected = False
            log.warning("%s: capture lost, reconnecting", self.uri)
            raise SourceUnavailable(f"{self.uri}: capture lost (unplugged?), reconnecting")
        return self.make_frame(
            img, {"device": str(self.capture.device) if hasattr(self.capture, "device") else ""}
        )

    def close(self) -> None:
        super().close()
        self.capture.release()
        self._connected = False
