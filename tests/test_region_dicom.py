"""The imaging region and scale a DICOM file states (Sequence of Ultrasound Regions, pixel spacing)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from firmware_app.sources.dicom import DicomSource
from firmware_app.sources.region import dicom_region, ultrasound_region

try:
    import data_store

    DATA = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover - pydicom-data is a dev dependency
    DATA = None
needs_data = pytest.mark.skipif(DATA is None, reason="pydicom-data is not installed")


def _region(**kw) -> Dataset:
    item = Dataset()
    defaults = dict(
        RegionSpatialFormat=1,
        RegionDataType=1,
        RegionLocationMinX0=10,
        RegionLocationMinY0=20,
        RegionLocationMaxX1=109,
        RegionLocationMaxY1=219,
        PhysicalUnitsXDirection=3,
        PhysicalUnitsYDirection=3,
        PhysicalDeltaX=0.02,
        PhysicalDeltaY=0.02,
    )
    for k, v in {**defaults, **kw}.items():
        setattr(item, k, v)
    return item


def _ds(*regions: Dataset) -> Dataset:
    ds = Dataset()
    ds.Modality = "US"
    ds.SequenceOfUltrasoundRegions = Sequence(list(regions))
    return ds


def test_region_and_scale_from_the_ultrasound_region():
    r = ultrasound_region(_ds(_region()), 320, 240)
    assert r.rect == (10, 20, 100, 200)  # Max X1/Y1 are inclusive
    assert r.origin == "dicom" and r.established
    assert r.mm_per_px == pytest.approx((0.2, 0.2))
    assert r.meta()["imaging_region"] == [10, 20, 100, 200]


def test_tissue_region_chosen_over_a_larger_doppler_strip_and_a_waveform():
    strip = _region(RegionSpatialFormat=3, RegionLocationMinX0=0, RegionLocationMaxX1=319)
    flow = _region(RegionDataType=2, RegionLocationMinX0=0, RegionLocationMaxX1=200)
    wave = _region(RegionSpatialFormat=4, RegionLocationMinY0=220, RegionLocationMaxY1=239)
    r = ultrasound_region(_ds(strip, flow, wave, _region()), 320, 240)
    assert r.rect == (10, 20, 100, 200)


def test_a_region_past_the_edge_is_clipped_with_a_note_and_one_mostly_outside_is_ignored():
    r = ultrasound_region(_ds(_region(RegionLocationMaxX1=330)), 320, 240)
    assert r.rect == (10, 20, 310, 200) and "clipped" in r.notes[0]
    r = ultrasound_region(_ds(_region(RegionLocationMinX0=300, RegionLocationMaxX1=900)), 320, 240)
    assert r.origin == "full_frame" and not r.established
    assert any("ignored" in n for n in r.notes)


def test_no_scale_unless_the_units_are_cm():
    r = ultrasound_region(_ds(_region(PhysicalUnitsXDirection=0)), 320, 240)
    assert r.mm_per_px is None and r.established


def test_projection_radiograph_scale_from_pixel_spacing_and_zero_spacing_is_no_scale():
    ds = Dataset()
    ds.Modality = "CR"
    ds.PixelSpacing = [0.15, 0.1]  # row spacing (dy), column spacing (dx)
    r = dicom_region(ds, 100, 80)
    assert r.origin == "full_frame" and r.mm_per_px == pytest.approx((0.1, 0.15))
    ds.PixelSpacing = [0, 0]
    assert dicom_region(ds, 100, 80).mm_per_px is None
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.2, 0.2]
    assert dicom_region(ds, 100, 80).mm_per_px == pytest.approx((0.2, 0.2))


@needs_data
def test_real_cine_is_cropped_to_its_region_with_no_board_setting():
    path = DATA / "color3d_jpeg_baseline.dcm"
    header = pydicom.dcmread(path, stop_before_pixels=True)
    expected = dicom_region(header, header.Columns, header.Rows)
    src = DicomSource(f"dicom:{path}", path)
    with src:
        frames = [src.read() for _ in range(3)]
    for f in frames:
        assert f.meta["region_from"] == "dicom"
        x, y, w, h = f.meta["imaging_region"]
        assert (x, y, w, h) == expected.rect and f.pixels.shape[:2] == (h, w)
        assert f.meta["mm_per_px"][0] == pytest.approx(expected.mm_per_px[0])


@needs_data
def test_the_board_crop_overrides_the_file_and_keeps_its_scale():
    from firmware_app.sources.profile import SourceProfile

    path = DATA / "OBXXXX1A.dcm"
    src = DicomSource(f"dicom:{path}", path, profile=SourceProfile((0, 0, 200, 100)))
    with src:
        f = src.read()
    assert f.meta["region_from"] == "board" and f.pixels.shape[:2] == (100, 200)
    assert f.meta["mm_per_px"] is not None
