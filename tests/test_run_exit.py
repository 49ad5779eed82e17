"""`run` over a finite source that gave no usable frame exits 1 with one line naming why."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from test_dicom_values import dataset, write

from firmware_app.cli import main


def _run(capsys, tmp_path: Path, source: str, model: Path) -> tuple[int, str]:
    argv = ["--data-dir", str(tmp_path / "data"), "run", "--source", source, "--model", str(model)]
    code = main([*argv, "--display", "null"])
    return code, capsys.readouterr().err


def test_single_broken_dicom_exits_1_naming_why(capsys, tmp_path: Path, float_model_dir):
    path = write(tmp_path / "BROKEN.dcm", dataset(), enforce_file_format=True)
    path.write_bytes(path.read_bytes()[:-1000])  # pixel data cut short
    code, err = _run(capsys, tmp_path, f"dicom:{path}", float_model_dir)
    assert code == 1
    (line,) = [x for x in err.splitlines() if x.startswith("firmware-app: error:")]
    assert f"dicom:{path}: no usable frame ({path}: pixel data too short" in line


def test_dicom_with_nan_slope_exits_1(capsys, tmp_path: Path, float_model_dir):
    path = write(tmp_path / "nan.dcm", dataset(RescaleSlope="NaN"), enforce_file_format=True)
    code, err = _run(capsys, tmp_path, f"dicom:{path}", float_model_dir)
    assert code == 1 and "no usable frame" in err and "Rescale Slope nan is not a finite number" in err


def test_folder_with_one_good_image_among_bad_ones_exits_0(capsys, tmp_path: Path, float_model_dir):
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(b"not a png")
    cv2.imwrite(str(pics / "b.png"), np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    code, err = _run(capsys, tmp_path, f"images:{pics}", float_model_dir)
    assert code == 0 and "no usable frame" not in err
    (pics / "b.png").unlink()
    code, err = _run(capsys, tmp_path, f"images:{pics}", float_model_dir)
    assert code == 1 and "a.png: not an image" in err
