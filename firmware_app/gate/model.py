"""The gate's statistical model: how far a frame's descriptor lies from the model's reference frames.

Fit (``fit_gate``, from the descriptors of the reference frames, nothing else):

1. Standardise every feature with the reference mean and standard deviation; the deviation is floored at
   ``SD_FLOOR`` (features are in units of order one, see ``descriptor``), so a feature that is (near)
   constant in the reference data (colour in gray phantoms, white pixels) counts, but a tiny change of it
   cannot dominate the score.
2. Covariance of the standardised features with Ledoit-Wolf shrinkage towards a scaled identity (the
   weight from the data, at least ``MIN_SHRINK``): well conditioned with a few hundred frames for ~70
   features, and deterministic.
3. Two statistics per frame: ``D``, the Mahalanobis distance divided by sqrt(number of features) (many
   features a little off: a different scanner, a screenshot), and ``M``, the largest single |z| (one
   feature far off: colour, saturated text, a blank border). Each is divided by its own
   ``REF_QUANTILE`` quantile over the reference frames, and the score is the larger of the two: a union
   of two tests on one scale, about 1 at the edge of the reference data.

The operating point (``threshold``) is chosen on held-out validation frames by ``build.choose_threshold``.
The gate file holds plain arrays (``np.load(allow_pickle=False)``): ``format``, ``feature_names``,
``mean``, ``scale`` (floored sd), ``precision`` (inverse shrunk covariance), ``d_ref``, ``m_ref``,
``shrinkage``, ``blank_std``.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware_app.errors import BadModel
from firmware_app.gate.descriptor import BLANK_STD, FEATURE_NAMES, N_FEATURES, describe

FORMAT = 1
METHOD = "descriptor-mahalanobis-v1"
SD_FLOOR = 0.01
MIN_SHRINK = 0.05
REF_QUANTILE = 0.99
REASON_UNLIKE = "unlike training data"
REASON_BLANK = "blank frame"
_ARRAYS = (
    "format",
    "feature_names",
    "mean",
    "scale",
    "precision",
    "d_ref",
    "m_ref",
    "shrinkage",
    "blank_std",
)


@dataclass(frozen=True)
class GateVerdict:
    score: float  # larger = more unlike the reference data
    threshold: float  # operating point
    flagged: bool  # True => the model does not apply to this frame
    reason: str | None  # None when not flagged; else "unlike training data" or "blank frame"


@dataclass(frozen=True)
class GateParams:
    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    d_ref: float
    m_ref: float
    shrinkage: float
    blank_std: float = BLANK_STD

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "format": np.array(FORMAT, np.int64),
            "feature_names": np.array(FEATURE_NAMES),
            "mean": self.mean,
            "scale": self.scale,
            "precision": self.precision,
            "d_ref": np.array(self.d_ref),
            "m_ref": np.array(self.m_ref),
            "shrinkage": np.array(self.shrinkage),
            "blank_std": np.array(self.blank_std),
        }


def ledoit_wolf(z: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance of rows ``z`` (already centred) towards mu*I, and the shrinkage weight."""
    n, d = z.shape
    s = z.T @ z / n
    mu = float(np.trace(s)) / d
    delta = float(((s - mu * np.eye(d)) ** 2).sum())
    # sum over the rows of ||r r^T - S||_F^2, expanded so that no d x d matrix per row is formed
    rr = (z * z).sum(axis=1)
    beta = float((rr**2).sum() - 2 * np.einsum("ij,jk,ik->", z, s, z) + n * (s**2).sum()) / n**2
    a = min(1.0, beta / delta) if delta > 0 else 1.0
    a = max(a, MIN_SHRINK)
    return (1.0 - a) * s + a * mu * np.eye(d), a


def _raw_stats(params: GateParams, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, M) of descriptor rows, before division by the reference quantiles."""
    z = (np.atleast_2d(feats) - params.mean) / params.scale
    d2 = np.einsum("ij,jk,ik->i", z, params.precision, z)
    return np.sqrt(np.maximum(d2, 0.0) / z.shape[1]), np.abs(z).max(axis=1)


def fit_gate(ref_feats: np.ndarray) -> GateParams:
    """Gate parameters from the descriptors of the reference frames (rows)."""
    ref_feats = np.asarray(ref_feats, np.float64)
    if ref_feats.ndim != 2 or ref_feats.shape[1] != N_FEATURES or len(ref_feats) < 20:
        raise ValueError(f"need at least 20 reference descriptors of {N_FEATURES} features")
    mean = ref_feats.mean(axis=0)
    scale = np.maximum(ref_feats.std(axis=0), SD_FLOOR)
    z = (ref_feats - mean) / scale
    cov, a = ledoit_wolf(z - z.mean(axis=0))
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    tmp = GateParams(mean, scale, precision, 1.0, 1.0, a)
    d, m = _raw_stats(tmp, ref_feats)
    return GateParams(
        mean, scale, precision, float(np.quantile(d, REF_QUANTILE)), float(np.quantile(m, REF_QUANTILE)), a
    )


def scores(params: GateParams, feats: np.ndarray) -> np.ndarray:
    """Gate scores of descriptor rows."""
    d, m = _raw_stats(params, feats)
    return np.maximum(d / params.d_ref, m / params.m_ref)


def load_params(path: Path) -> GateParams:
    """Read a gate file; BadModel names it and says what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _ARRAYS if k not in npz.files]
            if missing:
                raise BadModel(f"{path}: not a gate file (no {', '.join(missing)})")
            arr = {k: npz[k] for k in _ARRAYS}
    except FileNotFoundError:
        raise BadModel(f"{path}: gate file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise BadModel(f"{path}: unreadable gate file ({exc})") from None
    if int(arr["format"]) != FORMAT:
        raise BadModel(f"{path}: gate file format {int(arr['format'])}, this firmware reads {FORMAT}")
    if tuple(str(s) for s in arr["feature_names"]) != FEATURE_NAMES:
        raise BadModel(f"{path}: gate file made for another descriptor (feature names differ)")
    d = N_FEATURES
    shapes = {"mean": (d,), "scale": (d,), "precision": (d, d)}
    for k, shape in shapes.items():
        if arr[k].shape != shape or not np.issubdtype(arr[k].dtype, np.floating):
            raise BadModel(f"{path}: gate array {k} is {arr[k].dtype}{list(arr[k].shape)}, expected {shape}")
    values = [arr[k] for k in ("mean", "scale", "precision", "d_ref", "m_ref", "shrinkage", "blank_std")]
    if not all(np.isfinite(v).all() for v in values):
        raise BadModel(f"{path}: gate file holds NaN or infinite values")
    if not (arr["scale"] > 0).all() or float(arr["d_ref"]) <= 0 or float(arr["m_ref"]) <= 0:
        raise BadModel(f"{path}: gate file has non-positive scales")
    return GateParams(
        arr["mean"].astype(np.float64),
        arr["scale"].astype(np.float64),
        arr["precision"].astype(np.float64),
        float(arr["d_ref"]),
        float(arr["m_ref"]),
        float(arr["shrinkage"]),
        float(arr["blank_std"]),
    )


class InputGate:
    """Says per frame whether the model applies: ``check(pixels) -> GateVerdict``."""

    def __init__(self, params: GateParams, threshold: float, path: Path | None = None) -> None:
        self.params = params
        self.threshold = float(threshold)
        self.path = path
        # what the per-frame score needs, taken once: contiguous float64 arrays and plain floats
        self._mean = np.ascontiguousarray(params.mean, np.float64)
        self._scale = np.ascontiguousarray(params.scale, np.float64)
        self._precision = np.ascontiguousarray(params.precision, np.float64)
        self._d_ref, self._m_ref = float(params.d_ref), float(params.m_ref)

    @classmethod
    def from_manifest(cls, manifest: Any) -> InputGate | None:
        """The gate of a model (None when its manifest has no ``[gate]`` table); BadModel names a bad file."""
        table = getattr(manifest, "gate", None)
        if table is None:
            return None
        folder = Path(manifest.path) if manifest.path is not None else Path(".")
        path = folder / table["file"]
        return cls(load_params(path), float(table["threshold"]), path)

    def score(self, pixels: np.ndarray) -> tuple[float, float]:
        """(score, gray std of the working image): ``scores`` of one frame, without its batch overhead."""
        feats, std = describe(pixels)
        z = np.subtract(feats, self._mean, out=feats)  # the descriptor is this call's own: reused in place
        z /= self._scale
        d2 = float(z @ (self._precision @ z))
        d = math.sqrt(max(d2, 0.0) / z.shape[0]) / self._d_ref
        m = float(np.abs(z, out=z).max()) / self._m_ref
        return max(d, m), std  # d first: NaN stays NaN, as np.maximum keeps it

    def check(self, pixels: np.ndarray) -> GateVerdict:
        s, std = self.score(pixels)
        if std < self.params.blank_std:
            return GateVerdict(s, self.threshold, True, REASON_BLANK)
        if not s <= self.threshold:  # NaN is flagged too
            return GateVerdict(s, self.threshold, True, REASON_UNLIKE)
        return GateVerdict(s, self.threshold, False, None)
