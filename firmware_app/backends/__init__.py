"""Inference backends: one plugin module each (cpu/litert, edgetpu, tensorrt, ...), found by the registry
(firmware_app.plugins), opened through the chain (firmware_app.backends.chain). Every backend reads
quantization from the tensors and never assumes it.
"""

from __future__ import annotations

from firmware_app.backends.base import Backend, BackendPlugin, TensorSpec, Tolerance
from firmware_app.backends.chain import (
    BackendChain,
    BackendChoice,
    backend_key,
    backend_plugins,
    make_backend,
    needed_files,
)

__all__ = [
    "Backend",
    "BackendChain",
    "BackendChoice",
    "BackendPlugin",
    "TensorSpec",
    "Tolerance",
    "backend_key",
    "backend_plugins",
    "make_backend",
    "needed_files",
]
