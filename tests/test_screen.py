"""The screen compositor: overlays only on their own frame, banners always there, readable states."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from firmware_app.display.overlay import OverlayPainter
from firmware_app.display.screen import ACCENT, ALERT, AMBER, Screen, ScreenState
from firmware_app.types import Box, Frame, Result

SIZES = [(800, 480), (1920, 1080)]


def _frame(fid: int = 7, w: int = 640, h: int = 480, color: bool = False) -> Frame:
    rng = np.random.default_rng(fid)
    px = (60 + rng.random((h, w)) * 60).astype(np.uint8)
    if color:
        px = cv2.cvtColor(px, cv2.COLOR_GRAY2BGR)
    return Frame(id=fid, t_capture_ns=0, pixels=px)


def _seg(fid: int = 7, w: int = 640, h: int = 480, rect=(280, 200, 360, 260), alert: bool = False) -> Result:
    x0, y0, x1, y1 = rect
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    contour = np.array([[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]], np.int32)
    return Result(
        frame_id=fid,
        task="segmentation",
        label="Free fluid",
        confidence=0.87,
        alert=alert,
        mask=mask,
        contours=(contour,),
        centroid=((x0 + x1) / 2, (y0 + y1) / 2),
        area_fraction=float(mask.mean()),
    )


def _state(frame, result=None, **kw) -> ScreenState:
    base = dict(model_id="us-fluid-seg", model_version="1.0.0", backend="litert-cpu", task="segmentation")
    base.update(kw)
    return ScreenState(frame=frame, result=result, **base)


def _image(screen: Screen, canvas: np.ndarray) -> np.ndarray:
    return screen.image_rect.view(canvas).copy()


def _is_color(px: np.ndarray, color, tol: int = 12) -> np.ndarray:
    return (np.abs(px.astype(int) - np.array(color)) <= tol).all(axis=-1)


@pytest.mark.parametrize("size", SIZES)
def test_segmentation_tints_only_inside_the_mask(size):
    frame = _frame()
    # Two blobs far apart: their common bounding box holds plenty of pixels outside the mask.
    a, b = _seg(rect=(100, 100, 180, 160)), _seg(rect=(400, 300, 480, 360))
    two = Result(**{**a.__dict__, "mask": a.mask | b.mask, "contours": a.contours + b.contours})
    plain = _image(s := Screen(*size), s.render(_state(frame)))
    drawn = _image(s2 := Screen(*size), s2.render(_state(frame, two)))
    sx = s2.image_rect.w / frame.width
    changed = (plain != drawn).any(axis=2)
    margin = 3 + int(2 * sx)  # contour line width + antialiasing
    near = np.zeros_like(changed)
    for x0, y0, x1, y1 in ((100, 100, 180, 160), (400, 300, 480, 360)):
        mx0, mx1, my0, my1 = (int(v * sx) for v in (x0, x1, y0, y1))
        near[my0 - margin : my1 + margin, mx0 - margin : mx1 + margin] = True
        inner = (slice(my0 + margin, my1 - margin), slice(mx0 + margin, mx1 - margin))
        assert changed[inner].all()
        # Tinted toward the accent colour: more blue/green than red, unlike the gray image.
        assert (drawn[inner][..., 0].astype(int) - drawn[inner][..., 2] > 20).all()
    assert not changed[~near].any(), "overlay pixels outside the mask"


def test_result_of_another_frame_is_not_drawn_and_is_counted():
    frame = _frame(fid=8)
    screen = Screen(800, 480)
    plain = _image(screen, screen.render(_state(frame)))
    assert screen.mismatched_overlays == 0
    out = _image(screen, screen.render(_state(frame, _seg(fid=7))))
    assert screen.mismatched_overlays == 1
    assert np.array_equal(out, plain)
    screen.render(_state(frame, _seg(fid=9)))
    assert screen.mismatched_overlays == 2
    screen.render(_state(frame, _seg(fid=8)))
    assert screen.mismatched_overlays == 2


STATES = {
    "plain": {},
    "no_signal": dict(no_signal=True),
    "no_signal_no_frame": dict(no_signal=True, frame=None),
    "ai_pending": dict(ai_pending=True),
    "ai_off": dict(ai_off=True),
    "silent": dict(silent_trial=True),
    "fallback": dict(fallback_notice="CPU FALLBACK: Edge TPU not found"),
    "input_warning": dict(input_warning="INPUT UNLIKE TRAINING DATA"),
    "everything": dict(
        ai_pending=True,
        ai_off=True,
        silent_trial=True,
        fallback_notice="CPU FALLBACK: Edge TPU not found",
        input_warning="INPUT UNLIKE TRAINING DATA",
        messages=("a", "b", "c", "d"),
    ),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", STATES)
def test_not_for_diagnostic_banner_is_always_shown_when_flagged(size, name):
    screen = Screen(*size)
    kw = dict(STATES[name])
    frame = kw.pop("frame", _frame())
    row = screen.banner_rect
    for flagged in (True, False):
        out = screen.render(_state(frame, _seg(alert=True), not_for_diagnostic=flagged, **kw))
        band = row.view(out)
        amber = _is_color(band, AMBER).mean()
        if flagged:
            assert amber > 0.6, "banner row is not amber"
            dark = (band.max(axis=2) < 80).mean()
            assert dark > 0.01, "banner has no text"
        else:
            assert amber == 0


def test_no_signal_renders_without_a_frame():
    screen = Screen(800, 480)
    waiting = screen.render(_state(None)).copy()
    out = screen.render(_state(None, no_signal=True))
    region = screen.image_region.view(out)
    assert screen.image_rect is None
    bright = region.max(axis=2) > 200
    assert bright.sum() > 500  # big text
    ys, xs = np.nonzero(bright)
    assert abs(xs.mean() - region.shape[1] / 2) < region.shape[1] * 0.1
    assert not np.array_equal(out, waiting)


def test_no_signal_dims_the_last_frame_and_hides_its_overlay():
    frame = _frame()
    screen = Screen(800, 480)
    live = _image(screen, screen.render(_state(frame)))
    dimmed = _image(screen, screen.render(_state(frame, _seg(), no_signal=True)))
    text = dimmed.max(axis=2) > 200
    assert dimmed[~text].mean() < 0.5 * live[~text].mean()
    assert not _is_color(dimmed, ACCENT, tol=40).any()


@pytest.mark.parametrize("size", SIZES)
def test_stale_result_never_draws_an_overlay_but_shows_in_the_panel(size):
    frame = _frame(fid=8)
    screen = Screen(*size)
    plain = screen.render(_state(frame)).copy()
    out = screen.render(_state(frame, None, stale_result=_seg(fid=7), ai_pending=True))
    assert np.array_equal(screen.image_rect.view(out), screen.image_rect.view(plain))
    assert not np.array_equal(screen.finding_rect.view(out), screen.finding_rect.view(plain))
    assert not np.array_equal(screen.chips_rect.view(out), screen.chips_rect.view(plain))  # STALE, AI PENDING
    assert screen.mismatched_overlays == 0


@pytest.mark.parametrize("flag", ["silent_trial", "ai_off"])
def test_silent_trial_and_ai_off_draw_no_overlay_and_no_finding(flag):
    frame = _frame()
    screen = Screen(800, 480)
    plain = screen.render(_state(frame, **{flag: True})).copy()
    out = screen.render(_state(frame, _seg(alert=True), **{flag: True}))
    assert np.array_equal(out, plain)  # neither overlay, nor label, nor ALERT
    assert not _is_color(screen.finding_rect.view(out), ALERT).any()


def test_alert_marker_shown_only_for_an_alert():
    frame = _frame()
    screen = Screen(800, 480)
    out = screen.render(_state(frame, _seg(alert=True)))
    assert _is_color(screen.finding_rect.view(out), ALERT).mean() > 0.05
    out = screen.render(_state(frame, _seg(alert=False)))
    assert not _is_color(screen.finding_rect.view(out), ALERT).any()


@pytest.mark.parametrize("size", SIZES)
def test_panel_text_appears_in_every_section(size):
    screen = Screen(*size)
    out = screen.render(
        _state(_frame(), _seg(), fps=29.8, latency_ms=41.0, threshold=0.5, messages=("Skipped broken.dcm",))
    )
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    for rect in (
        screen.finding_rect,
        screen.threshold_rect,
        screen.model_rect,
        screen.perf_rect,
        screen.messages_rect,
    ):
        view = rect.view(out)
        assert (view.max(axis=2) > 180).sum() > 20, rect
        assert rect.x1 <= size[0] and rect.y1 <= size[1]
    # Sections never overlap one another.
    rects = [
        screen.finding_rect,
        screen.threshold_rect,
        screen.model_rect,
        screen.perf_rect,
        screen.messages_rect,
    ]
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert a.y1 <= b.y or b.y1 <= a.y or a.x1 <= b.x or b.x1 <= a.x, (a, b)


def test_long_messages_and_labels_stay_inside_the_panel():
    screen = Screen(800, 480)
    long = "Skipped " + "very_long_file_name_" * 10 + ".dcm: not a DICOM file"
    r = _seg()
    r = Result(**{**r.__dict__, "label": "Pneumothorax with a very long descriptive label indeed"})
    out = screen.render(_state(_frame(), r, messages=(long, long, long, long)))
    assert screen.panel_rect.x > 0
    # Nothing drawn past the panel's right padding.
    strip = out[:, screen.width - screen.sz.pad // 2 :]
    assert (strip.max(axis=2) < 60).all()


def test_frame_size_changes_relayout_and_clear_old_pixels():
    screen = Screen(800, 480)
    screen.render(_state(_frame(w=640, h=480)))
    big = screen.image_rect
    out = screen.render(_state(_frame(fid=8, w=64, h=64, color=True)))
    small = screen.image_rect
    assert small.w == small.h == screen.image_region.h and small.w < big.w
    left_margin = out[small.y : small.y1, screen.image_region.x : small.x]
    assert (left_margin == 0).all()
    out = screen.render(_state(_frame(fid=9, w=1920, h=1080)))
    assert screen.image_rect.w == screen.image_region.w


def test_detection_boxes_and_heatmap_are_drawn_on_the_image():
    frame = _frame(color=True)
    screen = Screen(800, 480)
    plain = _image(screen, screen.render(_state(frame)))
    det = Result(
        frame_id=7,
        task="detection",
        label="needle",
        confidence=0.9,
        boxes=(Box(100, 100, 300, 300, 0.9, "needle"),),
    )
    out = _image(screen, screen.render(_state(frame, det)))
    s = screen.image_rect.w / frame.width
    changed = (out != plain).any(axis=2)
    assert changed[int(200 * s), int(100 * s) - 1 : int(100 * s) + 2].any()  # left edge of the box
    assert not changed[int(200 * s), int(200 * s)]  # box inside untouched
    assert not changed[int(420 * s) :, :].any()
    heat = np.zeros((8, 8), np.float32)
    heat[2:4, 2:4] = 1.0
    cls = Result(frame_id=7, task="classification", label="effusion", confidence=0.7, heatmap=heat)
    out = _image(screen, screen.render(_state(frame, cls)))
    diff = np.abs(out.astype(int) - plain).sum(axis=2)
    h, w = diff.shape
    assert diff[int(h * 3 / 8), int(w * 3 / 8)] > 60  # hot spot coloured
    assert diff[int(h * 7 / 8), int(w * 7 / 8)] == 0  # zero heat leaves the image alone


def _heat_and_mask(fid: int = 7) -> Result:
    """A heatmap (smooth, a model's 15 x 20 cells) under a mask with its outline: the layers that may be
    blended at the frame's size and those that must stay crisp at the screen's."""
    rng = np.random.default_rng(3)
    heat = cv2.GaussianBlur(rng.random((15, 20)).astype(np.float32), (0, 0), 1.5)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    seg = _seg(fid, rect=(200, 150, 330, 260))
    return Result(**{**seg.__dict__, "heatmap": heat})


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("frame_size", [(640, 480), (560, 420), (480, 360), (1920, 1080), (200, 150)])
@pytest.mark.parametrize("color", [False, True])
def test_a_heatmap_looks_as_if_blended_over_the_stretched_frame(size, frame_size, color):
    """Where the frame is the smaller, the screen blends the heatmap into it before stretching it once;
    the picture is the stretched frame with every layer painted over it at the screen's size, within two
    gray levels (rounding at the other resolution); the mask and its outline stay crisp."""
    frame, result = _frame(w=frame_size[0], h=frame_size[1], color=color), _heat_and_mask()
    plain_screen, screen = Screen(*size), Screen(*size)
    expected = _image(plain_screen, plain_screen.render(_state(frame)))
    OverlayPainter().paint(expected, result.shapes, frame_size, screen._style)
    out = _image(screen, screen.render(_state(frame, result)))
    diff = np.abs(out.astype(int) - expected)
    assert diff.max() <= 2
    if screen.image_rect.w * screen.image_rect.h <= frame_size[0] * frame_size[1]:
        assert diff.max() == 0  # blended at the screen's size: exactly the same


def test_a_heatmap_over_a_gray_picture_is_its_colour_copy_blended():
    painter, result = OverlayPainter(), _heat_and_mask()
    gray = _frame(w=320, h=240).pixels
    expected = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    assert painter.paint_heatmaps(expected, result.shapes)
    out = np.zeros_like(expected)
    assert painter.paint_heatmaps(out, result.shapes, gray=gray)
    assert (out == expected).all()
    assert not painter.paint_heatmaps(out, _seg().shapes, gray=gray)  # no heatmap: nothing written


def test_render_reuses_its_buffer_and_is_fast():
    screen = Screen(800, 480)
    frame, result = _frame(), _seg()
    first = screen.render(_state(frame, result))
    times = []
    for i in range(30):
        t = time.perf_counter()
        out = screen.render(_state(frame, result, fps=20 + i / 10, latency_ms=30.0 + i))
        times.append(time.perf_counter() - t)
    assert out is first
    assert sorted(times)[len(times) // 2] < 0.025  # generous: ~1-2 ms on a 2-core x86 box


def test_measurements_are_a_readout_but_a_new_finding_shows_at_once(monkeypatch):
    """Measurements change at most twice a second while the finding stays; label and alert at once."""
    import firmware_app.display.screen as screen_mod

    clock = [100.0]
    monkeypatch.setattr(screen_mod.time, "monotonic", lambda: clock[0])
    sc = Screen(800, 480)

    def finding(result):
        frame = _frame(result.frame_id)
        return sc._finding(ScreenState(frame=frame, result=result), result, None)

    first = finding(_seg(1, rect=(280, 200, 360, 260)))
    moved = _seg(2, rect=(300, 220, 400, 300))  # moved and grown
    clock[0] += 0.1
    assert finding(moved).lines == first.lines  # held: the same finding, 0.1 s later
    clock[0] += screen_mod.DETAIL_REFRESH_S
    assert finding(moved).lines != first.lines  # refreshed
    alert = _seg(3, rect=(100, 100, 200, 200), alert=True)
    clock[0] += 0.01
    shown = finding(alert)
    assert shown.alert and shown.lines != finding(moved).lines  # a change of finding: at once
    assert not any("px" in line for line in shown.lines)  # no pixel positions on a clinician's screen
