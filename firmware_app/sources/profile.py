"""The ultrasound source profile: which part of the scanner's video-out frame is the image.

A portable scanner's video output carries its own UI around the image (menus, scale bars) and burned-in
patient text. The board config names the imaging region (``crop = [x, y, width, height]``) and the
rectangles to black out (``blackout = [[x, y, width, height], ...]``, in full-frame coordinates).
Everything downstream (model, display, captures) sees only the cropped, blacked-out image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from firmware_app.errors import BadConfig

Rect = tuple[int, int, int, int]


def shift_rect(rect: Rect, dx: int, dy: int) -> Rect:
    """``rect`` moved by (dx, dy)."""
    return (rect[0] + dx, rect[1] + dy, rect[2], rect[3])


@dataclass(frozen=True)
class SourceProfile:
    crop_rect: Rect | None = None  # x, y, w, h
    blackout: tuple[Rect, ...] = ()

    @classmethod
    def from_config(cls, table: dict, where: str = "[source]") -> SourceProfile:
        crop = table.get("crop")
        rects = table.get("blackout", [])
        crop_rect = _rect(crop, f"{where} crop") if crop is not None else None
        return cls(crop_rect, tuple(_rect(r, f"{where} blackout") for r in rects))

    def crop(self, img: np.ndarray, rect: Rect | None = None) -> np.ndarray:
        """``img`` cut to ``rect`` (default: the board's crop); ValueError when it does not fit."""
        rect = self.crop_rect if rect is None else rect
        if rect is None:
            return img
        x, y, w, h = rect
        out = img[y : y + h, x : x + w]
        if out.shape[0] != h or out.shape[1] != w:
            raise ValueError(f"crop {list(rect)} lies outside the {img.shape[1]}x{img.shape[0]} frame")
        return out

    def shifted(self, dx: int, dy: int) -> SourceProfile:
        """The same profile for a picture whose origin is (-dx, -dy) of this one's (a part of it)."""
        crop = shift_rect(self.crop_rect, dx, dy) if self.crop_rect is not None else None
        return SourceProfile(crop, tuple(shift_rect(r, dx, dy) for r in self.blackout))

    def apply(self, img: np.ndarray, rect: Rect | None = None) -> np.ndarray:
        """Black out the burned-in text (full-frame coordinates), then crop to ``rect`` (default: the
        board's crop; the board's crop, when set, is passed here by the source). Never alters ``img``."""
        rect = self.crop_rect if rect is None else rect
        if self.blackout:
            img = img.copy()
            for x, y, w, h in self.blackout:
                if x + w > 0 and y + h > 0:  # (a rect left of or above a part of the picture: not in it)
                    img[max(y, 0) : y + h, max(x, 0) : x + w] = 0
        full = rect is None or (rect[:2] == (0, 0) and rect[2:] == (img.shape[1], img.shape[0]))
        out = img if full else self.crop(img, rect)
        return out if self.blackout or full else np.ascontiguousarray(out)


def _rect(value: object, where: str) -> Rect:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise BadConfig(f"{where}: expected [x, y, width, height] as 4 integers, got {value!r}")
    x, y, w, h = value
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise BadConfig(f"{where}: width and height must be > 0 and x, y >= 0, got {list(value)}")
    return (x, y, w, h)
