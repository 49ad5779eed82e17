"""LiteRT (TFLite) on the CPU with XNNPACK, or with an accelerator delegate.

Imports ``ai_edge_litert.interpreter`` and falls back to ``tflite_runtime.interpreter`` on older boards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware_app.backends.base import Backend, BackendPlugin, TensorSpec
from firmware_app.errors import BackendUnavailable, BadModel
from firmware_app.logsetup import quiet_native_stderr
from firmware_app.plugins import register

log = logging.getLogger(__name__)


def litert_module():
    """The interpreter module: ai_edge_litert first, tflite_runtime on older boards."""
    try:
        from ai_edge_litert import interpreter as mod
    except ImportError:
        try:
            from tflite_runtime import interpreter as mod  # type: ignore[no-redef]
        except ImportError:
            raise BackendUnavailable(
                "no TFLite runtime: pip install ai-edge-litert (or tflite-runtime on older boards)"
            ) from None
    return mod


def _spec(d: dict) -> TensorSpec:
    scale, zp = d.get("quantization", (0.0, 0))
    return TensorSpec(
        index=int(d["index"]),
        name=str(d["name"]),
        shape=tuple(int(s) for s in d["shape"]),
        dtype=np.dtype(d["dtype"]),
        scale=float(scale),
        zero_point=int(zp),
    )


class LiteRTBackend(Backend):
    def __init__(
        self, path: str | Path, threads: int = 2, delegates: list | None = None, name: str = "litert-cpu"
    ) -> None:
        mod = litert_module()
        self.path = Path(path)
        self.threads = threads
        self.name = name
        kwargs: dict = {"model_path": str(path), "num_threads": threads}
        if delegates:
            kwargs["experimental_delegates"] = delegates
        try:
            with quiet_native_stderr():  # its "Created TensorFlow Lite XNNPACK delegate" line: -v only
                self._interp = mod.Interpreter(**kwargs)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if delegates:
                raise BackendUnavailable(f"{path}: delegate could not run the model ({exc})") from None
            raise BadModel(f"{path}: not a loadable TFLite model ({str(exc).splitlines()[0]})") from None
        ins = self._interp.get_input_details()
        if len(ins) != 1:
            raise BadModel(f"{path}: expected 1 input tensor, the model has {len(ins)}")
        self.input = _spec(ins[0])
        if len(self.input.shape) != 4 or self.input.shape[0] != 1:
            raise BadModel(f"{path}: input shape {list(self.input.shape)} is not [1, H, W, C]")
        if self.input.dtype not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32)):
            raise BadModel(f"{path}: input type {self.input.dtype} is not uint8, int8 or float32")
        self.outputs = [_spec(d) for d in self._interp.get_output_details()]
        self._out_idx = [o.index for o in self.outputs]
        log.info(
            "loaded %s on %s (%d threads): input %s %s",
            path,
            name,
            threads,
            self.input.shape,
            self.input.dtype,
        )

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        interp = self._interp
        interp.set_tensor(self.input.index, tensor)
        interp.invoke()
        return [interp.get_tensor(i) for i in self._out_idx]

    def close(self) -> None:
        self._interp = None  # type: ignore[assignment]


@register("backend", "cpu", aliases=("litert",))
@dataclass(frozen=True)
class LiteRTCpu(BackendPlugin):
    """``cpu``: model.tflite on LiteRT with XNNPACK. Threads come from ``[backend] threads``."""

    files = ("model.tflite",)
    runtime = "ai-edge-litert"

    def open(self, model, threads: int, device: Any = None, cache_dir: str | None = None) -> Backend:
        return LiteRTBackend(model.tflite, threads=threads)
