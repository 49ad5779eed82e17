"""The named errors of the records package (captures, export, checkpoints).

Each message names the file or folder and says what to do, in one line, and never carries a patient
identifier.
"""

from __future__ import annotations

from firmware_app.errors import BadInput, FirmwareAppError


class RecordsError(FirmwareAppError):
    """Base of the records package's errors (exit code 1: a failure at run time)."""


class StorageFull(RecordsError):
    """The data disk has no room for a capture; nothing partial is left and inference goes on."""


class CaptureWriteFailed(RecordsError):
    """A capture could not be written for another reason (I/O error, permissions)."""


class CaptureCorrupt(RecordsError):
    """A capture file fails authentication: edited, truncated, or sealed with another device's key."""


class CaptureNotFound(BadInput):
    """No capture with that id."""


class KeyFileError(RecordsError):
    """A device key file is unreadable, of the wrong size, or not private to its owner."""


class ExportTargetError(BadInput):
    """The export target (a USB stick's folder) is missing, read-only or full."""


class ExportFailed(RecordsError):
    """A capture could not be turned into DICOM; the message names the capture id."""


class RecorderBusy(RecordsError):
    """A capture was asked for while nothing is on screen yet, or while earlier captures are being written."""
