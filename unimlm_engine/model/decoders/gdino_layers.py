"""Encoder / decoder layers of the official gdino (VisionLLM v2 `modeling_ov_grounding_dino_mask_dn.py`), with
its parameter names. The text and decoder attentions are `nn.MultiheadAttention` in the official model
(`in_proj_weight`, `in_proj_bias`, `out_proj`); `MHA` holds the same parameters and computes what
`F.multi_head_attention_forward` computes, as plain ops (export-friendly). The deformable image layer, the MSDA
and the MLP heads are shared with the legacy core (deformable.py).

Masks: `*_valid` bool tensors, True for a real token. Everything here is per sample: a request computes the
same alone or batched with others of the same canvas (the official fusion subtracts the max over the whole
batch; at batch size 1, what the official runs, that is this per-sample max).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .deformable import BiMultiHeadAttention, DeformableLayer, MultiscaleDeformableAttention
from .deformable import FusionLayer as _LegacyFusion

NEG_INF = float("-inf")


class MHA(nn.Module):
    """nn.MultiheadAttention(d, heads, batch_first=True) parameters; bias: additive [B, 1|heads, Q, K] or None."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        b, h, hd = query.shape[0], self.n_heads, self.head_dim
        d = h * hd
        w, bias_ = self.in_proj_weight, self.in_proj_bias  # sliced, not chunk(): no multi-output Split in ONNX
        wq, wk, wv = w[:d], w[d:2 * d], w[2 * d:]
        bq, bk, bv = bias_[:d], bias_[d:2 * d], bias_[2 * d:]
        q = F.linear(query, wq, bq).view(b, -1, h, hd).transpose(1, 2) * math.sqrt(1.0 / hd)
        k = F.linear(key, wk, bk).view(b, -1, h, hd).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, -1, h, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, h * hd)
        return self.out_proj(out)


def key_padding_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid: [B, K] bool -> [B, 1, 1, K] additive (0 / -inf), nn.MultiheadAttention's key_padding_mask."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, NEG_INF)[:, None, None]


class BiAttention(BiMultiHeadAttention):
    """GroundingDinoBiMultiHeadAttention: scores minus their max, clamped to +-50000, image->class softmax over
    valid classes, class->image softmax over valid image tokens (after subtracting each row's max)."""

    def forward(self, vision: torch.Tensor, text: torch.Tensor, vision_valid: torch.Tensor,
                text_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = vision.shape
        q = self._heads(self.vision_proj(vision) * self.scale)
        scores = q @ self._heads(self.text_proj(text)).transpose(-1, -2)  # [B, h, S, C]
        tmask = ~text_valid[:, None, None, :]
        top = scores.masked_fill(tmask, NEG_INF).amax(dim=(1, 2, 3), keepdim=True)
        scores = (scores - top).clamp(min=-50000, max=50000)
        t2v = scores.transpose(-1, -2)
        t2v = (t2v - t2v.amax(-1, keepdim=True)).clamp(min=-50000, max=50000)
        t2v = t2v.masked_fill(~vision_valid[:, None, None, :], NEG_INF).softmax(-1)
        v2t = scores.masked_fill(tmask, NEG_INF).softmax(-1)
        out_v = (v2t @ self._heads(self.values_text_proj(text))).transpose(1, 2).reshape(b, s, self.embed_dim)
        out_t = (t2v @ self._heads(self.values_vision_proj(vision))).transpose(1, 2).reshape(b, -1, self.embed_dim)
        return self.out_vision_proj(out_v), self.out_text_proj(out_t)


class FusionLayer(_LegacyFusion):
    """GroundingDinoFusionLayer: pre-norm bi-attention with layer scales vision_param / text_param."""

    def __init__(self, d_model: int, ffn_dim: int, n_heads: int):
        super().__init__(d_model, ffn_dim, n_heads)
        self.attn = BiAttention(d_model, ffn_dim // 2, n_heads // 2)


class TextEnhancerLayer(nn.Module):
    """GroundingDinoTextEnhancerLayer: class-to-class self-attention (heads/2, FFN/2), post-norm."""

    def __init__(self, d_model: int, ffn_dim: int, n_heads: int):
        super().__init__()
        self.self_attn = MHA(d_model, n_heads // 2)
        self.fc1 = nn.Linear(d_model, ffn_dim // 2)
        self.fc2 = nn.Linear(ffn_dim // 2, d_model)
        self.layer_norm_before = nn.LayerNorm(d_model)
        self.layer_norm_after = nn.LayerNorm(d_model)

    def forward(self, text: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = text + pos
        text = self.layer_norm_before(text + self.self_attn(qk, qk, text, bias))
        return self.layer_norm_after(text + self.fc2(F.relu(self.fc1(text))))


def class_self_attention_bias(text_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """generate_masks_with_text_query_masks: valid classes see every valid class, a padded one only itself
    -> additive [B, 1, C, C]."""
    c = text_valid.shape[1]
    eye = torch.eye(c, dtype=torch.bool, device=text_valid.device)[None]
    see = (text_valid[:, :, None] & text_valid[:, None, :]) | eye
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill(~see, NEG_INF)[:, None]


class EncoderLayer(nn.Module):
    """GroundingDinoEncoderLayer: fusion -> text enhancer -> deformable image layer."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.text_enhancer_layer = TextEnhancerLayer(d_model, ffn_dim, n_heads)
        self.fusion_layer = FusionLayer(d_model, ffn_dim, n_heads)
        self.deformable_layer = DeformableLayer(d_model, ffn_dim, n_levels, n_heads, n_points)

    def forward(self, vision, vision_pos, vision_valid, refs, shapes, start, text, text_valid, text_bias, text_pos):
        vision, text = self.fusion_layer(vision, text, vision_valid, text_valid)
        text = self.text_enhancer_layer(text, text_bias, text_pos)
        vision = self.deformable_layer(vision, vision_valid, vision_pos, refs, shapes, start)
        return vision, text


class DecoderLayer(nn.Module):
    """GroundingDinoDecoderLayer: self-attn -> class cross-attn -> MSDA -> FFN, each post-norm."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MHA(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn_text = MHA(d_model, n_heads)
        self.encoder_attn_text_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiscaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, hidden, pos, refs, shapes, start, memory, memory_valid, text, text_bias):
        qk = hidden + pos
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(qk, qk, hidden))
        hidden = self.encoder_attn_text_layer_norm(hidden + self.encoder_attn_text(hidden + pos, text, text, text_bias))
        attn = self.encoder_attn(hidden, memory, memory_valid, pos, refs, shapes, start)
        hidden = self.encoder_attn_layer_norm(hidden + attn)
        return self.final_layer_norm(hidden + self.fc2(F.relu(self.fc1(hidden))))
