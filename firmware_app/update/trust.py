"""The device's trust store: which ed25519 keys may sign update bundles.

``<data-dir>/keys/``:

- ``*.pub``: PEM ed25519 public keys (what ``tools/keygen.py`` writes). Each may sign bundles, except
  ``device*.pub``: the device's own keys are never trusted to sign its updates.
- ``trust.json``: ``{"sequence": N, "revoked": [key id, ...], "expires": {key id: "2027-01-01T00:00:00Z"}}``.
  Written by accepted rotation statements (or at provisioning). Absent means sequence 0, nothing revoked,
  no expiry.

A key id is the SHA-256 (hex) of the raw 32-byte public key; messages show its first 16 digits.

Rotation is a bundle of kind ``keys`` signed by a key that is trusted now (present, not revoked, not expired)
and with a sequence above trust.json's. It adds keys, each with an optional expiry and a proof of possession
(a signature by the new key itself, so that a typo cannot lock the device out), and revokes key ids.
Revocation is permanent: a revoked key is never trusted again, even if re-added. A statement that would leave
no usable key is rejected. Writes: the new ``.pub`` files first, then trust.json in one atomic rename; a power
cut in between leaves the new key in place and the statement unrecorded, so it can be applied again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware_app.durable import write_atomic
from firmware_app.errors import BundleRejected, FirmwareAppError

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
MAX_KEY_FILE_BYTES = 4096
PROOF_CONTEXT = b"firmware-app key possession v1\0"


def raw_public(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    raw = key if isinstance(key, bytes) else raw_public(key)
    return hashlib.sha256(raw).hexdigest()


def short(kid: str) -> str:
    return kid[:16]


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = Path(path).read_bytes()[: MAX_KEY_FILE_BYTES + 1]
    try:
        if len(data) > MAX_KEY_FILE_BYTES:
            raise ValueError("too large")
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise FirmwareAppError(f"{path}: not a PEM public key (fix or remove it)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FirmwareAppError(f"{path}: not an ed25519 public key (fix or remove it)")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError):
        raise FirmwareAppError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FirmwareAppError(f"{path}: not an ed25519 private key")
    return key


def proof_of_possession(new_key: Ed25519PrivateKey) -> bytes:
    return new_key.sign(PROOF_CONTEXT + raw_public(new_key))


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 time with a zone ("2027-01-01T00:00:00Z"); ValueError naming ``what`` otherwise."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise ValueError(f"{what} {text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise ValueError(f"{what} {text!r} has no time zone (add Z for UTC)")
    return value


def format_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public: Ed25519PublicKey
    file: str
    expires: datetime | None
    revoked: bool

    def problem(self, now: datetime) -> str | None:
        if self.revoked:
            return f"signed by revoked key {short(self.key_id)}"
        if self.expires is not None and now >= self.expires:
            return f"signed by key {short(self.key_id)} which expired on {format_time(self.expires)}"
        return None

    def verifies(self, data: bytes, signature: bytes) -> bool:
        try:
            self.public.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class NewKey:
    """A key added by a rotation statement: raw public key, optional expiry, proof of possession."""

    public_key: bytes
    expires: datetime | None
    proof: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


class TrustStore:
    def __init__(
        self,
        keys_dir: Path,
        keys: dict[str, TrustedKey],
        sequence: int,
        revoked: frozenset[str],
        expires: dict[str, datetime],
    ) -> None:
        self.dir = keys_dir
        self.keys = keys
        self.sequence = sequence
        self.revoked = revoked
        self.expires = expires

    @classmethod
    def load(cls, keys_dir: str | Path) -> TrustStore:
        """Read the store; a broken key file or trust.json is a run-time failure (fail closed), named."""
        keys_dir = Path(keys_dir)
        sequence, revoked, expires = _read_trust_file(keys_dir / TRUST_FILE)
        keys: dict[str, TrustedKey] = {}
        for path in sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []:
            if path.name.startswith("device"):
                continue
            pub = load_public_key(path)
            kid = key_id(pub)
            keys[kid] = TrustedKey(kid, pub, path.name, expires.get(kid), kid in revoked)
        return cls(keys_dir, keys, sequence, revoked, expires)

    def usable(self, now: datetime) -> list[TrustedKey]:
        return [k for k in self.keys.values() if k.problem(now) is None]

    def verify(self, data: bytes, signature: bytes, now: datetime) -> TrustedKey:
        """The usable key whose signature ``signature`` is over ``data``; BundleRejected otherwise."""
        if len(signature) == 64:
            for key in self.usable(now):
                if key.verifies(data, signature):
                    return key
            for key in self.keys.values():  # only to say why: revoked or expired
                problem = key.problem(now)
                if problem and key.verifies(data, signature):
                    raise BundleRejected(problem)
        if not self.keys:
            raise BundleRejected(f"signature not trusted (no keys in {self.dir})")
        raise BundleRejected("signature not trusted")

    def apply_rotation(
        self, sequence: int, add: list[NewKey], revoke: list[str], now: datetime, dry_run: bool = False
    ) -> str:
        """Check a verified rotation statement against the store, then write it (unless ``dry_run``).
        Returns a summary."""
        revoked = self.revoked | set(revoke)
        for new in add:
            kid = new.key_id
            try:
                Ed25519PublicKey.from_public_bytes(new.public_key).verify(
                    new.proof, PROOF_CONTEXT + new.public_key
                )
            except (InvalidSignature, ValueError):
                raise BundleRejected(
                    f"new key {short(kid)}: its proof of possession does not verify"
                ) from None
            if kid in revoked:
                raise BundleRejected(f"key {short(kid)} is revoked and cannot be trusted again")
            if new.expires is not None and new.expires <= now:
                raise BundleRejected(f"new key {short(kid)} expires {format_time(new.expires)}, in the past")
        expires = dict(self.expires)
        for new in add:
            expires.pop(new.key_id, None)
            if new.expires is not None:
                expires[new.key_id] = new.expires
        left = {k.key_id for k in self.usable(now) if k.key_id not in revoked}
        left |= {n.key_id for n in add}
        if not left:
            raise BundleRejected("the statement would leave no trusted key")
        parts = [f"added key {short(n.key_id)}" for n in add]
        parts += [f"revoked key {short(k)}" for k in sorted(set(revoke))]
        if dry_run:
            return ", ".join(parts)
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        for new in add:
            if new.key_id not in self.keys:
                pub = Ed25519PublicKey.from_public_bytes(new.public_key)
                write_atomic(self.dir / f"{short(new.key_id)}.pub", public_pem(pub), 0o644)
        state = {
            "sequence": sequence,
            "revoked": sorted(revoked),
            "expires": {kid: format_time(t) for kid, t in sorted(expires.items())},
        }
        write_atomic(self.dir / TRUST_FILE, json.dumps(state, indent=2).encode() + b"\n", 0o644)
        return ", ".join(parts)


def _read_trust_file(path: Path) -> tuple[int, frozenset[str], dict[str, datetime]]:
    if not path.exists():
        return 0, frozenset(), {}
    try:
        data = json.loads(path.read_bytes()[:1_000_000])
        if not isinstance(data, dict) or set(data) - {"sequence", "revoked", "expires"}:
            raise ValueError("keys must be sequence, revoked, expires")
        sequence = data.get("sequence", 0)
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise ValueError(f"sequence {sequence!r} is not a whole number >= 0")
        revoked = data.get("revoked", [])
        if not isinstance(revoked, list) or not all(isinstance(k, str) and len(k) == 64 for k in revoked):
            raise ValueError("revoked must be a list of 64-digit key ids")
        raw_expires = data.get("expires", {})
        if not isinstance(raw_expires, dict):
            raise ValueError("expires must map key ids to times")
        expires = {str(k): parse_time(v, f"expires[{k}]") for k, v in raw_expires.items()}
    except ValueError as exc:
        raise FirmwareAppError(f"{path}: unreadable trust state ({exc}); updates are refused") from None
    return sequence, frozenset(revoked), expires
