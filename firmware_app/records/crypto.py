"""Encryption at rest of patient images: AES-256-GCM with a key per device.

The key is 32 random bytes in ``<data-dir>/keys/capture.key`` (mode 0600, folder 0700), created
atomically on first use: two processes starting together end up with the same key, and a crash while
creating it leaves no key file at all. Losing the key makes every capture unreadable, and the audit log's
MACs uncheckable (``firmware_app.audit`` derives its MAC key from it with HKDF): it never leaves the device.

A sealed file is ``MAGIC (8) | key id (8) | nonce (12) | ciphertext + tag (16)``. The nonce is random per
file (96 bits; a device writes far fewer than 2**32 files per key). The associated data binds the magic,
the key id and the capture id, so a file renamed to another capture's name does not open, and a file
sealed by another device says so instead of "corrupt".

``device_secret`` derives (one-way) the per-device secret used for pseudonyms in de-identified exports, and
``device_uid`` the device's DICOM UID (``Device UID`` in exports), from the same key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from firmware_app.records.errors import CaptureCorrupt, KeyFileError
from firmware_app.records.fsutil import write_new

log = logging.getLogger(__name__)

KEY_DIR = "keys"
CAPTURE_KEY = "capture.key"
MAGIC = b"FWCAPv1\n"
_KEY_BYTES = 32
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_HEADER = len(MAGIC) + _KEY_ID_BYTES + _NONCE_BYTES


def keys_dir(data_dir: str | os.PathLike[str]) -> Path:
    """``<data-dir>/keys`` (created 0700 if missing)."""
    d = Path(data_dir) / KEY_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def load_or_create_key(path: str | os.PathLike[str], size: int = _KEY_BYTES) -> bytes:
    """The raw key in ``path``; created (random, mode 0600, atomically) when absent.

    A key readable by group or others is made private again (and the fact logged): the key protects
    patient images.
    """
    path = Path(path)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                write_new(path, os.urandom(size), mode=0o600, what="the device key")
                log.info("%s: new device key created", path)
            except FileExistsError:
                pass  # another process created it first: use theirs
            continue
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read the device key ({exc.strerror or exc})") from None
        try:
            st = os.fstat(fd)
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.fchmod(fd, 0o600)
                log.warning("%s: key was readable by others (mode %o); made private (0600)", path, st.st_mode)
            key = os.read(fd, size + 1)
        finally:
            os.close(fd)
        if len(key) != size:
            raise KeyFileError(
                f"{path}: device key has {len(key)} bytes, expected {size}; "
                "restore it from the device backup (captures sealed with it cannot be read otherwise)"
            )
        return key
    raise KeyFileError(f"{path}: device key could not be created")


def capture_key(data_dir: str | os.PathLike[str]) -> bytes:
    return load_or_create_key(keys_dir(data_dir) / CAPTURE_KEY)


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"firmware-app key id\0" + key).digest()[:_KEY_ID_BYTES]


def device_secret(data_dir: str | os.PathLike[str], purpose: str) -> bytes:
    """A 32-byte secret for ``purpose`` derived one-way from the device's capture key."""
    return hashlib.sha256(
        b"firmware-app derive\0" + purpose.encode() + b"\0" + capture_key(data_dir)
    ).digest()


def uid_from_bytes(digest: bytes) -> str:
    """A DICOM UID under the UUID arc 2.25 from 16+ bytes (formatted as a version 4 UUID)."""
    return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)


def device_uid(data_dir: str | os.PathLike[str]) -> str:
    """This device's DICOM Device UID, stable for the life of its capture key."""
    return uid_from_bytes(device_secret(data_dir, "device uid"))


class CaptureCipher:
    """Seal and open capture files with the device key (AES-256-GCM)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        key = capture_key(data_dir)
        self._aead = AESGCM(key)
        self._key_id = key_id(key)

    def _aad(self, kid: bytes, name: str) -> bytes:
        return MAGIC + kid + name.encode("utf-8")

    def seal(self, name: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for the file of capture ``name``."""
        nonce = os.urandom(_NONCE_BYTES)
        return (
            MAGIC + self._key_id + nonce + self._aead.encrypt(nonce, plaintext, self._aad(self._key_id, name))
        )

    def open(self, name: str, blob: bytes, where: str = "") -> bytes:
        """Decrypt a sealed file; CaptureCorrupt (naming ``where``) when it does not authenticate."""
        where = where or name
        if len(blob) < _HEADER + 16 or not blob.startswith(MAGIC):
            raise CaptureCorrupt(f"{where}: not a capture file (bad header or truncated)")
        kid = blob[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES]
        if kid != self._key_id:
            raise CaptureCorrupt(
                f"{where}: sealed with another device key; it cannot be opened on this device"
            )
        nonce = blob[len(MAGIC) + _KEY_ID_BYTES : _HEADER]
        try:
            return self._aead.decrypt(nonce, blob[_HEADER:], self._aad(kid, name))
        except InvalidTag:
            raise CaptureCorrupt(
                f"{where}: fails authentication (edited, truncated or renamed); its content is not used"
            ) from None
