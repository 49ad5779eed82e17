"""Classification: calibrated probabilities, the top finding, and an optional class-activation heatmap.

Label 0 is the negative class ("absent", "normal") when there are two or more labels; the finding is the
most probable of the others and raises the alert when its probability reaches the threshold. A second
output named by ``[output] heatmap_output`` is a spatial map ([1, h, w] or [1, h, w, C]) drawn on screen
when the finding raises the alert (a map of "where" has no meaning without a finding): a ``Heatmap`` shape.
"""

from __future__ import annotations

import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import Manifest
from firmware_app.shapes import Heatmap
from firmware_app.tasks import Task, register
from firmware_app.tasks.calibrate import probabilities
from firmware_app.types import Result


@register("classification")
class Classifier(Task):
    metrics = "firmware_app.validate:_Classification"  # what `validate` measures on a labelled set
    output_keys = ("heatmap_output",)

    def __init__(self, manifest: Manifest, outputs: list[TensorSpec]) -> None:
        self.m = manifest
        hm = manifest.heatmap_output
        if hm is not None and not 0 <= hm < len(outputs):
            raise BadModel(f"[output] heatmap_output = {hm} but the model has {len(outputs)} outputs")
        self.heatmap_index = hm
        score_idx = [i for i in range(len(outputs)) if i != hm]
        if not score_idx:
            raise BadModel("classification model has no score output")
        self.score_index = score_idx[0]
        self.spec = outputs[self.score_index]
        n = int(np.prod(self.spec.shape))
        if n not in (len(manifest.labels), 1):
            raise BadModel(
                f"classification output has {n} values; manifest has {len(manifest.labels)} labels"
            )
        if n == 1 and len(manifest.labels) != 2:
            raise BadModel("a single-value classification output needs exactly 2 labels [negative, finding]")
        self.single = n == 1
        self.hm_spec = outputs[hm] if hm is not None else None
        # an 8-bit heatmap: its bytes' float32 values once (what dequantize computes, element for element)
        self._hm_table = None
        if self.hm_spec is not None and self.hm_spec.quantized and np.dtype(self.hm_spec.dtype).itemsize == 1:
            self._hm_table = self.hm_spec.dequantize(np.arange(256, dtype=np.uint8).view(self.hm_spec.dtype))
        # one quantized score: every byte's decision computed once, by the code a frame would run
        self._by_byte: list[tuple] | None = None
        if self.single and self.spec.quantized and np.dtype(self.spec.dtype).itemsize == 1:
            self._by_byte = []
            for byte in np.arange(256, dtype=np.uint8):
                raw = np.full(self.spec.shape, byte, np.uint8).view(self.spec.dtype)
                labels, probs, k, top = self._decide(raw)
                by_label = dict(zip(labels, probs.tolist()))
                self._by_byte.append((labels, by_label, k, float(probs[k]), top, float(probs[top])))

    def _decide(self, raw: np.ndarray) -> tuple[tuple[str, ...], np.ndarray, int, int]:
        """The score output -> (labels, probabilities, index of the finding, index of the top label)."""
        x = self.spec.dequantize(raw).reshape(-1)
        if self.single:
            act = "sigmoid" if self.m.activation == "softmax" else self.m.activation
            p1 = float(probabilities(x, act, self.m.calibration)[0])
            probs = np.array([1.0 - p1, p1], np.float32)
        else:
            probs = probabilities(x, self.m.activation, self.m.calibration)
        labels = self.m.labels
        k = 1 + int(np.argmax(probs[1:])) if len(labels) >= 2 else 0
        return labels, probs, k, int(np.argmax(probs))

    def __call__(
        self, raw_outputs: list[np.ndarray], frame_id: int, frame_size: tuple[int, int], threshold: float
    ) -> Result:
        raw = raw_outputs[self.score_index]
        if self._by_byte is not None:  # one int8/uint8 score: its decision is one of 256, made once
            labels, by_label, k, conf, top, top_p = self._by_byte[raw.item() & 0xFF]
        else:
            labels, probs, k, top = self._decide(raw)
            by_label = dict(zip(labels, probs.tolist()))
            conf, top_p = float(probs[k]), float(probs[top])
        alert = conf >= threshold
        shapes: tuple[Heatmap, ...] = ()
        if (
            self.hm_spec is not None and alert
        ):  # where the model sees the finding; nothing to show without one
            raw_hm = raw_outputs[self.heatmap_index]
            if self._hm_table is not None:  # the same float32 values, looked up by byte
                h = self._hm_table.take(raw_hm.view(np.uint8))[0]
            else:
                h = self.hm_spec.dequantize(raw_hm)[0]
            if h.ndim == 3:
                h = h[..., min(k, h.shape[-1] - 1)]
            lo, hi = float(np.minimum.reduce(h, axis=None)), float(np.maximum.reduce(h, axis=None))
            heat = ((h - lo) / (hi - lo)).astype(np.float32, copy=False) if hi > lo else np.zeros_like(h)
            shapes = (Heatmap(heat),)
        return Result(
            frame_id=frame_id,
            task="classification",
            label=labels[k] if alert else labels[top],
            confidence=conf if alert else top_p,
            alert=alert,
            probabilities=dict(by_label),  # each result its own
            shapes=shapes,
        )
