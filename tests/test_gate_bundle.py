"""The gate file travels in the signed payload of a bundle: a changed gate.npz is refused."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from update_kit import make_kit, tar_members

MODEL = Path(__file__).resolve().parents[1] / "models_tflite" / "us-fluid-seg"


def model_with_gate(dest: Path) -> Path:
    shutil.copytree(MODEL, dest, ignore=shutil.ignore_patterns("model.onnx", "model_float.tflite"))
    assert (dest / "gate.npz").is_file()
    return dest


def test_gate_file_is_signed_and_a_tampered_one_is_rejected(tmp_path, monkeypatch):
    kit = make_kit(tmp_path, monkeypatch)
    good = kit.bundle("1.0.0", 1, model_dir=model_with_gate(tmp_path / "src"), name="good.fwb")
    signed = json.loads(tar_members(good)[0][1])
    entry = [f for f in signed["files"] if f["path"] == "gate.npz"]
    assert entry and entry[0]["size"] == (MODEL / "gate.npz").stat().st_size

    bad = tmp_path / "stick" / "bad.fwb"
    shutil.copy(good, bad)
    with tarfile.open(bad, "r:") as tar:
        offset = tar.getmember("payload/gate.npz").offset_data
    data = bytearray(bad.read_bytes())
    data[offset + 200] ^= 0x01
    bad.write_bytes(bytes(data))
    outcome = kit.install(bad)
    assert outcome.status == "rejected" and "gate.npz" in outcome.message and "SHA-256" in outcome.message
    assert not (kit.data / "models" / "us-fluid-seg").exists() or not any(
        (kit.data / "models" / "us-fluid-seg").glob("*/gate.npz")
    )

    assert kit.install(good).status == "installed"  # the same bundle untouched: golden vectors and gate pass
