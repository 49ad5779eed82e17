"""The Coral Edge TPU through ``load_delegate("libedgetpu.so.1")`` and the model's ``_edgetpu`` variant.

The accelerator sits behind a tiny interface (``delegates()``) with the real implementation (EdgeTpu) and a
test double (MockEdgeTpu) in the package, the way gpiozero pairs real pins with MockFactory. A missing
library or device raises BackendUnavailable with a message a biomedical engineer can act on; the backend
chain then falls back to the CPU and says so on screen.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from firmware_app.backends.base import BackendPlugin
from firmware_app.backends.litert import LiteRTBackend, litert_module
from firmware_app.errors import BackendUnavailable, BadConfig, FirmwareAppError
from firmware_app.models.store import ModelRef
from firmware_app.plugins import register

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

    def delegates(self, device: str | None = None) -> list:
        device = device or self.device
        options = {"device": device} if device else {}
        problem = ""
        with _quiet_failed_delegate():
            try:
                return [litert_module().load_delegate(self.library, options)]
            except (ValueError, OSError, RuntimeError) as exc:
                problem = str(exc)  # the half-made Delegate is freed with exc, inside the quiet block
        where = f" device {device!r}" if device else ""
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
        self.devices: list[
            str | None
        ] = []  # the device asked for at each load (the board's [backend.edgetpu])

    def delegates(self, device: str | None = None) -> list:
        self.loads += 1
        self.devices.append(device or self.device)
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
    delegates = acc.delegates(device)
    return LiteRTBackend(variant, threads=threads, delegates=delegates, name="edgetpu")


@register("backend", "edgetpu")
@dataclass(frozen=True)
class EdgeTpuPlugin(BackendPlugin):
    """``edgetpu``: model_edgetpu.tflite through the Edge TPU delegate. ``[backend.edgetpu] device`` (or the
    older ``[backend] edgetpu_device``): ``usb``, ``usb:N``, ``pci:N``; empty = the first found."""

    device_field = "accelerator"
    legacy_keys: ClassVar[dict[str, str]] = {"edgetpu_device": "device"}

    device: str = ""
    files = ("model.tflite", EDGETPU_MODEL)
    accelerator = True
    runtime = "ai-edge-litert"

    def validate(self, where: str) -> None:
        if self.device and not re.fullmatch(r"(usb|pci)(:\d+)?", self.device):
            raise BadConfig(f"{where} device {self.device!r} must be usb, usb:N, pci:N or empty")

    def open(self, model, threads: int, device: Any = None, cache_dir: str | None = None):
        return open_edgetpu(model, threads, device=self.device or None, accelerator=device)

    def check(self) -> tuple[str, str]:
        usb = any(
            Path(p).read_text().strip() in ("1a6e", "18d1")
            for p in glob.glob("/sys/bus/usb/devices/*/idVendor")
            if Path(p).is_file()
        )
        pcie = bool(glob.glob("/dev/apex_*"))
        try:
            EdgeTpu(self.device or None).delegates()
        except FirmwareAppError as exc:
            return ("FAULT" if (usb or pcie) else "missing"), str(exc)
        return "ok", f"delegate loaded ({'PCIe' if pcie else 'USB'})"
