"""sd_notify datagrams reach a real AF_UNIX socket; the watchdog pets only while the loop says it is alive."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_app.device.sdnotify import Notifier, Watchdog, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket, timeout: float = 0.0) -> list[str]:
    """Every datagram waiting (after waiting up to ``timeout`` for the first)."""
    out = []
    sock.settimeout(timeout)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out
        sock.settimeout(0.0)


def test_ready_status_and_stopping_datagrams_arrive(notify_socket):
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("running us-fluid-seg on cpu")
    assert sock.recv(4096) == b"READY=1\nSTATUS=running us-fluid-seg on cpu"
    n.status("NO SIGNAL\nsecond line")
    assert sock.recv(4096) == b"STATUS=NO SIGNAL second line"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.extend_timeout(90)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()
    n.close()


def test_abstract_namespace_socket_is_supported():
    name = f"firmware-app-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_silent_no_op():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    w = Watchdog(n, env={"WATCHDOG_USEC": "10000000"})
    assert not w.enabled
    w.start()  # starts nothing
    w.alive()
    w.stop()


def test_a_vanished_socket_is_logged_not_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready() is False
    assert "sd_notify READY" in caplog.text


def test_watchdog_interval_comes_from_watchdog_usec_for_this_pid_only():
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000"}) == 10.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({}) is None


def test_watchdog_pets_only_if_alive_was_called_since_the_last_pet(notify_socket):
    sock, path = notify_socket
    stalls = []
    w = Watchdog(Notifier({"NOTIFY_SOCKET": path}), interval_s=10.0, on_stall=lambda: stalls.append(1))
    w.alive()
    assert w.tick() is True
    assert received(sock, 1.0) == ["WATCHDOG=1"]
    assert w.tick() is False  # the inference loop said nothing since: a hung model
    assert w.tick() is False
    assert received(sock) == []
    assert stalls == [1]  # reported once per stall
    w.alive()
    w.alive()
    assert w.tick() is True
    assert received(sock, 1.0) == ["WATCHDOG=1"]


def test_watchdog_thread_stops_petting_when_the_loop_hangs(notify_socket):
    sock, path = notify_socket
    w = Watchdog(Notifier({"NOTIFY_SOCKET": path}), env={"WATCHDOG_USEC": "100000"})  # pets every 50 ms
    assert w.enabled and w.period_s == pytest.approx(0.05)
    w.start()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # a healthy inference loop
            w.alive()
            time.sleep(0.01)
        pets = received(sock, 0.1)
        assert pets and set(pets) == {"WATCHDOG=1"}
        assert len(pets) >= 3
        time.sleep(0.08)  # let a pet earned before the hang go out
        received(sock)
        time.sleep(0.25)  # hung: no alive() for five periods
        assert received(sock) == []
        assert w.missed >= 3
    finally:
        w.stop()
