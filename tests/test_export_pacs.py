"""A whole export stored into a real PACS: Orthanc on the loopback, fed by dcmtk's storescu.

Optional: runs when ``Orthanc`` and ``storescu`` are installed (Debian: ``apt-get install orthanc dcmtk``),
skipped otherwise. Orthanc gets its own config, storage and index in a temp folder and two free ports; it
takes stores only from 127.0.0.1 with this test's AE title, its REST API only from the local host, and it
is stopped (terminate, then kill) whatever happens, every step with a time limit.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from firmware_app.records.export import export_fileset

ORTHANC = shutil.which("Orthanc")
STORESCU = shutil.which("storescu")
pytestmark = pytest.mark.skipif(
    ORTHANC is None or STORESCU is None,
    reason="Orthanc and dcmtk's storescu not installed (apt-get install orthanc dcmtk)",
)
AET = "FWAPPTEST"
PACS_AET = "ORTHANC"
START_S = 30.0
STORE_S = 180.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(http_port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


class Pacs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dicom_port, self.http_port = _free_port(), _free_port()
        while self.http_port == self.dicom_port:
            self.http_port = _free_port()
        config = {
            "Name": "firmware-app test PACS",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAet": PACS_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"fwapp": [AET, "127.0.0.1", 104]},
            "Plugins": [],
            "StorageCompression": False,
        }
        (root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = (root / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT, cwd=root
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited ({self.proc.returncode}):\n{self.log_text()}")
            try:
                _get(self.http_port, "/system")
                return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"Orthanc not ready within {START_S:.0f} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.root / "orthanc.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def store(pacs: Pacs, files: list[Path], *options: str) -> str:
    run = subprocess.run(
        [STORESCU, "-aet", AET, "-aec", PACS_AET, "-to", "30", "-ta", "30", "-td", "60", *options]
        + ["127.0.0.1", str(pacs.dicom_port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=STORE_S,
    )
    out = run.stdout + run.stderr
    # the only failure accepted: no presentation context for a SEG (storescu's default list lacks it)
    errors = [
        line
        for line in out.splitlines()
        if line.startswith("E:") and SEG not in line and "No valid Presentation Context" not in line
    ]
    assert errors == [], out + pacs.log_text()
    if "--required" in options:
        assert run.returncode == 0, out + pacs.log_text()
    return out


def _stored(pacs: Pacs) -> set[str]:
    stored = _get(pacs.http_port, "/instances?expand")
    assert isinstance(stored, list)
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in stored}


@pytest.fixture
def pacs(tmp_path: Path):
    root = tmp_path / "orthanc"
    root.mkdir()
    server = Pacs(root)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_whole_export_is_stored_into_orthanc(pacs: Pacs, tmp_path: Path) -> None:
    from test_records_export import _captures

    data = tmp_path / "data"
    data.mkdir()
    _captures(data)
    report = export_fileset(data, tmp_path / "stick")
    assert report.failed == [] and report.exported
    stick = tmp_path / "stick"
    files = [Path(inst.path) for inst in FileSet(stick / "DICOMDIR")]
    exported = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    assert len(exported) == len(files)
    classes = {uid: pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID for uid, p in exported.items()}
    # 1. storescu's own default presentation contexts (what a site sends with when nobody configures it):
    # every image and every SR goes in (a Comprehensive 3D SR would not); dcmtk's fixed default list
    # lacks Segmentation Storage, so the SEGs may be refused, and only for that
    store(pacs, files, "--no-halt")
    segs = {uid for uid, c in classes.items() if c == SEG}
    assert set(exported) - segs <= _stored(pacs), pacs.log_text()
    # 2. the File-set's own SOP classes and transfer syntaxes (storescu -R): the whole export
    store(pacs, files, "--required")
    assert _stored(pacs) == set(exported), pacs.log_text()
    assert "1.2.840.10008.5.1.4.1.1.88.33" in classes.values()  # the SRs went in as Comprehensive SR
    # each series' Instance Numbers are unique in the PACS as well
    for series_id in _get(pacs.http_port, "/series"):
        numbers = [
            i["MainDicomTags"].get("InstanceNumber")
            for i in _get(pacs.http_port, f"/series/{series_id}/instances")
        ]
        assert len(numbers) == len(set(numbers)), numbers
