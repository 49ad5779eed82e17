"""``firmware-app bench --json``: performance figures measured in one run, on one interpreter setting.

- bare invoke loop: the model's own speed, the ceiling (``invoke_ms``, ``bare_invoke_fps``);
- the full pipeline fed by an unlimited synthetic source (``pipeline_fps``: the steady rate after WARMUP
  results, timed on the inference thread);
- the full pipeline fed at 30 fps: capture -> shown latency (``e2e_latency_ms``), beside the bare invoke
  loop paced at the same 30 fps (``invoke_ms_paced``): a CPU that idles between frames runs the next
  invoke slower than a tight loop does, and that part of the latency is the model's, not the pipeline's;
- a naive single-threaded read -> convert -> resize -> float quantize -> invoke -> float dequantize ->
  full-frame blend -> draw loop, the reference a user would write (``naive_loop_fps``).
``render_ms``: the screen's render alone (``Screen.render``), at 800x480 and 1920x1080, of the model's own
results on its frames, wall and CPU time p50/p99 (RENDERS renders at each size, the sizes alternating).
``overhead_ms_p50`` is the CPU time per analysed frame spent outside invoke: preprocess + postprocess (p50
each, CPU time of the thread that does them) + render and display at the share of frames the screen
shows. ``spare_core``: bare invoke and pipeline again with one model thread fewer, the pipeline's own
cost when its threads have a core the model does not use (``cpu_count`` beside it). ``startup_s``:
process start to the first result on screen, in a fresh process. ``rss_mb``: this process's peak resident
memory, before the spare-core runs (a second interpreter the device never holds). Each bundled model is
fed its own phantom (PHANTOMS); ``--source`` overrides it. Bare, pipeline and naive runs alternate in
ROUNDS rounds of ``frames`` each, after one uncounted pipeline round, and each figure is the median of its
rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from firmware_app.backends import BackendChain
from firmware_app.config import load_board
from firmware_app.errors import BadSource
from firmware_app.models.store import ModelRef, find_model
from firmware_app.pipeline import build_pipeline
from firmware_app.preprocess import Preprocessor
from firmware_app.sources import open_source

WARMUP = 10
ROUNDS = 3
PACED_FPS = 30.0
# the phantom each bundled model was made for: an x-ray detector fed ultrasound would find (and draw) a
# different number of boxes than it does on its own images; other models get the ultrasound phantom
PHANTOMS = {"us-fluid-seg": "ultrasound", "us-bline-cls": "lung", "xr-nodule-det": "xray"}
RENDER_SIZES = ((800, 480), (1920, 1080))  # the 7" screen, and a 1080p monitor
RENDERS = 200  # renders timed at each size
RENDER_RESULTS = 32  # results (after WARMUP) the renders cycle through: the phantom's cached frames


def _pct(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def _sample_frames(source_uri: str, n: int) -> list[np.ndarray]:
    src = open_source(source_uri)
    src.open()
    try:
        frames = []
        while len(frames) < n:
            f = src.read()
            if f is None:
                break
            frames.append(f.pixels)
    finally:
        src.close()
    return frames


def bare_invoke(
    model: ModelRef, chain: BackendChain, frames: list[np.ndarray], n: int, fps: float = 0.0
) -> dict:
    """``invoke()`` alone on pre-made tensors, after WARMUP calls: back to back (the ceiling), or with
    ``fps`` one call every 1/fps s (the model's own time at that pace)."""
    backend = chain.open(model).backend
    pre = Preprocessor(model.manifest, backend.input)
    tensors = [pre(f).copy() for f in frames[:8]]
    for i in range(WARMUP):
        backend.invoke(tensors[i % len(tensors)])
    times = []
    t_start = due = time.perf_counter()
    for i in range(n):
        if fps > 0:
            due += 1.0 / fps
            time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        backend.invoke(tensors[i % len(tensors)])
        times.append((time.perf_counter() - t0) * 1000)
    total = time.perf_counter() - t_start
    backend.close()
    return {"backend": backend.name, "invoke_ms": _pct(times), "bare_invoke_fps": round(n / total, 2)}


def naive_loop(model: ModelRef, threads: int, frames: list[np.ndarray], n: int) -> float:
    """What a vendor example does: everything in float, every frame, on one thread."""
    from firmware_app.backends.litert import LiteRTBackend

    m = model.manifest
    backend = LiteRTBackend(model.tflite, threads=threads)
    spec = backend.input
    t_start = 0.0
    for i in range(n + WARMUP):
        if i == WARMUP:
            t_start = time.perf_counter()
        naive_step(backend, m, spec, frames[i % len(frames)])
    backend.close()
    return round(n / (time.perf_counter() - t_start), 2)


def naive_step(backend, m, spec, img: np.ndarray, canvas_size: tuple[int, int] = (800, 480)) -> np.ndarray:
    """One frame of the naive loop: convert, resize, float quantize, invoke, float dequantize, full-frame
    blend, stretch to the screen, draw the label; the picture shown."""
    lo, hi = m.range
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img
    gray = (
        cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if m.color == "gray" else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    )
    small = cv2.resize(gray, (m.width, m.height)).astype(np.float32) / 255.0 * (hi - lo) + lo
    x = small.reshape(spec.shape)
    if spec.quantized:
        info = np.iinfo(spec.dtype)
        x = np.clip(np.round(x / spec.scale + spec.zero_point), info.min, info.max).astype(spec.dtype)
    outs = []
    for raw, o in zip(backend.invoke(x.astype(spec.dtype)), backend.outputs):
        f = raw.astype(np.float32)
        outs.append((f - o.zero_point) * o.scale if o.quantized else f)
    spatial = next((o for o in outs if o.ndim == 4), None)
    if spatial is not None:  # a mask or heatmap, stretched over the frame
        prob = spatial[0, ..., -1]
        weight = cv2.resize((prob > 0.5).astype(np.float32), (bgr.shape[1], bgr.shape[0]))
    else:
        weight = np.full(bgr.shape[:2], float(outs[0].max() > 0.5), np.float32)
    overlay = bgr.astype(np.float32)
    color = np.array([0, 200, 255], np.float32)
    overlay = overlay * (1 - 0.4 * weight[..., None]) + color * 0.4 * weight[..., None]
    shown = cv2.resize(overlay.astype(np.uint8), canvas_size)
    label = f"{m.id} {float(outs[0].max()):.2f}"
    cv2.putText(shown, label, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
    return shown


def pipeline_run(
    board, model: ModelRef, source_uri: str, n: int, engine_cache: str | None = None
) -> dict[str, Any]:
    """The full pipeline for WARMUP + n results; ``fps`` is the steady rate of the last n results, timed on
    the inference thread: opening the source and the model and the first invokes are not in it."""
    p = build_pipeline(board, model, source_uri, ["null"], max_frames=n + WARMUP, engine_cache=engine_cache)
    p.options.score_truth = False  # the phantom's Dice is the demo's, not something a device computes
    done: list[float] = []
    p.listeners.append(lambda frame, result: done.append(time.perf_counter()))
    stats = p.run()
    span = done[-1] - done[WARMUP - 1] if len(done) > WARMUP else 0.0
    stats["pipeline_fps"] = (len(done) - WARMUP) / span if span > 0 else 0.0
    return stats


def render_times(
    board, model: ModelRef, source_uri: str, n: int = RENDERS, engine_cache: str | None = None
) -> dict[str, Any]:
    """``Screen.render`` alone at each of RENDER_SIZES, wall and CPU time p50/p99 (CPU time of the process:
    OpenCV's worker threads count, which ``cpu_ms``, one thread's, does not see; the pipeline is closed by
    then). What it renders is what the presenter shows: the screen states of
    RENDER_RESULTS results of the full pipeline (after WARMUP), each with its own frame; the sizes
    alternate render by render, after WARMUP uncounted renders each."""
    from firmware_app.display.screen import Screen

    p = build_pipeline(
        board, model, source_uri, ["null"], max_frames=WARMUP + RENDER_RESULTS, engine_cache=engine_cache
    )
    p.options.score_truth = False
    states: list[Any] = []
    p.listeners.append(lambda frame, result: states.append(p.presenter.state(frame, result, None, False)))
    p.run()
    states = states[WARMUP:] or states
    if not states:
        return {}
    screens = {f"{w}x{h}": Screen(w, h) for w, h in RENDER_SIZES}
    for screen in screens.values():
        for i in range(WARMUP):
            screen.render(states[i % len(states)])
    wall: dict[str, list[float]] = {k: [] for k in screens}
    cpu: dict[str, list[float]] = {k: [] for k in screens}
    for i in range(n):
        state = states[i % len(states)]
        for key, screen in screens.items():
            t0, c0 = time.perf_counter_ns(), time.process_time_ns()
            screen.render(state)
            wall[key].append((time.perf_counter_ns() - t0) / 1e6)
            cpu[key].append((time.process_time_ns() - c0) / 1e6)
    return {k: {"wall": _pct(wall[k]), "cpu": _pct(cpu[k])} for k in screens}


def measure_startup(board_ref: str | None, model_ref: str, data_dir: str | None, kind: str) -> float | None:
    """A fresh process: start -> first result shown, as the run command reports it, plus interpreter start."""
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "firmware_app", "run", "--model", model_ref, "--display", "null"]
        cmd += ["--frames", "1", "--stats", str(stats_path), "--source", f"synthetic:{kind}?fps=0"]
        if board_ref:
            cmd += ["--board", board_ref]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not stats_path.exists():
            return None
        return json.loads(stats_path.read_text()).get("startup_s")


def run_bench(
    board_ref: str | None, model_ref: str | None, source_uri: str | None, frames: int, data_dir: str | None
) -> dict[str, Any]:
    board = load_board(board_ref)
    model = find_model(model_ref or board.model["id"], data_dir)
    threads = board.backend["threads"]
    engine_cache = str(Path(data_dir) / "engines") if data_dir else None
    chain = BackendChain.from_board(board, engine_cache=engine_cache, data_dir=data_dir)
    # the phantom is rendered once (cache=): like a capture card's DMA, the source costs no CPU per frame
    kind = PHANTOMS.get(model.manifest.id, "ultrasound")
    base = source_uri or f"synthetic:{kind}?width=640&height=480&cache=32"
    sep = "&" if "?" in base else "?"
    unlimited, paced = f"{base}{sep}fps=0", f"{base}{sep}fps={PACED_FPS:g}"
    if not base.startswith("synthetic:"):
        unlimited = paced = base
    sample = _sample_frames(unlimited, 16)
    # bare, pipeline and naive alternate in ROUNDS rounds and each figure is the median of its rounds: a
    # background job on a shared machine then weighs on all three alike, so their ratios hold.
    # A first round that is not counted: fonts scaled, caches and the CPU warm, as on a running device
    pipeline_run(board, model, unlimited, WARMUP, engine_cache)
    bares, fulls, naives = [], [], []
    for _ in range(ROUNDS):
        bares.append(bare_invoke(model, chain, sample, frames))
        fulls.append(pipeline_run(board, model, unlimited, frames, engine_cache))
        naives.append(naive_loop(model, threads, sample, frames))
    bare = sorted(bares, key=lambda b: b["bare_invoke_fps"])[ROUNDS // 2]
    full = sorted(fulls, key=lambda f: f["pipeline_fps"])[ROUNDS // 2]
    naive = sorted(naives)[ROUNDS // 2]
    paced_n = max(30, frames // 2)
    paced_stats = pipeline_run(board, model, paced, paced_n, engine_cache)
    paced_bare = bare_invoke(model, chain, sample, paced_n, PACED_FPS)["invoke_ms"]
    render = render_times(board, model, unlimited, engine_cache=engine_cache)
    rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # before spare_core's runs
    spare = spare_core(board, model, sample, unlimited, frames, engine_cache, data_dir)
    stages = full["stages_ms"]
    # CPU time per analysed frame outside invoke: pre- and post-processing every frame, the screen at the
    # share of frames it shows (it refreshes at the display's rate, not the model's)
    shown_share = full["frames_shown"] / max(full["frames_inferred"], 1)
    cpu = full["cpu_ms"]
    per_frame = ("preprocess", "postprocess", "gate", "finding")  # the input gate and finding rules too
    p50 = {s: cpu.get(s, {}).get("p50", 0.0) for s in (*per_frame, "render", "display")}
    overhead = sum(p50[s] for s in per_frame) + shown_share * (p50["render"] + p50["display"])
    pipeline_fps = full["pipeline_fps"]
    m = model.manifest
    return {
        "model": f"{m.id}@{m.version}",
        "backend": bare["backend"],
        "threads": threads,
        "frames": frames,
        "source": unlimited,
        "invoke_ms": bare["invoke_ms"],
        "bare_invoke_fps": bare["bare_invoke_fps"],
        "pipeline_fps": round(pipeline_fps, 2),
        "naive_loop_fps": naive,
        "overhead_ms_p50": round(overhead, 3),
        "e2e_latency_ms": paced_stats["stages_ms"].get("e2e"),
        "invoke_ms_paced": paced_bare,
        "paced_fps": PACED_FPS,
        "mismatched_overlays": sum(f["mismatched_overlays"] for f in fulls)
        + paced_stats["mismatched_overlays"],
        "startup_s": measure_startup(board_ref, model_ref or m.id, data_dir, kind),
        "rss_mb": rss_mb,
        "stages_ms": stages,
        "cpu_ms": cpu,
        "paced_stages_ms": paced_stats["stages_ms"],
        "render_ms": render,
        "cpu_count": os.cpu_count(),
        "spare_core": spare,
    }


def spare_core(
    board, model: ModelRef, sample, source_uri: str, frames: int, engine_cache: str | None, data_dir
) -> dict[str, Any] | None:
    """Bare invoke and the pipeline again with one model thread fewer (``threads`` >= 2), ROUNDS rounds
    alternating, medians: the pipeline's own cost when its other threads have a core the model does not
    use (a 4-core board with 3 model threads), apart from the cost of sharing every core with the
    model's threads (``pipeline_fps`` / ``bare_invoke_fps`` at ``threads`` = the number of cores)."""
    threads = int(board.backend["threads"])
    if threads < 2:
        return None
    fewer = dataclasses.replace(board, backend={**board.backend, "threads": threads - 1})
    chain = BackendChain.from_board(fewer, engine_cache=engine_cache, data_dir=data_dir)
    bares, fulls = [], []
    for _ in range(ROUNDS):
        bares.append(bare_invoke(model, chain, sample, frames)["bare_invoke_fps"])
        fulls.append(pipeline_run(fewer, model, source_uri, frames, engine_cache)["pipeline_fps"])
    bare, full = sorted(bares)[ROUNDS // 2], sorted(fulls)[ROUNDS // 2]
    return {
        "threads": threads - 1,
        "bare_invoke_fps": round(bare, 2),
        "pipeline_fps": round(full, 2),
        "ratio": round(full / bare, 3) if bare else None,
    }


# -- a real capture stream (``bench --capture mjpg:1920x1080@60``) ------------------------------------------
CAPTURE_WARMUP = 120  # frames before the CPU figures count: the imaging region is found by then
CPU_FRAMES = 300  # frames the per-frame CPU figures are measured over (capture and naive alternate)
CAPTURE_TAIL = 60  # frames the replay has beyond those measured: the stream is ended, not unplugged
NAIVE_CAPTURE_FRAMES = 600  # the naive path's paced run (latency, dropped frames): 10 s at 60 fps
DRIFT_SPAN = 500  # p99_drift: p99 of the last DRIFT_SPAN shown frames / p99 of the first DRIFT_SPAN


def parse_capture(spec: str) -> tuple[str, int, int, float]:
    """``mjpg:1920x1080@60`` -> ("MJPG", 1920, 1080, 60.0); BadSource naming the expected form."""
    try:
        fourcc, rest = spec.split(":", 1)
        size, fps = rest.split("@", 1)
        w, h = (int(v) for v in size.lower().split("x", 1))
        out = (fourcc.upper(), w, h, float(fps))
    except ValueError:
        raise BadSource(f"--capture {spec!r}: expected FOURCC:WxH@FPS, e.g. mjpg:1920x1080@60") from None
    if out[0] not in ("MJPG", "YUYV") or w <= 0 or h <= 0 or w % 2 or out[3] <= 0:
        raise BadSource(f"--capture {spec!r}: fourcc mjpg or yuyv, an even width, a size and fps > 0")
    return out


def decode_target_for(board, model: ModelRef) -> dict[str, Any]:
    """What the composer hands the source (``compose.decode_target``): the model's input, the screen's
    image area, colour kept; the bench measures what a device runs."""
    from firmware_app.compose import decode_target
    from firmware_app.display.screen import Screen

    area = Screen(int(board.display["width"]), int(board.display["height"])).image_region
    return decode_target(model.manifest, (area.w, area.h))


def _capture_source(cap, board, model: ModelRef):
    from firmware_app.sources.v4l2 import V4l2Source

    src = V4l2Source(f"v4l2:{cap.device}", cap, reconnect_s=0.05, profile=board.profile)
    src.set_decode_target(**decode_target_for(board, model))
    return src


class _TimedDecoder:
    """A JPEG decoder that keeps the CPU and wall time of each decode (``bench --capture``'s stages)."""

    def __init__(self, decoder) -> None:
        self.decoder, self.name = decoder, decoder.name
        self.cpu: list[float] = []
        self.wall: list[float] = []

    @property
    def has_planes(self) -> bool:
        return self.decoder.has_planes

    def _timed(self, fn, *args):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        try:
            return fn(*args)
        finally:
            self.cpu.append((time.process_time_ns() - c0) / 1e6)
            self.wall.append((time.perf_counter_ns() - w0) / 1e6)

    def decode(self, data, k: int = 1, gray: bool = False):
        return self._timed(self.decoder.decode, data, k, gray)

    def planes(self, data, k: int = 1):
        return self._timed(self.decoder.planes, data, k)


def _stage(cpu: list[float], wall: list[float]) -> dict[str, dict[str, float]]:
    return {"cpu": _pct(cpu), "wall": _pct(wall)}


def capture_cpu(board, model: ModelRef, cap, n: int) -> dict[str, Any]:
    """CPU per frame, one thread, same frames: capture -> model tensor (decode at the needed scale, crop,
    preprocess) against the naive path (OpenCV full colour decode, as ``cv2.VideoCapture`` does, crop,
    resize to the model's input, preprocess). Both end at the model tensor; they alternate frame by
    frame, after CAPTURE_WARMUP frames (the region found). CPU time of the process: OpenCV's worker
    threads count too. ``stages``: CPU and wall time p50/p99 of each step of both paths (``read`` is the
    source's: decode, region watch and crop; ``decode`` inside it for MJPG). ``decode_floor`` (MJPG): the
    same frames decoded at 1/8 to gray by the same decoder, timed after the naive path: what is left
    when the IDCT and the colour work are all but gone, the entropy decoding of every byte."""

    m = model.manifest
    backend = BackendChain.from_board(board).open(model).backend
    spec = backend.input
    backend.close()
    pre = Preprocessor(m, spec)
    src = _capture_source(cap.again(fps=0, count=CAPTURE_WARMUP + n), board, model)
    timed = _TimedDecoder(src.decoder) if cap.fourcc == "MJPG" else None
    if timed is not None:
        src._decoder = timed  # type: ignore[assignment]
    src.open()
    for _ in range(CAPTURE_WARMUP):
        frame = src.read()
    if timed is not None:
        timed.cpu.clear()
        timed.wall.clear()
    ours, naive = [], []
    keys = ("read", "preprocess", "n_decode", "n_resize", "n_pre", "floor")
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    wall: dict[str, list[float]] = {k: [] for k in cpu}

    def mark(name: str, w0: int, c0: int) -> tuple[int, int]:
        w1, c1 = time.perf_counter_ns(), time.process_time_ns()
        cpu[name].append((c1 - c0) / 1e6)
        wall[name].append((w1 - w0) / 1e6)
        return w1, c1

    for i in range(n):
        w, c = time.perf_counter_ns(), time.process_time_ns()
        frame = src.read()
        w, c = mark("read", w, c)
        pre(frame.pixels)
        mark("preprocess", w, c)
        buf = cap.frames[(CAPTURE_WARMUP + i) % len(cap.frames)]
        x, y, rw, rh = frame.meta["imaging_region"]
        w, c = time.perf_counter_ns(), time.process_time_ns()
        full = _naive_decode(cap, buf)
        w, c = mark("n_decode", w, c)
        small = cv2.resize(full[y : y + rh, x : x + rw], (m.width, m.height), interpolation=cv2.INTER_AREA)
        w, c = mark("n_resize", w, c)
        pre(small)
        w, c = mark("n_pre", w, c)
        if timed is not None:  # the floor: the same bytes at 1/8, gray (entropy decoding, little else)
            timed.decoder.decode(buf, 8, True)
            mark("floor", w, c)
        ours.append(cpu["read"][-1] + cpu["preprocess"][-1])
        naive.append(cpu["n_decode"][-1] + cpu["n_resize"][-1] + cpu["n_pre"][-1])
    src.close()
    stages: dict[str, Any] = {
        "ours": {"read": _stage(cpu["read"], wall["read"])},
        "naive": {
            "decode": _stage(cpu["n_decode"], wall["n_decode"]),
            "resize": _stage(cpu["n_resize"], wall["n_resize"]),
            "preprocess": _stage(cpu["n_pre"], wall["n_pre"]),
        },
    }
    if timed is not None and timed.cpu:
        stages["ours"]["decode"] = _stage(timed.cpu, timed.wall)
    stages["ours"]["preprocess"] = _stage(cpu["preprocess"], wall["preprocess"])
    naive_p50 = float(np.median(naive))
    floor = None
    if cpu["floor"]:
        floor_p50 = float(np.median(cpu["floor"]))
        floor = {"cpu_ms_p50": round(floor_p50, 3), "ratio_to_naive": round(floor_p50 / naive_p50, 3)}
    return {
        "decode_floor": floor,
        "decoded_gray": frame.pixels.ndim == 2,
        "decode_scale": int(frame.meta.get("decode_scale", 1)),
        "decoder": src.decoder.name if cap.fourcc == "MJPG" else "yuyv",
        "imaging_region": list(frame.meta["imaging_region"]),
        "cpu_ms_p50": round(float(np.median(ours)), 3),
        "naive_cpu_ms_p50": round(naive_p50, 3),
        "stages": stages,
    }


def _naive_decode(cap, buf) -> np.ndarray:
    """A grabber's buffer as ``cv2.VideoCapture`` hands it over: the whole frame decoded, in colour."""
    from firmware_app.sources.grab import yuyv_frame

    if cap.fourcc == "MJPG":
        return cv2.imdecode(np.ascontiguousarray(buf).reshape(-1), cv2.IMREAD_COLOR)
    return yuyv_frame(buf, cap.width, cap.height)


def capture_naive_run(board, model: ModelRef, cap, region: list[int]) -> dict[str, Any]:
    """The naive path on the same paced stream, on one thread: OpenCV's full decode, the imaging region cut
    out, then the naive loop's step (resize, float quantize, invoke, dequantize, full-frame blend, stretch
    to the screen, label). Latency from the frame's arrival to its picture drawn; the frames the grabber
    overwrote while the loop was busy are dropped."""
    from firmware_app.backends.litert import LiteRTBackend

    m = model.manifest
    backend = LiteRTBackend(model.tflite, threads=board.backend["threads"])
    canvas = (int(board.display["width"]), int(board.display["height"]))
    x, y, w, h = region
    n = cap.count - CAPTURE_TAIL
    latency: list[float] = []
    cap.open()
    while cap.n < n:
        ok, buf = cap.read()
        if not ok:
            break
        t_arrival = cap.t_arrival_ns
        full = _naive_decode(cap, buf)
        naive_step(backend, m, backend.input, full[y : y + h, x : x + w], canvas)
        latency.append((time.monotonic_ns() - t_arrival) / 1e6)
    cap.release()
    backend.close()
    return {
        "frames": n,
        "frames_shown": len(latency),
        "frames_dropped": int(cap.missed),
        "e2e_latency_ms": _pct(latency[WARMUP:] or latency) if latency else None,
    }


def capture_pipeline(board, model: ModelRef, cap, engine_cache: str | None = None) -> dict[str, Any]:
    """The full pipeline fed by the paced capture double, as composed for the board (the capture stands in
    for the device through the v4l2 source's ``capture`` option); every shown frame's latency is kept."""
    import threading

    n = cap.count - CAPTURE_TAIL
    opts = {**board.source, "capture": cap, "reconnect_s": 0.05}
    pipe_opts = {**board.pipeline, "stats_window": n + 100}
    b = dataclasses.replace(board, source=opts, pipeline=pipe_opts)
    p = build_pipeline(b, model, f"v4l2:{cap.device}", ["null"], engine_cache=engine_cache)
    p.options.score_truth = False  # (the composer has told the source what to decode: decode_for)
    scales: list[int] = []
    findings = [0]

    def seen(frame, result) -> None:
        scales.append(int(frame.meta.get("decode_scale", 1)))
        findings[0] += result.state == "finding"

    p.listeners.append(seen)

    def stop_at_the_end() -> None:
        # after n frames the stream ends as a file would (the next read() returns None); the capture has
        # a tail of frames left, so the last ones measured are not disturbed by a lost capture
        while cap.n < n and not p.source.stopping.wait(0.01):
            pass
        p.source.stop()

    threading.Thread(target=stop_at_the_end, daemon=True).start()
    stats = p.run()
    e2e = p.times.samples("e2e")
    span = min(DRIFT_SPAN, len(e2e) // 2)
    first, last = e2e[:span], e2e[-span:]
    drift = float(np.percentile(last, 99) / np.percentile(first, 99)) if span else None
    return {
        "frames": n,
        "frames_shown": len(e2e),
        "frames_inferred": stats["frames_inferred"],
        "frames_dropped": int(stats["frames_dropped"]) + int(cap.missed),
        "e2e": e2e,
        "e2e_latency_ms": _pct(e2e) if e2e else None,
        "p99_drift": round(drift, 3) if drift is not None else None,
        "mismatched_overlays": int(stats["mismatched_overlays"]),
        "findings": findings[0],
        "decode_scale_last": scales[-1] if scales else None,
        "stages_ms": stats["stages_ms"],
        "cpu_ms": stats["cpu_ms"],
    }


def run_capture_bench(
    board_ref: str | None,
    model_ref: str | None,
    spec: str,
    frames: int,
    data_dir: str | None,
    report_dir: str | None = None,
) -> dict[str, Any]:
    """``bench --capture FOURCC:WxH@FPS``: the DESIGN's ``capture`` object, measured in one run."""
    from firmware_app.sources.v4l2 import ReplayCapture

    fourcc, width, height, fps = parse_capture(spec)
    board = load_board(board_ref)
    model = find_model(model_ref or board.model["id"], data_dir)
    engine_cache = str(Path(data_dir) / "engines") if data_dir else None
    cap = ReplayCapture.scanner(fourcc, width, height, fps, count=frames)
    cpu = capture_cpu(board, model, cap, min(CPU_FRAMES, max(frames, 30)))
    run = capture_pipeline(board, model, cap.again(count=frames + CAPTURE_TAIL), engine_cache)
    naive_n = min(frames, NAIVE_CAPTURE_FRAMES)
    naive = capture_naive_run(board, model, cap.again(count=naive_n + CAPTURE_TAIL), cpu["imaging_region"])
    m = model.manifest
    out = {
        "fourcc": fourcc,
        "width": width,
        "height": height,
        "fps": fps,
        "decode_scale": cpu["decode_scale"],
        "decoder": cpu["decoder"],
        "decoded_gray": cpu["decoded_gray"],
        "imaging_region": cpu["imaging_region"],
        "cpu_ms_p50": cpu["cpu_ms_p50"],
        "naive_cpu_ms_p50": cpu["naive_cpu_ms_p50"],
        "cpu_ratio": round(cpu["cpu_ms_p50"] / cpu["naive_cpu_ms_p50"], 3)
        if cpu["naive_cpu_ms_p50"]
        else None,
        "e2e_latency_ms": run["e2e_latency_ms"],
        "p99_drift": run["p99_drift"],
        "frames": frames,
        "frames_shown": run["frames_shown"],
        "frames_inferred": run["frames_inferred"],
        "frames_dropped": run["frames_dropped"],
        "mismatched_overlays": run["mismatched_overlays"],
        # results that were findings (an outline drawn on their own frame), of frames_inferred
        "findings": run["findings"],
        # per step of both paths (one thread, same frames), and per stage of the pipeline run
        "stages": cpu["stages"],
        # MJPG: the same frames decoded at 1/8 to gray, the least a software decode of them costs (the
        # entropy decoding of all their bytes): ratio_to_naive is the lowest cpu_ratio any decoder reaches
        "decode_floor": cpu["decode_floor"],
        "pipeline_stages_ms": run["stages_ms"],
        "pipeline_cpu_ms": run["cpu_ms"],
        "naive": naive,
    }
    if report_dir:
        from firmware_app.bench_report import write_report

        out["report"] = write_report(report_dir, run["e2e"], out)
    return {"model": f"{m.id}@{m.version}", "capture": out}
