"""Segmentation: probability map -> mask, area, centroid, contour and the finding's confidence.

One output channel is the probability of ``labels[1]``; C channels are one per label and the finding is the
non-background label with the largest area. Everything runs at the model's resolution: the mask stays there
(``Result.mask_at`` stretches it when a full-size copy is wanted), its outline polygons and centroid are
scaled to frame coordinates as numbers. Shapes: one ``Mask`` (with centroid and area fraction), then one
``Polygon`` per region.

The mask is the pixels above the manifest's ``[finding] pixel_threshold``. The *finding's* confidence is not
a pixel's: it is the calibrated probability that the finding is present at all,
``sigmoid(intercept + coef . features)`` over three features of the probability map (``finding_features``:
the logit of the highest pixel probability, the log of the mask's area fraction, the logit of the mean
probability inside the mask), fit on held-out data by ``tools/fit_finding.py``. A model without that fit
reports the highest pixel probability (uncalibrated). The threshold in force applies to that confidence.
"""

from __future__ import annotations

import cv2
import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import FindingRules, Manifest
from firmware_app.shapes import Mask, Polygon
from firmware_app.tasks import Task, register
from firmware_app.tasks.calibrate import logit, probabilities, quantized_table, sigmoid
from firmware_app.types import Result

AREA_EPS = 1e-4  # the area fraction's floor in log_area (an empty mask)


def finding_features(
    prob: np.ndarray, mask: np.ndarray, top: float | None = None, n: int | None = None
) -> np.ndarray:
    """[max_logit, log_area, mean_logit] of a probability map and its mask (FINDING_FEATURES); ``top``
    (the map's maximum) and ``n`` (the mask's pixel count) when the caller has them already."""
    top = float(prob.max()) if top is None else top
    n = int(np.count_nonzero(mask)) if n is None else n
    mean_in = float(prob[mask.view(bool)].mean()) if n else top
    area = n / mask.size
    return np.array(
        [float(logit(np.float64(top))), np.log(area + AREA_EPS), float(logit(np.float64(mean_in)))]
    )


def finding_confidence(rules: FindingRules, prob: np.ndarray, mask: np.ndarray, top: float, n: int) -> float:
    """The calibrated probability that the finding is present (or the top pixel's without a fit)."""
    if rules.coef is None:
        return top
    features = finding_features(prob, mask, top, n)
    z = rules.intercept + float(np.dot(rules.coef, features))
    lo, hi = rules.confidence_range
    return min(max(float(sigmoid(np.float64(z))), lo), hi)


@register("segmentation")
class Segmenter(Task):
    metrics = "firmware_app.validate:_Segmentation"  # what `validate` measures on a labelled set
    finding_calibration = True  # [finding] features / coef: the finding-level confidence fit

    @classmethod
    def check_manifest(cls, data: dict, bad) -> None:
        if len(data["output"]["labels"]) < 2:
            raise bad("[output] labels of a segmentation model need at least [background, finding]")

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
        # int8/uint8 with one finding label: one table lookup per pixel (see calibrate.quantized_table)
        fast = quantized_table(spec, channels, manifest.activation, manifest.calibration)
        self._table, self._index = fast if fast is not None else (None, None)

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
        cut = self.m.finding.pixel_threshold
        if self._table is not None:
            prob = self._table[self._index(raw_outputs[0][0])]
            small = (prob > cut).view(np.uint8)
            k, top = 0, float(prob.max())
            max_per_label = {self.m.labels[1]: top}
        else:
            probs = self.probability_maps(raw_outputs[0])
            masks = probs > cut  # a tie (p = 0.5 with threshold 0.5) is background, as argmax
            k = int(np.argmax(masks.reshape(-1, masks.shape[-1]).sum(axis=0))) if masks.shape[-1] > 1 else 0
            small = np.ascontiguousarray(masks[..., k]).view(np.uint8)
            max_per_label = {self.m.labels[i + 1]: float(probs[..., i].max()) for i in range(probs.shape[-1])}
            prob, top = probs[..., k], max_per_label[self.m.labels[k + 1]]
        mom = cv2.moments(small, binaryImage=True)
        confidence = finding_confidence(self.m.finding, prob, small, top, int(mom["m00"]))
        label = self.m.labels[k + 1]
        fw, fh = frame_size
        mh, mw = self.out_hw
        if mom["m00"] == 0:
            return Result(
                frame_id=frame_id,
                task="segmentation",
                label=None,
                confidence=confidence,
                alert=False,
                probabilities=max_per_label,
                shapes=(Mask(small, None, 0.0),),
            )
        sx, sy = fw / mw, fh / mh
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        scale = np.array([sx, sy], np.float32)
        offset = np.array([sx / 2, sy / 2], np.float32)  # pixel centres
        outlines = tuple(
            Polygon((c.reshape(-1, 2).astype(np.float32) * scale + offset).astype(np.int32)) for c in contours
        )
        centroid = ((mom["m10"] / mom["m00"] + 0.5) * sx, (mom["m01"] / mom["m00"] + 0.5) * sy)
        candidate = confidence >= threshold
        return Result(
            frame_id=frame_id,
            task="segmentation",
            label=label if candidate else None,
            confidence=confidence,
            alert=candidate,  # the finding rules (size, persistence) decide whether it alerts
            probabilities=max_per_label,
            shapes=(
                Mask(small, (float(centroid[0]), float(centroid[1])), float(mom["m00"]) / small.size),
                *outlines,
            ),
        )
