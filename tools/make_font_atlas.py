"""Rasterise DejaVu fonts into small antialiased alpha atlases for the on-screen display.

Build-time only (needs Pillow, with libraqm for kerning); the runtime reads the result with numpy alone:

    .venv-tools/bin/python tools/make_font_atlas.py [--size 64] [--out firmware_app/display/fonts]

Each font becomes ``<out>/<name>.npz`` holding

  atlas        uint8 HxW coverage (0 = transparent, 255 = ink), glyphs packed in shelves
  codepoints   int32 N      the characters, sorted
  rects        int32 Nx4    (x, y, w, h) of each glyph in the atlas (w or h 0 for blank glyphs)
  offsets      int32 Nx2    (left, top) of the glyph bitmap relative to the pen on the baseline (top < 0)
  advances     float32 N    pen advance in pixels
  kern_pairs   int32 Kx2    codepoint pairs whose spacing differs from the sum of the advances
  kern_values  float32 K    the adjustment added to the pen between the pair, in pixels
  metrics      float32 [size, ascent, descent, cap_height, x_height]

and the licence of the font is copied next to it as ``LICENSE-DejaVu.txt``.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
COPYRIGHT = Path("/usr/share/doc/fonts-dejavu-core/copyright")
FONTS = {"sans-bold": "DejaVuSans-Bold.ttf", "sans": "DejaVuSans.ttf"}
# Printable ASCII plus the few symbols the screen uses (units, ellipsis, markers).
EXTRA = "°±µ²…×·•–—→←↑↓≤≥✓✗▲▼■●⚠"
CHARSET = "".join(chr(c) for c in range(0x20, 0x7F)) + EXTRA
ATLAS_WIDTH = 1024
NO_LIGATURES = ["-liga", "-clig", "-dlig"]


def _is_missing(font: ImageFont.FreeTypeFont, ch: str, notdef: bytes) -> bool:
    mask = font.getmask(ch)
    return ch != " " and bytes(mask) == notdef


def rasterise(path: Path, size: int) -> dict[str, np.ndarray]:
    font = ImageFont.truetype(str(path), size)
    notdef = bytes(font.getmask("\U0010fffd"))
    ascent, descent = font.getmetrics()
    chars = [ch for ch in CHARSET if not _is_missing(font, ch, notdef)]
    skipped = sorted(set(CHARSET) - set(chars))
    if skipped:
        print(f"{path.name}: not in the font, left out: {''.join(skipped)}")

    bitmaps, offsets, advances = [], [], []
    for ch in chars:
        left, top, right, bottom = font.getbbox(ch, anchor="ls")
        advances.append(font.getlength(ch, features=NO_LIGATURES))
        if right <= left or bottom <= top:
            bitmaps.append(np.zeros((0, 0), np.uint8))
            offsets.append((0, 0))
            continue
        img = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(img).text((-left, -top), ch, font=font, fill=255, anchor="ls")
        bm = np.asarray(img, np.uint8)
        # Trim empty borders the bbox may include.
        rows, cols = np.nonzero(bm.any(axis=1))[0], np.nonzero(bm.any(axis=0))[0]
        if rows.size == 0:
            bitmaps.append(np.zeros((0, 0), np.uint8))
            offsets.append((0, 0))
            continue
        bm = bm[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        bitmaps.append(bm)
        offsets.append((left + int(cols[0]), top + int(rows[0])))

    # Shelf packing, tallest first, 1 px gutter so bilinear/area filters never bleed.
    order = sorted(range(len(chars)), key=lambda i: -bitmaps[i].shape[0])
    rects = np.zeros((len(chars), 4), np.int32)
    x = y = shelf_h = 0
    for i in order:
        h, w = bitmaps[i].shape
        if w == 0:
            continue
        if x + w + 1 > ATLAS_WIDTH:
            x, y, shelf_h = 0, y + shelf_h + 1, 0
        rects[i] = (x, y, w, h)
        x += w + 1
        shelf_h = max(shelf_h, h)
    atlas = np.zeros((y + shelf_h, ATLAS_WIDTH), np.uint8)
    for i, (ax, ay, w, h) in enumerate(rects):
        if w:
            atlas[ay : ay + h, ax : ax + w] = bitmaps[i]

    kern_pairs, kern_values = [], []
    if features.check("raqm"):
        single = {ch: font.getlength(ch, features=NO_LIGATURES) for ch in chars}
        for a, b in itertools.product(chars, repeat=2):
            k = font.getlength(a + b, features=NO_LIGATURES) - single[a] - single[b]
            if abs(k) >= 0.5:
                kern_pairs.append((ord(a), ord(b)))
                kern_values.append(k)
    else:
        print("Pillow has no libraqm: no kerning stored")

    cap = font.getbbox("H", anchor="ls")
    xh = font.getbbox("x", anchor="ls")
    return {
        "atlas": atlas,
        "codepoints": np.array([ord(c) for c in chars], np.int32),
        "rects": rects,
        "offsets": np.array(offsets, np.int32).reshape(-1, 2),
        "advances": np.array(advances, np.float32),
        "kern_pairs": np.array(kern_pairs, np.int32).reshape(-1, 2),
        "kern_values": np.array(kern_values, np.float32),
        "metrics": np.array([size, ascent, descent, -cap[1], -xh[1]], np.float32),
    }


def write_license(out: Path) -> None:
    text = COPYRIGHT.read_text(encoding="utf-8")
    # The font files' own section ("Files: *"), up to the packaging section.
    match = re.search(r"Files: \*\n(.*?)\n\nFiles:", text, re.S)
    body = match.group(1) if match else text
    lines = []
    for line in body.splitlines():
        line = line[1:] if line.startswith(" ") else line
        lines.append("" if line.strip() == "." else line.rstrip())
    header = (
        "DejaVu Sans and DejaVu Sans Bold, rasterised into firmware_app/display/fonts/*.npz by\n"
        "tools/make_font_atlas.py. Source: https://dejavu-fonts.github.io/\n\n"
    )
    (out / "LICENSE-DejaVu.txt").write_text(header + "\n".join(lines).rstrip() + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=96, help="master size in pixels (em)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "firmware_app/display/fonts"
    )
    ap.add_argument("--font-dir", type=Path, default=FONT_DIR)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, filename in FONTS.items():
        data = rasterise(args.font_dir / filename, args.size)
        path = args.out / f"{name}.npz"
        np.savez_compressed(path, **data)
        print(
            f"{path}: {len(data['codepoints'])} glyphs, atlas {data['atlas'].shape[1]}x{data['atlas'].shape[0]}, "
            f"{len(data['kern_values'])} kerning pairs, {path.stat().st_size / 1024:.0f} kB"
        )
    write_license(args.out)


if __name__ == "__main__":
    main()
