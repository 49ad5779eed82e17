"""Inputs a model's input gate must refuse: real scans of other kinds and pictures that are no scan at all.

``real_frames()``: the first frame of every real ultrasound and CR file of pydicom-data and of pydicom's
own ``examples_*.dcm`` test files. ``made_frames(kind)``: screenshots, photos, test patterns, blank frames,
noise, and a phantom of the other modality (``kind`` = "ultrasound" or "xray": the kind the model takes).
None of these is used to build a gate: they are tests only.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

PYDICOM_DATA = (
    "US1_UNCR.dcm",
    "OBXXXX1A.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "color3d_jpeg_baseline.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "RG1_UNCR.dcm",
    "RG3_UNCR.dcm",
)


def real_files() -> list[Path]:
    import data_store
    import pydicom

    root = Path(data_store.__file__).parent / "data"
    files = [root / n for n in PYDICOM_DATA]
    files += sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("examples_*.dcm"))
    return files


def real_frames() -> dict[str, np.ndarray]:
    from firmware_app.sources.dicom import load_frames

    return {p.name: next(iter(load_frames(p)))[0] for p in real_files()}


def screenshot(w: int = 1280, h: int = 800, seed: int = 1) -> np.ndarray:
    """A desktop: wallpaper gradient, a task bar, overlapping windows with title bars, text and buttons."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(90, 160, w)[None, :, None].astype(np.uint8) * np.array([1.0, 0.8, 0.5])
    cv2.rectangle(img, (0, h - 40), (w, h), (40, 40, 40), -1)
    for i in range(4):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(300, 600)), y0 + int(rng.integers(200, 400))
        cv2.rectangle(img, (x0, y0), (x1, y1), (245, 245, 245), -1)
        cv2.rectangle(img, (x0, y0), (x1, y0 + 28), (200, 120, 40), -1)
        cv2.putText(
            img,
            f"Window {i} - Report.docx",
            (x0 + 8, y0 + 20),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.55,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        for r in range(y0 + 50, y1 - 20, 22):
            words = " ".join("lorem ipsum dolor sit amet".split()[: int(rng.integers(2, 6))] * 2)
            cv2.putText(
                img, words, (x0 + 12, r), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (30, 30, 30), 1, cv2.LINE_AA
            )
        cv2.rectangle(img, (x1 - 90, y1 - 34), (x1 - 10, y1 - 8), (210, 210, 210), -1)
        cv2.putText(img, "OK", (x1 - 62, y1 - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def photo(w: int = 800, h: int = 600, seed: int = 2) -> np.ndarray:
    """A photo-like scene: sky gradient, sun, hills with grass texture, a tree, sensor noise, colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    sky = yy / h
    img[..., 0], img[..., 1], img[..., 2] = 230 - 60 * sky, 180 - 40 * sky, 120 + 40 * sky
    cv2.circle(img, (int(0.75 * w), int(0.2 * h)), 40, (200, 250, 255), -1, cv2.LINE_AA)
    hill = (0.55 * h + 40 * np.sin(xx / 90.0) + 25 * np.sin(xx / 37.0 + 1.0)) < yy
    grass = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2.0) * 40
    img[hill] = np.stack([40 + grass, 120 + grass, 60 + 0.5 * grass], axis=-1)[hill]
    cv2.rectangle(img, (150, int(0.4 * h)), (170, int(0.7 * h)), (30, 50, 80), -1)
    cv2.circle(img, (160, int(0.38 * h)), 60, (40, 110, 50), -1, cv2.LINE_AA)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def smpte_bars(w: int = 640, h: int = 480) -> np.ndarray:
    """SMPTE colour bars (75 %), with the castellations and the PLUGE row."""
    img = np.zeros((h, w, 3), np.uint8)
    top = [
        (191, 191, 191),
        (0, 191, 191),
        (191, 191, 0),
        (0, 191, 0),
        (191, 0, 191),
        (0, 0, 191),
        (191, 0, 0),
    ]
    mid = [
        (191, 0, 0),
        (19, 19, 19),
        (191, 0, 191),
        (19, 19, 19),
        (191, 191, 0),
        (19, 19, 19),
        (191, 191, 191),
    ]
    bw = w / 7
    for i in range(7):
        x0, x1 = int(i * bw), int((i + 1) * bw)
        img[: int(0.67 * h), x0:x1] = top[i]
        img[int(0.67 * h) : int(0.75 * h), x0:x1] = mid[i]
    low = [(106, 76, 0), (255, 255, 255), (133, 0, 50), (19, 19, 19), (9, 9, 9), (19, 19, 19), (29, 29, 29)]
    edges = [0, 1.25, 2.5, 3.75, 5, 5.33, 5.67, 7]
    for i in range(7):
        img[int(0.75 * h) :, int(edges[i] * bw) : int(edges[i + 1] * bw)] = low[i]
    return img


def made_frames(kind: str) -> dict[str, np.ndarray]:
    """Inputs that are no scan of ``kind`` ("ultrasound" or "xray")."""
    from firmware_app.sources.phantom import UltrasoundPhantom, XrayPhantom

    rng = np.random.default_rng(12345)
    frames = {
        "screenshot": screenshot(),
        "screenshot_gray": cv2.cvtColor(screenshot(seed=3), cv2.COLOR_BGR2GRAY),
        "photo": photo(),
        "photo_gray": cv2.cvtColor(photo(seed=4), cv2.COLOR_BGR2GRAY),
        "blank_black": np.zeros((480, 640), np.uint8),
        "blank_grey": np.full((480, 640), 128, np.uint8),
        "blank_white_bgr": np.full((480, 640, 3), 255, np.uint8),
        "uniform_noise": rng.integers(0, 256, (480, 640), dtype=np.uint8),
        "smpte_bars": smpte_bars(),
    }
    if kind == "ultrasound":
        frames["xray_phantom"] = XrayPhantom(640, 480, seed=900_001).render(3)[0]
    else:
        frames["ultrasound_phantom"] = UltrasoundPhantom(640, 480, seed=900_001).render(3)[0]
    return frames
