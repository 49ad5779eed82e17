"""The drawable shapes a result carries: what the screen, the burned-in overlay, the records and the serial
line read, whatever task made them (the renderer knows shapes, not tasks; ../shared/DESIGN.md).

All geometry is in the pixel coordinates of the frame the result was computed from. Rasters (``Mask``,
``Heatmap``) stay at the model's resolution and cover the whole frame: each of their pixels covers its
share of it, so a consumer stretches them to the size it draws at (nearest neighbour for a mask, linear for
a heatmap); nothing per frame pays for a full-size copy.

A task returns a few of these in ``Result.shapes`` and its measured quantities, with units, in
``Result.measurements``; a new kind of shape is a new class here and a case in ``display.overlay``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, eq=False)
class Mask:
    """A binary region: uint8 0/1 (h x w, any resolution) stretched over the frame (nearest neighbour).

    centroid: (x, y) of the region in frame pixels and area_fraction, its area over the frame's: what its
    maker measured (None when it did not).
    """

    data: np.ndarray
    centroid: tuple[float, float] | None = None
    area_fraction: float | None = None

    kind = "mask"

    def at(self, width: int, height: int) -> np.ndarray:
        """The mask as uint8 0/1, ``height`` x ``width`` (nearest neighbour)."""
        m = np.asarray(self.data)
        if m.ndim == 3:
            m = m[:, :, 0]
        m = (m > 0).view(np.uint8)
        if m.shape != (height, width):
            m = cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
        return m


@dataclass(frozen=True, eq=False)
class Polygon:
    """A closed outline: int32 (or float) N x 2 (x, y) points in frame pixels."""

    points: np.ndarray
    kind = "polygon"


@dataclass(frozen=True, eq=False)
class BoxShape:
    """A labelled, scored rectangle in frame pixels (x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: str

    kind = "box"

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)


@dataclass(frozen=True, eq=False)
class Point:
    """A labelled point (a landmark, a keypoint) in frame pixels; score in [0, 1] or None."""

    x: float
    y: float
    label: str = ""
    score: float | None = None

    kind = "point"


@dataclass(frozen=True, eq=False)
class Heatmap:
    """Where the model looks: float32 h x w in [0, 1] (any resolution) stretched over the frame (linear)."""

    data: np.ndarray
    kind = "heatmap"


Shape = Mask | Polygon | BoxShape | Point | Heatmap
