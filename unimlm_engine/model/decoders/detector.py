"""Grounding-DINO-style detector for [DET] / [GRD] / [SEG] (the `gdino.*` weights), plain PyTorch.

Classes are routed super-link groups: each group's payload [K, llm_hidden] goes through `patch2query`
(MLP llm_hidden -> d_model -> d_model) and is averaged over its K queries into one class embedding. The
n-th routed group of a request is class n. A call batches requests with different image sizes and class
counts (padded + masked). This is the reference later exports and kernels are checked against; it runs on
any device but has only been run on the CPU.

Two entry points:
- `forward(images, class_payloads, with_masks)` -> list[DetectionResult] (boxes in original pixels).
- `forward_tensors(pixel_values, pixel_valid, class_payloads, class_valid, with_masks)` and
  `forward_embeddings(...)` (class embeddings after patch2query instead of payloads): tensors in, tensors
  out, no data-dependent Python control flow (the export graphs; `torch.export` traces it with static shapes).

SEG mask head (not in transformers' GroundingDino; names `adapter_1`, `layer_1`, `mask_features`,
`mask_embed`): per-pixel features at stride 4 = adapter_1(Swin stage-1 map) + 2x nearest upsample of the
stride-8 encoder memory, then a 3x3 conv + GroupNorm + ReLU and a 1x1 conv to mask_dim; mask logits are
dot products of mask_embed(query) with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from unimlm_engine.config.decoders import DetectorConfig

from ...routes import RouteSpec
from .base import DecoderInput, TaskDecoder, TensorForward
from .deformable import MLPHead
from .grounding import GroundingCore, level_valid, masked_group_norm
from .images import boxes_to_pixels, prepare_images


@dataclass
class DetectionResult:
    boxes: torch.Tensor  # [n, 4] float xyxy in original image pixels
    scores: torch.Tensor  # [n]
    labels: torch.Tensor  # [n] long: index of the routed group (class) in the request
    masks: torch.Tensor | None  # [n, H, W] bool at the original image size (with_masks), else None


def check_payloads(payloads: list[torch.Tensor], llm_hidden: int, max_classes: int, what: str) -> None:
    """Each payload: [C_i, K, llm_hidden] with 1 <= C_i <= max_classes and one K for the whole call."""
    ks = set()
    for i, p in enumerate(payloads):
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            raise ValueError(f"{what}[{i}] must be a tensor [C, K, llm_hidden], got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if p.shape[-1] != llm_hidden:
            raise ValueError(f"{what}[{i}] width {p.shape[-1]} != llm_hidden_size {llm_hidden}")
        if p.shape[0] == 0:
            raise ValueError(f"{what}[{i}] has zero classes (routed groups)")
        if p.shape[0] > max_classes:
            raise ValueError(f"{what}[{i}] has {p.shape[0]} classes, more than max_classes={max_classes}")
        if p.shape[1] == 0:
            raise ValueError(f"{what}[{i}] has zero query vectors per group")
        ks.add(int(p.shape[1]))
    if len(ks) > 1:
        raise ValueError(f"{what}: all payloads of one call need the same K queries per group, got {sorted(ks)}")


def pad_payloads(payloads: list[torch.Tensor], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """list of [C_i, K, H] -> ([B, C_max, K, H] zero-padded, valid [B, C_max] bool)."""
    c_max = max(p.shape[0] for p in payloads)
    out = torch.zeros(len(payloads), c_max, *payloads[0].shape[1:], device=device, dtype=dtype)
    valid = torch.zeros(len(payloads), c_max, device=device, dtype=torch.bool)
    for i, p in enumerate(payloads):
        out[i, :p.shape[0]] = p.to(device=device, dtype=dtype)
        valid[i, :p.shape[0]] = True
    return out, valid


def upsample_mask_logits(logits: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """logits: [n, H/4, W/4] on the padded canvas -> [n, h0, w0] bool at the original image size."""
    h, w = resized
    hc, wc = -(-h // 4), -(-w // 4)
    x = logits[:, None, :hc, :wc].float()
    x = F.interpolate(x, size=(4 * hc, 4 * wc), mode="bilinear", align_corners=False)[:, :, :h, :w]
    return F.interpolate(x, size=original, mode="bilinear", align_corners=False)[:, 0] > 0


class DetectorDecoder(GroundingCore, TaskDecoder):
    """cfg: DetectorConfig. state_dict keys = official `gdino.*` keys without the prefix."""

    name = "gdino"
    export_kind = "detector"

    def __init__(self, cfg: DetectorConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.patch2query = MLPHead(cfg.llm_hidden_size, d, d, 2)
        self.adapter_1 = nn.Sequential(nn.Conv2d(cfg.embed_dim, d, 1, bias=False), nn.GroupNorm(32, d))
        self.layer_1 = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.GroupNorm(32, d))
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, 1)
        self.mask_embed = MLPHead(d, d, cfg.mask_dim, 3)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["DetectorDecoder"]:
        return cls(cfg.detector) if cfg.detector is not None else None

    def run(self, route: RouteSpec, inputs: list[DecoderInput], options: Mapping[str, Any],
            tensor_forward: Optional[TensorForward] = None) -> list["DetectionResult"]:
        """The route's groups of each request are its classes; options: with_masks (SEG)."""
        opts = dict(options)
        with_masks = bool(opts.pop("with_masks", False))
        if opts:
            raise ValueError(f"route {route.token}: unknown options {sorted(opts)}")
        for r, inp in enumerate(inputs):
            if len(inp.payloads) > self.cfg.max_classes:
                raise ValueError(f"route {route.token}: request {r} has {len(inp.payloads)} classes, at most "
                                 f"{self.cfg.max_classes}")
        return self([inp.image for inp in inputs], [torch.stack(list(inp.payloads)) for inp in inputs],
                    with_masks=with_masks, tensor_forward=tensor_forward)

    def accepts_backend(self, route: RouteSpec, record: Mapping[str, Any]) -> bool:
        return record.get("decoder") == self.export_kind and (bool(record.get("with_masks"))
                                                              or not route.options.get("with_masks"))

    def class_embeddings(self, class_payloads: torch.Tensor) -> torch.Tensor:
        """class_payloads: [B, C, K, llm_hidden] -> [B, C, d_model] (patch2query, mean over K)."""
        return self.patch2query(class_payloads).mean(2)

    def mask_feature_map(self, enc: dict, pixel_valid: torch.Tensor) -> torch.Tensor:
        """-> [B, mask_dim, H/4, W/4] per-pixel mask features, zero at padded positions."""
        v4 = level_valid(pixel_valid, 4)
        b, d = enc["memory"].shape[0], self.cfg.d_model
        h8, w8 = enc["level_sizes"][0]
        mem = enc["memory"][:, :h8 * w8].transpose(1, 2).reshape(b, d, h8, w8)
        up = F.interpolate(mem, scale_factor=2.0, mode="nearest") * v4[:, None].to(mem.dtype)
        x = masked_group_norm(self.adapter_1[0](enc["feats"][0]), v4, self.adapter_1[1]) + up
        x = F.relu(masked_group_norm(self.layer_1[0](x), v4, self.layer_1[1]))
        return self.mask_features(x) * v4[:, None].to(x.dtype)

    def forward_tensors(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, class_payloads: torch.Tensor,
                        class_valid: torch.Tensor, with_masks: bool = False):
        """pixel_values: [B, 3, H, W] (H, W multiples of self.pad_multiple), pixel_valid: [B, H, W] bool,
        class_payloads: [B, C, K, llm_hidden], class_valid: [B, C] bool -> see forward_embeddings."""
        return self.forward_embeddings(pixel_values, pixel_valid, self.class_embeddings(class_payloads), class_valid,
                                       with_masks)

    def forward_embeddings(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, class_embeds: torch.Tensor,
                           class_valid: torch.Tensor, with_masks: bool = False):
        """class_embeds: [B, C, d_model] (after patch2query), other inputs as in forward_tensors ->
        (logits [B, Q, C] (-inf at padded classes), boxes [B, Q, 4] cxcywh normalised to each image's valid
        region, mask_logits [B, Q, H/4, W/4] or None)."""
        enc = self.encode(pixel_values, pixel_valid, class_embeds, class_valid)
        target, ref = self.select_queries(enc, self.cfg.num_queries)
        hidden, boxes = self.decode(enc, target, ref)
        logits = self.class_logits(hidden, enc["text"], class_valid)
        masks = None
        if with_masks:
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hidden), self.mask_feature_map(enc, pixel_valid))
        return logits, boxes, masks

    @torch.no_grad()
    def forward(self, images: list, class_payloads: list[torch.Tensor], with_masks: bool = False,
                tensor_forward: Optional[TensorForward] = None) -> list[DetectionResult]:
        """images: PIL images or uint8 [H, W, 3] tensors; class_payloads[i]: [C_i, K, llm_hidden];
        tensor_forward: replaces `forward_tensors` (same signature), e.g. an exported back end."""
        if len(images) == 0 or len(images) != len(class_payloads):
            raise ValueError(f"need one class payload per image and at least one image, got {len(images)} images "
                             f"and {len(class_payloads)} payloads")
        check_payloads(class_payloads, self.cfg.llm_hidden_size, self.cfg.max_classes, "class_payloads")
        p = next(self.parameters())
        batch = prepare_images(images, self.cfg.image_short, self.cfg.image_long, self.pad_multiple, p.device, p.dtype)
        payloads, valid = pad_payloads(class_payloads, p.device, p.dtype)
        fwd = tensor_forward or self.forward_tensors
        logits, boxes, masks = fwd(batch.pixel_values, batch.pixel_valid, payloads, valid, with_masks)
        return [self._postprocess(logits[i, :, :class_payloads[i].shape[0]], boxes[i],
                                  None if masks is None else masks[i], batch.resized[i], batch.original[i])
                for i in range(len(images))]

    def _postprocess(self, logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor | None,
                     resized: tuple[int, int], original: tuple[int, int]) -> DetectionResult:
        """logits: [Q, C_i], boxes: [Q, 4] -> top-k by score, then the score threshold."""
        scores, labels = logits.float().sigmoid().max(-1)
        top = scores.topk(min(self.cfg.max_detections, scores.shape[0]))
        keep = top.indices[top.values > self.cfg.score_threshold]
        out_masks = None if masks is None else upsample_mask_logits(masks[keep], resized, original)
        return DetectionResult(boxes_to_pixels(boxes[keep], original), scores[keep], labels[keep].long(), out_masks)
