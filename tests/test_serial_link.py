"""The serial result stream and command set: formats, commands, loop:// and a real socat pty pair."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

serial = pytest.importorskip(
    "serial", reason="pyserial is the `serial` extra; pip install 'firmware-app[serial]'"
)

from firmware_app.device.controls import FakeControls  # noqa: E402
from firmware_app.device.serial_link import (  # noqa: E402
    CommandHandler,
    LineSplitter,
    SerialConfig,
    SerialLink,
    SerialUnavailable,
    hl7_escape,
    mllp,
    parse_serial_config,
    result_hl7,
    result_json,
)
from firmware_app.errors import BadConfig  # noqa: E402
from firmware_app.types import Box, Frame, Result  # noqa: E402

NOW = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=timezone.utc)


def seg_result(frame_id: int = 7, alert: bool = True) -> Result:
    return Result(
        frame_id=frame_id,
        task="segmentation",
        label="fluid",
        confidence=0.87654,
        alert=alert,
        mask=np.ones((4, 4), np.uint8),  # the centroid and area are the mask's
        centroid=(120.04, 64.5),
        area_fraction=0.0123456,
    )


def wait_until(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- formats -------------------------------------------------------------------------------------


def test_result_json_line_is_the_results_stream_record():
    frame = Frame(
        7,
        0,
        np.zeros((100, 200), np.uint8),
        {
            "source": "dicom:/x.dcm",
            "path": "/x.dcm",
            "frame_index": 3,
            "imaging_region": [10, 20, 200, 100],
            "region_from": "dicom",
            "mm_per_px": [0.2, 0.2],
        },
    )
    line = result_json(seg_result(), "us-fluid-seg", "1.0.0", NOW, frame, "litert-cpu")
    assert "\n" not in line
    d = json.loads(line)
    assert d["type"] == "result" and d["time"] == "2026-03-04T05:06:07.890+00:00"
    assert (d["frame_id"], d["model"], d["backend"], d["label"], d["confidence"]) == (
        7,
        "us-fluid-seg@1.0.0",
        "litert-cpu",
        "fluid",
        0.8765,
    )
    assert d["source"] == {"uri": "dicom:/x.dcm", "path": "/x.dcm", "frame_index": 3}
    assert (d["state"], d["alert"], d["region_from"], d["imaging_region"]) == (
        "finding",
        True,
        "dicom",
        [10, 20, 200, 100],
    )


def test_result_json_detection_boxes_in_source_pixels_and_no_finding_is_null():
    det = Result(
        frame_id=1,
        task="detection",
        label="nodule",
        confidence=0.6,
        alert=True,
        state="finding",
        boxes=(Box(1.0, 2.0, 30.0, 40.0, 0.6, "nodule"),),
    )
    frame = Frame(1, 0, np.zeros((50, 50), np.uint8), {"imaging_region": [100, 10, 50, 50]})
    assert json.loads(result_json(det, "m", "2", NOW, frame))["boxes"] == [
        {"x0": 101.0, "y0": 12.0, "x1": 130.0, "y1": 50.0, "score": 0.6, "label": "nodule"}
    ]
    empty = json.loads(result_json(Result(2, "classification", None, None), "m", "2", NOW))
    assert (empty["label"], empty["confidence"], empty["boxes"], empty["alert"], empty["state"]) == (
        None,
        None,
        [],
        False,
        "no_finding",
    )


def test_hl7_escape_covers_delimiters_and_control_characters():
    assert hl7_escape(r"a|b^c&d~e\f") == r"a\F\b\S\c\T\d\R\e\E\f"
    assert hl7_escape("x\ry\n") == "x\\X0D\\y\\X0A\\"


def test_hl7_oru_r01_is_mllp_framed_without_patient_identifiers():
    det = Result(
        frame_id=42,
        task="detection",
        label="fluid|free",  # a delimiter in a label must be escaped
        confidence=0.9,
        alert=True,
        boxes=(Box(1, 2, 3, 4, 0.9, "fluid|free"),),
    )
    framed = mllp(result_hl7(det, "us^seg", "1.0.0", NOW, "20260304050607000001", facility="WARD 3"))
    assert framed.startswith(b"\x0b") and framed.endswith(b"\x1c\r")
    body = framed[1:-2].decode()
    assert body.endswith("\r")
    segments = body.rstrip("\r").split("\r")
    names = [s[:3] for s in segments]
    assert names[:2] == ["MSH", "OBR"] and set(names[2:]) == {"OBX"}
    assert "PID" not in names  # anonymous observation: ORU^R01's PATIENT group is optional
    msh = segments[0].split("|")
    assert msh[1] == "^~\\&"  # MSH-2
    assert msh[2] == "FIRMWARE-APP" and msh[3] == "WARD 3"
    assert msh[6] == "20260304050607.890+0000"  # MSH-7
    assert msh[8] == "ORU^R01^ORU_R01"  # MSH-9
    assert msh[9] == "20260304050607000001"  # MSH-10
    assert (msh[10], msh[11], msh[14], msh[15]) == ("P", "2.5.1", "NE", "NE")
    obr = segments[1].split("|")
    assert obr[3] == "42^FIRMWARE-APP" and obr[7] == "20260304050607.890+0000" and obr[25] == "P"
    obx = {s.split("|")[3].split("^")[0] + s.split("|")[4]: s.split("|") for s in segments[2:]}
    assert obx["MODEL"][5] == "us\\S\\seg 1.0.0"
    assert obx["FINDING"][2] == "ST" and obx["FINDING"][5] == "fluid\\F\\free" and obx["FINDING"][8] == "A"
    assert obx["CONFIDENCE"][2] == "NM" and obx["CONFIDENCE"][5] == "0.9"
    assert obx["ALERT"][5] == "Y"
    assert obx["BOX1"][2] == "NA" and obx["BOX1"][5] == "1^2^3^4"
    assert obx["BOX_LABEL1"][5] == "fluid\\F\\free"
    assert [int(s.split("|")[1]) for s in segments[2:]] == list(range(1, len(segments) - 1))
    assert all(s.split("|")[11] == "P" for s in segments[2:])
    assert b"\x0b" not in framed[1:] and b"\x1c" not in framed[:-2]


# -- commands --------------------------------------------------------------------------------------


def test_each_command_gets_a_json_reply():
    c = FakeControls(models={"us-fluid-seg": "1.0.0", "cxr-nodule": "2.1.0"})
    h = CommandHandler(c)
    assert h.handle("status") == {"ok": True, "cmd": "status", **c.status()}
    assert h.handle("freeze") == {"ok": True, "cmd": "freeze", "frozen": True}
    assert h.handle("UNFREEZE\r") == {"ok": True, "cmd": "unfreeze", "frozen": False}
    assert h.handle("capture")["capture_id"] == c.captures[-1]
    assert h.handle("disagree")["case_id"] == c.disagreements[-1]
    assert h.handle("new patient") == {"ok": True, "cmd": "new patient", "study_id": c.studies[-1]}
    assert h.handle("ai off") == {"ok": True, "cmd": "ai", "ai": False}
    assert h.handle("ai ON") == {"ok": True, "cmd": "ai", "ai": True}
    assert h.handle("model cxr-nodule") == {"ok": True, "cmd": "model", "model": "cxr-nodule 2.1.0"}
    assert h.handle("threshold 0.6") == {
        "ok": True,
        "cmd": "threshold",
        "threshold": 0.6,
        "requested": 0.6,
        "clamped": False,
    }
    assert h.handle("threshold 0.99")["threshold"] == 0.9  # clamped to the manifest's bounds
    assert h.handle("threshold 0.99")["clamped"] is True
    assert "threshold VALUE" in h.handle("help")["commands"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("reboot", "unknown command 'reboot'; try help"),
        ("model", "usage: model ID"),
        ("model a b", "usage: model ID"),
        ("model nope", "model 'nope' not installed"),
        ("threshold", "usage: threshold VALUE"),
        ("threshold high", "threshold: 'high' is not a number"),
        ("threshold nan", "not a finite number"),
        ("ai maybe", "usage: ai on|off"),
        ("freeze now", "freeze takes no argument"),
        ("\x00\x01\x7f", "unknown command"),
    ],
)
def test_malformed_and_unknown_commands_get_a_clear_error_reply(line, error):
    reply = CommandHandler(FakeControls()).handle(line)
    assert reply is not None and reply["ok"] is False
    assert error in reply["error"]


def test_a_refused_capture_replies_with_the_reason():
    c = FakeControls()
    c.refuse_capture = "capture refused: disk full"
    assert CommandHandler(c).handle("capture") == {
        "ok": False,
        "cmd": "capture",
        "error": "capture refused: disk full",
    }


def test_non_utf8_empty_and_echoed_lines():
    h = CommandHandler(FakeControls())
    assert h.handle_bytes(b"\xff\xfe status") == {"ok": False, "error": "not UTF-8 text (9 bytes ignored)"}
    assert h.handle("   ") is None
    assert h.handle('{"ok":true,"cmd":"status"}') is None  # our own output echoed back: no reply storm


def test_line_splitter_takes_cr_lf_crlf_and_discards_over_long_lines_once():
    s = LineSplitter(max_line=8)
    assert list(s.feed(b"status\r\nfreeze\rcap")) == [b"status", b"freeze"]
    assert list(s.feed(b"ture\n")) == [b"capture"]
    out = list(s.feed(b"x" * 30))
    assert out == [None]  # one "too long", not one per byte
    assert list(s.feed(b"y" * 30 + b"\nhelp\n")) == [b"help"]


# -- config --------------------------------------------------------------------------------------


def test_serial_config_defaults_and_hl7_turns_commands_off():
    c = parse_serial_config({"port": "/dev/ttyUSB0"}, "b.toml")
    assert (c.baud, c.format, c.commands, c.max_line) == (115200, "json", True, 256)
    assert parse_serial_config({"format": "hl7"}, "b.toml").commands is False


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"speed": 9600}, r"b\.toml: \[serial\] speed: unknown key"),
        ({"baud": 12345}, r"b\.toml: \[serial\] baud: 12345 must be one of"),
        ({"baud": "fast"}, r"\[serial\] baud: wrong type str"),
        ({"format": "xml"}, r"\[serial\] format: 'xml' must be json or hl7"),
        ({"port": "socket://10.0.0.1:7000"}, r"\[serial\] port: .* must be a device path"),
        ({"port": "rfc2217://host:1"}, r"\[serial\] port: .* must be a device path"),
        ({"format": "hl7", "commands": True}, r"\[serial\] commands: the command set needs format"),
        ({"max_line": 4}, r"\[serial\] max_line: 4 must be 32\.\.4096"),
        ({"commands": "yes"}, r"\[serial\] commands: wrong type"),
    ],
)
def test_serial_config_errors_name_file_section_and_key(table, message):
    with pytest.raises(BadConfig, match=message):
        parse_serial_config(table, "b.toml")


# -- over loop:// ----------------------------------------------------------------------------------


class LoopPort:
    """pyserial's loop:// port, recording what the link writes; ``inject`` plays the far end typing.

    loop:// is one FIFO that queues byte by byte: a lock keeps an injected block and a reply of the link
    from interleaving.
    """

    def __init__(self) -> None:
        self.port = serial.serial_for_url("loop://", timeout=0.05)
        self.written = bytearray()
        self._write = self.port.write
        self._lock = threading.Lock()
        self.port.write = self._record

    def _record(self, data: bytes) -> int:
        with self._lock:
            self.written += data
            return self._write(data)

    def inject(self, data: bytes) -> None:
        with self._lock:
            self._write(data)

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in bytes(self.written).splitlines() if x]


@pytest.fixture
def loop_link() -> Iterator[tuple[SerialLink, LoopPort, FakeControls]]:
    loop = LoopPort()
    controls = FakeControls()
    link = SerialLink(SerialConfig(port="loop://"), controls, opener=lambda _c: loop.port, now=lambda: NOW)
    link.start()
    assert wait_until(lambda: link.connected)
    yield link, loop, controls
    link.stop()


def test_loop_one_json_line_per_result_and_a_reply_per_command(loop_link):
    link, loop, controls = loop_link
    for i in range(5):
        link.on_result(None, seg_result(i, alert=i % 2 == 0))
    assert wait_until(lambda: link.counters.results_sent == 5)
    loop.inject(b"freeze\nthreshold 0.7\nbogus\n")
    assert wait_until(lambda: link.counters.replies_sent == 3)
    time.sleep(0.1)  # our own lines came back through the loop: they must not trigger replies
    lines = loop.lines()
    results = [x for x in lines if x.get("type") == "result"]
    replies = [x for x in lines if "ok" in x]
    assert [r["frame_id"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["alert"] for r in results] == [True, False, True, False, True]
    assert replies[0] == {"ok": True, "cmd": "freeze", "frozen": True}
    assert replies[1]["threshold"] == 0.7
    assert replies[2]["ok"] is False and "unknown command 'bogus'" in replies[2]["error"]
    assert len(lines) == 8
    assert controls.frozen


def test_loop_hl7_stream_is_one_mllp_frame_per_result():
    loop = LoopPort()
    config = parse_serial_config({"port": "loop://", "format": "hl7"}, "b.toml")
    with SerialLink(config, FakeControls(), opener=lambda _c: loop.port, now=lambda: NOW) as link:
        assert wait_until(lambda: link.connected)
        for i in range(3):
            link.on_result(None, seg_result(i))
        assert wait_until(lambda: link.counters.results_sent == 3)
        time.sleep(0.1)  # the frames echoed back are discarded, never answered
    frames = bytes(loop.written).split(b"\x1c\r")
    assert len(frames) == 4 and frames[-1] == b""
    ids = {f.decode().split("\r")[0].split("|")[9] for f in frames[:-1]}
    assert len(ids) == 3  # unique message control ids
    assert link.counters.replies_sent == 0


def test_garbage_and_over_long_lines_do_not_stop_the_link(loop_link):
    link, loop, _controls = loop_link
    loop.inject(b"\xff\xfe\xfd\n" + bytes(range(1, 10)) + b"\n" + b"A" * 5000 + b"\nstatus\n")
    assert wait_until(lambda: link.counters.replies_sent == 4)
    replies = [x for x in loop.lines() if "ok" in x]
    assert "not UTF-8" in replies[0]["error"]
    assert "unknown command" in replies[1]["error"]
    assert "longer than 256 bytes" in replies[2]["error"]
    assert replies[3]["ok"] is True and replies[3]["cmd"] == "status"
    assert all(t.is_alive() for t in link._threads)


class FlakyOpener:
    """Fails ``failures`` times (device absent), then opens a loop:// port."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.loop = LoopPort()

    def __call__(self, _config: SerialConfig):
        self.calls += 1
        if self.calls <= self.failures:
            raise serial.SerialException("[Errno 2] could not open port /dev/ttyUSB0: No such file")
        return self.loop.port


def test_an_absent_port_is_retried_with_back_off_until_it_appears(caplog):
    opener = FlakyOpener(failures=3)
    config = SerialConfig(port="/dev/ttyUSB0", reopen_max_s=0.3)
    with SerialLink(config, FakeControls(), opener=opener) as link:
        link.on_result(None, seg_result())  # not connected yet: dropped, not blocked, not raised
        assert wait_until(lambda: link.connected, timeout=5.0)
        assert opener.calls == 4
    assert link.counters.dropped >= 1
    assert caplog.text.count("cannot open /dev/ttyUSB0") == 1  # announced once, not every retry


class VanishingPort:
    """A port that works, then fails every read and write: a USB adapter pulled out."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.closed = False

    @property
    def in_waiting(self) -> int:
        if self.gone.is_set():
            raise OSError(5, "Input/output error")
        return 0

    def read(self, n: int) -> bytes:
        if self.gone.is_set():
            raise serial.SerialException("device reports readiness to read but returned no data")
        time.sleep(0.01)
        return b""

    def write(self, data: bytes) -> int:
        if self.gone.is_set():
            raise serial.SerialException("write failed: [Errno 5] Input/output error")
        return len(data)

    def close(self) -> None:
        self.closed = True


def test_a_port_that_vanishes_mid_run_is_reopened():
    ports = [VanishingPort(), LoopPort()]
    opened = []

    def opener(_config):
        if not ports:
            raise serial.SerialException("no such device")
        opened.append(ports.pop(0))
        return opened[-1] if isinstance(opened[-1], VanishingPort) else opened[-1].port

    config = SerialConfig(port="/dev/ttyUSB0", reopen_max_s=0.2)
    with SerialLink(config, FakeControls(), opener=opener) as link:
        assert wait_until(lambda: link.connected)
        opened[0].gone.set()
        link.on_result(None, seg_result(1))
        assert wait_until(lambda: len(opened) == 2 and link.connected)
        assert opened[0].closed
        link.on_result(None, seg_result(2))
        assert wait_until(lambda: any(x.get("frame_id") == 2 for x in opened[1].lines()))
    assert link.counters.disconnects == 1


class StuckPort:
    """The peer stopped reading: every write times out after a while."""

    in_waiting = 0

    def read(self, n: int) -> bytes:
        time.sleep(0.02)
        return b""

    def write(self, data: bytes) -> int:
        time.sleep(0.05)
        raise serial.SerialTimeoutException("Write timeout")

    def close(self) -> None:
        pass


def test_on_result_never_blocks_the_inference_thread_when_the_peer_stops_reading():
    with SerialLink(SerialConfig(port="/dev/ttyUSB0"), FakeControls(), opener=lambda _c: StuckPort()) as link:
        assert wait_until(lambda: link.connected)
        t0 = time.monotonic()
        for i in range(500):
            link.on_result(None, seg_result(i))
        assert time.monotonic() - t0 < 0.5
        assert link.connected  # a write timeout drops the message, not the port
    assert link.counters.dropped >= 400


def test_missing_pyserial_is_a_named_error(monkeypatch):
    from firmware_app.device import serial_link

    monkeypatch.setattr(serial_link, "serial", None)
    with pytest.raises(SerialUnavailable, match=r"firmware-app\[serial\]"):
        SerialLink(SerialConfig(), FakeControls())


def test_stop_is_prompt_and_safe_twice():
    link = SerialLink(SerialConfig(port="/dev/nonexistent-tty"), FakeControls())
    link.start()
    t0 = time.monotonic()
    link.stop()
    link.stop()
    assert time.monotonic() - t0 < 1.5


# -- over a socat pty pair -----------------------------------------------------------------------


def start_socat(*addresses: str) -> tuple[subprocess.Popen, list[str]]:
    """socat between two ptys; returns the process and the two pty paths read from its stderr."""
    proc = subprocess.Popen(["socat", "-d", "-d", *addresses], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    fd, text, paths = proc.stderr.fileno(), "", []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and "starting data transfer loop" not in text:
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 4096)  # unbuffered: a buffered readline would hide lines from select
            if not chunk:
                break
            text += chunk.decode(errors="replace")
    paths = re.findall(r"PTY is (\S+)", text)
    if "starting data transfer loop" not in text:
        proc.kill()
        raise RuntimeError(f"socat did not start: {text.strip()[-300:]}")
    return proc, paths


@pytest.fixture
def socat_pair() -> Iterator[tuple[str, str]]:
    if shutil.which("socat") is None:
        pytest.skip("socat not installed (apt-get install socat): pty-pair tests skipped")
    proc, paths = start_socat("pty,raw,echo=0", "pty,raw,echo=0")
    assert len(paths) == 2
    yield paths[0], paths[1]
    proc.terminate()
    proc.wait(5)


def read_json_lines(client, n: int, timeout: float = 3.0) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        line = client.readline()
        if line:
            out.append(json.loads(line))
    return out


def test_pty_client_receives_one_json_line_per_result_and_a_reply_to_each_command(socat_pair):
    dev, client_path = socat_pair
    controls = FakeControls(models={"us-fluid-seg": "1.0.0", "cxr-nodule": "2.1.0"})
    link = SerialLink(SerialConfig(port=dev), controls, now=lambda: NOW)
    client = serial.Serial(client_path, 115200, timeout=0.5)
    with link:
        assert wait_until(lambda: link.connected)
        for i in range(10):
            link.on_result(None, seg_result(i))
        results = read_json_lines(client, 10)
        assert [r["frame_id"] for r in results] == list(range(10))
        assert all(r["type"] == "result" and r["model"] == "us-fluid-seg@1.0.0" for r in results)

        commands = [
            "status",
            "freeze",
            "unfreeze",
            "capture",
            "model cxr-nodule",
            "threshold 0.55",
            "ai off",
            "ai on",
            "new patient",
            "disagree",
            "help",
            "model",
            "launch rockets",
        ]
        client.write(("\r\n".join(commands) + "\r\n").encode())
        replies = read_json_lines(client, len(commands))
        assert [r.get("cmd") for r in replies] == [
            c.split()[0] if c != "new patient" else c for c in commands
        ]
        assert [r["ok"] for r in replies] == [True] * 11 + [False, False]
        assert replies[4]["model"] == "cxr-nodule 2.1.0"
        assert replies[5]["threshold"] == 0.55
        assert controls.threshold == 0.55 and controls.model == "cxr-nodule"
    client.close()


def test_pty_garbage_over_long_lines_and_non_utf8_leave_the_port_working(socat_pair):
    dev, client_path = socat_pair
    link = SerialLink(SerialConfig(port=dev), FakeControls())
    client = serial.Serial(client_path, 115200, timeout=0.5)
    with link:
        assert wait_until(lambda: link.connected)
        client.write(bytes(range(256)) + b"\n")  # line noise
        client.write(b"Z" * 2000 + b"\n")
        client.write("threshold 0,5\n".encode("latin-1") + b"\xe9\xe8\n")
        client.write(b"status\n")
        replies = read_json_lines(client, 6)
        assert [r["ok"] for r in replies][-1] is True and replies[-1]["cmd"] == "status"
        assert any("longer than 256 bytes" in r.get("error", "") for r in replies)
        assert any("not UTF-8" in r.get("error", "") for r in replies)
        assert any("not a number" in r.get("error", "") for r in replies)
    client.close()


def test_pty_disconnect_and_reconnect(tmp_path: Path):
    if shutil.which("socat") is None:
        pytest.skip("socat not installed (apt-get install socat): pty-pair tests skipped")
    dev, cli = tmp_path / "ttyDEV", tmp_path / "ttyCLIENT"
    pair = (f"pty,raw,echo=0,link={dev}", f"pty,raw,echo=0,link={cli}")
    proc, _ = start_socat(*pair)
    link = SerialLink(SerialConfig(port=str(dev), reopen_max_s=0.2), FakeControls())
    try:
        with link:
            assert wait_until(lambda: link.connected)
            proc.terminate()  # the cable is pulled: both ptys vanish
            proc.wait(5)
            assert wait_until(lambda: not link.connected)
            for i in range(5):
                link.on_result(None, seg_result(i))  # dropped; no exception, no blocking
            proc, _ = start_socat(*pair)  # plugged back in
            assert wait_until(lambda: link.connected, timeout=5.0)
            client = serial.Serial(str(cli), 115200, timeout=0.5)
            client.write(b"status\n")
            assert read_json_lines(client, 1)[0]["ok"] is True
            client.close()
        assert link.counters.disconnects >= 1 and link.counters.connects >= 2
    finally:
        proc.terminate()
        proc.wait(5)
