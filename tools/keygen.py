#!/usr/bin/env python3
"""Make an ed25519 signing key pair for update bundles.

    python tools/keygen.py --out DIR

writes DIR/signing.key (PEM PKCS#8, mode 0600: keep it off the device, offline, backed up) and
DIR/signing.pub (PEM: copy it into the device's <data-dir>/keys/). Prints the key id. Never overwrites.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from firmware_app.update.trust import key_id, private_pem, public_pem  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make an ed25519 key pair for signing update bundles.")
    parser.add_argument("--out", required=True, help="folder for signing.key and signing.pub")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    try:
        fd = os.open(out / "signing.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"keygen: error: {out / 'signing.key'} exists; not overwritten", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))
    os.chmod(out / "signing.key", 0o600)
    (out / "signing.pub").write_bytes(public_pem(key))
    print(
        f"key id {key_id(key)}\nprivate: {out / 'signing.key'} (keep offline)\npublic:  {out / 'signing.pub'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
