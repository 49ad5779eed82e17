"""Input drift / out-of-distribution warning: "INPUT UNLIKE TRAINING DATA".

A model is only known to work on inputs like those it was trained on. Each manifest carries reference
statistics of its training frames (``reference_stats``); the daemon compares a rolling window of live
frames with them and warns when they diverge: a different probe preset, an X-ray fed to an ultrasound
model, an inverted or saturated image, a frame of test pattern.

Statistics of one frame (gray levels; a colour frame is converted to gray; every other row and column):

- ``histogram``: 32-bin gray-level histogram (bins of 8 levels), normalised to sum 1;
- ``mean``: mean gray level (brightness); ``std``: standard deviation of gray levels (contrast);
- the frame size (width, height).

The measure (documented in the model card):

- ``jsd``: the Jensen-Shannon divergence (base 2, so 0 = identical, 1 = disjoint) between the window's
  average histogram and the reference histogram;
- ``z_mean``, ``z_std``: how far the window's mean brightness and contrast are from the reference, in units
  of their spread between training frames (at least ``MIN_SPREAD`` gray levels, so that a normal gain
  change is not a warning);
- ``aspect``: the window's frame aspect ratio against the reference's.

Diverged when the window holds at least half its frames and ``jsd > threshold`` (default
``DEFAULT_JSD_THRESHOLD`` = 0.15) or ``max(z_mean, z_std) > z_threshold`` (default 6) or the aspect ratio
differs by more than 30 %. The warning clears with hysteresis (``jsd`` below 0.8 x threshold and the z-scores
below 0.8 x their limit), so it does not flicker. Calibration on the phantoms (tests/test_records_drift.py):
unseen ultrasound seeds give jsd < 0.06; an inverted ultrasound or a chest X-ray gives jsd > 0.3.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from firmware_app.types import Frame

log = logging.getLogger(__name__)

WARNING = "INPUT UNLIKE TRAINING DATA"
BINS = 32
DEFAULT_JSD_THRESHOLD = 0.15
DEFAULT_Z_THRESHOLD = 6.0
MIN_SPREAD = 4.0  # gray levels: the smallest spread of mean/contrast the z-scores divide by
ASPECT_TOLERANCE = 0.30
HYSTERESIS = 0.8
_EPS = 1e-6


def frame_stats(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(32-bin normalised histogram, mean, std) of a uint8 gray or BGR frame, on every other pixel."""
    px = pixels[::2, ::2]
    if px.ndim == 3:
        px = cv2.cvtColor(np.ascontiguousarray(px[:, :, :3]), cv2.COLOR_BGR2GRAY)
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    # one contiguous copy of the sampled pixels (what OpenCV would copy a strided view to, for each call),
    # then OpenCV's 8-bit histogram: 256 exact counts, summed 8 by 8 into the 32 bins
    px = np.ascontiguousarray(px)
    counts = cv2.calcHist([px], [0], None, [256], [0, 256])
    hist = counts.reshape(BINS, 256 // BINS).sum(axis=1, dtype=np.float64)
    hist /= max(px.size, 1)
    mean, std = cv2.meanStdDev(px)
    return hist, float(mean[0][0]), float(std[0][0])


def reference_stats(frames: Iterable[np.ndarray | Frame]) -> dict[str, Any]:
    """Reference statistics of training frames, for the manifest's ``[reference]`` table."""
    hists, means, stds, sizes = [], [], [], []
    for f in frames:
        px = f.pixels if isinstance(f, Frame) else np.asarray(f)
        h, m, s = frame_stats(px)
        hists.append(h)
        means.append(m)
        stds.append(s)
        sizes.append((px.shape[1], px.shape[0]))
    if not hists:
        raise ValueError("reference_stats needs at least one frame")
    hist = np.mean(hists, axis=0)
    hist /= hist.sum()
    widths, heights = zip(*sizes)
    return {
        "histogram": [round(float(v), 6) for v in hist],
        "mean": round(float(np.mean(means)), 3),
        "mean_sd": round(float(np.std(means)), 3),
        "std": round(float(np.mean(stds)), 3),
        "std_sd": round(float(np.std(stds)), 3),
        "width": int(np.median(widths)),
        "height": int(np.median(heights)),
        "frames": len(hists),
    }


def reference_toml(stats: Mapping[str, Any]) -> str:
    """The ``[reference]`` table for a manifest.toml, from ``reference_stats``."""
    hist = ", ".join(f"{v:.6f}" for v in stats["histogram"])
    lines = [
        "[reference]  # input statistics of the training frames (firmware_app.records.drift)",
        f"histogram = [{hist}]",
        f"mean = {float(stats['mean']):.3f}",
        f"mean_sd = {float(stats['mean_sd']):.3f}",
        f"std = {float(stats['std']):.3f}",
        f"std_sd = {float(stats['std_sd']):.3f}",
        f"width = {int(stats['width'])}",
        f"height = {int(stats['height'])}",
        f"frames = {int(stats['frames'])}",
    ]
    if "jsd_threshold" in stats:
        lines.append(f"jsd_threshold = {float(stats['jsd_threshold']):.3f}")
    return "\n".join(lines) + "\n"


_REQUIRED = ("histogram", "mean", "mean_sd", "std", "std_sd", "width", "height")
_OPTIONAL = ("frames", "jsd_threshold")


def check_reference(table: Mapping[str, Any], where: str = "[reference]") -> list[str]:
    """Problems of a ``[reference]`` table (for the manifest validator); [] when valid."""
    problems = [f"{where}: unknown key {k!r}" for k in table if k not in _REQUIRED + _OPTIONAL]
    problems += [f"{where}: missing required key {k}" for k in _REQUIRED if k not in table]
    if problems:
        return problems
    hist = table["histogram"]
    if not (isinstance(hist, list) and len(hist) == BINS and all(_num(v) and v >= 0 for v in hist)):
        problems.append(f"{where}: histogram must be {BINS} numbers >= 0")
    elif not abs(sum(hist) - 1.0) < 1e-3:
        problems.append(f"{where}: histogram must sum to 1 (sums to {sum(hist):.4f})")
    for k in ("mean", "mean_sd", "std", "std_sd") + (("jsd_threshold",) if "jsd_threshold" in table else ()):
        if not (_num(table[k]) and table[k] >= 0):
            problems.append(f"{where}: {k} must be a number >= 0")
    for k in ("width", "height") + (("frames",) if "frames" in table else ()):
        if not (isinstance(table[k], int) and not isinstance(table[k], bool) and table[k] > 0):
            problems.append(f"{where}: {k} must be an integer > 0")
    return problems


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0..1) of two histograms."""
    p = np.asarray(p, np.float64) + _EPS
    q = np.asarray(q, np.float64) + _EPS
    p /= p.sum()
    q /= q.sum()
    m = 0.5 * (p + q)
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


@dataclass
class DriftStatus:
    frames: int = 0
    jsd: float = 0.0
    z_mean: float = 0.0
    z_std: float = 0.0
    aspect_ratio: float = 1.0  # window aspect / reference aspect
    diverged: bool = False
    reasons: list[str] = field(default_factory=list)


class DriftMonitor:
    """Compares a rolling window of live frames with a model's reference statistics.

    ``update(frame)`` is cheap (a subsampled histogram; every ``every``-th frame) and may run on the
    inference thread; it returns ``WARNING`` while the input is unlike the training data, else None.
    A change of state is logged and (with ``audit``) written to the audit log from a helper thread.
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        window: int = 30,
        threshold: float | None = None,
        z_threshold: float = DEFAULT_Z_THRESHOLD,
        every: int = 1,
        audit: Any = None,
        model_id: str = "",
        on_change: Callable[[bool, DriftStatus], None] | None = None,
    ) -> None:
        problems = check_reference(reference)
        if problems:
            raise ValueError("; ".join(problems))
        if window < 1 or every < 1:
            raise ValueError(f"window ({window}) and every ({every}) must be >= 1")
        self.ref_hist = np.asarray(reference["histogram"], np.float64)
        self.ref_hist /= self.ref_hist.sum()
        self.ref_mean = float(reference["mean"])
        self.ref_std = float(reference["std"])
        self.mean_spread = max(float(reference["mean_sd"]), MIN_SPREAD)
        self.std_spread = max(float(reference["std_sd"]), MIN_SPREAD)
        self.ref_aspect = float(reference["width"]) / float(reference["height"])
        default = float(reference.get("jsd_threshold", DEFAULT_JSD_THRESHOLD))
        self.threshold = float(threshold) if threshold is not None else default
        self.z_threshold = float(z_threshold)
        self.window = int(window)
        self.every = int(every)
        self._audit = audit
        self._model_id = model_id
        self._on_change = on_change
        self._items: deque[tuple[np.ndarray, float, float, float]] = deque(maxlen=self.window)
        self._hist_sum = np.zeros(BINS, np.float64)
        self._n = 0
        self.status = DriftStatus()

    def reset(self) -> None:
        """Forget the window (a new model, a new source)."""
        self._items.clear()
        self._hist_sum[:] = 0
        self.status = DriftStatus()

    def update(self, frame: Frame | np.ndarray) -> str | None:
        px = frame.pixels if isinstance(frame, Frame) else frame
        self._n += 1
        if (self._n - 1) % self.every == 0:
            hist, mean, std = frame_stats(px)
            if len(self._items) == self.window:
                self._hist_sum -= self._items[0][0]
            self._items.append((hist, mean, std, px.shape[1] / max(px.shape[0], 1)))
            self._hist_sum += hist
            self._evaluate()
        return WARNING if self.status.diverged else None

    def _evaluate(self) -> None:
        n = len(self._items)
        st = self.status
        st.frames = n
        if n < max(1, self.window // 2):
            return
        st.jsd = jensen_shannon(self._hist_sum / n, self.ref_hist)
        st.z_mean = abs(sum(i[1] for i in self._items) / n - self.ref_mean) / self.mean_spread
        st.z_std = abs(sum(i[2] for i in self._items) / n - self.ref_std) / self.std_spread
        st.aspect_ratio = (sum(i[3] for i in self._items) / n) / self.ref_aspect
        factor = HYSTERESIS if st.diverged else 1.0
        reasons = []
        if st.jsd > self.threshold * factor:
            reasons.append("histogram")
        if st.z_mean > self.z_threshold * factor:
            reasons.append("brightness")
        if st.z_std > self.z_threshold * factor:
            reasons.append("contrast")
        if abs(st.aspect_ratio - 1.0) > ASPECT_TOLERANCE * factor:
            reasons.append("size")
        st.reasons = reasons
        diverged = bool(reasons)
        if diverged != st.diverged:
            st.diverged = diverged
            self._changed(st)

    def _changed(self, st: DriftStatus) -> None:
        if st.diverged:
            log.warning(
                "%s: %s (jsd %.3f, z mean %.1f, z contrast %.1f)",
                WARNING,
                ", ".join(st.reasons),
                st.jsd,
                st.z_mean,
                st.z_std,
            )
        else:
            log.info("input back within the training distribution (jsd %.3f)", st.jsd)
        if self._on_change is not None:
            self._on_change(st.diverged, st)
        if self._audit is not None:
            fields = {
                "state": "on" if st.diverged else "off",
                "model_id": self._model_id,
                "jsd": round(st.jsd, 4),
                "z_mean": round(st.z_mean, 2),
                "z_contrast": round(st.z_std, 2),
                "reasons": list(st.reasons),
            }
            audit = self._audit
            threading.Thread(
                target=_append_quietly, args=(audit, fields), name="fwapp-drift-audit", daemon=True
            ).start()


def _append_quietly(audit: Any, fields: dict[str, Any]) -> None:
    try:
        audit.append("drift_warning", **fields)
    except Exception as exc:  # noqa: BLE001
        log.error("audit log: could not record drift_warning (%s)", exc)
