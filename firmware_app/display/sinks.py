"""Displays: where the composed screen goes. One small interface, registered by URI scheme.

Like picamera2's ``Output``, the producer does not know which display it feeds::

    with open_display("fb:/dev/fb0") as display:
        screen = Screen(*display.size)
        display.show(screen.render(state))

URIs: ``fb:/dev/fb0`` (Linux framebuffer; geometry, depth and stride from ``/sys/class/graphics/fb0/``),
``png:DIR`` (``DIR/last_frame.png``; ``?every=N`` also keeps every N-th frame as ``frame_000001.png`` ...),
``video:PATH`` (.mp4 with mp4v, .avi or anything else with MJPG), ``null``.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import time
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs

import cv2
import numpy as np

from firmware_app import plugins
from firmware_app.errors import BadDisplay

log = logging.getLogger(__name__)


def register_display(cls: type[Display]) -> type[Display]:
    """Class decorator: declare ``cls`` as the display plugin reachable as ``<cls.scheme>:...``."""
    return plugins.register("display", cls.scheme)(cls)


def display_classes() -> dict[str, type[Display]]:
    """scheme -> display plugin (firmware_app.plugins)."""
    return plugins.plugins("display")


class Display:
    """Base of every display. ``size`` is (width, height): the canvas ``show`` accepts."""

    scheme: ClassVar[str] = ""
    # the device has a size of its own (a framebuffer): the screen is rendered at it, the others follow
    dictates_size: ClassVar[bool] = False

    @classmethod
    def absent(cls, target: str) -> bool:
        """The device this URI names is not attached (the box then runs headless, announced)."""
        return False

    @classmethod
    def check(cls, uri: str, target: str) -> tuple[str, str]:
        """For ``doctor``: ("ok" | "missing" | "fault", what was found)."""
        return "ok", f"board display {uri}"

    def __init__(self, uri: str, size: tuple[int, int]) -> None:
        self.uri = uri
        self.size = (int(size[0]), int(size[1]))
        self.frames_shown = 0
        self._opened = False
        self._closed = False

    @classmethod
    def from_uri(
        cls, uri: str, target: str, params: dict[str, str], size: tuple[int, int], fps: float, sysfs_root: str
    ) -> Display:
        raise NotImplementedError

    def open(self) -> None:
        """Acquire the device or file. Safe to call twice."""
        self._opened = True

    def show(self, canvas: np.ndarray) -> None:
        """Put one BGR uint8 HxWx3 canvas (``size``) on the display."""
        if not self._opened or self._closed:
            raise RuntimeError(f"{self.uri}: show() on a display that is not open")
        self._check(canvas)
        self._show(canvas)
        self.frames_shown += 1

    def _show(self, canvas: np.ndarray) -> None:
        pass

    def close(self) -> None:
        """Release everything; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._opened:
            self._close()

    def _close(self) -> None:
        pass

    def _check(self, canvas: np.ndarray) -> None:
        w, h = self.size
        if canvas.shape != (h, w, 3) or canvas.dtype != np.uint8:
            raise ValueError(
                f"{self.uri}: canvas {canvas.shape} {canvas.dtype}, expected ({h}, {w}, 3) uint8 "
                f"(render at display.size)"
            )

    def __enter__(self) -> Display:
        if not self._opened:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri} {self.size[0]}x{self.size[1]}>"


def _no_params(uri: str, params: dict[str, str]) -> None:
    if params:
        raise BadDisplay(f"display {uri!r}: unknown option(s) {', '.join(sorted(params))}")


def _size_params(uri: str, params: dict[str, str], size: tuple[int, int]) -> tuple[int, int]:
    """``?width=W&height=H`` (either or both) chooses the canvas size, else ``size`` (the board's)."""
    out = list(size)
    for i, key in enumerate(("width", "height")):
        if key in params:
            text = params.pop(key)
            if not text.isdigit() or not 16 <= int(text) <= 8192:
                raise BadDisplay(
                    f"display {uri!r}: {key}={text!r} is not a whole number of pixels in 16..8192"
                )
            out[i] = int(text)
    if min(out) <= 0:
        raise BadDisplay(f"display {uri!r}: give both width and height")
    return out[0], out[1]


def requested_size(uri: str) -> tuple[int, int] | None:
    """The (width, height) a png:/video: URI asks for with ``?width=&height=``, else None: the screen is
    rendered at that size (``run`` sets it as the board's display size)."""
    scheme, _, params = parse_display_uri(uri)
    if scheme not in ("png", "video") or not ({"width", "height"} & params.keys()):
        return None
    return _size_params(uri, params, (0, 0))


@register_display
class NullDisplay(Display):
    """Discards every canvas (counts them)."""

    scheme = "null"

    @classmethod
    def from_uri(cls, uri, target, params, size, fps, sysfs_root):
        _no_params(uri, params)
        if target:
            raise BadDisplay(f"display {uri!r}: null takes no path (use 'null')")
        return cls(uri, size)


@register_display
class FramebufferDisplay(Display):
    """A Linux framebuffer device: 16 bpp (RGB565) or 32 bpp (B, G, R, X bytes), any stride.

    The geometry comes from ``{sysfs_root}/fbN/`` (``virtual_size``, ``bits_per_pixel``, ``stride``); the
    canvas must be exactly that size. A character device is mmapped; a regular file (tests, a capture of
    what would be shown) is rewritten from offset 0 on every ``show``.
    """

    scheme = "fb"
    dictates_size = True

    @classmethod
    def absent(cls, target: str) -> bool:
        return not Path(target).exists()

    @classmethod
    def check(cls, uri: str, target: str) -> tuple[str, str]:
        dev = Path(target)
        sysfs = Path("/sys/class/graphics") / dev.name
        if not dev.exists():
            return "missing", f"{dev} not found (board display {uri}); the daemon runs headless"
        try:
            size = (sysfs / "virtual_size").read_text().strip()
            bpp = (sysfs / "bits_per_pixel").read_text().strip()
        except OSError as exc:
            return "fault", f"{dev}: cannot read {sysfs} ({exc})"
        if not os.access(dev, os.W_OK):
            return "fault", f"{dev} ({size}, {bpp} bpp) is not writable: add the user to 'video'"
        return "ok", f"{dev} {size} {bpp} bpp"

    def __init__(self, uri: str, device: str, sysfs_root: str) -> None:
        self.device = device
        name = os.path.basename(device.rstrip("/"))
        self.sysfs_dir = Path(sysfs_root) / name
        width, height, self.bpp, self.stride = self._read_geometry(uri)
        super().__init__(uri, (width, height))
        self._file = None
        self._mmap: mmap.mmap | None = None
        self._buf: np.ndarray | None = None  # (height, stride) bytes: what goes to the device

    @classmethod
    def from_uri(cls, uri, target, params, size, fps, sysfs_root):
        _no_params(uri, params)
        return cls(uri, target or "/dev/fb0", sysfs_root)

    def _read(self, uri: str, key: str) -> str:
        path = self.sysfs_dir / key
        try:
            return path.read_text().strip()
        except OSError as e:
            raise BadDisplay(f"display {uri!r}: cannot read {path} ({e.strerror or e})") from None

    def _read_geometry(self, uri: str) -> tuple[int, int, int, int]:
        size_text = self._read(uri, "virtual_size")
        bpp_text = self._read(uri, "bits_per_pixel")
        stride_text = self._read(uri, "stride")
        try:
            width, height = (int(v) for v in size_text.replace("x", ",").split(","))
            bpp, stride = int(bpp_text), int(stride_text)
        except ValueError:
            raise BadDisplay(
                f"display {uri!r}: unreadable geometry in {self.sysfs_dir} "
                f"(virtual_size={size_text!r}, bits_per_pixel={bpp_text!r}, stride={stride_text!r})"
            ) from None
        if bpp not in (16, 32):
            raise BadDisplay(f"display {uri!r}: {bpp} bits per pixel is not supported (16 or 32)")
        if width <= 0 or height <= 0 or stride < width * bpp // 8:
            raise BadDisplay(f"display {uri!r}: bad geometry {width}x{height}, stride {stride} bytes")
        # A double-buffered fb has a virtual height twice the visible one; the visible mode says which.
        try:
            mode = (self.sysfs_dir / "modes").read_text().split()[0]  # e.g. "U:800x480p-0"
            mw, mh = (int(v) for v in mode.split(":")[-1].split("p")[0].split("x"))
            if mw == width and 0 < mh < height:
                height = mh
        except (OSError, ValueError, IndexError):
            pass
        return width, height, bpp, stride

    def open(self) -> None:
        if self._opened:
            return
        try:
            st = os.stat(self.device)
            self._file = open(self.device, "r+b", buffering=0)  # noqa: SIM115 - held until close()
        except FileNotFoundError:
            raise BadDisplay(f"display {self.uri!r}: {self.device} does not exist") from None
        except OSError as e:
            raise BadDisplay(f"display {self.uri!r}: cannot open {self.device} ({e.strerror or e})") from None
        w, h = self.size
        nbytes = self.stride * h
        if stat.S_ISCHR(st.st_mode):
            try:
                self._mmap = mmap.mmap(
                    self._file.fileno(), nbytes, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ
                )
            except (OSError, ValueError) as e:
                self._file.close()
                raise BadDisplay(
                    f"display {self.uri!r}: cannot map {nbytes} bytes of {self.device} ({e})"
                ) from None
            self._buf = np.frombuffer(self._mmap, np.uint8, nbytes).reshape(h, self.stride)
        else:
            self._buf = np.zeros((h, self.stride), np.uint8)
        bpp_bytes = self.bpp // 8
        # The visible pixels as an (h, w, bytes) view that skips the stride padding; convert straight into
        # it when OpenCV can write through the padded view, else into a staging buffer and copy.
        self._pixels = self._buf[:, : w * bpp_bytes].reshape(h, w, bpp_bytes)
        probe = np.zeros((1, 1, 3), np.uint8)
        code = cv2.COLOR_BGR2BGR565 if self.bpp == 16 else cv2.COLOR_BGR2BGRA
        row = self._pixels[:1, :1]
        self._staging = (
            None if cv2.cvtColor(probe, code, dst=row) is row else np.empty((h, w, bpp_bytes), np.uint8)
        )
        self._opened = True
        log.info("%s: %dx%d, %d bpp, stride %d bytes", self.uri, w, h, self.bpp, self.stride)

    def _show(self, canvas: np.ndarray) -> None:
        out = self._staging if self._staging is not None else self._pixels
        code = cv2.COLOR_BGR2BGR565 if self.bpp == 16 else cv2.COLOR_BGR2BGRA
        cv2.cvtColor(canvas, code, dst=out)
        if self._staging is not None:
            self._pixels[:] = self._staging
        if self._mmap is None:
            self._file.seek(0)
            self._file.write(memoryview(self._buf).cast("B"))

    def _close(self) -> None:
        self._buf = self._pixels = self._staging = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._file is not None:
            self._file.close()
            self._file = None


@register_display
class PngDisplay(Display):
    """``DIR/last_frame.png``, rewritten atomically at most ``max_rate`` times a second and on close (so it
    is exactly the last canvas shown); with ``?every=N`` also every N-th canvas as ``frame_NNNNNN.png``."""

    scheme = "png"
    max_rate = 2.0

    def __init__(self, uri: str, directory: str, size: tuple[int, int], every: int = 0) -> None:
        super().__init__(uri, size)
        self.directory = Path(directory)
        self.every = every
        self.last_path = self.directory / "last_frame.png"
        self._last = np.zeros((self.size[1], self.size[0], 3), np.uint8)
        self._have_last = False
        self._last_written = True
        self._last_write_t = -1e9

    @classmethod
    def from_uri(cls, uri, target, params, size, fps, sysfs_root):
        if not target:
            raise BadDisplay(f"display {uri!r}: png needs a folder, e.g. png:/tmp/screen")
        every = params.pop("every", "0")
        size = _size_params(uri, params, size)
        _no_params(uri, params)
        try:
            n = int(every)
            if n < 0:
                raise ValueError
        except ValueError:
            raise BadDisplay(f"display {uri!r}: every={every!r} is not a whole number >= 0") from None
        return cls(uri, target, size, n)

    def open(self) -> None:
        if self._opened:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadDisplay(
                f"display {self.uri!r}: cannot create {self.directory} ({e.strerror or e})"
            ) from None
        if not os.access(self.directory, os.W_OK):
            raise BadDisplay(f"display {self.uri!r}: {self.directory} is not writable")
        self._opened = True

    def _show(self, canvas: np.ndarray) -> None:
        np.copyto(self._last, canvas)  # the screen reuses its buffer
        self._have_last = True
        self._last_written = False
        index = self.frames_shown + 1
        if self.every and index % self.every == 0:
            self._write(self.directory / f"frame_{index:06d}.png", self._last)
        now = time.monotonic()
        if now - self._last_write_t >= 1.0 / self.max_rate:
            self._write_last()
            self._last_write_t = now

    def _write_last(self) -> None:
        self._write(self.last_path, self._last)
        self._last_written = True

    def _write(self, path: Path, image: np.ndarray) -> None:
        ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise OSError(f"{self.uri}: PNG encoding failed")
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, path)

    def _close(self) -> None:
        if self._have_last and not self._last_written:
            self._write_last()


@register_display
class VideoDisplay(Display):
    """A video file: .mp4 with the mp4v codec, .avi (or any other name) with MJPG."""

    scheme = "video"

    def __init__(self, uri: str, path: str, size: tuple[int, int], fps: float) -> None:
        super().__init__(uri, size)
        self.path = Path(path)
        self.fps = float(fps)
        self._writer: cv2.VideoWriter | None = None

    @classmethod
    def from_uri(cls, uri, target, params, size, fps, sysfs_root):
        size = _size_params(uri, params, size)
        _no_params(uri, params)
        if not target:
            raise BadDisplay(f"display {uri!r}: video needs a file name, e.g. video:/tmp/screen.mp4")
        if not fps or fps <= 0:
            raise BadDisplay(f"display {uri!r}: frame rate {fps!r} must be > 0")
        return cls(uri, target, size, fps)

    def open(self) -> None:
        if self._opened:
            return
        fourcc = "mp4v" if self.path.suffix.lower() in (".mp4", ".m4v", ".mov") else "MJPG"
        if not self.path.parent.is_dir():
            raise BadDisplay(f"display {self.uri!r}: folder {self.path.parent} does not exist")
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*fourcc), self.fps, self.size)
        if not writer.isOpened():
            writer.release()
            raise BadDisplay(f"display {self.uri!r}: cannot write {self.path} with codec {fourcc}")
        self._writer = writer
        self._opened = True

    def _show(self, canvas: np.ndarray) -> None:
        self._writer.write(canvas)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def parse_display_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """``scheme:target?k=v`` -> (scheme, target, params). ``null`` alone is accepted."""
    if not isinstance(uri, str) or not uri.strip():
        raise BadDisplay(f"display {uri!r}: empty URI (schemes: {_schemes()})")
    text = uri.strip()
    if ":" not in text:
        if text in display_classes() and text == "null":
            return text, "", {}
        raise BadDisplay(f"display {uri!r}: expected SCHEME:TARGET (schemes: {_schemes()})")
    scheme, rest = text.split(":", 1)
    scheme = scheme.lower()
    if scheme not in display_classes():
        raise BadDisplay(f"display {uri!r}: unknown scheme {scheme!r} (schemes: {_schemes()})")
    target, _, query = rest.partition("?")
    params: dict[str, str] = {}
    if query:
        try:
            parsed = parse_qs(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise BadDisplay(f"display {uri!r}: malformed options {query!r}") from None
        for k, v in parsed.items():
            if len(v) != 1:
                raise BadDisplay(f"display {uri!r}: option {k!r} given {len(v)} times")
            params[k] = v[0]
    return scheme, target, params


def _schemes() -> str:
    return ", ".join(f"{s}:" for s in sorted(display_classes()))


def open_display(
    uri: str,
    size: tuple[int, int] = (800, 480),
    fps: float = 30.0,
    sysfs_root: str = "/sys/class/graphics",
) -> Display:
    """Build and open the display a URI names. ``size`` is used by displays that have no size of their
    own (png, video, null); a framebuffer dictates its own: render at ``display.size``."""
    scheme, target, params = parse_display_uri(uri)
    if len(size) != 2 or min(size) <= 0:
        raise BadDisplay(f"display {uri!r}: bad size {size!r}")
    display = display_classes()[scheme].from_uri(uri, target, params, tuple(size), fps, sysfs_root)
    display.open()
    return display
