from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_app.backends import BackendChain, BackendChoice
from firmware_app.backends.base import Backend
from firmware_app.backends.litert import LiteRTBackend
from firmware_app.config import load_board
from firmware_app.display.screen import Screen
from firmware_app.display.sinks import open_display
from firmware_app.models.store import find_model
from firmware_app.pipeline import _END, Pipeline, PipelineOptions, Slot, build_pipeline
from firmware_app.sources import open_source
from firmware_app.sources.v4l2 import MockCapture, V4l2Source


class SlowBackend(Backend):
    """Wraps a real backend and makes invoke slower, like a big model on a small board."""

    def __init__(self, inner: Backend, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.name, self.threads = inner.name, inner.threads
        self.input, self.outputs = inner.input, inner.outputs
        self.calls = 0

    def invoke(self, tensor):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.invoke(tensor)


class RecordingScreen(Screen):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.states = []

    def render(self, state):
        self.states.append(state)
        return super().render(state)


def make(model_dir, source, delay_s=0.0, max_frames=None, **opts) -> Pipeline:
    model = find_model(str(model_dir))
    backend = LiteRTBackend(model.tflite, threads=1)
    if delay_s:
        backend = SlowBackend(backend, delay_s)
    src = open_source(source) if isinstance(source, str) else source
    return Pipeline(
        src,
        model,
        BackendChoice(backend),
        RecordingScreen(320, 240),
        [open_display("null", size=(320, 240))],
        PipelineOptions(max_frames=max_frames, **opts),
    )


def test_slot_lossy_keeps_newest_and_counts_drops():
    s = Slot(lossless=False)
    for i in range(5):
        s.put(i)
    assert s.get(0) == 4 and s.dropped == 4 and s.get(0.01) is None
    s.put(9)
    threading.Timer(0.05, s.get).start()
    s.put(_END)  # the end marker waits for the real item to be taken instead of replacing it
    assert s.get(1) is _END and s.dropped == 4


def test_slot_lossless_blocks_until_taken():
    s = Slot(lossless=True)
    s.put(1)
    done = threading.Event()
    threading.Thread(target=lambda: (s.put(2), done.set()), daemon=True).start()
    assert not done.wait(0.1)
    assert s.get(0) == 1 and done.wait(1) and s.get(0) == 2


def test_slot_lossless_refills_in_bursts():
    """A full read-ahead queue wakes its producer only when half of it has been taken."""
    s = Slot(lossless=True, depth=4)
    for i in range(4):
        s.put(i)
    put_done = threading.Event()
    threading.Thread(target=lambda: (s.put(4), put_done.set()), daemon=True).start()
    assert not put_done.wait(0.1)
    assert s.get(0) == 0 and not put_done.wait(0.1)  # 3 left: the producer sleeps on
    assert s.get(0) == 1 and put_done.wait(1)  # 2 left: half taken, it refills
    assert [s.get(0) for _ in range(3)] == [2, 3, 4] and s.get(0.01) is None


class SpyPreprocess:
    """Records the thread each pre-processing runs on; otherwise the real one."""

    def __init__(self, inner):
        self.inner, self.threads = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, pixels, out=None):
        self.threads.append(threading.current_thread().name)
        return self.inner(pixels, out=out)


def test_rolling_times_takes_a_frames_stages_at_once_as_one_by_one():
    from firmware_app.stats import RollingTimes

    one, many = RollingTimes(3), RollingTimes(3)
    for i in range(5):
        spans = (("queue", 0, 1_500_000 * i), ("invoke", 10, 10 + 2_000_000), ("queue", 7, 7))
        for span in spans:
            one.add_ns(*span)
        many.add_ns_many(*spans)
    assert list(many.summary()) == ["queue", "invoke"]  # first seen, first listed
    assert many.summary() == one.summary()
    assert many.samples("queue") == one.samples("queue") == [0.0, 6.0, 0.0]  # the window's newest


def test_preprocessing_runs_on_the_capture_thread_while_the_model_runs(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=0&width=160&height=120", max_frames=12)
    spy = p.inference.preprocess = SpyPreprocess(p.preprocess)
    stats = p.run()
    assert stats["frames_inferred"] == 12 and stats["errors"] == 0
    assert spy.threads and set(spy.threads) == {"fwapp-capture"}
    assert stats["cpu_ms"]["preprocess"]["p50"] > 0 and stats["cpu_ms"]["postprocess"]["p50"] > 0


def test_a_frame_prepared_for_a_replaced_preprocessor_is_prepared_again(float_model_dir):
    """After a model swap or a CPU fall-back the old tensor may not fit: the inference thread redoes it."""
    p = make(float_model_dir, "synthetic:ultrasound?fps=0&width=160&height=120")
    src = p.source
    src.open()
    frame = src.read()
    old = p._prepare(frame)
    assert old is not None and old.preprocess is p.preprocess
    spy = p.inference.preprocess = SpyPreprocess(p.preprocess)
    result = p.infer(frame, old)
    assert spy.threads == [threading.current_thread().name]  # done again, here
    assert result.frame_id == frame.id
    fresh = p._prepare(frame)  # made by the preprocessor in force: used as it is, not made a third time
    assert p.infer(frame, fresh).frame_id == frame.id and len(spy.threads) == 2
    src.close()


def test_pipeline_runs_frames_and_every_overlay_is_on_its_own_frame(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?seed=3&fps=0", max_frames=12)
    stats = p.run()
    assert stats["frames_inferred"] == 12 and stats["errors"] == 0
    assert stats["mismatched_overlays"] == 0
    assert 0.0 <= stats["dice"] <= 1.0 and stats["dice_frames"] == 12
    shown = [s for s in p.screen.states if s.result is not None]
    assert shown and all(s.result.frame_id == s.frame.id for s in shown)
    for stage in ("preprocess", "invoke", "postprocess", "render", "e2e"):
        assert stats["stages_ms"][stage]["p50"] >= 0


def test_finite_source_processes_every_frame(float_model_dir, tmp_path: Path):
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((60, 80), i * 30, np.uint8))
    p = make(float_model_dir, f"images:{tmp_path}", delay_s=0.02)
    stats = p.run()
    assert stats["frames_in"] == stats["frames_inferred"] == 6 and stats["frames_dropped"] == 0
    assert sorted({s.frame.id for s in p.screen.states if s.result}) == list(range(6))


def test_slow_model_never_works_through_a_backlog(float_model_dir):
    # a 120 fps probe and a model that needs 60 ms: inference takes the newest frame, older ones are dropped
    p = make(float_model_dir, "synthetic:ultrasound?fps=120&width=160&height=120", delay_s=0.06, max_frames=8)
    stats = p.run()
    assert stats["frames_inferred"] == 8
    assert stats["frames_dropped"] > 8
    assert stats["stages_ms"]["queue"]["p50"] < 30  # a frame waits at most one capture period, not a backlog
    assert stats["mismatched_overlays"] == 0


def test_frames_shown_before_their_result_are_marked_pending_never_overlaid(float_model_dir):
    p = make(
        float_model_dir,
        "synthetic:ultrasound?fps=60&width=160&height=120",
        delay_s=0.25,
        max_frames=3,
        stale_after_ms=50,
    )
    p.run()
    pending = [s for s in p.screen.states if s.ai_pending]
    assert pending, "live frames should be shown while the model is busy"
    assert all(s.result is None for s in pending)
    assert any(s.stale_result is not None for s in pending)  # the last finding is kept, marked stale
    assert all(s.result.frame_id == s.frame.id for s in p.screen.states if s.result is not None)


def test_unplugged_capture_shows_no_signal_and_recovers(float_model_dir):
    cap = MockCapture(160, 120, plugged=False)
    src = V4l2Source("v4l2:/dev/video0", cap, reconnect_s=0.05)
    p = make(float_model_dir, src, max_frames=3, no_signal_after_ms=100)
    p.start()
    t0 = time.monotonic()
    while not any(s.no_signal for s in p.screen.states) and time.monotonic() - t0 < 2:
        time.sleep(0.02)
    assert any(s.no_signal and s.frame is None for s in p.screen.states)
    assert time.monotonic() - t0 < 1.0
    cap.plugged = True
    assert p.wait(5)
    p.close()
    assert p.stats()["frames_inferred"] == 3


def test_stop_ends_an_endless_run_quickly(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=30&width=160&height=120")
    p.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    p.stop()
    assert p.wait(2)
    p.close()
    assert time.monotonic() - t0 < 2.0


def test_ai_off_shows_live_frames_without_inference(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=0&width=160&height=120", max_frames=None)
    p.ai_enabled = False
    p.start()
    time.sleep(0.3)
    p.close()
    assert p.counters.frames_inferred == 0
    assert p.screen.states and all(s.ai_off and s.result is None for s in p.screen.states)


def test_threshold_stays_in_manifest_bounds(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=0")
    assert p.set_threshold(0.05) == 0.3 and p.set_threshold(2.0) == 0.9 and p.set_threshold(0.42) == 0.42


def test_build_pipeline_from_board_config(float_model_dir, tmp_path: Path):
    board = load_board("x86-dev")
    model = find_model(str(float_model_dir))
    p = build_pipeline(board, model, "synthetic:xray?fps=0", [f"png:{tmp_path}"], max_frames=2)
    stats = p.run()
    assert stats["frames_inferred"] == 2 and (tmp_path / "last_frame.png").is_file()
    img = cv2.imread(str(tmp_path / "last_frame.png"))
    assert img.shape == (480, 800, 3)


@pytest.mark.parametrize("bad_display", ["hdmi:0", "png:"])
def test_bad_display_uri_is_bad_input(float_model_dir, bad_display):
    from firmware_app.errors import BadDisplay

    with pytest.raises(BadDisplay):
        build_pipeline(
            load_board("x86-dev"), find_model(str(float_model_dir)), "synthetic:xray", [bad_display]
        )


def wait_for(pred, timeout=3.0):
    t0 = time.monotonic()
    while not pred() and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    return pred()


def test_freeze_holds_the_picture_and_unfreeze_resumes(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=30&width=160&height=120")
    p.start()
    assert wait_for(lambda: p.counters.frames_inferred >= 2)
    p.freeze()
    assert wait_for(lambda: any(s.frozen for s in p.screen.states))
    frozen_state = next(s for s in p.screen.states if s.frozen)
    n_inferred, n_states = p.counters.frames_inferred, len(p.screen.states)
    time.sleep(0.3)
    assert p.counters.frames_inferred <= n_inferred + 1  # at most the frame already in flight
    assert len(p.screen.states) == n_states  # nothing new drawn while frozen
    assert frozen_state.result is None or frozen_state.result.frame_id == frozen_state.frame.id
    p.unfreeze()
    assert wait_for(lambda: p.counters.frames_inferred > n_inferred + 2)
    p.close()
    assert p.stats()["mismatched_overlays"] == 0


def test_switch_model_swaps_between_frames(float_model_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(float_model_dir, other)
    text = (other / "manifest.toml").read_text().replace('id = "selfie-seg"', 'id = "selfie-two"')
    (other / "manifest.toml").write_text(text.replace("alert = 0.5", "alert = 0.6"))
    p = make(float_model_dir, "synthetic:ultrasound?fps=30&width=160&height=120")
    p.start()
    assert wait_for(lambda: p.counters.frames_inferred >= 1)
    assert p.switch_model(find_model(str(other))) == "selfie-two 0.10.18"
    assert wait_for(lambda: p.status()["model"] == "selfie-two")
    assert p.status()["threshold"] == 0.6
    assert wait_for(lambda: any(s.model_id == "selfie-two" for s in p.screen.states))
    p.close()
    assert p.stats()["errors"] == 0


def test_status_reports_the_controls(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=0")
    p.set_ai(False)
    p.set_threshold(0.7)
    st = p.status()
    assert st["model"] == "selfie-seg" and st["ai"] is False and st["threshold"] == 0.7 and not st["frozen"]


def test_inference_loop_heartbeat_continues_without_frames(float_model_dir):
    cap = MockCapture(160, 120, plugged=False)  # NO SIGNAL: no frames at all
    p = make(float_model_dir, V4l2Source("v4l2:0", cap, reconnect_s=0.05))
    beats = []
    p.heartbeat = lambda: beats.append(time.monotonic())
    p.start()
    time.sleep(1.3)
    p.close()
    assert len(beats) >= 2  # fed at least every 0.5 s although no frame came


def test_hung_model_stops_the_heartbeat(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=30&width=160&height=120", delay_s=3.0)
    beats = []
    p.heartbeat = lambda: beats.append(time.monotonic())
    p.start()
    time.sleep(1.5)
    n = len(beats)
    time.sleep(1.0)
    assert len(beats) == n  # stuck in invoke: no beats, so systemd's watchdog would restart the service
    p.stop()


class UnpluggedAccelerator(Backend):
    """An Edge TPU that works for ``n_ok`` invokes and then fails, as a USB accelerator knocked loose does."""

    def __init__(self, inner: Backend, n_ok: int) -> None:
        self.inner, self.n_ok, self.calls = inner, n_ok, 0
        self.name, self.threads = "edgetpu", inner.threads
        self.input, self.outputs = inner.input, inner.outputs

    def invoke(self, tensor):
        self.calls += 1
        if self.calls > self.n_ok:
            raise RuntimeError("Failed to invoke: USB transfer error")
        return self.inner.invoke(tensor)


def test_accelerator_failing_mid_run_falls_back_to_cpu_then_returns(float_model_dir, monkeypatch):
    import firmware_app.inference as pipeline_mod
    from firmware_app.backends.edgetpu import MockEdgeTpu

    monkeypatch.setattr(pipeline_mod, "ACCEL_RETRY_S", 0.3)
    (float_model_dir / "model_edgetpu.tflite").write_bytes((float_model_dir / "model.tflite").read_bytes())
    model = find_model(str(float_model_dir))
    accel = UnpluggedAccelerator(LiteRTBackend(model.tflite, threads=1), n_ok=3)
    p = Pipeline(
        open_source("synthetic:ultrasound?fps=30&width=160&height=120"),
        model,
        BackendChoice(accel),
        RecordingScreen(320, 240),
        [open_display("null", size=(320, 240))],
        PipelineOptions(),
        chain=BackendChain(("edgetpu", "cpu"), threads=1, devices={"edgetpu": MockEdgeTpu(present=False)}),
    )  # the Edge TPU is still unplugged when first retried
    p.start()
    try:
        assert wait_for(lambda: p.choice.backend.name == "litert-cpu", timeout=3)
        t_fail = time.monotonic()
        assert wait_for(
            lambda: any(s.fallback_notice and s.backend == "litert-cpu" for s in p.screen.states), 1.0
        )
        assert time.monotonic() - t_fail < 1.0  # the banner is up within a second
        n = p.counters.frames_inferred
        assert wait_for(lambda: p.counters.frames_inferred > n + 3)  # inference goes on, on the CPU
        p.chain.devices["edgetpu"] = MockEdgeTpu(present=True)  # plugged back in
        assert wait_for(lambda: p.choice.backend.name == "edgetpu", timeout=3)
        assert wait_for(lambda: p.screen.states[-1].fallback_notice is None)
    finally:
        p.close()
    assert p.stats()["mismatched_overlays"] == 0


def test_missing_framebuffer_keeps_running_headless(float_model_dir, tmp_path):
    board = load_board("x86-dev")
    p = build_pipeline(
        board, find_model(str(float_model_dir)), "synthetic:ultrasound?fps=0", ["fb:/dev/fb7"], max_frames=3
    )
    stats = p.run()
    assert stats["frames_inferred"] == 3
    assert any("fb:/dev/fb7 missing" in m and "headless" in m for m in p.messages())


class BrokenDisplay:
    uri, scheme, size = "fb:/dev/fb0", "fb", (320, 240)

    def open(self):
        pass

    def show(self, canvas):
        raise OSError(5, "Input/output error")

    def close(self):
        pass


def test_display_failing_mid_run_is_dropped_and_inference_continues(float_model_dir):
    p = make(float_model_dir, "synthetic:ultrasound?fps=0&width=160&height=120", max_frames=6)
    p.displays.append(BrokenDisplay())
    stats = p.run()
    assert stats["frames_inferred"] == 6 and stats["errors"] == 1  # logged once, then headless on that one
    assert any("Display fb:/dev/fb0 failed" in m for m in p.messages())


def test_malformed_frames_are_skipped_and_counted(float_model_dir, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((60, 80), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((1, 80), 100, np.uint8))  # one row: not an image
    cv2.imwrite(str(tmp_path / "c.png"), np.full((60, 80), 50, np.uint8))
    p = make(float_model_dir, f"images:{tmp_path}")
    stats = p.run()
    assert stats["frames_inferred"] == 2 and stats["frames_rejected"] == 1
    assert any("b.png" in m or "frame skipped" in m for m in p.messages())


def test_frame_of_another_size_than_the_crop_is_skipped(float_model_dir):
    from firmware_app.sources.profile import SourceProfile

    cap = MockCapture(160, 120)
    src = V4l2Source("v4l2:0", cap, profile=SourceProfile(crop_rect=(10, 10, 100, 80)))
    p = make(float_model_dir, src)
    p.start()
    try:
        assert wait_for(lambda: p.counters.frames_inferred >= 1)
        cap.width, cap.height = 64, 48  # the scanner switched its video mode
        assert wait_for(lambda: p.counters.frames_rejected >= 2)
        cap.width, cap.height = 160, 120
        n = p.counters.frames_inferred
        assert wait_for(lambda: p.counters.frames_inferred > n + 1)  # and back: analysed again
    finally:
        p.close()
    assert any("frame skipped" in m for m in p.messages())


def test_a_closed_pipeline_is_freed_at_once_not_at_the_next_garbage_collection(float_model_dir):
    """A bench or a model test runs many pipelines in one process: each one's frames, tensors and
    interpreter must go when it is closed (no reference cycle keeps them)."""
    import gc
    import weakref

    p = make(float_model_dir, "synthetic:ultrasound?fps=0&width=160&height=120", max_frames=5)
    p.run()
    ref = weakref.ref(p)
    gc.disable()
    try:
        del p
        assert ref() is None
    finally:
        gc.enable()
