from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_app.errors import BadConfig, BadFrame, BadSource, SourceUnavailable
from firmware_app.sources import open_source, split_uri
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.v4l2 import MockCapture, V4l2Source


def test_split_uri_and_unknown_scheme():
    assert split_uri("dicom:/a/b?watch=0") == ("dicom", "/a/b", {"watch": "0"})
    with pytest.raises(BadSource, match="unknown scheme 'rtsp'"):
        open_source("rtsp://camera")
    with pytest.raises(BadSource, match="expected SCHEME:TARGET"):
        open_source("/dev/video0")


def test_profile_blacks_out_then_crops():
    img = np.full((100, 200), 200, np.uint8)
    prof = SourceProfile(crop_rect=(50, 10, 100, 80), blackout=((0, 0, 200, 20),))
    out = prof.apply(img)
    assert out.shape == (80, 100)
    assert (out[:10] == 0).all() and (out[10:] == 200).all()  # rows 10..19 of the frame were blacked out
    assert (img == 200).all()  # the source frame is untouched


def test_profile_crop_outside_frame_and_bad_config():
    with pytest.raises(ValueError, match="outside the 50x50 frame"):
        SourceProfile(crop_rect=(40, 40, 20, 20)).apply(np.zeros((50, 50), np.uint8))
    with pytest.raises(BadConfig, match="crop: width and height must be > 0"):
        SourceProfile.from_config({"crop": [0, 0, 0, 10]})


def test_v4l2_unplugged_gives_no_signal_then_reconnects():
    cap = MockCapture(64, 48, plugged=False)
    clock = [0.0]
    src = V4l2Source("v4l2:/dev/video9", cap, reconnect_s=0.0, clock=lambda: clock[0])
    src.open()
    with pytest.raises(SourceUnavailable, match="no capture device"):
        src.read()
    cap.plugged = True
    f = src.read()
    assert f is not None and f.pixels.shape == (48, 64, 3) and f.id == 0
    cap.plugged = False  # cable pulled mid-stream
    with pytest.raises(SourceUnavailable, match="capture lost"):
        src.read()
    cap.plugged = True
    assert src.read().id == 1
    assert cap.opens >= 3
    src.close()
    src.close()  # safe twice


def test_v4l2_reconnect_waits_and_stop_interrupts_the_wait():
    cap = MockCapture(plugged=False)
    src = V4l2Source("v4l2:0", cap, reconnect_s=5.0)
    src.open()
    threading.Timer(0.2, src.stop).start()
    t0 = time.monotonic()
    assert src.read() is None  # stop() ended the back-off wait early
    assert time.monotonic() - t0 < 2.0


def test_v4l2_absent_device_does_not_raise_at_open():
    src = open_source("v4l2:/dev/video-does-not-exist", options={"reconnect_s": 0.01})
    src.open()
    with pytest.raises(SourceUnavailable):
        src.read()
    src.close()


def test_source_profile_applies_to_every_source():
    cap = MockCapture(64, 48)
    src = V4l2Source("v4l2:0", cap, profile=SourceProfile(crop_rect=(8, 8, 32, 16)))
    src.open()
    f = src.read()
    assert f.pixels.shape == (16, 32, 3) and f.meta["full_size"] == (64, 48)


def make_video(path: Path, n: int, fps: float = 50.0) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(n):
        w.write(np.full((48, 64, 3), i * 20, np.uint8))
    w.release()


def test_file_source_as_fast_as_possible_yields_every_frame(tmp_path: Path):
    make_video(tmp_path / "clip.avi", 7)
    src = open_source(f"file:{tmp_path / 'clip.avi'}?realtime=0")
    assert not src.live
    src.open()
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    assert [f.id for f in frames] == list(range(7))
    assert frames[3].meta["frame_index"] == 3


def test_file_source_native_rate_is_paced(tmp_path: Path):
    make_video(tmp_path / "clip.avi", 6, fps=20.0)
    src = open_source(f"file:{tmp_path / 'clip.avi'}")
    assert src.live
    src.open()
    t0 = time.monotonic()
    n = 0
    while src.read() is not None:
        n += 1
    assert n == 6 and time.monotonic() - t0 >= 0.2  # 6 frames at 20 fps take >= 0.25 s


def test_file_source_missing_or_not_a_video(tmp_path: Path):
    with pytest.raises(BadSource, match="not found"):
        open_source(f"file:{tmp_path / 'none.mp4'}").open()
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    with pytest.raises(BadSource, match="not a video"):
        open_source(f"file:{tmp_path / 'junk.mp4'}").open()
    with pytest.raises(BadSource, match="unknown parameter"):
        open_source(f"file:{tmp_path / 'x.mp4'}?speed=2")


def test_images_folder_skips_unreadable_file_by_name(tmp_path: Path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((10, 12), np.uint8))
    (tmp_path / "b.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "c.png"), np.full((10, 12, 3), 9, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(f"images:{tmp_path}")
    src.open()
    assert src.read().meta["name"] == "a.png"
    with pytest.raises(BadFrame, match="b.png: not an image"):
        src.read()
    c = src.read()
    assert c.meta["name"] == "c.png" and c.pixels.shape == (10, 12, 3)
    assert src.read() is None


def test_images_folder_empty_or_missing(tmp_path: Path):
    with pytest.raises(BadSource, match="no images"):
        open_source(f"images:{tmp_path}").open()
    with pytest.raises(BadSource, match="not found"):
        open_source(f"images:{tmp_path / 'nope'}").open()
