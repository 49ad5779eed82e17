"""Logging for a service whose stderr goes to journald: one line per event, no patient identifier, ever.

``setup(verbose)`` is called once when the command line starts:

- one line per record: a traceback is folded into ``(ExcType: message)`` unless ``-vv``;
- under journald (``JOURNAL_STREAM`` is set) no timestamp of our own, and a ``<N>`` syslog priority prefix
  so ``journalctl -p`` works; on a terminal, a timestamp;
- pydicom and highdicom print values of DICOM attributes in their warnings (``Invalid value for VR DA:
  '19710220'``): their records, and every warning raised from them, are redacted — quoted values become
  ``<redacted>``, keywords, attribute names, tags and VRs are kept;
- pydicom sends each warning both to its logger and to ``warnings``: it is printed once, through logging;
- the same event repeated (a grabber reconnecting every second) is printed once, then at most once per
  ``REPEAT_WINDOW_S`` with the number of repeats in between;
- the native libraries are quiet unless ``-v``: OpenCV's log level, and LiteRT's "Created TensorFlow Lite
  XNNPACK delegate" line (``quiet_native_stderr`` around interpreter creation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

REPEAT_WINDOW_S = 300.0
SENSITIVE_LOGGERS = ("pydicom", "highdicom")
REDACTED = "<redacted>"

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_QUOTED = re.compile(r"""b?'([^']*)'|b?"([^"]*)\"""")
_TAG = re.compile(r"^\(?[0-9A-Fa-f]{4},\s*[0-9A-Fa-f]{4}\)?$")
_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_names: frozenset[str] | None = None
_verbose = 0


def _dicom_names() -> frozenset[str]:
    """Keywords and attribute names of the DICOM dictionary: kept in a redacted message."""
    global _names
    if _names is None:
        try:
            from pydicom.datadict import DicomDictionary

            _names = frozenset(n for entry in DicomDictionary.values() for n in (entry[2], entry[4]) if n)
        except ImportError:
            _names = frozenset()
    return _names


def redact(text: str) -> str:
    """``text`` with every quoted value replaced by <redacted>; DICOM keywords, names, tags, VRs kept."""

    def one(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        if inner in _VRS or _TAG.match(inner) or inner in _dicom_names():
            return m.group(0)
        return REDACTED

    return _QUOTED.sub(one, text)


def _sensitive_name(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SENSITIVE_LOGGERS)


def _from_sensitive(tb: Any) -> bool:
    """True when a traceback passes through pydicom or highdicom (its message may quote a value)."""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if _sensitive_name(module):
            return True
        tb = tb.tb_next
    return False


class RedactFilter(logging.Filter):
    """Redacts records of pydicom, highdicom and their warnings, and exceptions raised inside them."""

    def filter(self, record: logging.LogRecord) -> bool:
        sensitive = _sensitive_name(record.name) or getattr(record, "fwapp_sensitive", False)
        if sensitive:
            record.msg = redact(record.getMessage())
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if sensitive or _from_sensitive(record.exc_info[2]):
                record.fwapp_exc_redacted = True
                record.exc_text = None
            del exc
        return True


class OneLineFormatter(logging.Formatter):
    """One line per record; the traceback only with ``tracebacks`` (``-vv``), redacted where needed."""

    def __init__(self, journald: bool, tracebacks: bool) -> None:
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if journald
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        super().__init__(fmt)
        self.journald = journald
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info = record.exc_info, None
        exc_text, record.exc_text = record.exc_text, None
        stack, record.stack_info = record.stack_info, None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = exc_info, exc_text, stack
        redacted = getattr(record, "fwapp_exc_redacted", False) or _sensitive_name(record.name)
        if exc_info and exc_info[1] is not None:
            exc = exc_info[1]
            what = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
            if redacted:
                what = redact(what)
            if self.tracebacks:
                tb = "".join(traceback.format_exception(*exc_info)).rstrip()
                if redacted:
                    tb = "\n".join([*tb.splitlines()[:-1], what])
                line = f"{line}\n{tb}"
            elif str(exc) not in line:
                line = f"{line} ({what})"
            elif type(exc).__name__ not in line:
                line = f"{line} ({type(exc).__name__})"
        line = " ".join(line.splitlines()) if not self.tracebacks else line
        if self.journald:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class RepeatFilter(logging.Filter):
    """The same event (logger, level, message template) at most once per ``window_s``, with a count."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S, clock=time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window_s:
                suppressed = 0 if entry is None else int(entry[1])
                self._seen[key] = [now, 0]
                if len(self._seen) > 1000:
                    self._seen.clear()
                if suppressed:
                    minutes = self.window_s / 60
                    record.msg = (
                        f"{record.getMessage()} (repeated {suppressed} times in the last {minutes:g} min)"
                    )
                    record.args = None
                return True
            entry[1] = int(entry[1]) + 1
            return False


class _PydicomEcho(logging.Filter):
    """Remembers what pydicom logged, so the same text raised as a warning is not printed again."""

    def __init__(self) -> None:
        super().__init__()
        self.recent: deque[str] = deque(maxlen=64)

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(Exception):
            self.recent.append(record.getMessage())
        return True


_echo = _PydicomEcho()
_warn_log = logging.getLogger("py.warnings")


def _showwarning(
    message: Any, category: type[Warning], filename: str, lineno: int, file=None, line=None
) -> None:
    """Warnings go through logging, one line each, redacted (pydicom's also went to its logger: dropped)."""
    text = str(message)
    if text in _echo.recent:
        return  # pydicom's warn_and_log: already logged once
    _warn_log.warning("%s: %s", category.__name__, text, extra={"fwapp_sensitive": True})


def setup(verbose: int = 0, stream: Any = None) -> None:
    """Configure logging for the command line (see the module docstring)."""
    global _verbose
    _verbose = verbose
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "fwapp", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.fwapp = True  # type: ignore[attr-defined]
    handler.setFormatter(
        OneLineFormatter(journald=bool(os.environ.get("JOURNAL_STREAM")), tracebacks=verbose > 1)
    )
    handler.addFilter(RedactFilter())
    handler.addFilter(RepeatFilter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("firmware_app.start").setLevel(logging.INFO)  # the start-up line, always
    pd = logging.getLogger("pydicom")
    if _echo not in pd.filters:
        pd.addFilter(_echo)
    warnings.showwarning = _showwarning
    quiet_native_libraries(verbose)


def quiet_native_libraries(verbose: int) -> None:
    """OpenCV's own log lines (a warning per reconnect of an unplugged grabber) only with ``-v``."""
    os.environ["OPENCV_LOG_LEVEL"] = "INFO" if verbose else "ERROR"
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        with contextlib.suppress(Exception):
            cv2.setLogLevel(3 if verbose else 2)  # 2 = ERROR, 3 = WARNING


_native_lock = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr(logger_name: str = "firmware_app.native") -> Iterator[None]:
    """Around a native call that prints to fd 2 (LiteRT's XNNPACK INFO line): its ``INFO:`` lines go to
    the log at INFO (seen with ``-v``); anything else written meanwhile is written back to stderr."""
    if _verbose:
        yield
        return
    with _native_lock:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                captured = tmp.read().decode("utf-8", "replace")
    log = logging.getLogger(logger_name)
    other = []
    for text in captured.splitlines():
        if text.startswith("INFO:"):
            log.info("%s", text[5:].strip())
        elif text.strip():
            other.append(text)
    if other:
        with contextlib.suppress(Exception):
            sys.stderr.write("\n".join(other) + "\n")
            sys.stderr.flush()
