"""Housekeeping: tests write nothing into the checkout, outputs are git-ignored, the package metadata
installs without setuptools warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_app.config import load_board

REPO = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_the_default_board_screen_is_written_below_tmp_in_tests():
    uri = load_board("x86-dev").display["uri"]
    folder = Path(uri.removeprefix("png:"))
    assert uri.startswith("png:") and folder.is_absolute()
    assert REPO not in folder.resolve().parents and Path.cwd() not in folder.resolve().parents


def test_shipped_x86_board_keeps_its_relative_png_display():
    # what the tests redirect is only their copy: the shipped board still writes ./out on a PC
    assert 'uri = "png:out"' in (REPO / "board_configs" / "x86-dev.toml").read_text()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("path", ["out/last_frame.png", "demo-out/last_frame.png"])
def test_output_folders_are_git_ignored(path):
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, env=env, check=False)
    assert done.returncode == 0, f"{path} is not git-ignored"


def test_license_is_an_spdx_string_for_a_setuptools_that_reads_it():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "LicenseRef-Proprietary"  # a table is deprecated since setuptools 77
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in meta["build-system"]["requires"])
