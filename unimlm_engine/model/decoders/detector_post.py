"""Post-processing of the detector's raw outputs, as the official evaluation does it (VisionLLM v2
eval/eval_det.py, eval/eval_semseg.py), plus the engine's optional extras.

Official rules (the defaults):
- DET / GRD (`post_process_det_gdino`): sigmoid of the [Q, C] logits, top-k (100; GRD 1) over the flattened
  Q x C pairs (a query may appear with several labels), keep scores > 0, boxes cxcywh -> xyxy x (w, h) of the
  original image, not clamped.
- with masks (`post_process_instseg_gdino`, the SEG route): the same top-k pairs with no score filter; each
  pair's mask logits [H/4, W/4] (whole canvas) bilinear x4, cropped to the resized image, bilinear to the
  original size, sigmoid > 0.5.
- semantic map (`eval_semseg.process_seg_result`): sigmoid of all Q x C logits and of all Q masks; masks
  resized (x4, crop, original size) then einsum "qc,qhw->chw" and argmax over classes (resize_first, the
  default); or einsum first and resize the [C, ...] map (resize_first=False, as for Mapillary).
Extras (options): score_threshold (keep scores > it), clamp_boxes (clip to the image), image_short /
image_long (the resize; the official ADE semantic eval resizes to 512 / 2048, its COCO eval to 800 / 1333).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F


@dataclass
class DetectionResult:
    boxes: torch.Tensor  # [n, 4] float xyxy in original image pixels
    scores: torch.Tensor  # [n]
    labels: torch.Tensor  # [n] long: index of the routed group (class) in the request
    masks: torch.Tensor | None  # [n, H, W] bool at the original image size (with_masks), else None
    semantic_map: torch.Tensor | None = None  # [H, W] long class index per pixel (seg_mode="semantic")


@dataclass(frozen=True)
class PostOptions:
    """Per-call options (RouteSpec.options / EngineConfig.decoder_options). Defaults = the official eval."""

    top_k: int = 100
    with_masks: bool = False
    score_threshold: Optional[float] = None  # None: official (DET: > 0; with masks: no filter)
    clamp_boxes: bool = False
    seg_mode: str = "instance"  # "instance" | "semantic"
    semantic_resize_first: bool = True
    image_short: Optional[int] = None  # resize override (None: DetectorConfig's; the official ADE eval: 512 / 2048)
    image_long: Optional[int] = None

    KNOWN = ("top_k", "with_masks", "score_threshold", "clamp_boxes", "seg_mode", "semantic_resize_first",
             "image_short", "image_long")

    @classmethod
    def parse(cls, opts: Mapping[str, Any], where: str) -> "PostOptions":
        unknown = sorted(set(opts) - set(cls.KNOWN))
        if unknown:
            raise ValueError(f"{where}: unknown options {unknown}; known: {list(cls.KNOWN)}")
        o = cls(**dict(opts))
        if not isinstance(o.top_k, int) or isinstance(o.top_k, bool) or o.top_k < 1:
            raise ValueError(f"{where}: top_k must be a positive int, got {o.top_k!r}")
        if o.score_threshold is not None and not 0.0 <= float(o.score_threshold) < 1.0:
            raise ValueError(f"{where}: score_threshold must be in [0, 1), got {o.score_threshold!r}")
        for k in ("image_short", "image_long"):
            v = getattr(o, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{where}: {k} must be a positive int, got {v!r}")
        for k in ("with_masks", "clamp_boxes", "semantic_resize_first"):
            if getattr(o, k) is not None and not isinstance(getattr(o, k), bool):  # "false" would be truthy
                raise ValueError(f"{where}: {k} must be a boolean, got {getattr(o, k)!r}")
        if o.seg_mode not in ("instance", "semantic"):
            raise ValueError(f"{where}: seg_mode must be 'instance' or 'semantic', got {o.seg_mode!r}")
        return o

    @property
    def needs_masks(self) -> bool:
        return self.with_masks or self.seg_mode == "semantic"


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def resize_mask_logits(x: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """x: [n, H/4, W/4] on the canvas -> [n, h0, w0] (bilinear x4, crop to the resized image, bilinear)."""
    hq, wq = x.shape[-2:]
    x = F.interpolate(x[:, None].float(), size=(hq * 4, wq * 4), mode="bilinear", align_corners=False)
    x = x[:, :, :resized[0], :resized[1]]
    return F.interpolate(x, size=original, mode="bilinear", align_corners=False)[:, 0]


def postprocess(logits: torch.Tensor, boxes: torch.Tensor, masks: Optional[torch.Tensor], resized: tuple[int, int],
                original: tuple[int, int], opts: PostOptions) -> DetectionResult:
    """logits: [Q, C] (this request's classes), boxes: [Q, 4] cxcywh relative to the image, masks: [Q, H/4, W/4]
    or None -> DetectionResult in original pixels."""
    prob = logits.float().sigmoid()
    q, c = prob.shape
    values, index = torch.topk(prob.reshape(-1), min(opts.top_k, q * c))
    query, labels = torch.div(index, c, rounding_mode="floor"), index % c
    h0, w0 = original
    xyxy = cxcywh_to_xyxy(boxes.float()[query]) * torch.tensor([w0, h0, w0, h0], dtype=torch.float32,
                                                                device=boxes.device)
    if opts.clamp_boxes:
        xyxy = torch.minimum(xyxy.clamp(min=0), torch.tensor([w0, h0, w0, h0], device=xyxy.device))
    out_masks = sem = None
    if opts.with_masks and opts.seg_mode == "instance":
        out_masks = resize_mask_logits(masks[query], resized, original).sigmoid() > 0.5
    if opts.seg_mode == "semantic":
        sem = semantic_map(prob, masks, resized, original, opts.semantic_resize_first)
    thr = opts.score_threshold if opts.score_threshold is not None else (None if opts.needs_masks else 0.0)
    if thr is not None:
        keep = values > thr
        values, labels, xyxy = values[keep], labels[keep], xyxy[keep]
        out_masks = None if out_masks is None else out_masks[keep]
    return DetectionResult(xyxy, values, labels.long(), out_masks, sem)


def semantic_map(prob: torch.Tensor, masks: torch.Tensor, resized: tuple[int, int], original: tuple[int, int],
                 resize_first: bool = True) -> torch.Tensor:
    """prob: [Q, C] sigmoid scores, masks: [Q, H/4, W/4] logits -> [h0, w0] long (eval_semseg.process_seg_result)."""
    m = masks.float().sigmoid()
    if resize_first:
        return torch.einsum("qc,qhw->chw", prob, resize_mask_logits(m, resized, original)).argmax(0)
    return resize_mask_logits(torch.einsum("qc,qhw->chw", prob, m), resized, original).argmax(0)
