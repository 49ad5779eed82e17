"""Every bad path and unwritable output gets one clear line naming it, before any work starts, never a
traceback. Tests run as root, where modes do not stop writes: impossible paths (a parent that is a file, a
path that is a folder) and a simulated EACCES stand in for read-only ones."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_app import cli

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "firmware_app", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=timeout,
        cwd=ROOT,
    )


def _one_error_line(stderr: str, *names: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("firmware-app: error:")]
    assert len(errors) == 1, stderr
    for name in names:
        assert name in errors[0], stderr
    return errors[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "file.txt"
    f.write_text("not a folder\n")
    return f


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_run_stats_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path, a_file: Path, where: str
) -> None:
    stats = a_file / "stats.json" if where == "under_a_file" else tmp_path
    run = _cli(
        "run", "--frames", "2", "--display", "null", "--data-dir", str(tmp_path / "d"), "--stats", str(stats)
    )
    assert run.returncode == 2
    _one_error_line(run.stderr, "--stats", str(stats))
    assert "frames in" not in run.stderr  # refused before the run, not after it
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_run_stats_in_a_read_only_folder_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    real_touch = Path.touch

    def touch(self: Path, *a, **k) -> None:
        if self.parent == tmp_path / "ro":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_touch(self, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(Path, "touch", touch)
    code = cli.main(["run", "--frames", "2", "--display", "null", "--stats", str(tmp_path / "ro" / "s.json")])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err, "--stats", "Permission denied")
    assert str(tmp_path / "ro") in line


def test_write_json_leaves_no_temp_file_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "stats.json"
    target.mkdir()
    with pytest.raises(OSError):
        cli.write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_export_from_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path, a_file: Path) -> None:
    run = _cli("export", "--data-dir", str(a_file), "--to", str(tmp_path / "stick"))
    assert run.returncode == 2
    _one_error_line(run.stderr, "--data-dir", str(a_file))


def test_export_from_a_read_only_data_dir_is_refused_before_exporting(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    data = tmp_path / "data"
    (data / "captures").mkdir(parents=True)
    real_touch = Path.touch

    def touch(self: Path, *a, **k) -> None:
        if self.parent in (data, data / "captures"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_touch(self, *a, **k)

    monkeypatch.setattr(Path, "touch", touch)
    code = cli.main(["export", "--data-dir", str(data), "--to", str(tmp_path / "stick")])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--data-dir", "Read-only file system")
    assert not (tmp_path / "stick").exists()


def test_validate_report_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path, a_file: Path
) -> None:
    report = a_file / "report"
    run = _cli("validate", "--model", "us-fluid-seg", "--dataset", str(tmp_path), "--report", str(report))
    assert run.returncode == 2
    _one_error_line(run.stderr, "--report", str(report))


def test_export_when_a_capture_is_a_folder_prints_no_traceback(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "captures" / "20260101-120000-abcdef.cap").mkdir(parents=True)
    run = _cli("export", "--data-dir", str(data), "--to", str(tmp_path / "stick"))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and not any(
        line.startswith("  ") for line in run.stderr.splitlines()
    )
    assert "20260101-120000-abcdef" in run.stderr


DECODER_FAILS = """
import logging
from firmware_app.logsetup import setup
setup(0)
log = logging.getLogger("pydicom.pixels.decoders.base")
for name in ("a.dcm", "b.dcm"):
    try:
        raise ValueError(f"Unable to decode {name}: bad JPEG 2000 codestream")
    except ValueError as exc:
        log.exception(exc)
"""


def test_pydicom_decoder_tracebacks_fold_into_one_line_each() -> None:
    run = subprocess.run(
        [sys.executable, "-c", DECODER_FAILS],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    lines = run.stderr.splitlines()
    assert "Traceback" not in run.stderr
    assert len(lines) == 2 and all("bad JPEG 2000 codestream" in line for line in lines), run.stderr
