"""The hardware a box has, in one object: a real form and a mock form (gpiozero's MockFactory is the model).

    Devices.real()   gpiozero's own pin factory, pyserial, libedgetpu, the systemd notify socket,
                     mount/umount, the monotonic clock
    Devices.mock()   gpiozero's MockFactory pins, a pyserial ``loop://`` port, an Edge TPU double,
                     a notifier that speaks to nobody, a mount runner that only records, a settable clock

``compose`` hands each piece to what needs it (the GPIO panel, the serial link, the backend chain, the
watchdog, the pipeline's clock); tests pass ``Devices.mock()`` (or one with a field replaced) instead of
monkeypatching module constants. ``None`` in a field means "the real thing, chosen by the library".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class ManualClock:
    """A clock tests move by hand: ``clock()`` is the time, ``advance(s)`` moves it."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += float(seconds)


@dataclass(frozen=True)
class Devices:
    pin_factory: Any = None  # gpiozero pin factory (None: gpiozero's own choice, announced)
    serial_opener: Callable[[Any], Any] | None = None  # SerialConfig -> an open pyserial-like port
    accelerator: Any = None  # the Edge TPU (None: libedgetpu.so.1 through LiteRT's load_delegate)
    trt_runtime: Any = None  # TensorRT (None: the real runtime, where installed)
    notifier: Any = None  # systemd notify (None: $NOTIFY_SOCKET)
    usb_mount: Callable[..., Any] | None = None  # runs mount / umount for a USB stick (None: subprocess.run)
    clock: Callable[[], float] = field(default=time.monotonic)

    @classmethod
    def real(cls) -> Devices:
        return cls()

    @classmethod
    def mock(cls, **overrides: Any) -> Devices:
        """Every device as a double that behaves like the hardware: plugged in, answering, recording."""
        from firmware_app.backends.edgetpu import MockEdgeTpu
        from firmware_app.device.sdnotify import Notifier

        pins = None
        try:
            from gpiozero.pins.mock import MockFactory

            pins = MockFactory()
        except ImportError:  # the gpio extra is not installed: a board with [gpio] reports it
            pass

        def loop_port(config: Any) -> Any:
            import serial

            return serial.serial_for_url("loop://", timeout=0.05, write_timeout=1.0)

        mounts: list[list[str]] = []

        def record_mount(cmd: list[str], **_kw: Any) -> None:
            mounts.append(list(cmd))

        record_mount.calls = mounts  # type: ignore[attr-defined]
        base = cls(
            pin_factory=pins,
            serial_opener=loop_port,
            accelerator=MockEdgeTpu(present=True),
            notifier=Notifier(env={}),
            usb_mount=record_mount,
            clock=ManualClock(),
        )
        return replace(base, **overrides)

    def backend_devices(self) -> dict[str, Any]:
        """The doubles the backend chain takes, by backend key (``BackendChain.devices``)."""
        from firmware_app.backends.chain import backend_plugins

        out: dict[str, Any] = {}
        for key, plugin in backend_plugins().items():
            device = getattr(self, plugin.device_field) if plugin.device_field else None
            if device is not None:
                out[key] = device
        return out
