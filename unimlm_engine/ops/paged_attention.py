"""Paged attention ops: `unimlm::paged_decode_attention`, `unimlm::paged_prefill_attention`.

Cache layout per layer: k_cache, v_cache: [num_blocks, block_size, Hkv, D], filled by
`unimlm::write_kv_cache` (`kv_cache.py`) before attention reads it.
block_tables: [B, max_blocks] int32 (entries past a sequence's pages are padding, e.g. -1).
Query head h reads KV head h // (H // Hkv); every context length must be >= 1. The references gather through the block table
and compute in fp32; they are the CPU path (tensors on CPU never launch Triton unless
UNIMLM_KERNEL_BACKEND=triton forces it).

Host-side maxima (ints the scheduler already has, so no op syncs with the device for them):
- decode `max_context_len`: the longest live context_lens entry. It sizes the Triton split
  count (any value gives the same result) and the gather width of the CPU path (there it must
  be >= every context length; checked, CPU tensors only). -1: derived without a device sync
  (Triton: the block-table width; CPU path: context_lens.max() on the host tensor).
- prefill `max_query_len`: the longest q_len; it sizes the Triton grid and must not be smaller
  than the real one (rows past it are left unwritten on CUDA; the reference raises). -1:
  computed from cu_seqlens_q (one device-to-host sync on CUDA).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dispatch import custom_op, pick, triton_launch_guard


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


def paged_decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale,
                         max_context_len: int = -1) -> torch.Tensor:
    """The CPU serving path of decode: fp32 attention as `paged_decode_reference` computes it, for all
    sequences at once (padded gather through the block tables, then one fused
    `scaled_dot_product_attention` with GQA and a padding mask; one sequence: no padding, no mask).
    q: [B, H, D] -> [B, H, D] (q.dtype); max_context_len: see the module doc.
    One sequence on the CPU gathers exactly its context and needs no mask (SDPA's unmasked kernel: 139 against
    225 us per layer at the tiny preset's shapes, 150 tokens; the same result to ~1e-7)."""
    b, h, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    if max_context_len < 0:
        max_context_len = int(context_lens.max())
    elif not context_lens.is_cuda and max_context_len < int(context_lens.max()):
        raise ValueError(f"paged_decode: max_context_len={max_context_len} is smaller than the longest context "
                         f"{int(context_lens.max())}")
    if b == 1 and not context_lens.is_cuda:
        length = int(context_lens[0])
        pages = block_tables[0, :(length + bs - 1) // bs].long()
        k = k_cache.index_select(0, pages).view(1, -1, hkv, d)[:, :length].float().transpose(1, 2)
        v = v_cache.index_select(0, pages).view(1, -1, hkv, d)[:, :length].float().transpose(1, 2)
        out = F.scaled_dot_product_attention(q.float()[:, :, None, :], k, v, scale=scale, enable_gqa=True)
        return out[:, :, 0].to(q.dtype)
    width = min((max_context_len + bs - 1) // bs, block_tables.shape[1])
    pages = block_tables[:, :width].reshape(-1).long().clamp(min=0)  # padding reads block 0, zeroed below
    valid = torch.arange(width * bs, device=q.device)[None, :] < context_lens[:, None].long()  # [B, L]
    # zero K and V past each context: a masked score is -inf, but -inf + NaN (a poisoned or stale slot)
    # is NaN, and 0 * NaN in the value sum would leak too. Whole rows by index_fill_ on the fresh gather:
    # a broadcast masked_fill took 1.3 ms for [16, 304, 2, 64] on the CPU, index_fill_ ~0.3 ms.
    pad_rows = (~valid).view(-1).nonzero().view(-1)
    k = k_cache.index_select(0, pages).view(-1, hkv * d).index_fill_(0, pad_rows, 0.0)
    v = v_cache.index_select(0, pages).view(-1, hkv * d).index_fill_(0, pad_rows, 0.0)
    k = k.view(b, width * bs, hkv, d).float().transpose(1, 2)  # [B, Hkv, L, D]
    v = v.view(b, width * bs, hkv, d).float().transpose(1, 2)
    out = F.scaled_dot_product_attention(q.float()[:, :, None, :], k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=True)  # [B, H, 1, D], fp32
    return out[:, :, 0].to(q.dtype)


def paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                            dtype: torch.dtype = torch.float32, max_query_len: int = -1) -> torch.Tensor:
    """q: [T, H, D] packed -> [T, H, D]; query i of seq b sits at context_lens[b] - q_len + i.
    max_query_len (>= 0) is checked against the real longest q_len (see the module doc)."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    longest = max((hi - lo for lo, hi in zip(cu, cu[1:])), default=0)
    if 0 <= max_query_len < longest:
        raise ValueError(f"paged_prefill: max_query_len={max_query_len} is smaller than the longest q_len {longest}")
    for b, length in enumerate(context_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        pos = torch.arange(length - (hi - lo), length, device=q.device)
        out[lo:hi] = attention_reference(q[lo:hi], k, v, scale, pos, dtype).to(q.dtype)
    return out


@custom_op("unimlm::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context_len: int = -1) -> torch.Tensor:
    """q: [B, H, D], block_tables: [B, max_blocks] int32, context_lens: [B] int32 -> [B, H, D].
    max_context_len: the longest context (host int; -1: derived without a sync, see the module doc)."""
    mod = _kernel()
    if pick(q, has_triton=mod is not None) == "triton":
        with triton_launch_guard():
            return mod.paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)
    return paged_decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=-1):
    return torch.empty_like(q)


@custom_op("unimlm::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, max_query_len: int = -1) -> torch.Tensor:
    """q: [T, H, D] packed, cu_seqlens_q: [B+1] int32, context_lens: [B] int32 (incl. new) -> [T, H, D].
    max_query_len: the longest q_len (host int; must not be smaller than the real one; -1: computed,
    one sync on CUDA)."""
    mod = _kernel()
    if pick(q, has_triton=mod is not None) == "triton":
        with triton_launch_guard():
            return mod.paged_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                            scale, max_query_len)
    return paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                   max_query_len=max_query_len)


@paged_prefill_attention.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_query_len=-1):
    return torch.empty_like(q)
