"""Signed checkpoints make a rewrite of the audit log detectable, naming the line."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from firmware_app.audit import GENESIS, AuditLog, verify_log
from firmware_app.records.checkpoints import Checkpointer, verify_checkpoints, write_checkpoint
from firmware_app.records.commands import verify_records


def _log(data_dir: Path) -> Path:
    audit = AuditLog(data_dir)
    audit.append("start", version="0.1.0")
    audit.append("model_loaded", model_id="us-fluid-seg", version="1.0.0")
    write_checkpoint(data_dir, audit)
    audit.append("capture", capture="c1")
    audit.append("export", exported=1)
    write_checkpoint(data_dir, audit)
    audit.append("stop")
    (path,) = sorted((data_dir / "audit").glob("*.jsonl"))
    return path


def _rewrite(path: Path, records: list[dict]) -> None:
    """Rewrite the whole chain (and HEAD) consistently, as someone without the device key could."""
    prev, lines = GENESIS, []
    for n, record in enumerate(records, start=1):
        record = {**record, "seq": n, "prev": prev}
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    head = {"file": path.name, "seq": len(records), "sha256": prev}
    (path.parent / "HEAD").write_text(json.dumps(head, sort_keys=True) + "\n")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_intact_log_with_checkpoints_verifies(data_dir: Path) -> None:
    path = _log(data_dir)
    assert verify_checkpoints(data_dir) == []
    assert verify_log(data_dir) == []
    assert verify_records(data_dir) == []
    events = [r["event"] for r in _records(path)]
    assert events.count("checkpoint") == 2
    key = data_dir / "keys" / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list((data_dir / "keys").glob("*.pub"))  # never a trusted bundle-signing key


def test_rewritten_chain_is_found_by_the_checkpoint(data_dir: Path) -> None:
    path = _log(data_dir)
    records = _records(path)
    records[1]["version"] = "9.9.9"  # edit line 2, then recompute every hash
    _rewrite(path, records)
    assert verify_log(data_dir)  # the line MACs and the seals see it too
    problems = verify_checkpoints(data_dir)
    assert problems and all(p.startswith("audit/000001.jsonl line ") for p in problems)
    assert any("line 2: differs from what checkpoint" in p for p in problems)


def test_removed_checkpoint_is_found(data_dir: Path) -> None:
    path = _log(data_dir)
    records = [r for r in _records(path) if not (r["event"] == "checkpoint" and r["head_seq"] == 2)]
    _rewrite(path, records)
    problems = verify_checkpoints(data_dir)
    assert any("a checkpoint was removed" in p for p in problems)


def test_all_checkpoints_removed_is_found(data_dir: Path) -> None:
    path = _log(data_dir)
    _rewrite(path, [r for r in _records(path) if r["event"] != "checkpoint"])
    assert any("no signed checkpoint" in p for p in verify_checkpoints(data_dir))


def test_forged_checkpoint_is_found(data_dir: Path) -> None:
    path = _log(data_dir)
    records = _records(path)
    cp = next(i for i, r in enumerate(records) if r["event"] == "checkpoint")
    records[1]["version"] = "9.9.9"
    _rewrite(path, records[: cp + 1])
    forged = _records(path)
    last = forged[cp - 1]
    line = path.read_bytes().split(b"\n")[cp - 1]
    forged[cp]["head_sha256"] = hashlib.sha256(line).hexdigest()  # re-point it, without the key
    assert last["seq"] == forged[cp]["head_seq"]
    _rewrite(path, forged)
    assert any(f"line {cp + 1}: checkpoint signature invalid" in p for p in verify_checkpoints(data_dir))


def test_missing_device_key_is_reported(data_dir: Path) -> None:
    _log(data_dir)
    (data_dir / "keys" / "device.key").unlink()
    assert any("device.key is missing" in p for p in verify_checkpoints(data_dir))


def test_checkpointer_signs_at_start_and_stop(data_dir: Path) -> None:
    audit = AuditLog(data_dir)
    audit.append("start")
    cp = Checkpointer(data_dir, audit, interval_s=3600).start()
    audit.append("capture", capture="c1")
    cp.stop()
    events = [r["event"] for r in _records(next((data_dir / "audit").glob("*.jsonl")))]
    assert events == ["start", "checkpoint", "capture", "checkpoint"]
    assert verify_checkpoints(data_dir) == []
    with pytest.raises(ValueError):
        Checkpointer(data_dir, interval_s=0)


def test_empty_log_needs_no_checkpoint(data_dir: Path) -> None:
    assert write_checkpoint(data_dir) is None
    assert verify_checkpoints(data_dir) == []


def test_verify_records_reports_a_tampered_capture(data_dir: Path) -> None:
    import numpy as np

    from firmware_app.records.captures import Recorder
    from firmware_app.types import Frame

    cid = Recorder(data_dir).capture(Frame(0, 0, np.zeros((16, 16), np.uint8), {}), None)
    assert verify_records(data_dir) == []
    path = data_dir / "captures" / f"{cid}.cap"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    (problem,) = verify_records(data_dir)
    assert str(path) in problem and "fails authentication" in problem
