"""stderr fit for journald: a start-up line, repeated events rate-limited, native libraries quiet unless
-v, no timestamp of our own under journald."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from firmware_app.logsetup import OneLineFormatter, RepeatFilter

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "OPENCV_LOG_LEVEL")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _fast_reconnect_board(tmp_path: Path) -> Path:
    text = (ROOT / "board_configs" / "x86-dev.toml").read_text()
    board = tmp_path / "fast.toml"
    board.write_text(text.replace("fps = 30\n", "fps = 30\nreconnect_s = 0.05\n", 1))
    return board


def _run_for(args: list[str], seconds: float, env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_app", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    time.sleep(seconds)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_an_unplugged_grabber_reconnecting_fast_prints_a_handful_of_lines(tmp_path: Path) -> None:
    args = ["run", "--board", str(_fast_reconnect_board(tmp_path)), "--source", "v4l2:/dev/video-none"]
    args += ["--display", "null", "--data-dir", str(tmp_path / "data")]
    code, err = _run_for(args, 4.0, _env())
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 5, err  # ~60 reconnects in 4 s
    assert not any("WARN:" in line or "VIDEOIO" in line for line in lines), err
    start = [line for line in lines if "firmware_app.start" in line]
    assert len(start) == 1, err
    for part in ("board x86-dev", "model us-fluid-seg@", "backend litert-cpu", "source v4l2:/dev/video-none"):
        assert part in start[0]
    assert "display null" in start[0] and f"data dir {tmp_path / 'data'}" in start[0]
    assert "XNNPACK" not in err


def test_xnnpack_line_only_with_verbose_and_no_timestamp_under_journald(tmp_path: Path) -> None:
    base = ["run", "--frames", "2", "--display", "null", "--data-dir", str(tmp_path / "data")]
    env = _env(JOURNAL_STREAM="8:12345")
    quiet = subprocess.run(
        [sys.executable, "-m", "firmware_app", *base], capture_output=True, text=True, env=env, timeout=120
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "XNNPACK" not in quiet.stderr
    logged = [line for line in quiet.stderr.splitlines() if "firmware_app." in line]
    assert logged and all(re.match(r"^<\d>", line) and not STAMP.match(line[3:]) for line in logged), (
        quiet.stderr
    )
    loud = subprocess.run(
        [sys.executable, "-m", "firmware_app", "-v", *base],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert loud.returncode == 0, loud.stderr
    assert "XNNPACK" in loud.stderr


def test_on_a_terminal_lines_carry_a_timestamp(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "firmware_app", "run", "--frames", "2", "--display", "null"]
        + ["--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    start = next(line for line in run.stderr.splitlines() if "firmware_app.start" in line)
    assert STAMP.match(start)


def test_the_same_event_is_printed_once_per_window_with_a_count() -> None:
    now = [0.0]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter(journald=True, tracebacks=False))
    handler.addFilter(RepeatFilter(window_s=300.0, clock=lambda: now[0]))
    log = logging.getLogger("test.repeat")
    log.propagate = False
    log.addHandler(handler)
    try:
        for _ in range(300):  # a line a second for 5 minutes
            log.warning("v4l2:/dev/video0: NO SIGNAL")
            now[0] += 1.0
        log.warning("something else")
        log.warning("v4l2:/dev/video0: NO SIGNAL")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines == [
        "<4>WARNING test.repeat: v4l2:/dev/video0: NO SIGNAL",
        "<4>WARNING test.repeat: something else",
        "<4>WARNING test.repeat: v4l2:/dev/video0: NO SIGNAL (repeated 299 times in the last 5 min)",
    ]
