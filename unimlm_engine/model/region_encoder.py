"""The official VisionLLM v2 region encoder (`region_encoder.*`, visual prompts).

A region is a 0/1 mask on the model's square canvas (image_size^2, the whole image stretched: the
anyres thumbnail, or the single tile of a one-tile image). `mask_embedding` turns the CLIP-normalised
canvas plus the mask (4 channels) into a [vis_hidden, S/p, S/p] map; for each of the CLIP tower's last
three hidden states (final layer included, CLS dropped) the map accumulates the level (`x = x + level`,
never reset), is sampled bilinearly at every selected mask pixel (x/S, y/S) (pixel corners,
grid_sample align_corners=False, zeros padding), averaged over the pixels and projected by `up_dim`;
the region's feature is the mean of the three projections. It replaces the `<region>` token's
input embedding.

Masks with more than MAX_POINTS pixels are sub-sampled: the official code draws MAX_POINTS of them with
`torch.multinomial` once per level (unseeded: a different subset every call); `sample_points` draws the
same way, one subset per level, from a seeded generator, so a region's feature is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_POINTS = 2304  # 48 x 48, the official `num_points`
NUM_LEVELS = 3  # hidden_states[-3:]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of [N, C, H, W] (detectron2 / ConvNeXt; eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


@dataclass
class RegionInput:
    """One region, ready for the encoder.

    image: index of the request's image it refers to; mask: [S, S] bool on the canvas;
    points: [n] int64 sorted flat indices (y * S + x) of the mask pixels sampled (all of them up to
    MAX_POINTS); key: 62-bit prefix-cache key of (image, mask, points).
    """

    image: int
    mask: torch.Tensor
    points: torch.Tensor
    key: int = 0


def sample_points(mask: torch.Tensor, seed: int, max_points: int = MAX_POINTS,
                  num_draws: int = NUM_LEVELS) -> torch.Tensor:
    """mask [S, S] bool -> sorted flat indices of its pixels: [n] when n <= max_points (every pixel, every level);
    over max_points pixels, [num_draws, max_points]: one uniform draw without replacement per level, as the
    official code calls its multinomial once per level; ours come one after another from one generator seeded
    with `seed`, so they are reproducible."""
    idx = mask.reshape(-1).nonzero().flatten()
    if idx.numel() <= max_points:
        return idx
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    draws = [torch.multinomial(torch.ones(idx.numel()), max_points, replacement=False, generator=g).sort().values
             for _ in range(num_draws)]
    return idx[torch.stack(draws)]


class RegionEncoder(nn.Module):
    """Official parameter names: mask_embedding.{0,1,3,4,6}, up_dim. hidden_dim is 256 in the official model."""

    def __init__(self, hidden_dim: int, embed_dim: int, out_dim: int, patch_size: int) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"RegionEncoder: patch_size must be even, got {patch_size}")
        k = patch_size // 2
        self.mask_embedding = nn.Sequential(
            nn.Conv2d(4, hidden_dim // 4, kernel_size=k, stride=k), LayerNorm2d(hidden_dim // 4), nn.GELU(),
            nn.Conv2d(hidden_dim // 4, hidden_dim, kernel_size=2, stride=2), LayerNorm2d(hidden_dim), nn.GELU(),
            nn.Conv2d(hidden_dim, embed_dim, kernel_size=1))
        self.up_dim = nn.Linear(embed_dim, out_dim)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, levels: list[torch.Tensor],
                points: list[torch.Tensor]) -> torch.Tensor:
        """images: [R, 3, S, S] CLIP-normalised canvases; masks: [R, S, S] 0/1; levels: NUM_LEVELS x [R, h*w, C]
        (hidden states without CLS, h = w = S / patch); points[r]: [n_r] flat mask indices, or [levels, n_r]
        one draw per level (`sample_points`)
        -> [R, out_dim]. An empty point list gives up_dim.bias (the official nan_to_num)."""
        dtype = images.dtype
        x = self.mask_embedding(torch.cat([images, masks[:, None].to(dtype)], dim=1))  # [R, C, h, w]
        r, c, h, w = x.shape
        size = masks.shape[-1]
        outs = []
        for li, level in enumerate(levels):
            # a mask's points: the same at every level, or (over MAX_POINTS pixels) this level's own draw
            grid, valid = _point_grid([p if p.dim() == 1 else p[li] for p in points], size, x.device)
            count = valid.sum(1, keepdim=True).clamp(min=1)
            x = x + level.transpose(1, 2).reshape(r, c, h, w).to(dtype)
            s = F.grid_sample(x.float(), grid, align_corners=False)[..., 0].to(dtype)  # [R, C, n]
            pooled = (s.transpose(1, 2) * valid[..., None].to(dtype)).sum(1) / count.to(dtype)  # in dtype, as official
            outs.append(self.up_dim(pooled))
        return torch.stack(outs).mean(0)


def _point_grid(points: list[torch.Tensor], size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """flat indices per region -> grid_sample grid [R, n_max, 1, 2] at (2 x / S - 1, 2 y / S - 1) and the
    validity [R, n_max] float (padding rows 0)."""
    n = max([int(p.numel()) for p in points] + [1])
    flat = torch.zeros(len(points), n, dtype=torch.long)
    valid = torch.zeros(len(points), n)
    for i, p in enumerate(points):
        flat[i, :p.numel()] = p.cpu()
        valid[i, :p.numel()] = 1
    xy = torch.stack([flat % size, flat // size], dim=-1).to(torch.float32) / size  # pixel corners, as official
    return (2 * xy - 1)[:, :, None].to(device), valid.to(device)
