"""What an image file says of itself before it is decoded: format, width, height, channels.

A decoder allocates what the header claims; a file from outside may claim 60000 x 60000. Reading the
header first lets ``images:`` refuse such a file, or decode it at a reduced scale, before any pixel is
allocated. Only the formats ``images:`` reads are known: PNG, JPEG, BMP, TIFF, PGM/PPM/PBM.
``read_header`` raises ValueError with a short reason for a file that is none of them or whose header is
cut short or inconsistent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}  # the decoder buffers every coefficient of the whole image
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels
_MAX_SEGMENTS = 10_000
# the board's [source] max_pixels when it states none: the largest image decoded at full scale
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "png" | "jpeg" | "bmp" | "tiff" | "pnm"
    width: int
    height: int
    channels: int  # as stored: 1 gray, 2 gray+alpha, 3 colour, 4 colour+alpha
    # True when the decoder can scale while decoding (baseline JPEG): a reduced decode then holds only
    # the reduced image; every other format is decoded whole first
    scales_in_decoder: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def gray(self) -> bool:
        return self.channels <= 2


def read_header(fh: BinaryIO) -> ImageHeader:
    try:
        return _read_header(fh)
    except struct.error as exc:
        raise ValueError(f"image header cut short or malformed ({exc})") from None


def _read_header(fh: BinaryIO) -> ImageHeader:
    head = fh.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        header = _png(head)
    elif head.startswith(b"\xff\xd8"):
        header = _jpeg(fh)
    elif head.startswith(b"BM"):
        header = _bmp(fh)
    elif head[:4] in (b"II*\x00", b"MM\x00*"):
        header = _tiff(fh, head[:2] == b"II")
    elif len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        header = _pnm(fh)
    else:
        raise ValueError("not an image (no PNG, JPEG, BMP, TIFF or PNM header)")
    if header.width <= 0 or header.height <= 0:
        raise ValueError(f"{header.format.upper()} header claims {header.width}x{header.height} pixels")
    return header


def _png(head: bytes) -> ImageHeader:
    if len(head) < 29 or head[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR header (truncated file?)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"PNG header: bit depth {depth} / colour type {colour} is not valid")
    return ImageHeader("png", width, height, _PNG_CHANNELS[colour])


def _jpeg(fh: BinaryIO) -> ImageHeader:
    fh.seek(2)
    for _ in range(_MAX_SEGMENTS):
        if fh.read(1) != b"\xff":
            break
        marker = fh.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = fh.read(1)
        if not marker:
            break
        code = marker[0]
        if code in (0x01, 0xD8) or 0xD0 <= code <= 0xD7:  # markers without a length
            continue
        if code in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            break
        raw = fh.read(2)
        if len(raw) < 2:
            break
        (length,) = struct.unpack(">H", raw)
        if length < 2:
            raise ValueError(f"JPEG: segment 0xFF{code:02X} has length {length}")
        if code in _SOF:
            body = fh.read(6)
            if len(body) < 6:
                break
            _, height, width, components = struct.unpack(">BHHB", body)
            if height == 0:
                raise ValueError("JPEG: height 0 (defined later by a DNL marker) is not supported")
            if components not in (1, 3, 4):
                raise ValueError(f"JPEG header: {components} colour components")
            channels = 1 if components == 1 else 3
            return ImageHeader("jpeg", width, height, channels, scales_in_decoder=code not in _PROGRESSIVE)
        fh.seek(length - 2, 1)
    raise ValueError("JPEG: no start-of-frame header (truncated or corrupt file)")


def _bmp(fh: BinaryIO) -> ImageHeader:
    fh.seek(14)
    raw = fh.read(16)
    if len(raw) < 12:
        raise ValueError("BMP header cut short (truncated file?)")
    (size,) = struct.unpack("<I", raw[:4])
    if size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bits = struct.unpack("<HHHH", raw[4:12])
    elif size >= 40 and len(raw) == 16:
        width, height, _, bits = struct.unpack("<iiHH", raw[4:16])
    else:
        raise ValueError(f"BMP header of {size} bytes is not valid")
    return ImageHeader("bmp", abs(width), abs(height), 4 if bits == 32 else 3)


def _tiff(fh: BinaryIO, little: bool) -> ImageHeader:
    end = "<" if little else ">"
    fh.seek(4)
    raw = fh.read(4)
    if len(raw) < 4:
        raise ValueError("TIFF header cut short (truncated file?)")
    (offset,) = struct.unpack(end + "I", raw)
    fh.seek(offset)
    raw = fh.read(2)
    if len(raw) < 2:
        raise ValueError(f"TIFF: first directory at {offset} is past the end of the file")
    (count,) = struct.unpack(end + "H", raw)
    entries = fh.read(12 * count)
    if len(entries) < 12 * count:
        raise ValueError("TIFF directory cut short (truncated file?)")
    found: dict[int, int] = {}
    for i in range(count):
        tag, kind, _n, value = struct.unpack(end + "HHI4s", entries[12 * i : 12 * i + 12])
        if tag in (256, 257, 277):  # ImageWidth, ImageLength, SamplesPerPixel
            fmt = {3: "H", 4: "I"}.get(kind)
            if fmt is None:
                continue
            found[tag] = struct.unpack(end + fmt, value[: struct.calcsize(fmt)])[0]
    if 256 not in found or 257 not in found:
        raise ValueError("TIFF directory without ImageWidth/ImageLength")
    samples = found.get(277, 1)
    return ImageHeader("tiff", found[256], found[257], 1 if samples <= 2 else 3)


def _pnm(fh: BinaryIO) -> ImageHeader:
    fh.seek(0)
    text = fh.read(1024)
    kind = text[1:2]
    tokens: list[bytes] = []
    for line in text[2:].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            break
    try:
        width, height = int(tokens[0]), int(tokens[1])
    except (IndexError, ValueError):
        raise ValueError("PNM header without a width and height") from None
    return ImageHeader("pnm", width, height, 3 if kind in b"36" else 1)
