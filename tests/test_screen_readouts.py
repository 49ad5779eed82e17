"""Screen readouts: long messages keep the file they name, no frame rate under NO SIGNAL, and a png: or
video: display's size chosen in its URI."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_app.display.screen import Screen, ScreenState, shorten_middle
from firmware_app.display.sinks import open_display, requested_size
from firmware_app.errors import BadDisplay
from firmware_app.types import Frame

LONG = (
    "Skipped /media/usb/export/2026-12-01/study-0042/series-003/IM000123_corrupt_header.dcm: not a DICOM file"
)


def _state(**kw) -> ScreenState:
    frame = Frame(id=1, t_capture_ns=0, pixels=np.full((480, 640), 90, np.uint8))
    base = dict(model_id="us-fluid-seg", model_version="1.0.0", backend="litert-cpu", task="segmentation")
    return ScreenState(frame=frame, result=None, **{**base, **kw})


def _drawn_texts(screen: Screen, state: ScreenState) -> list[str]:
    texts: list[str] = []
    real = screen._text

    def spy(canvas, text, *a, **k):
        texts.append(text)
        return real(canvas, text, *a, **k)

    screen._text = spy  # type: ignore[method-assign]
    screen.render(state)
    return texts


def test_a_long_message_is_shortened_in_the_middle_keeping_the_file_name() -> None:
    screen = Screen(800, 480)
    texts = _drawn_texts(screen, _state(messages=(LONG,)))
    shown = next(t for t in texts if t.startswith("Skipped"))
    assert shown.startswith("Skipped …") and "header.dcm" in shown  # the file's name, not its folders


def test_shorten_middle_keeps_start_and_end_of_the_last_path() -> None:
    out = shorten_middle(LONG, lambda t: len(t) <= 60)
    assert out == "Skipped …IM000123_corrupt_header.dcm: not a DICOM file"
    assert shorten_middle(LONG, lambda t: len(t) <= 40) == "Skipped …IM000123_corrupt_header.dcm…"
    no_path = shorten_middle("a rather long message without any path in it at all", lambda t: len(t) <= 21)
    assert no_path == "a rather l… it at all"  # its start and its end
    assert shorten_middle("short", lambda t: len(t) <= 60) == "short"


def test_frame_rate_readout_shows_a_dash_under_no_signal() -> None:
    screen = Screen(800, 480)
    live = _drawn_texts(screen, _state(fps=29.7, latency_ms=41.0))
    assert "29.7 fps" in live and "41 ms" in live
    screen = Screen(800, 480)
    lost = _drawn_texts(screen, _state(fps=29.7, latency_ms=41.0, no_signal=True))
    assert "— fps" in lost and "— ms" in lost
    assert "29.7 fps" not in lost


@pytest.mark.parametrize("scheme", ["png", "video"])
def test_png_and_video_displays_take_width_and_height_from_the_uri(tmp_path, scheme) -> None:
    target = tmp_path / ("screen" if scheme == "png" else "screen.avi")
    uri = f"{scheme}:{target}?width=1920&height=1080"
    assert requested_size(uri) == (1920, 1080)
    with open_display(uri, size=(800, 480)) as d:
        assert d.size == (1920, 1080)
        d.show(np.zeros((1080, 1920, 3), np.uint8))
    assert requested_size(f"{scheme}:{target}") is None
    with pytest.raises(BadDisplay, match="width"):
        open_display(f"{scheme}:{target}?width=wide&height=1080")


def test_run_renders_the_screen_at_the_size_the_png_uri_asks_for(tmp_path) -> None:
    import cv2

    from firmware_app import cli

    out = tmp_path / "png"
    code = cli.main(
        [
            "run",
            "--frames",
            "2",
            "--display",
            f"png:{out}?width=1280&height=720",
            "--data-dir",
            str(tmp_path / "d"),
        ]
    )
    assert code == 0
    assert cv2.imread(str(out / "last_frame.png")).shape == (720, 1280, 3)
