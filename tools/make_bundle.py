#!/usr/bin/env python3
"""Sign a model folder into an update bundle.

    python tools/make_bundle.py MODEL_DIR --sequence N --board NAME [--board NAME ...]
                                [--backend NAME ...] --key FILE --out FILE.fwb

MODEL_DIR holds manifest.toml, model.tflite (plus the files each backend needs: model_edgetpu.tflite for
edgetpu, model.onnx + model_float.tflite for tensorrt, ...) and golden/case_NNN.npz. The sequence must be
above the one the devices have installed for this model. Backends default to every declared backend whose
files the folder has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_app.backends import backend_plugins  # noqa: E402
from firmware_app.errors import FirmwareAppError  # noqa: E402
from firmware_app.update.bundle import build_model_bundle, compatible_backends  # noqa: E402
from firmware_app.update.trust import load_private_key, short  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sign a model folder into an update bundle (.fwb).")
    parser.add_argument("model_dir")
    parser.add_argument(
        "--sequence", type=int, required=True, help="release counter, above the installed one"
    )
    parser.add_argument("--board", action="append", required=True, help="compatible board name (repeatable)")
    parser.add_argument(
        "--backend", action="append", choices=list(backend_plugins()), help="compatible backend (repeatable)"
    )
    parser.add_argument("--key", required=True, help="signing.key from tools/keygen.py")
    parser.add_argument("--out", required=True, help="the .fwb to write")
    parser.add_argument("--bundle-id", help="default: <model id>-<version>-<sequence>")
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    backends = args.backend or compatible_backends(model_dir)
    try:
        key = load_private_key(Path(args.key))
        m = build_model_bundle(
            model_dir, Path(args.out), args.sequence, args.board, backends, key, args.bundle_id
        )
    except (FirmwareAppError, ValueError, OSError) as exc:
        print(f"make_bundle: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {m.model_id} {m.version}, sequence {m.sequence}, boards {', '.join(m.boards)}, "
        f"backends {', '.join(m.backends)}, {len(m.files)} files, {m.payload_bytes} bytes, "
        f"signed by key {short(m.key_id)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
