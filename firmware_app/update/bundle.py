"""The update bundle ``NAME.fwb``: a strict POSIX ustar archive, read as if an attacker wrote every byte.

Members, in this order and nothing else::

    manifest.json   UTF-8 JSON, at most MAX_MANIFEST_BYTES
    manifest.sig    64 bytes: ed25519 over the exact bytes of manifest.json
    payload/<path>  one member per file the manifest lists, each exactly its signed size

manifest.json (``format`` 1), every key required, no other key allowed::

    kind "model": format, kind, bundle_id, created, key_id, sequence, model_id, version, boards, backends,
                  files: [{path, size, sha256}, ...]   (manifest.toml, model.tflite, golden/*.npz, ...)
    kind "keys":  format, kind, bundle_id, created, key_id, sequence, add: [{public_key, expires, proof}],
                  revoke: [key id, ...], files: []     (a key rotation statement, see trust.py)

Reading rules: headers are ustar with a valid checksum; members are plain files (no links, devices, folders,
pax or GNU headers); names are plain (no ``..``, no absolute path, no hidden part, a small character set, at
most 4 levels) and unique, also ignoring case. The signature is checked against the trust store before the
manifest is parsed; JSON with a duplicate key, NaN or a wrong type is rejected. A payload member must have
exactly its signed size and the file must hold it: no more than the signed sizes is ever read. After the
payload comes the tar end: zero blocks only, at most one tar record long.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_app.backends.chain import backend_plugins, needed_files
from firmware_app.errors import BundleRejected
from firmware_app.update.trust import (
    NewKey,
    TrustedKey,
    TrustStore,
    format_time,
    key_id,
    parse_time,
    proof_of_possession,
    raw_public,
)

FORMAT = 1
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
MAX_FILES = 256
SIG_BYTES = 64
BLOCK = 512
TRAILER_MAX = 20 * BLOCK  # after the first zero block: the second, padded to a 10 KiB tar record
KINDS = ("model", "keys")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_BUNDLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_BOARD = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # as in models/manifest.py
_SEMVER = re.compile(r"\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?")
_COMMON = ("format", "kind", "bundle_id", "created", "key_id", "sequence", "files")
_KEYS_BY_KIND = {
    "model": frozenset(_COMMON + ("model_id", "version", "boards", "backends")),
    "keys": frozenset(_COMMON + ("add", "revoke")),
}


@dataclass(frozen=True)
class FileEntry:
    path: str  # below payload/
    size: int
    sha256: str


@dataclass(frozen=True)
class BundleManifest:
    raw: bytes  # the exact signed bytes
    kind: str
    bundle_id: str
    created: str
    key_id: str
    sequence: int
    files: tuple[FileEntry, ...]
    model_id: str = ""
    version: str = ""
    boards: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    add: tuple[NewKey, ...] = ()
    revoke: tuple[str, ...] = ()

    @property
    def payload_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        return f"{self.model_id} {self.version}" if self.kind == "model" else "trust store update"


# ---------------------------------------------------------------------------------------------- manifest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be a whole number {low}..{high}, got {value!r}")
    return value


def _str(value: Any, what: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not valid")
    return value


def _list(value: Any, what: str, most: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise ValueError(f"{what} must be a list of at most {most} items")
    return value


def check_path(path: str) -> str:
    """A payload path: plain parts joined by '/', at most 4 levels; ValueError otherwise."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if len(parts) > 4 or not all(_PART.fullmatch(p) for p in parts) or len(path) > 200:
        raise ValueError(f"payload path {path!r} is not allowed (plain names, no '..', no hidden parts)")
    return path


def _files(value: Any) -> tuple[FileEntry, ...]:
    entries = []
    for item in _list(value, "files", MAX_FILES):
        if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
            raise ValueError("each files entry must have exactly path, size, sha256")
        entries.append(
            FileEntry(
                check_path(item["path"]),
                _int(item["size"], f"size of {item['path']}", 0, MAX_BUNDLE_BYTES),
                _str(item["sha256"], f"sha256 of {item['path']}", _HEX64),
            )
        )
    folded = [e.path.lower() for e in entries]
    if len(set(folded)) != len(folded):
        raise ValueError("files lists a path twice (ignoring case)")
    folders = {"/".join(p.split("/")[:i]) for p in folded for i in range(1, p.count("/") + 1)}
    if folders & set(folded):
        raise ValueError("files lists a path that is also a folder of another path")
    if sum(e.size for e in entries) > MAX_BUNDLE_BYTES:
        raise ValueError(f"files add up to more than {MAX_BUNDLE_BYTES} bytes")
    return tuple(entries)


def parse_manifest(raw: bytes) -> BundleManifest:
    """Validate signed manifest bytes; BundleRejected('manifest.json: ...') names the problem."""
    try:
        data = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        kind = data.get("kind")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
        if set(data) != _KEYS_BY_KIND[kind]:
            missing = sorted(_KEYS_BY_KIND[kind] - set(data))
            extra = sorted(set(data) - _KEYS_BY_KIND[kind])
            raise ValueError(f"missing keys {missing}" if missing else f"unknown keys {extra}")
        _int(data["format"], "format", FORMAT, FORMAT)
        parse_time(data["created"], "created")
        common = dict(
            raw=raw,
            kind=kind,
            bundle_id=_str(data["bundle_id"], "bundle_id", _BUNDLE_ID),
            created=data["created"],
            key_id=_str(data["key_id"], "key_id", _HEX64),
            sequence=_int(data["sequence"], "sequence", 1, 2**63 - 1),
            files=_files(data["files"]),
        )
        if kind == "keys":
            return _keys_manifest(data, common)
        boards = tuple(_str(b, "board", _BOARD) for b in _list(data["boards"], "boards", 32))
        declared = backend_plugins()
        backends = tuple(_list(data["backends"], "backends", len(declared)))
        if not boards or len(set(boards)) != len(boards):
            raise ValueError("boards must name at least one board, each once")
        if not backends or len(set(backends)) != len(backends) or not set(backends) <= set(declared):
            raise ValueError(f"backends must name some of {', '.join(declared)}, each once")
        names = {f.path for f in common["files"]}
        for needed in ("manifest.toml", "model.tflite") + needed_files(backends):
            if needed not in names:
                raise ValueError(f"the payload has no {needed}")
        if not any(re.fullmatch(r"golden/case_\d{3}\.npz", n) for n in names):
            raise ValueError("the payload has no golden vectors (golden/case_NNN.npz)")
        return BundleManifest(
            **common,
            model_id=_str(data["model_id"], "model_id", MODEL_ID),
            version=_str(data["version"], "version", _SEMVER),
            boards=boards,
            backends=backends,
        )
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BundleRejected(f"manifest.json: {exc}") from None


def _keys_manifest(data: dict[str, Any], common: dict[str, Any]) -> BundleManifest:
    if common["files"]:
        raise ValueError("a keys statement carries no files")
    add = []
    for item in _list(data["add"], "add", 16):
        if not isinstance(item, dict) or set(item) != {"public_key", "expires", "proof"}:
            raise ValueError("each add entry must have exactly public_key, expires, proof")
        public, proof = _b64(item["public_key"], 32, "public_key"), _b64(item["proof"], 64, "proof")
        expires = None if item["expires"] is None else parse_time(item["expires"], "expires")
        add.append(NewKey(public, expires, proof))
    revoke = tuple(_str(k, "revoke", _HEX64) for k in _list(data["revoke"], "revoke", 64))
    if not add and not revoke:
        raise ValueError("a keys statement must add or revoke a key")
    return BundleManifest(**common, add=tuple(add), revoke=revoke)


def _b64(value: Any, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes")
    return raw


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    offset: int  # of its data in the file


def _octal(field: bytes, where: str) -> int:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        raise BundleRejected(f"not a bundle (bad number in the tar header at byte {where})")
    return int(digits, 8)


def _text(field: bytes, where: str) -> str:
    text, _, rest = field.partition(b"\0")
    if rest.strip(b"\0"):
        raise BundleRejected(f"not a bundle (hidden bytes in a tar name at byte {where})")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise BundleRejected(f"not a bundle (non-ASCII member name at byte {where})") from None


class BundleReader:
    """Walks the private copy of a bundle member by member, never past what the headers allow."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.size = os.fstat(fh.fileno()).st_size
        self.pos = 0
        self.signature = b""
        if self.size > MAX_BUNDLE_BYTES:
            raise BundleRejected(f"bundle is {self.size} bytes, more than the limit of {MAX_BUNDLE_BYTES}")
        if self.size < 4 * BLOCK or self.size % BLOCK:
            raise BundleRejected("not a bundle (not a tar file: wrong size)")

    def _read(self, n: int) -> bytes:
        self.fh.seek(self.pos)
        data = self.fh.read(n)
        if len(data) != n:
            raise BundleRejected("bundle truncated")
        self.pos += n
        return data

    def next_member(self) -> _Member | None:
        """The next header; None at the tar end (a zero block)."""
        if self.pos + BLOCK > self.size:
            raise BundleRejected("bundle truncated (no tar end)")
        at = str(self.pos)
        block = self._read(BLOCK)
        if block == bytes(BLOCK):
            return None
        if _octal(block[148:156], at) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise BundleRejected(f"not a bundle (damaged tar header at byte {at})")
        if block[257:265] != b"ustar\x0000":
            raise BundleRejected(f"not a bundle (not a POSIX ustar header at byte {at})")
        name = _text(block[0:100], at)
        prefix = _text(block[345:500], at)
        name = f"{prefix}/{name}" if prefix else name
        kind = block[156:157]
        if kind not in (b"0", b"\0") or block[157:257].strip(b"\0"):
            raise BundleRejected(
                f"{name!r}: only plain files are allowed (a link, device, folder or extension)"
            )
        size = _octal(block[124:136], at)
        return _Member(name, size, self.pos)

    def _expect(self, name: str, most: int, exact: int | None = None) -> bytes:
        member = self.next_member()
        if member is None or member.name != name:
            found = "the end" if member is None else repr(member.name)
            raise BundleRejected(f"not a bundle ({name} expected, found {found})")
        if member.size > most or (exact is not None and member.size != exact):
            raise BundleRejected(f"{name} is {member.size} bytes (allowed: {exact if exact else most})")
        return self._data(member)

    def _data(self, member: _Member) -> bytes:
        data = self._read(member.size)
        self.skip_padding(member)
        return data

    def skip_padding(self, member: _Member) -> None:
        """Read the zeros that fill ``member``'s last block: bytes there are outside every signed size."""
        self.pos = member.offset + member.size
        pad = self._read(-member.size % BLOCK)
        if pad.strip(b"\0"):
            raise BundleRejected(
                f"{member.name}: {len(pad) - pad.count(0)} non-zero byte(s) in the tar padding after its data "
                "(hidden data outside the signed sizes)"
            )

    def read_signed(self, trust: TrustStore, now: datetime) -> tuple[BundleManifest, TrustedKey]:
        """manifest.json and manifest.sig: the signature is checked before the manifest is parsed."""
        raw = self._expect("manifest.json", MAX_MANIFEST_BYTES)
        signature = self._expect("manifest.sig", SIG_BYTES, SIG_BYTES)
        signer = trust.verify(raw, signature, now)
        self.signature = signature
        manifest = parse_manifest(raw)
        if manifest.key_id != signer.key_id:
            raise BundleRejected("manifest.json names another key than the one that signed it")
        need = sum(BLOCK + f.size + (-f.size % BLOCK) for f in manifest.files) + 2 * BLOCK
        if self.pos + need > self.size:
            raise BundleRejected(
                f"bundle truncated: the manifest claims {manifest.payload_bytes} payload bytes, "
                f"the file holds {max(0, self.size - self.pos - 2 * BLOCK)} after the signature"
            )
        return manifest, signer

    def extract(
        self, manifest: BundleManifest, dest: Path, progress: Callable[[int], None] | None = None
    ) -> None:
        """Write every payload file below ``dest`` (a new, private folder), checking size and SHA-256."""
        wanted = {f"payload/{f.path}": f for f in manifest.files}
        done: set[str] = set()
        while (member := self.next_member()) is not None:
            entry = wanted.get(member.name)
            if entry is None:
                raise BundleRejected(f"{member.name!r} is not listed in the signed manifest")
            if member.name in done:
                raise BundleRejected(f"{member.name} appears twice")
            if member.size != entry.size:
                raise BundleRejected(
                    f"{member.name}: the signed manifest says {entry.size} bytes, the bundle holds {member.size}"
                )
            if member.offset + member.size > self.size:
                raise BundleRejected(f"bundle truncated inside {member.name}")
            _write_checked(self, member, entry, dest / entry.path)
            done.add(member.name)
            if progress:
                progress(len(done))
        missing = sorted(set(wanted) - done)
        if missing:
            raise BundleRejected(f"{missing[0]} is signed but missing from the bundle")
        self.check_end()

    def check_end(self) -> None:
        rest = self.size - self.pos
        if rest > TRAILER_MAX or self._read(rest).strip(b"\0"):
            raise BundleRejected("unexpected data after the end of the bundle")


def _write_checked(reader: BundleReader, member: _Member, entry: FileEntry, target: Path) -> None:
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        reader.fh.seek(member.offset)
        left = member.size
        while left:
            chunk = reader.fh.read(min(left, 1 << 20))
            if not chunk:
                raise BundleRejected(f"bundle truncated inside {member.name}")
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            left -= len(chunk)
    finally:
        os.close(fd)
    reader.skip_padding(member)
    if digest.hexdigest() != entry.sha256:
        raise BundleRejected(
            f"{member.name}: SHA-256 does not match the signed manifest (swapped in from another release, or damaged)"
        )


def read_bundle_info(path: Path) -> tuple[BundleManifest, bytes]:
    """For inspect_bundle: the parsed manifest and signature, without a trust store (nothing verified)."""
    with open(path, "rb") as fh:
        reader = BundleReader(fh)
        raw = reader._expect("manifest.json", MAX_MANIFEST_BYTES)
        signature = reader._expect("manifest.sig", SIG_BYTES, SIG_BYTES)
    return parse_manifest(raw), signature


def verify_files(folder: Path, manifest: BundleManifest, ignore: tuple[str, ...] = ()) -> list[str]:
    """Compare a folder on disk with the signed file list: every file present, plain, same size and hash."""
    problems = []
    listed = {f.path for f in manifest.files}
    for entry in manifest.files:
        path = folder / entry.path
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry.size or _sha256_file(path) != entry.sha256:
            problems.append(f"{path}: changed since it was installed (size or SHA-256 differs)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel in listed or rel in ignore or (path.is_dir() and not path.is_symlink()):
            continue
        problems.append(f"{path}: not part of the installed bundle")
    return problems


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


def _now() -> str:
    return format_time(datetime.now(timezone.utc))


def write_bundle(out: Path, raw: bytes, signature: bytes, payload: list[tuple[str, bytes]]) -> None:
    """Write a .fwb (ustar): manifest.json, manifest.sig, then payload/<path> for each (path, data)."""
    members = [("manifest.json", raw), ("manifest.sig", signature)]
    members += [(f"payload/{p}", data) for p, data in payload]
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)


def sign_manifest(fields: dict[str, Any], key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """manifest.json bytes (adding key_id) and their signature."""
    raw = json.dumps({**fields, "key_id": key_id(key)}, indent=2, sort_keys=True).encode() + b"\n"
    return raw, key.sign(raw)


def model_payload(model_dir: Path) -> list[tuple[str, bytes]]:
    """Every plain file of a model folder (hidden files and __pycache__ left out); symlinks are refused."""
    payload = []
    for path in sorted(Path(model_dir).rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
            continue
        if path.is_symlink():
            raise ValueError(f"{path}: symbolic links cannot go into a bundle")
        if path.is_file():
            payload.append((check_path(rel), path.read_bytes()))
    return payload


def compatible_backends(model_dir: Path) -> list[str]:
    """Every declared backend whose model files are all in ``model_dir`` (a bundle's default)."""
    return [
        key
        for key, plugin in backend_plugins().items()
        if all((model_dir / f).is_file() for f in plugin.files)
    ]


def build_model_bundle(
    model_dir: Path,
    out: Path,
    sequence: int,
    boards: list[str],
    backends: list[str],
    key: Ed25519PrivateKey,
    bundle_id: str | None = None,
) -> BundleManifest:
    """Sign a model folder into ``out``; the result is parsed back, so a bad bundle is never written."""
    from firmware_app.models.manifest import load_manifest

    model = load_manifest(model_dir)
    payload = model_payload(model_dir)
    fields = {
        "format": FORMAT,
        "kind": "model",
        "bundle_id": bundle_id or f"{model.id}-{model.version}-{sequence}",
        "created": _now(),
        "sequence": sequence,
        "model_id": model.id,
        "version": model.version,
        "boards": list(boards),
        "backends": list(backends),
        "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in payload],
    }
    raw, signature = sign_manifest(fields, key)
    manifest = parse_manifest(raw)
    write_bundle(out, raw, signature, payload)
    return manifest


def build_rotation_bundle(
    out: Path,
    sequence: int,
    key: Ed25519PrivateKey,
    add: list[tuple[Ed25519PrivateKey, datetime | None]],
    revoke: list[str],
    bundle_id: str | None = None,
) -> BundleManifest:
    """A key rotation statement signed by ``key`` (a key the devices trust now)."""
    fields = {
        "format": FORMAT,
        "kind": "keys",
        "bundle_id": bundle_id or f"keys-{sequence}",
        "created": _now(),
        "sequence": sequence,
        "add": [
            {
                "public_key": base64.b64encode(raw_public(new)).decode(),
                "expires": None if expires is None else format_time(expires),
                "proof": base64.b64encode(proof_of_possession(new)).decode(),
            }
            for new, expires in add
        ],
        "revoke": list(revoke),
        "files": [],
    }
    raw, signature = sign_manifest(fields, key)
    manifest = parse_manifest(raw)
    write_bundle(out, raw, signature, [])
    return manifest
