"""Accuracy of a model on held-out shapes scenes, measured through the engine (issue 18).

Per scene (seed EVAL_SEED_BASE + i, never a training seed): one VQA question (type drawn from the seed), one DET
and one SEG instruction naming all 12 classes, and one POSE instruction for a shape kind with keypoints when the
scene has one; the fixed eval strings of `tasks` (their first templates). Every request is greedy and submitted
through `Engine.submit` by `concurrency` client threads (closed loops).

Metrics:
- routing: the set of routing tokens the model generated equals the task's ({} / {[DET]} / {[SEG]} /
  {[DET], [POSE]}).
- VQA exact match per question type and overall (the text stripped of surrounding whitespace).
- DET AP50: pycocotools COCOeval (bbox, the AP at IoU 0.50) over the top-100 detections the engine returns
  (the official post-processing). The class of a detection is the name the model wrote before its [DET].
- SEG mIoU: per class, the union of the instance masks scoring > 0.3 against the union of the class's
  ground-truth masks; intersections and unions summed over the set, IoU averaged over the 12 classes.
- POSE PCK@0.1: each ground-truth object is matched to the highest-scoring prediction of its class with box
  IoU >= 0.5 (predictions scoring >= 0.3, each used once); a keypoint is correct when it lies within 0.1 x the
  longer side of the ground-truth box; unmatched objects count all their keypoints wrong.
"""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..outputs.labels import routed_group_names
from .tasks import ROUTE_OF_TASK, VQA_TYPES, Sample, det_sample, pose_sample, pose_shapes, vqa_sample
from .world import CLASSES, KEYPOINT_NAMES, Scene, make_scene

# training (training/train_shapes.py) draws seeds below 10^6 and from 10^8 (its VQA phase) and from its
# --seed-offset (each + multiples of 10^9 where a POSE scene is redrawn); it refuses an offset that would reach
# [EVAL_SEED_BASE, EVAL_SEED_LIMIT)
EVAL_SEED_BASE = 500_000_000
EVAL_SEED_LIMIT = EVAL_SEED_BASE + 10_000_000


def reaches_eval_seeds(lo: int, hi: int) -> bool:
    """Whether training seeds [lo, hi), or those seeds plus multiples of 10^9 (a redrawn POSE scene), can be
    held-out evaluation seeds [EVAL_SEED_BASE, EVAL_SEED_LIMIT)."""
    giga = 1_000_000_000
    return any(lo < EVAL_SEED_LIMIT + m * giga and hi > EVAL_SEED_BASE + m * giga
               for m in range(lo // giga - 1, hi // giga + 1))
MASK_SCORE, POSE_SCORE, POSE_IOU = 0.3, 0.3, 0.5  # 0.3: also the CLI drawing default


@dataclass
class EvalItem:
    scene: Scene
    sample: Sample


def eval_items(num_images: int, num_embs: int = 4, seed_base: int = EVAL_SEED_BASE,
               tasks: tuple[str, ...] = ("vqa", "det", "seg", "pose")) -> list[EvalItem]:
    items = []
    for i in range(num_images):
        sc = make_scene(seed_base + i)
        rng = random.Random(seed_base + i)
        if "vqa" in tasks:
            items.append(EvalItem(sc, vqa_sample(sc, rng)))
        if "det" in tasks:
            items.append(EvalItem(sc, det_sample(sc, rng, num_embs, train=False)))
        if "seg" in tasks:
            items.append(EvalItem(sc, det_sample(sc, rng, num_embs, train=False, route="[SEG]")))
        kinds = pose_shapes(sc)
        if "pose" in tasks and kinds:
            items.append(EvalItem(sc, pose_sample(sc, rng, num_embs, shape=rng.choice(kinds), train=False)))
    return items


def run_requests(engine, items: list[EvalItem], concurrency: int = 32, max_tokens: int = 160) -> list:
    """-> RequestOutput per item (None where the request failed), in order (closed loops of `concurrency`
    threads)."""
    from ..engine.types import EngineError, Request
    from ..sampling import SamplingParams

    outs: list[Any] = [None] * len(items)
    lock = threading.Lock()
    next_i = [0]

    def worker() -> None:
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(items):
                return
            it = items[i]
            req = Request(prompt=it.sample.question, images=[it.scene.image],
                          sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0))
            try:
                outs[i] = engine.submit(req).result()
            except EngineError:  # counted as an error by `score`; the other requests go on
                outs[i] = None

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return outs


def group_names(token_ids: list[int], tokenizer, route: str, names: tuple[str, ...]) -> list[Optional[str]]:
    """The name the model wrote before each `route` token of its output (None where it matches no name)."""
    longest_first = sorted(names, key=len, reverse=True)
    return [next((n for n in longest_first if text.endswith(n)), None)
            for text in routed_group_names(token_ids, tokenizer).get(route, [])]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _task(out, route: str):
    return next((t for t in out.tasks if t.route == route and t.error is None), None)


@dataclass
class Accumulator:
    routing: list[bool] = field(default_factory=list)
    vqa: dict[str, list[bool]] = field(default_factory=lambda: {t: [] for t in VQA_TYPES})
    coco_gt: list[dict] = field(default_factory=list)
    coco_dt: list[dict] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    inter: np.ndarray = field(default_factory=lambda: np.zeros(len(CLASSES)))
    union: np.ndarray = field(default_factory=lambda: np.zeros(len(CLASSES)))
    kpt_ok: int = 0
    kpt_total: int = 0
    errors: int = 0


def score(items: list[EvalItem], outs: list, tokenizer) -> dict[str, Any]:
    acc = Accumulator()
    for it, out in zip(items, outs):
        s, sc = it.sample, it.scene
        if out is None or out.error is not None:
            acc.errors += 1
        gen = set(tokenizer.route_ids[t] for t in (out.token_ids if out is not None else [])
                  if t in tokenizer.route_ids)
        acc.routing.append(gen == set(ROUTE_OF_TASK[s.task]))
        if out is None:
            continue
        if s.task == "vqa":
            acc.vqa[s.qtype].append(out.text.strip() == s.answer)
        elif s.task == "det":
            _score_det(acc, sc, out, tokenizer)
        elif s.task == "seg":
            _score_seg(acc, sc, out, tokenizer)
        else:
            _score_pose(acc, sc, s, out, tokenizer)
    return summarise(acc)


def _score_det(acc: Accumulator, sc: Scene, out, tokenizer) -> None:
    img_id = len(acc.images) + 1
    acc.images.append(img_id)
    for o in sc.objects:
        x0, y0, x1, y1 = o.box
        acc.coco_gt.append({"id": len(acc.coco_gt) + 1, "image_id": img_id, "category_id": o.label + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    t = _task(out, "[DET]")
    if t is None:
        return
    names = group_names(out.token_ids, tokenizer, "[DET]", CLASSES)
    for box, sc_, lab in zip(t.boxes.tolist(), t.scores.tolist(), t.labels.tolist()):
        name = names[lab] if lab < len(names) else None
        if name is None:
            continue
        acc.coco_dt.append({"image_id": img_id, "category_id": CLASSES.index(name) + 1,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(sc_)})


def _score_seg(acc: Accumulator, sc: Scene, out, tokenizer) -> None:
    h, w = sc.image.height, sc.image.width
    gt = np.zeros((len(CLASSES), h, w), bool)
    for o in sc.objects:
        gt[o.label] |= o.mask
    pred = np.zeros_like(gt)
    t = _task(out, "[SEG]")
    if t is not None and t.masks is not None:
        names = group_names(out.token_ids, tokenizer, "[SEG]", CLASSES)
        for m, s_, lab in zip(t.masks.numpy(), t.scores.tolist(), t.labels.tolist()):
            name = names[lab] if lab < len(names) else None
            if name is not None and s_ > MASK_SCORE:
                pred[CLASSES.index(name)] |= m
    acc.inter += (gt & pred).reshape(len(CLASSES), -1).sum(1)
    acc.union += (gt | pred).reshape(len(CLASSES), -1).sum(1)


def _score_pose(acc: Accumulator, sc: Scene, s: Sample, out, tokenizer) -> None:
    objs = [o for o in sc.objects if o.shape == s.pose_shape]
    n_kpt = len(KEYPOINT_NAMES[s.pose_shape])
    acc.kpt_total += n_kpt * len(objs)
    t = _task(out, "[POSE]")
    if t is None:
        return
    names = group_names(out.token_ids, tokenizer, "[DET]", tuple(s.classes))
    kp_names = group_names(out.token_ids, tokenizer, "[POSE]", KEYPOINT_NAMES[s.pose_shape])
    preds = [(sc_, np.asarray(b), names[lab] if lab < len(names) else None, np.asarray(k))
             for b, sc_, lab, k in zip(t.boxes.tolist(), t.scores.tolist(), t.labels.tolist(), t.keypoints.tolist())
             if sc_ >= POSE_SCORE]
    preds.sort(key=lambda p: -p[0])
    used = set()
    for o in objs:
        gt_box = np.asarray(o.box)
        cand = [(i, p) for i, p in enumerate(preds) if i not in used and p[2] == o.name and _iou(p[1], gt_box) >= POSE_IOU]
        if not cand:
            continue
        i, p = cand[0]
        used.add(i)
        thr = 0.1 * max(o.box[2] - o.box[0], o.box[3] - o.box[1])
        for j, kname in enumerate(KEYPOINT_NAMES[s.pose_shape]):
            if kname not in kp_names:
                continue
            pk = p[3][kp_names.index(kname)][:2]
            acc.kpt_ok += int(np.linalg.norm(pk - o.keypoints[j]) <= thr)


def coco_ap50(gt: list[dict], dt: list[dict], images: list[int]) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not gt:
        return float("nan")
    c = COCO()
    c.dataset = {"images": [{"id": i} for i in images], "annotations": gt,
                 "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
        if not dt:
            return 0.0
        d = c.loadRes(dt)
        e = COCOeval(c, d, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[1])


def summarise(acc: Accumulator) -> dict[str, Any]:
    vqa_all = [x for v in acc.vqa.values() for x in v]
    valid = acc.union > 0
    return {
        "routing": float(np.mean(acc.routing)) if acc.routing else float("nan"),
        "vqa_exact_match": float(np.mean(vqa_all)) if vqa_all else float("nan"),
        "vqa_by_type": {k: (float(np.mean(v)) if v else None) for k, v in acc.vqa.items()},
        "vqa_count_by_type": {k: len(v) for k, v in acc.vqa.items()},
        "det_ap50": coco_ap50(acc.coco_gt, acc.coco_dt, acc.images),
        "seg_miou": float(np.mean(acc.inter[valid] / acc.union[valid])) if valid.any() else float("nan"),
        "pose_pck": acc.kpt_ok / acc.kpt_total if acc.kpt_total else float("nan"),
        "requests": len(acc.routing),
        "errors": acc.errors,
    }
