#!/usr/bin/env python3
"""Train the bundled ``us-bline-cls`` model: B-lines present / absent on lung ultrasound, with a
class-activation heatmap as a second output.

    .venv-tools/bin/python tools/train_us_bline_cls.py --out models_tflite/us-bline-cls [--epochs N] [--seed S]

Data: frames of ``firmware_app.sources.lung_phantom.LungPhantom`` (training seeds 0..N-1; calibration on
seeds from 1_000_000, golden vectors from 3_000_000; the model card's test set is
``tools/make_phantom_dataset.py --task classification --seed TEST_SEED``, whose phantom seeds are 62-bit
hashes that training never sees). Pre-processing is the runtime's contract exactly: whole 640x480 frame ->
``cv2.resize(..., INTER_AREA)`` to the model size -> [0, 1] -> quantized with the input tensor's
parameters. Test metrics come from ``firmware_app.validate`` (the daemon's own path).

Model: a small CNN whose last 1x1 convolution gives a map of B-line logits (the class-activation map,
output 1, [1, 15, 20, 1]); its average (a fixed fully-connected layer, weights 1/300), clipped to +-8, is the
logit of "b-lines" (output 0, [1, 1]). Ops: CONV_2D, MAX_POOL_2D, RESHAPE, FULLY_CONNECTED, MINIMUM,
MAXIMUM; batch 1, fixed shapes. Platt scaling of that logit is fitted on the
held-out calibration frames and written to the manifest.

Writes into --out: model.tflite (full-integer int8), model_float.tflite, model.onnx, manifest.toml,
golden/case_000..002.npz, README.md (model card), metrics.json.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from modelkit import (  # noqa: E402
    EDGETPU_OPS,
    convert_keras,
    cpu_name,
    deterministic_tf,
    export_onnx,
    fit_platt,
    fmt_metric,
    fmt_num,
    interpreter,
    invoke_ms,
    op_names,
    progress,
    run_raw,
    verify_onnx,
    write_golden,
)

from firmware_app.records.drift import reference_stats, reference_toml  # noqa: E402
from firmware_app.sources.lung_phantom import LungPhantom  # noqa: E402

MODEL_ID = "us-bline-cls"
VERSION = "1.0.0"
LABELS = ("absent", "b-lines")
FRAME_W, FRAME_H = 640, 480
CAL_SEED_BASE = 1_000_000
GOLDEN_SEED_BASE = 3_000_000
TEST_SEED = 424242  # make_phantom_dataset --seed for the model card's test set


def preprocess(frame: np.ndarray, w: int, h: int) -> np.ndarray:
    """uint8 frame -> uint8 model-size image (the runtime's resize; /255 comes later)."""
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)


def make_set(
    seeds: range, per_seed: int, w: int, h: int, rng: np.random.Generator, label: str, keep_raw: int = 0
):
    """x uint8 [N, h, w, 1], y float [N], and up to ``keep_raw`` full frames (for the [reference] table)."""
    n = len(seeds) * per_seed
    x = np.empty((n, h, w, 1), np.uint8)
    y = np.empty(n, np.float32)
    raw = []
    k = 0
    for s in progress(seeds, len(seeds), label):
        ph = LungPhantom(FRAME_W, FRAME_H, seed=s)
        for t in sorted(int(v) for v in rng.choice(4000, per_seed, replace=False)):
            img, lab = ph.render(t)
            x[k, :, :, 0] = preprocess(img, w, h)
            y[k] = lab
            if len(raw) < keep_raw and k % max(1, n // keep_raw) == 0:
                raw.append(img)
            k += 1
    return x, y, raw


LOGIT_CLIP = 8.0  # the exported score is clipped to +-8 logits: a fine int8 step (16 / 255) where it matters


def build(w: int, h: int, chans: tuple[int, ...], batch_size: int | None, clip: float | None = None):
    """[score [1, 1], cam [1, h/8, w/8, 1]]; ``clip``: bound the score (export only; no weights)."""
    import keras
    from keras import layers

    class Clip(layers.Layer):
        def __init__(self, bound: float, **kw):
            super().__init__(**kw)
            self.bound = float(bound)

        def call(self, x):
            return keras.ops.clip(x, -self.bound, self.bound)

    inp = keras.Input((h, w, 1), batch_size=batch_size, name="image")
    x = inp
    for i, c in enumerate(chans[:-1]):
        for j in (1, 2):
            x = layers.Conv2D(
                c, 3, padding="same", activation="relu", kernel_initializer="he_normal", name=f"b{i}_conv{j}"
            )(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.Conv2D(
        chans[-1], 3, padding="same", activation="relu", kernel_initializer="he_normal", name="top"
    )(x)
    cam = layers.Conv2D(1, 1, name="cam")(x)  # B-line logit per location: the class-activation map
    fh, fw = h // 2 ** (len(chans) - 1), w // 2 ** (len(chans) - 1)
    # the mean of the map, as a fixed fully-connected layer: unlike AVERAGE_POOL_2D (whose int8 output must
    # share the map's scale), FULLY_CONNECTED gives the score its own, finer int8 scale
    flat = layers.Reshape((fh * fw,), name="flat")(cam)
    score = layers.Dense(
        1,
        use_bias=False,
        trainable=False,
        kernel_initializer=keras.initializers.Constant(1.0 / (fh * fw)),
        name="mean",
    )(flat)
    if clip is not None:
        score = Clip(clip, name="clip")(score)
    return keras.Model(inp, [score, cam], name="us_bline_cam")


def train(args, x, y, xv, yv):
    import keras
    import tensorflow as tf

    model = build(args.width, args.height, tuple(args.chans), None)
    train_model = keras.Model(model.input, model.outputs[0])

    def aug(xb, yb):
        xf = tf.cast(xb, tf.float32) / 255.0
        return xf, yb

    flip = np.concatenate([x, x[:, :, ::-1]])  # left-right mirror: the probe turned round
    yy = np.concatenate([y, y])
    ds = (
        tf.data.Dataset.from_tensor_slices((flip, yy))
        .shuffle(len(flip), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch, drop_remainder=True)
        .map(aug, num_parallel_calls=1, deterministic=True)
        .prefetch(2)
    )
    vds = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(64).map(aug)
    steps = (len(flip) // args.batch) * args.epochs
    lr = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps, alpha=0.02)
    train_model.compile(
        optimizer=keras.optimizers.Adam(lr),
        # label smoothing bounds the logits (about +-3.7): small activations quantize finely to int8
        loss=keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.05),
        metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
    )
    t0 = time.perf_counter()
    hist = train_model.fit(ds, validation_data=vds, epochs=args.epochs, verbose=2)
    return model, time.perf_counter() - t0, {k: [float(v) for v in vs] for k, vs in hist.history.items()}


def quantize(x01: np.ndarray, detail: dict) -> np.ndarray:
    scale, zp = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return x01.astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.round(x01 / scale + zp), info.min, info.max).astype(dtype)


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Dequantized score output for uint8 model-size images x [N, h, w, 1], as the runtime computes it."""
    it = interpreter(path)
    d = it.get_input_details()[0]
    od = it.get_output_details()
    si = next(i for i, o in enumerate(od) if int(np.prod(o["shape"])) == 1)
    scale, zp = od[si]["quantization"]
    out = np.empty(len(x), np.float64)
    for k in range(len(x)):
        raw = run_raw(it, quantize(x[k : k + 1].astype(np.float32) / 255.0, d))[si].reshape(-1)[0]
        out[k] = (float(raw) - zp) * scale if scale else float(raw)
    return out


def write_manifest(out: Path, args, hm_index: int, cal: str, ref: str) -> None:
    text = f'''id = "{MODEL_ID}"
version = "{VERSION}"
task = "classification"
intended_use = "Demonstration on synthetic lung-ultrasound phantoms: flags B-lines (present / absent) and shows where. Not for diagnostic use."
cleared_for_clinical_use = false

[input]
width = {args.width}
height = {args.height}
color = "gray"
range = [0.0, 1.0]

[output]
labels = ["{LABELS[0]}", "{LABELS[1]}"]
activation = "sigmoid"       # output 0 is the logit of "b-lines"
heatmap_output = {hm_index}           # [1, h, w, 1] class-activation map (B-line logit per location)

[thresholds]
alert = 0.5
alert_min = 0.2
alert_max = 0.9

{cal}
[golden]
atol = 2                     # per output element, in quantized steps of the int8 outputs

{ref}'''
    (out / "manifest.toml").write_text(text)


def golden_inputs(path: Path, w: int, h: int) -> tuple[list[np.ndarray], list[dict]]:
    """Three frames of unseen seeds: two with B-lines, one without."""
    d = interpreter(path).get_input_details()[0]
    xs, info = [], []
    want = [1, 1, 0]
    seed = GOLDEN_SEED_BASE
    while len(xs) < 3:
        ph = LungPhantom(FRAME_W, FRAME_H, seed=seed)
        for t in (0, 60, 120, 180):
            img, lab = ph.render(t)
            if lab == want[len(xs)]:
                xs.append(quantize(preprocess(img, w, h)[None, :, :, None].astype(np.float32) / 255.0, d))
                info.append({"seed": seed, "t": t, "label": LABELS[lab]})
                break
        seed += 1
    return xs, info


def write_readme(out: Path, info: dict) -> None:
    v = info["validate"]
    a = v["agreement_int8_float"]
    chans = ", ".join(str(c) for c in info["chans"])
    text = f"""# {MODEL_ID} {VERSION} — model card

**Not for diagnostic use.** A demonstration model trained only on synthetic lung-ultrasound phantoms
(`firmware_app.sources.lung_phantom.LungPhantom`). It has never seen a real patient image and is not cleared
for clinical use (`cleared_for_clinical_use = false`: the device always shows the banner).

## What it does
Says whether a lung-ultrasound frame shows **B-lines** (vertical, hyperechoic comet-tail artefacts from the
pleural line to the bottom of the image, erasing the A-lines): labels `absent` / `b-lines`, with a calibrated
probability, and a class-activation heatmap (output {info["hm_index"]}) that the screen draws over the frame to
show where the B-lines are. It does not count B-lines and says nothing about their cause.

## Files
| file | what |
|---|---|
| `model.tflite` | full-integer int8 (int8 in, int8 out), {info["kb_int8"]:.0f} kB — the bundled model |
| `model_float.tflite` | the float32 twin (float in/out), {info["kb_float"]:.0f} kB |
| `model.onnx` | {info["onnx"]} |
| `manifest.toml` | the runtime manifest, with `[calibration]` (Platt) and `[reference]` (input statistics for the drift warning) |
| `golden/case_00N.npz` | `input` (the exact int8 input tensor) and `output_0` (score), `output_1` (heatmap): exact raw LiteRT outputs; {", ".join(f"seed {g['seed']} t={g['t']} ({g['label']})" for g in info["golden"])}; atol 2 quantized steps |
| `metrics.json` | every number below, machine-readable |

## Input / output (the runtime contract)
The whole 640x480 grayscale frame is resized to {info["width"]}x{info["height"]} with `cv2.resize(..., INTER_AREA)`,
mapped from uint8 [0, 255] to [0.0, 1.0] and quantized with the input tensor's scale/zero point
(scale {info["in_q"][0]:.6g}, zero point {info["in_q"][1]}). Output 0: int8 logit of `b-lines`
(scale {info["out_q"][0]:.6g}, zero point {info["out_q"][1]}); the task applies Platt scaling
p = sigmoid(a·logit + b) with a = {info["platt"][0]:.4f}, b = {info["platt"][1]:.4f}. Output 1: the
class-activation map [1, {info["cam_hw"][0]}, {info["cam_hw"][1]}, 1] (B-line logit per location; its mean is output 0).

## Architecture
CNN, channels ({chans}): {len(info["chans"]) - 1} blocks of 2 x (3x3 conv + ReLU) and 2x2 max-pool, a 3x3 conv
+ ReLU, a 1x1 conv to one logit per location (the class-activation map), its global average (a fixed
fully-connected layer with weights 1/N: an average pool would force the score onto the map's coarse int8
scale) clipped to ±{LOGIT_CLIP:.0f} as the score. {info["params"]:,} parameters. Batch 1, fixed shapes. TFLite ops:
{", ".join(info["ops_int8"])} — all on the Edge TPU's supported list
({"checked in the flatbuffer against Coral's operator list" if info["edgetpu_ok"] else "NOT all on Coral's operator list"}; not run through `edgetpu_compiler`, which is not
available on this build machine).

## Data
`LungPhantom` at 640x480: a linear (rectangular) or curvilinear (fan) probe over one intercostal space; chest
wall layers; 0–2 ribs with bright surfaces and acoustic shadows; the pleural line with a sliding texture;
A-lines (reverberations at whole multiples of the pleural depth); per 2-s layout 0–8 B-lines (sometimes
merging into a bright band, they erase the A-lines and move with lung sliding) and 0–3 Z-lines (short, fainter
comet tails that fade within 1–2 cm: the confounder the model must ignore). Per seed: probe, depth, gain,
dynamic range, chest wall, ribs, pleural depth, and a "dry" or "wet" lung (how often B-lines show).
Training: seeds 0..{info["train_seeds"] - 1}, {info["per_seed"]} random frames each (t in 0..3999) plus their
left-right mirror images: {info["n_train"]} frames ({100 * info["train_pos"]:.0f} % with B-lines). Calibration
(Platt) and training-time validation: {info["n_cal"]} frames of seeds {CAL_SEED_BASE}... Test (below):
`python tools/make_phantom_dataset.py --task classification --count {v["n"]} --seed {TEST_SEED}` —
{v["n"]} frames of phantom seeds that training never saw, {v["positives"]} with B-lines.

## Training
Keras (TensorFlow {info["tf"]}) on {info["cpus"]} CPU cores, {info["epochs"]} epochs, batch {info["batch"]}, Adam with
cosine decay from {info["lr"]}, binary cross-entropy on the score with label smoothing 0.05 (bounded logits
quantize finely). Seeds fixed (`--seed {info["seed"]}`, TF op
determinism on). Wall time {info["train_s"] / 60:.1f} min training, {info["total_s"] / 60:.1f} min for the whole
script. Post-training full-integer quantization with {info["n_rep"]} representative training frames.

## Metrics (unseen phantom seeds, `firmware_app.validate`: the daemon's own path, threshold {v["threshold"]:.2f})
95 % CIs: bootstrap over cases, {v["bootstrap"]["resamples"]} resamples.

| metric | int8 `model.tflite` |
|---|---|
| AUC | **{fmt_metric(v["auc"])}** |
| sensitivity | {fmt_metric(v["sensitivity"])} |
| specificity | {fmt_metric(v["specificity"])} |
| PPV | {fmt_metric(v["ppv"])} |
| NPV | {fmt_metric(v["npv"])} |
| ECE (10 bins), after Platt scaling | {fmt_metric(v["ece"])} |
| ECE before / after calibration (test set) | {fmt_num(info["ece_before"])} / {fmt_num(info["ece_after"])} |
| int8 vs float agreement (decisions) | {100 * a["value"]:.2f} % over {a["cases"]} frames |
| LiteRT CPU invoke, 2 threads (int8) | p50 {info["invoke_int8"]["p50"]:.2f} ms, p99 {info["invoke_int8"]["p99"]:.2f} ms |
| LiteRT CPU invoke, 2 threads (float) | p50 {info["invoke_float"]["p50"]:.2f} ms |

Timings on the build machine: {info["cpu"]}. ONNX check: {info["onnx_check"]}.

## Limits
- Synthetic data only: the phantom's artefacts are idealised (straight, well-defined B-lines; no pleural
  effusion, consolidation, lung point, subcutaneous emphysema, or probe-specific artefacts). Expect it to fail
  on real scans.
- Presence only: it is not a B-line count (clinically, three or more per intercostal space matter), and it
  does not grade how wet a lung is. A single faint B-line near a rib shadow is the most common miss.
- The heatmap is a class-activation map at {info["cam_hw"][1]}x{info["cam_hw"][0]}: where the model's evidence is, not a
  segmentation. The screen draws it only with the alert (`b-lines`), stretched to its own min..max: it shows
  where the evidence is relative to the rest of the frame, not how strong it is.
- Aspect: the frame is resized to {info["width"]}x{info["height"]} (4:3 kept); other crops are resized the same way, which the
  model has not been trained for.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--chans", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--train-seeds", type=int, default=500)
    ap.add_argument("--per-seed", type=int, default=6)
    ap.add_argument("--test-count", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    down = 2 ** (len(args.chans) - 1)
    if args.width % down or args.height % down:
        ap.error(f"--width/--height must be divisible by {down}")

    t_start = time.perf_counter()
    keras, tf = deterministic_tf(args.threads, args.seed)
    cv2.setNumThreads(1)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    x, y, raw = make_set(
        range(args.train_seeds), args.per_seed, args.width, args.height, rng, "training frames", 300
    )
    xc, yc, _ = make_set(
        range(CAL_SEED_BASE, CAL_SEED_BASE + 100), 4, args.width, args.height, rng, "calibration frames"
    )
    print(
        f"data ready in {time.perf_counter() - t_start:.0f} s: {len(x)} train ({y.mean():.2f} positive), {len(xc)} calibration",
        flush=True,
    )

    model, train_s, history = train(args, x, y, xc, yc)
    print(f"trained in {train_s / 60:.1f} min", flush=True)

    fixed = build(args.width, args.height, tuple(args.chans), 1, clip=LOGIT_CLIP)
    fixed.set_weights(model.get_weights())
    rep = (
        x[np.random.default_rng(args.seed + 2).choice(len(x), min(300, len(x)), replace=False)].astype(
            np.float32
        )
        / 255.0
    )
    int8_buf, float_buf = convert_keras(fixed, rep)
    (out / "model.tflite").write_bytes(int8_buf)
    (out / "model_float.tflite").write_bytes(float_buf)
    onnx_status = export_onnx(out / "model_float.tflite", out / "model.onnx")

    it8 = interpreter(out / "model.tflite")
    od = it8.get_output_details()
    hm_index = next(i for i, o in enumerate(od) if len(o["shape"]) == 4)
    si = 1 - hm_index
    cam_hw = [int(v) for v in od[hm_index]["shape"][1:3]]

    # Platt scaling on the int8 model's logits of the held-out calibration frames
    zc = logits(out / "model.tflite", xc)
    a, b = fit_platt(zc, yc)
    print(f"Platt: a={a:.4f} b={b:.4f}", flush=True)

    # test set through the runtime (validate), first without calibration (ECE before), then with
    from firmware_app.models.store import find_model
    from firmware_app.validate import validate

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_phantom_dataset import make_dataset

    ref = reference_toml(reference_stats(raw))
    tmp = Path(tempfile.mkdtemp(prefix="bline-test-"))
    ds = make_dataset("classification", args.test_count, TEST_SEED, tmp / "test", progress=True)
    write_manifest(out, args, hm_index, '[calibration]\nmethod = "none"\n', ref)
    before, _ = validate(find_model(str(out.resolve())), ds, threads=args.threads)
    cal_plain = f'[calibration]\nmethod = "platt"\na = {a:.6f}\nb = {b:.6f}\n'
    write_manifest(out, args, hm_index, cal_plain, ref)
    after, _ = validate(find_model(str(out.resolve())), ds, threads=args.threads)
    ece_b, ece_a = before["ece"]["value"], after["ece"]["value"]
    cal = cal_plain
    if ece_b is not None and ece_a is not None:
        cal += f"ece_before = {ece_b:.4f}   # test set ({TEST_SEED}), 10 bins\nece_after = {ece_a:.4f}\n"
    write_manifest(out, args, hm_index, cal, ref)

    gx, ginfo = golden_inputs(out / "model.tflite", args.width, args.height)
    write_golden(out, out / "model.tflite", gx)
    d8 = it8.get_input_details()[0]
    fl_inputs = [(g.astype(np.float32) - d8["quantization"][1]) * d8["quantization"][0] for g in gx[:2]]
    ops = op_names(out / "model.tflite")
    info = {
        "width": args.width,
        "height": args.height,
        "chans": list(args.chans),
        "params": int(fixed.count_params()),
        "kb_int8": len(int8_buf) / 1024,
        "kb_float": len(float_buf) / 1024,
        "onnx": onnx_status,
        "onnx_check": verify_onnx(out / "model.onnx", out / "model_float.tflite", fl_inputs),
        "golden": ginfo,
        "hm_index": hm_index,
        "cam_hw": cam_hw,
        "in_q": [float(v) for v in d8["quantization"]],
        "out_q": [float(v) for v in od[si]["quantization"]],
        "platt": [a, b],
        "ece_before": ece_b,
        "ece_after": ece_a,
        "ops_int8": ops,
        "edgetpu_ok": set(ops) <= EDGETPU_OPS,
        "train_seeds": args.train_seeds,
        "per_seed": args.per_seed,
        "n_train": 2 * len(x),
        "train_pos": float(y.mean()),
        "n_cal": len(xc),
        "n_rep": len(rep),
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "tf": tf.__version__,
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "train_s": train_s,
        "invoke_int8": invoke_ms(out / "model.tflite", args.threads),
        "invoke_float": invoke_ms(out / "model_float.tflite", args.threads),
        "validate": {k: v for k, v in after.items() if k != "curves"},
        "validate_uncalibrated": {k: before[k] for k in ("auc", "ece", "sensitivity", "specificity")},
        "history": history,
    }
    info["total_s"] = time.perf_counter() - t_start
    write_readme(out, info)
    (out / "metrics.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    print(
        json.dumps(
            {
                k: info["validate"][k]
                for k in ("n", "auc", "sensitivity", "specificity", "ece", "agreement_int8_float")
            },
            indent=1,
        )
    )
    print(f"int8 {info['kb_int8']:.0f} kB, ops {ops}, invoke {info['invoke_int8']}")
    print(f"total {info['total_s'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
