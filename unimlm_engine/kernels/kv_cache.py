"""Triton kernel: scatter new K/V rows into the paged KV cache through a slot mapping.

k/v: [T, Hkv, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D];
slot_mapping: [T] int64, slot = block_id * block_size + offset, -1 = skip the token.
Op, reference and dispatch: `unimlm_engine/ops/kv_cache.py` (`unimlm::write_kv_cache`); tests:
tests/test_kv_cache.py; benchmark: benchmarks/bench_kv_cache.py.
Runs on CUDA, and on CPU only under TRITON_INTERPRET=1 (tests). GPU path untested here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, T,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     stride_vcb, stride_vcs, stride_vch,
                     HKV, D, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT] tokens
    c = tl.arange(0, BLOCK_H * BLOCK_D)  # [BHD] (head, dim) flattened so one tile covers a token's row
    h = c // BLOCK_D
    d = c % BLOCK_D
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1)  # int64 slots: blk * stride_cb passes 2^31
    keep = slot >= 0
    blk = tl.where(keep, slot // BLOCK_SIZE, 0)
    off = tl.where(keep, slot % BLOCK_SIZE, 0)
    mask = keep[:, None] & ((h < HKV) & (d < D))[None, :]  # [BT, BHD]
    k = tl.load(k_ptr + t[:, None] * stride_kt + (h * stride_kh + d)[None, :], mask=mask)
    v = tl.load(v_ptr + t[:, None] * stride_vt + (h * stride_vh + d)[None, :], mask=mask)
    tl.store(kc_ptr + blk[:, None] * stride_cb + off[:, None] * stride_cs + (h * stride_ch + d)[None, :], k, mask=mask)
    tl.store(vc_ptr + blk[:, None] * stride_vcb + off[:, None] * stride_vcs + (h * stride_vch + d)[None, :], v,
             mask=mask)


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> written in place into k_cache, v_cache: [NB, BS, Hkv, D]."""
    assert k.shape == v.shape and k.dim() == 3, "k, v must be [T, Hkv, D]"
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4
    assert k.dtype == k_cache.dtype == v.dtype == v_cache.dtype
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],)
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "cache head_dim must be contiguous"
    t, hkv, d = k.shape
    if t == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    block_h, block_d = triton.next_power_of_2(hkv), triton.next_power_of_2(d)
    block_t = max(1, min(16, 4096 // (block_h * block_d)))  # bound the tile at 4096 elements
    _write_kv_kernel[(triton.cdiv(t, block_t),)](
        k, v, k_cache, v_cache, slot_mapping, t,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        hkv, d, BLOCK_SIZE=k_cache.shape[1], BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d)
