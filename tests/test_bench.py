"""`firmware-app bench --json`: every field of the contract, measured in one run."""

from __future__ import annotations

import json

import pytest

from firmware_app.cli import main

FIELDS = {
    "model",
    "backend",
    "threads",
    "frames",
    "invoke_ms",
    "bare_invoke_fps",
    "pipeline_fps",
    "naive_loop_fps",
    "overhead_ms_p50",
    "e2e_latency_ms",
    "mismatched_overlays",
    "startup_s",
    "rss_mb",
}


def test_bench_json_has_every_contract_field(capsys, tmp_path, float_model_dir):
    code = main(
        [
            "--data-dir",
            str(tmp_path),
            "bench",
            "--model",
            str(float_model_dir),
            "--frames",
            "30",
            "--source",
            "synthetic:ultrasound?width=320&height=240&cache=4",
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(out)
    assert FIELDS <= set(result)
    assert result["frames"] == 30 and result["mismatched_overlays"] == 0
    assert result["bare_invoke_fps"] > 0 and result["pipeline_fps"] > 0 and result["naive_loop_fps"] > 0
    assert set(result["invoke_ms"]) == {"p50", "p99"} and set(result["e2e_latency_ms"]) == {"p50", "p99"}
    assert result["startup_s"] is not None and 0 < result["startup_s"] < 30
    assert result["rss_mb"] > 0
    assert set(result["invoke_ms_paced"]) == {"p50", "p99"} and result["overhead_ms_p50"] > 0
    # the screen's render alone, at the 7" size and at 1080p: wall and CPU time of each
    assert set(result["render_ms"]) == {"800x480", "1920x1080"}
    for figures in result["render_ms"].values():
        assert set(figures) == {"wall", "cpu"}
        assert all(set(f) == {"p50", "p99"} and f["p50"] > 0 for f in figures.values())
    # the pipeline with one model thread fewer: its own cost, apart from sharing the cores with the model
    assert result["cpu_count"] >= 1
    spare = result["spare_core"]
    assert spare["threads"] == result["threads"] - 1
    assert spare["bare_invoke_fps"] > 0 and spare["pipeline_fps"] > 0
    assert spare["ratio"] == pytest.approx(spare["pipeline_fps"] / spare["bare_invoke_fps"], abs=2e-3)
