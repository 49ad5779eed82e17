"""Shared makers for the records tests (not a test module)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from firmware_app.records.captures import ModelInfo
from firmware_app.types import Frame, Result

MODEL = ModelInfo(
    id="us-fluid-seg",
    version="1.2.3",
    task="segmentation",
    bundle_sha256="5" * 64,
    labels=("background", "fluid"),
    cleared_for_clinical_use=False,
    intended_use="Demonstration on synthetic phantoms. Not for diagnostic use.",
)


def pydicom_data_file(name: str) -> Path:
    """A file of the pydicom-data package (never downloaded: the package carries it)."""
    import data_store

    return Path(data_store.__file__).parent / "data" / name


def pydicom_example(name: str) -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def frame(pixels: np.ndarray, fid: int = 0, meta: dict | None = None, t_ns: int | None = None) -> Frame:
    return Frame(fid, time.monotonic_ns() if t_ns is None else t_ns, pixels, dict(meta or {}))


def seg_result(fid: int, mask: np.ndarray, label: str = "fluid", confidence: float = 0.87) -> Result:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    ys, xs = np.nonzero(mask)
    return Result(
        frame_id=fid,
        task="segmentation",
        label=label,
        confidence=confidence,
        alert=confidence >= 0.5,
        probabilities={label: confidence},
        mask=mask.astype(np.uint8),
        contours=tuple(c.reshape(-1, 2) for c in contours),
        centroid=(float(xs.mean()), float(ys.mean())),
        area_fraction=float(mask.mean()),
    )


def disc(shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, center, radius, 1, -1)
    return m
