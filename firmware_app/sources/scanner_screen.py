"""Synthetic scanner screens (the region tests, the capture bench): a static UI around a moving image.

``ScannerScreen(width, height, layout)`` renders frame ``t`` as BGR uint8: a title bar with the patient's
name, a side menu of boxes with labels, a logo, a depth scale, a grey bar, a clock that changes once a
second (at 30 fps), a blinking cursor, and the image: a sector fan (the ultrasound phantom scan-converted
into it, or plain random speckle in a fan of its own) or a linear rectangle of moving speckle.
``truth(t)`` is the bounding box of the image's pixels, in full-frame pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from firmware_app.sources.phantom import UltrasoundPhantom

Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class Layout:
    kind: str  # "phantom" | "fan" | "linear"
    rect: Rect  # the box the image is drawn in
    seed: int = 0
    black: bool = False  # the box is black around the image (a scanner's image area), not the UI's colour


def _bbox(mask: np.ndarray) -> Rect:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))


class ScannerScreen:
    def __init__(self, width: int, height: int, *layouts: tuple[int, Layout], fps: int = 30) -> None:
        """``layouts``: (first frame, layout) pairs; the screen switches layout at those frames."""
        self.width, self.height, self.fps = width, height, fps
        self.layouts = sorted(layouts, key=lambda p: p[0])
        self._chrome = self._draw_chrome()
        self._images = {id(lay): _Image(lay) for _, lay in self.layouts}

    def layout(self, t: int) -> Layout:
        lay = self.layouts[0][1]
        for start, candidate in self.layouts:
            if t >= start:
                lay = candidate
        return lay

    def truth(self, t: int) -> Rect:
        lay = self.layout(t)
        x, y, w, h = self._images[id(lay)].bbox
        return (x + lay.rect[0], y + lay.rect[1], w, h)

    def _draw_chrome(self) -> np.ndarray:
        W, H = self.width, self.height
        f = max(W / 1280.0, 0.5)
        img = np.full((H, W, 3), (28, 22, 18), np.uint8)
        cv2.rectangle(img, (0, 0), (W - 1, int(48 * f)), (70, 50, 40), -1)
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(
            img, "DOE^JANE  ID 0042-117", (int(16 * f), int(32 * f)), font, 0.8 * f, (255, 255, 255), 2
        )
        cv2.putText(
            img, "ABD  C5-2  MI 0.9  TIS 0.4", (int(520 * f), int(32 * f)), font, 0.7 * f, (200, 220, 255), 2
        )
        for i, label in enumerate(("B", "CFM", "PW", "DEPTH", "GAIN", "FREEZE", "SAVE")):
            y0 = int((70 + 64 * i) * f)
            cv2.rectangle(img, (W - int(150 * f), y0), (W - int(16 * f), y0 + int(50 * f)), (90, 90, 90), -1)
            cv2.rectangle(
                img, (W - int(150 * f), y0), (W - int(16 * f), y0 + int(50 * f)), (200, 200, 200), 2
            )
            cv2.putText(img, label, (W - int(140 * f), y0 + int(34 * f)), font, 0.7 * f, (255, 255, 255), 2)
        c = (int(60 * f), H - int(60 * f))  # logo
        cv2.circle(img, c, int(36 * f), (40, 160, 230), -1)
        cv2.putText(img, "US", (c[0] - int(22 * f), c[1] + int(10 * f)), font, 0.9 * f, (255, 255, 255), 2)
        for i in range(11):  # depth scale on the left
            y = int((80 + 55 * i) * f)
            if y < H - int(120 * f):
                cv2.line(img, (int(110 * f), y), (int(130 * f), y), (230, 230, 230), 2)
                cv2.putText(img, str(i), (int(80 * f), y + 6), font, 0.5 * f, (230, 230, 230), 1)
        for i in range(16):  # grey bar
            y0 = int((90 + 16 * i) * f)
            cv2.rectangle(img, (int(150 * f), y0), (int(165 * f), y0 + int(16 * f)), (i * 17,) * 3, -1)
        return img

    def render(self, t: int, image_t: int | None = None) -> np.ndarray:
        """Frame ``t``; the image shows its frame ``image_t`` (default ``t``: a fixed one is a frozen
        picture while the clock and the cursor go on)."""
        img = self._chrome.copy()
        W, H = self.width, self.height
        f = max(W / 1280.0, 0.5)
        font = cv2.FONT_HERSHEY_SIMPLEX
        secs = 36000 + t // self.fps  # a clock changing once a second
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        cv2.putText(img, clock, (W - int(150 * f), H - int(30 * f)), font, 0.7 * f, (255, 255, 255), 2)
        if (t // 15) % 2 == 0:  # a blinking cursor
            cv2.rectangle(
                img, (int(250 * f), H - int(50 * f)), (int(262 * f), H - int(22 * f)), (255, 255, 255), -1
            )
        frame_no = f"FR {t % 1000:03d}"  # a frame counter in the chrome
        cv2.putText(img, frame_no, (int(400 * f), H - int(30 * f)), font, 0.6 * f, (180, 180, 180), 1)
        lay = self.layout(t)
        x, y, w, h = lay.rect
        pix, mask = self._images[id(lay)].render(t if image_t is None else image_t)
        roi = img[y : y + h, x : x + w]
        if lay.black:
            roi[:] = 0
        roi[mask > 0] = pix[mask > 0][:, None]
        return img


class _Image:
    """One layout's moving image: pixels (grey, uint8) and where they are (mask) inside its box."""

    def __init__(self, lay: Layout) -> None:
        self.lay = lay
        _, _, w, h = lay.rect
        self.rng = np.random.default_rng(lay.seed)
        if lay.kind == "phantom":
            self.phantom = UltrasoundPhantom(w, h, seed=lay.seed)
            self.mask = self.phantom.fan_mask
        elif lay.kind == "fan":
            self.mask = np.zeros((h, w), np.uint8)
            apex = (w // 2, -int(0.15 * h))
            radius = int(h - apex[1] - 2)
            cv2.ellipse(self.mask, apex, (radius, radius), 90, -36, 36, 1, -1)
            cv2.circle(self.mask, apex, int(0.3 * h), 0, -1)
        elif lay.kind == "linear":
            self.mask = np.ones((h, w), np.uint8)
        else:
            raise ValueError(lay.kind)
        self.bbox = _bbox(self.mask)
        tex = self.rng.rayleigh(60.0, (h + 64, w + 64)).astype(np.float32)
        self.texture = cv2.GaussianBlur(tex, (0, 0), 1.2)

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        _, _, w, h = self.lay.rect
        if self.lay.kind == "phantom":
            return self.phantom.render(t)[0], self.mask
        if self.lay.kind == "fan":  # fresh speckle every frame
            noise = np.random.default_rng((self.lay.seed, t)).rayleigh(55.0, (h, w)).astype(np.float32)
            img = cv2.GaussianBlur(noise, (0, 0), 1.0) + 20.0
        else:  # a texture sliding with breathing, plus fresh noise
            dy = int(16 + 14 * math.sin(t / 12.0))
            dx = int(16 + 10 * math.sin(t / 29.0))
            fresh = np.random.default_rng((self.lay.seed, t)).normal(0, 12.0, (h, w)).astype(np.float32)
            img = self.texture[dy : dy + h, dx : dx + w] + fresh
            img += 25.0
        return np.clip(img, 0, 255).astype(np.uint8), self.mask


def frames(screen: ScannerScreen, n: int, start: int = 0) -> list[np.ndarray]:
    return [screen.render(t) for t in range(start, start + n)]
