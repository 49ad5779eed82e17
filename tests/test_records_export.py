"""DICOM export: a File-set with DICOMDIR that a PACS takes, from DICOM and from video sources."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from records_support import MODEL, disc, frame, pydicom_data_file, pydicom_example, seg_result

from firmware_app.records.captures import Mark, Recorder
from firmware_app.records.commands import cmd_export, cmd_export_feedback, export_stick_settings
from firmware_app.records.errors import ExportTargetError
from firmware_app.records.export import export_feedback, export_fileset
from firmware_app.sources import open_source
from firmware_app.sources.dicom import load_frames
from firmware_app.sources.phantom import UltrasoundPhantom, XrayPhantom
from firmware_app.types import Box, Result

DCIODVFY = shutil.which("dciodvfy")


def source_frame(uri: str):
    """The first frame of ``uri`` as the daemon gets it (profile, imaging region, meta)."""
    with open_source(uri) as src:
        return src.read()


def _captures(data_dir: Path) -> dict[str, str]:
    """Captures from DICOM US files (one with its ultrasound region, as the source crops it), a
    multi-frame YBR cine, a radiograph, an ultrasound and an X-ray phantom."""
    rec = Recorder(data_dir, model=MODEL)
    ids: dict[str, str] = {}
    ob = source_frame(f"dicom:{pydicom_data_file('OBXXXX1A.dcm')}")  # cropped to its region
    ids["dicom_region"] = rec.capture(ob, seg_result(ob.id, disc(ob.pixels.shape[:2], (340, 230), 60)))
    cr = source_frame(f"dicom:{pydicom_data_file('RG1_UNCI.dcm')}")  # full frame with a pixel spacing
    ids["dicom_cr"] = rec.capture(cr, Result(cr.id, "classification", "nodule", 0.6, True, {"nodule": 0.6}))
    us1 = pydicom_data_file("US1_UNCR.dcm")
    px, meta = next(load_frames(us1))
    ids["dicom_seg"] = rec.capture(
        frame(px, 0, {**meta, "source": f"dicom:{us1}"}), seg_result(0, disc(px.shape[:2], (320, 240), 50))
    )
    cine = pydicom_example("examples_ybr_color.dcm")
    for i, (px, meta) in enumerate(load_frames(cine)):
        if i == 3:
            box = Box(40.0, 30.0, 120.0, 100.0, 0.71, "lesion")
            res = Result(3, "detection", "lesion", 0.71, True, {"lesion": 0.71}, boxes=(box,))
            ids["dicom_cine_box"] = rec.capture(frame(px, 3, {**meta, "source": f"dicom:{cine}"}), res)
            break
    rec.new_patient()
    us = UltrasoundPhantom(320, 240, seed=7)
    for t in range(4):
        img, mask = us.render(t)
        rec.ring.add(frame(img, t, {"phantom": "ultrasound"}))
    mask = mask if mask.any() else disc(img.shape, (160, 150), 25)
    ids["video_seg"] = rec.capture(frame(img, 3, {"phantom": "ultrasound"}), seg_result(3, mask))
    ids["video_none"] = rec.capture(
        frame(img, 3, {"phantom": "ultrasound"}),
        Result(3, "segmentation", None, None, mask=np.zeros_like(mask)),
    )
    xr, _, _ = XrayPhantom(256, 256, seed=1).render(0)
    cls = Result(0, "classification", "nodule", 0.64, True, {"nodule": 0.64, "normal": 0.36})
    ids["xray_cls"] = rec.capture(frame(xr, 0, {"phantom": "xray"}), cls)
    rec.set_silent_trial(True)
    ids["silent"] = rec.capture(frame(img, 3, {"phantom": "ultrasound"}), seg_result(3, mask))
    rec.set_silent_trial(False)
    ids["case"] = rec.mark_disagree(
        frame(px, 3, {**meta, "source": f"dicom:{cine}"}),
        Result(3, "detection", None, None),
        Mark(expected_label="lesion", reason="false_negative"),
    )
    return ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    data.mkdir()
    ids = _captures(data)
    report = export_fileset(data, root / "stick")
    deid = export_fileset(data, root / "deid", deidentify=True, include_exported=True)
    feedback = export_feedback(data, root / "feedback")
    return {"data": data, "root": root, "ids": ids, "report": report, "deid": deid, "feedback": feedback}


def _instances(folder: Path) -> list[pydicom.Dataset]:
    fs = FileSet(folder / "DICOMDIR")
    return [inst.load() for inst in fs]


def _by_capture(exported: dict, key: str, report: str = "report") -> dict[str, pydicom.Dataset]:
    cid = exported["ids"][key]
    item = next(e for e in exported[report].exported if e.capture_id == cid)
    root = exported[report].out_dir
    return {role: pydicom.dcmread(root / fid) for role, fid in zip(item.uids, item.files)}


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
@pytest.mark.parametrize("which", ["stick", "deid", "feedback/DICOM"])
def test_every_exported_file_passes_dciodvfy(exported: dict, which: str) -> None:
    folder = exported["root"] / which
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert any(p.name == "DICOMDIR" for p in files) and len(files) > 3
    problems = {str(p.relative_to(folder)): e for p in files if (e := _dciodvfy_errors(p))}
    assert problems == {}


def test_dicomdir_lists_every_capture_exported(exported: dict) -> None:
    report = exported["report"]
    ids = exported["ids"]
    assert report.failed == []
    assert {e.capture_id for e in report.exported} == {ids[k] for k in ids if k != "case"}
    fs = FileSet(exported["root"] / "stick" / "DICOMDIR")
    listed = {inst.SOPInstanceUID for inst in fs}
    assert listed == {uid for e in report.exported for uid in e.uids.values()}
    for e in report.exported:
        for fid in e.files:
            assert (exported["root"] / "stick" / fid).is_file()


def test_dicom_source_exports_in_its_own_study_with_linked_seg_and_sr(exported: dict) -> None:
    objs = _by_capture(exported, "dicom_seg")
    original = pydicom.dcmread(pydicom_data_file("US1_UNCR.dcm"), stop_before_pixels=True)
    src, overlay, seg, sr = objs["source"], objs["overlay"], objs["seg"], objs["sr"]
    assert src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    assert {o.StudyInstanceUID for o in objs.values()} == {original.StudyInstanceUID}
    assert {o.PatientID for o in objs.values()} == {original.PatientID}
    assert src.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert src.SOPInstanceUID != original.SOPInstanceUID
    # SEG aligned with the source: same grid, referencing it
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.ReferencedSOPInstanceUID == src.SOPInstanceUID
    seg_mask = seg.pixel_array.astype(bool)
    cap = Recorder(exported["data"]).load_capture(exported["ids"]["dicom_seg"])
    assert np.array_equal(seg_mask, cap.result.mask.astype(bool))
    # SR references both the source image and the SEG
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert {src.SOPInstanceUID, seg.SOPInstanceUID} <= evidence
    assert seg.SegmentSequence[0].SegmentLabel == "fluid"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == MODEL.id
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def _sr_items(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    out = []

    def walk(items: list) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if "TextValue" in it:
                value = str(it.TextValue)
            elif "ConceptCodeSequence" in it:
                value = str(it.ConceptCodeSequence[0].CodeMeaning)
            elif "MeasuredValueSequence" in it:
                value = str(it.MeasuredValueSequence[0].NumericValue)
            elif "GraphicType" in it:
                value = str(it.GraphicType)
            else:
                value = ""
            out.append((name, value))
            walk(it.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


def test_sr_names_the_model_version_finding_and_confidence(exported: dict) -> None:
    sr = _by_capture(exported, "dicom_seg")["sr"]
    items = _sr_items(sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR (2D coordinates only)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ("Algorithm Name", MODEL.id) in items and ("Algorithm Version", MODEL.version) in items
    assert ("Finding", "Body fluid") in items  # SCT 32457005
    assert ("Certainty of Finding", "87.0") in items
    assert ("Referenced Segmentation Frame", "") in items
    ai = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    ]
    model_item = next(e for e in ai if e.ManufacturerModelName == MODEL.id)
    assert model_item.SoftwareVersions == MODEL.version and model_item.DeviceUID.startswith("2.25.")
    # one group per finding: the box of the detection capture is an SCOORD polyline
    box_items = _sr_items(_by_capture(exported, "dicom_cine_box")["sr"])
    assert ("Image Region", "POLYLINE") in box_items and ("Finding", "Lesion") in box_items
    none_items = _sr_items(_by_capture(exported, "video_none")["sr"])
    assert ("Finding", "All algorithms succeeded; without findings") in none_items


def test_overlay_is_burned_in_and_labelled(exported: dict) -> None:
    objs = _by_capture(exported, "video_seg")
    overlay, src = objs["overlay"], objs["source"]
    assert overlay.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert overlay.BurnedInAnnotation == "YES"
    assert f"{MODEL.id} {MODEL.version}" in overlay.ImageComments
    assert "NOT FOR DIAGNOSTIC USE" in overlay.ImageComments
    assert overlay.Columns == src.Columns and overlay.Rows > src.Rows  # labelled bands above and below
    px = overlay.pixel_array
    assert (np.abs(px.astype(int) - px[..., ::-1].astype(int)).sum(axis=2) > 60).any()  # coloured overlay
    assert overlay.ContributingEquipmentSequence[0].ManufacturerModelName == MODEL.id


def test_video_source_captures_share_the_new_patient_study(exported: dict) -> None:
    objs = [_by_capture(exported, k) for k in ("video_seg", "video_none", "xray_cls")]
    assert len({o["source"].StudyInstanceUID for o in objs}) == 1
    assert objs[0]["source"].PatientID.startswith("POC-")
    assert objs[0]["source"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
    xray = objs[2]["source"]
    assert xray.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and xray.Modality == "DX"
    assert "seg" not in objs[2]  # classification: no mask


def test_silent_trial_capture_exports_the_image_only(exported: dict) -> None:
    assert set(_by_capture(exported, "silent")) == {"source"}


def test_exported_captures_are_marked_and_only_they_can_be_purged(exported: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    rec = Recorder(data)
    infos = {i.id: i for i in rec.list_captures()}
    ids = exported["ids"]
    assert all(infos[ids[k]].exported for k in ids)  # the case by the feedback export
    extra = rec.capture(frame(np.zeros((32, 32), np.uint8), 0), None)
    removed = rec.purge_exported()
    assert set(removed) == set(ids.values())
    assert [i.id for i in rec.list_captures()] == [extra]


def test_deidentified_export_has_no_patient_identifiers(exported: dict) -> None:
    root = exported["root"] / "deid"
    original = pydicom.dcmread(pydicom_data_file("US1_UNCR.dcm"), stop_before_pixels=True)
    cine = pydicom.dcmread(pydicom_example("examples_ybr_color.dcm"), stop_before_pixels=True)
    secrets = [
        str(original.PatientName).encode(),
        original.PatientID.encode(),
        original.StudyInstanceUID.encode(),
        original.SOPInstanceUID.encode(),
        str(cine.PatientName).encode(),
        original.InstitutionName.encode(),
    ]
    ob = pydicom.dcmread(pydicom_data_file("OBXXXX1A.dcm"), stop_before_pixels=True)
    secrets += [ob.PatientID.encode(), ob.StudyInstanceUID.encode()]
    files = [p for p in root.rglob("*") if p.is_file()]
    for p in files:
        blob = p.read_bytes()
        pixels = pydicom.dcmread(p).get("PixelData")
        if pixels:  # short names may occur in pixel data by chance
            blob = blob.replace(pixels, b"")
        for s in secrets:
            assert s not in blob, (p, s)
    datasets = _instances(root)
    assert all("113100" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] for ds in datasets)
    # Patient Identity Removed YES only where the pixels hold just the established imaging region
    report = exported["deid"]
    clean = {cid for cid, _ in report.not_clean} ^ {e.capture_id for e in report.exported}
    assert clean == {exported["ids"]["dicom_region"]}
    for key, cid in exported["ids"].items():
        if key == "case":
            continue
        for ds in _by_capture(exported, key, "deid").values():
            codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
            if cid in clean:
                assert ds.PatientIdentityRemoved == "YES" and "113101" in codes, key
            else:
                assert ds.PatientIdentityRemoved == "NO" and "113101" not in codes, key
                assert "Pixels NOT cleaned" in ds.DeidentificationMethod[-1]
    # references survive de-identification
    objs = _by_capture(exported, "dicom_seg", "deid")
    ref = objs["seg"].ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert ref == objs["source"].SOPInstanceUID
    assert len({o.StudyInstanceUID for o in objs.values()}) == 1
    assert len({o.PatientID for o in objs.values()}) == 1 and objs["source"].PatientID.startswith("ANON-")


def test_feedback_export_is_deidentified_with_the_mark(exported: dict) -> None:
    report = exported["feedback"]
    case_id = exported["ids"]["case"]
    assert [e.capture_id for e in report.exported] == [case_id]
    sidecars = list((exported["root"] / "feedback" / "cases").glob("*.json"))
    assert len(sidecars) == 1
    doc = json.loads(sidecars[0].read_text())
    assert doc["clinician"] == {"verdict": "disagree", "expected_label": "lesion", "reason": "false_negative"}
    assert doc["model"]["id"] == MODEL.id and doc["model"]["version"] == MODEL.version
    assert doc["ai"]["label"] is None
    assert case_id not in sidecars[0].read_text() and case_id[:8] not in doc["case"]
    src = pydicom.dcmread(exported["root"] / "feedback" / "DICOM" / doc["dicom"]["source"])
    # the case is a full frame of the cine (its ultrasound region does not fit it): header de-identified,
    # pixels not cleaned, and said so
    assert src.PatientIdentityRemoved == "NO"
    assert [cid for cid, _ in report.not_clean] == [case_id]
    cine = pydicom.dcmread(pydicom_example("examples_ybr_color.dcm"), stop_before_pixels=True)
    assert src.PatientID != cine.PatientID and str(cine.PatientName) not in str(src.PatientName)


def test_export_adds_to_an_existing_fileset_and_nothing_twice(exported: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    stick = tmp_path / "stick"
    shutil.copytree(exported["root"] / "stick", stick)
    assert export_fileset(data, stick).exported == []  # all already exported
    new = Recorder(data, model=MODEL).capture(
        frame(np.full((64, 64), 90, np.uint8), 0, {"phantom": "ultrasound"}), None
    )
    report = export_fileset(data, stick)
    assert [e.capture_id for e in report.exported] == [new]
    fs = FileSet(stick / "DICOMDIR")
    assert len(fs) == sum(len(e.files) for e in exported["report"].exported) + len(report.exported[0].files)


def test_cmd_export_prints_one_line_per_capture_and_exit_codes(
    exported: dict, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    code = cmd_export(data, tmp_path / "out", include_exported=True)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    n = len(exported["report"].exported)
    assert len([line for line in out if line.startswith("exported capture ")]) == n
    assert out[-1].startswith(f"{n} capture(s) exported to ")
    assert cmd_export(data, tmp_path / "missing" / "deeper") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert cmd_export(data, tmp_path / "a-file") == 2
    assert "is a file" in capsys.readouterr().err
    assert cmd_export_feedback(data, tmp_path / "fb", include_exported=True) == 0


def test_read_only_target_is_bad_input(exported: dict, tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if _can_write(ro):
            pytest.skip("running as root: a read-only folder is still writable here")
        assert cmd_export(exported["data"], ro) == 2
        assert "not writable" in capsys.readouterr().err
        with pytest.raises(ExportTargetError):
            export_fileset(exported["data"], ro)
    finally:
        ro.chmod(0o700)


def _can_write(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


def test_export_stick_marker(tmp_path: Path) -> None:
    assert export_stick_settings(tmp_path) is None
    (tmp_path / "firmware-app-export.toml").write_text('deidentify = true\nfolder = "PACS"\n')
    assert export_stick_settings(tmp_path) == {
        "folder": "PACS",
        "deidentify": True,
        "feedback": False,
        "purge": False,
    }
    (tmp_path / "firmware-app-export.toml").write_text('folder = "../etc"\n')
    with pytest.raises(Exception, match="must be relative"):
        export_stick_settings(tmp_path)


def test_export_in_batches_gives_one_fileset(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from firmware_app.records import export as export_module

    monkeypatch.setattr(export_module, "BATCH", 2)
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    report = export_fileset(data, tmp_path / "batched", include_exported=True)
    first = exported["report"]
    assert [e.capture_id for e in report.exported] == [e.capture_id for e in first.exported]
    assert [e.uids for e in report.exported] == [e.uids for e in first.exported]  # same UIDs again
    fs = FileSet(tmp_path / "batched" / "DICOMDIR")
    assert len(fs) == sum(len(e.files) for e in report.exported)


def test_exports_are_in_the_audit_log(exported: dict) -> None:
    from firmware_app.audit import verify_log

    lines = [
        json.loads(x)
        for p in sorted((exported["data"] / "audit").glob("*.jsonl"))
        for x in p.read_text().splitlines()
    ]
    exports = [r for r in lines if r["event"] in ("export", "feedback_export")]
    assert [(r["event"], r["deidentified"]) for r in exports] == [
        ("export", False),
        ("export", True),
        ("feedback_export", True),
    ]
    assert exports[0]["exported"] == len(exported["report"].exported) and exports[0]["failed"] == 0
    assert verify_log(exported["data"]) == []


def test_cmd_export_with_purge_deletes_after_success(exported: dict, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    new = Recorder(data, model=MODEL).capture(frame(np.full((64, 64), 90, np.uint8), 0), None)
    assert cmd_export(data, tmp_path / "out", purge=True) == 0
    assert "deleted from the device" in capsys.readouterr().out
    remaining = {i.id for i in Recorder(data).list_captures()}
    assert new not in remaining and exported["ids"]["dicom_seg"] not in remaining


def test_source_without_patient_and_study_ids_still_exports(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_data_file("US1_UNCR.dcm"))
    for kw in ("PatientID", "StudyID", "StudyDate", "StudyTime"):
        setattr(ds, kw, "")
    path = tmp_path / "noid.dcm"
    ds.save_as(path)
    data = tmp_path / "data"
    px, meta = next(load_frames(path))
    cid = Recorder(data, model=MODEL).capture(frame(px, 0, meta), None)
    report = export_fileset(data, tmp_path / "out")
    assert report.failed == [] and [e.capture_id for e in report.exported] == [cid]
    src = pydicom.dcmread(tmp_path / "out" / report.exported[0].files[0])
    assert src.PatientID.startswith("NOID-") and src.StudyID and src.StudyDate
    assert src.StudyInstanceUID == ds.StudyInstanceUID
    if DCIODVFY:
        for p in (tmp_path / "out").rglob("*"):
            if p.is_file():
                assert _dciodvfy_errors(p) == [], p


def test_every_sr_is_comprehensive_sr_and_3d_only_for_scoord3d(exported: dict) -> None:
    import highdicom as hd

    from firmware_app.records.export import sr_class

    srs = [ds for ds in _instances(exported["root"] / "stick") if ds.Modality == "SR"]
    assert srs and {ds.SOPClassUID for ds in srs} == {"1.2.840.10008.5.1.4.1.1.88.33"}
    # the class follows the content: 2D SCOORD -> Comprehensive SR, SCOORD3D -> Comprehensive 3D SR
    name = hd.sr.CodedConcept("111030", "DCM", "Image Region")
    points = np.array([[1.0, 1.0], [5.0, 1.0], [5.0, 5.0], [1.0, 1.0]], np.float32)
    planar = hd.sr.ScoordContentItem(
        name,
        hd.sr.GraphicTypeValues.POLYLINE,
        points,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    volume = hd.sr.Scoord3DContentItem(
        name,
        hd.sr.GraphicTypeValues3D.POLYLINE,
        np.array([[1.0, 1.0, 0.0], [5.0, 1.0, 0.0], [5.0, 5.0, 0.0]], np.float64),
        "1.2.3.4",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container = hd.sr.ContainerContentItem(hd.sr.CodedConcept("126010", "DCM", "Imaging Measurements"))
    container.ContentSequence = hd.sr.ContentSequence([planar])
    assert sr_class([container]) is hd.sr.ComprehensiveSR
    container.ContentSequence.append(volume)
    assert sr_class([container]) is hd.sr.Comprehensive3DSR


# Type 2 attributes (present, empty when unknown) of the objects the export writes; Patient Orientation is
# Type 2C, required for these images (they have no Image Orientation/Position (Patient))
TYPE_2 = frozenset(
    "PatientName PatientID PatientBirthDate PatientSex ReferringPhysicianName AccessionNumber StudyID "
    "StudyDate StudyTime PatientOrientation".split()
)


def _empty_elements(ds: pydicom.Dataset, path: str = "") -> list[str]:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out += _empty_elements(item, f"{path}{elem.keyword}>")
        elif elem.tag.group != 0x0002 and elem.is_empty:
            out.append(path + (elem.keyword or str(elem.tag)))
    return out


@pytest.mark.parametrize("which", ["stick", "deid", "feedback/DICOM"])
def test_optional_attributes_are_absent_not_empty(exported: dict, which: str) -> None:
    datasets = _instances(exported["root"] / which)
    assert datasets
    for ds in datasets:
        # Laterality (Type 2C) is present, empty, only when the body part examined is unknown (may be paired)
        allowed = TYPE_2 | ({"Laterality"} if "BodyPartExamined" not in ds else set())
        assert [e for e in _empty_elements(ds) if e not in allowed] == [], ds.SOPClassUID.name


def test_laterality_is_absent_for_a_body_part_that_is_not_paired(exported: dict, tmp_path: Path) -> None:
    cr = _by_capture(exported, "dicom_cr")  # the radiograph's header says CHEST
    for role in ("source", "overlay"):
        assert cr[role].BodyPartExamined == "CHEST" and "Laterality" not in cr[role], role
    # stated by the source: carried over; a paired body part without it: present, empty (unknown)
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCI.dcm"))
    data = tmp_path / "data"
    rec = Recorder(data, model=MODEL)
    for body_part, laterality in (("BREAST", "L"), ("KNEE", None)):
        ds.BodyPartExamined = body_part
        if laterality:
            ds.Laterality = laterality
        elif "Laterality" in ds:
            del ds.Laterality
        path = tmp_path / f"{body_part}.dcm"
        ds.save_as(path)
        px, meta = next(load_frames(path))
        rec.capture(frame(px, 0, meta), None)
    report = export_fileset(data, tmp_path / "out")
    got = {}
    for e in report.exported:
        src = pydicom.dcmread(tmp_path / "out" / e.files[0])
        got[src.BodyPartExamined] = src.Laterality
    assert got == {"BREAST": "L", "KNEE": ""}


def _numbers_by_series(folder: Path) -> dict[str, list[tuple[str, int]]]:
    series: dict[str, list[tuple[str, int]]] = {}
    for ds in _instances(folder):
        series.setdefault(ds.SeriesInstanceUID, []).append((ds.SOPInstanceUID, int(ds.InstanceNumber)))
    return series


@pytest.mark.parametrize("which", ["stick", "deid", "feedback/DICOM"])
def test_instance_numbers_are_unique_within_each_series(exported: dict, which: str) -> None:
    series = _numbers_by_series(exported["root"] / which)
    assert series
    for uid, items in series.items():
        numbers = [n for _, n in items]
        assert len(numbers) == len(set(numbers)), (uid, sorted(numbers))
        assert min(numbers) >= 1


def test_instance_numbers_stay_the_same_on_export_again_and_are_never_reused(
    exported: dict, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    first = {uid: n for items in _numbers_by_series(exported["root"] / "stick").values() for uid, n in items}
    export_fileset(data, tmp_path / "again", include_exported=True)
    again = {uid: n for items in _numbers_by_series(tmp_path / "again").values() for uid, n in items}
    assert again == first
    # captures of the same study after a purge get new numbers, not those of the purged ones
    video = _by_capture(exported, "video_seg")["source"]
    Recorder(data).purge_exported()
    rec = Recorder(data, model=MODEL)
    new = [
        rec.capture(frame(np.full((64, 64), 90, np.uint8), 0, {"phantom": "ultrasound"}), None)
        for _ in range(2)
    ]
    report = export_fileset(data, tmp_path / "later")
    assert sorted(e.capture_id for e in report.exported) == sorted(new)  # ids of one second sort at random
    used = {n for items in _numbers_by_series(exported["root"] / "stick").values() for _, n in items}
    later = [pydicom.dcmread(tmp_path / "later" / e.files[0]) for e in report.exported]
    assert {ds.StudyInstanceUID for ds in later} == {video.StudyInstanceUID}
    assert len({int(ds.InstanceNumber) for ds in later}) == 2
    assert not {int(ds.InstanceNumber) for ds in later} & used
    text = (data / "captures" / "instance-numbers.json").read_text()
    assert video.StudyInstanceUID not in text


STANDARD_SCHEMES = {"DCM", "SCT", "UCUM", "RFC5646"}  # PS3.16 Table 8-1: need no declaring


def _codes(ds: pydicom.Dataset) -> list[tuple[str, str, str]]:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                if "CodeValue" in item and "CodingSchemeDesignator" in item:
                    out.append((item.CodeValue, item.CodingSchemeDesignator, item.get("CodeMeaning", "")))
                out += _codes(item)
    return out


def _declared(ds: pydicom.Dataset) -> set[str]:
    return {i.CodingSchemeDesignator for i in ds.get("CodingSchemeIdentificationSequence", [])}


@pytest.mark.parametrize("which", ["stick", "deid", "feedback/DICOM"])
def test_codes_are_standard_or_declared(exported: dict, which: str) -> None:
    for ds in _instances(exported["root"] / which):
        undeclared = {c for c in _codes(ds) if c[1] not in STANDARD_SCHEMES | _declared(ds)}
        assert undeclared == set(), ds.SOPClassUID.name


def test_findings_have_snomed_codes(exported: dict) -> None:
    objs = _by_capture(exported, "dicom_seg")
    segment = objs["seg"].SegmentSequence[0]
    assert (
        segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
    ) == ("32457005", "SCT")
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91720002"
    assert ("32457005", "SCT", "Body fluid") in _codes(objs["sr"])
    assert ("27925004", "SCT", "Nodule") in _codes(_by_capture(exported, "xray_cls")["sr"])
    assert ("52988006", "SCT", "Lesion") in _codes(_by_capture(exported, "dicom_cine_box")["sr"])
    for key in ("dicom_seg", "xray_cls", "dicom_cine_box"):
        for ds in _by_capture(exported, key).values():
            assert (
                "99FWAPP" not in {c[1] for c in _codes(ds)} and "CodingSchemeIdentificationSequence" not in ds
            )


def test_labels_without_a_standard_code_get_declared_local_codes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rec = Recorder(data, model=MODEL)
    img = np.full((96, 96), 80, np.uint8)
    rec.capture(
        frame(img, 0, {"phantom": "ultrasound"}),
        Result(0, "classification", "b-lines", 0.8, True, {"b-lines": 0.8}),
    )
    rec.capture(
        frame(img, 1, {"phantom": "ultrasound"}), seg_result(1, disc(img.shape, (48, 48), 20), "mystery")
    )
    report = export_fileset(data, tmp_path / "out")
    assert report.failed == []
    srs = {}
    for ds in _instances(tmp_path / "out"):
        local = [c for c in _codes(ds) if c[1] == "99FWAPP"]
        if ds.Modality in ("SR", "SEG"):
            assert local, ds.Modality
            assert "99FWAPP" in _declared(ds)
            item = next(
                i for i in ds.CodingSchemeIdentificationSequence if i.CodingSchemeDesignator == "99FWAPP"
            )
            assert item.CodingSchemeName and item.CodingSchemeResponsibleOrganization
        else:
            assert not local and "CodingSchemeIdentificationSequence" not in ds
        if ds.Modality == "SR":
            srs[ds.SOPInstanceUID] = {c[:2] for c in local}
    assert sorted(map(sorted, srs.values())) == [[("B-LINES", "99FWAPP")], [("MYSTERY", "99FWAPP")]]
    if DCIODVFY:
        for p in (tmp_path / "out").rglob("*"):
            if p.is_file():
                assert _dciodvfy_errors(p) == [], p
