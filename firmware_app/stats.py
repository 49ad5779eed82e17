"""Rolling per-stage timings (p50/p99) and the pipeline's counters."""

from __future__ import annotations

import functools
import threading
from collections import deque

import cv2
import numpy as np


class RollingTimes:
    """Thread-safe rolling window of durations per stage, in milliseconds."""

    def __init__(self, window: int = 600) -> None:
        self.window = window
        self._data: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._append(stage, ms)

    def _append(self, stage: str, ms: float) -> None:  # (under the lock)
        d = self._data.get(stage)
        if d is None:
            d = self._data[stage] = deque(maxlen=self.window)
        d.append(ms)

    def add_ns(self, stage: str, t0_ns: int, t1_ns: int) -> None:
        self.add(stage, (t1_ns - t0_ns) / 1e6)

    def add_ns_many(self, *spans: tuple[str, int, int]) -> None:
        """Several ``(stage, t0_ns, t1_ns)`` at once, under one lock: a frame's stages."""
        with self._lock:
            for stage, t0_ns, t1_ns in spans:
                self._append(stage, (t1_ns - t0_ns) / 1e6)

    def percentiles(self, stage: str) -> dict[str, float] | None:
        with self._lock:
            d = self._data.get(stage)
            arr = np.fromiter(d, dtype=np.float64) if d else None
        if arr is None or arr.size == 0:
            return None
        p50, p99 = np.percentile(arr, [50, 99])
        return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}

    def samples(self, stage: str) -> list[float]:
        """The durations of ``stage`` in the window, oldest first (ms)."""
        with self._lock:
            return list(self._data.get(stage, ()))

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            stages = list(self._data)
        return {s: p for s in stages if (p := self.percentiles(s)) is not None}


class RateMeter:
    """Events per second over the last ``span_s`` seconds."""

    def __init__(self, span_s: float = 2.0) -> None:
        self.span_ns = int(span_s * 1e9)
        self._t: deque[int] = deque()

    def tick(self, t_ns: int) -> None:
        self._t.append(t_ns)
        while self._t and t_ns - self._t[0] > self.span_ns:
            self._t.popleft()

    def rate(self) -> float | None:
        if len(self._t) < 2:
            return None
        span = self._t[-1] - self._t[0]
        return (len(self._t) - 1) * 1e9 / span if span > 0 else None


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two 0/1 masks; 1.0 when both are empty."""
    p = pred.astype(bool, copy=False)
    t = truth.astype(bool, copy=False)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


@functools.lru_cache(maxsize=16)
def nearest_map(dst: int, src: int) -> np.ndarray:
    """Index of the source pixel each of ``dst`` pixels takes under cv2.resize INTER_NEAREST (its rule)."""
    ifx = 1.0 / (dst / src)
    out = np.minimum(np.floor(np.arange(dst) * ifx), src - 1).astype(np.intp)
    out.flags.writeable = False
    return out


def upscaled_dice(small: np.ndarray, truth: np.ndarray) -> float:
    """Dice of a mask at the model's resolution, stretched over the frame as ``Result.mask_at`` does
    (nearest neighbour), against a full-size 0/1 truth: exactly, touching only the rows and columns under
    the mask's bounding box (a few percent of a frame) instead of building the full-size mask."""
    small = small.view(np.uint8) if small.dtype == bool else small
    truth = truth.view(np.uint8) if truth.dtype == bool else truth
    if small.shape == truth.shape:
        return dice(small, truth)
    (th, tw), (mh, mw) = truth.shape, small.shape
    t_sum = cv2.countNonZero(truth)
    x, y, w, h = cv2.boundingRect(small)
    if w == 0 or h == 0:
        return 1.0 if t_sum == 0 else 0.0
    ys, xs = nearest_map(th, mh), nearest_map(tw, mw)
    r0, r1 = np.searchsorted(ys, [y, y + h])
    c0, c1 = np.searchsorted(xs, [x, x + w])
    region = np.take(small[ys[r0:r1]], xs[c0:c1], axis=1)
    inter = cv2.countNonZero(cv2.min(region, truth[r0:r1, c0:c1]))  # any non-zero value counts
    return 2.0 * inter / (cv2.countNonZero(region) + t_sum)
