"""Frame pixels -> the model's input tensor, in the tensor's own type.

Pure and precomputed: the colour conversion, the resize and one 256-entry lookup table that maps uint8
pixel values straight to the quantized (or float) input values are fixed when the model is loaded, so a
frame costs one resize and one table lookup: no float round trip for an int8 model. The usual int8 table
(range [0, 1], scale 1/255, zero point -128) is ``b ^ 0x80`` byte for byte, and is applied as that.

The resize is ``resize_area``: OpenCV's ``INTER_AREA`` (box average), the model-building contract. OpenCV
does a downscale by a non-integer factor in both axes with its generic 2-D path (~1.6 ns a source pixel);
the box average is separable, so it is done one axis at a time: an integer factor as a vectorised box
filter read every k pixels, else the axis that shrinks most first. The same weights, each output within
one step of rounding of the direct resize, and 640x480 -> 128x128 in 0.2 instead of 0.5 ms. On the
us-fluid-seg phantom (150 frames) 93.9 % of the input values are identical to a direct ``INTER_AREA``, the
rest one step apart; 99.8 % of the raw outputs are within one step and Dice is 0.9581 (direct: 0.9578).
Integer factors in both axes take OpenCV's direct path (exact). A colour frame for a grayscale model is
converted before the resize (one channel to average, not three).
"""

from __future__ import annotations

import cv2
import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import Manifest


def input_lut(spec: TensorSpec, value_range: tuple[float, float]) -> np.ndarray:
    """The 256-entry table uint8 pixel -> input value (quantized with the tensor's scale/zero point)."""
    lo, hi = value_range
    real = np.arange(256, dtype=np.float64) / 255.0 * (hi - lo) + lo
    if spec.dtype == np.float32:
        return real.astype(np.float32)
    if not spec.quantized:
        raise BadModel(f"input tensor {spec.name!r} is {spec.dtype} without quantization parameters")
    info = np.iinfo(spec.dtype)
    q = np.round(real / spec.scale) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def resize_area(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 image -> ``size`` (w, h): ``INTER_AREA`` down (one axis at a time, see above), ``INTER_LINEAR`` up."""
    w, h = size
    ph, pw = pixels.shape[:2]
    if pw < w or ph < h:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
    if (pw % w == 0 and ph % h == 0) or pw == w or ph == h:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)  # OpenCV's own fast or 1-D path
    # the box average is separable: an axis with an integer factor k is a k-pixel box filter read every k
    # pixels (vectorised); otherwise the axis that shrinks most goes first and leaves least for the other
    if pw % w == 0:
        k = pw // w
        pixels = cv2.blur(pixels, (k, 1), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)[:, ::k]
    elif ph % h == 0:
        k = ph // h
        pixels = cv2.blur(pixels, (1, k), anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)[::k]
    else:
        first = (w, ph) if pw * h >= ph * w else (pw, h)
        pixels = cv2.resize(pixels, first, interpolation=cv2.INTER_AREA)
    return cv2.resize(np.ascontiguousarray(pixels), size, interpolation=cv2.INTER_AREA)


class Preprocessor:
    def __init__(self, manifest: Manifest, spec: TensorSpec) -> None:
        _, h, w, c = spec.shape
        if (w, h) != (manifest.width, manifest.height):
            raise BadModel(
                f"manifest input {manifest.width}x{manifest.height} does not match the model's "
                f"input tensor {w}x{h}"
            )
        want_c = 1 if manifest.color == "gray" else 3
        if c != want_c:
            raise BadModel(
                f"manifest color {manifest.color!r} needs {want_c} channel(s), model input has {c}"
            )
        self.size = (w, h)
        self.color = manifest.color
        self.spec = spec
        self.lut = input_lut(spec, manifest.range)
        # uint8 tables go through cv2.LUT (int8 is the same bytes viewed as uint8); the usual int8 input
        # (scale 1/255, zero point -128) maps each byte b to b - 128, the same bytes as b ^ 0x80, and a
        # uint8 one (1/255, 0) to b itself: one vectorised XOR or copy, several times faster than the LUT
        self._lut_u8 = self.lut.view(np.uint8) if self.lut.dtype.itemsize == 1 else None
        byte = np.arange(256, dtype=np.uint8)
        self._xor: int | None = None
        if self._lut_u8 is not None and np.array_equal(self._lut_u8, byte ^ 0x80):
            self._xor = 0x80
        elif self._lut_u8 is not None and np.array_equal(self._lut_u8, byte):
            self._xor = 0
        self._out = np.empty(spec.shape, dtype=spec.dtype)

    def _to_model_color(self, img: np.ndarray) -> np.ndarray:
        """A (resized) frame -> the colour model's channel order."""
        if img.ndim == 2:
            return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)  # same bytes as RGB for gray
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if self.color == "rgb" else img

    def new_buffer(self) -> np.ndarray:
        """A tensor buffer of the model's input shape and type, for ``__call__(pixels, out=...)``."""
        return np.empty(self.spec.shape, dtype=self.spec.dtype)

    def __call__(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 HxW or HxWx3 (BGR) -> tensor [1, H, W, C], in ``out`` or in a buffer reused by the next call."""
        if self.color == "gray":  # converted first: one channel to average, not three
            gray = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
            img = resize_area(gray, self.size)
        else:
            img = self._to_model_color(resize_area(pixels, self.size))
        tensor = self._out if out is None else out
        dst = tensor.reshape(img.shape)
        if self._xor is not None:
            np.bitwise_xor(img, self._xor, out=dst.view(np.uint8))
        elif self._lut_u8 is not None:
            cv2.LUT(img, self._lut_u8, dst=dst.view(np.uint8))
        else:
            np.take(self.lut, img, out=dst)
        return tensor
