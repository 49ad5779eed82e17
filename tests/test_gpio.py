"""Buttons and lights on gpiozero's MockFactory, with an injected clock: no hardware, no sleeping for timing."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("gpiozero", reason="gpiozero is the `gpio` extra; pip install 'firmware-app[gpio]'")
from gpiozero.pins.mock import MockFactory  # noqa: E402

from firmware_app.device.controls import FakeControls  # noqa: E402
from firmware_app.device.gpio import (  # noqa: E402
    STATUS_PATTERNS,
    DebouncedButton,
    GpioConfig,
    GpioPanel,
    GpioUnavailable,
    parse_gpio_config,
)
from firmware_app.errors import BadConfig  # noqa: E402
from firmware_app.types import Result  # noqa: E402

PINS = {
    "freeze": 17,
    "capture": 27,
    "ai_toggle": 22,
    "disagree": 23,
    "status_led": 5,
    "alert_led": 6,
    "buzzer": 13,
}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory()
    yield f
    f.reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def controls() -> FakeControls:
    return FakeControls()


@pytest.fixture
def panel(factory, clock, controls) -> Iterator[GpioPanel]:
    config = parse_gpio_config({**PINS, "alert_clear_s": 3.0, "alert_beeps": 2}, "board.toml")
    p = GpioPanel(config, controls, pin_factory=factory, clock=clock, beep_s=(0.01, 0.01))
    yield p
    p.close()


def tap(factory: MockFactory, clock: FakeClock, pin: int, hold_s: float = 0.2) -> None:
    """Press (the button pulls the pin low) and release ``hold_s`` later; the clock ends 1 s after."""
    p = factory.pin(pin)
    p.drive_low()
    clock.t += hold_s
    p.drive_high()
    clock.t += 1.0


def result(alert: bool, frame_id: int = 0) -> Result:
    return Result(
        frame_id=frame_id,
        task="segmentation",
        label="fluid" if alert else None,
        confidence=0.9 if alert else 0.1,
        alert=alert,
    )


def beeps(pin) -> int:
    """Rising edges seen on a mock output pin."""
    return sum(1 for a, b in zip(pin.states, pin.states[1:]) if b.state and not a.state)


def wait_until(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- buttons ---------------------------------------------------------------------------------------


def test_pressing_the_mocked_buttons_freezes_captures_toggles_ai_and_disagrees(
    panel, factory, clock, controls
):
    tap(factory, clock, PINS["freeze"])
    assert controls.frozen
    tap(factory, clock, PINS["freeze"])
    assert not controls.frozen  # the same button unfreezes
    tap(factory, clock, PINS["capture"])
    assert len(controls.captures) == 1 and controls.captures[0].endswith("button")
    tap(factory, clock, PINS["ai_toggle"])
    assert controls.ai_enabled is False
    tap(factory, clock, PINS["ai_toggle"])
    assert controls.ai_enabled is True
    tap(factory, clock, PINS["disagree"])
    assert len(controls.disagreements) == 1
    assert controls.studies == []


def test_freeze_acts_on_press_without_waiting_for_release(panel, factory, clock, controls):
    factory.pin(PINS["freeze"]).drive_low()
    assert controls.frozen


def test_contact_bounce_within_debounce_window_is_one_press(panel, factory, clock, controls):
    pin = factory.pin(PINS["freeze"])
    for _ in range(4):  # a bouncing contact: edges 5 ms apart
        pin.drive_low()
        clock.t += 0.005
        pin.drive_high()
        clock.t += 0.005
    pin.drive_low()  # settles pressed
    clock.t += 0.3
    panel.poll()
    pin.drive_high()
    assert controls.calls.count("freeze") == 1
    assert controls.frozen
    assert panel.buttons["freeze"][0].bounces > 0


def test_long_press_on_capture_starts_a_new_patient_while_held(panel, factory, clock, controls):
    pin = factory.pin(PINS["capture"])
    pin.drive_low()
    clock.t += 1.0
    panel.poll()
    assert controls.studies == []  # not long yet
    clock.t += 0.6
    panel.poll()
    assert len(controls.studies) == 1  # fired at 1.5 s, before release: the user gets it while holding
    clock.t += 2.0
    panel.poll()
    pin.drive_high()
    assert len(controls.studies) == 1
    assert controls.captures == []  # a long press is not also a capture


def test_long_press_is_recognised_on_release_even_without_a_poll(panel, factory, clock, controls):
    tap(factory, clock, PINS["capture"], hold_s=2.0)
    assert len(controls.studies) == 1
    assert controls.captures == []


def test_short_press_on_capture_captures_on_release(panel, factory, clock, controls):
    pin = factory.pin(PINS["capture"])
    pin.drive_low()
    assert controls.captures == []
    clock.t += 0.3
    pin.drive_high()
    assert len(controls.captures) == 1
    assert controls.studies == []


def test_a_release_lost_in_the_bounce_window_is_recovered_by_poll(panel, factory, clock, controls):
    pin = factory.pin(PINS["capture"])
    pin.drive_low()
    clock.t += 0.01  # a 10 ms tap: its release falls inside the debounce window
    pin.drive_high()
    clock.t += 0.05
    panel.poll()  # the pin reads released: the press ends here, as a short press
    clock.t += 5.0
    panel.poll()
    assert len(controls.captures) == 1
    assert controls.studies == []  # never mistaken for a 5 s hold


def test_a_refused_capture_is_logged_and_the_buttons_keep_working(panel, factory, clock, controls, caplog):
    controls.refuse_capture = "capture refused: disk full (12 MB free)"
    tap(factory, clock, PINS["capture"])
    assert "disk full" in caplog.text
    tap(factory, clock, PINS["freeze"])
    assert controls.frozen


def test_debounced_button_logic_alone():
    fired: list[str] = []
    b = DebouncedButton("x", lambda: fired.append("short"), lambda: fired.append("long"), 0.05, 1.0)
    b.edge(True, 0.0)
    b.edge(False, 0.02)  # bounce
    b.edge(True, 0.04)  # bounce
    b.edge(False, 0.5)
    b.edge(True, 1.0)
    b.poll(2.1, level=True)
    b.edge(False, 2.5)
    assert fired == ["short", "long"]


# -- lights ----------------------------------------------------------------------------------------


def test_alert_fires_once_per_finding_episode(panel, factory, clock):
    led, buzzer = factory.pin(PINS["alert_led"]), factory.pin(PINS["buzzer"])
    for i, alert in enumerate([True, True, False, True, True, False, False]):  # flickering finding
        panel.on_result(None, result(alert, i))
        clock.t += 0.2
    assert panel.alarms == 1
    assert led.state  # lit while the episode lasts
    assert wait_until(lambda: beeps(buzzer) == 2 and not buzzer.state)  # two beeps, once

    clock.t += 3.1  # finding absent for alert_clear_s: the episode is over
    panel.poll()
    assert not led.state
    panel.on_result(None, result(True, 99))  # a new finding is a new episode
    assert panel.alarms == 2
    assert led.state
    assert wait_until(lambda: beeps(buzzer) == 4 and not buzzer.state)


def test_frames_without_finding_never_alarm(panel, factory, clock):
    for i in range(20):
        panel.on_result(None, result(False, i))
        clock.t += 0.1
    assert panel.alarms == 0
    assert not factory.pin(PINS["alert_led"]).state


def test_status_led_patterns_are_distinct(panel, factory):
    led = factory.pin(PINS["status_led"])
    assert panel.status == "starting"
    slow, fast = STATUS_PATTERNS["starting"], STATUS_PATTERNS["fault"]
    assert slow is not None and fast is not None and fast[0] < slow[0]
    panel.set_status("running")
    led.clear_states()
    time.sleep(0.05)
    assert led.state and len(led.states) == 1  # steady on
    panel.set_status("fault")
    assert wait_until(lambda: len(led.states) >= 4, timeout=1.0)  # blinking
    panel.set_status("off")
    assert wait_until(lambda: not led.state)
    with pytest.raises(ValueError):
        panel.set_status("blue")


def test_poll_thread_fires_the_long_press(factory, controls):
    config = GpioConfig(capture=27, long_press_s=0.2, debounce_s=0.01)
    with GpioPanel(config, controls, pin_factory=factory, poll_s=0.01) as p:
        p.start()
        factory.pin(27).drive_low()
        assert wait_until(lambda: len(controls.studies) == 1, timeout=2.0)
        factory.pin(27).drive_high()
    assert controls.captures == []


def test_close_twice_is_safe_and_releases_the_pins(factory, controls):
    p = GpioPanel(GpioConfig(freeze=17, status_led=5), controls, pin_factory=factory)
    p.close()
    p.close()
    GpioPanel(GpioConfig(freeze=17, status_led=5), controls, pin_factory=factory).close()  # pins free again


# -- no GPIO -------------------------------------------------------------------------------------


def test_no_usable_pin_factory_raises_gpio_unavailable(monkeypatch, controls):
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "no-such-factory")
    with pytest.raises(GpioUnavailable, match="no-such-factory: not installed.*without buttons and lights"):
        GpioPanel(GpioConfig(freeze=17), controls)


def test_pigpio_is_refused_because_it_talks_tcp(monkeypatch, controls):
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "pigpio")
    with pytest.raises(GpioUnavailable, match="no network"):
        GpioPanel(GpioConfig(freeze=17), controls)


def test_the_default_chain_never_tries_pigpio(monkeypatch):
    from firmware_app.device import gpio

    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    assert "pigpio" not in gpio.LOCAL_FACTORIES
    try:
        factory = gpio.default_pin_factory()  # a Pi: a real factory; elsewhere: GpioUnavailable
    except GpioUnavailable as exc:
        tried = re.findall(r"(?:\(|; )(\w+): ", str(exc))
        assert tried == list(gpio.LOCAL_FACTORIES)
    else:
        factory.close()


def test_missing_gpiozero_raises_gpio_unavailable_naming_the_extra(monkeypatch, controls):
    monkeypatch.setitem(sys.modules, "gpiozero", None)
    with pytest.raises(GpioUnavailable, match=r"firmware-app\[gpio\]"):
        GpioPanel(GpioConfig(freeze=17), controls)


# -- config --------------------------------------------------------------------------------------


def test_gpio_config_defaults_and_pin_names():
    c = parse_gpio_config({"freeze": 17, "capture": "GPIO27"}, "b.toml")
    assert c.pins() == {"freeze": 17, "capture": "GPIO27"}
    assert (c.debounce_s, c.long_press_s, c.alert_clear_s, c.pull_up) == (0.05, 1.5, 3.0, True)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"freez": 17}, r"b\.toml: \[gpio\] freez: unknown key"),
        ({"freeze": 99}, r"b\.toml: \[gpio\] freeze: BCM pin 99 must be 0\.\.53"),
        ({"freeze": True}, r"\[gpio\] freeze: pin must be"),
        ({"freeze": 17, "capture": "gpio17"}, r"\[gpio\] capture: pin gpio17 is already used by freeze"),
        ({"freeze": 17, "long_press_s": 0}, r"\[gpio\] long_press_s: 0 must be 0\.2\.\.10"),
        ({"freeze": 17, "debounce_s": "fast"}, r"\[gpio\] debounce_s: must be a number of seconds"),
        ({"freeze": 17, "alert_beeps": 1.5}, r"\[gpio\] alert_beeps: must be an integer"),
        ({"freeze": 17, "pull_up": 1}, r"\[gpio\] pull_up: must be true or false"),
        ({"long_press_s": 1.0}, r"\[gpio\] names no pin"),
    ],
)
def test_gpio_config_errors_name_file_section_and_key(table, message):
    with pytest.raises(BadConfig, match=message):
        parse_gpio_config(table, "b.toml")
