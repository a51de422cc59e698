"""UniPose-style keypoint decoder for [POSE] (the `unipose.*` weights), plain PyTorch.

Object classes come from [DET] payloads (`patch2query`), keypoint classes from [POSE] payloads (`patch2kpt`,
both MLPs llm_hidden -> d_model -> d_model, averaged over the K queries of a group; the n-th [POSE] group of
a request is keypoint n). The instance stage is the detector's (same backbone, class-fused encoder,
two-stage selection, decoder with box refinement). The keypoint stage takes the top `max_detections`
instances: one query per (instance, keypoint) = instance hidden state + keypoint embedding, placed at the box
centre plus a box-scaled offset (`keypoint_init`), then `keypoint_decoder_layers` deformable decoder layers
(self-attention inside each instance, cross-attention to the keypoint embeddings and to the image) each
refine the location in inverse-sigmoid space (`keypoint_embed`); `keypoint_visibility` scores each keypoint.
Runs on any device; only run on the CPU so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from unimlm_engine.config.decoders import PoseConfig

from ...routes import RouteSpec
from .base import DecoderInput, TaskDecoder, TensorForward
from .deformable import DecoderLayer, MLPHead, key_bias, sine_embed_coords
from .detector import check_payloads, pad_payloads
from .legacy_grounding import GroundingCore
from .images import boxes_to_pixels, prepare_images


@dataclass
class PoseResult:
    boxes: torch.Tensor  # [n, 4] float xyxy in original image pixels
    scores: torch.Tensor  # [n]
    labels: torch.Tensor  # [n] long: index of the [DET] group (object class) in the request
    keypoints: torch.Tensor  # [n, num_keypoints, 3]: x, y in original pixels, visibility score in [0, 1]


class PoseDecoder(GroundingCore, TaskDecoder):
    """cfg: PoseConfig. state_dict keys = official `unipose.*` keys without the prefix."""

    name = "unipose"
    export_kind = "pose"

    def __init__(self, cfg: PoseConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.patch2query = MLPHead(cfg.llm_hidden_size, d, d, 2)
        self.patch2kpt = MLPHead(cfg.llm_hidden_size, d, d, 2)
        self.keypoint_init = MLPHead(d, d, 2, 2)
        dec = (d, cfg.decoder_ffn_dim, cfg.num_feature_levels, cfg.decoder_attention_heads, cfg.decoder_n_points)
        self.keypoint_decoder = nn.ModuleList(DecoderLayer(*dec) for _ in range(cfg.keypoint_decoder_layers))
        self.keypoint_pos_head = MLPHead(d, d, d, 2)
        self.keypoint_embed = MLPHead(d, d, 2, 3)
        self.keypoint_visibility = nn.Linear(d, 1)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["PoseDecoder"]:
        return cls(cfg.pose) if cfg.pose is not None else None

    def run(self, route: RouteSpec, inputs: list[DecoderInput], options: Mapping[str, Any],
            tensor_forward: Optional[TensorForward] = None) -> list["PoseResult"]:
        """Each request: num_keypoints route groups (keypoint n = group n) and its object classes as context."""
        if options:
            raise ValueError(f"route {route.token}: unknown options {sorted(options)}")
        nk = self.cfg.num_keypoints
        for r, inp in enumerate(inputs):
            if len(inp.payloads) != nk:
                raise ValueError(f"route {route.token}: request {r} has {len(inp.payloads)} keypoint groups, "
                                 f"expected {nk}")
            if len(inp.context) > self.cfg.max_classes:
                raise ValueError(f"route {route.token}: request {r} has {len(inp.context)} classes, at most "
                                 f"{self.cfg.max_classes}")
        return self([inp.image for inp in inputs], [torch.stack(list(inp.context)) for inp in inputs],
                    [torch.stack(list(inp.payloads)) for inp in inputs], tensor_forward=tensor_forward)

    def accepts_backend(self, route: RouteSpec, record: Mapping[str, Any]) -> bool:
        return record.get("decoder") == self.export_kind

    def num_groups(self, route: RouteSpec) -> int:
        return self.cfg.num_keypoints

    def _instance_bias(self, p: int, nk: int, dtype: torch.dtype, device) -> torch.Tensor:
        """-> [1, 1, p*nk, p*nk] additive bias: keypoint queries attend within their own instance."""
        inst = torch.arange(p * nk, device=device) // nk
        return (inst[:, None] != inst[None, :]).to(dtype)[None, None] * torch.finfo(dtype).min

    def keypoints(self, enc: dict, hidden: torch.Tensor, boxes: torch.Tensor, kpt: torch.Tensor) -> torch.Tensor:
        """hidden: [B, P, D] instances, boxes: [B, P, 4] cxcywh, kpt: [B, NK, D] -> [B, P, NK, 3]
        (x, y normalised to the valid region, visibility)."""
        b, p, d = hidden.shape
        nk = kpt.shape[1]
        q = (hidden[:, :, None] + kpt[:, None]).reshape(b, p * nk, d)
        box = boxes[:, :, None].expand(-1, -1, nk, -1).reshape(b, p * nk, 4)
        xy = (box[..., :2] + torch.tanh(self.keypoint_init(q)) * box[..., 2:] * 0.5).clamp(1e-4, 1 - 1e-4)
        bias = self._instance_bias(p, nk, q.dtype, q.device)
        kbias = key_bias(torch.ones(b, nk, dtype=torch.bool, device=q.device), q.dtype)
        for layer in self.keypoint_decoder:
            ref_in = xy[:, :, None] * enc["ratios"][:, None]
            pos = self.keypoint_pos_head(sine_embed_coords(xy, d // 2))
            q = layer(q, pos, ref_in, enc["shapes"], enc["start"], enc["memory"], enc["valid"], kpt, kbias, bias)
            xy = (self.keypoint_embed(q) + torch.special.logit(xy, eps=1e-5)).sigmoid()
        vis = self.keypoint_visibility(q).sigmoid()
        return torch.cat([xy, vis], -1).view(b, p, nk, 3)

    def forward_tensors(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, class_payloads: torch.Tensor,
                        class_valid: torch.Tensor, keypoint_payloads: torch.Tensor):
        """pixel_values: [B, 3, H, W], pixel_valid: [B, H, W] bool, class_payloads: [B, C, K, llm_hidden],
        class_valid: [B, C] bool, keypoint_payloads: [B, NK, K, llm_hidden] ->
        (scores [B, P], labels [B, P], boxes [B, P, 4] cxcywh, keypoints [B, P, NK, 3]) for the top
        P = min(max_detections, num_queries) instances by score, normalised to each image's valid region."""
        text = self.patch2query(class_payloads).mean(2)
        kpt = self.patch2kpt(keypoint_payloads).mean(2)
        enc = self.encode(pixel_values, pixel_valid, text, class_valid)
        target, ref = self.select_queries(enc, self.cfg.num_queries)
        hidden, boxes = self.decode(enc, target, ref)
        scores, labels = self.class_logits(hidden, enc["text"], class_valid).sigmoid().max(-1)
        top = scores.topk(min(self.cfg.max_detections, scores.shape[1]), dim=1)
        idx = top.indices
        hidden = torch.gather(hidden, 1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        boxes = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4))
        kps = self.keypoints(enc, hidden, boxes, kpt)
        return top.values, torch.gather(labels, 1, idx), boxes, kps

    @torch.no_grad()
    def forward(self, images: list, class_payloads: list[torch.Tensor], keypoint_payloads: list[torch.Tensor],
                tensor_forward: Optional[TensorForward] = None) -> list[PoseResult]:
        """images: PIL / uint8 [H, W, 3]; class_payloads[i]: [C_i, K, llm_hidden] ([DET] groups);
        keypoint_payloads[i]: [num_keypoints, K, llm_hidden] ([POSE] groups)."""
        if len(images) == 0 or not len(images) == len(class_payloads) == len(keypoint_payloads):
            raise ValueError(f"need one class and one keypoint payload per image, got {len(images)} images, "
                             f"{len(class_payloads)} class and {len(keypoint_payloads)} keypoint payloads")
        cfg = self.cfg
        check_payloads(class_payloads, cfg.llm_hidden_size, cfg.max_classes, "class_payloads")
        for i, kp in enumerate(keypoint_payloads):
            if isinstance(kp, torch.Tensor) and kp.dim() == 3 and kp.shape[0] != cfg.num_keypoints:
                raise ValueError(f"keypoint_payloads[{i}] has {kp.shape[0]} groups, expected num_keypoints="
                                 f"{cfg.num_keypoints}")
        check_payloads(keypoint_payloads, cfg.llm_hidden_size, cfg.num_keypoints, "keypoint_payloads")
        p = next(self.parameters())
        batch = prepare_images(images, cfg.image_short, cfg.image_long, self.pad_multiple, p.device, p.dtype)
        cls, valid = pad_payloads(class_payloads, p.device, p.dtype)
        kps = torch.stack([k.to(device=p.device, dtype=p.dtype) for k in keypoint_payloads])
        fwd = tensor_forward or self.forward_tensors
        scores, labels, boxes, keypoints = fwd(batch.pixel_values, batch.pixel_valid, cls, valid, kps)
        out = []
        for i, (h, w) in enumerate(batch.original):
            keep = scores[i] > cfg.score_threshold
            kp = keypoints[i][keep].float()
            scale = torch.tensor([w, h, 1.0], device=kp.device)
            out.append(PoseResult(boxes_to_pixels(boxes[i][keep], (h, w)), scores[i][keep].float(),
                                  labels[i][keep].long(), kp * scale))
        return out
