"""Captures: what the box saw and said, one encrypted file each, complete or absent.

A capture holds the frame's pixels, the model's result on it (mask, contours, heatmap, boxes, finding), the
model's id, version and bundle hash (SHA-256 of ``model.tflite``), a short pre-trigger clip, the study
context and the capture time. It is written as ONE file ``<data-dir>/captures/<id>.cap``: the parts are
packed into an in-memory ``.npz`` (no pickle), sealed with AES-256-GCM (``crypto.CaptureCipher``) and
written with ``fsutil.write_new`` (anonymous temp inode, fsync, link, fsync dir): a capture killed
mid-write, or a power cut, leaves no file at all. Disk full raises ``StorageFull`` and leaves nothing.

Cases the clinician marks "disagree" are the same kind of record with the mark, in ``<id>.case`` files;
they go out through the feedback export (de-identified), not to the PACS.

Study context: for a DICOM source, from the source file's header (``frame.meta["dicom_header"]``, stored
inside the encrypted file only); for a video source, from the current study that ``new_patient()`` starts
(generated Study Instance UID, Study ID and a device-generated Patient ID; no names), kept in
``captures/current-study.json`` so that a restart mid-examination does not split the study.

Imaging region: a capture keeps where its pixels came from (``RegionFacts``: the frame's
``imaging_region`` [x, y, w, h] in source pixels, ``region_from``, ``mm_per_px`` and the source picture's
``full_size``), so that an export can tell whether the scanner's chrome (patient name, date) was cut
off. A capture written before these facts were kept loads as ``region_from = "full_frame"`` with the rest
unknown: nothing is claimed about its pixels.

Exported captures get a plain marker ``<id>.exported`` (export id, time, de-identified or not: no patient
data); ``purge_exported`` deletes only captures that have one, i.e. after a successful export.

Threads: ``Recorder.on_result`` is a pipeline listener (inference thread) and does almost nothing: it keeps
a reference to the newest (frame, result) and hands clip frames and captures to the recorder's own worker
thread, which JPEG-encodes the clip and writes the files. Bounded queues: when the disk is slower than the
requests, clip frames and then captures are skipped (counted, logged, shown), never inference.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app.records.crypto import CaptureCipher
from firmware_app.records.errors import (
    CaptureCorrupt,
    CaptureNotFound,
    CaptureWriteFailed,
    RecorderBusy,
    RecordsError,
    StorageFull,
)
from firmware_app.records.fsutil import free_bytes, remove_stale_temps, write_new, write_replace
from firmware_app.shapes import BoxShape, Heatmap, Mask, Point, Polygon, Shape
from firmware_app.sources.grab import full_resolution
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

CAPTURES_DIR = "captures"
CAPTURE_SUFFIX = ".cap"
CASE_SUFFIX = ".case"
EXPORTED_SUFFIX = ".exported"
FEEDBACK_SUFFIX = ".feedback-exported"
STUDY_FILE = "current-study.json"
FORMAT_VERSION = 1
MIN_FREE_BYTES = 64 * 1024 * 1024  # keep room for the audit log and the system
MAX_PENDING_CAPTURES = 8
MAX_PENDING_CLIP = 4
MARK_REASONS = ("false_positive", "false_negative", "wrong_location", "wrong_label", "other")


# -- value objects ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """Which model produced a result: what exports and the audit log name."""

    id: str
    version: str
    task: str
    bundle_sha256: str
    labels: tuple[str, ...] = ()
    cleared_for_clinical_use: bool = False
    intended_use: str = ""

    @classmethod
    def from_model(cls, ref: Any) -> ModelInfo:
        """From a ``ModelRef`` (manifest + folder); the hash of ``model.tflite`` is cached per file."""
        m = ref.manifest
        return cls(
            id=m.id,
            version=m.version,
            task=m.task,
            bundle_sha256=_file_sha256(Path(ref.tflite)),
            labels=tuple(m.labels),
            cleared_for_clinical_use=bool(m.cleared_for_clinical_use),
            intended_use=m.intended_use,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelInfo:
        return cls(**{**d, "labels": tuple(d.get("labels", ()))})


_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    import hashlib

    try:
        st = path.stat()
    except OSError:
        return ""
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _sha_lock:
        _sha_cache[key] = digest
    return digest


@dataclass(frozen=True)
class Study:
    """The study a capture belongs to (DICOM General Study + Patient modules, as far as the box knows)."""

    study_uid: str
    study_id: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    patient_id: str
    patient_name: str = ""
    accession_number: str = ""
    origin: str = "new_patient"  # "new_patient" | "dicom"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Study:
        return cls(**d)


@dataclass(frozen=True)
class Mark:
    """The clinician's mark on a case: disagree, optionally with what they think is right."""

    verdict: str = "disagree"
    expected_label: str | None = None  # one of the model's labels, or None for "no finding"
    reason: str | None = None  # one of MARK_REASONS (no free text: it could carry identifiers)

    def __post_init__(self) -> None:
        if self.reason is not None and self.reason not in MARK_REASONS:
            raise ValueError(f"mark reason {self.reason!r} must be one of {', '.join(MARK_REASONS)}")


@dataclass(frozen=True)
class RegionFacts:
    """Where a capture's pixels came from in the source picture (``firmware_app.sources.region``).

    ``region_from`` is one of ``board``, ``dicom``, ``detected`` (the region is established: the pixels are
    that region) or ``full_frame`` (not established: nothing is known about what the picture holds).
    """

    region_from: str = "full_frame"
    imaging_region: tuple[int, int, int, int] | None = None  # x, y, w, h in source pixels; None: unknown
    mm_per_px: tuple[float, float] | None = None  # (dx, dy) of one source pixel, or unknown
    full_size: tuple[int, int] | None = None  # (width, height) of the source picture, or unknown

    @property
    def established(self) -> bool:
        """The imaging region is known (a board crop, the file's own statement or a detected one)."""
        return self.region_from != "full_frame" and self.imaging_region is not None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> RegionFacts:
        """From a frame's (or a stored capture's) meta; anything malformed is unknown, never a claim."""
        from firmware_app.sources.region import ORIGINS

        rect = _ints(meta.get("imaging_region"), 4)
        if rect is not None and (rect[2] <= 0 or rect[3] <= 0 or rect[0] < 0 or rect[1] < 0):
            rect = None
        origin = meta.get("region_from")
        if origin not in ORIGINS or rect is None:
            origin = "full_frame"
        size = _ints(meta.get("full_size"), 2)
        mm = meta.get("mm_per_px")
        scale: tuple[float, float] | None = None
        if isinstance(mm, (list, tuple)) and len(mm) == 2:
            try:
                dx, dy = float(mm[0]), float(mm[1])
            except (TypeError, ValueError):
                dx = dy = math.nan
            if math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0:
                scale = (dx, dy)
        return cls(str(origin), rect, scale, size)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {
            "region_from": self.region_from,
            "imaging_region": None if self.imaging_region is None else list(self.imaging_region),
            "mm_per_px": None if self.mm_per_px is None else list(self.mm_per_px),
            "full_size": None if self.full_size is None else list(self.full_size),
        }


def _ints(value: Any, n: int) -> tuple[int, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return None
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class ClipFrame:
    frame_id: int
    t_capture_ns: int
    jpeg: bytes

    def image(self) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_UNCHANGED)


@dataclass(frozen=True)
class CaptureInfo:
    """A capture as listed, without opening it."""

    id: str
    kind: str  # "capture" | "disagree"
    path: Path
    size: int
    exported: bool


@dataclass
class Capture:
    """A capture, decrypted."""

    id: str
    kind: str
    reason: str
    time_utc: str  # ISO 8601, when it was captured
    frame_id: int
    t_capture_ns: int
    pixels: np.ndarray
    result: Result | None
    model: ModelInfo | None
    study: Study
    source: dict[str, Any]  # uri, modality, frame_index, original SOP class/instance UIDs
    dicom_header: Any = None  # the source file's header (pydicom Dataset) or None
    clip: list[ClipFrame] = field(default_factory=list)
    mark: Mark | None = None
    silent_trial: bool = False
    region: RegionFacts = field(default_factory=RegionFacts)

    @property
    def modality(self) -> str:
        return str(self.source.get("modality") or "OT")


# -- serialisation --------------------------------------------------------------------------------------------
def result_json(r: Result) -> dict[str, Any]:
    return {
        "frame_id": int(r.frame_id),
        "task": r.task,
        "label": r.label,
        "confidence": None if r.confidence is None else float(r.confidence),
        "alert": bool(r.alert),
        "probabilities": {str(k): float(v) for k, v in dict(r.probabilities).items()},
        "boxes": [
            {
                "x0": float(b.x0),
                "y0": float(b.y0),
                "x1": float(b.x1),
                "y1": float(b.y1),
                "score": float(b.score),
                "label": str(b.label),
            }
            for b in r.boxes
        ],
        "centroid": None if r.centroid is None else [float(r.centroid[0]), float(r.centroid[1])],
        "area_fraction": None if r.area_fraction is None else float(r.area_fraction),
        "points": [{"x": float(p.x), "y": float(p.y), "label": p.label, "score": p.score} for p in r.points],
        # what the finding stage decided (tasks.finding): a capture says whether the AI had paused
        "state": r.state,
        "gate": None if r.gate is None else [float(r.gate[0]), float(r.gate[1])],
        "size": None if r.size is None else [float(r.size[0]), str(r.size[1])],
        "measurements": {str(k): [float(v), str(u)] for k, (v, u) in dict(r.measurements).items()},
        "paused": r.paused,
    }


def _result_from(d: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Result:
    shapes: list[Shape] = []
    if "heatmap" in arrays:
        shapes.append(Heatmap(arrays["heatmap"]))
    if "mask" in arrays:
        c = d["centroid"]
        shapes.append(Mask(arrays["mask"], None if c is None else (c[0], c[1]), d["area_fraction"]))
    if "contours" in arrays:
        flat, lengths = arrays["contours"], arrays["contour_lengths"]
        shapes += [Polygon(c) for c in (np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else ())]
    shapes += [BoxShape(**b) for b in d["boxes"]]
    shapes += [Point(**p) for p in d.get("points") or ()]  # captures made before points have none
    return Result(
        frame_id=int(d["frame_id"]),
        task=d["task"],
        label=d["label"],
        confidence=d["confidence"],
        alert=bool(d["alert"]),
        probabilities=dict(d["probabilities"]),
        shapes=tuple(shapes),
        state=str(d.get("state", "")),  # captures made before the finding stage have none
        gate=None if d.get("gate") is None else (float(d["gate"][0]), float(d["gate"][1])),
        size=None if d.get("size") is None else (float(d["size"][0]), str(d["size"][1])),
        measurements={k: (float(v), str(u)) for k, (v, u) in dict(d.get("measurements") or {}).items()},
        paused=d.get("paused"),
    )


def _header_bytes(header: Any) -> bytes:
    """The source header (no pixel data) as DICOM bytes (explicit VR little endian, no file meta)."""
    from pydicom.dataset import Dataset
    from pydicom.filewriter import dcmwrite

    clean = Dataset()
    for elem in header:
        clean.add(elem)
    buf = io.BytesIO()
    dcmwrite(buf, clean, implicit_vr=False, little_endian=True)
    return buf.getvalue()


_HEADER_FALLBACK = (
    "SpecificCharacterSet PatientName PatientID PatientBirthDate PatientSex StudyInstanceUID StudyDate "
    "StudyTime StudyID AccessionNumber ReferringPhysicianName StudyDescription SeriesInstanceUID "
    "SeriesNumber Modality SOPClassUID SOPInstanceUID InstitutionName Manufacturer LossyImageCompression "
    "LossyImageCompressionRatio LossyImageCompressionMethod PixelSpacing"
).split()


def _header_bytes_safe(header: Any) -> bytes:
    try:
        return _header_bytes(header)
    except Exception as exc:  # noqa: BLE001 - an odd element must not lose the capture
        log.warning(
            "source header not storable as a whole (%s); keeping its study attributes", type(exc).__name__
        )
        from pydicom.dataset import Dataset

        slim = Dataset()
        for kw in _HEADER_FALLBACK:
            if kw in header:
                try:
                    slim.add(header[kw])
                except Exception:  # noqa: BLE001
                    continue
        return _header_bytes(slim)


def _header_from(data: bytes) -> Any:
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), force=True)


def pack(capture: Capture) -> bytes:
    """A capture -> one ``.npz`` blob (no pickle)."""
    arrays: dict[str, np.ndarray] = {"pixels": np.ascontiguousarray(capture.pixels)}
    r = capture.result
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "id": capture.id,
        "kind": capture.kind,
        "reason": capture.reason,
        "time_utc": capture.time_utc,
        "frame_id": capture.frame_id,
        "t_capture_ns": capture.t_capture_ns,
        "result": None if r is None else result_json(r),
        "model": None if capture.model is None else capture.model.to_json(),
        "study": capture.study.to_json(),
        "source": capture.source,
        "clip": [{"frame_id": c.frame_id, "t_capture_ns": c.t_capture_ns} for c in capture.clip],
        "mark": None if capture.mark is None else asdict(capture.mark),
        "silent_trial": capture.silent_trial,
        "region": capture.region.to_json(),
    }
    if r is not None:
        if r.mask is not None:
            arrays["mask"] = np.ascontiguousarray(r.mask, np.uint8)
        if r.heatmap is not None:
            arrays["heatmap"] = np.ascontiguousarray(r.heatmap, np.float32)
        if r.contours:
            pts = [np.asarray(c, np.int32).reshape(-1, 2) for c in r.contours]
            arrays["contours"] = np.concatenate(pts) if pts else np.zeros((0, 2), np.int32)
            arrays["contour_lengths"] = np.array([len(p) for p in pts], np.int64)
    if capture.clip:
        arrays["clip_data"] = np.frombuffer(b"".join(c.jpeg for c in capture.clip), np.uint8)
        arrays["clip_lengths"] = np.array([len(c.jpeg) for c in capture.clip], np.int64)
    if capture.dicom_header is not None:
        arrays["dicom_header"] = np.frombuffer(_header_bytes_safe(capture.dicom_header), np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def unpack(blob: bytes) -> Capture:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"capture format {meta.get('format')!r} not supported")
    clip: list[ClipFrame] = []
    if "clip_data" in arrays:
        data = arrays["clip_data"].tobytes()
        offsets = np.concatenate([[0], np.cumsum(arrays["clip_lengths"])]).astype(int)
        for info, a, b in zip(meta["clip"], offsets[:-1], offsets[1:]):
            clip.append(ClipFrame(int(info["frame_id"]), int(info["t_capture_ns"]), data[a:b]))
    header = _header_from(arrays["dicom_header"].tobytes()) if "dicom_header" in arrays else None
    return Capture(
        id=meta["id"],
        kind=meta["kind"],
        reason=meta["reason"],
        time_utc=meta["time_utc"],
        frame_id=int(meta["frame_id"]),
        t_capture_ns=int(meta["t_capture_ns"]),
        pixels=arrays["pixels"],
        result=None if meta["result"] is None else _result_from(meta["result"], arrays),
        model=None if meta["model"] is None else ModelInfo.from_json(meta["model"]),
        study=Study.from_json(meta["study"]),
        source=meta["source"],
        dicom_header=header,
        clip=clip,
        mark=None if meta["mark"] is None else Mark(**meta["mark"]),
        silent_trial=bool(meta.get("silent_trial", False)),
        region=RegionFacts.from_meta(meta.get("region") or {}),  # older captures: full frame, unknown
    )


# -- study context ------------------------------------------------------------------------------------------
def _now_utc() -> datetime:
    return datetime.now(timezone.utc)


def new_study() -> Study:
    """A new study for a video source: generated UIDs and IDs, today's date (local time), no names."""
    from pydicom.uid import generate_uid

    now = datetime.now()
    return Study(
        study_uid=generate_uid(prefix=None),
        study_id=secrets.token_hex(4).upper(),
        study_date=now.strftime("%Y%m%d"),
        study_time=now.strftime("%H%M%S"),
        patient_id="POC-" + secrets.token_hex(5).upper(),
    )


def study_from_header(header: Any, fallback: Study | None) -> Study:
    """The study of a DICOM source file (missing values filled from ``fallback`` or generated)."""

    def get(keyword: str) -> str:
        value = header.get(keyword)
        return "" if value is None else str(value)

    base = fallback or new_study()
    return Study(
        study_uid=get("StudyInstanceUID") or base.study_uid,
        study_id=get("StudyID"),
        study_date=get("StudyDate"),
        study_time=get("StudyTime"),
        patient_id=get("PatientID"),
        patient_name=get("PatientName"),
        accession_number=get("AccessionNumber"),
        origin="dicom",
    )


def study_ref(study_uid: str) -> str:
    """A short one-way reference to a study for the audit log (never the UID itself)."""
    import hashlib

    return hashlib.sha256(b"firmware-app study\0" + study_uid.encode()).hexdigest()[:12]


# -- the store ------------------------------------------------------------------------------------------------
class CaptureStore:
    """The files under ``<data-dir>/captures``: write, list, open, mark exported, purge."""

    def __init__(self, data_dir: str | os.PathLike[str], min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / CAPTURES_DIR
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.min_free_bytes = int(min_free_bytes)
        self._cipher: CaptureCipher | None = None
        self._cipher_lock = threading.Lock()
        remove_stale_temps(self.dir)

    @property
    def cipher(self) -> CaptureCipher:
        with self._cipher_lock:
            if self._cipher is None:
                self._cipher = CaptureCipher(self.data_dir)
            return self._cipher

    @staticmethod
    def new_id() -> str:
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)

    def path(self, capture_id: str, kind: str = "capture") -> Path:
        _check_id(capture_id)
        return self.dir / (capture_id + (CASE_SUFFIX if kind == "disagree" else CAPTURE_SUFFIX))

    def save(self, capture: Capture) -> Path:
        """Seal and write one capture atomically; StorageFull / CaptureWriteFailed leave nothing behind."""
        path = self.path(capture.id, capture.kind)
        blob = self.cipher.seal(path.name, pack(capture))
        free = free_bytes(self.dir)
        if free and free - len(blob) < self.min_free_bytes:
            raise StorageFull(
                f"{self.dir}: disk nearly full ({free / 1e6:.1f} MB free, {self.min_free_bytes / 1e6:.0f} MB "
                f"kept free); capture {capture.id} not saved - export and purge captures to make room"
            )
        try:
            write_new(path, blob, mode=0o600, what=f"capture {capture.id}")
        except FileExistsError:
            raise CaptureWriteFailed(f"{path}: a capture with this id exists already") from None
        return path

    def list(self, kind: str | None = None) -> list[CaptureInfo]:
        """Every complete capture (and/or case), oldest first."""
        out: list[CaptureInfo] = []
        for entry in sorted(os.scandir(self.dir), key=lambda e: e.name):
            name = entry.name
            if name.startswith("."):
                continue
            if name.endswith(CAPTURE_SUFFIX):
                k, cid, marker = "capture", name[: -len(CAPTURE_SUFFIX)], EXPORTED_SUFFIX
            elif name.endswith(CASE_SUFFIX):
                k, cid, marker = "disagree", name[: -len(CASE_SUFFIX)], FEEDBACK_SUFFIX
            else:
                continue
            if kind is not None and k != kind:
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            exported = (self.dir / (cid + marker)).exists()
            out.append(CaptureInfo(cid, k, Path(entry.path), size, exported))
        return out

    def find(self, capture_id: str) -> CaptureInfo:
        _check_id(capture_id)
        for info in self.list():
            if info.id == capture_id:
                return info
        raise CaptureNotFound(f"capture {capture_id!r} not found in {self.dir}")

    def load(self, capture_id: str) -> Capture:
        """Open (decrypt) one capture; CaptureCorrupt when it fails authentication."""
        info = self.find(capture_id)
        blob = info.path.read_bytes()
        data = self.cipher.open(info.path.name, blob, where=str(info.path))
        try:
            return unpack(data)
        except Exception as exc:  # noqa: BLE001 - authenticated but unreadable: a format problem
            raise CaptureCorrupt(f"{info.path}: authenticated but not readable ({exc})") from None

    def mark_exported(self, capture_id: str, kind: str, export_id: str, deidentified: bool) -> None:
        suffix = FEEDBACK_SUFFIX if kind == "disagree" else EXPORTED_SUFFIX
        marker = {
            "export": export_id,
            "time_utc": _now_utc().isoformat(timespec="seconds"),
            "deidentified": bool(deidentified),
        }
        write_replace(
            self.dir / (capture_id + suffix), json.dumps(marker).encode() + b"\n", what="export marker"
        )

    def purge_exported(self) -> list[str]:
        """Delete every capture/case that has an export marker; returns their ids."""
        removed: list[str] = []
        for info in self.list():
            if not info.exported:
                continue
            marker = self.dir / (info.id + (FEEDBACK_SUFFIX if info.kind == "disagree" else EXPORTED_SUFFIX))
            info.path.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            removed.append(info.id)
        if removed:
            from firmware_app.records.fsutil import fsync_dir

            fsync_dir(self.dir)
        return removed

    # current study of a video source
    def current_study(self) -> Study | None:
        try:
            return Study.from_json(json.loads((self.dir / STUDY_FILE).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            log.warning("%s: unreadable; a new study will be started", self.dir / STUDY_FILE)
            return None

    def set_current_study(self, study: Study) -> None:
        write_replace(self.dir / STUDY_FILE, json.dumps(study.to_json()).encode() + b"\n", what="the study")


def _check_id(capture_id: str) -> None:
    if not capture_id or "/" in capture_id or capture_id.startswith(".") or len(capture_id) > 64:
        raise CaptureNotFound(f"capture id {capture_id!r} is not valid")


# -- the pre-trigger clip ----------------------------------------------------------------------------------------
class ClipRing:
    """The last ``seconds`` of frames at up to ``fps``, downscaled and JPEG-compressed (bounded memory)."""

    def __init__(
        self, seconds: float = 3.0, fps: float = 10.0, max_side: int = 320, quality: int = 80
    ) -> None:
        if seconds < 0 or fps <= 0:
            raise ValueError(f"clip of {seconds} s at {fps} fps: seconds must be >= 0 and fps > 0")
        self.seconds, self.fps = float(seconds), float(fps)
        self.max_side, self.quality = int(max_side), int(quality)
        self.capacity = int(math.ceil(seconds * fps))
        self._frames: deque[ClipFrame] = deque(maxlen=max(self.capacity, 1))
        self._lock = threading.Lock()
        self._last_t: int | None = None

    def wants(self, t_capture_ns: int) -> bool:
        """Whether a frame taken at ``t_capture_ns`` is due (the clip's frame rate); cheap."""
        if self.capacity == 0:
            return False
        last = self._last_t
        if last is not None and t_capture_ns - last < 1e9 / self.fps * 0.95:
            return False
        self._last_t = t_capture_ns
        return True

    def add(self, frame: Frame) -> None:
        """Downscale and compress ``frame`` into the ring (the worker thread does this)."""
        px = frame.pixels
        h, w = px.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            px = cv2.resize(
                px, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
            )
        ok, buf = cv2.imencode(".jpg", px, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return
        with self._lock:
            self._frames.append(ClipFrame(frame.id, frame.t_capture_ns, buf.tobytes()))

    def snapshot(self, until_ns: int | None = None) -> list[ClipFrame]:
        """The clip up to (and including) ``until_ns``, oldest first, no older than ``seconds`` before it."""
        with self._lock:
            frames = list(self._frames)
        if until_ns is None:
            return frames
        start = until_ns - int(self.seconds * 1e9)
        return [f for f in frames if start <= f.t_capture_ns <= until_ns]


# -- the recorder ------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    kind: str  # "clip" | "capture" | "disagree"
    frame: Frame
    result: Result | None = None
    model: Any = None
    reason: str = ""
    capture_id: str = ""
    mark: Mark | None = None


class Recorder:
    """Captures and disagree marks for one device (``<data-dir>/captures``).

    Wiring: ``recorder.attach(pipeline)`` (listener, model, screen notices) and ``recorder.start()``;
    buttons / serial commands call ``request_capture()``, ``request_disagree()`` and ``new_patient()``.
    ``capture`` and ``mark_disagree`` are the synchronous forms (tests, tools).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        model: ModelInfo | Any | None = None,
        audit: Any = None,
        clip_seconds: float = 3.0,
        clip_fps: float = 10.0,
        clip_max_side: int = 320,
        capture_every: int = 0,
        modality: str | None = None,
        notify: Callable[[str], None] | None = None,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = CaptureStore(data_dir, min_free_bytes=min_free_bytes)
        self.ring = ClipRing(clip_seconds, clip_fps, clip_max_side)
        self.capture_every = int(capture_every)
        self.modality = modality  # for video sources: "US" (default) or "DX"/"CR"/"OT" ...
        self.silent_trial = False
        self._model_source: Callable[[], Any] = lambda: model
        self._audit = audit
        self._notify = notify
        self._last: tuple[Frame, Result | None, Any] | None = None
        self._seen = 0
        self._jobs: deque[_Job] = deque()
        self._pending = {"clip": 0, "capture": 0}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False
        self._study_lock = threading.Lock()
        self.counters = {"captures": 0, "failed": 0, "skipped": 0, "clip_skipped": 0, "cases": 0}

    # -- wiring -----------------------------------------------------------------------------------
    def bind(self, pipeline: Any) -> None:
        """As a result sink (firmware_app.sinks): take ``pipeline``'s current model, show notices on its screen."""
        self._model_source = lambda: pipeline.model
        self._notify = pipeline.notify

    def attach(self, pipeline: Any) -> Recorder:
        """Listen to ``pipeline``'s results (as a listener, not a sink), and ``bind`` to it."""
        self.bind(pipeline)
        pipeline.listeners.append(self.on_result)
        return self

    def set_model(self, model: ModelInfo | Any) -> None:
        """The model whose results follow (a ModelInfo, or a ModelRef: hashed once, off the hot path)."""
        self._model_source = lambda: model

    def start(self) -> Recorder:
        """Start the writer thread (also started by the first queued job)."""
        with self._cv:
            if self._thread is not None:
                return self
            self._closed = False
            self._thread = threading.Thread(target=self._worker, name="fwapp-recorder", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued captures (up to ``timeout`` seconds), then stop. Safe to call twice."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued job is done (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._jobs or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # -- the listener (inference thread: keep it tiny) -------------------------------------------
    def on_result(self, frame: Frame, result: Result) -> None:
        model = self._model_source()
        self._last = (frame, result, model)
        self._seen += 1
        if self.ring.wants(frame.t_capture_ns):
            self._put(_Job("clip", frame))
        if self.capture_every > 0 and self._seen % self.capture_every == 0:
            if not self._put(_Job("capture", frame, result, model, "interval", self.store.new_id())):
                log.warning(
                    "interval capture skipped: %d captures are still being written", MAX_PENDING_CAPTURES
                )

    def _put(self, job: _Job) -> bool:
        """Queue a job for the worker (started on first use); False (and counted) when its queue is full."""
        if self._thread is None and not self._closed:
            self.start()
        group = "clip" if job.kind == "clip" else "capture"
        limit = MAX_PENDING_CLIP if group == "clip" else MAX_PENDING_CAPTURES
        with self._cv:
            if self._closed:
                return False
            if self._pending[group] >= limit:
                self.counters["clip_skipped" if group == "clip" else "skipped"] += 1
                return False
            self._pending[group] += 1
            self._jobs.append(job)
            self._cv.notify_all()
            return True

    # -- controls (any thread) -----------------------------------------------------------------------
    def request_capture(self, reason: str = "button") -> str:
        """Capture what is on screen now (the newest frame with its result); returns the capture id.

        For buttons and serial commands: returns at once; the recorder's thread writes the file and the
        outcome goes to the screen and the audit log. Raises RecorderBusy (nothing shown yet, too many
        captures pending) or StorageFull (the disk is nearly full) with a message for the person.
        """
        frame, result, model = self._take_last("capture")
        cid = self.store.new_id()
        self._enqueue(_Job("capture", frame, result, model, reason, cid))
        return cid

    def request_disagree(self, mark: Mark | None = None) -> str:
        """Mark what is on screen now as "disagree" (a feedback case); returns the case id (raises as above)."""
        frame, result, model = self._take_last("mark")
        cid = self.store.new_id()
        self._enqueue(_Job("disagree", frame, result, model, "disagree", cid, mark or Mark()))
        return cid

    def _take_last(self, what: str) -> tuple[Frame, Result | None, Any]:
        last = self._last
        if last is None:
            raise RecorderBusy(f"nothing to {what} yet: no image has been analysed")
        free = free_bytes(self.store.dir)
        if free and free < self.store.min_free_bytes:
            raise StorageFull(
                f"{self.store.dir}: disk nearly full ({free / 1e6:.1f} MB free); "
                "export and purge captures to make room"
            )
        return last

    def _enqueue(self, job: _Job) -> None:
        if not self._put(job):
            raise RecorderBusy(f"recorder busy: {MAX_PENDING_CAPTURES} captures are still being written")

    def current_study(self) -> Study | None:
        """The study of a video source (None before the first "new patient" or capture)."""
        return self.store.current_study()

    def new_patient(self) -> str:
        """Start a new study for a video source; returns its Study ID (short, for the screen).

        The study gets a new Study Instance UID (``current_study().study_uid``) and a device-generated
        Patient ID; the hospital reconciles it with the patient record when the export is imported.
        """
        with self._study_lock:
            study = new_study()
            self.store.set_current_study(study)
        self._audit_event("new_patient", study=study_ref(study.study_uid))
        self._show(f"New patient: study {study.study_id}")
        log.info("new study started (ref %s)", study_ref(study.study_uid))
        return study.study_id

    def set_silent_trial(self, on: bool) -> None:
        """Results are still recorded; they are flagged so that exports keep them off the PACS."""
        on = bool(on)
        if on != self.silent_trial:
            self.silent_trial = on
            self._audit_event("silent_trial", enabled=on)
            log.info("silent trial %s", "on" if on else "off")

    # -- synchronous forms ---------------------------------------------------------------------------
    def capture(
        self,
        frame: Frame,
        result: Result | None,
        model_info: ModelInfo | Any | None = None,
        reason: str = "manual",
        capture_id: str | None = None,
    ) -> str:
        """Write one capture now (with the clip so far); returns its id. Raises StorageFull etc."""
        cap = self._build(
            frame, result, model_info, reason, capture_id or self.store.new_id(), "capture", None
        )
        try:
            self.store.save(cap)
        except RecordsError as exc:
            self.counters["failed"] += 1
            self._audit_event("capture_failed", capture=cap.id, error=type(exc).__name__)
            raise
        self.counters["captures"] += 1
        self._audit_event(
            "capture",
            capture=cap.id,
            trigger=reason,
            model_id=cap.model.id if cap.model else "",
            model_version=cap.model.version if cap.model else "",
            bundle_sha256=cap.model.bundle_sha256 if cap.model else "",
            study=study_ref(cap.study.study_uid),
            clip_frames=len(cap.clip),
            silent_trial=cap.silent_trial,
        )
        log.info("capture %s saved (%s)", cap.id, reason)
        return cap.id

    def mark_disagree(
        self,
        frame: Frame,
        result: Result | None,
        mark: Mark | None = None,
        model_info: ModelInfo | Any | None = None,
        case_id: str | None = None,
    ) -> str:
        """Store ``frame`` + ``result`` with the clinician's mark for the feedback export; returns the id."""
        mark = mark or Mark()
        cap = self._build(
            frame, result, model_info, "disagree", case_id or self.store.new_id(), "disagree", mark
        )
        try:
            self.store.save(cap)
        except RecordsError as exc:
            self.counters["failed"] += 1
            self._audit_event("disagree_failed", case=cap.id, error=type(exc).__name__)
            raise
        self.counters["cases"] += 1
        self._audit_event(
            "disagree",
            case=cap.id,
            model_id=cap.model.id if cap.model else "",
            model_version=cap.model.version if cap.model else "",
            verdict=mark.verdict,
            expected_label=mark.expected_label,
            mark_reason=mark.reason,
        )
        log.info("case %s marked disagree", cap.id)
        return cap.id

    def list_captures(self, kind: str | None = None) -> list[CaptureInfo]:
        return self.store.list(kind)

    def load_capture(self, capture_id: str) -> Capture:
        return self.store.load(capture_id)

    def purge_exported(self) -> list[str]:
        """Delete captures and cases that were exported successfully (never any other)."""
        removed = self.store.purge_exported()
        if removed:
            self._audit_event("captures_purged", count=len(removed))
        return removed

    # -- internals -----------------------------------------------------------------------------------
    def _model_info(self, model: Any) -> ModelInfo | None:
        if model is None or isinstance(model, ModelInfo):
            return model
        return ModelInfo.from_model(model)

    def _study_for(self, frame: Frame) -> tuple[Study, Any]:
        header = frame.meta.get("dicom_header")
        with self._study_lock:
            current = self.store.current_study()
            if header is not None:
                return study_from_header(header, current), header
            if current is None:  # a capture before any "new patient": start one, say so
                current = new_study()
                self.store.set_current_study(current)
                self._audit_event("new_patient", study=study_ref(current.study_uid), implicit=True)
            return current, None

    def _source_info(self, frame: Frame, header: Any) -> dict[str, Any]:
        meta = frame.meta
        modality = meta.get("Modality")
        if not modality:
            modality = "DX" if meta.get("phantom") == "xray" else (self.modality or "US")
        info: dict[str, Any] = {"modality": str(modality), "uri": str(meta.get("source", ""))}
        for key in (
            "frame_index",
            "n_frames",
            "SOPClassUID",
            "SOPInstanceUID",
            "SeriesInstanceUID",
            "phantom",
        ):
            value = meta.get(key)
            if value is not None:
                info[key] = value if isinstance(value, (int, float)) else str(value)
        if header is not None:
            ts = getattr(getattr(header, "file_meta", None), "get", lambda _k: None)("TransferSyntaxUID")
            if ts:
                info["transfer_syntax"] = str(ts)
        return info

    def _build(
        self,
        frame: Frame,
        result: Result | None,
        model: Any,
        reason: str,
        capture_id: str,
        kind: str,
        mark: Mark | None,
    ) -> Capture:
        study, header = self._study_for(frame)
        # a grabber's frame decoded at 1/k keeps its original: the capture is stored at full resolution
        pixels, result = full_resolution(frame, result)
        return Capture(
            id=capture_id,
            kind=kind,
            reason=reason,
            time_utc=_now_utc().isoformat(timespec="milliseconds"),
            frame_id=frame.id,
            t_capture_ns=frame.t_capture_ns,
            pixels=pixels,
            result=result,
            model=self._model_info(model if model is not None else self._model_source()),
            study=study,
            source=self._source_info(frame, header),
            dicom_header=header,
            clip=self.ring.snapshot(frame.t_capture_ns),
            mark=mark,
            silent_trial=self.silent_trial,
            region=RegionFacts.from_meta(frame.meta),
        )

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._pending["clip" if job.kind == "clip" else "capture"] -= 1
                    self._busy = False
                    self._cv.notify_all()

    def _run(self, job: _Job) -> None:
        try:
            if job.kind == "clip":
                self.ring.add(job.frame)
            elif job.kind == "capture":
                cid = self.capture(job.frame, job.result, job.model, job.reason, job.capture_id)
                self._show(f"Captured {cid}")
            else:
                cid = self.mark_disagree(job.frame, job.result, job.mark, job.model, job.capture_id)
                self._show(f"Marked disagree: case {cid}")
        except StorageFull as exc:
            log.error("%s", exc)
            self._show("Capture NOT saved: storage full - export and purge captures")
        except RecordsError as exc:
            log.error("%s", exc)
            self._show(f"Capture NOT saved: {type(exc).__name__}")
        except Exception:  # noqa: BLE001 - the recorder must outlive one bad capture
            self.counters["failed"] += 1
            log.exception("capture %s failed", job.capture_id or "(clip)")
            self._show("Capture NOT saved: internal error (see log)")

    def _show(self, message: str) -> None:
        if self._notify is not None:
            try:
                self._notify(message)
            except Exception:  # noqa: BLE001
                log.exception("notify failed")

    def _audit_event(self, event: str, **fields: Any) -> None:
        audit_append(self._audit, self.data_dir, event, **fields)


def audit_append(audit: Any, data_dir: str | os.PathLike[str], event: str, **fields: Any) -> None:
    """Append to the audit log (``audit`` or ``AuditLog(data_dir)``); a failure is logged, not raised."""
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        if audit is None:
            from firmware_app.audit import AuditLog

            audit = AuditLog(data_dir)
        audit.append(event, **fields)
    except Exception as exc:  # noqa: BLE001 - a broken audit log must not lose the capture itself
        log.error("audit log: could not record %s (%s)", event, exc)


def captures_of(store: CaptureStore, ids: Iterable[str] | None, kind: str) -> list[CaptureInfo]:
    """The listed captures of ``kind``: all not yet exported, or exactly ``ids``."""
    infos = store.list(kind)
    if ids is None:
        return [i for i in infos if not i.exported]
    wanted = set(ids)
    return [i for i in infos if i.id in wanted]
