"""SIGKILL at any point of an install leaves exactly the old or exactly the new model working, never a mix.

Children are forked from the test process (start method "fork": no interpreter start, no imports), so that
a hundred installs cost milliseconds each to start. After each kill the store is checked from outside: the active slot's files match
its signed list, the model the daemon would load is that slot, its golden vectors pass, the floor holds and
the audit chain is intact.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time

import pytest
from update_kit import MODEL_ID, install_in_child, make_kit

from firmware_app.audit import verify_log
from firmware_app.models.store import find_model
from firmware_app.update.install import boot_check
from firmware_app.update.selftest import selftest_model
from firmware_app.update.slots import active_slot, read_state, sequence_floor, slot_manifest, slot_problems


@pytest.fixture(scope="module")
def ctx():
    return multiprocessing.get_context("fork")


def check_one_model_works(data_dir, board) -> str:
    mdir = data_dir / "models" / MODEL_ID
    slot = active_slot(mdir)
    assert slot in ("a", "b")
    assert slot_problems(mdir, slot) == []
    signed = slot_manifest(mdir, slot)
    ref = find_model(MODEL_ID, data_dir)
    assert (ref.origin, ref.folder.name, ref.manifest.version) == ("installed", slot, signed.version)
    assert selftest_model(ref, board).ok
    read_state(mdir)
    assert sequence_floor(mdir) >= signed.sequence
    assert verify_log(data_dir) == []
    return signed.version


@pytest.fixture
def setup(tmp_path, monkeypatch):
    kit = make_kit(tmp_path, monkeypatch)
    assert kit.install(kit.bundle("1.0.0", 1)).status == "installed"
    template = tmp_path / "template"
    shutil.copytree(kit.data, template, symlinks=True)
    return kit, template, kit.bundle("2.0.0", 2)


def fresh(kit, template):
    shutil.rmtree(kit.data)
    shutil.copytree(template, kit.data, symlinks=True)


def run_child(ctx, *args, delay=None):
    child = ctx.Process(target=install_in_child, args=args)
    child.start()
    if delay is not None:
        time.sleep(delay)
        child.kill()  # SIGKILL; a no-op when it has already finished
    child.join(30)
    assert child.exitcode is not None, "install hung"
    return child.exitcode


def test_sigkill_at_every_rename_of_an_install(ctx, setup, monkeypatch):
    kit, template, bundle = setup
    renames = [0]
    real_replace, real_rename = os.replace, os.rename
    monkeypatch.setattr(
        os, "replace", lambda *a, **k: (renames.__setitem__(0, renames[0] + 1), real_replace(*a, **k))[1]
    )
    monkeypatch.setattr(
        os, "rename", lambda *a, **k: (renames.__setitem__(0, renames[0] + 1), real_rename(*a, **k))[1]
    )
    fresh(kit, template)
    assert kit.install(bundle).status == "installed"
    monkeypatch.undo()
    assert renames[0] >= 8
    seen = set()
    for k in range(1, renames[0] + 1):
        for when in ("before", "after"):
            fresh(kit, template)
            code = run_child(ctx, bundle, kit.data, k, when)
            assert code == -signal.SIGKILL
            seen.add(check_one_model_works(kit.data, kit.board))
            boot_check(kit.data, kit.board)  # the next start cleans up and keeps a working model
            assert check_one_model_works(kit.data, kit.board) in ("1.0.0", "2.0.0")
    assert seen == {"1.0.0", "2.0.0"}


def test_sigkill_at_random_moments_100_times(ctx, setup):
    kit, template, bundle = setup
    fresh(kit, template)
    start = time.monotonic()
    assert run_child(ctx, bundle, kit.data) == 0
    span = (time.monotonic() - start) * 1.2
    assert check_one_model_works(kit.data, kit.board) == "2.0.0"
    rng = random.Random(4)
    seen = {"1.0.0": 0, "2.0.0": 0}
    for i in range(100):
        fresh(kit, template)
        run_child(ctx, bundle, kit.data, delay=rng.uniform(0.0, span))
        seen[check_one_model_works(kit.data, kit.board)] += 1
        if i % 10 == 0:  # and the stick inserted again finishes the job
            assert kit.install(bundle).status in ("installed", "unchanged")
            assert check_one_model_works(kit.data, kit.board) == "2.0.0"
    assert seen["1.0.0"] and seen["2.0.0"], seen
