"""The real-time pipeline: source -> preprocess -> backend -> task -> screen -> displays.

Three threads, two slots:

    capture ──(frame, its tensor)──▶ inference ──(frame, its result)──▶ presenter ──canvas──▶ displays
    (source.read, preprocess)        (invoke, postprocess, listeners)   (Screen.render, at display fps)

- A live source (camera, paced phantom) feeds a *lossy* slot: inference always takes the newest frame and
  never works through a backlog; overwritten frames are counted as dropped. A finite source (DICOM file,
  image folder, video replayed as fast as possible) is read READ_AHEAD frames ahead, losslessly: every
  frame is processed. The capture thread pre-processes the next frame while the model runs.
- Every result goes to the listeners (recorder, alerts, serial) on the inference thread; the screen
  takes the newest result each time it can show one and sleeps in between.
- A result travels together with the frame it was computed from, so the presenter can only draw a result
  on its own frame. When no result has come for ``stale_after_ms`` while newer raw frames arrive (a slow
  model, AI switched off), the presenter shows the live frame marked "AI PENDING" with the last finding
  greyed as STALE, never another frame's overlay.
- Every stage stamps its time; ``stats()`` gives rolling p50/p99 per stage and end to end (capture -> shown),
  in wall time (``stages_ms``) and in CPU time of the thread doing it (``cpu_ms``).

``build_pipeline`` assembles it from a board config; reading it tells the whole data flow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_app.backends import BackendChain, BackendChoice
from firmware_app.config import BoardConfig
from firmware_app.display.screen import Screen, ScreenState
from firmware_app.display.sinks import Display, open_display
from firmware_app.errors import BadDisplay, BadFrame, SourceUnavailable
from firmware_app.models.store import ModelRef
from firmware_app.preprocess import Preprocessor
from firmware_app.sources import open_source
from firmware_app.sources.base import Source
from firmware_app.stats import RateMeter, RollingTimes, upscaled_dice
from firmware_app.tasks import make_postprocessor
from firmware_app.tasks.finding import FindingStage, load_gate
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

_END = object()  # end of stream marker passed down the slots
MESSAGE_SECONDS = 15.0
NO_SIGNAL_REFRESH_S = 0.5
HEARTBEAT_S = 0.5  # the inference loop wakes at least this often, frames or not
CPU_BACKEND = "litert-cpu"
ACCEL_RETRY_S = 5.0  # how often a failed accelerator is tried again
READOUT_S = 0.5  # the screen's frame rate and latency readout is refreshed this often
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
        self._cv = threading.Condition()
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


@dataclass(frozen=True)
class Prepared:
    """A frame's input tensor, made on the capture thread by ``preprocess`` in ``ns`` nanoseconds
    (``cpu_ns`` of them on the CPU)."""

    preprocess: Preprocessor
    tensor: Any
    ns: int
    cpu_ns: int


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


@dataclass
class Pipeline:
    source: Source
    model: ModelRef
    choice: BackendChoice
    screen: Screen
    displays: list[Display]
    options: PipelineOptions = field(default_factory=PipelineOptions)
    # called with (frame, result) for each result, on the inference thread (recorder, alerts, serial ...)
    listeners: list[Callable[[Frame, Result], None]] = field(default_factory=list)
    # the backend chain (order, configs, devices, engine cache) used again when the model is switched at run
    # time, when an accelerator fails mid-run and when it is retried
    chain: BackendChain = field(default_factory=BackendChain)
    # called from the inference loop at least every HEARTBEAT_S while it runs (a hung model stops the calls)
    heartbeat: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        m = self.model.manifest
        backend = self.choice.backend
        self.preprocess = Preprocessor(m, backend.input)
        self.postprocess = make_postprocessor(m, backend.outputs)
        self.finding = FindingStage(m, load_gate(m), live=self.source.live)
        self.threshold = m.alert
        self.ai_enabled = True
        self.times = RollingTimes(self.options.stats_window)  # wall clock per stage (and end to end)
        self.cpu_times = RollingTimes(self.options.stats_window)  # CPU time of the thread doing the stage
        self.counters = Counters()
        self._lock = threading.Lock()
        self._messages: deque[tuple[float, str]] = deque(maxlen=8)
        for notice in self.choice.notices:
            self.notify(notice)
        # a finite source is read ahead a few frames (every frame is analysed); a live one keeps the newest.
        # Results are always "newest wins": the screen shows at most display_fps of them, and every result
        # has already gone to the listeners (recorder, alerts, serial) on the inference thread.
        lossless = not self.source.live
        self._raw = Slot(lossless, depth=READ_AHEAD if lossless else 1)
        self._results = Slot(lossless=False)
        self._latest_raw: Frame | None = None
        self._last_shown: tuple[Frame | None, Result | None, Result | None] | None = None
        self._no_signal_since: float | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._frozen = threading.Event()
        self.silent_trial = False  # results are computed and recorded, the screen shows only the image
        self.input_warning: str | None = None  # set by the drift monitor
        self._pending_model: tuple | None = None
        self._retry_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._shown_rate = RateMeter()
        self._readout: tuple[float, float | None, float | None] = (-READOUT_S, None, None)  # (t, fps, ms)
        self.t_start_ns = time.monotonic_ns()
        self.t_first_result_shown_ns: int | None = None

    # -- controls (buttons, serial commands) ---------------------------------------------------------
    def set_threshold(self, value: float) -> float:
        """A clinician's threshold, kept within the manifest's bounds; returns what is in force."""
        self.threshold = self.model.manifest.clamp_threshold(value)
        log.info("alert threshold set to %.2f", self.threshold)
        return self.threshold

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
        """Load ``model`` on the same backend chain and swap it in between two frames.

        The new model is fully loaded before the swap; if it fails to load, the old one keeps running.
        """
        self._queue_swap(model, self._open_backend(model))
        m = model.manifest
        self.notify(f"Model {m.id} {m.version} loaded")
        return f"{m.id} {m.version}"

    def _open_backend(self, model: ModelRef, order: list[str] | None = None) -> BackendChoice:
        """The backend chain of this pipeline (configs, devices, threads, engine cache) for ``model``."""
        return self.chain.open(model, order)

    def _queue_swap(self, model: ModelRef, choice: BackendChoice) -> None:
        """Prepare model + backend + pre/post-processing; the inference loop swaps them in between frames."""
        pre = Preprocessor(model.manifest, choice.backend.input)
        post = make_postprocessor(model.manifest, choice.backend.outputs)
        if model.manifest is self.model.manifest:  # the same model on another backend: same gate, history
            stage = self.finding
        else:
            stage = FindingStage(model.manifest, load_gate(model.manifest), live=self.source.live)
        with self._lock:
            self._pending_model = (model, choice, pre, post, stage)

    def _apply_pending_model(self) -> None:
        with self._lock:
            pending, self._pending_model = self._pending_model, None
        if pending is None:
            return
        old = self.choice.backend
        same_model = pending[0].manifest.id == self.model.manifest.id
        self.model, self.choice, self.preprocess, self.postprocess, self.finding = pending
        m = self.model.manifest
        self.threshold = m.clamp_threshold(self.threshold) if same_model else m.alert
        old.close()

    def status(self) -> dict[str, Any]:
        m = self.model.manifest
        c = self.counters
        return {
            "model": m.id,
            "version": m.version,
            "backend": self.choice.backend.name,
            "fps": round(self._shown_rate.rate() or 0.0, 1),
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
            self._messages.appendleft((time.monotonic(), message))

    def messages(self) -> tuple[str, ...]:
        now = time.monotonic()
        with self._lock:
            return tuple(m for t, m in self._messages if now - t < MESSAGE_SECONDS)

    def start(self) -> None:
        self.source.open()
        for d in self.displays:
            d.open()
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
                with self._lock:
                    self.counters.errors += 1
                self.stop()

        return run

    def stop(self) -> None:
        """Ask every thread to finish (safe from a signal handler or any thread)."""
        self._stop.set()
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
        for d in self.displays:
            try:
                d.close()
            except Exception as exc:  # noqa: BLE001 - a display failing at close must not lose the stats
                log.error("closing display: %s", exc)
        self.choice.backend.close()

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
        while not self._stop.is_set():
            try:
                frame = self.source.read()
            except SourceUnavailable as exc:
                if self._no_signal_since is None:
                    self._no_signal_since = time.monotonic()
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
            with self._lock:
                self.counters.frames_in += 1
            self._latest_raw = frame
            self._raw.put((frame, self._prepare(frame)))
        self._raw.put(_END)

    def _prepare(self, frame: Frame) -> Prepared | None:
        """Pre-process on the capture thread, overlapped with the inference of the previous frame.

        Tagged with the preprocessor used: after a model swap or a fall-back to the CPU the inference
        thread does it again for the new input tensor. A frame that cannot be pre-processed is left to the
        inference thread, which reports it like any failed frame. A live frame replaced by a newer one
        before inference takes it was pre-processed for nothing: with a camera faster than the model that
        costs one pre-processing per dropped frame (``frames_dropped``).
        """
        if self.frozen or not self.ai_enabled:
            return None
        pre = self.preprocess
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        try:
            tensor = pre(frame.pixels, out=pre.new_buffer())
        except Exception:  # noqa: BLE001 - reported by the inference thread, which tries again
            return None
        return Prepared(pre, tensor, time.monotonic_ns() - t0, time.thread_time_ns() - c0)

    def no_signal(self) -> bool:
        since = self._no_signal_since
        return since is not None and (time.monotonic() - since) * 1000 >= self.options.no_signal_after_ms

    # -- inference ---------------------------------------------------------------------------------
    def infer(self, frame: Frame, prepared: Prepared | None = None) -> Result:
        """preprocess (unless ``prepared`` by the capture thread) -> invoke -> postprocess, each stage timed."""
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        if prepared is not None and prepared.preprocess is self.preprocess:
            tensor, t1, pre_ns, pre_cpu = prepared.tensor, t0, prepared.ns, prepared.cpu_ns
        else:
            tensor = self.preprocess(frame.pixels)
            t1 = time.monotonic_ns()
            pre_ns, pre_cpu = t1 - t0, time.thread_time_ns() - c0
        try:
            raw = self.choice.backend.invoke(tensor)
        except Exception as exc:  # noqa: BLE001 - an accelerator pulled out mid-run
            if self.choice.backend.name == CPU_BACKEND:
                raise
            self._fall_back_to_cpu(exc)
            tensor = self.preprocess(frame.pixels)
            raw = self.choice.backend.invoke(tensor)  # the same frame, on the CPU
        t2, c2 = time.monotonic_ns(), time.thread_time_ns()
        result = self.postprocess(raw, frame.id, (frame.width, frame.height), self.threshold)
        t3, c3 = time.monotonic_ns(), time.thread_time_ns()
        self.times.add_ns("queue", frame.t_capture_ns, t0)
        self.times.add_ns("preprocess", 0, pre_ns)
        self.times.add_ns("invoke", t1, t2)
        self.times.add_ns("postprocess", t2, t3)
        self.cpu_times.add_ns("preprocess", 0, pre_cpu)
        self.cpu_times.add_ns("postprocess", c2, c3)
        return result

    def _tell_listeners(self, frame: Frame, result: Result) -> None:
        for listener in self.listeners:
            try:
                listener(frame, result)
            except Exception:  # noqa: BLE001
                log.exception("result listener %r failed", listener)

    def decide(self, result: Result, frame: Frame) -> Result:
        """The input gate and the finding rules (size, persistence): what ``result`` is (tasks.finding)."""
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        verdict = self.finding.check_gate(frame)
        out = self.finding(result, frame, verdict)
        self.times.add_ns("gate", t0, time.monotonic_ns())
        self.cpu_times.add_ns("gate", c0, time.thread_time_ns())
        return out

    def _fall_back_to_cpu(self, exc: Exception) -> None:
        """The accelerator failed mid-run: continue on the next backend of the chain (the CPU) now, retry the
        accelerator in the background."""
        failed = self.choice.backend
        choice = self.chain.fall_back(self.model, failed, exc)
        notice = f"{'; '.join(choice.notices)}; retrying every {ACCEL_RETRY_S:g} s"
        log.error("%s", notice)
        cpu = choice.backend
        self.choice = BackendChoice(cpu, [notice])
        self.preprocess = Preprocessor(self.model.manifest, cpu.input)
        self.postprocess = make_postprocessor(self.model.manifest, cpu.outputs)
        self.notify(notice)
        with self._lock:
            self.counters.errors += 1
        try:
            failed.close()
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        if self._retry_thread is None or not self._retry_thread.is_alive():
            self._retry_thread = threading.Thread(
                target=self._retry_accelerator,
                args=(failed.key or failed.name,),
                name="fwapp-accel-retry",
                daemon=True,
            )
            self._retry_thread.start()

    def _retry_accelerator(self, name: str) -> None:
        """Until stopped: try to reopen the accelerator; when it works, swap it in between two frames."""
        while not self._stop.wait(ACCEL_RETRY_S):
            if self.choice.backend.name != CPU_BACKEND:
                return
            try:
                choice = self._open_backend(self.model, [name])
            except Exception as exc:  # noqa: BLE001
                log.info("%s still unavailable: %s", name, exc)
                continue
            self._queue_swap(self.model, choice)
            self.notify(f"{name} is back: running on it again")
            log.warning("%s is back", name)
            return

    def _inference_loop(self) -> None:
        max_frames = self.options.max_frames
        while True:
            item = self._raw.get(timeout=HEARTBEAT_S)
            if self.heartbeat is not None:
                self.heartbeat()  # the loop is alive (the systemd watchdog is fed from here), even with no frames
            if item is _END or self._stop.is_set():
                break
            if item is None:
                continue
            frame, prepared = item
            if self.frozen:
                continue  # the screen holds the frozen image; live frames are not inferred meanwhile
            self._apply_pending_model()
            if not self.ai_enabled:
                off = Result(frame.id, self.model.manifest.task, None, None, state="ai_off")
                self._tell_listeners(frame, off)
                self._results.put((frame, None))
                continue
            try:
                task_result = self.infer(frame, prepared)
                result = self.decide(task_result, frame)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the device
                log.exception("inference failed on frame %d", frame.id)
                self.notify(f"Inference failed on frame {frame.id}: {exc}")
                with self._lock:
                    self.counters.errors += 1
                continue
            with self._lock:
                self.counters.frames_inferred += 1
                self.counters.states[result.state] = self.counters.states.get(result.state, 0) + 1
                n = self.counters.frames_inferred
                # the model's own mask against the phantom's truth (before the finding rules hide it)
                if self.options.score_truth and frame.truth is not None and task_result.mask is not None:
                    self.counters.dice_sum += upscaled_dice(task_result.mask, frame.truth)
                    self.counters.dice_n += 1
            self._tell_listeners(frame, result)
            self._results.put((frame, result))
            if max_frames is not None and n >= max_frames:
                self.source.stop()
                break
        self._results.put(_END)

    # -- presentation ------------------------------------------------------------------------------
    def _state(
        self, frame: Frame | None, result: Result | None, stale: Result | None, pending: bool
    ) -> ScreenState:
        m = self.model.manifest
        now = time.monotonic()
        if now - self._readout[0] >= READOUT_S:  # a readout that changes twice a second can be read
            e2e = self.times.percentiles("e2e")
            self._readout = (now, self._shown_rate.rate(), e2e["p50"] if e2e else None)
        _, fps, latency = self._readout
        return ScreenState(
            frame=frame,
            result=result,
            stale_result=stale,
            no_signal=self.no_signal(),
            ai_pending=pending and self.ai_enabled,
            ai_off=not self.ai_enabled,
            not_for_diagnostic=not m.cleared_for_clinical_use,
            fallback_notice=self.choice.notices[0] if self.choice.notices else None,
            model_id=m.id,
            model_version=m.version,
            backend=self.choice.backend.name,
            task=m.task,
            fps=fps,
            latency_ms=latency,
            threshold=self.threshold,
            messages=self.messages(),
            frozen=self.frozen,
            silent_trial=self.silent_trial,
            input_warning=self.input_warning,
            gate_installed=self.finding.gate is not None,
        )

    def _show_item(self, item: tuple[Frame, Result | None]) -> None:
        """A frame with its own result (or alone, with AI off)."""
        frame, result = item
        self._show(self._state(frame, result, None, False), frame)

    def _show(self, state: ScreenState, frame: Frame | None) -> None:
        self._last_shown = (frame, state.result, state.stale_result)
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        canvas = self.screen.render(state)
        t1, c1 = time.monotonic_ns(), time.thread_time_ns()
        for d in list(self.displays):
            try:
                d.show(canvas)
            except Exception as exc:  # noqa: BLE001 - a broken display must not stop inference
                self.displays.remove(d)
                msg = f"Display {d.uri} failed ({exc}); it is no longer used"
                log.error("%s", msg)
                self.notify(msg)
                with self._lock:
                    self.counters.errors += 1
        t2 = time.monotonic_ns()
        self.times.add_ns("render", t0, t1)
        self.times.add_ns("display", t1, t2)
        self.cpu_times.add_ns("render", c0, c1)
        self.cpu_times.add_ns("display", c1, time.thread_time_ns())
        self._shown_rate.tick(t2)
        with self._lock:
            self.counters.frames_shown += 1
        if frame is not None:
            self.times.add_ns("e2e", frame.t_capture_ns, t2)
        if state.result is not None and self.t_first_result_shown_ns is None:
            self.t_first_result_shown_ns = t2

    def _present_loop(self) -> None:
        """Show each result on its own frame, at most at the display's refresh rate.

        After a picture, this thread sleeps until the screen can take the next one; results that arrive
        meanwhile replace each other in the slot without waking it (counted in results_not_shown): the
        screen cannot show more, and rendering or even waking up for what nobody sees would take CPU from
        the model. A finite run's last result is always shown.
        """
        stale_s = self.options.stale_after_ms / 1000.0
        period = 1.0 / max(self.options.display_fps, 1.0)
        min_gap = 0.8 * period  # absorbs the jitter of a source running at the display's rate
        last_result: Result | None = None
        last_result_t = time.monotonic()
        last_show_t = -min_gap
        last_shown_id = -1
        last_idle_show = 0.0  # when the NO SIGNAL screen was last refreshed
        shown_frozen = False
        while True:
            rest = last_show_t + min_gap - time.monotonic()
            if rest > 0:
                self._stop.wait(rest)
            item = self._results.get(timeout=period)
            if item is _END:
                break
            now = time.monotonic()
            if self.frozen:
                if not shown_frozen and self._last_shown is not None:  # the same picture, marked FROZEN
                    frame, result, stale = self._last_shown
                    self._show(self._state(frame, result, stale, False), None)
                    shown_frozen = True
                continue
            if shown_frozen:
                shown_frozen = False
                last_result_t = now  # the model needs a moment after unfreezing: not "pending" yet
            if item is not None:
                if item[1] is not None:
                    last_result, last_result_t = item[1], now
                self._show_item(item)
                last_shown_id, last_show_t = item[0].id, now
                continue
            if self._stop.is_set():
                break
            # nothing new from inference in this period
            raw = self._latest_raw
            if self.no_signal():
                if now - last_idle_show >= NO_SIGNAL_REFRESH_S:
                    self._show(self._state(None, None, last_result, False), None)
                    last_idle_show = now
            elif raw is not None and raw.id > last_shown_id and now - last_result_t >= stale_s:
                self._show(self._state(raw, None, last_result, True), raw)
                last_shown_id = raw.id
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
            "fps": round(self._shown_rate.rate() or 0.0, 2),
            "notices": list(self.choice.notices),
        }
        if self.t_first_result_shown_ns is not None:
            out["first_result_s"] = round((self.t_first_result_shown_ns - self.t_start_ns) / 1e9, 3)
        if c.dice_n:
            out["dice"] = round(c.dice_sum / c.dice_n, 4)
            out["dice_frames"] = c.dice_n
        return out


def build_pipeline(
    board: BoardConfig,
    model: ModelRef,
    source_uri: str | None = None,
    display_uris: list[str] | None = None,
    max_frames: int | None = None,
    accelerator: Any = None,
    engine_cache: str | None = None,
) -> Pipeline:
    """source -> preprocess -> backend -> task -> screen -> displays, from a board config."""
    source = open_source(source_uri or board.source["uri"], board.profile, board.source)
    chain = BackendChain.from_board(
        board,
        devices={"edgetpu": accelerator} if accelerator is not None else None,
        engine_cache=engine_cache,
        data_dir=str(Path(engine_cache).parent) if engine_cache else None,  # engines/ lives in the data dir
    )
    choice = chain.open(model)
    size = (board.display["width"], board.display["height"])
    fps = float(board.display["fps"])
    uris = display_uris or [board.display["uri"]]
    # a framebuffer dictates the screen size; every other display takes it from there
    displays, notices = [], []
    for uri in (u for u in uris if u.startswith("fb:")):
        try:
            displays.append(open_display(uri, size=size, fps=fps))
        except BadDisplay as exc:
            if Path(uri[3:]).exists():
                raise
            # the screen is unplugged or absent: keep running headless (captures, serial, alerts go on)
            notices.append(f"Display {uri} missing ({exc}); running headless")
            log.error("%s", notices[-1])
    if displays:
        size = displays[0].size
    displays += [open_display(u, size=size, fps=fps) for u in uris if not u.startswith("fb:")]
    p = board.pipeline
    options = PipelineOptions(
        max_frames=max_frames,
        stale_after_ms=float(p["stale_after_ms"]),
        no_signal_after_ms=float(p["no_signal_after_ms"]),
        stats_window=int(p["stats_window"]),
        display_fps=fps,
    )
    pipeline = Pipeline(
        source,
        model,
        choice,
        Screen(*size),
        displays,
        options,
        chain=chain,
    )
    for notice in notices:
        pipeline.notify(notice)
    return pipeline
