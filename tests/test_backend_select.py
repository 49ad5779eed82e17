"""``firmware-app backends`` and ``order = ["auto"]``: the fastest backend that passes its golden vectors,
decided once per model hash + runtime versions, cached in <data-dir>/backends.json, announced."""

from __future__ import annotations

import json

import pytest

from firmware_app.backends import select
from firmware_app.backends.chain import BackendChain
from firmware_app.cli import main
from firmware_app.config import parse_board
from firmware_app.models.store import find_model


def test_backends_command_measures_every_declared_backend(capsys, tmp_path):
    code = main(
        ["backends", "--model", "us-fluid-seg", "--invokes", "5", "--json", "--data-dir", str(tmp_path)]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["model"] == "us-fluid-seg" and out["invokes"] == 5
    rows = {r["key"]: r for r in out["backends"]}
    assert {"cpu", "edgetpu", "tensorrt"} <= set(rows)
    assert (
        rows["cpu"]["golden"] == "pass"
        and rows["cpu"]["p50_ms"] > 0
        and rows["cpu"]["p99_ms"] >= rows["cpu"]["p50_ms"]
    )
    assert not rows["edgetpu"]["available"] and "model_edgetpu.tflite" in rows["edgetpu"]["detail"]
    assert out["auto"] in {k for k, r in rows.items() if r["golden"] == "pass"}


def test_backends_table(capsys, tmp_path):
    assert main(["backends", "--model", "us-fluid-seg", "--invokes", "3", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:4] == ["key", "backend", "p50", "ms"]
    assert any(ln.startswith("cpu ") and " pass " in ln and "max <= 2 steps" in ln for ln in out.splitlines())
    assert 'order = ["auto"] picks: ' in out


def test_auto_picks_a_verified_backend_once_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(select, "INVOKES", 5)
    board = parse_board({"name": "a", "backend": {"order": ["auto"]}}, "a.toml")
    model = find_model("us-fluid-seg")
    chain = BackendChain.from_board(board, data_dir=str(tmp_path))
    first = chain.open(model)
    assert first.notices[0].startswith("Backend auto: ") and "fastest verified here" in first.notices[0]
    cached = json.loads((tmp_path / "backends.json").read_text())
    [(key, entry)] = cached.items()
    assert key.startswith("us-fluid-seg-") and entry["key"] == first.backend.key
    assert all(m["golden"] == "pass" for m in entry["measured"] if m["key"] == entry["key"])

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(select, "measure_all", no_measuring)
    again = chain.open(model)
    assert again.backend.key == first.backend.key and "chosen" in again.notices[0]


def test_auto_cache_falls_back_to_a_temp_dir_when_the_data_dir_is_unusable(tmp_path):
    assert select.cache_path(str(tmp_path / "missing")).parent.name == "firmware-app"
    assert select.cache_path(str(tmp_path)) == tmp_path / "backends.json"


@pytest.mark.parametrize("failing", ["golden"])
def test_auto_never_picks_a_backend_that_fails_its_golden_vectors(failing):
    ok = select.Measurement("cpu", "litert-cpu", True, 5.0, 6.0, "pass")
    fast_but_wrong = select.Measurement("openvino", "openvino-cpu", True, 1.0, 2.0, "FAIL")
    assert select.fastest([fast_but_wrong, ok]) is ok
