"""Signed checkpoints of the audit log: a rewrite of the whole hash chain becomes detectable.

The hash chain (``firmware_app.audit``) finds any edit by someone who does not recompute the chain. A
checkpoint closes that gap: every ``interval_s`` (and at start and stop) the daemon appends a ``checkpoint``
event carrying an ed25519 signature, by the device key ``<data-dir>/keys/device.key`` (PEM PKCS#8, mode
0600, created on first use), over

    CONTEXT || canonical JSON {"head_seq": S, "head_sha256": H, "previous": P}

where S and H are the sequence number and SHA-256 of the chain's last line when the checkpoint was made,
and P the sequence number of the previous checkpoint line (0 for the first). To rewrite a line signed by a
checkpoint, one needs the device key; removing a checkpoint breaks the ``previous`` link of the next one.

The public key is never written to ``keys/*.pub``: those are the keys trusted to sign update bundles.
``verify_checkpoints`` derives it from the private key. Lines after the last checkpoint are protected by
their MACs and the sealed end of the log (``firmware_app.audit``), and by the next checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_app.records.crypto import keys_dir
from firmware_app.records.errors import KeyFileError
from firmware_app.records.fsutil import write_new

log = logging.getLogger(__name__)

DEVICE_KEY = "device.key"
EVENT = "checkpoint"
CONTEXT = b"firmware-app audit checkpoint v1\0"
DEFAULT_INTERVAL_S = 900.0
_MAX_KEY_BYTES = 4096


# -- the device key ------------------------------------------------------------------------------------------
def device_key_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "keys" / DEVICE_KEY


def load_device_key(data_dir: str | os.PathLike[str], create: bool = True) -> Ed25519PrivateKey | None:
    """The device's ed25519 key; created (mode 0600, atomically) on first use when ``create``."""
    path = device_key_path(data_dir)
    if not path.exists():
        if not create:
            return None
        keys_dir(data_dir)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            write_new(path, pem, mode=0o600, what="the device signing key")
            log.info("%s: new device signing key created", path)
        except FileExistsError:
            pass  # created meanwhile by another process: use it
    try:
        data = path.read_bytes()[: _MAX_KEY_BYTES + 1]
        if len(data) > _MAX_KEY_BYTES:
            raise ValueError("file too large")
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: device signing key unreadable ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an ed25519 private key")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw public key, as the update trust store names keys."""
    return hashlib.sha256(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).hexdigest()


def _message(head_seq: int, head_sha256: str, previous: int) -> bytes:
    body = {"head_seq": int(head_seq), "head_sha256": str(head_sha256), "previous": int(previous)}
    return CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- reading the log -----------------------------------------------------------------------------------------
def _log_files(data_dir: str | os.PathLike[str]) -> list[Path]:
    folder = Path(data_dir) / "audit"
    return sorted(p for p in folder.glob("*.jsonl") if p.stem.isdigit())


def _lines(data_dir: str | os.PathLike[str]) -> Iterator[tuple[str, int, bytes, dict[str, Any] | None]]:
    """(file as audit/NAME, line number, raw bytes, parsed record or None) for every line."""
    for path in _log_files(data_dir):
        raw = path.read_bytes().split(b"\n")
        if raw and raw[-1] == b"":
            raw = raw[:-1]
        for n, line in enumerate(raw, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "seq" not in record:
                    record = None
            except ValueError:
                record = None
            yield f"audit/{path.name}", n, line, record


def chain_head(data_dir: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(seq, sha256 hex) of the last well-formed line of the audit log, None when it is empty."""
    for path in reversed(_log_files(data_dir)):
        for line in reversed(path.read_bytes().split(b"\n")):
            try:
                record = json.loads(line)
                return int(record["seq"]), hashlib.sha256(line).hexdigest()
            except (ValueError, TypeError, KeyError):
                continue
    return None


def _last_checkpoint_seq(data_dir: str | os.PathLike[str]) -> int:
    for path in reversed(_log_files(data_dir)):
        for line in reversed(path.read_bytes().split(b"\n")):
            try:
                record = json.loads(line)
                if record.get("event") == EVENT:
                    return int(record["seq"])
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
    return 0


# -- writing -------------------------------------------------------------------------------------------------
def write_checkpoint(data_dir: str | os.PathLike[str], audit: Any = None) -> dict[str, Any] | None:
    """Append one signed checkpoint over the current chain head; None when the log is empty."""
    if audit is None:
        from firmware_app.audit import AuditLog

        audit = AuditLog(data_dir)
    head = chain_head(data_dir)
    if head is None:
        return None
    seq, sha = head
    previous = _last_checkpoint_seq(data_dir)
    key = load_device_key(data_dir)
    assert key is not None
    signature = key.sign(_message(seq, sha, previous))
    record = audit.append(
        EVENT,
        head_seq=seq,
        head_sha256=sha,
        previous=previous,
        key_id=key_id(key.public_key()),
        signature=signature.hex(),
    )
    mark = getattr(audit, "mark", None)
    if mark is not None:  # keys/audit.marker remembers how far the log had got: a rollback is found
        mark(record["seq"])
    return record


class Checkpointer:
    """Appends a signed checkpoint every ``interval_s`` seconds from its own thread, and at stop."""

    def __init__(
        self, data_dir: str | os.PathLike[str], audit: Any = None, interval_s: float = DEFAULT_INTERVAL_S
    ):
        if interval_s <= 0:
            raise ValueError(f"checkpoint interval {interval_s} s must be > 0")
        self.data_dir = Path(data_dir)
        self.audit = audit
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def checkpoint(self) -> dict[str, Any] | None:
        try:
            return write_checkpoint(self.data_dir, self.audit)
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint is logged; the next one retries
            log.error("audit checkpoint failed: %s", exc)
            return None

    def start(self) -> Checkpointer:
        if self._thread is None:
            self._stop.clear()
            self.checkpoint()
            self._thread = threading.Thread(target=self._run, name="fwapp-checkpoint", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.checkpoint()

    def stop(self, final: bool = True) -> None:
        """Stop the thread; with ``final``, sign the head once more (after the daemon's stop event)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
            if final:
                self.checkpoint()


# -- verifying -----------------------------------------------------------------------------------------------
def verify_checkpoints(data_dir: str | os.PathLike[str]) -> list[str]:
    """Every problem with the signed checkpoints, one line each naming the file and line; [] when fine."""
    problems: list[str] = []
    key_path = device_key_path(data_dir)
    try:
        key = load_device_key(data_dir, create=False)
    except KeyFileError as exc:
        return [str(exc)]
    public = key.public_key() if key is not None else None
    kid = key_id(public) if public is not None else None
    hashes: dict[int, tuple[str, str]] = {}  # seq -> (sha256 of its line, where)
    previous_checkpoint = 0
    checkpoints = 0
    lines = 0
    for rel, n, raw, record in _lines(data_dir):
        where = f"{rel} line {n}"
        if record is None:
            continue  # verify_log reports lines that are not audit records
        lines += 1
        try:
            seq = int(record["seq"])
        except (TypeError, ValueError):
            continue
        hashes[seq] = (hashlib.sha256(raw).hexdigest(), where)
        if record.get("event") != EVENT:
            continue
        checkpoints += 1
        try:
            head_seq, head_sha = int(record["head_seq"]), str(record["head_sha256"])
            previous = int(record["previous"])
            signature = bytes.fromhex(str(record["signature"]))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: checkpoint incomplete (fields edited or removed)")
            continue
        if public is None:
            problems.append(f"{where}: checkpoint cannot be verified: {key_path} is missing")
        else:
            if str(record.get("key_id")) != kid:
                problems.append(
                    f"{where}: checkpoint signed by another key ({str(record.get('key_id'))[:16]})"
                )
            try:
                public.verify(signature, _message(head_seq, head_sha, previous))
            except InvalidSignature:
                problems.append(
                    f"{where}: checkpoint signature invalid (the checkpoint was edited or forged)"
                )
        if previous != previous_checkpoint:
            problems.append(
                f"{where}: checkpoint follows checkpoint seq {previous} but the log has seq "
                f"{previous_checkpoint} before it (a checkpoint was removed or the log rewritten)"
            )
        signed = hashes.get(head_seq)
        if head_seq >= seq:
            problems.append(f"{where}: checkpoint signs seq {head_seq}, not before itself (seq {seq})")
        elif signed is None:
            problems.append(f"{where}: signed line seq {head_seq} is missing from the log (lines removed)")
        elif signed[0] != head_sha:
            problems.append(
                f"{signed[1]}: differs from what checkpoint {where} signed (seq {head_seq} edited, "
                "or the log before it rewritten)"
            )
        previous_checkpoint = seq
    if lines and not checkpoints and public is not None:
        problems.append(
            f"audit: no signed checkpoint in {lines} lines although {key_path} exists (checkpoints removed?)"
        )
    return problems
