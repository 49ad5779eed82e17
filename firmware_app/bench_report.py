"""``bench --capture ... --report DIR``: the capture run's latency as two PNGs, drawn with OpenCV.

``latency_cdf.png``: the cumulative distribution of frame arrival -> shown latency, p50 and p99 marked;
``latency_timeline.png``: each shown frame's latency in order, the first and last DRIFT_SPAN frames shaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

W, H, PAD = 900, 420, 60
WHITE, GREY, BLUE, RED, BLACK = (255, 255, 255), (200, 200, 200), (200, 90, 20), (40, 40, 220), (0, 0, 0)


def _axes(title: str, xlabel: str, ylabel: str) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.rectangle(img, (PAD, PAD // 2), (W - PAD // 2, H - PAD), BLACK, 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (PAD, 20), font, 0.55, BLACK, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (W // 2 - 60, H - 15), font, 0.5, BLACK, 1, cv2.LINE_AA)
    cv2.putText(
        img, ylabel, (5, 14), font, 0.45, BLACK, 1, cv2.LINE_AA
    )  # above the top tick, left of the title
    return img


def _to_px(xs: np.ndarray, ys: np.ndarray, xmax: float, ymax: float) -> np.ndarray:
    px = PAD + xs / max(xmax, 1e-9) * (W - 1.5 * PAD)
    py = (H - PAD) - ys / max(ymax, 1e-9) * (H - 1.5 * PAD)
    return np.stack([px, py], axis=1).round().astype(np.int32)


def _ticks(img: np.ndarray, xmax: float, ymax: float) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in range(6):
        x = PAD + i / 5 * (W - 1.5 * PAD)
        y = (H - PAD) - i / 5 * (H - 1.5 * PAD)
        label = _tick_label(xmax * i / 5)
        tw = cv2.getTextSize(label, font, 0.4, 1)[0][0]
        tx = min(int(x) - tw // 2, W - tw - 2)  # centred on its tick, never cut at the right edge
        cv2.putText(img, label, (tx, H - PAD + 16), font, 0.4, BLACK, 1, cv2.LINE_AA)
        cv2.putText(img, _tick_label(ymax * i / 5), (8, int(y) + 4), font, 0.4, BLACK, 1, cv2.LINE_AA)


def _tick_label(v: float) -> str:
    """3 significant digits, whole numbers from 1000 up (frame counts: 1850, not 1.85e+03)."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def write_report(report_dir: str, e2e_ms: list[float], capture: dict[str, Any]) -> list[str]:
    """Write the two PNGs and capture.json under ``report_dir``; returns their paths."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    lat = np.asarray(e2e_ms, np.float64)
    paths = []
    what = f"{capture['fourcc']} {capture['width']}x{capture['height']}@{capture['fps']:g}"
    if lat.size:
        xmax = float(np.percentile(lat, 99.9)) * 1.1
        srt = np.sort(lat)
        cdf = _axes(f"frame arrival -> shown, {what}: CDF ({lat.size} frames)", "latency (ms)", "share")
        _ticks(cdf, xmax, 1.0)
        pts = _to_px(np.minimum(srt, xmax), np.arange(1, srt.size + 1) / srt.size, xmax, 1.0)
        cv2.polylines(cdf, [pts], False, BLUE, 2, cv2.LINE_AA)
        for q, colour in ((50, BLACK), (99, RED)):
            v = float(np.percentile(lat, q))
            x = int(_to_px(np.array([v]), np.array([0.0]), xmax, 1.0)[0, 0])
            cv2.line(cdf, (x, PAD // 2), (x, H - PAD), colour, 1)
            cv2.putText(cdf, f"p{q} {v:.1f} ms", (x + 4, PAD // 2 + 16 + q // 10), 0, 0.45, colour, 1)
        paths.append(str(out / "latency_cdf.png"))
        cv2.imwrite(paths[-1], cdf)
        tl = _axes(f"latency per shown frame, {what}", "shown frame", "ms")
        ymax = float(lat.max()) * 1.1
        _ticks(tl, float(lat.size), ymax)
        span = min(500, lat.size // 2)
        for a, b in ((0, span), (lat.size - span, lat.size)):
            p0, p1 = _to_px(np.array([a, b], float), np.array([0.0, ymax]), lat.size, ymax)
            cv2.rectangle(tl, (int(p0[0]), int(p1[1])), (int(p1[0]), int(p0[1])), GREY, -1)
        pts = _to_px(np.arange(lat.size, dtype=float), lat, float(lat.size), ymax)
        cv2.polylines(tl, [pts], False, BLUE, 1, cv2.LINE_AA)
        paths.append(str(out / "latency_timeline.png"))
        cv2.imwrite(paths[-1], tl)
    paths.append(str(out / "capture.json"))
    Path(paths[-1]).write_text(json.dumps(capture, indent=2) + "\n")
    return paths
