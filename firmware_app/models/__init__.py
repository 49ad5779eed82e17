"""Models: the manifest beside each .tflite, and where installed/bundled models are found."""

from firmware_app.models.manifest import Manifest, load_manifest
from firmware_app.models.store import ModelRef, find_model, list_models

__all__ = ["Manifest", "ModelRef", "find_model", "list_models", "load_manifest"]
