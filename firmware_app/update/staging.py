"""Bundles from a USB stick: the stick -> ``<data-dir>/staging/`` (root, udev), staging -> install (daemon).

Stick side, ``python -m firmware_app.update.staging /dev/sdb1 --data-dir /var/lib/firmware-app``, started by
``systemd/firmware-app-stage@.service`` when udev sees a USB filesystem: mount it read-only with
``nosuid,nodev,noexec`` (vfat or exfat) on a private folder, copy each top-level ``*.fwb`` that is a plain file
(at most MAX_STAGED, each at most MAX_BUNDLE_BYTES) to ``staging/.NAME.part``, fsync, hand it to the data
dir's owner, rename it to ``staging/NAME``, unmount. Nothing else on the stick is opened or run. It does not
write the audit log (it runs as root; the daemon logs each bundle it picks up).

Daemon side, ``process_staged(data_dir, board, progress)``: installs each staged bundle, removes it, and
returns the outcomes ("Model us-fluid-seg 1.2.0 installed" / "Rejected: signature not trusted").
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware_app.durable import fsync_dir
from firmware_app.update.bundle import MAX_BUNDLE_BYTES

log = logging.getLogger(__name__)

MAX_STAGED = 16
MOUNT_OPTIONS = "ro,nosuid,nodev,noexec,noatime"
FILESYSTEMS = "vfat,exfat"
EXPORT_MARKER = "firmware-app-export.toml"  # records.commands.STICK_MARKER: marks an export stick
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,95}\.fwb")


def staged_bundles(data_dir: str | Path) -> list[Path]:
    staging = Path(data_dir) / "staging"
    found = [p for p in staging.glob("*.fwb") if not p.name.startswith(".")] if staging.is_dir() else []
    return sorted(found)[:MAX_STAGED]


def process_staged(data_dir: str | Path, board, progress: Callable[[str], None] | None = None) -> list:
    """Install every bundle waiting in ``staging/`` and remove it; returns one install.Outcome per bundle
    (its ``message`` is the line for the screen). A bundle is left for the next call only while another
    update holds the lock. Call it every few seconds from a worker thread of the daemon."""
    from firmware_app.update.install import install_bundle

    say = progress or (lambda _msg: None)
    outcomes = []
    for path in staged_bundles(data_dir):
        say(f"Update found: {path.name}")
        outcome = install_bundle(path, data_dir, board, progress=say, wait=False)
        if outcome.status == "busy":
            continue
        say(outcome.message)
        log.info("staged %s: %s", path.name, outcome.message)
        path.unlink(missing_ok=True)
        outcomes.append(outcome)
    return outcomes


# ---------------------------------------------------------------------------------------------- stick side


def stage_folder(src: str | Path, data_dir: str | Path) -> list[str]:
    """Copy the top-level ``*.fwb`` of a mounted stick into ``staging/``; returns the names staged."""
    staging = Path(data_dir) / "staging"
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = os.stat(staging)
    for stale in staging.glob(".*.part"):
        stale.unlink(missing_ok=True)
    with os.scandir(src) as it:
        entries = sorted((e for e in it if e.name.lower().endswith(".fwb")), key=lambda e: e.name)
    staged: list[str] = []
    for number, entry in enumerate(entries[:MAX_STAGED], start=1):
        if not entry.is_file(follow_symlinks=False):
            log.warning("stick: %r is not a plain file; skipped", entry.name)
            continue
        name = entry.name if _SAFE_NAME.fullmatch(entry.name) else f"stick-bundle-{number}.fwb"
        while (staging / name).exists() or name in staged:
            name = f"{name[:-4]}-{number}.fwb"
        try:
            _copy_one(Path(entry.path), staging, name, owner)
        except OSError as exc:
            log.error("stick: cannot stage %r: %s", entry.name, exc)
            continue
        staged.append(name)
        log.info("stick: staged %s", name)
    return staged


def _copy_one(src: Path, staging: Path, name: str, owner: os.stat_result) -> None:
    part = staging / f".{name}.part"
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BUNDLE_BYTES:
            raise OSError(f"not a plain file of at most {MAX_BUNDLE_BYTES} bytes")
        out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            left = MAX_BUNDLE_BYTES + 1
            while left and (chunk := os.read(fd, min(left, 1 << 20))):
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            if not left:
                raise OSError("grew beyond the size limit while being copied")
            if os.geteuid() == 0:
                os.fchown(out, owner.st_uid, owner.st_gid)
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(part, staging / name)
        fsync_dir(staging)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def stage_device(device: str, data_dir: str | Path, run: Callable[..., Any] | None = None) -> int:
    """Mount ``device`` read-only (nosuid, nodev, noexec) on a private folder, stage its bundles, unmount.

    A stick that carries ``firmware-app-export.toml`` is an export stick: afterwards it is mounted
    read-write (still nosuid, nodev, noexec) and the captures are exported to it as a DICOM File-set.
    """
    run = run or subprocess.run  # Devices.usb_mount: the mount/umount runner (a double in tests)
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode):
        log.error("%s: not a block device", device)
        return 2
    mnt = Path(tempfile.mkdtemp(prefix="firmware-app-usb-"))
    export_stick = False
    try:
        run(["mount", "-t", FILESYSTEMS, "-o", MOUNT_OPTIONS, device, str(mnt)], check=True, timeout=60)
        try:
            staged = stage_folder(mnt, data_dir)
            export_stick = (mnt / EXPORT_MARKER).is_file()
        finally:
            run(["umount", str(mnt)], check=False, timeout=60)
        log.info("%s: %d bundle(s) staged for the daemon", device, len(staged))
        if export_stick:
            return export_device(device, data_dir, mnt, run)
    except (subprocess.SubprocessError, OSError) as exc:
        log.error("%s: cannot stage bundles: %s", device, exc)
        return 1
    finally:
        try:
            mnt.rmdir()
        except OSError:
            log.warning("%s: still mounted or not empty", mnt)
    return 0


def export_device(device: str, data_dir: str | Path, mnt: Path, run: Callable[..., Any] | None = None) -> int:
    """Mount an export stick read-write and export the captures to it as the data dir's owner."""
    from firmware_app.records.commands import auto_export

    run = run or subprocess.run
    owner = os.stat(data_dir)
    options = f"rw,nosuid,nodev,noexec,noatime,uid={owner.st_uid},gid={owner.st_gid},umask=077"
    run(["mount", "-t", FILESYSTEMS, "-o", options, device, str(mnt)], check=True, timeout=60)
    try:
        pid = os.fork()
        if pid == 0:  # the export itself runs without root, as the daemon's user
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(owner.st_gid)
                    os.setuid(owner.st_uid)
                reports = auto_export(data_dir, mnt)
                code = 0 if all(r.ok for r in reports) else 1
                log.info(
                    "%s: export stick: %d capture(s) exported", device, sum(len(r.exported) for r in reports)
                )
            except Exception as exc:  # noqa: BLE001 - reported, and the stick is still unmounted
                log.error("%s: export failed: %s", device, exc)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    finally:
        os.sync()
        run(["umount", str(mnt)], check=False, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_app.update.staging",
        description="Copy *.fwb update bundles from a USB stick into the data dir's staging folder.",
    )
    parser.add_argument("device", help="the stick's block device, e.g. /dev/sda1")
    parser.add_argument("--data-dir", default="/var/lib/firmware-app")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    return stage_device(args.device, args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
