"""The signing tools, the command-line functions, the USB staging path and the systemd units."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from update_kit import MODEL_ID, make_kit, snapshot

from firmware_app.models.store import find_model
from firmware_app.update.commands import cmd_rollback, cmd_selftest, cmd_update, installed_models
from firmware_app.update.staging import process_staged, stage_folder
from firmware_app.update.trust import key_id, short

REPO = Path(__file__).resolve().parents[1]


def tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def kit(tmp_path, monkeypatch):
    return make_kit(tmp_path, monkeypatch)


def test_keygen_make_bundle_inspect_and_install(kit, tmp_path, capsys):
    keys = tmp_path / "keys"
    assert tool("keygen")(["--out", str(keys)]) == 0
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert tool("keygen")(["--out", str(keys)]) == 2  # never overwrites a key
    shutil.copy(keys / "signing.pub", kit.data / "keys" / "second.pub")
    out = tmp_path / "m.fwb"
    argv = [str(kit.model("1.0.0")), "--sequence", "1", "--board", "x86-dev", "--board", "rpi4-cpu"]
    assert tool("make_bundle")([*argv, "--key", str(keys / "signing.key"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert tool("inspect_bundle")([str(out), "--keys", str(kit.data / "keys")]) == 0
    shown = capsys.readouterr().out
    assert "model:     selfie-seg 1.0.0" in shown and "boards:    x86-dev, rpi4-cpu" in shown
    assert "structure: OK" in shown and "signature: trusted" in shown
    assert tool("inspect_bundle")([str(out), "--keys", str(tmp_path / "nokeys")]) == 2
    capsys.readouterr()
    assert cmd_update(out, kit.data, "x86-dev") == 0
    assert capsys.readouterr().out.strip() == f"Model selfie-seg 1.0.0 installed ({out})"


def test_make_bundle_refuses_a_model_without_golden_vectors(kit, tmp_path, capsys):
    model = kit.model("1.0.0")
    shutil.rmtree(model / "golden")
    key = tmp_path / "k"
    tool("keygen")(["--out", str(key)])
    argv = [str(model), "--sequence", "1", "--board", "x86-dev", "--key", str(key / "signing.key")]
    assert tool("make_bundle")([*argv, "--out", str(tmp_path / "x.fwb")]) == 2
    assert "no golden vectors" in capsys.readouterr().err
    assert not (tmp_path / "x.fwb").exists()


def test_make_key_statement_rotates_keys(kit, tmp_path):
    old = tmp_path / "old"
    new = tmp_path / "new"
    tool("keygen")(["--out", str(old)])
    tool("keygen")(["--out", str(new)])
    shutil.copy(old / "signing.pub", kit.data / "keys" / "old.pub")
    out = tmp_path / "rotate.fwb"
    argv = ["--key", str(old / "signing.key"), "--sequence", "1", "--add", str(new / "signing.key")]
    argv += ["--expires", "2099-01-01T00:00:00Z", "--revoke", str(old / "signing.pub"), "--out", str(out)]
    assert tool("make_key_statement")(argv) == 0
    outcome = kit.install(out)
    assert outcome.status == "keys-updated", outcome


def test_cmd_update_exit_codes_and_lines(kit, tmp_path, capsys):
    stick = tmp_path / "stick"
    good = kit.bundle("1.0.0", 1)
    kit.bundle("1.1.0", 2, key=Ed25519PrivateKey.generate(), name="untrusted.fwb")
    assert cmd_update(stick, kit.data, "x86-dev") == 2
    out, err = capsys.readouterr()
    assert f"Model selfie-seg 1.0.0 installed ({good})" in out
    assert err.strip() == f"Rejected: {stick / 'untrusted.fwb'}: signature not trusted"
    assert cmd_update(tmp_path / "nowhere", kit.data, "x86-dev") == 2
    assert cmd_update(kit.root / "src", kit.data, "x86-dev") == 2  # a folder without bundles
    assert "no *.fwb bundle" in capsys.readouterr().err
    assert cmd_update(good, kit.data, "no-such-board") == 2


def test_cmd_selftest_and_rollback(kit, capsys):
    kit.install(kit.bundle("1.0.0", 1))
    kit.install(kit.bundle("1.1.0", 2))
    assert cmd_selftest(kit.data, "x86-dev") == 0
    assert (
        "selftest selfie-seg 1.1.0 (installed b) on litert-cpu: OK, 1 golden case(s)"
        in capsys.readouterr().out
    )
    assert cmd_rollback(MODEL_ID, kit.data) == 0
    assert capsys.readouterr().out.strip() == "Model selfie-seg rolled back from 1.1.0 to 1.0.0"
    assert cmd_rollback("no-such-model", kit.data) == 2
    with open(kit.data / "models" / MODEL_ID / "a" / "golden" / "case_000.npz", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\0\0\0\0")
    assert cmd_selftest(kit.data, "x86-dev") == 1
    assert "FAILED" in capsys.readouterr().err
    [info] = installed_models(kit.data)
    assert (info.version, info.previous_version, info.sequence_floor) == ("1.0.0", "1.1.0", 2)


def test_stick_to_staging_to_install(kit, tmp_path):
    stick = tmp_path / "stick"
    kit.bundle("1.0.0", 1, name="release.fwb")
    kit.bundle("1.1.0", 2, key=Ed25519PrivateKey.generate(), name="evil.fwb")
    (stick / "link.fwb").symlink_to(stick / "release.fwb")
    (stick / "notes.txt").write_text("ignored")
    (stick / "we ird;name.fwb").write_bytes((stick / "release.fwb").read_bytes())
    staged = stage_folder(stick, kit.data)
    assert sorted(staged) == ["evil.fwb", "release.fwb", "stick-bundle-4.fwb"]
    before = snapshot(kit.data)
    messages = []
    outcomes = process_staged(kit.data, kit.board, progress=messages.append)
    assert [o.message for o in outcomes] == [
        "Rejected: signature not trusted",
        "Model selfie-seg 1.0.0 installed",
        "Model selfie-seg 1.0.0 is already installed (sequence 1); nothing to do",
    ]
    assert "Update found: evil.fwb" in messages and "Self-test selfie-seg 1.0.0" in messages
    assert snapshot(kit.data) != before
    assert not list((kit.data / "staging").glob("*.fwb"))
    assert find_model(MODEL_ID, kit.data).origin == "installed"
    assert process_staged(kit.data, kit.board) == []


def test_stage_folder_cleans_stale_parts_and_ignores_partial_copies(kit, tmp_path):
    staging = kit.data / "staging"
    staging.mkdir()
    (staging / ".half.fwb.part").write_bytes(b"x")
    empty = tmp_path / "empty-stick"
    empty.mkdir()
    assert stage_folder(empty, kit.data) == []
    assert not (staging / ".half.fwb.part").exists()
    (staging / ".other.fwb.part").write_bytes(b"x")
    assert process_staged(kit.data, kit.board) == []


def test_trust_store_rejects_key_files_it_cannot_read(kit):
    (kit.data / "keys" / "broken.pub").write_text("not a key")
    outcome = kit.install(kit.bundle("1.0.0", 1))
    assert (outcome.status, outcome.exit_code) == ("failed", 1)
    assert "broken.pub: not a PEM public key" in outcome.message


def test_key_ids_are_sha256_of_the_raw_key():
    key = Ed25519PrivateKey.generate()
    assert len(key_id(key)) == 64 and short(key_id(key)) == key_id(key)[:16]


def test_udev_rule_starts_the_staging_unit():
    rule = (REPO / "systemd" / "99-firmware-app-usb.rules").read_text()
    assert 'ENV{SYSTEMD_WANTS}+="firmware-app-stage@%k.service"' in rule
    unit = (REPO / "systemd" / "firmware-app-stage@.service").read_text()
    assert "-m firmware_app.update.staging /dev/%I" in unit
    from firmware_app.update.staging import MOUNT_OPTIONS

    assert {"ro", "nosuid", "nodev", "noexec"} <= set(MOUNT_OPTIONS.split(","))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_staging_unit_passes_systemd_analyze_verify(tmp_path):
    # The unit's ExecStart names the device's venv; point it at this interpreter to verify everything else.
    unit = (REPO / "systemd" / "firmware-app-stage@.service").read_text()
    (tmp_path / "firmware-app-stage@.service").write_text(
        unit.replace("/opt/firmware-app/venv/bin/python", sys.executable)
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "firmware-app-stage@sdb1.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
