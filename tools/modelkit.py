"""Shared pieces of the model tools (training scripts, convert_model.py): int8 conversion with a
representative dataset, ONNX export, golden vectors, calibration fitting, Edge TPU op check, progress bars.

Runs in the tools environment (tensorflow-cpu, tf2onnx); TensorFlow is imported only inside the functions
that need it, so the numpy parts (calibration, progress) work in the runtime environment too.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

T = TypeVar("T")

# Operators the Edge TPU compiler maps (coral.ai/docs/edgetpu/models-intro, "Supported operations"), as
# TFLite builtin names. An op outside this set makes the compiler cut the graph and run the rest on the CPU.
EDGETPU_OPS = frozenset(
    {
        "ABS", "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE",
        "EXPAND_DIMS", "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "MAXIMUM",
        "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX",
        "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE",
        "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
    }
)  # fmt: skip


# ---------------------------------------------------------------- set-up and reporting
def deterministic_tf(threads: int, seed: int) -> tuple[Any, Any]:
    """Import keras and TensorFlow on ``threads`` intra-op threads (one inter-op), seeded, with deterministic
    ops: the same arguments rebuild the same model. Returns (keras, tf)."""
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return keras, tf


def fmt_num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def fmt_metric(m: Any) -> str:
    """A ``validate --json`` metric {value, ci95} as "0.912 (95 % CI 0.880–0.940)"; "n/a" without a value."""
    if not isinstance(m, dict) or m.get("value") is None:
        return "n/a"
    ci = m.get("ci95")
    return f"{m['value']:.3f} (95 % CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{m['value']:.3f}"


# ---------------------------------------------------------------- progress
def progress(items: Iterable[T], total: int | None = None, label: str = "", stream=None) -> Iterator[T]:
    """Yield ``items`` while drawing a one-line text progress bar on stderr (no dependency)."""
    stream = stream or sys.stderr
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    t0 = time.perf_counter()
    tty = stream.isatty()
    last = -1
    i = 0
    for i, item in enumerate(items, start=1):
        yield item
        if total:
            step = int(30 * i / total)
            if tty or step != last and (step % 3 == 0 or i == total):
                eta = (time.perf_counter() - t0) / i * (total - i)
                stream.write(f"\r{label} [{'#' * step:<30}] {i}/{total} {eta:5.0f} s left")
                stream.flush()
                last = step
    dt = time.perf_counter() - t0
    stream.write(f"\r{label} [{'#' * 30}] {i}/{total or i} done in {dt:.1f} s{' ' * 8}\n")
    stream.flush()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores"


# ---------------------------------------------------------------- conversion
def tflite_from_concrete(
    fn: Any,
    trackable: Any,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None,
    io_type: str = "int8",
) -> bytes:
    """Convert a concrete function; with ``representative``: full-integer int8 (int8/uint8 in and out)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(fn)  # variables -> constants: no READ_VARIABLE ops
    conv = tf.lite.TFLiteConverter.from_concrete_functions([frozen], trackable)
    if representative is not None:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        dtype = tf.int8 if io_type == "int8" else tf.uint8
        conv.inference_input_type = dtype
        conv.inference_output_type = dtype
    return conv.convert()


def convert_keras(
    model: Any, rep: np.ndarray, io_type: str = "int8", label: str = "calibrating int8"
) -> tuple[bytes, bytes]:
    """A Keras model -> (full-int8 tflite, float32 tflite), batch 1, outputs in the Keras model's order.

    ``rep``: float inputs [N, H, W, C] as the runtime feeds them (the representative dataset).
    """
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    want = [tuple(int(d) if d is not None else 1 for d in o.shape) for o in model.outputs]

    def call(x):
        outs = model(x, training=False)
        return list(outs) if isinstance(outs, (list, tuple)) else [outs]

    return convert_callable(call, shape, want, model, rep, io_type, label)


def convert_callable(
    call: Callable[[Any], list[Any]],
    input_shape: tuple[int, ...],
    want: list[tuple[int, ...]],
    trackable: Any,
    rep: np.ndarray,
    io_type: str = "int8",
    label: str = "calibrating int8",
) -> tuple[bytes, bytes]:
    """``call(x) -> [outputs]`` for x float32 [1, *input_shape] -> (full-int8 tflite, float32 tflite).

    The TFLite converter may emit a multi-output model's outputs in another order; they are put back in
    the order of ``call`` (matched by their shapes ``want``), so output k of the .tflite is output k.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([1, *input_shape], tf.float32, name="image")

    def concrete(order: list[int]) -> Any:
        def fn(x):
            outs = call(x)
            return [outs[j] for j in order]

        return tf.function(fn).get_concrete_function(spec)

    fn_order = list(range(len(want)))
    float_buf = tflite_from_concrete(concrete(fn_order), trackable, None)
    got = _output_shapes(float_buf)
    if got != want:
        if len(set(want)) != len(want) or sorted(got) != sorted(want):
            raise RuntimeError(f"TFLite outputs {got} cannot be matched to the model's outputs {want}")
        # function output k landed at tflite position r(k); return output r(k) at position k instead
        fn_order = [got.index(w) for w in want]
        float_buf = tflite_from_concrete(concrete(fn_order), trackable, None)
        if _output_shapes(float_buf) != want:
            raise RuntimeError(f"TFLite output order {_output_shapes(float_buf)} != model order {want}")

    def representative() -> Iterator[list[np.ndarray]]:
        for i in progress(range(len(rep)), len(rep), label):
            yield [rep[i : i + 1].astype(np.float32)]

    int8_buf = tflite_from_concrete(concrete(fn_order), trackable, representative, io_type)
    if _output_shapes(int8_buf) != want:
        raise RuntimeError(f"int8 TFLite output order {_output_shapes(int8_buf)} != model order {want}")
    return int8_buf, float_buf


def _output_shapes(buf: bytes) -> list[tuple[int, ...]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=buf)
    return [tuple(int(d) for d in o["shape"]) for o in it.get_output_details()]


def interpreter(path: str | Path, threads: int = 2) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def op_names(path: str | Path) -> list[str]:
    """The builtin ops of a .tflite, read from the flatbuffer by the interpreter (no delegate applied)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    return sorted({d["op_name"] for d in it._get_ops_details()})


def run_raw(it: Any, tensor: np.ndarray) -> list[np.ndarray]:
    it.set_tensor(it.get_input_details()[0]["index"], tensor)
    it.invoke()
    return [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]


def invoke_ms(path: str | Path, threads: int = 2, n: int = 100) -> dict[str, float]:
    it = interpreter(path, threads)
    d = it.get_input_details()[0]
    x = np.zeros(d["shape"], d["dtype"])
    for _ in range(5):
        run_raw(it, x)
    ts = []
    for _ in range(n):
        it.set_tensor(d["index"], x)
        t0 = time.perf_counter()
        it.invoke()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"p50": round(float(np.percentile(ts, 50)), 3), "p99": round(float(np.percentile(ts, 99)), 3)}


def export_onnx(float_tflite: Path, out: Path, opset: int = 13) -> str:
    """Float ONNX twin via tf2onnx; returns a one-line status (for the model card / the report)."""
    try:
        import tf2onnx
    except ImportError:
        return "not produced: tf2onnx is not installed (pip install 'firmware-app[tools]')"
    try:
        tf2onnx.convert.from_tflite(str(float_tflite), opset=opset, output_path=str(out))
    except Exception as exc:  # noqa: BLE001 - optional artefact; the reason is reported
        out.unlink(missing_ok=True)
        return f"not produced: tf2onnx failed ({type(exc).__name__}: {exc})"
    return f"float32 in/out, converted from {float_tflite.name} with tf2onnx (opset {opset})"


def verify_onnx(onnx_path: Path, float_tflite: Path, inputs: Sequence[np.ndarray]) -> str:
    """Max |ONNX - float TFLite| over the outputs for a few float inputs."""
    if not onnx_path.exists():
        return "n/a"
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        run = lambda x: sess.run(None, {sess.get_inputs()[0].name: x})  # noqa: E731
        how = "onnxruntime"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(str(onnx_path))
        run = lambda x: ref.run(None, {ref.input_names[0]: x})  # noqa: E731
        how = "onnx.reference"
    it = interpreter(float_tflite)
    worst = 0.0
    for x in inputs:
        want = run_raw(it, x)
        got = run(x)
        got = sorted(got, key=lambda a: a.size)
        want = sorted(want, key=lambda a: a.size)
        for g, w in zip(got, want):
            worst = max(worst, float(np.max(np.abs(np.asarray(g).reshape(w.shape) - w))))
    return f"max |onnx - float tflite| = {worst:.2e} on {len(inputs)} inputs ({how})"


def edgetpu_compile(model: Path, out_dir: Path) -> tuple[bool, str]:
    """Run ``edgetpu_compiler`` when it is installed -> (compiled, message)."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return False, (
            "edgetpu_compiler not found: model_edgetpu.tflite not written. It runs on x86-64 Debian/Ubuntu "
            "(apt package edgetpu-compiler from the Coral repository); there, run: "
            f"edgetpu_compiler -s -o {out_dir} {model}"
        )
    proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(model)], capture_output=True, text=True)
    log = (proc.stdout + proc.stderr).strip()
    (out_dir / "edgetpu_compiler.log").write_text(log + "\n")
    produced = out_dir / f"{model.stem}_edgetpu.tflite"
    if proc.returncode != 0 or not produced.exists():
        return (
            False,
            f"edgetpu_compiler failed (exit {proc.returncode}); see {out_dir / 'edgetpu_compiler.log'}",
        )
    if produced.name != "model_edgetpu.tflite":
        produced.replace(out_dir / "model_edgetpu.tflite")
    return True, f"model_edgetpu.tflite written; compiler log in {out_dir / 'edgetpu_compiler.log'}"


# ---------------------------------------------------------------- golden vectors
def write_golden(out: Path, tflite: Path, inputs: Sequence[np.ndarray]) -> list[str]:
    """``out/golden/case_NNN.npz``: ``input`` and ``output_0``, ``output_1`` ... = exact raw LiteRT outputs."""
    gold = out / "golden"
    gold.mkdir(parents=True, exist_ok=True)
    for old in gold.glob("case_*.npz"):
        old.unlink()
    it = interpreter(tflite)
    names = []
    for k, x in enumerate(inputs):
        raw = run_raw(it, x)
        name = f"case_{k:03d}.npz"
        np.savez_compressed(gold / name, input=x, **{f"output_{i}": r for i, r in enumerate(raw)})
        names.append(name)
    return names


# ---------------------------------------------------------------- calibration (numpy)
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_platt(z: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """Platt scaling p = sigmoid(a z + b): Newton's method with a backtracking line search on the log-loss.

    With Platt's (1999) targets: y = 1 -> (N+ + 1) / (N+ + 2), y = 0 -> 1 / (N- + 2), which keeps a and b
    finite when the held-out scores separate the classes perfectly.
    """
    z = np.asarray(z, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    n_pos, n_neg = float(np.sum(y > 0.5)), float(np.sum(y <= 0.5))
    t = np.where(y > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(a: float, b: float) -> float:
        u = a * z + b  # log(1 + e^u) - t u, computed stably
        return float(np.sum(np.logaddexp(0.0, u) - t * u))

    a, b = 1.0, 0.0
    f = loss(a, b)
    for _ in range(iters):
        p = _sigmoid(a * z + b)
        g = np.array([np.sum((p - t) * z), np.sum(p - t)])
        wgt = p * (1 - p) + 1e-12
        h = np.array([[np.sum(wgt * z * z), np.sum(wgt * z)], [np.sum(wgt * z), np.sum(wgt)]])
        step = np.linalg.solve(h + 1e-9 * np.trace(h) * np.eye(2) + 1e-12 * np.eye(2), g)
        lam = 1.0
        while lam > 1e-8:
            fa = loss(a - lam * step[0], b - lam * step[1])
            if fa <= f:
                break
            lam /= 2.0
        else:
            break
        a, b, f_old, f = a - lam * step[0], b - lam * step[1], f, fa
        if abs(f_old - f) < 1e-10 * max(1.0, abs(f)):
            break
    return float(a), float(b)


def fit_temperature(nll: Callable[[float], float], lo: float = 0.05, hi: float = 20.0) -> float:
    """The temperature T minimising ``nll(T)`` (golden-section search on log T)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(math.exp(c)), nll(math.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(math.exp(d))
    return float(math.exp((a + b) / 2))


def binary_nll(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def manifest_calibration_toml(method: str, ece_before: float, ece_after: float, **params: float) -> str:
    lines = ["[calibration]", f'method = "{method}"']
    lines += [f"{k} = {v:.6g}" for k, v in params.items()]
    lines += [f"ece_before = {ece_before:.4f}", f"ece_after = {ece_after:.4f}"]
    return "\n".join(lines) + "\n"
