"""``synthetic:ultrasound`` and ``synthetic:xray``: deterministic phantoms with ground truth.

Query: ``seed`` (default 0), ``fps`` (default: the board's source fps; 0 = as fast as possible),
``width``/``height`` (default 640x480), ``frames`` (end after N frames; default: endless). With ``fps`` > 0
it is a live source: it paces itself like a probe would, and the pipeline keeps only the newest frame.
With ``fps=0`` it makes the next frame as soon as the previous one is taken (no frame is rendered only to
be dropped): the source for measuring the pipeline's own speed. ``cache=N`` renders N frames once at
open() and cycles through them, so the source costs no CPU per frame, as a capture card's DMA does not.
"""

from __future__ import annotations

import time
from typing import Any

from firmware_app.errors import BadSource
from firmware_app.sources import register
from firmware_app.sources.base import Source, float_param, int_param
from firmware_app.sources.lung_phantom import LungPhantom
from firmware_app.sources.phantom import UltrasoundPhantom, XrayPhantom
from firmware_app.sources.profile import SourceProfile
from firmware_app.sources.region import Region
from firmware_app.types import Frame

KINDS = {"ultrasound": UltrasoundPhantom, "xray": XrayPhantom, "lung": LungPhantom}


@register("synthetic")
class SyntheticSource(Source):
    live = True

    def __init__(
        self,
        uri: str,
        kind: str,
        seed: int = 0,
        fps: float = 30.0,
        width: int = 640,
        height: int = 480,
        frames: int | None = None,
        profile: SourceProfile | None = None,
        cache: int = 0,
    ) -> None:
        super().__init__(uri, profile)
        if kind not in KINDS:
            raise BadSource(f"source {uri!r}: unknown phantom {kind!r}; use {', '.join(KINDS)}")
        self.kind = kind
        self.modality = "DX" if kind == "xray" else "US"
        self.seed, self.fps, self.frames = seed, fps, frames
        self.live = fps > 0
        self.cache = cache
        self._cached: list[tuple] = []
        self.phantom = KINDS[kind](width=width, height=height, seed=seed)
        if hasattr(self.phantom, "mm_per_px"):  # the phantom knows its scale and where its probe is
            mm = float(self.phantom.mm_per_px)
            self.region = Region((0, 0, width, height), "full_frame", (mm, mm), float(self.phantom.face_y))
        self._t = 0
        self._next_due = 0.0

    @classmethod
    def from_uri(cls, uri, target, params, *, profile, options: dict[str, Any]) -> SyntheticSource:
        unknown = set(params) - {"seed", "fps", "width", "height", "frames", "cache"}
        if unknown:
            raise BadSource(f"source {uri!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        frames = int_param(uri, params, "frames", 0, minimum=1) if "frames" in params else None
        return cls(
            uri,
            target,
            seed=int_param(uri, params, "seed", 0),
            fps=float_param(uri, params, "fps", float(options.get("fps", 30.0))),
            width=int_param(uri, params, "width", 640, minimum=32),
            height=int_param(uri, params, "height", 480, minimum=32),
            frames=frames,
            profile=profile,
            cache=int_param(uri, params, "cache", 0),
        )

    def open(self) -> None:
        if self.cache and not self._cached:
            self._cached = [self._render(t) for t in range(self.cache)]

    def _render(self, t: int) -> tuple:
        if self.kind == "ultrasound":
            img, mask = self.phantom.render(t)
            return img, mask, None, {}
        if self.kind == "lung":  # a frame-level label (B-lines present), no mask
            img, label = self.phantom.render(t)
            return img, None, None, {"label": int(label)}
        img, mask, boxes = self.phantom.render(t)
        return img, mask, tuple(boxes), {}

    def read(self) -> Frame | None:
        if self.stopping.is_set() or (self.frames is not None and self._t >= self.frames):
            return None
        if self.fps > 0:
            now = time.monotonic()
            if self._next_due == 0.0:
                self._next_due = now
            delay = self._next_due - now
            if delay > 0 and self.stopping.wait(delay):
                return None
            # a consumer that fell far behind does not get a burst of catch-up frames
            self._next_due = max(self._next_due + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)
        t = self._t
        self._t += 1
        img, mask, boxes, extra = self._cached[t % self.cache] if self._cached else self._render(t)
        meta = {"phantom": self.kind, "seed": self.seed, "t": t, **extra}
        return self.make_frame(img, meta, truth=mask, truth_boxes=boxes)
