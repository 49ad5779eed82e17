"""Durable file operations: what survives a power cut is either the old or the new content, never a mix.

The pattern is the one RAUC and SWUpdate use on ext4/f2fs: write a temporary file, fsync it, rename it over
the target, fsync the directory so the rename itself is on disk.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from firmware_app.errors import FirmwareAppError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (and ``root`` itself), deepest first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def write_atomic(path: Path, data: bytes, mode: int = 0o644, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: a reader (or a reboot) sees the old or the new bytes. Without
    ``sync_dir`` the rename is not synced: after a crash the file may still hold the old bytes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) in one atomic rename, then make the rename durable."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_tree(path: Path) -> None:
    """Remove a file, link or folder if present (never follows a link out of the tree)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


class Busy(FirmwareAppError):
    """The lock is held by another process (another update, a rollback, a boot check)."""


@contextmanager
def locked(path: Path, wait: bool = True, what: str = "another update") -> Iterator[None]:
    """An exclusive flock on ``path`` (created if needed). ``wait=False`` fails at once when it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"{path}: {what} is in progress; try again when it has finished") from None
        yield
    finally:
        os.close(fd)
