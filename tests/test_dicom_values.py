"""A DICOM file whose rescale or window values would make a flat or garbage frame is refused by name, and
a valid dataset written without the 128-byte preamble is read."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from firmware_app.errors import BadFrame
from firmware_app.sources.dicom import load_frames

RAMP = (np.arange(32 * 32, dtype=np.uint16) * 4).reshape(32, 32)


def dataset(**attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = RAMP.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = RAMP.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid values these tests are about
        for key, value in attrs.items():
            setattr(ds, key, value)
    return ds


def write(path: Path, ds: Dataset, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = config.settings.writing_validation_mode
        config.settings.writing_validation_mode = config.IGNORE  # write the invalid values as they are
        try:
            ds.save_as(path, **kw)
        finally:
            config.settings.writing_validation_mode = old
    return path


def frames(path: Path) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [px for px, _ in load_frames(path)]


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"RescaleSlope": "NaN"}, "Rescale Slope nan is not a finite number"),
        ({"RescaleIntercept": "nan", "RescaleSlope": "1"}, "Rescale Intercept nan is not a finite number"),
        ({"RescaleSlope": "inf"}, "Rescale Slope inf is not a finite number"),
        ({"RescaleSlope": "1e300"}, "Rescale Slope 1e\\+300 is out of range"),
        ({"RescaleSlope": "1e36"}, r"Rescale Slope 1e\+36 / Intercept 0 overflow: stored values 0..4095"),
        ({"RescaleSlope": "0"}, "Rescale Slope 0 maps every pixel to one value"),
        ({"WindowCenter": "NaN", "WindowWidth": "400"}, "Window Center nan is not a finite number"),
        ({"WindowCenter": "100", "WindowWidth": "nan"}, "Window Width nan is not a finite number"),
        ({"WindowCenter": "100", "WindowWidth": "1e39"}, "Window Width 1e\\+39 is out of range"),
    ],
)
def test_garbage_rescale_or_window_is_a_named_badframe(tmp_path: Path, attrs, message):
    path = write(tmp_path / "x.dcm", dataset(**attrs), enforce_file_format=True)
    with pytest.raises(BadFrame, match=f"^{path}: {message}"):
        frames(path)


def test_sane_rescale_and_window_still_map(tmp_path: Path):
    path = write(
        tmp_path / "ok.dcm",
        dataset(RescaleSlope="2", RescaleIntercept="-1024", WindowCenter="3000", WindowWidth="6000"),
        enforce_file_format=True,
    )
    (px,) = frames(path)
    assert px.min() < 60 and px.max() > 200


@pytest.mark.parametrize(
    "syntax, little, implicit",
    [
        (ExplicitVRLittleEndian, True, False),
        (ImplicitVRLittleEndian, True, True),
        (ExplicitVRBigEndian, False, False),
    ],
)
def test_dataset_without_preamble_is_read(tmp_path: Path, syntax, little, implicit):
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = syntax
    if not little:
        ds.PixelData = RAMP.astype(">u2").tobytes()
    # a bare dataset: no 128-byte preamble, no 'DICM', no file meta (write_like_original), and no group
    # 0008 either: it starts with (0028,0002) Samples per Pixel
    bare = Dataset()
    for elem in ds:
        if elem.tag.group != 0x0008:
            bare.add(elem)
    bare.set_original_encoding(implicit, little)
    path = tmp_path / "bare.dcm"
    bare.save_as(path, implicit_vr=implicit, little_endian=little)
    raw = path.read_bytes()
    assert raw[128:132] != b"DICM" and raw[:4] == (b"\x28\x00\x02\x00" if little else b"\x00\x28\x00\x02")
    (px,) = frames(path)
    assert px.shape == RAMP.shape and px[0, 0] < px[-1, -1]


def test_file_meta_without_preamble_is_read(tmp_path: Path):
    ds = dataset()
    ds.preamble = None
    path = tmp_path / "meta.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(path, ds, enforce_file_format=False)
    raw = path.read_bytes()
    # a file written with no preamble may still start with the 'DICM' prefix: cut it to get a bare meta
    if raw.startswith(b"DICM"):
        path.write_bytes(raw[4:])
    assert path.read_bytes()[:2] == b"\x02\x00"
    (px,) = frames(path)
    assert px.shape == RAMP.shape


def test_junk_without_preamble_is_still_not_dicom(tmp_path: Path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(BadFrame, match="not a DICOM file"):
        frames(path)
