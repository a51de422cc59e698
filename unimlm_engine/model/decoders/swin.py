"""Swin backbone of the detector, computing what transformers-4.34 `SwinBackbone` computes (the official
VisionLLM v2 `gdino.model.backbone.conv_encoder.model`), with its parameter names:

`embeddings.patch_embeddings.projection`, `embeddings.norm`, `encoder.layers.{i}.blocks.{j}.{layernorm_before,
attention.self.{query, key, value, relative_position_bias_table, relative_position_index}, attention.output.dense,
layernorm_after, intermediate.dense, output.dense}`, `encoder.layers.{i}.downsample.{reduction, norm}`,
`hidden_states_norms.stage{k}`. `relative_position_index` is a persistent buffer (it is in the checkpoint).

The backbone sees the whole zero-padded canvas (no pixel mask): windows are zero-padded to a multiple of the
window size after `layernorm_before`, shifted windows use the -100 region mask. Where a stage map is not larger
than the window (min(H, W) <= window_size) the shift is 0, as in 4.34 (`set_shift_and_window_size`); 4.34 also
shrinks the window to min(H, W), which only runs when that equals window_size (a smaller window does not fit
the relative-position table and raises there), so here the window is kept and zero-padded in that case, and the
4.34 side effect of keeping the shift at 0 for later calls is not reproduced (each call is stateless).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """x: [B, H, W, C] (H, W multiples of w) -> [B * nW, w * w, C]."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def window_reverse(x: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    return x.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


def shift_mask(hp: int, wp: int, w: int, s: int, device, dtype) -> torch.Tensor:
    """-> [nW, w*w, w*w]: 0 inside a shift region, -100 across regions (transformers' get_attn_mask)."""
    ih, iw = torch.arange(hp, device=device), torch.arange(wp, device=device)
    hr = (ih >= hp - w).long() + (ih >= hp - s).long()
    wr = (iw >= wp - w).long() + (iw >= wp - s).long()
    region = window_partition((hr[:, None] * 3 + wr[None, :]).to(dtype)[None, :, :, None], w)[..., 0]
    return (region[:, None, :] != region[:, :, None]).to(dtype) * -100.0


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B * nW, N, C], mask: [nW, N, N] additive or None -> [B * nW, N, C]."""
        bw, n, c = x.shape
        d = c // self.heads
        q, k, v = (p(x).view(bw, n, self.heads, d).transpose(1, 2) for p in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / d ** 0.5
        rel = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        scores = scores + rel.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            scores = (scores.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
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


class SwinLayer(nn.Module):
    """One (shifted-)window block (transformers' SwinLayer)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = _Attention(dim, heads, window)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = _Dense(dim, int(mlp_ratio * dim))
        self.output = _Dense(int(mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, h, wd, c = x.shape
        w = self.window
        s = 0 if min(h, wd) <= w else self.shift
        y = self.layernorm_before(x)
        ph, pw = (w - h % w) % w, (w - wd % w) % w
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, wd + pw
        if s > 0:
            y = torch.roll(y, (-s, -s), (1, 2))
        mask = shift_mask(hp, wp, w, s, y.device, y.dtype) if s > 0 else None
        y = self.attention.output.dense(getattr(self.attention, "self")(window_partition(y, w), mask))
        y = window_reverse(y, w, b, hp, wp)
        if s > 0:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y[:, :h, :wd]
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C] (odd sides zero-padded, as transformers)."""
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, downsample: bool, mlp_ratio: float,
                 eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(SwinLayer(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, eps)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim, eps) if downsample else None


class _PatchEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class _Embeddings(nn.Module):
    def __init__(self, dim: int, patch: int, eps: float):
        super().__init__()
        self.patch_embeddings = _PatchEmbeddings(dim, patch)
        self.norm = nn.LayerNorm(dim, eps=eps)


class _Encoder(nn.Module):
    def __init__(self, stages: list[SwinStage]):
        super().__init__()
        self.layers = nn.ModuleList(stages)


class SwinBackbone(nn.Module):
    """forward(pixel_values [B, 3, H, W], H and W multiples of patch_size) -> the normalised stage maps
    [B, C_i, H / patch / 2**i, W / patch / 2**i] (out_features stage1..stageN, before downsampling)."""

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int,
                 patch_size: int = 4, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.embeddings = _Embeddings(embed_dim, patch_size, eps)
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.encoder = _Encoder([SwinStage(dims[i], depths[i], num_heads[i], window_size, i < len(depths) - 1,
                                           mlp_ratio, eps) for i in range(len(depths))])
        self.hidden_states_norms = nn.ModuleDict({f"stage{i + 1}": nn.LayerNorm(d, eps=eps)
                                                  for i, d in enumerate(dims)})
        self.channels = dims

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.embeddings.patch_embeddings.projection(pixel_values).permute(0, 2, 3, 1)
        x = self.embeddings.norm(x)
        outs = []
        for i, stage in enumerate(self.encoder.layers):
            for block in stage.blocks:
                x = block(x)
            outs.append(self.hidden_states_norms[f"stage{i + 1}"](x).permute(0, 3, 1, 2))
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outs
