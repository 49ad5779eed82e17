"""Segmentation: probability map -> mask, area, centroid, contour and max probability of the finding.

One output channel is the probability of ``labels[1]``; C channels are one per label and the finding is the
non-background label with the largest area. Thresholding and contours run at the model's resolution; only
the final mask is scaled to the frame (nearest neighbour) and contours are scaled as coordinates.
"""

from __future__ import annotations

import cv2
import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import Manifest
from firmware_app.tasks.calibrate import probabilities
from firmware_app.types import Result


class Segmenter:
    def __init__(self, manifest: Manifest, outputs: list[TensorSpec]) -> None:
        self.m = manifest
        spec = outputs[0]
        if len(spec.shape) != 4 or spec.shape[0] != 1:
            raise BadModel(f"segmentation output shape {list(spec.shape)} is not [1, H, W, C]")
        channels = spec.shape[3]
        if channels not in (1, len(manifest.labels)):
            raise BadModel(
                f"segmentation output has {channels} channels; manifest labels {list(manifest.labels)} "
                f"need 1 (probability of {manifest.labels[1]!r}) or {len(manifest.labels)}"
            )
        self.spec = spec
        self.channels = channels
        self.out_hw = (spec.shape[1], spec.shape[2])
        self._table, self._score = self._quantized_path()

    def _quantized_path(self):
        """For an int8/uint8 output with one finding label: a table from an integer score of the raw output
        to the calibrated probability, built once, so a frame costs an integer compare, not a float map.

        Returns (table, score_fn) or (None, None) when the probability is not a monotone function of one
        integer score (float outputs, several finding labels, calibrated multi-channel probabilities).
        """
        spec, cal, act = self.spec, self.m.calibration, self.m.activation
        if not spec.quantized or self.channels > 2:
            return None, None
        info = np.iinfo(spec.dtype)
        values = np.arange(info.min, info.max + 1)
        span = info.max - info.min
        if self.channels == 1:
            real = spec.dequantize(values).reshape(-1, 1)
            table = probabilities(real, act if act != "softmax" else "sigmoid", cal)[:, 0]

            def score(raw):
                return raw[0, ..., 0].astype(np.int32) - info.min

        elif act == "softmax":  # p1 = softmax over (l0, l1) = a function of l1 - l0 alone (one scale)
            diff = np.arange(-span, span + 1, dtype=np.float32) * np.float32(spec.scale)
            logits = np.stack([np.zeros_like(diff), diff], axis=-1)
            table = probabilities(logits, "softmax", cal)[:, 1]

            def score(raw):
                return raw[0, ..., 1].astype(np.int32) - raw[0, ..., 0] + span

        elif cal.method == "none":  # the model's own probabilities: channel 1 is the finding
            table = np.clip(spec.dequantize(values), 0.0, 1.0)

            def score(raw):
                return raw[0, ..., 1].astype(np.int32) - info.min

        else:
            return None, None
        table = table.astype(np.float64)
        if np.any(np.diff(table) < 0):
            return None, None
        return table, score

    def probability_maps(self, raw: np.ndarray) -> np.ndarray:
        """-> float32 [H, W, K]: calibrated probability of each non-background label (K = 1 for 1 or 2 labels)."""
        x = self.spec.dequantize(raw[0])
        if self.channels == 1:
            return probabilities(
                x, self.m.activation if self.m.activation != "softmax" else "sigmoid", self.m.calibration
            )
        p = probabilities(x, self.m.activation, self.m.calibration, axis=-1)
        return p[..., 1:]

    def __call__(
        self, raw_outputs: list[np.ndarray], frame_id: int, frame_size: tuple[int, int], threshold: float
    ) -> Result:
        if self._table is not None:
            score = self._score(raw_outputs[0])
            cut = int(np.searchsorted(self._table, threshold, side="right"))  # first score with p > threshold
            small = (score >= cut).view(np.uint8)
            k, top = 0, float(self._table[int(score.max())])
            max_per_label = {self.m.labels[1]: top}
        else:
            probs = self.probability_maps(raw_outputs[0])
            masks = probs > threshold  # a tie (p = 0.5 with threshold 0.5) is background, as argmax
            k = int(np.argmax(masks.reshape(-1, masks.shape[-1]).sum(axis=0))) if masks.shape[-1] > 1 else 0
            small = np.ascontiguousarray(masks[..., k]).view(np.uint8)
            max_per_label = {self.m.labels[i + 1]: float(probs[..., i].max()) for i in range(probs.shape[-1])}
            top = max_per_label[self.m.labels[k + 1]]
        label = self.m.labels[k + 1]
        fw, fh = frame_size
        mh, mw = self.out_hw
        if not small.any():
            return Result(
                frame_id=frame_id,
                task="segmentation",
                label=None,
                confidence=top,
                alert=False,
                probabilities=max_per_label,
                mask=np.zeros((fh, fw), np.uint8),
                area_fraction=0.0,
            )
        sx, sy = fw / mw, fh / mh
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        scale = np.array([sx, sy], np.float32)
        offset = np.array([sx / 2, sy / 2], np.float32)  # pixel centres
        frame_contours = tuple(
            (c.reshape(-1, 2).astype(np.float32) * scale + offset).astype(np.int32) for c in contours
        )
        mask = cv2.resize(small, (fw, fh), interpolation=cv2.INTER_NEAREST)
        mom = cv2.moments(small, binaryImage=True)
        centroid = ((mom["m10"] / mom["m00"] + 0.5) * sx, (mom["m01"] / mom["m00"] + 0.5) * sy)
        confidence = top  # the highest probability lies inside the mask whenever the mask is not empty
        return Result(
            frame_id=frame_id,
            task="segmentation",
            label=label,
            confidence=confidence,
            alert=True,  # the mask holds pixels above the threshold in force
            probabilities=max_per_label,
            mask=mask,
            contours=frame_contours,
            centroid=(float(centroid[0]), float(centroid[1])),
            area_fraction=float(small.mean()),
        )
