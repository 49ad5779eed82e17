"""`firmware-app run` on real DICOM files from pydicom and pydicom-data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from firmware_app.cli import main

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
try:
    import data_store

    DATA_STORE = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover
    DATA_STORE = None

CINE = PYDICOM_FILES / "examples_ybr_color.dcm"  # ultrasound, 30 frames, JPEG YBR_FULL_422


def run(capsys, tmp_path, *argv):
    stats = tmp_path / "stats.json"
    code = main(["--data-dir", str(tmp_path), "run", *argv, "--display", "null", "--stats", str(stats)])
    err = capsys.readouterr().err
    return code, (json.loads(stats.read_text()) if stats.exists() else None), err


def test_multiframe_ultrasound_cine_processes_every_frame(capsys, tmp_path, float_model_dir):
    ds = pydicom.dcmread(CINE, stop_before_pixels=True)
    n = int(ds.NumberOfFrames)
    assert ds.Modality == "US" and n == 30
    code, stats, err = run(
        capsys, tmp_path, "--source", f"dicom:{CINE}", "--model", str(float_model_dir), "--frames", str(n)
    )
    assert code == 0, err
    assert stats["frames_in"] == n and stats["frames_inferred"] == n and stats["frames_dropped"] == 0
    assert stats["mismatched_overlays"] == 0 and stats["errors"] == 0


def test_whole_cine_without_frames_ends_at_end_of_file(capsys, tmp_path, float_model_dir):
    code, stats, err = run(capsys, tmp_path, "--source", f"dicom:{CINE}", "--model", str(float_model_dir))
    assert code == 0, err
    assert stats["frames_inferred"] == 30


@pytest.mark.skipif(DATA_STORE is None, reason="pydicom-data is not installed")
def test_folder_mixing_valid_and_broken_files(tmp_path, float_model_dir):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(DATA_STORE / "US1_UNCR.dcm", folder / "a_us.dcm")  # ultrasound RGB, 1 frame
    shutil.copy(DATA_STORE / "RG1_UNCI.dcm", folder / "b_cr.dcm")  # radiograph, 1 frame
    (folder / "c_garbage.dcm").write_bytes(b"\x00garbage" * 64)
    raw = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    (folder / "d_truncated.dcm").write_bytes(raw[: len(raw) // 2])
    shutil.copy(PYDICOM_FILES / "rtplan.dcm", folder / "e_no_pixels.dcm")
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", folder / "f_mr.dcm")
    stats_path = tmp_path / "stats.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "firmware_app",
            "--data-dir",
            str(tmp_path),
            "run",
            "--source",
            f"dicom:{folder}?watch=0",
            "--model",
            str(float_model_dir),
            "--display",
            "null",
            "--stats",
            str(stats_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr
    assert proc.returncode == 0, err
    stats = json.loads(stats_path.read_text())
    assert stats["frames_inferred"] == 3 and stats["errors"] == 3
    for name in ("c_garbage.dcm", "d_truncated.dcm", "e_no_pixels.dcm"):
        lines = [ln for ln in err.splitlines() if name in ln]
        assert len(lines) == 1, err
    for name in ("a_us.dcm", "b_cr.dcm", "f_mr.dcm"):
        assert name not in err
