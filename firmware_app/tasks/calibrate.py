"""Activation and confidence calibration (temperature or Platt scaling), numerically safe."""

from __future__ import annotations

import numpy as np

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
