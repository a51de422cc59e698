"""The official VisionLLM v2 detector for [DET] / [GRD] / [SEG] (`gdino.*`, OVGroundingDinoForObjectDetection at
inference), plain PyTorch.

Keys (the checkpoint's, without `gdino.`): `model.*` (grounding.py), `bbox_embed.{i}` (ONE MLP shared by the
decoder layers; the same tensors are also `model.decoder.bbox_embed.{i}`), `mask_embed.{i}` (one shared MLP),
`patch2query` (3-layer MLP llm_hidden -> d -> d -> d). A checkpoint may write each tied tensor under any
non-empty subset of its names (once, or every name): a load_state_dict pre-hook fills in the others.

Classes: the n-th routed group of a request is class n; its payload [K, llm_hidden] goes through
`patch2query` and is averaged over the K queries. Batching: requests are grouped by their own canvas (the
resized image padded to a multiple of 32, as the official model pads one image), and each group runs as one
batch with classes padded and masked; the official model is not padding-invariant (Swin and the GroupNorms see
the padding, padded tokens stay in the two-stage top-k), so a request never runs on a larger canvas.

Entry points: `run` (routes), `forward(images, class_payloads, **options)` -> list[DetectionResult],
`forward_tensors(pixel_values, pixel_valid, class_payloads, class_valid, with_masks)` and `forward_embeddings`
(tensors in / out: the export graphs). Runs on any device; tested on the CPU (fp32) only.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from unimlm_engine.config.decoders import DetectorConfig

from ...routes import RouteSpec
from .base import DecoderInput, TaskDecoder, TensorForward
from .deformable import MLPHead
from .detector_post import DetectionResult, PostOptions, postprocess
from .grounding import GdinoModel, class_logits, inverse_sigmoid
from .images import canvas_of, gdino_canvas, gdino_image

__all__ = ["DetectorDecoder", "DetectionResult", "check_payloads", "pad_payloads", "tied_key_groups"]


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


def tied_key_groups(module: nn.Module) -> list[list[str]]:
    """Names (relative to `module`) that hold the same tensor, each group in state_dict order."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


class DetectorDecoder(TaskDecoder):
    """cfg: DetectorConfig. state_dict keys = the official `gdino.*` keys without the prefix."""

    name = "gdino"
    export_kind = "detector"

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.decoder_layers
        self.model = GdinoModel(cfg)
        box, mask = MLPHead(d, d, 4, 3), MLPHead(d, d, cfg.mask_dim, 3)
        self.mask_embed = nn.ModuleList([mask] * n)
        self.bbox_embed = nn.ModuleList([box] * n)
        self.model.decoder.bbox_embed = self.bbox_embed
        self.patch2query = MLPHead(cfg.llm_hidden_size, d, d, 3)
        self.pad_multiple = cfg.pad_multiple
        self._tied = tied_key_groups(self)
        self._register_load_state_dict_pre_hook(self._fill_tied_keys)

    def _fill_tied_keys(self, state_dict, prefix, *args) -> None:
        """A checkpoint may write a tied tensor under any of its names: copy the first present one to the
        others (ValueError if two present copies differ)."""
        for names in self._tied:
            present = [prefix + k for k in names if prefix + k in state_dict]
            if not present:
                continue
            first = state_dict[present[0]]
            for k in present[1:]:
                if state_dict[k].shape != first.shape or not torch.equal(state_dict[k], first):
                    raise ValueError(f"checkpoint: {k} and {present[0]} are one tied tensor but differ")
            for k in names:
                state_dict.setdefault(prefix + k, first)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["DetectorDecoder"]:
        return cls(cfg.detector) if cfg.detector is not None else None

    # ---- tensors in / out -------------------------------------------------------------------------------------
    def class_embeddings(self, class_payloads: torch.Tensor) -> torch.Tensor:
        """class_payloads: [B, C, K, llm_hidden] -> [B, C, d_model] (patch2query, mean over K)."""
        return self.patch2query(class_payloads).mean(-2)

    def forward_tensors(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, class_payloads: torch.Tensor,
                        class_valid: torch.Tensor, with_masks: bool = False):
        """pixel_values: [B, 3, H, W] (one canvas, H and W multiples of 32), pixel_valid: [B, H, W] bool
        (pixel_values[:, 0] != 0 officially), class_payloads: [B, C, K, llm_hidden], class_valid: [B, C] bool
        -> see forward_embeddings."""
        return self.forward_embeddings(pixel_values, pixel_valid, self.class_embeddings(class_payloads), class_valid,
                                       with_masks)

    def forward_embeddings(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, class_embeds: torch.Tensor,
                           class_valid: torch.Tensor, with_masks: bool = False):
        """-> (logits [B, Q, C] (-inf at padded classes; the official pads to max_text_len with -inf),
        boxes [B, Q, 4] cxcywh relative to each image, mask logits [B, Q, H/4, W/4] over the canvas or None)."""
        h, w = pixel_values.shape[-2:]
        if h % self.pad_multiple or w % self.pad_multiple or pixel_valid.shape != (pixel_values.shape[0], h, w):
            raise ValueError(f"pixel_values [B, 3, H, W] needs H, W multiples of {self.pad_multiple} and pixel_valid "
                             f"[B, H, W]; got {tuple(pixel_values.shape)} and {tuple(pixel_valid.shape)}")
        hidden, text, prev, mask_feats = self.model(pixel_values, pixel_valid, class_embeds, class_valid, with_masks)
        logits = class_logits(hidden, text, class_valid)
        boxes = (self.bbox_embed[-1](hidden).float() + inverse_sigmoid(prev.float())).sigmoid()
        masks = None
        if with_masks:
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed[-1](hidden), mask_feats)
        return logits, boxes, masks

    # ---- requests -----------------------------------------------------------------------------------------------
    def run(self, route: RouteSpec, inputs: list[DecoderInput], options: Mapping[str, Any],
            tensor_forward: Optional[TensorForward] = None) -> list[DetectionResult]:
        """The route's groups of each request are its classes; options: see detector_post.PostOptions."""
        opts = PostOptions.parse(options, f"route {route.token}")
        for r, inp in enumerate(inputs):
            if len(inp.payloads) > self.cfg.max_classes:
                raise ValueError(f"route {route.token}: request {r} has {len(inp.payloads)} classes, at most "
                                 f"{self.cfg.max_classes}")
        return self._forward([inp.image for inp in inputs], [torch.stack(list(inp.payloads)) for inp in inputs],
                             opts, tensor_forward)

    def accepts_backend(self, route: RouteSpec, record: Mapping[str, Any]) -> bool:
        needs = PostOptions.parse(route.options, route.token).needs_masks
        return record.get("decoder") == self.export_kind and (bool(record.get("with_masks")) or not needs)

    @torch.no_grad()
    def forward(self, images: list, class_payloads: list[torch.Tensor], tensor_forward: Optional[TensorForward] = None,
                **options) -> list[DetectionResult]:
        """images: PIL images or uint8 [H, W, 3] tensors; class_payloads[i]: [C_i, K, llm_hidden]; options:
        PostOptions fields (top_k, with_masks, score_threshold, clamp_boxes, seg_mode, semantic_resize_first,
        image_short, image_long);
        tensor_forward replaces `forward_tensors` (same signature), e.g. an exported back end."""
        return self._forward(images, class_payloads, PostOptions.parse(options, "detector"), tensor_forward)

    @torch.no_grad()
    def _forward(self, images: list, class_payloads: list[torch.Tensor], opts: PostOptions,
                 tensor_forward: Optional[TensorForward]) -> list[DetectionResult]:
        if len(images) == 0 or len(images) != len(class_payloads):
            raise ValueError(f"need one class payload per image and at least one image, got {len(images)} images "
                             f"and {len(class_payloads)} payloads")
        check_payloads(class_payloads, self.cfg.llm_hidden_size, self.cfg.max_classes, "class_payloads")
        p = next(self.parameters())
        short, long = opts.image_short or self.cfg.image_short, opts.image_long or self.cfg.image_long
        if short > long:
            raise ValueError(f"detector: image_short {short} > image_long {long}")
        prepared = [gdino_image(im, short, long) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, resized, _) in enumerate(prepared):
            groups.setdefault(canvas_of(resized, self.pad_multiple), []).append(i)
        fwd = tensor_forward or self.forward_tensors
        results: list[Optional[DetectionResult]] = [None] * len(images)
        for idx in groups.values():
            pixels, valid = gdino_canvas([prepared[i][0].to(p.device) for i in idx], self.pad_multiple)
            payloads, cvalid = pad_payloads([class_payloads[i] for i in idx], p.device, p.dtype)
            logits, boxes, masks = fwd(pixels.to(p.dtype), valid, payloads, cvalid, opts.needs_masks)
            for j, i in enumerate(idx):
                c = class_payloads[i].shape[0]
                results[i] = postprocess(logits[j, :, :c], boxes[j], None if masks is None else masks[j],
                                         prepared[i][1], prepared[i][2], opts)
        return results
