"""The one overlay painter: a result's shapes drawn onto a view of its frame.

It knows shapes (``firmware_app.shapes``), never tasks: the screen paints into the letterboxed image on
its canvas, the burned-in export (``records.overlay``) into the frame itself, with the same colours, tint
and outlines. Layers, bottom to top: heatmaps, mask tints, outlines (the polygons; a mask without any
traces its own), boxes with their label and score, points with their label.

``view`` is BGR uint8 and shows the whole frame (``frame_size`` = (width, height)) stretched to its own
size; it is drawn in place. A painter keeps its scratch buffers between calls: one per display.

Heatmaps are smooth (a model's few-dozen-cell map, stretched linearly), so they are the one layer that
may be blended at another resolution than the view's: the screen blends them into the frame at the
smaller of the frame's and the view's size (``paint_heatmaps``), stretches that once, and paints the other
layers at the view's size (``paint(..., heatmaps=False)``): masks, outlines, boxes and text stay crisp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from firmware_app.display.font import Font, draw_text
from firmware_app.shapes import BoxShape, Heatmap, Mask, Point, Polygon


def _bgr(hex_rgb: str) -> tuple[int, int, int]:
    v = int(hex_rgb.lstrip("#"), 16)
    return (v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF)


ACCENT = _bgr("#2bd2e6")  # one accent for everything the AI draws
ACCENT_TEXT = _bgr("#061418")
SEG_ALPHA = 0.33
HEATMAP_ALPHA = 0.55
TAG_FONT = "sans-bold"
_JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), cv2.COLORMAP_JET)[:, 0, :]


def heatmap_cells(shapes: Iterable[object]) -> tuple[int, int] | None:
    """The most rows and columns of the heatmaps among ``shapes``; None when there is none."""
    sizes = [np.shape(s.data)[:2] for s in shapes if isinstance(s, Heatmap)]
    if not sizes:
        return None
    return max(r for r, _ in sizes), max(c for _, c in sizes)


@dataclass(frozen=True)
class Style:
    """Line thickness, tag text size and padding (px), derived from the short side of what is looked at."""

    line: int
    tag_size: int
    gap: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Style:
        u = min(width, height) / 480.0
        return cls(
            line=max(1, int(round(1.6 * u))),
            tag_size=max(9, int(round(13 * u))),
            gap=max(1, int(round(6 * u))),
        )


class OverlayPainter:
    def __init__(self) -> None:
        self._font = Font.load(TAG_FONT)
        self._accent: np.ndarray | None = None
        self._heat: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def paint(
        self,
        view: np.ndarray,
        shapes: Iterable[object],
        frame_size: tuple[int, int],
        style: Style,
        heatmaps: bool = True,
    ) -> None:
        """Draw ``shapes`` (frame coordinates) onto ``view``, which shows the ``frame_size`` frame;
        ``heatmaps=False``: all but the heatmaps, which the caller blended (``paint_heatmaps``)."""
        shapes = tuple(shapes)
        fw, fh = frame_size
        scale = (view.shape[1] / fw, view.shape[0] / fh)
        polygons = [s.points for s in shapes if isinstance(s, Polygon)]
        if heatmaps:
            self.paint_heatmaps(view, shapes)
        for s in shapes:
            if isinstance(s, Mask):
                self._mask(view, s.data, style, outline=not polygons)
        if polygons:
            self._polygons(view, polygons, scale, style)
        for s in shapes:
            if isinstance(s, BoxShape):
                self._box(view, s, scale, style)
        for s in shapes:
            if isinstance(s, Point):
                self._point(view, s, scale, style)

    # ----- rasters ---------------------------------------------------------------------------------------

    def _mask(self, view: np.ndarray, mask: np.ndarray, style: Style, outline: bool) -> None:
        """Tint exactly the mask's pixels, stretched over the view (nearest), inside its bounding box only."""
        m = mask.view(np.uint8) if mask.dtype == bool else mask
        if m.dtype != np.uint8:
            m = (m > 0).astype(np.uint8)
        if m.ndim == 3:
            m = m[:, :, 0]
        bx, by, bw, bh = cv2.boundingRect(m)
        if bw == 0 or bh == 0:
            return
        mh, mw = m.shape
        sx, sy = view.shape[1] / mw, view.shape[0] / mh
        vx0, vy0 = max(0, int(math.floor(bx * sx))), max(0, int(math.floor(by * sy)))
        vx1 = min(view.shape[1], int(math.ceil((bx + bw) * sx)))
        vy1 = min(view.shape[0], int(math.ceil((by + bh) * sy)))
        if vx1 <= vx0 or vy1 <= vy0:
            return
        # Inverse map (view pixel -> mask pixel), nearest: the tint covers exactly the mask's pixels.
        M = np.array([[1 / sx, 0, (vx0 + 0.5) / sx - 0.5], [0, 1 / sy, (vy0 + 0.5) / sy - 0.5]], np.float64)
        sub = cv2.warpAffine(
            m, M, (vx1 - vx0, vy1 - vy0), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0
        )
        roi = view[vy0:vy1, vx0:vx1]
        tint = cv2.addWeighted(roi, 1 - SEG_ALPHA, self._accent_plane(vy1 - vy0, vx1 - vx0), SEG_ALPHA, 0)
        cv2.copyTo(tint, sub, roi)
        if outline:
            found, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(view, found, -1, ACCENT, style.line, cv2.LINE_AA, offset=(vx0, vy0))

    def _accent_plane(self, h: int, w: int) -> np.ndarray:
        a = self._accent
        if a is None or a.shape[0] < h or a.shape[1] < w:
            a = self._accent = np.empty((h, w, 3), np.uint8)
            a[:] = ACCENT
        return a[:h, :w]

    def paint_heatmaps(
        self, image: np.ndarray, shapes: Iterable[object], gray: np.ndarray | None = None
    ) -> bool:
        """Blend the heatmaps among ``shapes`` onto ``image`` (BGR uint8, the whole frame at any size), the
        bottom layer. ``gray``: the picture as a gray image of ``image``'s size, to blend from instead of
        ``image`` (which is then written whole: one plane multiplied instead of three, no conversion
        before). Returns whether anything was blended (with ``gray``: whether ``image`` was written)."""
        drawn = False
        for s in shapes:
            if isinstance(s, Heatmap):
                drawn = self._heatmap(image, s.data, None if drawn else gray) or drawn
        return drawn

    def _heatmap(self, view: np.ndarray, heatmap: np.ndarray, gray: np.ndarray | None = None) -> bool:
        h = np.asarray(heatmap, np.float32)
        if h.ndim == 3:
            h = h[:, :, 0]
        if h.size == 0:
            return False
        h = np.clip(h, 0.0, 1.0)
        color = _JET[(h * 255.0 + 0.5).astype(np.uint8)]  # cv2.applyColorMap builds its table every call
        # Premultiply at the heatmap's (small) resolution, stretch, then two saturating uint8 passes:
        # view = view * (1 - a) + colour * a, with a = HEATMAP_ALPHA * heat.
        a = h * HEATMAP_ALPHA
        col_a = (color * a[:, :, None] + 0.5).astype(np.uint8)
        keep = ((1.0 - a) * 255.0 + 0.5).astype(np.uint8)
        vh, vw = view.shape[:2]
        if self._heat is None or self._heat[1].shape != (vh, vw):
            self._heat = (np.empty((vh, vw, 3), np.uint8), np.empty((vh, vw), np.uint8), None)
        col_buf, keep1, keep_buf = self._heat
        cv2.resize(col_a, (vw, vh), dst=col_buf, interpolation=cv2.INTER_LINEAR)
        # one channel stretched: a third of the interpolation work
        cv2.resize(keep, (vw, vh), dst=keep1, interpolation=cv2.INTER_LINEAR)
        if gray is not None:  # a gray picture: multiplied as one plane, then copied to three (same values)
            cv2.multiply(gray, keep1, dst=keep1, scale=1.0 / 255.0)
            cv2.cvtColor(keep1, cv2.COLOR_GRAY2BGR, dst=view)
        else:
            if keep_buf is None:
                keep_buf = np.empty((vh, vw, 3), np.uint8)
                self._heat = (col_buf, keep1, keep_buf)
            cv2.cvtColor(keep1, cv2.COLOR_GRAY2BGR, dst=keep_buf)
            cv2.multiply(view, keep_buf, dst=view, scale=1.0 / 255.0)
        cv2.add(view, col_buf, dst=view)
        return True

    # ----- vectors ---------------------------------------------------------------------------------------

    def _polygons(self, view: np.ndarray, polygons, scale: tuple[float, float], style: Style) -> None:
        """Closed outlines in frame pixel coordinates, drawn with subpixel precision."""
        sx, sy = scale
        shift = 4
        polys = []
        for c in polygons:
            pts = np.asarray(c, np.float64).reshape(-1, 2)
            if len(pts) < 2:
                continue
            v = np.empty_like(pts)
            v[:, 0] = ((pts[:, 0] + 0.5) * sx - 0.5) * (1 << shift)
            v[:, 1] = ((pts[:, 1] + 0.5) * sy - 0.5) * (1 << shift)
            polys.append(np.round(v).astype(np.int32).reshape(-1, 1, 2))
        if polys:
            cv2.polylines(view, polys, True, ACCENT, style.line, cv2.LINE_AA, shift)

    def _box(self, view: np.ndarray, b: BoxShape, scale: tuple[float, float], style: Style) -> None:
        sx, sy = scale
        vh, vw = view.shape[:2]
        x0, y0 = int(round(b.x0 * sx)), int(round(b.y0 * sy))
        x1, y1 = int(round(b.x1 * sx)) - 1, int(round(b.y1 * sy)) - 1
        if x1 < 0 or y1 < 0 or x0 >= vw or y0 >= vh:
            return
        cv2.rectangle(view, (x0, y0), (x1, y1), ACCENT, style.line, cv2.LINE_AA)
        self._tag(view, f"{b.label} {b.score * 100:.0f}%", x0, y0, style, above=True)

    def _point(self, view: np.ndarray, p: Point, scale: tuple[float, float], style: Style) -> None:
        sx, sy = scale
        x, y = int(round((p.x + 0.5) * sx - 0.5)), int(round((p.y + 0.5) * sy - 0.5))
        arm = max(4, 4 * style.line)
        cv2.drawMarker(view, (x, y), ACCENT, cv2.MARKER_CROSS, 2 * arm + 1, style.line, cv2.LINE_AA)
        text = p.label if p.score is None else f"{p.label} {p.score * 100:.0f}%".strip()
        if text:
            self._tag(view, text, x + arm + style.gap, y - arm, style, above=False)

    def _tag(self, view: np.ndarray, text: str, x: int, y: int, style: Style, above: bool) -> None:
        """A label on an accent background at (x, y): above that point when there is room, else below."""
        vh, vw = view.shape[:2]
        size = style.tag_size
        text = self._font.fit(text, size, max(vw // 2, 40))
        tw, th = self._font.measure(text, size)
        tw += 2 * style.gap
        if above:  # above the box, or inside it at the top edge
            ty = y - th if y - th >= 0 else y
        else:
            ty = min(max(y, 0), max(vh - th, 0))
        tx = min(max(x, 0), max(vw - tw, 0))
        cv2.rectangle(view, (tx, ty), (tx + tw - 1, ty + th - 1), ACCENT, -1)
        draw_text(view, text, tx + style.gap, ty, size, ACCENT_TEXT, self._font)
