"""DICOM source: ``dicom:FILE`` (single- or multi-frame) or ``dicom:DIR[?watch=0][&poll=0.25]``.

A file yields every frame in order. A folder yields every file in it (sorted by name, not recursive),
then keeps watching it for new files (``watch=1``, the default): a new file is read only once its size
and modification time have been stable for one poll, so a file still being copied is never mistaken
for a broken one. Hidden files (``.name``, e.g. rsync's temporary files) and ``DICOMDIR`` are ignored.
With ``watch=0`` the source ends after the files present at start.

Pixels become the Frame contract (HxW gray or HxWx3 BGR uint8) in ``to_display_uint8``: modality LUT or
rescale, then the VOI LUT or the first window (else a robust min-max of the frame), MONOCHROME1 inverted
so that high = bright, PALETTE COLOR through its palette, RGB/YBR to BGR. 8-bit grayscale without any
LUT or window (ultrasound) is passed through unchanged. A Rescale Slope/Intercept or Window
Center/Width that is not a finite number, a slope of 0, or values that overflow float32 over the stored
range would give a flat or garbage frame: the file is refused by name instead.

A file without the 128-byte preamble is read when it starts like a data element (file meta or a bare
dataset, either byte order).

A broken file raises ``BadFrame("PATH: problem")`` from ``read``; the next ``read`` moves on. Compressed
transfer syntaxes decode through pydicom's plugins (pylibjpeg, ...); when none is installed, the file is
skipped with a message naming the package to install.

``meta["dicom_header"]`` is the file's dataset without its pixel data, for DICOM export. It carries
patient identifiers: never log it.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadSource, SourceUnavailable
from firmware_app.sources import register
from firmware_app.sources.base import Source, float_param, int_param
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region import dicom_region
from firmware_app.types import Frame

log = logging.getLogger(__name__)

# Pixel data elements left out of ``dicom_header`` (Float/Double Float Pixel Data, Extended Offset Table)
_PIXEL_TAGS = frozenset({0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009, 0x7FE00010})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Transfer syntax UID -> (what is missing, what to install). pydicom decodes native syntaxes, Deflate
# and RLE itself; the others need a plugin.
_J2K = ("a JPEG 2000 decoder", "pip install pylibjpeg pylibjpeg-openjpeg")
_JPG = ("a JPEG decoder", "pip install pylibjpeg pylibjpeg-libjpeg")
_DECODER_HINTS: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2.4.50": _JPG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": _JPG,  # JPEG Extended
    "1.2.840.10008.1.2.4.57": ("a JPEG Lossless decoder", _JPG[1]),
    "1.2.840.10008.1.2.4.70": ("a JPEG Lossless decoder", _JPG[1]),
    "1.2.840.10008.1.2.4.80": ("a JPEG-LS decoder", _JPG[1]),
    "1.2.840.10008.1.2.4.81": ("a JPEG-LS decoder", _JPG[1]),
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": ("an HTJ2K decoder", "pip install pylibjpeg pylibjpeg-openjpeg>=2.4"),
    "1.2.840.10008.1.2.4.202": ("an HTJ2K decoder", "pip install pylibjpeg pylibjpeg-openjpeg>=2.4"),
    "1.2.840.10008.1.2.4.203": ("an HTJ2K decoder", "pip install pylibjpeg pylibjpeg-openjpeg>=2.4"),
    "1.2.840.10008.1.2.5": ("an RLE decoder", "pip install pylibjpeg pylibjpeg-rle"),
}
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_F32_MAX = float(np.finfo(np.float32).max)


class _BadValue(ValueError):
    """An attribute whose value would turn the frame into garbage (NaN, overflow): the file is refused."""


def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- pixel pipeline -----------------------------------------------------------------------------------
def to_display_uint8(ds: Any, arr: np.ndarray, photometric: str | None = None) -> np.ndarray:
    """Turn one decoded frame of ``ds`` into display-ready uint8: HxW gray or HxWx3 BGR.

    ``photometric`` is the colour space ``arr`` is actually in (pydicom's decoders report it). When
    None, ``arr`` is taken to be what pydicom's ``pixel_array`` returns: YBR_FULL/YBR_FULL_422 data
    already converted to RGB. Neither ``ds`` nor ``arr`` is changed; 8-bit gray without any LUT
    or window may come back as ``arr`` itself (treat the result as read-only).
    """
    return _DisplayMapper(ds)(arr, photometric)


class _DisplayMapper:
    """The per-file part of the pixel pipeline (palette table, window, LUT ranges), computed once."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        self.bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        self._palette: tuple[np.ndarray, int] | None = None
        self._voi_range: tuple[float, float] | None = None
        if self.pi in ("MONOCHROME1", "MONOCHROME2"):
            self._check_numbers()

    def _check_numbers(self) -> None:
        """Rescale and window values must be finite and keep every stored value finite in float32."""
        values = {}
        for name, keyword, macro in (
            ("Rescale Slope", "RescaleSlope", "PixelValueTransformationSequence"),
            ("Rescale Intercept", "RescaleIntercept", "PixelValueTransformationSequence"),
            ("Window Center", "WindowCenter", "FrameVOILUTSequence"),
            ("Window Width", "WindowWidth", "FrameVOILUTSequence"),
        ):
            value = _first_float(self._attr(keyword, macro), None)
            if value is not None and not np.isfinite(value):
                raise _BadValue(f"{name} {value} is not a finite number")
            if value is not None and abs(value) > _F32_MAX:
                raise _BadValue(f"{name} {value:g} is out of range (more than {_F32_MAX:.3g})")
            values[name] = value
        if self.ds.get("ModalityLUTSequence"):
            return
        slope, intercept = values["Rescale Slope"], values["Rescale Intercept"]
        if slope is None and intercept is None:
            return
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        if slope == 0.0:
            raise _BadValue("Rescale Slope 0 maps every pixel to one value")
        bits = min(max(self.bits_stored, 1), 64)
        signed = int(self.ds.get("PixelRepresentation") or 0) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        ends = [slope * float(v) + intercept for v in (lo, hi)]
        if not all(np.isfinite(e) and abs(e) <= _F32_MAX for e in ends):
            raise _BadValue(
                f"Rescale Slope {slope:g} / Intercept {intercept:g} overflow: stored values {lo}..{hi} "
                f"map beyond +-{_F32_MAX:.3g}"
            )

    # -- dispatch --
    def __call__(self, arr: np.ndarray, photometric: str | None = None) -> np.ndarray:
        pi = self.pi if photometric is None else str(photometric).strip().upper()
        if photometric is None and pi in ("YBR_FULL", "YBR_FULL_422"):
            pi = "RGB"  # what pixel_array returns
        if pi == "PALETTE COLOR":
            return cv2.cvtColor(self._palette_rgb(arr), cv2.COLOR_RGB2BGR)
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim != 2:
                raise ValueError(f"{pi} frame has shape {arr.shape}, expected rows x columns")
            out = self._gray(arr)
            return 255 - out if pi == "MONOCHROME1" else out
        if pi in _COLOR:
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"{pi} frame has shape {arr.shape}, expected rows x columns x 3")
            if pi in ("YBR_FULL", "YBR_FULL_422"):
                from pydicom.pixels import convert_color_space

                arr = convert_color_space(arr, "YBR_FULL", "RGB")
            # YBR_ICT / YBR_RCT are undone by the JPEG 2000 decoder: the data is RGB here
            return cv2.cvtColor(self._color_to_uint8(arr), cv2.COLOR_RGB2BGR)
        raise ValueError(f"unsupported photometric interpretation {pi!r}")

    # -- colour --
    def _color_to_uint8(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype == np.uint8:
            return arr
        bits = self.bits_stored if self.bits_stored > 8 else 8 * arr.dtype.itemsize
        top = float(2**bits - 1)
        if arr.dtype.kind == "f":
            top = max(float(arr.max()), 1.0) if arr.size else 1.0
        return _to_u8(arr.astype(np.float32) * np.float32(1.0 / top))

    def _palette_rgb(self, arr: np.ndarray) -> np.ndarray:
        if self._palette is None:
            from pydicom.pixels import apply_color_lut

            signed = int(self.ds.get("PixelRepresentation", 0)) == 1
            nbits = 16 if arr.dtype.itemsize > 1 else 8
            lo = -(2 ** (nbits - 1)) if signed else 0
            ramp = np.arange(lo, lo + 2**nbits, dtype=np.int32)
            table = apply_color_lut(ramp, self.ds)[..., :3]
            if table.dtype != np.uint8:
                table = (table >> 8) if int(table.max()) > 255 else table
            self._palette = (np.ascontiguousarray(table.astype(np.uint8)), lo)
        table, lo = self._palette
        idx = arr.astype(np.int32) - lo if lo else arr
        return table[np.clip(idx, 0, len(table) - 1)]

    # -- grayscale --
    def _gray(self, arr: np.ndarray) -> np.ndarray:
        ds = self.ds
        x: np.ndarray = arr
        transformed = False
        if ds.get("ModalityLUTSequence"):
            from pydicom.pixels import apply_modality_lut

            x = apply_modality_lut(arr, ds)
            transformed = True
        else:
            slope = _first_float(self._attr("RescaleSlope", "PixelValueTransformationSequence"), 1.0)
            intercept = _first_float(self._attr("RescaleIntercept", "PixelValueTransformationSequence"), 0.0)
            if slope != 1.0 or intercept != 0.0:
                x = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
                transformed = True

        if ds.get("VOILUTSequence"):
            from pydicom.pixels import apply_voi

            y = apply_voi(x if x.dtype.kind in "iu" else np.rint(x).astype(np.int64), ds, 0)
            lo, hi = self._voi_lut_range()
            return _to_u8((y.astype(np.float32) - lo) / max(hi - lo, 1.0))

        window = self._window()
        if window is not None:
            return _to_u8(_apply_window(x, *window))

        if not transformed and x.dtype.kind == "u" and self.bits_stored <= 8:
            if self.bits_stored == 8 and x.dtype == np.uint8:
                return np.ascontiguousarray(x)  # 8-bit gray (ultrasound): already display-ready
            return _to_u8(x.astype(np.float32) * np.float32(1.0 / (2**self.bits_stored - 1)))
        return _to_u8(_stretch(x))

    def _window(self) -> tuple[float, float, str] | None:
        center = _first_float(self._attr("WindowCenter", "FrameVOILUTSequence"), None)
        width = _first_float(self._attr("WindowWidth", "FrameVOILUTSequence"), None)
        if center is None or width is None or not width > 0:
            return None
        func = str(self._attr("VOILUTFunction", "FrameVOILUTSequence") or "LINEAR")
        return center, width, func.strip().upper()

    def _attr(self, keyword: str, macro: str) -> Any:
        """A top-level attribute, else the one in the Shared Functional Groups (enhanced objects)."""
        value = self.ds.get(keyword)
        if value is None:
            try:
                value = self.ds.SharedFunctionalGroupsSequence[0][macro][0].get(keyword)
            except (AttributeError, IndexError, KeyError, TypeError):
                return None
        return value

    def _voi_lut_range(self) -> tuple[float, float]:
        if self._voi_range is None:
            from pydicom.pixels import apply_voi

            desc = self.ds.VOILUTSequence[0].LUTDescriptor
            n = int(desc[0]) or 2**16
            table = apply_voi(np.arange(int(desc[1]), int(desc[1]) + n, dtype=np.int64), self.ds, 0)
            self._voi_range = (float(table.min()), float(table.max()))
        return self._voi_range


def _first_float(value: Any, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else default
        return default if value is None else float(value)
    except (TypeError, ValueError, IndexError):
        return default


def _apply_window(x: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2: the VOI window to [0, 1]."""
    xf = x.astype(np.float32, copy=False)
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (xf - center) / width))
    if func == "LINEAR_EXACT":
        return (xf - center) / width + 0.5
    if width <= 1.0:  # LINEAR needs width >= 1; width 1 is a threshold at the centre
        return (xf >= center - 0.5).astype(np.float32)
    return (xf - (center - 0.5)) / (width - 1.0) + 0.5


def _stretch(x: np.ndarray) -> np.ndarray:
    """No window: map the 0.5 to 99.5 percentiles of the frame (robust min-max) to [0, 1]."""
    sample = x[:: max(1, x.shape[0] // 512), :: max(1, x.shape[1] // 512)]
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, np.float32)
    return (x.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))


def _to_u8(y: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounded."""
    return (np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# -- loader -------------------------------------------------------------------------------------------
def load_frames(path: str | os.PathLike[str]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield (display-ready uint8 pixels, meta) for every frame of one DICOM file, in order.

    Decodes one frame at a time (a long cine is never held decoded in memory). Raises
    ``BadFrame("PATH: problem")`` for a file that cannot be used (not DICOM, truncated, no pixel
    data, missing decoder, undecodable); frames already yielded stay valid.
    """
    path = str(path)
    try:
        ds, decoder, tsyntax, n_frames, base_meta = _open_file(path)
        mapper = _DisplayMapper(ds)
        frames = decoder.iter_array(ds, as_rgb=True)
    except BadFrame:
        raise
    except _BadValue as exc:
        raise BadFrame(f"{path}: {exc}") from None
    except Exception as exc:  # anything odd in a file from outside is that file's problem
        raise BadFrame(f"{path}: cannot read ({_one_line(exc)})") from None
    index = 0
    while True:
        try:
            item = next(frames, None)
            if item is None:
                break
            arr, props = item
            pixels = mapper(arr, str(props.get("photometric_interpretation") or mapper.pi))
        except _BadValue as exc:
            raise BadFrame(f"{path}: {exc}") from None
        except Exception as exc:
            where = f" (frame {index + 1} of {n_frames})" if n_frames > 1 else ""
            raise BadFrame(f"{path}: {_pixel_problem(exc, tsyntax)}{where}") from None
        yield pixels, {**base_meta, "frame_index": index}
        index += 1
    if index == 0:
        raise BadFrame(f"{path}: pixel data holds no frame")


def _open_file(path: str) -> tuple[Any, Any, Any, int, dict[str, Any]]:
    ds = _read_dataset(path)
    decoder, tsyntax = _decoder_for(path, ds)
    raw_n = ds.get("NumberOfFrames")
    try:
        n_frames = max(1, int(raw_n)) if raw_n not in (None, "") else 1
    except (TypeError, ValueError):
        raise BadFrame(f"{path}: invalid NumberOfFrames {str(raw_n)!r}") from None
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    meta = {
        "path": path,
        "n_frames": n_frames,
        "StudyInstanceUID": _str_or_none(ds.get("StudyInstanceUID")),
        "SeriesInstanceUID": _str_or_none(ds.get("SeriesInstanceUID")),
        "SOPInstanceUID": _str_or_none(ds.get("SOPInstanceUID")),
        "SOPClassUID": _str_or_none(sop_class),
        "Modality": _str_or_none(ds.get("Modality")),
        "dicom_header": _header_without_pixels(ds),
        # the imaging region the file states (ultrasound regions) and its scale (sources.region)
        "region": dicom_region(ds, int(ds.Columns), int(ds.Rows)),
    }
    return ds, decoder, tsyntax, n_frames, meta


def _str_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _read_dataset(path: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BadFrame(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from None
    if size == 0:
        raise BadFrame(f"{path}: empty file")
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # No 128-byte preamble + 'DICM': accept a bare dataset only when it starts like one
            with open(path, "rb") as fh:
                head = fh.read(8)
            if not _starts_like_dataset(head, size):
                raise BadFrame(f"{path}: not a DICOM file (no 'DICM' marker)") from None
            ds = pydicom.dcmread(path, force=True)
    except BadFrame:
        raise
    except OSError as exc:
        raise BadFrame(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from None
    except Exception as exc:
        raise BadFrame(f"{path}: not a readable DICOM file ({_one_line(exc)})") from None

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if ds.get("Rows"):
            raise BadFrame(f"{path}: image header but no pixel data (truncated file?)")
        what = ds.get("Modality") or ""
        what = f"Modality {what}: " if what else ""
        raise BadFrame(f"{path}: no pixel data ({what}not an image, or a truncated file)")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise BadFrame(f"{path}: image attributes missing: {', '.join(missing)}")
    return ds


def _starts_like_dataset(head: bytes, size: int) -> bool:
    """Do these first bytes read as a data element (file meta or dataset, either byte order, explicit or
    implicit VR)? An even group up to the pixel data's, then a VR of two capitals or a length that fits."""
    if len(head) < 8:
        return False
    for order in "<>":
        group, _element = struct.unpack(order + "HH", head[:4])
        if group % 2 or not 0x0002 <= group <= 0x7FE0:
            continue
        vr = head[4:6]
        if vr.isalpha() and vr.isupper():
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if length <= size - 8:
            return True
    return False


def _decoder_for(path: str, ds: Any) -> tuple[Any, Any]:
    """The pydicom decoder for the file's transfer syntax, or BadFrame saying what to install."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not hasattr(ds, "file_meta"):
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if not tsyntax:
        # a bare dataset without file meta: the encoding it was parsed with tells the syntax
        implicit, little = ds.original_encoding
        if little is None:
            raise BadFrame(f"{path}: no transfer syntax and unknown encoding")
        tsyntax = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
        ds.file_meta.TransferSyntaxUID = tsyntax
    tsyntax = UID(str(tsyntax))
    name = f"{tsyntax.name} ({tsyntax})" if tsyntax.name != str(tsyntax) else str(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise BadFrame(
            f"{path}: transfer syntax {name} cannot be decoded here "
            "(video or an unsupported compression); decompress it first, e.g. gdcmconv --raw"
        ) from None
    if not decoder.is_available:
        raise BadFrame(f"{path}: {_missing_decoder(tsyntax)}")
    return decoder, tsyntax


def _missing_decoder(tsyntax: Any) -> str:
    what, install = _DECODER_HINTS.get(str(tsyntax), ("a decoder plugin", "pip install pylibjpeg"))
    return f"needs {what} for transfer syntax {tsyntax.name} ({tsyntax}): {install}"


def _pixel_problem(exc: BaseException, tsyntax: Any) -> str:
    text = _one_line(exc)
    if isinstance(exc, RuntimeError) and "missing dependencies" in str(exc):
        return _missing_decoder(tsyntax)
    if "less than expected" in text or "too short" in text.lower():
        return f"pixel data too short, truncated file? ({text.split(' - ')[0]})"
    return f"cannot decode pixel data ({tsyntax.name}): {text}"


def _header_without_pixels(ds: Any) -> Any:
    """A new Dataset with every element of ``ds`` but the pixel data (elements shared, not copied)."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for tag in ds.keys():
        if int(tag) not in _PIXEL_TAGS:
            header.add(ds[tag])
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        header.file_meta = file_meta
    header.preamble = getattr(ds, "preamble", None)
    implicit, little = ds.original_encoding
    header.set_original_encoding(implicit, little, ds.original_character_set)
    return header


# -- the source ---------------------------------------------------------------------------------------
@register("dicom")
class DicomSource(Source):
    """Frames from a DICOM file or a (watched) folder of DICOM files; every frame is processed."""

    live = False

    def __init__(
        self,
        uri: str,
        path: Path,
        *,
        watch: bool = True,
        poll_s: float = 0.25,
        profile: SourceProfile | None = None,
    ) -> None:
        super().__init__(uri, profile)
        self.path = path
        self.watch = watch
        self.poll_s = poll_s
        self._opened = False
        self._is_dir = False
        self._queue: deque[Path] = deque()
        # name -> (size, mtime_ns) when queued: a file that changes afterwards (rewritten, or a copy
        # that stalled longer than a poll and was read short) is read again once stable
        self._done: dict[str, tuple[int, int]] = {}
        # name -> ((size, mtime_ns), monotonic time that signature was first seen)
        self._pending: dict[str, tuple[tuple[int, int], float]] = {}
        self._frames: Iterator[tuple[np.ndarray, dict[str, Any]]] | None = None
        self._current: Path | None = None
        self._gone_reported = False

    @classmethod
    def from_uri(
        cls,
        uri: str,
        target: str,
        params: dict[str, str],
        *,
        profile: SourceProfile | None,
        options: dict[str, Any],
    ) -> DicomSource:
        unknown = sorted(set(params) - {"watch", "poll"})
        if unknown:
            raise BadSource(f"source {uri!r}: unknown parameter {unknown[0]!r}; known: watch, poll")
        if not target:
            raise BadSource(f"source {uri!r}: expected dicom:FILE or dicom:DIR")
        watch = int_param(uri, params, "watch", 1)
        if watch not in (0, 1):
            raise BadSource(f"source {uri!r}: watch={watch} must be 0 or 1")
        poll = float_param(uri, params, "poll", float(options.get("poll_s", 0.25)), minimum=0.01)
        path = Path(target).expanduser()
        if not path.exists():
            raise BadSource(f"source {uri!r}: {path} does not exist")
        return cls(uri, path, watch=bool(watch), poll_s=poll, profile=profile)

    # -- lifecycle --
    def open(self) -> None:
        if self._opened:
            return
        if self.path.is_dir():
            self._is_dir = True
            try:
                self._scan(initial=True)
            except SourceUnavailable as exc:
                raise BadSource(str(exc)) from None
        elif self.path.is_file():
            self._queue.append(self.path)
        else:
            raise BadSource(f"source {self.uri!r}: {self.path} does not exist or is not a file or folder")
        self._opened = True

    def close(self) -> None:
        super().close()
        frames, self._frames = self._frames, None
        if frames is not None:
            frames.close()  # type: ignore[attr-defined]
        self._queue.clear()

    def read(self) -> Frame | None:
        if not self._opened:
            self.open()
        while not self.stopping.is_set():
            if self._frames is not None:
                try:
                    pixels, meta = next(self._frames)
                except StopIteration:
                    self._frames = None
                    continue
                except BadFrame:
                    self._frames = None
                    raise
                meta = dict(meta)
                region = meta.pop("region", None)
                if region is not None and meta["frame_index"] == 0:
                    for note in region.notes:
                        log.warning("%s: %s", meta["path"], note)
                try:
                    return self.make_frame(pixels, meta, region=region)
                except ValueError as exc:  # the profile's crop does not fit this frame
                    raise BadFrame(f"{meta['path']}: frame {meta['frame_index']}: {exc}") from None
            if self._queue:
                self._current = self._queue.popleft()
                self._frames = load_frames(self._current)
                continue
            if not (self._is_dir and self.watch):
                return None
            self._scan(initial=False)
            if not self._queue:
                self.stopping.wait(self.poll_s)
        return None

    # -- folder watching --
    def _scan(self, initial: bool) -> None:
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            if self._gone_reported:
                return
            self._gone_reported = True
            raise SourceUnavailable(
                f"source {self.uri!r}: cannot list {self.path} ({_one_line(exc.strerror or exc)})"
            ) from None
        self._gone_reported = False
        now_ns = time.time_ns()
        now = time.monotonic()
        present: set[str] = set()
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue
            present.add(name)
            sig = (st.st_size, st.st_mtime_ns)
            if self._done.get(name) == sig:
                continue
            if initial and not self.watch:
                ready = True  # watch=0: take the folder as it is
            elif initial and now_ns - st.st_mtime_ns > 1_000_000_000 and st.st_size > 0:
                ready = True  # present at start and not being written
            else:
                seen = self._pending.get(name)
                if seen is None or seen[0] != sig:
                    self._pending[name] = (sig, now)
                    continue
                # unchanged for at least one poll (and not empty: a copy creates the file first)
                ready = st.st_size > 0 and now - seen[1] >= 0.9 * self.poll_s
            if ready:
                self._pending.pop(name, None)
                self._done[name] = sig
                self._queue.append(Path(entry.path))
        for table in (self._done, self._pending):
            for name in [n for n in table if n not in present]:
                del table[name]
