"""Typed events a sink sends the pipeline for the screen (``Pipeline.publish``), instead of attribute writes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    """A one-line message for the screen's message list (a fallback, a skipped file, a capture saved)."""

    message: str


@dataclass(frozen=True)
class InputWarning:
    """The input monitor's banner: ``text`` while the input is unlike the training data, None when not."""

    text: str | None
