#!/usr/bin/env python3
"""Fit a model's ``[finding]`` rules on held-out labelled data and write them into its manifest.

    python tools/fit_finding.py MODEL_DIR --dataset DIR [--min-size-fraction 0.001] [--min-size-mm2 MM2]
                                [--persistence K N] [--release R] [--pixel-threshold P]

Every task: the minimum finding size and the persistence rules (``firmware_app.tasks.finding``).
Segmentation also gets its finding-level calibration: whether a finding is present at all is predicted
from three features of the model's probability map (``firmware_app.tasks.segment.finding_features``) by
logistic regression, fit by Newton's method on the even-numbered cases of DIR; the expected calibration
error (10 bins) is measured on the odd-numbered ones, which the fit never saw, and written with it
(``ece``; ``ece_before``: the same for the highest pixel probability, what the screen showed before). A
case has the finding when its truth mask covers at least the minimum size. DIR is a labelled dataset
in the layout ``firmware-app validate`` reads (``tools/make_phantom_dataset.py``); use one that is
neither the training nor the test set.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from firmware_app.models.manifest import FINDING_FEATURES, load_manifest  # noqa: E402
from firmware_app.models.store import find_model  # noqa: E402
from firmware_app.tasks.segment import finding_features  # noqa: E402
from firmware_app.validate import (  # noqa: E402
    ModelRunner,
    _load_mask,
    expected_calibration_error,
    load_image,
    read_dataset,
)

L2 = 1e-3  # ridge on the coefficients (not the intercept): keeps a separable set finite


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[np.ndarray, float]:
    """Newton's method for p = sigmoid(b + x . w), a small ridge on w; -> (w, b)."""
    a = np.hstack([np.ones((len(x), 1)), x])
    theta = np.zeros(a.shape[1])
    ridge = np.diag([0.0] + [L2 * len(x)] * x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ theta, -40, 40)))
        grad = a.T @ (p - y) + ridge @ theta
        hess = (a * (p * (1 - p))[:, None]).T @ a + ridge + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta[1:], float(theta[0])


def segmentation_features(model_dir: Path, dataset: Path, min_fraction: float, pixel_threshold: float):
    ref = find_model(str(model_dir), None)
    m = ref.manifest
    cases, problems = read_dataset(dataset, m)
    if problems:
        raise SystemExit(f"{dataset}: {problems[0]}")
    runner = ModelRunner(ref)
    feats, ys, tops = [], [], []
    try:
        for case in cases:
            pixels = load_image(case.path)
            h, w = pixels.shape[:2]
            truth = _load_mask(case.mask_path, (h, w))
            prob = runner.post.probability_maps(runner.raw(pixels)[0]).max(axis=-1)  # type: ignore[attr-defined]
            mask = (prob > pixel_threshold).view(np.uint8)
            feats.append(finding_features(prob, mask))
            tops.append(float(prob.max()))
            ys.append(float(np.count_nonzero(truth) / truth.size >= min_fraction))
    finally:
        runner.close()
    return np.array(feats), np.array(ys), np.array(tops)


def finding_table(args: argparse.Namespace, fit: dict | None) -> str:
    k, n = args.persistence
    lines = [
        "[finding]  # what makes a result a finding (firmware_app.tasks.finding; tools/fit_finding.py)",
        f"min_size_fraction = {args.min_size_fraction:g}   # of the imaging region, when the scale is unknown",
    ]
    if args.min_size_mm2 is not None:
        lines.append(f"min_size_mm2 = {args.min_size_mm2:g}")
    lines += [
        f"persistence = [{k}, {n}]           # a stream alerts once {k} of the last {n} frames hold the finding",
        f"release = {args.release}                      # ... and stays one while at least {args.release} of them do",
    ]
    if fit is not None:
        feats = ", ".join(f'"{f}"' for f in FINDING_FEATURES)
        coef = ", ".join(f"{c:.6f}" for c in fit["coef"])
        lines += [
            f"pixel_threshold = {args.pixel_threshold:g}",
            f"features = [{feats}]",
            f"coef = [{coef}]",
            f"intercept = {fit['intercept']:.6f}",
            f"confidence_range = [{fit['range'][0]:.4f}, {fit['range'][1]:.4f}]   # what the held-out cases support",
            f"ece = {fit['ece']:.4f}          # finding level, {fit['held_out']} held-out cases, 10 bins",
            f"ece_before = {fit['ece_before']:.4f}   # the highest pixel probability as the confidence",
            f"cases = {fit['cases']}",
        ]
    return "\n".join(lines) + "\n"


def set_table(text: str, name: str, table: str) -> str:
    """``text`` with its ``[name]`` table replaced by ``table`` (appended when absent); the rest kept."""
    pattern = re.compile(rf"^\[{re.escape(name)}\][^\n]*\n(?:(?!\[)[^\n]*\n?)*", re.M)
    if pattern.search(text):
        return pattern.sub(lambda _: table + "\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--min-size-fraction", type=float, default=0.001)
    ap.add_argument("--min-size-mm2", type=float, default=None)
    ap.add_argument("--persistence", type=int, nargs=2, default=(3, 5), metavar=("K", "N"))
    ap.add_argument("--release", type=int, default=1)
    ap.add_argument("--pixel-threshold", type=float, default=0.5)
    args = ap.parse_args(argv)
    m = load_manifest(args.model_dir)
    fit = None
    if m.task == "segmentation":
        x, y, tops = segmentation_features(
            args.model_dir, args.dataset, args.min_size_fraction, args.pixel_threshold
        )
        train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
        if y[train].min() == y[train].max():
            raise SystemExit(f"{args.dataset}: every fitting case is {'positive' if y[0] else 'negative'}")
        coef, intercept = fit_logistic(x[train], y[train])
        p = 1.0 / (1.0 + np.exp(-(intercept + x[test] @ coef)))
        # what the held-out cases support at the ends (Laplace): no "100 %" from a few hundred cases
        top, bottom = p >= 0.9, p <= 0.1
        hi = (y[test][top].sum() + 1) / (top.sum() + 2)
        lo = (y[test][bottom].sum() + 1) / (bottom.sum() + 2)
        p = np.clip(p, lo, hi)
        fit = {
            "coef": coef,
            "intercept": intercept,
            "ece": expected_calibration_error(p, y[test]),
            "ece_before": expected_calibration_error(tops[test], y[test]),
            "held_out": int(test.sum()),
            "range": (float(lo), float(hi)),
            "cases": len(y),
        }
        print(
            f"{m.id}: {len(y)} cases ({int(y.sum())} with a finding); finding-level ECE on "
            f"{fit['held_out']} held-out cases {fit['ece']:.4f} (highest pixel probability: {fit['ece_before']:.4f})"
        )
    path = args.model_dir / "manifest.toml"
    path.write_text(set_table(path.read_text(), "finding", finding_table(args, fit)))
    load_manifest(args.model_dir)  # what was written must load
    print(f"wrote [finding] to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
