"""The command line: ``firmware-app demo|run|bench|doctor|models``.

Errors go to stderr as one line naming the input and what is wrong; exit code 2 for bad input, 1 for a
failure at run time, 0 otherwise. ``--data-dir`` is accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from firmware_app import __version__
from firmware_app.errors import BadInput, FirmwareAppError

log = logging.getLogger("firmware_app")

DEFAULT_DATA_DIR = "/var/lib/firmware-app"
STOP_POLL_S = 0.2  # the main thread looks at the stop event this often


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    # On the subcommand, SUPPRESS keeps a value given before the subcommand.
    default = DEFAULT_DATA_DIR if top else argparse.SUPPRESS
    p.add_argument("--data-dir", default=default, help=f"device data folder (default {DEFAULT_DATA_DIR})")
    p.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firmware-app",
        description="Real-time int8 AI for point-of-care ultrasound and X-ray. Never uses a network.",
    )
    parser.add_argument("--version", action="version", version=f"firmware-app {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="synthetic ultrasound phantom -> bundled model -> screen rendered to PNG")
    _common(p, top=False)
    p.add_argument("--frames", type=_positive, default=90, help="frames to run (default 90, 3 s at 30 fps)")
    p.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7, not used in training)")

    p = sub.add_parser("run", help="the daemon; without --frames it runs until SIGTERM")
    _common(p, top=False)
    p.add_argument("--board", help="board name (board_configs/NAME.toml) or a TOML file (default x86-dev)")
    p.add_argument("--source", help="source URI (default: the board's)")
    p.add_argument("--model", help="model id or folder (default: the board's)")
    p.add_argument("--display", action="append", help="display URI, repeatable (default: the board's)")
    p.add_argument("--frames", type=_positive, help="stop after N frames have been inferred")
    p.add_argument("--stats", help="write stats.json here at the end")
    p.add_argument("--results", metavar="FILE", help="one JSON line per analysed frame (the results stream)")
    p.add_argument("--capture-every", type=_positive, metavar="K", help="capture every K-th analysed frame")
    p.add_argument(
        "--silent-trial",
        action="store_true",
        default=None,
        help="record results but show only the image and SILENT TRIAL (also [pipeline] silent_trial)",
    )

    p = sub.add_parser("bench", help="performance figures, measured in one run")
    _common(p, top=False)
    p.add_argument("--board", help="board name or TOML file (default x86-dev)")
    p.add_argument("--model", help="model id or folder (default: the board's)")
    p.add_argument("--source", help="source URI (default synthetic:ultrasound 640x480)")
    p.add_argument("--frames", type=_positive, default=300, help="frames per measurement (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--capture",
        metavar="FOURCC:WxH@FPS",
        help="also replay a grabber's stream (mjpg:1920x1080@60, yuyv:1280x720@30): adds the capture object",
    )
    p.add_argument(
        "--capture-frames", type=_positive, default=1200, help="frames of the capture stream (default 1200)"
    )
    p.add_argument("--report", metavar="DIR", help="with --capture: latency CDF and timeline PNGs here")

    p = sub.add_parser("validate", help="clinical metrics of a model on a labelled dataset")
    _common(p, top=False)
    p.add_argument("--model", required=True, help="model id or folder")
    p.add_argument("--dataset", required=True, help="DIR with images/ and labels.csv, masks/ or boxes.csv")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR", help="write report.html with plots and a per-case table here")
    p.add_argument("--ood", metavar="DIR", help="images the model does not take: input gate flag rate, AUROC")

    p = sub.add_parser("doctor", help="what was found: runtimes, accelerators, display, devices, config")
    _common(p, top=False)
    p.add_argument("--board", help="board name or TOML file (default x86-dev)")

    p = sub.add_parser("update", help="verify and install a signed model bundle (file, or a stick's folder)")
    _common(p, top=False)
    p.add_argument("path", help="a .fwb bundle, or a folder holding *.fwb (a mounted stick)")
    p.add_argument("--dry-run", action="store_true", help="verify and self-test only; change nothing")
    p.add_argument("--board", help="board name or TOML file (default x86-dev)")

    p = sub.add_parser("backends", help="every backend here for the model: invoke p50/p99, golden vectors")
    _common(p, top=False)
    p.add_argument("--board", help="board name or TOML file (default x86-dev): each backend's own keys")
    p.add_argument("--model", help="model id or folder (default: the board's)")
    p.add_argument("--invokes", type=_positive, default=200, help="timed invokes per backend (default 200)")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("selftest", help="every installed model's golden vectors on the active backend")
    _common(p, top=False)
    p.add_argument("--board", help="board name or TOML file (default x86-dev)")

    p = sub.add_parser("export", help="captures -> DICOM File-set with DICOMDIR (e.g. on a USB stick)")
    _common(p, top=False)
    p.add_argument("--to", required=True, metavar="DIR", help="target folder (a mounted stick)")
    p.add_argument("--deidentify", action="store_true", help="remove patient identifiers on export")
    p.add_argument(
        "--feedback", action="store_true", help="export the 'disagree' cases (de-identified) instead"
    )
    p.add_argument("--purge", action="store_true", help="delete captures from the device after a full export")

    p = sub.add_parser("audit", help="the audit log")
    _common(p, top=False)
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    a = asub.add_parser("verify", help="check the hash chain and signed checkpoints of the audit log")
    _common(a, top=False)

    p = sub.add_parser("models", help="installed and bundled models")
    _common(p, top=False)
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    m = msub.add_parser("list", help="every model found")
    _common(m, top=False)
    m = msub.add_parser("show", help="one model's manifest")
    _common(m, top=False)
    m.add_argument("id")
    m = msub.add_parser("rollback", help="return an installed model to its previous slot")
    _common(m, top=False)
    m.add_argument("id")

    p = sub.add_parser(
        "source-check", help="the imaging region found in a source, as a board-TOML crop + PNG"
    )
    _common(p, top=False)
    p.add_argument("--source", required=True, help="source URI, e.g. v4l2:/dev/video0 or file:clip.mp4")
    p.add_argument("--board", help="board name or TOML file: its [source] settings and crop (default: none)")
    p.add_argument("--frames", type=_positive, default=90, help="frames to read (default 90)")
    p.add_argument("--out", default="source-check", help="folder for region.png (default ./source-check)")
    return parser


def _setup_logging(verbose: int) -> None:
    from firmware_app.logsetup import setup

    setup(verbose)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "demo":
            from firmware_app.demo import run_demo

            return run_demo(args.out, args.frames, args.seed, args.data_dir)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            from firmware_app.bench import parse_capture, run_bench

            if args.capture:
                parse_capture(args.capture)  # a bad spec is refused before minutes of measuring
            result = run_bench(args.board, args.model, args.source, args.frames, args.data_dir)
            if args.capture:
                from firmware_app.bench import run_capture_bench

                result["capture"] = run_capture_bench(
                    args.board, args.model, args.capture, args.capture_frames, args.data_dir, args.report
                )["capture"]
            print(json.dumps(result, indent=None if args.json else 2))
            return 0
        if args.command == "validate":
            from firmware_app.validate import cmd_validate

            if args.report:
                check_output_dir(Path(args.report), "--report")

            return cmd_validate(args.model, args.dataset, args.json, args.report, args.data_dir, args.ood)
        if args.command == "doctor":
            from firmware_app.doctor import run_doctor

            return run_doctor(args.board, args.data_dir)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "update":
            from firmware_app.update.commands import cmd_update

            return cmd_update(args.path, args.data_dir, args.board, args.dry_run)
        if args.command == "backends":
            from firmware_app.backends.select import cmd_backends

            return cmd_backends(args.board, args.model, args.data_dir, args.json, args.invokes)
        if args.command == "selftest":
            from firmware_app.update.commands import cmd_selftest

            return cmd_selftest(args.data_dir, args.board)
        if args.command == "audit":
            from firmware_app.records.commands import cmd_verify_records
            from firmware_app.update.commands import cmd_audit_verify

            return max(cmd_audit_verify(args.data_dir), cmd_verify_records(args.data_dir))
        if args.command == "source-check":
            return cmd_source_check(args)
        if args.command == "export":
            from firmware_app.records.commands import cmd_export, cmd_export_feedback

            check_data_dir(Path(args.data_dir))
            if args.feedback:
                return cmd_export_feedback(args.data_dir, args.to)
            return cmd_export(args.data_dir, args.to, args.deidentify, purge=args.purge)
    except FirmwareAppError as exc:
        print(f"firmware-app: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a path the checks above could not foresee: one line, never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        log.debug("%s", exc, exc_info=True)
        print(f"firmware-app: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from firmware_app.config import load_board
    from firmware_app.daemon import Daemon

    stats_path = Path(args.stats) if args.stats else None
    if stats_path is not None:
        check_output_file(stats_path, "--stats")
    # SIGTERM/SIGINT only set an event, whichever thread the kernel hands them to and whenever they come
    # (start-up included); the main thread never blocks longer than STOP_POLL_S, so it sees the event.
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        board = load_board(args.board)
        _display_size_from_uris(board, args.display or [board.display["uri"]])
        daemon = Daemon(
            board,
            args.data_dir,
            model_ref=args.model,
            source_uri=args.source,
            display_uris=args.display,
            max_frames=args.frames,
            capture_every=args.capture_every or 0,
            silent_trial=args.silent_trial,
            results_path=args.results,
        )
        pipeline = daemon.pipeline
        for notice in pipeline.choice.notices:
            print(f"firmware-app: notice: {notice}", file=sys.stderr)
        try:
            if not stopping.is_set():
                daemon.start()
                while not stopping.is_set() and not pipeline.wait(STOP_POLL_S):
                    pass
            if stopping.is_set():
                log.info("signal: stopping")
                daemon.stop()
        finally:
            daemon.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = pipeline.stats()
    if pipeline.t_first_result_shown_ns is not None:
        age = process_age_s()
        if age is not None:
            since_first = (time.monotonic_ns() - pipeline.t_first_result_shown_ns) / 1e9
            stats["startup_s"] = round(age - since_first, 3)
    if stats_path is not None:
        try:
            write_json(stats_path, stats)
        except OSError as exc:
            raise FirmwareAppError(f"--stats {stats_path}: cannot write ({exc.strerror})") from None
    print(summary_line(stats), file=sys.stderr)
    if not pipeline.source.live and stats["frames_in"] == 0 and stats.get("frames_rejected"):
        why = next((m.removeprefix("Skipped ") for m in pipeline.messages() if m.startswith("Skipped ")), "")
        print(
            f"firmware-app: error: {pipeline.source.uri}: no usable frame ({why or 'see above'})",
            file=sys.stderr,
        )
        return 1
    return 0


def _display_size_from_uris(board: object, uris: list[str]) -> None:
    """``png:DIR?width=1920&height=1080``: the screen is rendered at that size (a framebuffer still
    dictates its own)."""
    from firmware_app.display.sinks import requested_size

    for uri in uris:
        size = requested_size(uri)
        if size is not None:
            board.display["width"], board.display["height"] = size  # type: ignore[attr-defined]
            return


def cmd_models(args: argparse.Namespace) -> int:
    from firmware_app.models.store import find_model, list_models

    if args.models_command == "rollback":
        from firmware_app.update.commands import cmd_rollback

        return cmd_rollback(args.id, args.data_dir)
    if args.models_command == "list":
        from firmware_app.update.commands import installed_models

        for slot in installed_models(args.data_dir):
            print(slot.line())
        for ref in list_models(args.data_dir):
            m = ref.manifest
            cleared = "cleared" if m.cleared_for_clinical_use else "NOT FOR DIAGNOSTIC USE"
            print(f"{m.id:<20} {m.version:<10} {m.task:<15} {ref.origin:<10} {cleared}  {ref.folder}")
        return 0
    ref = find_model(args.id, args.data_dir)
    m = ref.manifest
    print(f"id: {m.id}\nversion: {m.version}\ntask: {m.task}\nfolder: {ref.folder} ({ref.origin})")
    print(f"intended use: {m.intended_use}\ncleared for clinical use: {m.cleared_for_clinical_use}")
    print(f"input: {m.width}x{m.height} {m.color} range {list(m.range)}\nlabels: {', '.join(m.labels)}")
    print(f"alert threshold: {m.alert} (bounds {m.alert_min}..{m.alert_max})")
    return 0


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), for startup_s: process start -> first result."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees half a file; nothing is left behind when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_data_dir(path: Path) -> None:
    """The data dir an export reads captures from and writes marks and the audit log to."""
    if not path.exists():
        check_output_dir(path, "--data-dir")  # made on first use
        return
    if not path.is_dir():
        raise BadInput(f"--data-dir {path}: is a file, not a folder")
    for sub in ("captures", "audit"):
        if (path / sub).exists() and not (path / sub).is_dir():
            raise BadInput(f"--data-dir {path}: {path / sub} is a file, not a folder")
    _probe(path, "--data-dir", path)
    if (path / "captures").is_dir():
        _probe(path / "captures", "--data-dir", path)


def check_output_file(path: Path, what: str) -> None:
    """Before any work starts: BadInput naming ``what`` and ``path`` when the file cannot be written there."""
    if path.is_dir():
        raise BadInput(f"{what} {path}: is a folder, not a file")
    folder = path.absolute().parent
    while not folder.exists():  # missing folders are made when written: the nearest existing one counts
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"{what} {path}: {folder} is a file, not a folder")
    _probe(folder, what, path)


def check_output_dir(path: Path, what: str) -> None:
    """Before any work starts: BadInput naming ``what`` and ``path`` when no files can be written in it."""
    folder = path.absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"{what} {path}: {folder} is a file, not a folder")
    _probe(folder, what, path)


def _probe(folder: Path, what: str, path: Path) -> None:
    """Prove a file can be created in ``folder`` (root ignores modes: only trying tells)."""
    probe = folder / f".fwapp-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise BadInput(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def summary_line(stats: dict) -> str:
    st = stats.get("stages_ms", {})
    inv = st.get("invoke", {}).get("p50")
    e2e = st.get("e2e", {}).get("p50")
    parts = [
        f"{stats['model']} on {stats['backend']}",
        f"frames in {stats['frames_in']}, inferred {stats['frames_inferred']}, shown {stats['frames_shown']}, "
        f"dropped {stats['frames_dropped']}",
        f"errors {stats['errors']}",
        f"mismatched overlays {stats['mismatched_overlays']}",
    ]
    if inv is not None:
        parts.append(f"invoke p50 {inv:.1f} ms")
    if e2e is not None:
        parts.append(f"capture->shown p50 {e2e:.1f} ms")
    if "dice" in stats:
        parts.append(f"Dice {stats['dice']:.3f}")
    return "; ".join(parts)


def cmd_source_check(args: argparse.Namespace) -> int:
    from firmware_app.sources.check import run_source_check

    return run_source_check(args.source, args.board, args.frames, args.out)
