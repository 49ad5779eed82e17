"""Shared fixtures. No test needs hardware, a network or a display."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
THIRD_PARTY_FLOAT = DATA / "third_party" / "selfie-seg"
BUNDLED = REPO / "models_tflite"


@pytest.fixture(autouse=True, scope="session")
def boards_write_below_tmp(tmp_path_factory):
    """The shipped boards, with every relative display folder (x86-dev's ``png:out``) moved below a
    temporary folder: a test that runs a board's own display never writes into the checkout."""
    boards = tmp_path_factory.mktemp("board_configs")
    screens = tmp_path_factory.mktemp("screens")
    for toml in sorted((REPO / "board_configs").glob("*.toml")):
        text = toml.read_text()
        for line in text.splitlines():
            key, _, value = line.partition("=")
            uri = value.strip().strip('"')
            if key.strip() == "uri" and uri.startswith("png:") and not os.path.isabs(uri[4:]):
                text = text.replace(line, f'uri = "png:{screens / toml.stem / uri[4:]}"')
        (boards / toml.name).write_text(text)
    old = os.environ.get("FIRMWARE_APP_BOARDS")
    os.environ["FIRMWARE_APP_BOARDS"] = str(boards)
    yield boards
    if old is None:
        os.environ.pop("FIRMWARE_APP_BOARDS", None)
    else:
        os.environ["FIRMWARE_APP_BOARDS"] = old


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
