"""The no-network promise, checked on a real run: not one AF_INET or AF_INET6 socket."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import THIRD_PARTY_FLOAT


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_daemon_run_creates_no_inet_socket(tmp_path):
    trace = tmp_path / "trace.txt"
    cmd = [
        "strace",
        "-f",
        "-e",
        "trace=socket",
        "-o",
        str(trace),
        sys.executable,
        "-m",
        "firmware_app",
        "--data-dir",
        str(tmp_path / "data"),
        "run",
        "--model",
        str(THIRD_PARTY_FLOAT),
        "--source",
        "synthetic:ultrasound?fps=0&width=160&height=120",
        "--display",
        f"png:{tmp_path / 'screen'}",
        "--frames",
        "10",
        "--capture-every",
        "5",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    calls = trace.read_text()
    assert "+++ exited with 0 +++" in calls  # the trace covered the whole run
    inet = [line for line in calls.splitlines() if re.search(r"socket\((AF_INET|AF_INET6|PF_INET)\b", line)]
    assert inet == [], "\n".join(inet)
    assert (tmp_path / "data" / "captures").is_dir()
