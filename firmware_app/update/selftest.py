"""Self-test: a model must reproduce its own golden vectors on the backend the daemon would use.

``<model>/golden/case_NNN.npz`` holds ``input`` (the exact input tensor) and ``output_0``, ``output_1``, ...
(the exact raw outputs). Each output must match within the manifest's ``[golden] atol``: for integer
tensors max |int(out) - int(expected)| <= atol, for float tensors max |out - expected| <= atol.

A model with an input gate (``[gate]``) must open its gate file, and each case must hold ``gate_pixels``
(the gate's working image of the case) and ``gate_score`` (written by ``tools/make_gate.py``): the gate must
reproduce the score within ``GATE_RTOL`` relative (float64 arithmetic on the same pixels; what differs
between devices is the last bits of a sum). A model without a gate ignores those arrays.

Used before an update switches slots (on the new folder, still in private storage), at the first starts after
an update (install.boot_check), and by ``firmware-app selftest`` on every installed model.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware_app.backends import make_backend
from firmware_app.config import BoardConfig
from firmware_app.errors import FirmwareAppError
from firmware_app.gate import InputGate
from firmware_app.models.store import ModelRef, find_model, list_models
from firmware_app.update.slots import active_slot, slot_manifest, slot_problems

_CASE = re.compile(r"case_\d{3}\.npz")
GATE_RTOL = 1e-4
_GATE_KEYS = {"gate_pixels", "gate_score"}


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


def golden_cases(folder: Path) -> list[Path]:
    golden = folder / "golden"
    return sorted(p for p in golden.iterdir() if _CASE.fullmatch(p.name)) if golden.is_dir() else []


def _max_diff(got: np.ndarray, expected: np.ndarray) -> float:
    if np.issubdtype(got.dtype, np.integer) and np.issubdtype(expected.dtype, np.integer):
        return float(np.abs(got.astype(np.int64) - expected.astype(np.int64)).max(initial=0))
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0))


def run_golden(model: ModelRef, backend) -> tuple[int, float]:
    """Run every golden case on an open backend; FirmwareAppError names the first case that fails."""
    cases = golden_cases(model.folder)
    if not cases:
        raise FirmwareAppError("no golden vectors (golden/case_NNN.npz)")
    atol = model.manifest.golden_atol
    worst = 0.0
    expected_names = {"input"} | {f"output_{i}" for i in range(len(backend.outputs))}
    gate = InputGate.from_manifest(model.manifest)  # BadModel names a missing or broken gate file
    for path in cases:
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = set(npz.files)
                if names - _GATE_KEYS != expected_names or (names & _GATE_KEYS and not _GATE_KEYS <= names):
                    raise FirmwareAppError(
                        f"{path.name}: arrays {sorted(npz.files)}, expected {sorted(expected_names)}"
                        f" (and gate_pixels, gate_score for a model with a gate)"
                    )
                if gate is not None:
                    _check_gate(path.name, gate, npz)
                x = npz["input"]
                if x.shape != backend.input.shape or x.dtype != backend.input.dtype:
                    raise FirmwareAppError(
                        f"{path.name}: input {x.dtype}{list(x.shape)}, the model takes "
                        f"{backend.input.dtype}{list(backend.input.shape)}"
                    )
                outputs = backend.invoke(x)
                for i, got in enumerate(outputs):
                    want = npz[f"output_{i}"]
                    if want.shape != got.shape:
                        raise FirmwareAppError(
                            f"{path.name}: output_{i} shape {list(got.shape)}, golden {list(want.shape)}"
                        )
                    diff = _max_diff(got, want)
                    if not diff <= atol:
                        raise FirmwareAppError(f"{path.name}: output_{i} differs by {diff:g} (atol {atol:g})")
                    worst = max(worst, diff)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise FirmwareAppError(f"{path.name}: unreadable golden file ({exc})") from None
    return len(cases), worst


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
    model: ModelRef, board: BoardConfig, backends: Sequence[str] | None = None, origin: str | None = None
) -> SelftestResult:
    """Open ``model`` the way the daemon would on ``board`` (restricted to ``backends``) and run its golden
    vectors. Never raises for a model problem: the result says what failed."""
    m = model.manifest
    origin = origin or model.origin
    order = [b for b in board.backend["order"] if backends is None or b in backends]
    if not order:
        return SelftestResult(m.id, m.version, origin, "-", 0, 0.0, f"no backend of {board.name} can run it")
    try:
        choice = make_backend(model, order, board.backend["threads"], board.backend["edgetpu_device"] or None)
    except FirmwareAppError as exc:
        return SelftestResult(m.id, m.version, origin, "-", 0, 0.0, f"cannot open the model: {exc}")
    backend = choice.backend
    try:
        cases, worst = run_golden(model, backend)
    except FirmwareAppError as exc:
        return SelftestResult(m.id, m.version, origin, backend.name, 0, 0.0, str(exc))
    finally:
        backend.close()
    return SelftestResult(m.id, m.version, origin, backend.name, cases, worst)


def selftest_all(data_dir: str | Path, board: BoardConfig) -> list[SelftestResult]:
    """Every installed model (its files checked against the signed list, then its golden vectors), and every
    bundled model that ships golden vectors."""
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
        results.append(selftest_model(ref, board, signed.backends if signed else None, f"installed {slot}"))
    for ref in list_models(None):
        if ref.manifest.id not in installed and golden_cases(ref.folder):
            results.append(selftest_model(ref, board))
    return results
