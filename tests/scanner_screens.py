"""The synthetic scanner screens of the region tests live in the package (the bench replays them too)."""

from firmware_app.sources.scanner_screen import Layout, ScannerScreen, frames

__all__ = ["Layout", "ScannerScreen", "frames"]
