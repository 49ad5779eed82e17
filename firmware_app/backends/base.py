"""What every backend offers (tensor specs with their quantization, and invoke()), and what every backend
plugin declares (``BackendPlugin``: key, own config keys, model files, accelerator or not, golden tolerance)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from firmware_app.models.store import ModelRef


@dataclass(frozen=True)
class TensorSpec:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float  # 0.0 when not quantized
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Raw output -> float32 (identity for float tensors)."""
        if not self.quantized:
            return raw.astype(np.float32, copy=False)
        return (raw.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)


class Backend:
    name: str = "?"
    key: str = ""  # the plugin that opened it (set by the chain)
    threads: int = 1
    input: TensorSpec
    outputs: list[TensorSpec]

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run the model on one input tensor (shape and dtype of ``self.input``); raw outputs, in order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Tolerance:
    """How closely a backend must reproduce the golden vectors (LiteRT's int8 ``input`` -> raw ``output_k``).

    Differences are measured in quantization steps of the int8 model's output (a float output is
    dequantized-compared and divided by that step). ``exact``: max |diff| <= the manifest's ``[golden] atol``
    (the same LiteRT kernels). Otherwise the 99th percentile and the mean of |diff| per output must stay
    within ``p99_steps`` and ``mean_steps`` (the mean only on outputs of 64 elements or more; for a single
    classification logit p99 is its difference): a float twin or another runtime's int8 kernels differ from
    LiteRT by a few steps nearly everywhere and by many on a few boundary pixels, which max would fail.
    A float model's golden vectors (float outputs) are compared at max |diff| <= max(manifest atol,
    ``float_atol``) in output units.
    """

    exact: bool = True
    p99_steps: float = 0.0
    mean_steps: float = 0.0
    float_atol: float = 0.0
    why: str = "LiteRT int8 kernels: bit-exact up to the manifest's [golden] atol"

    def describe(self, manifest_atol: float) -> str:
        if self.exact:
            return f"max <= {manifest_atol:g} steps"
        return f"p99 <= {self.p99_steps:g} steps, mean <= {self.mean_steps:g} steps"


EXACT = Tolerance()
# A float twin (model.onnx exported from the float model) against LiteRT's int8 golden outputs: on the three
# bundled models the gap measured p99 <= 12.7 steps (detection scores), mean <= 1.6 steps (ONNX Runtime and
# OpenVINO alike, they agree with each other to 1e-5). A float model's float golden outputs: 1e-3.
FLOAT_ONNX = Tolerance(
    exact=False,
    p99_steps=16,
    mean_steps=2,
    float_atol=1e-3,
    why="float ONNX twin vs LiteRT int8: the model's own quantization gap",
)


_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list of strings",
}


@dataclass(frozen=True)
class BackendPlugin:
    """The declaration of one backend: its key (set by ``register``), its own board-TOML keys (the dataclass
    fields, read from ``[backend.<key>]``), the model files it needs, whether it is an accelerator, the
    golden tolerance its numerics need, and ``open`` (the implementation)."""

    key: ClassVar[str] = "?"
    aliases: ClassVar[tuple[str, ...]] = ()
    files: ClassVar[tuple[str, ...]] = ("model.tflite",)
    accelerator: ClassVar[bool] = False
    tolerance: ClassVar[Tolerance] = (
        EXACT  # a plugin whose numerics depend on its config overrides it per instance
    )
    runtime: ClassVar[str] = ""  # the Python distribution that provides it (version in doctor, auto's cache)
    device_field: ClassVar[str | None] = None  # the firmware_app.device.Devices field it takes (a double)
    legacy_keys: ClassVar[dict[str, str]] = {}  # older [backend] keys -> the field of its own they set

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> BackendPlugin:
        """Validate ``[backend.<key>]`` (unknown key, wrong type: one BadConfig line) into a config."""
        from firmware_app.errors import BadConfig

        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in table.items():
            if name not in known:
                allowed = ", ".join(known) or "none"
                raise BadConfig(f"{where}: unknown key [backend.{cls.key}] {name}; allowed: {allowed}")
            want = type(known[name].default) if known[name].default is not MISSING else None
            if known[name].default_factory is not MISSING:  # type: ignore[misc]
                want = type(known[name].default_factory())  # type: ignore[misc]
            ok = want is None or (
                isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
            )
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok, value = True, float(value)
            if want is tuple and isinstance(value, list):
                ok = all(isinstance(v, str) for v in value)  # tuple fields hold strings
            if not ok:
                raise BadConfig(
                    f"{where}: [backend.{cls.key}] {name} must be {_TYPE_NAMES.get(want, want)}, "
                    f"got {type(value).__name__} {value!r}"
                )
            values[name] = tuple(value) if isinstance(value, list) else value
        config = cls(**values)
        config.validate(f"{where}: [backend.{cls.key}]")
        return config

    def validate(self, where: str) -> None:
        """Raise BadConfig for a value out of range (``where`` names the table)."""

    def runtime_version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        if not self.runtime:
            return None
        try:
            return version(self.runtime)
        except PackageNotFoundError:
            return None

    def check(self) -> tuple[str, str]:
        """For ``doctor``: ("ok" | "missing" | "FAULT", what was found)."""
        v = self.runtime_version()
        if self.runtime and v is None:
            return "missing", f"{self.runtime} not installed"
        return "ok", f"{self.runtime} {v}" if v else "available"

    def open(
        self, model: ModelRef, threads: int, device: Any = None, cache_dir: str | None = None
    ) -> Backend:
        """Open ``model`` on this backend. ``device`` replaces the real hardware (a test double);
        ``cache_dir`` is where built engines are kept. BackendUnavailable when it cannot run here."""
        raise NotImplementedError
