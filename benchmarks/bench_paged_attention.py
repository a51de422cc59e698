"""Paged decode attention (Triton) at Vicuna-7B shapes (32 heads, d 128; MHA and GQA 32/8),
bf16, batch 1..256, context 512..16384. GPU only; not yet run in this repository.

Per case: kernel time (CUDA events, L2 flushed), achieved bandwidth = bytes of q + K/V read +
output written / time, fraction of the measured D2D copy bandwidth, TFLOP/s; baselines in
the same run: PyTorch SDPA over K/V already gathered into contiguous [B, Hkv, S, D] tensors
(gather not timed: the most favourable baseline) and a per-sequence loop (gather + SDPA per
sequence, timed). A case whose kernel output disagrees with the fp32 reference on the same
inputs is reported as FAIL with no speedup.

    python benchmarks/bench_paged_attention.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import copy_bandwidth_gbs, device_info, print_table, require_cuda, time_cuda, write_json

HEADS, HEAD_DIM, BLOCK_SIZE = 32, 128, 16
BATCHES = (1, 8, 32, 64, 128, 256)
CONTEXTS = (512, 2048, 8192, 16384)
MAX_KV_BYTES = 24 << 30  # skip cases whose cache (plus the gathered copy) would not fit comfortably
LOOP_MAX_BATCH = 64  # the per-sequence loop is slow; time it only up to here


def make_case(batch: int, ctx: int, hkv: int, dtype=torch.bfloat16, device: str = "cuda"):
    pages = -(-ctx // BLOCK_SIZE)
    nb = batch * pages
    k_cache = torch.randn(nb, BLOCK_SIZE, hkv, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(nb, device=device, dtype=torch.int32).view(batch, pages)
    ctx_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
    return q, k_cache, v_cache, table, ctx_lens


def gathered(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """[NB, BS, Hkv, D] through table [B, P] -> contiguous [B, Hkv, ctx, D]."""
    b = table.shape[0]
    return cache[table.long()].reshape(b, -1, cache.shape[2], cache.shape[3])[:, :ctx].transpose(1, 2).contiguous()


def sdpa(q, k, v, scale):
    """q: [B, H, D], k/v: [B, Hkv, S, D] -> [B, H, D]."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]


def run_case(batch, ctx, hkv, copy_gbs, ops, ref_fn, timer=time_cuda, device="cuda", dtype=torch.bfloat16):
    """One row of the table. timer/device/dtype: a CPU smoke run (benchmarks/gpu_suite.py, dry) passes a
    wall-clock timer, "cpu" and float16 (the Triton interpreter gets bf16 wrong)."""
    q, kc, vc, table, lens = make_case(batch, ctx, hkv, dtype, device)
    scale = HEAD_DIM ** -0.5
    out = ops.paged_decode_attention(q, kc, vc, table, lens, scale)
    n = min(batch, 4)  # the fp32 reference gathers per sequence: check a few sequences
    ref = ref_fn(q[:n].float(), kc, vc, table[:n], lens[:n], scale)
    err = (out[:n].float() - ref).abs().max().item()
    ok = err <= 2e-2
    t_kernel = timer(lambda: ops.paged_decode_attention(q, kc, vc, table, lens, scale))
    kg, vg = gathered(kc, table, ctx), gathered(vc, table, ctx)
    t_sdpa = timer(lambda: sdpa(q, kg, vg, scale))
    del kg, vg

    def loop():
        for b in range(batch):
            kb, vb = gathered(kc, table[b:b + 1], ctx), gathered(vc, table[b:b + 1], ctx)
            sdpa(q[b:b + 1], kb, vb, scale)

    t_loop = timer(loop, warmup=1, iters=3) if batch <= LOOP_MAX_BATCH else None
    nbytes = 2 * q.numel() * q.element_size() + 2 * batch * ctx * hkv * HEAD_DIM * kc.element_size()
    gbs = nbytes / (t_kernel * 1e-3) / 1e9
    flops = 4 * batch * HEADS * ctx * HEAD_DIM
    return {"batch": batch, "ctx": ctx, "hkv": hkv, "max_err": err, "check": "ok" if ok else "FAIL",
            "kernel_ms": t_kernel, "GB/s": gbs, "frac_copy_bw": gbs / copy_gbs,
            "TFLOP/s": flops / (t_kernel * 1e-3) / 1e12,
            "sdpa_gathered_ms": t_sdpa, "loop_ms": t_loop,
            "speedup_vs_sdpa": t_sdpa / t_kernel if ok else None,
            "speedup_vs_loop": (t_loop / t_kernel) if ok and t_loop else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    if not require_cuda("bench_paged_attention"):
        return 0
    from unimlm_engine.ops import paged_attention as ops
    from unimlm_engine.ops._dispatch import backend_override

    copy_gbs = copy_bandwidth_gbs()
    print(f"measured D2D copy bandwidth: {copy_gbs:.0f} GB/s")
    batches, contexts = ((1, 64), (512, 8192)) if args.quick else (BATCHES, CONTEXTS)
    rows = []
    with backend_override("triton"):
        for hkv in (HEADS, 8):
            for batch in batches:
                for ctx in contexts:
                    kv_bytes = 2 * batch * ctx * hkv * HEAD_DIM * 2
                    if 2 * kv_bytes > MAX_KV_BYTES:
                        continue
                    rows.append(run_case(batch, ctx, hkv, copy_gbs, ops, ops.paged_decode_reference))
                    torch.cuda.empty_cache()
    print_table(rows)
    write_json("paged_attention", {"device": device_info(), "copy_bandwidth_gbs": copy_gbs, "dtype": "bfloat16",
                                   "heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
