"""The ONNX Runtime backend: the bundled models' model.onnx (the float twin) reproduce their golden vectors
at the stated tolerance, a skewed output is caught, a missing runtime falls back to the CPU, announced."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from firmware_app.backends import BackendChain, backend_plugins
from firmware_app.backends.base import FLOAT_ONNX, Backend
from firmware_app.backends.golden import check_golden
from firmware_app.config import load_board, parse_board
from firmware_app.errors import BackendUnavailable, BadConfig, FirmwareAppError
from firmware_app.models.store import find_model
from firmware_app.pipeline import build_pipeline

BUNDLED = ["us-bline-cls", "us-fluid-seg", "xr-nodule-det"]
needs_ort = pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxruntime") is None, reason="onnxruntime not installed"
)


def test_plugin_declares_its_files_and_tolerance():
    plugin = backend_plugins()["onnxruntime"]
    assert "model.onnx" in plugin.files and not plugin.accelerator
    assert plugin.tolerance == FLOAT_ONNX and (FLOAT_ONNX.p99_steps, FLOAT_ONNX.mean_steps) == (16, 2)


@needs_ort
@pytest.mark.parametrize("model_id", BUNDLED)
def test_bundled_model_passes_its_golden_vectors_on_onnxruntime(model_id):
    model = find_model(model_id)
    backend = BackendChain(("onnxruntime",), threads=2).open(model).backend
    assert (
        backend.name == "onnxruntime-cpu"
        and backend.input.dtype == np.float32
        and not backend.input.quantized
    )
    report = check_golden(model, backend, FLOAT_ONNX)
    assert report.cases >= 1 and report.p99_diff <= 16 and report.mean_diff <= 2
    assert report.p99_diff > 0  # a float model really is compared to int8 goldens, not to itself
    backend.close()


class Skewed(Backend):
    def __init__(self, inner: Backend, skew: float) -> None:
        self.inner, self.skew, self.name = inner, skew, "skewed"
        self.input, self.outputs = inner.input, inner.outputs

    def invoke(self, tensor):
        return [o + np.float32(self.skew) for o in self.inner.invoke(tensor)]


@needs_ort
def test_a_backend_off_by_a_few_steps_everywhere_fails_the_tolerance():
    model = find_model("us-fluid-seg")
    inner = BackendChain(("onnxruntime",)).open(model).backend
    with pytest.raises(FirmwareAppError, match=r"case_000.npz: output_0 differs by p99 .* steps"):
        check_golden(model, Skewed(inner, 3 * 0.00390625), FLOAT_ONNX)  # 3 steps of the int8 output


@needs_ort
def test_pipeline_runs_on_onnxruntime_from_a_board(tmp_path):
    board = parse_board({"name": "ort", "backend": {"order": ["onnxruntime", "cpu"]}}, "ort.toml")
    p = build_pipeline(
        board, find_model("us-fluid-seg"), "synthetic:ultrasound?fps=0", ["null"], max_frames=3
    )
    stats = p.run()
    assert stats["backend"] == "onnxruntime-cpu" and stats["frames_inferred"] == 3 and stats["errors"] == 0


def test_missing_onnxruntime_is_one_line_and_the_cpu_takes_over(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    choice = BackendChain(("onnxruntime", "cpu"), threads=1).open(find_model("us-fluid-seg"))
    assert choice.backend.name == "litert-cpu"
    assert choice.notices == [
        "CPU FALLBACK: onnxruntime unavailable: ONNX Runtime is not installed (pip install 'firmware-app[onnx]')"
    ]


@needs_ort
def test_providers_are_board_keys_and_an_absent_one_is_unavailable():
    board = parse_board(
        {"backend": {"order": ["onnxruntime"], "onnxruntime": {"providers": ["CUDAExecutionProvider"]}}},
        "b.toml",
    )
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is here")
    with pytest.raises(BackendUnavailable, match="has none of CUDAExecutionProvider here"):
        BackendChain.from_board(board).open_one("onnxruntime", find_model("us-fluid-seg"))
    with pytest.raises(BadConfig, match=r"\[backend.onnxruntime\] providers \['GPU'\] must name some of"):
        parse_board({"backend": {"onnxruntime": {"providers": ["GPU"]}}}, "b.toml")
    assert load_board("x86-dev").backend_configs["onnxruntime"].providers == ("CPUExecutionProvider",)
