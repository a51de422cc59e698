"""The shapes world (issue 18): every rule of the issue checked on generated scenes, independently of the
generator's own bookkeeping (pixels, geometry), plus the question / instruction formats."""
import itertools
import random
import re

import numpy as np
import pytest

from unimlm_engine.shapes.tasks import (DET_EVAL, POSE_EVAL, SINGLE_WORD, det_sample, pose_sample, pose_shapes,
                                        strip_queries, vqa_sample)
from unimlm_engine.shapes.world import CLASSES, COLOURS, KEYPOINT_NAMES, make_scene

SEEDS = range(120)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(s) for s in SEEDS]


def test_images_objects_and_gaps(scenes):
    counts = set()
    for sc in scenes:
        img = np.asarray(sc.image)
        assert img.shape == (224, 224, 3) and img.dtype == np.uint8
        assert 1 <= len(sc.objects) <= 4
        counts.add(len(sc.objects))
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            assert 28 <= x1 - x0 <= 72 and 28 <= y1 - y0 <= 72
            if o.shape != "triangle":
                assert x1 - x0 == y1 - y0
        for a, b in itertools.combinations(sc.objects, 2):
            gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
            gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gap_x, gap_y) >= 4  # boxes at least 4 px apart
            assert not (a.mask & b.mask).any()
    assert counts == {1, 2, 3, 4}


def test_background_and_colours(scenes):
    for sc in scenes:
        img = np.asarray(sc.image).astype(int)
        fg = np.zeros((224, 224), bool)
        for o in sc.objects:
            fg |= o.mask
            px = img[o.mask]
            assert (px == px[0]).all()  # one flat colour
            assert np.abs(px[0] - np.array(COLOURS[o.colour])).max() <= 15
        bg = img[~fg]
        gray = np.median(bg)
        assert 190 - 2 <= gray <= 235 + 2
        assert 3.0 < bg.std() < 5.0  # per-pixel Gaussian noise, sigma 4 (clipping aside)


def test_masks_are_the_shapes_and_keypoints(scenes):
    for sc in scenes:
        for o in sc.objects:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            w, h = x1 - x0, y1 - y0
            ys, xs = np.nonzero(o.mask)
            assert xs.min() >= x0 and xs.max() <= x1 - 1 and ys.min() >= y0 and ys.max() <= y1 - 1
            area = o.mask.sum()
            want = {"circle": np.pi * w * h / 4, "square": w * h, "triangle": w * h / 2}[o.shape]
            assert abs(area - want) <= 0.12 * want, (o.shape, area, want)
            if o.shape == "square":
                assert area == w * h
            kp = o.keypoints
            assert kp.shape == (len(KEYPOINT_NAMES[o.shape]), 2)
            if o.shape == "square":
                np.testing.assert_allclose(kp, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            elif o.shape == "triangle":
                np.testing.assert_allclose(kp, [[(x0 + x1) / 2, y0], [x1, y1], [x0, y1]])
                # apex up: the top row is narrow, the bottom row spans the box
                top, bottom = o.mask[y0], o.mask[y1 - 1]
                assert top.sum() <= 3 and bottom.sum() >= w - 2


def test_reproducible():
    a, b = make_scene(123), make_scene(123)
    assert a.image.tobytes() == b.image.tobytes()
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    assert make_scene(124).image.tobytes() != a.image.tobytes()


def test_vqa_answers(scenes):
    rng = random.Random(0)
    seen = set()
    for sc in scenes:
        for _ in range(6):
            s = vqa_sample(sc, rng)
            seen.add(s.qtype)
            assert s.question.endswith(" " + SINGLE_WORD)
            assert re.fullmatch(r"[a-z]+|[0-9]", s.answer)
            q = s.question
            names = [o.name for o in sc.objects]
            if q.startswith("How many shapes"):
                assert s.answer == str(len(names))
            elif m := re.match(r"How many (\w+) shapes", q):
                assert s.answer == str(sum(n.startswith(m[1] + " ") for n in names))
            elif m := re.match(r"How many (\w+)s are", q):
                assert s.answer == str(sum(n.endswith(" " + m[1]) for n in names))
            elif m := re.match(r"What color is the (\w+)\?", q):
                hits = [n for n in names if n.endswith(" " + m[1])]
                assert len(hits) == 1 and hits[0] == f"{s.answer} {m[1]}"
            elif m := re.match(r"What shape is the (\w+) object\?", q):
                hits = [n for n in names if n.startswith(m[1] + " ")]
                assert len(hits) == 1 and hits[0] == f"{m[1]} {s.answer}"
            elif m := re.match(r"Is there a (\w+ \w+)\?", q):
                assert s.answer == ("yes" if m[1] in names else "no")
            else:
                raise AssertionError(q)
    assert seen == {"count_all", "count_colour", "count_shape", "colour_of", "shape_of", "exists"}


def test_task_instructions_use_official_formats(scenes):
    sc = scenes[0]
    s = det_sample(sc, random.Random(0), 4, train=False)
    assert s.question == DET_EVAL.replace("<class>", ", ".join(CLASSES))
    assert s.question.startswith("Please perform object detection on this image for identifying red circle, ")
    # the official answer: each class followed by [DET] and the K query tokens, joined by ", "
    assert s.answer == ("Yes, here are the results for " + ", ".join(
        f"{c}[DET][EMB][EMB2][EMB3][EMB4]" for c in CLASSES) + " in the image.")
    assert strip_queries(s.answer).count("[DET]") == 12 and "[EMB" not in strip_queries(s.answer)
    seg = det_sample(sc, random.Random(0), 4, train=False, route="[SEG]")
    assert seg.answer.count("[SEG][EMB][EMB2][EMB3][EMB4]") == 12
    sc = next(x for x in scenes if "triangle" in pose_shapes(x))
    p = pose_sample(sc, random.Random(0), 4, shape="triangle", train=False)
    assert p.question.endswith(" " + POSE_EVAL.replace("<class>", "apex, bottom-right, bottom-left"))
    assert p.answer.count("[DET]") == 4 and p.answer.count("[POSE]") == 3
    assert p.answer.index("[DET]") < p.answer.index("[POSE]")
    # training draws paraphrases and class subsets that always include the classes present
    rng = random.Random(1)
    for sc in scenes[:40]:
        s = det_sample(sc, rng, 4)
        assert set(sc.class_names()) <= set(s.classes)
        assert s.answer.count("[DET]") == len(s.classes)
