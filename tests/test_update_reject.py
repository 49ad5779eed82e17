"""Every bundle that must be refused is refused with a reason, and nothing below models/ or keys/ changes.

Each test installs 1.0.0 (sequence 1) first, so that "nothing changed" also means "the old model still
serves": the snapshot of models/ and keys/ is taken before the bad bundle and compared after.
"""

from __future__ import annotations

import errno
import json
import os
import random
import tarfile
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from update_kit import MODEL_ID, file_member, make_kit, snapshot, tar_members, write_members

from firmware_app.models.store import find_model
from firmware_app.update import bundle as bundle_mod
from firmware_app.update import install as install_mod
from firmware_app.update.selftest import selftest_model
from firmware_app.update.trust import key_id, public_pem


@pytest.fixture
def kit(tmp_path, monkeypatch):
    kit = make_kit(tmp_path, monkeypatch)
    assert kit.install(kit.bundle("1.0.0", 1)).status == "installed"
    return kit


def assert_rejected(kit, path, needle, status="rejected", code=2, **kwargs):
    before, serving = snapshot(kit.data), kit.active_version()
    outcome = kit.install(path, **kwargs)
    assert outcome.status == status, outcome
    assert outcome.exit_code == code
    assert needle in outcome.message, outcome.message
    assert snapshot(kit.data) == before, "a rejected bundle changed models/ or keys/"
    old = find_model(MODEL_ID, kit.data)
    assert old.manifest.version == serving
    assert selftest_model(old, kit.board).ok
    assert (kit.data / "staging" / ".work").exists() and not any((kit.data / "staging" / ".work").iterdir())
    return outcome


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def data_offset(path, name):
    """Byte offset of a member's data in the tar."""
    with tarfile.open(path, "r:") as tar:
        return tar.getmember(name).offset_data


def test_flipped_byte_in_manifest(kit):
    b = kit.bundle("1.1.0", 2)
    assert_rejected(kit, flip(b, data_offset(b, "manifest.json") + 30), "signature not trusted")


def test_flipped_byte_in_signature(kit):
    b = kit.bundle("1.1.0", 2)
    assert_rejected(kit, flip(b, data_offset(b, "manifest.sig") + 5), "signature not trusted")


def test_flipped_byte_in_payload(kit):
    b = kit.bundle("1.1.0", 2)
    out = assert_rejected(
        kit, flip(b, data_offset(b, "payload/model.tflite") + 1000), "SHA-256 does not match"
    )
    assert "payload/model.tflite" in out.message


def padding_offset(path, name):
    """Byte offset of the first padding byte after a member's data (the member must not fill its block)."""
    with tarfile.open(path, "r:") as tar:
        member = tar.getmember(name)
    assert member.size % 512, f"{name} fills its last block: no padding to test"
    return member.offset_data + member.size


@pytest.mark.parametrize("name", ["manifest.json", "payload/manifest.toml"])
def test_non_zero_tar_padding_is_refused(kit, name):
    b = kit.bundle("1.1.0", 2)
    out = assert_rejected(kit, flip(b, padding_offset(b, name)), "non-zero byte(s) in the tar padding")
    assert out.message.startswith(f"Rejected: {name}: 1 non-zero byte(s)")


def test_flipped_byte_in_a_tar_header(kit):
    b = kit.bundle("1.1.0", 2)
    assert_rejected(kit, flip(b, data_offset(b, "payload/model.tflite") - 512 + 10), "damaged tar header")


def test_random_bytes(kit, tmp_path):
    junk = tmp_path / "junk.fwb"
    junk.write_bytes(random.Random(1).randbytes(64 * 1024))
    assert_rejected(kit, junk, "not a bundle")


def test_empty_and_missing_files(kit, tmp_path):
    (tmp_path / "empty.fwb").write_bytes(b"")
    assert_rejected(kit, tmp_path / "empty.fwb", "not a bundle")
    assert_rejected(kit, tmp_path / "absent.fwb", "file not found")


def test_unsigned(kit, tmp_path):
    members = [m for m in tar_members(kit.bundle("1.1.0", 2)) if m[0].name != "manifest.sig"]
    assert_rejected(kit, write_members(tmp_path / "unsigned.fwb", members), "manifest.sig expected")


def test_zero_signature(kit, tmp_path):
    members = [
        (i, bytes(64) if i.name == "manifest.sig" else d) for i, d in tar_members(kit.bundle("1.1.0", 2))
    ]
    assert_rejected(kit, write_members(tmp_path / "zero-sig.fwb", members), "signature not trusted")


def test_signed_by_an_untrusted_key(kit):
    assert_rejected(kit, kit.bundle("1.1.0", 2, key=Ed25519PrivateKey.generate()), "signature not trusted")


def test_signed_by_a_revoked_key(kit):
    other = Ed25519PrivateKey.generate()
    (kit.data / "keys" / "second.pub").write_bytes(public_pem(other))
    trust = {"sequence": 0, "revoked": [key_id(other)], "expires": {}}
    (kit.data / "keys" / "trust.json").write_text(json.dumps(trust))
    assert_rejected(kit, kit.bundle("1.1.0", 2, key=other), f"signed by revoked key {key_id(other)[:16]}")


def test_signed_by_an_expired_key(kit):
    past = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    trust = {"sequence": 0, "revoked": [], "expires": {key_id(kit.key): past}}
    (kit.data / "keys" / "trust.json").write_text(json.dumps(trust))
    assert_rejected(kit, kit.bundle("1.1.0", 2), "which expired on")


def test_device_key_is_never_trusted_for_updates(kit):
    device = Ed25519PrivateKey.generate()
    (kit.data / "keys" / "device.pub").write_bytes(public_pem(device))
    assert_rejected(kit, kit.bundle("1.1.0", 2, key=device), "signature not trusted")


def test_payload_swapped_in_from_another_release(kit, tmp_path):
    new = tar_members(kit.bundle("1.2.0", 3))
    old = tar_members(kit.bundle("1.1.0", 2))
    swapped = write_members(tmp_path / "swapped.fwb", new[:2] + old[2:])
    out = assert_rejected(kit, swapped, "SHA-256 does not match the signed manifest")
    assert "another release" in out.message


def test_sequence_below_the_floor(kit):
    assert kit.install(kit.bundle("1.2.0", 5)).status == "installed"
    assert_rejected(kit, kit.bundle("1.1.0", 4), "below the installed floor 5")


def test_equal_sequence_is_a_no_op(kit):
    before = snapshot(kit.data)
    outcome = kit.install(kit.bundle("1.0.0", 1, name="again.fwb"))
    assert (outcome.status, outcome.exit_code) == ("unchanged", 0)
    assert "already installed" in outcome.message
    assert snapshot(kit.data) == before


def test_wrong_board(kit):
    assert_rejected(kit, kit.bundle("1.1.0", 2, boards=("rpi4-cpu",)), "this board is x86-dev")


def test_wrong_backend(kit, tmp_path):
    model = kit.model("1.1.0")
    (model / "model_edgetpu.tflite").write_bytes((model / "model.tflite").read_bytes())
    assert_rejected(
        kit, kit.bundle("1.1.0", 2, backends=("edgetpu",), model_dir=model), "built for backends edgetpu"
    )


def test_manifest_claims_more_bytes_than_the_file_holds(kit):
    fields, payload = kit.fields_and_payload(kit.bundle("1.1.0", 2))
    for f in fields["files"]:
        if f["path"] == "model.tflite":
            f["size"] += 4096
    bad = kit.signed(fields, payload, "claims-more.fwb")
    assert_rejected(kit, bad, "the signed manifest says")


def test_truncated_bundle(kit):
    b = kit.bundle("1.1.0", 2)
    b.write_bytes(b.read_bytes()[: data_offset(b, "payload/model.tflite") + 4096])
    assert_rejected(kit, b, "truncated")


def test_stick_file_changed_after_it_was_copied(kit, monkeypatch):
    b = kit.bundle("1.1.0", 2)
    real_copy = install_mod._copy_in

    def copy_then_tamper(src, lay):
        result = real_copy(src, lay)
        flip(src, data_offset(src, "payload/model.tflite") + 2000)  # the stick now serves other bytes
        return result

    monkeypatch.setattr(install_mod, "_copy_in", copy_then_tamper)
    assert_rejected(kit, b, "changed after it was copied")


def test_stick_file_changed_while_being_copied(kit, monkeypatch):
    b = kit.bundle("1.1.0", 2)
    real_read = os.read
    reads = []

    def read_and_grow(fd, n):
        reads.append(n)
        if len(reads) == 1:
            with open(b, "ab") as fh:
                fh.write(bytes(512))
        return real_read(fd, n)

    monkeypatch.setattr(install_mod.os, "read", read_and_grow)
    assert_rejected(kit, b, "changed while it was being copied")


def test_model_that_fails_its_golden_vectors(kit):
    bad = kit.bundle("1.1.0", 2, model_dir=kit.model("1.1.0", golden_offset=0.5))
    assert_rejected(kit, bad, "fails its golden vectors")


def test_manifest_toml_must_match_the_signed_manifest(kit):
    fields, payload = kit.fields_and_payload(kit.bundle("1.1.0", 2))
    fields["version"] = "1.5.0"
    assert_rejected(kit, kit.signed(fields, payload, "mismatch.fwb"), "manifest.toml says selfie-seg 1.1.0")


def test_full_disk_while_copying_fails_closed(kit, monkeypatch):
    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    out = assert_rejected(kit, kit.bundle("1.1.0", 2), "no space left", status="failed", code=1)
    assert "installed model is unchanged" in out.message


def test_full_disk_while_extracting_fails_closed(kit, monkeypatch):
    b = kit.bundle("1.1.0", 2)
    real_write = os.write
    budget = [b.stat().st_size + 300_000]  # the copy fits, the extracted payload does not

    def filling(fd, data):
        budget[0] -= len(data)
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling)
    assert_rejected(kit, b, "no space left", status="failed", code=1)


def test_not_enough_free_space_is_refused_before_writing(kit, monkeypatch):
    class Usage:
        free = 1024

    monkeypatch.setattr(install_mod.shutil, "disk_usage", lambda _p: Usage)
    assert_rejected(kit, kit.bundle("1.1.0", 2), "not enough space", status="failed", code=1)


# --- hostile archives: an attacker controls every byte of the stick ------------------------------------


def _with_extra(kit, tmp_path, info, data=b""):
    members = tar_members(kit.bundle("1.1.0", 2))
    return write_members(tmp_path / "hostile.fwb", [*members[:3], (info, data), *members[3:]])


@pytest.mark.parametrize(
    "kind, needle",
    [
        (tarfile.SYMTYPE, "only plain files"),
        (tarfile.LNKTYPE, "only plain files"),
        (tarfile.CHRTYPE, "only plain files"),
        (tarfile.DIRTYPE, "only plain files"),
        (tarfile.FIFOTYPE, "only plain files"),
    ],
)
def test_links_devices_and_folders_are_refused(kit, tmp_path, kind, needle):
    info = tarfile.TarInfo("payload/golden")
    info.type = kind
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    assert_rejected(kit, _with_extra(kit, tmp_path, info), needle)


@pytest.mark.parametrize(
    "name", ["payload/../../escape", "/payload/abs", "payload/.hidden", "payload/extra.bin"]
)
def test_unlisted_or_escaping_names_are_refused(kit, tmp_path, name):
    info, data = file_member(name, b"x" * 10)
    assert_rejected(kit, _with_extra(kit, tmp_path, info, data), "is not listed in the signed manifest")
    assert not (kit.data.parent / "escape").exists()


def test_duplicate_member_is_refused(kit, tmp_path):
    members = tar_members(kit.bundle("1.1.0", 2))
    dup = [m for m in members if m[0].name == "payload/manifest.toml"][0]
    assert_rejected(kit, write_members(tmp_path / "dup.fwb", [*members, dup]), "appears twice")


def test_pax_and_gnu_headers_are_refused(kit, tmp_path):
    members = tar_members(kit.bundle("1.1.0", 2))
    members[2][0].pax_headers = {"comment": "x"}
    assert_rejected(kit, write_members(tmp_path / "pax.fwb", members, tarfile.PAX_FORMAT), "only plain files")
    assert_rejected(kit, write_members(tmp_path / "gnu.fwb", members, tarfile.GNU_FORMAT), "ustar")


def test_oversized_manifest_is_refused_unread(kit, tmp_path):
    members = tar_members(kit.bundle("1.1.0", 2))
    members[0] = file_member("manifest.json", b"{" + b" " * bundle_mod.MAX_MANIFEST_BYTES + b"}")
    assert_rejected(kit, write_members(tmp_path / "big.fwb", members), "manifest.json is")


def test_data_after_the_end_is_refused(kit):
    b = kit.bundle("1.1.0", 2)
    b.write_bytes(b.read_bytes() + b"\x01" + bytes(511))
    assert_rejected(kit, b, "after the end")


def test_signed_manifest_with_duplicate_json_key_is_refused(kit):
    fields, payload = kit.fields_and_payload(kit.bundle("1.1.0", 2))
    raw = json.dumps({**fields, "key_id": key_id(kit.key)}).replace(
        '"sequence": 2', '"sequence": 2, "sequence": 9'
    )
    out = kit.root / "stick" / "dupkey.fwb"
    bundle_mod.write_bundle(out, raw.encode(), kit.key.sign(raw.encode()), payload)
    assert_rejected(kit, out, "duplicate key 'sequence'")


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda f: f.update(extra=1), "unknown keys"),
        (lambda f: f.update(sequence=True), "sequence must be a whole number"),
        (lambda f: f["files"].append({"path": "../x", "size": 1, "sha256": "0" * 64}), "not allowed"),
        (lambda f: f.update(files=[x for x in f["files"] if "golden" not in x["path"]]), "no golden vectors"),
        (lambda f: f.update(boards=[]), "boards must name"),
    ],
)
def test_signed_manifest_schema_is_strict(kit, change, needle):
    fields, payload = kit.fields_and_payload(kit.bundle("1.1.0", 2))
    change(fields)
    assert_rejected(kit, kit.signed(fields, payload, "schema.fwb"), needle)


def test_symlink_given_as_the_bundle_is_refused(kit, tmp_path):
    link = tmp_path / "link.fwb"
    link.symlink_to(kit.bundle("1.1.0", 2))
    assert_rejected(kit, link, "symbolic link")
