"""One registry for the plugins of every stage: each declares itself once, in its own module.

A plugin module decorates its declaration with ``@register(kind, key)``; ``plugins(kind)`` imports every
module of that kind's package (once, lazily) and returns what registered, in discovery order. Nothing else
lists plugin names: board config validation, bundle manifests, doctor and the command line ask here. Like
Frigate's detector plugins (a config class with a literal key + the implementation), the declaration is
also the config schema of that plugin.

Kinds and the package searched for them are in ``PACKAGES``; sources, displays and tasks can join with one
line each.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

PACKAGES: dict[str, str] = {
    "backend": "firmware_app.backends",
    "source": "firmware_app.sources",
    "display": "firmware_app.display",
    "task": "firmware_app.tasks",
}

_registry: dict[str, dict[str, Any]] = {}
_aliases: dict[str, dict[str, str]] = {}
_discovered: set[str] = set()
_lock = threading.RLock()

T = TypeVar("T")


def register(kind: str, key: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Class decorator: declare ``cls`` as the ``kind`` plugin named ``key`` (also reachable by ``aliases``)."""

    def deco(cls: T) -> T:
        with _lock:
            table = _registry.setdefault(kind, {})
            if key in table and table[key] is not cls:
                raise RuntimeError(f"{kind} plugin {key!r} declared twice ({table[key]!r} and {cls!r})")
            table[key] = cls
            for alias in aliases:
                _aliases.setdefault(kind, {})[alias] = key
        cls.key = key  # type: ignore[attr-defined]
        cls.aliases = tuple(aliases)  # type: ignore[attr-defined]
        return cls

    return deco


def _discover(kind: str) -> None:
    with _lock:
        if kind in _discovered:
            return
        package = PACKAGES.get(kind)
        if package is None:
            raise KeyError(f"no plugin kind {kind!r}; known: {', '.join(PACKAGES)}")
        pkg = importlib.import_module(package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
        _discovered.add(kind)


def plugins(kind: str) -> dict[str, Any]:
    """Every ``kind`` plugin, key -> declaration, in discovery (module name) order."""
    _discover(kind)
    table = _registry.get(kind, {})
    return {k: table[k] for k in sorted(table, key=lambda k: (table[k].__module__, k))}


def keys(kind: str) -> tuple[str, ...]:
    return tuple(plugins(kind))


def canonical(kind: str, name: str) -> str | None:
    """The key ``name`` stands for (itself or an alias), or None when no plugin has it."""
    table = plugins(kind)
    if name in table:
        return name
    return _aliases.get(kind, {}).get(name)


def get(kind: str, name: str) -> Any:
    """The plugin ``name`` (a key or an alias); KeyError names the known keys."""
    key = canonical(kind, name)
    if key is None:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(keys(kind))}")
    return plugins(kind)[key]
