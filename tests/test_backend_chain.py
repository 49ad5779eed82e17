"""The backend registry and chain: every backend declared once, the board's chain used everywhere (initial
open, a model switched at run time, self-tests of bundles), per-backend board keys."""

from __future__ import annotations

import json
import shutil

import pytest
from test_tensorrt import FakeTrt
from update_kit import make_kit, make_model

from firmware_app import plugins
from firmware_app.backends import BackendChain, backend_plugins
from firmware_app.backends.edgetpu import MockEdgeTpu
from firmware_app.config import load_board, parse_board
from firmware_app.errors import BadConfig
from firmware_app.models.store import find_model
from firmware_app.pipeline import build_pipeline
from firmware_app.update.bundle import compatible_backends


def test_registry_finds_each_backend_once_with_its_declaration():
    found = backend_plugins()
    assert {"cpu", "edgetpu", "tensorrt"} <= set(found)
    assert plugins.canonical("backend", "litert") == "cpu"
    assert found["edgetpu"].accelerator and not found["cpu"].accelerator
    assert "model_edgetpu.tflite" in found["edgetpu"].files and "model.onnx" in found["tensorrt"].files
    with pytest.raises(KeyError, match="unknown backend 'npu'"):
        plugins.get("backend", "npu")


def test_board_backend_tables_are_validated_by_their_plugin():
    base = {"name": "b", "backend": {"order": ["edgetpu", "cpu"], "edgetpu": {"device": "pci:0"}}}
    board = parse_board(base, "b.toml")
    assert board.backend_configs["edgetpu"].device == "pci:0" and board.backend["edgetpu_device"] == "pci:0"
    legacy = parse_board({"name": "b", "backend": {"order": ["edgetpu"], "edgetpu_device": "usb"}}, "b.toml")
    assert legacy.backend_configs["edgetpu"].device == "usb"
    with pytest.raises(BadConfig, match=r"b.toml: unknown key \[backend.edgetpu\] speed; allowed: device"):
        parse_board({"backend": {"edgetpu": {"speed": 2}}}, "b.toml")
    with pytest.raises(BadConfig, match=r"\[backend.edgetpu\] device 'firewire' must be usb"):
        parse_board({"backend": {"edgetpu": {"device": "firewire"}}}, "b.toml")
    with pytest.raises(BadConfig, match="disagree"):
        parse_board({"backend": {"edgetpu_device": "usb", "edgetpu": {"device": "pci:0"}}}, "b.toml")
    with pytest.raises(BadConfig, match=r"order: unknown backend 'npu'; use edgetpu, cpu, .*tensorrt, auto"):
        parse_board({"backend": {"order": ["npu"]}}, "b.toml")
    assert parse_board({"backend": {"order": ["litert"]}}, "b.toml").backend["order"] == ["cpu"]


@pytest.mark.parametrize("name", ["rpi4-cpu", "rpi5-coral-usb", "jetson-orin-nano", "x86-dev"])
def test_shipped_boards_stay_valid(name):
    board = load_board(name)
    assert BackendChain.from_board(board).order == tuple(board.backend["order"])


def test_model_switched_at_run_time_keeps_the_edgetpu_device(float_model_dir, tmp_path):
    """rpi5-coral-usb: the run-time switch opens the Edge TPU with the board's device, like the first open."""
    (float_model_dir / "model_edgetpu.tflite").write_bytes((float_model_dir / "model.tflite").read_bytes())
    other = tmp_path / "other"
    shutil.copytree(float_model_dir, other)
    (other / "manifest.toml").write_text(
        (other / "manifest.toml").read_text().replace('id = "selfie-seg"', 'id = "selfie-two"')
    )
    acc = MockEdgeTpu(present=True)
    board = load_board("rpi5-coral-usb")
    p = build_pipeline(
        board, find_model(str(float_model_dir)), "synthetic:ultrasound?fps=0", ["null"], accelerator=acc
    )
    assert p.choice.backend.name == "edgetpu" and acc.devices == ["usb"]
    p.switch_model(find_model(str(other)))
    assert acc.devices == ["usb", "usb"]
    assert p.inference._pending[1].backend.name == "edgetpu"
    p.close()


def test_mid_run_fallback_takes_the_next_backend_of_the_chain(float_model_dir):
    (float_model_dir / "model_edgetpu.tflite").write_bytes((float_model_dir / "model.tflite").read_bytes())
    model = find_model(str(float_model_dir))
    chain = BackendChain(("edgetpu", "cpu"), threads=1, devices={"edgetpu": MockEdgeTpu()})
    first = chain.open(model)
    choice = chain.fall_back(model, first.backend, RuntimeError("USB transfer error"))
    assert choice.backend.name == "litert-cpu"
    assert choice.notices == ["CPU FALLBACK: edgetpu failed mid-run (USB transfer error)"]


def jetson_model(root):
    folder = make_model(root / "jm", "1.0.0")
    shutil.copy(folder / "model.tflite", folder / "model_float.tflite")  # the float twin
    (folder / "model.onnx").write_bytes(b"onnx-model-bytes" * 8)
    return folder


def test_jetson_bundle_declares_tensorrt_and_self_tests_on_it(tmp_path, monkeypatch):
    kit = make_kit(tmp_path, monkeypatch)
    kit.board = load_board("jetson-orin-nano")
    folder = jetson_model(tmp_path)
    assert {"cpu", "tensorrt"} <= set(compatible_backends(folder))
    bundle = kit.bundle(boards=("jetson-orin-nano",), backends=("tensorrt", "cpu"), model_dir=folder)
    rt = FakeTrt(folder / "model_float.tflite")
    chain = BackendChain.from_board(
        kit.board, devices={"tensorrt": rt}, engine_cache=str(kit.data / "engines"), data_dir=str(kit.data)
    )
    outcome = kit.install(bundle, chain=chain)
    assert outcome.status == "installed", outcome.message
    assert rt.builds == 1 and rt.loads == 1  # the engine was built and verified during the self-test
    lines = (kit.data / "audit" / "000001.jsonl").read_text().splitlines()
    selftest = next(json.loads(ln) for ln in lines if json.loads(ln)["event"] == "update_selftest")
    assert selftest["backend"] == "tensorrt" and selftest["ok"]


def test_bundle_declaring_tensorrt_must_carry_the_onnx_model(tmp_path, monkeypatch):
    kit = make_kit(tmp_path, monkeypatch)
    folder = make_model(tmp_path / "no-onnx", "1.0.0")
    from firmware_app.errors import BundleRejected

    with pytest.raises(BundleRejected, match="the payload has no model.onnx"):
        kit.bundle(boards=("jetson-orin-nano",), backends=("tensorrt",), model_dir=folder)
