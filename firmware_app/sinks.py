"""Result sinks: what gets every result besides the screen — one small interface (picamera2's ``Output``).

    start()                       before the pipeline's threads start
    on_result(frame, result)      every result, on the inference thread: never block, never raise
    close()                       after the pipeline's threads have ended (safe twice)
    bind(pipeline)                optional: before start, to publish events or read the running model

The recorder (``records.captures.Recorder``), the results stream (``records.results_stream``) and the
adapters below (GPIO panel, serial link, input monitor, watchdog) are sinks; ``compose`` lists them.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from firmware_app.events import InputWarning
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    def start(self) -> None: ...

    def on_result(self, frame: Frame, result: Result) -> None: ...

    def close(self) -> None: ...


class PanelSink:
    """The GPIO panel (``device.gpio.GpioPanel``): alert LED and buzzer per finding episode, status LED."""

    def __init__(self, panel: Any) -> None:
        self.panel = panel

    def start(self) -> None:
        self.panel.start()
        self.panel.set_status("running")

    def on_result(self, frame: Frame, result: Result) -> None:
        self.panel.on_result(frame, result)

    def close(self) -> None:
        self.panel.set_status("off")
        self.panel.close()


class LinkSink:
    """The serial link (``device.serial_link.SerialLink``): one record per result, commands back."""

    def __init__(self, link: Any) -> None:
        self.link = link

    def start(self) -> None:
        self.link.start()

    def on_result(self, frame: Frame, result: Result) -> None:
        self.link.on_result(frame, result)

    def close(self) -> None:
        self.link.stop()


class WatchdogSink:
    """The systemd watchdog (``device.sdnotify.Watchdog``), fed by the pipeline's heartbeat, not results."""

    def __init__(self, watchdog: Any) -> None:
        self.watchdog = watchdog

    def start(self) -> None:
        self.watchdog.start()

    def on_result(self, frame: Frame, result: Result) -> None:
        pass

    def close(self) -> None:
        self.watchdog.stop()


class InputMonitor:
    """The input drift monitor (``records.drift.DriftMonitor``) over a window of frames: publishes an
    ``InputWarning`` event when its state changes. ``set_model`` follows a model switched at run time."""

    def __init__(self, audit: Any = None) -> None:
        self.audit = audit
        self.monitor: Any = None
        self._publish: Any = None
        self._shown: str | None = None

    def set_model(self, model: Any) -> None:
        reference = model.manifest.reference
        self.monitor = None
        if reference:
            from firmware_app.records.drift import DriftMonitor

            self.monitor = DriftMonitor(
                reference, window=30, every=2, audit=self.audit, model_id=model.manifest.id
            )
        self._tell(None)

    def bind(self, pipeline: Any) -> None:
        self._publish = pipeline.publish
        self.set_model(pipeline.model)

    def start(self) -> None:
        pass

    def on_result(self, frame: Frame, result: Result) -> None:
        if self.monitor is not None:
            self._tell(self.monitor.update(frame))

    def _tell(self, text: str | None) -> None:
        if text != self._shown and self._publish is not None:
            self._shown = text
            self._publish(InputWarning(text))

    def close(self) -> None:
        pass
