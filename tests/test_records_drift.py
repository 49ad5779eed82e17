"""Drift warning: INPUT UNLIKE TRAINING DATA for inputs unlike the reference, not for the reference itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware_app.records.drift import (
    WARNING,
    DriftMonitor,
    check_reference,
    jensen_shannon,
    reference_stats,
    reference_toml,
)
from firmware_app.sources.phantom import UltrasoundPhantom, XrayPhantom
from firmware_app.tomlio import tomllib


@pytest.fixture(scope="module")
def reference() -> dict:
    frames = []
    for seed in range(3):  # "training" seeds
        ph = UltrasoundPhantom(320, 240, seed)
        frames += [ph.render(t)[0] for t in range(0, 120, 8)]
    return reference_stats(frames)


def _run(reference: dict, frames: list[np.ndarray]) -> tuple[list[str | None], DriftMonitor]:
    monitor = DriftMonitor(reference, window=16)
    return [monitor.update(f) for f in frames], monitor


def test_unseen_frames_of_the_training_distribution_do_not_warn(reference: dict) -> None:
    for seed in (7, 11):
        ph = UltrasoundPhantom(320, 240, seed)
        out, monitor = _run(reference, [ph.render(t)[0] for t in range(24)])
        assert out == [None] * 24, monitor.status
        assert monitor.status.jsd < 0.1


def test_inverted_ultrasound_warns(reference: dict) -> None:
    ph = UltrasoundPhantom(320, 240, 7)
    out, monitor = _run(reference, [255 - ph.render(t)[0] for t in range(24)])
    assert out[-1] == WARNING == "INPUT UNLIKE TRAINING DATA"
    assert out[:7] == [None] * 7  # no verdict before half a window
    assert "histogram" in monitor.status.reasons


def test_xray_against_an_ultrasound_reference_warns(reference: dict) -> None:
    xr = XrayPhantom(320, 240, 3)
    out, monitor = _run(reference, [xr.render(t)[0] for t in range(24)])
    assert out[-1] == WARNING
    assert monitor.status.jsd > 0.15


def test_warning_clears_with_hysteresis_when_the_input_returns(reference: dict) -> None:
    ph = UltrasoundPhantom(320, 240, 7)
    frames = [ph.render(t)[0] for t in range(40)]
    changes: list[bool] = []
    monitor = DriftMonitor(reference, window=8, on_change=lambda on, _st: changes.append(on))
    for f in frames[:10]:
        monitor.update(255 - f)
    assert monitor.status.diverged
    results = [monitor.update(f) for f in frames[10:]]
    assert results[-1] is None and changes == [True, False]


def test_colour_frames_and_other_sizes(reference: dict) -> None:
    import cv2

    ph = UltrasoundPhantom(640, 480, 9)
    bgr = [cv2.cvtColor(ph.render(t)[0], cv2.COLOR_GRAY2BGR) for t in range(12)]
    out, _ = _run(reference, bgr)
    assert out[-1] is None
    wide = [np.ascontiguousarray(np.hstack([f, f])) for f in (ph.render(t)[0] for t in range(12))]
    out, monitor = _run(reference, wide)
    assert out[-1] == WARNING and "size" in monitor.status.reasons


def test_reference_table_round_trips_through_toml(reference: dict) -> None:
    table = tomllib.loads(reference_toml(reference))["reference"]
    assert check_reference(table) == []
    assert table["histogram"] == pytest.approx(reference["histogram"], abs=1e-6)
    assert set(table) == {"histogram", "mean", "mean_sd", "std", "std_sd", "width", "height", "frames"}
    bad = {**table, "histogram": [1.0] * 32, "colour": 1}
    problems = check_reference(bad)
    assert any("unknown key 'colour'" in p for p in problems)
    with pytest.raises(ValueError):
        DriftMonitor(bad)


def test_jensen_shannon_bounds() -> None:
    p = np.zeros(32)
    p[0] = 1
    q = np.zeros(32)
    q[-1] = 1
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon(p, q) == pytest.approx(1.0, abs=1e-3)


def test_drift_changes_go_to_the_audit_log(reference: dict, tmp_path: Path) -> None:
    import json
    import time

    from firmware_app.audit import AuditLog

    monitor = DriftMonitor(reference, window=4, audit=AuditLog(tmp_path), model_id="us-fluid-seg")
    ph = UltrasoundPhantom(320, 240, 7)
    for t in range(6):
        monitor.update(255 - ph.render(t)[0])
    deadline = time.monotonic() + 5
    records: list[dict] = []
    while time.monotonic() < deadline and not records:
        files = sorted((tmp_path / "audit").glob("*.jsonl"))
        records = [json.loads(x) for p in files for x in p.read_text().splitlines()]
        time.sleep(0.02)
    assert [(r["event"], r["state"], r["model_id"]) for r in records] == [
        ("drift_warning", "on", "us-fluid-seg")
    ]


def test_frame_stats_are_the_bincount_and_mean_of_every_other_pixel() -> None:
    """One contiguous copy and OpenCV's histogram: the same figures as counting the sampled pixels."""
    import cv2

    from firmware_app.records.drift import BINS, frame_stats

    rng = np.random.default_rng(3)
    ph = UltrasoundPhantom(640, 480, 7)
    images = [ph.render(t)[0] for t in (0, 9)] + [XrayPhantom(321, 241, 1).render(0)[0]]
    images += [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in ((1, 1), (3, 700), (479, 641))]
    images += [rng.integers(0, 256, (101, 77, c), dtype=np.uint8) for c in (3, 4)]
    images += [np.full((48, 64), 255, np.uint8), rng.uniform(-50, 300, (60, 80)).astype(np.float32)]
    for img in images:
        px = img[::2, ::2]
        if px.ndim == 3:
            px = cv2.cvtColor(np.ascontiguousarray(px[:, :, :3]), cv2.COLOR_BGR2GRAY)
        px = np.clip(px, 0, 255).astype(np.uint8)
        want = np.bincount(px.ravel() >> 3, minlength=BINS).astype(np.float64) / px.size
        mean, std = cv2.meanStdDev(px)
        hist, m, s = frame_stats(img)
        assert np.array_equal(hist, want) and (m, s) == (float(mean[0][0]), float(std[0][0]))
