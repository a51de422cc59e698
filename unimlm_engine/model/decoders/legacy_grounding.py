"""LEGACY: the pre-official Grounding-DINO core, kept only for the old pose decoder (pose.py) until the
official UniPose replaces it; the detector uses grounding.py. Old header:

Shared Grounding-DINO core of the detector and the pose decoder: Swin backbone, multi-level input
projections, class-fused deformable encoder, two-stage query selection, deformable decoder with box
refinement. Parameter names are those of transformers' `GroundingDinoModel` (without its `model.` prefix)
plus GroundingDinoForObjectDetection's `bbox_embed` (one MLP shared by all decoder layers, as there).

Batching rule: every padded position (image pixels, feature tokens, classes) is masked so a request's
outputs do not depend on what it is batched with. Beyond transformers: GroupNorm statistics are taken over
valid positions only, padded tokens are excluded from the two-stage top-k, and the canvas is padded to a
multiple of `pad_multiple` so every level's mask is an exact strided slice of the pixel mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .deformable import (DecoderLayer, EncoderLayer, MLPHead, key_bias, sine_embed_coords, sine_position_map)
from .legacy_swin import SwinBackbone

IMAGE_POS_TEMPERATURE = 20.0  # GroundingDinoConfig.positional_embedding_temperature


def masked_group_norm(x: torch.Tensor, valid: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """x: [B, C, H, W], valid: [B, H, W] bool -> GroupNorm over valid positions only, zero elsewhere."""
    b, c, h, w = x.shape
    g = norm.num_groups
    m = valid[:, None].to(x.dtype)
    xg, mg = (x * m).reshape(b, g, -1), m.expand(b, c, h, w).reshape(b, g, -1)
    count = mg.sum(-1, keepdim=True).clamp(min=1.0)
    mean = xg.sum(-1, keepdim=True) / count
    var = (((xg - mean) * mg) ** 2).sum(-1, keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + norm.eps)).reshape(b, c, h, w)
    return (y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]) * m


class _ConvEncoder(nn.Module):
    def __init__(self, model: SwinBackbone):
        super().__init__()
        self.model = model


class _ConvModel(nn.Module):
    """Holds the backbone at `backbone.conv_encoder.model` (transformers' GroundingDinoConvModel path)."""

    def __init__(self, model: SwinBackbone):
        super().__init__()
        self.conv_encoder = _ConvEncoder(model)


class _Encoder(nn.Module):
    def __init__(self, layers: list[EncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _Decoder(nn.Module):
    def __init__(self, layers: list[DecoderLayer], d_model: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model, 1e-5)
        self.layers = nn.ModuleList(layers)
        self.reference_points_head = MLPHead(2 * d_model, d_model, d_model, 2)


def level_valid(pixel_valid: torch.Tensor, stride: int) -> torch.Tensor:
    """pixel_valid: [B, H, W] bool (H, W multiples of stride) -> [B, H / stride, W / stride]."""
    return pixel_valid[:, ::stride, ::stride]


class GroundingCore(nn.Module):
    """cfg: DetectorConfig or PoseConfig (same backbone / encoder / decoder fields)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, lv = cfg.d_model, cfg.num_feature_levels
        swin = SwinBackbone(cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size)
        self.backbone = _ConvModel(swin)
        n_bb = len(swin.channels) - 1
        self.n_backbone_levels = n_bb
        chans = swin.channels[1:] + [swin.channels[-1]] + [d] * max(lv - n_bb - 1, 0)
        self.input_proj_vision = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], d, 1) if i < n_bb else nn.Conv2d(chans[i], d, 3, stride=2, padding=1),
                          nn.GroupNorm(32, d)) for i in range(lv))
        self.strides = [8 * 2 ** i for i in range(lv)]
        self.pad_multiple = self.strides[-1]
        self.level_embed = nn.Parameter(torch.zeros(lv, d))
        enc = (d, cfg.encoder_ffn_dim, lv, cfg.encoder_attention_heads, cfg.encoder_n_points)
        dec = (d, cfg.decoder_ffn_dim, lv, cfg.decoder_attention_heads, cfg.decoder_n_points)
        self.encoder = _Encoder([EncoderLayer(*enc) for _ in range(cfg.encoder_layers)])
        self.decoder = _Decoder([DecoderLayer(*dec) for _ in range(cfg.decoder_layers)], d)
        self.query_position_embeddings = nn.Embedding(cfg.num_queries, d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d, 1e-5)
        self.encoder_output_bbox_embed = MLPHead(d, d, 4, 3)
        shared = MLPHead(d, d, 4, 3)
        self.bbox_embed = nn.ModuleList([shared] * cfg.decoder_layers)

    def feature_levels(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor):
        """-> (backbone maps [strides 4..32], projected levels [B, D, H_l, W_l], level masks [B, H_l, W_l])."""
        feats = self.backbone.conv_encoder.model(pixel_values, pixel_valid)
        srcs, valids = [], []
        for i, proj in enumerate(self.input_proj_vision):
            valid = level_valid(pixel_valid, self.strides[i])
            x = feats[i + 1] if i < self.n_backbone_levels else (feats[-1] if i == self.n_backbone_levels else srcs[-1])
            srcs.append(masked_group_norm(proj[0](x), valid, proj[1]))
            valids.append(valid)
        return feats, srcs, valids

    def flatten_levels(self, srcs: list[torch.Tensor], valids: list[torch.Tensor]):
        """-> memory [B, S, D], pos [B, S, D], valid [B, S], spatial_shapes [L, 2], level_start [L],
        valid ratios [B, L, 2] (w, h)."""
        d = self.cfg.d_model
        mem, pos, val, ratios = [], [], [], []
        for i, (src, valid) in enumerate(zip(srcs, valids)):
            p = sine_position_map(valid, d, IMAGE_POS_TEMPERATURE).to(src.dtype)
            mem.append(src.flatten(2).transpose(1, 2))
            pos.append(p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1))
            val.append(valid.flatten(1))
            vh = valid[:, :, 0].sum(1).to(src.dtype) / valid.shape[1]
            vw = valid[:, 0, :].sum(1).to(src.dtype) / valid.shape[2]
            ratios.append(torch.stack([vw, vh], -1))
        shapes = torch.tensor([list(s.shape[-2:]) for s in srcs], dtype=torch.long, device=srcs[0].device)
        start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        return torch.cat(mem, 1), torch.cat(pos, 1), torch.cat(val, 1), shapes, start, torch.stack(ratios, 1)

    @staticmethod
    def encoder_reference_points(level_sizes: list[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
        """level_sizes: (H_l, W_l) per level, ratios: [B, L, 2] -> [B, S, L, 2] (token centres, canvas units)."""
        refs = []
        for i, (h, w) in enumerate(level_sizes):
            ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=ratios.dtype, device=ratios.device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=ratios.dtype, device=ratios.device),
                                    indexing="ij")
            ry = ry.reshape(-1)[None] / (ratios[:, None, i, 1] * h)
            rx = rx.reshape(-1)[None] / (ratios[:, None, i, 0] * w)
            refs.append(torch.stack((rx, ry), -1))
        return torch.cat(refs, 1)[:, :, None] * ratios[:, None]

    def encode(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, text: torch.Tensor,
               text_valid: torch.Tensor) -> dict:
        """pixel_values: [B, 3, H, W], pixel_valid: [B, H, W] bool, text: [B, C, D] class embeddings,
        text_valid: [B, C] bool -> dict of encoder outputs (memory [B, S, D], text [B, C, D], ...)."""
        h, w = pixel_values.shape[-2:]
        if h % self.pad_multiple or w % self.pad_multiple or pixel_valid.shape != (pixel_values.shape[0], h, w):
            raise ValueError(f"pixel_values [B, 3, H, W] needs H, W multiples of {self.pad_multiple} and pixel_valid "
                             f"[B, H, W]; got {tuple(pixel_values.shape)} and {tuple(pixel_valid.shape)}")
        feats, srcs, valids = self.feature_levels(pixel_values, pixel_valid)
        memory, pos, valid, shapes, start, ratios = self.flatten_levels(srcs, valids)
        enc = dict(feats=feats, valid=valid, shapes=shapes, start=start, ratios=ratios, text_valid=text_valid,
                   level_sizes=[tuple(s.shape[-2:]) for s in srcs])
        enc["memory"], enc["text"] = self.run_encoder(memory, pos, enc, text)
        return enc

    def run_encoder(self, memory: torch.Tensor, pos: torch.Tensor, enc: dict, text: torch.Tensor):
        """memory, pos: [B, S, D] flattened levels, text: [B, C, D]; enc holds valid, shapes, start, ratios,
        text_valid, level_sizes -> (memory [B, S, D], text [B, C, D]) after the encoder layers."""
        refs = self.encoder_reference_points(enc["level_sizes"], enc["ratios"])
        text_pos = sine_embed_coords(torch.zeros_like(text[..., :1]), self.cfg.d_model)
        for layer in self.encoder.layers:
            memory, text = layer(memory, pos, enc["valid"], refs, enc["shapes"], enc["start"], text,
                                 enc["text_valid"], text_pos)
        return memory, text

    def proposals(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> object queries [B, S, D] and proposal logits [B, S, 4] (inverse-sigmoid cx, cy, w, h)."""
        memory, valid, ratios = enc["memory"], enc["valid"], enc["ratios"]
        props = []
        for i, (h, w) in enumerate(enc["level_sizes"]):
            gy, gx = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                    torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
            scale = torch.stack([ratios[:, i, 0] * w, ratios[:, i, 1] * h], -1).view(-1, 1, 1, 2)
            grid = (torch.stack([gx, gy], -1)[None] + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** i)
            props.append(torch.cat([grid, wh], -1).flatten(1, 2))
        props = torch.cat(props, 1)
        ok = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        props = props.masked_fill(~valid[..., None], float("inf")).masked_fill(~ok, float("inf"))
        query = memory.masked_fill(~valid[..., None], 0.0).masked_fill(~ok, 0.0)
        return self.enc_output_norm(self.enc_output(query)), props

    @staticmethod
    def class_logits(hidden: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """hidden: [B, Q, D], text: [B, C, D] -> [B, Q, C] dot products, -inf at padded classes."""
        return (hidden @ text.transpose(-1, -2)).masked_fill(~text_valid[:, None, :], float("-inf"))

    def select_queries(self, enc: dict, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stage: top `num_queries` valid tokens by max class similarity -> (target [B, Q, D], ref [B, Q, 4])."""
        query, props = self.proposals(enc)
        score = self.class_logits(query, enc["text"], enc["text_valid"]).max(-1).values
        score = score.masked_fill(~enc["valid"], float("-inf"))
        num_queries = min(num_queries, score.shape[1])
        idx = torch.topk(score, num_queries, dim=1).indices
        coords = torch.gather(self.encoder_output_bbox_embed(query) + props, 1, idx[..., None].expand(-1, -1, 4))
        target = self.query_position_embeddings.weight[:num_queries][None].expand(query.shape[0], -1, -1)
        return target, coords.sigmoid()

    def decode(self, enc: dict, target: torch.Tensor, ref: torch.Tensor):
        """target: [B, Q, D], ref: [B, Q, 4] -> (normed hidden [B, Q, D], boxes [B, Q, 4] cxcywh in the valid region).

        The query position embedding encodes `ref` relative to the image's valid region; transformers encodes
        it relative to the padded canvas (level 0). Identical for an unpadded image (what the official code
        runs), and it keeps a request's result independent of the batch it is padded into."""
        hidden, d = target, self.cfg.d_model
        ratios4 = torch.cat([enc["ratios"], enc["ratios"]], -1)[:, None]
        tbias = key_bias(enc["text_valid"], hidden.dtype)
        prev = ref
        for i, layer in enumerate(self.decoder.layers):
            ref_in = ref[:, :, None] * ratios4
            qpos = self.decoder.reference_points_head(sine_embed_coords(ref, d // 2))
            hidden = layer(hidden, qpos, ref_in, enc["shapes"], enc["start"], enc["memory"], enc["valid"],
                           enc["text"], tbias)
            prev, ref = ref, (self.bbox_embed[i](hidden) + torch.special.logit(ref, eps=1e-5)).sigmoid()
        normed = self.decoder.layer_norm(hidden)
        boxes = (self.bbox_embed[-1](normed) + torch.special.logit(prev, eps=1e-5)).sigmoid()
        return normed, boxes
