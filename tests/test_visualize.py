"""visualize: drawing changes pixels where the results are and nowhere else; saving round-trips."""
import numpy as np
import pytest
import torch
from PIL import Image

from unimlm_engine.model.decoders import DetectionResult, GenerationResult, PoseResult
from unimlm_engine.outputs.visualize import (COCO_SKELETON, color_for, draw_boxes, draw_keypoints, draw_result,
                                     overlay_masks, save_images, save_result)

H, W = 83, 111  # odd sizes


def base(seed=0):
    """Smooth-ish background so drawn colours are distinguishable."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(60, 190, (H, W, 3), dtype=np.uint8))


def changed(a, b):
    """[H, W] bool: pixels that differ between two images."""
    return (np.asarray(a, np.int16) != np.asarray(b, np.int16)).any(-1)


def near_boxes(boxes, margin):
    """[H, W] bool: pixels within `margin` of some box (the box region grown by margin)."""
    ys, xs = np.mgrid[0:H, 0:W]
    out = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in boxes:
        out |= (xs >= x0 - margin) & (xs <= x1 + margin) & (ys >= y0 - margin) & (ys <= y1 + margin)
    return out


BOXES = [[10.0, 12.0, 70.0, 50.0], [75.0, 55.0, 105.0, 78.0]]


@pytest.mark.parametrize("tags", ["no-tags", "labels-scores"])
def test_boxes_change_only_box_pixels(tags):
    img = base()
    before = np.asarray(img).copy()
    labels, scores = (["cat", "x"], torch.tensor([0.91, 0.5])) if tags == "labels-scores" else (None, None)
    out = draw_boxes(img, torch.tensor(BOXES), labels, scores, width=2)
    assert np.array_equal(np.asarray(img), before)  # input untouched
    diff = changed(out, img)
    assert not diff[~near_boxes(BOXES, 2)].any()  # nothing far from the boxes
    for i, (x0, y0, x1, y1) in enumerate(BOXES):  # each outline is drawn, in its colour
        for x, y in ((int(x0), int((y0 + y1) / 2)), (int(x1), int((y0 + y1) / 2)), (int((x0 + x1) / 2), int(y1))):
            assert diff[y, x] and tuple(np.asarray(out)[y, x]) == color_for(i)
        inner = diff[int(y0) + 15:int(y1) - 3, int(x0) + 3:int(x1) - 3]
        assert not inner.any()  # box interior below the tag untouched
    if tags == "labels-scores":
        assert diff[14:22, 14:40].any()  # the "cat 0.91" tag inside the first box's corner


def test_masks_blend_exactly_inside_and_nowhere_else():
    img = base(1)
    masks = np.zeros((2, H, W), bool)
    masks[0, 5:30, 7:50] = True
    masks[1, 40:70, 60:100] = True
    out = overlay_masks(img, torch.from_numpy(masks), alpha=0.25)
    src, res = np.asarray(img, np.float64), np.asarray(out, np.float64)
    for i in range(2):
        want = np.rint(0.75 * src[masks[i]] + 0.25 * np.asarray(color_for(i), np.float64))
        np.testing.assert_array_equal(res[masks[i]], want)
    outside = ~(masks[0] | masks[1])
    np.testing.assert_array_equal(res[outside], src[outside])
    assert np.array_equal(np.asarray(overlay_masks(img, masks, alpha=0.0)), np.asarray(img))


def _person():
    """One COCO-17 person: points on a grid, keypoint 0 (nose) invisible."""
    pts = np.array([[20 + 4 * (k % 5), 10 + 12 * (k // 5), 1.0] for k in range(17)], np.float32)
    pts[0, 2] = 0.0
    return pts[None]


def test_keypoints_dots_and_coco_skeleton():
    img = base(2)
    kp = _person()
    out = draw_keypoints(img, kp, threshold=0.5, radius=2)
    diff = changed(out, img)
    ys, xs = np.mgrid[0:H, 0:W]
    near = np.zeros((H, W), bool)
    for a, b in COCO_SKELETON:  # everything changed lies on a limb or a dot
        if a and b:
            p, q = kp[0, a, :2], kp[0, b, :2]
            t = ((xs - p[0]) * (q[0] - p[0]) + (ys - p[1]) * (q[1] - p[1])) / max(np.sum((q - p) ** 2), 1e-9)
            t = np.clip(t, 0, 1)  # projection of each pixel onto the limb segment
            near |= np.hypot(xs - (p[0] + t * (q[0] - p[0])), ys - (p[1] + t * (q[1] - p[1]))) <= 3
    assert not diff[~near].any()
    for k in range(1, 17):
        x, y = kp[0, k, :2].astype(int)
        assert diff[y, x]
    x0, y0 = kp[0, 0, :2].astype(int)
    assert not diff[y0 - 1:y0 + 2, x0 - 1:x0 + 2].any()  # invisible nose: no dot, no limbs
    dots = kp[0, 1:, :2]
    checked = 0
    for a, b in COCO_SKELETON:  # every limb between visible points: its midpoint (away from dots) is drawn
        mid = (kp[0, a, :2] + kp[0, b, :2]) / 2
        if a and b and np.hypot(*(dots - mid).T).min() > 3:
            assert diff[int(round(mid[1])), int(round(mid[0]))], (a, b)
            checked += 1
    assert checked >= 6


def test_keypoints_no_skeleton_unless_17():
    img = base(3)
    kp = np.array([[[10, 10], [60, 60]]], np.float32)
    diff = changed(draw_keypoints(img, kp, radius=1), img)
    assert diff[10, 10] and diff[60, 60] and not diff[35, 35]


def test_draw_result_detection_and_pose():
    img = base(4)
    masks = torch.zeros(1, H, W, dtype=torch.bool)
    masks[0, 15:40, 15:60] = True
    det = DetectionResult(torch.tensor(BOXES[:1]), torch.tensor([0.8]), torch.tensor([1]), masks)
    out = draw_result(img, det, class_names=["dog", "cat"])
    diff = changed(out, img)
    assert diff[30, 30] and not diff[~(near_boxes(BOXES[:1], 2) | masks[0].numpy())].any()
    assert not np.array_equal(np.asarray(out), np.asarray(draw_result(img, det, class_names=["cat", "dog"])))
    with pytest.raises(ValueError, match="out of range"):
        draw_result(img, det, class_names=["dog"])
    pose = PoseResult(torch.tensor(BOXES[:1]), torch.tensor([0.9]), torch.tensor([0]), torch.from_numpy(_person()))
    assert changed(draw_result(img, pose, threshold=0.5), img)[int(_person()[0, 5, 1]), int(_person()[0, 5, 0])]


def test_save_images_and_results(tmp_path):
    imgs = [base(5), base(6).convert("L")]
    paths = save_images(imgs, str(tmp_path / "out"), "gen")
    assert [p.split("/")[-1] for p in paths] == ["gen_0.png", "gen_1.png"]
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(imgs[0]))
    assert Image.open(paths[1]).mode == "RGB"
    res = GenerationResult(route="[GEN]", images=imgs[:1], seeds=[3])
    assert len(save_result(res, None, str(tmp_path), "req0")) == 1
    det = DetectionResult(torch.tensor(BOXES), torch.tensor([0.8, 0.7]), torch.tensor([0, 1]), None)
    (p,) = save_result(det, imgs[0], str(tmp_path), "req1")
    assert np.array_equal(np.asarray(Image.open(p)), np.asarray(draw_result(imgs[0], det)))
    with pytest.raises(ValueError, match="input image"):
        save_result(det, None, str(tmp_path), "req2")
    with pytest.raises(ValueError, match="prefix"):
        save_images(imgs, str(tmp_path), "a/b")


@pytest.mark.parametrize("call,match", [
    (lambda im: draw_boxes(im, np.zeros((2, 3))), r"\[N, 4\]"),
    (lambda im: draw_boxes(im, np.zeros((2, 4)), labels=["a"]), "labels: 1 entries for 2 boxes"),
    (lambda im: overlay_masks(im, np.zeros((1, 5, 5), bool)), "size"),
    (lambda im: overlay_masks(im, np.zeros((1, H, W), bool), alpha=1.5), "alpha"),
    (lambda im: draw_keypoints(im, np.zeros((1, 17, 4))), "last dim"),
    (lambda im: draw_boxes(np.zeros((4, 4, 3)), np.zeros((0, 4))), "PIL"),
], ids=["box-shape", "label-count", "mask-size", "alpha", "kp-dim", "not-pil"])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(base())


def test_empty_results_leave_image_unchanged():
    img = base(7)
    assert not changed(draw_boxes(img, torch.zeros(0, 4)), img).any()
    det = DetectionResult(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), None)
    assert not changed(draw_result(img, det), img).any()


def test_min_score_draws_only_confident_instances():
    img = base(3)
    boxes = torch.tensor([[5.0, 5, 30, 30], [60.0, 40, 100, 75]])
    res = DetectionResult(boxes=boxes, scores=torch.tensor([0.9, 0.1]), labels=torch.tensor([0, 1]),
                          masks=torch.zeros(2, H, W, dtype=torch.bool))
    only_first = DetectionResult(boxes=boxes[:1], scores=torch.tensor([0.9]), labels=torch.tensor([0]),
                                 masks=torch.zeros(1, H, W, dtype=torch.bool))
    got = draw_result(img, res, ["a", "b"], min_score=0.3)
    assert np.array_equal(np.asarray(got), np.asarray(draw_result(img, only_first, ["a", "b"])))
    assert not changed(img, got)[40:76, 60:101].any()  # the 0.1 box is not drawn
    assert np.array_equal(np.asarray(draw_result(img, res, min_score=0.95)), np.asarray(img))


def test_routed_group_names_read_the_names_before_routing_tokens():
    from unimlm_engine.inputs.tokenizer import ByteTokenizer
    from unimlm_engine.outputs.labels import routed_group_names

    tok = ByteTokenizer()
    ids = tok.encode("Yes, here are the results for red circle[DET], blue square[DET] in the image. Utilizing "
                     "keypoints detection, the image analysis reveals the location of apex[POSE], bottom-left[POSE].")
    assert routed_group_names(ids, tok) == {"[DET]": ["red circle", "blue square"], "[POSE]": ["apex", "bottom-left"]}
    assert routed_group_names(tok.encode("the cat[SEG]"), tok) == {"[SEG]": ["the cat"]}
