"""``onnxruntime``: the model's ``model.onnx`` on ONNX Runtime (``pip install 'firmware-app[onnx]'``).

The CPU execution provider by default; ``[backend.onnxruntime] providers`` asks for others (CUDA,
TensorRT) in order of preference, used where that build of ONNX Runtime has them. The bundled models'
``model.onnx`` is the float twin (float32 in and out, no quantization): the Preprocessor fills the input in
its dtype and the tasks read the float outputs as they are. Golden vectors pass at ``base.FLOAT_ONNX``.
A missing ONNX Runtime is BackendUnavailable with the one line that says how to install it; the chain then
falls back (announced).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware_app.backends.base import FLOAT_ONNX, Backend, BackendPlugin, TensorSpec
from firmware_app.errors import BackendUnavailable, BadConfig
from firmware_app.plugins import register

log = logging.getLogger(__name__)

ONNX_MODEL = "model.onnx"
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def ort_module():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("ONNX Runtime is not installed (pip install 'firmware-app[onnx]')") from None
    return onnxruntime


def _spec(i: int, arg) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise BackendUnavailable(
            f"ONNX tensor {arg.name} has type {arg.type}, not float32, float16, int8, uint8"
        )
    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in arg.shape)  # a symbolic batch is 1
    return TensorSpec(i, arg.name, shape, np.dtype(dtype), 0.0, 0)


class OnnxRuntimeBackend(Backend):
    def __init__(
        self, path: str | Path, threads: int = 2, providers: tuple[str, ...] = PROVIDERS[:1]
    ) -> None:
        ort = ort_module()
        available = ort.get_available_providers()
        use = [p for p in providers if p in available]
        if not use:
            raise BackendUnavailable(
                f"ONNX Runtime {ort.__version__} has none of {', '.join(providers)} here "
                f"(it has {', '.join(available)})"
            )
        if len(use) < len(providers):
            log.warning("ONNX Runtime: %s not available, using %s", set(providers) - set(use), use)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=use)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BackendUnavailable(
                f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})"
            ) from None
        ins = self._session.get_inputs()
        if len(ins) != 1:
            raise BackendUnavailable(f"{path}: expected 1 input tensor, the model has {len(ins)}")
        self.path = Path(path)
        self.threads = threads
        self.providers = tuple(self._session.get_providers())
        self.name = "onnxruntime-" + self.providers[0].removesuffix("ExecutionProvider").lower()
        self.input = _spec(0, ins[0])
        self.outputs = [_spec(i, o) for i, o in enumerate(self._session.get_outputs())]
        self._feed = self.input.name
        self._names = [o.name for o in self.outputs]
        log.info("loaded %s on %s (%d threads)", path, self.name, threads)

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        return self._session.run(self._names, {self._feed: tensor})

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


@register("backend", "onnxruntime", aliases=("ort",))
@dataclass(frozen=True)
class OnnxRuntimePlugin(BackendPlugin):
    """``[backend.onnxruntime] providers``: execution providers in order of preference (default the CPU)."""

    providers: tuple[str, ...] = PROVIDERS[:1]
    files = ("model.tflite", ONNX_MODEL)
    runtime = "onnxruntime"
    tolerance = FLOAT_ONNX

    def validate(self, where: str) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise BadConfig(
                f"{where} providers {list(self.providers)} must name some of {', '.join(PROVIDERS)}"
            )

    def open(self, model, threads: int, device: Any = None, cache_dir: str | None = None) -> Backend:
        path = model.variant(ONNX_MODEL)
        if path is None:
            raise BackendUnavailable(f"model {model.manifest.id} has no {ONNX_MODEL}")
        return OnnxRuntimeBackend(path, threads, self.providers)

    def check(self) -> tuple[str, str]:
        try:
            ort = ort_module()
        except BackendUnavailable as exc:
            return "missing", str(exc)
        return "ok", f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"
