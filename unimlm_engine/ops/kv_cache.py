"""Paged KV cache write op: `unimlm::write_kv_cache` (Triton kernel: `unimlm_engine/kernels/kv_cache.py`).

Cache layout per layer: k_cache, v_cache: [num_blocks, block_size, Hkv, D].
slot_mapping: [T] int64, slot = block_id * block_size + offset, -1 = skip the token.
The reference (advanced-index scatter) is the CPU path: tensors on CPU never launch Triton
unless UNIMLM_KERNEL_BACKEND=triton forces it. The attention ops that read the cache are in
`paged_attention.py`.
"""
from __future__ import annotations

import functools

import torch

from ._dispatch import custom_op, pick, triton_launch_guard


@functools.cache
def _kernel():
    """The Triton kernel module, or None when Triton cannot be imported."""
    try:
        from unimlm_engine.kernels import kv_cache
    except ImportError:
        return None
    return kv_cache


def write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v: [T, Hkv, D] into k_cache, v_cache: [NB, BS, Hkv, D] at slot_mapping [T] (skip -1)."""
    if k_cache.is_contiguous() and v_cache.is_contiguous() and bool((slot_mapping >= 0).all()):
        # every token writes (the engine's case): one index_copy_ into the flat slot view
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)


@custom_op("unimlm::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [NB, BS, Hkv, D] (mutated); slot_mapping: [T] int64."""
    mod = _kernel()
    if pick(k, has_triton=mod is not None) == "triton":
        with triton_launch_guard():
            mod.write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)


@write_kv_cache.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None
