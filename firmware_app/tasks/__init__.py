"""Task post-processing: raw output tensors -> a Result in frame coordinates.

Pure functions of the raw outputs, the tensor specs (quantization read from the tensors), the manifest
and the threshold in force; ``make_postprocessor`` picks the one for the manifest's task.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from firmware_app import plugins
from firmware_app.backends.base import TensorSpec
from firmware_app.models.manifest import Manifest
from firmware_app.types import Result

Postprocess = Callable[[list[np.ndarray], int, tuple[int, int], float], Result]


class Task:
    """What every task plugin declares besides its post-processor (``__init__(manifest, outputs)`` and
    ``__call__(raw, frame_id, frame_size, threshold) -> Result``)."""

    output_keys: tuple[str, ...] = ()  # task-specific [output] keys of the manifest it takes
    finding_calibration = False  # takes [finding] features / coef (a finding-level confidence fit)
    metrics = ""  # "module:Class" of its `validate` metrics (read_cases, add, summary, agreement_unit)

    @classmethod
    def check_manifest(cls, data: dict, bad) -> None:
        """Raise ``bad(message)`` for a manifest this task cannot run."""


def register(task: str):
    """Class decorator: declare a task plugin (its post-processor) for manifests with ``task = <task>``."""
    return plugins.register("task", task)


def task_names() -> tuple[str, ...]:
    return plugins.keys("task")


def make_postprocessor(manifest: Manifest, outputs: list[TensorSpec]) -> Postprocess:
    """-> f(raw_outputs, frame_id, (frame_w, frame_h), threshold) -> Result, by the manifest's task."""
    return plugins.get("task", manifest.task)(manifest, outputs)
