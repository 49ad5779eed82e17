"""De-identification of exported DICOM (PS3.15 Annex E, Basic Application Level Confidentiality Profile).

Options applied, as recorded in De-identification Method Code Sequence:

- 113100 Basic Application Confidentiality Profile: patient, physician, operator and institution
  identifiers removed or emptied; Patient ID, Patient's Name and Study ID replaced by a pseudonym (the
  same patient on this device always gets the same pseudonym, so a retraining set keeps cases together);
  private elements removed; every non-standard UID replaced by a consistent one (references between the
  source image, SEG and SR stay valid);
- 113107 Retain Longitudinal Temporal Information with Modified Dates: every date (DA, and the date part of
  DT) is shifted by the same number of days (between 1 and 10 years back) for one patient; times kept;
- 113105 Clean Descriptors: the descriptions the device writes (series descriptions, image comments, the
  overlay's band) name only the AI model; descriptions copied from a source file are removed.

- 113101 Clean Pixel Data Option: only when the capture's imaging region is established (a board crop, the
  file's Sequence of Ultrasound Regions, a detected region): the scanner's chrome, where it writes the
  patient's name, ID and the date, is not in the exported pixels (the export keeps only the imaging region,
  ``records.export``). The pixels themselves are not touched here.

Where the imaging region is NOT established (``full_frame``: the whole picture, nothing known about what it
holds), burned-in patient text may remain in the pixels: the header is de-identified all the same, but
Patient Identity Removed is NO, 113101 is not claimed, and De-identification Method says why
(``PIXELS_NOT_CLEAN``). Nobody downstream may take such a file for an anonymous one.

Pseudonyms, new UIDs and date shifts come from keyed hashes with a secret derived from the device key: they
cannot be reversed off the device and never repeat across devices.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, timedelta
from typing import Any

from firmware_app.records.crypto import uid_from_bytes

# Emptied (Z) when present; Patient ID, Patient's Name and Study ID get a pseudonym instead.
_EMPTY = (
    "PatientBirthDate PatientSex AccessionNumber ReferringPhysicianName ContentCreatorName PatientBirthTime"
).split()
# Removed (X) wherever they occur.
_REMOVE = (
    "OtherPatientIDs OtherPatientIDsSequence OtherPatientNames PatientBirthName PatientAddress "
    "PatientTelephoneNumbers PatientTelecomInformation PatientMotherBirthName MedicalRecordLocator "
    "PatientAge PatientSize PatientWeight EthnicGroup Occupation AdditionalPatientHistory PatientComments "
    "PatientReligiousPreference MilitaryRank BranchOfService CountryOfResidence RegionOfResidence "
    "PatientInsurancePlanCodeSequence PatientPrimaryLanguageCodeSequence ResponsiblePerson "
    "ResponsibleOrganization PatientState PregnancyStatus SmokingStatus MedicalAlerts Allergies "
    "IssuerOfPatientID IssuerOfPatientIDQualifiersSequence "
    "InstitutionName InstitutionAddress InstitutionalDepartmentName InstitutionCodeSequence StationName "
    "OperatorsName OperatorIdentificationSequence PerformingPhysicianName "
    "PerformingPhysicianIdentificationSequence NameOfPhysiciansReadingStudy "
    "PhysiciansReadingStudyIdentificationSequence PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence "
    "RequestingPhysician ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers "
    "ReferringPhysicianIdentificationSequence ConsultingPhysicianName RequestAttributesSequence "
    "StudyDescription SeriesDescription ImageComments ProtocolName PerformedProcedureStepDescription "
    "PerformedProcedureStepID ScheduledProcedureStepDescription RequestedProcedureDescription "
    "AdmittingDiagnosesDescription AdmissionID DerivationDescription "
    "PlateID DetectorID CassetteID GantryID "
    "AcquisitionComments AdmittingDiagnosesCodeSequence ReferencedPatientSequence "
    "ContentCreatorIdentificationCodeSequence "
    "VerifyingObserverSequence PersonIdentificationCodeSequence TextComments"
).split()
# Emptied sequences (Type 2 in some IODs, e.g. the SR Document Series module).
_EMPTY_SEQUENCES = ("ReferencedPerformedProcedureStepSequence", "ReferencedStudySequence")
# Replaced by a keyed hash (Type 1 in some IODs, e.g. Enhanced General Equipment).
_DUMMY = ("DeviceSerialNumber",)
# Our own descriptions, rewritten by export after de-identification (Clean Descriptors).
KEEP_OWN = ("SeriesDescription", "ImageComments", "DerivationDescription", "ContentDescription")
# UIDs that are not instance identifiers: kept.
_KEEP_UIDS = frozenset(
    "SOPClassUID ReferencedSOPClassUID MediaStorageSOPClassUID TransferSyntaxUID ImplementationClassUID "
    "CodingSchemeUID ContextUID MappingResourceUID ReferencedSOPClassUIDInFile "
    "ReferencedTransferSyntaxUIDInFile PrivateInformationCreatorUID".split()
)
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113105", "Clean Descriptors Option"),
)
METHOD_TEXT = ("Basic Profile", "Modified Dates", "Clean Descriptors")
CLEAN_PIXELS = ("113101", "Clean Pixel Data Option")
CLEAN_PIXELS_TEXT = "Clean Pixel Data: imaging region only"
PIXELS_NOT_CLEAN = "Pixels NOT cleaned: imaging region not established"  # LO: 64 chars at most


class Deidentifier:
    """Applies the profile above to datasets, consistently across the datasets of one export."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _h(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The replacement of a UID (standard UIDs, 1.2.840.10008.*, are kept)."""
        original = str(original)
        if not original or original.startswith("1.2.840.10008."):
            return original
        return uid_from_bytes(self._h("uid", original))

    def patient_pseudonym(self, patient_id: str) -> str:
        return "ANON-" + self._h("patient", patient_id).hex()[:10].upper()

    def study_pseudonym(self, study_uid: str) -> str:
        return self._h("study", study_uid).hex()[:8].upper()

    def case_pseudonym(self, case_id: str) -> str:
        return "case-" + self._h("case", case_id).hex()[:12]

    def date_shift(self, patient_id: str) -> int:
        """Days every date of this patient moves back (365..3649)."""
        return 365 + int.from_bytes(self._h("dates", patient_id)[:4], "big") % (3650 - 365)

    def apply(self, ds: Any, *, pixels_clean: bool) -> None:
        """De-identify ``ds`` in place (and its file meta), keeping the device's own descriptors.

        ``pixels_clean``: the capture's pixels hold only its established imaging region (see the module
        docstring); False: Patient Identity Removed is NO and the method says the pixels were not cleaned.
        """
        from pydicom.dataset import Dataset

        patient_key = str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", ""))
        shift = self.date_shift(patient_key)
        own = {kw: ds[kw].value for kw in KEEP_OWN if kw in ds}
        study_uid = str(ds.get("StudyInstanceUID", ""))
        ds.remove_private_tags()
        self._walk(ds, shift, set())
        ds.PatientID = self.patient_pseudonym(patient_key)
        ds.PatientName = ds.PatientID + "^"  # a family name only (PS3.5 6.2.1.2)
        if "StudyID" in ds or "StudyInstanceUID" in ds:
            ds.StudyID = self.study_pseudonym(study_uid)
        for kw in _EMPTY:
            if kw in ds:
                ds[kw].value = ""
        for kw, value in own.items():
            setattr(ds, kw, value)
        ds.PatientIdentityRemoved = "YES" if pixels_clean else "NO"
        ds.DeidentificationMethod = [*METHOD_TEXT, CLEAN_PIXELS_TEXT if pixels_clean else PIXELS_NOT_CLEAN]
        items = []
        for value, meaning in (*METHOD_CODES, *([CLEAN_PIXELS] if pixels_clean else [])):
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    def _walk(self, ds: Any, shift: int, seen: set[int]) -> None:
        """Apply the element rules to ``ds`` and every nested item; an element object shared between
        places (highdicom shares some) is changed once."""
        for kw in _REMOVE:
            if kw in ds:
                del ds[kw]
        for kw in _EMPTY_SEQUENCES:
            if kw in ds:
                ds[kw].value = []
        for kw in _DUMMY:
            if kw in ds and ds[kw].value:
                ds[kw].value = self._h("dummy", str(ds[kw].value)).hex()[:12].upper()
        for elem in list(ds):
            if id(elem) in seen:
                continue
            seen.add(id(elem))
            if elem.tag.group & 0xFF00 == 0x6000 or elem.tag.group in (0x5000, 0x5002):
                del ds[elem.tag]  # overlays and curves
                continue
            vr = elem.VR
            if vr == "SQ":
                for item in elem.value:
                    self._walk(item, shift, seen)
            elif vr == "UI" and elem.keyword not in _KEEP_UIDS and elem.value:
                if elem.VM > 1:
                    elem.value = [self.uid(v) for v in elem.value]
                else:
                    elem.value = self.uid(elem.value)
            elif vr in ("DA", "DT") and elem.value:
                elem.value = _shift_value(elem.value, vr, shift)


def _shift_value(value: Any, vr: str, days: int) -> Any:
    values = list(value) if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") else [value]
    out = []
    for v in values:
        s = str(v)
        if len(s) >= 8 and s[:8].isdigit():
            try:
                d = date(int(s[:4]), int(s[4:6]), int(s[6:8])) - timedelta(days=days)
                s = d.strftime("%Y%m%d") + (s[8:] if vr == "DT" else "")
            except ValueError:
                s = ""
        else:
            s = ""
        out.append(s)
    return out if len(out) > 1 else out[0]
