"""UniPose's transformer layers (ED-Pose / X-Pose layout), batch-first, official module names.

MSDeformAttn (sampling_offsets, attention_weights, value_proj, output_proj) over the engine's MSDA op; the
encoder's deformable layer, text layer (nn.MultiheadAttention weights, post-norm) and image-text fusion layer
(BiAttentionBlock); the decoder layer (self-attn -> ca_text -> MSDA cross-attn -> FFN). Masks: True = padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ....ops.masked_attention import masked_sdpa
from ....ops.msda import ms_deform_attn


class MLP(nn.Module):
    """layers.i Linear with ReLU between (the official MLP)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (n - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _sine(x: torch.Tensor, n: int, temperature: float = 10000.0) -> torch.Tensor:
    """x: [...] already scaled -> [..., n] interleaved sin / cos."""
    dim_t = temperature ** (2 * torch.div(torch.arange(n, dtype=torch.float32, device=x.device), 2,
                                          rounding_mode="floor") / n)
    p = x[..., None] / dim_t
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), -1).flatten(-2)


def sine_embed_box(ref: torch.Tensor) -> torch.Tensor:
    """ref: [..., 4] (cx, cy, w, h) -> [..., 512] = sine(y), sine(x), sine(w), sine(h) (128 each)."""
    s = 2 * math.pi
    return torch.cat([_sine(ref[..., i] * s, 128) for i in (1, 0, 2, 3)], -1)


def text_position_embed(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids: [B, T] -> [B, T, 256] (get_sine_pos_embed, exchange_xy=False)."""
    return _sine(position_ids.float() * (2 * math.pi), 256)


def mask_position_embed(mask: torch.Tensor, n: int, temp_h: float, temp_w: float) -> torch.Tensor:
    """PositionEmbeddingSineHW (normalize=True): mask [B, H, W] True = padding -> [B, 2n, H, W]."""
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    return torch.cat([_sine(y, n, temp_h), _sine(x, n, temp_w)], -1).permute(0, 3, 1, 2)


class MSDeformAttn(nn.Module):
    def __init__(self, d: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d, heads * levels * points)
        self.value_proj = nn.Linear(d, d)
        self.output_proj = nn.Linear(d, d)

    def forward(self, query, ref, value_in, shapes, starts, padding) -> torch.Tensor:
        """query [B, Q, D]; ref [B, Q, L, 2 | 4] in [0, 1]; value_in [B, S, D]; padding [B, S]."""
        b, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        value = self.value_proj(value_in).masked_fill(padding[..., None], 0.0)
        value = value.view(b, value.shape[1], m, -1)
        off = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        w = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        if ref.shape[-1] == 2:
            norm = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(off.dtype)
            loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        else:
            loc = ref[:, :, None, :, None, :2] + off / p * ref[:, :, None, :, None, 2:] * 0.5
        if value.dtype != torch.float32:  # as the official module: the op in fp32, back to the model dtype
            out = ms_deform_attn(value.float(), shapes, starts, loc.float(), w.float()).to(value.dtype)
        else:
            out = ms_deform_attn(value, shapes, starts, loc, w)
        return self.output_proj(out)


def _mha(mod: nn.MultiheadAttention, q, k, v, allowed) -> torch.Tensor:
    """nn.MultiheadAttention's math, batch-first, via SDPA (tiled over the rows where the mask is sparse: the
    keypoint layer's group mask). allowed: None, bool broadcastable to [B, h, Lq, Lk], or a SparseMask."""
    d = q.shape[-1]
    h = mod.num_heads
    wq, wk, wv = mod.in_proj_weight.split(d)
    bq, bk, bv = mod.in_proj_bias.split(d)

    def heads(x, w_, b_):
        return F.linear(x, w_, b_).view(x.shape[0], x.shape[1], h, d // h).transpose(1, 2)

    o = masked_sdpa(heads(q, wq, bq), heads(k, wk, bk), heads(v, wv, bv), allowed)
    return mod.out_proj(o.transpose(1, 2).reshape(q.shape[0], q.shape[1], d))


class EncoderLayer(nn.Module):
    """DeformableTransformerEncoderLayer (post-norm, ReLU)."""

    def __init__(self, d: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, src, pos, ref, shapes, starts, padding):
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes, starts, padding))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TextLayer(nn.Module):
    """TransformerEncoderLayer over the class embeddings (nn.MultiheadAttention, post-norm)."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, text, allowed, pos):
        """allowed: [B, 1, T, T] bool (text_self_attention_masks)."""
        qk = text + pos
        text = self.norm1(text + _mha(self.self_attn, qk, qk, text, allowed))
        return self.norm2(text + self.linear2(F.relu(self.linear1(text))))


class _BiAttention(nn.Module):
    def __init__(self, d: int, embed: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (embed // heads) ** -0.5
        self.v_proj, self.l_proj = nn.Linear(d, embed), nn.Linear(d, embed)
        self.values_v_proj, self.values_l_proj = nn.Linear(d, embed), nn.Linear(d, embed)
        self.out_v_proj, self.out_l_proj = nn.Linear(embed, d), nn.Linear(embed, d)

    def forward(self, v, l, pad_v, pad_l):
        b, nv, _ = v.shape
        h = self.heads

        def split(x):
            return x.view(b, x.shape[1], h, -1).transpose(1, 2)  # [B, h, N, dh]

        q, k = split(self.v_proj(v) * self.scale), split(self.l_proj(l))
        vv, vl = split(self.values_v_proj(v)), split(self.values_l_proj(l))
        a = q @ k.transpose(-1, -2)  # [B, h, Nv, Nl]
        # the official subtracts the max of the whole tensor (one request: this request's max), then clamps
        a = (a - a.amax(dim=(1, 2, 3), keepdim=True)).clamp(-50000, 50000)
        al = a.transpose(-1, -2)
        al = (al - al.amax(-1, keepdim=True)).clamp(-50000, 50000)
        al = al.masked_fill(pad_v[:, None, None, :], float("-inf")).softmax(-1)
        av = a.masked_fill(pad_l[:, None, None, :], float("-inf")).softmax(-1)
        ov = (av @ vl).transpose(1, 2).reshape(b, nv, -1)
        ol = (al @ vv).transpose(1, 2).reshape(b, l.shape[1], -1)
        return self.out_v_proj(ov), self.out_l_proj(ol)


class FusionLayer(nn.Module):
    """BiAttentionBlock: image <-> text attention, gated (gam_v / gam_l) residuals on the normed inputs."""

    def __init__(self, d: int, embed: int, heads: int):
        super().__init__()
        self.layer_norm_v, self.layer_norm_l = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _BiAttention(d, embed, heads)
        self.gam_v = nn.Parameter(torch.full((d,), 1e-4))
        self.gam_l = nn.Parameter(torch.full((d,), 1e-4))

    def forward(self, v, l, pad_v, pad_l):
        v, l = self.layer_norm_v(v), self.layer_norm_l(l)
        dv, dl = self.attn(v, l, pad_v, pad_l)
        return v + self.gam_v * dv, l + self.gam_l * dl


class DecoderLayer(nn.Module):
    """self-attn (norm2) -> text cross-attn (catext_norm) -> MSDA cross-attn (norm1) -> FFN (norm3)."""

    def __init__(self, d: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1 = nn.LayerNorm(d)
        self.ca_text = nn.MultiheadAttention(d, heads)
        self.catext_norm = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, tgt, pos, ref, text, text_valid, memory, mem_pad, shapes, starts, self_allowed, keys=None):
        """self_allowed: None, [B, 1, Q, Q] bool or a SparseMask of one; text_valid: [B, 1, 1, T] bool.
        keys: None (the self-attention's keys and values are the query rows), or (tgt, pos) of other rows, with
        self_allowed [B, 1, Q, len(keys)] (training only: UniPoseNet.loss_rows)."""
        qk = tgt + pos
        k_in, v_in = (qk, tgt) if keys is None else (keys[0] + keys[1], keys[0])
        tgt = self.norm2(tgt + _mha(self.self_attn, qk, k_in, v_in, self_allowed))
        tgt = self.catext_norm(tgt + _mha(self.ca_text, tgt + pos, text, text, text_valid))
        tgt = self.norm1(tgt + self.cross_attn(tgt + pos, ref, memory, shapes, starts, mem_pad))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
