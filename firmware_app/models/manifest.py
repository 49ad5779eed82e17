"""The model manifest (``manifest.toml`` beside ``model.tflite``), validated strictly.

Unknown keys are an error; a missing required key is named; thresholds must lie within their bounds.
The schema is in ../shared/DESIGN.md. Optional tables: ``[calibration]`` (temperature or Platt scaling
applied by the task so the confidence shown is calibrated), ``[golden]`` (tolerance of the golden
vectors in ``golden/*.npz``) and ``[gate]`` (the input gate, ``firmware_app.gate``: its file beside the
model, written by ``tools/make_gate.py``, and its operating point; a missing file is named).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_app.errors import BadModel
from firmware_app.tomlio import load_toml

COLORS = ("gray", "rgb", "bgr")
ACTIVATIONS = ("softmax", "sigmoid", "none")
TASK_OUTPUT_KEYS = ("layout", "heatmap_output")  # [output] keys that a task plugin declares it takes
_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Calibration:
    method: str = "none"  # none | temperature | platt
    temperature: float = 1.0
    a: float = 1.0  # platt: p = sigmoid(a * logit + b)
    b: float = 0.0


FINDING_FEATURES = ("max_logit", "log_area", "mean_logit")  # segmentation finding-level calibration inputs


@dataclass(frozen=True)
class FindingRules:
    """``[finding]``: what makes a result a finding (``tasks.finding``).

    min_size_mm2 applies when the physical scale is known, else min_size_fraction of the imaging region.
    A live stream alerts once ``persist_k`` of the last ``persist_n`` frames hold the finding and stops
    when fewer than ``release_k`` do (hysteresis); a single image decides on itself.
    Segmentation: the mask is the pixels above ``pixel_threshold``; the finding's confidence is
    ``sigmoid(intercept + coef . features)`` over FINDING_FEATURES (fit on held-out data by
    tools/fit_finding.py), or without it the highest pixel probability (uncalibrated).
    """

    min_size_mm2: float | None = None
    min_size_fraction: float = 0.001
    persist_k: int = 3
    persist_n: int = 5
    release_k: int = 1
    pixel_threshold: float = 0.5
    coef: tuple[float, ...] | None = None
    intercept: float = 0.0
    ece: float | None = None
    # the calibrated confidence is kept inside what the held-out data can support: a top bin of n cases
    # of which k held the finding supports at most (k + 1) / (n + 2) (Laplace), never "100 %"
    confidence_range: tuple[float, float] = (0.0, 1.0)

    @property
    def calibrated(self) -> bool:
        return self.coef is not None


@dataclass(frozen=True)
class Manifest:
    id: str
    version: str
    task: str
    intended_use: str
    cleared_for_clinical_use: bool
    width: int
    height: int
    color: str
    range: tuple[float, float]
    labels: tuple[str, ...]
    activation: str
    alert: float
    alert_min: float
    alert_max: float
    layout: str | None = None
    heatmap_output: int | None = None
    calibration: Calibration = Calibration()
    golden_atol: float = 1.0
    reference: dict[str, Any] | None = None  # [reference]: training input statistics (drift warning)
    finding: FindingRules = FindingRules()
    gate: dict[str, Any] | None = None  # [gate]: the input gate's file and operating point
    path: Path | None = None  # the folder

    def clamp_threshold(self, value: float) -> float:
        """A clinician's threshold, kept inside the manifest's bounds."""
        return min(max(float(value), self.alert_min), self.alert_max)


# key -> (python types, required)
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "": {
        "id": ((str,), True),
        "version": ((str,), True),
        "task": ((str,), True),
        "intended_use": ((str,), True),
        "cleared_for_clinical_use": ((bool,), True),
        "input": ((dict,), True),
        "output": ((dict,), True),
        "thresholds": ((dict,), True),
        "calibration": ((dict,), False),
        "golden": ((dict,), False),
        "reference": ((dict,), False),  # input statistics for the drift warning (records.drift)
        "finding": ((dict,), False),  # what makes a result a finding (FindingRules)
        "gate": ((dict,), False),  # the input gate (firmware_app.gate, tools/make_gate.py)
    },
    "input": {
        "width": ((int,), True),
        "height": ((int,), True),
        "color": ((str,), True),
        "range": ((list,), True),
    },
    "output": {
        "labels": ((list,), True),
        "activation": ((str,), True),
        "layout": ((str,), False),
        "heatmap_output": ((int,), False),
    },
    "thresholds": {
        "alert": ((float, int), True),
        "alert_min": ((float, int), True),
        "alert_max": ((float, int), True),
    },
    "calibration": {
        "method": ((str,), True),
        "temperature": ((float, int), False),
        "a": ((float, int), False),
        "b": ((float, int), False),
        "ece_before": ((float, int), False),
        "ece_after": ((float, int), False),
    },
    "golden": {"atol": ((float, int), True)},
    "finding": {
        "min_size_mm2": ((float, int), False),
        "min_size_fraction": ((float, int), False),
        "persistence": ((list,), False),
        "release": ((int,), False),
        "pixel_threshold": ((float, int), False),
        "features": ((list,), False),
        "coef": ((list,), False),
        "intercept": ((float, int), False),
        "ece": ((float, int), False),
        "ece_before": ((float, int), False),
        "cases": ((int,), False),
        "confidence_range": ((list,), False),
    },
    "gate": {
        "file": ((str,), True),
        "method": ((str,), True),
        "threshold": ((float, int), True),
        "target_flag_rate": ((float, int), True),
        "validation_flag_rate": ((float, int), False),
        "reference_frames": ((int,), False),
        "validation_frames": ((int,), False),
        "ood_frames": ((int,), False),
        "ood_flag_rate": ((float, int), False),
        "ood_auroc": ((float, int), False),
    },
}
GATE_METHODS = ("descriptor-mahalanobis-v1",)
_GATE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_table(table: dict[str, Any], section: str, where: str) -> None:
    schema = _SCHEMA[section]
    prefix = f"[{section}] " if section else ""
    for key, value in table.items():
        if key not in schema:
            raise BadModel(f"{where}: unknown key {prefix}{key!r}; allowed: {', '.join(schema)}")
        types, _ = schema[key]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise BadModel(f"{where}: {prefix}{key} must be {names}, got {type(value).__name__} {value!r}")
    for key, (_, required) in schema.items():
        if required and key not in table:
            raise BadModel(f"{where}: missing required key {prefix}{key}")


def parse_manifest(data: dict[str, Any], where: str, folder: Path | None = None) -> Manifest:
    _check_table(data, "", where)
    for section in ("input", "output", "thresholds", "calibration", "golden", "finding", "gate"):
        if section in data:
            _check_table(data[section], section, where)
    inp, out, thr = data["input"], data["output"], data["thresholds"]

    def bad(msg: str) -> BadModel:
        return BadModel(f"{where}: {msg}")

    if not _ID.match(data["id"]):
        raise bad(f"id {data['id']!r} must be lower-case letters, digits, '.', '_' or '-' (max 64)")
    if not _SEMVER.match(data["version"]):
        raise bad(f"version {data['version']!r} is not semantic (MAJOR.MINOR.PATCH)")
    from firmware_app import plugins

    tasks = plugins.plugins("task")  # each task plugin declares the [output] keys it takes and checks them
    if data["task"] not in tasks:
        raise bad(f"task {data['task']!r} must be one of {', '.join(tasks)}")
    task = tasks[data["task"]]
    if not (0 < inp["width"] <= 4096 and 0 < inp["height"] <= 4096):
        raise bad(f"[input] width/height {inp['width']}x{inp['height']} out of range 1..4096")
    if inp["color"] not in COLORS:
        raise bad(f"[input] color {inp['color']!r} must be one of {', '.join(COLORS)}")
    rng = inp["range"]
    if len(rng) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng):
        raise bad(f"[input] range must be [low, high] numbers, got {rng!r}")
    if not rng[0] < rng[1]:
        raise bad(f"[input] range {rng!r}: low must be below high")
    labels = out["labels"]
    if len(labels) < 1 or not all(isinstance(x, str) and x for x in labels):
        raise bad("[output] labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise bad(f"[output] labels {labels!r} has duplicates")
    if out["activation"] not in ACTIVATIONS:
        raise bad(f"[output] activation {out['activation']!r} must be one of {', '.join(ACTIVATIONS)}")
    for key in TASK_OUTPUT_KEYS:
        if key in out and key not in task.output_keys:
            owners = [name for name, t in tasks.items() if key in t.output_keys]
            raise bad(f"[output] {key} applies to {' and '.join(owners)} models only, not {data['task']}")
    task.check_manifest(data, bad)
    layout = out.get("layout")
    lo, alert, hi = float(thr["alert_min"]), float(thr["alert"]), float(thr["alert_max"])
    if not (0.0 <= lo <= alert <= hi <= 1.0):
        raise bad(f"[thresholds] need 0 <= alert_min ({lo}) <= alert ({alert}) <= alert_max ({hi}) <= 1")
    cal = Calibration()
    if "calibration" in data:
        c = data["calibration"]
        if c["method"] not in ("none", "temperature", "platt"):
            raise bad(f"[calibration] method {c['method']!r} must be none, temperature or platt")
        t = float(c.get("temperature", 1.0))
        if not t > 0:
            raise bad(f"[calibration] temperature {t} must be > 0")
        if c["method"] == "platt" and ("a" not in c or "b" not in c):
            raise bad("[calibration] method 'platt' needs keys a and b")
        cal = Calibration(c["method"], t, float(c.get("a", 1.0)), float(c.get("b", 0.0)))
    reference = data.get("reference")
    if reference is not None:
        from firmware_app.records.drift import check_reference

        problems = check_reference(reference)
        if problems:
            raise bad(problems[0])
    finding = _finding_rules(data.get("finding", {}), data["task"], task, bad)
    gate = data.get("gate")
    if gate is not None:
        _check_gate(gate, folder, bad)
    atol = float(data.get("golden", {}).get("atol", 1.0))
    if atol < 0:
        raise bad(f"[golden] atol {atol} must be >= 0")
    return Manifest(
        id=data["id"],
        version=data["version"],
        task=data["task"],
        intended_use=data["intended_use"],
        cleared_for_clinical_use=data["cleared_for_clinical_use"],
        width=inp["width"],
        height=inp["height"],
        color=inp["color"],
        range=(float(rng[0]), float(rng[1])),
        labels=tuple(labels),
        activation=out["activation"],
        alert=alert,
        alert_min=lo,
        alert_max=hi,
        layout=layout,
        heatmap_output=out.get("heatmap_output"),
        calibration=cal,
        golden_atol=atol,
        reference=reference,
        finding=finding,
        gate=dict(gate) if gate is not None else None,
        path=folder,
    )


def _finding_rules(t: dict[str, Any], task_name: str, task: Any, bad) -> FindingRules:
    rules = FindingRules()
    mm2 = t.get("min_size_mm2")
    frac = float(t.get("min_size_fraction", rules.min_size_fraction))
    if mm2 is not None and not 0 <= float(mm2) < 1e6:
        raise bad(f"[finding] min_size_mm2 {mm2} must be >= 0")
    if not 0.0 <= frac < 1.0:
        raise bad(f"[finding] min_size_fraction {frac} must be in [0, 1)")
    k, n = rules.persist_k, rules.persist_n
    pers = t.get("persistence")
    if pers is not None:
        if len(pers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pers):
            raise bad(
                f"[finding] persistence must be [k, n] (alert when k of the last n frames hold), got {pers!r}"
            )
        k, n = pers
    if not 1 <= k <= n <= 100:
        raise bad(f"[finding] persistence [{k}, {n}] needs 1 <= k <= n <= 100")
    release = int(t.get("release", min(rules.release_k, k)))
    if not 1 <= release <= k:
        raise bad(f"[finding] release {release} must be in 1..k ({k})")
    pix = float(t.get("pixel_threshold", rules.pixel_threshold))
    if not 0.0 < pix < 1.0:
        raise bad(f"[finding] pixel_threshold {pix} must be in (0, 1)")
    coef = None
    if "coef" in t or "features" in t:
        if not task.finding_calibration:
            raise bad(
                f"[finding] features/coef (a finding-level calibration) do not apply to {task_name} models"
            )
        feats, c = t.get("features"), t.get("coef")
        if feats != list(FINDING_FEATURES):
            raise bad(f"[finding] features must be {list(FINDING_FEATURES)}, got {feats!r}")
        if not (isinstance(c, list) and len(c) == len(feats) and all(_finite(v) for v in c)):
            raise bad(f"[finding] coef must be {len(FINDING_FEATURES)} numbers, got {c!r}")
        if not _finite(t.get("intercept", 0.0)):
            raise bad("[finding] intercept must be a finite number")
        coef = tuple(float(v) for v in c)
    rng = t.get("confidence_range", [0.0, 1.0])
    if not (len(rng) == 2 and all(_finite(v) for v in rng) and 0.0 <= rng[0] < rng[1] <= 1.0):
        raise bad(f"[finding] confidence_range must be [low, high] with 0 <= low < high <= 1, got {rng!r}")
    return FindingRules(
        confidence_range=(float(rng[0]), float(rng[1])),
        min_size_mm2=None if mm2 is None else float(mm2),
        min_size_fraction=frac,
        persist_k=int(k),
        persist_n=int(n),
        release_k=release,
        pixel_threshold=pix,
        coef=coef,
        intercept=float(t.get("intercept", 0.0)),
        ece=float(t["ece"]) if "ece" in t else None,
    )


def _finite(v: Any) -> bool:

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_gate(gate: dict[str, Any], folder: Path | None, bad) -> None:
    if not _GATE_FILE.match(gate["file"]):
        raise bad(f"[gate] file {gate['file']!r} must be a plain file name in the model folder")
    if gate["method"] not in GATE_METHODS:
        raise bad(f"[gate] method {gate['method']!r} must be one of {', '.join(GATE_METHODS)}")
    thr = float(gate["threshold"])
    if not (math.isfinite(thr) and thr > 0):
        raise bad(f"[gate] threshold {gate['threshold']!r} must be a positive number")
    for key in ("target_flag_rate", "validation_flag_rate", "ood_flag_rate", "ood_auroc"):
        if key in gate and not 0.0 <= float(gate[key]) <= 1.0:
            raise bad(f"[gate] {key} {gate[key]!r} must be between 0 and 1")
    if not 0.0 < float(gate["target_flag_rate"]) < 1.0:
        raise bad(f"[gate] target_flag_rate {gate['target_flag_rate']!r} must be above 0 and below 1")
    for key in ("reference_frames", "validation_frames", "ood_frames"):
        if key in gate and gate[key] < 0:
            raise bad(f"[gate] {key} {gate[key]!r} must be >= 0")
    if folder is not None and not (folder / gate["file"]).is_file():
        raise bad(f"[gate] file {gate['file']!r}: {folder / gate['file']} not found")


def load_manifest(folder: str | Path) -> Manifest:
    """Read and validate ``folder/manifest.toml``; BadModel names the file and the problem."""
    folder = Path(folder)
    path = folder / "manifest.toml"
    data = load_toml(path, BadModel, what="model manifest")
    return parse_manifest(data, str(path), folder)
