"""A grabber's frame decoded at the size that is needed: scales, both JPEG decoders, YUYV, the region in
source pixels, captures at full resolution."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from records_support import MODEL, seg_result
from scanner_screens import Layout, ScannerScreen, frames

from firmware_app.gate.descriptor import CHROMA_MIN
from firmware_app.records.captures import CaptureStore, Recorder
from firmware_app.sources import grab
from firmware_app.sources.grab import (
    DecodeTarget,
    JpegDecoder,
    bgr_to_yuyv,
    full_resolution,
    jpeg_size,
    scale_rect_in,
    scaled_profile,
    yuyv_frame,
    yuyv_part,
)
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region_detect import iou
from firmware_app.sources.v4l2 import ReplayCapture, V4l2Source

DECODERS = [
    "opencv",
    pytest.param(
        "turbojpeg",
        marks=pytest.mark.skipif(
            JpegDecoder().name != "turbojpeg", reason="PyTurboJPEG / libturbojpeg not installed"
        ),
    ),
]


def screen_1080() -> ScannerScreen:
    return ScannerScreen(1920, 1080, (0, Layout("phantom", (360, 90, 1200, 900), seed=3)))


@pytest.mark.parametrize(
    "region, target, k",
    [
        ((1920, 1080), DecodeTarget(), 1),  # no hint: full size
        ((1920, 1080), DecodeTarget(fit=(800, 480)), 2),  # the 7" screen: 960x540 covers 800x480
        ((1920, 1080), DecodeTarget(size=(256, 256)), 4),  # the model alone: 480x270 >= 256x256
        ((1920, 1080), DecodeTarget(size=(128, 128)), 8),
        ((1920, 1080), DecodeTarget(size=(256, 256), fit=(800, 480)), 2),  # both: the larger need wins
        ((1200, 900), DecodeTarget(fit=(800, 480), slack=0.0), 1),  # 600x450 would be shown at 640x480
        ((1200, 900), DecodeTarget(fit=(800, 480)), 2),  # ... a stretch of 1.07: within the 0.1 slack
        ((1200, 900), DecodeTarget(fit=(700, 600)), 1),  # 600x450 shown at 700x525: 1.17, beyond it
        ((1200, 900), DecodeTarget(size=(320, 320)), 2),
    ],
)
def test_the_smallest_scale_that_covers_the_screen_and_the_model(region, target, k):
    assert target.scale_for(*region) == k


def test_jpeg_size_reads_the_header_only():
    ok, buf = cv2.imencode(".jpg", np.zeros((1080, 1920, 3), np.uint8))
    assert jpeg_size(buf) == (1920, 1080)


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("gray", [False, True])
def test_both_decoders_give_the_picture_at_one_over_k(backend, gray):
    img = screen_1080().render(5)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    dec = JpegDecoder(backend)
    assert dec.name == backend
    for k in (1, 2, 4, 8):
        out = dec.decode(buf, k, gray)
        assert out.shape[:2] == (1080 // k, 1920 // k) and out.ndim == (2 if gray else 3)
        ref = cv2.resize(img, (1920 // k, 1080 // k), interpolation=cv2.INTER_AREA)
        ref = cv2.cvtColor(ref, cv2.COLOR_BGR2GRAY) if gray else ref
        assert np.abs(out.astype(int) - ref).mean() < 4, (k, backend)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_yuyv_converts_only_every_kth_pixel_pair(k):
    img = screen_1080().render(2)[:720, :1280]
    yuyv = bgr_to_yuyv(img)
    assert yuyv.shape == (720, 1280, 2)
    out = yuyv_frame(yuyv, 1280, 720, k)
    assert out.shape == (720 // k, 1280 // k, 3)
    ref = cv2.resize(img, (1280 // k, 720 // k), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - ref).mean() < 8
    gray = yuyv_frame(yuyv, 1280, 720, k, gray=True)
    assert gray.shape == (720 // k, 1280 // k)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("gray", [True, False])
def test_a_yuyv_part_is_exactly_the_whole_conversion_cut_there(k, gray):
    rng = np.random.default_rng(k)
    buf = rng.integers(0, 256, (720, 1280, 2), dtype=np.uint8)
    whole = yuyv_frame(buf, 1280, 720, k, gray)
    for _ in range(40):
        x, y = int(rng.integers(0, 1200)), int(rng.integers(0, 700))
        w, h = int(rng.integers(1, 1280 - x)), int(rng.integers(1, 720 - y))
        part, (ox, oy) = yuyv_part(buf, 1280, 720, (x, y, w, h), k, gray)
        assert ox % (2 * k) == 0 and oy % k == 0 and ox <= x and oy <= y
        assert ox + part.shape[1] * k >= x + w - k and oy + part.shape[0] * k >= y + h - k  # covers it
        np.testing.assert_array_equal(
            part, whole[oy // k : oy // k + part.shape[0], ox // k :][:, : part.shape[1]]
        )


@pytest.mark.parametrize("gray", [True, False])
@pytest.mark.parametrize(
    "profile",
    [
        SourceProfile(),  # the region found in the stream
        SourceProfile(None, ((0, 0, 1280, 60), (350, 120, 100, 50))),  # ... with a blackout inside it
        SourceProfile((300, 100, 700, 500), ((0, 0, 1280, 60), (350, 120, 100, 50))),  # the board's crop
    ],
)
def test_yuyv_converts_only_the_imaging_region(gray, profile):
    cap = ReplayCapture.scanner("YUYV", 1280, 720, 0, count=150)
    src = V4l2Source("v4l2:0", cap, profile=profile)
    src.set_decode_target((128, 128), fit=(300, 200), gray=gray)
    src.open()
    converted: list[int] = []
    real = yuyv_part

    def spy(*a, **kw):
        out = real(*a, **kw)
        converted.append(out[0].size)
        return out

    import firmware_app.sources.v4l2 as v4l2

    v4l2.yuyv_part, f = spy, None
    try:
        for _ in range(150):
            f = src.read()
    finally:
        v4l2.yuyv_part = real
    assert f is not None and f.meta["region_from"] in ("detected", "board")
    k = f.meta["decode_scale"]
    whole = yuyv_frame(cap.frames[149 % len(cap.frames)], 1280, 720, k, gray)
    size = (whole.shape[1], whole.shape[0])
    ref = scaled_profile(profile, k, size).apply(
        whole, scale_rect_in(tuple(f.meta["imaging_region"]), k, size)
    )
    np.testing.assert_array_equal(f.pixels, ref)  # the same pixels as converting all and cutting
    assert converted[-1] < 0.6 * whole.size  # ... from about the region alone (644x536 of 1280x720)
    full, _ = full_resolution(f)
    x, y, w, h = f.meta["imaging_region"]
    assert full.shape[:2] == (h, w)  # a capture still gets the region at full resolution


@pytest.mark.parametrize("backend", DECODERS)
def test_mjpg_stream_is_decoded_reduced_and_the_region_stays_in_source_pixels(backend):
    screen = screen_1080()
    cap = ReplayCapture(frames(screen, 90), fourcc="MJPG")
    src = V4l2Source("v4l2:0", cap)
    src._decoder = JpegDecoder(backend)
    src.set_decode_target((256, 256), fit=(400, 300))
    src.open()
    got = [src.read() for _ in range(90)]
    src.close()
    first, last = got[0], got[-1]
    assert first.meta["decode_scale"] == 4 and first.pixels.shape == (270, 480, 3)  # full frame at 1/4
    assert first.meta["full_size"] == (1920, 1080) and first.meta["original"].jpeg[:2] == b"\xff\xd8"
    assert last.meta["region_from"] == "detected"
    rect = last.meta["imaging_region"]  # in source (1920x1080) pixels
    assert iou(rect, screen.truth(0)) >= 0.9, rect
    k = last.meta["decode_scale"]
    assert k == 2  # the 1200x900 region at 1/4 (300x225) would no longer cover 256x256 and 400x300
    x, y, w, h = rect
    assert abs(last.pixels.shape[1] - w / k) <= 1 and abs(last.pixels.shape[0] - h / k) <= 1


def test_blackout_and_board_crop_are_scaled_with_the_frame():
    img = np.full((1080, 1920, 3), 200, np.uint8)
    profile = SourceProfile(crop_rect=(96, 96, 1600, 800), blackout=((96, 96, 301, 51),))
    src = V4l2Source("v4l2:0", ReplayCapture([img], fourcc="MJPG"), profile=profile)
    src.set_decode_target(size=(200, 100))
    src.open()
    f = src.read()
    assert f.meta["decode_scale"] == 8 and f.pixels.shape == (100, 200, 3)
    assert f.meta["imaging_region"] == [96, 96, 1600, 800]
    assert (f.pixels[:7, :38] == 0).all() and f.pixels[8:, 40:].min() > 150
    full, _ = full_resolution(f)
    assert full.shape == (800, 1600, 3) and (full[:51, :301] == 0).all() and full[52:, 302:].min() > 150


def test_captures_from_an_mjpg_stream_keep_full_resolution(tmp_path):
    screen = ScannerScreen(1920, 1080, (0, Layout("linear", (400, 120, 1100, 820), seed=1)))
    src = V4l2Source("v4l2:0", ReplayCapture(frames(screen, 70), fourcc="MJPG"))
    src.set_decode_target(fit=(480, 320))
    src.open()
    for _ in range(70):
        f = src.read()
    src.close()
    k = f.meta["decode_scale"]
    assert f.meta["region_from"] == "detected" and k >= 2
    mask = np.zeros(f.pixels.shape[:2], np.uint8)
    cv2.circle(mask, (f.width // 2, f.height // 2), f.height // 4, 1, -1)
    result = seg_result(f.id, mask)
    rec = Recorder(tmp_path, model=MODEL)
    cid = rec.capture(f, result)
    cap = CaptureStore(tmp_path).load(cid)
    x, y, w, h = f.meta["imaging_region"]
    assert cap.pixels.shape == (h, w, 3)  # the region at the grabber's resolution, not at 1/k
    truth = screen.render(69)[y : y + h, x : x + w]
    assert np.abs(cap.pixels.astype(int) - truth).mean() < 4
    # the result's outline follows the pixels: scaled by k
    small = np.concatenate(result.contours).reshape(-1, 2)
    big = np.concatenate(cap.result.contours).reshape(-1, 2)
    assert abs(big[:, 0].max() / small[:, 0].max() - cap.pixels.shape[1] / f.width) < 0.05


def test_compose_tells_a_grabber_what_to_decode(float_model_dir):
    """The composed pipeline hands the source the model's input and the screen's image area: a 1080p
    MJPG stream is decoded at a reduced scale with no bench or test setting it."""
    from firmware_app.config import load_board
    from firmware_app.models.store import find_model
    from firmware_app.pipeline import build_pipeline

    cap = ReplayCapture.scanner("MJPG", 1920, 1080, fps=0, count=90, distinct=20)
    board = load_board("x86-dev")
    p = build_pipeline(board, find_model(str(float_model_dir)), "v4l2:0", ["null"], max_frames=80)
    p.source.capture = cap
    scales: list[int] = []
    p.listeners.append(lambda frame, result: scales.append(int(frame.meta.get("decode_scale", 1))))
    p.run()
    assert scales and max(scales) >= 2  # once the region is found, never the full 1920x1080


# -- a gray model: a region without colour comes gray ------------------------------------------------------
def _spread(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[..., i].astype(int) for i in range(3))
    return np.maximum(np.maximum(b, g), r) - np.minimum(np.minimum(b, g), r)


@pytest.mark.parametrize("which", ["jpeg", "yuyv"])
def test_the_colour_tables_are_the_conversions_own(which):
    """Every chroma pair the table calls neutral converts to a pixel the gate does not count as coloured
    (max - min of B, G, R <= 16) and every pair it calls coloured to one that is, but for a level of
    rounding at the border; the NEUTRAL square is all neutral."""
    u, v = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    luma = np.full((256, 256), 128, np.uint8)
    if which == "jpeg":
        table, square, sure = grab.COLOURED_JPEG, grab.NEUTRAL_JPEG, grab.SURE_JPEG
        bgr = cv2.cvtColor(cv2.merge([luma, v, u]), cv2.COLOR_YCrCb2BGR)
    else:
        table, square, sure = grab.COLOURED_YUYV, grab.NEUTRAL_YUYV, grab.SURE_YUYV
        pairs = np.stack([luma, u, luma, v], axis=2).reshape(256, 512, 2)
        bgr = cv2.cvtColor(pairs, cv2.COLOR_YUV2BGR_YUYV)[:, ::2]
    coloured = table.reshape(256, 256)
    spread = _spread(bgr)
    assert (spread[~coloured] <= CHROMA_MIN + 1).all() and (spread[coloured] >= CHROMA_MIN).all()
    assert (coloured == (spread > CHROMA_MIN)).mean() > 0.99
    near = slice(128 - square, 128 + square + 1)
    assert not coloured[near, near].any()
    far = np.maximum(np.abs(u.astype(int) - 128), np.abs(v.astype(int) - 128)) >= sure
    assert coloured[far].all() and (spread[far] > CHROMA_MIN).all()
    # the check itself: a plane pair with one pixel in between is decided by the table
    for cu, cv in ((128 + square + 1, 128), (128 + sure - 1, 128 + sure - 1), (128 - square - 1, 128 + 1)):
        pu, pv = np.full((40, 30), 128, np.uint8), np.full((40, 30), 128, np.uint8)
        pu[7, 9], pv[7, 9] = cu, cv
        assert grab.coloured(pu, pv, table, square, sure) == bool(coloured[cu, cv])


def _screen_with(paint, width=1920, height=1080):
    """The scanner screen's frames with ``paint(img, (x, y, w, h))`` drawn inside its imaging region."""
    screen = ScannerScreen(width, height, (0, Layout("phantom", (360, 90, 1200, 900), seed=3)))
    out = []
    for img in frames(screen, 90):
        paint(img, screen.truth(0))
        out.append(img)
    return out


def _no_paint(img, rect):
    return None


def _doppler(img, rect):  # a colour Doppler box in the middle of the fan
    x, y, w, h = rect
    cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 10, h // 14), 0, 0, 360, (30, 30, 220), -1)
    cv2.ellipse(img, (x + w // 2, y + h // 2 + h // 10), (w // 12, h // 16), 0, 0, 360, (220, 60, 20), -1)


def _caliper(img, rect):  # a small yellow measuring mark
    x, y, w, h = rect
    cv2.drawMarker(img, (x + w // 3, y + h // 2), (0, 230, 230), cv2.MARKER_CROSS, 18, 2)


def _faint_tint(img, rect):  # a dark blue-gray background, spread 10 (below the gate's 16)
    x, y, w, h = rect
    roi = img[y : y + h, x : x + w]
    roi[roi.max(axis=2) < 12] = (28, 22, 18)


def _tint(img, rect):  # a plain colour wash over the fan, spread 30
    x, y, w, h = rect
    roi = img[y : y + h, x : x + w].astype(np.int16)
    roi[..., 0] += 15
    roi[..., 2] -= 15
    img[y : y + h, x : x + w] = np.clip(roi, 0, 255).astype(np.uint8)


def _read_last(cap, backend="auto", gray_if_neutral=True):
    src = V4l2Source("v4l2:0", cap)
    if backend != "auto":
        src._decoder = JpegDecoder(backend)
    src.set_decode_target((128, 128), fit=(560, 422), gray_if_neutral=gray_if_neutral)
    src.open()
    f = None
    for _ in range(len(cap.frames)):
        f = src.read()
    src.close()
    assert f is not None and f.meta["region_from"] == "detected"
    return f


SOURCES = [
    pytest.param("YUYV", "auto", id="yuyv"),
    pytest.param("MJPG", "opencv", id="mjpg-opencv"),
    pytest.param("MJPG", "turbojpeg", id="mjpg-turbojpeg", marks=DECODERS[1].marks),
]


@pytest.mark.parametrize("fourcc, backend", SOURCES)
@pytest.mark.parametrize(
    "paint, colour",
    [(_no_paint, False), (_faint_tint, False), (_doppler, True), (_caliper, True), (_tint, True)],
)
def test_a_gray_models_region_comes_gray_only_when_nothing_in_it_is_coloured(fourcc, backend, paint, colour):
    cap = ReplayCapture(_screen_with(paint), fourcc=fourcc)
    f = _read_last(cap, backend)
    assert f.pixels.ndim == (3 if colour else 2), (paint.__name__, f.pixels.shape)
    k = f.meta["decode_scale"]
    x, y, w, h = f.meta["imaging_region"]
    assert abs(f.pixels.shape[1] - w / k) <= 1 and abs(f.pixels.shape[0] - h / k) <= 1
    # the same picture as decoding it all and cutting the region: exactly, but for the colour that
    # libjpeg-turbo's planes bring at the JPEG's own chroma resolution (its decode to B, G, R at 1/2
    # sharpens the chroma to the luma's)
    last = cap.frames[-1]
    if fourcc == "YUYV":
        whole = yuyv_frame(last, 1920, 1080, k, gray=not colour)
    elif backend == "turbojpeg" and not colour:
        whole = JpegDecoder(backend).decode(last, k, gray=True)
    else:
        whole = JpegDecoder(backend).decode(last, k)
    size = (whole.shape[1], whole.shape[0])
    rx, ry, rw, rh = scale_rect_in((x, y, w, h), k, size)
    ref = whole[ry : ry + rh, rx : rx + rw]
    if ref.ndim == 3 and not colour:
        ref = cv2.cvtColor(ref, cv2.COLOR_BGR2GRAY)
    if fourcc == "MJPG" and backend == "turbojpeg" and colour:
        diff = np.abs(f.pixels.astype(int) - ref)
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))
    else:
        np.testing.assert_array_equal(f.pixels, ref)
    if colour and paint is _doppler:  # the colour is there, in the middle of the picture
        assert _spread(f.pixels).max() > 100
    # a capture of it is the region at full resolution, gray or colour as shown
    full, _ = full_resolution(f)
    assert full.shape[:2] == (h, w) and full.ndim == f.pixels.ndim


@pytest.mark.parametrize("fourcc", ["MJPG", "YUYV"])
def test_a_colour_model_gets_colour_even_from_a_gray_picture(fourcc):
    f = _read_last(ReplayCapture(_screen_with(_no_paint), fourcc=fourcc), gray_if_neutral=False)
    assert f.pixels.ndim == 3


def test_yuyv_gray_is_the_full_range_gray_of_the_colour_conversion():
    img = screen_1080().render(3)[:720, :1280]
    yuyv = bgr_to_yuyv(cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR))
    for k in (1, 2):
        gray = yuyv_frame(yuyv, 1280, 720, k, gray=True)
        colour = yuyv_frame(yuyv, 1280, 720, k)
        # every k-th pixel pair's first pixel is also every 2k-th pixel of the gray picture
        np.testing.assert_array_equal(gray[:, ::2], cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)[:, ::2])
    assert gray.min() == 0 and gray.max() > 200  # studio range (16..235) brought to full range


@pytest.mark.parametrize("backend", DECODERS)
def test_a_gray_frame_from_the_planes_is_blacked_out_and_cut_like_any(backend):
    """Burned-in text blacked out and the board's crop, on the gray path of a gray model, also in the
    capture at full resolution."""
    img = np.full((1080, 1920, 3), 200, np.uint8)
    profile = SourceProfile(crop_rect=(96, 96, 1600, 800), blackout=((96, 96, 301, 51),))
    src = V4l2Source("v4l2:0", ReplayCapture([img], fourcc="MJPG"), profile=profile)
    src._decoder = JpegDecoder(backend)
    src.set_decode_target(size=(200, 100), gray_if_neutral=True)
    src.open()
    f = src.read()
    assert f.meta["decode_scale"] == 8 and f.pixels.shape == (100, 200)  # gray: nothing in it is coloured
    assert f.meta["imaging_region"] == [96, 96, 1600, 800]
    assert (f.pixels[:7, :38] == 0).all() and f.pixels[8:, 40:].min() > 150
    full, _ = full_resolution(f)
    assert full.shape == (800, 1600) and (full[:51, :301] == 0).all() and full[52:, 302:].min() > 150
