"""The appliance: controls plus audit around the composed pipeline (``firmware_app.compose``).

    boot check (roll back a crash-looping update) -> compose(): source -> inference -> presenter + sinks
      + staged-update pickup (USB stick)   + audit log with signed checkpoints   + systemd ready/stopping

``Daemon`` is the ``Controls`` the buttons and the serial commands act on, and writes what they did to the
audit log. Every piece but the pipeline is optional: a missing GPIO chip, serial port or writable data dir
is announced on screen and in the log, and the box keeps showing images.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from firmware_app.compose import Records, RunOptions, compose, decode_for
from firmware_app.config import BoardConfig
from firmware_app.device.devices import Devices
from firmware_app.errors import FirmwareAppError
from firmware_app.models.store import find_model
from firmware_app.pipeline import Pipeline
from firmware_app.records.captures import Recorder
from firmware_app.records.checkpoints import Checkpointer
from firmware_app.sinks import InputMonitor, WatchdogSink

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


def open_records(data_dir: Path, board: BoardConfig) -> Records:
    """The audit log and the update boot check (roll back a crash-looping update), or why they are off."""
    problem = _data_dir_usable(data_dir)
    if problem is not None:
        log.error("data dir %s: captures, updates and the audit log are off", problem)
        return Records(data_dir, None, (f"Data dir {problem}: captures, updates and the audit log are off",))
    from firmware_app.audit import AuditLog
    from firmware_app.update.install import boot_check

    try:
        notices = tuple(boot_check(data_dir, board))
    except (FirmwareAppError, OSError) as exc:
        log.error("boot check failed: %s", exc)
        notices = (f"Update boot check failed: {exc}",)
    return Records(data_dir, AuditLog(data_dir), notices)


class Daemon:
    """The controls the buttons and serial commands act on, and the audit log of what they did."""

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
        results_path: str | Path | None = None,
        devices: Devices | None = None,
        **hardware: Any,  # one Devices field each (pin_factory=, notifier= ...): the rest stays real
    ) -> None:
        self.board, self.data_dir = board, Path(data_dir)
        self.devices = devices or replace(Devices.real(), **hardware)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        records = open_records(self.data_dir, board)
        self.audit = records.audit
        run = RunOptions(source_uri, display_uris, max_frames, capture_every, silent_trial, results_path)
        model = find_model(model_ref or board.model["id"], self.data_dir)
        self.pipeline: Pipeline = compose(board, model, run, self.devices, records, controls=self)
        self.silent_trial = self.pipeline.silent_trial
        self.recorder = self._sink(Recorder)
        self.watchdog = self._sink(WatchdogSink).watchdog
        self.notifier = self.watchdog.notifier
        self.checkpointer = Checkpointer(self.data_dir, self.audit) if self.audit is not None else None

    def _sink(self, kind: type) -> Any:
        return next((s for s in self.pipeline.sinks if isinstance(s, kind)), None)

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
        p.start()  # its result sinks first (recorder, panel, serial link, watchdog ...), then its threads
        if self.audit is not None:
            self._spawn(self._update_worker, "updates")
        self.notifier.ready(f"{m.id} {m.version} on {p.choice.backend.name}")

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
        self._stop.set()
        self.pipeline.close()  # its threads, then its result sinks
        for t in self._threads:
            t.join(2.0)
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
        decode_for(self.pipeline, ref)
        monitor = self._sink(InputMonitor)
        if monitor is not None:
            monitor.set_model(ref)
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
