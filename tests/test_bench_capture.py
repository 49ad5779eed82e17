"""``bench --capture``: a grabber's stream replayed by the capture double, measured in one run."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from firmware_app.bench import CAPTURE_TAIL, parse_capture, run_capture_bench
from firmware_app.cli import main
from firmware_app.errors import BadSource
from firmware_app.sources.grab import jpeg_size
from firmware_app.sources.v4l2 import ReplayCapture, V4l2Source, arrival_ns

CAPTURE_FIELDS = {
    "fourcc",
    "width",
    "height",
    "fps",
    "decode_scale",
    "cpu_ms_p50",
    "naive_cpu_ms_p50",
    "e2e_latency_ms",
    "p99_drift",
    "frames_dropped",
    "mismatched_overlays",
}


def test_capture_specs_parse_and_bad_ones_are_refused_before_measuring(capsys):
    assert parse_capture("mjpg:1920x1080@60") == ("MJPG", 1920, 1080, 60.0)
    assert parse_capture("yuyv:1280x720@30") == ("YUYV", 1280, 720, 30.0)
    for bad in ("mjpg:1920x1080", "h264:1920x1080@30", "mjpg:1921x1080@30", "mjpg:axb@30"):
        with pytest.raises(BadSource):
            parse_capture(bad)
    assert main(["bench", "--capture", "mjpg:big@60"]) != 0
    assert "FOURCC:WxH@FPS" in capsys.readouterr().err


def test_the_capture_double_replays_a_scanner_screen_as_a_grabber_sends_it():
    cap = ReplayCapture.scanner("MJPG", 1920, 1080, fps=0, count=5, distinct=3)
    assert cap.open()
    got = [cap.read() for _ in range(6)]
    assert [ok for ok, _ in got] == [True] * 5 + [False]
    buf = got[0][1]
    assert buf.dtype == np.uint8 and buf.shape[0] == 1 and jpeg_size(buf) == (1920, 1080)
    img = cv2.imdecode(buf.reshape(-1), cv2.IMREAD_COLOR)
    x, y, w, h = cap.screen.truth(0)
    assert img[y : y + h, x : x + w].std() > 10  # the moving image is in it, the chrome around it
    yuyv = ReplayCapture.scanner("YUYV", 1280, 720, fps=0, count=1, distinct=1)
    yuyv.open()
    assert yuyv.read()[1].shape == (720, 1280, 2)


def test_a_paced_capture_double_gives_the_newest_frame_to_a_late_reader():
    now = [0.0]
    cap = ReplayCapture(
        [np.zeros((4, 4, 3), np.uint8)] * 3, fps=10, count=20, clock=lambda: now[0], sleep=lambda s: None
    )
    cap.open()
    cap.read()
    assert cap.t_arrival_ns == 0
    now[0] = 0.55  # frames 1..5 arrived meanwhile: the reader gets frame 5, 4 are lost
    cap.read()
    assert cap.n == 6 and cap.missed == 4 and cap.t_arrival_ns == 500_000_000


def test_frame_capture_time_is_the_grabbers_arrival_time():
    cap = ReplayCapture.scanner("MJPG", 640, 360, fps=0, count=2, distinct=2)
    cap.t_arrival_ns = None
    src = V4l2Source("v4l2:0", cap)
    src.open()
    f = src.read()
    assert f.t_capture_ns > 0 and f.meta["full_size"] == (640, 360)


def test_capture_bench_1080p_mjpg_reports_the_design_fields(tmp_path):
    out = run_capture_bench(None, "us-fluid-seg", "mjpg:1920x1080@60", 240, None, str(tmp_path))
    cap = out["capture"]
    assert CAPTURE_FIELDS <= set(cap)
    assert (cap["fourcc"], cap["width"], cap["height"], cap["fps"]) == ("MJPG", 1920, 1080, 60.0)
    assert cap["decode_scale"] >= 2 and cap["mismatched_overlays"] == 0
    # the model applies to the scanner's picture: its findings are drawn, each on its own frame
    assert cap["findings"] > cap["frames_inferred"] // 2
    assert cap["cpu_ms_p50"] < cap["naive_cpu_ms_p50"]  # the 0.3x figure is measured by the bench run
    assert set(cap["e2e_latency_ms"]) == {"p50", "p99"} and cap["p99_drift"] > 0
    assert cap["frames_dropped"] >= 0
    assert {p.rsplit("/", 1)[-1] for p in cap["report"]} == {
        "latency_cdf.png",
        "latency_timeline.png",
        "capture.json",
    }
    assert cv2.imread(str(tmp_path / "latency_cdf.png")) is not None
    # per-step CPU and wall times of both paths, decode included, and per stage of the pipeline run
    stages = cap["stages"]
    assert {"read", "decode", "preprocess"} <= set(stages["ours"])
    assert set(stages["naive"]) == {"decode", "resize", "preprocess"}
    for step in (*stages["ours"].values(), *stages["naive"].values()):
        assert set(step) == {"cpu", "wall"} and set(step["cpu"]) == {"p50", "p99"}
    assert stages["ours"]["decode"]["cpu"]["p50"] <= stages["ours"]["read"]["cpu"]["p99"]
    # as on a device, the screen's image is gray only because the scanner's picture has no colour in its
    # imaging region (its chrome around it has); the decode's floor (1/8, gray) is measured on the same
    # frames, below both paths' decode
    assert cap["decoded_gray"] is True
    floor = cap["decode_floor"]
    assert 0 < floor["cpu_ms_p50"] < stages["naive"]["decode"]["cpu"]["p50"]
    assert floor["ratio_to_naive"] == pytest.approx(floor["cpu_ms_p50"] / cap["naive_cpu_ms_p50"], abs=2e-3)
    assert {"capture", "invoke", "e2e"} <= set(cap["pipeline_stages_ms"])
    assert "capture" in cap["pipeline_cpu_ms"]
    # the naive path on the same paced stream: its latency and the frames it could not take
    naive = cap["naive"]
    assert naive["frames_shown"] + naive["frames_dropped"] <= naive["frames"] + CAPTURE_TAIL
    assert naive["frames_shown"] > 0 and set(naive["e2e_latency_ms"]) == {"p50", "p99"}


def test_a_real_grabbers_frame_is_timed_from_its_driver_timestamp():
    now = 5_000_000_000_000
    assert arrival_ns(now / 1e6 - 12.5, now) == now - 12_500_000  # 12.5 ms before the read returned
    assert arrival_ns(0.0, now) is None  # no timestamp: the read time is used
    assert arrival_ns(float("nan"), now) is None
    assert arrival_ns(now / 1e6 + 5, now) is None  # in the future: not the monotonic clock
    assert arrival_ns(now / 1e6 - 3000, now) is None  # 3 s old: another clock (or a stale buffer)


def test_the_capture_bench_decodes_what_the_composer_asks_a_grabber_for():
    from firmware_app.bench import decode_target_for
    from firmware_app.config import load_board
    from firmware_app.models.store import find_model
    from firmware_app.pipeline import build_pipeline
    from firmware_app.sources.grab import DecodeTarget

    board, model = load_board(None), find_model("us-fluid-seg")
    assert model.manifest.color == "gray"
    cap = ReplayCapture.scanner("MJPG", 640, 360, fps=0, count=3, distinct=1)
    fed = dataclasses.replace(board, source={**board.source, "capture": cap})
    p = build_pipeline(fed, model, "v4l2:replay", ["null"], max_frames=1)
    try:
        src = p.source
        assert isinstance(src, V4l2Source)
        t = decode_target_for(board, model)
        assert src.decode_target == DecodeTarget(
            t["size"], t["fit"], t["gray"], gray_if_neutral=t["gray_if_neutral"]
        )
        # colour for the screen whatever the model reads; gray only where the picture has no colour
        assert src.decode_target.gray is False and src.decode_target.gray_if_neutral is True
    finally:
        p.close()
