"""Crash-safe file writes: a reader (or the next boot) sees the whole file or none of it.

``write_new`` creates a file that must not exist yet (a capture, a key): the data goes into an anonymous
``O_TMPFILE`` inode, is fsynced, and only then gets its name with ``link``; the folder is fsynced after.
A process killed or a power cut at any moment before the link leaves nothing behind. Where the file system
has no ``O_TMPFILE`` (vfat on a USB stick), a hidden ``.NAME.tmp-PID-RAND`` file is written and renamed;
``remove_stale_temps`` clears what a crash left of those.

``write_replace`` replaces a small file (the current study, an index) with temp file + fsync + rename.

Disk full (ENOSPC, EDQUOT) raises ``StorageFull`` naming the file, after removing what was written.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path

from firmware_app.records.errors import CaptureWriteFailed, StorageFull

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
_CHUNK = 256 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)
_os_write = os.write  # the one place bytes go to disk (a test slows it down to kill a write half-way)
_USE_O_TMPFILE = hasattr(os, "O_TMPFILE")  # off: always the named temp file way (as on vfat)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a name created or removed in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (vfat through FUSE) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = _os_write(fd, view[:_CHUNK])
        view = view[n:]


def _raise(path: Path, exc: OSError, what: str) -> None:
    if exc.errno in _FULL:
        free = free_bytes(path.parent)
        raise StorageFull(
            f"{path.parent}: disk full while writing {what} ({free / 1e6:.1f} MB free); "
            "nothing was saved - export and purge captures to make room"
        ) from None
    raise CaptureWriteFailed(f"{path}: cannot write {what} ({exc.strerror or exc})") from None


def free_bytes(folder: str | os.PathLike[str]) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def write_new(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, what: str = "a file") -> None:
    """Create ``path`` holding ``data``, atomically and durably. FileExistsError if it exists."""
    path = Path(path)
    folder = path.parent
    if not _USE_O_TMPFILE:
        _write_named_temp(path, data, mode, what, replace=False)
        return
    try:
        fd = os.open(folder, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _FULL:
            _raise(path, exc, what)
        _write_named_temp(path, data, mode, what, replace=False)  # not supported by this file system
        return
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.link(f"/proc/self/fd/{fd}", path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):
                # no /proc, or linking an O_TMPFILE is refused here: the named temp file way
                os.close(fd)
                fd = -1
                _write_named_temp(path, data, mode, what, replace=False)
                return
            _raise(path, exc, what)
    finally:
        if fd >= 0:
            os.close(fd)
    fsync_dir(folder)


def write_replace(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, what: str = "a file") -> None:
    """Write ``path`` (replacing it if present) atomically and durably."""
    _write_named_temp(Path(path), data, mode, what, replace=True)


def _write_named_temp(path: Path, data: bytes, mode: int, what: str, replace: bool) -> None:
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name is taken: never overwrite
            os.unlink(tmp)
    except FileExistsError:
        _unlink_quietly(tmp)
        raise
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(tmp)
        _raise(path, exc, what)
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete hidden temp files left by a crash mid-write (only those of processes no longer alive)."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and TEMP_MARK in name):
            continue
        pid_part = name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        pid = int(pid_part) if pid_part.isdigit() else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue  # still being written
        _unlink_quietly(Path(entry.path))
        removed += 1
    if removed:
        log.warning("%s: removed %d incomplete file(s) left by an interrupted write", folder, removed)
        fsync_dir(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
