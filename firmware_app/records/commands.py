"""Command-line and daemon entry points of the records package (the only place here that prints).

- ``cmd_export(data_dir, to_dir, deidentify)``: ``firmware-app export --to DIR [--deidentify]``;
- ``cmd_export_feedback(data_dir, to_dir)``: the "disagree" cases, de-identified, for retraining;
- ``verify_records(data_dir)``: signed audit checkpoints + capture files authenticate (for ``audit verify``);
- ``export_stick_settings(mount)`` / ``auto_export(data_dir, mount)``: a USB stick with a
  ``firmware-app-export.toml`` at its root is an export stick; the daemon exports to it when it is mounted.

Exit codes: 0 done; 1 some captures could not be exported (the others were, and are marked); 2 bad input
(the target is missing, read-only or full, a bad marker file).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from firmware_app.errors import BadInput, FirmwareAppError
from firmware_app.records.captures import CaptureStore
from firmware_app.records.errors import CaptureCorrupt
from firmware_app.records.export import ExportReport, export_feedback, export_fileset

log = logging.getLogger(__name__)

STICK_MARKER = "firmware-app-export.toml"
_STICK_KEYS = {"folder": str, "deidentify": bool, "feedback": bool, "purge": bool}


def _print_report(report: ExportReport, what: str, out: TextIO, err: TextIO) -> int:
    for item in report.exported:
        print(f"exported {what} {item.capture_id}: {len(item.files)} DICOM files ({item.finding})", file=out)
    for cid, why in report.failed:
        print(f"firmware-app: NOT exported {what} {cid}: {why}", file=err)
    for cid, why in report.not_clean:  # the capture id and the reason only: no patient identifiers
        print(
            f"firmware-app: {what} {cid} NOT de-identified in its pixels: {why}; burned-in patient text may "
            "remain (exported with Patient Identity Removed NO)",
            file=err,
        )
    deid = ", de-identified" if report.deidentified else ""
    if report.deidentified and report.not_clean:
        deid += f" ({len(report.not_clean)} not in their pixels)"
    if not report.exported and not report.failed:
        print(f"nothing to export: no {what} waiting (exported ones are kept until purged)", file=out)
        return 0
    where = report.dicomdir or report.out_dir
    print(
        f"{len(report.exported)} {what}(s) exported to {where}{deid}; {len(report.failed)} failed "
        f"(export {report.export_id})",
        file=out,
    )
    return 1 if report.failed else 0


def cmd_export(
    data_dir: str | os.PathLike[str],
    to_dir: str | os.PathLike[str],
    deidentify: bool = False,
    *,
    purge: bool = False,
    include_exported: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``firmware-app export --to DIR``: captures -> DICOM File-set with DICOMDIR; one line per capture.

    With ``purge``, captures are deleted from the device after a fully successful export.
    """
    out, err = out or sys.stdout, err or sys.stderr
    try:
        report = export_fileset(data_dir, to_dir, deidentify, include_exported=include_exported)
    except FirmwareAppError as exc:
        print(f"firmware-app: error: {exc}", file=err)
        return exc.exit_code
    code = _print_report(report, "capture", out, err)
    if purge and code == 0 and report.exported:
        removed = CaptureStore(data_dir).purge_exported()
        from firmware_app.records.captures import audit_append

        audit_append(None, data_dir, "captures_purged", count=len(removed))
        print(f"{len(removed)} exported capture(s) deleted from the device", file=out)
    return code


def cmd_export_feedback(
    data_dir: str | os.PathLike[str],
    to_dir: str | os.PathLike[str],
    *,
    include_exported: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The cases marked "disagree", de-identified: ``DIR/DICOM`` (File-set) + ``DIR/cases/*.json``."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        report = export_feedback(data_dir, to_dir, include_exported=include_exported)
    except FirmwareAppError as exc:
        print(f"firmware-app: error: {exc}", file=err)
        return exc.exit_code
    return _print_report(report, "case", out, err)


def verify_records(data_dir: str | os.PathLike[str], captures: bool = True) -> list[str]:
    """Problems of the signed audit checkpoints and (``captures``) of the capture files; [] when fine.

    Each names the file (and line). The hash chain itself is ``firmware_app.audit.verify_log``'s.
    """
    from firmware_app.records.checkpoints import verify_checkpoints

    problems = verify_checkpoints(data_dir)
    keys = Path(data_dir) / "keys"
    for name in ("capture.key", "device.key"):
        path = keys / name
        if path.exists() and path.stat().st_mode & 0o077:
            problems.append(
                f"keys/{name}: readable by others (mode {path.stat().st_mode & 0o777:o}); must be 0600"
            )
    if captures and (Path(data_dir) / "captures").is_dir():
        store = CaptureStore(data_dir)
        for info in store.list():
            try:
                store.load(info.id)
            except CaptureCorrupt as exc:
                problems.append(str(exc))
    return problems


def cmd_verify_records(data_dir: str | os.PathLike[str], out: TextIO | None = None) -> int:
    """Print ``verify_records``' problems; 0 when none, 1 otherwise."""
    out = out or sys.stdout
    problems = verify_records(data_dir)
    for p in problems:
        print(p, file=out)
    if not problems:
        print("records: checkpoints and captures verified", file=out)
    return 1 if problems else 0


def export_stick_settings(mount: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings of an export stick mounted at ``mount``, or None if it is not one.

    ``firmware-app-export.toml`` (all optional): ``folder`` (relative, default "" = the stick's root, where
    PACS importers look for DICOMDIR), ``deidentify`` (false), ``feedback`` (false: also export the
    "disagree" cases to ``FEEDBACK/``), ``purge`` (false: delete exported captures from the device).
    """
    from firmware_app.tomlio import load_toml

    marker = Path(mount) / STICK_MARKER
    if not marker.is_file():
        return None
    data = load_toml(marker, BadInput, what="export stick settings")
    settings: dict[str, Any] = {"folder": "", "deidentify": False, "feedback": False, "purge": False}
    for key, value in data.items():
        want = _STICK_KEYS.get(key)
        if want is None:
            raise BadInput(f"{marker}: unknown key {key!r}; allowed: {', '.join(_STICK_KEYS)}")
        if not isinstance(value, want):
            raise BadInput(f"{marker}: {key} must be {want.__name__}, got {value!r}")
        settings[key] = value
    folder = Path(settings["folder"])
    if folder.is_absolute() or ".." in folder.parts:
        raise BadInput(f"{marker}: folder {settings['folder']!r} must be relative, inside the stick")
    return settings


def auto_export(data_dir: str | os.PathLike[str], mount: str | os.PathLike[str]) -> list[ExportReport]:
    """Export to the stick at ``mount`` if it is an export stick (else []); for the daemon's USB hook.

    Raises FirmwareAppError (a bad marker, a read-only or full stick) with a message for the screen.
    """
    settings = export_stick_settings(mount)
    if settings is None:
        return []
    target = Path(mount) / settings["folder"]
    reports = [export_fileset(data_dir, target, settings["deidentify"])]
    if settings["feedback"]:
        reports.append(export_feedback(data_dir, Path(mount) / "FEEDBACK"))
    if settings["purge"] and all(r.ok for r in reports):
        from firmware_app.records.captures import audit_append

        removed = CaptureStore(data_dir).purge_exported()
        audit_append(None, data_dir, "captures_purged", count=len(removed))
    log.info("export stick %s: %d capture(s) exported", mount, len(reports[0].exported))
    return reports
