"""``file:PATH`` (a video, replayed at its native rate or with ``?realtime=0`` as fast as possible, every
frame processed; ``?loop=1`` loops) and ``images:DIR`` (every image file of a folder, in name order).

A video without a board ``crop`` has its imaging region found in the stream (``region_detect``): full
frames until it is, then cut to it ("detected"). An image folder keeps the full frame (a still shows
nothing moving).

An image's header is read before it is decoded (``image_header``). One larger than the board's
``[source] max_pixels`` (default 40 MP) is decoded at 1/2, 1/4 or 1/8 scale, the first that fits; JPEG
scales while decoding, other formats are decoded whole (in gray, one byte a pixel, when reduced) and then
shrunk, so they may claim at most ``FULL_DECODE_FACTOR`` x max_pixels. A file that does not fit, or
does not decode, is one BadFrame naming it; the folder goes on with the next file."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadSource
from firmware_app.sources import register
from firmware_app.sources.base import Source, int_param
from firmware_app.sources.grab import CV_REDUCED
from firmware_app.sources.image_header import DEFAULT_MAX_PIXELS, read_header
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region_detect import RegionDetector
from firmware_app.types import Frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"}
# a format the decoder cannot scale is decoded whole before it is shrunk: at most this x max_pixels
FULL_DECODE_FACTOR = 4
_REDUCED = CV_REDUCED  # OpenCV decodes a JPEG at 1/2, 1/4, 1/8 of its size


def _mp(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.0f} MP" if mp >= 10 else f"{mp:.2g} MP"


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """Decode one image file to uint8 HxW or HxWx3 BGR; returns (pixels, scale denominator 1/2/4/8).

    The header is read first: an image over ``max_pixels`` is decoded reduced, one that cannot be
    brought under it is refused before anything is allocated. Raises BadFrame("PATH: problem").
    """
    try:
        with open(path, "rb") as fh:
            header = read_header(fh)
    except OSError as exc:
        raise BadFrame(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise BadFrame(f"{path}: {exc}") from None
    w, h = header.width, header.height
    size = f"{w}x{h} ({_mp(header.pixels)})"
    scale = next((s for s in (1, 2, 4, 8) if -(-w // s) * -(-h // s) <= max_pixels), None)
    if scale is None:
        raise BadFrame(
            f"{path}: {size} is too large even at 1/8 scale ([source] max_pixels = {_mp(max_pixels)})"
        )
    if scale == 1:
        flags = cv2.IMREAD_UNCHANGED
    else:
        if not header.scales_in_decoder and header.pixels > FULL_DECODE_FACTOR * max_pixels:
            raise BadFrame(
                f"{path}: {size} is too large: a {header.format.upper()} is decoded whole, and this "
                f"is over {FULL_DECODE_FACTOR} x [source] max_pixels ({_mp(max_pixels)})"
            )
        # a reduced decode of a format decoded whole is done in gray: one byte a pixel while decoding
        gray = header.gray or not header.scales_in_decoder
        flags = _REDUCED[scale, gray]
        log.info(
            "%s: %s is over [source] max_pixels: decoded at 1/%d scale%s",
            path,
            size,
            scale,
            " in gray" if gray and not header.gray else "",
        )
    try:
        img = cv2.imread(str(path), flags)
    except cv2.error as exc:
        raise BadFrame(f"{path}: OpenCV cannot decode it ({' '.join(str(exc).split())[-160:]})") from None
    if img is None:
        raise BadFrame(f"{path}: not an image OpenCV can read (corrupt or truncated {header.format.upper()})")
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] != 3:
        raise BadFrame(f"{path}: {img.shape[2]} channels; expected gray, colour or colour + alpha")
    return img, scale


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

    def __init__(
        self,
        uri: str,
        folder: Path,
        profile: SourceProfile | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(uri, profile)
        self.folder = folder
        self.max_pixels = max_pixels
        self._files: list[Path] = []
        self._i = 0

    @classmethod
    def from_uri(cls, uri, target, params, *, profile, options: dict[str, Any]) -> ImageFolderSource:
        if params:
            raise BadSource(f"source {uri!r}: images: takes no parameters")
        return cls(uri, Path(target), profile, int(options.get("max_pixels") or DEFAULT_MAX_PIXELS))

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
        img, scale = decode_image(path, self.max_pixels)
        meta: dict[str, Any] = {"path": str(path), "name": path.name}
        if scale != 1:
            meta["decode_scale"] = scale
        return self.make_frame(img, meta)
