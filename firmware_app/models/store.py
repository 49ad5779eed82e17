"""Where models are found: an explicit folder, the installed-model store, or the bundled models.

Lookup of an id: ``<data-dir>/models/<id>/current`` (the active slot of an installed model, see the
update issue) first, then the bundled ``models_tflite/<id>/``. A path (anything with a ``/`` or an existing
folder) is used as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from firmware_app.errors import BadModel
from firmware_app.models.manifest import Manifest, load_manifest

MODEL_FILE = "model.tflite"


def bundled_models_dir() -> Path:
    """models_tflite/ beside the package (a source checkout), or FIRMWARE_APP_MODELS, or the system copy."""
    env = os.environ.get("FIRMWARE_APP_MODELS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "models_tflite"
    if here.is_dir():
        return here
    return Path("/usr/share/firmware-app/models_tflite")


@dataclass(frozen=True)
class ModelRef:
    manifest: Manifest
    folder: Path
    origin: str  # "bundled" | "installed" | "path"

    @property
    def tflite(self) -> Path:
        return self.folder / MODEL_FILE

    def variant(self, name: str) -> Path | None:
        """Another file of the model folder (``model_edgetpu.tflite``, ``model.onnx``) when present."""
        p = self.folder / name
        return p if p.is_file() else None


def _load(folder: Path, origin: str) -> ModelRef:
    if not folder.is_dir():
        raise BadModel(f"{folder}: model folder not found")
    manifest = load_manifest(folder)
    if not (folder / MODEL_FILE).is_file():
        raise BadModel(f"{folder / MODEL_FILE}: model file not found beside its manifest")
    return ModelRef(manifest, folder, origin)


def find_model(ref: str, data_dir: str | Path | None = None) -> ModelRef:
    """Resolve ``--model ID|DIR``. BadModel names what was looked at."""
    p = Path(ref)
    if os.sep in ref or ref.startswith(".") or p.is_dir():
        return _load(p, "path")
    looked = []
    if data_dir is not None:
        installed = Path(data_dir) / "models" / ref / "current"
        looked.append(str(installed))
        if installed.is_dir():
            return _load(installed.resolve(), "installed")
    bundled = bundled_models_dir() / ref
    looked.append(str(bundled))
    if bundled.is_dir():
        return _load(bundled, "bundled")
    known = ", ".join(m.manifest.id for m in list_models(data_dir)) or "none"
    raise BadModel(f"model {ref!r} not found (looked in {', '.join(looked)}); available: {known}")


def list_models(data_dir: str | Path | None = None) -> list[ModelRef]:
    """Every loadable model, installed first; a broken folder is skipped here (``doctor`` reports it)."""
    found: dict[str, ModelRef] = {}
    roots: list[tuple[Path, str]] = []
    if data_dir is not None:
        roots += [(d / "current", "installed") for d in sorted((Path(data_dir) / "models").glob("*"))]
    roots += [(d, "bundled") for d in sorted(bundled_models_dir().glob("*"))]
    for folder, origin in roots:
        try:
            ref = _load(folder.resolve() if origin == "installed" else folder, origin)
        except BadModel:
            continue
        found.setdefault(ref.manifest.id, ref)
    return list(found.values())
