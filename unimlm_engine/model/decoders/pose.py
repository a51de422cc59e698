"""[POSE]: the official UniPose (`unipose.*`, ED-Pose / X-Pose architecture), network in unipose/.

Per request: the [DET] / [GRD] groups of the request are the object classes (`projection_llava`, padded to
100 slots), its [POSE] groups the keypoint classes in order (`projection_kpt_llava`, padded to 100 then cut
to 68: 1..68 keypoints). The image is prepared as the official eval pipeline does (PIL bilinear resize, short
side 800 / long side at most 1333, ImageNet normalisation, zero padding to a multiple of 32 with the padding
mask) and post-processed as eval_pose.py: the top min(100, 50 * C) (group, class) pairs by sigmoid score, no
threshold (score > 0), boxes xyxy and keypoints (x, y, v = 1) of the first n_kpt keypoints in input pixels.

Batching: requests whose 32-multiple canvases are equal run in one batch; requests of other canvas sizes run
as separate sub-batches of the same call, because the Swin backbone attends over the padded canvas, so a
shared larger canvas would change the result (the official computation is one request on its own canvas).
Runs on any device; tested on the CPU (fp32) against tests/unipose_reference.py. No export path (yet):
`export_kind` is None, so `unimlm export pose` and exported pose back ends are refused with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from unimlm_engine.config.decoders import PoseConfig

from ...routes import RouteSpec
from .base import DecoderInput, TaskDecoder, TensorForward
from .unipose.network import UniPoseNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_OBJ_SLOTS = 100  # modeling_visionllmv2: max_num_obj_patches
MAX_KPT_SLOTS = 100  # max_num_kpt_patches (then cut to num_body_points)


@dataclass
class PoseResult:
    boxes: torch.Tensor  # [n, 4] float xyxy in original image pixels (not clamped, as eval_pose.py)
    scores: torch.Tensor  # [n]
    labels: torch.Tensor  # [n] long: index of the object class group ([DET] / [GRD]) in the request
    keypoints: torch.Tensor  # [n, num_keypoints, 3]: x, y in original pixels, v = 1 (eval_pose.py)


def eval_size(w: int, h: int, short: int, long: int) -> tuple[int, int]:
    """The official resize (transform_coco.resize, get_size_with_aspect_ratio) -> (h, w)."""
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * short > long:
        short = int(round(long * lo / hi))
    if (w <= h and w == short) or (h <= w and h == short):
        return h, w
    if w < h:
        return int(short * h / w), short
    return short, int(short * w / h)


def to_pil(image) -> Image.Image:
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise ValueError(f"image tensor must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
        return Image.fromarray(image.cpu().numpy())
    if not hasattr(image, "convert"):
        raise ValueError(f"image must be a PIL image or a uint8 [H, W, 3] tensor, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError("image has zero size")
    return image.convert("RGB")


def prepare_image(image, short: int, long: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """-> (normalised [3, h, w] fp32 of the resized image, original (h, w))."""
    im = to_pil(image)
    h, w = eval_size(im.width, im.height, short, long)
    x = torch.from_numpy(np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.float32).copy())
    x = x.permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, (im.height, im.width)


def _check_groups(groups, llm_hidden: int, lo: int, hi: int, what: str) -> int:
    if not lo <= len(groups) <= hi:
        raise ValueError(f"{what}: {len(groups)} groups, need {lo}..{hi}")
    ks = {tuple(g.shape) for g in groups if isinstance(g, torch.Tensor)}
    if len(ks) != 1 or len(next(iter(ks))) != 2 or next(iter(ks))[1] != llm_hidden:
        raise ValueError(f"{what}: each group must be a tensor [K, {llm_hidden}] with one K, got {sorted(ks)}")
    return next(iter(ks))[0]


class PoseDecoder(UniPoseNet, TaskDecoder):
    """cfg: PoseConfig. state_dict keys = official `unipose.*` keys without the prefix."""

    name = "unipose"
    export_kind = None  # no export wrapper for UniPose yet (backends.py refuses pose back ends)

    def __init__(self, cfg: PoseConfig):
        super().__init__(cfg)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["PoseDecoder"]:
        return cls(cfg.pose) if cfg.pose is not None else None

    def num_groups(self, route: RouteSpec) -> Optional[int]:
        return None  # any keypoint count 1..num_body_points

    def run(self, route: RouteSpec, inputs: list[DecoderInput], options: Mapping[str, Any],
            tensor_forward: Optional[TensorForward] = None) -> list[PoseResult]:
        """Each request: its keypoint groups (route payloads) and object classes (context)."""
        if options:
            raise ValueError(f"route {route.token}: unknown options {sorted(options)}")
        if tensor_forward is not None:
            raise ValueError(f"route {route.token}: UniPose has no exported back end; serve it eagerly")
        return self([inp.image for inp in inputs], [list(inp.context) for inp in inputs],
                    [list(inp.payloads) for inp in inputs])

    @torch.no_grad()
    def forward(self, images: list, class_groups: list, keypoint_groups: list) -> list[PoseResult]:
        """images: PIL / uint8 [H, W, 3]; class_groups[i]: list (or [C, K, H] tensor) of object class groups;
        keypoint_groups[i]: list (or [N, K, H] tensor) of keypoint groups, N <= num_body_points."""
        raw, sizes = self.raw_outputs(images, class_groups, keypoint_groups)
        return [post_process(lg, bx, kp, len(class_groups[i]), len(keypoint_groups[i]), sizes[i])
                for i, (lg, bx, kp) in enumerate(raw)]

    @torch.no_grad()
    def raw_outputs(self, images: list, class_groups: list, keypoint_groups: list):
        """-> ([(pred_logits [50, 100], pred_boxes [50, 4], pred_keypoints [50, 204]) per request], original
        (h, w) per request): UniPose's outputs, one sub-batch per canvas size."""
        cfg = self.cfg
        n = len(images)
        if n == 0 or not n == len(class_groups) == len(keypoint_groups):
            raise ValueError(f"need one class and one keypoint group list per image, got {n} images, "
                             f"{len(class_groups)} class and {len(keypoint_groups)} keypoint lists")
        ks = set()
        for i in range(n):
            ks.add(_check_groups(list(class_groups[i]), cfg.l_hidden_size, 1, cfg.max_classes,
                                 f"request {i} object classes"))
            ks.add(_check_groups(list(keypoint_groups[i]), cfg.l_hidden_size, 1, cfg.num_body_points,
                                 f"request {i} keypoints"))
        if len(ks) != 1:
            raise ValueError(f"all groups of one call need the same K queries, got {sorted(ks)}")
        k_q = ks.pop()
        p = next(self.parameters())
        prepared = [prepare_image(im, cfg.image_short, cfg.image_long) for im in images]
        by_canvas: dict[tuple[int, int], list[int]] = {}
        for i, (x, _) in enumerate(prepared):
            by_canvas.setdefault((-(-x.shape[1] // 32) * 32, -(-x.shape[2] // 32) * 32), []).append(i)
        out: list = [None] * n
        for (hp, wp), idx in by_canvas.items():
            b = len(idx)
            pixels = torch.zeros(b, 3, hp, wp)
            mask = torch.ones(b, hp, wp, dtype=torch.bool)
            obj = torch.zeros(b, MAX_OBJ_SLOTS, k_q, cfg.l_hidden_size)
            kpt = torch.zeros(b, MAX_KPT_SLOTS, k_q, cfg.l_hidden_size)
            obj_valid = torch.zeros(b, MAX_OBJ_SLOTS, dtype=torch.bool)
            kpt_valid = torch.zeros(b, MAX_KPT_SLOTS, dtype=torch.bool)
            for j, i in enumerate(idx):
                x = prepared[i][0]
                pixels[j, :, :x.shape[1], :x.shape[2]] = x
                mask[j, :x.shape[1], :x.shape[2]] = False
                c, k = len(class_groups[i]), len(keypoint_groups[i])
                obj[j, :c] = torch.stack([g.float().cpu() for g in class_groups[i]])
                kpt[j, :k] = torch.stack([g.float().cpu() for g in keypoint_groups[i]])
                obj_valid[j, :c], kpt_valid[j, :k] = True, True
            dev = p.device
            res = self.forward_tensors(pixels.to(dev, p.dtype), mask.to(dev), obj.to(dev, p.dtype),
                                       obj_valid.to(dev), kpt.to(dev, p.dtype), kpt_valid.to(dev))
            for j, i in enumerate(idx):
                out[i] = tuple(r[j] for r in res)
        return out, [s for _, s in prepared]


def post_process(logits: torch.Tensor, boxes: torch.Tensor, keypoints: torch.Tensor, num_classes: int,
                 num_kpt: int, size: tuple[int, int], topk: int = 100) -> PoseResult:
    """eval_pose.post_process_pose for one image: logits [G, T], boxes [G, 4] cxcywh, keypoints [G, 204]."""
    h, w = size
    prob = logits[:, :num_classes].float().sigmoid().reshape(-1)
    val, idx = prob.topk(min(topk, prob.numel()))
    grp, lab = idx // num_classes, idx % num_classes
    cx, cy, bw, bh = boxes.float()[grp].unbind(-1)
    xyxy = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], -1)
    xyxy = xyxy * torch.tensor([w, h, w, h], dtype=torch.float32, device=xyxy.device)
    xy = keypoints.float()[grp][:, :2 * num_kpt].view(-1, num_kpt, 2) * torch.tensor([w, h], dtype=torch.float32,
                                                                                     device=xyxy.device)
    kp = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
    keep = val > 0
    return PoseResult(xyxy[keep], val[keep], lab[keep].long(), kp[keep])
