"""systemd's notify protocol, without a dependency: one datagram to ``$NOTIFY_SOCKET``.

    notifier = Notifier()            # reads $NOTIFY_SOCKET; a no-op when it is absent (run by hand, tests)
    notifier.ready("running us-fluid-seg 1.0.0 on cpu")
    watchdog = Watchdog(notifier)    # reads $WATCHDOG_USEC; a no-op when systemd asked for no watchdog
    watchdog.start()
    ...  watchdog.alive()            # from the inference loop, every iteration (also when idle)
    notifier.stopping(); watchdog.stop()

The watchdog pets systemd (WATCHDOG=1) from its own timer thread at half the interval, but only when
``alive()`` was called since the previous pet: a hung model or a dead inference thread stops the pets, and
systemd kills and restarts the service (``WatchdogSec=`` with ``Restart=on-failure``).

The socket is AF_UNIX SOCK_DGRAM, a path or, with a leading '@', the abstract namespace. Errors sending are
logged, never raised: the daemon must not stop because the service manager went away.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends ``KEY=value`` lines to the service manager. ``enabled`` is False outside systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; not notifying systemd", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram holding ``lines`` (``"READY=1"``, ``"STATUS=..."``); True if it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self.address)
            except OSError as exc:
                log.warning("sd_notify %s to %r failed: %s", lines[0].split("=")[0], self.address, exc)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to start or stop (a TensorRT engine build on first use)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """$WATCHDOG_USEC in seconds, or None: unset, unparsable, or meant for another process (WATCHDOG_PID)."""
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog off", usec)
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pets systemd at half ``interval_s`` while the caller keeps saying the inference loop is alive.

    ``interval_s``: None reads $WATCHDOG_USEC; no interval => ``enabled`` is False and everything is a no-op.
    ``tick()`` is one check-and-pet, called by the timer thread (and by tests, without a thread).
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None = None,
        env: Mapping[str, str] | None = None,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.notifier = notifier
        self.interval_s = interval_s if interval_s is not None else watchdog_interval_s(env)
        self.on_stall = on_stall
        self.pets = 0
        self.missed = 0
        self._alive = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None and self.notifier.enabled

    def alive(self) -> None:
        """The inference loop made progress (cheap: one flag)."""
        self._alive.set()

    def tick(self) -> bool:
        """Pet if alive() was called since the last tick; True if it petted."""
        if not self._alive.is_set():
            self.missed += 1
            if self.missed == 1:
                log.error("inference loop silent for %.1f s: not petting the watchdog", self.period_s)
                if self.on_stall is not None:
                    self.on_stall()
            return False
        self._alive.clear()
        if self.missed:
            log.warning("inference loop alive again after %d missed watchdog periods", self.missed)
        self.missed = 0
        self.pets += 1
        self.notifier.watchdog()
        return True

    @property
    def period_s(self) -> float:
        return (self.interval_s or 0.0) / 2

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        log.info("systemd watchdog: %.1f s, petting every %.1f s", self.interval_s, self.period_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fwapp-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
