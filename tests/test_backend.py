from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_app.backends import make_backend
from firmware_app.backends.base import TensorSpec
from firmware_app.backends.edgetpu import EdgeTpu, MockEdgeTpu
from firmware_app.backends.litert import LiteRTBackend
from firmware_app.errors import BackendUnavailable, BadModel
from firmware_app.models.store import find_model
from firmware_app.preprocess import Preprocessor, input_lut, resize_area


def test_float_model_reads_float_tensors(float_model_dir: Path):
    b = LiteRTBackend(float_model_dir / "model.tflite", threads=2)
    assert b.input.dtype == np.float32 and not b.input.quantized
    assert b.input.shape == (1, 256, 256, 3)
    out = b.invoke(np.zeros(b.input.shape, np.float32))
    assert out[0].shape == (1, 256, 256, 1) and out[0].dtype == np.float32


def test_not_a_model_is_a_clear_bad_model(tmp_path: Path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(BadModel, match="model.tflite: not a loadable TFLite model"):
        LiteRTBackend(bad)


def test_real_edgetpu_absent_here_gives_actionable_message():
    with pytest.raises(BackendUnavailable) as exc:
        EdgeTpu("usb").delegates()
    assert "libedgetpu.so.1" in str(exc.value) and "plugged in" in str(exc.value)


def test_chain_falls_back_to_cpu_and_says_so(float_model_dir: Path):
    (float_model_dir / "model_edgetpu.tflite").write_bytes((float_model_dir / "model.tflite").read_bytes())
    model = find_model(str(float_model_dir))
    choice = make_backend(model, ["edgetpu", "cpu"], threads=1, accelerator=MockEdgeTpu(present=False))
    assert choice.backend.name == "litert-cpu"
    assert choice.fell_back and "Edge TPU not found" in choice.notices[0]
    assert choice.notices[0].startswith("CPU FALLBACK: edgetpu unavailable")


def test_chain_uses_edgetpu_variant_when_accelerator_present(float_model_dir: Path):
    (float_model_dir / "model_edgetpu.tflite").write_bytes((float_model_dir / "model.tflite").read_bytes())
    model = find_model(str(float_model_dir))
    acc = MockEdgeTpu(present=True)
    choice = make_backend(model, ["edgetpu", "cpu"], threads=1, accelerator=acc)
    assert choice.backend.name == "edgetpu" and not choice.notices and acc.loads == 1
    assert choice.backend.path.name == "model_edgetpu.tflite"


def test_model_without_edgetpu_variant_falls_back(float_model_dir: Path):
    model = find_model(str(float_model_dir))
    choice = make_backend(model, ["edgetpu", "cpu"], threads=1, accelerator=MockEdgeTpu(present=True))
    assert choice.backend.name == "litert-cpu"
    assert "has no model_edgetpu.tflite" in choice.notices[0]


def test_no_backend_at_all_is_reported(float_model_dir: Path):
    model = find_model(str(float_model_dir))
    with pytest.raises(BackendUnavailable, match="no backend could run model selfie-seg"):
        make_backend(model, ["edgetpu"], threads=1, accelerator=MockEdgeTpu(present=False))


def spec(dtype, scale=0.0, zp=0, shape=(1, 4, 4, 1)):
    return TensorSpec(0, "in", shape, np.dtype(dtype), scale, zp)


def test_input_lut_quantizes_with_the_tensors_parameters():
    # int8 input with range [0, 1]: scale 1/255, zero point -128 maps 0 -> -128 and 255 -> 127
    lut = input_lut(spec(np.int8, 1 / 255, -128), (0.0, 1.0))
    assert lut.dtype == np.int8 and lut[0] == -128 and lut[255] == 127 and lut[128] == 0
    lut = input_lut(spec(np.uint8, 2 / 255, 128), (-1.0, 1.0))
    assert lut[0] == 0 and lut[255] == 255
    f = input_lut(spec(np.float32), (-1.0, 1.0))
    assert f[0] == -1.0 and f[255] == 1.0
    with pytest.raises(BadModel, match="without quantization"):
        input_lut(spec(np.int8), (0.0, 1.0))


def test_preprocess_resizes_converts_and_quantizes(float_model_dir: Path):
    model = find_model(str(float_model_dir))
    s = TensorSpec(0, "in", (1, 4, 4, 3), np.dtype(np.int8), 1 / 255, -128)
    m = model.manifest.__class__(**{**model.manifest.__dict__, "width": 4, "height": 4})
    pre = Preprocessor(m, s)
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in BGR
    t = pre(bgr)
    assert t.shape == (1, 4, 4, 3) and t.dtype == np.int8
    assert (t[0, ..., 2] == 127).all() and (t[0, ..., 0] == -128).all()  # model wants RGB: blue is last
    gray = np.full((8, 8), 255, np.uint8)
    assert (pre(gray) == 127).all()


@pytest.mark.parametrize(
    "src, dst",
    [
        ((640, 480), (128, 128)),
        ((640, 480), (160, 120)),
        ((642, 481), (128, 128)),
        ((1920, 1080), (300, 200)),
        ((1280, 720), (320, 256)),
        ((1280, 960), (300, 240)),
    ],
)
def test_resize_area_is_inter_area_to_within_rounding(src, dst):
    """The fast path (exact 2x2 halvings, then area) keeps the model-building contract, cv2 INTER_AREA."""
    rng = np.random.default_rng(3)
    w, h = src
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (0, 0), 2)
    img[h // 3 : h // 2, w // 4 : w // 2] = 255  # sharp edges: where rounding in a halving shows most
    ref = cv2.resize(img, dst, interpolation=cv2.INTER_AREA).astype(int)
    out = resize_area(img, dst)
    assert out.shape == ref.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref)
    if w % dst[0] == 0 and h % dst[1] == 0:
        assert diff.max() == 0  # integer factors: OpenCV's own path, exact
    assert diff.max() <= 1 and diff.mean() < 0.5  # one rounding step at most


def test_resize_area_upscales_linearly():
    img = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    out = resize_area(img, (32, 32))
    assert out.shape == (32, 32)
    np.testing.assert_array_equal(out, cv2.resize(img, (32, 32), interpolation=cv2.INTER_LINEAR))


def test_preprocess_converts_colour_for_a_gray_model_before_resizing(float_model_dir: Path):
    model = find_model(str(float_model_dir))
    s = TensorSpec(0, "in", (1, 16, 16, 1), np.dtype(np.uint8), 1 / 255, 0)
    m = model.manifest.__class__(**{**model.manifest.__dict__, "width": 16, "height": 16, "color": "gray"})
    pre = Preprocessor(m, s)
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    want = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(pre(bgr)[0, ..., 0], want)


@pytest.mark.parametrize(
    "dtype, scale, zp, fast",
    [(np.int8, 1 / 255, -128, True), (np.uint8, 1 / 255, 0, True), (np.int8, 0.0039, -128, False)],
)
def test_preprocess_applies_a_byte_for_byte_table_as_xor_or_copy(
    float_model_dir: Path, dtype, scale, zp, fast
):
    """The usual int8 (b - 128 = b ^ 0x80) and uint8 (b) tables are applied as that: the table's bytes."""
    model = find_model(str(float_model_dir))
    s = TensorSpec(0, "in", (1, 16, 16, 3), np.dtype(dtype), scale, zp)
    m = model.manifest.__class__(**{**model.manifest.__dict__, "width": 16, "height": 16})
    pre = Preprocessor(m, s)
    assert (pre._xor is not None) == fast
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for pixels in (img, np.dstack([img, img[::-1], img.T])):
        want = pre.lut[
            cv2.cvtColor(
                pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR), cv2.COLOR_BGR2RGB
            )
        ]
        for out in (None, pre.new_buffer()):
            t = pre(pixels, out=out)
            assert t.dtype == dtype and np.array_equal(t[0], want)


def test_preprocess_rejects_manifest_that_disagrees_with_tensor(float_model_dir: Path):
    model = find_model(str(float_model_dir))
    with pytest.raises(BadModel, match="does not match the model's input tensor"):
        Preprocessor(model.manifest, TensorSpec(0, "in", (1, 128, 128, 3), np.dtype(np.float32), 0.0, 0))
