"""Image files for tests, written without holding their pixels: a PNG of any claimed size."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int, colour: int = 2) -> bytes:
    """Signature + IHDR of an 8-bit PNG (colour type 0 gray, 2 RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)


def write_png(path: Path, width: int, height: int, colour: int = 2, rows: int | None = None) -> Path:
    """A PNG claiming ``width`` x ``height``, striped, streamed row by row. ``rows`` < height writes only
    that many rows of image data (a header that claims more than the file holds)."""
    channels = 3 if colour == 2 else 1
    comp = zlib.compressobj(1)
    line_a = b"\x00" + bytes(range(256)) * (width * channels // 256) + bytes(width * channels % 256)
    line_b = b"\x00" + b"\x40" * (width * channels)
    parts = [png_header(width, height, colour)]
    data = []
    for y in range(height if rows is None else rows):
        data.append(comp.compress(line_a if (y // 16) % 2 else line_b))
    data.append(comp.flush())
    parts.append(_chunk(b"IDAT", b"".join(data)))
    parts.append(_chunk(b"IEND", b""))
    path.write_bytes(b"".join(parts))
    return path
