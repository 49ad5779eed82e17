#!/usr/bin/env python3
"""Build a model's input gate from a folder of its training / reference images.

    python tools/make_gate.py MODEL_DIR --reference DIR [--validation DIR] [--flag-rate 0.01]
                              [--confidence 0.95] [--ood DIR] [--file gate.npz]

Reads every image of the folders (PNG, JPEG, BMP, TIFF, DICOM; from ``DIR/images/`` when there is one, the
layout of tools/make_phantom_dataset.py and ``firmware-app validate``), fits the gate on the reference
frames (firmware_app.gate.model), chooses the threshold on the validation frames (without --validation:
every 3rd reference file is held out, deterministically) so that the flag rate on new frames of the same
kind is at most --flag-rate with --confidence (firmware_app.gate.build.choose_threshold), and writes
MODEL_DIR/gate.npz, the ``[gate]`` table of MODEL_DIR/manifest.toml (replaced when present; every other
byte of the manifest stays) and the gate score of each golden case (golden/case_NNN.npz: gate_pixels,
gate_score). --ood DIR (images that are not what the model takes) only measures: the flag rate on them and
the AUROC of the gate score between validation (in-distribution) and OOD frames; nothing is fitted to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from firmware_app.errors import FirmwareAppError  # noqa: E402
from firmware_app.gate import build  # noqa: E402
from firmware_app.gate.model import METHOD, InputGate, fit_gate, scores  # noqa: E402
from firmware_app.models.manifest import load_manifest, parse_manifest  # noqa: E402
from firmware_app.tomlio import tomllib  # noqa: E402


def make_gate(
    model_dir: Path,
    reference: Path,
    validation: Path | None = None,
    flag_rate: float = 0.01,
    confidence: float = build.DEFAULT_CONFIDENCE,
    ood: Path | None = None,
    file: str = "gate.npz",
) -> dict:
    """Fit and write the gate; returns the figures (also written into the [gate] table)."""
    manifest = load_manifest(model_dir)
    ref_files = build.image_files(reference)
    if validation is None:
        ref_files, val_files = build.split_holdout(ref_files)
    else:
        val_files = build.image_files(validation)
    ref, _ = build.read_descriptors(ref_files)
    val, _ = build.read_descriptors(val_files)
    if len(ref) < 20 or len(val) < 20:
        raise FirmwareAppError(
            f"need at least 20 reference and 20 validation frames, found {len(ref)} and {len(val)}"
        )
    params = fit_gate(ref)
    val_scores = scores(params, val)
    threshold = build.choose_threshold(val_scores, flag_rate, confidence)
    fields: dict = {
        "file": file,
        "method": METHOD,
        "threshold": threshold,
        "target_flag_rate": float(flag_rate),
        "validation_flag_rate": round(build.flag_rate(val_scores, threshold), 6),
        "reference_frames": int(len(ref)),
        "validation_frames": int(len(val)),
    }
    if ood is not None:
        feats, _ = build.read_descriptors(build.image_files(ood), max_frames=1)
        if len(feats):
            ood_scores = scores(params, feats)
            fields["ood_frames"] = int(len(feats))
            fields["ood_flag_rate"] = round(build.flag_rate(ood_scores, threshold), 6)
            fields["ood_auroc"] = round(build.auroc(val_scores, ood_scores), 6)
    path = model_dir / "manifest.toml"
    text = build.replace_table(path.read_text(encoding="utf-8"), "gate", build.gate_table(fields))
    parse_manifest(tomllib.loads(text), str(path), None)  # the new manifest must be valid
    np.savez_compressed(model_dir / file, **params.arrays())
    path.write_text(text, encoding="utf-8")
    manifest = load_manifest(model_dir)
    gate = InputGate.from_manifest(manifest)
    assert gate is not None
    golden = []
    if (model_dir / "model.tflite").is_file():
        from firmware_app.backends.litert import LiteRTBackend

        backend = LiteRTBackend(model_dir / "model.tflite", threads=1)
        try:
            golden = build.add_golden_scores(model_dir, params, manifest, backend.input)
        finally:
            backend.close()
    return {**fields, "golden_scores": golden, "shrinkage": params.shrinkage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--reference", type=Path, required=True, help="folder of reference (training) images")
    ap.add_argument("--validation", type=Path, help="folder of held-out in-distribution images")
    ap.add_argument("--flag-rate", type=float, default=0.01, help="target flag rate in distribution")
    ap.add_argument("--confidence", type=float, default=build.DEFAULT_CONFIDENCE)
    ap.add_argument("--ood", type=Path, help="folder of images the model does not take (measured only)")
    ap.add_argument("--file", default="gate.npz")
    args = ap.parse_args(argv)
    if not 0.0 < args.flag_rate < 1.0:
        ap.error("--flag-rate must be between 0 and 1")
    if not 0.0 <= args.confidence < 1.0:
        ap.error("--confidence must be in [0, 1)")
    t0 = time.perf_counter()
    try:
        out = make_gate(
            args.model_dir,
            args.reference,
            args.validation,
            args.flag_rate,
            args.confidence,
            args.ood,
            args.file,
        )
    except (FirmwareAppError, OSError, ValueError) as exc:
        print(f"make_gate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model_dir / args.file}: {out['method']}, threshold {out['threshold']:.6g}")
    print(
        f"  reference {out['reference_frames']} frames, validation {out['validation_frames']} frames: "
        f"flag rate {100 * out['validation_flag_rate']:.2f} % (target {100 * out['target_flag_rate']:.2f} %)"
    )
    if "ood_frames" in out:
        print(
            f"  ood {out['ood_frames']} frames: flag rate {100 * out['ood_flag_rate']:.1f} %, "
            f"AUROC {out['ood_auroc']:.4f}"
        )
    if out["golden_scores"]:
        print(f"  golden gate scores: {', '.join(f'{s:.4g}' for s in out['golden_scores'])}")
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
