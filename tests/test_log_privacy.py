"""No patient identifier, ever, on stderr or in the log: pydicom's warnings are redacted and printed once,
and a source DICOM with an invalid value (a birth date ``1971022X``) never blocks the export of a capture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from records_support import MODEL, disc, frame, pydicom_data_file, seg_result

from firmware_app.records.captures import Recorder
from firmware_app.sources.dicom import load_frames

ROOT = Path(__file__).resolve().parents[1]
IDENTIFIERS = ("1971022X", "Doe", "JANE", "Jane", "female", "53 years")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("JOURNAL_STREAM", None)
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "firmware_app", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
def bad_header_capture(tmp_path: Path) -> Path:
    """A data dir holding one capture made from a US DICOM whose patient attributes break their VRs."""
    ds = pydicom.dcmread(pydicom_data_file("US1_UNCR.dcm"))
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "1971022X"
    ds.PatientSex = "female"
    ds.PatientAge = "53 years"
    src = tmp_path / "bad-birth-date.dcm"
    ds.save_as(src)
    data = tmp_path / "data"
    px, meta = next(load_frames(src))
    Recorder(data, model=MODEL).capture(
        frame(px, 0, {**meta, "source": f"dicom:{src}"}), seg_result(0, disc(px.shape[:2], (320, 240), 50))
    )
    return data


def _no_identifier(text: str) -> None:
    found = [v for v in IDENTIFIERS if v in text]
    assert found == [], text


@pytest.mark.parametrize("deidentify", [False, True], ids=["identified", "deidentified"])
def test_export_of_a_capture_with_an_invalid_birth_date_succeeds_and_prints_no_identifier(
    bad_header_capture: Path, tmp_path: Path, deidentify: bool
) -> None:
    args = ["export", "--data-dir", str(bad_header_capture), "--to", str(tmp_path / "stick")]
    run = _cli(*args, *(["--deidentify"] if deidentify else []))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    _no_identifier(run.stdout + run.stderr)
    assert "PatientBirthDate" in run.stderr  # the keyword is named, not the value
    audit = "".join(p.read_text() for p in (bad_header_capture / "audit").glob("*.jsonl"))
    _no_identifier(audit)
    files = [p for p in (tmp_path / "stick").rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(files) == 4
    for f in files:
        assert pydicom.dcmread(f).get("PatientBirthDate", "") == ""


SCRIPT = """
import logging, sys, warnings
from firmware_app.logsetup import setup
setup(0)
from pydicom.dataset import Dataset
ds = Dataset()
ds.PatientBirthDate = "1971022X"
ds.PatientAge = "53 years"
ds.PatientSex = "female"
ds.PatientName = "Doe^Jane" * 10
logging.getLogger("pydicom").warning("Value %r for 'PatientSex' (0010,0040) is odd", "female")
warnings.warn("Invalid value 'Doe^Jane' seen")
"""


def test_pydicom_warnings_are_printed_once_through_logging_with_values_redacted() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=_env(), timeout=60, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    _no_identifier(run.stderr)
    lines = run.stderr.splitlines()
    assert len([line for line in lines if "Invalid value for VR DA" in line]) == 1, run.stderr
    assert len([line for line in lines if "Invalid value for VR AS" in line]) == 1, run.stderr
    assert "'PatientSex' (0010,0040)" in run.stderr  # keyword and tag kept
    assert "<redacted>" in run.stderr
    assert not any("warn_and_log" in line or line.startswith("  ") for line in lines), run.stderr
