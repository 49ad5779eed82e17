"""Board configs: boards differ by TOML, not by code.

``--board NAME`` reads ``board_configs/NAME.toml``; ``--board FILE`` reads that file. Every key is checked:
an unknown key, a wrong type or a missing file is one BadConfig line naming the file, the key and the
problem. Defaults are those of ``x86-dev``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_app.device.gpio import GpioConfig, parse_gpio_config
from firmware_app.device.serial_link import SerialConfig, parse_serial_config
from firmware_app.errors import BadConfig
from firmware_app.sources.image_header import DEFAULT_MAX_PIXELS
from firmware_app.sources.profile import SourceProfile
from firmware_app.tomlio import load_toml

DEFAULT_BOARD = "x86-dev"

# section -> key -> (accepted types, default). Section "" is the top level.
_NUM = (int, float)
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "": {
        "name": ((str,), None),
        "description": ((str,), ""),
        "source": ((dict,), {}),
        "model": ((dict,), {}),
        "backend": ((dict,), {}),
        "display": ((dict,), {}),
        "pipeline": ((dict,), {}),
        "gpio": ((dict,), None),  # validated by firmware_app.device.gpio.parse_gpio_config
        "serial": ((dict,), None),  # validated by firmware_app.device.serial_link.parse_serial_config
    },
    "source": {
        "uri": ((str,), "synthetic:ultrasound"),
        "width": ((int,), 640),
        "height": ((int,), 480),
        "fps": (_NUM, 30.0),
        "fourcc": ((str,), "MJPG"),
        "crop": ((list,), None),
        "blackout": ((list,), []),
        "reconnect_s": (_NUM, 1.0),
        # images: an image over this many pixels is decoded at 1/2, 1/4 or 1/8 scale (sources.video)
        "max_pixels": ((int,), DEFAULT_MAX_PIXELS),
    },
    "model": {"id": ((str,), "us-fluid-seg")},
    "backend": {
        "order": ((list,), ["cpu"]),
        "threads": ((int,), 2),
        # + each backend plugin's legacy_keys (an older spelling of a [backend.<key>] field)
    },
    "display": {
        "uri": ((str,), "null"),
        "width": ((int,), 800),
        "height": ((int,), 480),
        "fps": (_NUM, 30.0),
    },
    "pipeline": {
        "stale_after_ms": (_NUM, 500.0),
        "no_signal_after_ms": (_NUM, 500.0),
        "stats_window": ((int,), 600),
        "silent_trial": ((bool,), False),  # results recorded, screen shows only the image and SILENT TRIAL
    },
}


@dataclass(frozen=True)
class BoardConfig:
    name: str
    path: Path | None
    source: dict[str, Any]
    model: dict[str, Any]
    backend: dict[str, Any]
    display: dict[str, Any]
    pipeline: dict[str, Any]
    description: str = ""
    profile: SourceProfile = field(default_factory=SourceProfile)
    gpio: GpioConfig | None = None  # no [gpio]: no buttons or lights
    serial: SerialConfig | None = None  # no [serial]: no serial link
    # one validated config per declared backend plugin, from [backend.<key>] (defaults when absent)
    backend_configs: dict[str, Any] = field(default_factory=dict)


def board_configs_dir() -> Path:
    env = os.environ.get("FIRMWARE_APP_BOARDS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1] / "board_configs"
    return here if here.is_dir() else Path("/etc/firmware-app/boards")


def _check(table: dict[str, Any], section: str, where: str) -> dict[str, Any]:
    schema = _SCHEMA[section]
    prefix = f"[{section}] " if section else ""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in schema:
            raise BadConfig(f"{where}: unknown key {prefix}{key}; allowed: {', '.join(schema)}")
        types, _ = schema[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("number" if t is float else t.__name__ for t in types)
            raise BadConfig(f"{where}: {prefix}{key} must be {names}, got {type(value).__name__} {value!r}")
        out[key] = value
    for key, (_, default) in schema.items():
        out.setdefault(key, default)
    return out


def parse_board(data: dict[str, Any], where: str, path: Path | None = None) -> BoardConfig:
    from firmware_app.backends.chain import AUTO, backend_key, backend_plugins, parse_backend_configs

    top = _check(data, "", where)
    declared = backend_plugins()
    legacy = {old: (key, field) for key, p in declared.items() for old, field in p.legacy_keys.items()}
    backend_table = {k: v for k, v in top["backend"].items() if k not in declared and k not in legacy}
    plugin_tables = {k: v for k, v in top["backend"].items() if k in declared}
    sections = {
        s: _check(backend_table if s == "backend" else top[s], s, where)
        for s in ("source", "model", "backend", "display", "pipeline")
    }
    b = sections["backend"]
    try:
        b["order"] = [item if item == AUTO else backend_key(item) for item in b["order"]]
    except BadConfig as exc:
        raise BadConfig(f"{where}: [backend] order: {exc}") from None
    if not b["order"]:
        raise BadConfig(f"{where}: [backend] order must name at least one backend")
    for old, (key, field_name) in legacy.items():  # an older spelling of [backend.<key>] <field>
        value = top["backend"].get(old)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise BadConfig(f"{where}: [backend] {old} must be str, got {type(value).__name__} {value!r}")
        table = dict(plugin_tables.get(key, {}))
        if table.get(field_name, value) != value:
            raise BadConfig(f"{where}: [backend] {old} and [backend.{key}] {field_name} disagree")
        plugin_tables[key] = {**table, field_name: value}
    backend_configs = parse_backend_configs(plugin_tables, where)
    for old, (key, field_name) in legacy.items():
        b[old] = getattr(backend_configs.get(key), field_name, "") or ""
    if not 1 <= b["threads"] <= 64:
        raise BadConfig(f"{where}: [backend] threads {b['threads']} must be 1..64")
    s = sections["source"]
    if s["fourcc"] not in ("MJPG", "YUYV"):
        raise BadConfig(f"{where}: [source] fourcc {s['fourcc']!r} must be MJPG or YUYV")
    for sec, key in (("source", "width"), ("source", "height"), ("display", "width"), ("display", "height")):
        if not 16 <= sections[sec][key] <= 8192:
            raise BadConfig(f"{where}: [{sec}] {key} {sections[sec][key]} must be 16..8192")
    if not 2**16 <= s["max_pixels"] <= 2**30:
        raise BadConfig(f"{where}: [source] max_pixels {s['max_pixels']} must be 65536..1073741824")
    for sec, key in (("source", "fps"), ("display", "fps")):
        if not 0 < sections[sec][key] <= 480:
            raise BadConfig(f"{where}: [{sec}] {key} {sections[sec][key]} must be > 0 and <= 480")
    profile = SourceProfile.from_config(
        {k: v for k, v in (("crop", s["crop"]), ("blackout", s["blackout"])) if v is not None},
        f"{where}: [source]",
    )
    gpio = parse_gpio_config(top["gpio"], where) if top["gpio"] is not None else None
    serial = parse_serial_config(top["serial"], where) if top["serial"] is not None else None
    name = top["name"] or (path.stem if path else "board")
    return BoardConfig(
        name=name,
        path=path,
        description=top["description"],
        profile=profile,
        gpio=gpio,
        serial=serial,
        backend_configs=backend_configs,
        **sections,
    )


def load_board(ref: str | None = None) -> BoardConfig:
    """``ref`` is a board name (``rpi4-cpu``), a TOML path, or None for the default board."""
    ref = ref or os.environ.get("FIRMWARE_APP_BOARD") or DEFAULT_BOARD
    if ref.endswith(".toml") or os.sep in ref:
        path = Path(ref)
    else:
        path = board_configs_dir() / f"{ref}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in board_configs_dir().glob("*.toml"))
            raise BadConfig(f"{path}: board {ref!r} not found; known boards: {', '.join(known) or 'none'}")
    data = load_toml(path, BadConfig, what="board config")
    return parse_board(data, str(path), path)
