"""The scheduler: three threads and two slots carry frames from the source to the screen.

    capture ──(frame, its tensor)──▶ inference ──(frame, its result)──▶ presenter ──canvas──▶ displays
    (source.read, preprocess)        (InferenceStage: invoke, task,    (Presenter: Screen.render, at
                                      finding rules; result sinks)      the display's rate)

- A live source (camera, paced phantom) feeds a *lossy* slot: inference always takes the newest frame and
  never works through a backlog; overwritten frames are counted as dropped. A finite source (DICOM file,
  image folder, video replayed as fast as possible) is read READ_AHEAD frames ahead, losslessly: every
  frame is processed. The capture thread pre-processes the next frame while the model runs.
- Every result goes to the result sinks (recorder, GPIO panel, serial link, input monitor, results stream)
  on the inference thread; the screen takes the newest result each time it can show one and sleeps in
  between.
- A result travels together with the frame it was computed from, so the presenter can only draw a result
  on its own frame. When no result has come for ``stale_after_ms`` while newer raw frames arrive (a slow
  model, AI switched off), the presenter shows the live frame marked "AI PENDING" with the last finding
  greyed as STALE, never another frame's overlay.
- Every stage stamps its time; ``stats()`` gives rolling p50/p99 per stage and end to end (capture -> shown),
  in wall time (``stages_ms``) and in CPU time of the thread doing it (``cpu_ms``).
- Notices arrive as typed events (``firmware_app.events``), not attribute writes.

What it runs is decided elsewhere: ``firmware_app.inference`` (the model and what serves it),
``firmware_app.presenter`` (what the screen shows), ``firmware_app.compose`` (how a board's config becomes
one of these).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware_app.backends import BackendChain, BackendChoice
from firmware_app.display.screen import Screen
from firmware_app.display.sinks import Display
from firmware_app.errors import BadFrame, SourceUnavailable
from firmware_app.events import InputWarning, Notice
from firmware_app.inference import InferenceStage, Prepared
from firmware_app.models.store import ModelRef
from firmware_app.presenter import Presenter
from firmware_app.sources.base import Source
from firmware_app.stats import RollingTimes, upscaled_dice
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

_END = object()  # end of stream marker passed down the slots
MESSAGE_SECONDS = 15.0
HEARTBEAT_S = 0.5  # the inference loop wakes at least this often, frames or not
READ_AHEAD = 4  # frames a finite source (file, DICOM, unpaced phantom) is read ahead of inference


class Slot:
    """A hand-over between two threads that wakes the other side only when it is waiting for it.

    Lossy (one item): ``put`` replaces an item not yet taken (counted in ``dropped``). Lossless (up to
    ``depth`` items): ``put`` waits while the queue is full, and a waiting producer is woken once the
    consumer has taken half of it: it refills in a burst instead of being woken for every item, which on a
    small board would take a core from the model's worker threads in the middle of each invoke.
    ``close`` wakes everybody; ``get`` then returns what is left, then _END.
    """

    def __init__(self, lossless: bool, depth: int = 1) -> None:
        self.lossless = lossless
        self.depth = max(1, depth) if lossless else 1
        self._cv = threading.Condition(threading.Lock())  # never taken twice by one thread
        self._items: deque[Any] = deque()
        self._closed = False
        self._producer_waits = False
        self._consumer_waits = False
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cv:
            if self.lossless or item is _END:  # the end marker never replaces a real item
                while len(self._items) >= self.depth and not self._closed:
                    self._producer_waits = True
                    self._cv.wait()
                    self._producer_waits = False
            elif self._items:
                self._items.pop()
                self.dropped += 1
            if self._closed:
                return
            self._items.append(item)
            if self._consumer_waits:
                self._cv.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item, or None after ``timeout`` seconds, or _END once closed and drained."""
        with self._cv:
            if not self._items and not self._closed:
                self._consumer_waits = True
                self._cv.wait(timeout)
                self._consumer_waits = False
            if self._items:
                item = self._items.popleft()
                if self._producer_waits and len(self._items) <= self.depth // 2:
                    self._cv.notify_all()
                return item
            return _END if self._closed else None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


@dataclass
class Counters:
    frames_in: int = 0
    frames_inferred: int = 0
    frames_shown: int = 0
    frames_rejected: int = 0  # unreadable or malformed input items, skipped
    errors: int = 0
    states: dict[str, int] = field(default_factory=dict)  # results by state (finding, no_finding, ...)
    dice_sum: float = 0.0
    dice_n: int = 0


@dataclass
class PipelineOptions:
    max_frames: int | None = None  # stop after this many frames have been inferred (None: until stopped)
    stale_after_ms: float = 500.0
    no_signal_after_ms: float = 500.0
    stats_window: int = 600
    display_fps: float = 30.0
    # score each result against a phantom's ground truth (the demo's Dice); a real source has none, and
    # the bench turns it off to measure what a device runs
    score_truth: bool = True


class Pipeline:
    def __init__(
        self,
        source: Source,
        model: ModelRef,
        choice: BackendChoice,
        screen: Screen,
        displays: list[Display],
        options: PipelineOptions | None = None,
        listeners: list[Callable[[Frame, Result], None]] | None = None,
        chain: BackendChain | None = None,
        heartbeat: Callable[[], None] | None = None,
        sinks: list[Any] | None = None,
        silent_trial: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``model`` on ``choice`` (opened from ``chain``, used again for a model switch, a fall-back and its
        retry); ``listeners`` and ``sinks`` (firmware_app.sinks.ResultSink: started before the threads,
        closed after them) get every result on the inference thread; ``heartbeat`` is called from the
        inference loop at least every HEARTBEAT_S while it runs (a hung model stops the calls)."""
        self.source = source
        self.screen = screen
        self.displays = displays
        self.options = options or PipelineOptions()
        self.listeners = listeners if listeners is not None else []
        self.chain = chain or BackendChain()
        self.heartbeat = heartbeat
        self.sinks = tuple(sinks or ())  # fixed once built (their on_result calls are taken once)
        self.silent_trial = silent_trial  # results are computed and recorded, the screen shows only the image
        self.clock = clock
        self.times = RollingTimes(self.options.stats_window)  # wall clock per stage (and end to end)
        self.cpu_times = RollingTimes(self.options.stats_window)  # CPU time of the thread doing the stage
        self.counters = Counters()
        self._lock = threading.Lock()
        self._messages: deque[tuple[float, str]] = deque(maxlen=8)
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._frozen = threading.Event()
        self.ai_enabled = True
        self.input_warning: str | None = None  # from an InputWarning event (the drift monitor)
        self.inference = InferenceStage(
            model,
            self.chain,
            choice,
            live=self.source.live,
            times=self.times,
            cpu_times=self.cpu_times,
            notify=self.notify,
            on_error=self.count_error,
            stopped=self.stopped,
        )
        self.presenter = Presenter(self.screen, self.displays)
        self.presenter.bind(self)
        for notice in choice.notices:
            self.notify(notice)
        # a finite source is read ahead a few frames (every frame is analysed); a live one keeps the newest.
        # Results are always "newest wins": the screen shows at most display_fps of them, and every result
        # has already gone to the sinks on the inference thread.
        lossless = not self.source.live
        self._raw = Slot(lossless, depth=READ_AHEAD if lossless else 1)
        self._results = Slot(lossless=False)
        self.latest_raw: Frame | None = None
        self._no_signal_since: float | None = None
        self._threads: list[threading.Thread] = []
        self.t_start_ns = time.monotonic_ns()
        self._sink_calls = tuple(sink.on_result for sink in self.sinks)  # the sinks are fixed once built
        for sink in self.sinks:
            bind = getattr(sink, "bind", None)
            if bind is not None:
                bind(self)

    # -- what the inference stage holds (read by controls, status, tests) ----------------------------
    model = property(lambda self: self.inference.model)
    choice = property(lambda self: self.inference.choice)
    preprocess = property(lambda self: self.inference.preprocess)
    postprocess = property(lambda self: self.inference.postprocess)
    finding = property(lambda self: self.inference.finding)
    threshold = property(lambda self: self.inference.threshold)

    @property
    def t_first_result_shown_ns(self) -> int | None:
        return self.presenter.t_first_result_shown_ns

    def infer(self, frame: Frame, prepared: Prepared | None = None) -> Result:
        return self.inference.infer(frame, prepared)

    def decide(self, result: Result, frame: Frame, prepared: Prepared | None = None) -> Result:
        return self.inference.decide(result, frame, prepared)

    # -- events --------------------------------------------------------------------------------------
    def publish(self, event: Any) -> None:
        """A typed event for the screen: a Notice (a one-line message) or an InputWarning (on or off)."""
        if isinstance(event, InputWarning):
            self.input_warning = event.text
        elif isinstance(event, Notice):
            self.notify(event.message)
        else:
            raise TypeError(f"not a pipeline event: {event!r}")

    # -- controls (buttons, serial commands) ---------------------------------------------------------
    def set_threshold(self, value: float) -> float:
        return self.inference.set_threshold(value)

    @property
    def frozen(self) -> bool:
        return self._frozen.is_set()

    def freeze(self) -> None:
        """Hold the image on screen for review; inference pauses until unfreeze()."""
        self._frozen.set()

    def unfreeze(self) -> None:
        self._frozen.clear()

    def set_ai(self, enabled: bool) -> None:
        self.ai_enabled = bool(enabled)
        log.info("AI %s", "on" if self.ai_enabled else "off")

    def switch_model(self, model: ModelRef) -> str:
        return self.inference.switch_model(model)

    def status(self) -> dict[str, Any]:
        m = self.model.manifest
        c = self.counters
        return {
            "model": m.id,
            "version": m.version,
            "backend": self.choice.backend.name,
            "fps": round(self.presenter.shown_rate.rate() or 0.0, 1),
            "frozen": self.frozen,
            "ai": self.ai_enabled,
            "threshold": self.threshold,
            "no_signal": self.no_signal(),
            "frames": c.frames_inferred,
            "errors": c.errors,
        }

    def notify(self, message: str) -> None:
        """A one-line notice for the screen (and the log, by the caller)."""
        with self._lock:
            self._messages.appendleft((self.clock(), message))

    def messages(self) -> tuple[str, ...]:
        now = self.clock()
        with self._lock:
            return tuple(m for t, m in self._messages if now - t < MESSAGE_SECONDS)

    def count_error(self) -> None:
        with self._lock:
            self.counters.errors += 1

    def count_shown(self) -> None:
        with self._lock:
            self.counters.frames_shown += 1

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        for sink in self.sinks:
            sink.start()
        self.source.open()
        self.presenter.open()
        for target, name in (
            (self._capture_loop, "capture"),
            (self._inference_loop, "inference"),
            (self._present_loop, "present"),
        ):
            t = threading.Thread(target=self._guard(target), name=f"fwapp-{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:  # a bug in a stage must not leave the other threads waiting forever
                log.exception("pipeline thread %s failed", threading.current_thread().name)
                self.count_error()
                self.stop()

        return run

    def stop(self) -> None:
        """Ask every thread to finish (safe from a signal handler or any thread)."""
        self.stopped.set()
        self.source.stop()
        self._raw.close()
        self._results.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the stream ends, ``max_frames`` are done, or stop() (True), or the timeout (False)."""
        return self._done.wait(timeout)

    def close(self, timeout: float = 2.0) -> None:
        self.stop()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.source.close()
        self.presenter.close()
        self.inference.close()
        for sink in reversed(self.sinks):
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - one sink failing at close must not lose the others
                log.error("closing %s: %s", type(sink).__name__, exc)
        # the presenter and the inference stage point back here: let go, so a closed pipeline (its frames,
        # tensors, screen) is freed at once, not at the next garbage collection
        self.presenter.bind(None)
        self.inference.detach()

    def run(self) -> dict[str, Any]:
        """Start, wait for the end, close; returns stats()."""
        self.start()
        try:
            self.wait()
        finally:
            self.close()
        return self.stats()

    # -- capture -----------------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        while not self.stopped.is_set():
            c0 = time.thread_time_ns()
            try:
                frame = self.source.read()
            except SourceUnavailable as exc:
                if self._no_signal_since is None:
                    self._no_signal_since = self.clock()
                    log.warning("%s", exc)
                    self.notify(str(exc))
                continue
            except BadFrame as exc:
                log.error("skipped: %s", exc)
                self.notify(f"Skipped {exc}")
                with self._lock:
                    self.counters.errors += 1
                    self.counters.frames_rejected += 1
                continue
            if frame is None:
                break
            self._no_signal_since = None
            # reading a frame: its decode (a grabber's), region watch and crop; wall time from its arrival
            self.cpu_times.add_ns("capture", c0, time.thread_time_ns())
            self.times.add_ns("capture", frame.t_capture_ns, time.monotonic_ns())
            with self._lock:
                self.counters.frames_in += 1
            self.latest_raw = frame
            self._raw.put((frame, self._prepare(frame)))
        self._raw.put(_END)

    def _prepare(self, frame: Frame) -> Prepared | None:
        """Pre-processed on the capture thread (``InferenceStage.prepare``) unless frozen or AI off. A live
        frame replaced by a newer one before inference takes it was pre-processed for nothing: with a
        camera faster than the model that costs one pre-processing per dropped frame (``frames_dropped``)."""
        if self.frozen or not self.ai_enabled:
            return None
        return self.inference.prepare(frame)

    def no_signal(self) -> bool:
        since = self._no_signal_since
        return since is not None and (self.clock() - since) * 1000 >= self.options.no_signal_after_ms

    # -- inference ---------------------------------------------------------------------------------
    def _tell(self, frame: Frame, result: Result) -> None:
        for on_result in itertools.chain(self.listeners, self._sink_calls):
            try:
                on_result(frame, result)
            except Exception:  # noqa: BLE001
                log.exception("result sink %r failed", on_result)

    def _inference_loop(self) -> None:
        max_frames = self.options.max_frames
        stage = self.inference
        while True:
            item = self._raw.get(timeout=HEARTBEAT_S)
            if self.heartbeat is not None:
                self.heartbeat()  # the loop is alive (the systemd watchdog is fed from here), even with no frames
            if item is _END or self.stopped.is_set():
                break
            if item is None:
                continue
            frame, prepared = item
            if self.frozen:
                continue  # the screen holds the frozen image; live frames are not inferred meanwhile
            stage.apply_pending()
            if not self.ai_enabled:
                self._tell(frame, Result(frame.id, stage.model.manifest.task, None, None, state="ai_off"))
                self._results.put((frame, None))
                continue
            try:
                task_result = stage.infer(frame, prepared)
                result = stage.decide(task_result, frame, prepared)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the device
                log.exception("inference failed on frame %d", frame.id)
                self.notify(f"Inference failed on frame {frame.id}: {exc}")
                self.count_error()
                continue
            with self._lock:
                self.counters.frames_inferred += 1
                self.counters.states[result.state] = self.counters.states.get(result.state, 0) + 1
                n = self.counters.frames_inferred
                # the model's own mask against the phantom's truth (before the finding rules hide it)
                if self.options.score_truth and frame.truth is not None and task_result.mask is not None:
                    self.counters.dice_sum += upscaled_dice(task_result.mask, frame.truth)
                    self.counters.dice_n += 1
            self._tell(frame, result)
            self._results.put((frame, result))
            if max_frames is not None and n >= max_frames:
                self.source.stop()
                break
        self._results.put(_END)

    # -- presentation ------------------------------------------------------------------------------
    def _present_loop(self) -> None:
        self.presenter.run(self._results, _END)
        self._done.set()

    # -- figures -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.counters
        m = self.model.manifest
        out: dict[str, Any] = {
            "frames_in": c.frames_in,
            "frames_inferred": c.frames_inferred,
            "frames_shown": c.frames_shown,
            # captured but never inferred: a live source outran the model (the newest frame wins)
            "frames_dropped": self._raw.dropped,
            # inferred, then superseded by a newer result before the screen's next refresh
            "results_not_shown": self._results.dropped,
            "frames_rejected": c.frames_rejected,
            "mismatched_overlays": self.screen.mismatched_overlays,
            "errors": c.errors,
            "states": dict(c.states),
            "stages_ms": self.times.summary(),
            "cpu_ms": self.cpu_times.summary(),
            "model": f"{m.id}@{m.version}",
            "backend": self.choice.backend.name,
            "threads": self.choice.backend.threads,
            "source": self.source.uri,
            "fps": round(self.presenter.shown_rate.rate() or 0.0, 2),
            "notices": list(self.choice.notices),
        }
        if self.t_first_result_shown_ns is not None:
            out["first_result_s"] = round((self.t_first_result_shown_ns - self.t_start_ns) / 1e9, 3)
        if c.dice_n:
            out["dice"] = round(c.dice_sum / c.dice_n, 4)
            out["dice_frames"] = c.dice_n
        return out


def build_pipeline(
    board: Any,
    model: ModelRef,
    source_uri: str | None = None,
    display_uris: list[str] | None = None,
    max_frames: int | None = None,
    accelerator: Any = None,
    engine_cache: str | None = None,
) -> Pipeline:
    """The pipeline alone (no result sinks) for a board: ``firmware_app.compose.compose_pipeline``."""
    from firmware_app.compose import compose_pipeline
    from firmware_app.device.devices import Devices

    devices = Devices(accelerator=accelerator)
    return compose_pipeline(board, model, source_uri, display_uris, max_frames, devices, engine_cache)
