"""Helpers for the update tests: a test model with golden vectors, keys, bundles, and a snapshot of the data
dir. Every test builds its own models and bundles in tmp_path from the third-party float model, so nothing
depends on which bundled models exist."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_app.backends.litert import LiteRTBackend
from firmware_app.config import BoardConfig, load_board
from firmware_app.update.bundle import build_model_bundle, model_payload, sign_manifest, write_bundle
from firmware_app.update.install import Outcome, install_bundle
from firmware_app.update.slots import active_slot, slot_manifest
from firmware_app.update.trust import public_pem

THIRD_PARTY_FLOAT = Path(__file__).resolve().parent / "data" / "third_party" / "selfie-seg"
BOARD = "x86-dev"
MODEL_ID = "selfie-seg"


@functools.lru_cache(maxsize=1)
def golden_arrays() -> tuple[np.ndarray, np.ndarray]:
    """One golden case of the float model: a smooth input (small when compressed) and its exact output."""
    backend = LiteRTBackend(THIRD_PARTY_FLOAT / "model.tflite", threads=2)
    h, w = backend.input.shape[1:3]
    ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)
    x = np.broadcast_to(ramp[None, None, :, None], backend.input.shape).copy()
    x[:, h // 4 : h // 2, w // 4 : w // 2, :] = 0.8
    out = backend.invoke(x)[0].copy()
    backend.close()
    return x, out


def make_model(dest: Path, version: str, golden_offset: float = 0.0) -> Path:
    """The third-party float model as ``selfie-seg`` VERSION, with golden/case_000.npz and atol 1e-3."""
    dest.mkdir(parents=True)
    shutil.copy(THIRD_PARTY_FLOAT / "model.tflite", dest / "model.tflite")
    text = (THIRD_PARTY_FLOAT / "manifest.toml").read_text()
    text = text.replace('version = "0.10.18"', f'version = "{version}"')
    (dest / "manifest.toml").write_text(text + "\n[golden]\natol = 0.001\n")
    x, out = golden_arrays()
    (dest / "golden").mkdir()
    np.savez_compressed(dest / "golden" / "case_000.npz", input=x, output_0=out + np.float32(golden_offset))
    return dest


def snapshot(data_dir: Path) -> dict[str, str]:
    """Names, kinds and contents of everything below models/ and keys/."""
    found = {}
    for top in ("models", "keys"):
        root = data_dir / top
        for path in sorted(root.rglob("*")) if root.exists() else []:
            rel = path.relative_to(data_dir).as_posix()
            if path.is_symlink():
                found[rel] = "link:" + str(path.readlink())
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], fmt=tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@dataclass
class Kit:
    root: Path
    data: Path
    key: Ed25519PrivateKey
    board: BoardConfig

    def model(self, version: str = "1.0.0", golden_offset: float = 0.0) -> Path:
        dest = self.root / "src" / f"{version}-{golden_offset}"
        return dest if dest.exists() else make_model(dest, version, golden_offset)

    def bundle(
        self,
        version: str = "1.0.0",
        sequence: int = 1,
        boards: tuple[str, ...] = (BOARD,),
        backends: tuple[str, ...] = ("cpu",),
        key: Ed25519PrivateKey | None = None,
        model_dir: Path | None = None,
        name: str | None = None,
    ) -> Path:
        out = self.root / "stick" / (name or f"{MODEL_ID}-{version}-{sequence}.fwb")
        out.parent.mkdir(exist_ok=True)
        build_model_bundle(
            model_dir or self.model(version), out, sequence, list(boards), list(backends), key or self.key
        )
        return out

    def signed(self, fields: dict, payload: list[tuple[str, bytes]], name: str, key=None) -> Path:
        """A bundle from hand-made manifest fields, signed by a trusted key (a publisher's mistake)."""
        raw, sig = sign_manifest(fields, key or self.key)
        out = self.root / "stick" / name
        out.parent.mkdir(exist_ok=True)
        write_bundle(out, raw, sig, payload)
        return out

    def fields_and_payload(self, bundle: Path) -> tuple[dict, list[tuple[str, bytes]]]:
        members = tar_members(bundle)
        fields = json.loads(members[0][1])
        fields.pop("key_id")
        return fields, [(m.name.removeprefix("payload/"), d) for m, d in members[2:]]

    def install(self, path: Path, **kwargs) -> Outcome:
        return install_bundle(path, self.data, self.board, **kwargs)

    def active_version(self) -> str | None:
        mdir = self.data / "models" / MODEL_ID
        signed = slot_manifest(mdir, active_slot(mdir))
        return signed.version if signed else None


def make_kit(root: Path, monkeypatch) -> Kit:
    """A data dir trusting one fresh key; no bundled models visible (FIRMWARE_APP_MODELS -> empty)."""
    empty = root / "no-bundled-models"
    empty.mkdir()
    monkeypatch.setenv("FIRMWARE_APP_MODELS", str(empty))
    monkeypatch.delenv("FIRMWARE_APP_BOARD", raising=False)
    data = root / "data"
    (data / "keys").mkdir(parents=True)
    key = Ed25519PrivateKey.generate()
    (data / "keys" / "hospital.pub").write_bytes(public_pem(key))
    return Kit(root, data, key, load_board(BOARD))


__all__ = ["Kit", "file_member", "make_kit", "model_payload", "snapshot", "tar_members", "write_members"]


def install_in_child(bundle: Path, data_dir: Path, kill_at: int = 0, when: str = "before") -> None:
    """Body of a forked child: install ``bundle``; with ``kill_at`` = k, SIGKILL itself just before (or
    after) its k-th rename, the steps at which an install changes what is on disk."""
    import os
    import signal

    if kill_at:
        calls = [0]

        def hooked(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                result = real(*args, **kwargs)
                if calls[0] == kill_at and when == "after":
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            return call

        os.replace, os.rename = hooked(os.replace), hooked(os.rename)
    install_bundle(bundle, data_dir, load_board(BOARD))
