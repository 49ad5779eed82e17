"""Captures: one encrypted file each, complete or absent; the recorder never stops inference."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from records_support import MODEL, disc, frame, pydicom_data_file, seg_result

from firmware_app.records import fsutil
from firmware_app.records.captures import (
    CaptureStore,
    ClipRing,
    Mark,
    ModelInfo,
    Recorder,
    RegionFacts,
    pack,
)
from firmware_app.records.errors import CaptureCorrupt, RecorderBusy, StorageFull
from firmware_app.sources.dicom import load_frames

REPO = Path(__file__).resolve().parents[1]
PATTERN = bytes(range(7, 7 + 24)) * 2  # a distinctive run of pixel values


def patterned_pixels(h: int = 240, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (h, w), np.uint8)
    px[100, 10 : 10 + len(PATTERN)] = np.frombuffer(PATTERN, np.uint8)
    return px


def test_capture_roundtrip_keeps_frame_result_model_clip_and_study(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL, clip_seconds=2.0, clip_fps=5.0)
    px = patterned_pixels()
    t0 = 1_000_000_000
    for i in range(20):  # 4 s of frames at 5 fps: the clip keeps the last 2 s
        rec.ring.add(frame(px, i, t_ns=t0 + i * 200_000_000))
    mask = disc(px.shape, (160, 120), 30)
    f = frame(px, 19, {"source": "synthetic:ultrasound", "phantom": "ultrasound"}, t_ns=t0 + 19 * 200_000_000)
    study_id = rec.new_patient()
    cid = rec.capture(f, seg_result(19, mask), reason="button")

    cap = rec.load_capture(cid)
    assert np.array_equal(cap.pixels, px)
    assert np.array_equal(cap.result.mask, mask)
    assert cap.result.label == "fluid" and cap.result.confidence == pytest.approx(0.87)
    assert len(cap.result.contours) == 1
    assert cap.model == MODEL
    assert cap.reason == "button" and cap.kind == "capture"
    assert cap.study.study_id == study_id and cap.study.patient_id.startswith("POC-")
    assert cap.modality == "US"
    assert [c.frame_id for c in cap.clip] == list(range(10, 20))  # 2 s at 5 fps, up to the trigger
    assert cap.clip[-1].image().shape == px.shape  # 320 wide: not downscaled
    assert [i.id for i in rec.list_captures()] == [cid]


def test_captures_on_disk_hold_no_readable_pixels_or_identifiers(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    px = patterned_pixels()
    rec.ring.add(frame(px, 0))
    rec.capture(frame(px, 1), seg_result(1, disc(px.shape, (100, 100), 20)))
    us = pydicom_data_file("US1_UNCR.dcm")
    upx, meta = next(load_frames(us))
    rec.capture(frame(upx, 2, meta), None)
    files = list((data_dir / "captures").iterdir())
    blobs = [p.read_bytes() for p in files if p.suffix == ".cap"]
    assert len(blobs) == 2
    for blob in blobs:
        assert PATTERN not in blob
        assert np.ascontiguousarray(upx[200:201, 100:140]).tobytes() not in blob
        # JPEG is told by its JFIF/Exif header: its 3-byte start marker alone turns up by chance in these two
        # ciphertexts (~0.33 MB) in ~2 % of runs, which made this test fail now and then
        for magic in (
            b"DICM",
            b"\x89PNG",
            b"JFIF\x00",
            b"Exif\x00",
            b"PK\x03\x04",
            b"CompressedSamples",
            b"NUMPY",
        ):
            assert magic not in blob, magic
    key = data_dir / "keys" / "capture.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "keys").stat().st_mode) == 0o700
    assert len(key.read_bytes()) == 32


def test_dicom_source_capture_keeps_the_header_and_its_study(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    us = pydicom_data_file("US1_UNCR.dcm")
    px, meta = next(load_frames(us))
    cid = rec.capture(frame(px, 0, {**meta, "source": f"dicom:{us}"}), None)
    cap = rec.load_capture(cid)
    assert cap.dicom_header.PatientID == meta["dicom_header"].PatientID
    assert "PixelData" not in cap.dicom_header
    assert cap.study.study_uid == meta["StudyInstanceUID"] and cap.study.origin == "dicom"
    assert cap.source["SOPInstanceUID"] == meta["SOPInstanceUID"]
    assert cap.modality == "US"


def test_region_facts_survive_the_encrypted_round_trip(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    px = patterned_pixels(459, 680)
    region = {
        "imaging_region": [120, 60, 680, 459],
        "region_from": "dicom",
        "mm_per_px": [0.2622878766196998, 0.2622878766196998],
        "full_size": (800, 600),
        "depth_origin_y": 36.0,
    }
    cap = rec.load_capture(rec.capture(frame(px, 0, {"source": "dicom:x.dcm", **region}), None))
    assert cap.region == RegionFacts("dicom", (120, 60, 680, 459), (0.2622878766196998,) * 2, (800, 600))
    assert cap.region.established
    plain = rec.load_capture(rec.capture(frame(px, 1, {"phantom": "ultrasound"}), None))
    assert plain.region == RegionFacts() and not plain.region.established
    # a region that claims an origin without a rectangle is not established
    assert not RegionFacts.from_meta({"region_from": "board", "imaging_region": "everything"}).established


def test_capture_written_before_region_facts_loads_as_full_frame(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    cid = rec.capture(
        frame(patterned_pixels(), 0, {"region_from": "board", "imaging_region": [0, 0, 320, 240]}), None
    )
    cap = rec.load_capture(cid)
    assert cap.region.region_from == "board"
    with np.load(io.BytesIO(pack(cap)), allow_pickle=False) as z:  # the same capture in the old layout
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes())
    del meta["region"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    store = CaptureStore(data_dir)
    old = store.path("20200101-000000-0ld000")
    old.write_bytes(store.cipher.seal(old.name, buf.getvalue()))
    loaded = store.load("20200101-000000-0ld000")
    assert loaded.region == RegionFacts("full_frame", None, None, None) and not loaded.region.established
    assert np.array_equal(loaded.pixels, cap.pixels)


def test_edited_or_renamed_capture_fails_authentication(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    a = rec.capture(frame(patterned_pixels(), 0), None)
    b = rec.capture(frame(patterned_pixels(), 1), None)
    pa, pb = (data_dir / "captures" / f"{x}.cap" for x in (a, b))
    blob = bytearray(pa.read_bytes())
    blob[len(blob) // 2] ^= 1
    pa.write_bytes(bytes(blob))
    with pytest.raises(CaptureCorrupt, match="fails authentication"):
        rec.load_capture(a)
    pb.rename(pa)  # b's file under a's name
    with pytest.raises(CaptureCorrupt):
        rec.load_capture(a)


def test_disagree_mark_is_stored_as_a_case(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    px = patterned_pixels()
    case = rec.mark_disagree(
        frame(px, 0), seg_result(0, disc(px.shape, (50, 50), 10)), Mark(reason="false_positive")
    )
    assert [(i.id, i.kind) for i in rec.list_captures()] == [(case, "disagree")]
    assert rec.load_capture(case).mark == Mark("disagree", None, "false_positive")
    with pytest.raises(ValueError, match="mark reason"):
        Mark(reason="the patient's name is ...")


def test_purge_deletes_only_exported_captures(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    a = rec.capture(frame(patterned_pixels(), 0), None)
    b = rec.capture(frame(patterned_pixels(), 1), None)
    assert rec.purge_exported() == []
    rec.store.mark_exported(a, "capture", "export-1", deidentified=False)
    marker = json.loads((data_dir / "captures" / f"{a}.exported").read_text())
    assert marker["export"] == "export-1" and set(marker) == {"export", "time_utc", "deidentified"}
    assert rec.purge_exported() == [a]
    assert [i.id for i in rec.list_captures()] == [b]


def test_clip_ring_is_bounded_and_downscaled() -> None:
    ring = ClipRing(seconds=1.0, fps=10.0, max_side=160)
    big = np.zeros((480, 640, 3), np.uint8)
    taken = 0
    for i in range(100):  # 100 frames at 30 fps: the ring samples about 10 fps and keeps 10
        t = i * 33_333_333
        if ring.wants(t):
            ring.add(frame(big, i, t_ns=t))
            taken += 1
    assert 30 <= taken <= 40
    clip = ring.snapshot()
    assert len(clip) == ring.capacity == 10
    assert clip[-1].image().shape == (120, 160, 3)


def test_model_info_hashes_the_tflite(tmp_path: Path) -> None:
    from firmware_app.models.manifest import Manifest

    (tmp_path / "model.tflite").write_bytes(b"tflite bytes")

    class Ref:  # a ModelRef's shape
        manifest = Manifest(
            "m",
            "1.0.0",
            "segmentation",
            "demo",
            False,
            8,
            8,
            "gray",
            (0.0, 1.0),
            ("bg", "x"),
            "softmax",
            0.5,
            0.3,
            0.9,
        )
        tflite = tmp_path / "model.tflite"

    info = ModelInfo.from_model(Ref())
    import hashlib

    assert info.bundle_sha256 == hashlib.sha256(b"tflite bytes").hexdigest()
    assert (info.id, info.version, info.labels) == ("m", "1.0.0", ("bg", "x"))


# -- power loss and full disks ------------------------------------------------------------------------------------
_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from firmware_app.records import fsutil
    from firmware_app.records.captures import Recorder
    from firmware_app.types import Frame

    fsutil._USE_O_TMPFILE = sys.argv[2] == "tmpfile"
    real = fsutil._os_write
    def slow(fd, data):
        n = real(fd, data[:4096])
        print("writing", flush=True)
        time.sleep(0.02)
        return n
    fsutil._os_write = slow
    rec = Recorder(sys.argv[1])
    px = np.random.default_rng(1).integers(0, 256, (480, 640, 3), np.uint8)
    rec.capture(Frame(0, 0, px, {}), None)
    print("finished", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["tmpfile", "named"])
def test_capture_killed_mid_write_leaves_no_partial_file(data_dir: Path, mode: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(data_dir), mode],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        for _ in range(5):  # a few chunks on disk, far from the end (~900 kB in 4 kB chunks)
            assert proc.stdout.readline() == b"writing\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    captures = data_dir / "captures"
    assert not list(captures.glob("*.cap"))
    leftovers = [p.name for p in captures.iterdir() if p.name != "current-study.json"]
    if mode == "tmpfile":
        assert leftovers == []  # the anonymous inode vanished with the process
    else:
        assert len(leftovers) == 1 and leftovers[0].startswith(".")  # hidden, never listed
    store = CaptureStore(data_dir)  # opening the store clears what a crash left
    assert store.list() == []
    assert [p.name for p in captures.iterdir() if p.name != "current-study.json"] == []
    cid = Recorder(data_dir).capture(frame(patterned_pixels(), 0), None)
    assert [i.id for i in store.list()] == [cid]


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_disk_full_is_a_named_error_and_leaves_nothing(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, o_tmpfile: bool
) -> None:
    monkeypatch.setattr(fsutil, "_USE_O_TMPFILE", o_tmpfile)
    rec = Recorder(data_dir, model=MODEL)
    rec.new_patient()
    real = fsutil._os_write

    def full(fd: int, data: bytes) -> int:
        if len(data) < fsutil._CHUNK:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(fsutil, "_os_write", full)
    px = np.random.default_rng(2).integers(0, 256, (480, 640), np.uint8)
    with pytest.raises(StorageFull, match="disk full.*export and purge captures"):
        rec.capture(frame(px, 0), None)
    assert sorted(p.name for p in (data_dir / "captures").iterdir()) == ["current-study.json"]
    monkeypatch.setattr(fsutil, "_os_write", real)
    assert rec.capture(frame(px, 1), None)


def test_nearly_full_disk_refuses_before_writing(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(data_dir, model=MODEL, min_free_bytes=1 << 62)
    rec.on_result(frame(patterned_pixels(), 0), None)
    with pytest.raises(StorageFull, match="nearly full"):
        rec.request_capture("button")
    with pytest.raises(StorageFull, match="nearly full"):
        rec.capture(frame(patterned_pixels(), 0), None)
    assert not list((data_dir / "captures").glob("*.cap"))


def test_recorder_as_listener_captures_on_request_and_keeps_going_after_a_failure(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []
    rec = Recorder(data_dir, model=MODEL, notify=shown.append, capture_every=0, clip_fps=100.0)
    with pytest.raises(RecorderBusy, match="nothing to capture yet"):
        rec.request_capture()
    with rec:
        px = patterned_pixels()
        for i in range(5):
            rec.on_result(frame(px, i), seg_result(i, disc(px.shape, (60, 60), 10 + i)))
        cid = rec.request_capture("serial")
        assert rec.flush(10)
        cap = rec.load_capture(cid)
        assert cap.frame_id == 4 and cap.reason == "serial"
        assert cap.clip and cap.clip[-1].frame_id <= 4

        def broken(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fsutil, "_os_write", broken)
        lost = rec.request_capture("button")
        assert rec.flush(10)
        assert any("NOT saved" in m and "storage full" in m for m in shown)
        monkeypatch.undo()
        rec.on_result(frame(px, 5), None)  # inference goes on; the next capture works
        again = rec.request_capture("button")
        case = rec.request_disagree(Mark(expected_label="fluid"))
        assert rec.flush(10)
    ids = {i.id: i.kind for i in rec.list_captures()}
    assert lost not in ids and ids[cid] == "capture" and ids[again] == "capture" and ids[case] == "disagree"
    assert rec.counters["failed"] == 1


def test_capture_every_k_records_unattended(data_dir: Path) -> None:
    with Recorder(data_dir, model=MODEL, capture_every=3) as rec:
        px = np.zeros((60, 80), np.uint8)
        for i in range(10):
            rec.on_result(frame(px, i), None)
        assert rec.flush(10)
    assert sorted(rec.load_capture(i.id).frame_id for i in rec.list_captures()) == [2, 5, 8]
    assert all(rec.load_capture(i.id).reason == "interval" for i in rec.list_captures())


def test_new_patient_study_persists_and_changes(data_dir: Path) -> None:
    rec = Recorder(data_dir, model=MODEL)
    a = rec.new_patient()
    assert Recorder(data_dir).current_study().study_id == a  # survives a restart
    b = rec.new_patient()
    assert a != b
    c1 = rec.capture(frame(patterned_pixels(), 0), None)
    assert rec.load_capture(c1).study.study_id == b


def test_events_go_to_the_audit_log_without_identifiers(data_dir: Path) -> None:
    from firmware_app.audit import verify_log

    rec = Recorder(data_dir, model=MODEL)
    rec.new_patient()
    us = pydicom_data_file("US1_UNCR.dcm")
    px, meta = next(load_frames(us))
    rec.capture(frame(px, 0, meta), None)
    rec.mark_disagree(frame(px, 0, meta), None)
    rec.set_silent_trial(True)
    text = "".join(p.read_text() for p in sorted((data_dir / "audit").glob("*.jsonl")))
    events = [json.loads(line)["event"] for line in text.splitlines()]
    assert events == ["new_patient", "capture", "disagree", "silent_trial"]
    for secret in (
        str(meta["dicom_header"].PatientName),
        meta["dicom_header"].PatientID,
        meta["StudyInstanceUID"],
    ):
        assert secret not in text
    assert verify_log(data_dir) == []
