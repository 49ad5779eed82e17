"""Sources register under their URI scheme; ``open_source`` turns a URI into a Source.

synthetic:ultrasound?seed=1&fps=30&width=640&height=480   synthetic:xray
v4l2:/dev/video0  v4l2:0    file:clip.mp4[?realtime=0]    images:DIR    dicom:FILE|DIR[?watch=0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from firmware_app import plugins
from firmware_app.errors import BadSource
from firmware_app.sources.base import Source
from firmware_app.sources.profile import SourceProfile


def register(scheme: str) -> Callable[[type[Source]], type[Source]]:
    """Class decorator: declare a source plugin reachable as ``<scheme>:...`` (firmware_app.plugins)."""

    def deco(cls: type[Source]) -> type[Source]:
        cls.scheme = scheme
        return plugins.register("source", scheme)(cls)

    return deco


def split_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """'dicom:/a/b?watch=0' -> ('dicom', '/a/b', {'watch': '0'})."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not scheme:
        raise BadSource(f"source {uri!r}: expected SCHEME:TARGET, one of {', '.join(plugins.keys('source'))}")
    target, _, query = rest.partition("?")
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise BadSource(f"source {uri!r}: malformed query {query!r} ({exc})") from None
    return scheme, target, params


def source_class(scheme: str, uri: str = "") -> type[Source]:
    try:
        return plugins.get("source", scheme)
    except KeyError:
        raise BadSource(
            f"source {uri or scheme!r}: unknown scheme {scheme!r}; use one of {', '.join(plugins.keys('source'))}"
        ) from None


def open_source(
    uri: str, profile: SourceProfile | None = None, options: dict[str, Any] | None = None
) -> Source:
    """Build (not yet open) the source for ``uri``. ``options`` come from the board config [source]."""
    scheme, target, params = split_uri(uri)
    cls = source_class(scheme, uri)
    return cls.from_uri(uri, target, params, profile=profile, options=options or {})  # type: ignore[attr-defined]


__all__ = ["Source", "SourceProfile", "open_source", "register", "split_uri"]
