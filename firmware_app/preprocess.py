"""Frame pixels -> the model's input tensor, in the tensor's own type.

Pure and precomputed: the colour conversion, the resize and one 256-entry lookup table that maps uint8
pixel values straight to the quantized (or float) input values are fixed when the model is loaded, so a
frame costs one resize and one table lookup: no float round trip for an int8 model.
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
        # uint8 tables go through cv2.LUT (int8 is the same bytes viewed as uint8)
        self._lut_u8 = self.lut.view(np.uint8) if self.lut.dtype.itemsize == 1 else None
        self._out = np.empty(spec.shape, dtype=spec.dtype)

    def _to_model_color(self, img: np.ndarray) -> np.ndarray:
        gray_in = img.ndim == 2
        if self.color == "gray":
            return img if gray_in else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        if gray_in:
            return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)  # same bytes as RGB for gray
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if self.color == "rgb" else img

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HxW or HxWx3 (BGR) -> tensor [1, H, W, C]. Returns a buffer reused by the next call."""
        h, w = pixels.shape[:2]
        down = w >= self.size[0] and h >= self.size[1]
        img = cv2.resize(pixels, self.size, interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)
        img = self._to_model_color(img)
        out = self._out.reshape(img.shape)
        if self._lut_u8 is not None:
            cv2.LUT(img, self._lut_u8, dst=out.view(np.uint8))
        else:
            np.take(self.lut, img, out=out)
        return self._out
