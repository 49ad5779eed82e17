"""The two objects that travel through the pipeline: a Frame and the Result computed from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from firmware_app.shapes import BoxShape, Heatmap, Mask, Point, Polygon, Shape


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


Box = BoxShape  # a detection in frame pixel coordinates (the name the rest of the code has used)

_UNSET: Any = object()


@dataclass(frozen=True, eq=False, init=False)
class Result:
    """What a model found in one frame: a few drawable shapes and named measurements with units.

    frame_id is the id of the frame it was computed from: the display draws it only on that frame.
    label/confidence: the top finding (calibrated probability), or None when nothing is found.
    alert: the finding crosses the alert threshold in force.
    probabilities: label -> probability (classification; segmentation: max probability per label).
    shapes: what to draw, in the frame's pixel coordinates (``firmware_app.shapes``: ``Mask``, ``Polygon``,
      ``BoxShape``, ``Point``, ``Heatmap``); the one source of every geometric accessor below. The screen,
      the burned-in overlay, the records, the serial line and the results stream read these, never the task.

    The finding stage (``tasks.finding``) decides what the result *is*:
    state: "finding" | "no_finding" | "unlike_training_data" (the input gate says the model does not apply)
      | "ai_off"; "" before the finding stage. ``alert`` is never True unless state is "finding", and the
      shapes are kept only for a finding.
    gate: (score, threshold) of the input gate, or None when the model has no gate.
    size: (value, unit) of the finding: unit "mm2" when the physical scale is known, else "fraction" of
      the imaging region; None without a finding.
    measurements: name -> (value, unit) of what can be measured (``area`` mm2, ``depth`` mm from the
      transducer, ``width``/``height`` mm of a box ...), for the screen, the serial line and the records.

    Accessors kept from when a result was one bag of fields, all derived from ``shapes``: ``mask`` (uint8
    0/1 at the model's resolution; ``mask_at(w, h)`` at the frame's), ``contours`` (the polygons), ``heatmap``,
    ``boxes``, ``points``, ``centroid`` (the mask's, else the top box's or point's centre) and
    ``area_fraction`` (the mask's). The constructor (and ``dataclasses.replace``) still takes ``mask=``,
    ``contours=``, ``heatmap=``, ``boxes=``, ``centroid=`` and ``area_fraction=``: each replaces the shapes
    of its kind (the last two are the mask's).
    """

    frame_id: int
    task: str
    label: str | None
    confidence: float | None
    alert: bool = False
    probabilities: Mapping[str, float] = field(default_factory=dict)
    shapes: tuple[Shape, ...] = ()
    state: str = ""
    gate: tuple[float, float] | None = None
    size: tuple[float, str] | None = None
    measurements: Mapping[str, tuple[float, str]] = field(default_factory=dict)
    paused: str | None = None  # why the AI paused on this frame (state "unlike_training_data")

    def __init__(
        self,
        frame_id: int,
        task: str,
        label: str | None,
        confidence: float | None,
        alert: bool = False,
        probabilities: Mapping[str, float] | None = None,
        shapes: tuple[Shape, ...] = (),
        state: str = "",
        gate: tuple[float, float] | None = None,
        size: tuple[float, str] | None = None,
        measurements: Mapping[str, tuple[float, str]] | None = None,
        paused: str | None = None,
        *,
        mask: Any = _UNSET,
        contours: Any = _UNSET,
        heatmap: Any = _UNSET,
        boxes: Any = _UNSET,
        centroid: Any = _UNSET,
        area_fraction: Any = _UNSET,
    ) -> None:
        if not (
            mask is _UNSET
            and contours is _UNSET
            and heatmap is _UNSET
            and boxes is _UNSET
            and centroid is _UNSET
            and area_fraction is _UNSET
        ):
            shapes = _legacy_shapes(tuple(shapes), mask, contours, heatmap, boxes, centroid, area_fraction)
        # frozen: the fields go in the instance's dict directly (what object.__setattr__ would do, per field)
        self.__dict__.update(
            frame_id=frame_id,
            task=task,
            label=label,
            confidence=confidence,
            alert=alert,
            probabilities={} if probabilities is None else probabilities,
            shapes=tuple(shapes),
            state=state,
            gate=gate,
            size=size,
            measurements={} if measurements is None else measurements,
            paused=paused,
        )

    def evolve(self, **changes: Any) -> Result:
        """A copy with ``changes`` to its fields: ``dataclasses.replace`` for the fields alone (not the
        legacy ``mask=`` ... keywords), without running the constructor again (the finding stage makes one
        or two of these per frame)."""
        if not changes.keys() <= _FIELDS:
            raise TypeError(f"Result has no field(s) {sorted(changes.keys() - _FIELDS)}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, **changes)
        if "shapes" in changes:
            new.__dict__["shapes"] = tuple(changes["shapes"])
        return new

    @property
    def is_finding(self) -> bool:
        """A finding, or a task's result the finding stage has not judged (its shapes are drawn as they are)."""
        return self.state in ("finding", "")

    def shapes_of(self, kind: type) -> tuple:
        """The shapes of one class (``Mask``, ``BoxShape`` ...), in order."""
        return tuple(s for s in self.shapes if isinstance(s, kind))

    def _first(self, kind: type) -> Any:
        for s in self.shapes:
            if isinstance(s, kind):
                return s
        return None

    @property
    def mask(self) -> np.ndarray | None:
        m = self._first(Mask)
        return None if m is None else m.data

    @property
    def contours(self) -> tuple[np.ndarray, ...]:
        return tuple(p.points for p in self.shapes_of(Polygon))

    @property
    def heatmap(self) -> np.ndarray | None:
        h = self._first(Heatmap)
        return None if h is None else h.data

    @property
    def boxes(self) -> tuple[BoxShape, ...]:
        return self.shapes_of(BoxShape)

    @property
    def points(self) -> tuple[Point, ...]:
        return self.shapes_of(Point)

    @property
    def centroid(self) -> tuple[float, float] | None:
        """Where the finding is (frame pixels): the mask's centroid, else the top box's or point's centre."""
        for s in self.shapes:
            if isinstance(s, Mask):
                return s.centroid
            if isinstance(s, BoxShape):
                return s.center
            if isinstance(s, Point):
                return (float(s.x), float(s.y))
        return None

    @property
    def area_fraction(self) -> float | None:
        m = self._first(Mask)
        return None if m is None else m.area_fraction

    def mask_at(self, width: int, height: int) -> np.ndarray | None:
        """The mask as uint8 0/1, ``height`` x ``width`` (nearest neighbour), or None without one."""
        m = self._first(Mask)
        return None if m is None else m.at(width, height)


def _legacy_shapes(
    shapes: tuple[Shape, ...], mask: Any, contours: Any, heatmap: Any, boxes: Any, centroid: Any, area: Any
) -> tuple[Shape, ...]:
    """``shapes`` with the kinds given the old way (``mask=`` ...) replaced by those."""
    if all(v is _UNSET for v in (mask, contours, heatmap, boxes, centroid, area)):
        return shapes
    old_mask = next((s for s in shapes if isinstance(s, Mask)), None)
    by_kind: dict[type, list[Any]] = {k: [s for s in shapes if isinstance(s, k)] for k in _ORDER}
    if heatmap is not _UNSET:
        by_kind[Heatmap] = [] if heatmap is None else [Heatmap(heatmap)]
    if mask is not _UNSET or centroid is not _UNSET or area is not _UNSET:
        data = (None if old_mask is None else old_mask.data) if mask is _UNSET else mask
        if data is None:
            if centroid not in (_UNSET, None) or area not in (_UNSET, None):
                raise TypeError("Result: centroid= and area_fraction= are a mask's; give mask= too")
            by_kind[Mask] = []
        else:
            keep = old_mask if old_mask is not None and mask is _UNSET else None
            c = (None if keep is None else keep.centroid) if centroid is _UNSET else centroid
            a = (None if keep is None else keep.area_fraction) if area is _UNSET else area
            by_kind[Mask] = [Mask(data, None if c is None else (float(c[0]), float(c[1])), a)]
    if contours is not _UNSET:
        by_kind[Polygon] = [Polygon(c) for c in contours or ()]
    if boxes is not _UNSET:
        by_kind[BoxShape] = list(boxes or ())
    return tuple(s for k in _ORDER for s in by_kind[k])


_ORDER = (Heatmap, Mask, Polygon, BoxShape, Point)  # the order the old fields were drawn in
_FIELDS = frozenset(f for f in Result.__dataclass_fields__)
