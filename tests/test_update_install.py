"""Accepted bundles: A/B slots, the sequence floor, rollback, the boot check, key rotation, dry run."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from update_kit import MODEL_ID, make_kit, snapshot

from firmware_app.audit import verify_log
from firmware_app.errors import BadInput
from firmware_app.models.store import find_model
from firmware_app.update import install as install_mod
from firmware_app.update.bundle import build_rotation_bundle
from firmware_app.update.install import boot_check, mark_good, rollback
from firmware_app.update.selftest import SelftestResult
from firmware_app.update.slots import installed_models, read_state, slot_problems
from firmware_app.update.trust import key_id, short


@pytest.fixture
def kit(tmp_path, monkeypatch):
    return make_kit(tmp_path, monkeypatch)


def mdir(kit):
    return kit.data / "models" / MODEL_ID


def events(kit):
    lines = (kit.data / "audit" / "000001.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


def test_valid_bundle_installs_into_a_slot_and_the_daemon_finds_it(kit):
    progress = []
    outcome = kit.install(kit.bundle("1.0.0", 1), progress=progress.append)
    assert (outcome.status, outcome.exit_code, outcome.message) == (
        "installed",
        0,
        "Model selfie-seg 1.0.0 installed",
    )
    assert progress == [
        "Copying selfie-seg-1.0.0-1.fwb",
        "Verifying selfie-seg 1.0.0",
        "Self-test selfie-seg 1.0.0",
        "Installing selfie-seg 1.0.0",
    ]
    ref = find_model(MODEL_ID, kit.data)
    assert (ref.origin, ref.manifest.version, ref.folder.name) == ("installed", "1.0.0", "a")
    assert (mdir(kit) / "current").readlink().as_posix() == "a"
    assert slot_problems(mdir(kit), "a") == []
    assert events(kit) == [
        "update_copied",
        "update_signature_ok",
        "update_payload_ok",
        "update_selftest",
        "update_switch",
        "update_installed",
    ]
    assert verify_log(kit.data) == []
    assert not any((kit.data / "staging" / ".work").iterdir())


def test_second_install_uses_the_other_slot_and_keeps_the_previous(kit):
    kit.install(kit.bundle("1.0.0", 1))
    outcome = kit.install(kit.bundle("1.1.0", 2))
    assert outcome.message == "Model selfie-seg 1.1.0 installed; 1.0.0 kept for rollback"
    [info] = installed_models(kit.data)
    assert (info.active_slot, info.version, info.previous_slot, info.previous_version) == (
        "b",
        "1.1.0",
        "a",
        "1.0.0",
    )
    assert (info.sequence, info.sequence_floor, info.on_trial) == (2, 2, True)
    kit.install(kit.bundle("1.2.0", 3))  # replaces the oldest slot
    [info] = installed_models(kit.data)
    assert (info.active_slot, info.version, info.previous_version) == ("a", "1.2.0", "1.1.0")


def test_dry_run_verifies_and_changes_nothing(kit):
    kit.install(kit.bundle("1.0.0", 1))
    before = snapshot(kit.data)
    outcome = kit.install(kit.bundle("1.1.0", 2), dry_run=True)
    assert (outcome.status, outcome.exit_code) == ("dry-run", 0)
    assert snapshot(kit.data) == before


def test_rollback_returns_to_the_previous_slot_and_keeps_the_floor(kit):
    kit.install(kit.bundle("1.0.0", 1))
    kit.install(kit.bundle("1.1.0", 2))
    assert rollback(kit.data, MODEL_ID) == "Model selfie-seg rolled back from 1.1.0 to 1.0.0"
    assert find_model(MODEL_ID, kit.data).manifest.version == "1.0.0"
    [info] = installed_models(kit.data)
    assert (info.version, info.sequence_floor, info.previous_version) == ("1.0.0", 2, "1.1.0")
    # The stick cannot bring back anything at or below the floor; the operator can roll forward.
    assert kit.install(kit.bundle("1.1.0", 2, name="again.fwb")).status == "unchanged"
    assert kit.install(kit.bundle("0.9.0", 1, name="old.fwb")).status == "rejected"
    rollback(kit.data, MODEL_ID)
    assert kit.active_version() == "1.1.0"
    assert "rollback" in events(kit)


def test_rollback_without_a_previous_version_is_bad_input(kit):
    with pytest.raises(BadInput, match="not installed"):
        rollback(kit.data, MODEL_ID)
    kit.install(kit.bundle("1.0.0", 1))
    with pytest.raises(BadInput, match="no previous version"):
        rollback(kit.data, MODEL_ID)


def test_boot_check_counts_starts_and_mark_good_ends_the_trial(kit):
    kit.install(kit.bundle("1.0.0", 1))
    kit.install(kit.bundle("1.1.0", 2))
    assert boot_check(kit.data, kit.board) == []
    assert read_state(mdir(kit)).trial_starts == 1
    assert mark_good(kit.data) == [MODEL_ID]
    for _ in range(5):  # confirmed: restarts no longer count
        assert boot_check(kit.data, kit.board) == []
    assert kit.active_version() == "1.1.0"


def test_crash_loop_after_an_update_rolls_back_automatically(kit):
    kit.install(kit.bundle("1.0.0", 1))
    mark_good(kit.data)
    kit.install(kit.bundle("1.1.0", 2))
    for _ in range(install_mod.MAX_TRIAL_STARTS):
        assert boot_check(kit.data, kit.board) == []  # the daemon starts, then dies before mark_good
    [message] = boot_check(kit.data, kit.board)
    assert message == (
        "Model selfie-seg 1.1.0 did not run successfully in 3 starts (crash loop); rolled back from 1.1.0 to 1.0.0"
    )
    assert kit.active_version() == "1.0.0"
    assert read_state(mdir(kit)).failed == ["b"]
    with pytest.raises(BadInput, match="failed on a start"):
        rollback(kit.data, MODEL_ID)  # no way back to the slot that crash-looped
    assert boot_check(kit.data, kit.board) == []


def test_failed_selftest_on_the_next_start_rolls_back(kit, monkeypatch):
    kit.install(kit.bundle("1.0.0", 1))
    kit.install(kit.bundle("1.1.0", 2))

    def failing(ref, board, backends=None, origin=None, chain=None):
        return SelftestResult(
            MODEL_ID, "1.1.0", "installed b", "edgetpu", 0, 0.0, "case_000.npz: output_0 differs by 9"
        )

    monkeypatch.setattr(install_mod, "selftest_model", failing)
    [message] = boot_check(kit.data, kit.board)
    assert "failed its self-test after the update (case_000.npz: output_0 differs by 9)" in message
    assert message.endswith("rolled back from 1.1.0 to 1.0.0")
    assert find_model(MODEL_ID, kit.data).manifest.version == "1.0.0"


def test_damaged_files_of_the_active_slot_roll_back_at_boot(kit):
    kit.install(kit.bundle("1.0.0", 1))
    kit.install(kit.bundle("1.1.0", 2))
    mark_good(kit.data)
    with open(mdir(kit) / "b" / "model.tflite", "r+b") as fh:
        fh.seek(5000)
        fh.write(b"\xff")
    [message] = boot_check(kit.data, kit.board)
    assert "has damaged files" in message and "rolled back from 1.1.0 to 1.0.0" in message


def test_failing_first_install_is_deactivated_so_the_bundled_model_serves(kit, monkeypatch):
    kit.install(kit.bundle("1.0.0", 1))
    monkeypatch.setattr(
        install_mod,
        "selftest_model",
        lambda *a, **k: SelftestResult(MODEL_ID, "1.0.0", "x", "cpu", 0, 0.0, "bad"),
    )
    [message] = boot_check(kit.data, kit.board)
    assert "deactivated" in message
    assert not (mdir(kit) / "current").is_symlink()
    assert kit.install(kit.bundle("1.0.0", 1, name="again.fwb")).status == "unchanged"  # the floor stays


def test_boot_check_removes_leftovers_of_a_killed_install(kit):
    kit.install(kit.bundle("1.0.0", 1))
    leftover = kit.data / "staging" / ".work" / "slot"
    leftover.mkdir()
    (leftover / "model.tflite").write_bytes(b"half")
    assert boot_check(kit.data, kit.board) == []
    assert not leftover.exists()


# --- key rotation ------------------------------------------------------------------------------------


def test_rotation_signed_by_the_current_key_is_accepted(kit):
    kit.install(kit.bundle("1.0.0", 1))
    new = Ed25519PrivateKey.generate()
    statement = kit.root / "stick" / "rotate.fwb"
    build_rotation_bundle(statement, 1, kit.key, [(new, None)], [key_id(kit.key)])
    outcome = kit.install(statement)
    assert (outcome.status, outcome.exit_code) == ("keys-updated", 0)
    assert (
        outcome.message
        == f"Trusted keys updated: added key {short(key_id(new))}, revoked key {short(key_id(kit.key))}"
    )
    assert (kit.data / "keys" / f"{short(key_id(new))}.pub").is_file()
    assert kit.install(kit.bundle("1.1.0", 2, key=new)).status == "installed"
    old_signed = kit.install(kit.bundle("1.2.0", 3, name="old-key.fwb"))
    assert old_signed.message.startswith("Rejected: signed by revoked key")
    assert "signed by revoked key" in kit.install(statement).message  # its signer is revoked now


def test_rotation_with_expiry_then_the_new_key_expires(kit):
    new = Ed25519PrivateKey.generate()
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    statement = kit.root / "rotate.fwb"
    build_rotation_bundle(statement, 1, kit.key, [(new, soon)], [])
    assert kit.install(statement).status == "keys-updated"
    assert kit.install(statement).status == "unchanged"  # replaying the statement does nothing
    assert kit.install(kit.bundle("1.0.0", 1, key=new)).status == "installed"
    later = soon + timedelta(seconds=1)
    outcome = kit.install(kit.bundle("1.1.0", 2, key=new), now=later)
    assert "which expired on" in outcome.message


@pytest.mark.parametrize(
    "case", ["untrusted signer", "no key left", "re-add revoked", "bad proof", "lower sequence"]
)
def test_bad_rotations_are_rejected_and_change_nothing(kit, case):
    new = Ed25519PrivateKey.generate()
    first = kit.root / "first.fwb"
    build_rotation_bundle(first, 5, kit.key, [(new, None)], [])
    assert kit.install(first).status == "keys-updated"
    revoked = Ed25519PrivateKey.generate()
    build_rotation_bundle(kit.root / "second.fwb", 6, kit.key, [], [key_id(revoked)])
    assert kit.install(kit.root / "second.fwb").status == "keys-updated"
    out = kit.root / "bad.fwb"
    if case == "untrusted signer":
        build_rotation_bundle(
            out, 7, Ed25519PrivateKey.generate(), [(Ed25519PrivateKey.generate(), None)], []
        )
        needle = "signature not trusted"
    elif case == "no key left":
        build_rotation_bundle(out, 7, kit.key, [], [key_id(kit.key), key_id(new)])
        needle = "no trusted key"
    elif case == "re-add revoked":
        build_rotation_bundle(out, 7, kit.key, [(revoked, None)], [])
        needle = "revoked and cannot be trusted again"
    elif case == "bad proof":
        build_rotation_bundle(out, 7, kit.key, [(Ed25519PrivateKey.generate(), None)], [])
        _swap_proof(out, kit)
        needle = "proof of possession"
    else:
        build_rotation_bundle(out, 4, kit.key, [(Ed25519PrivateKey.generate(), None)], [])
        needle = "below the trust store's 6"
    before = snapshot(kit.data)
    outcome = kit.install(out)
    assert (outcome.status, outcome.exit_code) == ("rejected", 2), outcome
    assert needle in outcome.message
    assert snapshot(kit.data) == before


def _swap_proof(path, kit):
    """Re-sign the statement with a proof made by a different key than the one added."""
    from update_kit import tar_members

    from firmware_app.update.bundle import sign_manifest, write_bundle

    fields = json.loads(tar_members(path)[0][1])
    fields.pop("key_id")
    fields["add"][0]["proof"] = base64.b64encode(Ed25519PrivateKey.generate().sign(b"not a proof")).decode()
    raw, sig = sign_manifest(fields, kit.key)
    write_bundle(path, raw, sig, [])


def test_reinstall_after_rollback_says_which_version_runs(kit):
    kit.install(kit.bundle("1.0.0", 1))
    kit.install(kit.bundle("1.1.0", 2))
    rollback(kit.data, MODEL_ID)
    again = kit.install(kit.bundle("1.1.0", 2, name="again.fwb"))
    assert again.status == "unchanged" and "already installed" not in again.message
    assert again.message == (
        "Model selfie-seg 1.1.0 not installed: its sequence 2 is the floor of selfie-seg, where 1.0.0 runs; "
        "`firmware-app models rollback selfie-seg` switches back to it"
    )
    other = kit.install(kit.bundle("1.2.0", 2, name="other.fwb"))
    assert "where 1.0.0 runs; installing it again needs a bundle with sequence 3 or more" in other.message
    rollback(kit.data, MODEL_ID)
    assert "is already installed (sequence 2)" in kit.install(kit.bundle("1.1.0", 2, name="3.fwb")).message
