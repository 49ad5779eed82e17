"""What every backend offers: tensor specs with their quantization, and invoke()."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float  # 0.0 when not quantized
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Raw output -> float32 (identity for float tensors)."""
        if not self.quantized:
            return raw.astype(np.float32, copy=False)
        return (raw.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)


class Backend:
    name: str = "?"
    threads: int = 1
    input: TensorSpec
    outputs: list[TensorSpec]

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run the model on one input tensor (shape and dtype of ``self.input``); raw outputs, in order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
