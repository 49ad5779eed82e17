"""images: reads each file's header first: a huge claim is refused by name, a large image is decoded at a
reduced scale with a small peak memory, and the folder goes on with the next file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from image_files import png_header, write_png

from firmware_app.cli import main
from firmware_app.config import parse_board
from firmware_app.errors import BadConfig, BadFrame
from firmware_app.sources import open_source
from firmware_app.sources.image_header import read_header

ROOT = Path(__file__).resolve().parents[1]


def test_png_claiming_60000_squared_is_one_badframe_and_the_folder_goes_on(tmp_path: Path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 30), 50, np.uint8))
    write_png(tmp_path / "b_huge.png", 60000, 60000, rows=4)
    cv2.imwrite(str(tmp_path / "c.png"), np.full((20, 30, 3), 9, np.uint8))
    src = open_source(f"images:{tmp_path}")
    src.open()
    assert src.read().meta["name"] == "a.png"
    with pytest.raises(BadFrame, match=r"b_huge\.png: 60000x60000 \(3600 MP\) is too large") as info:
        src.read()
    assert "\n" not in str(info.value) and "max_pixels" in str(info.value)
    assert src.read().meta["name"] == "c.png"
    assert src.read() is None


def test_run_over_a_folder_with_a_huge_image_analyses_the_files_after_it(
    capsys, caplog, tmp_path: Path, float_model_dir
):
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(pics / "a.png"), rng.integers(0, 255, (64, 64), np.uint8))
    write_png(pics / "b.png", 60000, 60000, rows=4)
    cv2.imwrite(str(pics / "c.png"), rng.integers(0, 255, (64, 64), np.uint8))
    stats = tmp_path / "stats.json"
    code = main(
        ["--data-dir", str(tmp_path), "run", "--source", f"images:{pics}", "--model", str(float_model_dir)]
        + ["--display", "null", "--stats", str(stats)]
    )
    capsys.readouterr()
    figures = json.loads(stats.read_text())
    assert code == 0 and figures["frames_in"] == 2 and figures["frames_rejected"] == 1
    assert "b.png: 60000x60000 (3600 MP) is too large" in caplog.text


def test_board_max_pixels_reaches_the_image_source(tmp_path: Path):
    board = parse_board({"source": {"uri": f"images:{tmp_path}", "max_pixels": 100_000}}, "b.toml")
    assert board.source["max_pixels"] == 100_000
    assert parse_board({}, "b.toml").source["max_pixels"] == 40_000_000
    with pytest.raises(BadConfig, match=r"\[source\] max_pixels 10 must be"):
        parse_board({"source": {"max_pixels": 10}}, "b.toml")
    cv2.imwrite(str(tmp_path / "big.png"), np.full((400, 600, 3), 7, np.uint8))  # 240000 pixels
    src = open_source(f"images:{tmp_path}", options=board.source)
    frame = src.read()
    assert frame.pixels.shape[:2] == (200, 300) and frame.meta["decode_scale"] == 2


def test_large_jpeg_is_decoded_in_colour_at_reduced_scale(tmp_path: Path):
    img = np.zeros((800, 1200, 3), np.uint8)
    img[..., 2] = 200
    cv2.imwrite(str(tmp_path / "x.jpg"), img)
    src = open_source(f"images:{tmp_path}", options={"max_pixels": 70_000})
    frame = src.read()
    assert frame.pixels.shape == (200, 300, 3) and frame.meta["decode_scale"] == 4
    assert frame.pixels[..., 2].mean() > 150


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "tif", "ppm", "pgm"])
def test_header_gives_the_size_without_decoding(tmp_path: Path, ext: str):
    img = np.zeros((37, 53, 3), np.uint8)
    path = tmp_path / f"x.{ext}"
    cv2.imwrite(str(path), img[..., 0] if ext == "pgm" else img)
    with open(path, "rb") as fh:
        header = read_header(fh)
    assert (header.width, header.height) == (53, 37)


def test_cut_header_is_a_named_badframe(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(png_header(100, 100)[:20])
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    src = open_source(f"images:{tmp_path}")
    with pytest.raises(BadFrame, match=r"a\.png: PNG without an IHDR"):
        src.read()
    with pytest.raises(BadFrame, match=r"b\.jpg: JPEG: no start-of-frame"):
        src.read()


_PEAK = """
import resource, sys
from pathlib import Path
from firmware_app.sources import open_source
src = open_source("images:" + sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
frame = src.read()
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(frame.pixels.shape[0], frame.pixels.shape[1], grew // 1024)
"""


def test_10000_squared_colour_png_is_decoded_reduced_with_small_peak_memory(tmp_path: Path):
    write_png(tmp_path / "big.png", 10000, 10000)  # 300 MB of RGB once decoded whole
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    ).stdout.split()
    height, width, grew_mb = (int(v) for v in out)
    assert height * width <= 10000 * 10000 / 4  # at most a quarter of the pixels (half each side)
    assert grew_mb < 200, f"peak RSS grew by {grew_mb} MB"
