"""The audit log's hash chain finds every edited, removed, inserted or reordered line, and names it."""

from __future__ import annotations

import json
import threading

import pytest

from firmware_app import audit as audit_mod
from firmware_app.audit import AuditLog, check_log, verify_log
from firmware_app.update.commands import cmd_audit_verify


@pytest.fixture
def log(data_dir):
    log = AuditLog(data_dir)
    for i in range(6):
        log.append("update_installed", model_id="us-fluid-seg", version=f"1.{i}.0", sequence=i + 1)
    return log


def lines(data_dir, name="000001.jsonl"):
    return (data_dir / "audit" / name).read_bytes().split(b"\n")[:-1]


def rewrite(data_dir, new_lines, name="000001.jsonl"):
    (data_dir / "audit" / name).write_bytes(b"".join(line + b"\n" for line in new_lines))


def test_appended_lines_carry_the_chain(data_dir, log):
    records = [json.loads(line) for line in lines(data_dir)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == "0" * 64
    assert records[2]["version"] == "1.2.0" and records[2]["event"] == "update_installed"
    assert verify_log(data_dir) == []


def test_edited_line_is_found(data_dir, log):
    ls = lines(data_dir)
    ls[2] = ls[2].replace(b"1.2.0", b"9.9.9")
    rewrite(data_dir, ls)
    assert verify_log(data_dir) == [
        "audit/000001.jsonl line 3: MAC invalid (edited, forged, moved or reordered; a valid MAC needs the "
        "device key)",
        "audit/000001.jsonl line 4: hash chain broken (the line before it was edited, removed or inserted)",
    ]


def test_removed_line_is_found(data_dir, log):
    ls = lines(data_dir)
    del ls[3]
    rewrite(data_dir, ls)
    problems = verify_log(data_dir)
    assert any(p.startswith("audit/000001.jsonl line 4: hash chain broken") for p in problems)
    assert any("seq 5 follows seq 3" in p for p in problems)


def test_inserted_line_is_found(data_dir, log):
    ls = lines(data_dir)
    ls.insert(2, ls[1])
    rewrite(data_dir, ls)
    assert any(p.startswith("audit/000001.jsonl line 3:") for p in verify_log(data_dir))


def test_reordered_lines_are_found(data_dir, log):
    ls = lines(data_dir)
    ls[1], ls[2] = ls[2], ls[1]
    rewrite(data_dir, ls)
    problems = verify_log(data_dir)
    assert any("line 2: seq 3 follows seq 1" in p for p in problems)


def test_edited_or_removed_last_line_is_found(data_dir, log):
    ls = lines(data_dir)
    rewrite(data_dir, [*ls[:-1], ls[-1].replace(b"1.5.0", b"1.6.0")])
    problems = verify_log(data_dir)
    assert problems[0].startswith("audit/000001.jsonl line 6: MAC invalid")
    assert "audit/000001.jsonl line 6: differs from what audit/HEAD sealed" in problems[1]
    rewrite(data_dir, ls[:-1])
    assert verify_log(data_dir) == [
        "audit/HEAD: the log ends at seq 5 but audit/HEAD says 6 (last lines removed, the log deleted, or an "
        "older copy of it put back)"
    ]


def test_garbage_line_and_removed_head_are_found(data_dir, log):
    ls = lines(data_dir)
    rewrite(data_dir, [*ls[:3], b"not json", *ls[3:]])
    assert "audit/000001.jsonl line 4: not an audit record (edited, torn or inserted)" in verify_log(data_dir)
    rewrite(data_dir, ls)
    (data_dir / "audit" / "HEAD").unlink()
    assert verify_log(data_dir) == ["audit/HEAD: missing (removed); the end of the log cannot be checked"]


def test_chain_runs_across_rotated_files_and_a_removed_file_is_found(data_dir, monkeypatch):
    monkeypatch.setattr(audit_mod, "ROTATE_BYTES", 600)
    log = AuditLog(data_dir)
    for i in range(12):
        log.append("capture", frame=i)
    files = sorted((data_dir / "audit").glob("*.jsonl"))
    assert len(files) >= 3
    assert verify_log(data_dir) == []
    files[1].unlink()
    problems = verify_log(data_dir)
    assert any(p.startswith(f"audit/{files[2].name}: expected file 000002.jsonl") for p in problems)
    assert any(p.startswith(f"audit/{files[2].name} line 1: hash chain broken") for p in problems)


def test_a_torn_last_line_is_a_crash_not_tampering_and_the_next_append_drops_it(data_dir, log):
    with open(data_dir / "audit" / "000001.jsonl", "ab") as fh:
        fh.write(b'{"seq":7,"ev')  # power cut in the middle of a write
    report = check_log(data_dir)
    assert report.problems == []
    assert report.notes == [
        "audit/000001.jsonl line 7: incomplete last line (crash or full disk), 12 bytes, ignored"
    ]
    log.append("boot", starts=1)
    assert verify_log(data_dir) == []
    recovered, boot = (json.loads(line) for line in lines(data_dir)[-2:])
    assert (recovered["event"], recovered["seq"], recovered["dropped_bytes"]) == ("audit_recovered", 7, 12)
    assert (boot["event"], boot["seq"]) == ("boot", 8)


def test_concurrent_writers_keep_one_chain(data_dir):
    def write(n):
        log = AuditLog(data_dir)
        for i in range(15):
            log.append("capture", writer=n, frame=i)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verify_log(data_dir) == []
    assert len(lines(data_dir)) == 60


@pytest.mark.parametrize(
    "fields",
    [
        {"patient_name": "DOE^JANE"},
        {"birth_date": "19700101"},
        {"name": "x"},
        {"study": {"uid": "1.2"}},
    ],
)
def test_patient_identifiers_and_free_form_data_are_refused(data_dir, fields):
    with pytest.raises(ValueError):
        AuditLog(data_dir).append("capture", **fields)
    assert not list((data_dir / "audit").glob("*.jsonl"))


def test_long_strings_are_cut(data_dir):
    record = AuditLog(data_dir).append("update_failed", reason="x" * 5000)
    assert len(record["reason"]) == audit_mod.MAX_STRING
    assert verify_log(data_dir) == []


def test_audit_verify_command(data_dir, log, capsys):
    assert cmd_audit_verify(data_dir) == 0
    assert "6 line(s) in 1 file(s)" in capsys.readouterr().out
    ls = lines(data_dir)
    rewrite(data_dir, [ls[0], ls[2], ls[1], *ls[3:]])
    assert cmd_audit_verify(data_dir) == 1
    err = capsys.readouterr().err
    assert "audit: audit/000001.jsonl line 2" in err
    assert err.splitlines()[-1].startswith("audit log NOT intact: ")


def write_legacy_log(data_dir, n=4):
    """A log as the version before the MACs wrote it: SHA-256 chain and a plain HEAD."""
    prev, out = audit_mod.GENESIS, []
    for seq in range(1, n + 1):
        record = {
            "event": "capture",
            "frame": seq,
            "prev": prev,
            "seq": seq,
            "time": "2024-01-01T00:00:00.000Z",
        }
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        prev = audit_mod._hash(line)
        out.append(line)
    (data_dir / "audit").mkdir()
    rewrite(data_dir, out)
    head = {"file": "000001.jsonl", "seq": n, "sha256": prev}
    (data_dir / "audit" / "HEAD").write_text(json.dumps(head, sort_keys=True) + "\n")


def test_a_legacy_log_verifies_and_says_its_tail_is_unprotected(data_dir, capsys):
    write_legacy_log(data_dir)
    assert verify_log(data_dir) == []
    assert cmd_audit_verify(data_dir) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "4 line(s) in 1 file(s)" in out and "legacy, unprotected tail" in out


def test_the_first_macd_line_seals_a_legacy_log(data_dir, capsys):
    write_legacy_log(data_dir)
    AuditLog(data_dir).append("start", version="0.2.0")
    assert verify_log(data_dir) == []
    assert cmd_audit_verify(data_dir) == 0
    assert "the first 4 line(s) are legacy, sealed by the first MAC'd line" in capsys.readouterr().out
    ls = lines(data_dir)
    rewrite(data_dir, [ls[0].replace(b'"frame":1', b'"frame":7'), *ls[1:]])
    assert verify_log(data_dir) == [
        "audit/000001.jsonl line 2: hash chain broken (the line before it was edited, removed or inserted)"
    ]


def test_every_line_carries_a_mac_and_the_end_is_sealed_twice(data_dir, log):
    records = [json.loads(line) for line in lines(data_dir)]
    assert all(len(r["mac"]) == 64 for r in records) and len({r["mac"] for r in records}) == 6
    for path in (data_dir / "audit" / "HEAD", data_dir / "audit.seal"):
        state = json.loads(path.read_text())
        assert (state["seq"], state["mac"]) == (6, records[-1]["mac"]) and len(state["seal"]) == 64
    assert not list((data_dir / "keys").glob("*.pub"))


def test_a_full_disk_while_the_marker_is_written_raises_no_false_alarm(data_dir, monkeypatch):
    import errno
    import os

    from firmware_app.errors import FirmwareAppError
    from firmware_app.records import fsutil

    audit_mod.mac_key(data_dir)  # the device key exists; the disk fills up before the first line
    real = os.write

    def full(fd, data):
        if "/keys/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(fsutil, "_os_write", full)
    log = AuditLog(data_dir)
    log.append("start")  # the line and HEAD are in; the marker (and so the seal) wait
    assert not (data_dir / "keys" / "audit.marker").exists() and not (data_dir / "audit.seal").exists()
    assert verify_log(data_dir) == []
    with pytest.raises((OSError, FirmwareAppError)):
        log.append("capture", frame=1)  # the marker first: still no room
    assert verify_log(data_dir) == []
    monkeypatch.undo()
    log.append("capture", frame=2)
    assert verify_log(data_dir) == []
    assert json.loads((data_dir / "keys" / "audit.marker").read_text())["since"] == 1


def test_verify_while_the_daemon_appends_raises_no_false_alarm(data_dir):
    log = AuditLog(data_dir)
    log.append("start")
    done = threading.Event()

    def write():
        for i in range(80):
            log.append("capture", frame=i)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    results = []
    while not done.is_set():
        results.append(verify_log(data_dir))
    writer.join()
    assert results and all(r == [] for r in results)


def test_a_torn_line_the_old_writer_went_on_after_is_a_note_not_tampering(data_dir, capsys):
    write_legacy_log(data_dir)
    ls = lines(data_dir)
    rewrite(data_dir, [*ls[:2], b'{"event":"capt', *ls[2:]])  # a full disk, then the old writer went on
    assert verify_log(data_dir) == []
    assert cmd_audit_verify(data_dir) == 0
    assert "line 3: incomplete line an older version left (crash or full disk)" in capsys.readouterr().out
    rewrite(data_dir, [*ls[:2], b'{"event":"capt', *ls[3:]])  # not when the chain does not go on over it
    assert "audit/000001.jsonl line 3: not an audit record (edited, torn or inserted)" in verify_log(data_dir)
