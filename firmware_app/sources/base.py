"""The source interface: something that yields Frames.

A source is opened, read until it returns None (end of stream) and closed. ``read`` blocks until the
next frame is available. A live source (a camera, a paced synthetic feed) sets ``live = True``: the
pipeline then keeps only the newest frame. A finite source (a DICOM file, an image folder, a video file
replayed as fast as possible) sets ``live = False`` and every frame is processed.

``read`` raises SourceUnavailable when the device is absent right now (the screen shows NO SIGNAL and the
pipeline calls ``read`` again later: the source reconnects itself) and BadFrame for one unreadable item
(it is reported, counted and skipped; the next ``read`` moves on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadSource
from firmware_app.sources.profile import SourceProfile, shift_rect
from firmware_app.sources.region import Region
from firmware_app.sources.region_detect import RegionDetector
from firmware_app.types import Frame

log = logging.getLogger(__name__)

MIN_SIDE = 2  # a resize needs pixels to work with; real sources are far larger


def check_pixels(pixels: object, where: str) -> None:
    """A frame must be uint8 HxW or HxWx3, at least MIN_SIDE on each side; else BadFrame naming it."""
    if not isinstance(pixels, np.ndarray):
        raise BadFrame(f"{where}: frame skipped: not an image array ({type(pixels).__name__})")
    shape = pixels.shape
    ok_shape = pixels.ndim == 2 or (pixels.ndim == 3 and shape[2] == 3)
    if pixels.dtype != np.uint8 or not ok_shape or min(shape[:2]) < MIN_SIDE:
        raise BadFrame(
            f"{where}: frame skipped: {pixels.dtype} {'x'.join(map(str, shape))} is not an 8-bit gray or "
            f"3-channel image of at least {MIN_SIDE}x{MIN_SIDE}"
        )


class Source:
    scheme: ClassVar[str] = ""
    live: bool = True
    modality: str | None = None  # the DICOM modality of what it yields when it knows it ("US", "DX" ...)

    def __init__(self, uri: str, profile: SourceProfile | None = None) -> None:
        self.uri = uri
        self.profile = profile or SourceProfile()
        self._next_id = 0
        # the imaging region this source found in its own picture (a detected or a file-stated one); the
        # board's crop overrides it, and without either the full frame is used
        self.region: Region | None = None
        # a live or video source sets this (when the board has no crop): it finds ``region`` in the stream
        self.region_detector: RegionDetector | None = None
        # called with every full frame before it is cropped (``source-check`` draws the region on it)
        self.raw_tap: Callable[[np.ndarray], None] | None = None
        # set by stop(): a read() that waits (a watched folder, a reconnect back-off) returns None soon after
        self.stopping = threading.Event()

    @classmethod
    def from_uri(
        cls,
        uri: str,
        target: str,
        params: dict[str, str],
        *,
        profile: SourceProfile | None,
        options: dict[str, Any],
    ) -> Source:
        """Build the source from its parsed URI. Raise BadSource naming the URI for a bad parameter."""
        raise NotImplementedError

    def imaging_region(self, width: int, height: int, stated: Region | None = None) -> Region:
        """The region a ``width`` x ``height`` picture is cut to: board crop > ``stated`` > found > full."""
        board = self.profile.crop_rect
        if board is not None:
            mm = stated.mm_per_px if stated is not None else None
            return Region(board, "board", mm)
        for region in (stated, self.region):
            if region is not None:
                return region
        return Region.full(width, height)

    def watch_region(self, pixels: np.ndarray, scale: int = 1, detect_scale: int | None = None) -> None:
        """Feed one full frame to ``region_detector``; set ``region`` when it finds or changes one.

        ``pixels`` is the source picture decoded at 1/``scale``; the detector always sees it at
        1/``detect_scale`` (default ``scale``), so a change of decode scale does not restart it, and the
        region is kept in source pixels."""
        detector = self.region_detector
        if detector is None or self.profile.crop_rect is not None:  # the board's crop always wins
            return
        ds = detect_scale or scale
        if ds != scale:
            if ds % scale == 0:
                pixels = pixels[:: ds // scale, :: ds // scale]
            else:  # decoded smaller than the detector's scale: nearest up to it (cheap at these sizes)
                h, w = pixels.shape[:2]
                size = (-(-w * scale // ds), -(-h * scale // ds))
                pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_NEAREST)
        if not detector.feed(pixels):
            return
        rect = detector.rect
        if rect is not None and ds != 1:
            rect = tuple(int(v) * ds for v in rect)  # type: ignore[assignment]
        self.region = Region(rect, "detected") if rect is not None else None
        if self.region is not None:
            log.info("%s: imaging region %s", self.uri, self.region.describe())
        else:
            log.info("%s: imaging region: the full frame (%s)", self.uri, detector.status)

    def stop(self) -> None:
        """Ask a blocking read() to return None soon; called from another thread."""
        self.stopping.set()

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        """Acquire the device or file. Raise BadSource when it can never work."""

    def read(self) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device. Safe to call twice."""
        self.stopping.set()

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for subclasses ------------------------------------------------------------------
    def make_frame(
        self,
        pixels: np.ndarray,
        meta: Mapping[str, Any] | None = None,
        truth: np.ndarray | None = None,
        truth_boxes: tuple[tuple[int, int, int, int], ...] | None = None,
        t_capture_ns: int | None = None,
        region: Region | None = None,
        decode_scale: int = 1,
        full_size: tuple[int, int] | None = None,
        detect_scale: int | None = None,
        origin: tuple[int, int] = (0, 0),
        watched: bool = False,
    ) -> Frame:
        """Apply the source profile (blackout) and the imaging region (crop), stamp the next id and the
        capture time.

        The region is the board's crop when it has one, else ``region`` (what this item says of itself,
        e.g. a DICOM file's ultrasound region), else ``self.region`` (found in the stream by
        ``region_detector``, which sees this frame first), else the full frame; the frame's meta says
        which (``firmware_app.sources.region``).

        ``pixels`` decoded at 1/``decode_scale`` of a ``full_size`` source picture (a grabber's frame,
        ``firmware_app.sources.grab``): the region and the profile stay in source pixels and are scaled to
        cut it; ``meta["decode_scale"]`` says so. ``detect_scale``: see ``watch_region``. ``origin``
        (source pixels, a multiple of ``decode_scale``): ``pixels`` is only the part of the picture from
        there (it covers the imaging region: a grabber's frame converted only where needed), the detector
        having been fed the whole picture already (``watched``).
        """
        t = time.monotonic_ns() if t_capture_ns is None else t_capture_ns
        check_pixels(pixels, self.uri)
        if self.raw_tap is not None:
            self.raw_tap(pixels)
        if not watched:
            self.watch_region(pixels, decode_scale, detect_scale)
        k = decode_scale
        size = (int(pixels.shape[1]), int(pixels.shape[0]))
        full = full_size or (size[0] * k, size[1] * k)
        region = self.imaging_region(*full, region)
        profile, rect = self.profile, region.rect
        if k != 1:
            from firmware_app.sources.grab import scale_rect_in, scaled_profile, scaled_size

            whole = scaled_size(*full, k) if origin != (0, 0) else size
            profile, rect = scaled_profile(self.profile, k, whole), scale_rect_in(rect, k, whole)
        if origin != (0, 0):
            dx, dy = -(origin[0] // k), -(origin[1] // k)
            profile, rect = profile.shifted(dx, dy), shift_rect(rect, dx, dy)
        try:
            pixels = profile.apply(pixels, rect)
        except ValueError as exc:  # a frame of another size than the profile was measured on
            raise BadFrame(f"{self.uri}: frame skipped: {exc}") from None
        if truth is not None:
            truth = profile.crop(truth, rect)
        if truth_boxes is not None and rect[:2] != (0, 0):
            cx, cy = rect[0], rect[1]
            truth_boxes = tuple((x0 - cx, y0 - cy, x1 - cx, y1 - cy) for x0, y0, x1, y1 in truth_boxes)
        m = {"source": self.uri, "full_size": (int(full[0]), int(full[1])), **region.meta()}
        if k != 1:
            m["decode_scale"] = k
        if meta:
            m.update(meta)
        frame = Frame(
            id=self._next_id,
            t_capture_ns=t,
            pixels=pixels,
            meta=m,
            truth=truth,
            truth_boxes=truth_boxes,
        )
        self._next_id += 1
        return frame


def _num_param(uri: str, params: dict[str, str], name: str, default, minimum, kind: type, what: str):
    if name not in params:
        return default
    try:
        value = kind(params[name])
    except ValueError:
        raise BadSource(f"source {uri!r}: {name}={params[name]!r} is not {what}") from None
    if not value >= minimum:  # also refuses nan
        raise BadSource(f"source {uri!r}: {name}={value} must be >= {minimum}")
    return value


def int_param(uri: str, params: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    """Read an integer query parameter of a source URI, or raise BadSource naming it."""
    return _num_param(uri, params, name, default, minimum, int, "an integer")


def float_param(uri: str, params: dict[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    """Read a number query parameter of a source URI, or raise BadSource naming it."""
    return _num_param(uri, params, name, default, minimum, float, "a number")
