"""Run by test_fuzz in a subprocess: read every case file given on stdin (one "KIND PATH" a line) through
the DICOM source or the image source, under an address-space limit and a per-case time limit.

Prints one line a case, flushed: "START i", then "OK i" (frames or BadFrame only) or "UNCAUGHT i TYPE: msg".
A hang ends the process (faulthandler) and a crash kills it: the parent sees a START without its end.
"""

from __future__ import annotations

import faulthandler
import resource
import sys
import warnings
from pathlib import Path

LIMIT_AS = int(sys.argv[1]) if len(sys.argv) > 1 else 1536 * 2**20
CASE_S = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0


def run_case(kind: str, path: Path) -> None:
    from firmware_app.errors import BadFrame
    from firmware_app.sources import open_source

    uri = f"dicom:{path}?watch=0" if kind == "dicom" else f"images:{path}"
    src = open_source(uri)
    try:
        for _ in range(40):  # a 2-frame file mutated into a long cine: a few frames are enough
            try:
                frame = src.read()
            except BadFrame:
                continue
            if frame is None:
                break
            assert frame.pixels.dtype.name == "uint8"
    finally:
        src.close()


def main() -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)
    import cv2  # noqa: F401 - import before the limit: its thread pools reserve address space
    import pydicom  # noqa: F401

    from firmware_app.sources import dicom, video  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    for i, line in enumerate(sys.stdin):
        kind, _, path = line.rstrip("\n").partition(" ")
        print(f"START {i}", flush=True)
        faulthandler.dump_traceback_later(CASE_S, exit=True)
        try:
            run_case(kind, Path(path))
        except Exception as exc:  # noqa: BLE001 - what the test is looking for
            print(f"UNCAUGHT {i} {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", flush=True)
        else:
            print(f"OK {i}", flush=True)
        finally:
            faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
