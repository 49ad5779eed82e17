"""Golden vectors on any backend, at the tolerance that backend's numerics need.

``<model>/golden/case_NNN.npz`` holds ``input`` (LiteRT's exact input tensor) and ``output_0``, ... (its exact
raw outputs). A backend whose input is not the golden one's type (a float ONNX model, say) gets the input
dequantized with model.tflite's own input quantization; outputs are compared in quantization steps of
model.tflite's outputs (a float output is divided by that step after subtracting the dequantized golden
one). What passes is the plugin's ``Tolerance`` (firmware_app.backends.base).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware_app.backends.base import EXACT, Backend, TensorSpec, Tolerance
from firmware_app.errors import FirmwareAppError
from firmware_app.models.store import ModelRef

_CASE = re.compile(r"case_\d{3}\.npz")
MEAN_MIN_SIZE = 64  # the mean bound applies to outputs of at least this many elements (not a single logit)


@dataclass(frozen=True)
class GoldenReport:
    cases: int
    max_diff: float  # steps (quantized golden) or output units (float golden)
    p99_diff: float
    mean_diff: float
    tolerance: str  # what was required, in words


def golden_cases(folder: Path) -> list[Path]:
    golden = folder / "golden"
    return sorted(p for p in golden.iterdir() if _CASE.fullmatch(p.name)) if golden.is_dir() else []


def reference_specs(model: ModelRef) -> tuple[TensorSpec, list[TensorSpec]]:
    """model.tflite's input and output specs: the quantization the golden vectors were written in."""
    from firmware_app.backends.litert import LiteRTBackend

    ref = LiteRTBackend(model.tflite, threads=1)
    try:
        return ref.input, list(ref.outputs)
    finally:
        ref.close()


def _as_backend_input(x: np.ndarray, ref: TensorSpec, spec: TensorSpec) -> np.ndarray:
    if x.dtype == spec.dtype:
        return x.reshape(spec.shape)
    f = ref.dequantize(x)
    if spec.quantized:
        info = np.iinfo(spec.dtype)
        f = np.clip(np.round(f / spec.scale) + spec.zero_point, info.min, info.max)
    return f.reshape(spec.shape).astype(spec.dtype)


def _diff(got: np.ndarray, got_spec: TensorSpec, want: np.ndarray, ref: TensorSpec) -> np.ndarray:
    """|got - want| in steps of the golden output (or output units when it is a float output)."""
    if np.issubdtype(want.dtype, np.integer) and got.dtype == want.dtype and got_spec.scale == ref.scale:
        return np.abs(got.astype(np.int64) - want.astype(np.int64)).astype(np.float64)
    d = np.abs(got_spec.dequantize(got).astype(np.float64) - ref.dequantize(want).astype(np.float64))
    return d / ref.scale if ref.quantized else d


GATE_KEYS = frozenset({"gate_pixels", "gate_score"})


def check_golden(model: ModelRef, backend: Backend, tolerance: Tolerance = EXACT) -> GoldenReport:
    """Run every golden case on an open backend; FirmwareAppError names the first case or output that fails."""
    cases = golden_cases(model.folder)
    if not cases:
        raise FirmwareAppError("no golden vectors (golden/case_NNN.npz)")
    atol = float(model.manifest.golden_atol)
    ref_in, ref_outs = reference_specs(model)
    expected = {"input"} | {f"output_{i}" for i in range(len(ref_outs))}
    worst = [0.0, 0.0, 0.0]
    required = tolerance.describe(atol)
    for path in cases:
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = set(npz.files)
                gate_keys = names & GATE_KEYS  # the input gate's case (update.selftest checks it)
                if names - GATE_KEYS != expected or (gate_keys and gate_keys != GATE_KEYS):
                    raise FirmwareAppError(
                        f"{path.name}: arrays {sorted(npz.files)}, expected {sorted(expected)}"
                        " (and gate_pixels, gate_score for a model with a gate)"
                    )
                x = npz["input"]
                if x.shape != ref_in.shape or x.dtype != ref_in.dtype:
                    raise FirmwareAppError(
                        f"{path.name}: input {x.dtype}{list(x.shape)}, the model takes "
                        f"{ref_in.dtype}{list(ref_in.shape)}"
                    )
                if int(np.prod(backend.input.shape)) != x.size:
                    raise FirmwareAppError(
                        f"{path.name}: input {list(x.shape)}, {backend.name} takes {list(backend.input.shape)}"
                    )
                outputs = backend.invoke(_as_backend_input(x, ref_in, backend.input))
                if len(outputs) != len(ref_outs):
                    raise FirmwareAppError(f"{path.name}: {len(outputs)} outputs, golden {len(ref_outs)}")
                for i, (got, spec, ref) in enumerate(zip(outputs, backend.outputs, ref_outs)):
                    want = npz[f"output_{i}"]
                    if int(np.prod(got.shape)) != want.size:
                        raise FirmwareAppError(
                            f"{path.name}: output_{i} shape {list(got.shape)}, golden {list(want.shape)}"
                        )
                    d = _diff(got.reshape(want.shape), spec, want, ref)
                    if np.isnan(d).any():
                        raise FirmwareAppError(f"{path.name}: output_{i} has NaN")
                    mx = float(d.max(initial=0.0))
                    p99 = float(np.percentile(d, 99)) if d.size else 0.0
                    mean = float(d.mean()) if d.size else 0.0
                    if not ref.quantized:  # a float model: max in output units
                        limit = max(atol, tolerance.float_atol)
                        required = f"max <= {limit:g}"
                        if not mx <= limit:
                            raise FirmwareAppError(
                                f"{path.name}: output_{i} differs by {mx:g} (atol {limit:g})"
                            )
                    elif tolerance.exact:
                        if not mx <= atol:
                            raise FirmwareAppError(
                                f"{path.name}: output_{i} differs by {mx:g} (atol {atol:g})"
                            )
                    elif not (
                        p99 <= tolerance.p99_steps
                        and (d.size < MEAN_MIN_SIZE or mean <= tolerance.mean_steps)
                    ):
                        raise FirmwareAppError(
                            f"{path.name}: output_{i} differs by p99 {p99:.3g}, mean {mean:.3g} steps "
                            f"(allowed {required}: {tolerance.why})"
                        )
                    big = d.size >= MEAN_MIN_SIZE
                    worst = [max(worst[0], mx), max(worst[1], p99), max(worst[2], mean if big else 0.0)]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise FirmwareAppError(f"{path.name}: unreadable golden file ({exc})") from None
    return GoldenReport(len(cases), worst[0], worst[1], worst[2], required)
