"""The attention interface the LLM calls, and the contiguous-cache reference backend.

Every layer calls `attn.forward(layer_idx, q, k, v, scale)` with RoPE already applied and
the tokens of all sequences packed in order:
    q: [T, H, D]   k, v: [T, Hkv, D]   ->   [T, H, D]
The backend owns the KV cache: it stores the new k/v and attends over everything cached.
`ContiguousKVCache` serves one sequence with one growing tensor per layer; it is the
reference the paged backend (unimlm_engine/engine/paged_attention.py) is checked against.
"""
from __future__ import annotations

from typing import Protocol

import torch


class AttentionBackend(Protocol):
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        """q [T, H, D], k / v [T, Hkv, D] (RoPE applied; v may be a column view of a fused QKV output:
        head_dim contiguous, other strides free) -> [T, H, D]."""
        ...


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 causal attention of the last T queries over all S keys of one sequence.

    q: [T, H, D], k/v: [S, Hkv, D] with S >= T; query i sits at position S - T + i.
    """
    t, h, _ = q.shape
    s, hkv, _ = k.shape
    group = h // hkv
    kf = k.float().repeat_interleave(group, dim=1)  # [S, H, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) * scale  # [H, T, S]
    q_pos = torch.arange(s - t, s, device=q.device)[:, None]
    k_pos = torch.arange(s, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    out = torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), vf)
    return out.to(q.dtype)


class ContiguousKVCache:
    """Single-sequence KV cache: per layer one [S, Hkv, D] tensor that grows by concatenation."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k])
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v])
        return causal_attention_reference(q, self.k[layer_idx], self.v[layer_idx], scale)
