"""The paged attention backend the LLM calls (see unimlm_engine/model/attention.py).

Per step the runner builds a `PagedAttentionMetadata` from each sequence's q_len (tokens fed
this step), context_len (cached tokens + the new ones) and block table, calls
`PagedAttention.set_metadata`, then runs the model: every layer's
`forward(layer_idx, q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], scale)` writes the new K/V into
the paged cache and attends with the decode op (every q_len is 1) or the varlen prefill op.
Tokens of all sequences are packed in order, matching the metadata's sequence order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..ops.kv_cache import write_kv_cache
from ..ops.paged_attention import paged_decode_attention, paged_prefill_attention


class PagedKVCache:
    """Per layer k, v: [num_blocks, block_size, num_kv_heads, head_dim] (allocated once)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
        if min(num_layers, num_blocks, num_kv_heads, head_dim) < 1:
            raise ValueError(f"PagedKVCache: num_layers, num_blocks, num_kv_heads, head_dim must be >= 1, got "
                             f"{num_layers}, {num_blocks}, {num_kv_heads}, {head_dim}")
        if block_size not in (16, 32):
            raise ValueError(f"PagedKVCache: block_size must be 16 or 32, got {block_size}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def device(self) -> torch.device:
        return self.k[0].device


@dataclass(slots=True)
class PagedAttentionMetadata:
    """One step's batch layout. Build with `PagedAttentionMetadata.build`.

    cu_seqlens_q: [B+1] int32, context_lens: [B] int32, block_tables: [B, max_blocks] int32
    (-1 padded), slot_mapping: [T] int64, is_all_decode: every sequence feeds one token.
    max_query_len / max_context_len: the longest q_len / context_len, host ints from the
    scheduler's arrays, so the attention launchers size their grids without a device sync
    (max_query_len must not be smaller than the real one; a captured decode graph passes its
    context bound as max_context_len).
    """
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    is_all_decode: bool
    num_tokens: int
    max_query_len: int
    max_context_len: int

    @classmethod
    def build(cls, q_lens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int, device: torch.device | str = "cpu") -> "PagedAttentionMetadata":
        """q_lens[b] new tokens of sequence b sit at positions context_lens[b] - q_lens[b] ... context_lens[b] - 1."""
        if not (len(q_lens) == len(context_lens) == len(block_tables)) or not q_lens:
            raise ValueError("PagedAttentionMetadata: q_lens, context_lens, block_tables must be non-empty and of "
                             f"equal length, got {len(q_lens)}, {len(context_lens)}, {len(block_tables)}")
        slots: list[int] = []
        for b, (q, n, table) in enumerate(zip(q_lens, context_lens, block_tables)):
            if q < 1 or n < q:
                raise ValueError(f"PagedAttentionMetadata: sequence {b} needs 1 <= q_len <= context_len, got {q}, {n}")
            if len(table) * block_size < n:
                raise ValueError(f"PagedAttentionMetadata: sequence {b} has {len(table)} blocks of {block_size} "
                                 f"for {n} tokens")
            slots += [table[p // block_size] * block_size + p % block_size for p in range(n - q, n)]
        width = max(len(t) for t in block_tables)
        table = torch.full((len(block_tables), width), -1, dtype=torch.int32)
        for b, row in enumerate(block_tables):
            table[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
        cu = torch.tensor([0, *q_lens], dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(cu_seqlens_q=cu.to(device), context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
                   block_tables=table.to(device), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                   is_all_decode=all(q == 1 for q in q_lens), num_tokens=len(slots), max_query_len=max(q_lens),
                   max_context_len=max(context_lens))


class PagedAttention:
    """AttentionBackend over a PagedKVCache; call `set_metadata` before each model step."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.meta: PagedAttentionMetadata | None = None

    def set_metadata(self, meta: PagedAttentionMetadata) -> None:
        self.meta = meta

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [T, H, D], k, v: [T, Hkv, D] (RoPE applied) -> [T, H, D] in q.dtype."""
        meta = self.meta
        if meta is None:
            raise RuntimeError("PagedAttention.forward called before set_metadata")
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"PagedAttention: got {q.shape[0]} tokens, metadata describes {meta.num_tokens}")
        dt = self.cache.dtype
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        # k, v may be column views of a fused QKV output (head_dim contiguous): the write takes strides
        write_kv_cache(k.to(dt), v.to(dt), kc, vc, meta.slot_mapping)
        qc = q.to(dt).contiguous()
        if meta.is_all_decode:
            out = paged_decode_attention(qc, kc, vc, meta.block_tables, meta.context_lens, scale,
                                         meta.max_context_len)
        else:
            out = paged_prefill_attention(qc, kc, vc, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale,
                                          meta.max_query_len)
        return out.to(q.dtype)
