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

import math
from collections.abc import Callable

import cv2
import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import FindingRules, Manifest
from firmware_app.shapes import Mask, Polygon
from firmware_app.tasks import Task, register
from firmware_app.tasks.calibrate import _EPS, logit, probabilities, quantized_table
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


def _logit(p: float) -> float:
    """``calibrate.logit`` of one number, in scalar arithmetic (the same IEEE operations)."""
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p) - math.log1p(-p)


def finding_confidence(rules: FindingRules, top: float, mean_in: float, area: float) -> float:
    """The calibrated probability that the finding is present (or the top pixel's without a fit), from the
    map's maximum, the mean probability inside the mask (the maximum for an empty one) and the mask's area
    fraction: ``finding_features`` and its dot product in scalar arithmetic (a frame's three numbers cost
    less as floats than as arrays; tests/test_tasks.py holds the two equal)."""
    if rules.coef is None:
        return top
    c0, c1, c2 = rules.coef
    z = rules.intercept + (c0 * _logit(top) + c1 * math.log(area + AREA_EPS) + c2 * _logit(mean_in))
    lo, hi = rules.confidence_range
    return min(max(1.0 / (1.0 + math.exp(-min(max(z, -60.0), 60.0))), lo), hi)


def mask_rule(
    table: np.ndarray, channels: int, dtype: np.dtype, cut: float
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The mask ``table[index] > cut`` computed from the index's raw bytes, when the table allows it: one
    channel, ``q >= t`` for the byte's value q; two, ``q1 - q0 >= c`` (the finding's value minus the
    background's: a softmax over two scores, calibrated or not). Checked over every index of the table,
    so it is the table's mask exactly; None when no such threshold exists (or nothing is ever above ``cut``).
    """
    above = table > cut
    if not above.any():
        return None
    value = np.arange(256, dtype=np.uint8).view(dtype).astype(np.int64)  # a byte's value, in its order
    if channels == 1:
        t = int(value[above].min())
        if not np.array_equal(above, value >= t):
            return None
        return lambda index: index.view(dtype) >= t
    i = np.arange(65536)
    diff = value[i >> 8] - value[i & 0xFF]  # index = q1 byte * 256 + q0 byte (calibrate.quantized_table)
    c = int(diff[above].min())
    if not np.array_equal(above, diff >= c):
        return None
    flip = np.uint16(0x8080 if np.dtype(dtype) == np.int8 else 0)  # int8: offset binary keeps the order

    def rule(index: np.ndarray) -> np.ndarray:
        u = index ^ flip  # both bytes as unsigned values in their order: q + 128 for int8
        hi = u >> 8
        u &= 0xFF
        if c >= 0:
            u += c
        else:
            hi += -c
        return hi >= u

    return rule


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
        self._finite = self._table is not None and bool(np.isfinite(self._table).all())
        # the mask straight from the raw bytes (see mask_rule); the map's probabilities are then looked up in
        # the mask's bounding box only. After an empty mask the next frame gathers the whole map first (an
        # empty mask needs the map's maximum): the same figures either way, the cheaper order for each
        self._rule = None
        if self._finite:
            self._rule = mask_rule(self._table, channels, spec.dtype, manifest.finding.pixel_threshold)
        self._last_empty = False
        # (frame size, each map column's then row's frame coordinate, a point's offsets into them)
        self._outline: tuple = (None, None, None)

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
        table, prob, index = self._table, None, None
        if table is not None:
            index = self._index(raw_outputs[0][0])
            if self._rule is not None and not self._last_empty:
                small = self._rule(index).view(np.uint8)
            else:
                prob = table.take(index)
                small = (prob > cut).view(np.uint8)
            k, top = 0, None  # the map's maximum: read inside the mask when it has one
        else:
            probs = self.probability_maps(raw_outputs[0])
            masks = probs > cut  # a tie (p = 0.5 with threshold 0.5) is background, as argmax
            k = int(np.argmax(masks.reshape(-1, masks.shape[-1]).sum(axis=0))) if masks.shape[-1] > 1 else 0
            small = np.ascontiguousarray(masks[..., k]).view(np.uint8)
            max_per_label = {self.m.labels[i + 1]: float(probs[..., i].max()) for i in range(probs.shape[-1])}
            prob, top = probs[..., k], max_per_label[self.m.labels[k + 1]]
        n = cv2.countNonZero(small)
        self._last_empty = n == 0
        if n == 0:
            if top is None:
                top = float(np.maximum.reduce(table.take(index) if prob is None else prob, axis=None))
            confidence = finding_confidence(self.m.finding, top, top, 0.0)
            return Result(
                frame_id=frame_id,
                task="segmentation",
                label=None,
                confidence=confidence,
                alert=False,
                probabilities={self.m.labels[1]: top} if table is not None else max_per_label,
                shapes=(Mask(small, None, 0.0),),
            )
        # everything else is read inside the mask's bounding box: the same pixels, in the same order
        x, y, w, h = cv2.boundingRect(small)
        region = small[y : y + h, x : x + w]
        box = prob[y : y + h, x : x + w] if prob is not None else table.take(index[y : y + h, x : x + w])
        inside = box[region.view(bool)]  # = prob[mask], element for element
        if top is None:
            # every pixel outside the mask is <= cut < every pixel inside (the table is finite): the map's
            # maximum is the mask's (no rule, as for a table that is not finite: prob is the whole map)
            top = float(np.maximum.reduce(inside if self._finite else prob, axis=None))
        total = np.add.reduce(inside)
        mean_in = float(total.dtype.type(total / n))  # = ndarray.mean() (float32 sum, then / n)
        confidence = finding_confidence(self.m.finding, top, mean_in, n / small.size)
        max_per_label = {self.m.labels[1]: top} if table is not None else max_per_label
        # moments of the box, moved to the frame's origin: integer sums, exact in float64
        mom = cv2.moments(region, binaryImage=True)
        m10, m01 = mom["m10"] + x * n, mom["m01"] + y * n
        fw, fh = frame_size
        mh, mw = self.out_hw
        sx, sy = fw / mw, fh / mh
        centroid = ((m10 / n + 0.5) * sx, (m01 / n + 0.5) * sy)
        candidate = confidence >= threshold
        return Result(
            frame_id=frame_id,
            task="segmentation",
            label=self.m.labels[k + 1] if candidate else None,
            confidence=confidence,
            alert=candidate,  # the finding rules (size, persistence) decide whether it alerts
            probabilities=max_per_label,
            shapes=(
                Mask(small, (float(centroid[0]), float(centroid[1])), n / small.size),
                *self._outlines(small, (x, y, w, h), frame_size),
            ),
        )

    def _outlines(
        self, small: np.ndarray, rect: tuple[int, int, int, int], frame_size: tuple[int, int]
    ) -> tuple[Polygon, ...]:
        """The mask's outer contours in frame pixels (pixel centres). Traced in its bounding box grown by
        one pixel (the zero ring around it that the whole map has, or the map's edge), moved back by
        ``offset``: the contours of the whole map, point for point and in its order."""
        x, y, w, h = rect
        mh, mw = self.out_hw
        x0, y0 = max(x - 1, 0), max(y - 1, 0)
        ring = small[y0 : min(y + h + 1, mh), x0 : min(x + w + 1, mw)]
        contours, _ = cv2.findContours(ring, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
        size, xy, offset = self._outline  # one read: a call for another frame size may replace it
        if size != frame_size:
            # each map column's and row's frame coordinate (pixel centres): the float32 arithmetic a point
            # would get, done once per frame size for every coordinate
            fw, fh = frame_size
            sx, sy = fw / mw, fh / mh
            cols = np.arange(mw, dtype=np.float32) * np.float32(sx) + np.float32(sx / 2)
            rows = np.arange(mh, dtype=np.float32) * np.float32(sy) + np.float32(sy / 2)
            xy = np.concatenate([cols.astype(np.int32), rows.astype(np.int32)])
            offset = np.array([0, mw], np.int32)  # a point's (x, y) -> its two entries
            self._outline = (frame_size, xy, offset)
        pts = (contours[0] if len(contours) == 1 else np.concatenate(contours)).reshape(-1, 2)
        out = np.take(xy, pts + offset)
        if len(contours) == 1:
            return (Polygon(out),)
        polygons, start = [], 0
        for c in contours:
            end = start + len(c)
            polygons.append(Polygon(out[start:end]))
            start = end
        return tuple(polygons)
