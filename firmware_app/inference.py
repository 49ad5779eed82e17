"""The inference stage: frame -> tensor -> backend -> task -> finding rules, and everything that changes it.

One object owns the model and what serves it: the backend chain's choice, the pre-processor, the task's
post-processor and the finding stage (input gate, size, persistence), and the threshold in force. It swaps
them as one (a model switched at run time, an accelerator back after a fall-back) between two frames, so a
frame is never pre-processed for one model and post-processed for another. When the accelerator fails
mid-run, the same frame goes on the next backend of the chain (the CPU) at once and the accelerator is
retried in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firmware_app.backends import BackendChoice
from firmware_app.backends.chain import BackendChain
from firmware_app.models.store import ModelRef
from firmware_app.preprocess import Preprocessor
from firmware_app.stats import RollingTimes
from firmware_app.tasks import make_postprocessor
from firmware_app.tasks.finding import FindingStage, load_gate
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

ACCEL_RETRY_S = 5.0  # how often a failed accelerator is tried again


@dataclass(frozen=True)
class Prepared:
    """A frame's input tensor, made on the capture thread by ``preprocess`` in ``ns`` nanoseconds
    (``cpu_ns`` of them on the CPU)."""

    preprocess: Preprocessor
    tensor: Any
    ns: int
    cpu_ns: int
    finding: Any = None  # the finding stage whose gate judged the frame, and its verdict
    verdict: Any = None
    gate_ns: int = 0
    gate_cpu_ns: int = 0


class InferenceStage:
    def __init__(
        self,
        model: ModelRef,
        chain: BackendChain,
        choice: BackendChoice,
        *,
        live: bool,
        times: RollingTimes,
        cpu_times: RollingTimes,
        notify: Callable[[str], None],
        on_error: Callable[[], None],
        stopped: threading.Event,
    ) -> None:
        self.model = model
        self.chain = chain
        self.choice = choice
        self.live = live
        self.times, self.cpu_times = times, cpu_times
        self._notify = notify
        self._on_error = on_error
        self._stopped = stopped
        m = model.manifest
        self.preprocess = Preprocessor(m, choice.backend.input)
        self.postprocess = make_postprocessor(m, choice.backend.outputs)
        self.finding = FindingStage(m, load_gate(m), live=live)
        self.threshold = m.alert
        self._lock = threading.Lock()
        self._pending: tuple | None = None
        self._retry_thread: threading.Thread | None = None
        self._on_fallback = False

    # -- controls --
    def set_threshold(self, value: float) -> float:
        """A clinician's threshold, kept within the manifest's bounds; returns what is in force."""
        self.threshold = self.model.manifest.clamp_threshold(value)
        log.info("alert threshold set to %.2f", self.threshold)
        return self.threshold

    def switch_model(self, model: ModelRef) -> str:
        """Load ``model`` on the same backend chain and swap it in between two frames.

        The new model is fully loaded before the swap; if it fails to load, the old one keeps running.
        """
        self._queue_swap(model, self.chain.open(model))
        m = model.manifest
        self._notify(f"Model {m.id} {m.version} loaded")
        return f"{m.id} {m.version}"

    def _queue_swap(self, model: ModelRef, choice: BackendChoice) -> None:
        """Prepare model + backend + pre/post-processing; ``apply_pending`` swaps them in between frames."""
        pre = Preprocessor(model.manifest, choice.backend.input)
        post = make_postprocessor(model.manifest, choice.backend.outputs)
        if model.manifest is self.model.manifest:  # the same model on another backend: same gate, history
            stage = self.finding
        else:
            stage = FindingStage(model.manifest, load_gate(model.manifest), live=self.live)
        with self._lock:
            self._pending = (model, choice, pre, post, stage)

    def apply_pending(self) -> None:
        if self._pending is None:  # the common case: one attribute read, no lock taken
            return
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old = self.choice.backend
        same_model = pending[0].manifest.id == self.model.manifest.id
        self.model, self.choice, self.preprocess, self.postprocess, self.finding = pending
        self._on_fallback = False
        m = self.model.manifest
        self.threshold = m.clamp_threshold(self.threshold) if same_model else m.alert
        old.close()

    # -- per frame --
    def prepare(self, frame: Frame) -> Prepared | None:
        """Pre-process on the capture thread, overlapped with the inference of the previous frame.

        Tagged with the preprocessor used: after a model swap or a fall-back to the CPU the inference
        thread does it again for the new input tensor. A frame that cannot be pre-processed is left to the
        inference thread, which reports it like any failed frame.
        """
        pre, finding = self.preprocess, self.finding
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        try:
            tensor = pre(frame.pixels, out=pre.new_buffer())
        except Exception:  # noqa: BLE001 - reported by the inference thread, which tries again
            return None
        t1, c1 = time.monotonic_ns(), time.thread_time_ns()
        try:  # the input gate too: on a board with a spare core it costs the model nothing
            verdict = finding.check_gate(frame)
        except Exception:  # noqa: BLE001 - judged again on the inference thread, which reports it
            return Prepared(pre, tensor, t1 - t0, c1 - c0)
        t2, c2 = time.monotonic_ns(), time.thread_time_ns()
        return Prepared(pre, tensor, t1 - t0, c1 - c0, finding, verdict, t2 - t1, c2 - c1)

    def infer(self, frame: Frame, prepared: Prepared | None = None) -> Result:
        """preprocess (unless ``prepared`` by the capture thread) -> invoke -> postprocess, each stage timed."""
        t0 = time.monotonic_ns()
        if prepared is not None and prepared.preprocess is self.preprocess:
            tensor, t1, pre_ns, pre_cpu = prepared.tensor, t0, prepared.ns, prepared.cpu_ns
        else:
            c0 = time.thread_time_ns()
            tensor = self.preprocess(frame.pixels)
            t1 = time.monotonic_ns()
            pre_ns, pre_cpu = t1 - t0, time.thread_time_ns() - c0
        try:
            raw = self.choice.backend.invoke(tensor)
        except Exception as exc:  # noqa: BLE001 - an accelerator pulled out mid-run
            if self.chain.last_resort(self.choice.backend):
                raise
            self._fall_back(exc)
            tensor = self.preprocess(frame.pixels)
            raw = self.choice.backend.invoke(tensor)  # the same frame, on the next backend
        t2, c2 = time.monotonic_ns(), time.thread_time_ns()
        result = self.postprocess(raw, frame.id, (frame.width, frame.height), self.threshold)
        t3, c3 = time.monotonic_ns(), time.thread_time_ns()
        self.times.add_ns_many(
            ("queue", frame.t_capture_ns, t0),
            ("preprocess", 0, pre_ns),
            ("invoke", t1, t2),
            ("postprocess", t2, t3),
        )
        self.cpu_times.add_ns_many(("preprocess", 0, pre_cpu), ("postprocess", c2, c3))
        return result

    def decide(self, result: Result, frame: Frame, prepared: Prepared | None = None) -> Result:
        """The input gate (judged on the capture thread when ``prepared`` by this stage's finding stage)
        and the finding rules (size, persistence): what ``result`` is (tasks.finding)."""
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        if prepared is not None and prepared.finding is self.finding:
            verdict, gate_ns, gate_cpu = prepared.verdict, prepared.gate_ns, prepared.gate_cpu_ns
            t1, c1 = t0, c0
        else:
            verdict = self.finding.check_gate(frame)
            t1, c1 = time.monotonic_ns(), time.thread_time_ns()
            gate_ns, gate_cpu = t1 - t0, c1 - c0
        out = self.finding(result, frame, verdict)
        t2, c2 = time.monotonic_ns(), time.thread_time_ns()
        self.times.add_ns_many(("gate", 0, gate_ns), ("finding", t1, t2))
        self.cpu_times.add_ns_many(("gate", 0, gate_cpu), ("finding", c1, c2))
        return out

    # -- accelerator fall-back and retry --
    def _fall_back(self, exc: Exception) -> None:
        """The accelerator failed mid-run: continue on the next backend of the chain (the CPU) now, retry
        the accelerator in the background."""
        failed = self.choice.backend
        choice = self.chain.fall_back(self.model, failed, exc)
        notice = f"{'; '.join(choice.notices)}; retrying every {ACCEL_RETRY_S:g} s"
        log.error("%s", notice)
        self.choice = BackendChoice(choice.backend, [notice])
        self.preprocess = Preprocessor(self.model.manifest, choice.backend.input)
        self.postprocess = make_postprocessor(self.model.manifest, choice.backend.outputs)
        self._on_fallback = True
        self._notify(notice)
        self._on_error()
        try:
            failed.close()
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        if self._retry_thread is None or not self._retry_thread.is_alive():
            self._retry_thread = threading.Thread(
                target=self._retry, args=(failed.key or failed.name,), name="fwapp-accel-retry", daemon=True
            )
            self._retry_thread.start()

    def _retry(self, key: str) -> None:
        """Until stopped: try to reopen the accelerator; when it works, swap it in between two frames."""
        while not self._stopped.wait(ACCEL_RETRY_S):
            if not self._on_fallback:
                return
            try:
                choice = self.chain.open(self.model, [key])
            except Exception as exc:  # noqa: BLE001
                log.info("%s still unavailable: %s", key, exc)
                continue
            self._queue_swap(self.model, choice)
            self._notify(f"{key} is back: running on it again")
            log.warning("%s is back", key)
            return

    def close(self) -> None:
        self.choice.backend.close()

    def detach(self) -> None:
        """Forget the callbacks into the pipeline (it is closed); a late retry then tells nobody."""
        self._notify = lambda _message: None
        self._on_error = lambda: None
