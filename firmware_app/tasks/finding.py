"""What a task's result *is*: the input gate, the minimum size and persistence make a finding.

The model decides nothing alone (../shared/DESIGN.md, "Data flow"):

1. **Input gate.** When the gate (``firmware_app.gate``) says the model does not apply to this frame (unlike
   its training data, blank, a frozen live picture), the result is ``unlike_training_data``: no label, no
   confidence, no shapes, no alert. The screen says "AI PAUSED".
2. **Minimum size.** A segmentation mask or a detection box smaller than the manifest's ``[finding]``
   minimum (mm² when the physical scale is known, else a fraction of the imaging region) is no finding.
3. **Persistence.** In a stream (a live source, a cine, a video) the finding must hold in ``k`` of the last
   ``n`` frames before it is one, and it stays one until fewer than ``release`` of them hold (hysteresis,
   so the ALERT does not flicker). A single image (one DICOM frame, one file of an image folder) decides
   on itself.

Only a finding alerts, and only a finding keeps its shapes (mask, contours, heatmap, boxes): nothing is
drawn, recorded as a finding or sent as one otherwise. Measurements are in millimetres when the frame's
``mm_per_px`` is known (``sources.region``): area, the extent of the mask or box, and for ultrasound the
depth of its centre from the transducer face (``depth_origin_y``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from firmware_app.models.manifest import Manifest
from firmware_app.types import Box, Frame, Result

log = logging.getLogger(__name__)

# modalities without a depth from a transducer
_PROJECTION = frozenset({"CR", "DX", "MG", "RG", "DR", "IO", "PX", "XA", "RF"})
FROZEN_AFTER_S = 2.0  # a live picture unchanged this long is a frozen one
FROZEN_REASON = "frozen picture"


class Verdict(Protocol):  # firmware_app.gate.GateVerdict
    score: float
    threshold: float
    flagged: bool
    reason: str | None


@dataclass(frozen=True)
class Pause:
    """Why the AI is paused for one frame when no gate verdict says it (a frozen live picture)."""

    reason: str
    score: float = float("nan")
    threshold: float = float("nan")
    flagged: bool = True


def load_gate(manifest: Manifest) -> Any:
    """The model's input gate, or None when its manifest has no ``[gate]`` table."""
    if not manifest.gate:
        return None
    from firmware_app.gate import InputGate

    return InputGate.from_manifest(manifest)


class FindingStage:
    """One per model and source: keeps the persistence history of the stream it sees."""

    def __init__(self, manifest: Manifest, gate: Any = None, live: bool = False) -> None:
        self.rules = manifest.finding
        self.gate = gate
        self.live = live
        self._history: deque[bool] = deque(maxlen=self.rules.persist_n)
        self._on = False
        self._frozen = None
        if live:  # a live picture that stops changing (a frozen scanner, a stuck grabber) is not analysed
            from firmware_app.gate import FrozenDetector

            self._frozen = FrozenDetector(FROZEN_AFTER_S)

    def check_gate(self, frame: Frame) -> Verdict | None:
        """The gate's verdict on ``frame`` (None without a gate); a frozen live picture pauses the AI too."""
        verdict = None if self.gate is None else self.gate.check(frame.pixels)
        if self._frozen is not None and self._frozen.update(frame.pixels, frame.t_capture_ns):
            if verdict is None or not verdict.flagged:
                return Pause(FROZEN_REASON, *(() if verdict is None else (verdict.score, verdict.threshold)))
        return verdict

    def __call__(self, result: Result, frame: Frame, verdict: Verdict | None = None) -> Result:
        """The task's ``result`` of ``frame`` -> the result as shown, sent and recorded."""
        gate = None
        if verdict is not None and math.isfinite(verdict.score):
            gate = (float(verdict.score), float(verdict.threshold))
        single = not self.live and bool(frame.meta.get("single_image"))
        if verdict is not None and verdict.flagged:
            self._remember(False, single)
            return _bare(
                result, "unlike_training_data", gate, paused=verdict.reason or "unlike training data"
            )
        mm, area = _scale(frame), result.area_fraction  # (a mask's area: the same after _sized)
        result, size = self._sized(result, frame, mm, area)
        candidate = bool(result.alert) and result.label is not None
        if not self._remember(candidate, single):
            return _bare(result, "no_finding", gate, confidence=result.confidence)
        measurements = _measurements(result, frame, mm, area)
        if result.measurements:  # a task's own, then ours
            measurements = {**result.measurements, **measurements}
        return result.evolve(state="finding", alert=True, gate=gate, size=size, measurements=measurements)

    # -- persistence --
    def _remember(self, candidate: bool, single: bool) -> bool:
        if single:
            self._history.clear()
            self._on = False
            return candidate
        r = self.rules
        self._history.append(candidate)
        held = sum(self._history)
        self._on = held >= r.release_k if self._on else held >= r.persist_k
        return self._on

    # -- size --
    def _sized(
        self, result: Result, frame: Frame, mm: tuple[float, float] | None, area: float | None
    ) -> tuple[Result, tuple[float, str] | None]:
        """``result`` without what is below the minimum size (no finding, or fewer boxes), and its size
        (``mm``: the frame's scale, ``area``: the result's area fraction)."""
        area_px = float(frame.width * frame.height)
        if area:  # a region (a Mask)
            frac = float(area)
            mm2 = frac * area_px * mm[0] * mm[1] if mm else None
            size = (mm2, "mm2") if mm2 is not None else (frac, "fraction")
            if not self._big_enough(frac, mm2):
                return result.evolve(alert=False, label=None), size
            return result, size
        boxes = result.boxes
        if boxes:  # boxes: the ones big enough, the top one's size
            kept = tuple(b for b in boxes if self._big_enough(*_box_size(b, area_px, mm)))
            if not kept:
                return result.evolve(alert=False, label=None, shapes=_with_boxes(result, ())), None
            top = kept[0]
            frac, mm2 = _box_size(top, area_px, mm)
            size = (mm2, "mm2") if mm2 is not None else (frac, "fraction")
            if (
                len(kept) == len(boxes) == len(result.shapes)
                and result.label == top.label
                and result.confidence == top.score
            ):  # every box kept, nothing else to reorder: the result as it is (a detector's, usually)
                return result, size
            return result.evolve(
                shapes=_with_boxes(result, kept), label=top.label, confidence=top.score
            ), size
        return result, None

    def _big_enough(self, fraction: float, mm2: float | None) -> bool:
        """mm² against the minimum in mm² when both are known, else the fraction of the region."""
        if mm2 is not None and self.rules.min_size_mm2 is not None:
            return mm2 >= self.rules.min_size_mm2
        return fraction >= self.rules.min_size_fraction


def _scale(frame: Frame) -> tuple[float, float] | None:
    mm = frame.meta.get("mm_per_px")
    return (float(mm[0]), float(mm[1])) if mm else None


def _measurements(
    result: Result, frame: Frame, mm: tuple[float, float] | None, area: float | None
) -> dict[str, tuple[float, str]]:
    """What a finding measures in mm when the scale ``mm`` is known: a region's area (``area``, its
    fraction of the frame) and the extent of its largest part (two collections are not one 8 cm
    finding), the top box's extent; for ultrasound the depth of its centre from the transducer face."""
    if mm is None:
        return {}
    meta = frame.meta
    depth_ok = meta.get("Modality") not in _PROJECTION
    depth0 = float(meta.get("depth_origin_y") or 0.0)
    meas: dict[str, tuple[float, str]] = {}
    if area:
        meas["area"] = (float(area) * frame.width * frame.height * mm[0] * mm[1], "mm2")
        contours = result.contours
        if contours:
            largest = contours[0] if len(contours) == 1 else max(contours, key=_contour_area)
            w, h = _extent(largest)
            meas["width"] = (w * mm[0], "mm")
            meas["height"] = (h * mm[1], "mm")
        centre_y = result.centroid[1] if result.centroid is not None else None
    elif result.boxes:
        top = result.boxes[0]
        meas["width"] = ((top.x1 - top.x0) * mm[0], "mm")
        meas["height"] = ((top.y1 - top.y0) * mm[1], "mm")
        centre_y = (top.y0 + top.y1) / 2
    else:
        return {}
    if depth_ok and centre_y is not None:
        meas["depth"] = (max(0.0, (centre_y - depth0) * mm[1]), "mm")
    return meas


def _contour_area(c: np.ndarray) -> float:
    pts = c if c.dtype == np.int32 else c.astype(np.int32)
    return float(cv2.contourArea(pts.reshape(-1, 1, 2)))


def _extent(c: np.ndarray) -> tuple[float, float]:
    """(width, height) in pixels of a contour's points, both ends counted (max - min + 1)."""
    pts = c.reshape(-1, 2)
    if pts.dtype == np.int32 and len(pts):  # the bounding rectangle of integer points is exactly that
        _, _, w, h = cv2.boundingRect(np.ascontiguousarray(pts))
        return float(w), float(h)
    return float(np.ptp(pts[:, 0]) + 1), float(np.ptp(pts[:, 1]) + 1)


def _box_size(b: Box, area_px: float, mm: tuple[float, float] | None) -> tuple[float, float | None]:
    """(fraction of the region, mm² or None) of a box."""
    w, h = max(0.0, b.x1 - b.x0), max(0.0, b.y1 - b.y0)
    return w * h / area_px, (w * h * mm[0] * mm[1] if mm else None)


def _with_boxes(result: Result, boxes: tuple[Box, ...]) -> tuple:
    """``result``'s shapes with its boxes replaced by ``boxes`` (the others kept, in order)."""
    return tuple(s for s in result.shapes if not isinstance(s, Box)) + boxes


def _bare(
    result: Result,
    state: str,
    gate: tuple[float, float] | None,
    paused: str | None = None,
    confidence: float | None = None,
) -> Result:
    """``result`` without a finding: no label, no shapes, no alert (a confidence only when given)."""
    return result.evolve(
        state=state,
        label=None,
        confidence=confidence,
        alert=False,
        shapes=(),
        gate=gate,
        size=None,
        measurements={},
        paused=paused,
    )
