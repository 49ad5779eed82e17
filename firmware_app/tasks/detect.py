"""Detection: boxes with score and label, in frame pixel coordinates.

Layouts (``[output] layout``):
- ``ssd_postprocess``: the four outputs of TFLite_Detection_PostProcess: boxes [1, N, 4] (ymin, xmin,
  ymax, xmax, normalised), classes [1, N], scores [1, N], count [1]. Class k is ``labels[k]``.
- ``boxes_scores``: raw boxes [1, N, 4] (same convention) and scores [1, N, C] over the labels, label 0 being
  the background; the best non-background class per box, then non-maximum suppression (IoU 0.5).
Every box at or above the threshold in force is kept: no fixed cap. Shapes: one ``BoxShape`` per box, best first.
"""

from __future__ import annotations

import cv2
import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import Manifest
from firmware_app.shapes import BoxShape
from firmware_app.tasks import Task, register
from firmware_app.tasks.calibrate import probabilities, quantized_table
from firmware_app.types import Result

NMS_IOU = 0.5
_XYXY = np.array([1, 0, 3, 2])  # (ymin, xmin, ymax, xmax) -> (x0, y0, x1, y1)


LAYOUTS = ("ssd_postprocess", "boxes_scores")


@register("detection")
class Detector(Task):
    metrics = "firmware_app.validate:_Detection"  # what `validate` measures on a labelled set
    output_keys = ("layout",)

    @classmethod
    def check_manifest(cls, data: dict, bad) -> None:
        layout = data["output"].get("layout")
        if layout is None:
            raise bad("missing required key [output] layout for a detection model (e.g. 'ssd_postprocess')")
        if layout not in LAYOUTS:
            raise bad(f"[output] layout {layout!r} must be one of {', '.join(LAYOUTS)}")

    def __init__(self, manifest: Manifest, outputs: list[TensorSpec]) -> None:
        self.m = manifest
        self.specs = outputs
        boxes = [i for i, o in enumerate(outputs) if len(o.shape) == 3 and o.shape[-1] == 4]
        if not boxes:
            raise BadModel(f"detection model has no boxes output [1, N, 4] (outputs: {self._shapes()})")
        self.boxes_i = boxes[0]
        if manifest.layout == "ssd_postprocess":
            counts = [i for i, o in enumerate(outputs) if int(np.prod(o.shape)) == 1]
            pairs = [i for i, o in enumerate(outputs) if len(o.shape) == 2 and i != self.boxes_i]
            if len(outputs) != 4 or len(counts) != 1 or len(pairs) != 2:
                raise BadModel(
                    "layout 'ssd_postprocess' needs 4 outputs (boxes, classes, scores, count); "
                    f"the model has {self._shapes()}"
                )
            self.count_i = counts[0]
            self.classes_i, self.scores_i = pairs
        else:
            scores = [i for i, o in enumerate(outputs) if len(o.shape) == 3 and i != self.boxes_i]
            if len(scores) != 1 or outputs[scores[0]].shape[-1] != len(manifest.labels):
                raise BadModel(
                    f"layout 'boxes_scores' needs scores [1, N, {len(manifest.labels)}]; "
                    f"the model has {self._shapes()}"
                )
            self.scores_i = scores[0]
        # int8/uint8 scores over [background, one label]: each box's probability is one table lookup, and
        # only the boxes above the threshold are dequantized (see calibrate.quantized_table)
        self._fast = None
        if manifest.layout == "boxes_scores" and len(manifest.labels) == 2:
            self._fast = quantized_table(outputs[self.scores_i], 2, manifest.activation, manifest.calibration)
        self._scale: tuple = (None, None)  # (frame size, its [w, h, w, h] in float32)
        # quantized 8-bit boxes: a byte's value from a 256-entry table (the same float32 dequantization)
        spec = outputs[self.boxes_i]
        self._box_table = None
        if spec.quantized and np.dtype(spec.dtype).itemsize == 1:
            self._box_table = spec.dequantize(np.arange(256, dtype=np.uint8).view(spec.dtype))

    def _box_values(self, raw: np.ndarray) -> np.ndarray:
        """Raw boxes [n, 4] -> float32 normalised coordinates."""
        if self._box_table is not None:
            return self._box_table.take(raw.view(np.uint8))
        return self.specs[self.boxes_i].dequantize(raw)

    def _shapes(self) -> str:
        return ", ".join(str(list(o.shape)) for o in self.specs)

    def _deq(self, raw: list[np.ndarray], i: int) -> np.ndarray:
        return self.specs[i].dequantize(raw[i])

    def raw_boxes(self, raw: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (boxes [n, 4] normalised ymin, xmin, ymax, xmax; scores [n]; class indices [n])."""
        boxes = self._deq(raw, self.boxes_i)[0]
        if self.m.layout == "ssd_postprocess":
            n = int(round(float(self._deq(raw, self.count_i).reshape(-1)[0])))
            cls = self._deq(raw, self.classes_i)[0]
            sc = self._deq(raw, self.scores_i)[0]
            # the two [1, N] outputs are told apart by content: classes are integers, scores are not
            if np.any(cls != np.round(cls)) and np.all(sc == np.round(sc)):
                cls, sc = sc, cls
            n = max(0, min(n, boxes.shape[0]))
            scores = sc[:n]
            if self.m.calibration.method != "none":
                scores = probabilities(scores, "none", self.m.calibration)
            return boxes[:n], scores, cls[:n].astype(np.int64)
        probs = probabilities(self._deq(raw, self.scores_i)[0], self.m.activation, self.m.calibration)
        cls = 1 + np.argmax(probs[:, 1:], axis=1)
        scores = probs[np.arange(len(cls)), cls]
        return boxes, scores, cls

    def __call__(
        self, raw_outputs: list[np.ndarray], frame_id: int, frame_size: tuple[int, int], threshold: float
    ) -> Result:
        fw, fh = frame_size
        if self._fast is not None:  # only the boxes at or above the threshold are dequantized
            table, index = self._fast
            scores = table.take(index(raw_outputs[self.scores_i][0]))
            keep = (scores >= threshold).nonzero()[0]
            cls = None  # every box is labels[1]
        else:
            all_boxes, scores, all_cls = self.raw_boxes(raw_outputs)
            keep = (scores >= threshold).nonzero()[0]
        if not keep.size:
            return Result(
                frame_id=frame_id,
                task="detection",
                label=None,
                confidence=float(scores.max()) if scores.size else 0.0,
                alert=False,
                shapes=(),
            )
        if self._fast is not None:
            boxes = self._box_values(raw_outputs[self.boxes_i][0][keep])
        else:
            boxes, cls = all_boxes[keep], all_cls[keep]
        kept = scores[keep]
        # (x0, y0, x1, y1) normalised: the float32 arithmetic of one box, done for all of them at once
        corners = boxes[:, _XYXY]
        size, scale = self._scale  # one read: a call for another frame size may replace it
        if size != frame_size:
            scale = np.array([fw, fh, fw, fh], np.float32)
            self._scale = (frame_size, scale)
        if self.m.layout == "boxes_scores":
            xywh = np.concatenate((corners[:, :2], corners[:, 2:] - corners[:, :2]), axis=1) * scale
            picked = cv2.dnn.NMSBoxes(xywh.tolist(), kept.tolist(), float(threshold), NMS_IOU)
            keep = np.asarray(picked, dtype=np.int64).reshape(-1)
        else:
            keep = np.arange(len(kept))
        keep = keep[(-kept[keep]).argsort(kind="stable")]  # best first
        xyxy = (corners[keep].clip(0.0, 1.0) * scale).tolist()
        labels = self.m.labels
        if cls is None:
            names = [labels[1]] * len(keep)
        else:
            names = [labels[c] if 0 <= c < len(labels) else f"class {c}" for c in cls[keep].tolist()]
        out = tuple(
            BoxShape(x0, y0, x1, y1, score, name)
            for (x0, y0, x1, y1), score, name in zip(xyxy, kept[keep].tolist(), names)
        )
        top = out[0]
        return Result(
            frame_id=frame_id,
            task="detection",
            label=top.label,
            confidence=top.score,
            alert=True,
            shapes=out,  # the top box first: the result's centroid is its centre
        )
