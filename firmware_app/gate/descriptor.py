"""The gate's image descriptor: a fixed-length vector of what a frame looks like, at a fixed resolution.

Every frame is first brought to the gate's working resolution, ``WORK_W`` x ``WORK_H`` (box average down,
bilinear up; a colour frame keeps its colour), so the descriptor of a frame does not depend on the size it
arrived at and the cost is bounded (a 640x480 frame costs one integer-factor box average). All features
are computed from that working image, so the working image of a frame (what the golden vectors store)
has the very same descriptor as the frame itself.

Features, each in units of order one (fractions, or ``log1p`` of gray levels), so one standard-deviation
floor (``model.SD_FLOOR``) means the same for all of them:

- gray-level histogram: 16 bins, square root (Hellinger), so a bin's variance does not scale with its mass;
- exactly black (0) and exactly white (255) pixels: flat fill of letterboxes, screenshots, burnt-in text;
- mean and standard deviation of the gray levels (/255): brightness and contrast;
- texture at four scales: ``log1p`` of the mean absolute difference of horizontal and of vertical
  neighbours at 1, 1/2, 1/4 and 1/8 of the working resolution (8 features): the shape of the image's
  spatial spectrum (speckle grain, blur, noise, sharp text) and its orientation (lines, A-lines, rows);
- gradient-magnitude histogram at 1/2 resolution: 9 log-spaced bins (0, 1, 2-3, 4-7, ... 128+), square root;
- coarse spatial layout: a 4x4 grid of mean brightness (/255) and a 4x4 grid of ``log1p`` gradient
  magnitude (the fan or the thorax outline, where the texture is);
- colour: mean chroma (max - min of B, G, R; /255) and the fraction of pixels with chroma above 16
  (a gray-only model that meets colour Doppler, a photo, a colour test pattern); 0 for a gray frame.

``BLANK_STD``: a working image whose gray levels have a standard deviation below it carries no picture
("blank frame"), whatever the model's reference data look like.
"""

from __future__ import annotations

import cv2
import numpy as np

WORK_W, WORK_H = 320, 240
BLANK_STD = 2.0  # gray levels
_MAX_DIRECT = 4  # up to this many times the working size, one box average; above, a stride first
_GRAD_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
_LEVELS = 4
_GRID = 4
_CHROMA_MIN = 16

FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"hist_{i:02d}" for i in range(16))
    + ("black", "white", "mean", "std")
    + tuple(f"diff_{axis}_{k}" for k in range(_LEVELS) for axis in "xy")
    + tuple(f"grad_{i}" for i in range(len(_GRAD_EDGES) - 1))
    + tuple(f"layout_mean_{r}{c}" for r in range(_GRID) for c in range(_GRID))
    + tuple(f"layout_grad_{r}{c}" for r in range(_GRID) for c in range(_GRID))
    + ("chroma_mean", "chroma_fraction")
)
N_FEATURES = len(FEATURE_NAMES)

# 256-entry table: gradient magnitude -> its log-spaced bin
_GRAD_BIN = np.searchsorted(np.asarray(_GRAD_EDGES[1:]), np.arange(256), side="right").astype(np.int64)


def working_image(pixels: np.ndarray) -> np.ndarray:
    """uint8 gray HxW or BGR HxWx3 (BGRA and HxWx1 accepted) -> the same at WORK_W x WORK_H."""
    px = np.asarray(pixels)
    if px.ndim == 3 and px.shape[2] == 1:
        px = px[:, :, 0]
    elif px.ndim == 3:
        px = px[:, :, :3]
    if px.ndim not in (2, 3) or px.shape[0] < 1 or px.shape[1] < 1:
        raise ValueError(f"gate: expected an HxW or HxWx3 image, got shape {px.shape}")
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    h, w = px.shape[:2]
    if (w, h) == (WORK_W, WORK_H):
        return px
    k = max(1, min(w // (_MAX_DIRECT * WORK_W), h // (_MAX_DIRECT * WORK_H)))
    if k > 1:
        px = px[::k, ::k]
        h, w = px.shape[:2]
    interp = cv2.INTER_AREA if w >= WORK_W and h >= WORK_H else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(px), (WORK_W, WORK_H), interpolation=interp)


def _diffs(img: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean |horizontal| and |vertical| neighbour differences, and the gradient magnitude (uint8)."""
    dx = cv2.absdiff(img[:-1, 1:], img[:-1, :-1])
    dy = cv2.absdiff(img[1:, :-1], img[:-1, :-1])
    return float(cv2.mean(dx)[0]), float(cv2.mean(dy)[0]), cv2.add(dx, dy)


def describe_working(work: np.ndarray) -> tuple[np.ndarray, float]:
    """(feature vector float64[N_FEATURES], gray std) of a working image (see ``working_image``)."""
    if work.ndim == 3:
        gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY)
        half = cv2.resize(work, (WORK_W // 2, WORK_H // 2), interpolation=cv2.INTER_AREA)
        b, g, r = cv2.split(half)  # OpenCV per-channel max/min: ~10x faster than numpy over axis 2
        chroma = cv2.subtract(cv2.max(cv2.max(b, g), r), cv2.min(cv2.min(b, g), r))
        chroma_mean = float(cv2.mean(chroma)[0]) / 255.0
        chroma_frac = cv2.countNonZero(cv2.compare(chroma, _CHROMA_MIN, cv2.CMP_GT)) / chroma.size
    else:
        gray = work
        chroma_mean = chroma_frac = 0.0
    n = gray.size
    h256 = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64) / n
    levels = np.arange(256, dtype=np.float64)
    mean = float(h256 @ levels)
    std = float(np.sqrt(max(float(h256 @ (levels - mean) ** 2), 0.0)))
    hist16 = np.sqrt(h256.reshape(16, 16).sum(axis=1))

    pyramid = [gray]
    for _ in range(_LEVELS - 1):
        g = pyramid[-1]
        pyramid.append(cv2.resize(g, (g.shape[1] // 2, g.shape[0] // 2), interpolation=cv2.INTER_AREA))
    diffs = []
    grad_half = None
    for k, g in enumerate(pyramid):
        mx, my, grad = _diffs(g)
        diffs += [np.log1p(mx), np.log1p(my)]
        if k == 1:
            grad_half = grad
    assert grad_half is not None
    gh = cv2.calcHist([grad_half], [0], None, [256], [0, 256]).ravel()
    grad_hist = np.sqrt(np.bincount(_GRAD_BIN, weights=gh, minlength=len(_GRAD_EDGES) - 1) / grad_half.size)

    layout_mean = cv2.resize(pyramid[-1], (_GRID, _GRID), interpolation=cv2.INTER_AREA).astype(np.float64)
    layout_grad = cv2.resize(
        grad_half.astype(np.float32), (_GRID, _GRID), interpolation=cv2.INTER_AREA
    ).astype(np.float64)
    vec = np.concatenate(
        [
            hist16,
            [h256[0], h256[255], mean / 255.0, std / 255.0],
            diffs,
            grad_hist,
            layout_mean.ravel() / 255.0,
            np.log1p(layout_grad.ravel()),
            [chroma_mean, chroma_frac],
        ]
    )
    return vec, std


def describe(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(feature vector, gray std of the working image) of a frame."""
    return describe_working(working_image(pixels))
