"""DICOM export of captures: a File-set with DICOMDIR, for a USB stick that goes to the hospital PACS.

Per capture (all in the capture's study; every reference by UID):

1. the **source image**: the captured frame exactly as the model saw it, as Ultrasound Image Storage for an
   ultrasound source (a video feed or a US file) or Secondary Capture otherwise (an X-ray file, a camera).
   For a DICOM source it is a new instance in the source's study (Image Type DERIVED\\SECONDARY) that
   points to the original instance and frame (Source Image Sequence): the frame went through the display
   mapping (VOI/LUT to 8 bits) and the source profile's crop, so it is not the original pixel data;
2. the **AI overlay**, burned in: a Secondary Capture of the frame with the overlay and labelled bands
   ("AI OVERLAY", model id and version, NOT FOR DIAGNOSTIC USE when the model is not cleared), Burned In
   Annotation YES, Image Comments saying the same, Source Image Sequence -> the source image;
3. a **Segmentation** (highdicom, BINARY, one segment) when the result has a non-empty mask: same rows and
   columns as the source image, referencing it;
4. a **Comprehensive SR** (highdicom TID 1500 Measurement Report) with one measurement group per
   finding: the region (the SEG segment for segmentation; the box as an SCOORD polyline for detection; the
   image for classification), the finding, its confidence (DCM 111012 "Certainty of Finding", %), the area,
   and the algorithm identification (model id + version); the observer is the device (Device UID).
   Only 2D coordinates (SCOORD) are used: Comprehensive 3D SR (which a PACS's default storescu
   presentation contexts lack) would be chosen only for content with SCOORD3D (``sr_class``).

SEG, SR and the overlay carry the IHE AI Results contributing-equipment item: Manufacturer, Manufacturer's
Model Name = model id, Software Versions = model version, Device UID = this device, Purpose of Reference
(DCM 109102 "Processing Equipment"), and the model's bundle hash in Contribution Description.

A capture made during a silent trial exports only its source image unless ``include_silent_results``: the
clinicians must not see the AI's results before go-live.

Imaging region (``PixelRegion``, from the capture's ``RegionFacts``): the exported source image, and the
overlay drawn on it, hold only pixels of the capture's established imaging region. A capture's pixels are
already cut to its region at the source (``Source.make_frame``), so they are exported as they are, with
the region's scale: an ultrasound image gets a Sequence of Ultrasound Regions moved to the crop (the
source file's own regions, translated and clipped to the imaging region, the others dropped; or one 2D
tissue region with the known mm per pixel), a Secondary Capture gets Pixel Spacing. A capture whose pixels
are still the whole source picture (a frame recorded without cropping, from a tool or a test) has
everything outside its region set to 0 instead of cropped, so that its result's coordinates stay valid.
SEG and SR refer to the exported image as it is (same rows and columns, its pixel coordinates; the SEG
takes its Pixel Spacing when it has one; the SR adds the area in mm2 when the scale is known).

Burned In Annotation (PS3.3 C.7.6.1.1.11: "sufficient burned in annotation to identify the patient and
the date the image was acquired") is set from the region, for plain and de-identified exports alike:

- region established (``board``, ``dicom``, ``detected``): NO, also on the overlay (its bands name only
  the model and the finding). A scanner writes the patient's name, ID and the date in its chrome, around
  the image: the file's Sequence of Ultrasound Regions says where its image data is, an installer's board
  crop is measured to leave the chrome out, a detected region is what moves. A source file's own
  Burned In Annotation YES describes its whole picture, chrome included, so it does not carry over to the
  crop. What a crop can still hold is what the scanner draws inside the image (calipers, depth marks, a
  body marker, a typed label): those do not identify the patient and the date. A free-text label typed
  over the image by the operator could; that residual risk is the site's to control (the board's
  ``blackout`` rectangles, or no typed labels on this scanner);
- not established (``full_frame``, or a capture from before the region was kept): nothing is claimed:
  the source image repeats the source file's own statement (YES or NO) or leaves it out (unknown), the
  overlay says YES. A de-identified export of such a capture de-identifies the header but says Patient
  Identity Removed NO (``records.deid``), and ``ExportReport.not_clean`` names the capture (the command
  line prints one line for each, with the capture id only).

UIDs are derived from the device UID, the capture id and the object's role, so exporting a capture again
gives the same UIDs (a PACS then keeps one copy). Instance Numbers are unique within each series and
also the same again (``InstanceNumbers``: a per-study counter kept in the data folder). Only after the whole File-set is written and fsynced are
the captures marked exported; nothing is deleted here (see ``CaptureStore.purge_exported``).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app import __version__
from firmware_app.records.captures import (
    Capture,
    CaptureInfo,
    CaptureStore,
    audit_append,
    captures_of,
)
from firmware_app.records.crypto import device_secret, device_uid, uid_from_bytes
from firmware_app.records.deid import Deidentifier
from firmware_app.records.errors import ExportFailed, ExportTargetError, RecordsError
from firmware_app.records.fsutil import fsync_dir, write_replace
from firmware_app.records.overlay import render_overlay

log = logging.getLogger(__name__)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
MANUFACTURER = "firmware-app"
FILESET_ID = "FWAPP"
BATCH = 25  # captures converted and written per File-set write
PRIVATE_SCHEME = "99FWAPP"  # labels without a standard code: a local coding scheme
# series numbers of the device's series in a study
SERIES = {"source": 9001, "overlay": 9002, "seg": 9003, "sr": 9004}
SERIES_DESCRIPTION = {
    "source": "POC capture (AI input frame)",
    "overlay": "AI overlay (burned in)",
    "seg": "AI segmentation",
    "sr": "AI measurement report",
}
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


@dataclass(frozen=True)
class Equipment:
    """This device, as it appears in exported objects."""

    device_uid: str
    manufacturer: str = MANUFACTURER
    model_name: str = "firmware-app"
    software_version: str = __version__

    @property
    def serial(self) -> str:
        return hashlib.sha256(self.device_uid.encode()).hexdigest()[:12].upper()

    @classmethod
    def of(cls, data_dir: str | os.PathLike[str]) -> Equipment:
        return cls(device_uid(data_dir))


@dataclass
class ExportedCapture:
    capture_id: str
    files: list[str]  # File IDs relative to the File-set root, in the order source, overlay, SEG, SR
    uids: dict[str, str]  # role -> SOP Instance UID
    finding: str
    deidentified: bool = False  # de-identified, pixels included (Patient Identity Removed YES)


@dataclass
class ExportReport:
    out_dir: Path
    export_id: str
    deidentified: bool
    exported: list[ExportedCapture] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (capture id, one-line reason)
    dicomdir: Path | None = None
    # de-identified exports: captures whose pixels may still hold burned-in text (capture id, why; no
    # identifiers), exported with Patient Identity Removed NO
    not_clean: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


# -- building the objects -------------------------------------------------------------------------------------
def _uid(equipment: Equipment, *parts: str) -> str:
    return uid_from_bytes(hashlib.sha256("\0".join((equipment.device_uid, *parts)).encode()).digest())


def _local_time(iso_utc: str) -> datetime:
    t = datetime.fromisoformat(iso_utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone()


# model label -> (SEG segmented property category, finding / segmented property type), as
# (code value, coding scheme, meaning); standard codes (SNOMED CT, from DICOM's CIDs 7150/7151/7159)
# wherever one exists, a declared local code otherwise. A label not in this table gets a local code too.
_MORPHOLOGIC = ("49755003", "SCT", "Morphologically Abnormal Structure")
FINDING_CODES: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "fluid": (("91720002", "SCT", "Body Substance"), ("32457005", "SCT", "Body fluid")),
    "nodule": (_MORPHOLOGIC, ("27925004", "SCT", "Nodule")),
    "lesion": (_MORPHOLOGIC, ("52988006", "SCT", "Lesion")),
    # lung ultrasound B-lines (an artefact pattern): no SNOMED CT concept
    "b-lines": (_MORPHOLOGIC, ("B-LINES", PRIVATE_SCHEME, "B-lines")),
}
LOCAL_SCHEME = {
    "CodingSchemeDesignator": PRIVATE_SCHEME,
    "CodingSchemeName": "firmware-app local codes for model labels",
    "CodingSchemeResponsibleOrganization": MANUFACTURER,
}


def _concept(code: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[0], scheme_designator=code[1], meaning=code[2])


def _code(label: str) -> Any:
    """The finding's code (``FINDING_CODES``; a local code for a label without one)."""
    known = FINDING_CODES.get(label.strip().lower())
    if known is not None:
        return _concept(known[1])
    value = "".join(ch if ch.isalnum() else "-" for ch in label.upper())[:16] or "FINDING"
    return _concept((value, PRIVATE_SCHEME, label[:64]))


def _category(label: str) -> Any:
    """The SEG Segmented Property Category of a label (morphologically abnormal structure by default)."""
    return _concept(FINDING_CODES.get(label.strip().lower(), (_MORPHOLOGIC,))[0])


def _uses_scheme(ds: Any, scheme: str) -> bool:
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if item.get("CodingSchemeDesignator") == scheme and "CodeValue" in item:
                return True
            if _uses_scheme(item, scheme):
                return True
    return False


def _declare_local_codes(ds: Any) -> None:
    """Coding Scheme Identification Sequence (0008,0110): the local scheme, when ``ds`` uses it."""
    from pydicom.dataset import Dataset

    if not _uses_scheme(ds, PRIVATE_SCHEME):
        return
    declared = [
        i
        for i in ds.get("CodingSchemeIdentificationSequence", [])
        if i.get("CodingSchemeDesignator") != PRIVATE_SCHEME
    ]
    item = Dataset()
    for kw, value in LOCAL_SCHEME.items():
        setattr(item, kw, value)
    ds.CodingSchemeIdentificationSequence = [*declared, item]


def _file_meta(sop_class: str, sop_uid: str) -> Any:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"FWAPP_{__version__}"[:16]
    return meta


def _patient_study(ds: Any, cap: Capture) -> None:
    """Patient and General Study modules: from the source header, else from the device's study.

    A DICOMDIR needs Patient ID, Study ID, Study Date and Study Time: when the source file leaves them
    empty, they are filled in (a "NOID-" id and a Study ID derived from the Study Instance UID, the date
    and time of the source's series/acquisition/content, else of the capture).
    """
    hdr = cap.dicom_header
    st = cap.study
    ds.PatientName = st.patient_name
    ds.PatientID = st.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = st.study_uid
    ds.StudyDate = st.study_date
    ds.StudyTime = st.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = st.study_id
    ds.AccessionNumber = st.accession_number
    if hdr is not None:
        for kw in (
            "PatientName",
            "PatientID",
            "IssuerOfPatientID",
            "PatientBirthDate",
            "PatientSex",
            "PatientAge",
            "ReferringPhysicianName",
            "StudyDescription",
            "InstitutionName",
        ):
            if kw in hdr and hdr[kw].value not in (None, "") and _valid(hdr[kw]):
                setattr(ds, kw, hdr[kw].value)
    digest = hashlib.sha256(st.study_uid.encode()).hexdigest().upper()
    if not ds.PatientID:
        ds.PatientID = "NOID-" + digest[:10]
    if not ds.StudyID:
        ds.StudyID = digest[:8]
    if not ds.StudyDate or not ds.StudyTime:
        when = _local_time(cap.time_utc)
        date, time_ = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        if hdr is not None:
            for d, t in (
                ("SeriesDate", "SeriesTime"),
                ("AcquisitionDate", "AcquisitionTime"),
                ("ContentDate", "ContentTime"),
            ):
                if hdr.get(d) and _valid(hdr[d]) and (t not in hdr or _valid(hdr[t])):
                    date, time_ = str(hdr.get(d)), str(hdr.get(t) or "000000")
                    break
        ds.StudyDate = ds.StudyDate or date
        ds.StudyTime = ds.StudyTime or time_


def _valid(elem: Any) -> bool:
    """False for a source element whose value breaks its VR (a birth date ``1971022X``): it is left out
    of the export (a Type 2 attribute stays empty) and the log names the keyword, never the value."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    try:
        validate_value(elem.VR, elem.value, config.RAISE)
    except (ValueError, TypeError):
        log.warning("source header %s is not a valid %s value: left out of the export", elem.keyword, elem.VR)
        return False
    return True


def _common(
    cap: Capture,
    eq: Equipment,
    sop_class: str,
    role: str,
    modality: str,
    derived_from: tuple[str, str, int | None] | None,
) -> Any:
    """A dataset with the Patient, Study, Series, Equipment, General Image and SOP Common modules."""
    from pydicom.dataset import Dataset

    now = datetime.now().astimezone()
    when = _local_time(cap.time_utc)
    sop_uid = _uid(eq, cap.id, role)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = now.strftime("%z")
    _patient_study(ds, cap)
    ds.Modality = modality
    ds.SeriesInstanceUID = _uid(eq, cap.study.study_uid, role, "series")
    ds.SeriesNumber = SERIES[role]
    ds.SeriesDescription = SERIES_DESCRIPTION[role]
    ds.Manufacturer = eq.manufacturer
    ds.ManufacturerModelName = eq.model_name
    ds.DeviceSerialNumber = eq.serial
    ds.SoftwareVersions = eq.software_version
    ds.InstanceNumber = _instance_number(cap.id)
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S.%f")[:13]
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
    ds.PatientOrientation = ""
    _laterality(ds, cap.dicom_header)
    if derived_from is not None:
        cls, uid, frame = derived_from
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        if frame is not None:
            item.ReferencedFrameNumber = frame
        ds.SourceImageSequence = [item]
    return ds


# Body Part Examined values (PS3.16 Annex L) of paired structures: Laterality applies to them
PAIRED_BODY_PARTS = frozenset(
    "BREAST EYE EAR KIDNEY LUNG ADRENAL OVARY TESTIS FALLOPIANTUBE SHOULDER CLAVICLE SCAPULA ARM UPRARM "
    "ELBOW FOREARM WRIST HAND FINGER THUMB HIP THIGH FEMUR KNEE PATELLA LEG TIBIA FIBULA ANKLE FOOT HEEL TOE "
    "UPRLIMB LOWLIMB EXTREMITY AXILLA PAROTID SUBMANDIBULAR JAW TMJ ORBIT".split()
)


def _laterality(ds: Any, header: Any) -> None:
    """General Series Laterality (Type 2C: required when the body part examined is a paired structure).

    The source file's value when it states one (R or L); absent when the source names a body part that is
    not paired (optional attributes are left out, not written empty); present and empty ("unknown") only
    when nothing says which body part it is, so that it may be a paired one (a video frame).
    """
    stated = str(header.get("Laterality") or "").strip().upper() if header is not None else ""
    body_part = str(header.get("BodyPartExamined") or "").strip().upper() if header is not None else ""
    if body_part:
        ds.BodyPartExamined = body_part[:16]
    if stated in ("R", "L"):
        ds.Laterality = stated
    elif not body_part or body_part in PAIRED_BODY_PARTS:
        ds.Laterality = ""


class InstanceNumbers:
    """Instance Numbers unique within each of the device's series, and the same when a capture is exported
    again (like its UIDs): one counter per study (all the device's series of a study are numbered together,
    one number per capture, shared by its source, overlay, SEG and SR), kept in
    ``<data-dir>/captures/instance-numbers.json``. A capture gets the next number of its study the first
    time it is exported, in capture order; a purged capture's number is never given again. The file holds
    no identifiers: a study is named by a keyed hash of its Study Instance UID (and the export kind)."""

    FILE = "instance-numbers.json"

    def __init__(self, store: CaptureStore) -> None:
        self.path = store.dir / self.FILE
        self._key = device_secret(store.data_dir, "instance numbers")
        self._dirty = False
        try:
            doc = json.loads(self.path.read_text())
            self._studies: dict[str, dict[str, Any]] = dict(doc.get("studies", {}))
        except FileNotFoundError:
            self._studies = {}
        except (OSError, ValueError, AttributeError) as exc:
            raise ExportFailed(f"{self.path}: unreadable ({exc}); restore it or move it away") from None

    def _study(self, kind: str, study_uid: str) -> dict[str, Any]:
        name = hmac.new(self._key, f"{kind}\0{study_uid}".encode(), hashlib.sha256).hexdigest()[:24]
        return self._studies.setdefault(name, {"next": 1, "captures": {}})

    def number(self, kind: str, study_uid: str, capture_id: str) -> int:
        study = self._study(kind, study_uid)
        n = study["captures"].get(capture_id)
        if n is None:
            n = int(study["next"])
            study["captures"][capture_id] = n
            study["next"] = n + 1
            self._dirty = True
        return int(n)

    def save(self) -> None:
        """Persist (atomically, durably) the numbers given; before any capture is marked exported."""
        if self._dirty:
            doc = {"format": "firmware-app-instance-numbers/1", "studies": self._studies}
            write_replace(
                self.path, (json.dumps(doc, sort_keys=True) + "\n").encode(), what="instance numbers"
            )
            self._dirty = False


def _instance_number(capture_id: str) -> int:
    """Without an export's numbering (``InstanceNumbers``): seconds of the UTC day of the capture id
    (YYYYMMDD-HHMMSS-xxxxxx) + 1, which two captures of a study can share."""
    try:
        hms = capture_id.split("-")[1]
        return int(hms[:2]) * 3600 + int(hms[2:4]) * 60 + int(hms[4:6]) + 1
    except (IndexError, ValueError):
        return 1


def _pixels(ds: Any, pixels: np.ndarray) -> None:
    """Image Pixel module, uncompressed 8-bit; gray -> MONOCHROME2, BGR -> RGB."""
    px = np.asarray(pixels)
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    if px.ndim == 3 and px.shape[2] == 1:
        px = px[:, :, 0]
    if px.ndim == 3:
        px = cv2.cvtColor(np.ascontiguousarray(px[:, :, :3]), cv2.COLOR_BGR2RGB)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(px).tobytes()


def _lossy(cap: Capture) -> tuple[str, str] | None:
    """(method, ratio) when the captured frame comes from lossy-compressed source data."""
    hdr = cap.dicom_header
    method = _LOSSY_SYNTAXES.get(str(cap.source.get("transfer_syntax", "")))
    if hdr is not None and str(hdr.get("LossyImageCompression", "")) == "01":
        prior = hdr.get("LossyImageCompressionMethod")
        method = method or (
            str(prior[0] if isinstance(prior, (list, tuple)) else prior) if prior else "ISO_10918_1"
        )
    return (method, "") if method else None


@dataclass(frozen=True)
class PixelRegion:
    """What the exported image holds of the source picture."""

    established: bool  # only pixels of an established imaging region are in the image
    rect: tuple[int, int, int, int]  # the imaging region inside the exported image: x, y, w, h
    # where the exported image's (0, 0) lies in the source picture; None: unknown
    offset: tuple[int, int] | None
    cropped: bool = False  # the image is a part of the source picture, not the whole of it
    blanked: bool = False  # the pixels outside ``rect`` are set to 0 by the export
    why: str = ""  # not established: why, one line without identifiers


def pixel_region(cap: Capture) -> PixelRegion:
    """How the capture's pixels relate to its imaging region (``RegionFacts``)."""
    facts = cap.region
    h, w = (int(v) for v in cap.pixels.shape[:2])
    whole = (0, 0, w, h)
    rect = facts.imaging_region
    if rect is None:
        return PixelRegion(False, whole, None, why="imaging region unknown (capture made before it was kept)")
    x, y, rw, rh = rect
    if not facts.established:
        offset = (x, y) if (rw, rh) == (w, h) else None
        return PixelRegion(False, whole, offset, why="imaging region not established (full frame)")
    if (rw, rh) == (w, h):
        return PixelRegion(True, whole, (x, y), cropped=facts.full_size != (w, h) or (x, y) != (0, 0))
    if facts.full_size == (w, h) and x + rw <= w and y + rh <= h:
        return PixelRegion(True, (x, y, rw, rh), (0, 0), blanked=True)
    return PixelRegion(
        False,
        whole,
        None,
        why=f"stored {w}x{h} pixels match neither the imaging region nor the source picture",
    )


def region_pixels(cap: Capture, region: PixelRegion) -> np.ndarray:
    """The capture's pixels with only the imaging region kept (outside it: 0)."""
    if not region.blanked:
        return cap.pixels
    x, y, w, h = region.rect
    out = np.zeros_like(cap.pixels)
    out[y : y + h, x : x + w] = cap.pixels[y : y + h, x : x + w]
    return out


def _burned_in(cap: Capture, region: PixelRegion) -> str | None:
    """The source image's Burned In Annotation (see the module docstring); None: unknown, left out."""
    if region.established:
        return "NO"
    stated = cap.dicom_header.get("BurnedInAnnotation") if cap.dicom_header is not None else None
    return stated if stated in ("YES", "NO") else None


def _us_regions(cap: Capture, region: PixelRegion) -> list[Any]:
    """The Sequence of Ultrasound Regions of the exported image: the source file's regions moved to it
    (translated by the crop, clipped to the imaging region, those outside it dropped), else one 2D tissue
    region over the imaging region when its scale is known; [] when the geometry is unknown."""
    from pydicom.dataset import Dataset

    if region.offset is None:
        return []
    ox, oy = region.offset
    rx, ry, rw, rh = region.rect
    items = []
    seq = cap.dicom_header.get("SequenceOfUltrasoundRegions") if cap.dicom_header is not None else None
    for item in seq or ():
        keys = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
        if any(item.get(k) is None for k in keys):
            continue
        x0, y0, x1, y1 = (int(item.get(k)) for k in keys)
        x0, x1, y0, y1 = x0 - ox, x1 - ox, y0 - oy, y1 - oy
        cx0, cy0 = max(x0, rx), max(y0, ry)
        cx1, cy1 = min(x1, rx + rw - 1), min(y1, ry + rh - 1)
        if cx1 < cx0 or cy1 < cy0:
            continue  # outside the imaging region: not in the exported pixels
        new = copy.deepcopy(item)
        new.RegionLocationMinX0, new.RegionLocationMinY0 = cx0, cy0
        new.RegionLocationMaxX1, new.RegionLocationMaxY1 = cx1, cy1
        # the reference pixel is relative to the region's top left corner, which moved by the clipping
        if "ReferencePixelX0" in new:
            new.ReferencePixelX0 = int(new.ReferencePixelX0) + x0 - cx0
        if "ReferencePixelY0" in new:
            new.ReferencePixelY0 = int(new.ReferencePixelY0) + y0 - cy0
        items.append(new)
    if items or not region.established or cap.region.mm_per_px is None:
        return items
    dx, dy = cap.region.mm_per_px
    item = Dataset()
    item.RegionSpatialFormat = 1  # 2D
    item.RegionDataType = 1  # tissue
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = rx, ry
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = rx + rw - 1, ry + rh - 1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3  # cm
    item.PhysicalDeltaX, item.PhysicalDeltaY = dx / 10.0, dy / 10.0
    return [item]


def source_image(cap: Capture, eq: Equipment) -> Any:
    """The captured frame as Ultrasound Image Storage (US) or Secondary Capture (anything else)."""
    modality = cap.modality
    us = modality == "US"
    original = None
    src = cap.source
    if cap.dicom_header is not None and src.get("SOPInstanceUID") and src.get("SOPClassUID"):
        n = int(src.get("n_frames", 1) or 1)
        frame = int(src.get("frame_index", 0)) + 1 if n > 1 else None
        original = (str(src["SOPClassUID"]), str(src["SOPInstanceUID"]), frame)
    region = pixel_region(cap)
    ds = _common(cap, eq, US_IMAGE if us else SC_IMAGE, "source", modality, original)
    _pixels(ds, region_pixels(cap, region))
    ds.ImageType = ["DERIVED", "SECONDARY"]
    burned_in = _burned_in(cap, region)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if original is not None:
        how = "display-mapped to 8 bits"
        if region.cropped:
            how += f", cropped to the imaging region ({cap.region.region_from})"
            ds.SourceImageSequence[0].SpatialLocationsPreserved = "NO"
        elif region.blanked:
            how += f", outside the imaging region ({cap.region.region_from}) set to 0"
        ds.DerivationDescription = f"Frame as analysed by the AI: {how}"
    if us:
        regions = _us_regions(cap, region)
        if regions:
            ds.SequenceOfUltrasoundRegions = regions
    elif cap.region.mm_per_px is not None and region.offset is not None:
        dx, dy = cap.region.mm_per_px
        ds.PixelSpacing = [f"{dy:.8g}", f"{dx:.8g}"]  # DICOM order: between rows, between columns
    if not us:
        ds.ConversionType = "WSD" if cap.dicom_header is not None else "DV"
    lossy = _lossy(cap)
    if lossy is not None:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = lossy[0]
    elif us:
        ds.LossyImageCompression = "00"
    return ds


def _ai_equipment(cap: Capture, eq: Equipment) -> Any:
    """The IHE AI Results contributing-equipment item (model name, version, device UID)."""
    from highdicom import ContributingEquipment
    from pydicom.sr.codedict import codes

    m = cap.model
    item = ContributingEquipment(
        manufacturer=eq.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=(m.id if m else "unknown model")[:64],
        software_versions=(m.version if m else "unknown")[:64],
        device_serial_number=eq.serial,
        contribution_datetime=_local_time(cap.time_utc),
        contribution_description=(
            f"AI inference: {m.id} {m.version}, bundle sha256 {m.bundle_sha256[:16]}" if m else "AI inference"
        )[:64],
    )
    item.DeviceUID = eq.device_uid
    return item


def overlay_image(cap: Capture, eq: Equipment, source: Any) -> Any:
    """The Secondary Capture with the AI overlay burned in and labelled."""
    m = cap.model
    not_cleared = not (m and m.cleared_for_clinical_use)
    model_id, version = (m.id, m.version) if m else ("unknown model", "")
    region = pixel_region(cap)
    picture = render_overlay(region_pixels(cap, region), cap.result, model_id, version, not_cleared)
    ds = _common(
        cap, eq, SC_IMAGE, "overlay", cap.modality, (source.SOPClassUID, source.SOPInstanceUID, None)
    )
    _pixels(ds, picture)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    # the bands name the model and the finding, not the patient or the date (module docstring)
    ds.BurnedInAnnotation = "NO" if region.established else "YES"
    ds.RecognizableVisualFeatures = "NO"
    label = f"AI overlay burned in: {model_id} {version}".strip()
    ds.ImageComments = label + (". NOT FOR DIAGNOSTIC USE" if not_cleared else "")
    ds.DerivationDescription = label[:1024]
    ds.ContributingEquipmentSequence = [_ai_equipment(cap, eq)]
    if source.get("LossyImageCompression") == "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = source.LossyImageCompressionMethod
    return ds


def _frame_mask(cap: Capture) -> np.ndarray | None:
    if cap.result is None:
        return None
    h, w = cap.pixels.shape[:2]
    m = cap.result.mask_at(w, h)
    return m if m is not None and m.any() else None


def segmentation(cap: Capture, eq: Equipment, source: Any) -> Any | None:
    """A BINARY Segmentation of the finding, aligned with ``source`` (None without a non-empty mask)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = _frame_mask(cap)
    if mask is None:
        return None
    m = cap.model
    label = (cap.result.label if cap.result and cap.result.label else None) or (
        m.labels[1] if m and len(m.labels) > 1 else "finding"
    )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=(m.id if m else "unknown model")[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=(m.version if m else "unknown")[:64],
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=_category(label),
        segmented_property_type=_code(label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    measures = None
    if "PixelSpacing" not in source and pixel_region(cap).offset is not None and cap.region.mm_per_px:
        # an ultrasound image states its scale in its regions: the SEG gets it as Pixel Measures
        dx, dy = cap.region.mm_per_px
        measures = hd.PixelMeasuresSequence(pixel_spacing=[round(dy, 8), round(dx, 8)], slice_thickness=None)
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_measures=measures,
        pixel_array=mask[None, :, :],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_uid(eq, cap.study.study_uid, "seg", "series"),
        series_number=SERIES["seg"],
        sop_instance_uid=_uid(eq, cap.id, "seg"),
        instance_number=_instance_number(cap.id),
        manufacturer=eq.manufacturer,
        manufacturer_model_name=eq.model_name,
        software_versions=eq.software_version,
        device_serial_number=eq.serial,
        series_description=SERIES_DESCRIPTION["seg"],
        content_label="AI_SEG",
        content_description=f"AI segmentation: {m.id} {m.version}"[:64] if m else "AI segmentation",
        contributing_equipment=[_ai_equipment(cap, eq)],
    )
    seg.SpecificCharacterSet = "ISO_IR 192"
    seg.PatientOrientation = ""  # Type 2C without a frame of reference (highdicom leaves it out)
    return seg


def structured_report(cap: Capture, eq: Equipment, source: Any, seg: Any | None) -> Any:
    """The TID 1500 Measurement Report: one group per finding, naming the model and its version."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    m = cap.model
    r = cap.result
    algorithm = hd.sr.AlgorithmIdentification(
        name=(m.id if m else "unknown model")[:64], version=(m.version if m else "unknown")[:64]
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=eq.device_uid,
            name=f"{eq.model_name} AI {m.id if m else ''}".strip()[:64],
            manufacturer_name=eq.manufacturer,
            model_name=(m.id if m else eq.model_name)[:64],
            serial_number=eq.serial,
        ),
    )
    confidence_unit = codes.UCUM.Percent
    pixels_unit = hd.sr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="pixels")
    # the exported image's pixels are source pixels: the region's scale holds for them
    scale = cap.region.mm_per_px if pixel_region(cap).offset is not None else None

    def area(n_pixels: float) -> list[Any]:
        out = [hd.sr.Measurement(name=codes.SCT.Area, value=float(n_pixels), unit=pixels_unit)]
        if scale is not None:
            mm2 = round(float(n_pixels) * scale[0] * scale[1], 2)
            out.append(hd.sr.Measurement(name=codes.SCT.Area, value=mm2, unit=codes.UCUM.SquareMillimeter))
        return out

    def confidence(value: float | None) -> list[Any]:
        if value is None:
            return []
        return [
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding,
                value=round(float(value) * 100.0, 2),
                unit=confidence_unit,
                algorithm_id=algorithm,
            )
        ]

    def tracking(n: int) -> Any:
        return hd.sr.TrackingIdentifier(uid=_uid(eq, cap.id, "finding", str(n)), identifier=f"AI finding {n}")

    def named(measurements: Any) -> list[Any]:
        """The result's named measurements (a task's own: an angle, a distance), local codes, UCUM units."""
        return [
            hd.sr.Measurement(
                name=hd.sr.CodedConcept(value=k[:16], scheme_designator="99FWAPP", meaning=k[:64]),
                value=round(float(v), 3),
                unit=hd.sr.CodedConcept(
                    value="1" if u == "fraction" else u, scheme_designator="UCUM", meaning=u
                ),
            )
            for k, (v, u) in measurements.items()
        ]

    # what the SR says is read from the result's shapes (firmware_app.shapes), never from its task
    groups: list[Any] = []
    image_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    if r is not None and r.points:
        for n, p in enumerate(r.points, start=1):
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT,
                graphic_data=np.array([[float(p.x), float(p.y)]], np.float32),
                source_image=hd.sr.SourceImageForRegion.from_source_image(source),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking(n),
                    referenced_region=region,
                    finding_type=_code(p.label or r.label or "point"),
                    algorithm_id=algorithm,
                    measurements=[*confidence(r.confidence if p.score is None else p.score)]
                    + (named(r.measurements) if n == 1 else []),
                )
            )
    if r is not None and r.boxes:
        for n, b in enumerate(r.boxes, start=1):
            x0, y0, x1, y1 = (float(v) for v in (b.x0, b.y0, b.x1, b.y1))
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float32),
                source_image=hd.sr.SourceImageForRegion.from_source_image(source),
            )
            box_area = round(max(0.0, (x1 - x0) * (y1 - y0)), 1)
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking(n),
                    referenced_region=region,
                    finding_type=_code(b.label),
                    algorithm_id=algorithm,
                    measurements=[
                        *confidence(b.score),
                        *area(box_area),
                    ],
                )
            )
    elif r is not None and r.points:
        pass  # the points' groups above
    elif r is not None and r.label is not None and seg is not None:
        mask_area = int(_frame_mask(cap).sum())  # type: ignore[union-attr]
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(1),
                # built directly: highdicom's from_segmentation misses a segment identified in the shared
                # functional groups (what it writes itself for one segment)
                referenced_segment=hd.sr.ReferencedSegmentationFrame(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    frame_number=1,
                    segment_number=1,
                    source_image=hd.sr.SourceImageForSegmentation.from_source_image(source),
                ),
                finding_type=_code(r.label),
                algorithm_id=algorithm,
                measurements=[
                    *confidence(r.confidence),
                    *area(mask_area),
                ],
            )
        )
    elif r is not None and r.label is not None:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(1),
                finding_type=_code(r.label),
                algorithm_id=algorithm,
                measurements=confidence(r.confidence),
                source_images=[image_ref],
            )
        )
    else:  # no finding above the threshold: say so, for the same image
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(1),
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=codes.DCM.Finding, value=codes.DCM.AllAlgorithmsSucceededWithoutFindings
                    )
                ],
                source_images=[image_ref],
            )
        )
    procedure = codes.SCT.Ultrasonography if cap.modality == "US" else codes.SCT.ImagingProcedure
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    evidence = [source] + ([seg] if seg is not None else [])
    sr = sr_class(report)(
        evidence=evidence,
        content=report,
        series_instance_uid=_uid(eq, cap.study.study_uid, "sr", "series"),
        series_number=SERIES["sr"],
        sop_instance_uid=_uid(eq, cap.id, "sr"),
        instance_number=_instance_number(cap.id),
        manufacturer=eq.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION["sr"],
        contributing_equipment=[_ai_equipment(cap, eq)],
    )
    sr.SpecificCharacterSet = "ISO_IR 192"
    _drop_segment_numbers_beside_frames(sr)
    return sr


def uses_3d_coordinates(content: Any) -> bool:
    """Whether an SR content tree holds a SCOORD3D item (anywhere below ``content``)."""
    for item in content.get("ContentSequence", []) if hasattr(content, "get") else content:
        if item.get("ValueType") == "SCOORD3D" or uses_3d_coordinates(item):
            return True
    return False


def sr_class(content: Any) -> type:
    """Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33, in every PACS's default presentation contexts)
    unless the content uses 3D coordinates, which only Comprehensive 3D SR (.88.34) allows."""
    import highdicom as hd

    return hd.sr.Comprehensive3DSR if uses_3d_coordinates(content) else hd.sr.ComprehensiveSR


def _drop_segment_numbers_beside_frames(ds: Any) -> None:
    """PS3.3 C.10.5: Referenced Segment Number shall not be present with Referenced Frame Number.

    highdicom writes both in a TID 1410 reference to a Segmentation frame; the frame identifies the segment.
    """
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                del ref.ReferencedSegmentNumber
        _drop_segment_numbers_beside_frames(item)


def build_instances(
    cap: Capture, eq: Equipment, include_ai: bool = True, instance_number: int | None = None
) -> dict[str, Any]:
    """role -> dataset for one capture: source, and (``include_ai``) overlay, seg (if a mask), sr; all with
    ``instance_number`` (from ``InstanceNumbers``) when given."""
    with warnings.catch_warnings():
        # highdicom's advice on single-component person names in source data: not ours to change
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        out = _build_instances(cap, eq, include_ai)
    for ds in out.values():
        _declare_local_codes(ds)
        if instance_number is not None:
            ds.InstanceNumber = int(instance_number)
    return out


def _build_instances(cap: Capture, eq: Equipment, include_ai: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source_image(cap, eq)}
    if not include_ai:
        return out
    src = out["source"]
    out["overlay"] = overlay_image(cap, eq, src)
    seg = segmentation(cap, eq, src)
    if seg is not None:
        out["seg"] = seg
    out["sr"] = structured_report(cap, eq, src, seg)
    return out


# -- the File-set -------------------------------------------------------------------------------------------------
def check_target(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` if its parent exists and prove it is writable; ExportTargetError otherwise."""
    out = Path(out_dir)
    if not out.parent.is_dir():
        raise ExportTargetError(
            f"{out}: export target's folder {out.parent} does not exist (stick not mounted?)"
        )
    if out.exists() and not out.is_dir():
        raise ExportTargetError(f"{out}: is a file, not a folder")
    try:
        out.mkdir(exist_ok=True)
        probe = out / f".fwapp-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ExportTargetError(
            f"{out}: export target not writable ({why}); is the stick write-protected or full?"
        ) from None
    return out


def _open_fileset(out: Path, staging: Path) -> tuple[Any, bool]:
    """The File-set at ``out`` (existing DICOMDIR loaded, else a new one), staging on the target itself."""
    from pydicom.fileset import FileSet

    dicomdir = out / "DICOMDIR"
    if dicomdir.exists():
        try:
            fs = FileSet(dicomdir)
        except Exception as exc:  # noqa: BLE001 - someone else's broken DICOMDIR
            raise ExportTargetError(
                f"{dicomdir}: existing DICOMDIR unreadable ({exc}); use an empty folder"
            ) from None
        if fs.ID != FILESET_ID:
            # adding would make pydicom rename the other File-set's files: never touch them
            raise ExportTargetError(
                f"{dicomdir}: holds another DICOM File-set ({fs.ID or 'no ID'}); export to an empty folder"
            )
        existing = True
    else:
        fs = FileSet()
        fs.ID = FILESET_ID
        existing = False
    # pydicom stages added instances in a system temp folder; keep patient images off the device's disk
    stage = getattr(fs, "_stage", None)
    if isinstance(stage, dict) and "t" in stage and "path" in stage:
        stage["t"].cleanup()
        stage["t"] = tempfile.TemporaryDirectory(dir=staging)
        stage["path"] = Path(stage["t"].name)
    else:
        log.warning("pydicom File-set staging not redirected: instances are staged in the system temp folder")
    return fs, existing


def _trim_sr_record(instance: Any) -> None:
    """Keep only the root's HAS CONCEPT MOD items in an SR DOCUMENT record (PS3.3 F.5.24).

    pydicom copies the whole content tree into the DICOMDIR record, which is not what the standard asks.
    """
    record = getattr(getattr(instance, "node", None), "_record", None)
    if record is None or "ContentSequence" not in record:
        return
    from pydicom.dataset import Dataset

    keep = [item for item in record.ContentSequence if item.get("RelationshipType") == "HAS CONCEPT MOD"]
    copy = Dataset()
    for elem in record:
        if elem.keyword != "ContentSequence":
            copy.add(elem)
    if keep:
        copy.ContentSequence = keep
    for elem in list(record):
        del record[elem.tag]
    for elem in copy:
        record.add(elem)


def _fsync_files(paths: list[Path]) -> None:
    dirs = set()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)


def _finding(cap: Capture) -> str:
    r = cap.result
    if r is None:
        return "no result"
    if r.label is None:
        return "no finding"
    conf = "" if r.confidence is None else f" {r.confidence * 100:.0f}%"
    return f"{r.label}{conf}{' ALERT' if r.alert else ''}"


def _export(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    kind: str,
    deidentify: bool,
    ids: list[str] | None,
    include_exported: bool,
    include_silent_results: bool,
    audit: Any,
    before_mark: Callable[[list[ExportedCapture]], None] | None = None,
) -> ExportReport:
    out = check_target(out_dir)
    store = CaptureStore(data_dir)
    wanted = None if ids is None else set(ids)
    infos: list[CaptureInfo] = (
        [i for i in store.list(kind) if wanted is None or i.id in wanted]
        if include_exported
        else captures_of(store, ids, kind)
    )
    eq = Equipment.of(data_dir)
    deid = Deidentifier(device_secret(data_dir, "deidentify")) if deidentify else None
    export_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    report = ExportReport(out, export_id, deidentify)
    try:
        for start in range(0, len(infos), BATCH):
            _export_batch(
                store,
                out,
                infos[start : start + BATCH],
                kind,
                eq,
                deid,
                include_silent_results,
                report,
                before_mark,
            )
    finally:
        audit_append(
            audit,
            data_dir,
            "export" if kind == "capture" else "feedback_export",
            export=export_id,
            exported=len(report.exported),
            failed=len(report.failed),
            deidentified=deidentify,
            # exported de-identified in the header only: burned-in text may remain in their pixels
            pixels_not_clean=[cid for cid, _ in report.not_clean][:64] if deidentify else None,
            captures=[e.capture_id for e in report.exported][:64],
        )
        for cid, why in report.failed:
            log.error("capture %s not exported: %s", cid, why)
        for cid, why in report.not_clean:
            log.warning("capture %s exported with Patient Identity Removed NO: %s", cid, why)
    return report


def _export_batch(
    store: CaptureStore,
    out: Path,
    infos: list[CaptureInfo],
    kind: str,
    eq: Equipment,
    deid: Deidentifier | None,
    include_silent_results: bool,
    report: ExportReport,
    before_mark: Callable[[list[ExportedCapture]], None] | None,
) -> None:
    """Convert, write and mark one batch (bounded memory and staging space; progress kept batch by batch)."""
    staging = Path(tempfile.mkdtemp(prefix=".fwapp-staging-", dir=out))
    try:
        fs, existing = _open_fileset(out, staging)
        numbers = InstanceNumbers(store)
        # capture id, role -> SOP Instance UID, finding, why its pixels are not clean ("": they are)
        staged: list[tuple[str, dict[str, str], str, str]] = []
        for info in infos:
            try:
                cap = store.load(info.id)
                include_ai = include_silent_results or not cap.silent_trial
                number = numbers.number(kind, cap.study.study_uid, cap.id)
                instances = build_instances(cap, eq, include_ai=include_ai, instance_number=number)
                why_not_clean = ""
                if deid is not None:
                    region = pixel_region(cap)
                    why_not_clean = "" if region.established else region.why
                    # highdicom shares elements between the objects it derives: de-identify copies
                    instances = {role: copy.deepcopy(ds) for role, ds in instances.items()}
                    for ds in instances.values():
                        deid.apply(ds, pixels_clean=not why_not_clean)
                for ds in instances.values():
                    _trim_sr_record(fs.add(ds))  # staged to a file: the dataset is not kept
                uids = {r: str(d.SOPInstanceUID) for r, d in instances.items()}
                staged.append((info.id, uids, _finding(cap), why_not_clean))
            except RecordsError as exc:
                report.failed.append((info.id, str(exc)))
            except Exception as exc:  # noqa: BLE001 - one capture that cannot be converted must not stop the rest
                log.exception("capture %s: DICOM conversion failed", info.id)
                report.failed.append((info.id, f"DICOM conversion failed: {type(exc).__name__}: {exc}"))
        if not staged:
            return
        try:
            if existing:
                fs.write()  # our own File-set: pydicom keeps the existing File IDs
            else:
                fs.write(out)
        except OSError as exc:
            raise ExportTargetError(
                f"{out}: writing the File-set failed ({exc.strerror or exc}); this batch was not marked exported"
            ) from None
        done: list[ExportedCapture] = []
        written: list[Path] = []
        for cid, uids, finding, why_not_clean in staged:
            files = []
            for role, uid in uids.items():
                found = fs.find(SOPInstanceUID=uid)
                if not found:
                    raise ExportFailed(f"capture {cid}: {role} missing from the written File-set")
                files.append(str(found[0].FileID))
                written.append(Path(found[0].path))
            clean = report.deidentified and not why_not_clean
            done.append(ExportedCapture(cid, files, uids, finding, deidentified=clean))
        report.dicomdir = out / "DICOMDIR"
        _fsync_files([*written, report.dicomdir])
        try:
            numbers.save()
        except RecordsError as exc:
            raise ExportFailed(f"{exc}; this batch was not marked exported") from None
        if before_mark is not None:
            before_mark(done)
        for item in done:
            store.mark_exported(item.capture_id, kind, report.export_id, item.deidentified)
        report.exported.extend(done)
        report.not_clean.extend((cid, why) for cid, _, _, why in staged if why)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_fileset(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    deidentify: bool = False,
    *,
    ids: list[str] | None = None,
    include_exported: bool = False,
    include_silent_results: bool = False,
    audit: Any = None,
) -> ExportReport:
    """Export captures (not yet exported, or ``ids``) into a DICOM File-set with DICOMDIR at ``out_dir``.

    An existing File-set there is added to. Raises ExportTargetError when ``out_dir`` cannot be written.
    """
    return _export(
        data_dir, out_dir, "capture", deidentify, ids, include_exported, include_silent_results, audit
    )


def export_feedback(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    ids: list[str] | None = None,
    include_exported: bool = False,
    audit: Any = None,
) -> ExportReport:
    """Export the cases marked "disagree", de-identified, for retraining.

    ``out_dir/DICOM/``: a File-set (source image, AI overlay, AI SEG, AI SR per case);
    ``out_dir/cases/<pseudonym>.json``: one sidecar per case (format below) with the AI result, the
    clinician's mark and the File IDs of the case's DICOM files. No identifiers: the case pseudonym is a
    keyed hash of the case id, the time is only the de-identified (shifted) date.

    Sidecar: ``{"format": "firmware-app-feedback/1", "case": str, "model": {"id", "version",
    "bundle_sha256", "task", "labels"}, "ai": {"label", "confidence", "alert", "probabilities", "boxes",
    "centroid", "area_fraction"}, "clinician": {"verdict", "expected_label", "reason"}, "dicom": {"root":
    "DICOM", "source": FileID, "overlay": FileID, "seg": FileID?, "sr": FileID}, "image": {"rows",
    "columns", "modality"}}``.
    """
    out = check_target(out_dir)
    cases = out / "cases"
    deid = Deidentifier(device_secret(data_dir, "deidentify"))

    store = CaptureStore(data_dir)

    def write_sidecars(done: list[ExportedCapture]) -> None:
        try:
            cases.mkdir(exist_ok=True)
            paths = []
            for item in done:
                sidecar = feedback_sidecar(store.load(item.capture_id), item, deid)
                path = cases / f"{sidecar['case']}.json"
                path.write_text(json.dumps(sidecar, indent=2) + "\n")
                paths.append(path)
            _fsync_files(paths)
        except OSError as exc:
            raise ExportTargetError(
                f"{cases}: writing the case files failed ({exc.strerror or exc}); nothing was marked exported"
            ) from None

    return _export(
        data_dir, out / "DICOM", "disagree", True, ids, include_exported, True, audit, write_sidecars
    )


def feedback_sidecar(cap: Capture, item: ExportedCapture, deid: Deidentifier) -> dict[str, Any]:
    """The JSON sidecar of one feedback case (see ``export_feedback``); no identifiers."""
    from firmware_app.records.captures import result_json

    m = cap.model
    ai: dict[str, Any] = {}
    if cap.result is not None:
        ai = result_json(cap.result)
        ai.pop("frame_id", None)
    mark = cap.mark
    return {
        "format": "firmware-app-feedback/1",
        "case": deid.case_pseudonym(cap.id),
        "model": None if m is None else {k: v for k, v in m.to_json().items() if k != "intended_use"},
        "ai": ai,
        "clinician": None
        if mark is None
        else {"verdict": mark.verdict, "expected_label": mark.expected_label, "reason": mark.reason},
        "dicom": {"root": "DICOM", **dict(zip(item.uids.keys(), item.files))},
        "image": {
            "rows": int(cap.pixels.shape[0]),
            "columns": int(cap.pixels.shape[1]),
            "modality": cap.modality,
        },
    }
