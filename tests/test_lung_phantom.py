"""The lung-ultrasound phantom: deterministic, both labels occur, and B-lines look like B-lines."""

from __future__ import annotations

import time

import numpy as np

from firmware_app.sources.lung_phantom import LungPhantom


def test_same_seed_and_frame_give_identical_pixels_and_label() -> None:
    a = LungPhantom(seed=11).render(321)
    b = LungPhantom(seed=11)
    b.render(5)  # rendering other frames first changes nothing
    img, label = b.render(321)
    assert np.array_equal(a[0], img) and a[1] == label


def test_shapes_and_black_outside_the_imaging_region() -> None:
    for w, h in ((640, 480), (320, 240)):
        ph = LungPhantom(w, h, seed=3)
        img, label = ph.render(0)
        assert img.shape == (h, w) and img.dtype == np.uint8 and label in (0, 1)
        assert img[ph.inside_mask == 0].max() == 0 and img[ph.inside_mask == 1].mean() > 10


def test_both_labels_occur_about_equally_over_seeds() -> None:
    labels = [LungPhantom(seed=s).render(t)[1] for s in range(40) for t in (0, 600)]
    assert 0.3 < np.mean(labels) < 0.7


def test_label_follows_the_b_line_layout_and_changes_with_it() -> None:
    ph = LungPhantom(seed=0)
    seen = set()
    for t in range(0, 40 * ph.layout_frames, ph.layout_frames):
        n_b, _ = ph.layout(t)
        assert ph.render(t)[1] == int(n_b > 0)
        seen.add(int(n_b > 0))
    assert seen == {0, 1}


def test_b_lines_brighten_the_deep_image_and_z_lines_do_not_reach_it() -> None:
    """A B-line runs to the bottom: the deepest quarter of the lung is brighter with B-lines than without."""
    deep_with, deep_without = [], []
    for s in range(30):
        ph = LungPhantom(seed=s)
        for t in range(0, 10 * ph.layout_frames, ph.layout_frames):
            img, label = ph.render(t)
            rows = np.nonzero(ph.inside_mask.any(axis=1))[0]
            deep = img[rows[-1] - (rows[-1] - rows[0]) // 4 : rows[-1]]
            inside = ph.inside_mask[rows[-1] - (rows[-1] - rows[0]) // 4 : rows[-1]] > 0
            (deep_with if label else deep_without).append(np.percentile(deep[inside], 99))
    assert np.median(deep_with) > np.median(deep_without) + 15


def test_a_frame_renders_in_a_few_milliseconds() -> None:
    ph = LungPhantom(seed=5)
    ph.render(0)
    t0 = time.perf_counter()
    for t in range(1, 31):
        ph.render(t)
    assert (time.perf_counter() - t0) / 30 < 0.03
