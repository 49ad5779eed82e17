"""What a button or a serial command may ask of the daemon, and an in-memory test double.

The daemon (the Pipeline) implements ``Controls``; the GPIO panel and the serial link only ever call it.
Every method may be called from a foreign thread (a gpiozero callback, the serial reader) and must return
quickly. A request the daemon refuses (a full disk, an unknown model) raises a FirmwareAppError whose
message is shown to the person who pressed the button or sent the command.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Protocol, runtime_checkable

from firmware_app.errors import BadModel, FirmwareAppError


@runtime_checkable
class Controls(Protocol):
    def freeze(self) -> None: ...
    def unfreeze(self) -> None: ...
    @property
    def frozen(self) -> bool: ...
    def set_ai(self, enabled: bool) -> None: ...
    @property
    def ai_enabled(self) -> bool: ...
    def request_capture(self, reason: str) -> str:
        """A capture id; raises FirmwareAppError with a message if refused (disk full ...)."""
        ...

    def mark_disagree(self) -> str:
        """The clinician marks the last result as wrong; the case id kept for the feedback export."""
        ...

    def new_patient(self) -> str:
        """Starts a new study (video sources); the study id."""
        ...

    def set_threshold(self, value: float) -> float:
        """Clamped to the manifest's bounds; returns what is in force."""
        ...

    def switch_model(self, model_id: str) -> str:
        """``"id version"``; raises BadModel if unknown."""
        ...

    def status(self) -> dict[str, Any]:
        """model, version, backend, fps, frozen, ai, threshold, frames, errors (cheap: called per result)."""
        ...


class FakeControls:
    """An in-memory Controls that records every call, for tests of buttons and serial commands.

    ``refuse_capture``: when set, request_capture raises FirmwareAppError with that message.
    ``calls``: the method names in call order.
    """

    def __init__(
        self,
        models: dict[str, str] | None = None,
        threshold: float = 0.5,
        bounds: tuple[float, float] = (0.3, 0.9),
    ) -> None:
        self.models = dict(models or {"us-fluid-seg": "1.0.0"})
        self.model = next(iter(self.models))
        self.threshold = threshold
        self.bounds = bounds
        self.refuse_capture: str | None = None
        self.captures: list[str] = []
        self.disagreements: list[str] = []
        self.studies: list[str] = []
        self.calls: list[str] = []
        self.frames = 0
        self._frozen = False
        self._ai = True
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _call(self, name: str) -> int:
        with self._lock:
            self.calls.append(name)
            return next(self._ids)

    def freeze(self) -> None:
        self._call("freeze")
        self._frozen = True

    def unfreeze(self) -> None:
        self._call("unfreeze")
        self._frozen = False

    @property
    def frozen(self) -> bool:
        return self._frozen

    def set_ai(self, enabled: bool) -> None:
        self._call("set_ai")
        self._ai = bool(enabled)

    @property
    def ai_enabled(self) -> bool:
        return self._ai

    def request_capture(self, reason: str) -> str:
        n = self._call("request_capture")
        if self.refuse_capture:
            raise FirmwareAppError(self.refuse_capture)
        capture_id = f"cap-{n:04d}-{reason}"
        self.captures.append(capture_id)
        return capture_id

    def mark_disagree(self) -> str:
        case_id = f"case-{self._call('mark_disagree'):04d}"
        self.disagreements.append(case_id)
        return case_id

    def new_patient(self) -> str:
        study_id = f"study-{self._call('new_patient'):04d}"
        self.studies.append(study_id)
        return study_id

    def set_threshold(self, value: float) -> float:
        self._call("set_threshold")
        if not math.isfinite(value):
            raise FirmwareAppError(f"threshold {value} is not a number")
        lo, hi = self.bounds
        self.threshold = min(max(float(value), lo), hi)
        return self.threshold

    def switch_model(self, model_id: str) -> str:
        self._call("switch_model")
        if model_id not in self.models:
            raise BadModel(f"model {model_id!r} not installed; known: {', '.join(sorted(self.models))}")
        self.model = model_id
        return f"{model_id} {self.models[model_id]}"

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.models[self.model],
            "backend": "fake",
            "fps": 0.0,
            "frozen": self._frozen,
            "ai": self._ai,
            "threshold": self.threshold,
            "frames": self.frames,
            "errors": 0,
        }
