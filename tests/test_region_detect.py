"""The imaging region found in a stream itself: the scanner's chrome is static, the image moves."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from scanner_screens import Layout, ScannerScreen, frames

from firmware_app.sources import open_source
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region_detect import (
    DetectorParams,
    RegionDetector,
    estimate_region,
    iou,
)
from firmware_app.sources.v4l2 import ReplayCapture, V4l2Source


def run(detector: RegionDetector, screen: ScannerScreen, n: int, start: int = 0, **kw) -> RegionDetector:
    for t in range(start, start + n):
        detector.feed(screen.render(t, **kw))
    return detector


def assert_close(rect, truth, tol: int) -> None:
    assert rect is not None
    assert iou(rect, truth) >= 0.9, (rect, truth)
    edges = (rect[0], rect[1], rect[0] + rect[2], rect[1] + rect[3])
    true_edges = (truth[0], truth[1], truth[0] + truth[2], truth[1] + truth[3])
    assert max(abs(a - b) for a, b in zip(edges, true_edges, strict=True)) <= tol, (rect, truth)


@pytest.mark.parametrize(
    "size, layout, tol",
    [
        # the phantom scan-converted into a fan, plain random speckle in a fan, a linear probe's rectangle
        ((1920, 1080), Layout("phantom", (360, 90, 1100, 900), seed=1), 8),
        ((1280, 720), Layout("phantom", (220, 60, 820, 640), seed=4), 6),
        ((1280, 720), Layout("fan", (240, 70, 760, 620), seed=2), 6),
        ((1920, 1080), Layout("linear", (500, 120, 800, 860), seed=3), 6),
        ((640, 480), Layout("linear", (120, 60, 360, 380), seed=5), 4),
    ],
)
def test_sector_and_linear_images_are_found_within_a_few_pixels(size, layout, tol):
    screen = ScannerScreen(*size, (0, layout))
    d = run(RegionDetector(), screen, 60)
    assert_close(d.rect, screen.truth(0), tol)  # the clock, the cursor, the frame counter are not in it


def test_noise_over_the_whole_screen_raises_the_threshold_with_it():
    screen = ScannerScreen(1280, 720, (0, Layout("phantom", (220, 60, 820, 640), seed=4)))
    rng = np.random.default_rng(1)
    d = RegionDetector()
    for t in range(60):  # an analogue grabber: the static chrome is noisy too
        noisy = screen.render(t).astype(np.int16) + rng.normal(0, 4.0, (720, 1280, 1)).astype(np.int16)
        d.feed(np.clip(noisy, 0, 255).astype(np.uint8))
    assert_close(d.rect, screen.truth(0), 6)


def test_nothing_is_claimed_before_enough_frames():
    screen = ScannerScreen(1280, 720, (0, Layout("fan", (240, 70, 760, 620))))
    d = run(RegionDetector(), screen, 59)
    assert d.rect is None and "watching: 59 of the 60 frames" in d.status
    d.feed(screen.render(59))
    assert d.rect is not None


def test_a_frozen_picture_claims_no_region_but_keeps_one_found_before():
    screen = ScannerScreen(1280, 720, (0, Layout("phantom", (220, 60, 820, 640), seed=4)))
    frozen = run(RegionDetector(), screen, 120, image_t=7)  # the clock and the cursor still change
    assert frozen.rect is None and "small" in frozen.status
    d = run(RegionDetector(), screen, 60)
    found = d.rect
    assert found is not None
    run(d, screen, 150, start=60, image_t=59)  # the freeze button: the region stays
    assert d.rect == found


def test_a_static_image_keeps_the_full_frame():
    img = ScannerScreen(1280, 720, (0, Layout("linear", (300, 90, 640, 560)))).render(0)
    d = RegionDetector()
    for _ in range(90):
        d.feed(img)
    assert d.rect is None and "nothing moves" in d.status


def test_pure_noise_over_the_whole_frame_is_the_full_frame_not_a_detected_region():
    rng = np.random.default_rng(0)
    d = RegionDetector()
    for _ in range(60):
        d.feed(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    assert d.rect is None and "whole frame" in d.status


def test_a_small_moving_patch_is_not_an_imaging_region():
    screen = ScannerScreen(1280, 720, (0, Layout("linear", (500, 300, 150, 140))))  # 2.3 % of the frame
    d = run(RegionDetector(), screen, 90)
    assert d.rect is None and "too small" in d.status


def test_a_new_layout_replaces_the_region_after_a_sustained_change_only():
    old = Layout("linear", (300, 90, 640, 560), seed=3)
    new = Layout("phantom", (150, 60, 900, 640), seed=2)  # the sonographer switched to the curved probe
    screen = ScannerScreen(1280, 720, (0, old), (120, new))
    p = DetectorParams()
    d = run(RegionDetector(p), screen, 120)
    assert_close(d.rect, screen.truth(0), 6)
    first = d.rect
    changes = []
    for t in range(120, 120 + p.window * (p.change_checks + 2)):
        if d.feed(screen.render(t)):
            changes.append(t)
    assert len(changes) == 1  # one switch, no flicker
    # not before change_checks windows showed the new layout
    assert changes[0] >= 120 + p.window * p.change_checks - 1
    assert d.rect != first
    assert_close(d.rect, screen.truth(200), 6)


def test_the_image_shrinking_inside_its_old_region_is_a_change():
    big = Layout("linear", (200, 80, 860, 600), seed=1)
    small = Layout("linear", (400, 200, 400, 300), seed=1)  # depth or zoom changed: a smaller image
    screen = ScannerScreen(1280, 720, (0, big), (60, small))
    d = run(RegionDetector(), screen, 60 + 30 * 5)
    assert_close(d.rect, screen.truth(100), 4)


def test_a_frame_of_another_size_drops_the_region():
    screen = ScannerScreen(1280, 720, (0, Layout("linear", (300, 90, 640, 560))))
    d = run(RegionDetector(), screen, 60)
    assert d.rect is not None
    assert d.feed(np.zeros((480, 640, 3), np.uint8)) is True  # the scanner switched its video mode
    assert d.rect is None


def test_every_kth_frame_is_fed():
    screen = ScannerScreen(1280, 720, (0, Layout("fan", (240, 70, 760, 620), seed=2)))
    d = run(RegionDetector(DetectorParams(every=3)), screen, 177)
    assert d.rect is None and d.fed == 59
    d = run(d, screen, 1, start=177)
    assert_close(d.rect, screen.truth(0), 6)


def test_estimate_from_an_activity_map_is_a_pure_function():
    act = np.zeros((216, 384), np.uint8)
    act[40:180, 100:300] = 200
    est = estimate_region(act, 5, 1920, 1080)
    assert est.rect == (500, 200, 1000, 700) and not est.full
    act[:] = 0
    act[2:4, 2:4] = 255  # a blinking cursor only
    assert estimate_region(act, 5, 1920, 1080).rect is None


# -- wired into the sources ---------------------------------------------------------------------------
def test_v4l2_source_crops_to_the_detected_region_and_logs_it_once(caplog):
    screen = ScannerScreen(1280, 720, (0, Layout("phantom", (220, 60, 820, 640), seed=4)))
    src = V4l2Source("v4l2:0", ReplayCapture(frames(screen, 90)))
    src.open()
    with caplog.at_level(logging.INFO, logger="firmware_app.sources.base"):
        got = [src.read() for _ in range(90)]
    src.close()
    assert all(f.meta["region_from"] == "full_frame" and f.pixels.shape == (720, 1280, 3) for f in got[:59])
    last = got[-1]
    assert last.meta["region_from"] == "detected" and last.meta["mm_per_px"] is None
    x, y, w, h = last.meta["imaging_region"]
    assert_close((x, y, w, h), screen.truth(0), 6)
    assert last.pixels.shape == (h, w, 3)
    assert (last.pixels == screen.render(89)[y : y + h, x : x + w]).all()
    lines = [r.getMessage() for r in caplog.records if "imaging region" in r.getMessage()]
    assert len(lines) == 1 and "detected" in lines[0]


def test_the_board_crop_wins_over_detection():
    screen = ScannerScreen(1280, 720, (0, Layout("linear", (300, 90, 640, 560))))
    board = SourceProfile(crop_rect=(10, 20, 300, 200))
    src = V4l2Source("v4l2:0", ReplayCapture(frames(screen, 70)), profile=board)
    src.open()
    got = [src.read() for _ in range(70)]
    assert src.region_detector is None and src.region is None
    assert got[-1].meta["region_from"] == "board" and got[-1].meta["imaging_region"] == [10, 20, 300, 200]


def test_video_file_source_detects_the_region_of_a_recording(tmp_path):
    screen = ScannerScreen(1280, 720, (0, Layout("fan", (240, 70, 760, 620), seed=2)))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (1280, 720))
    for img in frames(screen, 75):
        writer.write(img)
    writer.release()
    src = open_source(f"file:{path}?realtime=0")
    got = []
    while (f := src.read()) is not None:
        got.append(f)
    src.close()
    assert len(got) == 75 and got[0].meta["region_from"] == "full_frame"
    assert got[-1].meta["region_from"] == "detected"
    # JPEG blocks straddling the edge of the image change too: up to one 8x8 block wider
    assert_close(tuple(got[-1].meta["imaging_region"]), screen.truth(0), 10)


def test_an_image_folder_keeps_the_full_frame(tmp_path):
    screen = ScannerScreen(640, 480, (0, Layout("linear", (120, 60, 360, 380))))
    for t in range(70):
        cv2.imwrite(str(tmp_path / f"{t:03d}.png"), screen.render(t))
    src = open_source(f"images:{tmp_path}")
    got = [src.read() for _ in range(70)]
    assert src.region_detector is None
    assert got[-1].meta["region_from"] == "full_frame" and got[-1].pixels.shape == (480, 640, 3)


def test_the_pipeline_runs_through_the_switch_from_full_frames_to_the_detected_region(float_model_dir):
    import time

    from firmware_app.backends import BackendChoice
    from firmware_app.backends.litert import LiteRTBackend
    from firmware_app.display.screen import Screen
    from firmware_app.display.sinks import open_display
    from firmware_app.models.store import find_model
    from firmware_app.pipeline import Pipeline

    screen = ScannerScreen(640, 480, (0, Layout("linear", (120, 60, 360, 380), seed=5)))
    src = V4l2Source("v4l2:0", ReplayCapture(frames(screen, 150)), reconnect_s=0.05)
    model = find_model(str(float_model_dir))
    seen: list[tuple[str, tuple[int, ...]]] = []
    p = Pipeline(
        src,
        model,
        BackendChoice(LiteRTBackend(model.tflite, threads=1)),
        Screen(320, 240),
        [open_display("null", size=(320, 240))],
        listeners=[lambda f, r: seen.append((f.meta["region_from"], f.pixels.shape))],
    )
    p.start()
    try:
        t0 = time.monotonic()
        while not any(origin == "detected" for origin, _ in seen) and time.monotonic() - t0 < 10.0:
            time.sleep(0.02)
    finally:
        p.close()
    assert seen[0] == ("full_frame", (480, 640, 3))
    x, y, w, h = src.region.rect
    assert ("detected", (h, w, 3)) in seen  # analysed at the new size, no error on the way
    assert p.counters.frames_rejected == 0
