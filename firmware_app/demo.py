"""``firmware-app demo``: the embedded default, runnable on a laptop with no hardware.

Synthetic ultrasound phantom (seed 7: not one the model was trained on) -> the bundled ``us-fluid-seg``
int8 model -> the full pipeline -> the screen rendered to ``OUT/last_frame.png`` (exactly what the screen
shows) and ``OUT/demo.mp4``; ``OUT/stats.json`` carries the figures, including the mean Dice of the
overlay against the phantom's ground truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

from firmware_app.cli import summary_line, write_json
from firmware_app.config import load_board
from firmware_app.models.store import find_model
from firmware_app.pipeline import build_pipeline

DEMO_BOARD = "x86-dev"
DEMO_MODEL = "us-fluid-seg"


def run_demo(out: str, frames: int, seed: int, data_dir: str | None) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    board = load_board(DEMO_BOARD)
    model = find_model(DEMO_MODEL, None)  # the bundled model: the demo does not depend on what is installed
    source = f"synthetic:ultrasound?seed={seed}&fps=30"
    displays = [f"png:{out_dir}", f"video:{out_dir / 'demo.mp4'}"]
    pipeline = build_pipeline(board, model, source, displays, max_frames=frames)
    stats = pipeline.run()
    write_json(out_dir / "stats.json", stats)
    print(summary_line(stats))
    print(
        f"screen: {out_dir / 'last_frame.png'}  video: {out_dir / 'demo.mp4'}  stats: {out_dir / 'stats.json'}"
    )
    if stats["mismatched_overlays"]:
        print("firmware-app: error: an overlay was drawn on the wrong frame", file=sys.stderr)
        return 1
    return 0
