"""The Coral Edge TPU through ``load_delegate("libedgetpu.so.1")`` and the model's ``_edgetpu`` variant.

The accelerator sits behind a tiny interface (``delegates()``) with the real implementation (EdgeTpu) and a
test double (MockEdgeTpu) in the package, the way gpiozero pairs real pins with MockFactory. A missing
library or device raises BackendUnavailable with a message a biomedical engineer can act on; the backend
chain then falls back to the CPU and says so on screen.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys

from firmware_app.backends.litert import LiteRTBackend, litert_module
from firmware_app.errors import BackendUnavailable
from firmware_app.models.store import ModelRef

log = logging.getLogger(__name__)

EDGETPU_LIB = "libedgetpu.so.1"
EDGETPU_MODEL = "model_edgetpu.tflite"


@contextlib.contextmanager
def _quiet_failed_delegate():
    """LiteRT's Delegate.__del__ raises AttributeError ("Exception ignored ...") on stderr after a failed
    load; the failure itself is reported as BackendUnavailable, so that noise is dropped."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, AttributeError) and "Delegate" in repr(unraisable.object):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


class EdgeTpu:
    """The real accelerator: USB (``usb``, ``usb:0``) or PCIe/M.2 (``pci:0``); None = first found."""

    def __init__(self, device: str | None = None, library: str = EDGETPU_LIB) -> None:
        self.device = device
        self.library = library

    def delegates(self) -> list:
        options = {"device": self.device} if self.device else {}
        problem = ""
        with _quiet_failed_delegate():
            try:
                return [litert_module().load_delegate(self.library, options)]
            except (ValueError, OSError, RuntimeError) as exc:
                problem = str(exc)  # the half-made Delegate is freed with exc, inside the quiet block
        where = f" device {self.device!r}" if self.device else ""
        raise BackendUnavailable(
            f"Edge TPU{where} not found: {self.library} could not be loaded ({problem}); install "
            f"libedgetpu1-std and check the accelerator is plugged in"
        )


class MockEdgeTpu:
    """Test double: ``present=False`` fails like a missing accelerator; ``present=True`` hands no delegate,
    so the ``_edgetpu`` variant (in tests, a plain int8 model) runs on the CPU under the Edge TPU's name."""

    def __init__(self, present: bool = True, device: str | None = None) -> None:
        self.present = present
        self.device = device
        self.loads = 0

    def delegates(self) -> list:
        self.loads += 1
        if not self.present:
            raise BackendUnavailable(f"Edge TPU not found: {EDGETPU_LIB} could not be loaded (mock: absent)")
        return []


def open_edgetpu(model: ModelRef, threads: int, device: str | None = None, accelerator=None) -> LiteRTBackend:
    variant = model.variant(EDGETPU_MODEL)
    if variant is None:
        raise BackendUnavailable(
            f"model {model.manifest.id} has no {EDGETPU_MODEL} (compile it with edgetpu_compiler)"
        )
    acc = accelerator if accelerator is not None else EdgeTpu(device)
    delegates = acc.delegates()
    return LiteRTBackend(variant, threads=threads, delegates=delegates, name="edgetpu")
