"""What the command line calls: ``update``, ``models rollback``, ``selftest``, ``audit verify``, and the slot
information for ``models list``.

Each returns the exit code (0 success, 1 failure at run time, 2 bad input such as a rejected bundle) and
prints one line per outcome: successes to stdout, errors and rejections to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from firmware_app.audit import check_log
from firmware_app.config import load_board
from firmware_app.errors import FirmwareAppError
from firmware_app.update.install import install_bundle, rollback
from firmware_app.update.selftest import selftest_all
from firmware_app.update.slots import InstalledModel, installed_models


def _error(exc: FirmwareAppError) -> int:
    print(f"firmware-app: error: {exc}", file=sys.stderr)
    return exc.exit_code


def cmd_update(
    path: str | Path, data_dir: str | Path, board_ref: str | None = None, dry_run: bool = False
) -> int:
    """``firmware-app update PATH [--dry-run]``: PATH is a .fwb file or a mounted stick's folder of them."""
    try:
        board = load_board(board_ref)
    except FirmwareAppError as exc:
        return _error(exc)
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".fwb" and not p.name.startswith("."))
        if not files:
            print(f"Rejected: {path}: no *.fwb bundle in this folder", file=sys.stderr)
            return 2
    else:
        files = [path]
    code = 0
    for file in files:
        outcome = install_bundle(file, data_dir, board, dry_run=dry_run)
        print(outcome.line(str(file)), file=sys.stdout if outcome.exit_code == 0 else sys.stderr)
        code = max(code, outcome.exit_code)
    return code


def cmd_rollback(model_id: str, data_dir: str | Path) -> int:
    """``firmware-app models rollback ID``: back to the previous slot."""
    try:
        print(rollback(data_dir, model_id))
    except FirmwareAppError as exc:
        return _error(exc)
    except OSError as exc:
        print(f"firmware-app: error: rollback of {model_id} failed: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_selftest(data_dir: str | Path, board_ref: str | None = None) -> int:
    """``firmware-app selftest``: golden vectors of every installed (and bundled) model; 1 if any fails."""
    try:
        board = load_board(board_ref)
    except FirmwareAppError as exc:
        return _error(exc)
    results = selftest_all(data_dir, board)
    if not results:
        print("selftest: no installed or bundled model has golden vectors")
    for result in results:
        print(result.line(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(r.ok for r in results) else 1


def cmd_audit_verify(data_dir: str | Path) -> int:
    """``firmware-app audit verify``: 0 and one line when the log is intact, 1 with one line per problem."""
    report = check_log(data_dir)
    for problem in report.problems:
        print(f"audit: {problem}", file=sys.stderr)
    if report.problems:
        print(report.summary(), file=sys.stderr)
        return 1
    print(report.summary())
    return 0


__all__ = [
    "InstalledModel",
    "cmd_audit_verify",
    "cmd_rollback",
    "cmd_selftest",
    "cmd_update",
    "installed_models",
]
