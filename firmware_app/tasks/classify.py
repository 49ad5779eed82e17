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

    def __call__(
        self, raw_outputs: list[np.ndarray], frame_id: int, frame_size: tuple[int, int], threshold: float
    ) -> Result:
        x = self.spec.dequantize(raw_outputs[self.score_index]).reshape(-1)
        if self.single:
            act = "sigmoid" if self.m.activation == "softmax" else self.m.activation
            p1 = float(probabilities(x, act, self.m.calibration)[0])
            probs = np.array([1.0 - p1, p1], np.float32)
        else:
            probs = probabilities(x, self.m.activation, self.m.calibration)
        labels = self.m.labels
        if len(labels) >= 2:
            k = 1 + int(np.argmax(probs[1:]))
        else:
            k = 0
        conf = float(probs[k])
        alert = conf >= threshold
        top = int(np.argmax(probs))
        shapes: tuple[Heatmap, ...] = ()
        if (
            self.hm_spec is not None and alert
        ):  # where the model sees the finding; nothing to show without one
            h = self.hm_spec.dequantize(raw_outputs[self.heatmap_index])[0]
            if h.ndim == 3:
                h = h[..., min(k, h.shape[-1] - 1)]
            lo, hi = float(h.min()), float(h.max())
            heat = ((h - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(h)
            shapes = (Heatmap(heat),)
        return Result(
            frame_id=frame_id,
            task="classification",
            label=labels[k] if alert else labels[top],
            confidence=conf if alert else float(probs[top]),
            alert=alert,
            probabilities={lab: float(p) for lab, p in zip(labels, probs)},
            shapes=shapes,
        )
