"""The installed-model store: two slots per model, the active pointer, the sequence floor.

``<data-dir>/models/<id>/``::

    a/, b/        the slots: a model folder (manifest.toml, model.tflite, golden/, ...) plus .bundle.json and
                  .bundle.sig, the signed manifest it was installed from (its file list, sizes and hashes)
    current -> b  symlink to the active slot, replaced in one rename (models/store.py follows it)
    state.json    {"floor": N, "trial": {"slot": "b", "starts": 1} or null, "failed": ["a"]}

The sequence floor of a model is the larger of state.json's ``floor`` and the active slot's sequence: a new
sequence takes effect in the same rename that makes its slot active, and ``floor`` is raised before the
pointer ever moves away from a slot (to install over it or to roll back). A power cut never lowers it.
``trial`` is a slot installed but not yet confirmed by a healthy run of the daemon (see install.boot_check);
``failed`` are slots that failed on a start and may not be rolled back to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from firmware_app.durable import write_atomic
from firmware_app.errors import BundleRejected, FirmwareAppError
from firmware_app.update.bundle import MAX_MANIFEST_BYTES, BundleManifest, parse_manifest, verify_files

SLOTS = ("a", "b")
CURRENT = "current"
STATE = "state.json"
BUNDLE_JSON = ".bundle.json"
BUNDLE_SIG = ".bundle.sig"


@dataclass
class ModelState:
    floor: int = 0
    trial_slot: str | None = None
    trial_starts: int = 0
    failed: list[str] = field(default_factory=list)


def other(slot: str) -> str:
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


def read_state(mdir: Path) -> ModelState:
    path = mdir / STATE
    if not path.exists():
        return ModelState()
    try:
        data = json.loads(path.read_bytes()[:65536])
        trial = data["trial"]
        state = ModelState(int(data["floor"]), None, 0, [s for s in data["failed"] if s in SLOTS])
        if trial is not None:
            if trial["slot"] not in SLOTS:
                raise ValueError(f"trial slot {trial['slot']!r}")
            state.trial_slot, state.trial_starts = trial["slot"], int(trial["starts"])
    except (ValueError, TypeError, KeyError) as exc:
        raise FirmwareAppError(f"{path}: unreadable ({exc}); updates of this model are refused") from None
    return state


def write_state(mdir: Path, state: ModelState) -> None:
    trial = None if state.trial_slot is None else {"slot": state.trial_slot, "starts": state.trial_starts}
    data = {"floor": state.floor, "trial": trial, "failed": sorted(set(state.failed))}
    write_atomic(mdir / STATE, json.dumps(data).encode() + b"\n")


def active_slot(mdir: Path) -> str | None:
    """The slot ``current`` points at, or None (nothing installed, or a folder not managed by updates)."""
    try:
        target = os.readlink(mdir / CURRENT)
    except OSError:
        return None
    return target if target in SLOTS else None


def slot_manifest(mdir: Path, slot: str | None) -> BundleManifest | None:
    """The signed manifest a slot was installed from; None when the slot is absent or unreadable."""
    if slot is None:
        return None
    try:
        raw = (mdir / slot / BUNDLE_JSON).read_bytes()
        return parse_manifest(raw) if len(raw) <= MAX_MANIFEST_BYTES else None
    except (OSError, BundleRejected):
        return None


def slot_problems(mdir: Path, slot: str) -> list[str]:
    """What is wrong with an installed slot's files ([] when each matches its signed size and hash)."""
    manifest = slot_manifest(mdir, slot)
    if manifest is None:
        return [f"{mdir / slot}: missing or without a readable {BUNDLE_JSON}"]
    return verify_files(mdir / slot, manifest, ignore=(BUNDLE_JSON, BUNDLE_SIG))


def sequence_floor(mdir: Path, state: ModelState | None = None) -> int:
    state = state if state is not None else read_state(mdir)
    active = slot_manifest(mdir, active_slot(mdir))
    return max(state.floor, active.sequence if active else 0)


@dataclass(frozen=True)
class InstalledModel:
    id: str
    active_slot: str | None
    version: str | None
    sequence: int | None
    previous_slot: str | None
    previous_version: str | None
    sequence_floor: int
    on_trial: bool  # installed, not yet confirmed by a healthy run of the daemon

    def line(self) -> str:
        prev = (
            f"previous {self.previous_version} (slot {self.previous_slot})"
            if self.previous_slot
            else "no previous"
        )
        trial = ", on trial" if self.on_trial else ""
        return (
            f"{self.id:<20} {self.version or '-':<10} slot {self.active_slot or '-'}  sequence {self.sequence} "
            f"(floor {self.sequence_floor}){trial}; {prev}"
        )


def installed_models(data_dir: str | Path) -> list[InstalledModel]:
    """Every model installed by an update, with its slots, versions and sequence floor."""
    root = Path(data_dir) / "models"
    found = []
    for mdir in sorted(root.iterdir()) if root.is_dir() else []:
        if not mdir.is_dir() or mdir.is_symlink():
            continue
        try:
            state = read_state(mdir)
        except FirmwareAppError:
            state = ModelState()
        cur = active_slot(mdir)
        active = slot_manifest(mdir, cur)
        prev_slot = other(cur) if cur else None
        prev = slot_manifest(mdir, prev_slot)
        found.append(
            InstalledModel(
                id=mdir.name,
                active_slot=cur,
                version=active.version if active else None,
                sequence=active.sequence if active else None,
                previous_slot=prev_slot if prev else None,
                previous_version=prev.version if prev else None,
                sequence_floor=max(state.floor, active.sequence if active else 0),
                on_trial=cur is not None and state.trial_slot == cur,
            )
        )
    return found
