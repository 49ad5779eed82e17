"""Which backend is fastest here: ``firmware-app backends`` and ``[backend] order = ["auto"]``.

Every declared backend is opened for the model (those that cannot run here say why), timed over INVOKES
calls after WARMUP, and checked on the model's golden vectors at its own tolerance. ``auto`` takes the
fastest one that passes, decided once per model hash + runtime versions and kept in
``<data-dir>/backends.json`` (a temp folder when the data dir is missing or unwritable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from firmware_app.errors import FirmwareAppError
from firmware_app.models.store import ModelRef

if TYPE_CHECKING:
    from firmware_app.backends.chain import BackendChain

log = logging.getLogger(__name__)

INVOKES = 200
WARMUP = 10
CACHE_FILE = "backends.json"


@dataclass(frozen=True)
class Measurement:
    key: str
    backend: str  # the opened backend's name, or "-"
    available: bool
    p50_ms: float | None = None
    p99_ms: float | None = None
    golden: str = "-"  # "pass" | "FAIL" | "-"
    tolerance: str = ""
    detail: str = ""  # why it is unavailable or failed; the golden figures when it passed

    @property
    def usable(self) -> bool:
        return self.available and self.golden == "pass"


def measure(model: ModelRef, chain: BackendChain, key: str, invokes: int = INVOKES) -> Measurement:
    from firmware_app.backends.golden import check_golden

    try:
        backend = chain.open_one(key, model)
    except FirmwareAppError as exc:
        return Measurement(key, "-", False, detail=str(exc))
    try:
        tol = chain.config(key).tolerance
        try:
            r = check_golden(model, backend, tol)
            golden, detail = "pass", f"max {r.max_diff:.3g}, p99 {r.p99_diff:.3g}, mean {r.mean_diff:.3g}"
            tolerance = r.tolerance
        except FirmwareAppError as exc:
            golden, detail, tolerance = "FAIL", str(exc), tol.describe(model.manifest.golden_atol)
        x = np.zeros(backend.input.shape, backend.input.dtype)
        for _ in range(WARMUP):
            backend.invoke(x)
        times = []
        for _ in range(invokes):
            t0 = time.perf_counter()
            backend.invoke(x)
            times.append((time.perf_counter() - t0) * 1000)
        p50, p99 = (round(float(v), 3) for v in np.percentile(times, [50, 99]))
        return Measurement(key, backend.name, True, p50, p99, golden, tolerance, detail)
    finally:
        backend.close()


def measure_all(model: ModelRef, chain: BackendChain, invokes: int = INVOKES) -> list[Measurement]:
    return [measure(model, chain, key, invokes) for key in chain.candidates()]


def fastest(results: list[Measurement]) -> Measurement | None:
    ok = [m for m in results if m.usable]
    return min(ok, key=lambda m: m.p50_ms) if ok else None


def cache_key(model: ModelRef, chain: BackendChain) -> str:
    """The model's files every backend may read + each runtime's version: a change re-measures."""
    from firmware_app.backends.chain import needed_files

    h = hashlib.sha256()
    keys = chain.candidates()
    for name in needed_files(keys):
        p = model.variant(name)
        h.update(name.encode() + b"\0" + (p.read_bytes() if p else b""))
    runtimes = {k: chain.config(k).runtime_version() or "-" for k in keys}
    h.update(json.dumps({"runtimes": runtimes, "configs": [repr(chain.config(k)) for k in keys]}).encode())
    return f"{model.manifest.id}-{h.hexdigest()[:16]}"


def cache_path(data_dir: str | None) -> Path:
    if data_dir:
        d = Path(data_dir)
        if d.is_dir() and os.access(d, os.W_OK):
            return d / CACHE_FILE
    return Path(tempfile.gettempdir()) / "firmware-app" / CACHE_FILE


def auto_backend(model: ModelRef, chain: BackendChain, invokes: int | None = None) -> tuple[str, str]:
    """(the key ``auto`` stands for, the notice that says so); measured once, then read from the cache."""
    path = cache_path(chain.data_dir)
    key = cache_key(model, chain)
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cached = {}
    hit = cached.get(key)
    if hit and hit.get("key") in chain.candidates():
        notice = f"Backend auto: {hit['key']} (p50 {hit['p50_ms']} ms, chosen {hit['when']})"
        log.info("%s", notice)
        return hit["key"], notice
    results = measure_all(model, chain, invokes or INVOKES)
    best = fastest(results)
    if best is None:
        notice = "Backend auto: no backend passed the golden vectors; using cpu"
        log.warning("%s", notice)
        return "cpu", notice
    cached[key] = {
        "key": best.key,
        "p50_ms": best.p50_ms,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "measured": [asdict(m) for m in results],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("backend auto: cannot write %s (%s); it will be measured again", path, exc)
    notice = f"Backend auto: {best.key} (fastest verified here, p50 {best.p50_ms} ms)"
    log.warning("%s", notice)
    return best.key, notice


def table(model: ModelRef, results: list[Measurement]) -> str:
    lines = [f"backends for {model.manifest.id} {model.manifest.version}:"]
    lines.append(f"{'key':<12} {'backend':<18} {'p50 ms':>8} {'p99 ms':>8}  golden  tolerance / detail")
    for m in results:
        p50 = f"{m.p50_ms:8.3f}" if m.p50_ms is not None else f"{'-':>8}"
        p99 = f"{m.p99_ms:8.3f}" if m.p99_ms is not None else f"{'-':>8}"
        what = f"{m.tolerance}: {m.detail}" if m.available else f"unavailable: {m.detail}"
        lines.append(f"{m.key:<12} {m.backend:<18} {p50} {p99}  {m.golden:<6}  {what}")
    best = fastest(results)
    lines.append(f'order = ["auto"] picks: {best.key if best else "cpu (none passed)"}')
    return "\n".join(lines)


def cmd_backends(
    board_ref: str | None, model_ref: str | None, data_dir: str, as_json: bool, invokes: int
) -> int:
    """``firmware-app backends``: every backend declared in this build, measured here for the model."""
    from firmware_app.backends.chain import AUTO, BackendChain
    from firmware_app.config import load_board
    from firmware_app.models.store import find_model

    board = load_board(board_ref)
    model = find_model(model_ref or board.model["id"], data_dir)
    chain = BackendChain.from_board(board, engine_cache=str(Path(data_dir) / "engines"), data_dir=data_dir)
    chain = BackendChain(
        (AUTO,), chain.configs, chain.threads, chain.devices, chain.engine_cache, chain.data_dir
    )
    results = measure_all(model, chain, invokes)
    best = fastest(results)
    if as_json:
        out = {
            "model": model.manifest.id,
            "invokes": invokes,
            "backends": [asdict(m) for m in results],
            "auto": best.key if best else None,
        }
        print(json.dumps(out, indent=1))
    else:
        print(table(model, results))
    return 0
