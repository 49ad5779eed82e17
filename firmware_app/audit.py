"""The audit log: ``<data-dir>/audit/NNNNNN.jsonl``, append-only JSON lines in one SHA-256 hash chain.

Each line is one JSON object (sorted keys, ASCII, no spaces) with ``seq`` (1, 2, 3, ... across all files),
``time`` (UTC, from the wall clock, informative only), ``event``, the caller's fields, and ``prev``: the
SHA-256 (hex) of the previous line's bytes, 64 zeros for the very first line. A file is closed once it passes
``ROTATE_BYTES``; the first line of the next file chains to the last line of the one before. ``audit/HEAD``
holds the seq and hash of the last line, so that editing or removing the last lines is found as well.

Every append is flocked (the daemon and the command line may write at once) and fsynced before it returns.

The chain finds corruption and any edit by someone who does not rewrite the whole log; signed checkpoints
(the records issue) make a rewrite detectable too.

No patient identifiers, ever: fields carry ids, versions, hashes, sizes and outcomes. Field names that
suggest patient data (``patient_*``, ``name``, ``birth``, ...) are refused with ValueError, as are nested
objects; strings are cut to MAX_STRING characters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from firmware_app.durable import fsync_dir, locked, write_atomic

ROTATE_BYTES = 4 * 1024 * 1024
MAX_LINE_BYTES = 16384
MAX_STRING = 512  # longer strings (an error message) are cut to this many characters
GENESIS = "0" * 64
_RESERVED = ("seq", "time", "event", "prev")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
_EVENT = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_FILE = re.compile(r"\d{6}\.jsonl")
_PATIENT_WORDS = frozenset(
    "patient name names birth birthdate dob mrn accession address phone sex gender age ssn".split()
)
_SCALARS = (str, int, float, bool, type(None))


def _hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


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


class AuditLog:
    """``AuditLog(data_dir).append("update_installed", model_id="us-fluid-seg", version="1.2.0")``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir) / "audit"

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line, fsynced, chained to the last one; returns the record as written."""
        _check_fields(event, fields)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(self.dir / ".lock", what="audit log write"):
            path, last = self._tail()
            seq, prev = (1, GENESIS) if last is None else (json.loads(last)["seq"] + 1, _hash(last))
            time = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            record = {
                **{k: _clip(v) for k, v in fields.items()},
                "seq": seq,
                "time": time,
                "event": event,
                "prev": prev,
            }
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
            if len(line) > MAX_LINE_BYTES:
                raise ValueError(f"audit record {event!r} is {len(line)} bytes, more than {MAX_LINE_BYTES}")
            new_file = path is None or path.stat().st_size >= ROTATE_BYTES
            if new_file:
                number = int(path.stem) + 1 if path is not None else 1
                path = self.dir / f"{number:06d}.jsonl"
            # A torn last line (power cut mid-write) stays visible to verify_log; the chain goes on.
            data = (b"" if _ends_cleanly(path) else b"\n") + line + b"\n"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                written = os.write(fd, data)  # one write: a killed process leaves the whole line or none
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            if new_file:
                fsync_dir(self.dir)
            head = {"file": path.name, "seq": seq, "sha256": _hash(line)}
            write_atomic(self.dir / "HEAD", json.dumps(head, sort_keys=True).encode() + b"\n", 0o600)
        return record

    def _tail(self) -> tuple[Path | None, bytes | None]:
        """The newest log file and its last well-formed line (None, None for an empty log)."""
        files = sorted(p for p in self.dir.glob("*.jsonl") if _FILE.fullmatch(p.name))
        for path in reversed(files):
            with open(path, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - 4 * MAX_LINE_BYTES))
                tail = fh.read()
            for raw in reversed(tail.split(b"\n")):
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and type(record.get("seq")) is int:
                    return files[-1], raw
        return (files[-1] if files else None), None


def _ends_cleanly(path: Path) -> bool:
    """True for a missing or empty file, or one whose last byte is a newline."""
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                return True
            fh.seek(-1, 2)
            return fh.read(1) == b"\n"
    except FileNotFoundError:
        return True


def verify_log(data_dir: str | Path) -> list[str]:
    """Every problem of the chain, one line each naming the file and line; [] when the log is intact."""
    folder = Path(data_dir) / "audit"
    problems: list[str] = []
    files = sorted(folder.glob("*.jsonl"))
    prev, seq, last_where = GENESIS, 0, ""
    hashes: dict[int, str] = {}  # seq -> hash of its line, for the HEAD check
    for number, path in enumerate(files, start=1):
        rel = f"audit/{path.name}"
        if not _FILE.fullmatch(path.name):
            problems.append(f"{rel}: unexpected file name (expected NNNNNN.jsonl)")
            continue
        if int(path.stem) != number:
            problems.append(f"{rel}: expected file {number:06d}.jsonl here (a file was removed or renamed)")
        lines = path.read_bytes().split(b"\n")
        if lines[-1]:
            problems.append(f"{rel} line {len(lines)}: incomplete last line (no newline)")
        for lineno, raw in enumerate(lines[:-1] if not lines[-1] else lines, start=1):
            where = f"{rel} line {lineno}"
            try:
                record = json.loads(raw)
                got_seq, got_prev = int(record["seq"]), str(record["prev"])
            except (ValueError, TypeError, KeyError):
                problems.append(f"{where}: not an audit record (edited, torn or inserted)")
                continue
            if got_prev != prev:
                problems.append(
                    f"{where}: hash chain broken (the line before it was edited, removed or inserted)"
                )
            if got_seq != seq + 1:
                problems.append(
                    f"{where}: seq {got_seq} follows seq {seq} (lines removed, inserted or reordered)"
                )
            prev, seq, last_where = _hash(raw), got_seq, where
            hashes[seq] = prev
    head_path = folder / "HEAD"
    if not head_path.exists():
        if seq:
            problems.append("audit/HEAD: missing (removed); the end of the log cannot be checked")
        return problems
    try:
        head = json.loads(head_path.read_bytes())
        head_seq, head_hash = int(head["seq"]), str(head["sha256"])
    except (ValueError, TypeError, KeyError):
        return [*problems, "audit/HEAD: unreadable (edited)"]
    if head_seq > seq:
        problems.append(
            f"audit/HEAD: the log ends at seq {seq} but HEAD says {head_seq} (last lines removed)"
        )
    elif head_seq < seq - 1:
        # One line past HEAD is a power cut between the append and the HEAD update; more is not.
        problems.append(f"audit/HEAD: says seq {head_seq} but the log goes on to seq {seq} (lines appended)")
    elif hashes.get(head_seq) != head_hash:
        problems.append(f"{last_where}: does not match audit/HEAD (the last line was edited)")
    return problems
