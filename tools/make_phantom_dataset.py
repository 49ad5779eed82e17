#!/usr/bin/env python3
"""Write a labelled phantom dataset in the layout ``firmware-app validate`` reads.

    python tools/make_phantom_dataset.py --task segmentation|classification|detection --count N --seed S --out DIR

- segmentation: ``UltrasoundPhantom`` frames, ``DIR/images/case_NNNN.png`` and ``DIR/masks/case_NNNN.png``
  (0/255, 255 = anechoic fluid);
- classification: ``LungPhantom`` frames, ``DIR/labels.csv`` (file,label) with the labels of
  ``us-bline-cls``: ``absent`` / ``b-lines``;
- detection: ``XrayPhantom`` frames, ``DIR/boxes.csv`` (file,label,x0,y0,x1,y1; label ``nodule``; an image
  without a nodule has one row ``file,,,,,``).

Case ``i`` of dataset seed ``S`` is frame ``t`` of phantom seed ``p``, both drawn from
``numpy.random.SeedSequence([SALT, S, i])``: one seed always gives the same dataset, and the phantom seeds
are 62-bit numbers, so they never meet the small seeds (0 .. a few thousand) the bundled models were
trained on. ``DIR/phantom.csv`` records (file, phantom, seed, t) of every case.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from firmware_app.sources.lung_phantom import LungPhantom  # noqa: E402
from firmware_app.sources.phantom import UltrasoundPhantom, XrayPhantom  # noqa: E402

SALT = 0xDA7A5E7
TASKS = ("segmentation", "classification", "detection")
CLASS_LABELS = ("absent", "b-lines")  # us-bline-cls manifest labels
DET_LABEL = "nodule"  # xr-nodule-det manifest labels[1]
PHANTOMS = {"segmentation": UltrasoundPhantom, "classification": LungPhantom, "detection": XrayPhantom}
MAX_T = 3000


def case_source(seed: int, i: int) -> tuple[int, int]:
    """(phantom seed, frame t) of case ``i`` of the dataset with seed ``seed``."""
    state = np.random.SeedSequence([SALT, int(seed), int(i)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(2)), int(state[1] % np.uint64(MAX_T))


def make_dataset(
    task: str,
    count: int,
    seed: int,
    out: str | Path,
    width: int = 640,
    height: int = 480,
    progress: bool = False,
) -> Path:
    """Write ``count`` cases into ``out``; returns the folder."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use one of {', '.join(TASKS)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if task == "segmentation":
        (out / "masks").mkdir(exist_ok=True)
    rows: list[list] = []
    prov: list[list] = []
    cls = PHANTOMS[task]
    for i in range(count):
        pseed, t = case_source(seed, i)
        name = f"case_{i:04d}.png"
        ph = cls(width, height, seed=pseed)
        if task == "segmentation":
            img, mask = ph.render(t)
            cv2.imwrite(str(out / "masks" / name), mask * np.uint8(255))
        elif task == "classification":
            img, label = ph.render(t)
            rows.append([name, CLASS_LABELS[label]])
        else:
            img, _mask, boxes = ph.render(t)
            rows += [[name, DET_LABEL, *b] for b in boxes] or [[name, "", "", "", "", ""]]
        cv2.imwrite(str(out / "images" / name), img)
        prov.append([name, cls.__name__, pseed, t])
        if progress and (i + 1 == count or (i + 1) % max(1, count // 20) == 0):
            done = (i + 1) / count
            print(
                f"\r{task} [{'#' * int(30 * done):<30}] {i + 1}/{count}", end="\n" if i + 1 == count else ""
            )
    if task == "classification":
        _write_csv(out / "labels.csv", ["file", "label"], rows)
    elif task == "detection":
        _write_csv(out / "boxes.csv", ["file", "label", "x0", "y0", "x1", "y1"], rows)
    _write_csv(out / "phantom.csv", ["file", "phantom", "seed", "t"], prov)
    return out


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error("--count must be >= 1")
    make_dataset(args.task, args.count, args.seed, args.out, args.width, args.height, progress=True)
    print(f"wrote {args.count} {args.task} cases to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
