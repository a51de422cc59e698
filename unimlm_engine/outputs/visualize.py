"""Draw decoder results on images and save them (used by the CLI's --save-dir).

Boxes are xyxy in image pixels; masks are boolean [N, H, W] at the image's size;
keypoints are [N, P, 2] (x, y) or [N, P, 3] (x, y, score/visibility) in pixels. With
P == 17 the COCO skeleton is drawn. Inputs may be numpy arrays, torch tensors or lists.
Every drawing function returns a new RGB image and leaves its input untouched.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# COCO person keypoint skeleton, 0-based indices into the 17 COCO keypoints.
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))

_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def color_for(i: int) -> tuple[int, int, int]:
    """A fixed colour per class / instance index."""
    return _PALETTE[i % len(_PALETTE)]


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {a.shape}")
    return a


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL.Image, got {type(image).__name__}")
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def draw_boxes(image: Image.Image, boxes: Any, labels: Optional[Sequence[str]] = None, scores: Any = None,
               width: int = 2) -> Image.Image:
    """boxes: [N, 4] xyxy pixels; labels: N strings; scores: [N] -> image with boxes + "label score" tags.

    The tag is drawn inside the box's top-left corner on a filled background.
    """
    out = _rgb(image)
    b = _array(boxes, "boxes", 2) if len(boxes) else np.zeros((0, 4))
    if b.shape[1] != 4:
        raise ValueError(f"boxes: expected [N, 4], got {b.shape}")
    s = _array(scores, "scores", 1) if scores is not None else None
    for name, seq in (("labels", labels), ("scores", s)):
        if seq is not None and len(seq) != len(b):
            raise ValueError(f"{name}: {len(seq)} entries for {len(b)} boxes")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
        col = color_for(i)
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=col, width=width)
        tag = " ".join(t for t in (labels[i] if labels is not None else "",
                                   f"{s[i]:.2f}" if s is not None else "") if t)
        if tag:
            l, t, r, bt = draw.textbbox((x0 + width, y0 + width), tag, font=font)
            draw.rectangle((l, t, r, bt), fill=col)
            draw.text((x0 + width, y0 + width), tag, fill=(0, 0, 0), font=font)
    return out


def overlay_masks(image: Image.Image, masks: Any, alpha: float = 0.5) -> Image.Image:
    """masks: [N, H, W] bool (H, W = image size) -> image blended with one colour per mask."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = np.asarray(_rgb(image), dtype=np.float32)
    m = _array(masks, "masks", 3).astype(bool)
    if m.shape[1:] != out.shape[:2]:
        raise ValueError(f"masks: size {m.shape[1:]} != image size {out.shape[:2]} (H, W)")
    for i in range(m.shape[0]):
        col = np.asarray(color_for(i), dtype=np.float32)
        out[m[i]] = (1.0 - alpha) * out[m[i]] + alpha * col
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def draw_keypoints(image: Image.Image, keypoints: Any, threshold: float = 0.0, radius: int = 2,
                   skeleton: Optional[Sequence[tuple[int, int]]] = None) -> Image.Image:
    """keypoints: [N, P, 2 or 3] pixels (+ score) -> image with dots (score > threshold) and limbs.

    skeleton defaults to COCO_SKELETON when P == 17, else no lines.
    """
    out = _rgb(image)
    k = _array(keypoints, "keypoints", 3)
    if k.shape[2] not in (2, 3):
        raise ValueError(f"keypoints: last dim must be 2 or 3, got {k.shape}")
    if skeleton is None and k.shape[1] == 17:
        skeleton = COCO_SKELETON
    draw = ImageDraw.Draw(out)
    for n in range(k.shape[0]):
        col = color_for(n)
        vis = k[n, :, 2] > threshold if k.shape[2] == 3 else np.ones(k.shape[1], dtype=bool)
        for a, b in skeleton or ():
            if vis[a] and vis[b]:
                draw.line((*k[n, a, :2].tolist(), *k[n, b, :2].tolist()), fill=col, width=max(1, radius // 2))
        for p in np.nonzero(vis)[0]:
            x, y = k[n, p, :2].tolist()
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=col)
    return out


def draw_result(image: Image.Image, result: Any, class_names: Optional[Sequence[str]] = None,
                threshold: float = 0.0, min_score: Optional[float] = None) -> Image.Image:
    """Draw whatever a detector / pose result carries: masks, then boxes, then keypoints.

    Reads the attributes `boxes`, `labels` (class indices: the request's n-th routed
    group), `scores`, `masks`, `keypoints` when present and not None (DetectionResult of
    decoders/detector.py, PoseResult of decoders/pose.py). class_names[i] names class i.
    min_score: draw only the instances scoring at least this (the official post-processing keeps the top 100
    with no threshold).
    """
    out = _rgb(image)
    if min_score is not None and getattr(result, "scores", None) is not None:
        keep = [i for i, s in enumerate(_as_list(result.scores)) if s >= min_score]
        result = SimpleNamespace(**{k: _take(getattr(result, k, None), keep)
                                    for k in ("boxes", "labels", "scores", "masks", "keypoints")})
    masks = getattr(result, "masks", None)
    if masks is not None and len(masks):
        out = overlay_masks(out, masks)
    boxes = getattr(result, "boxes", None)
    if boxes is not None:
        labels = getattr(result, "labels", None)
        if labels is not None:
            idx = [int(i) for i in (labels.tolist() if hasattr(labels, "tolist") else labels)]
            if class_names is not None and any(not 0 <= i < len(class_names) for i in idx):
                raise ValueError(f"draw_result: labels {idx} out of range for {len(class_names)} class names")
            labels = [class_names[i] if class_names is not None else str(i) for i in idx]
        out = draw_boxes(out, boxes, labels, getattr(result, "scores", None))
    kps = getattr(result, "keypoints", None)
    if kps is not None and len(kps):
        out = draw_keypoints(out, kps, threshold=threshold)
    return out


def save_images(images: Sequence[Image.Image], save_dir: str, prefix: str) -> list[str]:
    """Save images as `<save_dir>/<prefix>_<i>.png` (directory created) -> the paths written."""
    if not prefix or os.sep in prefix:
        raise ValueError(f"save_images: prefix must be a plain file name stem, got {prefix!r}")
    os.makedirs(save_dir, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = os.path.join(save_dir, f"{prefix}_{i}.png")
        _rgb(im).save(path)
        paths.append(path)
    return paths


def _as_list(x: Any) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _take(x: Any, keep: list[int]) -> Any:
    if x is None:
        return None
    if hasattr(x, "shape"):
        return x[keep]
    return [x[i] for i in keep]


def save_result(result: Any, image: Optional[Image.Image], save_dir: str, prefix: str,
                class_names: Optional[Sequence[str]] = None, min_score: Optional[float] = None) -> list[str]:
    """CLI --save-dir: a GenerationResult saves its images; a detector / pose result saves
    the input image with the result drawn on it. -> paths written."""
    images = getattr(result, "images", None)
    if images is not None:
        return save_images(images, save_dir, prefix)
    if image is None:
        raise ValueError("save_result: a detection / pose result needs the request's input image")
    return save_images([draw_result(image, result, class_names, min_score=min_score)], save_dir, prefix)
