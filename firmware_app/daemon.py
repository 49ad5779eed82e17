"""The appliance: the pipeline plus everything around it on a device.

    boot check (roll back a crash-looping update) -> pipeline (source -> model -> screen)
      + recorder (captures, disagree marks, studies)       + drift monitor (INPUT UNLIKE TRAINING DATA)
      + buttons and lights (gpio)   + serial link           + staged-update pickup (USB stick)
      + audit log with signed checkpoints                   + systemd notify and watchdog

``Daemon`` is also the ``Controls`` the buttons and the serial commands act on. Every piece but the
pipeline is optional: a missing GPIO chip, serial port or writable data dir is announced on screen and in
the log, and the box keeps showing images.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from firmware_app.config import BoardConfig
from firmware_app.device.sdnotify import Notifier, Watchdog
from firmware_app.errors import FirmwareAppError
from firmware_app.models.store import ModelRef, find_model
from firmware_app.pipeline import Pipeline, build_pipeline
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

STAGING_POLL_S = 5.0
HEALTHY_AFTER_S = 60.0  # a model on trial after an update is confirmed after this long without trouble


def _data_dir_usable(data_dir: Path) -> str | None:
    """None when the data dir can be used, else why not."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {data_dir} ({exc.strerror})"
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return f"{data_dir} is not writable"
    return None


class Daemon:
    def __init__(
        self,
        board: BoardConfig,
        data_dir: str | Path,
        model_ref: str | None = None,
        source_uri: str | None = None,
        display_uris: list[str] | None = None,
        max_frames: int | None = None,
        capture_every: int = 0,
        silent_trial: bool | None = None,
        notifier: Notifier | None = None,
        pin_factory: Any = None,
        serial_opener: Any = None,
        accelerator: Any = None,
        results_path: str | Path | None = None,
    ) -> None:
        if results_path is not None:
            from firmware_app.records.results_stream import ResultsStream

            ResultsStream.check_writable(results_path)  # before any work starts
        self.board = board
        self.data_dir = Path(data_dir)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        problem = _data_dir_usable(self.data_dir)
        self.audit = None
        boot_messages: list[str] = []
        if problem is None:
            from firmware_app.audit import AuditLog
            from firmware_app.update.install import boot_check

            self.audit = AuditLog(self.data_dir)
            try:
                boot_messages = boot_check(self.data_dir, board)
            except (FirmwareAppError, OSError) as exc:
                log.error("boot check failed: %s", exc)
                boot_messages = [f"Update boot check failed: {exc}"]
        model = find_model(model_ref or board.model["id"], self.data_dir)
        self.pipeline: Pipeline = build_pipeline(
            board,
            model,
            source_uri,
            display_uris,
            max_frames,
            accelerator=accelerator,
            engine_cache=str(self.data_dir / "engines") if problem is None else None,
        )
        p = self.pipeline
        for message in boot_messages:
            p.notify(message)
        if problem is not None:
            p.notify(f"Data dir {problem}: captures, updates and the audit log are off")
            log.error("data dir %s: captures, updates and the audit log are off", problem)

        # systemd: ready once running, watchdog fed from the inference loop
        self.notifier = notifier or Notifier()
        self.watchdog = Watchdog(self.notifier)
        p.heartbeat = self.watchdog.alive

        # records: captures, disagree marks, studies; checkpoints of the audit log
        self.recorder = None
        self.checkpointer = None
        if self.audit is not None:
            from firmware_app.records.captures import Recorder
            from firmware_app.records.checkpoints import Checkpointer

            modality = "DX" if "xray" in (source_uri or board.source["uri"]) else None
            self.recorder = Recorder(
                self.data_dir, audit=self.audit, capture_every=capture_every, modality=modality
            )
            self.recorder.attach(p)
            self.checkpointer = Checkpointer(self.data_dir, self.audit)
        self.silent_trial = bool(board.pipeline["silent_trial"] if silent_trial is None else silent_trial)
        p.silent_trial = self.silent_trial
        if self.recorder is not None and self.silent_trial:
            self.recorder.set_silent_trial(True)

        # input drift against the model's reference statistics
        self.drift = None
        self._setup_drift(model)
        p.listeners.append(self._on_result)

        # the per-frame results stream for integrators (run --results FILE)
        self.results = None
        if results_path is not None:
            from firmware_app.records.results_stream import ResultsStream

            self.results = ResultsStream(results_path, self._describe)
            p.listeners.append(self.results.on_result)

        # buttons, lights and the serial link, when the board has them
        self.panel = None
        self.link = None
        if board.gpio is not None:
            from firmware_app.device.gpio import GpioPanel, GpioUnavailable

            try:
                self.panel = GpioPanel(board.gpio, self, pin_factory=pin_factory)
                p.listeners.append(self.panel.on_result)
            except GpioUnavailable as exc:
                log.warning("%s", exc)
                p.notify(str(exc))
        if board.serial is not None:
            from firmware_app.device.serial_link import SerialLink, SerialUnavailable

            try:
                self.link = SerialLink(board.serial, self, opener=serial_opener)
                p.listeners.append(self.link.on_result)
            except SerialUnavailable as exc:
                log.warning("%s", exc)
                p.notify(str(exc))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        p = self.pipeline
        m = p.model.manifest
        bundle = ""
        if p.model.origin == "installed":
            import hashlib

            try:
                bundle = (
                    f" (installed, sha256 {hashlib.sha256(p.model.tflite.read_bytes()).hexdigest()[:16]})"
                )
            except OSError:
                bundle = " (installed)"
        logging.getLogger("firmware_app.start").info(  # shown at every level (logsetup)
            "start: board %s; model %s@%s%s; backend %s; source %s; display %s; data dir %s",
            self.board.name,
            m.id,
            m.version,
            bundle,
            p.choice.backend.name,
            p.source.uri,
            ", ".join(d.uri for d in p.displays) or "none",
            self.data_dir,
        )
        self._audit(
            "start",
            board=self.board.name,
            model=m.id,
            version=m.version,
            backend=p.choice.backend.name,
            source=p.source.scheme,
        )
        for notice in p.choice.notices:
            self._audit("fault", what="backend fallback", detail=notice)
        if self.checkpointer is not None:
            self.checkpointer.start()
        if self.recorder is not None:
            self.recorder.start()
        if self.results is not None:
            self.results.start()
        p.start()
        if self.panel is not None:
            self.panel.start()
            self.panel.set_status("running")
        if self.link is not None:
            self.link.start()
        if self.audit is not None:
            self._spawn(self._update_worker, "updates")
        self.notifier.ready(f"{m.id} {m.version} on {p.choice.backend.name}")
        self.watchdog.start()

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=f"fwapp-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        """Ask everything to stop (signal handlers call this)."""
        self._stop.set()
        self.pipeline.stop()

    def close(self) -> None:
        self.notifier.stopping()
        self.watchdog.stop()
        self._stop.set()
        self.pipeline.close()
        for t in self._threads:
            t.join(2.0)
        if self.link is not None:
            self.link.stop()
        if self.panel is not None:
            self.panel.set_status("off")
            self.panel.close()
        if self.recorder is not None:
            self.recorder.close()
        if self.results is not None:
            self.results.close()
        stats = self.pipeline.stats()
        self._audit(
            "stop",
            frames=stats["frames_inferred"],
            errors=stats["errors"],
            mismatched_overlays=stats["mismatched_overlays"],
        )
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.notifier.close()

    def run(self) -> dict[str, Any]:
        self.start()
        try:
            self.pipeline.wait()
        finally:
            self.close()
        return self.pipeline.stats()

    # -- background work ---------------------------------------------------------------------------
    def _update_worker(self) -> None:
        """Install bundles staged from a USB stick; confirm an updated model once it has run well."""
        from firmware_app.update.install import mark_good
        from firmware_app.update.staging import process_staged

        started = time.monotonic()
        confirmed = False
        while not self._stop.wait(STAGING_POLL_S):
            try:
                for outcome in process_staged(self.data_dir, self.board, progress=self.pipeline.notify):
                    running = self.pipeline.model.manifest.id
                    if outcome.status == "installed" and outcome.model_id == running:
                        self.switch_model(running)
                if not confirmed and time.monotonic() - started >= HEALTHY_AFTER_S:
                    if self.pipeline.counters.frames_inferred > 0:
                        mark_good(self.data_dir, self.pipeline.model.manifest.id)
                        confirmed = True
            except (FirmwareAppError, OSError) as exc:
                log.error("update pickup: %s", exc)
                self.pipeline.notify(f"Update failed: {exc}")

    def _setup_drift(self, model: ModelRef) -> None:
        self.drift = None
        self.pipeline.input_warning = None
        reference = model.manifest.reference
        if reference:
            from firmware_app.records.drift import DriftMonitor

            self.drift = DriftMonitor(
                reference, window=30, every=2, audit=self.audit, model_id=model.manifest.id
            )

    def _on_result(self, frame: Frame, result: Result) -> None:
        if self.drift is not None:
            self.pipeline.input_warning = self.drift.update(frame)

    def _describe(self) -> tuple[str, str, bool]:
        """(model "id@version", backend, shown) for the results stream."""
        p = self.pipeline
        m = p.model.manifest
        return f"{m.id}@{m.version}", p.choice.backend.name, not self.silent_trial

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(event, **fields)
        except (OSError, ValueError) as exc:  # a full disk must not stop the images
            log.error("audit log: %s", exc)

    # -- Controls (buttons, serial commands) -------------------------------------------------------
    def freeze(self) -> None:
        self.pipeline.freeze()
        self._audit("control", action="freeze")

    def unfreeze(self) -> None:
        self.pipeline.unfreeze()
        self._audit("control", action="unfreeze")

    @property
    def frozen(self) -> bool:
        return self.pipeline.frozen

    def set_ai(self, enabled: bool) -> None:
        self.pipeline.set_ai(enabled)
        self._audit("control", action="ai on" if enabled else "ai off")

    @property
    def ai_enabled(self) -> bool:
        return self.pipeline.ai_enabled

    def set_threshold(self, value: float) -> float:
        before = self.pipeline.threshold
        now = self.pipeline.set_threshold(value)
        self._audit("threshold", model=self.pipeline.model.manifest.id, before=before, after=now, asked=value)
        return now

    def switch_model(self, model_id: str) -> str:
        ref = find_model(model_id, self.data_dir)
        loaded = self.pipeline.switch_model(ref)
        self._setup_drift(ref)
        self._audit("model_switch", model=ref.manifest.id, version=ref.manifest.version, origin=ref.origin)
        return loaded

    def _recorder(self):
        if self.recorder is None:
            raise FirmwareAppError(f"captures are off: data dir {self.data_dir} is not usable")
        return self.recorder

    def request_capture(self, reason: str) -> str:
        return self._recorder().request_capture(reason)

    def mark_disagree(self) -> str:
        from firmware_app.records.captures import Mark

        return self._recorder().request_disagree(Mark())

    def new_patient(self) -> str:
        return self._recorder().new_patient()

    def status(self) -> dict[str, Any]:
        st = self.pipeline.status()
        st["silent_trial"] = self.silent_trial
        return st
