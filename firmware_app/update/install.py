"""Install a signed bundle: copy it into private storage, verify the copy, self-test, switch slots atomically.

Steps of ``install_bundle`` (each one in the audit log), all under ``<data-dir>/staging/.lock``:

1. copy the file (from the stick, or from staging/) into ``staging/.work/`` (mode 0700): a regular file, no
   link, at most MAX_BUNDLE_BYTES, and it must not change while being copied;
2. on the copy: signature by a trusted key, the manifest, the board and backends, the sequence (below the
   floor: rejected; equal: nothing to do), free space;
3. extract the payload into ``staging/.work/slot/``, checking every size and SHA-256; fsync it;
4. load the model from there and reproduce its golden vectors on the board's backend;
5. the source file must still be the one that was copied (else the stick changed under us: rejected);
6. raise the floor to the active slot's sequence and mark the target slot on trial (state.json), move the
   verified folder into the inactive slot (rename, fsync), then switch ``current`` (symlink, rename, fsync),
   then record the new floor.

A kill or power cut anywhere leaves ``current`` on the old or the new complete slot; leftovers in
staging/.work are removed by the next install or boot check. Nothing below models/ or keys/ changes before
step 6, so a rejected or failed bundle changes nothing there.

``boot_check`` runs at every daemon start: a slot on trial is self-tested again, and rolled back when it fails
or when the daemon has started MAX_TRIAL_STARTS times without calling ``mark_good``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from firmware_app.audit import AuditLog
from firmware_app.backends.chain import BackendChain
from firmware_app.config import BoardConfig
from firmware_app.durable import Busy, fsync_dir, fsync_tree, locked, remove_tree, replace_symlink
from firmware_app.errors import BadInput, BadModel, BundleRejected, FirmwareAppError
from firmware_app.models.store import find_model
from firmware_app.update.bundle import MAX_BUNDLE_BYTES, MODEL_ID, BundleManifest, BundleReader
from firmware_app.update.selftest import selftest_model
from firmware_app.update.slots import (
    BUNDLE_JSON,
    BUNDLE_SIG,
    CURRENT,
    SLOTS,
    active_slot,
    other,
    read_state,
    sequence_floor,
    slot_manifest,
    slot_problems,
    write_state,
)
from firmware_app.update.trust import TrustStore

log = logging.getLogger(__name__)

MAX_TRIAL_STARTS = 3
SPACE_RESERVE = 4 * 1024 * 1024  # never fill the data dir to the last byte: the audit log needs room


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def work(self) -> Path:
        return self.staging / ".work"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def lock(self) -> Path:
        return self.staging / ".lock"

    def ensure(self) -> None:
        self.models.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.staging.mkdir(mode=0o700, exist_ok=True)
        self.work.mkdir(mode=0o700, exist_ok=True)

    def clean_work(self) -> None:
        for path in self.work.iterdir() if self.work.is_dir() else []:
            remove_tree(path)


@dataclass(frozen=True)
class Outcome:
    """What happened to one bundle: ``message`` for the screen, ``line()`` for the command line."""

    file: str
    status: str  # installed | unchanged | dry-run | keys-updated | rejected | failed | busy
    message: str
    exit_code: int
    model_id: str | None = None
    version: str | None = None

    def line(self, shown_path: str | None = None) -> str:
        where = shown_path or self.file
        if self.status == "rejected":
            return f"Rejected: {where}: {self.message.removeprefix('Rejected: ')}"
        return f"{self.message} ({where})"


def _note(audit: AuditLog, event: str, **fields) -> None:
    """An audit line that must not turn a finished outcome into a crash (e.g. the disk is full)."""
    try:
        audit.append(event, **fields)
    except OSError as exc:
        log.warning("audit log: cannot record %s: %s", event, exc)


def _os_reason(exc: OSError, root: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left in {root}; the installed model is unchanged"
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}; the installed model is unchanged"


def install_bundle(
    src: str | Path,
    data_dir: str | Path,
    board: BoardConfig,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
    now: datetime | None = None,
    wait: bool = True,
    chain: BackendChain | None = None,
) -> Outcome:
    """Verify and install one .fwb; never raises for a bad bundle or a run-time failure (see Outcome).

    The self-test runs on ``chain`` (default: the board's backend chain with the engine cache in
    ``<data_dir>/engines``), restricted to the bundle's compatible backends: the backend that will serve."""
    src = Path(src)
    lay = Layout(Path(data_dir))
    audit = AuditLog(data_dir)
    say = progress or (lambda _msg: None)
    now = now or datetime.now(timezone.utc)
    try:
        lay.ensure()
        with locked(lay.lock, wait=wait):
            lay.clean_work()
            try:
                chain = chain or BackendChain.from_board(
                    board, engine_cache=str(lay.root / "engines"), data_dir=str(lay.root)
                )
                return _install(src, lay, board, dry_run, say, now, audit, chain)
            finally:
                lay.clean_work()
    except Busy as exc:
        return Outcome(src.name, "busy", f"Update waiting: {exc}", 1)
    except BundleRejected as exc:
        _note(audit, "update_rejected", file=src.name, reason=str(exc))
        return Outcome(src.name, "rejected", f"Rejected: {exc}", 2)
    except FirmwareAppError as exc:
        _note(audit, "update_failed", file=src.name, reason=str(exc))
        return Outcome(src.name, "failed", f"Update failed: {exc}", exc.exit_code)
    except OSError as exc:
        reason = _os_reason(exc, lay.root)
        _note(audit, "update_failed", file=src.name, reason=reason)
        return Outcome(src.name, "failed", f"Update failed: {reason}", 1)


def _install(
    src: Path,
    lay: Layout,
    board: BoardConfig,
    dry_run: bool,
    say,
    now: datetime,
    audit: AuditLog,
    chain: BackendChain,
) -> Outcome:
    name = src.name
    say(f"Copying {name}")
    copy, before, digest = _copy_in(src, lay)
    audit.append("update_copied", file=name, size=before.st_size, bundle_sha256=digest, dry_run=dry_run)
    trust = TrustStore.load(lay.keys)
    with open(copy, "rb") as fh:
        reader = BundleReader(fh)
        manifest, signer = reader.read_signed(trust, now)
        audit.append(
            "update_signature_ok",
            file=name,
            bundle_id=manifest.bundle_id,
            kind=manifest.kind,
            sequence=manifest.sequence,
            key_id=signer.key_id,
        )
        if manifest.kind == "keys":
            reader.check_end()
            _check_source(src, before)
            return _apply_keys(name, trust, manifest, dry_run, now, audit)
        _check_compatible(manifest, board)
        mdir = lay.models / manifest.model_id
        floor = sequence_floor(mdir)
        if manifest.sequence < floor:
            raise BundleRejected(
                f"sequence {manifest.sequence} is below the installed floor {floor} of {manifest.model_id} "
                f"(an older release)"
            )
        if manifest.sequence == floor:
            audit.append("update_unchanged", file=name, model_id=manifest.model_id, sequence=floor)
            return Outcome(
                name,
                "unchanged",
                _unchanged_message(mdir, manifest, floor),
                0,
                manifest.model_id,
                manifest.version,
            )
        _check_space(lay, manifest.payload_bytes + 2 * len(manifest.raw))
        say(f"Verifying {manifest.describe()}")
        stage = lay.work / "slot"
        stage.mkdir(mode=0o755)
        reader.extract(manifest, stage)
        signature = reader.signature
    (stage / BUNDLE_JSON).write_bytes(manifest.raw)
    (stage / BUNDLE_SIG).write_bytes(signature)
    fsync_tree(stage)
    audit.append("update_payload_ok", file=name, model_id=manifest.model_id, files=len(manifest.files))
    say(f"Self-test {manifest.describe()}")
    try:
        ref = find_model(str(stage))
    except BadModel as exc:
        raise BundleRejected(f"the model in the bundle is not usable ({exc})") from None
    if (ref.manifest.id, ref.manifest.version) != (manifest.model_id, manifest.version):
        raise BundleRejected(
            f"manifest.toml says {ref.manifest.id} {ref.manifest.version}, the bundle {manifest.describe()}"
        )
    result = selftest_model(ref, board, manifest.backends, origin="new", chain=chain)
    audit.append(
        "update_selftest",
        file=name,
        model_id=manifest.model_id,
        version=manifest.version,
        backend=result.backend,
        cases=result.cases,
        ok=result.ok,
        problem=result.problem,
    )
    if not result.ok:
        raise BundleRejected(f"the model fails its golden vectors on {result.backend}: {result.problem}")
    _check_source(src, before)
    if dry_run:
        audit.append("update_dry_run", file=name, model_id=manifest.model_id, version=manifest.version)
        return Outcome(
            name,
            "dry-run",
            f"Model {manifest.describe()} verified and self-tested; not installed (dry run)",
            0,
            manifest.model_id,
            manifest.version,
        )
    say(f"Installing {manifest.describe()}")
    previous = _commit(lay, mdir, stage, manifest, name, audit)
    kept = f"; {previous} kept for rollback" if previous else ""
    return Outcome(
        name,
        "installed",
        f"Model {manifest.describe()} installed{kept}",
        0,
        manifest.model_id,
        manifest.version,
    )


def _unchanged_message(mdir: Path, manifest: BundleManifest, floor: int) -> str:
    """A bundle at the floor: already running, or at the floor because it was rolled back from (or a
    failed install was undone); say which version runs and how to get the bundle's version back."""
    cur = active_slot(mdir)
    active = slot_manifest(mdir, cur)
    if active is not None and (active.version, active.sequence) == (manifest.version, manifest.sequence):
        return f"Model {manifest.describe()} is already installed (sequence {floor}); nothing to do"
    previous = slot_manifest(mdir, other(cur)) if cur else None
    if previous is not None and (previous.version, previous.sequence) == (manifest.version, floor):
        how = f"`firmware-app models rollback {manifest.model_id}` switches back to it"
    else:
        how = f"installing it again needs a bundle with sequence {floor + 1} or more"
    runs = f"{active.version} runs" if active is not None else "no updated version runs"
    return (
        f"Model {manifest.describe()} not installed: its sequence {manifest.sequence} is the floor of "
        f"{manifest.model_id}, where {runs}; {how}"
    )


def _copy_in(src: Path, lay: Layout) -> tuple[Path, os.stat_result, str]:
    """Copy ``src`` into private storage; returns the copy, the source's stat and the copy's SHA-256."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BundleRejected("file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleRejected("is a symbolic link, not a bundle file") from None
        raise BundleRejected(f"cannot be read ({exc.strerror})") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise BundleRejected("not a regular file")
        if before.st_size > MAX_BUNDLE_BYTES:
            raise BundleRejected(f"{before.st_size} bytes, more than the limit of {MAX_BUNDLE_BYTES}")
        _check_space(lay, before.st_size)
        dst = lay.work / "bundle.fwb"
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        digest = hashlib.sha256()
        copied = 0
        try:
            while chunk := os.read(fd, 1 << 20):
                copied += len(chunk)
                if copied > before.st_size:
                    break
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            os.fsync(out)
        finally:
            os.close(out)
        if copied != before.st_size or _changed(before, os.fstat(fd)):
            raise BundleRejected("the file changed while it was being copied; insert the stick again")
    finally:
        os.close(fd)
    return dst, before, digest.hexdigest()


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    keys = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
    return any(getattr(a, k) != getattr(b, k) for k in keys)


def _check_source(src: Path, before: os.stat_result) -> None:
    """The file we copied is still the one there: a stick whose file changes under us is not trusted."""
    try:
        now = os.stat(src, follow_symlinks=False)
    except OSError:
        raise BundleRejected(
            "the file disappeared during the update (stick removed?); nothing installed"
        ) from None
    if _changed(before, now):
        raise BundleRejected("the file on the stick changed after it was copied; nothing installed")


def _check_space(lay: Layout, need: int) -> None:
    free = shutil.disk_usage(lay.staging).free
    if free < need + SPACE_RESERVE:
        raise FirmwareAppError(
            f"not enough space in {lay.root}: {need // 1024} KiB needed, {free // 1024} KiB free; "
            f"the installed model is unchanged"
        )


def _check_compatible(manifest: BundleManifest, board: BoardConfig) -> None:
    if board.name not in manifest.boards:
        raise BundleRejected(f"built for boards {', '.join(manifest.boards)}, this board is {board.name}")
    if BackendChain.from_board(board).restricted(manifest.backends) is None:
        raise BundleRejected(
            f"built for backends {', '.join(manifest.backends)}, board {board.name} uses "
            f"{', '.join(board.backend['order'])}"
        )


def _apply_keys(
    name: str, trust: TrustStore, manifest: BundleManifest, dry_run: bool, now: datetime, audit: AuditLog
) -> Outcome:
    if manifest.sequence < trust.sequence:
        raise BundleRejected(
            f"key statement sequence {manifest.sequence} is below the trust store's {trust.sequence}"
        )
    if manifest.sequence == trust.sequence:
        audit.append("trust_unchanged", file=name, sequence=manifest.sequence)
        return Outcome(
            name, "unchanged", f"Key statement {manifest.sequence} is already applied; nothing to do", 0
        )
    summary = trust.apply_rotation(manifest.sequence, list(manifest.add), list(manifest.revoke), now, dry_run)
    audit.append(
        "trust_dry_run" if dry_run else "trust_updated",
        file=name,
        bundle_id=manifest.bundle_id,
        sequence=manifest.sequence,
        added=[k.key_id for k in manifest.add],
        revoked=list(manifest.revoke),
    )
    if dry_run:
        return Outcome(name, "dry-run", f"Key statement verified ({summary}); not applied (dry run)", 0)
    return Outcome(name, "keys-updated", f"Trusted keys updated: {summary}", 0)


def _commit(
    lay: Layout, mdir: Path, stage: Path, manifest: BundleManifest, name: str, audit: AuditLog
) -> str | None:
    """Move the verified slot into place and switch to it; returns the version kept for rollback."""
    if not mdir.is_dir():
        mdir.mkdir(mode=0o755)
        fsync_dir(lay.models)
    state = read_state(mdir)
    cur = active_slot(mdir)
    current = slot_manifest(mdir, cur)
    target = other(cur) if cur else SLOTS[0]
    # Before the pointer moves: the floor covers the active slot, the target is on trial.
    state.floor = max(state.floor, current.sequence if current else 0)
    state.trial_slot, state.trial_starts = target, 0
    state.failed = [s for s in state.failed if s != target]
    write_state(mdir, state)
    old = mdir / target
    if old.exists() or old.is_symlink():
        os.rename(old, lay.work / "replaced")
        fsync_dir(mdir)
    os.rename(stage, old)
    fsync_dir(mdir)
    audit.append(
        "update_switch",
        file=name,
        model_id=manifest.model_id,
        from_slot=cur,
        from_version=current.version if current else None,
        to_slot=target,
        to_version=manifest.version,
        sequence=manifest.sequence,
    )
    replace_symlink(mdir / CURRENT, target)
    state.floor = max(state.floor, manifest.sequence)
    write_state(mdir, state)
    _note(
        audit,
        "update_installed",
        file=name,
        model_id=manifest.model_id,
        version=manifest.version,
        slot=target,
        sequence=manifest.sequence,
    )
    return current.version if current else None


# ---------------------------------------------------------------------------------------------- rollback


def rollback(data_dir: str | Path, model_id: str, reason: str = "requested by the operator") -> str:
    """Switch ``model_id`` back to its previous slot; returns the message. BadInput when there is none."""
    lay = Layout(Path(data_dir))
    mdir = lay.models / model_id
    if not MODEL_ID.fullmatch(model_id) or active_slot(mdir) is None:
        raise BadInput(f"model {model_id!r} is not installed by an update (looked in {mdir})")
    lay.ensure()
    with locked(lay.lock):
        return _rollback(mdir, AuditLog(data_dir), reason, failed=False)


def _rollback(mdir: Path, audit: AuditLog, reason: str, failed: bool) -> str:
    state = read_state(mdir)
    cur = active_slot(mdir)
    if cur is None:
        raise BadInput(f"model {mdir.name!r} has no active slot")
    prev = other(cur)
    current, previous = slot_manifest(mdir, cur), slot_manifest(mdir, prev)
    if previous is None and failed:
        return _deactivate(mdir, state, cur, audit, reason)
    if previous is None:
        raise BadInput(f"model {mdir.name} has no previous version to roll back to")
    if prev in state.failed:
        raise BadInput(
            f"the previous version {previous.version} of {mdir.name} failed on a start; install a bundle"
        )
    problems = slot_problems(mdir, prev)
    if problems:
        raise FirmwareAppError(f"cannot roll back {mdir.name} to {previous.version}: {problems[0]}")
    state.floor = max(state.floor, current.sequence if current else 0, previous.sequence)
    state.trial_slot, state.trial_starts = None, 0
    if failed:
        state.failed = sorted({*state.failed, cur})
    write_state(mdir, state)
    replace_symlink(mdir / CURRENT, prev)
    from_version = current.version if current else "?"
    audit.append(
        "rollback",
        model_id=mdir.name,
        from_version=from_version,
        to_version=previous.version,
        from_slot=cur,
        to_slot=prev,
        reason=reason,
    )
    return f"Model {mdir.name} rolled back from {from_version} to {previous.version}"


def _deactivate(mdir: Path, state, cur: str, audit: AuditLog, reason: str) -> str:
    """A failed first install: remove the pointer, so that the bundled model (if any) serves again."""
    current = slot_manifest(mdir, cur)
    state.floor = max(state.floor, current.sequence if current else 0)
    state.trial_slot, state.trial_starts = None, 0
    state.failed = sorted({*state.failed, cur})
    write_state(mdir, state)
    (mdir / CURRENT).unlink()
    fsync_dir(mdir)
    audit.append("deactivate", model_id=mdir.name, slot=cur, reason=reason)
    return f"Model {mdir.name} deactivated (no previous version); the bundled model, if any, is used"


# ---------------------------------------------------------------------------------------------- boot check


def boot_check(data_dir: str | Path, board: BoardConfig) -> list[str]:
    """At every daemon start, before the model is opened: count the start of each slot on trial, self-test
    it, and roll back a slot that fails, crash-loops or whose files are damaged. Returns messages for the
    screen (empty when all is well)."""
    lay = Layout(Path(data_dir))
    if not lay.models.is_dir():
        return []
    lay.ensure()
    audit = AuditLog(data_dir)
    messages = []
    with locked(lay.lock):
        lay.clean_work()
        for mdir in sorted(p for p in lay.models.iterdir() if p.is_dir() and not p.is_symlink()):
            try:
                message = _boot_check_model(mdir, board, audit)
            except FirmwareAppError as exc:
                message = f"Model {mdir.name}: {exc}"
            if message:
                log.warning("%s", message)
                messages.append(message)
    return messages


def _boot_check_model(mdir: Path, board: BoardConfig, audit: AuditLog) -> str | None:
    cur = active_slot(mdir)
    if cur is None:
        return None
    state = read_state(mdir)
    signed = slot_manifest(mdir, cur)
    what = f"Model {mdir.name} {signed.version if signed else '?'}"
    on_trial = state.trial_slot == cur
    if state.trial_slot is not None and not on_trial:  # an install that never switched
        state.trial_slot, state.trial_starts = None, 0
        write_state(mdir, state)
    problems = slot_problems(mdir, cur)
    if problems:
        return _auto_rollback(mdir, audit, what, f"has damaged files ({problems[0]})")
    if not on_trial:
        return None
    state.trial_starts += 1
    write_state(mdir, state)
    audit.append("boot_trial", model_id=mdir.name, slot=cur, starts=state.trial_starts)
    if state.trial_starts > MAX_TRIAL_STARTS:
        return _auto_rollback(
            mdir, audit, what, f"did not run successfully in {MAX_TRIAL_STARTS} starts (crash loop)"
        )
    data_dir = mdir.parent.parent
    chain = BackendChain.from_board(board, engine_cache=str(data_dir / "engines"), data_dir=str(data_dir))
    result = selftest_model(find_model(str(mdir / cur)), board, signed.backends, f"installed {cur}", chain)
    audit.append("boot_selftest", model_id=mdir.name, slot=cur, ok=result.ok, problem=result.problem)
    if not result.ok:
        return _auto_rollback(mdir, audit, what, f"failed its self-test after the update ({result.problem})")
    return None


def _auto_rollback(mdir: Path, audit: AuditLog, what: str, reason: str) -> str:
    try:
        done = _rollback(mdir, audit, reason, failed=True)
    except FirmwareAppError as exc:
        return f"{what} {reason}; cannot roll back: {exc}"
    return f"{what} {reason}; {done.removeprefix(f'Model {mdir.name} ')}"


def mark_good(data_dir: str | Path, model_id: str | None = None) -> list[str]:
    """The daemon ran healthily with the active slot: end its trial. Returns the ids confirmed."""
    lay = Layout(Path(data_dir))
    if not lay.models.is_dir():
        return []
    lay.ensure()
    confirmed = []
    with locked(lay.lock):
        for mdir in sorted(p for p in lay.models.iterdir() if p.is_dir() and not p.is_symlink()):
            if model_id is not None and mdir.name != model_id:
                continue
            state = read_state(mdir)
            cur = active_slot(mdir)
            if cur is not None and state.trial_slot == cur:
                state.trial_slot, state.trial_starts = None, 0
                write_state(mdir, state)
                AuditLog(data_dir).append("boot_confirmed", model_id=mdir.name, slot=cur)
                confirmed.append(mdir.name)
    return confirmed


__all__ = ["Layout", "Outcome", "boot_check", "install_bundle", "mark_good", "rollback"]
