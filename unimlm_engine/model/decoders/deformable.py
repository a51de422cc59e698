"""Deformable building blocks of the Grounding-DINO detector (the layers that compose them are in
gdino_layers.py).

Module structure and parameter names mirror transformers' GroundingDino
(`GroundingDinoMultiscaleDeformableAttention`, `GroundingDinoFusionLayer`'s bi-attention,
`GroundingDinoDeformableLayer`, `GroundingDinoMLPPredictionHead`), so `gdino.*` weights load by name.
Here the "text" side is the per-class embedding sequence built from super-link payloads.

Masks follow one convention in this file: `*_valid` is a bool tensor, True for a real token.
Every function is free of data-dependent Python control flow (ONNX export).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimlm_engine.ops.msda import ms_deform_attn

LN_EPS = 1e-5


def sine_embed_coords(pos: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """pos: [..., C] normalised coords -> [..., C * num_pos_feats]; y and x swapped (DETR order)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    embs = [c[..., None] * (2 * math.pi) / dim_t for c in pos.unbind(-1)]
    embs = [torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2) for e in embs]
    if len(embs) >= 2:
        embs[0], embs[1] = embs[1], embs[0]
    return torch.cat(embs, dim=-1).to(pos.dtype)


def sine_position_map(valid: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """valid: [B, H, W] bool -> [B, d_model, H, W], normalised by the valid extent (pad-invariant)."""
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    half = d_model // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=valid.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class MLPHead(nn.Module):
    """`GroundingDinoMLPPredictionHead`: Linear layers with ReLU between (names `layers.{i}`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MultiscaleDeformableAttention(nn.Module):
    """Deformable-DETR attention; the sampling itself is `unimlm::ms_deform_attn`."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                value_valid: torch.Tensor | None, position_embeddings: torch.Tensor | None,
                reference_points: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor) -> torch.Tensor:
        """hidden_states: [B, Q, D], encoder_hidden_states: [B, S, D], value_valid: [B, S] bool,
        reference_points: [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h) -> [B, Q, D]."""
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        b, q, _ = hidden_states.shape
        s = encoder_hidden_states.shape[1]
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(encoder_hidden_states)
        if value_valid is not None:
            value = value.masked_fill(~value_valid[..., None], 0.0)
        value = value.view(b, s, m, self.d_model // m)
        # Sampling locations and weights stay fp32 whatever the model dtype (DESIGN.md section 4).
        offsets = self.sampling_offsets(hidden_states).float().view(b, q, m, lv, p, 2)
        weights = F.softmax(self.attention_weights(hidden_states).float().view(b, q, m, lv * p), -1)
        weights = weights.view(b, q, m, lv, p)
        reference_points = reference_points.float()
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)
        return self.output_proj(out)


class BiMultiHeadAttention(nn.Module):
    """`GroundingDinoBiMultiHeadAttention`: image->class and class->image attention in one score matrix."""

    def __init__(self, d_model: int, embed_dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim, self.embed_dim = n_heads, embed_dim // n_heads, embed_dim
        self.scale = self.head_dim ** -0.5
        self.vision_proj = nn.Linear(d_model, embed_dim)
        self.text_proj = nn.Linear(d_model, embed_dim)
        self.values_vision_proj = nn.Linear(d_model, embed_dim)
        self.values_text_proj = nn.Linear(d_model, embed_dim)
        self.out_vision_proj = nn.Linear(embed_dim, d_model)
        self.out_text_proj = nn.Linear(embed_dim, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, vision_valid: torch.Tensor,
                text_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vision: [B, S, D], text: [B, C, D], *_valid: bool -> (delta_vision [B, S, D], delta_text [B, C, D])."""
        b, s, _ = vision.shape
        q = self._heads(self.vision_proj(vision) * self.scale)
        scores = q @ self._heads(self.text_proj(text)).transpose(-1, -2)
        scores = scores.clamp(min=-50000, max=50000)
        neg = torch.finfo(scores.dtype).min
        v2t = scores.masked_fill(~text_valid[:, None, None, :], neg).softmax(-1)
        t2v = scores.transpose(-1, -2).masked_fill(~vision_valid[:, None, None, :], neg).softmax(-1)
        out_v = (v2t @ self._heads(self.values_text_proj(text))).transpose(1, 2).reshape(b, s, self.embed_dim)
        out_t = (t2v @ self._heads(self.values_vision_proj(vision))).transpose(1, 2).reshape(b, -1, self.embed_dim)
        return self.out_vision_proj(out_v), self.out_text_proj(out_t)


class FusionLayer(nn.Module):
    """`GroundingDinoFusionLayer`: pre-norm bi-attention with layer scale (vision_param, text_param)."""

    def __init__(self, d_model: int, ffn_dim: int, n_heads: int):
        super().__init__()
        self.layer_norm_vision = nn.LayerNorm(d_model, LN_EPS)
        self.layer_norm_text = nn.LayerNorm(d_model, LN_EPS)
        self.attn = BiMultiHeadAttention(d_model, ffn_dim // 2, max(n_heads // 2, 1))
        self.vision_param = nn.Parameter(1e-4 * torch.ones(d_model))
        self.text_param = nn.Parameter(1e-4 * torch.ones(d_model))

    def forward(self, vision: torch.Tensor, text: torch.Tensor, vision_valid: torch.Tensor,
                text_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vision: [B, S, D], text: [B, C, D] -> both updated."""
        vision, text = self.layer_norm_vision(vision), self.layer_norm_text(text)
        dv, dt = self.attn(vision, text, vision_valid, text_valid)
        return vision + self.vision_param * dv, text + self.text_param * dt


class DeformableLayer(nn.Module):
    """`GroundingDinoDeformableLayer`: post-norm deformable self-attention + FFN over image tokens."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MultiscaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.self_attn_layer_norm = nn.LayerNorm(d_model, LN_EPS)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model, LN_EPS)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> torch.Tensor:
        """hidden, pos: [B, S, D], valid: [B, S] bool, reference_points: [B, S, L, 2] -> [B, S, D]."""
        attn = self.self_attn(hidden, hidden, valid, pos, reference_points, spatial_shapes, level_start_index)
        hidden = self.self_attn_layer_norm(hidden + attn)
        return self.final_layer_norm(hidden + self.fc2(F.relu(self.fc1(hidden))))
