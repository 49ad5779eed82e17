"""The atlas font: text appears where asked, is clipped at the edges, is cached, and fits widths."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_app.display.font import ELLIPSIS, FONT_DIR, Font, draw_text, fit_text, measure

WHITE = (255, 255, 255)


def _ink(canvas: np.ndarray) -> np.ndarray:
    return canvas.reshape(canvas.shape[0], canvas.shape[1], -1).max(axis=2) > 0


def test_text_ink_lies_inside_the_returned_line_box():
    canvas = np.zeros((80, 300, 3), np.uint8)
    x0, y0, x1, y1 = draw_text(canvas, "Free fluid 87%", 20, 15, 24, WHITE)
    ink = _ink(canvas)
    assert ink[y0:y1, x0:x1].sum() > 200  # real glyphs, not a speck
    outside = ink.copy()
    outside[max(y0 - 1, 0) : y1 + 1, max(x0 - 2, 0) : x1 + 2] = False
    assert not outside.any()
    assert canvas.max() == 255  # full coverage reaches the colour


def test_text_colour_is_blended_not_overwritten():
    canvas = np.full((40, 120, 3), 100, np.uint8)
    draw_text(canvas, "HHHH", 5, 5, 24, (0, 0, 200))
    changed = (canvas != 100).any(axis=2)
    assert changed.any()
    px = canvas[changed]
    assert (px[:, 0] <= 100).all() and (px[:, 2] >= 100).all()  # between background and text colour
    assert px[:, 2].max() == 200


@pytest.mark.parametrize("x, y", [(-30, 5), (250, 5), (5, -12), (5, 30), (-1000, -1000), (5000, 10)])
def test_text_is_clipped_at_canvas_edges_without_error(x, y):
    canvas = np.zeros((40, 300, 3), np.uint8)
    draw_text(canvas, "NOT FOR DIAGNOSTIC USE", x, y, 24, WHITE)
    if abs(x) < 1000 and x < 300:
        assert _ink(canvas).any()


def test_text_draws_on_gray_canvases_too():
    canvas = np.zeros((40, 200), np.uint8)
    draw_text(canvas, "AI PENDING", 2, 2, 20, 255)
    assert canvas.max() == 255


def test_anchor_middle_centres_the_text_on_the_point():
    canvas = np.zeros((100, 400, 3), np.uint8)
    draw_text(canvas, "NO SIGNAL", 200, 50, 40, WHITE, anchor="mm")
    ys, xs = np.nonzero(_ink(canvas))
    assert abs((xs.min() + xs.max()) / 2 - 200) <= 3
    assert abs((ys.min() + ys.max()) / 2 - 50) <= 3


def test_bad_anchor_is_refused():
    with pytest.raises(ValueError, match="anchor"):
        draw_text(np.zeros((10, 10, 3), np.uint8), "x", 0, 0, 10, WHITE, anchor="zz")


def test_measure_grows_with_text_and_size():
    w10, h10 = measure("Centroid", 10)
    w20, h20 = measure("Centroid", 20)
    assert w20 > 1.8 * w10 and h20 > 1.8 * h10
    assert measure("Centroid (320, 240) px", 20)[0] > w20


def test_kerning_tightens_av():
    assert measure("AV", 64)[0] < measure("A", 64)[0] + measure("V", 64)[0]


def test_fit_text_truncates_with_an_ellipsis_to_the_width():
    text = "Skipped broken.dcm: not a DICOM file (no preamble)"
    fitted = fit_text(text, 15, 150)
    assert fitted.endswith(ELLIPSIS) and text.startswith(fitted[:-1].rstrip())
    assert measure(fitted, 15)[0] <= 150
    assert fit_text("OK", 15, 150) == "OK"
    canvas = np.zeros((30, 400, 3), np.uint8)
    x0, _, x1, _ = draw_text(canvas, text, 0, 0, 15, WHITE, max_width=150)
    assert x1 - x0 <= 150 and not _ink(canvas)[:, 152:].any()


def test_glyphs_are_scaled_once_per_size_and_strings_cached():
    font = Font.load("sans-bold")
    assert Font.load("sans-bold") is font
    assert font.get(21) is font.get(21.2)
    assert font.render("29.8 fps", 15) is font.render("29.8 fps", 15)


def test_unknown_characters_are_drawn_as_a_placeholder():
    canvas = np.zeros((40, 200, 3), np.uint8)
    draw_text(canvas, "漢字", 2, 2, 20, WHITE)
    assert _ink(canvas).any()


def test_symbols_the_screen_uses_are_in_both_fonts():
    for name in ("sans-bold", "sans"):
        chars = Font.load(name).chars
        assert set("°±µ…×·▲—") <= chars
        assert {chr(c) for c in range(0x20, 0x7F)} <= chars


def test_font_atlases_are_small_and_carry_their_licence():
    files = list(FONT_DIR.glob("*.npz"))
    assert files
    assert sum(p.stat().st_size for p in files) < 300_000
    assert "Bitstream" in (FONT_DIR / "LICENSE-DejaVu.txt").read_text()
