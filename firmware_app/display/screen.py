"""The screen compositor: one frame, its result and the device state -> one BGR image for a display.

Layout (landscape; a portrait screen puts the panel below the image, in two columns)::

    +------------------------------------------+----------------+
    | NOT FOR DIAGNOSTIC USE        (amber row) | FINDING  ALERT |
    | [AI PENDING] [CPU FALLBACK] ...(chip row) | Fluid          |
    +------------------------------------------+ 87% confidence |
    |                                          | area, centroid |
    |        frame, letterboxed on black,      | threshold      |
    |        with the AI overlay (accent)      |                |
    |                                          | model, fps, ms |
    |                                          | messages       |
    +------------------------------------------+----------------+

Rules it keeps (docs/DESIGN.md, "Safety rules"):

- an overlay is drawn only on the frame it was computed from (``result.frame_id == frame.id``); any other
  result is counted in ``mismatched_overlays`` and at most shown greyed in the panel as STALE;
- the NOT FOR DIAGNOSTIC USE row is reserved: nothing else is ever drawn over it;
- silent trial and AI off show no overlay and no finding.

Speed: the layout, fonts and colour planes are computed once (and again only when the frame size changes);
the canvas is reused, the frame is resized straight into its place (with a heatmap blended in first at the
frame's size, when that is the smaller: one stretch of the composed picture), the banner rows and each panel
section are redrawn only when their content changes, and a segmentation tint is blended only inside the
mask's bounding box. ``render`` returns the same buffer every call: a caller that keeps it must copy it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from firmware_app.display.font import Font, draw_text
from firmware_app.display.overlay import ACCENT, OverlayPainter, Style, heatmap_cells
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

Color = tuple[int, int, int]


def _bgr(hex_rgb: str) -> Color:
    v = int(hex_rgb.lstrip("#"), 16)
    return (v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF)


# Calm dark theme; one accent for everything the AI draws, amber for regulatory/warning, red for ALERT.
IMAGE_BG = _bgr("#000000")
PANEL_BG = _bgr("#15191e")
DIVIDER = _bgr("#2a3139")
TEXT = _bgr("#eef1f4")
TEXT_2 = _bgr("#9aa5b1")
TEXT_DIM = _bgr("#5d6670")
AMBER = _bgr("#ffb300")
AMBER_TEXT = _bgr("#1a1200")
ALERT = _bgr("#e5383b")
CHIP_BG = _bgr("#262d35")
CHIP_INFO = _bgr("#8fa3b8")

BOLD = "sans-bold"
REGULAR = "sans"
# The finding's measurements (area, centroid, box count) are a numeric readout, refreshed at most this often
# while the finding itself (label, alert) stays the same: at 30 frames a second they would flicker past
# unread, and redrawing them is most of a frame's screen time. A change of finding shows at once.
DETAIL_REFRESH_S = 0.5
# A heatmap is blended into the frame before the frame is stretched (one resize of the composed picture
# instead of the frame's and two heatmap planes' at the screen's size) when the frame is the smaller and
# has at least this many pixels a heatmap cell (a model's 15 x 20 map on a 640 x 480 frame: 32).
HEAT_CELL_PX = 28


@dataclass
class ScreenState:
    """Everything the screen shows for one refresh."""

    frame: Frame | None  # newest frame to show (None before the first frame / no signal)
    result: Result | None  # result computed FROM `frame` (result.frame_id == frame.id) or None
    stale_result: Result | None = None  # last result of an OLDER frame: panel greyed "STALE", overlay never
    no_signal: bool = False  # capture device absent -> big "NO SIGNAL" (on black or on the dimmed last frame)
    ai_pending: bool = False  # a live frame shown before its result -> "AI PENDING"
    ai_off: bool = False  # the clinician switched AI off -> "AI OFF"
    not_for_diagnostic: bool = True  # manifest cleared_for_clinical_use = false -> banner, always
    fallback_notice: str | None = None  # e.g. "CPU FALLBACK: Edge TPU not found" -> banner "CPU FALLBACK"
    model_id: str = ""
    model_version: str = ""
    backend: str = ""
    task: str = ""
    fps: float | None = None
    latency_ms: float | None = None
    threshold: float | None = None  # alert threshold in force
    messages: tuple[str, ...] = ()  # recent one-line notices, newest first; 1-3 shown
    silent_trial: bool = False  # only the image and "SILENT TRIAL": no overlay, no finding
    input_warning: str | None = None  # e.g. "INPUT UNLIKE TRAINING DATA"
    frozen: bool = False  # the clinician froze the image for review -> "FROZEN"
    gate_installed: bool = True  # False: the model has no input gate -> "NO INPUT GATE"


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    def view(self, canvas: np.ndarray) -> np.ndarray:
        return canvas[self.y : self.y1, self.x : self.x1]


@dataclass(frozen=True)
class _Sizes:
    """Type sizes (em, px) and spacing, all derived from the screen's short side."""

    unit: float
    pad: int
    gap: int
    caption: int
    body: int
    small: int
    label: int
    value: int
    banner: int
    huge: int
    line: int  # overlay line thickness

    @classmethod
    def for_screen(cls, width: int, height: int) -> _Sizes:
        u = min(width, height) / 480.0
        r = lambda v: max(1, int(round(v * u)))  # noqa: E731
        return cls(
            unit=u,
            pad=r(14),
            gap=r(6),
            caption=max(9, r(12)),
            body=max(10, r(15)),
            small=max(9, r(13)),
            label=max(14, r(28)),
            value=max(12, r(22)),
            banner=max(10, r(15)),
            huge=max(20, r(46)),
            line=max(1, int(round(1.6 * u))),
        )


@dataclass(frozen=True)
class _Finding:
    """What the finding section shows; also its cache key."""

    mode: str  # "result" | "stale" | "paused" | "pending" | "none" | "off" | "silent"
    label: str | None = None
    confidence: str | None = None  # as shown: "87%"
    alert: bool = False
    lines: tuple[str, ...] = ()


class Screen:
    """Composes ``ScreenState`` into a ``height`` x ``width`` BGR uint8 image."""

    def __init__(self, width: int, height: int) -> None:
        if width < 160 or height < 120:
            raise ValueError(f"screen {width}x{height}: too small (at least 160x120)")
        self.width, self.height = int(width), int(height)
        self.mismatched_overlays = 0
        self.sz = _Sizes.for_screen(self.width, self.height)
        self._bold = Font.load(BOLD)
        self._regular = Font.load(REGULAR)
        self.canvas = np.zeros((self.height, self.width, 3), np.uint8)
        self._layout()
        self._painter = OverlayPainter()  # the AI's shapes, drawn as the burned-in export draws them
        self._style = Style(self.sz.line, self.sz.small, self.sz.gap)
        self._draw_static()
        self._keys: dict[str, object] = {}
        self._detail: tuple[float, object, tuple[str, ...]] | None = None  # (when, finding, lines shown)
        self._geom: tuple[int, int] | None = None
        self.image_rect: Rect | None = None  # where the frame is, on the canvas
        self._area_clean = False  # image area is plain black outside image_rect
        self._gray_buf: np.ndarray | None = None
        self._small_buf: np.ndarray | None = None  # the frame in colour at its size, a heatmap blended in

    # ----- layout -----------------------------------------------------------------------------------

    def _layout(self) -> None:
        W, H, s = self.width, self.height, self.sz
        row_h = int(round(s.banner * 1.75))
        if W >= H:
            pw = int(round(W * 0.3))
            area = Rect(0, 0, W - pw, H)
            self.panel_rect = Rect(W - pw, 0, pw, H)
            columns = [Rect(self.panel_rect.x + s.pad, s.pad, pw - 2 * s.pad, H - 2 * s.pad)]
        else:
            ph = int(round(s.unit * 240))
            area = Rect(0, 0, W, H - ph)
            self.panel_rect = Rect(0, H - ph, W, ph)
            cw = (W - 3 * s.pad) // 2
            top = self.panel_rect.y + s.pad
            columns = [Rect(s.pad, top, cw, ph - 2 * s.pad), Rect(2 * s.pad + cw, top, cw, ph - 2 * s.pad)]
        self.image_area = area
        # Two reserved rows on top of the image area: the regulatory banner, then the status chips.
        self.banner_rect = Rect(area.x, area.y, area.w, row_h)
        self.chips_rect = Rect(area.x, area.y + row_h, area.w, row_h + s.gap)
        band = self.banner_rect.h + self.chips_rect.h
        self.image_region = Rect(area.x, area.y + band, area.w, area.h - band)

        # Panel sections: finding + threshold stacked from the top, model/performance/messages from the bottom.
        top_col, bottom_col = columns[0], columns[-1]
        cap_h = self._bold.get(s.caption).line_height
        body_h = self._bold.get(s.body).line_height
        small_h = self._regular.get(s.small).line_height
        x, w = top_col.x, top_col.w
        y = top_col.y
        finding_h = (
            cap_h
            + s.gap
            + self._bold.get(s.label).line_height
            + self._bold.get(s.value).line_height
            + 2 * self._regular.get(s.body).line_height
            + 2 * s.gap
            + int(round(s.body * 2.0))
        )
        self.finding_rect = Rect(x, y, w, finding_h)
        y += finding_h + s.gap
        self._divider_rows: list[tuple[int, Rect]] = [(y, top_col)]
        y += s.gap + 1
        self.threshold_rect = Rect(x, y, w, body_h)
        y += body_h
        top_end = y

        # From the bottom: messages, performance, model. On a short screen, fewer message lines.
        x, w = bottom_col.x, bottom_col.w
        floor = top_end + s.gap if len(columns) == 1 else bottom_col.y
        for lines in (3, 2, 1, 0):
            y = bottom_col.y1
            messages_h = cap_h + s.gap // 2 + lines * small_h if lines else 0
            self.messages_rect = Rect(x, y - messages_h, w, messages_h)
            self.message_lines = lines
            dividers = []
            if lines:
                y -= messages_h + s.gap
                dividers.append((y, bottom_col))
                y -= s.gap + 1
            perf_h = cap_h + body_h
            self.perf_rect = Rect(x, y - perf_h, w, perf_h)
            y -= perf_h + 2 * s.gap
            model_h = cap_h + 4 * body_h
            self.model_rect = Rect(x, y - model_h, w, model_h)
            y -= model_h + s.gap
            dividers.append((y, bottom_col))
            if y >= floor:
                break
        self._divider_rows += dividers
        if y < floor:
            log.warning("screen %dx%d: the panel is too short, sections overlap", self.width, self.height)

    def _draw_static(self) -> None:
        c = self.canvas
        c[:] = IMAGE_BG
        self.panel_rect.view(c)[:] = PANEL_BG
        if self.panel_rect.x > 0:  # a hairline between image and panel
            c[:, self.panel_rect.x] = DIVIDER
        else:
            c[self.panel_rect.y, :] = DIVIDER
        for y, col in self._divider_rows:
            c[y, col.x : col.x1] = DIVIDER

    # ----- text helpers -----------------------------------------------------------------------------

    def _text(
        self,
        canvas: np.ndarray,
        text: str,
        x: int,
        y: int,
        size: int,
        color: Color,
        font: Font | None = None,
        anchor: str = "lt",
        max_width: int | None = None,
    ) -> tuple[int, int, int, int]:
        return draw_text(canvas, text, x, y, size, color, font or self._bold, anchor, max_width)

    def _fit_size(self, text: str, size: int, max_width: int, font: Font, min_size: int) -> int:
        """The largest size <= ``size`` (down to ``min_size``) at which ``text`` fits in ``max_width``."""
        width = font.measure(text, size)[0]
        if width <= max_width:
            return size
        return max(min_size, int(size * max_width / max(width, 1)))

    def _section(self, name: str, key: object, rect: Rect, draw: Callable[[np.ndarray], None]) -> None:
        """Redraw a panel section only when what it shows changed."""
        if self._keys.get(name) == key:
            return
        self._keys[name] = key
        view = rect.view(self.canvas)
        view[:] = PANEL_BG
        draw(view)

    # ----- render -----------------------------------------------------------------------------------

    def render(self, state: ScreenState) -> np.ndarray:
        frame, result = state.frame, state.result
        matched = None
        older = state.stale_result
        if result is not None:
            if frame is not None and result.frame_id == frame.id:
                matched = result
            else:
                if frame is not None:
                    self.mismatched_overlays += 1
                    log.debug("result of frame %d given with frame %d: not drawn", result.frame_id, frame.id)
                older = result if older is None or result.frame_id > older.frame_id else older

        if state.no_signal and matched is not None:  # the dimmed frame is not live: its finding is old
            older, matched = matched, None

        ai_shown = not (state.ai_off or state.silent_trial)
        finding_shown = matched is not None and matched.is_finding
        overlay = matched if finding_shown and ai_shown and frame is not None else None
        # the heatmaps go in with the frame (blended before it is stretched, when it is the smaller)
        self._draw_image(frame, dim=state.no_signal, shapes=overlay.shapes if overlay is not None else ())
        if overlay is not None and self.image_rect is not None:
            self._draw_overlay(overlay, frame)
        if state.no_signal or frame is None:
            self._draw_center_notice(state.no_signal)

        finding = self._finding(state, matched, older)
        self._draw_banners(
            state, stale=finding.mode == "stale", paused=finding.lines if finding.mode == "paused" else None
        )
        self._section("finding", finding, self.finding_rect, lambda v: self._draw_finding(v, finding))
        thr = state.threshold
        self._section("threshold", thr, self.threshold_rect, lambda v: self._draw_threshold(v, thr))
        region = _region_line(frame)
        model = (
            state.model_id,
            state.model_version,
            state.task,
            state.backend,
            state.fallback_notice,
            region,
        )
        self._section("model", model, self.model_rect, lambda v: self._draw_model(v, *model))
        perf = ("—", "—") if state.no_signal else (_fmt(state.fps, 1), _fmt(state.latency_ms, 0))
        self._section("perf", perf, self.perf_rect, lambda v: self._draw_perf(v, *perf))
        msgs = tuple(state.messages[: self.message_lines])
        self._section("messages", msgs, self.messages_rect, lambda v: self._draw_messages(v, msgs))
        return self.canvas

    # ----- image --------------------------------------------------------------------------------------

    def _set_geometry(self, fw: int, fh: int) -> None:
        reg = self.image_region
        scale = min(reg.w / fw, reg.h / fh)
        dw, dh = max(1, int(round(fw * scale))), max(1, int(round(fh * scale)))
        self.image_rect = Rect(reg.x + (reg.w - dw) // 2, reg.y + (reg.h - dh) // 2, dw, dh)
        self._geom = (fw, fh)
        self._gray_buf = np.empty((dh, dw), np.uint8)
        self._area_clean = False
        # Strong downscales: halve with INTER_AREA (OpenCV's fast 2x2 path; no aliasing of speckle) until the
        # rest is a linear resize by at least 0.5.
        self._halvings = 0
        while scale * (1 << self._halvings) < 0.5 and min(fw, fh) >> (self._halvings + 1) >= 1:
            self._halvings += 1

    def _clear_region(self) -> None:
        self.image_region.view(self.canvas)[:] = IMAGE_BG

    def _draw_image(self, frame: Frame | None, dim: bool, shapes: tuple = ()) -> None:
        """The frame, letterboxed into its place, with the heatmaps among ``shapes`` blended in: at the
        frame's size when that is the smaller (then stretched once, the composed picture instead of the
        frame and two heatmap planes), else at the view's. A heatmap is smooth, so either looks the same;
        masks, outlines and boxes are drawn afterwards at the view's size (``_draw_overlay``)."""
        if frame is None:
            if self.image_rect is not None or not self._area_clean:
                self._clear_region()
                self.image_rect, self._geom = None, None
            self._area_clean = False  # the centre notice goes on it
            return
        px = _as_uint8_image(frame.pixels)
        fh, fw = px.shape[:2]
        if self._geom != (fw, fh):
            self._set_geometry(fw, fh)
        if not self._area_clean:
            self._clear_region()
            self._area_clean = True
        r = self.image_rect
        view = r.view(self.canvas)
        for _ in range(self._halvings):
            h2, w2 = px.shape[0] // 2, px.shape[1] // 2
            px = cv2.resize(px[: 2 * h2, : 2 * w2], (w2, h2), interpolation=cv2.INTER_AREA)
        same = px.shape[1] == r.w and px.shape[0] == r.h
        cells = heatmap_cells(shapes)
        heat = cells is not None
        # blend at the frame's size and stretch once, when the frame is the smaller and has HEAT_CELL_PX
        # pixels a heatmap cell: blended there and then stretched, a heatmap differs from one stretched with
        # the frame by a rounding step or two (its bends at the cells' centres are sampled at the frame's
        # pixels: the coarser they are, the more they soften)
        fh, fw = px.shape[:2]
        if heat and fh * fw < r.w * r.h and fh >= HEAT_CELL_PX * cells[0] and fw >= HEAT_CELL_PX * cells[1]:
            small = self._small_buf
            if small is None or small.shape[:2] != (fh, fw):
                small = self._small_buf = np.empty((fh, fw, 3), np.uint8)
            if px.ndim == 2:
                if not self._painter.paint_heatmaps(small, shapes, gray=px):
                    cv2.cvtColor(px, cv2.COLOR_GRAY2BGR, dst=small)
            else:
                np.copyto(small, px)
                self._painter.paint_heatmaps(small, shapes)
            cv2.resize(small, (r.w, r.h), dst=view, interpolation=cv2.INTER_LINEAR)
        elif px.ndim == 2:
            gray = px
            if not same:
                cv2.resize(px, (r.w, r.h), dst=self._gray_buf, interpolation=cv2.INTER_LINEAR)
                gray = self._gray_buf
            if not (heat and self._painter.paint_heatmaps(view, shapes, gray=gray)):
                cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR, dst=view)
        else:
            if same:
                np.copyto(view, px)
            else:
                cv2.resize(px, (r.w, r.h), dst=view, interpolation=cv2.INTER_LINEAR)
            if heat:
                self._painter.paint_heatmaps(view, shapes)
        if dim:
            cv2.convertScaleAbs(view, dst=view, alpha=0.35)

    def _draw_center_notice(self, no_signal: bool) -> None:
        reg = self.image_region
        view = reg.view(self.canvas)
        cx, cy = reg.w // 2, reg.h // 2
        s = self.sz
        self._area_clean = False  # margins now hold text: clear them before the next frame
        if no_signal:
            size = self._fit_size("NO SIGNAL", s.huge, reg.w - 2 * s.pad, self._bold, s.body)
            self._text(view, "NO SIGNAL", cx, cy, size, TEXT, anchor="mm")
            self._text(
                view,
                "Check the probe / capture connection",
                cx,
                cy + int(size * 0.55) + s.gap,
                s.body,
                TEXT_2,
                self._regular,
                anchor="mt",
                max_width=reg.w - 2 * s.pad,
            )
        else:
            self._text(view, "Waiting for images…", cx, cy, s.body, TEXT_2, self._regular, anchor="mm")

    # ----- overlays -------------------------------------------------------------------------------------

    def _draw_overlay(self, result: Result, frame: Frame) -> None:
        view = self.image_rect.view(self.canvas)
        # the heatmaps are in already (_draw_image)
        self._painter.paint(view, result.shapes, (frame.width, frame.height), self._style, heatmaps=False)

    # ----- banners ----------------------------------------------------------------------------------------

    def _draw_banners(self, state: ScreenState, stale: bool, paused: tuple[str, ...] | None = None) -> None:
        chips: list[tuple[str, Color]] = []
        if paused is not None and not (state.ai_off or state.silent_trial):
            chips.append((f"AI PAUSED — {_pause_text(paused[0])}".upper(), AMBER))
        if state.frozen:
            chips.append(("FROZEN", CHIP_INFO))
        if state.ai_off:
            chips.append(("AI OFF", CHIP_INFO))
        if state.silent_trial:
            chips.append(("SILENT TRIAL", CHIP_INFO))
        if state.fallback_notice:
            head = state.fallback_notice.split(":", 1)[0].strip().upper()
            chips.append(
                (head if ":" in state.fallback_notice and len(head) <= 24 else "CPU FALLBACK", AMBER)
            )
        if state.input_warning:
            chips.append((state.input_warning.strip().upper(), AMBER))
        if not state.gate_installed:
            chips.append(("NO INPUT GATE", AMBER))
        if stale and not (state.ai_off or state.silent_trial):
            chips.append(("STALE", CHIP_INFO))
        if state.ai_pending and state.frame is not None and not (state.ai_off or state.silent_trial):
            chips.append(("AI PENDING", CHIP_INFO))
        key = (state.not_for_diagnostic, tuple(chips))
        if self._keys.get("banners") == key:
            return
        self._keys["banners"] = key
        s = self.sz
        row = self.banner_rect.view(self.canvas)
        if state.not_for_diagnostic:
            row[:] = AMBER
            text = "NOT FOR DIAGNOSTIC USE"
            size = self._fit_size(text, s.banner, row.shape[1] - 2 * s.pad, self._bold, 8)
            self._text(row, text, row.shape[1] // 2, row.shape[0] // 2, size, AMBER_TEXT, anchor="mm")
        else:
            row[:] = IMAGE_BG
        band = self.chips_rect.view(self.canvas)
        band[:] = IMAGE_BG
        x, chip_h = s.gap, band.shape[0] - s.gap
        y0 = s.gap
        size = s.small
        stripe = max(3, int(round(4 * s.unit)))
        for label, color in chips:
            room = band.shape[1] - x - s.gap
            if room < stripe + 3 * s.gap + self._bold.measure("…", size)[0]:
                break
            text = self._bold.fit(label, size, room - stripe - 3 * s.gap)
            tw = self._bold.measure(text, size)[0]
            w = stripe + 3 * s.gap + tw
            band[y0 : y0 + chip_h, x : x + w] = CHIP_BG
            band[y0 : y0 + chip_h, x : x + stripe] = color
            fg = AMBER if color == AMBER else TEXT
            self._text(band, text, x + stripe + int(1.5 * s.gap), y0 + chip_h // 2, size, fg, anchor="lm")
            x += w + s.gap

    # ----- panel sections ---------------------------------------------------------------------------------

    def _finding(self, state: ScreenState, matched: Result | None, older: Result | None) -> _Finding:
        if state.silent_trial:
            return _Finding("silent")
        if state.ai_off:
            return _Finding("off")
        for mode, r in (("result", matched), ("stale", older)):
            if r is not None:
                if r.state == "unlike_training_data":
                    return _Finding("paused", lines=(r.paused or "image unlike training data",))
                return _Finding(mode, r.label, _shown_pct(r.confidence), r.alert, self._details(mode, r))
        if state.ai_pending:
            return _Finding("pending")
        return _Finding("none")

    def _details(self, mode: str, r: Result) -> tuple[str, ...]:
        """The finding's measurement lines, held for DETAIL_REFRESH_S while the finding stays the same."""
        now = time.monotonic()
        same = (mode, r.label, bool(r.alert))
        held = self._detail
        if held is not None and held[1] == same and now - held[0] < DETAIL_REFRESH_S:
            return held[2]
        lines = _where(r)
        self._detail = (now, same, lines)
        return lines

    def _draw_finding(self, v: np.ndarray, f: _Finding) -> None:
        s = self.sz
        w = v.shape[1]
        stale = f.mode == "stale"
        _, _, _, y = self._text(v, "FINDING", 0, 0, s.caption, TEXT_2)
        if stale:
            self._text(v, "STALE", w, 0, s.caption, AMBER, anchor="rt")
        y += s.gap
        if f.mode == "paused":
            self._text(v, "AI paused", 0, y, s.value, AMBER, max_width=w)
            y += int(s.value * 1.4)
            reason = _pause_text(f.lines[0])
            self._text(v, reason[:1].upper() + reason[1:], 0, y, s.body, TEXT, self._regular, max_width=w)
            y += self._regular.get(s.body).line_height
            self._text(v, "No finding is shown", 0, y, s.body, TEXT_2, self._regular, max_width=w)
            return
        if f.mode in ("silent", "off", "pending", "none"):
            text = {
                "silent": "Silent trial",
                "off": "AI off",
                "pending": "Analysing…",
                "none": "No result yet",
            }[f.mode]
            self._text(v, text, 0, y, s.value, TEXT_DIM, max_width=w)
            if f.mode == "silent":
                self._text(
                    v,
                    "Findings are hidden",
                    0,
                    y + int(s.value * 1.4),
                    s.body,
                    TEXT_DIM,
                    self._regular,
                    max_width=w,
                )
            return
        main = TEXT_DIM if stale else TEXT
        second = TEXT_DIM if stale else TEXT_2
        if f.label is None:
            self._text(v, "No finding", 0, y, s.value, second, max_width=w)
            y += self._bold.get(s.label).line_height
        else:
            swatch = int(round(s.label * 0.42))
            sw_y = y + self._bold.get(s.label).ascent - swatch - int(s.label * 0.12)
            v[sw_y : sw_y + swatch, 0:swatch] = TEXT_DIM if stale else ACCENT
            x = swatch + s.gap + s.gap // 2
            size = self._fit_size(f.label, s.label, w - x, self._bold, int(s.label * 0.7))
            self._text(
                v, f.label, x, y + self._bold.get(s.label).ascent, size, main, anchor="ls", max_width=w - x
            )
            y += self._bold.get(s.label).line_height
        if f.confidence is not None:
            pct = f.confidence
            x0, _, x1, _ = self._text(v, pct, 0, y, s.value, main)
            base = y + self._bold.get(s.value).ascent
            if self._regular.measure("confidence", s.body)[0] <= w - x1 - s.gap:
                self._text(v, "confidence", x1 + s.gap, base, s.body, second, self._regular, anchor="ls")
        y += self._bold.get(s.value).line_height
        for line in f.lines[:2]:
            _, _, _, y = self._text(v, line, 0, y, s.body, second, self._regular, max_width=w)
        if f.alert:
            bar_h = int(round(s.body * 2.0))
            y0 = v.shape[0] - bar_h
            v[y0:, :] = TEXT_DIM if stale else ALERT
            self._text(v, "▲ ALERT", w // 2, y0 + bar_h // 2, int(s.body * 1.15), TEXT, anchor="mm")

    def _draw_threshold(self, v: np.ndarray, thr: float | None) -> None:
        s = self.sz
        x0, _, _, _ = self._text(
            v, "—" if thr is None else f"{thr * 100:.0f}%", v.shape[1], 0, s.body, TEXT, anchor="rt"
        )
        label = (
            "Alert threshold"
            if self._regular.measure("Alert threshold", s.body)[0] < x0 - s.gap
            else "Threshold"
        )
        self._text(v, label, 0, 0, s.body, TEXT_2, self._regular, max_width=x0 - s.gap)

    def _draw_model(self, v: np.ndarray, model_id, version, task, backend, fallback, region) -> None:
        s = self.sz
        w = v.shape[1]
        _, _, _, y = self._text(v, "MODEL", 0, 0, s.caption, TEXT_2)
        _, _, _, y = self._text(v, model_id or "—", 0, y, s.body, TEXT, max_width=w)
        detail = " · ".join(p for p in (f"v{version}" if version else "", task) if p)
        _, _, _, y = self._text(v, detail, 0, y, s.body, TEXT_2, self._regular, max_width=w)
        if fallback:
            note = fallback.split(":", 1)[1].strip() if ":" in fallback else fallback
            text = f"{backend} ({note})" if backend else fallback
            _, _, _, y = self._text(v, text, 0, y, s.body, AMBER, self._regular, max_width=w)
        else:
            _, _, _, y = self._text(v, backend, 0, y, s.body, TEXT_2, self._regular, max_width=w)
        if region:
            self._text(v, region, 0, y, s.body, TEXT_2, self._regular, max_width=w)

    def _draw_perf(self, v: np.ndarray, fps: str, latency: str) -> None:
        s = self.sz
        w = v.shape[1]
        left, right = "FRAME RATE", "LATENCY"
        if sum(self._bold.measure(t, s.caption)[0] for t in (left, right)) + 2 * s.gap > w:
            left, right = "FPS", "LAT."
        _, _, _, y = self._text(v, left, 0, 0, s.caption, TEXT_2)
        self._text(v, right, w, 0, s.caption, TEXT_2, anchor="rt")
        self._text(v, f"{fps} fps", 0, y, s.body, TEXT)
        self._text(v, f"{latency} ms", w, y, s.body, TEXT, anchor="rt")

    def _draw_messages(self, v: np.ndarray, messages: tuple[str, ...]) -> None:
        s = self.sz
        w = v.shape[1]
        _, _, _, y = self._text(v, "MESSAGES", 0, 0, s.caption, TEXT_2)
        y += s.gap // 2
        for i, msg in enumerate(messages):
            color = TEXT if i == 0 else TEXT_2
            msg = shorten_middle(msg, lambda t: self._regular.measure(t, s.small)[0] <= w)
            _, _, _, y = self._text(v, msg, 0, y, s.small, color, self._regular, max_width=w)


def shorten_middle(text: str, fits: Callable[[str], bool]) -> str:
    """``text`` when it fits, else shortened in the middle so that a message naming a file keeps its start
    and the file's name (cutting at the right would lose it): the folders go first, then what follows the
    name, then the name's start. A message without a path keeps its start and its end."""
    if fits(text):
        return text
    m = re.search(r"(?:[^\s]*/)+([^\s/]+?)(?=:\s|[,;]?\s|$)", text)
    if m is not None and m.group(1):
        head, name, rest = text[: m.start()], m.group(1), text[m.end() :]
        for k in range(len(name), 3, -1):
            candidate = f"{head}…{name[len(name) - k :]}{rest}"
            if fits(candidate):
                return candidate
            if k == len(name) or k <= 12:  # the name whole (or nearly), without what follows it
                bare = f"{head}…{name[len(name) - k :]}"
                if rest and fits(bare + "…"):
                    return bare + "…"
    for keep in range(len(text) - 1, 0, -1):
        tail = keep // 2
        candidate = text[: keep - tail].rstrip() + "…" + (text[len(text) - tail :] if tail else "")
        if fits(candidate):
            return candidate
    return "…"


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def _pct(p: float) -> str:
    """A probability as the screen shows it: whole percent, and never "100%" for what is not certain."""
    if 0.99 < p < 1.0:
        return f"{math.floor(p * 100)}%"
    return f"{p * 100:.0f}%"


def _shown_pct(confidence: float | None) -> str | None:
    """The confidence as the screen shows it: the finding section's cache key changes only when what it
    shows does."""
    return None if confidence is None else _pct(confidence)


_SIZE_NAMES = frozenset({"area", "width", "height", "depth"})


def _where(r: Result) -> tuple[str, ...]:
    """The measurement lines of a finding: physical units when the scale is known, never pixel positions.

    Read from its measurements and shapes (how many boxes or points), whatever task made it."""
    lines = []
    m = r.measurements
    size = []
    if "area" in m:
        mm2 = m["area"][0]
        size.append(f"{mm2 / 100:.1f} cm²" if mm2 >= 100 else f"{mm2:.0f} mm²")
    if "width" in m and "height" in m:
        size.append(f"{m['width'][0]:.0f} × {m['height'][0]:.0f} mm")
    if size:
        lines.append("Size " + " · ".join(size))
    elif r.size is not None and r.size[1] == "fraction":
        lines.append(f"Area {r.size[0] * 100:.1f} % of image")
    elif r.area_fraction is not None:
        lines.append(f"Area {r.area_fraction * 100:.1f} % of image")
    if "depth" in m:
        lines.append(f"Depth {m['depth'][0]:.0f} mm from probe")
    for name, (value, unit) in m.items():  # a task's own measurements, as named
        if name not in _SIZE_NAMES:
            lines.append(f"{name[:1].upper()}{name[1:]} {value:.3g} {unit}")
    for shapes, one, many in ((r.points, "point", "points"), (r.boxes, "box", "boxes")):
        if shapes:
            lines.insert(0, f"{len(shapes)} {one if len(shapes) == 1 else many}")
    if not lines and r.heatmap is not None:
        lines.append("Heatmap shown on image")
    return tuple(lines)


_REGION_NAMES = {
    "board": "Board crop",
    "dicom": "DICOM region",
    "detected": "Detected region",
    "full_frame": "Full frame",
}


def _region_line(frame: Frame | None) -> str | None:
    """Where the imaging region came from, and the scale: "DICOM region · 0.26 mm/px"."""
    if frame is None or "region_from" not in frame.meta:
        return None
    text = _REGION_NAMES.get(frame.meta["region_from"], str(frame.meta["region_from"]))
    mm = frame.meta.get("mm_per_px")
    return f"{text} · {mm[0]:.2f} mm/px" if mm else text


def _pause_text(reason: str) -> str:
    """The gate's reason as the screen says it: "image unlike training data", "frozen picture"."""
    return f"image {reason}" if reason.startswith("unlike") else reason


def _as_uint8_image(px: np.ndarray) -> np.ndarray:
    """Gray HxW or BGR HxWx3 uint8 (accepts HxWx1, BGRA and other integer/float types, leniently)."""
    if px.ndim == 3:
        if px.shape[2] == 1:
            px = px[:, :, 0]
        elif px.shape[2] == 4:
            px = cv2.cvtColor(px, cv2.COLOR_BGRA2BGR)
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    if not px.flags.c_contiguous:
        px = np.ascontiguousarray(px)
    return px
