"""Self-test: a model must reproduce its own golden vectors on the backend the daemon would use.

``<model>/golden/case_NNN.npz`` holds ``input`` (the exact input tensor) and ``output_0``, ``output_1``, ...
(the exact raw outputs). Each output must match at the tolerance of the backend that runs it
(firmware_app.backends.golden): LiteRT and the Edge TPU within the manifest's ``[golden] atol`` (integer
steps, or output units for a float model), other runtimes at their plugin's stated ``Tolerance``.

A model with an input gate (``[gate]``) must open its gate file, and each case must hold ``gate_pixels``
(the gate's working image of the case) and ``gate_score`` (written by ``tools/make_gate.py``): the gate must
reproduce the score within ``GATE_RTOL`` relative (float64 arithmetic on the same pixels; what differs
between devices is the last bits of a sum). A model without a gate ignores those arrays.

Used before an update switches slots (on the new folder, still in private storage), at the first starts after
an update (install.boot_check), and by ``firmware-app selftest`` on every installed model.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware_app.backends.base import EXACT, Tolerance
from firmware_app.backends.chain import BackendChain, backend_plugins
from firmware_app.backends.golden import check_golden, golden_cases
from firmware_app.config import BoardConfig
from firmware_app.errors import FirmwareAppError
from firmware_app.gate import InputGate
from firmware_app.models.store import ModelRef, find_model, list_models
from firmware_app.update.slots import active_slot, slot_manifest, slot_problems

GATE_RTOL = 1e-4


@dataclass(frozen=True)
class SelftestResult:
    model_id: str
    version: str
    origin: str  # installed slot ("installed a"), "bundled", or a folder about to be installed ("new")
    backend: str
    cases: int
    max_diff: float
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        head = f"selftest {self.model_id} {self.version} ({self.origin}) on {self.backend}"
        if self.ok:
            return f"{head}: OK, {self.cases} golden case(s), max difference {self.max_diff:g}"
        return f"{head}: FAILED: {self.problem}"


def run_golden(model: ModelRef, backend, tolerance: Tolerance | None = None) -> tuple[int, float]:
    """Every golden case on an open backend at ``tolerance`` (default: that backend plugin's declared one;
    a configured plugin may state its own, as ``chain.config(key).tolerance``), and the input gate's score
    of each case's image; FirmwareAppError names the first case that fails. Returns (cases, max difference)."""
    if tolerance is None:
        plugin = backend_plugins().get(backend.key)
        tolerance = plugin().tolerance if plugin is not None else EXACT
    report = check_golden(model, backend, tolerance)
    gate = InputGate.from_manifest(model.manifest)  # BadModel names a missing or broken gate file
    if gate is not None:
        for path in golden_cases(model.folder):
            try:
                with np.load(path, allow_pickle=False) as npz:
                    _check_gate(path.name, gate, npz)
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise FirmwareAppError(f"{path.name}: unreadable golden file ({exc})") from None
    return report.cases, report.max_diff


def _check_gate(name: str, gate: InputGate, npz) -> None:
    if "gate_score" not in npz.files:
        raise FirmwareAppError(f"{name}: the model has an input gate but the case holds no gate_score")
    want = float(npz["gate_score"])
    got = gate.check(npz["gate_pixels"]).score
    if not abs(got - want) <= GATE_RTOL * max(abs(want), 1e-6):
        raise FirmwareAppError(
            f"{name}: input gate score {got:.6g}, golden {want:.6g} (rtol {GATE_RTOL:g}): "
            f"the gate file {gate.path.name if gate.path else ''} does not match its golden vectors"
        )


def selftest_model(
    model: ModelRef,
    board: BoardConfig,
    backends: Sequence[str] | None = None,
    origin: str | None = None,
    chain: BackendChain | None = None,
) -> SelftestResult:
    """Open ``model`` the way the daemon would on ``board`` (its backend chain, restricted to ``backends``)
    and run its golden vectors at that backend's tolerance. Never raises for a model problem: the result
    says what failed."""
    m = model.manifest
    origin = origin or model.origin
    chain = chain or BackendChain.from_board(board)
    if backends is not None:
        chain = chain.restricted(backends)
    if chain is None:
        return SelftestResult(m.id, m.version, origin, "-", 0, 0.0, f"no backend of {board.name} can run it")
    try:
        choice = chain.open(model)
    except FirmwareAppError as exc:
        return SelftestResult(m.id, m.version, origin, "-", 0, 0.0, f"cannot open the model: {exc}")
    backend = choice.backend
    try:
        cases, worst = run_golden(model, backend, chain.config(backend.key).tolerance)
    except FirmwareAppError as exc:
        return SelftestResult(m.id, m.version, origin, backend.name, 0, 0.0, str(exc))
    finally:
        backend.close()
    return SelftestResult(m.id, m.version, origin, backend.name, cases, worst)


def selftest_all(
    data_dir: str | Path, board: BoardConfig, chain: BackendChain | None = None
) -> list[SelftestResult]:
    """Every installed model (its files checked against the signed list, then its golden vectors), and every
    bundled model that ships golden vectors, on the board's chain (engine cache in ``<data_dir>/engines``)."""
    chain = chain or BackendChain.from_board(
        board, engine_cache=str(Path(data_dir) / "engines"), data_dir=str(data_dir)
    )
    results = []
    installed: set[str] = set()
    models_root = Path(data_dir) / "models"
    for mdir in sorted(models_root.iterdir()) if models_root.is_dir() else []:
        slot = active_slot(mdir)
        if slot is None:
            continue
        installed.add(mdir.name)
        signed = slot_manifest(mdir, slot)
        problems = slot_problems(mdir, slot)
        try:
            ref = find_model(str(mdir / slot))
        except FirmwareAppError as exc:
            problems.append(str(exc))
        if problems:
            version = signed.version if signed else "?"
            results.append(SelftestResult(mdir.name, version, f"installed {slot}", "-", 0, 0.0, problems[0]))
            continue
        results.append(
            selftest_model(ref, board, signed.backends if signed else None, f"installed {slot}", chain)
        )
    for ref in list_models(None):
        if ref.manifest.id not in installed and golden_cases(ref.folder):
            results.append(selftest_model(ref, board, chain=chain))
    return results
