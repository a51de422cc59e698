"""Triton paged attention: decode (split-K + log-sum-exp merge, GQA heads grouped) and
varlen causal prefill reading keys through the block table. The math is in
README_attention.md. Runs on CUDA, and on CPU only under TRITON_INTERPRET=1 (tests).

Cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] int32.
Host syncs: none when the caller passes the host-side maxima (decode: `max_context_len`, the
longest live context; prefill: `max_query_len`); the grids depend only on those ints and
shapes, so the decode launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_SPLITS = 64


@triton.jit
def _softmax_tile(q, k, v, keep, scale, m_i, l_i, acc, F32: tl.constexpr):
    """One online-softmax step: q [M, BD], k/v [BN, BD], keep [M, BN] -> updated (m, l, acc), fp32."""
    if F32:
        sc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(k))
    sc = tl.where(keep, sc * scale, float("-inf"))  # [M, BN]
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp(m_i - m_new)
    pr = tl.exp(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    if F32:
        acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)  # P rounded to the value dtype, as in flash attn
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, acc_ptr, ml_ptr, o_ptr,
                         stride_qb, stride_qh, stride_ob, stride_oh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_btb,
                         scale, NUM_SPLITS, H, GROUP, D,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_D: tl.constexpr, F32: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    n_pages = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    # this sequence's own context split into NUM_SPLITS runs of whole tiles (split s may be empty)
    tiles = (n_pages + BLOCK_N // BLOCK_SIZE - 1) // (BLOCK_N // BLOCK_SIZE)
    pages_per_split = (tiles + NUM_SPLITS - 1) // NUM_SPLITS * (BLOCK_N // BLOCK_SIZE)
    p_lo = s * pages_per_split
    p_hi = tl.minimum(p_lo + pages_per_split, n_pages)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    page_in, off = n // BLOCK_SIZE, n % BLOCK_SIZE  # a tile spans BLOCK_N // BLOCK_SIZE pages
    heads = kvh * GROUP + g  # [BG] the query heads sharing this KV head
    gmask = g < GROUP
    dmask = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [BG, BD]
    if F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for p0 in range(p_lo, p_hi, BLOCK_N // BLOCK_SIZE):
        pg = p0 + page_in  # [BN]
        valid = (pg < p_hi) & (pg * BLOCK_SIZE + off < ctx)
        blk = tl.load(bt_row + pg, mask=pg < p_hi, other=0).to(tl.int64)  # int64: blk * stride_kb passes 2^31
        kvmask = valid[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=kvmask, other=0.0)  # [BN, BD]
        v = tl.load(vc_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=kvmask, other=0.0)  # [BN, BD]
        m_i, l_i, acc = _softmax_tile(q, k, v, valid[None, :], scale, m_i, l_i, acc, F32)
    if SINGLE_SPLIT:  # the whole context in one program: normalise and write the output directly
        out = acc / l_i[:, None]
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:  # partials: acc [B, H, S, D] fp32 (unnormalised), ml [B, H, S, 2] = (max, sum)
        row = (b.to(tl.int64) * H + heads) * NUM_SPLITS + s  # [BG]
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
        tl.store(ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_merge_kernel(acc_ptr, ml_ptr, o_ptr, stride_ob, stride_oh, NUM_SPLITS, H, D,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sp < NUM_SPLITS
    row = (b.to(tl.int64) * H + h) * NUM_SPLITS + sp  # [BS]
    m = tl.load(ml_ptr + row * 2, mask=smask, other=float("-inf"))
    lsum = tl.load(ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))  # [BS] empty splits weigh 0
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)  # [BD]
    den = tl.sum(lsum * w, axis=0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, ctx_ptr, o_ptr,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_btb, stride_ot, stride_oh,
                    scale, GROUP, D,
                    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    F32: tl.constexpr):
    b = tl.program_id(0)
    mb = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    kvh = h // GROUP
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query index within the sequence
    pos = ctx - q_len + i  # absolute position: cached prefix tokens come first
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    page_in, off = n // BLOCK_SIZE, n % BLOCK_SIZE  # a tile spans BLOCK_N // BLOCK_SIZE pages
    dmask = d < D
    qrow = (q_start + i).to(tl.int64)
    qmask = (i < q_len)[:, None] & dmask[None, :]
    q = tl.load(q_ptr + qrow[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qmask, other=0.0)
    if F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(ctx, ctx - q_len + (mb + 1) * BLOCK_M)  # last key any row of the tile sees, +1
    n_pages = (kv_end + BLOCK_SIZE - 1) // BLOCK_SIZE
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for p0 in range(0, n_pages, BLOCK_N // BLOCK_SIZE):
        pg = p0 + page_in  # [BN]
        kpos = pg * BLOCK_SIZE + off
        blk = tl.load(bt_row + pg, mask=pg < n_pages, other=0).to(tl.int64)  # int64: blk * stride_kb passes 2^31
        kvmask = (kpos < kv_end)[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=kvmask, other=0.0)  # [BN, BD]
        v = tl.load(vc_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=kvmask, other=0.0)
        # key 0 is visible to every row (pos >= 0), so no row is ever fully masked
        visible = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < kv_end)  # [BM, BN]
        m_i, l_i, acc = _softmax_tile(q, k, v, visible, scale, m_i, l_i, acc, F32)
    out = acc / l_i[:, None]
    tl.store(o_ptr + qrow[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=qmask)


def _check_cache(q, k_cache, v_cache, block_tables, context_lens):
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must be [NB, BS, Hkv, D]"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and caches must share a dtype"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert q.shape[-1] == k_cache.shape[-1] and q.shape[-2] % k_cache.shape[2] == 0
    assert q.stride(-1) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert context_lens.dtype == torch.int32 and context_lens.is_contiguous()
    assert k_cache.shape[1] in (16, 32), "block_size must be 16 or 32"


def _use_f32(dtype: torch.dtype) -> bool:
    # fp32 data: exact ieee dots (no tf32); bf16 under the interpreter is unreliable: upcast
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _block_n(block_size: int, head_dim: int) -> int:
    """Keys per tile: a whole number of pages (64 keys, 32 for head_dim 256 to bound registers)."""
    return max(block_size, 32 if head_dim > 128 and not _INTERPRET else 64)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch: int, hkv: int, max_context_len: int, block_n: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): about 2 programs per SM in all, at most one per key tile of
    the longest live context, at most _MAX_SPLITS. Each sequence divides its own context over
    them, so the count changes the speed, never the result. The interpreter uses up to 4 so
    tests exercise the merge."""
    if device.type == "cuda":
        target = triton.cdiv(2 * _sm_count(device.index or 0), batch * hkv)
    else:
        target = 4
    return max(1, min(target, triton.cdiv(max_context_len, block_n), _MAX_SPLITS))


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float, max_context_len: int = -1) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D]; one token per sequence attends its context_lens[b] keys.
    max_context_len: the longest context_lens entry (host int) sizing the split count; -1 takes
    the block-table bound (block_tables.shape[1] * block_size, no sync). Any value gives the
    same result: it only sets how many programs share each sequence's keys."""
    assert q.dim() == 3
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    bsz, h, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    if max_context_len < 0:
        max_context_len = block_tables.shape[1] * bs
    block_n = _block_n(bs, d)
    splits = _num_splits(bsz, hkv, max_context_len, block_n, q.device)
    single = splits == 1
    acc = out if single else torch.empty((bsz, h, splits, d), device=q.device, dtype=torch.float32)
    ml = out if single else torch.empty((bsz, h, splits, 2), device=q.device, dtype=torch.float32)
    group = h // hkv
    block_d = triton.next_power_of_2(d)
    _decode_split_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        scale, splits, h, group, d,
        BLOCK_SIZE=bs, BLOCK_N=block_n, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        F32=_use_f32(q.dtype), SINGLE_SPLIT=single)
    if single:
        return out
    _decode_merge_kernel[(bsz, h)](acc, ml, out, out.stride(0), out.stride(1), splits, h, d,
                                   BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return out


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
                         max_query_len: int = -1) -> torch.Tensor:
    """q: [T, H, D] packed -> [T, H, D]; causal, query i of seq b at context_lens[b] - q_len_b + i.
    max_query_len: the longest q_len (host int, from the scheduler) sizing the grid; it must not be
    smaller than the real one (query rows past it are not computed; not checked: that needs a
    sync). -1 computes it from cu_seqlens_q with one device-to-host sync."""
    assert q.dim() == 3
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.is_contiguous()
    t, h, d = q.shape
    out = torch.empty_like(q)
    bsz = context_lens.shape[0]
    if t == 0 or bsz == 0:
        return out
    if max_query_len < 0:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    assert max_query_len >= 1, f"max_query_len must be >= 1, got {max_query_len}"
    block_d = triton.next_power_of_2(d)
    block_m = 32 if _INTERPRET else (64 if block_d <= 128 else 32)
    grid = (bsz, triton.cdiv(max_query_len, block_m), h)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), scale, h // k_cache.shape[2], d,
        BLOCK_M=block_m, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=_block_n(k_cache.shape[1], d), BLOCK_D=block_d, F32=_use_f32(q.dtype))
    return out
