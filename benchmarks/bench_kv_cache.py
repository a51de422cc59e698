"""KV-cache write (`unimlm::write_kv_cache`, Triton) at Vicuna-7B shapes (32 KV heads, d 128),
bf16, block size 16: decode (T = batch 1..256 tokens, one per sequence, each into a different
page) and prefill (T = 4096 tokens filling whole pages). GPU only; not yet run in this repository.

Per case: kernel time (CUDA events, L2 flushed), achieved bandwidth = bytes of K/V read + K/V
written + slot mapping read / time, fraction of the measured D2D copy bandwidth; baselines in
the same run: the PyTorch reference (`write_kv_cache_reference`: masked advanced-index scatter,
what the CPU path runs) and `index_copy_` into the flattened caches (no -1 handling: the leanest
PyTorch write). All three must leave bit-identical caches; a case where they differ is reported
as FAIL with no speedup.

    python benchmarks/bench_kv_cache.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import copy_bandwidth_gbs, device_info, print_table, require_cuda, time_cuda, write_json

KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 128, 16
NUM_BLOCKS = 8192  # 1 GiB per cache in bf16: a pool much larger than L2, as in serving
DECODE_TOKENS = (1, 8, 32, 64, 128, 256)
PREFILL_TOKENS = (4096,)


def make_case(phase: str, t: int, device: str = "cuda", dtype=torch.bfloat16, num_blocks: int = NUM_BLOCKS):
    """k, v: [T, Hkv, D] contiguous (the engine's backend makes them so before the write);
    caches [NB, BS, Hkv, D]; slots: decode = one random page and offset per token, prefill =
    whole random pages. Every slot is valid (no -1)."""
    k = torch.randn(t, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    if phase == "decode":
        pages = torch.randperm(num_blocks, device=device)[:t]
        slots = pages * BLOCK_SIZE + torch.randint(BLOCK_SIZE, (t,), device=device)
    else:
        pages = torch.randperm(num_blocks, device=device)[:-(-t // BLOCK_SIZE)]
        slots = (pages[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).flatten()[:t]
    return k, v, k_cache, v_cache, slots


def index_copy_write(k, v, k_cache, v_cache, slots) -> None:
    """Every slot valid (no -1): index_copy_ rows into the caches viewed as [NB * BS, Hkv, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def outputs_agree(k, v, k_cache, v_cache, slots, writers) -> bool:
    """Run each writer on its own copy of the caches; True when all leave identical caches."""
    results = []
    for write in writers:
        kc, vc = k_cache.clone(), v_cache.clone()
        write(k, v, kc, vc, slots)
        results.append((kc, vc))
    first = results[0]
    return all(torch.equal(first[0], kc) and torch.equal(first[1], vc) for kc, vc in results[1:])


def run_case(phase, t, copy_gbs, ops, timer=time_cuda, device="cuda", num_blocks=NUM_BLOCKS):
    k, v, kc, vc, slots = make_case(phase, t, device, num_blocks=num_blocks)
    writers = (ops.write_kv_cache, ops.write_kv_cache_reference, index_copy_write)
    ok = outputs_agree(k, v, kc, vc, slots, writers)
    t_kernel, t_ref, t_index = (timer(lambda w=w: w(k, v, kc, vc, slots)) for w in writers)
    nbytes = 2 * 2 * k.numel() * k.element_size() + slots.numel() * slots.element_size()
    gbs = nbytes / (t_kernel * 1e-3) / 1e9
    return {"phase": phase, "T": t, "MiB": nbytes / 2 ** 20, "check": "ok" if ok else "FAIL",
            "kernel_ms": t_kernel, "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs if copy_gbs else None,
            "reference_ms": t_ref, "index_copy_ms": t_index,
            "speedup_vs_reference": t_ref / t_kernel if ok else None,
            "speedup_vs_index_copy": t_index / t_kernel if ok else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    if not require_cuda("bench_kv_cache"):
        return 0
    from unimlm_engine.ops import kv_cache as ops
    from unimlm_engine.ops._dispatch import backend_override

    copy_gbs = copy_bandwidth_gbs()
    print(f"measured D2D copy bandwidth: {copy_gbs:.0f} GB/s")
    decode = (1, 64) if args.quick else DECODE_TOKENS
    rows = []
    with backend_override("triton"):
        for phase, tokens in (("decode", decode), ("prefill", PREFILL_TOKENS)):
            for t in tokens:
                rows.append(run_case(phase, t, copy_gbs, ops))
                torch.cuda.empty_cache()
    print_table(rows)
    write_json("kv_cache", {"device": device_info(), "copy_bandwidth_gbs": copy_gbs, "dtype": "bfloat16",
                            "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                            "num_blocks": NUM_BLOCKS, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
