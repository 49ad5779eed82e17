#!/usr/bin/env python3
"""Show what an update bundle holds, and check it.

    python tools/inspect_bundle.py FILE.fwb [--keys DIR]

Prints the signed manifest (model, version, sequence, boards, backends, signer, files) and checks the
structure and every payload file's size and SHA-256. With --keys (a device's keys/ folder, or any folder of
*.pub) it also says whether the signature is trusted there. Exit 0 when all checks pass, 2 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_app.errors import FirmwareAppError  # noqa: E402
from firmware_app.update.bundle import BundleReader, read_bundle_info  # noqa: E402
from firmware_app.update.trust import TrustStore, short  # noqa: E402


class _AnyKey:
    """A stand-in trust store that accepts the signature unchecked, to check the rest of the bundle."""

    def verify(self, data, signature, now):
        from types import SimpleNamespace

        from firmware_app.update.bundle import parse_manifest

        return SimpleNamespace(key_id=parse_manifest(data).key_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show and check an update bundle (.fwb).")
    parser.add_argument("bundle")
    parser.add_argument("--keys", help="folder of trusted *.pub keys to check the signature against")
    args = parser.parse_args(argv)
    path = Path(args.bundle)
    try:
        m, signature = read_bundle_info(path)
    except (FirmwareAppError, OSError) as exc:
        print(f"{path}: not a readable bundle: {exc}", file=sys.stderr)
        return 2
    print(f"bundle:    {path} ({path.stat().st_size} bytes)")
    print(f"id:        {m.bundle_id}\nkind:      {m.kind}\ncreated:   {m.created}\nsequence:  {m.sequence}")
    print(f"signed by: key {m.key_id} ({short(m.key_id)})")
    if m.kind == "model":
        print(f"model:     {m.model_id} {m.version}")
        print(f"boards:    {', '.join(m.boards)}\nbackends:  {', '.join(m.backends)}")
        print(f"files:     {len(m.files)}, {m.payload_bytes} bytes")
        for f in m.files:
            print(f"  {f.size:>12}  {f.sha256[:16]}  {f.path}")
    else:
        for k in m.add:
            expires = k.expires.isoformat() if k.expires else "never"
            print(f"adds key:  {k.key_id} (expires {expires})")
        for kid in m.revoke:
            print(f"revokes:   {kid}")
    ok = True
    trust = TrustStore.load(Path(args.keys)) if args.keys else _AnyKey()
    try:
        with open(path, "rb") as fh, tempfile.TemporaryDirectory() as tmp:
            reader = BundleReader(fh)
            reader.read_signed(trust, datetime.now(timezone.utc))
            if m.kind == "model":
                reader.extract(m, Path(tmp))
            else:
                reader.check_end()
        print("structure: OK, every file matches its signed size and SHA-256")
        if args.keys:
            print(f"signature: trusted by {args.keys}")
    except FirmwareAppError as exc:
        print(f"check:     FAILED: {exc}", file=sys.stderr)
        ok = False
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
