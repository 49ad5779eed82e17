#!/usr/bin/env python3
"""Bring a hospital's own model to the device: Keras / SavedModel / ONNX -> full-int8 TFLite model folder.

    .venv-tools/bin/python tools/convert_model.py MODEL --images DIR --out DIR \\
        --id my-model --task classification --labels normal,finding --activation softmax [options]

MODEL is a Keras file (``.keras``, ``.h5``), a TensorFlow SavedModel folder, or an ONNX file (converted with
``onnx2tf`` or ``onnx-tf`` when one of them is installed; a clear message when not). ``--images`` is the
representative dataset: a folder of images like those the device will see (PNG, JPEG, BMP, TIFF or DICOM;
100-500 is plenty). Every image goes through the runtime's own pre-processing (``firmware_app.preprocess``:
resize to the model input, colour, ``--range``), so the int8 calibration sees exactly what the device feeds.

Writes into --out:

- ``model.tflite``: full-integer int8 (``--io-type int8`` or ``uint8`` input and output), batch 1;
- ``model_float.tflite``: the float32 twin (the device's silent drift check compares with it);
- ``model.onnx``: the original ONNX file, or a float ONNX export via tf2onnx (for TensorRT);
- ``model_edgetpu.tflite`` when ``edgetpu_compiler`` is installed (a clear message when not);
- ``manifest.toml`` written from the flags and validated with ``firmware_app.models.manifest``; with a
  ``[reference]`` table (input statistics of the representative images, for the drift warning);
- ``golden/case_NNN.npz`` (``input``, ``output_0``...: exact raw LiteRT outputs), ``agreement.json``
  (int8 vs float on the held-out part of the images: task decisions and raw-output error per output).

Needs the tools environment (``pip install 'firmware-app[tools]'``: tensorflow-cpu, tf2onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from modelkit import (  # noqa: E402
    EDGETPU_OPS,
    convert_callable,
    convert_keras,
    edgetpu_compile,
    export_onnx,
    interpreter,
    op_names,
    progress,
    run_raw,
    write_golden,
)

from firmware_app.backends.base import TensorSpec  # noqa: E402
from firmware_app.errors import BadFrame, BadModel  # noqa: E402
from firmware_app.models.manifest import parse_manifest  # noqa: E402
from firmware_app.preprocess import Preprocessor  # noqa: E402
from firmware_app.tasks import task_names  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ""}


class ConvertError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


# ---------------------------------------------------------------- loading
def load_model(path: Path, width: int | None, height: int | None, workdir: Path):
    """-> (call(x) -> [outputs], input shape (H, W, C), output shapes, trackable, kind, keras model or None)."""
    import tensorflow as tf

    if path.suffix.lower() == ".onnx":
        return load_model(onnx_to_savedmodel(path, workdir), width, height, workdir)[:-2] + ("onnx", None)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ConvertError(f"{path}: a folder but not a TensorFlow SavedModel (no saved_model.pb)")
        loaded = tf.saved_model.load(str(path))
        if "serving_default" not in loaded.signatures:
            raise ConvertError(f"{path}: SavedModel has no 'serving_default' signature")
        sig = loaded.signatures["serving_default"]
        args, kwargs = sig.structured_input_signature
        specs = list(kwargs.values()) or list(args)
        if len(specs) != 1:
            raise ConvertError(
                f"{path}: the model has {len(specs)} inputs; the device feeds exactly one image"
            )
        in_name = next(iter(kwargs)) if kwargs else None
        shape = _hwc(list(specs[0].shape), width, height, path)
        keys = sorted(sig.structured_outputs)  # outputs in the order of their names

        def call(x):
            res = sig(**{in_name: x}) if in_name else sig(x)
            return [res[k] for k in keys]

        outs = call(tf.zeros([1, *shape], tf.float32))
        return call, shape, [tuple(int(d) for d in o.shape) for o in outs], loaded, "savedmodel", None
    if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        import keras

        try:
            model = keras.models.load_model(str(path), compile=False)
        except Exception as exc:  # noqa: BLE001 - custom layers, a broken file: say so in one line
            raise ConvertError(f"{path}: Keras could not load it ({type(exc).__name__}: {exc})") from None
        if len(model.inputs) != 1:
            raise ConvertError(
                f"{path}: the model has {len(model.inputs)} inputs; the device feeds one image"
            )
        shape = _hwc(list(model.inputs[0].shape), width, height, path)
        if tuple(int(d) for d in model.inputs[0].shape[1:]) != shape:  # dynamic size: rebuild fixed
            inp = keras.Input(shape, batch_size=1)
            model = keras.Model(inp, model(inp))

        def call(x):
            outs = model(x, training=False)
            return list(outs) if isinstance(outs, (list, tuple)) else [outs]

        outs = call(np.zeros((1, *shape), np.float32))
        return call, shape, [tuple(int(d) for d in o.shape) for o in outs], model, "keras", model
    raise ConvertError(f"{path}: unknown model format (use .keras, .h5, a SavedModel folder, or .onnx)")


def _hwc(shape: list, width: int | None, height: int | None, path: Path) -> tuple[int, int, int]:
    if len(shape) != 4:
        raise ConvertError(f"{path}: input shape {shape} is not [batch, height, width, channels] (NHWC)")
    _, h, w, c = shape
    h, w = height or h, width or w
    if h is None or w is None or c is None:
        raise ConvertError(f"{path}: input size is dynamic {shape}; give --width and --height")
    if int(c) not in (1, 3):
        raise ConvertError(f"{path}: input has {c} channels; the device feeds gray (1) or colour (3) images")
    return int(h), int(w), int(c)


def onnx_to_savedmodel(path: Path, workdir: Path) -> Path:
    """ONNX -> TensorFlow SavedModel (NHWC) with onnx2tf, else onnx-tf; ConvertError when neither exists."""
    out = workdir / "from_onnx"
    try:
        import onnx2tf
    except ImportError:
        onnx2tf = None
    if onnx2tf is not None:
        onnx2tf.convert(input_onnx_file_path=str(path), output_folder_path=str(out), non_verbose=True)
        return out
    try:
        import onnx
        from onnx_tf.backend import prepare
    except ImportError:
        raise ConvertError(
            f"{path}: converting ONNX needs onnx2tf (pip install onnx2tf onnx_graphsurgeon sng4onnx), "
            "which is not installed in this environment; or export the model from its framework as a Keras "
            ".keras file or a TensorFlow SavedModel and convert that"
        ) from None
    prepare(onnx.load(str(path))).export_graph(str(out))
    return out


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConvertError(f"--images {folder}: folder not found")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ConvertError(f"--images {folder}: no images (PNG, JPEG, BMP, TIFF or DICOM)")
    return files


def load_images(files: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    from firmware_app.validate import load_image

    images, problems = [], []
    for p in progress(files, len(files), "reading images"):
        try:
            images.append(load_image(p))
        except BadFrame as exc:
            problems.append(str(exc))
    return images, problems


# ---------------------------------------------------------------- manifest
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def manifest_dict(args, shape: tuple[int, int, int]) -> dict[str, Any]:
    h, w, c = shape
    color = args.color or ("gray" if c == 1 else "rgb")
    lo = args.threshold_min if args.threshold_min is not None else min(args.threshold, 0.3)
    hi = args.threshold_max if args.threshold_max is not None else max(args.threshold, 0.9)
    out: dict[str, Any] = {
        "labels": [s.strip() for s in args.labels.split(",")],
        "activation": args.activation,
    }
    if args.layout:
        out["layout"] = args.layout
    if args.heatmap_output is not None:
        out["heatmap_output"] = args.heatmap_output
    d: dict[str, Any] = {
        "id": args.id,
        "version": args.version,
        "task": args.task,
        "intended_use": args.intended_use,
        "cleared_for_clinical_use": False,
        "input": {
            "width": w,
            "height": h,
            "color": color,
            "range": [float(args.range[0]), float(args.range[1])],
        },
        "output": out,
        "thresholds": {"alert": float(args.threshold), "alert_min": float(lo), "alert_max": float(hi)},
        "golden": {"atol": float(args.golden_atol)},
    }
    if args.temperature is not None:
        d["calibration"] = {"method": "temperature", "temperature": float(args.temperature)}
    elif args.platt is not None:
        d["calibration"] = {"method": "platt", "a": float(args.platt[0]), "b": float(args.platt[1])}
    return d


def manifest_text(d: dict[str, Any], reference: str) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section in ("input", "output", "thresholds", "calibration", "golden"):
        if section in d:
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[section].items()]
    return "\n".join(lines) + "\n\n" + reference


# ---------------------------------------------------------------- agreement
def agreement(out: Path, images: list[np.ndarray], threads: int) -> dict[str, Any]:
    """int8 vs float on ``images``: task decisions through the runtime, and raw-output error per output."""
    from firmware_app.models.store import find_model
    from firmware_app.validate import AGREE_IOU, ModelRunner, match_boxes

    model = find_model(str(out.resolve()))
    m = model.manifest
    r8 = ModelRunner(model, threads=threads)
    rf = ModelRunner(model, out / "model_float.tflite", threads=threads)
    num = den = 0.0
    err: list[list[float]] = [[] for _ in r8.backend.outputs]
    sig: list[list[float]] = [[] for _ in r8.backend.outputs]
    for img in progress(images, len(images), "int8 vs float"):
        size = (img.shape[1], img.shape[0])
        raw8, rawf = r8.raw(img), rf.raw(img)
        for k, (spec8, specf) in enumerate(zip(r8.backend.outputs, rf.backend.outputs)):
            a, b = spec8.dequantize(raw8[k]), specf.dequantize(rawf[k])
            err[k].append(float(np.mean((a - b) ** 2)))
            sig[k].append(float(np.mean(b**2)))
        a8 = r8.result(raw8, size, m.alert)
        af = rf.result(rawf, size, m.alert)
        if m.task == "segmentation":
            z = np.zeros((size[1], size[0]), np.uint8)
            m8 = a8.mask if a8.mask is not None else z
            mf = af.mask if af.mask is not None else z
            num += float(np.count_nonzero((m8 > 0) == (mf > 0)))
            den += float(m8.size)
        elif m.task == "classification":
            num += float(a8.alert == af.alert and a8.label == af.label)
            den += 1.0
        else:
            b8 = np.array([[b.x0, b.y0, b.x1, b.y1] for b in a8.boxes]).reshape(-1, 4)
            bf = np.array([[b.x0, b.y0, b.x1, b.y1] for b in af.boxes]).reshape(-1, 4)
            match, _ = match_boxes(
                b8, [b.label for b in a8.boxes], bf, [b.label for b in af.boxes], AGREE_IOU
            )
            num += 2.0 * float((match >= 0).sum())
            den += float(len(b8) + len(bf))
    r8.close()
    rf.close()
    what = {
        "segmentation": "mask pixels",
        "classification": "decisions and labels",
        "detection": "matched boxes",
    }[m.task]
    outputs = []
    for k, spec in enumerate(r8.backend.outputs):
        mse, pw = float(np.mean(err[k])), float(np.mean(sig[k]))
        snr = 10 * np.log10(pw / mse) if mse > 0 and pw > 0 else float("inf")
        outputs.append(
            {
                "output": k,
                "shape": list(spec.shape),
                "rmse": round(mse**0.5, 6),
                "snr_db": round(float(snr), 2),
            }
        )
    return {
        "what": what,
        "agreement": round(num / den, 5) if den else 1.0,
        "images": len(images),
        "outputs": outputs,
    }


# ---------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help=".keras / .h5 file, SavedModel folder, or .onnx file")
    ap.add_argument("--images", type=Path, required=True, help="representative images (PNG/JPEG/DICOM)")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--id", required=True, help="model id (lower case, digits, . _ -)")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--task", required=True, choices=task_names())
    ap.add_argument(
        "--labels", required=True, help="comma-separated; labels[0] is the negative / background class"
    )
    ap.add_argument("--activation", required=True, choices=("softmax", "sigmoid", "none"))
    ap.add_argument("--layout", choices=("ssd_postprocess", "boxes_scores"), help="detection output layout")
    ap.add_argument("--heatmap-output", type=int, help="classification: index of a heatmap output")
    ap.add_argument("--color", choices=("gray", "rgb", "bgr"), help="default: gray for 1 channel, rgb for 3")
    ap.add_argument(
        "--range",
        type=float,
        nargs=2,
        default=[0.0, 1.0],
        metavar=("LO", "HI"),
        help="input value range the model was trained on (default 0 1)",
    )
    ap.add_argument("--threshold", type=float, default=0.5, help="alert threshold (default 0.5)")
    ap.add_argument("--threshold-min", type=float)
    ap.add_argument("--threshold-max", type=float)
    ap.add_argument("--temperature", type=float, help="calibration: temperature scaling T")
    ap.add_argument(
        "--platt", type=float, nargs=2, metavar=("A", "B"), help="calibration: Platt scaling a, b"
    )
    ap.add_argument(
        "--intended-use",
        default="Hospital-supplied model, not validated on this device. Not for diagnostic use.",
    )
    ap.add_argument("--io-type", choices=("int8", "uint8"), default="int8")
    ap.add_argument("--width", type=int, help="input width, when the model's is dynamic")
    ap.add_argument("--height", type=int, help="input height, when the model's is dynamic")
    ap.add_argument(
        "--max-rep", type=int, default=300, help="at most this many images calibrate the int8 ranges"
    )
    ap.add_argument(
        "--holdout", type=float, default=0.2, help="fraction of the images kept for the agreement report"
    )
    ap.add_argument("--golden", type=int, default=3, help="golden vectors to write (default 3)")
    ap.add_argument(
        "--golden-atol", type=float, default=2, help="golden tolerance in quantized steps (default 2)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return convert(args)
    except ConvertError as exc:
        print(f"convert_model: error: {exc}", file=sys.stderr)
        return 2
    except BadModel as exc:
        print(f"convert_model: error: the manifest from the flags is invalid: {exc}", file=sys.stderr)
        return 2


def convert(args) -> int:
    t0 = time.perf_counter()
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConvertError(f"--out {out}: folder is not empty (use --force to overwrite)")
    if not args.model.exists():
        raise ConvertError(f"{args.model}: not found")
    files = image_files(args.images)
    workdir = Path(tempfile.mkdtemp(prefix="convert-model-"))
    try:
        print(f"loading {args.model} ...", file=sys.stderr)
        call, shape, out_shapes, trackable, kind, keras_model = load_model(
            args.model, args.width, args.height, workdir
        )
        print(
            f"  {kind}: input [1, {shape[0]}, {shape[1]}, {shape[2]}], outputs {[list(s) for s in out_shapes]}",
            file=sys.stderr,
        )
        mdict = manifest_dict(args, shape)
        manifest = parse_manifest(mdict, "flags")  # names the flag's key when something is wrong

        images, problems = load_images(files)
        for p in problems:
            print(f"convert_model: skipped {p}", file=sys.stderr)
        if not images:
            raise ConvertError(f"--images {args.images}: no readable image")
        n_hold = int(round(len(images) * args.holdout)) if len(images) > 4 else 0
        calib, hold = images[: len(images) - n_hold], images[len(images) - n_hold :] or images
        calib = calib[: args.max_rep]
        pre = Preprocessor(manifest, TensorSpec(0, "image", (1, *shape), np.dtype(np.float32), 0.0, 0))
        rep = np.concatenate([pre(img).copy() for img in calib])

        print(f"converting ({len(rep)} representative images, {args.io_type} in/out) ...", file=sys.stderr)
        if keras_model is not None:
            int8_buf, float_buf = convert_keras(keras_model, rep, args.io_type)
        else:
            int8_buf, float_buf = convert_callable(call, shape, out_shapes, trackable, rep, args.io_type)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.tflite").write_bytes(int8_buf)
        (out / "model_float.tflite").write_bytes(float_buf)

        from firmware_app.records.drift import reference_stats, reference_toml

        (out / "manifest.toml").write_text(manifest_text(mdict, reference_toml(reference_stats(images))))
        from firmware_app.models.manifest import load_manifest

        load_manifest(out)  # the file as written parses

        it = interpreter(out / "model.tflite")
        ind = it.get_input_details()[0]
        pre8 = Preprocessor(
            manifest,
            TensorSpec(
                0, "image", tuple(int(d) for d in ind["shape"]), np.dtype(ind["dtype"]), *ind["quantization"]
            ),
        )
        gold = [pre8(img).copy() for img in (hold + calib)[: args.golden]]
        write_golden(out, out / "model.tflite", gold)
        for k, x in enumerate(gold):  # the golden outputs reproduce (same machine: exactly)
            with np.load(out / "golden" / f"case_{k:03d}.npz") as g:
                for j, r in enumerate(run_raw(it, x)):
                    assert np.array_equal(r, g[f"output_{j}"])

        report = agreement(out, hold, args.threads)
        ops = op_names(out / "model.tflite")
        off = sorted(set(ops) - EDGETPU_OPS)
        report["ops"] = ops
        report["ops_not_on_edgetpu"] = off
        if args.model.suffix.lower() == ".onnx":
            shutil.copyfile(args.model, out / "model.onnx")
            report["onnx"] = "the original ONNX file"
        else:
            report["onnx"] = export_onnx(out / "model_float.tflite", out / "model.onnx")
        compiled, msg = edgetpu_compile(out / "model.tflite", out)
        report["edgetpu"] = msg
        report["sizes_kb"] = {p.name: round(p.stat().st_size / 1024, 1) for p in sorted(out.glob("model*"))}
        (out / "agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nwrote {out} in {time.perf_counter() - t0:.0f} s")
    print(
        f"  model.tflite {report['sizes_kb']['model.tflite']} kB ({args.io_type} in/out), model_float.tflite, manifest.toml, golden/ ({len(gold)} cases)"
    )
    print(
        f"  int8 vs float ({report['what']}, {report['images']} held-out images): {100 * report['agreement']:.2f} % agreement"
    )
    for o in report["outputs"]:
        print(f"    output {o['output']} {o['shape']}: rmse {o['rmse']:.4g}, SNR {o['snr_db']:.1f} dB")
    print(f"  ONNX: {report['onnx']}")
    print(f"  Edge TPU ops: {'all mappable' if not off else 'NOT mappable: ' + ', '.join(off)}")
    print(f"  {'edgetpu_compiler: ' if compiled else ''}{msg}")
    print(f"  next: firmware-app validate --model {out} --dataset DIR   (labelled local images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
