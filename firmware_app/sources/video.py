"""``file:PATH`` (a video, replayed at its native rate or with ``?realtime=0`` as fast as possible, every
frame processed; ``?loop=1`` loops) and ``images:DIR`` (every image file of a folder, in name order).

A video without a board ``crop`` has its imaging region found in the stream (``region_detect``): full
frames until it is, then cut to it ("detected"). An image folder keeps the full frame (a still shows
nothing moving)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cv2

from firmware_app.errors import BadFrame, BadSource
from firmware_app.sources import register
from firmware_app.sources.base import Source, int_param
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region_detect import RegionDetector
from firmware_app.types import Frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"}


def _bool_param(uri: str, params: dict[str, str], name: str, default: bool) -> bool:
    return bool(int_param(uri, params, name, int(default))) if name in params else default


@register("file")
class VideoFileSource(Source):
    def __init__(
        self,
        uri: str,
        path: Path,
        realtime: bool = True,
        loop: bool = False,
        profile: SourceProfile | None = None,
    ) -> None:
        super().__init__(uri, profile)
        self.path, self.realtime, self.loop = path, realtime, loop
        self.live = realtime
        self._cap: cv2.VideoCapture | None = None
        self._period = 0.0
        self._next_due = 0.0
        self._index = 0
        if self.profile.crop_rect is None:
            self.region_detector = RegionDetector()

    @classmethod
    def from_uri(cls, uri, target, params, *, profile, options: dict[str, Any]) -> VideoFileSource:
        unknown = set(params) - {"realtime", "loop"}
        if unknown:
            raise BadSource(f"source {uri!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        return cls(
            uri,
            Path(target),
            realtime=_bool_param(uri, params, "realtime", True),
            loop=_bool_param(uri, params, "loop", False),
            profile=profile,
        )

    def open(self) -> None:
        if not self.path.is_file():
            raise BadSource(f"source {self.uri!r}: video file {self.path} not found")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise BadSource(f"source {self.uri!r}: {self.path} is not a video OpenCV can decode")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        self._period = 1.0 / fps if fps > 0 and self.realtime else 0.0
        self._cap = cap

    def read(self) -> Frame | None:
        if self._cap is None:
            self.open()
        assert self._cap is not None
        if self.stopping.is_set():
            return None
        if self._period:
            now = time.monotonic()
            self._next_due = self._next_due or now
            if self._next_due > now and self.stopping.wait(self._next_due - now):
                return None
            self._next_due += self._period
        ok, img = self._cap.read()
        if not ok and self.loop and self._index > 0:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, img = self._cap.read()
            self._index = 0
        if not ok:
            return None
        meta = {"path": str(self.path), "frame_index": self._index}
        self._index += 1
        return self.make_frame(img, meta)

    def close(self) -> None:
        super().close()
        if self._cap is not None:
            self._cap.release()
            self._cap = None


@register("images")
class ImageFolderSource(Source):
    live = False

    def __init__(self, uri: str, folder: Path, profile: SourceProfile | None = None) -> None:
        super().__init__(uri, profile)
        self.folder = folder
        self._files: list[Path] = []
        self._i = 0

    @classmethod
    def from_uri(cls, uri, target, params, *, profile, options: dict[str, Any]) -> ImageFolderSource:
        if params:
            raise BadSource(f"source {uri!r}: images: takes no parameters")
        return cls(uri, Path(target), profile)

    def open(self) -> None:
        if not self.folder.is_dir():
            raise BadSource(f"source {self.uri!r}: folder {self.folder} not found")
        self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise BadSource(
                f"source {self.uri!r}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.folder}"
            )

    def read(self) -> Frame | None:
        if not self._files and self._i == 0:
            self.open()
        if self.stopping.is_set() or self._i >= len(self._files):
            return None
        path = self._files[self._i]
        self._i += 1
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise BadFrame(f"{path}: not an image OpenCV can read")
        if img.dtype != "uint8":
            img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype("uint8")
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        return self.make_frame(img, {"path": str(path), "name": path.name})
