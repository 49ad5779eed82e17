"""Encryption at rest of patient images: AES-256-GCM with a key per device.

The key is 32 random bytes in ``<data-dir>/keys/capture.key`` (mode 0600, folder 0700), created
atomically on first use: two processes starting together end up with the same key, and a crash while
creating it leaves no key file at all. Losing the key makes every capture unreadable, and the audit log's
MACs uncheckable (``firmware_app.audit`` derives its MAC key from it with HKDF): it never leaves the device.

Capture files are versioned by their first 8 bytes, the format's magic (``FWCAPv2\n``, ``FWCAPv1\n``):

- **v2** (written): ``MAGIC_V2 (8) | key id (8) | salt (16) | nonce (12) | ciphertext + tag (16)``. The
  file's AES-256 key is derived from the device key with HKDF-SHA256 (RFC 5869): salt = the file's random
  16-byte salt, info = ``firmware-app/capture/v2/aes-256-gcm``; so every file has its own key and a
  random 96-bit nonce never meets another under it. The key id is HKDF-SHA256 of the device key too (no
  salt, info ``firmware-app/capture/v2/key-id``, 8 bytes).
- **v1** (read only, files written before v2): ``MAGIC_V1 (8) | key id (8) | nonce (12) | ciphertext +
  tag``, sealed with the device key itself, the key id an ad-hoc SHA-256 of a label and the key
  (``_v1_key_id``). ``seal_v1`` still writes one, for tests of reading old captures only.

The associated data binds the magic (so the version), the key id, the salt and the capture id, so a file
renamed to another capture's name does not open, and a file sealed by another device says so instead of
"corrupt".

``device_secret`` derives (one-way) the per-device secret used for pseudonyms in de-identified exports, and
``device_uid`` the device's DICOM UID (``Device UID`` in exports), from the same key. Those keep their
original SHA-256 derivation on purpose: they are identifiers already in PACS archives (Device UID, every
exported UID, patient pseudonyms), which a new derivation would change; no cipher key comes from them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware_app.records.errors import CaptureCorrupt, KeyFileError
from firmware_app.records.fsutil import write_new

log = logging.getLogger(__name__)

KEY_DIR = "keys"
CAPTURE_KEY = "capture.key"
MAGIC_V1 = b"FWCAPv1\n"  # read only
MAGIC_V2 = b"FWCAPv2\n"
MAGIC = MAGIC_V2  # what ``seal`` writes
_KEY_BYTES = 32
_KEY_ID_BYTES = 8
_SALT_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
_INFO_KEY_V2 = b"firmware-app/capture/v2/aes-256-gcm"
_INFO_KEY_ID_V2 = b"firmware-app/capture/v2/key-id"


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


def hkdf_sha256(key: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``key``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def key_id(key: bytes) -> bytes:
    """The id of a device key in v2 capture files."""
    return hkdf_sha256(key, _INFO_KEY_ID_V2, length=_KEY_ID_BYTES)


def _v1_key_id(key: bytes) -> bytes:
    """The id of a device key in v1 capture files (the old derivation: read only)."""
    return hashlib.sha256(b"firmware-app key id\0" + key).digest()[:_KEY_ID_BYTES]


def capture_file_key(key: bytes, salt: bytes) -> bytes:
    """The AES-256 key of one v2 capture file: HKDF-SHA256 of the device key with the file's salt."""
    return hkdf_sha256(key, _INFO_KEY_V2, salt=salt)


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
    """Seal (v2) and open (v2, v1) capture files with the device key (AES-256-GCM)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self._key = capture_key(data_dir)
        self._key_id = key_id(self._key)
        self._v1_key_id = _v1_key_id(self._key)

    def seal(self, name: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for the file of capture ``name`` (format v2)."""
        salt = os.urandom(_SALT_BYTES)
        nonce = os.urandom(_NONCE_BYTES)
        head = MAGIC_V2 + self._key_id + salt
        aead = AESGCM(capture_file_key(self._key, salt))
        return head + nonce + aead.encrypt(nonce, plaintext, head + name.encode("utf-8"))

    def seal_v1(self, name: str, plaintext: bytes) -> bytes:
        """A v1 file, as written before v2 (the device key itself, no derivation): for tests only."""
        nonce = os.urandom(_NONCE_BYTES)
        aad = MAGIC_V1 + self._v1_key_id + name.encode("utf-8")
        return MAGIC_V1 + self._v1_key_id + nonce + AESGCM(self._key).encrypt(nonce, plaintext, aad)

    def open(self, name: str, blob: bytes, where: str = "") -> bytes:
        """Decrypt a sealed file (v2 or v1); CaptureCorrupt (naming ``where``) when it does not authenticate."""
        where = where or name
        magic = blob[: len(MAGIC_V2)]
        if magic == MAGIC_V2:
            kid_expected, salt_bytes = self._key_id, _SALT_BYTES
        elif magic == MAGIC_V1:
            kid_expected, salt_bytes = self._v1_key_id, 0
        else:
            raise CaptureCorrupt(f"{where}: not a capture file (bad header or truncated)")
        head_len = len(magic) + _KEY_ID_BYTES + salt_bytes
        if len(blob) < head_len + _NONCE_BYTES + _TAG_BYTES:
            raise CaptureCorrupt(f"{where}: not a capture file (bad header or truncated)")
        kid = blob[len(magic) : len(magic) + _KEY_ID_BYTES]
        if kid != kid_expected:
            raise CaptureCorrupt(
                f"{where}: sealed with another device key; it cannot be opened on this device"
            )
        head = blob[:head_len]
        nonce = blob[head_len : head_len + _NONCE_BYTES]
        if salt_bytes:
            aead = AESGCM(capture_file_key(self._key, head[-salt_bytes:]))
        else:
            aead = AESGCM(self._key)  # v1: the device key itself
        try:
            return aead.decrypt(nonce, blob[head_len + _NONCE_BYTES :], head + name.encode("utf-8"))
        except InvalidTag:
            raise CaptureCorrupt(
                f"{where}: fails authentication (edited, truncated or renamed); its content is not used"
            ) from None
