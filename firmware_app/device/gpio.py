"""Buttons and lights on the box (gpiozero), pins from the board config's ``[gpio]`` section.

Buttons (each optional; wired to ground, internal pull-up unless ``pull_up = false``):
  freeze     toggles freeze / unfreeze
  capture    short press: capture this frame; long press: new patient (starts a new study)
  ai_toggle  AI on / off
  disagree   the clinician marks the last result as wrong (kept for the feedback export)
A button with no long action acts as soon as its press is accepted; ``capture`` acts on release (short) or
as soon as it has been held ``long_press_s`` (long). Edges closer than ``debounce_s`` to the last accepted
one are contact bounce and ignored.

Lights:
  status_led  starting: slow blink (1 Hz); running: steady on; fault: fast blink (5 Hz)
  alert_led   on while a finding episode lasts
  buzzer      ``alert_beeps`` beeps when an episode starts, once per episode (alert fatigue)
An episode starts with a result whose ``alert`` is True and ends when no alerting result has come for
``alert_clear_s`` seconds; a finding that stays on screen or flickers across the threshold alarms once.

Timing uses an injectable ``clock`` (time.monotonic) and a ``poll()`` that the panel's own thread calls every
``poll_s``; tests drive the clock and call ``poll()`` themselves. Devices take gpiozero's ``pin_factory``:
None picks the board's real factory with ``default_pin_factory()`` (lgpio, RPi.GPIO, native; each
fallback logged as a warning; never pigpio, which talks to its daemon over TCP);
``gpiozero.pins.mock.MockFactory()`` in tests.

When gpiozero is not installed or the machine has no usable GPIO, ``GpioPanel(...)`` raises
``GpioUnavailable`` with a one-line message: the daemon logs it, shows it, and runs without buttons and
lights.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from firmware_app.device.controls import Controls
from firmware_app.errors import BadConfig, FirmwareAppError
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

Pin = int | str  # BCM number (17) or a gpiozero pin name ("GPIO17", "BOARD11")

BUTTONS = ("freeze", "capture", "ai_toggle", "disagree")
OUTPUTS = ("status_led", "alert_led", "buzzer")

# status -> (on_s, off_s) blink, or None for steady on
STATUS_PATTERNS: dict[str, tuple[float, float] | None] = {
    "starting": (0.5, 0.5),
    "running": None,
    "fault": (0.1, 0.1),
}


# gpiozero's own chain less pigpio: that one is a TCP client of the pigpiod daemon, and this device uses
# no network (the service unit allows AF_UNIX only).
LOCAL_FACTORIES = ("lgpio", "rpigpio", "native")


class GpioUnavailable(FirmwareAppError):
    """gpiozero is missing or this machine has no usable GPIO; the daemon runs without buttons and lights."""


def default_pin_factory() -> Any:
    """The first gpiozero pin factory of LOCAL_FACTORIES that loads, or $GPIOZERO_PIN_FACTORY's.

    Each one that fails is logged as a warning; none => GpioUnavailable.
    """
    from importlib.metadata import entry_points

    available = {ep.name: ep for ep in entry_points(group="gpiozero_pin_factories")}
    wanted = os.environ.get("GPIOZERO_PIN_FACTORY", "").strip().lower()
    if wanted == "pigpio":
        raise GpioUnavailable(
            "GPIO: GPIOZERO_PIN_FACTORY=pigpio needs a TCP connection to pigpiod and this device uses no "
            "network; use lgpio. Running without buttons and lights"
        )
    failures = []
    for name in [wanted] if wanted else LOCAL_FACTORIES:
        ep = available.get(name)
        if ep is None:
            failures.append(f"{name}: not installed")
            continue
        try:
            factory = ep.load()()
        except Exception as exc:  # noqa: BLE001 - ImportError, no chip, not a Pi: try the next one
            failures.append(f"{name}: {exc}")
            log.warning("GPIO: pin factory %s unavailable (%s)", name, exc)
            continue
        if name == "native":
            log.warning("GPIO: using gpiozero's native pin factory; install lgpio for reliable edges")
        return factory
    raise GpioUnavailable(f"GPIO: no pin factory ({'; '.join(failures)}); running without buttons and lights")


@dataclass(frozen=True)
class GpioConfig:
    freeze: Pin | None = None
    capture: Pin | None = None
    ai_toggle: Pin | None = None
    disagree: Pin | None = None
    status_led: Pin | None = None
    alert_led: Pin | None = None
    buzzer: Pin | None = None
    pull_up: bool = True
    debounce_s: float = 0.05
    long_press_s: float = 1.5
    alert_clear_s: float = 3.0
    alert_beeps: int = 2

    def pins(self) -> dict[str, Pin]:
        return {k: getattr(self, k) for k in BUTTONS + OUTPUTS if getattr(self, k) is not None}


_RANGES = {  # key -> (low, high) for the numbers
    "debounce_s": (0.0, 1.0),
    "long_press_s": (0.2, 10.0),
    "alert_clear_s": (0.0, 600.0),
    "alert_beeps": (0, 10),
}


def parse_gpio_config(table: dict[str, Any], where: str) -> GpioConfig:
    """The ``[gpio]`` table of a board config; BadConfig ``"file: [gpio] key: problem"`` on anything wrong."""
    known = {f.name for f in fields(GpioConfig)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise BadConfig(f"{where}: [gpio] {key}: unknown key; allowed: {', '.join(sorted(known))}")
        if key in BUTTONS + OUTPUTS:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise BadConfig(f"{where}: [gpio] {key}: pin must be a BCM number or a name like 'GPIO17'")
            if isinstance(value, int) and not 0 <= value <= 53:
                raise BadConfig(f"{where}: [gpio] {key}: BCM pin {value} must be 0..53")
            if isinstance(value, str) and not value.strip():
                raise BadConfig(f"{where}: [gpio] {key}: empty pin name")
        elif key == "pull_up":
            if not isinstance(value, bool):
                raise BadConfig(f"{where}: [gpio] pull_up: must be true or false, got {value!r}")
        else:
            number = int if key == "alert_beeps" else int | float
            if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
                kind = "an integer" if key == "alert_beeps" else "a number of seconds"
                raise BadConfig(f"{where}: [gpio] {key}: must be {kind}, got {value!r}")
            lo, hi = _RANGES[key]
            if not lo <= value <= hi:
                raise BadConfig(f"{where}: [gpio] {key}: {value} must be {lo}..{hi}")
        out[key] = value
    config = GpioConfig(**out)
    pins = config.pins()
    if not pins:
        raise BadConfig(f"{where}: [gpio] names no pin; add {', '.join(BUTTONS + OUTPUTS)} or remove it")
    seen: dict[str, str] = {}
    for role, pin in pins.items():
        norm = f"GPIO{pin}" if isinstance(pin, int) else pin.strip().upper()
        if norm in seen:
            raise BadConfig(f"{where}: [gpio] {role}: pin {pin} is already used by {seen[norm]}")
        seen[norm] = role
    return config


class DebouncedButton:
    """Debounce and long-press logic for one button, on an injected clock; no hardware.

    ``edge(pressed, now)`` for every raw edge; ``poll(now, level)`` regularly with the pin's level, to fire
    a long press while the button is held and to recover an edge lost inside the debounce window.
    """

    def __init__(
        self,
        name: str,
        on_press: Callable[[], None],
        on_long: Callable[[], None] | None = None,
        debounce_s: float = 0.05,
        long_press_s: float = 1.5,
    ) -> None:
        self.name = name
        self.on_press = on_press
        self.on_long = on_long
        self.debounce_s = debounce_s
        self.long_press_s = long_press_s
        self.pressed = False
        self.bounces = 0
        self._t_edge: float | None = None
        self._t_press = 0.0
        self._long_done = False
        self._lock = threading.Lock()

    def edge(self, pressed: bool, now: float) -> None:
        with self._lock:
            action = self._edge(pressed, now)
        if action is not None:
            action()

    def _edge(self, pressed: bool, now: float) -> Callable[[], None] | None:
        if self._t_edge is not None and now - self._t_edge < self.debounce_s:
            self.bounces += 1
            return None
        self._t_edge = now
        if pressed == self.pressed:
            if pressed:  # the release was lost in a bounce window: this is a new press
                self._t_press, self._long_done = now, False
            return None
        self.pressed = pressed
        if pressed:
            self._t_press, self._long_done = now, False
            return self.on_press if self.on_long is None else None
        if self.on_long is None or self._long_done:
            return None
        if now - self._t_press >= self.long_press_s:
            return self.on_long
        return self.on_press

    def poll(self, now: float, level: bool) -> None:
        with self._lock:
            action: Callable[[], None] | None = None
            if self.pressed and not level and now - (self._t_edge or 0.0) >= self.debounce_s:
                action = self._edge(False, now)  # the release edge was swallowed as bounce
            elif (
                self.pressed
                and level
                and self.on_long is not None
                and not self._long_done
                and now - self._t_press >= self.long_press_s
            ):
                self._long_done = True
                action = self.on_long
        if action is not None:
            action()


class AlertEpisodes:
    """One alarm per finding episode: starts on an alerting result, ends ``clear_s`` after the last one."""

    def __init__(self, clear_s: float) -> None:
        self.clear_s = clear_s
        self.active = False
        self.episodes = 0
        self._last_alert = 0.0

    def update(self, alert: bool, now: float) -> str | None:
        """``"start"`` when this result starts an episode, ``"end"`` when it ends one, else None."""
        if alert:
            self._last_alert = now
            if not self.active:
                self.active = True
                self.episodes += 1
                return "start"
            return None
        return self.poll(now)

    def poll(self, now: float) -> str | None:
        if self.active and now - self._last_alert >= self.clear_s:
            self.active = False
            return "end"
        return None


class GpioPanel:
    """The box's buttons, status LED, alert LED and buzzer, wired to ``controls``.

    ``on_result`` is a pipeline listener; ``set_status`` drives the status LED; ``start()`` starts the poll
    thread (long press, end of alert episodes); ``close()`` releases the pins (safe twice).
    """

    def __init__(
        self,
        config: GpioConfig,
        controls: Controls,
        pin_factory: Any = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 0.05,
        beep_s: tuple[float, float] = (0.15, 0.1),
    ) -> None:
        self.config = config
        self.controls = controls
        self.clock = clock
        self.poll_s = poll_s
        self.beep_s = beep_s
        self.status = "off"
        self.alarms = 0
        self.episodes = AlertEpisodes(config.alert_clear_s)
        self._alert_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._devices: list[Any] = []
        self.buttons: dict[str, tuple[DebouncedButton, Any]] = {}
        self.status_led: Any = None
        self.alert_led: Any = None
        self.buzzer: Any = None
        self._own_factory: Any = None
        try:
            import gpiozero
        except ImportError as exc:
            raise GpioUnavailable(
                f"GPIO: gpiozero is not installed ({exc}); pip install 'firmware-app[gpio]'. "
                "Running without buttons and lights"
            ) from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if pin_factory is None:
                    pin_factory = self._own_factory = default_pin_factory()
                self._open(gpiozero, pin_factory)
            except (gpiozero.GPIOZeroError, OSError, RuntimeError) as exc:
                self.close()
                raise GpioUnavailable(
                    f"GPIO: {type(exc).__name__}: {exc} (pins {config.pins()}); "
                    "running without buttons and lights"
                ) from None
            finally:
                for w in caught:
                    log.warning("GPIO: %s", w.message)
        self.set_status("starting")

    def _open(self, gpiozero: Any, pin_factory: Any) -> None:
        c = self.config
        actions: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {
            "freeze": (self._toggle_freeze, None),
            "capture": (self._capture, self._new_patient),
            "ai_toggle": (self._toggle_ai, None),
            "disagree": (self._disagree, None),
        }
        for name, (short, long) in actions.items():
            pin = getattr(c, name)
            if pin is None:
                continue
            # DigitalInputDevice, not Button: no hold thread; debounce and long press are ours (on the clock)
            device = gpiozero.DigitalInputDevice(
                pin, pull_up=c.pull_up, bounce_time=None, pin_factory=pin_factory
            )
            self._devices.append(device)
            logic = DebouncedButton(
                name,
                self._guarded(name, short),
                self._guarded(f"{name} (long)", long) if long else None,
                c.debounce_s,
                c.long_press_s,
            )
            device.when_activated = self._edge_handler(logic, True)
            device.when_deactivated = self._edge_handler(logic, False)
            self.buttons[name] = (logic, device)
        for name, cls in (
            ("status_led", gpiozero.LED),
            ("alert_led", gpiozero.LED),
            ("buzzer", gpiozero.Buzzer),
        ):
            pin = getattr(c, name)
            if pin is not None:
                device = cls(pin, pin_factory=pin_factory)
                self._devices.append(device)
                setattr(self, name, device)
        log.info("GPIO: %s", ", ".join(f"{k}={v}" for k, v in c.pins().items()))

    def _edge_handler(self, logic: DebouncedButton, pressed: bool) -> Callable[[], None]:
        def handler() -> None:
            logic.edge(pressed, self.clock())

        return handler

    def _guarded(self, name: str, action: Callable[[], None]) -> Callable[[], None]:
        """A button action that never raises into gpiozero's callback thread."""

        def run() -> None:
            try:
                action()
            except FirmwareAppError as exc:
                log.warning("button %s: %s", name, exc)
            except Exception:  # noqa: BLE001 - a bug behind one button must not kill the others
                log.exception("button %s failed", name)

        return run

    # -- button actions ------------------------------------------------------------------------------
    def _toggle_freeze(self) -> None:
        if self.controls.frozen:
            self.controls.unfreeze()
            log.info("button: unfreeze")
        else:
            self.controls.freeze()
            log.info("button: freeze")

    def _capture(self) -> None:
        log.info("button: capture %s", self.controls.request_capture("button"))

    def _new_patient(self) -> None:
        log.info("button: new patient, study %s", self.controls.new_patient())

    def _toggle_ai(self) -> None:
        enabled = not self.controls.ai_enabled
        self.controls.set_ai(enabled)
        log.info("button: AI %s", "on" if enabled else "off")

    def _disagree(self) -> None:
        log.info("button: disagree, case %s", self.controls.mark_disagree())

    # -- lights ------------------------------------------------------------------------------------
    def set_status(self, status: str) -> None:
        """``starting`` | ``running`` | ``fault`` | ``off``."""
        if status != "off" and status not in STATUS_PATTERNS:
            raise ValueError(f"status {status!r}: use off, {', '.join(STATUS_PATTERNS)}")
        if status == self.status:
            return
        self.status = status
        led = self.status_led
        if led is None:
            return
        pattern = STATUS_PATTERNS.get(status)
        if status == "off":
            led.off()
        elif pattern is None:
            led.on()
        else:
            led.blink(on_time=pattern[0], off_time=pattern[1], background=True)

    def on_result(self, frame: Frame, result: Result) -> None:
        """Pipeline listener: alarm once when a finding episode starts."""
        with self._alert_lock:
            event = self.episodes.update(bool(result.alert), self.clock())
        self._alert_event(event, result)

    def _alert_event(self, event: str | None, result: Result | None = None) -> None:
        if event == "start":
            self.alarms += 1
            log.warning(
                "alert: %s %.2f on frame %d",
                result.label if result else "?",
                (result.confidence or 0.0) if result else 0.0,
                result.frame_id if result else -1,
            )
            if self.alert_led is not None:
                self.alert_led.on()
            if self.buzzer is not None and self.config.alert_beeps:
                on_s, off_s = self.beep_s
                self.buzzer.beep(on_time=on_s, off_time=off_s, n=self.config.alert_beeps, background=True)
        elif event == "end":
            log.info("alert episode over")
            if self.alert_led is not None:
                self.alert_led.off()

    # -- timing --------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Long presses, edges lost to debounce, the end of an alert episode (every ``poll_s``)."""
        now = self.clock()
        for logic, device in self.buttons.values():
            logic.poll(now, bool(device.is_active))
        with self._alert_lock:
            event = self.episodes.poll(now)
        self._alert_event(event)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fwapp-gpio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the lights must not take the daemon down
                log.exception("GPIO poll failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        devices, self._devices = self._devices, []
        for device in devices:
            try:
                device.close()
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.debug("closing %r: %s", device, exc)
        factory, self._own_factory = self._own_factory, None
        if factory is not None:
            try:
                factory.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the pin factory: %s", exc)

    def __enter__(self) -> GpioPanel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
