"""De-identified export keeps only the imaging region: real files through `run` and `export`.

The Philips OB file of pydicom-data (800x600 palette colour) carries the patient ID and the date as text in
its header bar (rows 0..59); its Sequence of Ultrasound Regions puts the image at x 120..799, y 60..518.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from records_support import MODEL, disc, frame, pydicom_data_file, seg_result

from firmware_app.cli import main
from firmware_app.records.captures import Recorder
from firmware_app.records.export import export_fileset
from firmware_app.sources.dicom import load_frames

DCIODVFY = shutil.which("dciodvfy")
OB = pydicom_data_file("OBXXXX1A.dcm")
US1 = pydicom_data_file("US1_UNCR.dcm")  # ultrasound without a region sequence: full frame
OB_REGION = (120, 60, 680, 459)  # x, y, w, h: Max X1 800 is clipped to the 800-column image
# pieces of the header bar (x0, y0, x1, y1) holding the burned-in patient ID, the date and the time
HEADER_TEXT = {"patient_id": (92, 30, 262, 56), "date": (662, 4, 770, 28), "time": (662, 32, 782, 56)}


def _run_and_export(capsys, tmp_path: Path, source: Path, *export_args: str) -> tuple[Path, str]:
    data, out = tmp_path / "data", tmp_path / "out"
    argv = ["--data-dir", str(data), "run", "--source", f"dicom:{source}", "--frames", "1"]
    code = main([*argv, "--capture-every", "1", "--display", "null"])
    err = capsys.readouterr().err
    assert code == 0, err
    code = main(["--data-dir", str(data), "export", "--to", str(out), *export_args])
    err = capsys.readouterr().err
    assert code == 0, err
    return out, err


def _by_role(out: Path) -> dict[str, pydicom.Dataset]:
    roles = {
        "1.2.840.10008.5.1.4.1.1.66.4": "seg",
        "1.2.840.10008.5.1.4.1.1.88.33": "sr",
        "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    }
    found: dict[str, pydicom.Dataset] = {}
    for inst in FileSet(out / "DICOMDIR"):
        ds = inst.load()
        role = roles.get(ds.SOPClassUID) or ("overlay" if ds.SeriesNumber == 9002 else "source")
        assert role not in found
        found[role] = ds
    return found


def _bgr(ds: pydicom.Dataset) -> np.ndarray:
    return cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2BGR)


def _exact_match(image: np.ndarray, template: np.ndarray) -> bool:
    """Whether ``template`` occurs in ``image`` pixel for pixel."""
    if image.shape[0] < template.shape[0] or image.shape[1] < template.shape[1]:
        return False
    diff = cv2.matchTemplate(image.astype(np.float32), template.astype(np.float32), cv2.TM_SQDIFF)
    th, tw = template.shape[:2]
    # candidates by squared difference (computed in floating point), each then compared exactly
    ys, xs = np.nonzero(diff <= template.size * 0.5)
    return any(np.array_equal(image[y : y + th, x : x + tw], template) for y, x in zip(ys[:100], xs[:100]))


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_deidentified_ob_export_holds_no_pixel_of_the_burned_in_header(capsys, tmp_path: Path) -> None:
    out, err = _run_and_export(capsys, tmp_path, OB, "--deidentify")
    assert "NOT de-identified" not in err
    objs = _by_role(out)
    src, overlay, sr = objs["source"], objs["overlay"], objs["sr"]
    # a phantom-trained model finds nothing on a real scan (the finding rules and the input gate): no SEG
    seg = objs.get("seg")
    full, _ = next(load_frames(OB))  # the original, display-mapped as the source maps it (BGR)
    x, y, w, h = OB_REGION
    # the exported image is exactly the ultrasound region, nothing of the picture around it
    assert (src.Rows, src.Columns) == (h, w)
    assert np.array_equal(_bgr(src), full[y : y + h, x : x + w])
    # no piece of the header bar's text is anywhere in the exported pixels (it is in the original)
    picture = _bgr(overlay)
    for name, (x0, y0, x1, y1) in HEADER_TEXT.items():
        piece = full[y0:y1, x0:x1]
        assert _exact_match(full, piece), name  # the check can see it where it is
        assert not _exact_match(_bgr(src), piece), name
        assert not _exact_match(picture, piece), name
    assert not _exact_match(_bgr(src), full[50:60, 0:w])  # nor the bar's lowest rows
    # truthful flags: the chrome is gone, so is the patient's burned-in identity
    for ds in objs.values():
        assert ds.PatientIdentityRemoved == "YES"
        assert "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert src.BurnedInAnnotation == "NO" and overlay.BurnedInAnnotation == "NO"
    assert "cropped to the imaging region (dicom)" in src.DerivationDescription
    assert src.SourceImageSequence[0].SpatialLocationsPreserved == "NO"
    # the image's scale moved with the crop: its 2D region covers it, the graphics strip below is gone
    (region,) = src.SequenceOfUltrasoundRegions
    assert [region.RegionLocationMinX0, region.RegionLocationMinY0] == [0, 0]
    assert [region.RegionLocationMaxX1, region.RegionLocationMaxY1] == [w - 1, h - 1]
    assert (region.ReferencePixelX0, region.ReferencePixelY0) == (340, 36)  # relative to the region
    original = pydicom.dcmread(OB, stop_before_pixels=True).SequenceOfUltrasoundRegions[0]
    assert region.PhysicalDeltaX == original.PhysicalDeltaX and region.PhysicalUnitsXDirection == 3
    # SEG and SR on the exported grid, when there is a finding to segment
    if seg is not None:
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == pytest.approx([original.PhysicalDeltaY * 10] * 2, rel=1e-6)
        ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert ref == src.SOPInstanceUID
        units = {
            str(v.MeasurementUnitsCodeSequence[0].CodeValue)
            for item in sr.ContentSequence
            for group in item.get("ContentSequence", [])
            for m in group.get("ContentSequence", [])
            for v in m.get("MeasuredValueSequence", [])
        }
        assert {"{pixels}", "mm2"} <= units
    if DCIODVFY:
        files = [p for p in out.rglob("*") if p.is_file()]
        assert {str(p.relative_to(out)): e for p in files if (e := _dciodvfy_errors(p))} == {}


def test_plain_export_of_the_ob_file_is_cropped_too(capsys, tmp_path: Path) -> None:
    out, _ = _run_and_export(capsys, tmp_path, OB)
    src = _by_role(out)["source"]
    assert (src.Rows, src.Columns) == (OB_REGION[3], OB_REGION[2])
    assert src.BurnedInAnnotation == "NO" and "PatientIdentityRemoved" not in src


def test_full_frame_capture_is_not_claimed_deidentified(capsys, tmp_path: Path) -> None:
    out, err = _run_and_export(capsys, tmp_path, US1, "--deidentify")
    original = pydicom.dcmread(US1, stop_before_pixels=True)
    (cid,) = [p.stem for p in (tmp_path / "data" / "captures").glob("*.cap")]
    notices = [line for line in err.splitlines() if "NOT de-identified" in line]
    assert len(notices) == 1 and cid in notices[0] and "full frame" in notices[0]
    for secret in (
        original.PatientID,
        str(original.PatientName),
        original.StudyInstanceUID,
        original.StudyDate,
    ):
        assert secret not in err
    objs = _by_role(out)
    for ds in objs.values():
        assert ds.PatientIdentityRemoved == "NO"
        assert "113101" not in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert "Pixels NOT cleaned: imaging region not established" in ds.DeidentificationMethod
        assert ds.PatientID.startswith("ANON-")  # the header is de-identified all the same
    src = objs["source"]
    assert (src.Rows, src.Columns) == (original.Rows, original.Columns)
    assert "BurnedInAnnotation" not in src  # the file does not say: unknown
    assert objs["overlay"].BurnedInAnnotation == "YES"
    marker = json.loads((tmp_path / "data" / "captures" / f"{cid}.exported").read_text())
    assert marker["deidentified"] is False
    audit = [
        json.loads(x)
        for f in (tmp_path / "data" / "audit").glob("*.jsonl")
        for x in f.read_text().splitlines()
    ]
    (event,) = [r for r in audit if r["event"] == "export"]
    assert event["deidentified"] is True and event["pixels_not_clean"] == [cid]


def test_frame_recorded_whole_is_blanked_outside_its_region(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    px = rng.integers(1, 256, (200, 300), np.uint8)
    meta = {
        "phantom": "ultrasound",
        "imaging_region": [50, 40, 200, 120],
        "region_from": "board",
        "mm_per_px": [0.3, 0.25],
        "full_size": (300, 200),
    }
    rec = Recorder(tmp_path / "data", model=MODEL)
    rec.capture(frame(px, 0, meta), seg_result(0, disc(px.shape, (150, 100), 30)))
    report = export_fileset(tmp_path / "data", tmp_path / "out", deidentify=True)
    assert report.failed == [] and report.not_clean == []
    src = _by_role(tmp_path / "out")["source"]
    got = src.pixel_array
    assert got.shape == px.shape and np.array_equal(got[40:160, 50:250], px[40:160, 50:250])
    outside = got.copy()
    outside[40:160, 50:250] = 0
    assert not outside.any()
    assert src.PatientIdentityRemoved == "YES" and src.BurnedInAnnotation == "NO"
    (region,) = src.SequenceOfUltrasoundRegions
    assert [region.RegionLocationMinX0, region.RegionLocationMinY0] == [50, 40]
    assert [region.RegionLocationMaxX1, region.RegionLocationMaxY1] == [249, 159]
    assert (region.PhysicalDeltaX, region.PhysicalDeltaY) == pytest.approx((0.03, 0.025))
