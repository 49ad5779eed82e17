"""Every bundled model on real scans of other kinds and on pictures that are no scan, through `run`:
no ALERT anywhere, and the AI paused ("unlike_training_data") on the first frame of nearly every input.

The whole device path: the DICOM source crops each file to the imaging region it states, the input gate
judges what the model would see, the finding rules decide; the results stream says what happened.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from firmware_app.cli import main

pytest.importorskip("data_store", reason="pydicom-data is not installed")

from gate_inputs import made_frames, real_files  # noqa: E402

MODELS = {"us-fluid-seg": "ultrasound", "us-bline-cls": "ultrasound", "xr-nodule-det": "xray"}


def _run(tmp_path: Path, model: str, source: str, name: str) -> list[dict]:
    results = tmp_path / f"{name}.jsonl"
    argv = ["--data-dir", str(tmp_path / "data"), "run", "--model", model, "--source", source]
    code = main([*argv, "--display", "null", "--results", str(results)])
    assert code == 0
    return [json.loads(line) for line in results.read_text().splitlines()]


def _first_frames(lines: list[dict]) -> dict[str, dict]:
    first: dict[str, dict] = {}
    for line in lines:
        first.setdefault(line["source"]["path"], line)
    return first


@pytest.mark.parametrize("model", sorted(MODELS))
def test_no_alert_and_the_ai_paused_on_real_scans_and_non_scans(model, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in real_files():
        (scans / f.name).symlink_to(f)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for name, px in made_frames(MODELS[model]).items():
        cv2.imwrite(str(pictures / f"{name}.png"), px)

    lines = _run(tmp_path, model, f"dicom:{scans}?watch=0", "scans")
    lines += _run(tmp_path, model, f"images:{pictures}", "pictures")
    assert not [x for x in lines if x["alert"]], f"{model} raised an ALERT"
    assert all(x["state"] != "finding" for x in lines)
    first = _first_frames(lines)
    assert len(first) >= len(real_files()) + 5
    paused = [p for p, x in first.items() if x["state"] == "unlike_training_data"]
    assert len(paused) >= 0.95 * len(first), sorted(set(first) - set(paused))
    for x in lines:
        if x["state"] == "unlike_training_data":
            assert x["label"] is None and x["confidence"] is None and x["boxes"] == []
            assert x["gate"]["score"] > x["gate"]["threshold"] or x["reason"] == "blank frame"


def test_a_cine_with_ultrasound_regions_is_cropped_with_no_board_setting(tmp_path):
    import data_store
    import pydicom

    cine = Path(data_store.__file__).parent / "data" / "color3d_jpeg_baseline.dcm"
    header = pydicom.dcmread(cine, stop_before_pixels=True)
    item = header.SequenceOfUltrasoundRegions[0]
    x0, y0 = item.RegionLocationMinX0, item.RegionLocationMinY0
    w, h = item.RegionLocationMaxX1 - x0 + 1, item.RegionLocationMaxY1 - y0 + 1
    lines = _run(tmp_path, "us-fluid-seg", f"dicom:{cine}", "cine")
    assert len(lines) == int(header.NumberOfFrames)
    for x in lines:
        assert x["region_from"] == "dicom"
        assert x["imaging_region"] == [x0, y0, w, h]
        assert x["mm_per_px"] == pytest.approx([item.PhysicalDeltaX * 10, item.PhysicalDeltaY * 10], rel=1e-5)
        assert not x["alert"]
