"""``firmware-app validate``: metrics with CIs on phantom datasets, broken datasets, the report."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_app import validate as validate_mod
from firmware_app.validate import (
    auc_score,
    bootstrap_weights,
    calibration_bins,
    cmd_validate,
    ece_score,
    expected_calibration_error,
    match_boxes,
    ratio,
)

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load_tool(name: str):
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_dataset = _load_tool("make_phantom_dataset").make_dataset

METRICS = {
    "classification": ("sensitivity", "specificity", "ppv", "auc", "ece"),
    "segmentation": ("dice", "iou", "sensitivity", "specificity", "ppv", "auc", "fp_per_case", "ece"),
    "detection": ("sensitivity", "fp_per_case", "ppv", "specificity", "auc", "iou", "ece"),
}
MODELS = {"classification": "us-bline-cls", "segmentation": "us-fluid-seg", "detection": "xr-nodule-det"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantom-datasets")
    return {t: make_dataset(t, 16, 9090, root / t) for t in METRICS}


def run_json(capsys, model: str, dataset: Path, report: Path | None = None) -> tuple[int, dict | None, str]:
    rc = cmd_validate(model, str(dataset), True, str(report) if report else None, None)
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if cap.out.strip() else None), cap.err


# ---------------------------------------------------------------- statistics
def test_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) + 0.4 * y, 1)  # rounded: ties
    pos, neg = s[y == 1], s[y == 0]
    want = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    got, boot = auc_score(y, s, bootstrap_weights(60, 200))
    assert got == pytest.approx(want)
    assert boot.shape == (200,) and np.nanpercentile(boot, 2.5) < got < np.nanpercentile(boot, 97.5)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident() -> None:
    p = np.repeat(np.linspace(0.05, 0.95, 10), 1000)
    rng = np.random.default_rng(2)
    y = rng.random(p.size) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.full(1000, 0.99), np.arange(1000) % 2) == pytest.approx(0.49)


def test_ratio_bootstrap_ci_brackets_the_value() -> None:
    y = np.r_[np.ones(40), np.zeros(10)]
    value, boot = ratio(y, np.ones(50), bootstrap_weights(50, 500))
    assert value == 0.8 and 0.65 < np.percentile(boot, 2.5) < 0.8 < np.percentile(boot, 97.5) < 0.92


def test_matching_is_greedy_by_score_and_respects_labels() -> None:
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    pred = np.array([[1, 1, 10, 10], [0, 0, 9, 9], [20, 20, 30, 30]], float)
    match, iou = match_boxes(pred, ["n", "n", "x"], truth, ["n", "n"], 0.3)
    assert list(match) == [0, -1, -1]  # the second box duplicates a taken target; the third has another label
    assert iou[0] == pytest.approx(0.81)


# ---------------------------------------------------------------- the command on phantom datasets
@pytest.mark.parametrize("task", list(METRICS))
def test_json_has_the_design_keys_with_confidence_intervals(task, datasets, capsys) -> None:
    rc, out, err = run_json(capsys, MODELS[task], datasets[task])
    assert rc == 0, err
    assert out["model"].startswith(MODELS[task] + "@") and out["n"] == 16 and out["task"] == task
    for key in METRICS[task]:
        m = out[key]
        assert set(m) >= {"value", "ci95"}, key
        if m["value"] is not None and m["ci95"] is not None:
            lo, hi = m["ci95"]
            assert lo <= m["value"] + 1e-9 and m["value"] - 1e-9 <= hi, key
    assert out["problems"] == []
    agree = out["agreement_int8_float"]
    assert agree["cases"] == 16 and agree["value"] >= 0.95
    assert "calibration" in out["curves"]
    if task == "detection":
        froc = out["curves"]["froc"]
        assert len(froc["fp_per_case"]) == len(froc["sensitivity"]) >= 2
        assert set(out["sensitivity_at_fp_per_case"]) == {"0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0"}
    else:
        roc = out["curves"]["roc"]
        assert roc["fpr"][0] == 0.0 and len(roc["fpr"]) == len(roc["tpr"])


def test_text_output_is_readable(datasets, capsys) -> None:
    assert cmd_validate("us-bline-cls", str(datasets["classification"]), False, None, None) == 0
    out = capsys.readouterr().out
    assert "sensitivity" in out and "95 % CI" in out and "int8 vs float agreement (labels)" in out


# ---------------------------------------------------------------- broken datasets
def test_broken_classification_dataset_names_each_problem_and_reports_the_rest(tmp_path, capsys) -> None:
    ds = make_dataset("classification", 10, 77, tmp_path / "cls")
    (ds / "images" / "case_0001.png").write_bytes(b"\x89PNG broken")  # unreadable image
    rows = list(csv.reader((ds / "labels.csv").open()))
    rows[3][1] = "pneumonia"  # case_0002: a label the manifest does not know
    rows = [r for r in rows if r[0] != "case_0003.png"]  # case_0003: no row
    rows.append(["ghost.png", "absent"])  # a row without an image
    with (ds / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    rc, out, err = run_json(capsys, "us-bline-cls", ds)
    assert rc == 0 and out["n"] == 7
    lines = [line for line in err.splitlines() if line.startswith("firmware-app: validate:")]
    assert len(lines) == 4 == len(out["problems"])
    text = "\n".join(lines)
    assert "case_0001.png: unreadable image" in text
    assert "'pneumonia' of case_0002.png is not in the manifest labels" in text
    assert "case_0003.png: no row in labels.csv" in text
    assert "ghost.png not found" in text


def test_broken_segmentation_and_detection_datasets(tmp_path, capsys) -> None:
    seg = make_dataset("segmentation", 4, 78, tmp_path / "seg")
    (seg / "masks" / "case_0000.png").unlink()
    cv2.imwrite(str(seg / "masks" / "case_0001.png"), np.zeros((10, 10), np.uint8))  # wrong size
    rc, out, err = run_json(capsys, "us-fluid-seg", seg)
    assert rc == 0 and out["n"] == 2
    assert "case_0000.png: missing mask" in err and "masks/case_0001.png: mask is 10x10" in err

    det = make_dataset("detection", 4, 79, tmp_path / "det")
    with (det / "boxes.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["case_0000.png", "tumour", 1, 1, 5, 5])
        csv.writer(f).writerow(["case_0001.png", "nodule", 9, 9, 3, 3])
    rc, out, err = run_json(capsys, "xr-nodule-det", det)
    assert rc == 0 and out["n"] == 2
    assert "'tumour' of case_0000.png" in err and "box of case_0001.png needs x1 > x0" in err


def test_nothing_usable_exits_2_with_one_line_per_problem(tmp_path, capsys) -> None:
    ds = make_dataset("classification", 2, 80, tmp_path / "bad")
    for p in (ds / "images").iterdir():
        p.write_bytes(b"junk")
    rc, out, err = run_json(capsys, "us-bline-cls", ds)
    assert rc == 2 and out is None
    assert err.count("unreadable image") == 2 and "no usable case" in err.splitlines()[-1]
    (ds / "labels.csv").unlink()
    rc, _, err = run_json(capsys, "us-bline-cls", ds)
    assert rc == 2 and "labels.csv: not found" in err


# ---------------------------------------------------------------- report
def test_report_writes_html_plots_and_case_table(datasets, tmp_path, capsys) -> None:
    rep = tmp_path / "report"
    rc, out, _ = run_json(capsys, "xr-nodule-det", datasets["detection"], rep)
    assert rc == 0
    html = (rep / "report.html").read_text()
    assert "NOT FOR DIAGNOSTIC USE" in html and "Silent drift check" in html
    for png in ("froc.png", "roc.png", "calibration.png"):
        img = cv2.imread(str(rep / png))
        assert img is not None and img.shape[0] > 200 and img.std() > 10, png
        assert png in html
    cases = list(csv.DictReader((rep / "cases.csv").open()))
    assert len(cases) == out["n"] and {"file", "reference", "model", "score", "outcome"} <= set(cases[0])
    thumbs = list((rep / "cases").glob("*.jpg"))
    assert len(thumbs) == out["n"] and all(t.name in html for t in thumbs)
    assert json.loads((rep / "summary.json").read_text())["n"] == out["n"]


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_images_go_through_the_same_path_as_png(tmp_path, capsys) -> None:
    ds = make_dataset("classification", 6, 81, tmp_path / "dcm")
    png = ds / "images" / "case_0000.png"
    _write_dicom(ds / "images" / "case_0000.dcm", cv2.imread(str(png), cv2.IMREAD_GRAYSCALE))
    with (ds / "labels.csv").open("a", newline="") as f:
        label = next(r[1] for r in csv.reader((ds / "labels.csv").open()) if r[0] == "case_0000.png")
        csv.writer(f).writerow(["case_0000.dcm", label])
    rep = tmp_path / "rep"
    rc, out, err = run_json(capsys, "us-bline-cls", ds, rep)
    assert rc == 0 and out["n"] == 7 and out["problems"] == [], err
    rows = {r["file"]: r for r in csv.DictReader((rep / "cases.csv").open())}
    assert rows["case_0000.dcm"]["score"] == rows["case_0000.png"]["score"]


def _full_weights(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """What bootstrap_weights drew before it was chunked: one (resamples, n) multinomial draw."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def test_chunked_bootstrap_gives_exactly_the_figures_of_the_full_matrix(monkeypatch):
    monkeypatch.setattr(validate_mod, "BOOTSTRAP_CHUNK_CELLS", 997)  # many blocks of a few resamples
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.3).astype(np.float64)
    s = np.round(rng.random(n) * 0.5 + 0.4 * y, 2)  # ties
    w = bootstrap_weights(n, 250)
    full = _full_weights(n, 250)
    assert np.array_equal(np.asarray(w), full)
    for fn, args in ((ratio, (y, np.ones(n))), (auc_score, (y, s))):
        v_chunked, b_chunked = fn(*args, w)
        v_full, b_full = fn(*args, full)
        assert v_chunked == v_full and np.array_equal(b_chunked, b_full, equal_nan=True)
    bins = np.stack([calibration_bins([si], [yi]) for si, yi in zip(s, y)])
    # sums of non-integer probabilities: a block's matrix product may add in another order (last bits)
    np.testing.assert_allclose(ece_score(bins, w)[1], ece_score(bins, full)[1], rtol=1e-12, atol=0)


def test_bootstrap_at_12000_cases_stays_under_200_mb():
    rng = np.random.default_rng(0)
    n = 12000
    y = (rng.random(n) < 0.2).astype(np.float64)
    s = rng.random(n) * 0.6 + 0.4 * y  # every score distinct: 12000 score groups
    p = (s >= 0.5).astype(np.float64)
    bins = np.stack([calibration_bins([si], [yi]) for si, yi in zip(s, y)])
    tracemalloc.start()
    try:
        w = bootstrap_weights(n)
        _, sens = ratio(p * y, y, w)
        auc, auc_boot = auc_score(y, s, w)
        _, ece_boot = ece_score(bins, w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sens) == len(auc_boot) == len(ece_boot) == 1000
    assert np.isfinite(auc_boot).all() and 0.5 < auc < 1.0
    assert peak < 200 * 2**20, f"bootstrap peaked at {peak / 2**20:.0f} MB"
