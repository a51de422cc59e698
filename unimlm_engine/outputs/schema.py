"""The task-result JSON schema, shared by `unimlm generate --json` and the HTTP server (README, "Task
results"). One object per TaskResult:

    route       "[DET]" ...            name   "det"        kind   detection | segmentation | pose | image
    backend     "eager" | "onnxruntime" | "aoti" | "tensorrt" (absent when the task failed before running)
    num_groups  routed groups the request gave this route
    boxes       [[x0, y0, x1, y1], ...] in input-image pixels        (detection, segmentation, pose)
    scores      [s, ...] in [0, 1];  labels [c, ...] = index of the routed class group in the request
    masks       [{"size": [h, w], "counts": "..."}, ...] COCO compressed RLE, one per box (segmentation)
    keypoints   [[[x, y, v], ...], ...] pixels and visibility, one list per box (pose)
    images      [{"width": w, "height": h, "format": "png", "data": base64} or {..., "path": file}]  (image)
    seeds       [seed, ...] one per generated image (image)
    error       "DecoderError: ..." only when the task failed
  span routes (RequestOutput.spans) add:
    route       the span route's name ("imgseg"); num_groups: its boxes (at least 1)
    span        {"start": s, "end": e, "text": argument}: character offsets [s, e) of the span group in the text
    phrases     [label, ...] one per box (the <BOX> labels)
"""
from __future__ import annotations

import base64
import io
from typing import Any, Optional, Sequence

import numpy as np


def mask_to_rle(mask: Any) -> dict[str, Any]:
    """mask: [H, W] bool / 0-1 -> COCO compressed RLE {"size": [H, W], "counts": str} (pycocotools)."""
    from pycocotools import mask as coco_mask

    m = np.asfortranarray(_numpy(mask).astype(np.uint8))
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {m.shape}")
    rle = coco_mask.encode(m)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """The inverse of mask_to_rle -> [H, W] bool."""
    import warnings

    from pycocotools import mask as coco_mask

    with warnings.catch_warnings():  # pycocotools' own numpy-2 DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}).astype(bool)


def image_to_png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def task_json(task, image_paths: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """A TaskResult -> the schema above; image_paths: files the images were saved to (named instead of
    inlined as base64 PNG)."""
    from ..routes import find_route

    try:
        spec = find_route(task.route)
        name, kind = spec.name, spec.result
    except ValueError:  # a span with an unknown task token: its error result names the tag
        name, kind = task.route, None
    d: dict[str, Any] = {"route": task.route, "name": name, "kind": task.kind or kind,
                         "num_groups": task.num_groups}
    if task.span is not None:
        d["span"] = {"start": int(task.span[0]), "end": int(task.span[1]), "text": task.span_text or ""}
    if task.backend is not None:
        d["backend"] = task.backend
    if task.error is not None:
        d["error"] = f"{type(task.error).__name__}: {task.error}"
        return d
    if task.boxes is not None:
        d["boxes"] = _numpy(task.boxes).astype(float).tolist()
        d["scores"] = _numpy(task.scores).astype(float).tolist()
        d["labels"] = _numpy(task.labels).astype(int).tolist()
    if task.phrases is not None:
        d["phrases"] = [str(p) for p in task.phrases]
    if task.masks is not None:
        d["masks"] = [mask_to_rle(m) for m in _numpy(task.masks)]
    sem = getattr(task.raw, "semantic_map", None)
    if sem is not None:  # [SEG] with seg_mode="semantic": class index per pixel, a 16-bit grey PNG
        from PIL import Image
        arr = _numpy(sem).astype(np.uint16)
        d["semantic_map"] = {"height": int(arr.shape[0]), "width": int(arr.shape[1]), "format": "png16",
                             "data": image_to_png_base64(Image.fromarray(arr))}
    if task.keypoints is not None:
        d["keypoints"] = _numpy(task.keypoints).astype(float).tolist()
    if task.images is not None:
        if image_paths is not None and len(image_paths) != len(task.images):
            raise ValueError(f"{len(image_paths)} image paths for {len(task.images)} images")
        d["images"] = [{"width": im.width, "height": im.height, **({"path": str(image_paths[i])} if image_paths
                        else {"format": "png", "data": image_to_png_base64(im)})}
                       for i, im in enumerate(task.images)]
        d["seeds"] = list(getattr(task.raw, "seeds", []) or [])
    return d
