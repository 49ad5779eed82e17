"""Building a gate from image folders (``tools/make_gate.py``), and the figures that describe it.

- ``read_folder``: every image of a folder (PNG, JPEG, BMP, TIFF; DICOM through the DICOM source, up to
  ``MAX_DICOM_FRAMES`` frames a file). A folder with an ``images/`` subfolder (the layout of
  ``firmware-app validate`` and ``tools/make_phantom_dataset.py``) is read from there only, so masks are
  never taken for images.
- ``split_holdout``: without a validation folder, every ``HOLDOUT_EVERY``-th file (sorted by path) is held
  out; frames of one file stay on one side.
- ``choose_threshold``: the operating point on held-out in-distribution frames. The threshold is the
  distribution-free upper confidence bound (``confidence``, default 95 %) of the (1 - target) quantile of
  the validation scores: with k validation frames above it, P(Binomial(n, target) <= k) <= 1 - confidence,
  so the flag rate on new frames of the same kind is at most the target with that confidence. The measured
  validation flag rate is therefore below the target (about 0.4 % of 800 frames for a 1 % target) and
  approaches it as the validation set grows. ``confidence = 0`` gives the plain quantile.
- ``gate_table`` / ``replace_table``: the manifest's ``[gate]`` table, written in place of an existing one
  (or appended); every other byte of the manifest stays as it was.
- ``add_golden_scores``: each golden case gets ``gate_pixels`` (the gate's working image of the case's
  input, mapped back to pixels) and ``gate_score``, which the self-test reproduces.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app.errors import BadFrame, BadInput
from firmware_app.gate.descriptor import describe, working_image
from firmware_app.gate.model import GateParams, scores

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
MAX_DICOM_FRAMES = 16
HOLDOUT_EVERY = 3
DEFAULT_CONFIDENCE = 0.95
GOLDEN_KEYS = ("gate_pixels", "gate_score")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def image_files(folder: str | Path) -> list[Path]:
    """The image and DICOM files of a folder (its ``images/`` subfolder when it has one), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: folder not found")
    root = folder / "images" if (folder / "images").is_dir() else folder
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(p):
            out.append(p)
    return out


def load_file(path: Path, max_frames: int = MAX_DICOM_FRAMES) -> Iterator[np.ndarray]:
    """uint8 gray or BGR frames of one file (one for an image); BadFrame names an unreadable file."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from firmware_app.sources.video import decode_image  # as the images: source decodes it

        yield decode_image(path)[0]
        return
    from firmware_app.sources.dicom import load_frames

    for i, (pixels, _meta) in enumerate(load_frames(path)):
        if i >= max_frames:
            break
        yield pixels


def read_descriptors(
    files: list[Path], max_frames: int = MAX_DICOM_FRAMES, problems: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """(descriptor rows, the name of the file each came from); unreadable files are logged and skipped."""
    rows, names = [], []
    for path in files:
        try:
            for px in load_file(path, max_frames):
                rows.append(describe(px)[0])
                names.append(str(path))
        except BadFrame as exc:
            log.warning("%s", exc)
            if problems is not None:
                problems.append(str(exc))
    return (np.array(rows) if rows else np.zeros((0, 0))), names


def split_holdout(files: list[Path], every: int = HOLDOUT_EVERY) -> tuple[list[Path], list[Path]]:
    """(reference, validation): every ``every``-th file of the sorted list is held out."""
    files = sorted(files)
    return (
        [p for i, p in enumerate(files) if i % every != every - 1],
        [p for i, p in enumerate(files) if i % every == every - 1],
    )


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(0, min(k, n) + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def choose_threshold(val_scores: np.ndarray, target: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The operating point (see the module docstring), rounded to 6 significant digits."""
    s = np.sort(np.asarray(val_scores, np.float64))[::-1]
    n = len(s)
    if n == 0:
        raise ValueError("no validation frames")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target flag rate {target} must be between 0 and 1")
    if confidence > 0:
        k = 0
        while k + 1 < n and _binom_cdf(k + 1, n, target) <= 1.0 - confidence:
            k += 1
        if _binom_cdf(0, n, target) > 1.0 - confidence:
            log.warning(
                "%d validation frames are too few for %.0f %% confidence; none flagged", n, 100 * confidence
            )
    else:
        k = min(n - 1, int(math.floor(target * n)))
    # k frames above: between the k-th and (k+1)-th largest score
    upper = s[k - 1] if k > 0 else s[0] * 1.05 + 1e-6
    thr = 0.5 * (upper + s[k]) if k > 0 else upper
    rounded = float(f"{thr:.6g}")
    while (s > rounded).sum() > k:  # rounding must not flag one more frame
        rounded = float(f"{rounded * (1 + 1e-6):.6g}") if rounded > 0 else 1e-6
    return rounded


def flag_rate(s: np.ndarray, threshold: float) -> float:
    s = np.asarray(s, np.float64)
    return float(np.mean(~(s <= threshold))) if s.size else float("nan")


def wilson_ci(k: int, n: int, z: float = 1.96) -> list[float] | None:
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count one half)."""
    neg, pos = np.sort(np.asarray(neg, np.float64)), np.asarray(pos, np.float64)
    if not neg.size or not pos.size:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (neg.size * pos.size))


# ---------------------------------------------------------------- the manifest's [gate] table
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = f"{v:.6g}"
        return text if any(c in text for c in ".en") else text + ".0"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def gate_table(fields: dict[str, Any]) -> str:
    lines = ["[gate]  # input gate (tools/make_gate.py): is the frame like the reference data?"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"-]+)\s*\]\]?")


def replace_table(text: str, name: str, table: str) -> str:
    """``text`` with its top-level ``[name]`` table replaced by ``table`` (appended when absent)."""
    lines = text.splitlines(keepends=True)
    start = end = None
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not m:
            continue
        if start is None and m.group(1) == name:
            start = i
        elif start is not None:
            end = i
            break
    if start is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + table
    end = len(lines) if end is None else end
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + table + ("\n" + tail if tail else "")


# ---------------------------------------------------------------- golden gate scores
def input_pixels(x: np.ndarray, spec, value_range: tuple[float, float], color: str) -> np.ndarray:
    """A model input tensor [1, h, w, c] -> the uint8 gray or BGR pixels it was made from."""
    from firmware_app.preprocess import input_lut

    lut = input_lut(spec, value_range)
    img = np.asarray(x)[0]
    if lut.dtype == np.float32:
        lo, hi = value_range
        px = np.clip(np.round((img.astype(np.float64) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    else:
        inverse = np.zeros(256, np.uint8)
        inverse[lut.view(np.uint8)[::-1]] = np.arange(256)[::-1].astype(np.uint8)  # lowest pixel wins
        px = inverse[img.view(np.uint8)]
    if px.shape[-1] == 1:
        return px[..., 0]
    return cv2.cvtColor(px, cv2.COLOR_RGB2BGR) if color == "rgb" else px


def add_golden_scores(model_dir: Path, params: GateParams, manifest, spec) -> list[float]:
    """Write ``gate_pixels`` and ``gate_score`` into every golden case; the other arrays stay as they were."""
    from firmware_app.update.selftest import golden_cases

    out = []
    for path in golden_cases(model_dir):
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k not in GOLDEN_KEYS}
        work = working_image(input_pixels(arrays["input"], spec, manifest.range, manifest.color))
        score = float(scores(params, describe(work)[0])[0])
        np.savez_compressed(path, **arrays, gate_pixels=work, gate_score=np.array(score, np.float64))
        out.append(score)
    return out
