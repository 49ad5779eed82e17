#!/usr/bin/env python3
"""Train the bundled ``xr-nodule-det`` model: nodule-like targets on the chest-radiograph phantom.

    .venv-tools/bin/python tools/train_xr_nodule_det.py --out models_tflite/xr-nodule-det [--epochs N] [--seed S]

Layout: a CenterNet-style single-stage detector on a stride-8 grid, exported as the runtime's
``boxes_scores`` layout so that every op maps to the Edge TPU (no TFLite_Detection_PostProcess, no TILE):

- the network predicts, per grid cell, a nodule-centre logit ``z`` and the box edges relative to the cell
  centre (``dy0, dx0, dy1, dx1``, normalised to the frame);
- inside the graph: soft peak suppression ``z' = z - K * min(maxpool3x3(z) - z, C)`` (a cell that is not
  the local maximum of its 3x3 neighbourhood loses up to K*C logits: one box per nodule, before any NMS),
  and box decoding ``boxes = cell centres + edges`` (an ADD with a constant grid);
- outputs: boxes [1, N, 4] (ymin, xmin, ymax, xmax in 0..1) and scores [1, N, 2] = [-z', z'] over the
  labels ``["background", "nodule"]`` (N = 40 x 30 cells). The manifest's ``activation = "sigmoid"`` with
  Platt scaling turns ``z'`` into the calibrated nodule probability; the runtime keeps boxes at or above the
  threshold and applies NMS (IoU 0.5).

Ops: CONV_2D, MAX_POOL_2D, TRANSPOSE_CONV, ADD, SUB, MINIMUM, MAXIMUM, MUL, CONCATENATION (the [-z, z]
pair), RESHAPE.

Data: ``XrayPhantom`` frames at 640x480 (training seeds 0..N-1, several nodule layouts per seed;
calibration on seeds from 1_000_000, golden vectors from 3_000_000; test =
``tools/make_phantom_dataset.py --task detection --seed TEST_SEED``). Pre-processing is the runtime's:
whole frame -> ``cv2.resize(..., INTER_AREA)`` to 320x240 -> [0, 1] -> quantized. Training uses random
160x120 crops aligned to the grid (the targets are relative to the cells, so a crop is a valid sample);
loss: CenterNet focal loss on a Gaussian centre heatmap + L1 on the edges at the centre cells.
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
    verify_onnx,
    write_golden,
)

from firmware_app.records.drift import reference_stats, reference_toml  # noqa: E402
from firmware_app.sources.phantom import XrayPhantom  # noqa: E402

MODEL_ID = "xr-nodule-det"
VERSION = "1.0.0"
LABELS = ("background", "nodule")
FRAME_W, FRAME_H = 640, 480
STRIDE = 8
PEAK_K, PEAK_C = 3.0, 3.0  # soft peak suppression: up to K*C logits off a cell that is not a local maximum
LOGIT_CLIP = 6.0  # the nodule logit is clipped to +-6 (p = 0.0025 .. 0.9975 before calibration)
MAX_FP_PER_CASE = 0.2  # the manifest threshold: the lowest with at most this many FP per calibration frame
CAL_SEED_BASE = 1_000_000
GOLDEN_SEED_BASE = 3_000_000
TEST_SEED = 515151
CROP_W, CROP_H = 160, 128


# ---------------------------------------------------------------- data
def targets(boxes, w: int, h: int) -> np.ndarray:
    """[h/8, w/8, 6]: Gaussian centre heatmap, regression mask, 4 edges (frame px at model scale)."""
    gh, gw = h // STRIDE, w // STRIDE
    t = np.zeros((gh, gw, 6), np.float32)
    sx, sy = w / FRAME_W, h / FRAME_H
    cy, cx = (np.mgrid[0:gh, 0:gw].astype(np.float32) + 0.5) * STRIDE
    for x0, y0, x1, y1 in boxes:
        bx0, by0, bx1, by1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
        bcx, bcy = (bx0 + bx1) / 2, (by0 + by1) / 2
        r = max(bx1 - bx0, by1 - by0) / 2
        sigma = max(0.6, r / STRIDE / 2.0)  # in cells
        g = np.exp(-(((cx - bcx) / STRIDE) ** 2 + ((cy - bcy) / STRIDE) ** 2) / (2 * sigma**2))
        t[..., 0] = np.maximum(t[..., 0], g)
        i, j = min(int(bcy // STRIDE), gh - 1), min(int(bcx // STRIDE), gw - 1)
        t[i, j, 0] = 1.0
        t[i, j, 1] = 1.0
        ccx, ccy = (j + 0.5) * STRIDE, (i + 0.5) * STRIDE
        t[i, j, 2:] = (by0 - ccy, bx0 - ccx, by1 - ccy, bx1 - ccx)
    return t


def make_set(
    seeds: range, per_seed: int, w: int, h: int, rng: np.random.Generator, label: str, keep_raw: int = 0
):
    n = len(seeds) * per_seed
    x = np.empty((n, h, w, 1), np.uint8)
    y = np.empty((n, h // STRIDE, w // STRIDE, 6), np.float32)
    boxes_all, raw = [], []
    k = 0
    for s in progress(seeds, len(seeds), label):
        ph = XrayPhantom(FRAME_W, FRAME_H, seed=s)
        layouts = rng.choice(200, per_seed, replace=False)
        for lay in sorted(int(v) for v in layouts):
            t = lay * ph.layout_frames + int(rng.integers(ph.layout_frames))
            img, _mask, boxes = ph.render(t)
            x[k, :, :, 0] = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            y[k] = targets(boxes, w, h)
            boxes_all.append(boxes)
            if len(raw) < keep_raw and k % max(1, n // keep_raw) == 0:
                raw.append(img)
            k += 1
    return x, y, boxes_all, raw


# ---------------------------------------------------------------- model
def backbone(inp, chans):
    from keras import layers

    c1, c2, c3, c4, c5 = chans

    def conv(x, c, name, stride=1):
        return layers.Conv2D(
            c,
            3,
            strides=stride,
            padding="same",
            activation="relu",
            kernel_initializer="he_normal",
            name=name,
        )(x)

    x = conv(inp, c1, "stem", 2)  # /2
    x = conv(x, c2, "c2")
    x = layers.MaxPooling2D(name="p2")(x)  # /4
    x = conv(x, c3, "c3a")
    x = conv(x, c3, "c3b")
    x = layers.MaxPooling2D(name="p3")(x)  # /8
    x = conv(x, c4, "c4a")
    f8 = conv(x, c4, "c4b")
    x = layers.MaxPooling2D(name="p4")(f8)  # /16
    x = conv(x, c5, "c5a")
    x = conv(x, c5, "c5b")
    x = layers.Conv2DTranspose(c4, 2, strides=2, activation="relu", name="up")(x)  # /8
    # conv3x3(up) + conv3x3(skip), then ReLU: the same function as conv3x3(concat(up, skip)), but an int8
    # CONCATENATION forces one scale on both inputs and the smaller one loses its bits (ADD rescales each)
    a = layers.Conv2D(c4, 3, padding="same", kernel_initializer="he_normal", name="h1_up")(x)
    b = layers.Conv2D(c4, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name="h1_skip")(
        f8
    )
    x = layers.ReLU(name="h1")(layers.Add(name="merge")([a, b]))
    x = conv(x, c4, "h2")
    z = layers.Conv2D(1, 1, bias_initializer=_const(-2.2), name="centre")(x)
    d = layers.Conv2D(4, 1, name="edges")(x)
    return z, d


def _const(v: float):
    import keras

    return keras.initializers.Constant(v)


def build_train(chans, h: int, w: int):
    import keras
    from keras import layers

    inp = keras.Input((h, w, 1), name="image")
    z, d = backbone(inp, chans)
    return keras.Model(inp, layers.Concatenate(name="train_out")([z, d]))


def build_export(chans, w: int, h: int):
    """Batch-1 model with peak suppression and box decoding in the graph -> [boxes, scores]."""
    import keras
    from keras import layers

    gh, gw = h // STRIDE, w // STRIDE

    class Constant(layers.Layer):
        """x + c, x * c, min(x, c) or max(x, c) (mode "add", "mul", "min", "max"), c a fixed constant."""

        def __init__(self, value: np.ndarray, mode: str, **kw):
            super().__init__(**kw)
            self.value = np.asarray(value, np.float32)
            self.mode = mode

        def call(self, x):
            if self.mode == "min":
                return keras.ops.minimum(x, self.value)
            if self.mode == "max":
                return keras.ops.maximum(x, self.value)
            return x + self.value if self.mode == "add" else x * self.value

    inp = keras.Input((h, w, 1), batch_size=1, name="image")
    z, d = backbone(inp, chans)
    mp = layers.MaxPooling2D(3, strides=1, padding="same", name="peak_pool")(z)
    gap = layers.Subtract(name="below_peak")([mp, z])  # >= 0; 0 at a local maximum
    gap = Constant(np.float32(PEAK_C), "min", name="cap")(gap)
    z2 = layers.Subtract(name="peak_logit")([z, Constant(np.float32(PEAK_K), "mul", name="k")(gap)])
    # a bounded logit keeps the int8 step of the scores output fine (LOGIT_CLIP / 127 logits)
    z2 = Constant(np.float32(-LOGIT_CLIP), "max", name="clip_lo")(
        Constant(np.float32(LOGIT_CLIP), "min", name="clip_hi")(z2)
    )
    neg = Constant(np.float32(-1.0), "mul", name="neg")(z2)
    scores = layers.Reshape((gh * gw, 2), name="scores")(layers.Concatenate(name="bg_fg")([neg, z2]))
    cy, cx = (np.mgrid[0:gh, 0:gw].astype(np.float32) + 0.5) * STRIDE
    centres = np.stack([cy / h, cx / w, cy / h, cx / w], axis=-1)[None]  # [1, gh, gw, 4]
    scale = np.array([1 / h, 1 / w, 1 / h, 1 / w], np.float32)  # edges are px at model scale
    boxes = Constant(centres, "add", name="decode")(Constant(scale, "mul", name="to_unit")(d))
    boxes = Constant(np.float32(0.0), "max", name="box_lo")(
        Constant(np.float32(1.0), "min", name="box_hi")(boxes)
    )
    boxes = layers.Reshape((gh * gw, 4), name="boxes")(boxes)
    return keras.Model(inp, [boxes, scores], name="xr_nodule_centernet")


def focal_loss(y, logit):
    import tensorflow as tf

    p = tf.sigmoid(logit)
    pos = tf.cast(y >= 0.999, tf.float32)
    lp = -tf.math.log_sigmoid(logit) * (1 - p) ** 2 * pos
    ln = -tf.math.log_sigmoid(-logit) * p**2 * (1 - y) ** 4 * (1 - pos)
    n = tf.maximum(tf.reduce_sum(pos), 1.0)
    return (tf.reduce_sum(lp) + tf.reduce_sum(ln)) / n


def train(args, x, y, xv, yv):
    import keras
    import tensorflow as tf

    model = build_train(tuple(args.chans), CROP_H, CROP_W)
    gh, gw = CROP_H // STRIDE, CROP_W // STRIDE
    H, W = x.shape[1:3]
    n_oy, n_ox = (H - CROP_H) // STRIDE + 1, (W - CROP_W) // STRIDE + 1

    def crop(xb, yb):
        oy = tf.random.uniform([], 0, n_oy, tf.int32)
        ox = tf.random.uniform([], 0, n_ox, tf.int32)
        xc = xb[oy * STRIDE : oy * STRIDE + CROP_H, ox * STRIDE : ox * STRIDE + CROP_W]
        yc = yb[oy : oy + gh, ox : ox + gw]
        if_flip = tf.random.uniform([]) < 0.5
        xf = tf.reverse(xc, [1])
        yf = tf.reverse(yc, [1])
        # mirrored edges: (dy0, dx0, dy1, dx1) -> (dy0, -dx1, dy1, -dx0)
        yf = tf.concat([yf[..., :2], yf[..., 2:3], -yf[..., 5:6], yf[..., 4:5], -yf[..., 3:4]], axis=-1)
        xc = tf.where(if_flip, xf, xc)
        yc = tf.where(if_flip, yf, yc)
        return tf.cast(xc, tf.float32) / 255.0, yc

    def loss(yt, out):
        f = focal_loss(yt[..., 0], out[..., 0])
        m = yt[..., 1:2]
        l1 = tf.reduce_sum(tf.abs(out[..., 1:] - yt[..., 2:]) * m) / tf.maximum(tf.reduce_sum(m), 1.0)
        return f + 0.1 * l1

    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=args.seed, reshuffle_each_iteration=True)
        .repeat(args.crops)
        .map(crop, num_parallel_calls=1, deterministic=True)
        .batch(args.batch, drop_remainder=True)
        .prefetch(2)
    )
    vds = tf.data.Dataset.from_tensor_slices((xv, yv)).map(crop).batch(64)
    steps = (len(x) * args.crops // args.batch) * args.epochs
    lr = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    t0 = time.perf_counter()
    hist = model.fit(ds, validation_data=vds, epochs=args.epochs, verbose=2)
    return model, time.perf_counter() - t0, {k: [float(v) for v in vs] for k, vs in hist.history.items()}


# ---------------------------------------------------------------- calibration
def fit_calibration(model_dir: Path, seeds: range, threads: int) -> tuple[float, float, int, float, dict]:
    """Platt scaling of the nodule logit on held-out frames: every box the runtime keeps at a low threshold
    (after NMS), labelled hit / not hit as ``firmware_app.validate`` matches them. Then the alert threshold:
    the lowest (0.25 .. 0.8, step 0.05) with at most ``MAX_FP_PER_CASE`` false positives per frame.

    -> (a, b, boxes used, threshold, {threshold: (sensitivity, FP per frame)}).
    """
    from firmware_app.models.store import find_model
    from firmware_app.validate import MATCH_IOU, ModelRunner, match_boxes

    model = find_model(str(model_dir.resolve()))
    runner = ModelRunner(model, threads=threads)
    z_all, hit_all = [], []
    frames = targets = 0
    for s in progress(seeds, len(seeds), "calibration frames"):
        ph = XrayPhantom(FRAME_W, FRAME_H, seed=s)
        for lay in (0, 3, 6, 9):
            img, _m, boxes = ph.render(lay * ph.layout_frames + 5)
            r = runner.result(runner.raw(img), (FRAME_W, FRAME_H), 0.02)
            pb = np.array([[b.x0, b.y0, b.x1, b.y1] for b in r.boxes]).reshape(-1, 4)
            tb = np.array(boxes, np.float64).reshape(-1, 4)
            match, _ = match_boxes(pb, [b.label for b in r.boxes], tb, [LABELS[1]] * len(tb), MATCH_IOU)
            p = np.clip([b.score for b in r.boxes], 1e-6, 1 - 1e-6)
            z_all += list(np.log(p) - np.log1p(-p))  # the uncalibrated logit
            hit_all += list((match >= 0).astype(float))
            frames += 1
            targets += len(tb)
    runner.close()
    z, hit = np.array(z_all), np.array(hit_all)
    a, b = fit_platt(z, hit)
    p = 1.0 / (1.0 + np.exp(-(a * z + b)))
    table = {}
    for t in np.round(np.arange(0.25, 0.801, 0.05), 2):
        table[float(t)] = (
            float(hit[p >= t].sum() / max(targets, 1)),
            float((1 - hit[p >= t]).sum() / frames),
        )
    ok = [t for t, (_, fp) in table.items() if fp <= MAX_FP_PER_CASE]
    return a, b, len(z_all), (min(ok) if ok else 0.8), table


# ---------------------------------------------------------------- outputs
def write_manifest(out: Path, w: int, h: int, cal: str, ref: str, alert: float) -> None:
    text = f'''id = "{MODEL_ID}"
version = "{VERSION}"
task = "detection"
intended_use = "Demonstration on synthetic chest-radiograph phantoms: boxes nodule-like targets. Not for diagnostic use."
cleared_for_clinical_use = false

[input]
width = {w}
height = {h}
color = "gray"
range = [0.0, 1.0]

[output]
labels = ["{LABELS[0]}", "{LABELS[1]}"]
activation = "sigmoid"       # scores [1, N, 2] = [-z, z]: z is the nodule logit of each grid cell
layout = "boxes_scores"      # boxes [1, N, 4] ymin, xmin, ymax, xmax (0..1); runtime NMS at IoU 0.5

[thresholds]
alert = {alert:.2f}
alert_min = 0.1
alert_max = 0.9

{cal}
[golden]
atol = 2                     # per output element, in quantized steps of the int8 outputs

{ref}'''
    (out / "manifest.toml").write_text(text)


def golden_inputs(path: Path, w: int, h: int) -> tuple[list[np.ndarray], list[dict]]:
    """Frames of three unseen seeds: two with nodules, one without."""
    d = interpreter(path).get_input_details()[0]
    scale, zp = d["quantization"]
    xs, info = [], []
    want = [True, True, False]
    seed = GOLDEN_SEED_BASE
    while len(xs) < 3:
        ph = XrayPhantom(FRAME_W, FRAME_H, seed=seed)
        for lay in range(8):
            img, _m, boxes = ph.render(lay * ph.layout_frames)
            if bool(boxes) == want[len(xs)]:
                x01 = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
                q = np.clip(np.round(x01 / scale + zp), -128, 127).astype(d["dtype"])
                xs.append(q[None, :, :, None])
                info.append({"seed": seed, "t": lay * ph.layout_frames, "nodules": len(boxes)})
                break
        seed += 1
    return xs, info


def write_readme(out: Path, info: dict) -> None:
    v = info["validate"]
    a = v["agreement_int8_float"]
    froc = ", ".join(f"{k}: {val:.3f}" for k, val in v["sensitivity_at_fp_per_case"].items())
    chans = ", ".join(str(c) for c in info["chans"])
    text = f"""# {MODEL_ID} {VERSION} — model card

**Not for diagnostic use.** A demonstration model trained only on synthetic chest-radiograph phantoms
(`firmware_app.sources.phantom.XrayPhantom`). It has never seen a real radiograph and is not cleared for
clinical use (`cleared_for_clinical_use = false`: the device always shows the banner).

## What it does
Draws a box with a calibrated score around each round, nodule-like opacity in the lung fields of a frontal
chest radiograph (label `nodule`). It does not characterise a nodule (benign / malignant, solid / subsolid).

## Files
| file | what |
|---|---|
| `model.tflite` | full-integer int8 (int8 in, int8 out), {info["kb_int8"]:.0f} kB — the bundled model |
| `model_float.tflite` | the float32 twin (float in/out), {info["kb_float"]:.0f} kB |
| `model.onnx` | {info["onnx"]} |
| `manifest.toml` | the runtime manifest, with `[calibration]` (Platt) and `[reference]` (input statistics for the drift warning) |
| `golden/case_00N.npz` | `input` (the exact int8 input tensor) and `output_0` (boxes), `output_1` (scores): exact raw LiteRT outputs; {", ".join(f"seed {g['seed']} t={g['t']} ({g['nodules']} nodules)" for g in info["golden"])}; atol 2 quantized steps |
| `metrics.json` | every number below, machine-readable |

## Input / output (the runtime contract)
The whole 640x480 frame is resized to {info["width"]}x{info["height"]} with `cv2.resize(..., INTER_AREA)`, mapped from
uint8 [0, 255] to [0.0, 1.0] and quantized (scale {info["in_q"][0]:.6g}, zero point {info["in_q"][1]}).
Layout `boxes_scores` (no TFLite_Detection_PostProcess: that custom op never runs on the Edge TPU):

- output 0, boxes [1, {info["n_cells"]}, 4]: one box per cell of a {info["grid"][1]}x{info["grid"][0]} grid (stride {STRIDE}), ymin, xmin, ymax, xmax
  normalised to the frame (scale {info["box_q"][0]:.6g}, i.e. {info["box_q"][0] * 640:.1f} px at 640 wide);
- output 1, scores [1, {info["n_cells"]}, 2] = [-z, z] over `["background", "nodule"]`: z is the nodule-centre logit after a
  soft peak suppression in the graph (a cell that is not the maximum of its 3x3 neighbourhood loses up to
  {PEAK_K * PEAK_C:.0f} logits: one box per nodule). `activation = "sigmoid"` and Platt scaling give the calibrated
  probability sigmoid(a·z + b), a = {info["platt"][0]:.4f}, b = {info["platt"][1]:.4f}. The runtime keeps the boxes at or
  above the threshold ({info["alert"]:.2f}: the lowest of 0.25, 0.30 ... 0.80 with at most {MAX_FP_PER_CASE} false positives
  per calibration frame) and runs NMS at IoU 0.5. The logit is clipped to ±{LOGIT_CLIP:.0f} and the boxes to 0..1 in the
  graph, so the int8 outputs keep a fine step (scores {info["score_q"][0]:.4f} logits).

## Architecture
CenterNet-style: a small encoder–decoder (channels {chans}; 3x3 conv + ReLU, max-pool, one 2x2 transposed
convolution back to stride 8, merged with the stride-8 features as conv(up) + conv(skip): an int8
concatenation would force one scale on both), two 1x1 heads (centre logit; box edges relative to the
cell centre, in pixels at 320x240). {info["params"]:,} parameters. In the graph: peak suppression (3x3 max-pool,
SUB, MINIMUM, MUL) and box decoding (MUL, ADD with the constant grid of cell centres). Batch 1, fixed shapes.
TFLite ops: {", ".join(info["ops_int8"])} — all on the Edge TPU's supported list
({"checked in the flatbuffer against Coral's operator list" if info["edgetpu_ok"] else "NOT all on Coral's operator list"}; not run through `edgetpu_compiler`, which is not
available on this build machine).

## Data
`XrayPhantom` at 640x480: body outline, lung fields, mediastinum, heart, spine, posterior and anterior ribs,
clavicles, vascular markings, breathing shift, quantum noise; 0–4 nodules per layout (radius 5–26 px,
lobulated, contrast 18–60 grey levels, inside the lung fields, often over ribs or vessels). Training: seeds
0..{info["train_seeds"] - 1}, {info["per_seed"]} nodule layouts each: {info["n_train"]} frames, {info["n_nodules"]} nodules; random 160x128 crops on
the grid, mirrored half of the time, {info["crops"]} crops per frame and epoch. Calibration (Platt): {info["n_cal_boxes"]}
candidate boxes on frames of seeds {CAL_SEED_BASE}.... Test (below): `python tools/make_phantom_dataset.py --task
detection --count {v["n"]} --seed {TEST_SEED}`: {v["n"]} frames of phantom seeds never trained on, {v["targets"]} nodules.

## Training
Keras (TensorFlow {info["tf"]}) on {info["cpus"]} CPU cores, {info["epochs"]} epochs, batch {info["batch"]}, Adam with
cosine decay from {info["lr"]}; loss = CenterNet focal loss (Gaussian centre heatmap) + 0.1 x L1 of the box edges
(pixels) at the centre cells. Seeds fixed (`--seed {info["seed"]}`, TF op determinism on). Wall time
{info["train_s"] / 60:.1f} min training, {info["total_s"] / 60:.1f} min for the whole script. Post-training full-integer
quantization with {info["n_rep"]} representative training frames.

## Metrics (unseen phantom seeds, `firmware_app.validate`: the daemon's own path, threshold {v["threshold"]:.2f})
A box is a hit when IoU >= 0.3 with a not yet matched nodule. 95 % CIs: bootstrap over cases,
{v["bootstrap"]["resamples"]} resamples.

| metric | int8 `model.tflite` |
|---|---|
| sensitivity (nodules) | **{fmt_metric(v["sensitivity"])}** |
| false positives per case | **{fmt_metric(v["fp_per_case"])}** |
| PPV (boxes) | {fmt_metric(v["ppv"])} |
| specificity (frames without nodules and without a box) | {fmt_metric(v["specificity"])} |
| AUC (frames, score = best box) | {fmt_metric(v["auc"])} |
| mean IoU of the hits | {fmt_metric(v["iou"])} |
| FROC sensitivity at FP/case | {froc} |
| ECE (boxes, 10 bins), after Platt scaling | {fmt_metric(v["ece"])} |
| ECE before / after calibration (test set) | {fmt_num(info["ece_before"])} / {fmt_num(info["ece_after"])} |
| int8 vs float agreement (boxes matched at IoU 0.5) | {100 * a["value"]:.2f} % over {a["cases"]} frames |
| LiteRT CPU invoke, 2 threads (int8) | p50 {info["invoke_int8"]["p50"]:.2f} ms, p99 {info["invoke_int8"]["p99"]:.2f} ms |
| LiteRT CPU invoke, 2 threads (float) | p50 {info["invoke_float"]["p50"]:.2f} ms |

Timings on the build machine: {info["cpu"]}. ONNX check: {info["onnx_check"]}.

## Limits
- Synthetic data only: the phantom's anatomy, noise and nodules are simplified; real radiographs (other
  projections, devices, lines and tubes, overlapping pathology, calcified granulomas, nipple shadows) were
  never seen. Expect it to fail on real images.
- Small (radius < ~7 px at 640x480), faint nodules over a rib are the usual misses; rib crossings and vessel
  end-on views are the usual false positives.
- One box per nodule comes from the in-graph peak suppression on a stride-{STRIDE} grid: two nodules whose
  centres fall in neighbouring cells may be reported as one.
- The frame is resized to {info["width"]}x{info["height"]}: a full-resolution detector image (e.g. 3000x3000 px) loses the
  smallest details, and the model was not trained on other aspect ratios.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--chans", type=int, nargs=5, default=[8, 12, 16, 32, 48])
    ap.add_argument("--train-seeds", type=int, default=250)
    ap.add_argument("--per-seed", type=int, default=10)
    ap.add_argument("--crops", type=int, default=1, help="random crops per training frame and epoch")
    ap.add_argument("--test-count", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--alert",
        type=float,
        help=f"alert threshold (default: the lowest with <= {MAX_FP_PER_CASE} FP per calibration frame)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.width % 16 or args.height % 16:
        ap.error("--width/--height must be divisible by 16")

    t_start = time.perf_counter()
    keras, tf = deterministic_tf(args.threads, args.seed)
    cv2.setNumThreads(1)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    w, h = args.width, args.height
    x, y, boxes, raw = make_set(range(args.train_seeds), args.per_seed, w, h, rng, "training frames", 300)
    xv, yv, _, _ = make_set(
        range(CAL_SEED_BASE + 500, CAL_SEED_BASE + 540), 4, w, h, rng, "validation frames"
    )
    n_nod = sum(len(b) for b in boxes)
    print(
        f"data ready in {time.perf_counter() - t_start:.0f} s: {len(x)} frames, {n_nod} nodules", flush=True
    )

    model, train_s, history = train(args, x, y, xv, yv)
    print(f"trained in {train_s / 60:.1f} min", flush=True)

    fixed = build_export(tuple(args.chans), w, h)
    fixed.set_weights(model.get_weights())
    rep = x[np.random.default_rng(args.seed + 2).choice(len(x), min(300, len(x)), replace=False)]
    int8_buf, float_buf = convert_keras(fixed, rep.astype(np.float32) / 255.0)
    (out / "model.tflite").write_bytes(int8_buf)
    (out / "model_float.tflite").write_bytes(float_buf)
    onnx_status = export_onnx(out / "model_float.tflite", out / "model.onnx")

    from make_phantom_dataset import make_dataset

    from firmware_app.models.store import find_model
    from firmware_app.validate import validate

    ref = reference_toml(reference_stats(raw))
    write_manifest(out, w, h, '[calibration]\nmethod = "none"\n', ref, 0.5)
    a, b, n_cal, alert, table = fit_calibration(out, range(CAL_SEED_BASE, CAL_SEED_BASE + 100), args.threads)
    if args.alert is not None:
        alert = args.alert
    print(
        f"Platt: a={a:.4f} b={b:.4f} on {n_cal} boxes; threshold {alert:.2f}: {table[alert] if alert in table else ''}",
        flush=True,
    )

    tmp = Path(tempfile.mkdtemp(prefix="nodule-test-"))
    ds = make_dataset("detection", args.test_count, TEST_SEED, tmp / "test", progress=True)
    write_manifest(out, w, h, '[calibration]\nmethod = "none"\n', ref, alert)
    before, _ = validate(find_model(str(out.resolve())), ds, threads=args.threads)
    cal_plain = f'[calibration]\nmethod = "platt"\na = {a:.6f}\nb = {b:.6f}\n'
    write_manifest(out, w, h, cal_plain, ref, alert)
    after, _ = validate(find_model(str(out.resolve())), ds, threads=args.threads)
    ece_b, ece_a = before["ece"]["value"], after["ece"]["value"]
    cal = cal_plain
    if ece_b is not None and ece_a is not None:
        cal += (
            f"ece_before = {ece_b:.4f}   # test set ({TEST_SEED}), boxes, 10 bins\nece_after = {ece_a:.4f}\n"
        )
    write_manifest(out, w, h, cal, ref, alert)

    gx, ginfo = golden_inputs(out / "model.tflite", w, h)
    write_golden(out, out / "model.tflite", gx)
    it8 = interpreter(out / "model.tflite")
    d8 = it8.get_input_details()[0]
    od = it8.get_output_details()
    fl_inputs = [(g.astype(np.float32) - d8["quantization"][1]) * d8["quantization"][0] for g in gx[:2]]
    ops = op_names(out / "model.tflite")
    info = {
        "width": w,
        "height": h,
        "chans": list(args.chans),
        "grid": [h // STRIDE, w // STRIDE],
        "n_cells": (h // STRIDE) * (w // STRIDE),
        "params": int(fixed.count_params()),
        "kb_int8": len(int8_buf) / 1024,
        "kb_float": len(float_buf) / 1024,
        "onnx": onnx_status,
        "onnx_check": verify_onnx(out / "model.onnx", out / "model_float.tflite", fl_inputs),
        "golden": ginfo,
        "in_q": [float(v) for v in d8["quantization"]],
        "box_q": [float(v) for v in od[0]["quantization"]],
        "score_q": [float(v) for v in od[1]["quantization"]],
        "platt": [a, b],
        "alert": alert,
        "threshold_table": {str(k): v for k, v in table.items()},
        "n_cal_boxes": n_cal,
        "ece_before": ece_b,
        "ece_after": ece_a,
        "ops_int8": ops,
        "edgetpu_ok": set(ops) <= EDGETPU_OPS,
        "train_seeds": args.train_seeds,
        "per_seed": args.per_seed,
        "n_train": len(x),
        "n_nodules": n_nod,
        "crops": args.crops,
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
        "validate_uncalibrated": {k: before[k] for k in ("ece", "sensitivity", "fp_per_case")},
        "history": history,
    }
    info["total_s"] = time.perf_counter() - t_start
    write_readme(out, info)
    (out / "metrics.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    keys = (
        "n",
        "sensitivity",
        "fp_per_case",
        "ppv",
        "auc",
        "ece",
        "sensitivity_at_fp_per_case",
        "agreement_int8_float",
    )
    print(json.dumps({k: info["validate"][k] for k in keys}, indent=1))
    print(f"int8 {info['kb_int8']:.0f} kB, ops {ops}, invoke {info['invoke_int8']}")
    print(f"total {info['total_s'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
