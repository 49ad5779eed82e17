"""The whole appliance: pipeline + recorder + audit + buttons + systemd notify + staged updates."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pydicom
import pytest

from firmware_app.config import load_board
from firmware_app.daemon import Daemon
from firmware_app.device.gpio import parse_gpio_config
from firmware_app.device.sdnotify import Notifier
from firmware_app.errors import BadModel
from firmware_app.records.drift import reference_stats
from firmware_app.sources.phantom import UltrasoundPhantom

FAST = "synthetic:ultrasound?fps=0&width=160&height=120"


def board(**changes):
    b = load_board("x86-dev")
    return dataclasses.replace(b, **changes)


def wait_for(pred, timeout=5.0):
    t0 = time.monotonic()
    while not pred() and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return pred()


def test_capture_every_k_then_export_and_audit_verify(tmp_path, float_model_dir, capsys):
    from firmware_app.cli import main

    data = tmp_path / "data"
    d = Daemon(
        board(),
        data,
        model_ref=str(float_model_dir),
        source_uri=FAST,
        display_uris=["null"],
        max_frames=9,
        capture_every=3,
    )
    stats = d.run()
    assert stats["frames_inferred"] == 9 and stats["mismatched_overlays"] == 0
    assert len(d.recorder.list_captures()) == 3
    assert main(["--data-dir", str(data), "audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "intact" in out
    events = [line for f in sorted((data / "audit").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert any('"start"' in e for e in events) and any('"stop"' in e for e in events)
    stick = tmp_path / "stick"
    stick.mkdir()
    assert main(["--data-dir", str(data), "export", "--to", str(stick)]) == 0
    dicomdir = pydicom.dcmread(stick / "DICOMDIR")
    assert len(dicomdir.DirectoryRecordSequence) > 3


def test_buttons_drive_the_running_daemon(tmp_path, float_model_dir):
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    gpio = parse_gpio_config({"freeze": 17, "capture": 27, "ai_toggle": 22, "status_led": 5}, "test")
    d = Daemon(
        board(gpio=gpio),
        tmp_path / "data",
        model_ref=str(float_model_dir),
        source_uri="synthetic:ultrasound?fps=30&width=160&height=120",
        display_uris=["null"],
        pin_factory=factory,
    )
    d.start()
    try:
        assert wait_for(lambda: d.pipeline.counters.frames_inferred >= 2)
        pin = factory.pin(17)
        pin.drive_low()
        assert wait_for(lambda: d.frozen)
        time.sleep(0.2)
        pin.drive_high()
        time.sleep(0.3)
        pin.drive_low()  # the same button unfreezes
        assert wait_for(lambda: not d.frozen)
        time.sleep(0.2)
        pin.drive_high()
        factory.pin(27).drive_low()
        time.sleep(0.2)
        factory.pin(27).drive_high()
        assert wait_for(lambda: len(d.recorder.list_captures()) == 1)
        factory.pin(22).drive_low()
        assert wait_for(lambda: not d.ai_enabled)
    finally:
        d.close()


def test_notify_ready_and_stopping_reach_systemd(tmp_path, float_model_dir):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    d = Daemon(
        board(),
        tmp_path / "data",
        model_ref=str(float_model_dir),
        source_uri=FAST,
        display_uris=["null"],
        max_frames=3,
        notifier=notifier,
    )
    d.run()
    got = [sock.recv(4096).decode() for _ in range(2)]
    sock.close()
    assert "READY=1" in got[0] and "STOPPING=1" in got[1]


def test_unknown_model_switch_is_refused_and_the_old_model_keeps_running(tmp_path, float_model_dir):
    d = Daemon(
        board(), tmp_path / "data", model_ref=str(float_model_dir), source_uri=FAST, display_uris=["null"]
    )
    with pytest.raises(BadModel):
        d.switch_model("no-such-model")
    assert d.status()["model"] == "selfie-seg"
    assert d.set_threshold(0.99) == 0.9  # clamped to the manifest's bounds


def test_silent_trial_records_but_shows_only_the_image(tmp_path, float_model_dir):
    d = Daemon(
        board(),
        tmp_path / "data",
        model_ref=str(float_model_dir),
        source_uri=FAST,
        display_uris=["null"],
        max_frames=4,
        capture_every=2,
        silent_trial=True,
    )
    states = []
    render = d.pipeline.screen.render
    d.pipeline.screen.render = lambda s: (states.append(s), render(s))[1]
    d.run()
    assert states and all(s.silent_trial for s in states)
    assert len(d.recorder.list_captures()) == 2


def test_drift_warning_for_input_unlike_the_training_data(tmp_path, float_model_dir):
    ph = UltrasoundPhantom(160, 120, seed=1)
    ref = reference_stats([ph.render(t)[0] for t in range(20)])
    manifest = float_model_dir / "manifest.toml"
    from firmware_app.records.drift import reference_toml

    manifest.write_text(manifest.read_text() + "\n" + reference_toml(ref))
    d = Daemon(
        board(),
        tmp_path / "data",
        model_ref=str(float_model_dir),
        source_uri="synthetic:xray?fps=0&width=160&height=120",
        display_uris=["null"],
        max_frames=40,
    )
    d.run()
    assert d.pipeline.input_warning == "INPUT UNLIKE TRAINING DATA"
    d2 = Daemon(
        board(),
        tmp_path / "data2",
        model_ref=str(float_model_dir),
        source_uri="synthetic:ultrasound?fps=0&width=160&height=120&seed=5",
        display_uris=["null"],
        max_frames=40,
    )
    d2.run()
    assert d2.pipeline.input_warning is None


def test_read_only_data_dir_keeps_images_running(tmp_path, float_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    d = Daemon(
        board(),
        blocker / "data",
        model_ref=str(float_model_dir),
        source_uri=FAST,
        display_uris=["null"],
        max_frames=3,
    )
    stats = d.run()
    assert stats["frames_inferred"] == 3 and d.recorder is None
    assert any("captures, updates and the audit log are off" in m for m in d.pipeline.messages())


def test_staged_bundle_is_installed_and_switched_in(tmp_path, float_model_dir, monkeypatch):
    from update_kit import make_kit

    import firmware_app.daemon as daemon_mod

    kit = make_kit(tmp_path, monkeypatch)
    monkeypatch.setattr(daemon_mod, "STAGING_POLL_S", 0.1)
    bundle = kit.bundle("1.2.0", sequence=5)
    staging = kit.data / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    d = Daemon(
        board(),
        kit.data,
        model_ref=str(float_model_dir),
        source_uri="synthetic:ultrasound?fps=20&width=160&height=120",
        display_uris=["null"],
    )
    d.start()
    try:
        (staging / "update.fwb").write_bytes(Path(bundle).read_bytes())
        assert wait_for(lambda: any("installed" in m for m in d.pipeline.messages()), timeout=20)
        assert wait_for(lambda: d.status()["version"] == "1.2.0")  # the running model was switched in
    finally:
        d.close()
    assert not (staging / "update.fwb").exists()
    assert d.pipeline.stats()["errors"] == 0


def test_export_stick_gets_the_captures_when_plugged_in(tmp_path, float_model_dir, monkeypatch):
    """The USB hook: a stick with firmware-app-export.toml is remounted read-write and exported to."""
    import firmware_app.update.staging as staging

    data = tmp_path / "data"
    Daemon(
        board(),
        data,
        model_ref=str(float_model_dir),
        source_uri=FAST,
        display_uris=["null"],
        max_frames=4,
        capture_every=2,
    ).run()
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "firmware-app-export.toml").write_text("deidentify = true\n")
    mounts = []
    assert staging.export_device("/dev/sdz1", data, stick, run=lambda cmd, **kw: mounts.append(cmd[0])) == 0
    assert mounts == ["mount", "umount"]
    ds = pydicom.dcmread(stick / "DICOMDIR")
    assert len(ds.DirectoryRecordSequence) > 2


def test_a_whole_board_on_mock_devices_no_monkeypatching(tmp_path, float_model_dir):
    """rpi4-cpu (buttons, lights, serial) composed on Devices.mock(): every sink runs on its double."""
    from firmware_app.compose import compose  # noqa: F401  (the daemon is built by it)
    from firmware_app.config import load_board
    from firmware_app.device.devices import Devices
    from firmware_app.sinks import LinkSink, PanelSink, WatchdogSink

    devices = Devices.mock(clock=time.monotonic)
    d = Daemon(
        load_board("rpi4-cpu"),
        tmp_path / "data",
        model_ref=str(float_model_dir),
        source_uri="synthetic:ultrasound?fps=30",  # 640x480: the board crops it,
        display_uris=["null"],
        devices=devices,
    )
    kinds = {type(s) for s in d.pipeline.sinks}
    assert {PanelSink, LinkSink, WatchdogSink} <= kinds and d.recorder is not None
    d.start()
    try:
        assert wait_for(lambda: d.pipeline.counters.frames_inferred >= 3)
        link = next(s for s in d.pipeline.sinks if isinstance(s, LinkSink)).link
        assert wait_for(lambda: link.counters.results_sent >= 2)  # over the loop:// double
        devices.pin_factory.pin(17).drive_low()  # freeze, on the mock pins
        assert wait_for(lambda: d.frozen)
    finally:
        d.close()


def test_the_pipeline_reads_the_injected_clock_for_notices(tmp_path, float_model_dir):
    from firmware_app.device.devices import ManualClock

    clock = ManualClock()
    d = Daemon(
        board(),
        tmp_path / "data",
        model_ref=str(float_model_dir),
        source_uri="synthetic:ultrasound?fps=0&width=160&height=120",
        display_uris=["null"],
        clock=clock,
    )
    d.pipeline.notify("hello")
    assert "hello" in d.pipeline.messages()
    clock.advance(60.0)
    assert "hello" not in d.pipeline.messages()  # notices last 15 s of the box's clock
