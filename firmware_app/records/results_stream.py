"""The per-frame results stream (``run --results FILE``) and the one record it, and the serial line, carry.

One JSON object per analysed frame, one line each, flushed per line (../shared/DESIGN.md, "Results stream"):
``frame_id``, ``time`` (UTC ISO 8601), ``source`` {uri, path, frame_index}, ``model`` ("id@version"),
``backend``, ``state`` (finding | no_finding | unlike_training_data | ai_off), ``label``, ``confidence``,
``alert``, ``size`` {value, unit}, ``boxes`` (source pixels), ``gate`` {score, threshold}, ``imaging_region``,
``region_from``, ``mm_per_px``, ``shown``; and, beyond the contract, ``points`` ([{x, y, score, label}],
source pixels), ``reason`` (why the AI paused) and ``measurements`` {name: {value, unit}}.

What it writes comes from the result's shapes and measurements (``firmware_app.shapes``), never from the
task: boxes are its ``BoxShape``s, points its ``Point``s. Geometry is in *source* pixels: a frame's pixels
are its imaging region, so boxes and points are moved by the region's origin. No patient identifier is ever written: the source is named by its URI and file path,
never by anything from a DICOM header.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from firmware_app.errors import FirmwareAppError
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)


def _r(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(float(x)):
        return None
    return round(float(x), digits)


def result_record(
    frame: Frame | None, result: Result, *, model: str, backend: str, shown: bool, now: datetime | None = None
) -> dict[str, Any]:
    """The results-stream object for ``result`` of ``frame`` (None: a result known without its frame)."""
    meta = frame.meta if frame is not None else {}
    full = [0, 0, frame.width, frame.height] if frame is not None else None
    region = meta.get("imaging_region") or full or [0, 0, 0, 0]
    ox, oy = region[0], region[1]
    state = result.state or ("finding" if result.alert else "no_finding")
    mm = meta.get("mm_per_px")
    return {
        "frame_id": result.frame_id,
        "time": (now or datetime.now(timezone.utc))
        .astimezone(timezone.utc)
        .isoformat(timespec="milliseconds"),
        "source": {
            "uri": meta.get("source"),
            "path": meta.get("path"),
            "frame_index": meta.get("frame_index", result.frame_id),
        },
        "model": model,
        "backend": backend,
        "state": state,
        "label": result.label,
        "confidence": _r(result.confidence),
        "alert": bool(result.alert) and state == "finding",
        "size": None if result.size is None else {"value": _r(result.size[0], 6), "unit": result.size[1]},
        "boxes": [
            {
                "x0": _r(b.x0 + ox, 1),
                "y0": _r(b.y0 + oy, 1),
                "x1": _r(b.x1 + ox, 1),
                "y1": _r(b.y1 + oy, 1),
                "score": _r(b.score),
                "label": b.label,
            }
            for b in result.boxes
        ],
        "points": [
            {"x": _r(p.x + ox, 1), "y": _r(p.y + oy, 1), "score": _r(p.score), "label": p.label}
            for p in result.points
        ],
        "gate": None
        if result.gate is None
        else {"score": _r(result.gate[0]), "threshold": _r(result.gate[1])},
        "imaging_region": [int(v) for v in region] if frame is not None else None,
        "region_from": meta.get("region_from", "full_frame"),
        "mm_per_px": None if not mm else [_r(mm[0], 6), _r(mm[1], 6)],
        "shown": bool(shown),
        "reason": result.paused,
        "measurements": {k: {"value": _r(v, 3), "unit": u} for k, (v, u) in result.measurements.items()},
    }


class ResultsStream:
    """A result sink writing one ``result_record`` line per analysed frame to ``path`` (created or replaced).

    ``describe()`` -> (model "id@version", backend, shown) is asked per frame, so a model switched at run
    time is named from its first frame on. A write that fails (a full disk) is logged once and counted;
    the stream goes on with the next frame.
    """

    def __init__(self, path: str | Path, describe=None) -> None:
        self.path = Path(path)
        self._describe = describe
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()
        self.written = 0
        self.failed = 0

    def bind(self, pipeline) -> None:
        """As a result sink: name the model and backend running now, and whether results are shown."""
        if self._describe is None:

            def describe() -> tuple[str, str, bool]:
                m = pipeline.model.manifest
                return f"{m.id}@{m.version}", pipeline.choice.backend.name, not pipeline.silent_trial

            self._describe = describe

    @staticmethod
    def check_writable(path: str | Path) -> None:
        """Before the work starts: FirmwareAppError naming ``path`` when it cannot be written."""
        p = Path(path)
        if p.is_dir():
            raise FirmwareAppError(f"--results {p}: is a folder, not a file")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise FirmwareAppError(f"--results {p}: folder {parent} does not exist")

    def start(self) -> None:
        self.check_writable(self.path)
        try:
            self._fh = open(self.path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise FirmwareAppError(f"--results {self.path}: cannot write ({exc.strerror})") from None

    def on_result(self, frame: Frame, result: Result) -> None:
        model, backend, shown = self._describe()
        line = json.dumps(result_record(frame, result, model=model, backend=backend, shown=shown))
        with self._lock:
            if self._fh is None:
                return
            try:
                self._fh.write(line + "\n")
                self._fh.flush()
                self.written += 1
            except OSError as exc:
                if not self.failed:
                    log.error("--results %s: cannot write (%s); results are not recorded", self.path, exc)
                self.failed += 1

    def close(self) -> None:
        with self._lock:
            fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:
                log.error("--results %s: %s", self.path, exc)
