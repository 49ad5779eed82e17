"""The backend chain: a board's preference order, each backend's config, the devices (real or test
doubles), threads and the engine cache, in one object that the pipeline, bench, selftest and validate share.

Like gpiozero's pin factory chain, each step down the chain is announced (log warning + an on-screen
notice; "CPU FALLBACK: ..." when it ends on the CPU), never hidden. ``order = ["auto"]`` stands for the
fastest backend of this box that passes the model's golden vectors (firmware_app.backends.select), then
the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from firmware_app import plugins
from firmware_app.backends.base import Backend, BackendPlugin
from firmware_app.errors import BackendUnavailable, BadConfig
from firmware_app.models.store import ModelRef

if TYPE_CHECKING:
    from firmware_app.config import BoardConfig

log = logging.getLogger(__name__)

AUTO = "auto"
CPU = "cpu"


@dataclass
class BackendChoice:
    backend: Backend
    notices: list[str] = field(default_factory=list)  # one per fallback step, shown on screen

    @property
    def fell_back(self) -> bool:
        return bool(self.notices)


def backend_plugins() -> dict[str, type[BackendPlugin]]:
    """Every declared backend, key -> plugin class."""
    return plugins.plugins("backend")


def backend_key(name: str) -> str:
    """A board/bundle name (key or alias) -> its key; BadConfig names the known ones."""
    key = plugins.canonical("backend", name)
    if key is None:
        raise BadConfig(f"unknown backend {name!r}; use {', '.join((*backend_plugins(), AUTO))}")
    return key


def needed_files(keys: Iterable[str]) -> tuple[str, ...]:
    """The model files the backends ``keys`` need, in a stable order."""
    out: list[str] = []
    for key in keys:
        for f in plugins.get("backend", key).files:
            if f not in out:
                out.append(f)
    return tuple(out)


def parse_backend_configs(table: dict[str, Any], where: str) -> dict[str, BackendPlugin]:
    """``[backend.<key>]`` sub-tables -> one validated config per declared backend (defaults otherwise)."""
    out: dict[str, BackendPlugin] = {}
    for key, cls in backend_plugins().items():
        sub = table.get(key, {})
        if not isinstance(sub, dict):
            raise BadConfig(f"{where}: [backend] {key} must be a table [backend.{key}]")
        out[key] = cls.from_table(sub, where)
    return out


@dataclass
class BackendChain:
    order: tuple[str, ...] = (CPU,)
    configs: dict[str, BackendPlugin] = field(default_factory=dict)
    threads: int = 2
    devices: dict[str, Any] = field(default_factory=dict)  # key -> test double (MockEdgeTpu, a TRT runtime)
    engine_cache: str | None = None
    data_dir: str | None = None  # where auto's decision is cached (backends.json)
    allowed: frozenset[str] | None = None  # a bundle's compatible backends (None: all)

    def __post_init__(self) -> None:
        self.order = tuple(o if o == AUTO else backend_key(o) for o in self.order)
        if not self.order:
            raise BadConfig("[backend] order must name at least one backend")

    @classmethod
    def from_board(
        cls,
        board: BoardConfig,
        devices: dict[str, Any] | None = None,
        engine_cache: str | None = None,
        data_dir: str | None = None,
    ) -> BackendChain:
        return cls(
            order=tuple(board.backend["order"]),
            configs=dict(board.backend_configs),
            threads=int(board.backend["threads"]),
            devices=dict(devices or {}),
            engine_cache=engine_cache,
            data_dir=data_dir,
        )

    def config(self, key: str) -> BackendPlugin:
        key = backend_key(key)
        return self.configs.get(key) or backend_plugins()[key]()

    def restricted(self, keys: Iterable[str]) -> BackendChain | None:
        """The same chain limited to ``keys`` (a bundle's compatible backends); None when none is left."""
        allowed = frozenset(backend_key(k) for k in keys) & frozenset(self.candidates())
        if not allowed:
            return None
        order = tuple(k for k in self.order if k == AUTO or k in allowed)
        return replace(self, order=order, allowed=allowed)

    def candidates(self) -> tuple[str, ...]:
        """The order with ``auto`` expanded to every declared backend (accelerators first, the CPU last)."""
        out: list[str] = []
        for item in self.order:
            if item == AUTO:
                ranked = sorted(backend_plugins().values(), key=lambda p: (not p.accelerator, p.key == CPU))
                names = [p.key for p in ranked]
            else:
                names = [item]
            out += [n for n in names if n not in out and (self.allowed is None or n in self.allowed)]
        return tuple(out)

    def resolve(self, model: ModelRef) -> tuple[list[str], list[str]]:
        """The concrete order for ``model`` (``auto`` decided, see select.py) and the notices that says."""
        keys: list[str] = []
        notices: list[str] = []
        for item in self.order:
            if item == AUTO:
                from firmware_app.backends.select import auto_backend

                key, notice = auto_backend(model, self)
                notices.append(notice)
                names = [key, CPU]
            else:
                names = [item]
            keys += [n for n in names if n not in keys and (self.allowed is None or n in self.allowed)]
        return keys, notices

    def open_one(self, key: str, model: ModelRef) -> Backend:
        """Open ``model`` on exactly the backend ``key``; BackendUnavailable when it cannot run here."""
        key = backend_key(key)
        backend = self.config(key).open(model, self.threads, self.devices.get(key), self.engine_cache)
        backend.key = key
        return backend

    def open(self, model: ModelRef, order: Iterable[str] | None = None) -> BackendChoice:
        """The first backend of the chain (or of ``order``) that works for ``model``."""
        if order is None:
            keys, info = self.resolve(model)
        else:
            keys, info = [backend_key(k) for k in order], []
        return self._first(model, keys, info)

    def last_resort(self, backend: Backend) -> bool:
        """Nothing comes after ``backend`` when it fails (it is the CPU)."""
        return (backend.key or plugins.canonical("backend", backend.name) or "") == CPU

    def fall_back(self, model: ModelRef, failed: Backend, exc: BaseException) -> BackendChoice:
        """``failed`` broke at run time: the next backend after it in the chain (the CPU at the end)."""
        keys, _ = self.resolve(model)
        failed_key = failed.key or plugins.canonical("backend", failed.name) or ""
        rest = (
            keys[keys.index(failed_key) + 1 :] if failed_key in keys else [k for k in keys if k != failed_key]
        )
        if CPU not in rest and failed_key != CPU:
            rest.append(CPU)
        step = f"{failed.name} failed mid-run ({exc})"
        log.error("backend %s", step)
        return self._first(model, rest, [], first_notice=step)

    def _first(
        self, model: ModelRef, keys: list[str], info: list[str], first_notice: str = ""
    ) -> BackendChoice:
        steps: list[str] = [first_notice] if first_notice else []
        for key in keys:
            try:
                backend = self.open_one(key, model)
            except BackendUnavailable as exc:
                msg = f"{key} unavailable: {exc}"
                log.warning("backend %s", msg)
                steps.append(msg)
                continue
            if steps:
                log.warning("using backend %s after fallback", backend.name)
                if key == CPU:
                    steps = [f"CPU FALLBACK: {s}" for s in steps]
            return BackendChoice(backend, info + steps)
        raise BackendUnavailable(f"no backend could run model {model.manifest.id}: " + "; ".join(steps))


def make_backend(
    model: ModelRef,
    order: list[str] | tuple[str, ...] = (CPU,),
    threads: int = 2,
    edgetpu_device: str | None = None,
    accelerator: Any = None,
    engine_cache: str | None = None,
    trt_runtime: Any = None,
) -> BackendChoice:
    """Open the first backend of ``order`` that works for ``model`` (a one-off BackendChain).

    ``accelerator`` replaces the real Edge TPU (tests pass firmware_app.backends.edgetpu.MockEdgeTpu);
    ``trt_runtime`` the real TensorRT; ``engine_cache`` is where TensorRT engines are kept.
    """
    configs: dict[str, BackendPlugin] = {}
    if edgetpu_device:
        configs["edgetpu"] = plugins.get("backend", "edgetpu")(device=edgetpu_device)
    devices = {k: v for k, v in (("edgetpu", accelerator), ("tensorrt", trt_runtime)) if v is not None}
    chain = BackendChain(tuple(order), configs, threads, devices, engine_cache)
    return chain.open(model)
