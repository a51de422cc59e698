"""LEGACY (old pose decoder only; the detector uses swin.py, the official transformers-4.34 Swin).

Compact Swin-T backbone with transformers' SwinBackbone parameter names.

Names (under the detector's `backbone.conv_encoder.model.`): `embeddings.patch_embeddings.projection`,
`embeddings.norm`, `encoder.layers.{i}.blocks.{j}.{layernorm_before, attention.self.{query, key, value,
relative_position_bias_table}, attention.output.dense, layernorm_after, intermediate.dense, output.dense}`,
`encoder.layers.{i}.downsample.{norm, reduction}`, `hidden_states_norms.stage{k}` (k = 1..4; stage1 feeds
the mask head). `relative_position_index` is a non-persistent buffer, as in transformers.

Padding-invariant by construction, so a request gives the same features alone or batched with a larger
image: padded tokens are never attended to (key mask) and are zeroed before patch merging. Two consequences
that differ from transformers' Swin: (1) window-padding tokens are masked instead of attended as zeros,
(2) the window is never shrunk for maps smaller than `window_size`. Both only touch image borders and tiny maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return (rel[..., 0] * (2 * w - 1) + rel[..., 1]).view(-1)


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """x: [B, H, W, C] (H, W multiples of w) -> [B * nW, w * w, C]."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _unwindows(x: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    return x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [Bw, N, C], bias: [Bw, 1, N, N] additive -> [Bw, N, C]."""
        bw, n, c = x.shape
        d = c // self.heads
        q, k, v = (p(x).view(bw, n, self.heads, d).transpose(1, 2) for p in (self.query, self.key, self.value))
        rel = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)
        scores = q @ k.transpose(-1, -2) / d ** 0.5 + rel[None] + bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)


class _Dense(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.dense = nn.Linear(i, o)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        setattr(self, "self", _SelfAttention(dim, heads, window))
        self.output = _Dense(dim, dim)


class SwinBlock(nn.Module):
    """One (shifted-)window block; `valid`: [B, H, W] bool token mask."""

    def __init__(self, dim: int, heads: int, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-5)
        self.attention = _Attention(dim, heads, window)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-5)
        self.intermediate = _Dense(dim, 4 * dim)
        self.output = _Dense(4 * dim, dim)

    def _bias(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """valid: [B, Hp, Wp] (padded, shifted) -> [B * nW, 1, N, N] (shift regions -100, pad keys min)."""
        b, hp, wp = valid.shape
        w, s = self.window, self.shift
        key = _windows((~valid)[..., None].to(dtype), w)[..., 0] * torch.finfo(dtype).min
        bias = key[:, None, None, :]
        if s > 0:
            ih, iw = torch.arange(hp, device=valid.device), torch.arange(wp, device=valid.device)
            hr = (ih >= hp - w).long() + (ih >= hp - s).long()
            wr = (iw >= wp - w).long() + (iw >= wp - s).long()
            region = _windows((hr[:, None] * 3 + wr[None, :]).to(dtype)[None, :, :, None], w)[..., 0]
            shift_bias = (region[:, None, :] != region[:, :, None]).to(dtype) * -100.0
            bias = bias + shift_bias.repeat(b, 1, 1)[:, None]
        return bias

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, h, wd, c = x.shape
        w, s = self.window, self.shift
        y = self.layernorm_before(x)
        ph, pw = (w - h % w) % w, (w - wd % w) % w
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        v = F.pad(valid, (0, pw, 0, ph))
        if s > 0:
            y, v = torch.roll(y, (-s, -s), (1, 2)), torch.roll(v, (-s, -s), (1, 2))
        attn = getattr(self.attention, "self")(_windows(y, w), self._bias(v, y.dtype))
        y = self.attention.output.dense(attn)
        y = _unwindows(y, w, b, h + ph, wd + pw)
        if s > 0:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y[:, :h, :wd]
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] (H, W even) -> [B, H/2, W/2, 2C]."""
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None


class _PatchEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class _Embeddings(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch_embeddings = _PatchEmbeddings(dim, patch)
        self.norm = nn.LayerNorm(dim, eps=1e-5)


class _Encoder(nn.Module):
    def __init__(self, stages: list[SwinStage]):
        super().__init__()
        self.layers = nn.ModuleList(stages)


class SwinBackbone(nn.Module):
    """Swin with patch size 4. forward returns the four normalised stage maps (strides 4, 8, 16, 32)."""

    PATCH = 4

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int):
        super().__init__()
        self.embeddings = _Embeddings(embed_dim, self.PATCH)
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.encoder = _Encoder([SwinStage(dims[i], depths[i], num_heads[i], window_size, i < len(depths) - 1)
                                 for i in range(len(depths))])
        self.hidden_states_norms = nn.ModuleDict({f"stage{i + 1}": nn.LayerNorm(d, eps=1e-5)
                                                  for i, d in enumerate(dims)})
        self.channels = dims

    def forward(self, pixel_values: torch.Tensor, pixel_valid: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values: [B, 3, H, W] (H, W multiples of 4 * 2**(stages-1)), pixel_valid: [B, H, W] bool
        -> list of [B, C_i, H / 4 / 2**i, W / 4 / 2**i], zero at padded positions."""
        x = self.embeddings.patch_embeddings.projection(pixel_values).permute(0, 2, 3, 1)
        x = self.embeddings.norm(x)
        stride, outs = self.PATCH, []
        for i, stage in enumerate(self.encoder.layers):
            valid = pixel_valid[:, ::stride, ::stride]
            x = x * valid[..., None].to(x.dtype)
            for block in stage.blocks:
                x = block(x, valid)
            x = x * valid[..., None].to(x.dtype)
            outs.append(self.hidden_states_norms[f"stage{i + 1}"](x).permute(0, 3, 1, 2)
                        * valid[:, None].to(x.dtype))
            if stage.downsample is not None:
                x = stage.downsample(x)
                stride *= 2
        return outs
