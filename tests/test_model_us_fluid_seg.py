"""The bundled us-fluid-seg model: its manifest, golden vectors, int8 types and accuracy on unseen phantoms.

The pre- and post-processing here is the runtime's contract, written out inline on purpose: the whole
frame resized with INTER_AREA to the model size, [0, 255] -> the manifest range, quantized with the input
tensor's parameters; mask = argmax of [background, fluid], resized to the frame with INTER_NEAREST.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from firmware_app.sources.phantom import UltrasoundPhantom

Interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter

MODEL_DIR = Path(__file__).resolve().parents[1] / "models_tflite" / "us-fluid-seg"
# Edge-TPU-mappable builtins the model may use (no TILE from UpSampling2D, no dynamic shapes)
EDGETPU_OPS = {
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "MAX_POOL_2D",
    "TRANSPOSE_CONV",
    "CONCATENATION",
    "SOFTMAX",
    "ADD",
}
TRAINING_SEEDS = range(0, 1000)  # tools/train_us_fluid_seg.py trains on 0..399 by default


@pytest.fixture(scope="module")
def manifest() -> dict:
    with open(MODEL_DIR / "manifest.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def interp():
    it = Interpreter(model_path=str(MODEL_DIR / "model.tflite"), num_threads=2)
    it.allocate_tensors()
    return it


def run(it, tensor: np.ndarray) -> np.ndarray:
    it.set_tensor(it.get_input_details()[0]["index"], tensor)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def to_input(frame: np.ndarray, detail: dict, lo: float, hi: float) -> np.ndarray:
    _, h, w, _ = detail["shape"]
    x = cv2.resize(frame, (int(w), int(h)), interpolation=cv2.INTER_AREA).astype(np.float32)
    x = lo + x * np.float32((hi - lo) / 255.0)
    scale, zp = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    if dtype != np.float32:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale + zp), info.min, info.max)
    return x.astype(dtype)[None, :, :, None]


def to_mask(raw: np.ndarray, frame_shape: tuple[int, int], alert: float) -> np.ndarray:
    out = raw[0]
    labels = (out[..., 0] > alert).astype(np.uint8) if out.shape[-1] == 1 else np.argmax(out, axis=-1)
    return cv2.resize(labels.astype(np.uint8), frame_shape[::-1], interpolation=cv2.INTER_NEAREST)


def test_manifest_parses_and_has_every_required_key(manifest) -> None:
    assert manifest["id"] == "us-fluid-seg"
    assert manifest["task"] == "segmentation"
    assert manifest["cleared_for_clinical_use"] is False
    assert "Not for diagnostic use" in manifest["intended_use"]
    for key in ("version", "intended_use"):
        assert isinstance(manifest[key], str) and manifest[key]
    inp, out, thr = manifest["input"], manifest["output"], manifest["thresholds"]
    assert set(inp) == {"width", "height", "color", "range"}
    assert 128 <= inp["width"] <= 256 and 128 <= inp["height"] <= 256
    assert inp["color"] == "gray" and inp["range"] == [0.0, 1.0]
    assert set(out) == {"labels", "activation"}
    assert out["labels"] == ["background", "fluid"]
    assert out["activation"] in ("softmax", "sigmoid", "none")
    assert set(thr) == {"alert", "alert_min", "alert_max"}
    assert 0 <= thr["alert_min"] <= thr["alert"] <= thr["alert_max"] <= 1
    assert set(manifest["golden"]) == {"atol"}


def test_manifest_is_accepted_by_the_runtime_parser() -> None:
    # the runtime owns the rules on unknown keys and optional tables ([calibration], [reference], ...)
    from firmware_app.models.manifest import load_manifest

    m = load_manifest(MODEL_DIR)
    assert (m.id, m.task, m.labels) == ("us-fluid-seg", "segmentation", ("background", "fluid"))
    assert m.cleared_for_clinical_use is False


def test_model_is_full_integer_int8_with_the_manifest_input_size(manifest, interp) -> None:
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    assert inp["dtype"] in (np.int8, np.uint8) and out["dtype"] in (np.int8, np.uint8)
    assert tuple(inp["shape"]) == (1, manifest["input"]["height"], manifest["input"]["width"], 1)
    assert tuple(out["shape"]) == (1, manifest["input"]["height"], manifest["input"]["width"], 2)
    assert inp["quantization"][0] > 0 and out["quantization"][0] > 0
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    bare = litert.Interpreter(  # without XNNPACK, which would replace the ops by DELEGATE nodes
        model_path=str(MODEL_DIR / "model.tflite"),
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    bare.allocate_tensors()
    ops = {d["op_name"] for d in bare._get_ops_details()}
    assert ops <= EDGETPU_OPS, f"ops the Edge TPU would not map: {ops - EDGETPU_OPS}"
    assert (MODEL_DIR / "model.tflite").stat().st_size <= 500 * 1024


def test_golden_vectors_reproduce_within_atol(manifest, interp) -> None:
    atol = manifest["golden"]["atol"]
    cases = sorted((MODEL_DIR / "golden").glob("case_*.npz"))
    assert len(cases) >= 3
    inp = interp.get_input_details()[0]
    for path in cases:
        with np.load(path) as case:
            x, want = case["input"], case["output_0"]
        assert x.dtype == inp["dtype"] and tuple(x.shape) == tuple(inp["shape"])
        got = run(interp, x)
        assert got.dtype == want.dtype and got.shape == want.shape
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32)).max()
        assert diff <= atol, f"{path.name}: max difference {diff} > atol {atol}"


def test_float_twin_agrees_with_the_int8_model(manifest, interp) -> None:
    flt = Interpreter(model_path=str(MODEL_DIR / "model_float.tflite"), num_threads=2)
    flt.allocate_tensors()
    assert flt.get_input_details()[0]["dtype"] == np.float32
    lo, hi = manifest["input"]["range"]
    img, _ = UltrasoundPhantom(seed=3_000_001).render(20)
    m8 = to_mask(run(interp, to_input(img, interp.get_input_details()[0], lo, hi)), img.shape, 0.5)
    mf = to_mask(run(flt, to_input(img, flt.get_input_details()[0], lo, hi)), img.shape, 0.5)
    assert np.mean(m8 == mf) > 0.99


def _unseen_seed_with_fluid(times: list[int]) -> UltrasoundPhantom:
    """First seed from 3_000_000 (never trained on) whose frames mostly show fluid."""
    for seed in range(3_000_000, 3_000_050):
        assert seed not in TRAINING_SEEDS
        ph = UltrasoundPhantom(seed=seed)
        if ph.n_fluid and sum(ph.render(t)[1].any() for t in times[::3]) == len(times[::3]):
            return ph
    raise AssertionError("no unseen seed with fluid found")


def test_dice_on_an_unseen_seed_is_at_least_0_8(manifest, interp) -> None:
    times = [15 * k for k in range(10)]
    ph = _unseen_seed_with_fluid(times)
    lo, hi = manifest["input"]["range"]
    detail = interp.get_input_details()[0]
    inter = total = 0
    for t in times:
        img, truth = ph.render(t)
        pred = to_mask(run(interp, to_input(img, detail, lo, hi)), img.shape, manifest["thresholds"]["alert"])
        inter += int(np.logical_and(pred, truth).sum())
        total += int(pred.sum()) + int(truth.sum())
    assert total > 0
    dice = 2.0 * inter / total
    assert dice >= 0.8, f"Dice {dice:.3f} on seed {ph.seed}"
