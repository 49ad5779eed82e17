"""Find the imaging region of a video stream from the stream itself.

A scanner's video output is its whole screen: the image (a sector fan or a linear rectangle) surrounded by
chrome (menus, text, scale bars, a logo, the patient's name). The chrome is static; the image is not
(speckle decorrelates from frame to frame, tissue and probe move). So the part of the picture that keeps
changing is the image.

Method (``RegionDetector.feed`` per frame, ``estimate_region`` per check):

1. Downsample without filtering: every ``s``-th pixel of every ``s``-th row of the green channel (a cheap
   luma; ``s`` makes the long side about ``work_size`` px, so s = 5 at 1920x1080, 2 at 640x480), sampled
   at the centre of each s x s block. No colour conversion or resize of the full frame: a strided copy.
2. Activity: the per-pixel temporal range (max - min) over a window of ``window`` fed frames, kept as a
   running min and max (two uint8 operations per fed frame). An estimate looks at the last ``span``
   windows (the per-pixel maximum of their ranges).
3. Threshold: a pixel is active when its range exceeds ``max(min_range, noise_factor * p)`` (at most
   ``max_threshold``), p being the ``noise_percentile``-th percentile of the range map: static chrome
   from a digital grabber has range 0, a lossy recording's or an analogue grabber's noise raises the
   floor, and the floor follows it.
4. Clean: an opening (3x3) removes isolated pixels and thin changing strokes (clock digits, a blinking
   cursor); a closing with a disc of ``close_fraction`` of the working width bridges dark parts of the
   image (anechoic fluid, shadows).
5. Keep the largest connected component (its outer contour, holes filled), plus the active pixels within
   2 px of it that the opening took (a fan's acute corners). It is the image when its bounding box covers at least
   ``min_fraction`` of the frame and the component fills at least ``min_fill`` of that box (a fan fills
   about 0.6, a rectangle 1); else nothing is claimed ("unsure"). Its box, scaled back by ``s`` (block
   edges: within about s/2 px of the true edge; a lossy recording's blocks that straddle the image's edge
   change too, up to one 8x8 block more), is the estimate in full-frame pixels. A box of at least
   ``full_fraction`` of both sides means the whole frame moves (no chrome to cut, or pure noise): the
   region is then the full frame, and ``rect`` is None.

Decisions (``RegionDetector.rect``): None until the first ``span`` windows are seen (too few frames) and
while no estimate has been made (nothing moving: a frozen picture; only small things moving; a moving area
below ``min_fraction``). The first valid estimate is adopted. After that the detector keeps watching: an
estimate of "nothing moving" (the scanner's freeze button) keeps the region; an estimate whose IoU with
the region is below ``change_iou``, or that reaches beyond it by more than ``outside`` of the frame's long
side (at least 2 samples), for ``change_checks`` checks in a row (a new layout: the image moved, grew into
the former chrome, or shrank) replaces it. Smaller changes (a region a little larger than the image) are
ignored, so the crop does not jitter, and the image is never left cut off for long. A frame of another
size resets everything (the scanner switched its video mode).

Cost: one strided copy of about ``work_size`` x ``work_size * H / W`` pixels and two min/max operations
per fed frame; the morphology and labelling run once per window on the small map. ``every`` feeds only
every k-th offered frame. Nothing here is tuned to one picture: the parameters are about the stream
(grey-level noise, how long "sustained" is) and about what an image is (large, compact).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

Rect = tuple[int, int, int, int]  # x, y, width, height in full-frame pixels


@dataclass(frozen=True)
class DetectorParams:
    work_size: int = 400  # px: long side of the downsampled copy
    window: int = 30  # fed frames per activity window (1 s at 30 fps)
    span: int = 2  # windows an estimate looks back over
    every: int = 1  # feed every k-th offered frame
    min_range: int = 4  # grey levels: a smaller temporal range is "static"
    noise_percentile: float = 10.0  # the range map's noise floor is read at this percentile...
    noise_factor: float = 3.0  # ...and the threshold is this many times it (at least min_range)
    max_threshold: int = 64  # grey levels: the noise floor never raises the threshold above this
    close_fraction: float = 0.02  # closing disc diameter, share of the working width
    min_fraction: float = 0.05  # a region's box must cover this share of the frame
    min_fill: float = 0.3  # the component must fill this share of its box
    full_fraction: float = 0.97  # a box this close to both frame sides is the full frame
    change_iou: float = 0.8  # a fresh estimate below this IoU with the region counts as a change...
    outside: float = 0.01  # ...and so does one reaching this share of the frame's side beyond the region...
    change_checks: int = 3  # ...and this many in a row replace the region


@dataclass(frozen=True)
class Estimate:
    rect: Rect | None  # full-frame pixels; None: nothing claimed
    full: bool  # the whole frame moves
    why: str  # one line: what was found, or why nothing


def iou(a: Rect, b: Rect) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def sample_step(width: int, height: int, work_size: int) -> int:
    return max(1, round(max(width, height) / max(work_size, 1)))


def downsample(img: np.ndarray, step: int) -> np.ndarray:
    """The green channel (or the grey image) at the centre of each ``step`` x ``step`` block."""
    o = step // 2
    view = img[o::step, o::step, 1] if img.ndim == 3 else img[o::step, o::step]
    return np.ascontiguousarray(view)


def estimate_region(
    activity: np.ndarray, step: int, width: int, height: int, params: DetectorParams = DetectorParams()
) -> Estimate:
    """The imaging region from a temporal-range map (uint8, sampled every ``step`` px of a ``width`` x
    ``height`` frame): steps 3-5 of the module docstring."""
    p = params
    hist = cv2.calcHist([activity], [0], None, [256], [0, 256]).ravel().cumsum()
    floor = float(np.searchsorted(hist, p.noise_percentile / 100.0 * hist[-1]))
    thr = int(min(max(p.min_range, p.noise_factor * floor), p.max_threshold))
    _, raw = cv2.threshold(activity, thr, 1, cv2.THRESH_BINARY)
    if not raw.any():
        return Estimate(None, False, "nothing moves (a frozen picture?)")
    square = np.ones((3, 3), np.uint8)
    mask = cv2.morphologyEx(raw, cv2.MORPH_OPEN, square)
    k = max(3, int(round(p.close_fraction * activity.shape[1])) | 1)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    # pad so that the closing does not stick the region to the frame border
    padded = cv2.copyMakeBorder(mask, k, k, k, k, cv2.BORDER_CONSTANT, value=0)
    mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disc)[k:-k, k:-k]
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return Estimate(None, False, "only small things move (a cursor, a clock?)")
    best = max(contours, key=cv2.contourArea)
    # the component with its holes filled (dark fluid inside the image is still the image)
    near = np.zeros_like(mask)
    cv2.drawContours(near, [best], -1, 1, thickness=cv2.FILLED)
    area = cv2.countNonZero(near)
    # the opening rounds off the acute corners of a fan: take back the active pixels next to the component
    near = cv2.dilate(near, square, iterations=2)
    bx, by, bw, bh = cv2.boundingRect(cv2.bitwise_and(near, raw))
    x0, y0 = bx * step, by * step
    x1, y1 = min(width, (bx + bw) * step), min(height, (by + bh) * step)
    if bx + bw == activity.shape[1]:
        x1 = width  # the last sample column stands for the frame's remaining columns
    if by + bh == activity.shape[0]:
        y1 = height
    rect = (x0, y0, x1 - x0, y1 - y0)
    share = rect[2] * rect[3] / float(width * height)
    if share < p.min_fraction:
        return Estimate(None, False, f"the moving area is {100 * share:.1f} % of the frame (too small)")
    fill = area / float(bw * bh)
    if fill < p.min_fill:
        return Estimate(None, False, f"the moving area fills {100 * fill:.0f} % of its box (not an image)")
    if rect[2] >= p.full_fraction * width and rect[3] >= p.full_fraction * height:
        return Estimate((0, 0, width, height), True, "the whole frame moves")
    return Estimate(rect, False, f"moving area {rect[2]}x{rect[3]}+{x0}+{y0}")


class RegionDetector:
    """Feed it full frames; ``rect`` is the imaging region (full-frame pixels) or None (full frame)."""

    def __init__(self, params: DetectorParams | None = None) -> None:
        self.params = params or DetectorParams()
        if self.params.window < 1 or self.params.span < 1 or self.params.every < 1:
            raise ValueError("window, span and every must be >= 1")
        self._offered = 0
        self._size: tuple[int, int] | None = None
        self._reset(None)

    def _reset(self, size: tuple[int, int] | None) -> None:
        self._size = size
        self._step = sample_step(*size, self.params.work_size) if size else 1
        self._lo: np.ndarray | None = None
        self._hi: np.ndarray | None = None
        self._n = 0
        self._windows: deque[np.ndarray] = deque(maxlen=self.params.span)
        self._current: Rect | None = None  # the adopted estimate (the full frame included)
        self._pending = 0
        self.fed = 0  # frames fed since the last reset
        self.last: Estimate | None = None  # the latest check's estimate

    @property
    def rect(self) -> Rect | None:
        """The imaging region, or None: not found (yet), or the whole frame is the image."""
        cur, size = self._current, self._size
        if cur is None or size is None or cur == (0, 0, *size):
            return None
        return cur

    @property
    def status(self) -> str:
        """One line: what the detector holds and why."""
        need = self.params.window * self.params.span
        if self._current is not None:
            x, y, w, h = self._current
            held = "the full frame" if self.rect is None else f"{w}x{h}+{x}+{y}"
            tail = f"; latest check: {self.last.why}" if self.last is not None else ""
            return f"region {held} after {self.fed} frames{tail}"
        if self.last is None:
            return f"watching: {self.fed} of the {need} frames needed"
        return f"no region after {self.fed} frames: {self.last.why}"

    def feed(self, img: np.ndarray) -> bool:
        """Take one full frame (uint8 HxW or HxWx3). True when ``rect`` changed."""
        self._offered += 1
        if (self._offered - 1) % self.params.every:
            return False
        size = (int(img.shape[1]), int(img.shape[0]))
        changed = False
        if size != self._size:
            changed = self.rect is not None
            self._reset(size)
        small = downsample(img, self._step)
        if self._lo is None or self._hi is None:
            self._lo, self._hi = small, small.copy()
        else:
            cv2.min(self._lo, small, dst=self._lo)
            cv2.max(self._hi, small, dst=self._hi)
        self._n += 1
        self.fed += 1
        if self._n < self.params.window:
            return changed
        self._windows.append(cv2.subtract(self._hi, self._lo))
        self._lo = self._hi = None
        self._n = 0
        if len(self._windows) < self.params.span:
            return changed
        return self._check() or changed

    def activity(self) -> np.ndarray | None:
        """The range map the next check looks at (downsampled), or None before a full window."""
        if not self._windows:
            return None
        out = self._windows[0].copy()
        for w in list(self._windows)[1:]:
            cv2.max(out, w, dst=out)
        return out

    def _check(self) -> bool:
        activity = self.activity()
        assert activity is not None and self._size is not None
        est = estimate_region(activity, self._step, *self._size, self.params)
        self.last = est
        if est.rect is None:  # nothing claimed: keep what is held (a frozen picture keeps its region)
            self._pending = 0
            return False
        before = self.rect
        if self._current is None:
            self._current = est.rect
        elif self._differs(est.rect, self._current):
            self._pending += 1
            if self._pending >= self.params.change_checks:
                self._current, self._pending = est.rect, 0
        else:
            self._pending = 0
        return self.rect != before

    def _differs(self, fresh: Rect, held: Rect) -> bool:
        """A clear change: the IoU is low, or the picture moves well outside the held region."""
        if iou(fresh, held) < self.params.change_iou:
            return True
        assert self._size is not None
        margin = max(2 * self._step, self.params.outside * max(self._size))
        beyond = (
            held[0] - fresh[0],
            held[1] - fresh[1],
            fresh[0] + fresh[2] - held[0] - held[2],
            fresh[1] + fresh[3] - held[1] - held[3],
        )
        return max(beyond) > margin
