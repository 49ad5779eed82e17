"""Capture encryption at rest: format v2 (HKDF-SHA256 per-file keys), v1 files still readable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from records_support import MODEL, disc, frame, seg_result

from firmware_app.records.captures import Recorder
from firmware_app.records.crypto import CaptureCipher
from firmware_app.records.errors import CaptureCorrupt

KEY = bytes(range(32))
NAME = "20250101-000000-abcdef.cap"
PLAIN = b"a capture written by firmware-app before v2"
# sealed with KEY by the v1 code (firmware_app/records/crypto.py before format v2), kept as it was
V1_BLOB = bytes.fromhex(
    "465743415076310a9410eb3589ca9148f48e99841f11f2462f376ce646d65f5ee8976097ffc8ec0182d03b98cd5ff10d"
    "a8ffb2e0683351af9df46452a5d4510a3febd483d84dfcd008805c807cd5fac18abad6ab434e6d"
)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "capture.key").write_bytes(KEY)
    os.chmod(keys / "capture.key", 0o600)
    return tmp_path


def _hkdf(info: bytes, salt: bytes | None, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(KEY)


def test_new_files_are_v2_with_an_hkdf_sha256_key_per_file(data: Path) -> None:
    cipher = CaptureCipher(data)
    blob = cipher.seal(NAME, PLAIN)
    assert blob[:8] == b"FWCAPv2\n"  # the format version, in the header
    kid, salt, nonce, body = blob[8:16], blob[16:32], blob[32:44], blob[44:]
    assert kid == _hkdf(b"firmware-app/capture/v2/key-id", None, 8)
    file_key = _hkdf(b"firmware-app/capture/v2/aes-256-gcm", salt, 32)
    assert file_key != KEY
    assert AESGCM(file_key).decrypt(nonce, body, blob[:32] + NAME.encode()) == PLAIN
    other = cipher.seal(NAME, PLAIN)
    assert other[16:32] != salt  # a fresh salt, so a fresh key, per file
    assert cipher.open(NAME, blob) == PLAIN


def test_v1_files_written_before_v2_are_still_readable(data: Path) -> None:
    cipher = CaptureCipher(data)
    assert cipher.open(NAME, V1_BLOB) == PLAIN
    assert cipher.open("x.cap", cipher.seal_v1("x.cap", b"old")) == b"old"
    with pytest.raises(CaptureCorrupt, match="fails authentication"):
        cipher.open("20250101-000000-000000.cap", V1_BLOB)  # renamed
    tampered = bytearray(V1_BLOB)
    tampered[-20] ^= 1
    with pytest.raises(CaptureCorrupt, match="fails authentication"):
        cipher.open(NAME, bytes(tampered))


def test_a_v1_capture_loads_after_the_change(data: Path) -> None:
    rec = Recorder(data, model=MODEL)
    img = np.full((64, 80), 70, np.uint8)
    cid = rec.capture(frame(img, 0, {"phantom": "ultrasound"}), seg_result(0, disc(img.shape, (40, 30), 12)))
    path = next((data / "captures").glob(f"{cid}.*"))
    cipher = CaptureCipher(data)
    assert path.read_bytes()[:8] == b"FWCAPv2\n"
    # the same capture as a v1 file (written by the kept v1 helper, as the old code did)
    path.write_bytes(cipher.seal_v1(path.name, cipher.open(path.name, path.read_bytes())))
    assert path.read_bytes()[:8] == b"FWCAPv1\n"
    cap = Recorder(data).load_capture(cid)
    assert np.array_equal(cap.pixels, img) and cap.result.label == "fluid"


def test_tampered_or_foreign_v2_files_are_refused(
    data: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cipher = CaptureCipher(data)
    blob = bytearray(cipher.seal(NAME, PLAIN))
    for where in (20, 40, len(blob) - 1):  # salt, nonce, tag
        bad = bytearray(blob)
        bad[where] ^= 1
        with pytest.raises(CaptureCorrupt, match="fails authentication"):
            cipher.open(NAME, bytes(bad))
    with pytest.raises(CaptureCorrupt, match="bad header or truncated"):
        cipher.open(NAME, bytes(blob[:50]))
    with pytest.raises(CaptureCorrupt, match="bad header"):
        cipher.open(NAME, b"FWCAPv3\n" + bytes(blob[8:]))
    other = CaptureCipher(tmp_path_factory.mktemp("other"))  # another device's key
    with pytest.raises(CaptureCorrupt, match="another device key"):
        other.open(NAME, bytes(blob))
    with pytest.raises(CaptureCorrupt, match="another device key"):
        other.open(NAME, V1_BLOB)
