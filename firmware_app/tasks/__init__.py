"""Task post-processing: raw output tensors -> a Result in frame coordinates.

Pure functions of the raw outputs, the tensor specs (quantization read from the tensors), the manifest
and the threshold in force; ``make_postprocessor`` picks the one for the manifest's task.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from firmware_app.backends.base import TensorSpec
from firmware_app.models.manifest import Manifest
from firmware_app.types import Result

Postprocess = Callable[[list[np.ndarray], int, tuple[int, int], float], Result]


def make_postprocessor(manifest: Manifest, outputs: list[TensorSpec]) -> Postprocess:
    """-> f(raw_outputs, frame_id, (frame_w, frame_h), threshold) -> Result."""
    if manifest.task == "segmentation":
        from firmware_app.tasks.segment import Segmenter

        return Segmenter(manifest, outputs)
    if manifest.task == "classification":
        from firmware_app.tasks.classify import Classifier

        return Classifier(manifest, outputs)
    from firmware_app.tasks.detect import Detector

    return Detector(manifest, outputs)
