"""``firmware-app doctor``: one OK / MISSING / FAULT line per thing the box needs.

For the biomedical engineer installing the box: what was found (runtimes, accelerators, display, GPIO,
serial, capture devices, free space, clock, board config, models) and, for anything not OK, what to do.
Exit code 1 when anything is FAULT (something present but broken), else 0.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from firmware_app.errors import FirmwareAppError

OK, MISSING, FAULT = "OK", "MISSING", "FAULT"
MIN_FREE_MB = 500


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<8} {self.name:<16} {self.detail}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_runtime() -> Check:
    for dist, mod in (
        ("ai-edge-litert", "ai_edge_litert.interpreter"),
        ("tflite-runtime", "tflite_runtime.interpreter"),
    ):
        v = _version(dist)
        if v is None:
            continue
        try:
            __import__(mod)
        except ImportError as exc:
            return Check("tflite runtime", FAULT, f"{dist} {v} installed but does not import: {exc}")
        return Check("tflite runtime", OK, f"{dist} {v} (python {sys.version.split()[0]})")
    return Check("tflite runtime", MISSING, "pip install ai-edge-litert")


def check_backends(board) -> list[Check]:
    """One line per declared backend plugin: its runtime, its accelerator, as the plugin itself finds them."""
    from firmware_app.backends.chain import BackendChain, backend_plugins

    chain = BackendChain.from_board(board)
    out = []
    for key in backend_plugins():
        status, detail = chain.config(key).check()
        out.append(Check(f"backend {key}", {"ok": OK, "missing": MISSING}.get(status, FAULT), detail))
    return out


def check_display(uri: str) -> Check:
    """What the board's display plugin finds of its device (``Display.check``)."""
    from firmware_app.display.sinks import display_classes, parse_display_uri

    try:
        scheme, target, _ = parse_display_uri(uri)
    except FirmwareAppError as exc:
        return Check("display", FAULT, str(exc))
    status, detail = display_classes()[scheme].check(uri, target)
    return Check("display", {"ok": OK, "missing": MISSING}.get(status, FAULT), detail)


def check_devices(name: str, patterns: list[str], hint: str) -> Check:
    found = sorted(p for pat in patterns for p in glob.glob(pat))
    if not found:
        return Check(name, MISSING, hint)
    unusable = [p for p in found if not os.access(p, os.R_OK | os.W_OK)]
    if len(unusable) == len(found):
        return Check(name, FAULT, f"{', '.join(found)} present but not accessible to this user")
    return Check(name, OK, ", ".join(found))


SERIAL_PORTS = ["/dev/ttyUSB*", "/dev/ttyACM*", "/dev/ttyAMA*", "/dev/serial0"]


def check_gpio(configured: bool) -> Check:
    chips = check_devices("gpio", ["/dev/gpiochip*"], "no /dev/gpiochip*")
    if not configured:
        return Check(
            "gpio", OK if chips.status == OK else MISSING, f"not used by this board ({chips.detail})"
        )
    if _version("gpiozero") is None:
        return Check(
            "gpio", FAULT, "board has [gpio] but gpiozero is missing: pip install 'firmware-app[gpio]'"
        )
    if chips.status != OK:
        return Check("gpio", FAULT, f"board has [gpio] but {chips.detail}: buttons and lights will not work")
    return chips


def check_serial(port: str | None) -> Check:
    if port is None:
        found = check_devices("serial", SERIAL_PORTS, "none")
        return Check(
            "serial", OK if found.status == OK else MISSING, f"not used by this board ({found.detail})"
        )
    if _version("pyserial") is None:
        return Check(
            "serial", FAULT, "board has [serial] but pyserial is missing: pip install 'firmware-app[serial]'"
        )
    if not Path(port).exists():
        return Check("serial", MISSING, f"{port} not found (the daemon keeps retrying it)")
    if not os.access(port, os.R_OK | os.W_OK):
        return Check("serial", FAULT, f"{port} is not accessible: add the user to 'dialout'")
    return Check("serial", OK, port)


def check_space(data_dir: str) -> Check:
    path = Path(data_dir)
    probe = path if path.exists() else path.parent
    if not probe.exists():
        return Check("data dir", MISSING, f"{data_dir} does not exist (created on first install)")
    usage = shutil.disk_usage(probe)
    free_mb = usage.free / 1e6
    writable = os.access(probe, os.W_OK)
    status = OK if free_mb >= MIN_FREE_MB and writable else FAULT
    detail = f"{data_dir}: {free_mb:,.0f} MB free" + ("" if writable else ", NOT writable")
    return Check("data dir", status, detail)


def check_jpeg(source: dict) -> Check:
    """The MJPG decoder a grabber's frames get: libjpeg-turbo (PyTurboJPEG over the OS's libturbojpeg), or
    OpenCV's reduced decode when it is not usable (it works; the frame costs more CPU)."""
    name = "mjpg decoder"
    mjpg = str(source.get("uri", "")).startswith("v4l2:") and str(source.get("fourcc", "MJPG")) == "MJPG"
    v = _version("PyTurboJPEG")
    fallback = "MJPG frames are decoded by OpenCV (more CPU a frame)"
    if v is None:
        hint = f"pip install 'firmware-app[turbojpeg]' and apt install libturbojpeg0; {fallback}"
        return Check(name, MISSING if mjpg else OK, hint if mjpg else "not needed by this board's source")
    try:
        import turbojpeg

        turbojpeg.TurboJPEG()
    except Exception as exc:  # noqa: BLE001 - the C library missing, or of another API
        detail = f"PyTurboJPEG {v} installed but not usable ({str(exc).splitlines()[0]}); {fallback}"
        return Check(name, MISSING if mjpg else OK, detail)
    return Check(name, OK, f"libjpeg-turbo through PyTurboJPEG {v} (decode at 1/2..1/8, to Y, Cb, Cr)")


def check_clock() -> Check:
    year = time.gmtime().tm_year
    if year < 2024:
        return Check("clock", FAULT, f"system time {time.strftime('%Y-%m-%d %H:%M:%S')} is not set (no RTC?)")
    return Check("clock", OK, time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def run_checks(board_ref: str | None, data_dir: str) -> list[Check]:
    from firmware_app.config import load_board
    from firmware_app.models.store import bundled_models_dir, find_model

    checks = [check_runtime()]
    try:
        board = load_board(board_ref)
        checks.append(Check("board config", OK, f"{board.name} ({board.path})"))
    except FirmwareAppError as exc:
        checks.append(Check("board config", FAULT, str(exc)))
        board = load_board(None)
    checks += check_backends(board)
    checks.append(check_display(board.display["uri"]))
    checks.append(check_devices("capture", ["/dev/video*"], "no /dev/video* (plug in the video grabber)"))
    checks.append(check_jpeg(board.source))
    checks.append(check_gpio(board.gpio is not None))
    checks.append(check_serial(board.serial.port if board.serial is not None else None))
    checks.append(check_space(data_dir))
    checks.append(check_clock())
    try:
        ref = find_model(board.model["id"], data_dir)
        from firmware_app.backends.litert import LiteRTBackend

        with LiteRTBackend(ref.tflite, threads=1) as backend:
            shape = list(backend.input.shape)
        checks.append(
            Check("model", OK, f"{ref.manifest.id} {ref.manifest.version} ({ref.origin}) input {shape}")
        )
    except FirmwareAppError as exc:
        checks.append(Check("model", FAULT, str(exc)))
    checks.append(
        Check("models dir", OK if bundled_models_dir().is_dir() else MISSING, str(bundled_models_dir()))
    )
    return checks


def run_doctor(board_ref: str | None, data_dir: str) -> int:
    checks = run_checks(board_ref, data_dir)
    for c in checks:
        print(c.line())
    return 1 if any(c.status == FAULT for c in checks) else 0
