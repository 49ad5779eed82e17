"""Every bundled model (models_tflite/*): loads, passes its golden vectors, is a small full-int8 Edge-TPU-
mappable model with a valid manifest and model card, and runs in the real pipeline with its overlay."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from firmware_app.backends import BackendChoice
from firmware_app.backends.litert import LiteRTBackend
from firmware_app.display.screen import Screen
from firmware_app.display.sinks import open_display
from firmware_app.models.store import bundled_models_dir, find_model
from firmware_app.pipeline import Pipeline, PipelineOptions
from firmware_app.sources import open_source

Interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter
OpResolverType = pytest.importorskip("ai_edge_litert.interpreter").OpResolverType

MODELS = sorted(p.name for p in bundled_models_dir().iterdir() if (p / "manifest.toml").is_file())
# TFLite builtins the Edge TPU compiler maps (coral.ai/docs/edgetpu/models-intro, "Supported operations")
EDGETPU_OPS = {
    "ABS", "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE",
    "EXPAND_DIMS", "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "MAXIMUM", "MAX_POOL_2D",
    "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6",
    "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX",
    "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH",
    "TRANSPOSE", "TRANSPOSE_CONV",
}  # fmt: skip
SOURCES = {
    "segmentation": "synthetic:ultrasound",
    "classification": "synthetic:lung",
    "detection": "synthetic:xray",
}


def test_the_three_reference_models_are_bundled() -> None:
    assert {"us-fluid-seg", "us-bline-cls", "xr-nodule-det"} <= set(MODELS)


@pytest.mark.parametrize("model_id", MODELS)
def test_manifest_is_valid_and_not_cleared(model_id) -> None:
    ref = find_model(model_id)
    m = ref.manifest
    assert m.id == model_id and ref.origin == "bundled"
    assert m.cleared_for_clinical_use is False
    assert "not for diagnostic use" in m.intended_use.lower()
    assert m.calibration.method in ("temperature", "platt")
    assert m.reference is not None
    card = (ref.folder / "README.md").read_text()
    assert "Not for diagnostic use" in card and "95 % CI" in card and "ECE" in card


@pytest.mark.parametrize("model_id", MODELS)
def test_files_sizes_and_int8_types(model_id) -> None:
    folder = find_model(model_id).folder
    for name in ("model.tflite", "model_float.tflite", "model.onnx"):
        assert (folder / name).is_file(), name
    assert (folder / "model.tflite").stat().st_size < 1024 * 1024
    it = Interpreter(model_path=str(folder / "model.tflite"))
    for d in it.get_input_details() + it.get_output_details():
        assert d["dtype"] in (np.int8, np.uint8), d["name"]
        assert d["quantization"][0] > 0
    assert [int(s) for s in it.get_input_details()[0]["shape"]][0] == 1  # batch 1
    flt = Interpreter(model_path=str(folder / "model_float.tflite"))
    assert flt.get_input_details()[0]["dtype"] == np.float32


@pytest.mark.parametrize("model_id", MODELS)
def test_only_edgetpu_mappable_ops(model_id) -> None:
    folder = find_model(model_id).folder
    it = Interpreter(
        model_path=str(folder / "model.tflite"),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    ops = {d["op_name"] for d in it._get_ops_details()}
    assert ops and ops <= EDGETPU_OPS, f"not mappable to the Edge TPU: {ops - EDGETPU_OPS}"


@pytest.mark.parametrize("model_id", MODELS)
def test_golden_vectors_pass_with_litert(model_id) -> None:
    ref = find_model(model_id)
    backend = LiteRTBackend(ref.tflite, threads=1)
    cases = sorted((ref.folder / "golden").glob("case_*.npz"))
    assert len(cases) >= 3
    atol = ref.manifest.golden_atol
    for path in cases:
        with np.load(path) as g:
            outs = backend.invoke(g["input"])
            assert len(outs) == len([k for k in g.files if k.startswith("output_")])
            for i, got in enumerate(outs):
                want = g[f"output_{i}"]
                assert got.shape == want.shape and got.dtype == want.dtype
                diff = int(np.abs(got.astype(np.int32) - want.astype(np.int32)).max())
                assert diff <= atol, f"{path.name} output {i}: {diff} > atol {atol}"


class _Recording(Screen):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.states = []

    def render(self, state):
        self.states.append(state)
        return super().render(state)


def _overlay(result) -> bool:
    if result.task == "segmentation":
        return result.mask is not None and bool(result.mask.any())
    if result.task == "classification":
        return result.heatmap is not None and result.alert
    return bool(result.boxes)


SEEDS = {"segmentation": 2_000_014, "classification": 2_000_001, "detection": 2_000_016}


@pytest.mark.parametrize("model_id", MODELS)
def test_runs_in_the_pipeline_on_its_synthetic_source_with_its_overlay(model_id, tmp_path) -> None:
    ref = find_model(model_id)
    task = ref.manifest.task
    frames = 40
    uri = f"{SOURCES[task]}?seed={SEEDS[task]}&fps=0&frames={frames}"
    source = open_source(uri)
    screen = _Recording(800, 480)
    pipe = Pipeline(
        source,
        ref,
        BackendChoice(LiteRTBackend(ref.tflite, threads=2)),
        screen,
        [open_display(f"png:{tmp_path}", size=(800, 480))],
        PipelineOptions(max_frames=frames),
    )
    stats = pipe.run()
    assert stats["errors"] == 0 and stats["frames_inferred"] == frames and stats["mismatched_overlays"] == 0
    assert (tmp_path / "last_frame.png").is_file()
    shown = [s for s in screen.states if s.result is not None and _overlay(s.result)]
    assert shown, f"no frame of {uri} was shown with a {task} overlay"
    state = shown[-1]
    with_ai = screen.render(state).copy()  # the screen reuses its canvas
    without = screen.render(dataclasses.replace(state, result=None))
    assert np.mean(np.any(with_ai != without, axis=-1)) > 0.002  # the overlay is drawn on the image
    assert not ref.manifest.cleared_for_clinical_use and state.not_for_diagnostic


def test_every_model_folder_is_small() -> None:
    for model_id in MODELS:
        folder = bundled_models_dir() / model_id
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert total < 3 * 1024 * 1024, f"{model_id}: {total / 1024:.0f} kB"


def test_model_cards_name_the_training_script() -> None:
    tools = Path(__file__).resolve().parents[1] / "tools"
    for model_id in ("us-bline-cls", "xr-nodule-det"):
        script = tools / f"train_{model_id.replace('-', '_')}.py"
        assert script.is_file(), script
