"""Antialiased text from a pre-rasterised DejaVu atlas, with numpy and OpenCV only.

``tools/make_font_atlas.py`` rasterises the fonts once, at build time, into ``fonts/<name>.npz``. Here:

- ``Font.load(name)`` reads an atlas once per process;
- ``Font.get(size_px)`` scales every glyph once per size (``cv2.resize``, INTER_AREA when shrinking) into a
  ``GlyphSet``; all glyphs of a set share one line box, so the baseline never wobbles;
- ``Font.render(text, size_px)`` lays a string out (advances + kerning) into an alpha mask, kept in an LRU
  cache: the screen draws the same strings frame after frame;
- ``draw_text`` alpha-blends a mask into a BGR (or gray) uint8 canvas, only over the inked rectangle,
  clipped at the canvas edges.

``size_px`` is the em size in pixels, as in most toolkits: a line is about 1.17 x size_px tall and capitals
about 0.73 x size_px.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FONT_DIR = Path(__file__).with_name("fonts")
DEFAULT_FONT = "sans-bold"
ELLIPSIS = "…"
_TEXT_CACHE_SIZE = 512


@dataclass(frozen=True, eq=False)
class Glyph:
    bitmap: np.ndarray  # uint8 coverage, line-box tall (GlyphSet.line_height rows)
    left: int  # x of the bitmap's first column relative to the pen
    advance: float


@dataclass(frozen=True, eq=False)
class GlyphSet:
    """Every glyph of one font at one pixel size."""

    size: int
    ascent: int  # baseline row inside the line box
    line_height: int
    cap_height: float
    glyphs: dict[str, Glyph]
    kerning: dict[tuple[str, str], float]
    fallback: Glyph


@dataclass(frozen=True, eq=False)
class TextMask:
    """A laid-out string. alpha covers the ink only; (ink_x, ink_y) is its offset from the line box's
    top-left corner at the pen start, so the line box is ``width`` x ``height`` at (0, 0)."""

    alpha: np.ndarray  # uint8 coverage of the inked rectangle
    weight: np.ndarray  # the same as float32 in [0, 1], ready for cv2.blendLinear
    inv_weight: np.ndarray  # 1 - weight
    ink_x: int
    ink_y: int
    width: int  # pen advance of the whole string
    height: int  # line height
    ascent: int  # baseline row in the line box
    cap_height: float


class Font:
    """One rasterised typeface. Use ``Font.load(name)``: instances are shared and thread-safe."""

    _loaded: dict[str, Font] = {}
    _load_lock = threading.Lock()

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        with np.load(path) as data:
            atlas = data["atlas"]
            rects = data["rects"]
            offsets = data["offsets"]
            advances = data["advances"]
            codepoints = data["codepoints"]
            kern_pairs = data["kern_pairs"]
            kern_values = data["kern_values"]
            size, ascent, descent, cap_height, _x_height = (float(v) for v in data["metrics"])
        self.master_size = size
        # One line box for every glyph: from the highest top to the lowest bottom of all of them.
        tops = [offsets[i, 1] for i in range(len(codepoints)) if rects[i, 2]]
        bottoms = [offsets[i, 1] + rects[i, 3] for i in range(len(codepoints)) if rects[i, 2]]
        self._top = int(min(-ascent, *tops))
        self._bottom = int(max(descent, *bottoms))
        self._ascent = -self._top
        self._cap_height = cap_height
        line_h = self._bottom - self._top
        self._master: dict[str, tuple[np.ndarray, int, float]] = {}
        for i, cp in enumerate(codepoints):
            x, y, w, h = (int(v) for v in rects[i])
            left, top = int(offsets[i, 0]), int(offsets[i, 1])
            strip = np.zeros((line_h, max(w, 0)), np.uint8)
            if w and h:
                strip[top - self._top : top - self._top + h, :] = atlas[y : y + h, x : x + w]
            self._master[chr(int(cp))] = (strip, left, float(advances[i]))
        self._kerning = {(chr(int(a)), chr(int(b))): float(k) for (a, b), k in zip(kern_pairs, kern_values)}
        self._sizes: dict[int, GlyphSet] = {}
        self._lock = threading.Lock()
        self._texts: OrderedDict[tuple[str, int], TextMask] = OrderedDict()

    @classmethod
    def load(cls, name: str = DEFAULT_FONT) -> Font:
        """The font ``fonts/<name>.npz`` ("sans-bold" or "sans"), read once per process."""
        font = cls._loaded.get(name)
        if font is None:
            with cls._load_lock:
                font = cls._loaded.get(name)
                if font is None:
                    path = FONT_DIR / f"{name}.npz"
                    if not path.is_file():
                        known = sorted(p.stem for p in FONT_DIR.glob("*.npz"))
                        raise ValueError(f"font {name!r}: no {path} (fonts: {', '.join(known)})")
                    font = cls._loaded[name] = cls(name, path)
        return font

    @property
    def chars(self) -> frozenset[str]:
        return frozenset(self._master)

    def get(self, size_px: int | float) -> GlyphSet:
        """All glyphs scaled to ``size_px`` (em), computed once per size."""
        size = max(1, int(round(size_px)))
        gs = self._sizes.get(size)
        if gs is None:
            with self._lock:
                gs = self._sizes.get(size)
                if gs is None:
                    gs = self._sizes[size] = self._scale(size)
        return gs

    def _scale(self, size: int) -> GlyphSet:
        s = size / self.master_size
        line_h = max(1, int(round((self._bottom - self._top) * s)))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        glyphs = {}
        for ch, (strip, left, advance) in self._master.items():
            w = strip.shape[1]
            if w:
                x0 = int(np.floor(left * s))
                x1 = max(x0 + 1, int(np.ceil((left + w) * s)))
                bitmap = cv2.resize(strip, (x1 - x0, line_h), interpolation=interp)
            else:
                x0, bitmap = 0, np.zeros((line_h, 0), np.uint8)
            glyphs[ch] = Glyph(bitmap, x0, advance * s)
        kerning = {pair: k * s for pair, k in self._kerning.items()}
        fallback = glyphs.get("?") or next(iter(glyphs.values()))
        return GlyphSet(
            size=size,
            ascent=int(round(self._ascent * s)),
            line_height=line_h,
            cap_height=self._cap_height * s,
            glyphs=glyphs,
            kerning=kerning,
            fallback=fallback,
        )

    def _layout(self, text: str, gs: GlyphSet) -> tuple[list[tuple[Glyph, int]], float]:
        pen = 0.0
        placed = []
        prev = None
        for ch in text:
            glyph = gs.glyphs.get(ch)
            if glyph is None:
                ch = "?"
                glyph = gs.fallback
            if prev is not None:
                pen += gs.kerning.get((prev, ch), 0.0)
            if glyph.bitmap.shape[1]:
                placed.append((glyph, int(round(pen)) + glyph.left))
            pen += glyph.advance
            prev = ch
        return placed, pen

    def measure(self, text: str, size_px: int | float) -> tuple[int, int]:
        """(width, height) of the line box of ``text`` at ``size_px``: pen advance x line height."""
        gs = self.get(size_px)
        _, pen = self._layout(text, gs)
        return int(round(pen)), gs.line_height

    def render(self, text: str, size_px: int | float) -> TextMask:
        """The string as an alpha mask, cached (LRU) by (text, size)."""
        size = max(1, int(round(size_px)))
        key = (text, size)
        with self._lock:
            mask = self._texts.get(key)
            if mask is not None:
                self._texts.move_to_end(key)
                return mask
        mask = self._render(text, self.get(size))
        with self._lock:
            self._texts[key] = mask
            if len(self._texts) > _TEXT_CACHE_SIZE:
                self._texts.popitem(last=False)
        return mask

    def _render(self, text: str, gs: GlyphSet) -> TextMask:
        placed, pen = self._layout(text, gs)
        width, height = int(round(pen)), gs.line_height
        if not placed:
            return _empty_mask(width, height, gs)
        x_min = min(x for _, x in placed)
        x_max = max(x + g.bitmap.shape[1] for g, x in placed)
        line = np.zeros((height, x_max - x_min), np.uint8)
        for glyph, x in placed:
            dst = line[:, x - x_min : x - x_min + glyph.bitmap.shape[1]]
            np.maximum(dst, glyph.bitmap, out=dst)
        rows = np.flatnonzero(line.any(axis=1))
        cols = np.flatnonzero(line.any(axis=0))
        if rows.size == 0:
            return _empty_mask(width, height, gs)
        ink = np.ascontiguousarray(line[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        weight = ink * np.float32(1 / 255)
        return TextMask(
            alpha=ink,
            weight=weight,
            inv_weight=1.0 - weight,
            ink_x=x_min + int(cols[0]),
            ink_y=int(rows[0]),
            width=width,
            height=height,
            ascent=gs.ascent,
            cap_height=gs.cap_height,
        )

    def fit(self, text: str, size_px: int | float, max_width: int) -> str:
        """``text`` itself when it fits in ``max_width`` pixels, else its longest prefix + "…" that does."""
        if self.measure(text, size_px)[0] <= max_width:
            return text
        lo, hi = 0, len(text)  # the longest prefix length whose "prefix…" fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.measure(text[:mid].rstrip() + ELLIPSIS, size_px)[0] <= max_width:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo].rstrip() + ELLIPSIS if lo or self.measure(ELLIPSIS, size_px)[0] <= max_width else ""


def _empty_mask(width: int, height: int, gs: GlyphSet) -> TextMask:
    empty = np.zeros((0, 0), np.float32)
    return TextMask(empty.astype(np.uint8), empty, empty, 0, 0, width, height, gs.ascent, gs.cap_height)


def _origin(mask: TextMask, x: int, y: int, anchor: str) -> tuple[int, int]:
    """Top-left of the line box for an anchor: horizontal l/m/r, vertical t (top of the line box),
    m (middle of the capitals: centres text visually), s (baseline), b (bottom of the line box)."""
    if len(anchor) != 2 or anchor[0] not in "lmr" or anchor[1] not in "tmsb":
        raise ValueError(f"anchor {anchor!r}: expected one of l/m/r then one of t/m/s/b")
    h, v = anchor
    if h == "m":
        x -= mask.width // 2
    elif h == "r":
        x -= mask.width
    if v == "m":
        y -= int(round(mask.ascent - mask.cap_height / 2))
    elif v == "s":
        y -= mask.ascent
    elif v == "b":
        y -= mask.height
    return x, y


def blend_mask(canvas: np.ndarray, mask: TextMask, x: int, y: int, color: tuple[int, int, int] | int) -> None:
    """Alpha-blend a rendered string whose line box starts at (x, y), clipped to the canvas.

    One vectorised ``cv2.blendLinear`` with the weights the mask carries (computed once per cached string).
    """
    h, w = mask.alpha.shape[:2]
    if not h or not w:
        return
    x += mask.ink_x
    y += mask.ink_y
    ch, cw = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, cw), min(y + h, ch)
    if x0 >= x1 or y0 >= y1:
        return
    sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    roi = canvas[y0:y1, x0:x1]
    if canvas.ndim == 2:
        plane = np.full(roi.shape, int(color if np.isscalar(color) else color[0]), np.uint8)  # type: ignore[index]
    else:
        plane = np.empty(roi.shape, np.uint8)
        plane[:] = color
    roi[...] = cv2.blendLinear(roi, plane, mask.inv_weight[sub], mask.weight[sub])


def draw_text(
    canvas: np.ndarray,
    text: str,
    x: int,
    y: int,
    size_px: int | float,
    color: tuple[int, int, int] | int,
    font: str | Font = DEFAULT_FONT,
    anchor: str = "lt",
    max_width: int | None = None,
) -> tuple[int, int, int, int]:
    """Draw ``text`` into ``canvas`` (BGR or gray uint8, modified in place) and return its line box
    (x0, y0, x1, y1), which may extend past the canvas: drawing is clipped at the edges.

    ``anchor`` places (x, y): l/m/r horizontally, t/m/s/b vertically (see ``_origin``). With ``max_width``
    the text is shortened with an ellipsis to fit.
    """
    f = font if isinstance(font, Font) else Font.load(font)
    if max_width is not None:
        text = f.fit(text, size_px, max_width)
    mask = f.render(text, size_px)
    ox, oy = _origin(mask, int(x), int(y), anchor)
    blend_mask(canvas, mask, ox, oy, color)
    return ox, oy, ox + mask.width, oy + mask.height


def measure(text: str, size_px: int | float, font: str | Font = DEFAULT_FONT) -> tuple[int, int]:
    """(width, height) of ``text``'s line box at ``size_px``."""
    f = font if isinstance(font, Font) else Font.load(font)
    return f.measure(text, size_px)


def fit_text(text: str, size_px: int | float, max_width: int, font: str | Font = DEFAULT_FONT) -> str:
    """``text``, or its longest prefix + "…" that is at most ``max_width`` pixels wide."""
    f = font if isinstance(font, Font) else Font.load(font)
    return f.fit(text, size_px, max_width)
