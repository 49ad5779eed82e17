"""The serial line to a patient monitor or a PC (pyserial): a result stream and a small command set.

Out: one line per result.
  format = "json": ``{"type": "result", ...}`` and the results-stream record (``records.results_stream``).
  No patient identifiers.
  format = "hl7": HL7 v2.5.1 ORU^R01 in MLLP framing (0x0B message 0x1C 0x0D). No patient identifiers are
  known, so the optional PATIENT group (PID) is left out, which ORU^R01 allows: an anonymous observation
  (MSH, OBR, OBX). The OBX are read from the result's shapes and measurements, never from its task: model,
  finding, confidence, alert, the finding's centroid and a mask's area fraction, each box (BOX, BOX_LABEL,
  BOX_SCORE) and point (POINT, POINT_LABEL, POINT_SCORE), then each measurement (MEAS_<NAME>, UCUM unit). MSH-15/16 = NE: the receiver sends no acknowledgements; anything it sends is discarded.

In (json only, ``commands = true``): one command per line (CR, LF or CRLF), each answered by one JSON line
``{"ok": true, "cmd": ..., ...}`` or ``{"ok": false, "cmd": ..., "error": "..."}``:
  status | freeze | unfreeze | capture | disagree | new patient | ai on|off | model ID | threshold VALUE | help
Malformed, unknown, non-UTF-8 and over-long lines (``max_line`` bytes: the rest is discarded up to the
newline, one error reply) get an error reply. A line starting with '{' is ignored without a reply: it is our
own output echoed back (a terminal with local echo), and answering it would start a reply storm.

Robustness: a reader thread owns the port, opens it and, when it vanishes (USB unplugged), reopens it with
back-off up to ``reopen_max_s``; a writer thread drains a bounded queue, so ``on_result`` (called on the
inference thread) never blocks: when the peer stops reading or the port is gone, results are dropped and
counted. Nothing here raises into the daemon.

Only device paths and ``loop://`` (tests) are accepted as ports: pyserial's socket:// and rfc2217:// would
open network sockets, which this device never does.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from firmware_app.device.controls import Controls
from firmware_app.errors import BadConfig, FirmwareAppError
from firmware_app.types import Frame, Result

try:
    import serial
except ImportError:  # the `serial` extra is absent: SerialLink says so when it is made
    serial = None

log = logging.getLogger(__name__)

FORMATS = ("json", "hl7")
MLLP_START, MLLP_END = b"\x0b", b"\x1c\r"
# command -> its usage; a command whose usage is its own name takes no argument
USAGE = {
    "status": "status",
    "freeze": "freeze",
    "unfreeze": "unfreeze",
    "capture": "capture",
    "disagree": "disagree",
    "new patient": "new patient",
    "ai": "ai on|off",
    "model": "model ID",
    "threshold": "threshold VALUE",
    "help": "help",
}
COMMANDS = tuple(USAGE.values())
READ_TIMEOUT_S = 0.2
WRITE_TIMEOUT_S = 1.0


class SerialUnavailable(FirmwareAppError):
    """pyserial is not installed; the daemon runs without the serial link. (An absent port is not this:
    the link keeps retrying it.)"""


@dataclass(frozen=True)
class SerialConfig:
    port: str = "/dev/ttyUSB0"
    baud: int = 115200
    format: str = "json"
    commands: bool = True
    max_line: int = 256
    reopen_max_s: float = 5.0
    facility: str = ""  # HL7 MSH-4 sending facility (a site code, never a patient's)


_BAUDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


def parse_serial_config(table: dict[str, Any], where: str) -> SerialConfig:
    """The ``[serial]`` table of a board config; BadConfig ``"file: [serial] key: problem"`` on anything wrong."""
    types: dict[str, type | tuple[type, ...]] = {
        "port": str,
        "baud": int,
        "format": str,
        "commands": bool,
        "max_line": int,
        "reopen_max_s": (int, float),
        "facility": str,
    }
    known = [f.name for f in fields(SerialConfig)]
    for key, value in table.items():
        if key not in types:
            raise BadConfig(f"{where}: [serial] {key}: unknown key; allowed: {', '.join(known)}")
        if (isinstance(value, bool) and types[key] is not bool) or not isinstance(value, types[key]):
            raise BadConfig(f"{where}: [serial] {key}: wrong type {type(value).__name__} ({value!r})")
    c = SerialConfig(**table)
    if not (c.port.startswith("/") or c.port == "loop://"):
        raise BadConfig(f"{where}: [serial] port: {c.port!r} must be a device path like /dev/ttyUSB0")
    if c.baud not in _BAUDS:
        raise BadConfig(f"{where}: [serial] baud: {c.baud} must be one of {', '.join(map(str, _BAUDS))}")
    if c.format not in FORMATS:
        raise BadConfig(f"{where}: [serial] format: {c.format!r} must be json or hl7")
    if c.format == "hl7":
        if table.get("commands") is True:
            raise BadConfig(f'{where}: [serial] commands: the command set needs format = "json"')
        c = SerialConfig(**{**table, "commands": False})
    if not 32 <= c.max_line <= 4096:
        raise BadConfig(f"{where}: [serial] max_line: {c.max_line} must be 32..4096 bytes")
    if not (math.isfinite(c.reopen_max_s) and 0.1 <= c.reopen_max_s <= 300):
        raise BadConfig(f"{where}: [serial] reopen_max_s: {c.reopen_max_s} must be 0.1..300 seconds")
    return c


# -- result formats ---------------------------------------------------------------------------------


def result_json(
    result: Result,
    model: str,
    version: str,
    now: datetime,
    frame: Frame | None = None,
    backend: str = "",
    shown: bool = True,
) -> str:
    """One JSON line (no newline) for a result: the results-stream record (records.results_stream)."""
    from firmware_app.records.results_stream import result_record

    record = result_record(frame, result, model=f"{model}@{version}", backend=backend, shown=shown, now=now)
    return json.dumps({"type": "result", **record}, separators=(",", ":"))


def hl7_escape(text: str) -> str:
    """HL7 v2 escaping of a text value: the delimiters |^~\\& and control characters."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\E\\")
        elif ch == "|":
            out.append("\\F\\")
        elif ch == "^":
            out.append("\\S\\")
        elif ch == "&":
            out.append("\\T\\")
        elif ch == "~":
            out.append("\\R\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\X{ord(ch):02X}\\")
        else:
            out.append(ch)
    return "".join(out)


def _segment(name: str, values: dict[int, str]) -> str:
    """A segment with field N at position N (1-based), the rest empty."""
    fields_ = [""] * max(values)
    for i, v in values.items():
        fields_[i - 1] = v
    return "|".join([name, *fields_])


def _ts(now: datetime) -> str:
    t = now.astimezone(timezone.utc)
    return t.strftime("%Y%m%d%H%M%S.") + f"{t.microsecond // 1000:03d}+0000"


def _num(x: float, digits: int = 4) -> str:
    return f"{round(float(x), digits):g}"


def result_hl7(
    result: Result, model: str, version: str, now: datetime, control_id: str, facility: str = ""
) -> str:
    """An ORU^R01 message (segments ending in CR), without patient identifiers."""
    ts = _ts(now)
    msh = "MSH|" + "|".join(
        [
            "^~\\&",  # MSH-2 encoding characters
            "FIRMWARE-APP",  # MSH-3 sending application
            hl7_escape(facility),  # MSH-4
            "",  # MSH-5 receiving application
            "",  # MSH-6 receiving facility
            ts,  # MSH-7
            "",  # MSH-8 security
            "ORU^R01^ORU_R01",  # MSH-9
            hl7_escape(control_id),  # MSH-10
            "P",  # MSH-11 processing id: production
            "2.5.1",  # MSH-12
            "",  # MSH-13 sequence number
            "",  # MSH-14 continuation pointer
            "NE",  # MSH-15 accept acknowledgement: never
            "NE",  # MSH-16 application acknowledgement: never
            "",  # MSH-17 country
            "UNICODE UTF-8",  # MSH-18 character set
        ]
    )
    # OBR-25 / OBX-11 "P": preliminary, an AI result until a clinician has reviewed it
    obr = _segment(
        "OBR",
        {1: "1", 3: f"{result.frame_id}^FIRMWARE-APP", 4: "AI^AI image analysis^L", 7: ts, 22: ts, 25: "P"},
    )
    obx: list[tuple[str, str, str, str, str, str]] = []  # type, id, sub-id, value, units, flag
    flag = "A" if result.alert else ""
    obx.append(("ST", "MODEL^AI model^L", "", hl7_escape(f"{model} {version}"), "", ""))
    if result.label is not None:
        obx.append(("ST", "FINDING^AI finding^L", "", hl7_escape(result.label), "", flag))
    if result.confidence is not None:
        obx.append(("NM", "CONFIDENCE^AI confidence^L", "", _num(result.confidence), "1^^UCUM", flag))
    obx.append(("ST", "ALERT^Alert threshold crossed^L", "", "Y" if result.alert else "N", "", flag))
    if result.centroid is not None:
        x, y = result.centroid
        obx.append(
            ("NA", "CENTROID^Finding centroid x,y (pixels)^L", "", f"{_num(x, 1)}^{_num(y, 1)}", "", "")
        )
    if result.area_fraction is not None:
        obx.append(("NM", "AREA^Finding area fraction^L", "", _num(result.area_fraction, 5), "1^^UCUM", ""))
    for i, b in enumerate(result.boxes, start=1):
        box = "^".join(_num(v, 1) for v in (b.x0, b.y0, b.x1, b.y1))
        obx.append(("NA", "BOX^Detection box x0,y0,x1,y1 (pixels)^L", str(i), box, "", ""))
        obx.append(("ST", "BOX_LABEL^Detection label^L", str(i), hl7_escape(b.label), "", ""))
        obx.append(("NM", "BOX_SCORE^Detection score^L", str(i), _num(b.score), "1^^UCUM", ""))
    for i, p in enumerate(result.points, start=1):
        obx.append(("NA", "POINT^Point x,y (pixels)^L", str(i), f"{_num(p.x, 1)}^{_num(p.y, 1)}", "", ""))
        if p.label:
            obx.append(("ST", "POINT_LABEL^Point label^L", str(i), hl7_escape(p.label), "", ""))
        if p.score is not None:
            obx.append(("NM", "POINT_SCORE^Point score^L", str(i), _num(p.score), "1^^UCUM", ""))
    for name, (value, unit) in result.measurements.items():
        ident = f"MEAS_{hl7_escape(name.upper().replace(' ', '_'))}^{hl7_escape(name)}^L"
        obx.append(("NM", ident, "", _num(value, 3), f"{_ucum(unit)}^^UCUM", ""))
    segments = [msh, obr]
    for n, (vtype, ident, sub, value, units, fl) in enumerate(obx, start=1):
        segments.append(
            _segment("OBX", {1: str(n), 2: vtype, 3: ident, 4: sub, 5: value, 6: units, 8: fl, 11: "P"})
        )
    return "".join(s + "\r" for s in segments)


def _ucum(unit: str) -> str:
    """A measurement's unit as UCUM: "fraction" is the unity "1"; mm, mm2, deg ... are UCUM already."""
    return "1" if unit == "fraction" else hl7_escape(unit)


def mllp(message: str) -> bytes:
    return MLLP_START + message.encode("utf-8") + MLLP_END


# -- commands ---------------------------------------------------------------------------------------


class LineSplitter:
    """Bytes in, complete lines out; a line longer than ``max_line`` becomes one ``None`` (too long)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[bytes | None]:
        for byte in data:
            if byte in (0x0A, 0x0D):  # LF, CR or CRLF end a line; the empty line after CR is skipped
                if self._discarding:
                    self._discarding = False
                elif self._buf:
                    yield bytes(self._buf)
                self._buf.clear()
            elif self._discarding:
                continue
            elif len(self._buf) >= self.max_line:
                echo = self._buf[:1] == b"{"  # our own JSON echoed back: no reply, not even "too long"
                self._buf.clear()
                self._discarding = True
                if not echo:
                    yield None
            else:
                self._buf.append(byte)


class CommandHandler:
    """One command line -> one reply dict, using ``controls``. Never raises."""

    def __init__(self, controls: Controls, max_line: int = 256) -> None:
        self.controls = controls
        self.max_line = max_line

    def too_long(self) -> dict[str, Any]:
        return {"ok": False, "error": f"line longer than {self.max_line} bytes; discarded up to the newline"}

    def handle_bytes(self, raw: bytes) -> dict[str, Any] | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"ok": False, "error": f"not UTF-8 text ({len(raw)} bytes ignored)"}
        return self.handle(line)

    def handle(self, line: str) -> dict[str, Any] | None:
        """The reply, or None for a line that gets none (empty, or our own JSON echoed back)."""
        text = line.strip()
        if not text or text.startswith("{"):
            return None
        words = text.split()
        cmd, args = words[0].lower(), words[1:]
        if cmd == "new" and args[:1] and args[0].lower() == "patient":
            cmd, args = "new patient", args[1:]
        try:
            return {"ok": True, "cmd": cmd, **self._dispatch(cmd, args)}
        except _Usage as exc:
            return {"ok": False, "cmd": cmd, "error": str(exc)}
        except FirmwareAppError as exc:
            return {"ok": False, "cmd": cmd, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug behind one command must not stop the port
            log.exception("serial command %r failed", cmd)
            return {"ok": False, "cmd": cmd, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _dispatch(self, cmd: str, args: list[str]) -> dict[str, Any]:
        if cmd not in USAGE:
            raise _Usage(f"unknown command {_preview(cmd)}; try help")
        arity = 0 if USAGE[cmd] == cmd else 1
        if len(args) != arity:
            if arity == 0:
                raise _Usage(f"{cmd} takes no argument; got {_preview(' '.join(args))}")
            raise _Usage(f"usage: {USAGE[cmd]}")
        c = self.controls
        if cmd == "status":
            return dict(c.status())
        if cmd == "freeze":
            c.freeze()
            return {"frozen": c.frozen}
        if cmd == "unfreeze":
            c.unfreeze()
            return {"frozen": c.frozen}
        if cmd == "capture":
            return {"capture_id": c.request_capture("serial")}
        if cmd == "disagree":
            return {"case_id": c.mark_disagree()}
        if cmd == "new patient":
            return {"study_id": c.new_patient()}
        if cmd == "help":
            return {"commands": list(COMMANDS)}
        if cmd == "ai":
            if args[0].lower() not in ("on", "off"):
                raise _Usage(f"usage: {USAGE[cmd]}")
            c.set_ai(args[0].lower() == "on")
            return {"ai": c.ai_enabled}
        if cmd == "model":
            return {"model": c.switch_model(args[0])}
        # threshold
        try:
            value = float(args[0])
        except ValueError:
            raise _Usage(f"threshold: {_preview(args[0])} is not a number") from None
        if not math.isfinite(value):
            raise _Usage(f"threshold: {_preview(args[0])} is not a finite number")
        in_force = c.set_threshold(value)
        return {"threshold": in_force, "requested": value, "clamped": in_force != value}


class _Usage(Exception):
    pass


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- the link -------------------------------------------------------------------------------------


def _default_opener(config: SerialConfig) -> Any:
    kwargs: dict[str, Any] = {"baudrate": config.baud, "timeout": READ_TIMEOUT_S}
    kwargs["write_timeout"] = WRITE_TIMEOUT_S
    if "://" not in config.port:
        kwargs["exclusive"] = True  # a second process on the same line would garble both
    return serial.serial_for_url(config.port, **kwargs)


@dataclass
class LinkCounters:
    results_sent: int = 0
    replies_sent: int = 0
    dropped: int = 0
    connects: int = 0
    disconnects: int = 0
    bad_lines: int = 0


class SerialLink:
    """The result stream and the command set on one serial port.

    ``opener(config)`` returns an open pyserial-like port (read/write/in_waiting/close); the default opens
    ``config.port`` with pyserial. ``now()`` gives the result time (UTC). ``on_result`` is a pipeline
    listener. ``start()`` starts the reader and writer threads; ``stop()`` ends them and closes the port.
    """

    def __init__(
        self,
        config: SerialConfig,
        controls: Controls,
        opener: Callable[[SerialConfig], Any] | None = None,
        now: Callable[[], datetime] | None = None,
        queue_size: int = 64,
    ) -> None:
        if opener is None and serial is None:
            raise SerialUnavailable(
                "serial: pyserial is not installed; pip install 'firmware-app[serial]'. "
                "Running without the serial link"
            )
        self.config = config
        self.controls = controls
        self.opener = opener or _default_opener
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.counters = LinkCounters()
        self.commands = CommandHandler(controls, config.max_line)
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self._port: Any = None
        self._port_lock = threading.Lock()
        self._broken = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._failures = 0

    @property
    def connected(self) -> bool:
        return self._port is not None and not self._broken.is_set()

    # -- out -------------------------------------------------------------------------------------
    def on_result(self, frame: Frame, result: Result) -> None:
        """Pipeline listener (inference thread): format and queue; never blocks, never raises."""
        if not self.connected:
            self.counters.dropped += 1
            return
        try:
            status = self.controls.status()
            model, version = str(status.get("model", "?")), str(status.get("version", "?"))
            now = self.now()
            if self.config.format == "hl7":
                self._seq = (self._seq + 1) % 1_000_000
                control_id = f"{now.astimezone(timezone.utc):%Y%m%d%H%M%S}{self._seq:06d}"
                data = mllp(result_hl7(result, model, version, now, control_id, self.config.facility))
            else:
                backend, shown = str(status.get("backend", "")), not status.get("silent_trial", False)
                data = (result_json(result, model, version, now, frame, backend, shown) + "\n").encode()
        except Exception:  # noqa: BLE001 - a formatting bug must not reach the inference thread
            log.exception("serial: cannot format the result of frame %d", result.frame_id)
            return
        self._enqueue("result", data)

    def send_reply(self, reply: dict[str, Any]) -> None:
        self._enqueue("reply", (json.dumps(reply, default=str, separators=(",", ":")) + "\n").encode())

    def _enqueue(self, kind: str, data: bytes) -> None:
        while True:
            try:
                self._queue.put_nowait((kind, data))
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # the oldest goes: a monitor wants the newest result
                    self.counters.dropped += 1
                except queue.Empty:
                    pass

    def _writer(self) -> None:
        write_timeout = serial.SerialTimeoutException if serial is not None else ()
        while not self._stop.is_set():
            try:
                kind, data = self._queue.get(timeout=READ_TIMEOUT_S)
            except queue.Empty:
                continue
            with self._port_lock:
                port = self._port
                if port is None or self._broken.is_set():
                    self.counters.dropped += 1
                    continue
                try:
                    port.write(data)
                except write_timeout:
                    self.counters.dropped += 1
                    log.debug("serial: write timed out (peer not reading); %s dropped", kind)
                    continue
                except Exception as exc:  # noqa: BLE001 - the reader reopens the port
                    self.counters.dropped += 1
                    log.warning("serial: write to %s failed: %s", self.config.port, exc)
                    self._broken.set()
                    continue
            if kind == "result":
                self.counters.results_sent += 1
            else:
                self.counters.replies_sent += 1

    # -- in --------------------------------------------------------------------------------------
    def _open(self) -> bool:
        try:
            port = self.opener(self.config)
        except Exception as exc:  # noqa: BLE001 - absent device, permissions: retried with back-off
            if self._failures == 0:
                log.warning("serial: cannot open %s: %s; retrying", self.config.port, exc)
            else:
                log.debug("serial: cannot open %s: %s", self.config.port, exc)
            self._failures += 1
            return False
        with self._port_lock:
            self._port = port
            self._broken.clear()
        self._failures = 0
        self.counters.connects += 1
        log.info("serial: %s open (%s, %d baud)", self.config.port, self.config.format, self.config.baud)
        return True

    def _close_port(self, reason: str | None = None) -> None:
        with self._port_lock:
            port, self._port = self._port, None
        if port is None:
            return
        if reason:
            self.counters.disconnects += 1
            log.warning("serial: %s lost (%s); reopening", self.config.port, reason)
        try:
            port.close()
        except Exception as exc:  # noqa: BLE001
            log.debug("serial: closing %s: %s", self.config.port, exc)

    def _reader(self) -> None:
        self._failures = 0
        delay = 0.0
        splitter = LineSplitter(self.config.max_line)
        while not self._stop.is_set():
            if self._broken.is_set():
                self._close_port("write failed")
            if self._port is None:
                if delay and self._stop.wait(delay):
                    break
                if not self._open():
                    delay = min(max(delay * 2, 0.25), self.config.reopen_max_s)
                    continue
                delay = 0.0
                splitter = LineSplitter(self.config.max_line)
            try:
                port = self._port
                data = port.read(port.in_waiting or 1)
            except Exception as exc:  # noqa: BLE001 - unplugged, peer gone: reopen
                self._close_port(f"{type(exc).__name__}: {exc}")
                continue
            if data:
                self._received(splitter, data)

    def _received(self, splitter: LineSplitter, data: bytes) -> None:
        if not self.config.commands:
            log.debug("serial: %d bytes received and ignored (commands off)", len(data))
            return
        for line in splitter.feed(data):
            reply = self.commands.too_long() if line is None else self.commands.handle_bytes(line)
            if reply is None:
                continue
            if reply["ok"]:
                log.info("serial command %s", reply["cmd"])
            else:
                self.counters.bad_lines += 1
                log.debug("serial: bad line: %s", reply["error"])
            self.send_reply(reply)

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for target, name in ((self._reader, "rx"), (self._writer, "tx")):
            t = threading.Thread(target=self._guard(target), name=f"fwapp-serial-{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    target()
                except Exception:  # noqa: BLE001 - a bug here must not silence the port for good
                    log.exception("serial thread %s failed; restarting it", target.__name__)
                    self._stop.wait(1.0)

        return run

    def stop(self, timeout: float = 2.0) -> None:
        """End both threads and close the port (safe twice)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        self._close_port()

    def __enter__(self) -> SerialLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
