"""``firmware-app source-check``: which part of a source's picture is the image, and where that came from.

Reads up to N frames from the source as the daemon would (with the board's ``[source]`` settings when a
board is named: its crop wins), then reports the imaging region of the last frame read and its origin
(``board``, ``dicom``, ``detected``, ``full_frame``; ``firmware_app.sources.region``), its scale when
known, the ``crop = [x, y, w, h]`` line to paste into the board TOML, and writes ``DIR/region.png``: the
full frame with the region outlined and labelled. A source that does not look for a region itself (a
board crop, a DICOM file, a still) is also watched by a ``RegionDetector`` of its own, so an installer can
compare the board's crop with what the stream shows (drawn in yellow when they differ).

``region.png`` is the scanner's screen as captured, only the board's blackout rectangles blacked out: it
may show a patient's name. Check a scanner on a phantom or a demo patient, and delete the file after.

A source that stops delivering (a watched DICOM folder with no new files, an unplugged grabber) is
stopped after ``idle_s`` without a frame.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadInput, BadSource, SourceUnavailable
from firmware_app.sources import open_source
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region import Region
from firmware_app.sources.region_detect import RegionDetector, iou

log = logging.getLogger(__name__)

GREEN, YELLOW, RED = (0, 220, 0), (0, 230, 255), (0, 0, 230)


@dataclass(frozen=True)
class SourceCheck:
    uri: str
    frames: int  # frames read
    size: tuple[int, int]  # full frame, width x height
    region: Region  # what the last frame was cut to
    why: str  # how it was found, or why nothing was
    detected: (
        tuple[int, int, int, int] | None
    )  # the stream's own moving region (when the source does not look)
    blackout: tuple[tuple[int, int, int, int], ...]
    last_frame: np.ndarray  # the full frame, before the crop

    @property
    def crop_line(self) -> str:
        return "crop = [" + ", ".join(str(int(v)) for v in self.region.rect) + "]"


def check_source(
    uri: str,
    profile: SourceProfile | None = None,
    options: dict | None = None,
    frames: int = 90,
    idle_s: float = 5.0,
) -> SourceCheck:
    """Read up to ``frames`` frames of ``uri`` and say what its imaging region is. BadSource when the
    source cannot be opened or gives no frame at all; SourceUnavailable when a device never answers."""
    src = open_source(uri, profile, options)
    own = RegionDetector() if src.region_detector is None else None
    raw: list[np.ndarray] = []

    def tap(pixels: np.ndarray) -> None:
        raw[:] = [pixels]
        if own is not None:
            own.feed(pixels)

    src.raw_tap = tap
    last_seen = [time.monotonic()]
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.1):
            if time.monotonic() - last_seen[0] > idle_s:
                src.stop()
                return

    dog = threading.Thread(target=watchdog, name="source-check-watchdog", daemon=True)
    last = None
    n = 0
    problems: list[str] = []
    unavailable = False
    try:
        src.open()
        dog.start()
        while n < frames and not src.stopping.is_set():
            try:
                frame = src.read()
            except SourceUnavailable as exc:
                problems.append(str(exc))
                unavailable = True
                time.sleep(0.05)
                continue
            except BadFrame as exc:
                problems.append(str(exc))
                continue
            if frame is None:
                break
            last, n = frame, n + 1
            last_seen[0] = time.monotonic()
    finally:
        done.set()
        src.close()
    if last is None or not raw:
        why = f" ({problems[-1]})" if problems else ""
        if unavailable:
            raise SourceUnavailable(f"source {uri!r}: no frame within {idle_s:g} s{why}")
        raise BadSource(f"source {uri!r}: no frame could be read{why}")
    m = last.meta
    width, height = m["full_size"]
    mm = tuple(m["mm_per_px"]) if m.get("mm_per_px") else None
    region = Region(tuple(m["imaging_region"]), m["region_from"], mm)  # type: ignore[arg-type]
    detector = src.region_detector or own
    if region.origin == "board":
        why = "the board's crop"
    elif region.origin == "dicom":
        why = "stated by the DICOM file"
    else:
        why = detector.status if detector is not None else "nothing known about the picture"
    detected = own.rect if own is not None else None
    blackout = src.profile.blackout
    return SourceCheck(uri, n, (int(width), int(height)), region, why, detected, blackout, raw[0])


def _label(
    img: np.ndarray, text: str, rect: tuple[int, int, int, int], colour, scale: float, below: bool
) -> None:
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    x, y, w, h = rect
    pad = max(2, th // 3)
    ty = y + h + th + 2 * pad if below else y - pad - base - 1
    if ty - th - pad < 0:  # no room above: inside the top edge
        ty = y + th + 2 * pad
    if ty + base + pad > img.shape[0]:  # no room below: inside the bottom edge
        ty = y + h - base - 2 * pad
    tx = min(max(0, x), max(0, img.shape[1] - tw - 2 * pad))
    cv2.rectangle(img, (tx, ty - th - pad), (tx + tw + 2 * pad, ty + base + pad), (0, 0, 0), -1)
    cv2.putText(img, text, (tx + pad, ty), font, scale, colour, thick, cv2.LINE_AA)


def _outline(img: np.ndarray, rect: tuple[int, int, int, int], colour, thick: int) -> None:
    """The region's border pixels, drawn inward (the outline lies on the region's first and last rows and
    columns, never outside it)."""
    x, y, w, h = rect
    for i in range(min(thick, w // 2, h // 2)):
        cv2.rectangle(img, (x + i, y + i), (x + w - 1 - i, y + h - 1 - i), colour, 1)


def render_check(check: SourceCheck) -> np.ndarray:
    """The full frame with the region outlined in green and labelled; blackout rectangles blacked out and
    outlined in red; the stream's own moving region in yellow where it differs from the region."""
    img = check.last_frame
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img.copy()
    height, width = img.shape[:2]
    thick = max(2, round(max(width, height) / 500))
    scale = max(0.45, max(width, height) / 1800)
    for x, y, w, h in check.blackout:  # blacked out here too, as the device does
        img[max(y, 0) : y + h, max(x, 0) : x + w] = 0
        _outline(img, (x, y, w, h), RED, max(1, thick // 2))
    det = check.detected
    shown = det is not None and iou(det, check.region.rect) < 0.98
    if shown:
        _label(img, f"stream moves here: {det[2]}x{det[3]}+{det[0]}+{det[1]}", det, YELLOW, scale, True)
    _label(img, f"imaging region: {check.region.describe()}", check.region.rect, GREEN, scale, False)
    if shown:  # outlines over the labels: a label never hides an edge
        _outline(img, det, YELLOW, max(1, thick // 2))
    _outline(img, check.region.rect, GREEN, thick)
    return img


def run_source_check(uri: str, board_ref: str | None, frames: int, out: str | Path) -> int:
    """The command: print the findings, write ``out/region.png``."""
    profile, options = None, None
    if board_ref:
        from firmware_app.config import load_board

        board = load_board(board_ref)
        profile, options = board.profile, dict(board.source)
    check = check_source(uri, profile, options, frames)
    r = check.region
    w, h = check.size
    print(f"source:      {uri} ({check.frames} frames of {w}x{h})")
    print(f"region:      {list(r.rect)} from {r.origin} ({r.describe()})")
    print(f"how:         {check.why}")
    mm = f"{r.mm_per_px[0]:.4g} x {r.mm_per_px[1]:.4g} (dx x dy)" if r.mm_per_px else "unknown"
    print(f"mm per px:   {mm}")
    if check.detected is not None and r.origin != "detected":
        d = check.detected
        print(f"stream:      the picture moves in {list(d)} (iou {iou(d, r.rect):.2f} with the region)")
    note = "  # the full frame: no crop needed" if r.rect == (0, 0, w, h) else ""
    print("board TOML:  paste into [source]:")
    print(f"{check.crop_line}{note}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "region.png"
    if not cv2.imwrite(str(png), render_check(check)):
        raise BadInput(f"{png}: cannot write the PNG here")
    print(f"picture:     {png} (the screen as captured: delete it if it shows a patient)")
    return 0
