"""TensorRT on a Jetson: the model's ONNX -> an engine built on the device, cached, verified, then run.

- The engine is built on first use from ``model.onnx`` (FP16 where the GPU has it) and cached in
  ``<data-dir>/engines/`` under a key of the ONNX file's SHA-256, the TensorRT version and the GPU name, so
  a new model, a JetPack upgrade or another module rebuilds it, and nothing else does.
- Before it serves, the engine is checked against the model's golden inputs: its outputs must match the
  float twin (``model_float.tflite`` run by LiteRT) within ``VERIFY_ATOL``. A mismatch deletes the cached
  engine and the chain falls back to the CPU with the reason on screen.
- The GPU sits behind a small runtime interface (``version``, ``gpu_name``, ``build``, ``load``) with the
  real implementation (TensorRT + cuda-python) and a test double, so the cache and verification logic is
  tested everywhere; the real path runs only where a GPU is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from firmware_app.backends.base import FLOAT_ONNX, Backend, BackendPlugin, TensorSpec
from firmware_app.errors import BackendUnavailable
from firmware_app.models.store import ModelRef
from firmware_app.plugins import register

log = logging.getLogger(__name__)

ONNX_MODEL = "model.onnx"
FLOAT_TWIN = "model_float.tflite"
VERIFY_ATOL = 0.05  # FP16 engine vs float32 reference, in output units (probabilities, logits)
WORKSPACE_BYTES = 1 << 28


class Engine(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]: ...

    def close(self) -> None: ...


class TrtRuntime(Protocol):
    version: str
    gpu_name: str

    def build(self, onnx: bytes) -> bytes: ...

    def load(self, plan: bytes) -> Engine: ...


def engine_key(onnx: bytes, trt_version: str, gpu_name: str) -> str:
    """model hash + TensorRT version + GPU: an engine is only valid for exactly these."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return f"{hashlib.sha256(onnx).hexdigest()[:16]}-trt{trt_version}-{gpu}"


def golden_float_inputs(model: ModelRef, spec: TensorSpec) -> list[np.ndarray]:
    """The golden inputs, in the float engine's input domain (dequantized with the int8 model's input)."""
    from firmware_app.backends.litert import LiteRTBackend

    int8 = LiteRTBackend(model.tflite, threads=1)
    q = int8.input
    int8.close()
    out = []
    for case in sorted((model.folder / "golden").glob("case_*.npz")):
        with np.load(case) as z:
            x = z["input"]
        x = (x.astype(np.float32) - q.zero_point) * q.scale if q.quantized else x.astype(np.float32)
        out.append(x.reshape(spec.shape).astype(spec.dtype))
    return out


def verify_engine(engine: Engine, model: ModelRef) -> None:
    """Raise BackendUnavailable unless the engine reproduces the float twin on the golden inputs."""
    from firmware_app.backends.litert import LiteRTBackend

    twin = model.variant(FLOAT_TWIN)
    if twin is None:
        raise BackendUnavailable(f"model {model.manifest.id} has no {FLOAT_TWIN} to verify a TensorRT engine")
    inputs = golden_float_inputs(model, engine.inputs[0])
    if not inputs:
        raise BackendUnavailable(
            f"model {model.manifest.id} has no golden vectors to verify a TensorRT engine"
        )
    reference = LiteRTBackend(twin, threads=1)
    try:
        for i, x in enumerate(inputs):
            want = reference.invoke(x.astype(reference.input.dtype))
            got = engine.infer(x)
            for k, (w, g) in enumerate(zip(want, got)):
                err = float(np.max(np.abs(w.astype(np.float32) - g.astype(np.float32).reshape(w.shape))))
                if not err <= VERIFY_ATOL:
                    raise BackendUnavailable(
                        f"TensorRT engine for {model.manifest.id} differs from the float model on golden case "
                        f"{i}, output {k}: max error {err:.3g} > {VERIFY_ATOL}"
                    )
    finally:
        reference.close()


class TensorRTBackend(Backend):
    """Runs ``model.onnx`` through a cached, verified TensorRT engine."""

    def __init__(self, model: ModelRef, cache_dir: str | Path, runtime: TrtRuntime | None = None) -> None:
        onnx_path = model.variant(ONNX_MODEL)
        if onnx_path is None:
            raise BackendUnavailable(f"model {model.manifest.id} has no {ONNX_MODEL} for TensorRT")
        rt = runtime if runtime is not None else CudaTrtRuntime()
        onnx = onnx_path.read_bytes()
        cache = Path(cache_dir)
        plan_path = cache / f"{engine_key(onnx, rt.version, rt.gpu_name)}.plan"
        self.name = "tensorrt"
        self.threads = 1
        self.built = False
        if plan_path.is_file():
            plan = plan_path.read_bytes()
        else:
            log.warning(
                "building the TensorRT engine for %s (first use; this takes a while)", model.manifest.id
            )
            plan = rt.build(onnx)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = plan_path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(plan)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, plan_path)
            self.built = True
        try:
            self._engine = rt.load(plan)
            verify_engine(self._engine, model)
        except BackendUnavailable:
            plan_path.unlink(missing_ok=True)  # a bad engine is never used again
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt cache or a driver error
            plan_path.unlink(missing_ok=True)
            raise BackendUnavailable(
                f"TensorRT engine for {model.manifest.id} failed to load: {exc}"
            ) from None
        self.plan_path = plan_path
        self.input = self._engine.inputs[0]
        self.outputs = list(self._engine.outputs)

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        return self._engine.infer(tensor)

    def close(self) -> None:
        self._engine.close()


class CudaTrtRuntime:
    """The real TensorRT + CUDA (cuda-python). Raises BackendUnavailable where they are not installed."""

    def __init__(self) -> None:
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError as exc:
            raise BackendUnavailable(
                f"TensorRT is not available ({exc.name} not installed: on a Jetson it comes with JetPack, "
                "plus pip install cuda-python)"
            ) from None
        self.trt, self.cudart = trt, cudart
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.version = trt.__version__
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            raise BackendUnavailable(f"no CUDA GPU usable (cudaGetDeviceProperties: {err})")
        name = props.name
        self.gpu_name = name.decode(errors="replace").strip("\x00") if isinstance(name, bytes) else str(name)

    def build(self, onnx: bytes) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailable("TensorRT could not build an engine for this model")
        return bytes(plan)

    def load(self, plan: bytes) -> Engine:
        return _CudaEngine(self, plan)


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class _CudaEngine:
    """One deserialized engine with its device buffers and stream, allocated once."""

    def __init__(self, rt: CudaTrtRuntime, plan: bytes) -> None:
        trt, cudart = rt.trt, rt.cudart
        self.cudart = cudart
        self.engine = trt.Runtime(rt.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("deserialize_cuda_engine returned nothing (corrupt or foreign plan)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.inputs, self.outputs = [], []
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, int] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            spec = TensorSpec(i, name, shape, dtype, 0.0, 0)
            host = np.empty(shape, dtype)
            dev = _check(cudart.cudaMalloc(host.nbytes), "cudaMalloc")
            self._host[name], self._dev[name] = host, dev
            self.context.set_tensor_address(name, dev)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        name = self.inputs[0].name
        host = self._host[name]
        np.copyto(host, tensor.reshape(host.shape), casting="same_kind")
        _check(
            cudart.cudaMemcpyAsync(self._dev[name], host.ctypes.data, host.nbytes, h2d, self.stream),
            "copy in",
        )
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        outs = []
        for spec in self.outputs:
            out = self._host[spec.name]
            _check(
                cudart.cudaMemcpyAsync(out.ctypes.data, self._dev[spec.name], out.nbytes, d2h, self.stream),
                "copy out",
            )
            outs.append(out)
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return [o.copy() for o in outs]

    def close(self) -> None:
        for dev in self._dev.values():
            self.cudart.cudaFree(dev)
        self._dev.clear()
        self.cudart.cudaStreamDestroy(self.stream)


@register("backend", "tensorrt")
@dataclass(frozen=True)
class TensorRTPlugin(BackendPlugin):
    """``tensorrt``: model.onnx built into a cached FP16 engine, verified against model_float.tflite.
    Engines live in ``<data-dir>/engines`` (the chain's engine cache; a temp folder without one)."""

    device_field = "trt_runtime"

    files = ("model.tflite", ONNX_MODEL, FLOAT_TWIN)
    accelerator = True
    runtime = "tensorrt"
    # an FP16 engine of the float twin: the twin's gap to LiteRT int8 (base.FLOAT_ONNX); a float model's
    # float golden outputs at VERIFY_ATOL, FP16's rounding
    tolerance = replace(FLOAT_ONNX, float_atol=VERIFY_ATOL, why="FP16 engine of the float ONNX twin")

    def open(self, model, threads: int, device: Any = None, cache_dir: str | None = None):
        cache = cache_dir or os.path.join(tempfile.gettempdir(), "firmware-app-engines")
        return TensorRTBackend(model, cache, runtime=device)

    def check(self) -> tuple[str, str]:
        v = self.runtime_version()
        if v is None:
            return "missing", "not installed (Jetson: comes with JetPack)"
        return "ok", f"tensorrt {v}: engines built from model.onnx on first use, cached in <data-dir>/engines"
