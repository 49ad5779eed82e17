"""The two objects that travel through the pipeline: a Frame and the Result computed from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True, eq=False)
class Frame:
    """One image from a source.

    pixels: uint8, HxW (grayscale) or HxWx3 (BGR), already cropped to the imaging region and with
    burned-in text blacked out (see sources.profile). Treat it as read-only.
    id: monotonically increasing per source, starting at 0.
    t_capture_ns: time.monotonic_ns() when the frame was captured.
    meta: source metadata (``source`` URI, ``path``, ``frame_index``, DICOM UIDs ...).
    truth: ground-truth mask (uint8 0/1, same HxW as pixels) when the source knows it (phantoms).
    truth_boxes: ground-truth boxes (x0, y0, x1, y1) in pixel coordinates when the source knows them.
    """

    id: int
    t_capture_ns: int
    pixels: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)
    truth: np.ndarray | None = None
    truth_boxes: tuple[tuple[int, int, int, int], ...] | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True, eq=False)
class Box:
    """A detection in frame pixel coordinates."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: str


@dataclass(frozen=True, eq=False)
class Result:
    """What a model found in one frame. All geometry is in the frame's pixel coordinates.

    frame_id is the id of the frame it was computed from: the display draws it only on that frame.
    label/confidence: the top finding (calibrated probability), or None when nothing is found.
    alert: the finding crosses the alert threshold in force.
    mask: uint8 0/1 segmentation of the finding (segmentation), at the model's output resolution: each of
      its pixels covers its share of the frame (nearest neighbour); ``mask_at(w, h)`` gives it at the
      frame's size. Drawing and exporting stretch it; nothing per frame pays for a full-size copy.
    contours: list of int32 Nx2 (x, y) polygons of the mask outline (segmentation).
    heatmap: float32 hxw in [0, 1] (classification with a class-activation output), any size; the
      display stretches it over the frame.
    boxes: detections (detection).
    probabilities: label -> probability (classification; segmentation: max probability per label).
    centroid: (x, y) of the finding; area_fraction: mask area / frame area.

    The finding stage (``tasks.finding``) decides what the result *is*:
    state: "finding" | "no_finding" | "unlike_training_data" (the input gate says the model does not apply)
      | "ai_off"; "" before the finding stage. ``alert`` is never True unless state is "finding", and the
      shapes (mask, contours, heatmap, boxes) are kept only for a finding.
    gate: (score, threshold) of the input gate, or None when the model has no gate.
    size: (value, unit) of the finding: unit "mm2" when the physical scale is known, else "fraction" of
      the imaging region; None without a finding.
    measurements: name -> (value, unit) of what can be measured (``area`` mm2, ``depth`` mm from the
      transducer, ``width``/``height`` mm of a box ...), for the screen, the serial line and the records.
    """

    frame_id: int
    task: str
    label: str | None
    confidence: float | None
    alert: bool = False
    probabilities: Mapping[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = None
    contours: tuple[np.ndarray, ...] = ()
    heatmap: np.ndarray | None = None
    boxes: tuple[Box, ...] = ()
    centroid: tuple[float, float] | None = None
    area_fraction: float | None = None
    state: str = ""
    gate: tuple[float, float] | None = None
    size: tuple[float, str] | None = None
    measurements: Mapping[str, tuple[float, str]] = field(default_factory=dict)
    paused: str | None = None  # why the AI paused on this frame (state "unlike_training_data")

    @property
    def is_finding(self) -> bool:
        """A finding, or a task's result the finding stage has not judged (its shapes are drawn as they are)."""
        return self.state in ("finding", "")

    def mask_at(self, width: int, height: int) -> np.ndarray | None:
        """The mask as uint8 0/1, ``height`` x ``width`` (nearest neighbour), or None without one."""
        if self.mask is None:
            return None
        m = np.asarray(self.mask)
        if m.ndim == 3:
            m = m[:, :, 0]
        m = (m > 0).view(np.uint8)
        if m.shape != (height, width):
            m = cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
        return m
