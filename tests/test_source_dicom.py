"""DICOM source: real files from pydicom's own test files and from pydicom-data (no network)."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

from firmware_app.errors import BadFrame, BadSource, SourceUnavailable
from firmware_app.sources import open_source
from firmware_app.sources.dicom import DicomSource, load_frames, to_display_uint8

# Never pydicom.data.get_testdata_file(s): for pydicom-data files it tries to download.
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
try:
    import data_store

    DATA: Path | None = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover - pydicom-data is a dev dependency
    DATA = None

needs_data = pytest.mark.skipif(DATA is None, reason="pydicom-data (data_store) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tf(name: str) -> Path:
    return TEST_FILES / name


def dd(name: str) -> Path:
    assert DATA is not None
    return DATA / name


def dcm(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def only_frame(path: Path) -> np.ndarray:
    frames = list(load_frames(path))
    assert len(frames) == 1
    return frames[0][0]


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def drain(src: DicomSource, limit: int = 1000) -> tuple[list, list[str]]:
    """Read until None; return the frames and the BadFrame messages, in order."""
    frames, errors = [], []
    for _ in range(limit):
        try:
            frame = src.read()
        except BadFrame as exc:
            errors.append(str(exc))
            continue
        if frame is None:
            return frames, errors
        frames.append(frame)
    raise AssertionError("the source never ended")


# -- files ------------------------------------------------------------------------------------------
def test_us_multiframe_cine_yields_every_frame_in_order():
    path = tf("examples_ybr_color.dcm")  # US, 30 frames, JPEG baseline, YBR_FULL_422
    ds = dcm(path)
    src = open_source(f"dicom:{path}")
    assert isinstance(src, DicomSource) and src.live is False
    with src:
        frames, errors = drain(src)
    assert errors == []
    assert len(frames) == 30 == int(ds.NumberOfFrames)
    assert [f.id for f in frames] == list(range(30))
    assert [f.meta["frame_index"] for f in frames] == list(range(30))
    for f in frames:
        assert f.pixels.dtype == np.uint8 and f.pixels.shape == (240, 320, 3)
        m = f.meta
        assert m["path"] == str(path) and m["n_frames"] == 30 and m["Modality"] == "US"
        assert m["StudyInstanceUID"] == ds.StudyInstanceUID
        assert m["SeriesInstanceUID"] == ds.SeriesInstanceUID
        assert m["SOPInstanceUID"] == ds.SOPInstanceUID
        assert m["SOPClassUID"] == ds.SOPClassUID
    # the frames are the cine's frames, in order (BGR of pydicom's RGB)
    rgb = ds.pixel_array
    for k in (0, 13, 29):
        assert mad(frames[k].pixels[..., ::-1], rgb[k]) < 1.0
    assert mad(frames[0].pixels, frames[29].pixels) > 1.0
    # the header travels for DICOM export, without the pixel data
    header = frames[0].meta["dicom_header"]
    assert "PixelData" not in header and header.SOPInstanceUID == ds.SOPInstanceUID
    assert header.PatientName == ds.PatientName
    assert header.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


@needs_data
def test_us_palette_cine_two_frames():
    frames = list(load_frames(dd("OBXXXX1A_2frame.dcm")))
    assert [m["frame_index"] for _, m in frames] == [0, 1]
    assert all(px.shape == (600, 800, 3) and m["n_frames"] == 2 for px, m in frames)
    assert frames[0][1]["Modality"] == "US"


@needs_data
def test_monochrome1_is_inverted_high_is_bright():
    path = dd("RG3_UNCR.dcm")  # CR, MONOCHROME1, 10 bits stored, window 550/1024
    ds = dcm(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array
    out = only_frame(path)
    assert out.shape == raw.shape and out.dtype == np.uint8
    hi = raw >= np.percentile(raw, 99)
    lo = raw <= np.percentile(raw, 1)
    # MONOCHROME1: a high stored value is dark
    assert out[hi].mean() + 100 < out[lo].mean()
    assert np.corrcoef(raw.ravel()[::97], out.ravel()[::97])[0, 1] < -0.9
    # the same pixels read as MONOCHROME2 are exactly the inverse
    ds2 = dcm(path)
    ds2.PhotometricInterpretation = "MONOCHROME2"
    assert np.array_equal(to_display_uint8(ds2, raw), 255 - out)
    # lossless JPEG 2000 of the same image gives the same display
    assert np.array_equal(only_frame(dd("RG3_J2KR.dcm")), out)


def test_palette_colour_file_becomes_bgr():
    path = tf("examples_palette.dcm")  # US, PALETTE COLOR, 8-bit index, 16-bit LUT
    ds = dcm(path)
    out = only_frame(path)
    assert out.shape == (*ds.pixel_array.shape, 3) and out.dtype == np.uint8
    assert np.any(out[..., 0] != out[..., 2])  # real colour, not gray
    expected_rgb = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert np.array_equal(out, expected_rgb[..., ::-1])


@needs_data
def test_palette_16bit_segmented_lut():
    out = only_frame(dd("gdcm-US-ALOKA-16.dcm"))  # 16-bit index, segmented palette
    assert out.shape == (480, 640, 3) and out.dtype == np.uint8
    assert out.max() > 200 and np.any(out[..., 0] != out[..., 2])


def test_rgb_and_ybr_files_agree_on_colour():
    ref = only_frame(tf("SC_rgb_rle.dcm"))  # RGB, RLE: the reference
    assert ref.shape == (100, 100, 3)
    # the top stripe is red: BGR (0, 0, 255)
    assert ref[2, 50].tolist() == [0, 0, 255]
    for name, tol in (
        ("SC_ybr_full_422_uncompressed.dcm", 2.0),  # YBR_FULL_422 native
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 3.0),  # JPEG baseline, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 3.0),  # JPEG baseline, YBR_FULL_422
        ("SC_rgb_dcmtk_+eb+cr.dcm", 3.0),  # JPEG baseline, RGB
    ):
        assert mad(only_frame(tf(name)), ref) < tol, name


@needs_data
def test_rgb_vs_ybr_full_uncompressed():
    rgb = only_frame(dd("SC_rgb.dcm"))
    ybr = only_frame(dd("SC_ybr_full_uncompressed.dcm"))
    assert mad(rgb, ybr) < 2.0
    assert np.array_equal(only_frame(dd("SC_rgb_16bit.dcm")), rgb)
    # US colour-flow image, RGB vs lossy JPEG 2000 (YBR_ICT)
    assert mad(only_frame(dd("US1_UNCR.dcm")), only_frame(dd("US1_J2KI.dcm"))) < 3.0


def test_to_display_uint8_converts_raw_ybr():
    path = tf("SC_ybr_full_422_uncompressed.dcm")
    ds = dcm(path)
    raw, props = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, raw=True)
    assert props["photometric_interpretation"] in ("YBR_FULL", "YBR_FULL_422")  # 422 is expanded
    out = to_display_uint8(ds, raw, "YBR_FULL")
    assert mad(out, only_frame(tf("SC_rgb_rle.dcm"))) < 2.0
    # without a photometric, the array is taken as pixel_array gives it (already RGB)
    assert np.array_equal(to_display_uint8(ds, ds.pixel_array), out)


@needs_data
def test_16bit_with_window_uses_full_uint8_range():
    path = dd("693_UNCI.dcm")  # CT, 16-bit signed, rescale + window
    ds = dcm(path)
    assert ds.BitsAllocated == 16 and "WindowCenter" in ds
    out = only_frame(path)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 50


def test_16bit_window_math_and_fallback_stretch():
    ds = dcm(tf("MR_small.dcm"))  # 16-bit signed with a window
    raw = ds.pixel_array
    lo, hi = np.percentile(raw, (10, 90))
    ds.WindowCenter, ds.WindowWidth = float(lo + hi) / 2, float(hi - lo)
    out = to_display_uint8(ds, raw)
    assert out.min() == 0 and out.max() == 255
    assert np.all(out[raw <= lo - 1] == 0) and np.all(out[raw >= hi + 1] == 255)
    # no window: a robust min-max of the frame, full range too
    del ds.WindowCenter, ds.WindowWidth
    out = to_display_uint8(ds, raw)
    assert out.min() == 0 and out.max() == 255
    # 32-bit multi-frame (dose grid) without a window
    frames = list(load_frames(tf("rtdose.dcm")))
    assert len(frames) == 15 and all(px.max() == 255 and px.dtype == np.uint8 for px, _ in frames)


def test_monochrome1_inverts_and_window_from_shared_functional_groups():
    ds = dcm(tf("MR_small.dcm"))
    raw = ds.pixel_array
    mono2 = to_display_uint8(ds, raw)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(to_display_uint8(ds, raw), 255 - mono2)
    # an enhanced object keeps its window in the Shared Functional Groups
    ds.PhotometricInterpretation = "MONOCHROME2"
    voi = pydicom.Dataset()
    voi.WindowCenter, voi.WindowWidth = ds.WindowCenter, ds.WindowWidth
    group = pydicom.Dataset()
    group.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [group]
    del ds.WindowCenter, ds.WindowWidth
    assert np.array_equal(to_display_uint8(ds, raw), mono2)


def test_8bit_gray_ultrasound_stays_as_is():
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    arr = np.arange(40 * 30, dtype=np.uint8).reshape(40, 30) % 200
    out = to_display_uint8(ds, arr)
    assert out.ndim == 2 and np.array_equal(out, arr)


@needs_data
def test_modality_lut_and_voi_lut_are_applied():
    mlut = only_frame(dd("mlut_18.dcm"))  # Modality LUT Sequence
    vlut = only_frame(dd("vlut_04.dcm"))  # VOI LUT Sequence
    for out in (mlut, vlut):
        assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


@pytest.mark.parametrize(
    "name, reference, tol",
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0),  # JPEG-LS lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),  # JPEG 2000 lossless
        ("MR_small_RLE.dcm", "MR_small.dcm", 0.0),  # RLE
        ("MR_small_bigendian.dcm", "MR_small.dcm", 0.0),  # explicit VR big endian
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0.0),  # JPEG lossless SV1, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 3.0),  # JPEG baseline, YBR_FULL
        ("SC_rgb_jls_lossy_sample.dcm", "SC_rgb_rle.dcm", 3.0),  # JPEG-LS near-lossless, RGB
        ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 3.0),  # JPEG 2000 lossy, RGB
        ("image_dfl.dcm", None, None),  # deflated explicit VR
        ("JPGExtended.dcm", None, None),  # JPEG extended 12-bit
    ],
)
def test_compressed_transfer_syntaxes_decode(name, reference, tol):
    out = only_frame(tf(name))
    assert out.dtype == np.uint8 and out.max() > out.min()
    if reference is not None:
        assert mad(out, only_frame(tf(reference))) <= tol


@needs_data
def test_more_compressed_files_decode():
    cine = list(load_frames(dd("emri_small_jpeg_2k_lossless.dcm")))
    assert len(cine) == 10
    ref = list(load_frames(dd("emri_small.dcm")))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(cine, ref))
    assert only_frame(dd("JPGLosslessP14SV1_1s_1f_8b.dcm")).shape == (768, 1024)
    assert len(list(load_frames(dd("emri_small_jpeg_ls_lossless.dcm")))) == 10
    assert mad(only_frame(dd("OBXXXX1A_rle.dcm")), only_frame(dd("OBXXXX1A.dcm"))) == 0.0


@pytest.mark.parametrize(
    "name, uid, what, package",
    [
        ("MR_small_jp2klossless.dcm", JPEG2000Lossless, "JPEG 2000", "pylibjpeg-openjpeg"),
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "JPEG-LS", "pylibjpeg-libjpeg"),
        ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit, "JPEG", "pylibjpeg-libjpeg"),
    ],
)
def test_missing_decoder_names_file_syntax_and_package(monkeypatch, tmp_path, name, uid, what, package):
    # simulate a box without the plugin: pydicom's decoder for this syntax has no available plugin
    monkeypatch.setattr(get_decoder(uid), "_available", {})
    shutil.copy(tf(name), tmp_path / "a.dcm")
    shutil.copy(tf("CT_small.dcm"), tmp_path / "b.dcm")
    with open_source(f"dicom:{tmp_path}?watch=0") as src:
        frames, errors = drain(src)
    assert len(errors) == 1
    msg = errors[0]
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'a.dcm'}: needs a {what}")
    assert uid.name in msg and str(uid) in msg and f"pip install pylibjpeg {package}" in msg
    # the next file is still read
    assert [f.meta["path"] for f in frames] == [str(tmp_path / "b.dcm")]


# -- folders ----------------------------------------------------------------------------------------
def test_folder_with_valid_and_broken_files(tmp_path):
    shutil.copy(tf("CT_small.dcm"), tmp_path / "a_ct.dcm")  # 128x128
    (tmp_path / "b_random.dcm").write_bytes(np.random.default_rng(7).bytes(4096))
    shutil.copy(tf("rtdose_rle.dcm"), tmp_path / "c_cine.dcm")  # 15 frames 10x10, RLE
    data = tf("MR_small.dcm").read_bytes()
    (tmp_path / "d_truncated.dcm").write_bytes(data[: len(data) * 2 // 3])
    shutil.copy(tf("rtplan.dcm"), tmp_path / "e_rtplan.dcm")  # no pixels
    (tmp_path / "f_empty.dcm").write_bytes(b"")
    shutil.copy(tf("examples_palette.dcm"), tmp_path / "g_palette.dcm")  # colour, other size
    (tmp_path / "h_notes.txt").write_text("not an image\n")
    (tmp_path / ".hidden.dcm").write_bytes(b"partial")  # ignored (rsync temp files)
    (tmp_path / "sub").mkdir()  # not recursive
    shutil.copy(tf("CT_small.dcm"), tmp_path / "sub" / "x.dcm")

    t0 = time.monotonic()
    src = open_source(f"dicom:{tmp_path}?watch=0")
    assert src.live is False
    with src:
        frames, errors = drain(src)
        assert src.read() is None
    assert time.monotonic() - t0 < 5

    names = [Path(f.meta["path"]).name for f in frames]
    assert names == ["a_ct.dcm"] + ["c_cine.dcm"] * 15 + ["g_palette.dcm"]
    assert [f.id for f in frames] == list(range(17))
    assert [f.meta["frame_index"] for f in frames[1:16]] == list(range(15))
    assert [f.pixels.shape for f in frames[:2]] == [(128, 128), (10, 10)]
    assert frames[-1].pixels.shape == (290, 680, 3)  # cropped to its ultrasound region
    assert frames[-1].meta["region_from"] == "dicom"

    broken = ["b_random.dcm", "d_truncated.dcm", "e_rtplan.dcm", "f_empty.dcm", "h_notes.txt"]
    assert len(errors) == len(broken)
    for name, msg in zip(broken, errors):
        assert msg.startswith(f"{tmp_path / name}: "), msg
        assert "\n" not in msg
    assert "not a DICOM file" in errors[0]
    assert "too short" in errors[1]
    assert "no pixel data" in errors[2] and "RTPLAN" in errors[2]
    assert "empty" in errors[3]


@needs_data
def test_folder_broken_files_from_pydicom_data(tmp_path):
    shutil.copy(dd("emri_small_jpeg_2k_lossless_too_short.dcm"), tmp_path / "a.dcm")
    shutil.copy(dd("US1_UNCR.dcm"), tmp_path / "b.dcm")
    with open_source(f"dicom:{tmp_path}?watch=0") as src:
        frames, errors = drain(src)
    assert len(frames) == 1 and frames[0].pixels.shape == (480, 640, 3)
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'a.dcm'}: ")


def _reader(src: DicomSource, out: list, errors: list, done: threading.Event) -> None:
    try:
        while True:
            try:
                frame = src.read()
            except BadFrame as exc:
                errors.append(str(exc))
                continue
            except SourceUnavailable as exc:
                errors.append(f"unavailable: {exc}")
                continue
            if frame is None:
                return
            out.append(frame)
    finally:
        done.set()


def _wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_watched_folder_picks_up_new_files_and_stops_promptly(tmp_path):
    shutil.copy(tf("CT_small.dcm"), tmp_path / "001.dcm")
    old = time.time() - 60
    os.utime(tmp_path / "001.dcm", (old, old))  # present at start, not being written: read at once
    # poll 0.5 s (default 0.25): margin for the slow copy below on a loaded machine
    src = open_source(f"dicom:{tmp_path}?poll=0.5")
    assert src.live is False
    src.open()
    frames: list = []
    errors: list[str] = []
    done = threading.Event()
    threading.Thread(target=_reader, args=(src, frames, errors, done), daemon=True).start()
    assert _wait_for(lambda: len(frames) == 1, 0.4)

    # a slow copy (pauses shorter than a poll) is not read before it is complete
    data = tf("rtdose.dcm").read_bytes()  # 15 frames
    target = tmp_path / "002.dcm"
    step = len(data) // 14 + 1
    with open(target, "wb") as fh:  # ~1.1 s: a poll is sure to see it half-written
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            time.sleep(0.08)
    assert _wait_for(lambda: len(frames) == 16, 3.0)
    assert errors == []
    assert [f.meta["frame_index"] for f in frames[1:]] == list(range(15))

    # a file copied in later, then a broken one: reported once, and the watch goes on
    (tmp_path / "003.dcm").write_bytes(b"garbage" * 100)
    shutil.copy(tf("MR_small.dcm"), tmp_path / "004.dcm")
    assert _wait_for(lambda: len(frames) == 17 and len(errors) == 1, 3.0)
    assert errors[0].startswith(f"{tmp_path / '003.dcm'}: ")
    assert Path(frames[-1].meta["path"]).name == "004.dcm"
    assert not done.is_set()

    t0 = time.monotonic()
    src.stop()
    assert done.wait(1.0), "read() did not return after stop()"
    assert time.monotonic() - t0 < 1.0
    assert src.read() is None
    src.close()


def test_watched_folder_that_disappears_reports_unavailable_once(tmp_path):
    folder = tmp_path / "stick"
    folder.mkdir()
    src = open_source(f"dicom:{folder}?poll=0.05")
    src.open()
    frames: list = []
    errors: list[str] = []
    done = threading.Event()
    threading.Thread(target=_reader, args=(src, frames, errors, done), daemon=True).start()
    time.sleep(0.1)
    folder.rmdir()
    assert _wait_for(lambda: len(errors) == 1, 2.0)
    time.sleep(0.2)
    assert len(errors) == 1 and errors[0].startswith("unavailable: ") and str(folder) in errors[0]
    folder.mkdir()  # plugged back in
    shutil.copy(tf("CT_small.dcm"), folder / "a.dcm")
    assert _wait_for(lambda: len(frames) == 1, 2.0)
    src.stop()
    assert done.wait(1.0)


# -- URIs -------------------------------------------------------------------------------------------
def test_nonexistent_path_is_bad_source():
    with pytest.raises(BadSource, match="/nonexistent"):
        src = open_source("dicom:/nonexistent")
        src.open()


@pytest.mark.parametrize("query", ["watch=2", "watch=x", "poll=0", "bogus=1"])
def test_bad_parameters_are_bad_source(tmp_path, query):
    with pytest.raises(BadSource, match=query.split("=")[0]):
        open_source(f"dicom:{tmp_path}?{query}")


def test_single_file_ends_and_close_is_idempotent():
    src = open_source(f"dicom:{tf('CT_small.dcm')}")
    frame = src.read()  # opens on first read
    assert frame is not None and frame.id == 0 and frame.meta["n_frames"] == 1
    assert frame.meta["source"] == f"dicom:{tf('CT_small.dcm')}"
    assert src.read() is None
    src.close()
    src.close()


def test_relative_path(tmp_path, monkeypatch):
    shutil.copy(tf("CT_small.dcm"), tmp_path / "ct.dcm")
    monkeypatch.chdir(tmp_path)
    frames = drain(open_source("dicom:ct.dcm"))[0]
    assert len(frames) == 1 and os.path.basename(frames[0].meta["path"]) == "ct.dcm"
