"""Inference backends and the chain that picks one.

The board config names a preference list (``[backend] order = ["edgetpu", "cpu"]``); like gpiozero's pin
factory chain, each step down the chain is announced (log warning + on-screen "CPU FALLBACK" notice), never
hidden. Every backend reads quantization from the tensors and never assumes it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

from firmware_app.backends.base import Backend, TensorSpec
from firmware_app.errors import BackendUnavailable, BadConfig
from firmware_app.models.store import ModelRef

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "edgetpu", "cpu")


@dataclass
class BackendChoice:
    backend: Backend
    notices: list[str] = field(default_factory=list)  # one per fallback step, shown on screen

    @property
    def fell_back(self) -> bool:
        return bool(self.notices)


def make_backend(
    model: ModelRef,
    order: list[str] | tuple[str, ...] = ("cpu",),
    threads: int = 2,
    edgetpu_device: str | None = None,
    accelerator=None,
    engine_cache: str | None = None,
    trt_runtime=None,
) -> BackendChoice:
    """Open the first backend of ``order`` that works for ``model``.

    ``accelerator`` replaces the real Edge TPU (tests pass firmware_app.backends.edgetpu.MockEdgeTpu);
    ``trt_runtime`` the real TensorRT; ``engine_cache`` is where TensorRT engines are kept.
    """
    notices: list[str] = []
    for name in order:
        try:
            if name == "edgetpu":
                from firmware_app.backends.edgetpu import open_edgetpu

                backend = open_edgetpu(model, threads, device=edgetpu_device, accelerator=accelerator)
            elif name == "tensorrt":
                from firmware_app.backends.tensorrt import TensorRTBackend

                cache = engine_cache or os.path.join(tempfile.gettempdir(), "firmware-app-engines")
                backend = TensorRTBackend(model, cache, runtime=trt_runtime)
            elif name == "cpu":
                from firmware_app.backends.litert import LiteRTBackend

                backend = LiteRTBackend(model.tflite, threads=threads)
            else:
                raise BadConfig(f"[backend] order: unknown backend {name!r}; use {', '.join(BACKENDS)}")
        except BackendUnavailable as exc:
            msg = f"{name} unavailable: {exc}"
            log.warning("backend %s", msg)
            notices.append(msg)
            continue
        if notices:
            log.warning("using backend %s after fallback", backend.name)
            if name == "cpu":
                notices = [f"CPU FALLBACK: {n}" for n in notices]
        return BackendChoice(backend, notices)
    raise BackendUnavailable(f"no backend could run model {model.manifest.id}: " + "; ".join(notices))


__all__ = ["Backend", "BackendChoice", "TensorSpec", "make_backend"]
