from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest

from firmware_app.backends.base import TensorSpec
from firmware_app.errors import BadModel
from firmware_app.models.manifest import parse_manifest
from firmware_app.stats import dice, upscaled_dice
from firmware_app.tasks import make_postprocessor
from firmware_app.types import Result

SEG = {
    "id": "seg",
    "version": "1.0.0",
    "task": "segmentation",
    "intended_use": "test",
    "cleared_for_clinical_use": False,
    "input": {"width": 8, "height": 8, "color": "gray", "range": [0.0, 1.0]},
    "output": {"labels": ["background", "fluid"], "activation": "softmax"},
    "thresholds": {"alert": 0.5, "alert_min": 0.3, "alert_max": 0.9},
}


def manifest(task="segmentation", **output):
    d = copy.deepcopy(SEG)
    d["task"] = task
    d["output"].update(output)
    return parse_manifest(d, "test")


def int8_spec(shape, scale=0.1, zp=0, index=0):
    return TensorSpec(index, f"o{index}", shape, np.dtype(np.int8), scale, zp)


def test_segmentation_int8_two_channel_softmax_maps_to_frame():
    spec = int8_spec((1, 8, 8, 2), scale=0.1, zp=0)
    raw = np.zeros((1, 8, 8, 2), np.int8)
    raw[0, 2:4, 4:8, 1] = 50  # logit 5.0 for fluid in rows 2-3, cols 4-7
    post = make_postprocessor(manifest(), [spec])
    r = post([raw], 7, (80, 40), 0.5)
    assert r.frame_id == 7 and r.label == "fluid" and r.alert
    assert r.mask.shape == (8, 8)  # the model's resolution; mask_at stretches it over the frame
    full = r.mask_at(80, 40)
    assert full.shape == (40, 80) and full.dtype == np.uint8
    ys, xs = np.nonzero(full)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 19, 40, 79)
    assert r.area_fraction == pytest.approx(8 / 64)
    assert r.centroid == pytest.approx((60.0, 15.0))
    assert r.confidence == pytest.approx(1 / (1 + np.exp(-5.0)), abs=1e-4)
    assert len(r.contours) == 1 and r.contours[0].dtype == np.int32


def test_segmentation_nothing_found_is_not_an_alert():
    spec = int8_spec((1, 8, 8, 2))
    r = make_postprocessor(manifest(), [spec])([np.zeros((1, 8, 8, 2), np.int8)], 1, (8, 8), 0.6)
    assert r.label is None and not r.alert and r.mask.sum() == 0 and r.contours == ()


def test_segmentation_single_channel_float_probability():
    spec = TensorSpec(0, "o", (1, 8, 8, 1), np.dtype(np.float32), 0.0, 0)
    prob = np.zeros((1, 8, 8, 1), np.float32)
    prob[0, :4, :4, 0] = 0.8
    post = make_postprocessor(manifest(activation="none"), [spec])
    r = post([prob], 3, (8, 8), 0.5)
    assert r.mask[:4, :4].all() and r.mask.sum() == 16 and r.confidence == pytest.approx(0.8)
    # the mask is the pixels above [finding] pixel_threshold (0.5); the threshold in force applies to the
    # finding's confidence: above it, the same mask is no finding
    high = post([prob], 3, (8, 8), 0.9)
    assert high.mask.sum() == 16 and high.label is None and not high.alert


def test_segmentation_uint8_output_dequantized_with_its_zero_point():
    spec = TensorSpec(0, "o", (1, 8, 8, 1), np.dtype(np.uint8), 1 / 256, 0)
    raw = np.full((1, 8, 8, 1), 200, np.uint8)  # 0.78
    r = make_postprocessor(manifest(activation="none"), [spec])([raw], 0, (8, 8), 0.5)
    assert r.mask.all() and r.confidence == pytest.approx(200 / 256)


def test_segmentation_channel_count_must_match_labels():
    with pytest.raises(BadModel, match="3 channels"):
        make_postprocessor(manifest(), [int8_spec((1, 8, 8, 3))])


def test_temperature_calibration_softens_confidence():
    spec = int8_spec((1, 8, 8, 2))
    raw = np.zeros((1, 8, 8, 2), np.int8)
    raw[0, 0, 0, 1] = 30  # logit 3
    d = copy.deepcopy(SEG)
    d["calibration"] = {"method": "temperature", "temperature": 2.0}
    hot = make_postprocessor(parse_manifest(d, "t"), [spec])([raw], 0, (8, 8), 0.5)
    cold = make_postprocessor(manifest(), [spec])([raw], 0, (8, 8), 0.5)
    assert cold.confidence == pytest.approx(1 / (1 + np.exp(-3)), abs=1e-4)
    assert hot.confidence == pytest.approx(1 / (1 + np.exp(-1.5)), abs=1e-4)


def test_classification_top_finding_and_heatmap():
    m = manifest("classification", labels=["absent", "b-lines"], heatmap_output=1)
    scores = int8_spec((1, 2), scale=0.1, index=0)
    heat = TensorSpec(1, "h", (1, 4, 4, 1), np.dtype(np.uint8), 0.01, 0)
    post = make_postprocessor(m, [scores, heat])
    hm = np.zeros((1, 4, 4, 1), np.uint8)
    hm[0, 1, 2, 0] = 90
    r = post([np.array([[-20, 20]], np.int8), hm], 5, (64, 64), 0.5)
    assert r.label == "b-lines" and r.alert and r.confidence > 0.95
    assert r.probabilities["absent"] < 0.05
    assert r.heatmap.shape == (4, 4) and r.heatmap[1, 2] == 1.0 and r.heatmap[0, 0] == 0.0
    r = post([np.array([[20, -20]], np.int8), hm], 6, (64, 64), 0.5)
    assert r.label == "absent" and not r.alert and r.heatmap is None  # no finding, no "where"


def test_classification_threshold_decides_alert():
    m = manifest("classification", labels=["absent", "present"])
    post = make_postprocessor(m, [int8_spec((1, 2), scale=0.1)])
    raw = [np.array([[0, 4]], np.int8)]  # p(present) = sigmoid(0.4) = 0.599
    assert post(raw, 0, (8, 8), 0.5).alert
    assert not post(raw, 0, (8, 8), 0.7).alert


def det_manifest(layout):
    return manifest("detection", labels=["background", "nodule"], layout=layout)


def test_detection_ssd_postprocess_boxes_in_frame_pixels():
    specs = [
        TensorSpec(0, "boxes", (1, 3, 4), np.dtype(np.float32), 0.0, 0),
        TensorSpec(1, "classes", (1, 3), np.dtype(np.float32), 0.0, 0),
        TensorSpec(2, "scores", (1, 3), np.dtype(np.float32), 0.0, 0),
        TensorSpec(3, "count", (1,), np.dtype(np.float32), 0.0, 0),
    ]
    boxes = np.array([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9], [0, 0, 1, 1]]], np.float32)
    classes = np.array([[1, 1, 1]], np.float32)
    scores = np.array([[0.6, 0.9, 0.99]], np.float32)
    count = np.array([2], np.float32)  # the third box is beyond the count
    r = make_postprocessor(det_manifest("ssd_postprocess"), specs)(
        [boxes, classes, scores, count], 2, (200, 100), 0.5
    )
    assert len(r.boxes) == 2 and r.label == "nodule" and r.confidence == pytest.approx(0.9)
    b = r.boxes[0]
    assert (b.x0, b.y0, b.x1, b.y1) == pytest.approx((100, 50, 180, 90))
    # a TF2 export that swaps scores and classes is recognised by content
    r2 = make_postprocessor(det_manifest("ssd_postprocess"), specs)(
        [boxes, scores, classes, count], 2, (200, 100), 0.5
    )
    assert [x.score for x in r2.boxes] == pytest.approx([0.9, 0.6])


def test_detection_boxes_scores_applies_nms():
    specs = [
        TensorSpec(0, "boxes", (1, 3, 4), np.dtype(np.float32), 0.0, 0),
        TensorSpec(1, "scores", (1, 3, 2), np.dtype(np.float32), 0.0, 0),
    ]
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.51], [0.6, 0.6, 0.9, 0.9]]], np.float32)
    logits = np.array([[[0, 4], [0, 3], [0, 2]]], np.float32)
    d = copy.deepcopy(SEG)
    d.update(task="detection")
    d["output"] = {"labels": ["background", "nodule"], "activation": "softmax", "layout": "boxes_scores"}
    r = make_postprocessor(parse_manifest(d, "t"), specs)([boxes, logits], 0, (100, 100), 0.5)
    assert len(r.boxes) == 2  # the overlapping duplicate is suppressed
    assert r.boxes[0].score > r.boxes[1].score


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_detection_int8_fast_path_equals_the_float_path(activation):
    """Scores looked up from the raw bytes, boxes dequantized only above the threshold: the same boxes."""
    n = 300
    specs = [
        int8_spec((1, n, 4), scale=1 / 255, zp=-128, index=0),
        int8_spec((1, n, 2), scale=0.05, zp=-1, index=1),
    ]
    d = copy.deepcopy(SEG)
    d.update(task="detection")
    d["output"] = {"labels": ["background", "nodule"], "activation": activation, "layout": "boxes_scores"}
    d["calibration"] = {"method": "platt", "a": 2.5, "b": 0.1} if activation == "sigmoid" else {}
    if not d["calibration"]:
        del d["calibration"]
    post = make_postprocessor(parse_manifest(d, "t"), specs)
    slow = make_postprocessor(parse_manifest(d, "t"), specs)
    slow._fast = None
    assert post._fast is not None
    rng = np.random.default_rng(5)
    for threshold in (0.25, 0.6):
        boxes = rng.integers(-128, 128, size=(1, n, 4), dtype=np.int8)
        boxes[0, :, 2:] = np.maximum(boxes[0, :, 2:], boxes[0, :, :2])  # ymax >= ymin, xmax >= xmin
        scores = rng.integers(-128, 128, size=(1, n, 2), dtype=np.int8)
        a, b = (
            post([boxes, scores], 0, (640, 480), threshold),
            slow([boxes, scores], 0, (640, 480), threshold),
        )
        assert a.boxes and len(a.boxes) == len(b.boxes)
        for x, y in zip(a.boxes, b.boxes):
            assert (x.x0, x.y0, x.x1, x.y1, x.label) == pytest.approx((y.x0, y.y0, y.x1, y.y1, y.label))
            assert x.score == pytest.approx(y.score, abs=1e-6)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-6)


@pytest.mark.parametrize(
    "channels, activation, calibration",
    [
        (2, "softmax", None),
        (2, "softmax", {"method": "temperature", "temperature": 1.8}),
        (2, "none", None),
        (2, "none", {"method": "temperature", "temperature": 1.4}),
        (1, "sigmoid", None),
        (1, "sigmoid", {"method": "platt", "a": 0.7, "b": -0.4}),
        (1, "none", {"method": "temperature", "temperature": 0.6}),
    ],
)
def test_integer_fast_path_equals_the_float_path(channels, activation, calibration):
    d = copy.deepcopy(SEG)
    d["output"]["activation"] = activation
    if calibration:
        d["calibration"] = calibration
    m = parse_manifest(d, "t")
    scale = 1 / 256 if activation == "none" else 0.07
    spec = int8_spec((1, 16, 16, channels), scale=scale, zp=-128 if activation == "none" else 3)
    post = make_postprocessor(m, [spec])
    assert post._table is not None  # the fast path is taken
    rng = np.random.default_rng(channels)
    for threshold in (0.3, 0.5, 0.77):
        raw = rng.integers(-128, 128, size=(1, 16, 16, channels), dtype=np.int8)
        fast = post([raw], 1, (32, 32), threshold)
        probs = post.probability_maps(raw)[..., 0]
        slow_mask = cv2.resize(
            (probs > m.finding.pixel_threshold).astype(np.uint8), (32, 32), interpolation=cv2.INTER_NEAREST
        )
        assert np.array_equal(fast.mask_at(32, 32), slow_mask)
        assert fast.confidence == pytest.approx(float(probs.max()), abs=1e-6)  # no finding-level fit
        assert fast.alert == (fast.confidence >= threshold)


@pytest.mark.parametrize(
    "frame, mask", [((640, 480), (128, 128)), ((641, 479), (128, 100)), ((320, 240), (160, 120))]
)
def test_upscaled_dice_is_the_dice_of_the_full_size_mask(frame, mask):
    """The pipeline's per-frame Dice touches only the mask's bounding box, and equals the full-size figure."""
    fw, fh = frame
    mw, mh = mask
    rng = np.random.default_rng(fw)
    truth = np.zeros((fh, fw), np.uint8)
    cv2.circle(truth, (fw // 2, fh // 3), fw // 6, 1, -1)
    small = (cv2.resize(truth.astype(np.float32), mask, interpolation=cv2.INTER_AREA) > 0.5).astype(np.uint8)
    small[rng.integers(0, mh, 5), rng.integers(0, mw, 5)] = 1  # stray pixels: a wide bounding box
    r = Result(0, "segmentation", "fluid", 0.9, mask=small)
    assert upscaled_dice(small, truth) == dice(r.mask_at(fw, fh), truth)
    assert upscaled_dice(small * 255, truth * 2) == dice(r.mask_at(fw, fh), truth)  # any non-zero is "in"
    assert upscaled_dice(np.zeros_like(small), truth) == 0.0
    assert upscaled_dice(np.zeros_like(small), np.zeros_like(truth)) == 1.0


def _masks(rng, h, w):
    """Masks of every shape the region code meets: empty, full, one pixel in a corner, blobs touching the
    edges, holes, salt noise (many regions), a thin line."""
    yield np.zeros((h, w), np.uint8)
    yield np.ones((h, w), np.uint8)
    for y, x in ((0, 0), (h - 1, w - 1), (0, w - 1), (h // 2, w // 2)):
        m = np.zeros((h, w), np.uint8)
        m[y, x] = 1
        yield m
    for _ in range(12):
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            centre = (int(rng.integers(-5, w + 5)), int(rng.integers(-5, h + 5)))
            cv2.circle(m, centre, int(rng.integers(1, max(2, w // 3))), 1, -1)
        cv2.circle(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, 6)), 0, -1)
        yield m
    for density in (0.02, 0.3):
        yield (rng.random((h, w)) < density).astype(np.uint8)
    m = np.zeros((h, w), np.uint8)
    m[:, w // 3] = 1
    yield m


def _reference_region(post, prob, mask, frame_size, rules):
    """The whole-map computation the box-limited one replaces: moments, contours, features of the map."""
    from firmware_app.tasks.calibrate import sigmoid
    from firmware_app.tasks.segment import finding_features

    mom = cv2.moments(mask, binaryImage=True)
    top = float(prob.max())
    z = rules.intercept + float(np.dot(rules.coef, finding_features(prob, mask)))
    confidence = min(max(float(sigmoid(np.float64(z))), rules.confidence_range[0]), rules.confidence_range[1])
    if mom["m00"] == 0:
        return confidence, top, None, ()
    fw, fh = frame_size
    mh, mw = mask.shape
    sx, sy = fw / mw, fh / mh
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    scale, offset = np.array([sx, sy], np.float32), np.array([sx / 2, sy / 2], np.float32)
    outlines = [(c.reshape(-1, 2).astype(np.float32) * scale + offset).astype(np.int32) for c in contours]
    centroid = ((mom["m10"] / mom["m00"] + 0.5) * sx, (mom["m01"] / mom["m00"] + 0.5) * sy)
    return confidence, top, centroid, outlines


@pytest.mark.parametrize("size, frame", [((16, 16), (64, 48)), ((40, 24), (641, 479))])
def test_segmentation_region_read_in_its_bounding_box_equals_the_whole_map(size, frame):
    """Moments, contours, the map's maximum and the mean inside the mask are read in the mask's bounding
    box: the same figures as over the whole map (the confidence to 1e-9, the rest exactly)."""
    w, h = size
    d = copy.deepcopy(SEG)
    d["input"].update(width=w, height=h)
    d["output"]["activation"] = "none"
    d["finding"] = {
        "features": ["max_logit", "log_area", "mean_logit"],
        "coef": [0.31, 1.87, 1.97],
        "intercept": 6.1,
        "confidence_range": [0.02, 0.99],
    }
    m = parse_manifest(d, "t")
    rng = np.random.default_rng(w)
    for post, quantized in (
        (make_postprocessor(m, [int8_spec((1, h, w, 2), scale=1 / 256, zp=-128)]), True),
        (make_postprocessor(m, [TensorSpec(0, "p", (1, h, w, 1), np.dtype(np.float32), 0.0, 0)]), False),
    ):
        assert (post._table is not None) == quantized
        for mask in _masks(rng, h, w):
            p = np.where(mask > 0, rng.uniform(0.51, 1.0, (h, w)), rng.uniform(0.0, 0.5, (h, w)))
            if quantized:
                q1 = np.clip(np.round(p * 256) - 128, -128, 127)
                raw = np.stack([np.clip(127 - q1, -128, 127), q1], -1)[None].astype(np.int8)
                prob = post._table[post._index(raw[0])]
            else:
                raw = p[None, ..., None].astype(np.float32)
                prob = post.probability_maps(raw)[..., 0]
            mask = (prob > 0.5).view(np.uint8)
            r = post([raw], 0, frame, 0.5)
            confidence, top, centroid, outlines = _reference_region(post, prob, mask, frame, m.finding)
            assert np.array_equal(r.mask, mask)
            assert abs(r.confidence - confidence) <= 1e-9
            assert r.probabilities == {"fluid": top}
            assert r.centroid == centroid
            assert len(r.contours) == len(outlines)
            for got, want in zip(r.contours, outlines):
                assert got.dtype == np.int32 and np.array_equal(got, want)


def _reference_boxes(post, boxes, scores, cls, threshold, fw, fh):
    """Box by box, as the detector once did: what its vectorised arithmetic must equal exactly."""
    keep = np.nonzero(scores >= threshold)[0]
    if post.m.layout == "boxes_scores" and keep.size:
        xywh = [
            [
                float(boxes[i, 1] * fw),
                float(boxes[i, 0] * fh),
                float((boxes[i, 3] - boxes[i, 1]) * fw),
                float((boxes[i, 2] - boxes[i, 0]) * fh),
            ]
            for i in keep
        ]
        picked = cv2.dnn.NMSBoxes(xywh, [float(scores[i]) for i in keep], float(threshold), 0.5)
        keep = keep[np.asarray(picked, dtype=np.int64).reshape(-1)]
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    labels, out = post.m.labels, []
    for i in keep:
        y0, x0, y1, x1 = np.clip(boxes[i], 0.0, 1.0)
        c = int(cls[i])
        label = labels[c] if 0 <= c < len(labels) else f"class {c}"
        out.append((float(x0 * fw), float(y0 * fh), float(x1 * fw), float(y1 * fh), float(scores[i]), label))
    return out, float(scores.max()) if scores.size else 0.0


@pytest.mark.parametrize(
    "layout, quantized", [("boxes_scores", True), ("boxes_scores", False), ("ssd", False)]
)
def test_detection_boxes_are_the_box_by_box_arithmetic_exactly(layout, quantized):
    n, rng = 400, np.random.default_rng(11)
    d = copy.deepcopy(SEG)
    d.update(task="detection")
    labels = ["background", "nodule"] if layout == "boxes_scores" else ["background", "nodule", "mass"]
    d["output"] = {"labels": labels, "activation": "sigmoid", "layout": "ssd_postprocess"}
    if layout == "boxes_scores":
        d["output"]["layout"] = "boxes_scores"
        if quantized:
            specs = [int8_spec((1, n, 4), 1 / 255, -128, 0), int8_spec((1, n, 2), 0.05, -1, 1)]
        else:
            specs = [
                TensorSpec(i, "o", s, np.dtype(np.float32), 0.0, 0)
                for i, s in ((0, (1, n, 4)), (1, (1, n, 2)))
            ]
    else:
        shapes = ((1, n, 4), (1, n), (1, n), (1,))
        specs = [TensorSpec(i, "o", s, np.dtype(np.float32), 0.0, 0) for i, s in enumerate(shapes)]
    post = make_postprocessor(parse_manifest(d, "t"), specs)
    assert (post._fast is not None) == quantized
    for k, threshold in enumerate((0.25, 0.6, 0.97, 1.5)):
        if quantized:
            raw = [
                rng.integers(-128, 128, (1, n, 4)).astype(np.int8),
                rng.integers(-128, 128, (1, n, 2)).astype(np.int8),
            ]
            table, index = post._fast
            boxes, scores, cls = specs[0].dequantize(raw[0])[0], table[index(raw[1][0])], np.ones(n, np.int64)
        else:
            boxes = rng.uniform(-0.2, 1.2, (1, n, 4)).astype(np.float32)
            boxes[0, : n // 4] = boxes[0, 0]  # ties in place and score
            if layout == "boxes_scores":
                raw = [boxes, rng.normal(0, 3, (1, n, 2)).astype(np.float32)]
            else:
                classes = rng.integers(0, 5, (1, n)).astype(np.float32)  # 3 and 4: no label
                scores = rng.uniform(0, 1, (1, n)).astype(np.float32)
                scores[0, : n // 8] = 0.7
                raw = [boxes, classes, scores, np.array([n - 7 * k], np.float32)]
            boxes, scores, cls = post.raw_boxes(raw)
        want, top = _reference_boxes(post, boxes, scores, cls, threshold, 641, 479)
        r = post(raw, 0, (641, 479), threshold)
        assert [(b.x0, b.y0, b.x1, b.y1, b.score, b.label) for b in r.boxes] == want
        assert r.confidence == (want[0][4] if want else top) and r.alert == bool(want)
        assert r.label == (want[0][5] if want else None)


@pytest.mark.parametrize("dtype, zp", [(np.int8, 3), (np.uint8, 128)])
def test_classification_of_one_score_byte_is_the_per_frame_arithmetic(dtype, zp):
    """One quantized score: each of its 256 values decided once at load, as a frame would be."""
    from firmware_app.tasks.calibrate import probabilities

    d = copy.deepcopy(SEG)
    d.update(task="classification")
    d["output"] = {"labels": ["absent", "b-lines"], "activation": "sigmoid", "heatmap_output": 1}
    d["calibration"] = {"method": "platt", "a": 1.9, "b": 0.98}
    m = parse_manifest(d, "t")
    spec = TensorSpec(0, "s", (1, 1), np.dtype(dtype), 0.07, zp)
    heat = int8_spec((1, 3, 4, 1), scale=0.1, index=1)
    post = make_postprocessor(m, [spec, heat])
    assert post._by_byte is not None
    hm = np.arange(12, dtype=np.int8).reshape(1, 3, 4, 1)
    seen = []
    for byte in range(256):
        raw = np.array([[byte]], np.uint8).view(dtype)
        p1 = float(probabilities(spec.dequantize(raw).reshape(-1), "sigmoid", m.calibration)[0])
        probs = np.array([1.0 - p1, p1], np.float32)
        for threshold in (0.2, 0.5, 0.9):
            r = post([raw, hm], byte, (64, 48), threshold)
            alert = float(probs[1]) >= threshold
            top = int(np.argmax(probs))
            assert r.alert == alert and r.probabilities == {
                "absent": float(probs[0]),
                "b-lines": float(probs[1]),
            }
            assert r.label == ("b-lines" if alert else m.labels[top])
            assert r.confidence == (float(probs[1]) if alert else float(probs[top]))
            assert (r.heatmap is not None) == alert
            seen.append(r.probabilities)
    seen[0]["absent"] = -1.0  # each result has its own mapping
    assert all(s["absent"] != -1.0 for s in seen[1:])


@pytest.mark.parametrize(
    "channels, activation, calibration, cut, rule",
    [
        (2, "none", {"method": "temperature", "temperature": 1.7}, 0.5, True),  # the bundled model's
        (2, "none", {"method": "temperature", "temperature": 1.7}, 0.7, False),  # a ratio, not a difference
        (2, "softmax", {"method": "temperature", "temperature": 1.8}, 0.3, True),
        (2, "sigmoid", None, 0.6, None),
        (1, "sigmoid", {"method": "platt", "a": 0.7, "b": -0.4}, 0.5, True),
        (1, "none", None, 0.4, True),
    ],
)
def test_the_mask_from_raw_bytes_is_the_tables_mask(channels, activation, calibration, cut, rule):
    """Where the table's mask is a threshold on the raw values (mask_rule, checked over every index), the
    mask is computed from them and the probabilities read in its box: the same result as the table's
    whole map, frame for frame, empty masks (after which the whole map is read first) included."""
    from dataclasses import fields

    from firmware_app.tasks.segment import mask_rule

    d = copy.deepcopy(SEG)
    d["output"]["activation"] = activation
    d["finding"] = {"pixel_threshold": cut}
    if calibration:
        d["calibration"] = calibration
    m = parse_manifest(d, "t")
    scale, zp = (1 / 256, -128) if activation == "none" else (0.07, 3)
    for dtype in (np.int8, np.uint8):
        if dtype == np.uint8:  # the same real values: probabilities from 0, logits around 0
            zp = 0 if activation == "none" else 128
        spec = TensorSpec(0, "o", (1, 24, 32, channels), np.dtype(dtype), scale, zp)
        post, whole = make_postprocessor(m, [spec]), make_postprocessor(m, [spec])
        whole._rule = None
        assert (post._rule is not None) == bool(rule) or rule is None
        if post._rule is not None:  # the rule is the table's mask over every index
            index = np.arange(256**channels, dtype=np.uint16 if channels == 2 else np.uint8)
            assert np.array_equal(post._rule(index), post._table > cut)
        assert mask_rule(post._table, channels, spec.dtype, 2.0) is None  # nothing is ever above
        rng = np.random.default_rng(channels)
        info = np.iinfo(dtype)
        for i in range(40):
            raw = rng.integers(info.min, info.max + 1, (1, 24, 32, channels)).astype(dtype)
            if i % 3 == 0:  # a frame whose mask is empty (or all but)
                raw[..., -1] = info.min if i % 2 else raw[..., -1] // 8
            a, b = post([raw], i, (320, 240), 0.5), whole([raw], i, (320, 240), 0.5)
            for f in fields(a):
                x, y = getattr(a, f.name), getattr(b, f.name)
                if f.name == "shapes":
                    assert len(x) == len(y)
                    for s, t in zip(x, y):
                        assert type(s) is type(t)
                        for g in fields(s):
                            u, v = getattr(s, g.name), getattr(t, g.name)
                            assert np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v
                else:
                    assert x == y, f.name
