"""The TensorRT backend: engine cache keyed by model + TensorRT version + GPU, verification against the
float twin, fallback. The GPU sits behind a runtime interface; FakeTrt runs the float twin with LiteRT so the
cache and verification logic run here. The real engine path runs only where TensorRT and a GPU are."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from firmware_app.backends import make_backend
from firmware_app.backends.litert import LiteRTBackend
from firmware_app.backends.tensorrt import CudaTrtRuntime, TensorRTBackend, engine_key
from firmware_app.errors import BackendUnavailable
from firmware_app.models.store import find_model


class FakeEngine:
    def __init__(self, twin: Path, skew: float) -> None:
        self._b = LiteRTBackend(twin, threads=1)
        self.inputs, self.outputs, self.skew = [self._b.input], self._b.outputs, skew

    def infer(self, tensor):
        return [o + np.float32(self.skew) for o in self._b.invoke(tensor)]

    def close(self):
        self._b.close()


class FakeTrt:
    version, gpu_name = "10.3.0", "Orin (nvgpu)"

    def __init__(self, twin: Path, skew: float = 0.0) -> None:
        self.twin, self.skew, self.builds, self.loads = twin, skew, 0, 0

    def build(self, onnx: bytes) -> bytes:
        self.builds += 1
        return b"PLAN" + onnx[:16]

    def load(self, plan: bytes):
        self.loads += 1
        return FakeEngine(self.twin, self.skew)


@pytest.fixture
def trt_model(tmp_path):
    from update_kit import make_model

    folder = make_model(tmp_path / "m", "1.0.0")
    shutil.copy(folder / "model.tflite", folder / "model_float.tflite")  # the float twin
    (folder / "model.onnx").write_bytes(b"onnx-model-bytes" * 8)
    return find_model(str(folder))


def test_engine_is_built_once_then_loaded_from_cache(trt_model, tmp_path):
    rt = FakeTrt(trt_model.folder / "model_float.tflite")
    b = TensorRTBackend(trt_model, tmp_path / "engines", runtime=rt)
    assert b.built and rt.builds == 1 and b.plan_path.is_file()
    out = b.invoke(np.zeros(b.input.shape, np.float32))
    assert out[0].shape == (1, 256, 256, 1)
    b2 = TensorRTBackend(trt_model, tmp_path / "engines", runtime=rt)
    assert not b2.built and rt.builds == 1 and rt.loads == 2


def test_cache_key_changes_with_model_trt_version_and_gpu():
    k = engine_key(b"a", "10.3.0", "Orin")
    assert k != engine_key(b"b", "10.3.0", "Orin")
    assert k != engine_key(b"a", "10.4.0", "Orin")
    assert k != engine_key(b"a", "10.3.0", "Xavier NX")
    assert "/" not in engine_key(b"a", "10", "NVIDIA / weird name")


def test_engine_that_disagrees_with_the_float_model_is_rejected_and_deleted(trt_model, tmp_path):
    rt = FakeTrt(trt_model.folder / "model_float.tflite", skew=0.2)
    with pytest.raises(BackendUnavailable, match="differs from the float model"):
        TensorRTBackend(trt_model, tmp_path / "engines", runtime=rt)
    assert list((tmp_path / "engines").glob("*.plan")) == []


def test_model_without_onnx_or_twin_cannot_use_tensorrt(trt_model, tmp_path):
    (trt_model.folder / "model_float.tflite").unlink()
    with pytest.raises(BackendUnavailable, match="no model_float.tflite"):
        TensorRTBackend(trt_model, tmp_path / "e", runtime=FakeTrt(trt_model.tflite))
    (trt_model.folder / "model.onnx").unlink()
    with pytest.raises(BackendUnavailable, match="no model.onnx"):
        TensorRTBackend(trt_model, tmp_path / "e", runtime=FakeTrt(trt_model.tflite))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_chain_falls_back_to_cpu_with_the_reason(trt_model, tmp_path):
    with pytest.raises(BackendUnavailable, match="TensorRT is not available"):
        CudaTrtRuntime()
    choice = make_backend(trt_model, ["tensorrt", "cpu"], threads=1, engine_cache=str(tmp_path))
    assert choice.backend.name == "litert-cpu"
    assert choice.notices[0].startswith("CPU FALLBACK: tensorrt unavailable: TensorRT is not available")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="TensorRT and a GPU are not here (Jetson)"
)
def test_real_tensorrt_engine_matches_the_float_model(tmp_path):
    model = find_model("us-fluid-seg")
    if model.variant("model.onnx") is None:
        pytest.skip("the bundled model has no model.onnx")
    b = TensorRTBackend(model, tmp_path / "engines")
    assert b.name == "tensorrt" and b.plan_path.is_file()
