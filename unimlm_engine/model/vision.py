"""CLIP ViT vision tower (HF `CLIPVisionModel` structure and parameter names).

Features are `hidden_states[output_layer][:, 1:]` (second-to-last layer, CLS dropped),
so only the first `num_layers_run` encoder layers are evaluated; the remaining layers
and `post_layernorm` are kept so official checkpoints load without unexpected keys. The region
encoder needs hidden_states[-3:] (final layer included) of the thumbnails of requests with
regions: `forward_with_levels` runs the extra layer(s) on those tiles only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.num_positions = cfg.tokens_per_tile + 1
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [N, 3, S, S] -> [N, 1 + (S/p)^2, C]"""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.unsqueeze(0)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        h = self.num_heads

        def heads(p: nn.Linear) -> torch.Tensor:
            return p(x).view(n, t, h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj))
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [N, 3, S, S] -> hidden_states[output_layer] without CLS: [N, (S/p)^2, C]"""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[: self.cfg.num_layers_run]:
            x = layer(x)
        return x[:, 1:]

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels: [N, 3, S, S] -> HF's hidden_states: num_hidden_layers + 1 tensors [N, 1 + (S/p)^2, C]
        (the embeddings after pre_layrnorm, then every layer's output). Runs every layer."""
        out = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.encoder.layers:
            out.append(layer(out[-1]))
        return out

    def forward_with_levels(self, pixels: torch.Tensor, rows: torch.Tensor, levels: tuple[int, ...]
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` for all N tiles plus hidden_states[l] (negative HF indices, CLS dropped) of the tiles
        `rows` [R] only: layers past the output layer run on those rows alone.
        -> ([N, (S/p)^2, C], len(levels) x [R, (S/p)^2, C])"""
        n_layers = len(self.encoder.layers)
        want = {n_layers + 1 + lvl: i for i, lvl in enumerate(levels)}
        got: list = [None] * len(levels)
        x = self.pre_layrnorm(self.embeddings(pixels))
        run = self.cfg.num_layers_run
        sub = None
        for i in range(max([run] + list(want)) + 1):
            if i > 0:
                if i <= run:
                    x = self.encoder.layers[i - 1](x)
                else:
                    sub = self.encoder.layers[i - 1](x[rows] if sub is None else sub)
            if i in want:
                got[want[i]] = (x[rows] if i <= run else sub)[:, 1:]
        return x[:, 1:], got


class VisionTower(nn.Module):
    """Checkpoint prefix `vis_encoder.`; parameters live under `vision_model.` as in HF."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixels)

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.vision_model.hidden_states(pixels)

    def forward_with_levels(self, pixels: torch.Tensor, rows: torch.Tensor, levels: tuple[int, ...]):
        return self.vision_model.forward_with_levels(pixels, rows, levels)
