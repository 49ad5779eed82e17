"""The README's demo: phantom -> bundled int8 model -> full pipeline -> the screen as PNG."""

from __future__ import annotations

import json

import cv2

from firmware_app.cli import main


def test_demo_writes_screen_video_and_stats_with_dice(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--frames", "45", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "last_frame.png" in printed and "Dice" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["model"].startswith("us-fluid-seg@") and stats["backend"] == "litert-cpu"
    assert stats["frames_inferred"] == 45 and stats["mismatched_overlays"] == 0 and stats["errors"] == 0
    assert stats["dice"] >= 0.8
    screen = cv2.imread(str(out / "last_frame.png"))
    assert screen.shape == (480, 800, 3)
    # the NOT FOR DIAGNOSTIC USE banner (amber) runs across the top of the image area
    b, g, r = screen[4, 100]
    assert r > 200 and 120 < g < 220 and b < 60
    video = cv2.VideoCapture(str(out / "demo.mp4"))
    assert video.isOpened() and video.get(cv2.CAP_PROP_FRAME_COUNT) >= 10
