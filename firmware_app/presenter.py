"""The presenter: what the screen shows, and when — each result on its own frame, at the display's rate.

It turns the pipeline's state (a new result, a live frame with its result still pending, a stale result,
no signal, a frozen image, AI off, the AI paused by the input gate) into a ``ScreenState``, renders it and
hands the canvas to every display. A display that fails is dropped (announced), never the pipeline.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from firmware_app.display.screen import Screen, ScreenState
from firmware_app.display.sinks import Display
from firmware_app.stats import RateMeter
from firmware_app.types import Frame, Result

if TYPE_CHECKING:
    from firmware_app.pipeline import Pipeline

log = logging.getLogger(__name__)

NO_SIGNAL_REFRESH_S = 0.5
READOUT_S = 0.5  # the screen's frame rate and latency readout is refreshed this often


class Presenter:
    def __init__(self, screen: Screen, displays: list[Display]) -> None:
        self.screen = screen
        self.displays = displays
        self.shown_rate = RateMeter()
        self._readout: tuple[float, float | None, float | None] = (-READOUT_S, None, None)  # (t, fps, ms)
        self._last_shown: tuple[Frame | None, Result | None, Result | None] | None = None
        self.t_first_result_shown_ns: int | None = None
        self.p: Any = None  # the pipeline it presents (bind)

    def bind(self, pipeline: Pipeline) -> None:
        self.p = pipeline

    def open(self) -> None:
        for d in self.displays:
            d.open()

    def close(self) -> None:
        for d in self.displays:
            try:
                d.close()
            except Exception as exc:  # noqa: BLE001 - a display failing at close must not lose the stats
                log.error("closing display: %s", exc)

    # -- one picture --
    def state(
        self, frame: Frame | None, result: Result | None, stale: Result | None, pending: bool
    ) -> ScreenState:
        p = self.p
        stage = p.inference
        m = stage.model.manifest
        now = time.monotonic()
        if now - self._readout[0] >= READOUT_S:  # a readout that changes twice a second can be read
            e2e = p.times.percentiles("e2e")
            self._readout = (now, self.shown_rate.rate(), e2e["p50"] if e2e else None)
        _, fps, latency = self._readout
        choice = stage.choice
        return ScreenState(
            frame=frame,
            result=result,
            stale_result=stale,
            no_signal=p.no_signal(),
            ai_pending=pending and p.ai_enabled,
            ai_off=not p.ai_enabled,
            not_for_diagnostic=not m.cleared_for_clinical_use,
            fallback_notice=choice.notices[0] if choice.notices else None,
            model_id=m.id,
            model_version=m.version,
            backend=choice.backend.name,
            task=m.task,
            fps=fps,
            latency_ms=latency,
            threshold=stage.threshold,
            messages=p.messages(),
            frozen=p.frozen,
            silent_trial=p.silent_trial,
            input_warning=p.input_warning,
            gate_installed=stage.finding.gate is not None,
        )

    def show(self, state: ScreenState, frame: Frame | None) -> None:
        p = self.p
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
                p.notify(msg)
                p.count_error()
        t2 = time.monotonic_ns()
        p.times.add_ns("render", t0, t1)
        p.times.add_ns("display", t1, t2)
        p.cpu_times.add_ns("render", c0, c1)
        p.cpu_times.add_ns("display", c1, time.thread_time_ns())
        self.shown_rate.tick(t2)
        p.count_shown()
        if frame is not None:
            p.times.add_ns("e2e", frame.t_capture_ns, t2)
        if state.result is not None and self.t_first_result_shown_ns is None:
            self.t_first_result_shown_ns = t2

    # -- the loop --
    def run(self, results: Any, end: object) -> None:
        """Show each result on its own frame, at most at the display's refresh rate.

        After a picture, this thread sleeps until the screen can take the next one; results that arrive
        meanwhile replace each other in the slot without waking it (counted in results_not_shown): the
        screen cannot show more, and rendering or even waking up for what nobody sees would take CPU from
        the model. A finite run's last result is always shown.
        """
        p = self.p
        opts = p.options
        stale_s = opts.stale_after_ms / 1000.0
        period = 1.0 / max(opts.display_fps, 1.0)
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
                p.stopped.wait(rest)
            item = results.get(timeout=period)
            if item is end:
                break
            now = time.monotonic()
            if p.frozen:
                if not shown_frozen and self._last_shown is not None:  # the same picture, marked FROZEN
                    frame, result, stale = self._last_shown
                    self.show(self.state(frame, result, stale, False), None)
                    shown_frozen = True
                continue
            if shown_frozen:
                shown_frozen = False
                last_result_t = now  # the model needs a moment after unfreezing: not "pending" yet
            if item is not None:
                frame, result = item
                if result is not None:
                    last_result, last_result_t = result, now
                self.show(self.state(frame, result, None, False), frame)
                last_shown_id, last_show_t = frame.id, now
                continue
            if p.stopped.is_set():
                break
            # nothing new from inference in this period
            raw = p.latest_raw
            if p.no_signal():
                if now - last_idle_show >= NO_SIGNAL_REFRESH_S:
                    self.show(self.state(None, None, last_result, False), None)
                    last_idle_show = now
            elif raw is not None and raw.id > last_shown_id and now - last_result_t >= stale_s:
                self.show(self.state(raw, None, last_result, True), raw)
                last_shown_id = raw.id
