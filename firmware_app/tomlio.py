"""TOML reading with one-line errors naming the file (tomllib on 3.11+, tomli before)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 boards
    import tomli as tomllib


def load_toml(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a directory, expected a TOML file") from None
    except PermissionError:
        raise error(f"{path}: {what} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: {what} is not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text") from None
