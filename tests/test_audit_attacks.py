"""Attacks on the audit log by someone who can edit every file but lacks the device key, and recomputes every
hash a real attacker can: the SHA-256 chain, ``seq`` and ``audit/HEAD``. Each is found. A full disk and a
crash in the middle of an append are not attacks, and raise no alarm.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from firmware_app.audit import GENESIS, AuditLog, verify_log
from firmware_app.records.captures import Recorder
from firmware_app.records.checkpoints import write_checkpoint
from firmware_app.types import Frame
from firmware_app.update.commands import cmd_audit_verify


@pytest.fixture
def log(data_dir: Path) -> AuditLog:
    audit = AuditLog(data_dir)
    audit.append("start", version="0.1.0")
    audit.append("update_installed", model_id="us-fluid-seg", version="1.0.0", sequence=1)
    write_checkpoint(data_dir, audit)
    audit.append("capture", capture="c1")
    audit.append("update_rejected", model_id="us-fluid-seg", version="6.6.6", reason="signature invalid")
    audit.append("stop")
    assert verify_log(data_dir) == []
    return audit


def records(data_dir: Path) -> list[dict]:
    path = data_dir / "audit" / "000001.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def forge(data_dir: Path, recs: list[dict], renumber: bool = True) -> None:
    """Write ``recs`` back as a consistent chain: seq, every ``prev`` SHA-256 and HEAD recomputed. What no
    one can recompute without the device key (a ``mac``) is kept as it was, or left out if absent."""
    prev, lines = GENESIS, []
    for n, rec in enumerate(recs, start=1):
        rec = {**rec, "prev": prev, **({"seq": n} if renumber else {})}
        line = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    folder = data_dir / "audit"
    folder.mkdir(exist_ok=True)
    (folder / "000001.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    last = json.loads(lines[-1]) if lines else {"seq": 0}
    head = {"file": "000001.jsonl", "seq": last["seq"], "sha256": prev}
    (folder / "HEAD").write_text(json.dumps(head, sort_keys=True) + "\n")


def tampered(data_dir: Path, capsys) -> list[str]:
    """The problems verify finds; also checks that the command exits with 1 for them (0 for none)."""
    problems = verify_log(data_dir)
    assert cmd_audit_verify(data_dir) == (1 if problems else 0)
    capsys.readouterr()
    return problems


def test_deleted_line_is_found(data_dir, log, capsys):
    recs = records(data_dir)
    del recs[3]  # the capture
    forge(data_dir, recs)
    assert tampered(data_dir, capsys)


def test_truncated_log_is_found(data_dir, log, capsys):
    recs = records(data_dir)
    forge(data_dir, recs[:-2])  # the rejected update and the stop, gone; HEAD recomputed
    assert tampered(data_dir, capsys)
    forge(data_dir, recs[:-2])  # ... and a torn "crash" tail added to excuse the missing lines
    with open(data_dir / "audit" / "000001.jsonl", "ab") as fh:
        fh.write(b'{"event":"upd')
    assert any("incomplete last line, and the rest" in p for p in tampered(data_dir, capsys))


def test_reordered_lines_are_found(data_dir, log, capsys):
    recs = records(data_dir)
    recs[3], recs[4] = recs[4], recs[3]
    forge(data_dir, recs)
    assert tampered(data_dir, capsys)


def test_appended_line_with_a_valid_chain_is_found(data_dir, log, capsys):
    recs = records(data_dir)
    extra = {**recs[1], "time": "2030-01-01T00:00:00.000Z", "version": "9.9.9"}  # mac copied from a real line
    forge(data_dir, [*recs, extra])
    assert tampered(data_dir, capsys)
    forge(data_dir, [*recs, {k: v for k, v in extra.items() if k != "mac"}])  # or without a mac at all
    assert tampered(data_dir, capsys)


def test_replaced_rejected_update_record_is_found(data_dir, log, capsys):
    recs = records(data_dir)
    i = next(i for i, r in enumerate(recs) if r["event"] == "update_rejected")
    recs[i] = {**recs[i], "event": "update_installed", "reason": "ok"}
    forge(data_dir, recs)
    problems = tampered(data_dir, capsys)
    assert any(p.startswith(f"audit/000001.jsonl line {i + 1}:") for p in problems)


def test_whole_log_rewritten_in_the_legacy_format_is_found(data_dir, log, capsys):
    recs = [{k: v for k, v in r.items() if k != "mac"} for r in records(data_dir)]
    forge(data_dir, [r for r in recs if r["event"] != "update_rejected"])
    assert tampered(data_dir, capsys)


def test_deleted_log_folder_is_found_while_keys_and_captures_exist(data_dir, log, capsys):
    Recorder(data_dir, audit=log).capture(Frame(0, 0, np.zeros((16, 16), np.uint8), {}), None)
    shutil.rmtree(data_dir / "audit")
    assert tampered(data_dir, capsys)
    (data_dir / "audit.seal").unlink()  # and the seal beside it: the marker in keys/ knows
    assert any("keys/audit.marker: the log is MAC'd from seq 1" in p for p in tampered(data_dir, capsys))
    (data_dir / "keys" / "audit.marker").unlink()  # beyond the threat model: the key and the captures remain
    problems = tampered(data_dir, capsys)
    assert any("no audit log, although keys/device.key exists" in p for p in problems)


def test_older_copy_of_the_log_put_back_is_found(data_dir, log, tmp_path, capsys):
    shutil.copytree(data_dir / "audit", tmp_path / "old")
    log.append("update_rejected", model_id="us-fluid-seg", version="7.0.0", reason="sequence too old")
    shutil.rmtree(data_dir / "audit")
    shutil.copytree(tmp_path / "old", data_dir / "audit")  # lines and HEAD, complete and consistent
    problems = tampered(data_dir, capsys)
    assert any("an older copy of it put back" in p for p in problems)
    log.append("start")  # the device writes on: what it found stays in the log
    assert any("the device found the log tampered with" in p for p in tampered(data_dir, capsys))


def test_forged_head_is_found(data_dir, log, capsys):
    recs = records(data_dir)
    forge(data_dir, recs[:-1], renumber=False)
    head = json.loads((data_dir / "audit" / "HEAD").read_text())
    head["seal"] = "0" * 64  # a seal made up without the key
    (data_dir / "audit" / "HEAD").write_text(json.dumps(head))
    assert tampered(data_dir, capsys)


class DiskFull:
    """os.write that fails with ENOSPC for files whose path contains ``needle``, after writing half."""

    def __init__(self, monkeypatch, needle: str) -> None:
        self.needle, self.real, self.hits = needle, os.write, 0
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data) -> int:
        if self.needle in os.readlink(f"/proc/self/fd/{fd}"):
            self.hits += 1
            half = bytes(data)[: max(1, len(data) // 2)]
            self.real(fd, half)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


@pytest.mark.parametrize("needle", [".jsonl", "/.HEAD.", "/.audit.seal."])
def test_full_disk_raises_no_false_alarm(data_dir, log, monkeypatch, capsys, needle):
    full = DiskFull(monkeypatch, ".jsonl")  # the log itself fails first, whatever is parametrized
    with pytest.raises(OSError):
        log.append("capture", capture="c2")
    monkeypatch.undo()
    full = DiskFull(monkeypatch, needle)
    for i in range(3):  # the device keeps trying while the disk stays full
        try:
            log.append("capture", capture=f"c{i + 3}")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        assert tampered(data_dir, capsys) == [], needle
    assert full.hits
    monkeypatch.undo()  # space freed
    log.append("capture", capture="c9")
    assert tampered(data_dir, capsys) == []
    seqs = [r["seq"] for r in records(data_dir)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert (data_dir / "audit" / "000001.jsonl").read_bytes().endswith(b"\n")


def test_crash_mid_append_raises_no_false_alarm(data_dir, log, capsys):
    path = data_dir / "audit" / "000001.jsonl"
    seals = [data_dir / "audit" / "HEAD", *data_dir.glob("audit.seal")]
    saved = {p: p.read_bytes() for p in [path, *seals]}
    log.append("capture", capture="c2")
    line = path.read_bytes()[len(saved[path]) :]
    for p, data in saved.items():  # the state before the append ...
        p.write_bytes(data)
    with open(path, "ab") as fh:  # ... and half its line: a power cut in the middle of the write
        fh.write(line[: len(line) // 2])
    assert tampered(data_dir, capsys) == []
    assert cmd_audit_verify(data_dir) == 0
    assert "incomplete last line (crash or full disk)" in capsys.readouterr().out
    log.append("start")  # the next start drops the torn line and goes on
    assert tampered(data_dir, capsys) == []
    saved = {p: p.read_bytes() for p in seals}
    log.append("capture", capture="c3")
    for p, data in saved.items():  # a power cut after the line, before HEAD and the seal
        p.write_bytes(data)
    assert tampered(data_dir, capsys) == []
    log.append("stop")
    assert tampered(data_dir, capsys) == []
    assert [r["event"] for r in records(data_dir)][-4:] == ["audit_recovered", "start", "capture", "stop"]


def test_older_copy_of_the_log_and_its_seal_put_back_is_found_past_a_checkpoint(
    data_dir, log, tmp_path, capsys
):
    old = tmp_path / "old"
    shutil.copytree(data_dir / "audit", old / "audit")
    for path in data_dir.glob("audit.seal"):
        shutil.copy(path, old / path.name)
    log.append("update_rejected", model_id="us-fluid-seg", version="7.0.0", reason="sequence too old")
    write_checkpoint(data_dir, log)  # signed: keys/ now remembers how far the log got
    shutil.rmtree(data_dir / "audit")
    shutil.copytree(old / "audit", data_dir / "audit")  # the whole log, HEAD and the seal of that time
    for path in old.glob("audit.seal"):
        shutil.copy(path, data_dir / path.name)
    problems = tampered(data_dir, capsys)
    assert any("at a signed checkpoint" in p for p in problems)
