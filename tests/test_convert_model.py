"""tools/convert_model.py end to end on a tiny Keras model: int8 folder the device loads and validates.

Needs TensorFlow (the tools environment, ``pip install 'firmware-app[tools]'``); skipped where it is not
importable, as in the runtime-only CI.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tools environment (tensorflow) not installed")

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import keras

    tmp = tmp_path_factory.mktemp("convert")
    keras.utils.set_random_seed(1)
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax")(x)
    keras.Model(inp, out).save(tmp / "tiny.keras")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # gray frames of another size: the runtime's resize makes them 32x32
        img = cv2.GaussianBlur(rng.integers(0, 255, (48, 64), dtype=np.uint8), (0, 0), 2 + i % 3)
        cv2.imwrite(str(images / f"img_{i:02d}.png"), img)
    (images / "broken.png").write_bytes(b"not a png")
    out_dir = tmp / "tiny-cls"
    rc = _tool("convert_model").main(
        [
            str(tmp / "tiny.keras"),
            "--images", str(images),
            "--out", str(out_dir),
            "--id", "tiny-cls",
            "--task", "classification",
            "--labels", "normal,finding",
            "--activation", "none",
        ]
    )  # fmt: skip
    return rc, out_dir


def test_conversion_succeeds_and_writes_every_artefact(converted, capsys) -> None:
    rc, out = converted
    assert rc == 0
    for name in ("model.tflite", "model_float.tflite", "manifest.toml", "agreement.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "golden").glob("case_*.npz"))) == 3


def test_model_is_full_integer_int8_with_batch_1(converted) -> None:
    from ai_edge_litert.interpreter import Interpreter

    _, out = converted
    it = Interpreter(model_path=str(out / "model.tflite"))
    it.allocate_tensors()
    d_in, d_out = it.get_input_details()[0], it.get_output_details()[0]
    assert d_in["dtype"] == np.int8 and d_out["dtype"] == np.int8
    assert list(d_in["shape"]) == [1, 32, 32, 1]
    assert d_in["quantization"][0] > 0


def test_manifest_from_flags_loads_and_the_model_runs_on_the_device_path(converted) -> None:
    from firmware_app.models.store import find_model
    from firmware_app.validate import ModelRunner

    _, out = converted
    model = find_model(str(out))
    m = model.manifest
    assert (m.id, m.task, m.labels, m.width, m.height, m.color) == (
        "tiny-cls",
        "classification",
        ("normal", "finding"),
        32,
        32,
        "gray",
    )
    assert m.cleared_for_clinical_use is False and m.reference is not None
    runner = ModelRunner(model)
    r = runner.result(runner.raw(np.zeros((48, 64), np.uint8)), (64, 48), m.alert)
    assert set(r.probabilities) == {"normal", "finding"}
    runner.close()


def test_golden_vectors_reproduce_and_agreement_is_reported(converted) -> None:
    from ai_edge_litert.interpreter import Interpreter

    _, out = converted
    it = Interpreter(model_path=str(out / "model.tflite"))
    it.allocate_tensors()
    for path in sorted((out / "golden").glob("case_*.npz")):
        with np.load(path) as g:
            it.set_tensor(it.get_input_details()[0]["index"], g["input"])
            it.invoke()
            got = it.get_tensor(it.get_output_details()[0]["index"])
            assert np.abs(got.astype(int) - g["output_0"].astype(int)).max() <= 2
    rep = json.loads((out / "agreement.json").read_text())
    assert rep["what"] == "decisions and labels" and 0.0 <= rep["agreement"] <= 1.0
    assert rep["outputs"][0]["snr_db"] > 10  # int8 tracks the float model
    assert rep["ops_not_on_edgetpu"] == []
    assert "edgetpu" in rep


def test_bad_flags_and_missing_onnx_converter_give_one_line_errors(tmp_path, capsys) -> None:
    tool = _tool("convert_model")
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((8, 8), np.uint8))
    rc = tool.main([str(tmp_path / "nope.keras"), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                    "--id", "x", "--task", "segmentation", "--labels", "bg,fg", "--activation", "softmax"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "nope.keras: not found" in err
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    try:
        import onnx2tf  # noqa: F401

        pytest.skip("onnx2tf is installed: the ONNX path is taken")
    except ImportError:
        pass
    rc = tool.main([str(tmp_path / "m.onnx"), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                    "--id", "x", "--task", "segmentation", "--labels", "bg,fg", "--activation", "softmax"])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("convert_model: error:")]
    assert rc == 2 and len(errors) == 1 and "onnx2tf" in errors[0] and "m.onnx" in errors[0]
