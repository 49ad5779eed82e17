"""The imaging region: which part of a source's picture is the image, and its physical scale.

A scanner's output carries its own user interface around the image (menus, scale bars, the patient's name
and the date). The model, the screen's finding size and the de-identified export must see only the image.
Where the region comes from, in order of precedence:

- ``board``: the board TOML's ``[source] crop`` (an installer's measurement always wins);
- ``dicom``: the file says it. Ultrasound: the Sequence of Ultrasound Regions (``dicom_region``), whose
  physical deltas also give the scale; CR/DX/MG: the whole image is the detector's field, with the scale
  from Pixel Spacing or Imager Pixel Spacing;
- ``detected``: found in the stream itself (a grabber's or a video file's picture: the scanner's chrome is
  static, the image is not; see ``firmware_app.sources.region_detect``);
- ``full_frame``: nothing is known; the whole picture is used and nothing is claimed about its content.

``Region.meta()`` is what a frame carries (``imaging_region`` [x, y, w, h] in source pixels,
``region_from``, ``mm_per_px`` [dx, dy] or None, ``depth_origin_y``: the row of the cropped image at which
depth from the transducer is zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Rect = tuple[int, int, int, int]  # x, y, width, height
ORIGINS = ("board", "dicom", "detected", "full_frame")

# Sequence of Ultrasound Regions (PS3.3 C.8.5.5.1)
_SPATIAL_2D = 1  # Region Spatial Format: 2D (tissue or flow)
_DATA_TISSUE, _DATA_FLOW = 1, 2  # Region Data Type
_UNIT_CM = 3  # Physical Units X/Y Direction: cm
MIN_REGION_SIDE = 16  # px: a region smaller than this cannot hold an image a model could read
MIN_KEPT_FRACTION = 0.5  # a region clipped to less than this share of itself is ignored


@dataclass(frozen=True)
class Region:
    rect: Rect
    origin: str  # one of ORIGINS
    mm_per_px: tuple[float, float] | None = None  # (dx, dy) of one source pixel
    depth_origin_y: float = 0.0  # row of the cropped image where depth is zero (the transducer face)
    notes: tuple[str, ...] = ()  # what was clipped or ignored, one line each (logged once per file)

    @classmethod
    def full(cls, width: int, height: int, mm_per_px: tuple[float, float] | None = None) -> Region:
        return cls((0, 0, int(width), int(height)), "full_frame", mm_per_px)

    @property
    def established(self) -> bool:
        """The imaging region is known (not just the whole picture by default)."""
        return self.origin != "full_frame"

    def meta(self) -> dict[str, Any]:
        return {
            "imaging_region": [int(v) for v in self.rect],
            "region_from": self.origin,
            "mm_per_px": [float(self.mm_per_px[0]), float(self.mm_per_px[1])] if self.mm_per_px else None,
            "depth_origin_y": float(self.depth_origin_y),
        }

    def describe(self) -> str:
        """One line for the screen and ``source-check``: where the region came from, and its scale."""
        x, y, w, h = self.rect
        where = {"board": "board crop", "dicom": "DICOM", "detected": "detected", "full_frame": "full frame"}
        text = f"{where[self.origin]} {w}x{h}+{x}+{y}"
        if self.mm_per_px:
            text += f", {self.mm_per_px[0]:.3g} mm/px"
        return text


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _clip(x0: int, y0: int, x1: int, y1: int, width: int, height: int) -> tuple[Rect | None, str | None]:
    """Half-open [x0, x1) x [y0, y1) clipped to the image; (None, why) when too little is left."""
    area = max(0, x1 - x0) * max(0, y1 - y0)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    w, h = cx1 - cx0, cy1 - cy0
    if w < MIN_REGION_SIDE or h < MIN_REGION_SIDE or area == 0 or w * h < MIN_KEPT_FRACTION * area:
        return None, f"region [{x0}, {y0}, {x1 - 1}, {y1 - 1}] does not fit the {width}x{height} image"
    note = None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        note = f"region [{x0}, {y0}, {x1 - 1}, {y1 - 1}] clipped to the {width}x{height} image"
    return (cx0, cy0, w, h), note


def ultrasound_region(ds: Any, width: int, height: int) -> Region | None:
    """The 2D image region of an ultrasound file's Sequence of Ultrasound Regions, or None without one.

    Among several regions (a dual view, an M-mode or Doppler strip, a colour-flow box inside the B-mode),
    the 2D regions are candidates, tissue before flow, the largest first: a colour-flow box lies inside its
    B-mode region, and a dual view's two halves are equal, so the first of those is taken. A region that
    does not fit the image is clipped, or ignored when less than half of it is inside; each is noted.
    """
    seq = ds.get("SequenceOfUltrasoundRegions") if ds is not None else None
    if not seq:
        return None
    notes: list[str] = []
    candidates = []
    for i, item in enumerate(seq):
        coords = [_num(item.get(k)) for k in ("RegionLocationMinX0", "RegionLocationMinY0")]
        coords += [_num(item.get(k)) for k in ("RegionLocationMaxX1", "RegionLocationMaxY1")]
        if any(c is None for c in coords):
            notes.append(f"ultrasound region {i + 1}: no location, ignored")
            continue
        x0, y0, x1, y1 = (int(c) for c in coords)  # type: ignore[arg-type]
        fmt = _num(item.get("RegionSpatialFormat"))
        kind = _num(item.get("RegionDataType"))
        if fmt != _SPATIAL_2D:
            continue  # M-mode, spectral, waveform, graphics: not an image for a 2D model
        rect, note = _clip(x0, y0, x1 + 1, y1 + 1, width, height)  # Max X1/Y1 are inclusive
        if note:
            notes.append(f"ultrasound region {i + 1}: {note}" + ("" if rect else ", ignored"))
        if rect is None:
            continue
        rank = 0 if kind == _DATA_TISSUE else (1 if kind == _DATA_FLOW else 2)
        candidates.append((rank, -rect[2] * rect[3], i, rect, item))
    if not candidates:
        if notes:
            return Region((0, 0, width, height), "full_frame", None, 0.0, (*notes, "no usable 2D region"))
        return None
    _, _, i, rect, item = min(candidates, key=lambda c: c[:3])
    mm = None
    ux, uy = _num(item.get("PhysicalUnitsXDirection")), _num(item.get("PhysicalUnitsYDirection"))
    dx, dy = _num(item.get("PhysicalDeltaX")), _num(item.get("PhysicalDeltaY"))
    if ux == _UNIT_CM and uy == _UNIT_CM and dx and dy and dx > 0 and dy > 0:
        mm = (abs(dx) * 10.0, abs(dy) * 10.0)
    elif dx or dy:
        notes.append(f"ultrasound region {i + 1}: physical units are not cm: no scale")
    depth_y = 0.0
    ref_y = _num(item.get("ReferencePixelY0"))
    ref_depth = _num(item.get("ReferencePixelPhysicalValueY")) or 0.0
    if ref_y is not None and mm is not None:
        # ReferencePixelY0 is relative to the region's top; the physical value there is its depth in cm
        y_in_crop = ref_y + (int(_num(item.get("RegionLocationMinY0")) or 0) - rect[1])
        depth_y = y_in_crop - ref_depth * 10.0 / mm[1]
    return Region(rect, "dicom", mm, float(depth_y), tuple(notes))


def pixel_spacing(ds: Any) -> tuple[tuple[float, float] | None, str | None]:
    """(dx, dy) in mm from Pixel Spacing (else Imager Pixel Spacing), or (None, why not) when unusable."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key) if ds is not None else None
        if value is None or value == "":
            continue
        items: Sequence[Any] = value if isinstance(value, (list, tuple)) or hasattr(value, "__len__") else []
        spacing = [_num(v) for v in items] if not isinstance(value, str) else []
        if len(spacing) != 2 or any(s is None or s <= 0 for s in spacing):
            return None, f"{key} {list(items) if not isinstance(value, str) else value!r} is not usable"
        row, col = spacing  # DICOM order: between rows (dy), between columns (dx)
        return (float(col), float(row)), None  # type: ignore[arg-type]
    return None, None


def dicom_region(ds: Any, width: int, height: int) -> Region:
    """The imaging region of one DICOM image (``width`` x ``height`` as decoded), with its scale.

    Ultrasound with a Sequence of Ultrasound Regions: that region. Projection radiography: the whole
    image, its scale from the pixel spacing (the field of a detector holds no scanner chrome, but may hold
    burned-in annotations: the region is "full_frame", so nothing is claimed about text in it). Anything
    else: the full frame, with a scale when the file states one.
    """
    us = ultrasound_region(ds, width, height)
    if us is not None:
        return us
    mm, _ = pixel_spacing(ds)  # an unusable spacing (0 \ 0 is common) only means: no scale
    return Region((0, 0, int(width), int(height)), "full_frame", mm)
