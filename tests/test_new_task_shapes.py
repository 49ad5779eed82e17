"""A new task is a post-processor that returns shapes and measurements: the screen, the burned-in overlay,
the results stream, the serial line and the captures show it with no change of theirs.

The task here is defined in the test itself: a keypoint model whose output is K x (x, y, score), normalised.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone

import numpy as np

from firmware_app.device.serial_link import result_hl7
from firmware_app.display.overlay import ACCENT
from firmware_app.display.screen import Screen, ScreenState, _where
from firmware_app.records.captures import _result_from, result_json
from firmware_app.records.overlay import render_overlay
from firmware_app.records.results_stream import result_record
from firmware_app.shapes import Point
from firmware_app.tasks.finding import FindingStage
from firmware_app.types import Frame, Result
from tests.test_finding import manifest

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


class Keypoints:
    """The whole new task: raw [1, K, 3] (x, y, score in [0, 1]) -> Points and their spread in mm."""

    labels = ("apex", "base")

    def __call__(self, raw, frame_id, frame_size, threshold, mm_per_px=0.5) -> Result:
        fw, fh = frame_size
        kp = np.asarray(raw[0], np.float32)[0]
        points = tuple(
            Point(float(x * fw), float(y * fh), label, float(s))
            for (x, y, s), label in zip(kp, self.labels)
            if s >= threshold
        )
        found = len(points) == len(self.labels)
        spread = float(np.hypot(points[1].x - points[0].x, points[1].y - points[0].y)) if found else 0.0
        return Result(
            frame_id,
            "keypoint",
            "apex-base" if found else None,
            float(kp[:, 2].min()),
            alert=found,
            shapes=points,
            measurements={"length": (spread * mm_per_px, "mm")} if found else {},
        )


def _frame(fid: int = 3) -> Frame:
    rng = np.random.default_rng(fid)
    px = (60 + rng.random((480, 640)) * 60).astype(np.uint8)
    meta = {"imaging_region": [40, 30, 640, 480], "region_from": "board", "single_image": True}
    return Frame(fid, 0, px, meta)


def _result(frame: Frame) -> Result:
    raw = [np.array([[[0.25, 0.5, 0.9], [0.75, 0.5, 0.8]]], np.float32)]
    task = Keypoints()(raw, frame.id, (frame.width, frame.height), threshold=0.5)
    return FindingStage(manifest())(task, frame)  # the finding stage keeps its shapes and measurements


def _accent(px: np.ndarray) -> np.ndarray:
    return (np.abs(px.astype(int) - np.array(ACCENT)) <= 12).all(axis=-1)


def test_a_keypoint_task_is_a_finding_with_its_points_and_measurement():
    r = _result(_frame())
    assert r.state == "finding" and r.alert and r.label == "apex-base"
    assert [(p.x, p.y, p.label) for p in r.points] == [(160.0, 240.0, "apex"), (480.0, 240.0, "base")]
    assert r.measurements == {"length": (160.0, "mm")}
    assert r.centroid == (160.0, 240.0)  # where the finding is: its first point
    assert r.mask is None and r.boxes == () and r.heatmap is None


def test_the_screen_draws_the_points_and_lists_the_measurement():
    frame = _frame()
    r = _result(frame)
    screen = Screen(800, 480)
    plain = screen.render(ScreenState(frame, None)).copy()
    drawn = screen.render(ScreenState(frame, r)).copy()
    view = screen.image_rect
    sx = view.w / frame.width
    for p in r.points:  # a cross in the accent colour on each point, in its place on the shown image
        cx, cy = view.x + int(round(p.x * sx)), view.y + int(round(p.y * sx))
        assert _accent(drawn[cy - 2 : cy + 3, cx - 2 : cx + 3]).any()
    changed = (drawn != plain).any(axis=2)[view.y : view.y1, view.x : view.x1]
    ys, xs = np.nonzero(changed)
    assert ys.min() >= int(200 * sx) and ys.max() <= int(260 * sx)  # nothing drawn far from the points
    assert _where(r) == ("2 points", "Length 160 mm")


def test_the_burned_in_overlay_draws_the_points_with_the_same_painter():
    frame = _frame()
    r = _result(frame)
    img = render_overlay(frame.pixels, r, "kp", "1.0.0", True)
    h = frame.height
    top = next(y for y in range(img.shape[0] - h) if np.array_equal(img[y : y + h, 0, 0], frame.pixels[:, 0]))
    shown = img[top : top + h]
    for p in r.points:  # the frame keeps its size: the cross is on the point itself
        x, y = int(p.x), int(p.y)
        assert _accent(shown[y - 2 : y + 3, x - 2 : x + 3]).any()
    ys = np.nonzero(_accent(shown).any(axis=1))[0]
    assert ys.min() >= 215 and ys.max() <= 265


def test_the_results_stream_serial_line_and_captures_carry_the_points():
    frame = _frame()
    r = _result(frame)
    rec = result_record(frame, r, model="kp@1.0.0", backend="litert-cpu", shown=True, now=NOW)
    assert rec["state"] == "finding" and rec["boxes"] == []
    assert rec["points"] == [  # in source pixels: moved by the imaging region's origin
        {"x": 200.0, "y": 270.0, "score": 0.9, "label": "apex"},
        {"x": 520.0, "y": 270.0, "score": 0.8, "label": "base"},
    ]
    assert rec["measurements"] == {"length": {"value": 160.0, "unit": "mm"}}
    json.dumps(rec)
    hl7 = result_hl7(r, "kp", "1.0.0", NOW, "1")
    obx = [s.split("|") for s in hl7.split("\r") if s.startswith("OBX")]
    assert ["160", "160^240", "480^240"] == sorted(o[5] for o in obx if o[3].startswith(("POINT^", "MEAS_")))
    assert any(o[3] == "MEAS_LENGTH^length^L" and o[6] == "mm^^UCUM" for o in obx)
    back = _result_from(result_json(r), {})
    assert [(p.x, p.y, p.label, p.score) for p in back.points] == [
        (p.x, p.y, p.label, p.score) for p in r.points
    ]


def test_the_sr_holds_a_point_region_per_point(tmp_path):
    import pydicom
    from records_support import MODEL, pydicom_data_file

    from firmware_app.records.captures import Recorder
    from firmware_app.records.export import export_fileset
    from firmware_app.sources import open_source

    data = tmp_path / "data"
    data.mkdir()
    with open_source(f"dicom:{pydicom_data_file('US1_UNCR.dcm')}") as src:
        f = src.read()
    f = dataclasses.replace(f, meta={**f.meta, "single_image": True})  # one image: no persistence
    Recorder(data, model=MODEL).capture(f, _result(f))
    report = export_fileset(data, tmp_path / "stick")
    (item,) = report.exported
    sr = next(
        pydicom.dcmread(report.out_dir / fid) for role, fid in zip(item.uids, item.files) if role == "sr"
    )
    text = str(sr)
    assert text.count("POINT") >= 2 and "apex" in text and "length" in text, text[-3000:]
