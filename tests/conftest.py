"""Shared fixtures. No test needs hardware, a network or a display."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
THIRD_PARTY_FLOAT = DATA / "third_party" / "selfie-seg"
BUNDLED = REPO / "models_tflite"


@pytest.fixture
def float_model_dir(tmp_path: Path) -> Path:
    """A private copy of the third-party float model folder (tests may add files to it)."""
    dst = tmp_path / "selfie-seg"
    shutil.copytree(THIRD_PARTY_FLOAT, dst)
    return dst


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d
