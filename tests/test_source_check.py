"""``firmware-app source-check``: the imaging region of a source, as a board-TOML crop and a PNG."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from scanner_screens import Layout, ScannerScreen, frames

from firmware_app.cli import main
from firmware_app.sources.check import GREEN, check_source, render_check
from firmware_app.sources.region_detect import iou

try:
    import data_store

    CINE = Path(data_store.__file__).parent / "data" / "color3d_jpeg_baseline.dcm"
except ImportError:  # pragma: no cover - pydicom-data is a dev dependency
    CINE = None
needs_data = pytest.mark.skipif(CINE is None, reason="pydicom-data is not installed")


def write_clip(path: Path, screen: ScannerScreen, n: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (screen.width, screen.height))
    for img in frames(screen, n):
        writer.write(img)
    writer.release()
    return path


def crop_of(out: str) -> list[int]:
    m = re.search(r"^crop = \[(\d+), (\d+), (\d+), (\d+)\]", out, re.M)
    assert m, out
    return [int(v) for v in m.groups()]


def is_green(px: np.ndarray) -> bool:
    return bool(np.abs(px.astype(int) - np.array(GREEN)).max() <= 40)


@pytest.fixture(scope="module")
def sector_clip(tmp_path_factory) -> tuple[Path, ScannerScreen]:
    screen = ScannerScreen(1280, 720, (0, Layout("phantom", (220, 60, 820, 640), seed=4)))
    return write_clip(tmp_path_factory.mktemp("clip") / "scan.avi", screen, 90), screen


def test_prints_the_detected_crop_and_draws_it_where_it_is(sector_clip, tmp_path, capsys):
    clip, screen = sector_clip
    out = tmp_path / "check"
    assert main(["source-check", "--source", f"file:{clip}?realtime=0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "from detected" in text and "mm per px:   unknown" in text
    x, y, w, h = crop_of(text)
    assert iou((x, y, w, h), screen.truth(0)) >= 0.9
    png = cv2.imread(str(out / "region.png"))
    assert png is not None and png.shape == (720, 1280, 3)
    # the outline runs along the region's border: its left and right edges at mid-height, its bottom edge
    assert is_green(png[y + h // 2, x]) and is_green(png[y + h // 2, x + w - 1])
    assert is_green(png[y + h - 1, x + w // 2])
    assert not is_green(png[y + h // 2, x - 6]) and not is_green(png[y + h // 2, x + 6])  # a thin line


def test_the_board_crop_wins_and_the_stream_is_still_shown(sector_clip, tmp_path, capsys):
    clip, screen = sector_clip
    board = tmp_path / "board.toml"
    board.write_text('name = "bench"\n[source]\ncrop = [100, 50, 900, 600]\n')
    args = ["source-check", "--source", f"file:{clip}?realtime=0", "--board", str(board)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "from board" in text and crop_of(text) == [100, 50, 900, 600]
    stream = re.search(r"moves in \[(\d+), (\d+), (\d+), (\d+)\]", text)
    assert stream and iou(tuple(int(v) for v in stream.groups()), screen.truth(0)) >= 0.9


def test_too_few_frames_gives_the_full_frame_and_says_why(sector_clip, tmp_path, capsys):
    clip, _ = sector_clip
    assert (
        main(
            ["source-check", "--source", f"file:{clip}?realtime=0", "--frames", "20", "--out", str(tmp_path)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "from full_frame" in text and "20 of the 60 frames" in text
    assert "crop = [0, 0, 1280, 720]  # the full frame" in text
    assert (tmp_path / "region.png").is_file()


def test_v4l2_replay_through_check_source(monkeypatch):
    from firmware_app.sources import v4l2

    screen = ScannerScreen(1920, 1080, (0, Layout("linear", (500, 120, 800, 860), seed=3)))
    recorded = frames(screen, 64)
    monkeypatch.setattr(v4l2, "OpenCvCapture", lambda *a, **k: v4l2.ReplayCapture(recorded))
    check = check_source("v4l2:0", frames=64)
    assert check.region.origin == "detected" and iou(check.region.rect, screen.truth(0)) >= 0.9
    img = render_check(check)
    x, y, w, h = check.region.rect
    assert is_green(img[y + h // 2, x]) and is_green(img[y, x + w // 2])


@needs_data
def test_a_dicom_cine_reports_its_stated_region_and_scale(tmp_path, capsys):
    assert main(["source-check", "--source", f"dicom:{CINE}", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "from dicom" in text and "mm per px:   0.51" in text
    x, y, w, h = crop_of(text)
    assert (x, y, w, h) == (84, 31, 512, 384)
    # a real scanner's cine: the moving fan found in the stream lies inside the region the file states
    stream = re.search(r"moves in \[(\d+), (\d+), (\d+), (\d+)\]", text)
    assert stream
    sx, sy, sw, sh = (int(v) for v in stream.groups())
    assert x - 4 <= sx and y - 4 <= sy and sx + sw <= x + w + 4 and sy + sh <= y + h + 4
    assert iou((sx, sy, sw, sh), (x, y, w, h)) >= 0.85
    assert (tmp_path / "region.png").is_file()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["source-check", "--source", f"file:{tmp_path / 'none.avi'}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.avi" in err[0] and "not found" in err[0]
    assert main(["source-check", "--source", "rtsp://cam", "--out", str(tmp_path)]) == 2
    assert main(["source-check", "--source", "synthetic:ultrasound", "--board", "no-such-board"]) == 2


def test_the_png_blacks_out_what_the_board_blacks_out(sector_clip, tmp_path, capsys):
    clip, _ = sector_clip
    board = tmp_path / "board.toml"
    board.write_text('name = "bench"\n[source]\nblackout = [[0, 0, 640, 40]]\n')  # the patient's name
    args = [
        "source-check",
        "--source",
        f"file:{clip}?realtime=0",
        "--board",
        str(board),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert "from detected" in capsys.readouterr().out  # a blackout alone leaves the detection on
    png = cv2.imread(str(tmp_path / "region.png"))
    assert (png[2:24, 2:638] == 0).all()  # (the region's label may sit below row 24)
