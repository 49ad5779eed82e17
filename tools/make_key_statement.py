#!/usr/bin/env python3
"""Make a key rotation statement: a .fwb of kind "keys", signed by a key the devices trust now.

    python tools/make_key_statement.py --key OLD.key --sequence N [--add NEW.key [--expires 2030-01-01T00:00:00Z]]
                                       [--revoke KEYID|FILE.pub ...] --out FILE.fwb

--add takes the NEW private key (its signature proves the key exists, so a typo cannot lock devices out); it
may be repeated, each followed by its own --expires. --revoke takes a key id (64 hex digits) or a .pub/.key
file. The sequence must be above the last statement the devices applied (trust.json "sequence").
Usual rotation: --key old.key --add new.key --revoke old.pub.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_app.errors import FirmwareAppError  # noqa: E402
from firmware_app.update.bundle import build_rotation_bundle  # noqa: E402
from firmware_app.update.trust import key_id, load_private_key, load_public_key, parse_time, short  # noqa: E402


class _AddKey(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        namespace.add.append([value, None])


class _Expires(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        if not namespace.add:
            parser.error("--expires goes after the --add it belongs to")
        namespace.add[-1][1] = value


def _revoked_id(text: str) -> str:
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text
    path = Path(text)
    return key_id(load_private_key(path) if path.suffix == ".key" else load_public_key(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a signed key rotation statement (.fwb).")
    parser.add_argument("--key", required=True, help="a signing key the devices trust now")
    parser.add_argument("--sequence", type=int, required=True)
    parser.add_argument("--add", action=_AddKey, default=[], help="new private key to trust (repeatable)")
    parser.add_argument(
        "--expires", action=_Expires, help="expiry of the --add before it (ISO 8601, with zone)"
    )
    parser.add_argument("--revoke", action="append", default=[], help="key id or key file to revoke")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        key = load_private_key(Path(args.key))
        add = [(load_private_key(Path(p)), parse_time(e, "--expires") if e else None) for p, e in args.add]
        revoke = [_revoked_id(r) for r in args.revoke]
        build_rotation_bundle(Path(args.out), args.sequence, key, add, revoke)
    except (FirmwareAppError, ValueError, OSError) as exc:
        print(f"make_key_statement: error: {exc}", file=sys.stderr)
        return 2
    added = ", ".join(short(key_id(k)) for k, _ in add) or "none"
    print(
        f"{args.out}: sequence {args.sequence}, signed by {short(key_id(key))}, adds {added}, revokes {len(revoke)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
