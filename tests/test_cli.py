from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firmware_app.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("firmware-app: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--board", "no-such-board"], "board 'no-such-board' not found"),
        (["run", "--model", "no-such-model"], "model 'no-such-model' not found"),
        (["run", "--source", "rtsp://x"], "unknown scheme 'rtsp'"),
        (["run", "--source", "images:/nonexistent/folder", "--frames", "1"], "/nonexistent/folder not found"),
        (["run", "--source", "synthetic:ultrasound?seed=abc"], "seed='abc' is not an integer"),
        (["run", "--display", "hdmi:1"], "hdmi:1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, float_model_dir, argv, needle):
    if "--model" not in argv:
        argv = [*argv, "--model", str(float_model_dir)]
    code, _, err = run_cli(capsys, "--data-dir", str(tmp_path), *argv)
    assert code == 2
    assert needle in one_error_line(err)


def test_third_party_float_model_runs_with_a_manifest(capsys, tmp_path, float_model_dir):
    stats_path = tmp_path / "stats.json"
    code, _, err = run_cli(
        capsys,
        "run",
        "--model",
        str(float_model_dir),
        "--source",
        "synthetic:ultrasound?fps=0",
        "--display",
        f"png:{tmp_path / 'screen'}",
        "--frames",
        "5",
        "--stats",
        str(stats_path),
        "--data-dir",
        str(tmp_path),
    )
    assert code == 0, err
    stats = json.loads(stats_path.read_text())
    assert stats["frames_inferred"] == 5 and stats["model"] == "selfie-seg@0.10.18"
    assert stats["mismatched_overlays"] == 0 and stats["backend"] == "litert-cpu"
    assert (tmp_path / "screen" / "last_frame.png").is_file()


def test_data_dir_accepted_after_the_subcommand(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "models", "list", "--data-dir", str(tmp_path))
    assert code == 0


def test_doctor_reports_each_item(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "doctor", "--data-dir", str(tmp_path))
    names = {line.split()[1] for line in out.splitlines() if line.split()}
    for item in ("tflite", "board", "display", "capture", "gpio", "serial", "data", "clock", "model"):
        assert item in names
    assert all(line.split()[0] in ("OK", "MISSING", "FAULT") for line in out.splitlines())
    assert code in (0, 1)


def test_doctor_on_edgetpu_board_reports_missing_accelerator(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "doctor", "--board", "rpi5-coral-usb", "--data-dir", str(tmp_path))
    line = next(ln for ln in out.splitlines() if "backend edgetpu" in ln)
    assert line.startswith("MISSING") and "libedgetpu.so.1" in line


def test_doctor_says_which_mjpg_decoder_a_grabber_gets(monkeypatch):
    from firmware_app import doctor

    grabber, phantom = {"uri": "v4l2:/dev/video0", "fourcc": "MJPG"}, {"uri": "synthetic:ultrasound"}
    monkeypatch.setattr(doctor, "_version", lambda dist: None)  # PyTurboJPEG not installed
    line = doctor.check_jpeg(grabber).line()
    assert line.startswith("MISSING") and "firmware-app[turbojpeg]" in line and "libturbojpeg0" in line
    assert doctor.check_jpeg(phantom).status == "OK"  # the board's source needs no MJPG decoder
    import turbojpeg

    def broken() -> None:
        raise RuntimeError("Unable to locate turbojpeg library automatically.\nsecond line")

    monkeypatch.setattr(doctor, "_version", lambda dist: "1.8.3")
    monkeypatch.setattr(turbojpeg, "TurboJPEG", broken)  # installed, the C library is not
    line = doctor.check_jpeg(grabber).line()
    assert line.startswith("MISSING") and "not usable (Unable to locate" in line and "second" not in line


def test_sigterm_stops_the_daemon_cleanly(tmp_path, float_model_dir):
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_app",
            "--data-dir",
            str(tmp_path),
            "run",
            "--model",
            str(float_model_dir),
            "--source",
            "synthetic:ultrasound?fps=15&width=160&height=120",
            "--display",
            "null",
            "--stats",
            str(stats),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    time.sleep(2.0)  # up and showing frames
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 3.0
    assert json.loads(stats.read_text())["frames_inferred"] > 0


def test_update_selftest_rollback_through_the_command_line(tmp_path, capsys):
    """keygen -> make_bundle -> firmware-app update -> models list -> selftest -> models rollback."""
    from update_kit import make_model

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    keys = tmp_path / "signing"
    tool = [sys.executable]
    subprocess.run(
        [*tool, str(repo / "tools" / "keygen.py"), "--out", str(keys)], check=True, capture_output=True
    )
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "hospital.pub").write_bytes((keys / "signing.pub").read_bytes())
    bundles = []
    for seq, version in ((1, "1.0.0"), (2, "1.1.0")):
        model = make_model(tmp_path / f"m{seq}", version)
        out = tmp_path / f"selfie-{version}.fwb"
        subprocess.run(
            [
                *tool,
                str(repo / "tools" / "make_bundle.py"),
                str(model),
                "--sequence",
                str(seq),
                "--board",
                "x86-dev",
                "--key",
                str(keys / "signing.key"),
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        bundles.append(out)
    d = ["--data-dir", str(data)]
    code, out, err = run_cli(capsys, *d, "update", str(bundles[0]))
    assert code == 0 and "installed" in out, err
    code, out, err = run_cli(capsys, *d, "update", str(bundles[1]))
    assert code == 0 and "1.1.0" in out, err
    code, out, err = run_cli(
        capsys, *d, "update", str(bundles[0])
    )  # older sequence: rejected, nothing changes
    assert code == 2 and "Rejected" in err
    code, out, _ = run_cli(capsys, *d, "models", "list")
    assert "1.1.0" in out
    code, out, err = run_cli(capsys, *d, "selftest")
    assert code == 0, err
    code, out, err = run_cli(capsys, *d, "models", "rollback", "selfie-seg")
    assert code == 0, err
    code, out, _ = run_cli(capsys, *d, "models", "show", "selfie-seg")
    assert "version: 1.0.0" in out and "installed" in out
    code, out, err = run_cli(capsys, *d, "audit", "verify")
    assert code == 0 and "intact" in out, err
