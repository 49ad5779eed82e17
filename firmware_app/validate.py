"""``firmware-app validate``: how well a model does on a hospital's own labelled images.

Every image goes through the daemon's own path (``Preprocessor`` -> backend ``invoke`` -> the task's
post-processor from ``make_postprocessor``, at the manifest's alert threshold), so the figures are those of
the device, not of a training notebook.

Dataset layout (``DIR``)::

    images/            PNG (or JPEG, BMP, TIFF) or DICOM (.dcm, or no suffix; the first frame is used)
    labels.csv         classification: file,label         label = a manifest label (or its index)
    masks/             segmentation: same file name (or the same stem + .png), PNG, non-zero = finding
    boxes.csv          detection: file,label,x0,y0,x1,y1  pixels of the image, half-open; one row per
                       target; an image without targets has one row with an empty label (file,,,,,)

A header row (``file,label``...) is optional. A broken item (unreadable image, missing mask, a label the
manifest does not know, an image without a row, a row without an image, bad coordinates) is named in one
line and that case is left out; the rest is still reported. Nothing usable at all -> exit code 2.

What is measured (per task; each with a 95 % bootstrap CI: ``BOOTSTRAP_RESAMPLES`` resamples of the cases,
seed ``BOOTSTRAP_SEED``, percentile interval):

- classification: "positive" = any label but ``labels[0]``; the score is the calibrated probability of the
  most probable finding (what the screen shows), positive when it reaches the threshold. Sensitivity,
  specificity, PPV, NPV, AUC, ECE (``ECE_BINS`` equal-width bins); ROC and calibration curves.
- segmentation: Dice and IoU of the frame-size mask per case (mean over the cases whose truth has a
  finding; ``dice_pooled`` over all pixels of all cases), case-level sensitivity / specificity / PPV / AUC
  (finding present = a non-empty mask), false-positive regions per case (predicted connected components
  that touch no truth pixel), pixel ECE at the model's resolution (truth = the area fraction of each model
  pixel); ROC (cases) and calibration (pixels) curves.
- detection: a box is a hit when its IoU with a not yet matched truth box of the same label is at least
  ``MATCH_IOU`` (greedy, highest score first). Lesion sensitivity, false positives per case, PPV (boxes),
  case-level specificity and AUC (case score = its best box), mean IoU of the hits, box ECE (score vs hit);
  FROC (with the sensitivity at 1/8 ... 8 false positives per case), ROC and calibration curves.

Silent drift check: when ``model_float.tflite`` sits beside the model, every image also runs through the
float twin (same pre- and post-processing) and the agreement is reported: pixels of the masks
(segmentation), decisions and labels (classification), boxes matched at IoU >= ``AGREE_IOU`` with the same
label (detection).
"""

from __future__ import annotations

import csv
import html
import importlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadInput, BadModel
from firmware_app.models.manifest import Manifest
from firmware_app.models.store import ModelRef, find_model
from firmware_app.preprocess import Preprocessor
from firmware_app.tasks import make_postprocessor
from firmware_app.tasks.finding import FindingStage
from firmware_app.types import Frame, Result

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
ECE_BINS = 10
MATCH_IOU = 0.3
AGREE_IOU = 0.5
FROC_MIN_SCORE = 0.05  # detection boxes are collected down to this score for the FROC curve
FROC_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FLOAT_TWIN = "model_float.tflite"
THUMB_WIDTH = 240


# ---------------------------------------------------------------- statistics (pure numpy)
BOOTSTRAP_CHUNK_CELLS = 1 << 20  # resamples x cases held at once (8 MB of float64 weights)


class BootstrapWeights:
    """The (resamples, n) multiplicities of each case in each bootstrap resample (cases drawn with
    replacement), produced a block of resamples at a time from one seeded generator: the same numbers as
    one (resamples, n) draw, in bounded memory. ``chunks()`` may be called again: it replays the stream."""

    def __init__(self, n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> None:
        self.n, self.resamples, self.seed = n, resamples, seed
        self.rows = max(1, BOOTSTRAP_CHUNK_CELLS // max(n, 1))

    def __len__(self) -> int:
        return self.resamples

    def chunks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        pvals = np.full(self.n, 1.0 / self.n) if self.n else np.zeros(0)
        for start in range(0, self.resamples, self.rows):
            rows = min(self.rows, self.resamples - start)
            yield rng.multinomial(self.n, pvals, size=rows).astype(np.float64)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # the whole matrix, for small n only
        full = np.concatenate(list(self.chunks())) if self.resamples else np.zeros((0, self.n))
        return full if dtype is None else full.astype(dtype)


def bootstrap_weights(
    n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> BootstrapWeights:
    """The bootstrap resamples of ``n`` cases (``BootstrapWeights``), seeded: the same figures every run."""
    return BootstrapWeights(n, resamples, seed)


Weights = np.ndarray | BootstrapWeights


def _blocks(w: Weights) -> Iterator[np.ndarray]:
    return w.chunks() if isinstance(w, BootstrapWeights) else iter([np.asarray(w, np.float64)])


def _per_block(w: Weights, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (weights block -> one value per resample) over every block, concatenated."""
    parts = [fn(block) for block in _blocks(w)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _ci(boot: np.ndarray) -> list[float] | None:
    boot = boot[np.isfinite(boot)]
    if boot.size < 10:
        return None
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _metric(value: float, boot: np.ndarray | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"value": round(float(value), 4) if math.isfinite(value) else None}
    if boot is not None:
        out["ci95"] = _ci(boot) if math.isfinite(value) else None
    out.update(extra)
    return out


def ratio(num: np.ndarray, den: np.ndarray, w: Weights | None = None) -> tuple[float, np.ndarray | None]:
    """sum(num) / sum(den) over the cases, and its bootstrap replicates when ``w`` is given."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    d = den.sum()
    value = float(num.sum() / d) if d > 0 else float("nan")
    if w is None:
        return value, None

    def block(wb: np.ndarray) -> np.ndarray:
        bd = wb @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(bd > 0, (wb @ num) / np.where(bd > 0, bd, 1.0), np.nan)

    return value, _per_block(w, block)


def auc_score(y: np.ndarray, s: np.ndarray, w: Weights | None = None) -> tuple[float, np.ndarray | None]:
    """Area under the ROC curve (ties count one half), and its bootstrap replicates for weights ``w``."""
    y = np.asarray(y, np.float64)
    s = np.asarray(s, np.float64)
    _, inv = np.unique(s, return_inverse=True)
    inv = inv.ravel()
    # cases sorted by score; ``starts`` opens each group of equal scores (sums per score without an n x k
    # indicator matrix: at 12000 cases that was a 1 GB array)
    order = np.argsort(inv, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0]) if inv.size else np.zeros(0, np.int64)
    y_sorted = y[order]

    def area(weights: np.ndarray) -> np.ndarray:  # weights (R, n) -> (R,)
        ws = weights[:, order]
        pos = np.add.reduceat(ws * y_sorted, starts, axis=1)
        neg = np.add.reduceat(ws * (1.0 - y_sorted), starts, axis=1)
        del ws
        below = np.cumsum(neg, axis=1) - neg
        num = (pos * (below + 0.5 * neg)).sum(axis=1)
        den = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    if y.size == 0:
        return float("nan"), (None if w is None else np.full(len(w), np.nan))
    value = float(area(np.ones((1, y.size)))[0])
    return value, (None if w is None else _per_block(w, area))


def calibration_bins(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """[3, bins]: count, sum of predicted probability, sum of outcome (0..1) per equal-width bin."""
    p = np.clip(np.asarray(p, np.float64).ravel(), 0.0, 1.0)
    y = np.asarray(y, np.float64).ravel()
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    return np.stack(
        [
            np.bincount(b, minlength=bins).astype(np.float64),
            np.bincount(b, weights=p, minlength=bins),
            np.bincount(b, weights=y, minlength=bins),
        ]
    )


def ece_from_bins(stats: np.ndarray) -> float:
    """Expected calibration error from ``calibration_bins`` (summed over cases)."""
    n = stats[0].sum()
    return float(np.abs(stats[2] - stats[1]).sum() / n) if n > 0 else float("nan")


def ece_score(per_case: np.ndarray, w: Weights | None = None) -> tuple[float, np.ndarray | None]:
    """ECE of per-case bin statistics [n, 3, bins], and its bootstrap replicates."""
    if per_case.size == 0:
        return float("nan"), (None if w is None else np.full(len(w), np.nan))
    value = ece_from_bins(per_case.sum(axis=0))
    if w is None:
        return value, None
    flat = per_case.reshape(len(per_case), -1)

    def block(wb: np.ndarray) -> np.ndarray:
        tot = (wb @ flat).reshape(len(wb), 3, -1)
        n = tot[:, 0].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(tot[:, 2] - tot[:, 1]).sum(axis=1) / np.where(n > 0, n, np.nan)

    return value, _per_block(w, block)


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    return ece_from_bins(calibration_bins(p, y, bins))


def calibration_curve(stats: np.ndarray) -> dict[str, list]:
    n, sp, sy = stats
    keep = n > 0
    return {
        "confidence": [round(float(v), 4) for v in (sp[keep] / n[keep])],
        "observed": [round(float(v), 4) for v in (sy[keep] / n[keep])],
        "count": [int(v) for v in n[keep]],
    }


def roc_curve(y: np.ndarray, s: np.ndarray, max_points: int = 101) -> dict[str, list]:
    y = np.asarray(y, bool)
    s = np.asarray(s, np.float64)
    thr = np.unique(s)[::-1]
    npos, nneg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = [0.0] + [float((s[y] >= t).sum() / npos) for t in thr]
    fpr = [0.0] + [float((s[~y] >= t).sum() / nneg) for t in thr]
    ths = [1.0] + [float(t) for t in thr]
    if len(ths) > max_points:
        keep = np.unique(np.linspace(0, len(ths) - 1, max_points).round().astype(int))
        tpr, fpr, ths = ([v[i] for i in keep] for v in (tpr, fpr, ths))
    r = lambda v: [round(x, 4) for x in v]  # noqa: E731
    return {"fpr": r(fpr), "tpr": r(tpr), "threshold": r(ths)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a [n, 4] and b [m, 4] given as x0, y0, x1, y1."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(
    pred: np.ndarray, pred_labels: list[str], truth: np.ndarray, truth_labels: list[str], min_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching, predictions in the given order (highest score first).

    -> (index of the matched truth box per prediction or -1, IoU of that match or 0).
    """
    iou = box_iou(pred, truth)
    taken = np.zeros(len(truth), bool)
    match = np.full(len(pred), -1, np.int64)
    ious = np.zeros(len(pred))
    for i in range(len(pred)):
        if not len(truth):
            break
        cand = iou[i].copy()
        cand[taken] = -1.0
        cand[[lab != pred_labels[i] for lab in truth_labels]] = -1.0
        j = int(np.argmax(cand))
        if cand[j] >= min_iou:
            taken[j] = True
            match[i], ious[i] = j, float(cand[j])
    return match, ious


# ---------------------------------------------------------------- dataset
@dataclass
class Case:
    name: str  # file name inside images/
    path: Path
    label: int | None = None  # classification: index into the manifest labels
    mask_path: Path | None = None  # segmentation
    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)  # detection


def _csv_rows(path: Path, header: tuple[str, ...], problems: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, cells) of a CSV file without its optional header row."""
    rows = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.reader(f), start=1):
                cells = [c.strip() for c in row]
                if not any(cells):
                    continue
                if i == 1 and [c.lower() for c in cells[: len(header)]] == list(header):
                    continue
                rows.append((i, cells))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path}: cannot read ({exc})")
    return rows


def _label_index(text: str, labels: tuple[str, ...]) -> int | None:
    if text in labels:
        return labels.index(text)
    if text.isdigit() and int(text) < len(labels):
        return int(text)
    return None


def read_dataset(root: str | Path, m: Manifest) -> tuple[list[Case], list[str]]:
    """The usable cases of a dataset folder and one line per problem found."""
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise BadInput(f"dataset {root}: no images/ folder (expected {root}/images/ with PNG or DICOM files)")
    problems: list[str] = []
    files: dict[str, Path] = {}
    for p in sorted(images.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES or p.suffix.lower() in DICOM_SUFFIXES:
            files[p.name] = p
        else:
            problems.append(f"images/{p.name}: not an image (use PNG, JPEG, BMP, TIFF or DICOM)")
    cases = metrics_class(m).read_cases(root, files, m, problems)
    return cases, problems


def _read_masks(root: Path, files: dict[str, Path], m: Manifest, problems: list[str]) -> list[Case]:
    cases: list[Case] = []
    for name, path in files.items():
        mask = root / "masks" / name
        if not mask.is_file():
            mask = root / "masks" / (Path(name).stem + ".png")
        if not mask.is_file():
            problems.append(f"images/{name}: missing mask masks/{name}")
            continue
        cases.append(Case(name, path, mask_path=mask))
    return cases


def metrics_class(m: Manifest) -> type:
    """The metrics of the manifest's task: its task plugin names them (``Task.metrics``, "module:Class")."""
    from firmware_app import plugins

    module, _, name = plugins.get("task", m.task).metrics.partition(":")
    return getattr(importlib.import_module(module), name)


def _read_labels(root: Path, files: dict[str, Path], m: Manifest, problems: list[str]) -> list[Case]:
    path = root / "labels.csv"
    if not path.is_file():
        problems.append(f"{path}: not found (classification needs labels.csv with file,label)")
        return []
    seen: dict[str, int] = {}
    bad: set[str] = set()
    for line, cells in _csv_rows(path, ("file", "label"), problems):
        if len(cells) < 2 or not cells[0]:
            problems.append(f"labels.csv line {line}: expected file,label, got {','.join(cells)!r}")
            continue
        name, text = Path(cells[0]).name, cells[1]
        if name not in files:
            problems.append(f"labels.csv line {line}: images/{name} not found")
            continue
        k = _label_index(text, m.labels)
        if k is None:
            problems.append(
                f"labels.csv line {line}: label {text!r} of {name} is not in the manifest labels "
                f"{list(m.labels)}"
            )
            bad.add(name)
            continue
        if name in seen and seen[name] != k:
            problems.append(f"labels.csv line {line}: {name} labelled twice, differently")
            bad.add(name)
        seen[name] = k
    cases = []
    for name, p in files.items():
        if name in bad:
            continue
        if name not in seen:
            problems.append(f"images/{name}: no row in labels.csv")
            continue
        cases.append(Case(name, p, label=seen[name]))
    return cases


def _read_boxes(root: Path, files: dict[str, Path], m: Manifest, problems: list[str]) -> list[Case]:
    path = root / "boxes.csv"
    if not path.is_file():
        problems.append(f"{path}: not found (detection needs boxes.csv with file,label,x0,y0,x1,y1)")
        return []
    boxes: dict[str, list] = {}
    bad: set[str] = set()
    for line, cells in _csv_rows(path, ("file", "label", "x0", "y0", "x1", "y1"), problems):
        cells = cells + [""] * (6 - len(cells))
        name, label = Path(cells[0]).name, cells[1]
        if not name:
            problems.append(f"boxes.csv line {line}: no file name")
            continue
        if name not in files:
            problems.append(f"boxes.csv line {line}: images/{name} not found")
            continue
        coords = cells[2:6]
        if label in ("", m.labels[0]) and not any(coords):
            boxes.setdefault(name, [])  # "no targets in this image"
            continue
        if label not in m.labels[1:]:
            problems.append(
                f"boxes.csv line {line}: label {label!r} of {name} is not in the manifest labels "
                f"{list(m.labels[1:])}"
            )
            bad.add(name)
            continue
        try:
            x0, y0, x1, y1 = (float(c) for c in coords)
        except ValueError:
            problems.append(
                f"boxes.csv line {line}: coordinates {','.join(coords)!r} of {name} are not numbers"
            )
            bad.add(name)
            continue
        if not (x1 > x0 and y1 > y0):
            problems.append(f"boxes.csv line {line}: box of {name} needs x1 > x0 and y1 > y0")
            bad.add(name)
            continue
        boxes.setdefault(name, []).append((label, x0, y0, x1, y1))
    cases = []
    for name, p in files.items():
        if name in bad:
            continue
        if name not in boxes:
            problems.append(
                f"images/{name}: no row in boxes.csv (write file,,,,, for an image without targets)"
            )
            continue
        cases.append(Case(name, p, boxes=boxes[name]))
    return cases


def load_image(path: Path) -> np.ndarray:
    """uint8 gray or BGR pixels as the daemon's sources deliver them. BadFrame names the file."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise BadFrame(f"images/{path.name}: unreadable image")
        if img.dtype != np.uint8:  # as the images: source does
            img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        return img
    from firmware_app.sources.dicom import load_frames

    try:
        for pixels, _meta in load_frames(path):
            return pixels
    except BadFrame as exc:
        raise BadFrame(f"images/{path.name}: unreadable DICOM ({str(exc).split(': ', 1)[-1]})") from None
    raise BadFrame(f"images/{path.name}: no frame")


def _load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise BadFrame(f"masks/{path.name}: unreadable mask")
    if mask.shape != shape:
        raise BadFrame(
            f"masks/{path.name}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {shape[1]}x{shape[0]}"
        )
    return (mask > 0).astype(np.uint8)


# ---------------------------------------------------------------- the runtime path
class ModelRunner:
    """One model file on the daemon's path: Preprocessor -> backend.invoke -> task post-processor."""

    def __init__(self, model: ModelRef, path: Path | None = None, threads: int = 2) -> None:
        from firmware_app.backends import BackendChain
        from firmware_app.backends.litert import LiteRTBackend

        if path is None:
            self.backend = BackendChain(threads=threads).open(model).backend
        else:
            self.backend = LiteRTBackend(path, threads=threads, name="litert-cpu-float")
        m = model.manifest
        self.manifest = m
        self.pre = Preprocessor(m, self.backend.input)
        self.post = make_postprocessor(m, self.backend.outputs)

    def raw(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [r.copy() for r in self.backend.invoke(self.pre(pixels))]

    def result(
        self, raw: list[np.ndarray], size: tuple[int, int], threshold: float, frame_id: int = 0
    ) -> Result:
        return self.post(raw, frame_id, size, threshold)

    def close(self) -> None:
        self.backend.close()


# ---------------------------------------------------------------- per-task evaluation
@dataclass
class CaseRecord:
    name: str
    truth: str  # in words, for the report
    prediction: str
    score: float
    outcome: str  # "correct", "missed", "false alarm", "partly" ...
    values: dict[str, Any] = field(default_factory=dict)
    thumb: np.ndarray | None = None


def _thumb(pixels: np.ndarray) -> np.ndarray:
    img = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    return cv2.resize(img, (THUMB_WIDTH, max(1, round(h * THUMB_WIDTH / w))), interpolation=cv2.INTER_AREA)


TRUTH_COLOR = (80, 220, 80)  # green
PRED_COLOR = (0, 160, 255)  # amber


class _Task:
    """Collects one task's per-case statistics and turns them into the report."""

    def __init__(self, m: Manifest, threshold: float) -> None:
        self.m = m
        self.threshold = threshold
        self.records: list[CaseRecord] = []
        self.agree_num = 0.0
        self.agree_den = 0.0
        self.agree_cases = 0

    def add(self, case: Case, pixels: np.ndarray, int8: ModelRunner, flt: ModelRunner | None, thumbs: bool):
        raise NotImplementedError

    def summary(self, w_fn: Callable[[int], np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError


class _Classification(_Task):
    agreement_unit = "labels"

    @staticmethod
    def read_cases(root: Path, files: dict[str, Path], m: Manifest, problems: list[str]) -> list[Case]:
        return _read_labels(root, files, m, problems)

    def __init__(self, m: Manifest, threshold: float) -> None:
        super().__init__(m, threshold)
        self.y: list[int] = []
        self.s: list[float] = []
        self.pred: list[int] = []

    def _decide(self, r: Result) -> tuple[int, str, float]:
        labels = self.m.labels
        probs = np.array([r.probabilities.get(lab, 0.0) for lab in labels])
        if len(labels) == 1:
            return int(r.alert), labels[0] if r.alert else "-", float(probs[0])
        k = 1 + int(np.argmax(probs[1:]))
        return int(r.alert), labels[k] if r.alert else labels[0], float(probs[k])

    def add(self, case, pixels, int8, flt, thumbs):
        size = (pixels.shape[1], pixels.shape[0])
        r = int8.result(int8.raw(pixels), size, self.threshold)
        pred, text, score = self._decide(r)
        y = int(case.label != 0) if len(self.m.labels) > 1 else int(case.label == 0)
        self.y.append(y)
        self.s.append(score)
        self.pred.append(pred)
        if flt is not None:
            rf = flt.result(flt.raw(pixels), size, self.threshold)
            pf, tf, _ = self._decide(rf)
            self.agree_num += float(pf == pred and tf == text)
            self.agree_den += 1.0
            self.agree_cases += 1
        truth = self.m.labels[case.label]
        outcome = "correct" if pred == y and (not y or text == truth) else ("missed" if y else "false alarm")
        if pred == y == 1 and text != truth:
            outcome = "wrong finding"
        thumb = None
        if thumbs:
            thumb = _thumb(pixels)
            if r.heatmap is not None and pred:
                hm = cv2.resize(r.heatmap, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_LINEAR)
                col = cv2.applyColorMap((np.clip(hm, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
                a = (0.45 * hm)[..., None]
                thumb = (thumb * (1 - a) + col * a).astype(np.uint8)
        self.records.append(CaseRecord(case.name, truth, text, score, outcome, {}, thumb))

    def summary(self, w_fn):
        y = np.array(self.y, np.float64)
        s = np.array(self.s, np.float64)
        p = np.array(self.pred, np.float64)
        w = w_fn(len(y))
        out: dict[str, Any] = {"positives": int(y.sum()), "negatives": int(len(y) - y.sum())}
        out["sensitivity"] = _metric(*ratio(p * y, y, w))
        out["specificity"] = _metric(*ratio((1 - p) * (1 - y), 1 - y, w))
        out["ppv"] = _metric(*ratio(p * y, p, w))
        out["npv"] = _metric(*ratio((1 - p) * (1 - y), 1 - p, w))
        out["auc"] = _metric(*auc_score(y, s, w))
        bins = np.stack([calibration_bins([si], [yi]) for si, yi in zip(s, y)])
        out["ece"] = _metric(*ece_score(bins, w), bins=ECE_BINS)
        out["curves"] = {"roc": roc_curve(y, s), "calibration": calibration_curve(bins.sum(axis=0))}
        return out


class _Segmentation(_Task):
    agreement_unit = "pixels"

    @staticmethod
    def read_cases(root: Path, files: dict[str, Path], m: Manifest, problems: list[str]) -> list[Case]:
        return _read_masks(root, files, m, problems)

    def __init__(self, m: Manifest, threshold: float) -> None:
        super().__init__(m, threshold)
        self.rows: list[tuple[float, ...]] = []  # inter, psum, tsum, truth_pos, pred_pos, fp_regions, union
        self.s: list[float] = []
        self.bins: list[np.ndarray] = []  # pixel calibration at the model's resolution
        self.finding_p: list[float] = []  # finding-level confidence, and whether the truth holds a finding
        self.finding_y: list[float] = []
        self.stage = FindingStage(m)  # a single image decides on itself (size, no persistence)

    def add(self, case, pixels, int8, flt, thumbs):
        h, w = pixels.shape[:2]
        truth = _load_mask(case.mask_path, (h, w))
        raw = int8.raw(pixels)
        r = int8.result(raw, (w, h), self.threshold)
        pred = r.mask_at(w, h) if r.mask is not None else np.zeros((h, w), np.uint8)
        pb, tb = pred.astype(bool), truth.astype(bool)
        inter, psum, tsum = int((pb & tb).sum()), int(pb.sum()), int(tb.sum())
        union = psum + tsum - inter
        n_lab, lab = cv2.connectedComponents(pred.astype(np.uint8), connectivity=8)
        fp_regions = 0
        if n_lab > 1:
            hit = np.bincount(lab[tb], minlength=n_lab)
            fp_regions = int((hit[1:] == 0).sum())
        # pixel calibration at the model's resolution: truth = area fraction of each model pixel
        probs = int8.post.probability_maps(raw[0]).max(axis=-1)  # type: ignore[attr-defined]
        ph, pw = probs.shape
        frac = cv2.resize(truth.astype(np.float32), (pw, ph), interpolation=cv2.INTER_AREA)
        self.bins.append(calibration_bins(probs, frac))
        # the finding as the device decides it: calibrated confidence, threshold, minimum size
        decided = self.stage(r, Frame(0, 0, pixels, {"single_image": True}))
        score = float(r.confidence or 0.0)
        self.s.append(score)
        self.finding_p.append(score)
        self.finding_y.append(float(tsum / (h * w) >= self.m.finding.min_size_fraction))
        self.rows.append((inter, psum, tsum, float(tsum > 0), float(decided.alert), fp_regions, union))
        if flt is not None:
            rf = flt.result(flt.raw(pixels), (w, h), self.threshold)
            mf = rf.mask_at(w, h) if rf.mask is not None else np.zeros((h, w), np.uint8)
            self.agree_num += float(np.count_nonzero((mf > 0) == pb))
            self.agree_den += float(h * w)
            self.agree_cases += 1
        d = 2.0 * inter / (psum + tsum) if psum + tsum else 1.0
        iou = inter / union if union else 1.0
        if tsum:
            outcome = "missed" if not psum else ("correct" if d >= 0.5 else "partly")
        else:
            outcome = "correct" if not psum else "false alarm"
        thumb = None
        if thumbs:
            thumb = _thumb(pixels)
            sx = thumb.shape[1] / w
            for m_, col in ((truth, TRUTH_COLOR), (pred, PRED_COLOR)):
                small = cv2.resize(m_, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)
                cs, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(thumb, cs, -1, col, max(1, round(2 * sx)), cv2.LINE_AA)
        self.records.append(
            CaseRecord(
                case.name,
                f"finding {100 * tsum / (h * w):.1f} % of image" if tsum else "no finding",
                f"finding {100 * psum / (h * w):.1f} % of image" if psum else "no finding",
                score,
                outcome,
                {"dice": round(d, 4), "iou": round(iou, 4), "false_regions": fp_regions},
                thumb,
            )
        )

    def summary(self, w_fn):
        a = np.array(self.rows, np.float64).reshape(-1, 7)
        inter, psum, tsum, tpos, ppos, fpr, union = a.T
        n = len(a)
        w = w_fn(n)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice_c = np.where(psum + tsum > 0, 2 * inter / np.maximum(psum + tsum, 1), 1.0)
            iou_c = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        out: dict[str, Any] = {"positives": int(tpos.sum()), "negatives": int(n - tpos.sum())}
        out["dice"] = _metric(*ratio(dice_c * tpos, tpos, w), cases=int(tpos.sum()))
        out["iou"] = _metric(*ratio(iou_c * tpos, tpos, w), cases=int(tpos.sum()))
        out["dice_pooled"] = _metric(*ratio(2 * inter, psum + tsum, w))
        out["sensitivity"] = _metric(*ratio(ppos * tpos, tpos, w))
        out["specificity"] = _metric(*ratio((1 - ppos) * (1 - tpos), 1 - tpos, w))
        out["ppv"] = _metric(*ratio(ppos * tpos, ppos, w))
        out["auc"] = _metric(*auc_score(tpos, np.array(self.s), w))
        out["fp_per_case"] = _metric(*ratio(fpr, np.ones(n), w))
        bins = np.stack(self.bins) if self.bins else np.zeros((0, 3, ECE_BINS))
        # the finding's confidence (is a finding present at all?) against the truth: what a clinician reads
        fbins = np.stack([calibration_bins([p], [y]) for p, y in zip(self.finding_p, self.finding_y)])
        out["ece"] = _metric(
            *ece_score(fbins, w),
            bins=ECE_BINS,
            unit="cases: the finding's confidence against a truth finding of the minimum size",
            calibrated=self.m.finding.calibrated,
        )
        out["ece_pixels"] = _metric(
            *ece_score(bins, w), bins=ECE_BINS, unit="pixels at the model's resolution"
        )
        out["curves"] = {
            "roc": roc_curve(tpos, np.array(self.s)),
            "calibration": calibration_curve(fbins.sum(axis=0)),
        }
        return out


class _Detection(_Task):
    agreement_unit = "matched boxes"

    @staticmethod
    def read_cases(root: Path, files: dict[str, Path], m: Manifest, problems: list[str]) -> list[Case]:
        return _read_boxes(root, files, m, problems)

    def __init__(self, m: Manifest, threshold: float) -> None:
        super().__init__(m, threshold)
        self.low = min(FROC_MIN_SCORE, threshold)
        self.n_gt: list[int] = []
        self.pred_scores: list[np.ndarray] = []  # per case, scores of its boxes (>= low)
        self.pred_hit: list[np.ndarray] = []  # per case, 1 when the box is a hit
        self.pred_iou: list[np.ndarray] = []

    def _boxes(self, r: Result) -> tuple[np.ndarray, list[str], np.ndarray]:
        b = np.array([[x.x0, x.y0, x.x1, x.y1] for x in r.boxes], np.float64).reshape(-1, 4)
        return b, [x.label for x in r.boxes], np.array([x.score for x in r.boxes], np.float64)

    def add(self, case, pixels, int8, flt, thumbs):
        h, w = pixels.shape[:2]
        # one pass down to the FROC floor: greedy NMS keeps the same boxes above any higher threshold
        r = int8.result(int8.raw(pixels), (w, h), self.low)
        boxes, labels, scores = self._boxes(r)
        truth = np.array([b[1:] for b in case.boxes], np.float64).reshape(-1, 4)
        tlabels = [b[0] for b in case.boxes]
        match, ious = match_boxes(boxes, labels, truth, tlabels, MATCH_IOU)
        self.n_gt.append(len(truth))
        self.pred_scores.append(scores)
        self.pred_hit.append((match >= 0).astype(np.float64))
        self.pred_iou.append(ious)
        keep = scores >= self.threshold
        if flt is not None:
            rf = flt.result(flt.raw(pixels), (w, h), self.threshold)
            bf, lf, _ = self._boxes(rf)
            m8 = [lab for lab, k in zip(labels, keep) if k]
            mm, _ = match_boxes(boxes[keep], m8, bf, lf, AGREE_IOU)
            self.agree_num += 2.0 * float((mm >= 0).sum())
            self.agree_den += float(keep.sum() + len(bf))
            self.agree_cases += 1
        tp = int((match[keep] >= 0).sum())
        fp = int(keep.sum()) - tp
        fn = len(truth) - tp
        if len(truth):
            outcome = "correct" if fn == 0 and fp == 0 else ("missed" if tp == 0 else "partly")
            if fn == 0 and fp:
                outcome = "false alarm"
        else:
            outcome = "correct" if fp == 0 else "false alarm"
        thumb = None
        if thumbs:
            thumb = _thumb(pixels)
            s = thumb.shape[1] / w
            for (x0, y0, x1, y1), col in [(b, TRUTH_COLOR) for b in truth] + [
                (b, PRED_COLOR) for b in boxes[keep]
            ]:
                cv2.rectangle(
                    thumb,
                    (int(x0 * s), int(y0 * s)),
                    (int(math.ceil(x1 * s)), int(math.ceil(y1 * s))),
                    col,
                    1,
                )
        self.records.append(
            CaseRecord(
                case.name,
                f"{len(truth)} target(s)" if len(truth) else "no target",
                f"{int(keep.sum())} box(es)" if keep.any() else "no box",
                float(scores.max()) if scores.size else 0.0,
                outcome,
                {"hits": tp, "false_boxes": fp, "missed": fn},
                thumb,
            )
        )

    def summary(self, w_fn):
        n = len(self.n_gt)
        w = w_fn(n)
        t = self.threshold
        ngt = np.array(self.n_gt, np.float64)
        tp = np.array([float(h[s >= t].sum()) for s, h in zip(self.pred_scores, self.pred_hit)])
        npred = np.array([float((s >= t).sum()) for s in self.pred_scores])
        fp = npred - tp
        pos = (ngt > 0).astype(np.float64)
        any_pred = (npred > 0).astype(np.float64)
        best = np.array([float(s.max()) if s.size else 0.0 for s in self.pred_scores])
        iou_sum = np.array(
            [float((i * h)[s >= t].sum()) for s, h, i in zip(self.pred_scores, self.pred_hit, self.pred_iou)]
        )
        out: dict[str, Any] = {
            "positives": int(pos.sum()),
            "negatives": int(n - pos.sum()),
            "targets": int(ngt.sum()),
            "match": f"IoU >= {MATCH_IOU} with a truth box of the same label",
        }
        out["sensitivity"] = _metric(*ratio(tp, ngt, w), unit="targets")
        out["fp_per_case"] = _metric(*ratio(fp, np.ones(n), w))
        out["ppv"] = _metric(*ratio(tp, npred, w), unit="boxes")
        out["specificity"] = _metric(*ratio((1 - any_pred) * (1 - pos), 1 - pos, w), unit="cases")
        out["auc"] = _metric(*auc_score(pos, best, w), unit="cases, score = best box")
        out["iou"] = _metric(*ratio(iou_sum, tp, w), unit="mean IoU of the hits")
        bins = np.stack(
            [
                calibration_bins(s[s >= self.low], h[s >= self.low])
                for s, h in zip(self.pred_scores, self.pred_hit)
            ]
        )
        out["ece"] = _metric(*ece_score(bins, w), bins=ECE_BINS, unit=f"boxes with score >= {self.low}")
        froc = self._froc(ngt, n)
        out["sensitivity_at_fp_per_case"] = {
            str(f): round(
                max([s for s, x in zip(froc["sensitivity"], froc["fp_per_case"]) if x <= f] or [0.0]), 4
            )
            for f in FROC_POINTS
        }
        out["curves"] = {
            "froc": froc,
            "roc": roc_curve(pos, best),
            "calibration": calibration_curve(bins.sum(axis=0)),
        }
        return out

    def _froc(self, ngt: np.ndarray, n: int) -> dict[str, list]:
        s = np.concatenate(self.pred_scores) if self.pred_scores else np.zeros(0)
        h = np.concatenate(self.pred_hit) if self.pred_hit else np.zeros(0)
        order = np.argsort(-s, kind="stable")
        s, h = s[order], h[order]
        total = max(float(ngt.sum()), 1.0)
        sens = np.cumsum(h) / total
        fppc = np.cumsum(1.0 - h) / max(n, 1)
        last = np.r_[s[1:] != s[:-1], True] if s.size else np.zeros(0, bool)  # one point per distinct score
        pts = list(zip(fppc[last], sens[last], s[last]))
        if len(pts) > 200:
            idx = np.unique(np.linspace(0, len(pts) - 1, 200).round().astype(int))
            pts = [pts[i] for i in idx]
        return {
            "fp_per_case": [0.0] + [round(float(p[0]), 4) for p in pts],
            "sensitivity": [0.0] + [round(float(p[1]), 4) for p in pts],
            "threshold": [1.0] + [round(float(p[2]), 4) for p in pts],
        }


# ---------------------------------------------------------------- the command
def _progress(i: int, n: int, t0: float, stream=None) -> None:
    stream = stream or sys.stderr
    if not stream.isatty() and i not in (n,) and i % max(1, n // 10):
        return
    frac = i / max(n, 1)
    bar = "#" * int(30 * frac)
    eta = (time.perf_counter() - t0) / max(i, 1) * (n - i)
    end = "\n" if i == n else ""
    stream.write(f"\rvalidate [{bar:<30}] {i}/{n}  {eta:4.0f} s left{end}")
    stream.flush()


def validate(
    model: ModelRef,
    dataset: str | Path,
    threads: int = 2,
    thumbs: bool = False,
    resamples: int = BOOTSTRAP_RESAMPLES,
    progress: bool = False,
    ood: str | Path | None = None,
) -> tuple[dict[str, Any], list[CaseRecord]]:
    """Run ``model`` over ``dataset``: (the summary, one record per usable case). ``ood``: a folder of
    images the model does not take, for the input gate's figures (``gate_summary``)."""
    m = model.manifest
    cases, problems = read_dataset(dataset, m)
    task = metrics_class(m)(m, m.alert)
    int8 = ModelRunner(model, threads=threads)
    flt_path = model.folder / FLOAT_TWIN
    flt = None
    if flt_path.is_file():
        try:
            flt = ModelRunner(model, flt_path, threads=threads)
        except (BadModel, BadInput) as exc:
            problems.append(f"{flt_path}: float twin not usable, no drift check ({exc})")
    t0 = time.perf_counter()
    try:
        for i, case in enumerate(cases, start=1):
            try:
                pixels = load_image(case.path)
                task.add(case, pixels, int8, flt, thumbs)
            except BadFrame as exc:
                problems.append(str(exc))
            if progress:
                _progress(i, len(cases), t0)
    finally:
        int8.close()
        if flt is not None:
            flt.close()
    n = len(task.records)
    out: dict[str, Any] = {
        "model": f"{m.id}@{m.version}",
        "task": m.task,
        "dataset": str(dataset),
        "n": n,
        "threshold": m.alert,
        "calibration": m.calibration.method,
        "cleared_for_clinical_use": m.cleared_for_clinical_use,
    }
    if n:
        out.update(task.summary(lambda k: bootstrap_weights(k, resamples)))
        out["bootstrap"] = {"resamples": resamples, "seed": BOOTSTRAP_SEED, "interval": "percentile 2.5-97.5"}
    what = task.agreement_unit
    if flt is None:
        out["agreement_int8_float"] = None
    else:
        value = task.agree_num / task.agree_den if task.agree_den else 1.0
        out["agreement_int8_float"] = {"what": what, "value": round(value, 5), "cases": task.agree_cases}
    out["gate"] = gate_summary(model, [c.path for c in cases], ood, problems)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["problems"] = problems
    return out, task.records


def gate_summary(
    model: ModelRef, images: list[Path], ood: str | Path | None, problems: list[str]
) -> dict[str, Any] | None:
    """The input gate on the dataset (in distribution) and on ``ood``; None when the model has no gate.

    ``flag_rate`` (with a 95 % Wilson interval) is the share of the dataset's images the gate refuses; with
    ``ood``: ``ood_flag_rate`` and ``auroc`` (gate score, OOD images against the dataset's).
    """
    from firmware_app.gate import InputGate
    from firmware_app.gate.build import auroc, image_files, load_file, wilson_ci

    gate = InputGate.from_manifest(model.manifest)
    if gate is None:
        return None

    def score_all(paths: list[Path], report: bool) -> tuple[np.ndarray, int]:
        s, flagged = [], 0
        for path in paths:
            try:
                v = gate.check(next(load_file(path, 1)))
            except (BadFrame, StopIteration) as exc:
                if report:  # a broken dataset image is already named once by the main loop
                    problems.append(f"--ood {path.name}: {exc or 'no frame'}")
                continue
            s.append(v.score)
            flagged += v.flagged
        return np.array(s), flagged

    s_in, k_in = score_all(images, False)
    out: dict[str, Any] = {
        "threshold": gate.threshold,
        "n": int(s_in.size),
        "flag_rate": _metric(k_in / s_in.size if s_in.size else float("nan"), None),
    }
    out["flag_rate"]["ci95"] = wilson_ci(k_in, int(s_in.size))
    if ood is not None:
        s_out, k_out = score_all(image_files(ood), True)
        out["ood_n"] = int(s_out.size)
        out["ood_flag_rate"] = _metric(k_out / s_out.size if s_out.size else float("nan"), None)
        out["ood_flag_rate"]["ci95"] = wilson_ci(k_out, int(s_out.size))
        out["auroc"] = round(auroc(s_in, s_out), 4) if s_in.size and s_out.size else None
    return out


_ORDER = (
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "auc",
    "dice",
    "dice_pooled",
    "iou",
    "fp_per_case",
    "ece",
)


def format_text(s: dict[str, Any]) -> str:
    lines = [
        f"model {s['model']} ({s['task']}), dataset {s['dataset']}: {s['n']} cases, threshold {s['threshold']:.2f}"
    ]
    for k in _ORDER:
        v = s.get(k)
        if not isinstance(v, dict):
            continue
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        ci = v.get("ci95")
        lines.append(f"  {k:<13} {val}" + (f"  (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
    if "sensitivity_at_fp_per_case" in s:
        pts = ", ".join(f"{k}: {v:.3f}" for k, v in s["sensitivity_at_fp_per_case"].items())
        lines.append(f"  FROC sensitivity at FP/case {pts}")
    a = s.get("agreement_int8_float")
    if a:
        lines.append(
            f"int8 vs float agreement ({a['what']}): {100 * a['value']:.2f} % over {a['cases']} cases"
        )
    else:
        lines.append("int8 vs float agreement: no float twin (model_float.tflite) beside the model")
    g = s.get("gate")
    if g:
        text = (
            f"input gate (threshold {g['threshold']:.4g}): flags {100 * (g['flag_rate']['value'] or 0):.2f} %"
        )
        text += f" of the {g['n']} dataset images"
        if "ood_n" in g:
            text += f", {100 * (g['ood_flag_rate']['value'] or 0):.1f} % of {g['ood_n']} OOD images"
            text += f", AUROC {g['auroc']:.3f}" if g["auroc"] is not None else ""
        lines.append(text)
    if s["problems"]:
        lines.append(f"{len(s['problems'])} problem(s) in the dataset; those cases are left out")
    return "\n".join(lines)


def cmd_validate(
    model_ref: str,
    dataset: str,
    as_json: bool,
    report_dir: str | None,
    data_dir: str | None,
    ood: str | None = None,
) -> int:
    """``firmware-app validate --model ID|DIR --dataset DIR [--json] [--report DIR] [--ood DIR]``.

    Problems of the dataset go to stderr, one line each; exit code 2 when no case is usable (or the model
    or the dataset folder is unusable: BadModel / BadInput propagate with exit code 2).
    """
    model = find_model(model_ref, data_dir)
    if not Path(dataset).is_dir():
        raise BadInput(f"dataset {dataset}: folder not found")
    if ood is not None and not Path(ood).is_dir():
        raise BadInput(f"--ood {ood}: folder not found")
    summary, records = validate(model, dataset, thumbs=report_dir is not None, progress=not as_json, ood=ood)
    for p in summary["problems"]:
        print(f"firmware-app: validate: {p}", file=sys.stderr)
    if summary["n"] == 0:
        print(f"firmware-app: error: dataset {dataset}: no usable case", file=sys.stderr)
        return 2
    if report_dir is not None:
        path = write_report(report_dir, summary, records)
        if not as_json:
            print(f"report: {path}")
    print(json.dumps(summary) if as_json else format_text(summary))
    return 0


# ---------------------------------------------------------------- report (HTML + PNG plots, no matplotlib)
PLOT_W, PLOT_H = 520, 440
_BG, _FG, _GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
SERIES = ((200, 90, 30), (40, 140, 230), (60, 170, 60))


def plot(
    series: list[tuple[list[float], list[float], str]],
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] = (0.0, 1.0),
    ylim: tuple[float, float] = (0.0, 1.0),
    diagonal: bool = False,
    markers: bool = False,
    vline: float | None = None,
) -> np.ndarray:
    """A line plot as a BGR image, drawn with OpenCV."""
    from firmware_app.display.font import draw_text

    img = np.full((PLOT_H, PLOT_W, 3), _BG, np.uint8)
    x0, y0, x1, y1 = 70, 40, PLOT_W - 20, PLOT_H - 60

    def px(x: float, y: float) -> tuple[int, int]:
        fx = (x - xlim[0]) / (xlim[1] - xlim[0])
        fy = (y - ylim[0]) / (ylim[1] - ylim[0])
        return int(round(x0 + fx * (x1 - x0))), int(round(y1 - fy * (y1 - y0)))

    for k in range(6):
        gx = xlim[0] + k * (xlim[1] - xlim[0]) / 5
        gy = ylim[0] + k * (ylim[1] - ylim[0]) / 5
        cv2.line(img, px(gx, ylim[0]), px(gx, ylim[1]), _GRID, 1)
        cv2.line(img, px(xlim[0], gy), px(xlim[1], gy), _GRID, 1)
        draw_text(img, f"{gx:g}", *px(gx, ylim[0]), 13, _FG, font="sans", anchor="mt")
        x, y = px(xlim[0], gy)
        draw_text(img, f"{gy:g}", x - 6, y, 13, _FG, font="sans", anchor="rm")
    cv2.rectangle(img, (x0, y0), (x1, y1), _FG, 1)
    if diagonal:
        cv2.line(img, px(xlim[0], ylim[0]), px(xlim[1], ylim[1]), (170, 170, 170), 1, cv2.LINE_AA)
    if vline is not None:
        cv2.line(img, px(vline, ylim[0]), px(vline, ylim[1]), (120, 120, 220), 1, cv2.LINE_AA)
    for i, (xs, ys, name) in enumerate(series):
        col = SERIES[i % len(SERIES)]
        pts = np.array(
            [px(min(max(x, xlim[0]), xlim[1]), min(max(y, ylim[0]), ylim[1])) for x, y in zip(xs, ys)]
        )
        if len(pts) > 1:
            cv2.polylines(img, [pts.reshape(-1, 1, 2).astype(np.int32)], False, col, 2, cv2.LINE_AA)
        if markers:
            for p in pts:
                cv2.circle(img, (int(p[0]), int(p[1])), 4, col, -1, cv2.LINE_AA)
        draw_text(img, name, x0 + 10, y0 + 8 + 20 * i, 14, col, font="sans-bold")
    draw_text(img, title, PLOT_W // 2, 12, 17, _FG, font="sans-bold", anchor="mt")
    draw_text(img, xlabel, (x0 + x1) // 2, PLOT_H - 22, 14, _FG, font="sans", anchor="mt")
    ylab = np.full((24, y1 - y0, 3), _BG, np.uint8)
    draw_text(ylab, ylabel, (y1 - y0) // 2, 4, 14, _FG, font="sans", anchor="mt")
    img[y0:y1, 8:32] = cv2.rotate(ylab, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def _plots(s: dict[str, Any]) -> list[tuple[str, np.ndarray, str]]:
    curves = s.get("curves", {})
    out = []
    if "froc" in curves:
        f = curves["froc"]
        xmax = max(8.0, min(max(f["fp_per_case"] or [1.0]), 8.0))
        out.append(
            (
                "froc.png",
                plot(
                    [(f["fp_per_case"], f["sensitivity"], "int8 model")],
                    "FROC",
                    "false positives per case",
                    "sensitivity (targets)",
                    xlim=(0.0, xmax),
                    vline=s.get("fp_per_case", {}).get("value"),
                ),
                "Free-response ROC: target sensitivity against false positives per case as the threshold falls. "
                "The blue line marks the operating point at the manifest threshold.",
            )
        )
    if "roc" in curves:
        r = curves["roc"]
        auc = s.get("auc", {}).get("value")
        out.append(
            (
                "roc.png",
                plot(
                    [(r["fpr"], r["tpr"], f"AUC {auc:.3f}" if auc is not None else "ROC")],
                    "ROC (cases)",
                    "1 - specificity",
                    "sensitivity",
                    diagonal=True,
                ),
                "Receiver operating characteristic over cases: each point is one threshold.",
            )
        )
    if "calibration" in curves:
        c = curves["calibration"]
        ece = s.get("ece", {}).get("value")
        out.append(
            (
                "calibration.png",
                plot(
                    [(c["confidence"], c["observed"], f"ECE {ece:.3f}" if ece is not None else "model")],
                    "Calibration",
                    "confidence shown",
                    "observed frequency",
                    diagonal=True,
                    markers=True,
                ),
                "Reliability diagram: a calibrated model lies on the diagonal (shown 80 % = right 80 % of the time).",
            )
        )
    return out


_CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
.banner{background:#f0a020;color:#000;font-weight:bold;padding:8px 12px;margin-bottom:12px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}.missed,.false.alarm,.wrong.finding{background:#fde2e2}.partly{background:#fff4d6}
.plots img{margin:4px;border:1px solid #ddd}.small{color:#666;font-size:90%}img.t{display:block}
"""


def write_report(report_dir: str | Path, s: dict[str, Any], records: list[CaseRecord]) -> Path:
    """``report.html`` with PNG plots, a per-case table (thumbnails, errors first) and ``cases.csv``."""
    d = Path(report_dir)
    (d / "cases").mkdir(parents=True, exist_ok=True)
    e = html.escape
    parts = [
        f"<!doctype html><meta charset=utf-8><title>Validation {e(s['model'])}</title><style>{_CSS}</style>"
    ]
    if not s.get("cleared_for_clinical_use"):
        parts.append(
            "<div class=banner>NOT FOR DIAGNOSTIC USE — this model is not cleared for clinical use.</div>"
        )
    parts.append(f"<h1>Validation of {e(s['model'])} ({e(s['task'])})</h1>")
    parts.append(
        f"<p>Dataset <code>{e(s['dataset'])}</code>: <b>{s['n']}</b> usable cases"
        f" ({s.get('positives', 0)} with a finding, {s.get('negatives', 0)} without). Alert threshold"
        f" {s['threshold']:.2f} (from the manifest). Confidence calibration: {e(s['calibration'])}."
        f" Written {time.strftime('%Y-%m-%d %H:%M')}.</p>"
    )
    rows = []
    for k in _ORDER:
        v = s.get(k)
        if isinstance(v, dict):
            ci = v.get("ci95")
            val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
            note = v.get("unit", "")
            rows.append(
                f"<tr><td>{e(_NAMES.get(k, k))}</td><td><b>{val}</b></td>"
                f"<td>{f'{ci[0]:.3f} – {ci[1]:.3f}' if ci else ''}</td><td class=small>{e(str(note))}</td></tr>"
            )
    parts.append("<h2>Results at the manifest threshold</h2><table><tr><th>measure</th><th>value</th>")
    parts.append("<th>95 % CI (bootstrap over cases)</th><th>note</th></tr>" + "".join(rows) + "</table>")
    if "sensitivity_at_fp_per_case" in s:
        cells = "".join(f"<td>{v:.3f}</td>" for v in s["sensitivity_at_fp_per_case"].values())
        heads = "".join(f"<th>{k}</th>" for k in s["sensitivity_at_fp_per_case"])
        parts.append(
            f"<p>FROC: sensitivity at false positives per case</p><table><tr>{heads}</tr><tr>{cells}</tr></table>"
        )
    a = s.get("agreement_int8_float")
    parts.append(
        f"<p><b>Silent drift check</b> (int8 model against its float32 twin, same pre- and post-processing): "
        f"{100 * a['value']:.2f} % agreement of {e(a['what'])} over {a['cases']} cases.</p>"
        if a
        else "<p><b>Silent drift check</b>: no float twin (model_float.tflite) beside the model.</p>"
    )
    g = s.get("gate")
    parts.append(
        f"<p><b>Input gate</b> (threshold {g['threshold']:.4g}): flags {100 * (g['flag_rate']['value'] or 0):.2f} %"
        f" of the {g['n']} dataset images"
        + (
            f", {100 * (g['ood_flag_rate']['value'] or 0):.1f} % of {g['ood_n']} out-of-distribution images"
            f" (AUROC {g['auroc']})"
            if "ood_n" in g
            else ""
        )
        + ".</p>"
        if g
        else "<p><b>Input gate</b>: the model has no [gate].</p>"
    )
    parts.append("<h2>Curves</h2><div class=plots>")
    for name, img, caption in _plots(s):
        cv2.imwrite(str(d / name), img)
        parts.append(
            f"<figure style='display:inline-block'><img src='{name}' width={PLOT_W}><figcaption class=small style='max-width:{PLOT_W}px'>{e(caption)}</figcaption></figure>"
        )
    parts.append("</div>")
    if s["problems"]:
        parts.append(f"<h2>Dataset problems ({len(s['problems'])}; those cases are left out)</h2><ul>")
        parts += [f"<li>{e(p)}</li>" for p in s["problems"]]
        parts.append("</ul>")
    rank = {"missed": 0, "wrong finding": 1, "false alarm": 2, "partly": 3, "correct": 4}
    ordered = sorted(records, key=lambda r: (rank.get(r.outcome, 5), r.name))
    keys = list(records[0].values) if records else []
    parts.append(
        "<h2>Cases (errors first)</h2><p class=small>Green: reference (truth); amber: the model. "
        "Score: the calibrated probability of the finding (detection: of the best box), as shown on screen.</p>"
        "<table><tr><th>image</th><th>file</th><th>reference</th><th>model</th><th>score</th><th>outcome</th>"
        + "".join(f"<th>{e(k.replace('_', ' '))}</th>" for k in keys)
        + "</tr>"
    )
    with (d / "cases.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["file", "reference", "model", "score", "outcome", *keys])
        for i, r in enumerate(ordered):
            img = ""
            if r.thumb is not None:
                tn = f"cases/{i:04d}_{Path(r.name).stem}.jpg"
                cv2.imwrite(str(d / tn), r.thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
                img = f"<img class=t src='{e(tn)}' width={THUMB_WIDTH}>"
            vals = "".join(f"<td>{e(str(r.values.get(k, '')))}</td>" for k in keys)
            parts.append(
                f"<tr class='{e(r.outcome)}'><td>{img}</td><td>{e(r.name)}</td><td>{e(r.truth)}</td>"
                f"<td>{e(r.prediction)}</td><td>{r.score:.3f}</td><td>{e(r.outcome)}</td>{vals}</tr>"
            )
            wr.writerow(
                [
                    r.name,
                    r.truth,
                    r.prediction,
                    f"{r.score:.4f}",
                    r.outcome,
                    *(r.values.get(k, "") for k in keys),
                ]
            )
    parts.append("</table>")
    (d / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    out = d / "report.html"
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


_NAMES = {
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "positive predictive value",
    "npv": "negative predictive value",
    "auc": "area under the ROC curve",
    "dice": "Dice (cases with a finding)",
    "dice_pooled": "Dice (all pixels pooled)",
    "iou": "IoU",
    "fp_per_case": "false positives per case",
    "ece": "expected calibration error",
}
