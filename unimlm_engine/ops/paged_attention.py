"""Paged attention ops: `unimlm::paged_decode_attention`, `unimlm::paged_prefill_attention`.

Cache layout per layer: k_cache, v_cache: [num_blocks, block_size, Hkv, D], filled by
`unimlm::write_kv_cache` (`kv_cache.py`) before attention reads it.
block_tables: [B, max_blocks] int32 (entries past a sequence's pages are padding, e.g. -1).
Query head h reads KV head h // (H // Hkv); every context length must be >= 1. The references gather through the block table
and compute in fp32; they are the CPU path (tensors on CPU never launch Triton unless
UNIMLM_KERNEL_BACKEND=triton forces it).
"""
from __future__ import annotations

import functools

import torch

from ._dispatch import pick, triton_launch_guard


@functools.cache
def _kernel():
    """The Triton kernel module, or None when Triton cannot be imported."""
    try:
        from unimlm_engine.kernels import paged_attention
    except ImportError:
        return None
    return paged_attention


def _gather_kv(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """cache: [NB, BS, Hkv, D], table_row: [max_blocks] -> [length, Hkv, D] (cache dtype)."""
    bs = cache.shape[1]
    pages = table_row[:(length + bs - 1) // bs].long()
    return cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:length]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_pos: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: [Tq, H, D], k/v: [L, Hkv, D], q_pos: [Tq] absolute positions -> [Tq, H, D] in `dtype`.
    Causal: key j is visible to query i when j <= q_pos[i]. Computed in `dtype`."""
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale  # [H, Tq, L]
    keep = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vf)


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D] (q.dtype), computed in `dtype` (fp32: the reference)."""
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        pos = torch.tensor([length - 1], device=q.device)
        out[b] = attention_reference(q[b:b + 1], k, v, scale, pos, dtype)[0].to(q.dtype)
    return out


def paged_decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """The CPU serving path of decode: the same fp32 math as `paged_decode_reference`, for all
    sequences at once (padded gather through the block tables, GQA heads grouped, no repeat).
    q: [B, H, D] -> [B, H, D] (q.dtype)."""
    b, h, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    width = int((context_lens.max().item() + bs - 1) // bs)
    pages = block_tables[:, :width].long().clamp(min=0)  # padding entries read block 0, masked below
    k = k_cache[pages].reshape(b, width * bs, hkv, d).float()  # [B, L, Hkv, D]
    v = v_cache[pages].reshape(b, width * bs, hkv, d).float()
    qf = q.float().view(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
    s = torch.einsum("bkgd,blkd->bkgl", qf, k) * scale
    valid = torch.arange(width * bs, device=q.device)[None, :] < context_lens[:, None].long()  # [B, L]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    v = v.masked_fill(~valid[:, :, None, None], 0.0)  # 0 * (garbage or NaN past a context) would leak
    out = torch.einsum("bkgl,blkd->bkgd", torch.softmax(s, dim=-1), v)
    return out.reshape(b, h, d).to(q.dtype)


def paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q: [T, H, D] packed -> [T, H, D]; query i of seq b sits at context_lens[b] - q_len + i."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, length in enumerate(context_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        pos = torch.arange(length - (hi - lo), length, device=q.device)
        out[lo:hi] = attention_reference(q[lo:hi], k, v, scale, pos, dtype).to(q.dtype)
    return out


@torch.library.custom_op("unimlm::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, D], block_tables: [B, max_blocks] int32, context_lens: [B] int32 -> [B, H, D]."""
    mod = _kernel()
    if pick(q, has_triton=mod is not None) == "triton":
        with triton_launch_guard():
            return mod.paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale)


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q)


@torch.library.custom_op("unimlm::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """q: [T, H, D] packed, cu_seqlens_q: [B+1] int32, context_lens: [B] int32 (incl. new) -> [T, H, D]."""
    mod = _kernel()
    if pick(q, has_triton=mod is not None) == "triton":
        with triton_launch_guard():
            return mod.paged_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                                scale)
    return paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


@paged_prefill_attention.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    return torch.empty_like(q)
