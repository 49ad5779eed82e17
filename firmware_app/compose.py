"""How a board's config becomes a running pipeline: one ``compose()`` that reads as the data flow.

    source ──▶ inference (backend chain + task + finding rules) ──▶ presenter (screen + displays)
                     └──▶ result sinks: recorder, results stream, input monitor, GPIO panel, serial link,
                                        watchdog

Every piece is a plugin found by its key (``firmware_app.plugins``): the source by its URI scheme, the
backends by the board's ``[backend] order``, the task by the manifest, the displays by their URI scheme.
Hardware comes from one ``Devices`` (``firmware_app.device.devices``): real on a box, mock in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_app.backends import BackendChain
from firmware_app.config import BoardConfig
from firmware_app.device.devices import Devices
from firmware_app.display.screen import Screen
from firmware_app.display.sinks import display_classes, open_display, parse_display_uri
from firmware_app.errors import BadDisplay
from firmware_app.models.manifest import Manifest
from firmware_app.models.store import ModelRef
from firmware_app.pipeline import Pipeline, PipelineOptions
from firmware_app.sinks import InputMonitor, LinkSink, PanelSink, WatchdogSink
from firmware_app.sources import open_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """What one run asks on top of the board (the command line's ``run`` options)."""

    source_uri: str | None = None
    display_uris: tuple[str, ...] | None = None
    max_frames: int | None = None
    capture_every: int = 0
    silent_trial: bool | None = None
    results_path: str | None = None


@dataclass
class Records:
    """The data dir's part: the audit log (None when the data dir is unusable), and what to announce."""

    data_dir: Path
    audit: Any = None
    notices: tuple[str, ...] = ()

    @property
    def engine_cache(self) -> str | None:
        return str(self.data_dir / "engines") if self.audit is not None else None


def compose(
    board: BoardConfig,
    model: ModelRef,
    run: RunOptions,
    devices: Devices,
    records: Records,
    controls: Any = None,
) -> Pipeline:
    """source -> inference -> presenter, plus the result sinks, for ``board`` running ``model``."""
    notices = list(records.notices)
    source, chain, displays, size = _stages(
        board, run.source_uri, run.display_uris, devices, records.engine_cache, _dir(records), notices
    )
    watchdog = _watchdog(devices)
    silent = bool(board.pipeline["silent_trial"] if run.silent_trial is None else run.silent_trial)
    sinks = [
        sink
        for sink in (
            _recorder(records, run, source, silent),
            _results_stream(run),
            InputMonitor(records.audit),
            _panel(board, controls, devices, notices),
            _link(board, controls, devices, notices),
            WatchdogSink(watchdog),
        )
        if sink is not None
    ]
    pipeline = Pipeline(
        source,
        model,
        chain.open(model),
        Screen(*size),
        displays,
        pipeline_options(board, run.max_frames),
        chain=chain,
        heartbeat=watchdog.alive,
        sinks=sinks,
        silent_trial=silent,
        clock=devices.clock,
    )
    return _announced(pipeline, notices)


def _stages(
    board: BoardConfig,
    source_uri: str | None,
    display_uris: Any,
    devices: Devices,
    engine_cache: str | None,
    data_dir: str | None,
    notices: list[str],
) -> tuple[Any, BackendChain, list, tuple[int, int]]:
    """The source (built, not opened), the backend chain, and the displays with the screen size."""
    source = open_source(source_uri or board.source["uri"], board.profile, board.source)
    chain = BackendChain.from_board(board, devices.backend_devices(), engine_cache, data_dir)
    displays, size = open_displays(board, display_uris, notices)
    return source, chain, displays, size


def _announced(pipeline: Pipeline, notices: list[str]) -> Pipeline:
    """``pipeline`` with what composing it found on its screen, and its source told what to decode."""
    for notice in notices:
        pipeline.notify(notice)
    decode_for(pipeline)
    return pipeline


def decode_target(manifest: Manifest, image_area: tuple[int, int]) -> dict[str, Any]:
    """What a grabber source must decode for ``manifest``'s model and a screen whose image area is
    ``image_area`` (w, h): the model's input size, the area to fit, and colour: the clinician sees the
    scanner's image (colour Doppler, coloured marks) even when the model reads gray; for a gray model a
    region without any colour may come gray (``grab.DecodeTarget.gray_if_neutral``). The keyword
    arguments of ``V4l2Source.set_decode_target``; the capture bench measures the very same."""
    return {
        "size": (manifest.width, manifest.height),
        "fit": tuple(image_area),
        "gray": False,
        "gray_if_neutral": manifest.color == "gray",
    }


def decode_for(pipeline: Pipeline, model: ModelRef | None = None) -> None:
    """Tell a source that can decode at a reduced scale (a grabber's MJPG/YUYV) what its consumers need
    (``decode_target``)."""
    set_target = getattr(pipeline.source, "set_decode_target", None)
    if set_target is not None:
        area = pipeline.screen.image_region
        set_target(**decode_target((model or pipeline.model).manifest, (area.w, area.h)))


def compose_pipeline(
    board: BoardConfig,
    model: ModelRef,
    source_uri: str | None = None,
    display_uris: list[str] | None = None,
    max_frames: int | None = None,
    devices: Devices | None = None,
    engine_cache: str | None = None,
) -> Pipeline:
    """The pipeline alone, without result sinks (the demo, the bench, tests)."""
    devices = devices or Devices()
    notices: list[str] = []
    data_dir = str(Path(engine_cache).parent) if engine_cache else None  # engines/ lives in the data dir
    source, chain, displays, size = _stages(
        board, source_uri, display_uris, devices, engine_cache, data_dir, notices
    )
    options = pipeline_options(board, max_frames)
    pipeline = Pipeline(source, model, chain.open(model), Screen(*size), displays, options, chain=chain)
    return _announced(pipeline, notices)


def pipeline_options(board: BoardConfig, max_frames: int | None) -> PipelineOptions:
    p = board.pipeline
    return PipelineOptions(
        max_frames=max_frames,
        stale_after_ms=float(p["stale_after_ms"]),
        no_signal_after_ms=float(p["no_signal_after_ms"]),
        stats_window=int(p["stats_window"]),
        display_fps=float(board.display["fps"]),
    )


def open_displays(board: BoardConfig, uris: Any, notices: list[str]) -> tuple[list, tuple[int, int]]:
    """The displays a run names (default: the board's) and the screen size. A display with a size of its
    own (a framebuffer) dictates it, the others follow; one that is absent means running headless."""
    size = (board.display["width"], board.display["height"])
    fps = float(board.display["fps"])
    uris = list(uris or [board.display["uri"]])
    classes = display_classes()

    def dictates(uri: str) -> bool:
        return classes[parse_display_uri(uri)[0]].dictates_size

    displays = []
    for uri in (u for u in uris if dictates(u)):
        try:
            displays.append(open_display(uri, size=size, fps=fps))
        except BadDisplay as exc:
            scheme, target, _ = parse_display_uri(uri)
            if not classes[scheme].absent(target):
                raise
            # the screen is unplugged or absent: keep running headless (captures, serial, alerts go on)
            notices.append(f"Display {uri} missing ({exc}); running headless")
            log.error("%s", notices[-1])
    if displays:
        size = displays[0].size
    displays += [open_display(u, size=size, fps=fps) for u in uris if not dictates(u)]
    return displays, size


# -- the result sinks, each None where the board or the data dir has none -----------------------------
def _dir(records: Records) -> str | None:
    return str(records.data_dir) if records.audit is not None else None


def _watchdog(devices: Devices) -> Any:
    from firmware_app.device.sdnotify import Notifier, Watchdog

    return Watchdog(devices.notifier or Notifier())


def _recorder(records: Records, run: RunOptions, source: Any, silent: bool) -> Any:
    if records.audit is None:
        return None
    from firmware_app.records.captures import Recorder

    recorder = Recorder(
        records.data_dir, audit=records.audit, capture_every=run.capture_every, modality=source.modality
    )
    recorder.set_silent_trial(silent)
    return recorder


def _results_stream(run: RunOptions) -> Any:
    if run.results_path is None:
        return None
    from firmware_app.records.results_stream import ResultsStream

    ResultsStream.check_writable(run.results_path)  # before any work starts
    return ResultsStream(run.results_path)


def _panel(board: BoardConfig, controls: Any, devices: Devices, notices: list[str]) -> Any:
    if board.gpio is None or controls is None:
        return None
    from firmware_app.device.gpio import GpioPanel, GpioUnavailable

    return _attached(
        lambda: PanelSink(GpioPanel(board.gpio, controls, pin_factory=devices.pin_factory)),
        GpioUnavailable,
        notices,
    )


def _link(board: BoardConfig, controls: Any, devices: Devices, notices: list[str]) -> Any:
    if board.serial is None or controls is None:
        return None
    from firmware_app.device.serial_link import SerialLink, SerialUnavailable

    return _attached(
        lambda: LinkSink(SerialLink(board.serial, controls, opener=devices.serial_opener)),
        SerialUnavailable,
        notices,
    )


def _attached(make: Any, unavailable: type[Exception], notices: list[str]) -> Any:
    """The sink ``make()`` builds, or None (announced) when its hardware is not there."""
    try:
        return make()
    except unavailable as exc:
        log.warning("%s", exc)
        notices.append(str(exc))
        return None
