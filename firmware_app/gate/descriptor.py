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
- colour: mean chroma (max - min of B, G, R; /255) and the fraction of pixels with chroma above ``CHROMA_MIN`` (16)
  (a gray-only model that meets colour Doppler, a photo, a colour test pattern); 0 for a gray frame.

``BLANK_STD``: a working image whose gray levels have a standard deviation below it carries no picture
("blank frame"), whatever the model's reference data look like.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

WORK_W, WORK_H = 320, 240
BLANK_STD = 2.0  # gray levels
_MAX_DIRECT = 4  # up to this many times the working size, one box average; above, a stride first
_GRAD_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
_LEVELS = 4
_GRID = 4
CHROMA_MIN = 16  # a pixel is coloured when max - min of its B, G, R exceeds this (gray levels)

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

# where each group of features lies in the vector
_HIST, _DIFF, _GRAD, _LMEAN, _LGRAD = 0, 20, 28, 37, 53
_CHROMA = N_FEATURES - 2

# the 256-level counts -> [16 bin counts, sum of levels, sum of squared levels, black, white]: integers
# below 2**53 (at most 76800 * 255**2), so each sum is exact whatever the order of the additions
_LEVEL_SUMS = np.zeros((256, 20))
_LEVEL_SUMS[np.arange(256), np.arange(256) >> 4] = 1.0
_LEVEL_SUMS[:, 16] = np.arange(256)
_LEVEL_SUMS[:, 17] = np.arange(256) ** 2
_LEVEL_SUMS[0, 18] = _LEVEL_SUMS[255, 19] = 1.0
_GRAD_STARTS = np.asarray(_GRAD_EDGES[:-1], np.intp)  # the log-spaced bins as runs of the 256 levels
# the pyramid's sizes (each level a 2x box average of the one above) and, per level, 1 / the number of
# neighbour pairs: cv2.mean is the exact integer sum times this reciprocal, so is the L1 norm times it
_SIZES = tuple((WORK_W >> k, WORK_H >> k) for k in range(_LEVELS))
_INV_PAIRS = tuple(1.0 / ((w - 1) * (h - 1)) for w, h in _SIZES)
_HALF_W, _HALF_H = _SIZES[1]
# zero fractions for which _counts skips the zeros (measured: faster from about 1/4 to nearly all zeros)
_MASK_ZEROS = (0.25, 0.95)
_CH0, _BINS, _RANGE = [0], [256], [0, 256]  # calcHist: channel 0, 256 bins over [0, 256)


def _area_terms(src: int, dst: int) -> list[tuple[int, int, float]]:
    """OpenCV's INTER_AREA terms for ``src`` -> ``dst`` samples, (output, source, float32 weight) in
    OpenCV's order: ``computeResizeAreaTab``, the same double arithmetic and float32 rounding."""
    scale = 1.0 / (dst / src)  # cv::resize: inv_scale = dsize / ssize, scale = 1 / inv_scale
    terms = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s2 = min(math.floor(f2), src - 1)
        s1 = min(math.ceil(f1), s2)
        if s1 - f1 > 1e-3:
            terms.append((d, s1 - 1, float(np.float32((s1 - f1) / cell))))
        terms += [(d, s, float(np.float32(1.0 / cell))) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            terms.append((d, s2, float(np.float32(min(min(f2 - s2, 1.0), cell) / cell))))
    return terms


def _area_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """``_area_terms`` as (source index, weight) arrays of shape (terms, dst): column ``d`` lists the
    terms of output ``d`` in OpenCV's order, padded at the end with weight 0."""
    columns: list[list[tuple[int, float]]] = [[] for _ in range(dst)]
    for d, s, w in _area_terms(src, dst):
        columns[d].append((s, w))
    n = max(len(c) for c in columns)
    index = np.zeros((n, dst), np.intp)
    weight = np.zeros((n, dst), np.float32)
    for d, terms in enumerate(columns):
        for k, (s, w) in enumerate(terms):
            index[k, d], weight[k, d] = s, w
    return index, weight


# The 4x4 layout of the half-resolution gradient is cv2.resize(float32 grad, (4, 4), INTER_AREA), which
# is a latency-bound scalar loop in OpenCV (~65 us); here the very same float32 products and sums, in the
# same order, vectorised over rows (bit-identical to x86-64 OpenCV, where the bundled gates were fitted:
# tests/test_gate_exact.py). OpenCV sums per source row ``buf[d] += S[s] * w`` over the terms of each
# output column, then per output row ``sum += w * buf`` over the source rows; a padded term adds +0.0,
# which changes no sum. numpy multiplies and adds separately, never fused, on every machine.
_GW, _GH = _HALF_W - 1, _HALF_H - 1  # the gradient image of the half-resolution level
_X_INDEX, _X_WEIGHT = _area_weights(_GW, _GRID)
_Y_INDEX, _Y_WEIGHT = _area_weights(_GH, _GRID)
_X_TAKE = _X_INDEX.ravel()
_Y_TAKE = _Y_INDEX.ravel()
_X_W = np.ascontiguousarray(np.broadcast_to(_X_WEIGHT[:, :, None], (*_X_WEIGHT.shape, _GH)))
_Y_W = np.ascontiguousarray(np.broadcast_to(_Y_WEIGHT[:, :, None], (*_Y_WEIGHT.shape, _GRID)))


def _layout_grad(grad: np.ndarray) -> np.ndarray:
    """cv2.resize(grad.astype(np.float32), (_GRID, _GRID), interpolation=cv2.INTER_AREA), bit for bit."""
    cols = cv2.transpose(grad).astype(np.float32)  # row s = source column s
    terms = cols[_X_TAKE].reshape(_X_W.shape)  # (term, output column, source row)
    terms *= _X_W
    rows = np.add.reduce(terms, axis=0).T  # (source row, output column): OpenCV's buf per source row
    terms = rows[_Y_TAKE].reshape(_Y_W.shape)  # (term, output row, output column)
    terms *= _Y_W
    return np.add.reduce(terms, axis=0)


def _counts(img: np.ndarray) -> np.ndarray:
    """The 256-level histogram of a uint8 image: exact counts (float32, as cv2.calcHist gives them).

    A frame with black around the picture (an ultrasound fan, a letterbox) has runs of zeros mixed with
    other levels in every row, which makes calcHist's one-table count slower per pixel (an ultrasound
    phantom: 77 against 33 us for noise); counting only the nonzero pixels (the image is its own mask:
    55 us) and the zeros with countNonZero gives the same counts.
    """
    n = img.size
    zeros = n - cv2.countNonZero(img)
    if _MASK_ZEROS[0] * n <= zeros <= _MASK_ZEROS[1] * n:
        counts = cv2.calcHist([img], _CH0, img, _BINS, _RANGE).ravel()
        counts[0] = zeros
        return counts
    return cv2.calcHist([img], _CH0, None, _BINS, _RANGE).ravel()


# A gray frame whose size is no integer multiple of the working size takes OpenCV's general area resize,
# a scalar loop whose sums wait on one another (960x540: ~0.7 ms, 1920x1080: ~3.2 ms). Cut into
# _ROW_BANDS bands of rows laid side by side as the channels of one image, the same resize runs that many
# independent sums at a time with, per channel, the very same arithmetic (960x540 -0.13 ms, 1920x1080
# -1.3 ms); exact when each band's terms are the whole frame's, shifted, which _banded checks once a size.
_ROW_BANDS = 4
_DBL_EPSILON = 2.220446049250313e-16


@functools.lru_cache(maxsize=64)
def _banded(w: int, h: int) -> bool:
    """Whether ``working_image`` resizes a ``w`` x ``h`` gray frame as row bands (see above)."""
    sx, sy = 1.0 / (WORK_W / w), 1.0 / (WORK_H / h)  # cv::resize's scales; integer ones: its fast path
    if abs(sx - round(sx)) < _DBL_EPSILON and abs(sy - round(sy)) < _DBL_EPSILON:
        return False
    if h % _ROW_BANDS or WORK_H % _ROW_BANDS or sx < 1 or sy < 1:
        return False
    q, r = h // _ROW_BANDS, WORK_H // _ROW_BANDS
    band = _area_terms(q, r)
    return _area_terms(h, WORK_H) == [
        (d + c * r, s + c * q, a) for c in range(_ROW_BANDS) for d, s, a in band
    ]


def working_image(pixels: np.ndarray) -> np.ndarray:
    """uint8 gray HxW or BGR HxWx3 (BGRA and HxWx1 accepted) -> the same at WORK_W x WORK_H."""
    px = np.asarray(pixels)
    if px.ndim == 3:
        px = px[:, :, 0] if px.shape[2] == 1 else px[:, :, :3]
    if px.ndim not in (2, 3) or px.shape[0] < 1 or px.shape[1] < 1:
        raise ValueError(f"gate: expected an HxW or HxWx3 image, got shape {px.shape}")
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    h, w = px.shape[:2]
    if w == WORK_W and h == WORK_H:
        return px
    k = max(1, min(w // (_MAX_DIRECT * WORK_W), h // (_MAX_DIRECT * WORK_H)))
    if k > 1:
        px = px[::k, ::k]
        h, w = px.shape[:2]
    px = np.ascontiguousarray(px)
    if w < WORK_W or h < WORK_H:
        return cv2.resize(px, (WORK_W, WORK_H), interpolation=cv2.INTER_LINEAR)
    if px.ndim == 2 and _banded(w, h):
        q = h // _ROW_BANDS
        bands = cv2.merge([px[c * q : (c + 1) * q] for c in range(_ROW_BANDS)])
        small = cv2.resize(bands, (WORK_W, WORK_H // _ROW_BANDS), interpolation=cv2.INTER_AREA)
        return cv2.vconcat(cv2.split(small))
    return cv2.resize(px, (WORK_W, WORK_H), interpolation=cv2.INTER_AREA)


def describe_working(work: np.ndarray) -> tuple[np.ndarray, float]:
    """(feature vector float64[N_FEATURES], gray std) of a working image (see ``working_image``)."""
    vec = np.empty(N_FEATURES)
    if work.ndim == 3:
        gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY)
        half = cv2.resize(work, _SIZES[1], interpolation=cv2.INTER_AREA)
        b, g, r = cv2.split(half)  # OpenCV per-channel max/min: ~10x faster than numpy over axis 2
        chroma = cv2.subtract(cv2.max(cv2.max(b, g), r), cv2.min(cv2.min(b, g), r))
        vec[_CHROMA] = float(cv2.mean(chroma)[0]) / 255.0
        vec[_CHROMA + 1] = cv2.countNonZero(cv2.compare(chroma, CHROMA_MIN, cv2.CMP_GT)) / chroma.size
    else:
        gray = work
        vec[_CHROMA:] = 0.0

    # gray levels: 16-bin histogram, black, white, mean, std: exact integer sums of the 256-level counts
    n = gray.size
    sums = _counts(gray) @ _LEVEL_SUMS
    hist = vec[_HIST : _HIST + 16]
    np.divide(sums[:16], n, out=hist)
    np.sqrt(hist, out=hist)
    s1, s2, black, white = sums[16:].tolist()
    s1, s2 = int(s1), int(s2)
    std = math.sqrt((n * s2 - s1 * s1) / (n * n))  # exact rational variance, rounded once
    vec[16], vec[17], vec[18], vec[19] = black / n, white / n, s1 / n / 255.0, std / 255.0

    # texture: mean |neighbour difference| at four scales (an L1 norm: no difference image is made),
    # except at 1/2, whose differences make the gradient magnitude
    area = cv2.INTER_AREA
    half = cv2.resize(gray, _SIZES[1], interpolation=area)
    quarter = cv2.resize(half, _SIZES[2], interpolation=area)
    eighth = cv2.resize(quarter, _SIZES[3], interpolation=area)
    diff = vec[_DIFF : _DIFF + 2 * _LEVELS]
    for k, g in ((0, gray), (2, quarter), (3, eighth)):
        base, inv = g[:-1, :-1], _INV_PAIRS[k]
        diff[2 * k] = cv2.norm(g[:-1, 1:], base, cv2.NORM_L1) * inv
        diff[2 * k + 1] = cv2.norm(g[1:, :-1], base, cv2.NORM_L1) * inv
    base = half[:-1, :-1]
    dx = cv2.absdiff(half[:-1, 1:], base)
    dy = cv2.absdiff(half[1:, :-1], base)
    diff[2], diff[3] = cv2.sumElems(dx)[0] * _INV_PAIRS[1], cv2.sumElems(dy)[0] * _INV_PAIRS[1]
    np.log1p(diff, out=diff)
    grad = cv2.add(dx, dy)

    # gradient-magnitude histogram: the 256-level counts summed over the log-spaced bins (exact integers)
    grad_hist = vec[_GRAD : _GRAD + len(_GRAD_STARTS)]
    np.add.reduceat(_counts(grad), _GRAD_STARTS, dtype=np.float64, out=grad_hist)
    grad_hist /= grad.size
    np.sqrt(grad_hist, out=grad_hist)

    # layout: 4x4 mean brightness and log1p gradient magnitude
    lm = cv2.resize(eighth, (_GRID, _GRID), interpolation=area).ravel()
    np.divide(lm, 255.0, out=vec[_LMEAN : _LMEAN + _GRID * _GRID])
    np.log1p(_layout_grad(grad).ravel(), out=vec[_LGRAD : _LGRAD + _GRID * _GRID], dtype=np.float64)
    return vec, std


def describe(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(feature vector, gray std of the working image) of a frame."""
    return describe_working(working_image(pixels))
