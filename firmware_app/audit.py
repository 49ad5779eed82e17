"""The audit log: ``<data-dir>/audit/NNNNNN.jsonl``, append-only JSON lines, hash-chained and MAC'd.

Each line is one JSON object (sorted keys, ASCII, no spaces) with ``seq`` (1, 2, 3, ... across all files),
``time`` (UTC, from the wall clock, informative only), ``event``, the caller's fields, ``prev``: the SHA-256
(hex) of the previous line's bytes (64 zeros for the very first line), and ``mac``:

    HMAC-SHA256(K, LINE_CONTEXT || mac of the previous line (64 zeros for the first) || "\\n" || body)

where body is the line's canonical JSON without ``mac`` and K is derived (HKDF-SHA256) from the device's
secret ``<data-dir>/keys/capture.key``. The MACs form a chain of their own: no line can be edited, removed,
inserted, reordered or appended without K. A file is closed once it passes ``ROTATE_BYTES``; the first line
of the next file chains to the last line of the one before.

The end of the log is sealed twice, each a small JSON state ``{file, seq, sha256, mac}`` of the last line
with a ``seal`` (HMAC under K with its own context), replaced atomically after every append:
``audit/HEAD``, and ``<data-dir>/audit.seal`` outside the audit folder, so that removing the folder, cutting
lines off its end or putting back an older copy of it (lines + HEAD) is found. ``keys/audit.marker``
(sealed too) says from which seq on the log is MAC'd: a log deleted with its seal, or rewritten in the old
format, is found as well; every signed checkpoint raises its floor (``AuditLog.mark``) to the checkpoint's
line, so that the log and its seal put back to a copy from before it are found too. An append writes the line(s), fsync, HEAD, the marker (the
first time), then the seal; verify accepts exactly the states a crash between these steps leaves (the log at
most one line past HEAD, the seal behind HEAD), and the next append completes them.

Appends are all-or-nothing: a failed write (a full disk) is cut back to the last complete line, and a failed
HEAD update takes the line back out. A torn last line (a power cut mid-write) is reported by verify as an
incomplete last line (crash or full disk), not as tampering, as long as everything before it and the seals
agree; the next append drops it and records ``audit_recovered`` with its size and SHA-256. Anything the
writer finds wrong with the seals (older, missing, forged) it records as an ``audit_tamper_found`` line
before its own, so that what it sees is never overwritten by its new seals.

Logs written before the MACs (legacy lines: no ``mac``) still verify by their hash chain; the first MAC'd
line chains to the last legacy line, so from then on the legacy lines are covered too.

Every append is flocked (the daemon and the command line may write at once) and fsynced before it returns.
Signed checkpoints (``firmware_app.records.checkpoints``) sign the chain head with the device's ed25519 key.

No patient identifiers, ever: fields carry ids, versions, hashes, sizes and outcomes. Field names that
suggest patient data (``patient_*``, ``name``, ``birth``, ...) are refused with ValueError, as are nested
objects; strings are cut to MAX_STRING characters.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from firmware_app.durable import fsync_dir, locked, write_atomic

log = logging.getLogger(__name__)

ROTATE_BYTES = 4 * 1024 * 1024
MAX_LINE_BYTES = 16384
MAX_STRING = 512  # longer strings (an error message) are cut to this many characters
GENESIS = "0" * 64
SEAL = "audit.seal"  # in the data dir, beside audit/: survives ``rm -rf audit``
RECOVERED = "audit_recovered"
TAMPER_FOUND = "audit_tamper_found"
LINE_CONTEXT = b"firmware-app audit line v2\0"
HEAD_CONTEXT = b"firmware-app audit head v2\0"
SEAL_CONTEXT = b"firmware-app audit seal v2\0"
MARKER = "audit.marker"  # in keys/, written once: "this device MACs its log from seq S on"
MARKER_CONTEXT = b"firmware-app audit marker v2\0"
_HKDF_INFO = b"firmware-app audit log mac v2"
_RESERVED = ("seq", "time", "event", "prev", "mac")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
_EVENT = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_FILE = re.compile(r"\d{6}\.jsonl")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PATIENT_WORDS = frozenset(
    "patient name names birth birthdate dob mrn accession address phone sex gender age ssn".split()
)
_SCALARS = (str, int, float, bool, type(None))


def _hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_STRING:
        return value[: MAX_STRING - 3] + "..."
    if isinstance(value, (list, tuple)):
        return [_clip(v) for v in value]
    return value


def _check_fields(event: str, fields: dict[str, Any]) -> None:
    if not _EVENT.fullmatch(event):
        raise ValueError(f"audit event {event!r}: use lower-case letters, digits, '_' and '.'")
    for key, value in fields.items():
        if not _NAME.fullmatch(key) or key in _RESERVED:
            raise ValueError(f"audit field {key!r}: use lower-case letters, digits and '_', not {_RESERVED}")
        if _PATIENT_WORDS.intersection(key.split("_")):
            raise ValueError(f"audit field {key!r} looks like a patient identifier; the audit log has none")
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > 64 or not all(isinstance(v, _SCALARS) for v in values):
            raise ValueError(f"audit field {key!r}: only numbers, short strings or short lists of them")


# -- the MAC key and the seals -------------------------------------------------------------------------------
def mac_key(data_dir: str | os.PathLike[str], create: bool = True) -> bytes | None:
    """K, derived one-way from the device's secret key; None when ``create`` is false and there is none."""
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from firmware_app.records.crypto import CAPTURE_KEY, KEY_DIR, capture_key

    if not create and not (Path(data_dir) / KEY_DIR / CAPTURE_KEY).exists():
        return None
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(capture_key(data_dir))


def _line_mac(key: bytes, prev_mac: str, body: bytes) -> str:
    return hmac.new(key, LINE_CONTEXT + prev_mac.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def _state_bytes(key: bytes, context: bytes, state: dict[str, Any]) -> bytes:
    seal = hmac.new(key, context + _canonical(state), hashlib.sha256).hexdigest()
    return _canonical({**state, "seal": seal}) + b"\n"


@dataclass(frozen=True)
class _State:
    """A sealed end of the log (HEAD or audit.seal), or a legacy HEAD (``sealed`` false)."""

    file: str
    seq: int
    sha256: str
    mac: str | None
    sealed: bool


def _read_small(path: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None), (None, None) when missing, or (None, problem) when unreadable: a seal or a marker."""
    try:
        return path.read_bytes()[:4096], None
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


def _read_state(path: Path, key: bytes | None, context: bytes) -> tuple[_State | None, str | None]:
    """(state, None), (None, None) when missing, or (None, problem) when unreadable or not sealed by K."""
    raw, problem = _read_small(path)
    if raw is None:
        return None, problem
    try:
        data = json.loads(raw)
        state = {"file": str(data["file"]), "seq": int(data["seq"]), "sha256": str(data["sha256"])}
        if "mac" in data:
            state["mac"] = str(data["mac"])
        seal = data.get("seal")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, "unreadable (edited)"
    if seal is None:
        return _State(state["file"], state["seq"], state["sha256"], None, False), None
    if key is None:
        return None, "sealed, but the device key is missing: it cannot be checked"
    if "mac" not in state or raw != _state_bytes(key, context, state):
        return None, "seal invalid (edited, forged, or from another device; making one needs the device key)"
    return _State(state["file"], state["seq"], state["sha256"], state["mac"], True), None


@dataclass(frozen=True)
class _Marker:
    """keys/audit.marker: the log is MAC'd from seq ``since`` on, and had reached seq ``floor`` (whose line
    has MAC ``floor_mac``) at the last signed checkpoint."""

    since: int
    floor: int = 0
    floor_mac: str = ""


def _marker_bytes(key: bytes, marker: _Marker) -> bytes:
    body = {"floor": int(marker.floor), "floor_mac": str(marker.floor_mac), "since": int(marker.since)}
    seal = hmac.new(key, MARKER_CONTEXT + _canonical(body), hashlib.sha256).hexdigest()
    return _canonical({**body, "seal": seal}) + b"\n"


def _read_marker(data_dir: Path, key: bytes | None) -> tuple[_Marker | None, str | None]:
    """(marker, None), (None, None) when there is none, or (None, problem)."""
    raw, problem = _read_small(data_dir / "keys" / MARKER)
    if raw is None:
        return None, problem
    try:
        data = json.loads(raw)
        marker = _Marker(int(data["since"]), int(data["floor"]), str(data["floor_mac"]))
    except (ValueError, TypeError, KeyError):
        return None, "unreadable (edited)"
    if key is None:
        return None, "the device key is missing: it cannot be checked"
    if raw != _marker_bytes(key, marker):
        return None, "seal invalid (edited or forged; making one needs the device key)"
    return marker, None


# -- writing -------------------------------------------------------------------------------------------------
@dataclass
class _Tail:
    path: Path | None  # the newest log file
    seq: int = 0
    sha256: str = GENESIS
    mac: str | None = None  # of the last line; None for a legacy line or an empty log
    before_mac: bool = False  # the line before the last one carries a MAC
    first_mac: int | None = None  # seq of the first MAC'd line, when it is among the last few
    dropped: bytes = b""  # a torn last line, cut off


class AuditLog:
    """``AuditLog(data_dir).append("update_installed", model_id="us-fluid-seg", version="1.2.0")``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "audit"
        self._key: bytes | None = None

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line, fsynced, chained and MAC'd, then seal the new end; returns the record."""
        _check_fields(event, fields)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._key is None:
            self._key = mac_key(self.data_dir)
        key = self._key
        assert key is not None
        with locked(self.dir / ".lock", what="audit log write"):
            tail = self._tail()
            head, seal, findings = self._complete(key, tail)
            entries: list[tuple[str, dict[str, Any]]] = []
            if tail.dropped:
                entries.append(
                    (RECOVERED, {"dropped_bytes": len(tail.dropped), "dropped_sha256": _hash(tail.dropped)})
                )
            entries += [(TAMPER_FOUND, {"finding": f}) for f in findings]
            entries.append((event, fields))
            seq, prev, prev_mac = tail.seq, tail.sha256, tail.mac or GENESIS
            time = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            lines: list[bytes] = []
            record: dict[str, Any] = {}
            for name, values in entries:
                seq += 1
                record = {
                    **{k: _clip(v) for k, v in values.items()},
                    "seq": seq,
                    "time": time,
                    "event": name,
                    "prev": prev,
                }
                body = _canonical(record)
                record["mac"] = prev_mac = _line_mac(key, prev_mac, body)
                line = _canonical(record)
                if len(line) > MAX_LINE_BYTES:
                    raise ValueError(
                        f"audit record {name!r} is {len(line)} bytes, more than {MAX_LINE_BYTES}"
                    )
                lines.append(line)
                prev = _hash(line)
            path = tail.path
            new_file = path is None or path.stat().st_size >= ROTATE_BYTES
            if new_file:
                number = int(path.stem) + 1 if path is not None else 1
                path = self.dir / f"{number:06d}.jsonl"
            assert path is not None
            start = self._write(path, b"".join(line + b"\n" for line in lines), new_file)
            state = {"file": path.name, "seq": seq, "sha256": prev, "mac": prev_mac}
            self._commit_head(key, state, path, start, new_file)
            if tail.mac is None and not self._write_marker(key, tail.seq + 1):
                return record  # the seal comes after the marker; the next append makes both
            try:
                _replace(self.data_dir / SEAL, _state_bytes(key, SEAL_CONTEXT, state))
            except OSError as exc:  # the line is in, sealed by HEAD; the next append completes the seal
                log.warning("audit log: %s not updated (%s); the next append retries", SEAL, exc)
                _remove_tmp(self.data_dir / SEAL)
        return record

    def mark(self, seq: int) -> None:
        """Raise the floor in keys/audit.marker to ``seq`` (a signed checkpoint's line): the log, its HEAD
        and its seal put back to a copy from before it are found then. Logged, not raised, on failure."""
        with locked(self.dir / ".lock", what="audit log write"):
            key = self._key or mac_key(self.data_dir)
            assert key is not None
            marker, problem = _read_marker(self.data_dir, key)
            tail = self._tail(cut=False)
            # Only the last line's MAC is at hand: when another line came first, the next checkpoint raises it.
            if marker is None or problem or tail.mac is None or seq != tail.seq or seq <= marker.floor:
                return
            try:
                write_atomic(
                    self.data_dir / "keys" / MARKER,
                    _marker_bytes(key, _Marker(marker.since, seq, tail.mac)),
                    0o600,
                )
            except OSError as exc:
                log.warning("audit log: keys/%s floor not raised (%s)", MARKER, exc)
                _remove_tmp(self.data_dir / "keys" / MARKER)

    def _write_marker(self, key: bytes, since: int, strict: bool = False) -> bool:
        """Say once, in keys/ where the log cannot be edited, from which seq on the log is MAC'd."""
        from firmware_app.records.crypto import keys_dir
        from firmware_app.records.fsutil import write_new

        try:
            write_new(
                keys_dir(self.data_dir) / MARKER,
                _marker_bytes(key, _Marker(since)),
                0o600,
                "the audit marker",
            )
        except FileExistsError:
            pass
        except Exception as exc:  # noqa: BLE001 - a full disk: the next append retries
            if strict:
                raise
            log.warning("audit log: keys/%s not written (%s); the next append retries", MARKER, exc)
            return False
        return True

    def _write(self, path: Path, data: bytes, new_file: bool) -> int:
        """Append ``data`` and fsync, all or nothing: on any failure the file is cut back. Its old size."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # one write in practice: a killed process leaves all lines or none
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                _cut(fd, start)
                if new_file:
                    path.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)
        if new_file:
            fsync_dir(self.dir)
        return start

    def _commit_head(self, key: bytes, state: dict[str, Any], path: Path, start: int, new_file: bool) -> None:
        """Replace HEAD; if that fails (a full disk), take the new lines out again, so nothing half stays."""
        head = _state_bytes(key, HEAD_CONTEXT, state)
        try:
            write_atomic(self.dir / "HEAD", head, 0o600)
        except BaseException as exc:
            _remove_tmp(self.dir / "HEAD")
            try:
                replaced = (self.dir / "HEAD").read_bytes() == head
            except OSError:
                replaced = False
            if replaced and isinstance(exc, OSError):  # only the folder's fsync failed: it is committed
                log.warning("audit log: HEAD written, but its folder not synced (%s)", exc)
                return
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _cut(fd, start)
            finally:
                os.close(fd)
            if new_file:
                path.unlink(missing_ok=True)
            raise

    def _complete(self, key: bytes, tail: _Tail) -> tuple[_State | None, _State | None, list[str]]:
        """Finish what a crash left undone (HEAD or the seal one step behind) and list what is wrong."""
        head, head_problem = _read_state(self.dir / "HEAD", key, HEAD_CONTEXT)
        seal, seal_problem = _read_state(self.data_dir / SEAL, key, SEAL_CONTEXT)
        findings = [f"audit/HEAD: {head_problem}"] if head_problem else []
        if seal_problem:
            findings.append(f"{SEAL}: {seal_problem}")
        for name, st in (("audit/HEAD", head), (SEAL, seal)):
            if st is not None and st.seq > tail.seq:
                findings.append(f"{name} says seq {st.seq} but the log ended at seq {tail.seq}")
            elif st is not None and st.seq == tail.seq and st.sha256 != tail.sha256:
                findings.append(f"{name}: seq {st.seq} is not the line it sealed")
        if head is not None and tail.mac is not None and head.sealed and head.seq < tail.seq - 1:
            findings.append(f"audit/HEAD says seq {head.seq}, older than the log's end at seq {tail.seq}")
        if tail.mac is not None and tail.before_mac:  # past the first MAC'd line, both seals must exist
            if head is None and not head_problem:
                findings.append("audit/HEAD: missing")
            elif head is not None and not head.sealed:
                findings.append("audit/HEAD: not sealed, although the log is")
            if seal is None and not seal_problem:
                findings.append(f"{SEAL}: missing")
        marker, marker_problem = _read_marker(self.data_dir, key)
        since = marker.since if marker is not None else None
        if marker_problem:
            findings.append(f"keys/{MARKER}: {marker_problem}")
        elif marker is not None and marker.floor > tail.seq:
            findings.append(
                f"keys/{MARKER}: the log had reached seq {marker.floor} at a signed checkpoint, but it ended at "
                f"seq {tail.seq}"
            )
        elif since is not None and tail.mac is None:
            findings.append(
                f"keys/{MARKER}: the log is MAC'd from seq {since} on, but it ends at seq {tail.seq} without a MAC"
            )
        elif since is None and tail.mac is not None and (seal is not None or tail.first_mac is None):
            findings.append(f"keys/{MARKER}: missing, although the log is MAC'd")
        state = {"file": tail.path.name if tail.path else "", "seq": tail.seq, "sha256": tail.sha256}
        if tail.mac is not None and not findings:
            state["mac"] = tail.mac
            if since is None and tail.first_mac is not None:  # a crash before the marker was made
                self._write_marker(key, tail.first_mac, strict=True)
            for path, context, st in (
                (self.dir / "HEAD", HEAD_CONTEXT, head),
                (self.data_dir / SEAL, SEAL_CONTEXT, seal),
            ):
                if st is None or st.seq < tail.seq:  # a crash after the line (or a full disk for the seal)
                    try:
                        _replace(path, _state_bytes(key, context, state), durable=path.name == "HEAD")
                    except BaseException:
                        _remove_tmp(path)
                        raise
        return head, seal, findings

    def _tail(self, cut: bool = True) -> _Tail:
        """The newest log file and its last well-formed line; a torn last line is cut off (and kept)."""
        files = sorted(p for p in self.dir.glob("*.jsonl") if _FILE.fullmatch(p.name))
        tail = _Tail(files[-1] if files else None)
        if tail.path is not None and cut:
            tail.dropped = _cut_torn_line(tail.path)
        found: list[dict[str, Any]] = []
        for path in reversed(files):
            with open(path, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - 4 * MAX_LINE_BYTES))
                chunk = fh.read()
            for raw in reversed(chunk.split(b"\n")):
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and type(record.get("seq")) is int:
                    if not found:
                        tail.seq, tail.sha256 = record["seq"], _hash(raw)
                        mac = record.get("mac")
                        tail.mac = mac if isinstance(mac, str) else None
                    found.append(record)
                    if len(found) == 2:
                        tail.before_mac = isinstance(record.get("mac"), str)
                    if not isinstance(record.get("mac"), str):
                        macd = [r["seq"] for r in found if isinstance(r.get("mac"), str)]
                        tail.first_mac = macd[-1] if macd else None
                        return tail
                    if len(found) == 8:
                        return tail
        if found and isinstance(found[-1].get("mac"), str) and found[-1]["seq"] == 1:
            tail.first_mac = 1
        return tail


def _replace(path: Path, data: bytes, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` (written and fsynced first: never an empty file after a crash).

    Only with ``durable`` is the folder synced too. The seal goes without: a crash may leave it one state
    behind (on ext4 the next append's fsync commits the rename anyway), which verify accepts; it saves a
    sync per append, and the seal only ever needs to be a lower bound of the log's end.
    """
    write_atomic(path, data, 0o600, sync_dir=durable)


def _cut(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        log.error("audit log: could not cut a failed append back (%s); verify will show a torn line", exc)


def _remove_tmp(path: Path) -> None:
    """The temporary file a failed ``write_atomic`` of ``path`` left (a full disk)."""
    path.with_name(f".{path.name}.{os.getpid()}.tmp").unlink(missing_ok=True)


def _cut_torn_line(path: Path) -> bytes:
    """Cut the bytes after the last newline off ``path`` (a power cut mid-append); what was cut."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            return b""
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return b""
        end = size
        while end > 0:
            start = max(0, end - 4 * MAX_LINE_BYTES)
            fh.seek(start)
            newline = fh.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        fh.seek(keep)
        dropped = fh.read()
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s: an incomplete last line (%d bytes, crash or full disk) was cut off", path, len(dropped))
    return dropped


# -- verifying -----------------------------------------------------------------------------------------------
@dataclass
class LogReport:
    """What ``check_log`` found: ``problems`` (tampering or damage), ``notes`` (fine, but worth saying)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lines: int = 0
    files: int = 0
    macd: int = 0  # lines that carry a MAC
    legacy: int = 0  # lines before the first MAC'd one
    last_seq: int = 0

    @property
    def intact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for ``audit verify``."""
        if self.problems:
            return f"audit log NOT intact: {len(self.problems)} problem(s) (tampered with or damaged)"
        where = f"{self.lines} line(s) in {self.files} file(s)"
        if not self.lines:
            text = f"audit log intact: {where} (nothing recorded yet)"
        elif not self.macd:
            text = (
                f"audit log intact: {where}, hash chain verified (legacy, unprotected tail: no line is MAC'd; "
                "the next append seals it)"
            )
        else:
            text = f"audit log intact: {where}, hash chain and MACs verified to the sealed end (seq {self.last_seq})"
            if self.legacy:
                text += f"; the first {self.legacy} line(s) are legacy, sealed by the first MAC'd line"
        return "; ".join([text, *(f"note: {n}" for n in self.notes)])


class _Key:
    """K for the checker, read once and only when a MAC or a seal needs it (never created)."""

    def __init__(self, data_dir: Path, problems: list[str]) -> None:
        self.data_dir, self.problems, self._done, self._key = data_dir, problems, False, None

    def get(self) -> bytes | None:
        if not self._done:
            self._done = True
            from firmware_app.errors import FirmwareAppError

            try:
                self._key = mac_key(self.data_dir, create=False)
            except FirmwareAppError as exc:
                self.problems.append(f"keys: {exc}; the audit log's MACs cannot be checked")
            else:
                if self._key is None:
                    self.problems.append(
                        "keys/capture.key: missing (removed); the audit log's MACs and seals cannot be checked"
                    )
        return self._key


def verify_log(data_dir: str | os.PathLike[str]) -> list[str]:
    """Every problem of the log, one line each naming the file and line; [] when the log is intact."""
    return check_log(data_dir).problems


def check_log(data_dir: str | os.PathLike[str]) -> LogReport:
    """Check the hash chain, every MAC, both seals, and that a log exists where the device says it should.

    The writers' lock is held meanwhile (when it can be taken), so that an append by the running daemon
    cannot fall between reading the lines and reading the seals.
    """
    with _reading(Path(data_dir) / "audit"):
        return _check_log(Path(data_dir))


@contextmanager
def _reading(folder: Path) -> Iterator[None]:
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC) if folder.is_dir() else -1
    except OSError:  # no lock file yet, or a read-only data dir: nobody is writing
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _check_log(root: Path) -> LogReport:
    folder = root / "audit"
    report = LogReport()
    problems = report.problems
    keys = _Key(root, problems)
    files = sorted(folder.glob("*.jsonl"))
    report.files = len(files)
    prev, seq, prev_mac, first_mac = GENESIS, 0, GENESIS, 0
    seen: dict[int, tuple[str, str | None, str]] = {}  # seq -> (sha256 of its line, its mac, where)
    torn: tuple[str, bytes] | None = None
    torn_before: list[str] = []  # legacy lines that are not records, until the next record says more
    for number, path in enumerate(files, start=1):
        rel = f"audit/{path.name}"
        if not _FILE.fullmatch(path.name):
            problems.append(f"{rel}: unexpected file name (expected NNNNNN.jsonl)")
            continue
        if int(path.stem) != number:
            problems.append(f"{rel}: expected file {number:06d}.jsonl here (a file was removed or renamed)")
        lines = path.read_bytes().split(b"\n")
        rest = lines.pop()
        if rest and number == len(files):
            torn = (f"{rel} line {len(lines) + 1}", rest)
        elif rest:
            problems.append(f"{rel} line {len(lines) + 1}: incomplete line in a closed file (edited or cut)")
        for lineno, raw in enumerate(lines, start=1):
            where = f"{rel} line {lineno}"
            try:
                record = json.loads(raw)
                got_seq, got_prev = int(record["seq"]), str(record["prev"])
            except (ValueError, TypeError, KeyError):
                if not first_mac and raw.startswith(b'{"') and len(raw) <= MAX_LINE_BYTES:
                    torn_before.append(where)  # the old writer went on after a torn line: see below
                else:
                    problems.append(f"{where}: not an audit record (edited, torn or inserted)")
                continue
            for torn_where in torn_before:
                if got_prev == prev and got_seq == seq + 1:
                    report.notes.append(
                        f"{torn_where}: incomplete line an older version left (crash or full disk); the chain "
                        "goes on over it"
                    )
                else:
                    problems.append(f"{torn_where}: not an audit record (edited, torn or inserted)")
            torn_before.clear()
            if got_prev != prev:
                problems.append(
                    f"{where}: hash chain broken (the line before it was edited, removed or inserted)"
                )
            if got_seq != seq + 1:
                problems.append(
                    f"{where}: seq {got_seq} follows seq {seq} (lines removed, inserted or reordered)"
                )
            mac = record.get("mac")
            if mac is not None:
                report.macd += 1
                first_mac = first_mac or got_seq
                key = keys.get()
                if key is not None:
                    body = {k: v for k, v in record.items() if k != "mac"}
                    if raw != _canonical(record):
                        problems.append(f"{where}: not in the form the device writes (edited)")
                    elif not hmac.compare_digest(str(mac), _line_mac(key, prev_mac, _canonical(body))):
                        problems.append(
                            f"{where}: MAC invalid (edited, forged, moved or reordered; a valid MAC needs the "
                            "device key)"
                        )
                prev_mac = str(mac)
            elif first_mac:
                problems.append(
                    f"{where}: no MAC after MAC'd lines (inserted or replaced without the device key)"
                )
            else:
                report.legacy += 1
            if record.get("event") == TAMPER_FOUND:
                problems.append(f"{where}: the device found the log tampered with: {record.get('finding')}")
            elif record.get("event") == RECOVERED:
                report.notes.append(f"{where}: an incomplete line left by a crash or a full disk was dropped")
            prev, seq = _hash(raw), got_seq
            seen[seq] = (prev, None if mac is None else str(mac), where)
            report.lines += 1
    problems += [f"{w}: not an audit record (edited, torn or inserted)" for w in torn_before]
    report.last_seq = seq
    _check_end(root, report, keys, seen, first_mac)
    if torn is not None:
        where, rest = torn
        if problems:
            problems.append(f"{where}: incomplete last line, and the rest of the log does not check out")
        else:
            report.notes.append(
                f"{where}: incomplete last line (crash or full disk), {len(rest)} bytes, ignored"
            )
    return report


def _check_end(
    root: Path, report: LogReport, keys: _Key, seen: dict[int, tuple[str, str | None, str]], first_mac: int
) -> None:
    """HEAD and audit.seal against the log's last lines; a missing log where the device had one."""
    problems, last = report.problems, report.last_seq
    head_path, seal_path = root / "audit" / "HEAD", root / SEAL
    needs_key = first_mac or seal_path.exists() or b'"seal"' in _peek(head_path)
    key = keys.get() if needs_key else None
    head, head_problem = _read_state(head_path, key, HEAD_CONTEXT)
    seal, seal_problem = _read_state(seal_path, key, SEAL_CONTEXT)
    if head_problem:
        problems.append(f"audit/HEAD: {head_problem}")
    if seal_problem:
        problems.append(f"{SEAL}: {seal_problem}")
    marker, marker_problem = _read_marker(root, keys.get() if (root / "keys" / MARKER).exists() else None)
    since = marker.since if marker is not None else None
    if marker_problem:
        problems.append(f"keys/{MARKER}: {marker_problem}")
    if head_problem or seal_problem or marker_problem:
        return
    if since is not None and first_mac != since:
        found = f"from seq {first_mac}" if first_mac else "not at all"
        problems.append(
            f"keys/{MARKER}: the log is MAC'd from seq {since} on, but here {found} (deleted, rewritten in the "
            "old format, or restarted)"
        )
        return
    if marker is not None and marker.floor:
        line = seen.get(marker.floor)
        if line is None or line[1] != marker.floor_mac:
            problems.append(
                f"keys/{MARKER}: the log had reached seq {marker.floor} at a signed checkpoint, but "
                + (f"seq {marker.floor} is another line here" if line else f"here it ends at seq {last}")
                + " (an older copy of the log and its seals put back)"
            )
            return
    if since is None and first_mac and seal is not None:  # (no seal yet: a crash before the marker)
        problems.append(f"keys/{MARKER}: missing (removed), although the log is MAC'd and sealed")
        return
    if not last and seal is None and head is None:
        evidence = _device_evidence(root)
        if evidence:
            problems.append(f"audit: no audit log, although {evidence} (the log was deleted)")
        return
    if not first_mac and seal is None and (head is None or not head.sealed):
        _check_legacy_end(report, head, seen)
        return
    # The log is MAC'd (or was: a seal exists). Before the first MAC'd line, the legacy end counts as sealed.
    base = first_mac - 1 if first_mac else last
    if seal is None and last > base + 1:
        problems.append(f"{SEAL}: missing (removed); it must be there once the log is MAC'd")
        return
    if head is None and (seal is not None or last > base + 1):
        problems.append("audit/HEAD: missing (removed); the end of the log cannot be checked")
        return
    if head is not None and not head.sealed and (seal is not None or head.seq != base or last != base + 1):
        problems.append("audit/HEAD: not sealed, although the log is (replaced by a legacy HEAD)")
        return
    h = head.seq if head is not None else base
    a = seal.seq if seal is not None else base
    if last < max(h, a):
        who = "audit/HEAD" if h >= a else SEAL
        problems.append(
            f"{who}: the log ends at seq {last} but {who} says {max(h, a)} (last lines removed, the log "
            "deleted, or an older copy of it put back)"
        )
    elif h < a:
        problems.append(f"audit/HEAD: says seq {h} but {SEAL} says {a} (HEAD replaced by an older copy)")
    elif last > h + 1:  # (the seal may lag after a crash: its rename is not synced, see _replace)
        problems.append(
            f"audit/HEAD: says seq {h} but the log goes on to seq {last} (HEAD replaced by an older copy)"
        )
    for name, st in (("audit/HEAD", head), (SEAL, seal)):
        if st is None or st.seq > last:
            continue
        line = seen.get(st.seq)
        if line is None:
            problems.append(f"{name}: seals seq {st.seq}, which is missing from the log")
        elif line[0] != st.sha256 or (st.sealed and line[1] != st.mac):
            problems.append(
                f"{line[2]}: differs from what {name} sealed (replaced by another copy's line, or forged)"
            )


def _check_legacy_end(
    report: LogReport, head: _State | None, seen: dict[int, tuple[str, str | None, str]]
) -> None:
    """A log without MACs: HEAD (plain SHA-256) against the last lines, as before the MACs."""
    problems, last = report.problems, report.last_seq
    if head is None:
        if last:
            problems.append("audit/HEAD: missing (removed); the end of the log cannot be checked")
        return
    if head.seq > last:
        problems.append(
            f"audit/HEAD: the log ends at seq {last} but HEAD says {head.seq} (last lines removed)"
        )
    elif head.seq < last - 1:
        # One line past HEAD is a power cut between the append and the HEAD update; more is not.
        problems.append(f"audit/HEAD: says seq {head.seq} but the log goes on to seq {last} (lines appended)")
    elif seen.get(head.seq, ("", None, ""))[0] != head.sha256:
        where = seen[last][2] if last in seen else "audit"
        problems.append(f"{where}: does not match audit/HEAD (the last line was edited)")


def _peek(path: Path) -> bytes:
    try:
        return path.read_bytes()[:4096]
    except OSError:
        return b""


def _device_evidence(root: Path) -> str:
    """Why this device must have an audit log (its signing key, captures), or '' for a fresh one."""
    from firmware_app.records.checkpoints import device_key_path

    found = []
    if device_key_path(root).exists():
        found.append("keys/device.key exists (made by the first signed checkpoint)")
    captures = root / "captures"
    if captures.is_dir():
        n = sum(1 for _ in captures.glob("*.cap"))
        if n:
            found.append(f"captures/ holds {n} capture(s)")
    return " and ".join(found)
