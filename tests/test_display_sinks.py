"""Displays by URI: framebuffer pixel formats and strides, PNG and video files, null, bad URIs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from firmware_app.display.sinks import Display, display_classes, open_display
from firmware_app.errors import BadDisplay


def _canvas(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _fake_fb(tmp_path, w: int, h: int, bpp: int, stride: int, name: str = "fb0"):
    sysfs = tmp_path / "sys"
    (sysfs / name).mkdir(parents=True)
    (sysfs / name / "virtual_size").write_text(f"{w},{h}\n")
    (sysfs / name / "bits_per_pixel").write_text(f"{bpp}\n")
    (sysfs / name / "stride").write_text(f"{stride}\n")
    dev = tmp_path / name
    dev.write_bytes(b"\xaa" * stride * h)
    return dev, sysfs


def _decode_565(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = raw.astype(np.uint16)[..., 0] | (raw.astype(np.uint16)[..., 1] << 8)  # little endian
    return (v >> 11) & 0x1F, (v >> 5) & 0x3F, v & 0x1F


@pytest.mark.parametrize("stride_pad", [0, 24])
def test_framebuffer_rgb565_round_trips_with_stride(tmp_path, stride_pad):
    w, h = 90, 40
    stride = w * 2 + stride_pad
    dev, sysfs = _fake_fb(tmp_path, w, h, 16, stride)
    canvas = _canvas(w, h)
    with open_display(f"fb:{dev}", sysfs_root=str(sysfs)) as display:
        assert display.size == (w, h)
        display.show(canvas)
    data = dev.read_bytes()
    assert len(data) == stride * h  # rows laid out at the stride, nothing appended
    raw = np.frombuffer(data, np.uint8).reshape(h, stride)
    r, g, b = _decode_565(raw[:, : w * 2].reshape(h, w, 2))
    assert np.array_equal(r, canvas[..., 2] >> 3)
    assert np.array_equal(g, canvas[..., 1] >> 2)
    assert np.array_equal(b, canvas[..., 0] >> 3)


@pytest.mark.parametrize("stride_pad", [0, 64])
def test_framebuffer_32bit_is_bgrx_with_stride(tmp_path, stride_pad):
    w, h = 50, 30
    stride = w * 4 + stride_pad
    dev, sysfs = _fake_fb(tmp_path, w, h, 32, stride)
    with open_display(f"fb:{dev}", sysfs_root=str(sysfs)) as display:
        display.show(_canvas(w, h, seed=1))
        canvas = _canvas(w, h, seed=2)
        display.show(canvas)  # the second canvas replaces the first
    raw = np.frombuffer(dev.read_bytes(), np.uint8).reshape(h, stride)
    px = raw[:, : w * 4].reshape(h, w, 4)
    assert np.array_equal(px[..., :3], canvas)  # bytes B, G, R
    assert (px[..., 3] == 255).all()


def test_framebuffer_refuses_a_canvas_of_another_size(tmp_path):
    dev, sysfs = _fake_fb(tmp_path, 64, 32, 16, 128)
    with open_display(f"fb:{dev}", size=(800, 480), sysfs_root=str(sysfs)) as display:
        assert display.size == (64, 32)  # the fb dictates, the size argument does not
        with pytest.raises(ValueError, match="display.size"):
            display.show(_canvas(800, 480))


def test_framebuffer_missing_device_or_sysfs_names_the_path(tmp_path):
    dev, sysfs = _fake_fb(tmp_path, 64, 32, 16, 128)
    with pytest.raises(BadDisplay, match="virtual_size"):
        open_display(f"fb:{dev}", sysfs_root=str(tmp_path / "nowhere"))
    dev.unlink()
    with pytest.raises(BadDisplay, match=str(dev)):
        open_display(f"fb:{dev}", sysfs_root=str(sysfs))


def test_framebuffer_unsupported_depth_is_refused(tmp_path):
    dev, sysfs = _fake_fb(tmp_path, 64, 32, 24, 64 * 3)
    with pytest.raises(BadDisplay, match="24 bits"):
        open_display(f"fb:{dev}", sysfs_root=str(sysfs))


def test_png_last_frame_is_exactly_the_last_canvas_shown(tmp_path):
    out = tmp_path / "screen"
    canvases = [_canvas(160, 120, seed=i) for i in range(4)]
    display = open_display(f"png:{out}", size=(160, 120))
    for c in canvases:
        display.show(c)
        c[:] = 0  # the screen reuses its buffer: the display must have copied it
    display.close()
    display.close()  # safe twice
    last = cv2.imread(str(out / "last_frame.png"))
    assert np.array_equal(last, _canvas(160, 120, seed=3))
    assert not list(out.glob("frame_*.png"))
    assert not list(out.glob(".*tmp"))  # no temporary file left behind


def test_png_every_keeps_each_frame(tmp_path):
    with open_display(f"png:{tmp_path}?every=1", size=(64, 48)) as display:
        for i in range(3):
            display.show(_canvas(64, 48, seed=i))
    names = sorted(p.name for p in tmp_path.glob("frame_*.png"))
    assert names == ["frame_000001.png", "frame_000002.png", "frame_000003.png"]
    assert np.array_equal(cv2.imread(str(tmp_path / "frame_000002.png")), _canvas(64, 48, seed=1))
    assert np.array_equal(cv2.imread(str(tmp_path / "last_frame.png")), _canvas(64, 48, seed=2))


def test_png_writes_last_frame_at_a_limited_rate(tmp_path, monkeypatch):
    display = open_display(f"png:{tmp_path}", size=(32, 32))
    writes = []
    real = display._write
    monkeypatch.setattr(display, "_write", lambda path, img: (writes.append(path.name), real(path, img)))
    for i in range(20):
        display.show(_canvas(32, 32, seed=i))
    assert 1 <= len(writes) <= 2  # not 20
    display.close()
    assert np.array_equal(cv2.imread(str(tmp_path / "last_frame.png")), _canvas(32, 32, seed=19))


@pytest.mark.parametrize("name", ["screen.mp4", "screen.avi"])
def test_video_file_reads_back_with_every_frame(tmp_path, name):
    path = tmp_path / name
    with open_display(f"video:{path}", size=(160, 96), fps=10) as display:
        for i in range(6):
            display.show(np.full((96, 160, 3), 40 * i, np.uint8))
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    assert len(frames) == 6
    assert frames[0].shape == (96, 160, 3)
    assert abs(float(frames[5].mean()) - 200) < 10


def test_video_in_a_missing_folder_is_a_bad_display(tmp_path):
    with pytest.raises(BadDisplay, match="does not exist"):
        open_display(f"video:{tmp_path}/no/such/dir/x.mp4")


@pytest.mark.parametrize("uri", ["null", "null:"])
def test_null_display_discards(uri):
    with open_display(uri, size=(320, 240)) as display:
        display.show(_canvas(320, 240))
        assert display.frames_shown == 1
        with pytest.raises(ValueError):
            display.show(_canvas(10, 10))


def test_displays_share_one_interface():
    assert {"fb", "png", "video", "null"} <= set(display_classes())
    for cls in display_classes().values():
        assert issubclass(cls, Display) and cls.scheme


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("", "empty"),
        ("hdmi:0", "unknown scheme 'hdmi'"),
        ("/tmp/out", "SCHEME:TARGET"),
        ("png:", "needs a folder"),
        ("video:", "needs a file"),
        ("png:/tmp/x?every=abc", "every"),
        ("png:/tmp/x?colour=red", "unknown option"),
        ("null:somewhere", "no path"),
    ],
)
def test_bad_uris_name_the_uri_and_the_problem(uri, fragment):
    with pytest.raises(BadDisplay) as err:
        open_display(uri)
    msg = str(err.value)
    assert fragment in msg and repr(uri) in msg
    if "scheme" in fragment or "SCHEME" in fragment:
        assert "fb:" in msg and "png:" in msg and "video:" in msg and "null:" in msg
