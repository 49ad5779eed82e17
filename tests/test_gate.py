"""The input gate: flags what its model was not trained on, from the first frame, and lets its own kind pass."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from gate_inputs import made_frames, real_frames

from firmware_app.errors import BadModel
from firmware_app.gate import FrozenDetector, GateVerdict, InputGate
from firmware_app.gate.build import auroc, choose_threshold, replace_table
from firmware_app.gate.descriptor import N_FEATURES, describe, working_image
from firmware_app.models.manifest import load_manifest
from firmware_app.sources.lung_phantom import LungPhantom
from firmware_app.sources.phantom import UltrasoundPhantom, XrayPhantom

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models_tflite"
# the phantom each bundled model was trained on (tools/train_*.py) and the kind of scan it takes
BUNDLED = {
    "us-fluid-seg": (UltrasoundPhantom, "ultrasound"),
    "us-bline-cls": (LungPhantom, "ultrasound"),
    "xr-nodule-det": (XrayPhantom, "xray"),
}
# 300 frames of 300 unseen seeds, never used to build a gate: one frame a seed, so that the 300 are
# independent (the frames of one seed share its geometry and gain: an unusual seed flags all its frames)
UNSEEN_SEEDS = range(900_001, 900_301)


def bundled_gate(model_id: str) -> InputGate:
    gate = InputGate.from_manifest(load_manifest(MODELS / model_id))
    assert gate is not None, f"{model_id} has no [gate]"
    return gate


def first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("model_id", sorted(BUNDLED))
def test_unseen_phantom_seeds_pass_the_gate(model_id):
    cls, _ = BUNDLED[model_id]
    gate = bundled_gate(model_id)
    verdicts = []
    for seed in UNSEEN_SEEDS:
        verdicts.append(gate.check(first(cls(640, 480, seed=seed).render((37 * seed) % 1000))))
    assert len(verdicts) == 300
    flagged = [v for v in verdicts if v.flagged]
    assert len(flagged) <= 3, f"{len(flagged)} of 300 unseen-seed frames flagged: {flagged[:5]}"


@pytest.fixture(scope="module")
def real():
    return real_frames()


@pytest.mark.parametrize("model_id", sorted(BUNDLED))
def test_real_scans_and_non_scans_are_flagged_on_their_first_frame(model_id, real):
    _, kind = BUNDLED[model_id]
    gate = bundled_gate(model_id)
    inputs = {**real, **made_frames(kind)}
    assert len(inputs) >= 12 + 5
    verdicts = {name: gate.check(px) for name, px in inputs.items()}
    missed = sorted(name for name, v in verdicts.items() if not v.flagged)
    assert len(missed) <= 0.05 * len(inputs), f"{model_id} lets through {missed}"
    for name in ("blank_black", "blank_grey", "blank_white_bgr"):
        assert verdicts[name].reason == "blank frame"
    assert verdicts["screenshot"].reason == "unlike training data"


def test_verdict_fields_and_reason_only_when_flagged():
    gate = bundled_gate("us-fluid-seg")
    ok = gate.check(UltrasoundPhantom(640, 480, seed=900_100).render(5)[0])
    assert isinstance(ok, GateVerdict) and not ok.flagged and ok.reason is None
    assert 0 <= ok.score <= ok.threshold == gate.threshold
    bad = gate.check(made_frames("ultrasound")["smpte_bars"])
    assert bad.flagged and bad.reason == "unlike training data" and bad.score > bad.threshold


def test_check_takes_odd_shapes_and_types():
    gate = bundled_gate("us-bline-cls")
    frame = LungPhantom(640, 480, seed=900_200).render(1)[0]
    same = gate.check(frame).score
    assert gate.check(frame[:, :, None]).score == pytest.approx(same)
    bgr = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    assert gate.check(bgr).score == pytest.approx(same, rel=1e-6)
    assert gate.check(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)).score == pytest.approx(same, rel=1e-6)
    assert gate.check(frame.astype(np.uint16)).score == pytest.approx(same)
    for tiny in (np.zeros((2, 3), np.uint8), np.full((1, 1, 3), 200, np.uint8)):
        assert gate.check(tiny).reason == "blank frame"
    big = cv2.resize(frame, (2560, 1920), interpolation=cv2.INTER_LINEAR)
    assert np.isfinite(gate.check(big).score)


def test_descriptor_of_the_working_image_is_the_descriptor_of_the_frame():
    frame = XrayPhantom(640, 480, seed=900_300).render(2)[0]
    feats, _ = describe(frame)
    assert feats.shape == (N_FEATURES,)
    np.testing.assert_array_equal(describe(working_image(frame))[0], feats)


def test_colour_counts_for_a_gray_model():
    gate = bundled_gate("us-fluid-seg")
    frame = cv2.cvtColor(UltrasoundPhantom(640, 480, seed=900_400).render(7)[0], cv2.COLOR_GRAY2BGR)
    assert not gate.check(frame).flagged
    tinted = frame.copy()
    tinted[150:300, 250:400, 2] = 255  # a colour Doppler box
    assert gate.check(tinted).flagged


# ---------------------------------------------------------------- operating point
def test_threshold_bounds_the_flag_rate_with_confidence():
    rng = np.random.default_rng(0)
    s = rng.gamma(4.0, 0.25, 800)
    thr = choose_threshold(s, 0.01)
    k = int((s > thr).sum())
    assert 1 <= k <= 8  # the upper confidence bound of the 99 % quantile flags fewer than 1 %
    plain = choose_threshold(s, 0.01, confidence=0.0)
    assert int((s > plain).sum()) == 8 and plain < thr
    assert choose_threshold(s, 0.05) < thr
    assert choose_threshold(s, 0.01) == thr  # deterministic


def test_auroc():
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([0.0, 2.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5


# ---------------------------------------------------------------- manifest and files
def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.onnx", "model_float.tflite"))
    return dest


def test_replace_table_keeps_every_other_byte():
    text = 'id = "x"\n\n[a]\nk = 1  # note\n\n[gate]\nold = 1\n\n[b]\nz = 2\n'
    new = replace_table(text, "gate", "[gate]\nfile = 'g'\n")
    assert new == "id = \"x\"\n\n[a]\nk = 1  # note\n\n[gate]\nfile = 'g'\n\n[b]\nz = 2\n"
    assert replace_table('id = "x"\n', "gate", "[gate]\n") == 'id = "x"\n\n[gate]\n'
    assert replace_table(new, "gate", "[gate]\nfile = 'g'\n") == new


def test_a_manifest_without_gate_has_no_gate(tmp_path):
    folder = copy_model(MODELS / "us-fluid-seg", tmp_path / "m")
    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(text.split("\n[gate]")[0] + "\n")
    m = load_manifest(folder)
    assert m.gate is None and InputGate.from_manifest(m) is None


@pytest.mark.parametrize(
    "change, needle",
    [
        (("\nthreshold = ", "\nbogus = 1\nthreshold = "), "unknown key [gate] 'bogus'"),
        (('file = "gate.npz"', 'file = "missing.npz"'), "missing.npz"),
        (('file = "gate.npz"', 'file = "../gate.npz"'), "plain file name"),
        (('method = "descriptor-mahalanobis-v1"', 'method = "magic"'), "method 'magic'"),
        (("target_flag_rate = 0.01", "target_flag_rate = 1.5"), "target_flag_rate"),
        (("\nthreshold = ", "\nthreshold = -1.0\n#"), "threshold"),
        (('file = "gate.npz"\n', ""), "missing required key [gate] file"),
    ],
)
def test_a_bad_gate_table_is_refused_in_one_line(tmp_path, change, needle):
    folder = copy_model(MODELS / "us-fluid-seg", tmp_path / "m")
    path = folder / "manifest.toml"
    text = path.read_text()
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(BadModel) as err:
        load_manifest(folder)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and str(path) in msg


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:100]),
        lambda p: p.write_bytes(b"not a zip"),
        lambda p: np.savez(p, mean=np.zeros(3)),
    ],
)
def test_a_broken_gate_file_is_a_bad_model_naming_it(tmp_path, damage):
    folder = copy_model(MODELS / "us-fluid-seg", tmp_path / "m")
    damage(folder / "gate.npz")
    with pytest.raises(BadModel, match="gate.npz"):
        InputGate.from_manifest(load_manifest(folder))


# ---------------------------------------------------------------- self-test
def test_selftest_checks_the_gate_against_the_golden_scores(tmp_path):
    from firmware_app.config import load_board
    from firmware_app.models.store import find_model
    from firmware_app.update.selftest import selftest_model

    board = load_board("x86-dev")
    folder = copy_model(MODELS / "us-fluid-seg", tmp_path / "m")
    assert selftest_model(find_model(str(folder)), board).ok

    (folder / "gate.npz").write_bytes(b"PK\x03\x04 corrupted")
    r = selftest_model(find_model(str(folder)), board)
    assert not r.ok and "gate.npz" in r.problem

    with np.load(MODELS / "us-fluid-seg" / "gate.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["mean"] = arrays["mean"] + 0.01 * arrays["scale"]  # a valid file with other numbers
    np.savez_compressed(folder / "gate.npz", **arrays)
    r = selftest_model(find_model(str(folder)), board)
    assert not r.ok and "gate score" in r.problem

    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(text.split("\n[gate]")[0] + "\n")
    assert selftest_model(find_model(str(folder)), board).ok  # no gate: the gate arrays are ignored


def test_a_model_with_a_gate_but_no_golden_gate_score_fails_selftest(tmp_path):
    from firmware_app.config import load_board
    from firmware_app.models.store import find_model
    from firmware_app.update.selftest import selftest_model

    folder = copy_model(MODELS / "xr-nodule-det", tmp_path / "m")
    case = folder / "golden" / "case_001.npz"
    with np.load(case) as npz:
        arrays = {k: npz[k] for k in npz.files if not k.startswith("gate_")}
    np.savez_compressed(case, **arrays)
    r = selftest_model(find_model(str(folder)), load_board("x86-dev"))
    assert not r.ok and "gate_score" in r.problem


# ---------------------------------------------------------------- the tool
def test_make_gate_builds_a_working_gate_from_a_folder(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    from make_gate import main
    from make_phantom_dataset import make_dataset

    ref = make_dataset("classification", 90, 4242, tmp_path / "ref")
    ood = tmp_path / "ood"
    ood.mkdir()
    for name, px in made_frames("ultrasound").items():
        cv2.imwrite(str(ood / f"{name}.png"), px)
    folder = copy_model(MODELS / "us-bline-cls", tmp_path / "m")
    path = folder / "manifest.toml"
    before = path.read_text()
    assert main([str(folder), "--reference", str(ref), "--ood", str(ood)]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "AUROC" in out
    after = path.read_text()
    assert after.split("\n[gate]")[0] == before.split("\n[gate]")[0]  # the rest of the manifest unchanged
    m = load_manifest(folder)
    assert m.gate["reference_frames"] == 60 and m.gate["validation_frames"] == 30  # every 3rd held out
    assert m.gate["ood_auroc"] > 0.9
    gate = InputGate.from_manifest(m)
    assert gate.check(made_frames("ultrasound")["screenshot"]).flagged
    from firmware_app.config import load_board
    from firmware_app.models.store import find_model
    from firmware_app.update.selftest import selftest_model

    assert selftest_model(find_model(str(folder)), load_board("x86-dev")).ok


# ---------------------------------------------------------------- frozen stream
def test_frozen_detector():
    det = FrozenDetector(seconds=2.0)
    ph = UltrasoundPhantom(640, 480, seed=900_500)
    step = 33_000_000
    assert not any(det.update(ph.render(t)[0], t * step) for t in range(120))  # live: 4 s, never frozen
    still = ph.render(7)[0]
    rng = np.random.default_rng(1)
    t0 = 200 * step
    states = []
    for i in range(90):  # the same picture with a level of capture noise, 3 s
        noisy = np.clip(still.astype(np.int16) + rng.integers(-1, 2, still.shape), 0, 255).astype(np.uint8)
        states.append(det.update(noisy, t0 + i * step))
    first_frozen = states.index(True)
    assert 60 <= first_frozen <= 62 and all(states[first_frozen:])
    assert not det.update(ph.render(500)[0], t0 + 90 * step)  # a new picture: live again


# ---------------------------------------------------------------- validate
def test_validate_reports_the_gate(tmp_path, capsys):
    import json

    sys.path.insert(0, str(REPO / "tools"))
    from make_phantom_dataset import make_dataset

    from firmware_app.cli import main

    ds = make_dataset("segmentation", 12, 4343, tmp_path / "ds")
    ood = tmp_path / "ood"
    ood.mkdir()
    for name, px in list(made_frames("ultrasound").items())[:6]:
        cv2.imwrite(str(ood / f"{name}.png"), px)
    argv = ["validate", "--model", "us-fluid-seg", "--dataset", str(ds), "--ood", str(ood), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    g = out["gate"]
    assert g["n"] == 12 and g["flag_rate"]["value"] <= 1 / 12 and len(g["flag_rate"]["ci95"]) == 2
    assert g["threshold"] == load_manifest(MODELS / "us-fluid-seg").gate["threshold"]
    assert g["ood_n"] == 6 and g["ood_flag_rate"]["value"] == 1.0 and g["auroc"] == 1.0
    assert {"dice", "sensitivity", "n", "model"} <= set(out)  # the other keys are still there
    assert main(argv[:-3] + ["--json"]) == 0
    assert "ood_n" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gate"]
    assert main(argv[:-2] + [str(tmp_path / "nope"), "--json"]) == 2
