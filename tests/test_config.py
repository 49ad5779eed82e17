from __future__ import annotations

from pathlib import Path

import pytest

from firmware_app.config import board_configs_dir, load_board
from firmware_app.errors import BadConfig


@pytest.mark.parametrize("name", ["x86-dev", "rpi4-cpu", "rpi5-coral-usb", "jetson-orin-nano"])
def test_shipped_board_configs_are_valid(name):
    board = load_board(name)
    assert board.name == name
    assert board.backend["order"][-1] == "cpu"  # every board can fall back to the CPU


def test_board_config_list_is_complete():
    names = {p.stem for p in board_configs_dir().glob("*.toml")}
    assert {"x86-dev", "rpi4-cpu", "rpi5-coral-usb", "jetson-orin-nano"} <= names


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "board.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[source]\nurl = "v4l2:0"\n', "unknown key [source] url"),
        ('[backend]\nthreads = "two"\n', "[backend] threads must be int"),
        ("[backend]\nthreads = true\n", "[backend] threads must be int"),
        ('[backend]\norder = ["gpu"]\n', "unknown backend 'gpu'"),
        ('[source]\nfourcc = "H264"\n', "fourcc 'H264'"),
        ("[source]\ncrop = [0, 0, 10]\n", "crop: expected [x, y, width, height]"),
        ("[display]\nwidth = 5\n", "[display] width 5"),
        ("colour = 1\n", "unknown key colour"),
        ("[source\n", "not valid TOML"),
    ],
)
def test_bad_board_config_is_one_line_naming_file_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(BadConfig) as exc:
        load_board(path)
    msg = str(exc.value)
    assert path in msg and needle in msg and "\n" not in msg


def test_missing_board_file_and_unknown_board_name(tmp_path):
    with pytest.raises(BadConfig, match="board config not found"):
        load_board(str(tmp_path / "nope.toml"))
    with pytest.raises(BadConfig, match="known boards: .*x86-dev"):
        load_board("pdp11")


def test_defaults_fill_missing_sections(tmp_path):
    board = load_board(write(tmp_path, 'name = "mini"\n'))
    assert board.backend["threads"] == 2 and board.display["width"] == 800
    assert board.profile.crop_rect is None
