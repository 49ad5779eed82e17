"""The service unit: hardening keys present, its command line valid, `systemd-analyze verify` clean; the
install script's dry run changes nothing."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from firmware_app.cli import make_parser

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "firmware-app.service"
RULES = REPO / "systemd" / "99-firmware-app.rules"
INSTALL = REPO / "tools" / "install-device.sh"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (DeviceAllow= and friends repeat, which configparser cannot read)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT)["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{UNIT.name}: [Service] {key}= missing"
    return service[key][-1]


def test_service_is_notify_type_with_watchdog_and_restart(service):
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "WatchdogSec") == "10"
    assert one(service, "Restart") == "on-failure"
    assert float(one(service, "TimeoutStopSec")) >= 2  # SIGTERM -> clean stop within 2 s fits


def test_service_enforces_the_no_network_promise(service):
    assert one(service, "PrivateNetwork") == "yes"
    assert one(service, "IPAddressDeny") == "any"
    assert one(service, "RestrictAddressFamilies").split() == ["AF_UNIX"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("User", "firmware-app"),
        ("Group", "firmware-app"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("DevicePolicy", "closed"),
        ("UMask", "0077"),
        ("LimitCORE", "0"),
    ],
)
def test_service_hardening_key(service, key, value):
    assert one(service, key) == value


def test_data_dir_is_the_only_writable_path_and_matches_the_command_line(service):
    assert service["ReadWritePaths"] == ["/var/lib/firmware-app"]
    argv = shlex.split(one(service, "ExecStart"))
    assert argv[0] == "/opt/firmware-app/venv/bin/firmware-app"
    args = make_parser().parse_args(argv[1:])  # the unit's command line is one the CLI accepts
    assert args.command == "run"
    assert args.data_dir == "/var/lib/firmware-app"
    assert args.board == "/etc/firmware-app/board.toml"
    assert args.frames is None  # runs until SIGTERM


def test_device_allow_covers_video_fb_gpio_serial_and_accelerators(service):
    allowed = {}
    for entry in service["DeviceAllow"]:
        spec, _, mode = entry.partition(" ")
        assert spec.startswith(("/dev/", "char-")), entry
        assert mode and set(mode) <= set("rwm"), entry
        assert "m" not in mode, f"{entry}: the daemon never creates device nodes"
        allowed[spec] = mode
    for spec in [
        "char-video4linux",
        "/dev/fb0",
        "char-gpiochip",
        "char-ttyUSB",
        "char-ttyACM",
        "/dev/ttyAMA0",
        "/dev/apex_0",
        "char-usb_device",
        "char-nvidia*",
    ]:
        assert allowed.get(spec) == "rw", f"DeviceAllow={spec} rw missing"


def test_supplementary_groups_give_device_access(service):
    assert set(one(service, "SupplementaryGroups").split()) >= {"video", "gpio", "dialout"}


def test_udev_rules_are_key_value_lines():
    for n, raw in enumerate(RULES.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for item in (p.strip() for p in line.split(",")):
            assert "==" in item or "=" in item, f"{RULES.name}:{n}: {item!r}"
        assert 'GROUP="' in line and 'MODE="0660"' in line, f"{RULES.name}:{n}"


def _verify_root(tmp_path: Path) -> Path:
    """A root holding the unit, a stub for its ExecStart and the system's own units (for its targets)."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    exe = root / shlex.split(one(parse_unit(UNIT)["Service"], "ExecStart"))[0].lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    for units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
            break
    return root


def test_systemd_analyze_verify_passes(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd): unit not verified here")
    root = _verify_root(tmp_path)
    proc = subprocess.run(
        [tool, "verify", "--man=no", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    ours = [line for line in output.splitlines() if "firmware-app" in line]
    assert proc.returncode == 0 and not ours, output  # warnings (an unknown or misplaced key) fail too


def test_systemd_analyze_security_rates_the_unit_safe(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    root = _verify_root(tmp_path)
    proc = subprocess.run(
        [tool, "security", "--offline=yes", f"--root={root}", "--no-pager", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security check: {proc.stderr.strip()[:100]}")
    assert "Overall exposure level" in proc.stdout, proc.stdout + proc.stderr
    level = float(proc.stdout.split("Overall exposure level for firmware-app.service:")[1].split()[0])
    assert level <= 2.0, proc.stdout[-400:]


# -- the install script ----------------------------------------------------------------------------

_WATCHED = [
    "/etc/firmware-app",
    "/opt/firmware-app",
    "/usr/share/firmware-app",
    "/etc/systemd/system/firmware-app.service",
    "/etc/udev/rules.d/99-firmware-app.rules",
]


def _snapshot() -> dict[str, float | None]:
    return {p: os.stat(p).st_mtime if os.path.exists(p) else None for p in _WATCHED}


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60)


def test_install_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True).returncode == 0


def test_install_dry_run_prints_every_step_and_changes_nothing():
    before = _snapshot()
    proc = run_install("--board", "rpi5-coral-usb", "--dry-run", "--wheels", str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert _snapshot() == before
    out = proc.stdout
    lines = out.splitlines()
    assert "dry run" in lines[0] and "dry run" in lines[-1]
    body = lines[1:-1]
    assert all(x.startswith(("+ ", "ok: ", "note: ")) for x in body), body
    for group in ("video", "gpio", "dialout"):
        assert f"groupadd --system {group}" in out or f"ok: group {group} exists" in out
    assert "useradd --system" in out or "ok: user firmware-app exists" in out
    assert "python3 -m venv /opt/firmware-app/venv" in out or "ok: venv" in out
    assert "--no-index --find-links" in out  # the box has no network: the wheelhouse only
    assert "/etc/firmware-app/board.toml" in out
    assert "install -d -o firmware-app -g firmware-app -m 0700 /var/lib/firmware-app" in out or (
        "ok: /var/lib/firmware-app" in out
    )
    assert "/etc/udev/rules.d/99-firmware-app.rules" in out
    assert "/etc/systemd/system/firmware-app.service" in out
    assert "/etc/tmpfiles.d/firmware-app-cpufreq.conf" in out  # the CPU at its full clock (PERFORMANCE.md)
    if shutil.which("systemctl"):
        assert "+ systemctl enable firmware-app.service" in out


def test_install_needs_a_known_board():
    proc = run_install("--dry-run")
    assert proc.returncode == 2 and "--board NAME|FILE is required" in proc.stderr
    proc = run_install("--dry-run", "--board", "toaster")
    assert proc.returncode == 2 and "board toaster" in proc.stderr


def test_install_keep_governor_leaves_the_cpu_clock_alone():
    proc = run_install("--board", "rpi4-cpu", "--dry-run", "--keep-governor", "--wheels", str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert "cpufreq" not in proc.stdout


def test_cpufreq_tmpfiles_line_sets_every_cpu_to_performance():
    lines = [
        line.split()
        for line in (REPO / "systemd" / "firmware-app-cpufreq.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == [
        ["w", "/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor", "-", "-", "-", "-", "performance"]
    ]
