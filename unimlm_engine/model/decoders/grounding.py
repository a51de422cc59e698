"""The official gdino's `model` (VisionLLM v2 `OVGroundingDinoModel`, inference path), with its parameter
names: Swin backbone at `backbone.conv_encoder.model`, `input_proj_vision`, the SEG pixel decoder
(`lateral_convs.0`, `output_convs.0` = detectron2 Conv2d with GroupNorm at `.norm`, `mask_features`),
`query_position_embeddings`, `mask_embed` (present in the checkpoint, its output unused at inference),
`encoder.layers`, `decoder.{layers, layer_norm, reference_points_head, bbox_embed}`, `level_embed`,
`enc_output(_norm)`, `encoder_output_bbox_embed`.

What it computes, for one canvas (pixel_values [B, 3, H, W], H and W multiples of 32, zero-padded bottom /
right; valid = pixel_values[:, 0] != 0 in the official model):
- Swin and the GroupNorms see the whole canvas; level masks are nearest-interpolated pixel masks; levels 0-2
  are Swin stages 2-4, level 3 a stride-2 conv on stage 4; sine positions normalised by the valid extent.
- Encoder layers: fusion -> class self-attention (sine positions 0..C-1) -> deformable layer.
- Two-stage: padded and out-of-range tokens get memory 0 and proposal +inf but stay in the top-k.
- Decoder: query positions from the reference scaled by the level-0 valid ratios, refinement with the
  shared box MLP (the head's `bbox_embed`, tied to `decoder.bbox_embed`).
Every op is per sample, so requests batched on one canvas compute exactly what each computes alone; the
official result of a request is its own canvas's (the detector groups requests by canvas).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .deformable import MLPHead, sine_embed_coords, sine_position_map
from .gdino_layers import DecoderLayer, EncoderLayer, class_self_attention_bias, key_padding_bias
from .swin import SwinBackbone


def _nearest_index(n_in: int, n_out: int, device) -> torch.Tensor:
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)  # PyTorch's float scale of a sized 'nearest'
    idx = torch.floor(torch.arange(n_out, dtype=torch.float32) * scale).long().clamp(max=n_in - 1)
    return idx.to(device)


def nearest_resize(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(mask[None].float(), size)[0].bool() (mode 'nearest', how the official model resizes the
    pixel mask to each level) as index gathers: constant indices, no Resize node in the exported graph."""
    h, w = mask.shape[-2:]
    return mask[:, _nearest_index(h, size[0], mask.device)][:, :, _nearest_index(w, size[1], mask.device)]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The official inverse_sigmoid (clamp to [0, 1], then log(max(x, eps) / max(1 - x, eps)))."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class _Holder(nn.Module):
    def __init__(self, **mods: nn.Module):
        super().__init__()
        for k, v in mods.items():
            self.add_module(k, v)


class ConvNorm(nn.Module):
    """detectron2 Conv2d without bias and with a GroupNorm at `.norm` (keys `weight`, `norm.weight`, `norm.bias`)."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        nn.init.kaiming_uniform_(self.weight, a=1)
        self.norm = nn.GroupNorm(groups, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.conv2d(x, self.weight, None, 1, self.weight.shape[-1] // 2))


class GdinoModel(nn.Module):
    """cfg: DetectorConfig. Keys = the official `gdino.model.*` without that prefix."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, lv = cfg.d_model, cfg.num_feature_levels
        swin = SwinBackbone(cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.patch_size,
                            cfg.mlp_ratio, cfg.layer_norm_eps)
        self.backbone = _Holder(conv_encoder=_Holder(model=swin))
        ch = swin.channels
        projs = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in ch[-3:]]
        projs.append(nn.Sequential(nn.Conv2d(ch[-1], d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
        self.input_proj_vision = nn.ModuleList(projs)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, 1)
        self.lateral_convs = nn.ModuleList([ConvNorm(ch[0], d, 1)])
        self.output_convs = nn.ModuleList([ConvNorm(d, d, 3)])
        self.query_position_embeddings = nn.Embedding(cfg.num_queries, d)
        self.mask_embed = MLPHead(d, d, cfg.mask_dim, 3)
        enc = (d, cfg.encoder_ffn_dim, lv, cfg.encoder_attention_heads, cfg.encoder_n_points)
        dec = (d, cfg.decoder_ffn_dim, lv, cfg.decoder_attention_heads, cfg.decoder_n_points)
        self.encoder = _Holder(layers=nn.ModuleList(EncoderLayer(*enc) for _ in range(cfg.encoder_layers)))
        self.decoder = _Holder(layer_norm=nn.LayerNorm(d),
                               layers=nn.ModuleList(DecoderLayer(*dec) for _ in range(cfg.decoder_layers)),
                               reference_points_head=MLPHead(2 * d, d, d, 2))
        self.level_embed = nn.Parameter(torch.zeros(lv, d))
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.encoder_output_bbox_embed = MLPHead(d, d, 4, 3)
        # training only (training/train_shapes.py): a list set here collects the two-stage selection and each
        # decoder layer's output for the auxiliary losses; None (always, at inference) collects nothing
        self.collect: list | None = None

    # ---- image side -------------------------------------------------------------------------------------------
    def levels(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor):
        """-> (stage-1 map, level maps [B, d, H_l, W_l], level masks [B, H_l, W_l] bool)."""
        feats = self.backbone.conv_encoder.model(pixel_values)
        srcs = [proj(f) for proj, f in zip(self.input_proj_vision, feats[1:])]
        srcs.append(self.input_proj_vision[3](feats[-1]))
        masks = [nearest_resize(pixel_valid, tuple(s.shape[-2:])) for s in srcs]
        return feats[0], srcs, masks

    def flatten(self, srcs: list[torch.Tensor], masks: list[torch.Tensor]):
        """-> memory [B, S, d], pos [B, S, d], valid [B, S], shapes [L, 2], start [L], valid ratios [B, L, 2]
        (w, h), valid counts [B, L, 2] (w, h)."""
        mem, pos, val, ratios, counts = [], [], [], [], []
        for i, (src, mask) in enumerate(zip(srcs, masks)):
            p = sine_position_map(mask, self.cfg.d_model, self.cfg.position_temperature).to(src.dtype)
            mem.append(src.flatten(2).transpose(1, 2))
            pos.append(p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1))
            val.append(mask.flatten(1))
            vh, vw = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)
            counts.append(torch.stack([vw, vh], -1))
            ratios.append(torch.stack([vw.float() / mask.shape[2], vh.float() / mask.shape[1]], -1))
        shapes = torch.tensor([list(s.shape[-2:]) for s in srcs], dtype=torch.long, device=srcs[0].device)
        start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        return (torch.cat(mem, 1), torch.cat(pos, 1), torch.cat(val, 1), shapes, start, torch.stack(ratios, 1),
                torch.stack(counts, 1))

    @staticmethod
    def encoder_reference_points(sizes: list[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
        """GroundingDinoEncoder.get_reference_points -> [B, S, L, 2]."""
        refs = []
        for i, (h, w) in enumerate(sizes):
            ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=ratios.device),
                                    torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=ratios.device),
                                    indexing="ij")
            ry = ry.reshape(-1)[None] / (ratios[:, None, i, 1] * h)
            rx = rx.reshape(-1)[None] / (ratios[:, None, i, 0] * w)
            refs.append(torch.stack((rx, ry), -1))
        return torch.cat(refs, 1)[:, :, None] * ratios[:, None]

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor, text: torch.Tensor,
                text_valid: torch.Tensor, with_masks: bool = False):
        """text: [B, C, d] class embeddings (after patch2query), text_valid [B, C] bool -> (last hidden state
        after the decoder layer norm [B, Q, d], enc text [B, C, d], reference before the last layer [B, Q, 4],
        mask features [B, mask_dim, H/4, W/4] or None)."""
        stage1, srcs, masks = self.levels(pixel_values, pixel_valid)
        memory, pos, valid, shapes, start, ratios, counts = self.flatten(srcs, masks)
        sizes = [tuple(s.shape[-2:]) for s in srcs]
        refs = self.encoder_reference_points(sizes, ratios)
        c = text.shape[1]
        ids = torch.arange(c, device=text.device, dtype=torch.float32)[None, :, None].expand(text.shape[0], c, 1)
        text_pos = sine_embed_coords(ids.masked_fill(~text_valid[..., None], 0.0), self.cfg.d_model).to(text.dtype)
        text_bias = class_self_attention_bias(text_valid, text.dtype)
        for layer in self.encoder.layers:
            memory, text = layer(memory, pos, valid, refs, shapes, start, text, text_valid, text_bias, text_pos)
        mask_feats = self.pixel_decoder(stage1, memory, sizes[0]) if with_masks else None
        target, ref = self.select_queries(memory, valid, sizes, counts, text, text_valid)
        hidden, prev = self.decode(target, ref, memory, valid, shapes, start, ratios, text, text_valid)
        return hidden, text, prev, mask_feats

    def pixel_decoder(self, stage1: torch.Tensor, memory: torch.Tensor, size0: tuple[int, int]) -> torch.Tensor:
        """output_convs(lateral_convs(stage 1) + bilinear-up(level-0 memory)) -> mask_features (1x1 conv)."""
        b, d = memory.shape[0], self.cfg.d_model
        h0, w0 = size0
        lvl0 = memory[:, :h0 * w0].transpose(1, 2).reshape(b, d, h0, w0)
        x = self.lateral_convs[0](stage1)
        x = x + F.interpolate(lvl0.float(), size=x.shape[-2:], mode="bilinear", align_corners=False).to(x.dtype)
        return self.mask_features(F.relu(self.output_convs[0](x)))

    def select_queries(self, memory, valid, sizes, counts, text, text_valid):
        """gen_encoder_output_proposals + top-num_queries by the max class logit -> (target, reference)."""
        b = memory.shape[0]
        props = []
        for i, (h, w) in enumerate(sizes):
            gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
                                    torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
                                    indexing="ij")
            scale = counts[:, i].view(b, 1, 1, 2)
            grid = (torch.stack([gx, gy], -1)[None].expand(b, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** i)
            props.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        props = torch.cat(props, 1)
        ok = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        props = props.masked_fill(~valid[..., None], float("inf")).masked_fill(~ok, float("inf"))
        query = memory.masked_fill(~valid[..., None], 0.0).masked_fill(~ok, 0.0)
        query = self.enc_output_norm(self.enc_output(query))
        score = class_logits(query, text, text_valid).max(-1).values
        k = min(self.cfg.num_queries, score.shape[1])
        idx = torch.topk(score, k, dim=1).indices
        if self.collect is not None:
            self.collect.append(("enc", query, props, idx, text))
        # references stay fp32 under a bf16 model, as in the official code (bf16 delta + fp32 proposals)
        coords = torch.gather(self.encoder_output_bbox_embed(query).float() + props, 1,
                              idx[..., None].expand(-1, -1, 4))
        target = self.query_position_embeddings.weight[:k][None].expand(b, -1, -1)
        return target, coords.sigmoid()

    def decode(self, target, ref, memory, valid, shapes, start, ratios, text, text_valid):
        """-> (layer_norm(last hidden) [B, Q, d], the reference the last layer refined [B, Q, 4])."""
        hidden, d = target, self.cfg.d_model
        ratios4 = torch.cat([ratios, ratios], -1)[:, None].float()
        ref = ref.float()
        tbias = key_padding_bias(text_valid, hidden.dtype)
        prev = ref
        for i, layer in enumerate(self.decoder.layers):
            ref_in = ref[:, :, None] * ratios4
            qpos = self.decoder.reference_points_head(sine_embed_coords(ref_in[:, :, 0], d // 2).to(hidden.dtype))
            hidden = layer(hidden, qpos, ref_in, shapes, start, memory, valid, text, tbias)
            if self.collect is not None:
                self.collect.append(("dec", hidden, ref))
            prev, ref = ref, (self.decoder.bbox_embed[i](hidden).float() + inverse_sigmoid(ref)).sigmoid()
        return self.decoder.layer_norm(hidden), prev


def class_logits(hidden: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """GroundingDinoContrastiveEmbedding without the padding to max_text_len: [B, Q, C], -inf at padded classes."""
    return (hidden @ text.transpose(-1, -2)).masked_fill(~text_valid[:, None, :], float("-inf"))
