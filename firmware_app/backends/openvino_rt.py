"""``openvino``: the model on Intel OpenVINO (``pip install 'firmware-app[openvino]'``).

``[backend.openvino] device`` is the OpenVINO device: ``CPU``, ``GPU`` (Intel integrated/Arc graphics) or
``NPU`` (Core Ultra); ``model`` which file it runs: ``onnx`` (default, the float twin model.onnx; golden
vectors at ``base.FLOAT_ONNX``) or ``tflite`` (model.tflite, int8 in and out with model.tflite's own
quantization; OpenVINO's int8 kernels round differently from LiteRT's: on the bundled models p99 <= 9 and
mean <= 0.7 steps, but up to ~200 steps on a few segmentation boundary pixels, so ``TFLITE_INT8`` bounds
p99 and mean, not max). A missing OpenVINO or device is BackendUnavailable; the chain falls back, announced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware_app.backends.base import FLOAT_ONNX, Backend, BackendPlugin, TensorSpec, Tolerance
from firmware_app.errors import BackendUnavailable, BadConfig
from firmware_app.plugins import register

log = logging.getLogger(__name__)

DEVICES = ("CPU", "GPU", "NPU")
FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}
TFLITE_INT8 = Tolerance(
    exact=False,
    p99_steps=16,
    mean_steps=1,
    float_atol=1e-3,
    why="OpenVINO int8 kernels on model.tflite (up to ~200 steps on a few segmentation boundary pixels)",
)


def ov_module():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("OpenVINO is not installed (pip install 'firmware-app[openvino]')") from None
    return openvino


class OpenVinoBackend(Backend):
    def __init__(
        self,
        path: str | Path,
        threads: int = 2,
        device: str = "CPU",
        quantization: tuple[TensorSpec, list[TensorSpec]] | None = None,
    ) -> None:
        """``quantization``: the input and output specs whose scale/zero point the model's int8 tensors carry
        (model.tflite's, read by LiteRT); None for a float model."""
        ov = ov_module()
        core = ov.Core()
        if device not in core.available_devices:
            raise BackendUnavailable(
                f"OpenVINO {ov.__version__} has no {device} device here (it has {', '.join(core.available_devices)})"
            )
        config = {"INFERENCE_NUM_THREADS": threads} if device == "CPU" else {}
        try:
            self._compiled = core.compile_model(str(path), device, config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise BackendUnavailable(
                f"{path}: OpenVINO cannot compile it for {device} ({str(exc).splitlines()[0]})"
            ) from None
        if len(self._compiled.inputs) != 1:
            raise BackendUnavailable(
                f"{path}: expected 1 input tensor, the model has {len(self._compiled.inputs)}"
            )
        self._request = self._compiled.create_infer_request()
        self.path, self.threads, self.device = Path(path), threads, device
        self.name = f"openvino-{device.lower()}"
        q_in, q_outs = quantization or (None, [])
        self.input = self._spec(0, self._compiled.inputs[0], q_in)
        self.outputs = [
            self._spec(i, o, q_outs[i] if i < len(q_outs) else None)
            for i, o in enumerate(self._compiled.outputs)
        ]
        log.info("loaded %s on %s (%d threads)", path, self.name, threads)

    @staticmethod
    def _spec(i: int, port, q: TensorSpec | None) -> TensorSpec:
        dtype = np.dtype(port.get_element_type().to_dtype())
        shape = tuple(int(d) for d in port.get_partial_shape().get_min_shape())
        name = port.any_name if port.get_names() else f"t{i}"
        if q is not None and np.issubdtype(dtype, np.integer):
            return TensorSpec(i, name, shape, dtype, q.scale, q.zero_point)
        return TensorSpec(i, name, shape, dtype, 0.0, 0)

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        self._request.infer({0: tensor})
        return [self._request.get_output_tensor(i).data.copy() for i in range(len(self.outputs))]

    def close(self) -> None:
        self._request = self._compiled = None  # type: ignore[assignment]


@register("backend", "openvino")
@dataclass(frozen=True)
class OpenVinoPlugin(BackendPlugin):
    """``[backend.openvino] device`` (CPU | GPU | NPU) and ``model`` (onnx | tflite)."""

    device: str = "CPU"
    model: str = "onnx"
    files = ("model.tflite", FILES["onnx"])
    runtime = "openvino"

    @property
    def tolerance(self) -> Tolerance:  # type: ignore[override]
        return TFLITE_INT8 if self.model == "tflite" else FLOAT_ONNX

    def validate(self, where: str) -> None:
        if self.device not in DEVICES:
            raise BadConfig(f"{where} device {self.device!r} must be one of {', '.join(DEVICES)}")
        if self.model not in FILES:
            raise BadConfig(f"{where} model {self.model!r} must be one of {', '.join(FILES)}")

    def open(self, model, threads: int, device: Any = None, cache_dir: str | None = None) -> Backend:
        path = model.variant(FILES[self.model])
        if path is None:
            raise BackendUnavailable(f"model {model.manifest.id} has no {FILES[self.model]}")
        quant = None
        if self.model == "tflite":
            from firmware_app.backends.golden import reference_specs

            quant = reference_specs(model)
        return OpenVinoBackend(path, threads, self.device, quant)

    def check(self) -> tuple[str, str]:
        try:
            ov = ov_module()
        except BackendUnavailable as exc:
            return "missing", str(exc)
        devices = ov.Core().available_devices
        status = "ok" if self.device in devices else "missing"
        return status, f"openvino {ov.__version__}, devices {', '.join(devices)} (board asks {self.device})"
