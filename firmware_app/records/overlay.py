"""The "AI overlay burned in" picture of a capture, for the Secondary Capture in an export.

The frame keeps its size and position; a labelled band is added above it ("AI OVERLAY", model id and
version, "NOT FOR DIAGNOSTIC USE" in amber when the model is not cleared) and one below it (the finding,
its confidence, ALERT). The overlay itself is the result's shapes drawn by the screen's own painter
(``display.overlay``): the same accent colour, tint, outlines, boxes, points and heatmap.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from firmware_app.display.font import draw_text, measure
from firmware_app.display.overlay import OverlayPainter, Style
from firmware_app.display.screen import ALERT, AMBER, AMBER_TEXT
from firmware_app.types import Result

BAND_BG = (30, 25, 21)
TEXT = (244, 241, 238)
TEXT_2 = (177, 165, 154)


def _as_bgr(pixels: np.ndarray) -> np.ndarray:
    px = np.asarray(pixels)
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    if px.ndim == 2:
        return cv2.cvtColor(px, cv2.COLOR_GRAY2BGR)
    if px.shape[2] == 1:
        return cv2.cvtColor(px[:, :, 0], cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(px[:, :, :3]).copy()


def draw_result(image: np.ndarray, result: Result) -> np.ndarray:
    """Draw ``result``'s shapes onto ``image`` (BGR uint8, the frame it was computed on), in place: the
    screen's painter (``display.overlay``) at the frame's own size."""
    h, w = image.shape[:2]
    OverlayPainter().paint(image, result.shapes, (w, h), Style.for_size(w, h))
    return image


def finding_text(result: Result | None) -> tuple[str, bool]:
    """The finding line under the image, and whether it is an alert."""
    if result is None:
        return "AI result not recorded", False
    if result.label is None:
        return "No finding", False
    conf = "" if result.confidence is None else f"  {result.confidence * 100:.0f}% confidence"
    return f"{result.label}{conf}", bool(result.alert)


def render_overlay(
    pixels: np.ndarray,
    result: Result | None,
    model_id: str,
    model_version: str,
    not_for_diagnostic: bool,
) -> np.ndarray:
    """The burned-in picture (BGR uint8): labelled top band, frame with the overlay, finding band."""
    image = _as_bgr(pixels)
    h, w = image.shape[:2]
    if result is not None:
        draw_result(image, result)
    size = max(10, int(round(15 * max(min(w, h), 240) / 480)))
    pad = max(3, size // 3)
    row = int(math.ceil(size * 1.45))
    top_rows = 2 if not_for_diagnostic else 1
    top_h, bottom_h = top_rows * row + pad, row + pad
    canvas = np.empty((top_h + h + bottom_h, w, 3), np.uint8)
    canvas[:] = BAND_BG
    canvas[top_h : top_h + h] = image
    title = f"AI OVERLAY - {model_id} {model_version}".strip()
    draw_text(canvas, title, pad, pad // 2 + row // 2, size, TEXT, anchor="lm", max_width=w - 2 * pad)
    if not_for_diagnostic:
        y0 = pad // 2 + row
        canvas[y0 : y0 + row] = AMBER
        draw_text(
            canvas,
            "NOT FOR DIAGNOSTIC USE",
            w // 2,
            y0 + row // 2,
            size,
            AMBER_TEXT,
            anchor="mm",
            max_width=w - 2 * pad,
        )
    text, alert = finding_text(result)
    y = top_h + h + pad // 2 + row // 2
    if alert:
        tag = "ALERT"
        tw = measure(tag, size)[0] + 2 * pad
        canvas[top_h + h + pad // 2 : top_h + h + pad // 2 + row, w - tw :] = ALERT
        draw_text(canvas, tag, w - tw // 2, y, size, TEXT, anchor="mm")
        draw_text(canvas, text, pad, y, size, TEXT, anchor="lm", max_width=w - tw - 2 * pad)
    else:
        draw_text(canvas, text, pad, y, size, TEXT_2, anchor="lm", max_width=w - 2 * pad)
    return canvas
