"""The named errors a caller can act on.

Each message names the input (a file, a URI, a key) and says what is wrong, in one line, so that a
biomedical engineer reading the log or the screen knows what to fix.
"""

from __future__ import annotations


class FirmwareAppError(Exception):
    """Base of every error the daemon reports to a person. Exit code 2 = bad input, 1 = run time."""

    exit_code = 1


class BadInput(FirmwareAppError):
    exit_code = 2


class BadConfig(BadInput):
    """A board config (TOML) is missing, unreadable, or has an unknown key or a wrong type."""


class BadModel(BadInput):
    """A model folder, its manifest or its .tflite is missing or invalid."""


class BadSource(BadInput):
    """A source URI cannot be parsed or names something that does not exist."""


class BadDisplay(BadInput):
    """A display URI cannot be parsed or opened."""


class SourceUnavailable(FirmwareAppError):
    """The capture device is absent or unplugged right now ("NO SIGNAL"); the source retries."""


class BadFrame(FirmwareAppError):
    """One input item (a DICOM file, a video frame) is unreadable; it is skipped and counted."""


class BackendUnavailable(FirmwareAppError):
    """An accelerator (Edge TPU, TensorRT) cannot be used; the chain falls back to the next one."""


class BundleRejected(BadInput):
    """An update bundle failed verification; the message says which check."""
