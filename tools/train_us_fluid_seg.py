#!/usr/bin/env python3
"""Train the bundled ``us-fluid-seg`` model: a small U-Net that outlines anechoic fluid on B-mode frames.

    .venv-tools/bin/python tools/train_us_fluid_seg.py --out models_tflite/us-fluid-seg [--epochs N] [--seed S]

Data: frames of ``firmware_app.sources.phantom.UltrasoundPhantom`` (training seeds 0..N-1; evaluation and
golden vectors on seeds from 1_000_000 and 2_000_000 that training never sees). Pre-processing is the
runtime's contract: whole 640x480 frame -> ``cv2.resize(..., INTER_AREA)`` to the model size -> [0, 1] ->
quantized with the input tensor's scale and zero point (the runtime's ``resize_area`` computes the same box
average one axis at a time, to within one rounding step: see firmware_app/preprocess.py). The runtime's mask is the argmax of the
[background, fluid] output, resized to the frame with INTER_NEAREST; metrics are measured that way.

Writes into --out: model.tflite (full-integer int8), model_float.tflite, model.onnx (float, via tf2onnx,
when it converts), manifest.toml (with temperature scaling in [calibration] and the drift statistics in
[reference]), golden/case_000..002.npz, README.md (model card), metrics.json. ``--calibrate-only`` keeps
the model already in --out and redoes only the calibration, [reference] and validate figures.
Needs tensorflow-cpu (the .venv-tools environment); takes about 10 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from modelkit import cpu_name, deterministic_tf  # noqa: E402

from firmware_app.sources.phantom import UltrasoundPhantom  # noqa: E402

MODEL_ID = "us-fluid-seg"
VERSION = "1.0.0"
FRAME_W, FRAME_H = 640, 480
EVAL_SEED_BASE = 1_000_000  # unseen seeds for the model card metrics
GOLDEN_SEED_BASE = 2_000_000  # unseen seeds for the golden vectors
LABELS = ("background", "fluid")


# ---------------------------------------------------------------- pre/post-processing (runtime contract)
def preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW frame -> float32 size x size in [0, 1]."""
    small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / np.float32(255.0)


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zp = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return x.astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zp), info.min, info.max).astype(dtype)


def frame_mask(labels: np.ndarray) -> np.ndarray:
    """Model-size 0/1 mask -> frame-size mask (INTER_NEAREST), uint8."""
    return cv2.resize(labels.astype(np.uint8), (FRAME_W, FRAME_H), interpolation=cv2.INTER_NEAREST)


# ---------------------------------------------------------------- data
def phantom_frames(seed: int, times: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    ph = UltrasoundPhantom(FRAME_W, FRAME_H, seed=seed)
    return [ph.render(t) for t in times]


def make_training_set(n_seeds: int, per_seed: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x: uint8 N x size x size x 1 (model input before the /255), y: uint8 fluid coverage 0..255."""
    rng = np.random.default_rng(seed)
    n = n_seeds * per_seed
    x = np.empty((n, size, size, 1), np.uint8)
    y = np.empty((n, size, size, 1), np.uint8)
    k = 0
    for s in range(n_seeds):
        times = sorted(int(t) for t in rng.choice(4000, per_seed, replace=False))
        for img, mask in phantom_frames(s, times):
            small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
            if rng.random() < 0.5:  # left-right mirror: a probe held the other way round
                small, cover = small[:, ::-1], cover[:, ::-1]
            x[k, :, :, 0] = small
            y[k, :, :, 0] = np.round(cover * 255.0).astype(np.uint8)
            k += 1
    return x, y


def eval_frames(base: int, n_seeds: int, per_seed: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    out = []
    for s in range(base, base + n_seeds):
        times = [37 * k for k in range(per_seed)]
        for t, (img, mask) in zip(times, phantom_frames(s, times)):
            out.append((s, t, img, mask))
    return out


# ---------------------------------------------------------------- model
def build_unet(size: int, chans: tuple[int, ...], batch_size: int | None):
    """U-Net with Edge-TPU-mappable ops only: CONV_2D and ADD (ReLU fused), MAX_POOL_2D, TRANSPOSE_CONV,
    SOFTMAX; batch 1 for export, fixed shapes.

    The skip connection is merged as conv(up) + conv(skip) instead of conv(concat(up, skip)) — the same
    function, but int8 CONCATENATION forces one scale on all its inputs, and the decoder's activations
    (tens to hundreds) would leave the encoder's skip features (around 1) with a couple of levels. ADD
    takes inputs of different scales. No batch norm: with a training this short its moving statistics
    lag the weights and the inference-mode model disagrees with the trained one.
    """
    import keras
    from keras import layers

    def conv(c, name, **kw):
        return layers.Conv2D(c, 3, padding="same", kernel_initializer="he_normal", name=name, **kw)

    inp = keras.Input((size, size, 1), batch_size=batch_size, name="image")
    x, skips = inp, []
    for i, c in enumerate(chans[:-1]):
        x = conv(c, f"enc{i}_conv1", activation="relu")(x)
        x = conv(c, f"enc{i}_conv2", activation="relu")(x)
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = conv(chans[-1], "mid_conv1", activation="relu")(x)
    x = conv(chans[-1], "mid_conv2", activation="relu")(x)
    for i in reversed(range(len(chans) - 1)):
        c = chans[i]
        up = layers.Conv2DTranspose(c, 2, strides=2, kernel_initializer="he_normal", name=f"up{i}")(x)
        x = layers.Add(name=f"merge{i}")(
            [conv(c, f"dec{i}_conv1_up")(up), conv(c, f"dec{i}_conv1_skip", use_bias=False)(skips[i])]
        )
        x = layers.ReLU(name=f"dec{i}_relu1")(x)
        x = conv(c, f"dec{i}_conv2", activation="relu")(x)
    x = layers.Conv2D(len(LABELS), 1, name="logits")(x)
    out = layers.Softmax(name="probs")(x)
    return keras.Model(inp, out, name="us_fluid_unet")


def train(args, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray):
    import keras
    import tensorflow as tf

    model = build_unet(args.size, tuple(args.chans), batch_size=None)

    def to_float(xb, yb):
        xf = tf.cast(xb, tf.float32) / 255.0
        f = tf.cast(yb, tf.float32) / 255.0
        return xf, tf.concat([1.0 - f, f], axis=-1)

    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch, drop_remainder=True)
        .map(to_float, num_parallel_calls=1, deterministic=True)
        .prefetch(2)
    )
    vds = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(args.batch).map(to_float)

    def loss(y_true, y_pred):
        ce = keras.losses.categorical_crossentropy(y_true, y_pred)
        t, p = y_true[..., 1], y_pred[..., 1]
        dice = (2.0 * tf.reduce_sum(t * p) + 1.0) / (tf.reduce_sum(t) + tf.reduce_sum(p) + 1.0)
        return tf.reduce_mean(ce) + 0.5 * (1.0 - dice)

    steps = (len(x) // args.batch) * args.epochs
    lr = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    t0 = time.perf_counter()
    hist = model.fit(ds, validation_data=vds, epochs=args.epochs, verbose=2)
    return model, time.perf_counter() - t0, {k: [float(v) for v in vs] for k, vs in hist.history.items()}


def convert(model, rep: np.ndarray, size: int, chans) -> tuple[bytes, bytes, object]:
    """-> (int8 tflite, float tflite, batch-1 Keras model)."""
    import tensorflow as tf

    fixed = build_unet(size, tuple(chans), batch_size=1)
    fixed.set_weights(model.get_weights())

    conv = tf.lite.TFLiteConverter.from_keras_model(fixed)
    float_buf = conv.convert()

    conv = tf.lite.TFLiteConverter.from_keras_model(fixed)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    calib = rep.copy()
    calib[0, 0, 0, 0] = 255  # pins the input tensor's range to exactly [0, 1]: scale 1/255

    def representative():
        for i in range(len(calib)):
            yield [calib[i : i + 1].astype(np.float32) / np.float32(255.0)]

    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    int8_buf = conv.convert()
    return int8_buf, float_buf, fixed


# ---------------------------------------------------------------- evaluation
class Runner:
    """LiteRT interpreter with the runtime's pre- and post-processing."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]
        self.size = int(self.inp["shape"][2])

    def input_tensor(self, frame: np.ndarray) -> np.ndarray:
        return quantize(preprocess(frame, self.size), self.inp)[None, :, :, None]

    def raw(self, tensor: np.ndarray) -> np.ndarray:
        self.it.set_tensor(self.inp["index"], tensor)
        self.it.invoke()
        return self.it.get_tensor(self.out["index"]).copy()

    def labels(self, frame: np.ndarray) -> np.ndarray:
        return np.argmax(self.raw(self.input_tensor(frame))[0], axis=-1).astype(np.uint8)

    def invoke_ms(self, n: int = 100) -> dict[str, float]:
        tensor = self.input_tensor(np.zeros((FRAME_H, FRAME_W), np.uint8))
        for _ in range(5):
            self.raw(tensor)
        ts = []
        for _ in range(n):
            self.it.set_tensor(self.inp["index"], tensor)
            t0 = time.perf_counter()
            self.it.invoke()
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"p50": float(np.percentile(ts, 50)), "p99": float(np.percentile(ts, 99))}


def evaluate(int8: Runner, flt: Runner, frames) -> dict:
    inter = total = 0
    dices, agree_model, agree_frame, empty_ok, n_empty = [], [], [], 0, 0
    for _s, _t, img, truth in frames:
        li, lf = int8.labels(img), flt.labels(img)
        agree_model.append(float(np.mean(li == lf)))
        mi, mf = frame_mask(li), frame_mask(lf)
        agree_frame.append(float(np.mean(mi == mf)))
        a, b = int(mi.sum()), int(truth.sum())
        i = int(np.logical_and(mi, truth).sum())
        inter, total = inter + i, total + a + b
        if b:
            dices.append(2.0 * i / (a + b))
        else:
            n_empty += 1
            empty_ok += a == 0
    return {
        "frames": len(frames),
        "frames_with_fluid": len(dices),
        "dice_global": 2.0 * inter / max(total, 1),
        "dice_mean_fluid_frames": float(np.mean(dices)) if dices else float("nan"),
        "dice_p10_fluid_frames": float(np.percentile(dices, 10)) if dices else float("nan"),
        "empty_frames_predicted_empty": f"{empty_ok}/{n_empty}",
        "agreement_int8_float_model_px": float(np.mean(agree_model)),
        "agreement_int8_float_frame_px": float(np.mean(agree_frame)),
        "agreement_int8_float_min_frame": float(np.min(agree_model)),
    }


def evaluate_float_dice(flt: Runner, frames) -> float:
    inter = total = 0
    for _s, _t, img, truth in frames:
        m = frame_mask(flt.labels(img))
        inter += int(np.logical_and(m, truth).sum())
        total += int(m.sum()) + int(truth.sum())
    return 2.0 * inter / max(total, 1)


def op_names(path: Path) -> list[str]:
    from ai_edge_litert import interpreter as litert

    it = litert.Interpreter(  # no XNNPACK: it would replace the ops by DELEGATE nodes
        model_path=str(path),
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    it.allocate_tensors()
    return sorted({d["op_name"] for d in it._get_ops_details()})


# ---------------------------------------------------------------- outputs
def write_golden(out: Path, int8: Runner) -> list[dict]:
    gold = out / "golden"
    gold.mkdir(parents=True, exist_ok=True)
    cases = []
    seed = GOLDEN_SEED_BASE
    while len(cases) < 3:  # frames of three different unseen seeds; the first two show fluid
        ph = UltrasoundPhantom(FRAME_W, FRAME_H, seed=seed)
        want_fluid = len(cases) < 2
        for t in (0, 45, 90, 135):
            img, mask = ph.render(t)
            if bool(mask.any()) == want_fluid:
                tensor = int8.input_tensor(img)
                raw = int8.raw(tensor)
                name = f"case_{len(cases):03d}.npz"
                np.savez_compressed(gold / name, input=tensor, output_0=raw)
                cases.append({"file": name, "seed": seed, "t": t, "fluid_px": int(mask.sum())})
                break
        seed += 1
    return cases


def write_manifest(out: Path, size: int, extra: str = "") -> None:
    """``extra``: more tables after [golden] (``[calibration]``, ``[reference]``)."""
    text = f'''id = "{MODEL_ID}"
version = "{VERSION}"
task = "segmentation"
intended_use = "Demonstration on synthetic ultrasound phantoms: outlines anechoic free fluid. Not for diagnostic use."
cleared_for_clinical_use = false

[input]
width = {size}
height = {size}
color = "gray"
range = [0.0, 1.0]

[output]
labels = ["background", "fluid"]
activation = "none"          # the model ends in a softmax: the output already holds probabilities

[thresholds]
alert = 0.5
alert_min = 0.3
alert_max = 0.9

[golden]
atol = 2                     # per output element, in quantized steps of the int8 output
'''
    (out / "manifest.toml").write_text(text + ("\n" + extra if extra else ""))


def export_onnx(float_tflite: Path, out: Path) -> str:
    """Float ONNX twin via tf2onnx; returns a one-line status for the model card."""
    try:
        import tf2onnx

        tf2onnx.convert.from_tflite(str(float_tflite), opset=13, output_path=str(out / "model.onnx"))
    except Exception as exc:  # noqa: BLE001 - optional artefact; the reason goes into the card
        (out / "model.onnx").unlink(missing_ok=True)
        return f"not produced: tf2onnx failed ({type(exc).__name__}: {exc})"
    return "float32 in/out, converted from model_float.tflite with tf2onnx (opset 13)"


def verify_onnx(out: Path, flt: Runner, frames) -> str:
    path = out / "model.onnx"
    if not path.exists():
        return "n/a"
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]  # noqa: E731
        how = "onnxruntime"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(str(path))
        run = lambda x: ref.run(None, {ref.input_names[0]: x})[0]  # noqa: E731
        how = "onnx.reference"
    diffs = []
    for _s, _t, img, _m in frames[:2]:
        x = flt.input_tensor(img)
        diffs.append(float(np.max(np.abs(run(x) - flt.raw(x)))))
    return f"max |onnx - float tflite| = {max(diffs):.2e} on 2 frames ({how})"


def _fmt(m: dict) -> str:
    if not isinstance(m, dict) or m.get("value") is None:
        return "n/a"
    ci = m.get("ci95")
    return f"{m['value']:.3f} (95 % CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{m['value']:.3f}"


def calibration_section(info: dict) -> str:
    """Model-card section: temperature scaling, drift reference, and ``firmware-app validate`` figures."""
    c = info.get("calibration")
    if not c:
        return ""
    v = c["validate"]
    a = v["agreement_int8_float"]
    return f"""## Calibration, drift reference, validation
Temperature scaling of the [background, fluid] softmax, fitted on {c["calibration_pixels"]:,} model pixels of held-out
frames (seeds {CAL_SEED_BASE}..., never trained on) against each pixel's fluid area fraction:
T = {c["temperature"]:.4f} (`[calibration]`; the task shows sigmoid((log p_fluid - log p_background) / T); the mask at
threshold 0.5 is unchanged by it). Pixel ECE (10 bins, model resolution) on the test set below:
**{c["ece_before"]:.4f} before, {c["ece_after"]:.4f} after**. `[reference]` holds the gray-level statistics of 100
training-distribution frames for the device's "input unlike training data" warning.

`firmware-app validate` on `python tools/make_phantom_dataset.py --task segmentation --count {v["n"]} --seed {TEST_SEED}`
({v["n"]} frames of phantom seeds never trained on, {v["positives"]} with fluid; the daemon's own path, threshold
{v["threshold"]:.2f}; 95 % CIs: bootstrap over cases, {v["bootstrap"]["resamples"]} resamples):

| metric | int8 `model.tflite` |
|---|---|
| Dice (frames with fluid, mean) | **{_fmt(v["dice"])}** |
| Dice (all pixels pooled) | {_fmt(v["dice_pooled"])} |
| IoU (frames with fluid, mean) | {_fmt(v["iou"])} |
| sensitivity / specificity (fluid present, per frame) | {_fmt(v["sensitivity"])} / {_fmt(v["specificity"])} |
| false-positive regions per frame | {_fmt(v["fp_per_case"])} |
| pixel ECE after calibration | {_fmt(v["ece"])} |
| int8 vs float agreement (mask pixels) | {100 * a["value"]:.3f} % over {a["cases"]} frames |

"""


def write_readme(out: Path, info: dict) -> None:
    m, mf = info["metrics"], info
    chans = ", ".join(str(c) for c in info["chans"])
    text = f"""# us-fluid-seg {VERSION} — model card

**Not for diagnostic use.** A demonstration model trained only on synthetic phantoms
(`firmware_app.sources.phantom.UltrasoundPhantom`). It has never seen a real patient image and is not
cleared for clinical use (`cleared_for_clinical_use = false`: the device always shows the banner).

## What it does
Outlines anechoic (black, fluid-like) regions on a B-mode ultrasound frame: a two-class
[background, fluid] segmentation at {info["size"]}x{info["size"]}, softmax probabilities out.

## Files
| file | what |
|---|---|
| `model.tflite` | full-integer int8 (int8 in, int8 out), {info["kb_int8"]:.0f} kB — the bundled model |
| `model_float.tflite` | the float32 twin (float in/out), {info["kb_float"]:.0f} kB |
| `model.onnx` | {info["onnx"]} |
| `manifest.toml` | the runtime manifest |
| `golden/case_00N.npz` | `input` (the exact int8 input tensor [1,{info["size"]},{info["size"]},1]) and `output_0` (the exact raw int8 output of LiteRT); seeds {", ".join(f"{c['seed']} t={c['t']}" for c in info["golden"])}; atol 2 quantized steps |
| `metrics.json` | every number below, machine-readable |

## Input / pre-processing (the runtime contract)
The whole 640x480 grayscale frame is resized to {info["size"]}x{info["size"]} with
`cv2.resize(..., interpolation=cv2.INTER_AREA)` (aspect ratio squashed on purpose), mapped linearly from
uint8 [0, 255] to [0.0, 1.0], then quantized with the input tensor's scale/zero point
(scale {info["in_q"][0]:.6g}, zero point {int(info["in_q"][1])}). Output: int8 probabilities
(scale {info["out_q"][0]:.6g}, zero point {int(info["out_q"][1])}), channel 0 = background, 1 = fluid; the mask is the argmax,
resized to the frame with INTER_NEAREST. `activation = "none"` because the model already ends in a softmax.

## Architecture
U-Net, {len(info["chans"]) - 1} poolings, channels ({chans}); each block 2 x (3x3 conv + ReLU, no batch
norm); 2x2 max-pool down, 2x2 stride-2 transposed convolution up; each skip is merged as
conv3x3(up) + conv3x3(skip) (ADD) rather than conv3x3(concat(up, skip)) — the same function, but int8
CONCATENATION forces one scale on all its inputs and the small-valued skip features lost their bits
(int8 Dice 0.55 against float 0.94 in an earlier run); 1x1 conv to 2 logits, softmax. {info["params"]:,} parameters. Batch 1, fixed shapes. TFLite ops:
{", ".join(info["ops_int8"])} — all on the Edge TPU's supported list (no TILE / RESIZE_*; not yet run
through `edgetpu_compiler`, which is not available on this build machine).

## Data
Frames of `UltrasoundPhantom` at 640x480: a curvilinear fan scan-converted from a polar grid, Rayleigh
speckle that decorrelates frame to frame, depth attenuation with partial TGC, near-field layers, rib
shadows, organs of different echogenicity with bright capsules, a diaphragm-like interface, and 0–3
anechoic collections that breathe, drift and swell/shrink, with posterior enhancement. Per seed: fan
geometry, depth, gain, dynamic range, anatomy and the number of collections vary; about a quarter of the
seeds have no fluid and transient collections give fluid-free frames within other seeds.
Training: seeds 0..{info["train_seeds"] - 1}, {info["per_seed"]} random frames each (t in 0..3999),
random left-right mirroring: {info["n_train"]} frames. Validation during training: {info["n_val"]} frames of seeds
{EVAL_SEED_BASE + 500}..{EVAL_SEED_BASE + 519}. Test (below): {m["frames"]} frames of {info["eval_seeds"]} seeds from {EVAL_SEED_BASE}
(t = 0, 37, 74, ...), none used in training; {m["frames_with_fluid"]} of them contain fluid.

## Training
Keras (TensorFlow {info["tf"]}) on {info["cpus"]} CPU cores, {info["epochs"]} epochs, batch {info["batch"]}, Adam with
cosine decay from {info["lr"]}, loss = cross-entropy on soft (area-coverage) labels + 0.5 x (1 - soft Dice of
the fluid channel). Seeds fixed (`--seed {info["seed"]}`; TF op determinism on). Wall time
{info["train_s"] / 60:.1f} min training, {info["total_s"] / 60:.1f} min for the whole script. Post-training
full-integer quantization with {info["n_rep"]} representative training frames.

## Metrics (unseen seeds, measured at the 640x480 frame after INTER_NEAREST upsampling)
| metric | int8 `model.tflite` |
|---|---|
| Dice, all test frames pooled | **{m["dice_global"]:.3f}** |
| Dice, mean over frames with fluid | {m["dice_mean_fluid_frames"]:.3f} (10th percentile {m["dice_p10_fluid_frames"]:.3f}) |
| fluid-free frames predicted empty | {m["empty_frames_predicted_empty"]} |
| int8 vs float pixel agreement (model grid / frame) | {100 * m["agreement_int8_float_model_px"]:.3f} % / {100 * m["agreement_int8_float_frame_px"]:.3f} % (worst frame {100 * m["agreement_int8_float_min_frame"]:.2f} %) |
| float model Dice, pooled | {mf["dice_float"]:.3f} |
| LiteRT CPU invoke, 2 threads (int8) | p50 {info["invoke_int8"]["p50"]:.2f} ms, p99 {info["invoke_int8"]["p99"]:.2f} ms |
| LiteRT CPU invoke, 2 threads (float) | p50 {info["invoke_float"]["p50"]:.2f} ms |

Timings on the build machine: {info["cpu"]} (other jobs shared it during training, so the wall
time is an upper bound). ONNX check: {info["onnx_check"]}.

{calibration_section(info)}## Limits
- Synthetic data only: the phantom's speckle, anatomy and artefacts are simplified; expect it to fail on
  real scans (vessels, gallbladder, bladder, cysts and shadows on real images were never seen).
- It finds *anechoic* regions; complex (echogenic) fluid, clotted blood and small collections under ~{int(round(640 / info["size"] * 3))} px
  across at 640x480 are missed or under-segmented. Dark rib shadows and the black area outside the fan are the
  main sources of false positives it was trained against, not all of them.
- Resolution: one model pixel covers {640 / info["size"]:.1f} x {480 / info["size"]:.1f} frame pixels; outlines are that coarse.
- The aspect ratio is squashed (4:3 to 1:1); frames of another size or crop are resized the same way, which
  the model has not been trained for.
"""
    (out / "README.md").write_text(text)


# ---------------------------------------------------------------- calibration, drift reference, validation
CAL_SEED_BASE = 4_000_000  # held-out seeds for the temperature fit
TEST_SEED = 636363  # tools/make_phantom_dataset.py --task segmentation --seed for the validate figures


def fit_temperature_seg(model_dir: Path, n_seeds: int = 40, per_seed: int = 3) -> tuple[float, int]:
    """Temperature T of the [background, fluid] softmax, fitted on held-out frames through the runtime
    (``firmware_app.validate.ModelRunner``): minimises the pixel log-loss at the model's resolution against
    the fluid area fraction of each model pixel. The task then shows sigmoid((log p1 - log p0) / T)."""
    sys.path.insert(0, str(REPO / "tools"))
    from modelkit import fit_temperature

    from firmware_app.models.store import find_model
    from firmware_app.validate import ModelRunner

    runner = ModelRunner(find_model(str(model_dir.resolve())))
    spec = runner.backend.outputs[0]
    zs, ys = [], []
    for s in range(CAL_SEED_BASE, CAL_SEED_BASE + n_seeds):
        ph = UltrasoundPhantom(FRAME_W, FRAME_H, seed=s)
        for k in range(per_seed):
            img, mask = ph.render(53 * k)
            p = spec.dequantize(runner.raw(img)[0])[0]
            h, w = p.shape[:2]
            frac = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
            lp = np.log(np.clip(p, 1e-6, 1.0))
            zs.append((lp[..., 1] - lp[..., 0]).ravel())
            ys.append(frac.ravel())
    runner.close()
    z, y = np.concatenate(zs).astype(np.float64), np.concatenate(ys).astype(np.float64)

    def nll(t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / t)), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    return fit_temperature(nll), len(z)


def reference_table(n_seeds: int = 100) -> str:
    """``[reference]`` input statistics of training-distribution frames (training seeds, every 37th frame)."""
    from firmware_app.records.drift import reference_stats, reference_toml

    frames = [UltrasoundPhantom(FRAME_W, FRAME_H, seed=s).render(37 * (s % 20))[0] for s in range(n_seeds)]
    return reference_toml(reference_stats(frames))


def calibrate_and_validate(out: Path, size: int, test_count: int = 200) -> dict:
    """Temperature scaling, ``[reference]``, and the validate figures (before/after) into the manifest."""
    sys.path.insert(0, str(REPO / "tools"))
    from make_phantom_dataset import make_dataset

    from firmware_app.models.store import find_model
    from firmware_app.validate import validate

    ref = reference_table()
    write_manifest(out, size, extra=ref)
    temperature, n_px = fit_temperature_seg(out)
    ds = make_dataset(
        "segmentation", test_count, TEST_SEED, Path(tempfile.mkdtemp(prefix="fluid-test-")) / "test"
    )
    before, _ = validate(find_model(str(out.resolve())), ds)
    cal = f'[calibration]\nmethod = "temperature"\ntemperature = {temperature:.4f}\n'
    write_manifest(out, size, extra=cal + "\n" + ref)
    after, _ = validate(find_model(str(out.resolve())), ds)
    cal += (
        f"ece_before = {before['ece']['value']:.4f}   # pixels, test set ({TEST_SEED}), 10 bins\n"
        f"ece_after = {after['ece']['value']:.4f}\n"
    )
    write_manifest(out, size, extra=cal + "\n" + ref)
    return {
        "temperature": temperature,
        "calibration_pixels": n_px,
        "ece_before": before["ece"]["value"],
        "ece_after": after["ece"]["value"],
        "validate": {k: v for k, v in after.items() if k != "curves"},
    }


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="model input width = height (128..256)")
    ap.add_argument("--chans", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--train-seeds", type=int, default=400)
    ap.add_argument("--per-seed", type=int, default=12)
    ap.add_argument("--eval-seeds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--calibrate-only",
        action="store_true",
        help="keep the trained model in --out: (re)fit the calibration, [reference] and validate figures only",
    )
    args = ap.parse_args(argv)
    if not 128 <= args.size <= 256 or args.size % 2 ** (len(args.chans) - 1):
        ap.error(f"--size {args.size}: need 128..256 and divisible by {2 ** (len(args.chans) - 1)}")

    if args.calibrate_only:
        info = json.loads((args.out / "metrics.json").read_text())
        info["calibration"] = calibrate_and_validate(args.out, info["size"])
        write_readme(args.out, info)
        (args.out / "metrics.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
        print(json.dumps({k: v for k, v in info["calibration"].items() if k != "validate"}, indent=2))
        return 0

    t_start = time.perf_counter()
    keras, tf = deterministic_tf(args.threads, args.seed)
    cv2.setNumThreads(args.threads)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"data: {args.train_seeds} seeds x {args.per_seed} frames at {args.size}x{args.size}", flush=True)
    x, y = make_training_set(args.train_seeds, args.per_seed, args.size, args.seed)
    vframes = eval_frames(EVAL_SEED_BASE + 500, 20, 5)
    xv = np.stack(
        [cv2.resize(f, (args.size, args.size), interpolation=cv2.INTER_AREA) for _, _, f, _ in vframes]
    )
    yv = np.stack(
        [
            np.round(
                cv2.resize(m.astype(np.float32), (args.size, args.size), interpolation=cv2.INTER_AREA) * 255
            ).astype(np.uint8)
            for _, _, _, m in vframes
        ]
    )
    xv, yv = xv[..., None], yv[..., None]
    print(f"data ready in {time.perf_counter() - t_start:.0f} s: {len(x)} train, {len(xv)} val", flush=True)

    model, train_s, history = train(args, x, y, xv, yv)
    print(f"trained in {train_s / 60:.1f} min", flush=True)

    rep = x[np.random.default_rng(args.seed + 2).choice(len(x), 200, replace=False)]
    int8_buf, float_buf, fixed = convert(model, rep, args.size, args.chans)
    (out / "model.tflite").write_bytes(int8_buf)
    (out / "model_float.tflite").write_bytes(float_buf)
    onnx_status = export_onnx(out / "model_float.tflite", out)

    int8 = Runner(out / "model.tflite", args.threads)
    flt = Runner(out / "model_float.tflite", args.threads)
    frames = eval_frames(EVAL_SEED_BASE, args.eval_seeds, 10)
    metrics = evaluate(int8, flt, frames)
    golden = write_golden(out, int8)
    write_manifest(out, args.size)
    info = {
        "size": args.size,
        "chans": list(args.chans),
        "params": int(fixed.count_params()),
        "kb_int8": len(int8_buf) / 1024,
        "kb_float": len(float_buf) / 1024,
        "onnx": onnx_status,
        "onnx_check": verify_onnx(out, flt, frames),
        "golden": golden,
        "in_q": [float(v) for v in int8.inp["quantization"]],
        "out_q": [float(v) for v in int8.out["quantization"]],
        "ops_int8": op_names(out / "model.tflite"),
        "train_seeds": args.train_seeds,
        "per_seed": args.per_seed,
        "n_train": len(x),
        "n_val": len(xv),
        "eval_seeds": args.eval_seeds,
        "n_rep": len(rep),
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "tf": tf.__version__,
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "train_s": train_s,
        "metrics": metrics,
        "dice_float": evaluate_float_dice(flt, frames),
        "invoke_int8": int8.invoke_ms(),
        "invoke_float": flt.invoke_ms(),
        "history": history,
    }
    info["calibration"] = calibrate_and_validate(out, args.size)
    info["total_s"] = time.perf_counter() - t_start
    write_readme(out, info)
    (out / "metrics.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    print(
        json.dumps(
            {k: info[k] for k in ("size", "kb_int8", "metrics", "dice_float", "invoke_int8")}, indent=2
        )
    )
    print(f"total {info['total_s'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
