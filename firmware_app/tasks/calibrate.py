"""Activation and confidence calibration (temperature or Platt scaling), numerically safe."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.models.manifest import Calibration

_EPS = 1e-6


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def probabilities(x: np.ndarray, activation: str, cal: Calibration, axis: int = -1) -> np.ndarray:
    """Raw (dequantized) scores -> calibrated probabilities.

    softmax: x are logits over ``axis``; sigmoid: x are independent logits; none: x are probabilities
    already (turned back into logits when a calibration must be applied).
    """
    x = x.astype(np.float32, copy=False)
    multiclass = activation == "softmax" or (activation == "none" and x.shape[axis] > 1)
    if activation == "none" and cal.method == "none":
        return np.clip(x, 0.0, 1.0)
    if multiclass:
        z = np.log(np.clip(x, _EPS, 1.0)) if activation == "none" else x
        if cal.method == "temperature":
            z = z / cal.temperature
        z = z - z.max(axis=axis, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=axis, keepdims=True)
    z = logit(x) if activation == "none" else x
    if cal.method == "temperature":
        z = z / cal.temperature
    elif cal.method == "platt":
        z = cal.a * z + cal.b
    return sigmoid(z)


def quantized_table(
    spec: TensorSpec, channels: int, activation: str, cal: Calibration
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]] | None:
    """For an int8/uint8 output of one or two channels per position ([finding] or [background, finding]):
    a table from the raw byte(s) of a position to the calibrated probability of the finding, built once, so
    a frame costs one gather instead of dequantizing and calibrating float maps.

    Returns (table, index): ``table[index(raw)]`` is the probability map of ``raw`` [..., channels]. One
    channel: 256 entries indexed by the raw byte (a lone channel is a sigmoid logit under "softmax").
    Two channels (softmax, sigmoid or probabilities, any calibration): 65536 entries indexed by the two
    bytes read as one little-endian uint16. None for float outputs or more channels.
    """
    if not spec.quantized or channels > 2:
        return None
    info = np.iinfo(spec.dtype)
    real = spec.dequantize(np.arange(info.min, info.max + 1))
    # a raw byte b (the tensor's int8/uint8 value read as uint8) -> its position in ``real``
    pos = np.arange(256, dtype=np.uint8).view(spec.dtype).astype(np.int64) - info.min
    if channels == 1:
        act = activation if activation != "softmax" else "sigmoid"
        table = probabilities(real.reshape(-1, 1), act, cal)[:, 0][pos]

        def index(raw: np.ndarray) -> np.ndarray:
            return raw[..., 0].view(np.uint8)

    else:
        pairs = np.stack(np.meshgrid(real, real, indexing="ij"), axis=-1).reshape(-1, 2)
        by_pair = probabilities(pairs, activation, cal, axis=-1)[:, 1]
        lo, hi = np.meshgrid(pos, pos, indexing="xy")  # uint16 value hi*256+lo: lo = channel 0
        table = by_pair[(lo * real.size + hi).reshape(-1)]

        def index(raw: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(raw).view("<u2")[..., 0]

    return table.astype(np.float32), index
