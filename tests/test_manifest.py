from __future__ import annotations

from pathlib import Path

import pytest

from firmware_app.errors import BadModel
from firmware_app.models.manifest import load_manifest, parse_manifest
from firmware_app.models.store import find_model, list_models

BASE = {
    "id": "m",
    "version": "1.0.0",
    "task": "segmentation",
    "intended_use": "test",
    "cleared_for_clinical_use": False,
    "input": {"width": 64, "height": 64, "color": "gray", "range": [0.0, 1.0]},
    "output": {"labels": ["background", "fluid"], "activation": "softmax"},
    "thresholds": {"alert": 0.5, "alert_min": 0.3, "alert_max": 0.9},
}


def variant(**changes):
    import copy

    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        t = d
        for p in path:
            t = t[p]
        if value is ...:
            del t[key]
        else:
            t[key] = value
    return d


def test_valid_manifest_parses():
    m = parse_manifest(BASE, "x.toml")
    assert (m.id, m.width, m.height, m.labels, m.alert) == ("m", 64, 64, ("background", "fluid"), 0.5)
    assert not m.cleared_for_clinical_use


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"extra": 1}, "unknown key 'extra'"),
        ({"input__depth": 3}, "unknown key [input] 'depth'"),
        ({"id": ...}, "missing required key id"),
        ({"thresholds__alert_max": ...}, "missing required key [thresholds] alert_max"),
        ({"input__width": "64"}, "[input] width must be int"),
        ({"cleared_for_clinical_use": "no"}, "cleared_for_clinical_use must be bool"),
        ({"task": "regression"}, "task 'regression'"),
        ({"input__color": "cmyk"}, "color 'cmyk'"),
        ({"input__range": [1.0, 0.0]}, "low must be below high"),
        ({"output__activation": "relu"}, "activation 'relu'"),
        ({"thresholds__alert": 0.95}, "alert_min"),
        ({"version": "1.0"}, "not semantic"),
        ({"task": "detection"}, "layout"),
        ({"output__labels": ["fluid"]}, "at least [background, finding]"),
    ],
)
def test_invalid_manifest_names_the_key(changes, needle):
    with pytest.raises(BadModel) as exc:
        parse_manifest(variant(**changes), "models/m/manifest.toml")
    assert "models/m/manifest.toml" in str(exc.value)
    assert needle in str(exc.value)


def test_threshold_is_clamped_to_manifest_bounds():
    m = parse_manifest(BASE, "x")
    assert m.clamp_threshold(0.1) == 0.3
    assert m.clamp_threshold(0.99) == 0.9
    assert m.clamp_threshold(0.6) == 0.6


def test_calibration_table_is_read():
    m = parse_manifest(variant(calibration={"method": "temperature", "temperature": 1.7}), "x")
    assert m.calibration.method == "temperature" and m.calibration.temperature == 1.7
    with pytest.raises(BadModel, match="needs keys a and b"):
        parse_manifest(variant(calibration={"method": "platt"}), "x")


def test_missing_and_broken_manifest_files(tmp_path: Path):
    with pytest.raises(BadModel, match="manifest.toml: model manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.toml").write_text("id = [unterminated")
    with pytest.raises(BadModel, match="not valid TOML"):
        load_manifest(tmp_path)


def test_find_model_by_folder_and_unknown_id(float_model_dir: Path, data_dir: Path):
    ref = find_model(str(float_model_dir))
    assert ref.manifest.id == "selfie-seg" and ref.origin == "path"
    with pytest.raises(BadModel, match="model 'no-such-model' not found"):
        find_model("no-such-model", data_dir)


def test_installed_model_takes_precedence_over_bundled(float_model_dir: Path, data_dir: Path, monkeypatch):
    bundled = float_model_dir.parent / "bundled"
    bundled.mkdir()
    (bundled / "selfie-seg").symlink_to(float_model_dir)
    monkeypatch.setenv("FIRMWARE_APP_MODELS", str(bundled))
    assert find_model("selfie-seg", data_dir).origin == "bundled"
    slot = data_dir / "models" / "selfie-seg"
    slot.mkdir(parents=True)
    (slot / "current").symlink_to(float_model_dir)
    assert find_model("selfie-seg", data_dir).origin == "installed"
    assert [m.manifest.id for m in list_models(data_dir)] == ["selfie-seg"]


def test_model_folder_without_tflite_is_named(float_model_dir: Path):
    (float_model_dir / "model.tflite").unlink()
    with pytest.raises(BadModel, match="model.tflite: model file not found"):
        find_model(str(float_model_dir))
